"""The real loop driven by the numpy reference backend: stops, best choice, rotation, resume exactness."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from overnight.runs.checkpoint import CheckpointManager
from overnight.runs.effects import RunEffects
from overnight.config import build_config
from overnight.train.loop import TrainingError, train
from overnight.train.progress import Progress
from overnight.runs.rundir import RunFiles, read_metrics
from overnight.train.validation import Validator

from refbackend import NumpyBackend, SyntheticStream


def make_cfg(tmp_path: Path, *sets: str):
    base = ["model.path=" + str(tmp_path / "no-model"), "output.dir=" + str(tmp_path / "run"),
            "train.batch_size=4", "train.max_steps=30", "train.learning_rate=0.05", "train.warmup_steps=3",
            "train.report_every=1", "lora.rank=4", "lora.dropout=0.1", "eval.every_steps=5",
            "checkpoint.every_steps=10", "early_stopping.warmup_steps=100"]
    return build_config(None, {}, base + list(sets))


def run(cfg, *, stream=None, backend=None, resume_dir=None, stop_at=None, validator=True, monkeypatch=None,
        interrupted=None, said=None, predicted=None, clock=None):
    run_dir = Path(cfg.output.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    backend = backend or NumpyBackend(vocab_size=64)
    backend.setup(cfg, cfg.train.seed)
    stream = stream or SyntheticStream(cfg.train.batch_size, seed=cfg.train.seed)
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, log=lambda m: None)
    resume_state = None
    if resume_dir is not None:
        backend.load(resume_dir)
        resume_state = CheckpointManager.trainer_state(resume_dir)
        checkpoints.protected.add(resume_state["step"])
    val_stream = SyntheticStream(4, seed=999, samples_per_epoch=8)
    validate = Validator((lambda: [val_stream.next_batch() for _ in range(2)]) if validator else None)
    files = RunFiles(run_dir, warn=lambda m: None)
    progress = Progress(cfg.train.max_steps, enabled=False, **({"clock": clock} if clock else {}))
    if interrupted is None:
        interrupted = (lambda: 143 if progress.step >= stop_at else None) if stop_at else (lambda: None)
    predict = predicted.append if predicted is not None else None
    effects = RunEffects(files, checkpoints, backend, progress, fingerprint={"test": 1}, model_path=cfg.model.path,
                         predict=predict, say=said.append if said is not None else (lambda m: None))
    outcome = train(cfg, backend, stream, validate, effects, resume_state=resume_state, interrupted=interrupted)
    return outcome, backend, stream, run_dir


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"}


def test_training_lowers_the_loss(tmp_path):
    outcome, _, _, run_dir = run(make_cfg(tmp_path))
    losses = train_losses(run_dir)
    assert outcome.status == "completed" and outcome.step == 30
    assert np.mean([losses[s] for s in range(26, 31)]) < 0.8 * np.mean([losses[s] for s in range(1, 6)])
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()


def test_same_seed_same_losses(tmp_path):
    _, _, _, a = run(make_cfg(tmp_path / "a"))
    _, _, _, b = run(make_cfg(tmp_path / "b"))
    assert train_losses(a) == train_losses(b)


@pytest.mark.parametrize("stop_at", [7, 10, 23])
def test_resume_is_exact(tmp_path, stop_at):
    """N steps straight vs. stop at k, then resume in a fresh backend: identical losses and weights."""
    _, straight, _, straight_dir = run(make_cfg(tmp_path / "straight"))
    cfg = make_cfg(tmp_path / "split")
    first, _, _, run_dir = run(cfg, stop_at=stop_at)
    assert first.status == "interrupted" and first.step == stop_at and first.exit_code == 143
    checkpoint = CheckpointManager(run_dir).latest_valid()
    assert checkpoint.step == stop_at
    second, resumed, _, _ = run(cfg, resume_dir=checkpoint.path)
    assert second.status == "completed"
    expected, got = train_losses(straight_dir), train_losses(run_dir)  # later lines win for re-run steps
    assert got == expected
    for key in straight.params:
        np.testing.assert_array_equal(straight.params[key], resumed.params[key])
    evals = lambda d: [(r["step"], r["val_loss"], r["score"]) for r in read_metrics(d) if r["event"] == "eval"]
    assert sorted(set(evals(run_dir))) == sorted(set(evals(straight_dir)))


def test_plateau_stop_records_reason_and_checkpoint(tmp_path):
    # With a learning rate of 0 nothing improves: the plateau rule must stop the run.
    cfg = make_cfg(tmp_path, "train.learning_rate=0", "train.warmup_steps=0", "early_stopping.warmup_steps=4",
                   "early_stopping.check_every_steps=2", "early_stopping.patience=3", "train.max_steps=100")
    outcome, _, _, run_dir = run(cfg)
    assert outcome.status == "stopped"
    stops = [r for r in read_metrics(run_dir) if r["event"] == "stop"]
    assert stops and stops[0]["reason"] == "plateau" and "patience 3" in stops[0]["message"]
    assert outcome.step == stops[0]["step"] < 100
    assert CheckpointManager(run_dir).latest_valid().step == outcome.step


def test_grad_spike_aborts(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"spike_from_step": 6}))
    outcome, backend, _, run_dir = run(make_cfg(tmp_path, "early_stopping.grad_spike_patience=3"))
    stop = [r for r in read_metrics(run_dir) if r["event"] == "stop"][0]
    assert stop["reason"] == "grad_spike" and stop["step"] == 8 == outcome.step
    assert "3 consecutive steps" in stop["message"]
    assert CheckpointManager(run_dir).latest_valid().step == 8
    assert all(np.isfinite(v).all() for v in backend.params.values())


def test_non_finite_loss_stops_at_once_with_a_finite_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"nan_at_step": 4}))
    outcome, _, _, run_dir = run(make_cfg(tmp_path))
    stop = [r for r in read_metrics(run_dir) if r["event"] == "stop"][0]
    assert stop["reason"] == "non_finite" and outcome.step == 4 and outcome.status == "stopped"
    latest = CheckpointManager(run_dir).latest_valid()
    assert latest.step == 4
    assert all(np.isfinite(v).all() for v in load_file(str(latest.path / "adapter" / "adapter.safetensors")).values())


def test_non_finite_weights_are_never_committed(tmp_path, monkeypatch):
    # A backend that applies the NaN update: the stop cannot save step 12, the last good one stays.
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"nan_at_step": 12, "apply_nan": 1}))
    outcome, _, _, run_dir = run(make_cfg(tmp_path))
    assert outcome.status == "stopped" and outcome.step == 12
    steps = [i.step for i in CheckpointManager(run_dir).list()]
    assert 12 not in steps and 10 in steps
    assert not list((run_dir / "checkpoints").glob("*.tmp-*"))
    assert outcome.adapter_from == 10 or outcome.adapter_from in steps


def test_stuck_loss_trips_the_circuit_breaker(tmp_path):
    # One repeated batch and no learning: the loss stays identical.
    class SameBatch(SyntheticStream):
        def next_batch(self):
            self.position = 0
            return super().next_batch()

    cfg = make_cfg(tmp_path, "train.learning_rate=0", "train.warmup_steps=0", "early_stopping.stuck_steps=10")
    outcome, _, _, run_dir = run(cfg, stream=SameBatch(4, samples_per_epoch=4))
    stop = [r for r in read_metrics(run_dir) if r["event"] == "stop"][0]
    assert stop["reason"] == "stuck" and outcome.step == 10


def test_best_checkpoint_is_chosen_by_score_and_exported(tmp_path):
    cfg = make_cfg(tmp_path, "checkpoint.every_steps=100", "checkpoint.keep_last=1", "train.max_steps=30")
    outcome, _, _, run_dir = run(cfg)
    evals = [r for r in read_metrics(run_dir) if r["event"] == "eval"]
    best = min(evals, key=lambda r: r["score"])
    assert outcome.best_step == best["step"]
    assert [r["step"] for r in evals if r["best"]][-1] == best["step"]
    # The best survives rotation and is the exported adapter.
    steps = [i.step for i in CheckpointManager(run_dir).list()]
    assert best["step"] in steps and 30 in steps
    assert outcome.adapter_from == best["step"]
    exported = (run_dir / "adapter" / "adapter.safetensors").read_bytes()
    assert exported == (CheckpointManager(run_dir).path_for(best["step"]) / "adapter" / "adapter.safetensors").read_bytes()


def test_rotation_keeps_last_n_plus_best_and_resume_source(tmp_path):
    cfg = make_cfg(tmp_path, "checkpoint.every_steps=5", "checkpoint.keep_last=2", "eval.every_steps=1000",
                   "train.max_steps=20")
    _, _, _, run_dir = run(cfg, stop_at=10)
    source = CheckpointManager(run_dir).latest_valid()
    run(cfg, resume_dir=source.path)
    steps = [i.step for i in CheckpointManager(run_dir).list()]
    assert steps == [10, 15, 20]  # last two plus the checkpoint this run resumed from


def test_oom_halves_micro_batch_and_keeps_the_effective_batch(tmp_path, monkeypatch):
    _, straight, _, straight_dir = run(make_cfg(tmp_path / "a", "lora.dropout=0"))
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"oom_above_rows": 1}))
    _, halved, _, run_dir = run(make_cfg(tmp_path / "b", "lora.dropout=0"))
    assert [r["micro_splits"] for r in read_metrics(run_dir) if r["event"] == "oom"] == [4]  # 4 rows -> 2 -> 1, in one step
    a, b = train_losses(straight_dir), train_losses(run_dir)
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-9)
    np.testing.assert_allclose(halved.params["B"], straight.params["B"], rtol=1e-6, atol=1e-9)


def test_oom_at_one_row_gives_up_with_suggestions(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"oom_above_rows": 0}))
    with pytest.raises(TrainingError, match="grad_checkpoint"):
        run(make_cfg(tmp_path))


def test_every_sample_once_per_epoch(tmp_path):
    cfg = make_cfg(tmp_path, "train.max_steps=20")
    _, _, stream, _ = run(cfg)  # 20 steps x 4 rows = 2 epochs of 40
    for epoch in (0, 1):
        seen = sorted(i for e, i in stream.consumed if e == epoch)
        assert seen == list(range(40))


# ---------------------------------------------------------------------------
# The final eval, evals skipped by a signal, and out-of-memory in validation


def eval_lines(run_dir: Path) -> dict[int, dict]:
    """The last eval line per step (a resumed run appends re-run steps again), without the wall time."""
    return {r["step"]: {k: v for k, v in r.items() if k != "time"}
            for r in read_metrics(run_dir) if r["event"] == "eval"}


def adapter_bytes(run_dir: Path) -> bytes:
    return (run_dir / "adapter" / "adapter.safetensors").read_bytes()


def test_the_final_step_is_evaluated_and_competes_for_best(tmp_path):
    # 23 is not a multiple of eval.every_steps: the final weights are still evaluated and saved.
    cfg = make_cfg(tmp_path, "train.max_steps=23", "checkpoint.every_steps=100", "checkpoint.keep_last=1")
    predicted: list[int] = []
    outcome, _, _, run_dir = run(cfg, predicted=predicted)
    evals = eval_lines(run_dir)
    assert sorted(evals) == [5, 10, 15, 20, 23] and predicted == [5, 10, 15, 20, 23]
    best = min(evals.values(), key=lambda r: r["score"])
    assert best["step"] == 23 == outcome.best_step == outcome.adapter_from  # still improving: the last one wins
    assert 23 in [i.step for i in CheckpointManager(run_dir).list()]


def test_no_final_eval_without_validation(tmp_path):
    cfg = make_cfg(tmp_path, "train.max_steps=23")
    outcome, _, _, run_dir = run(cfg, validator=False)
    assert eval_lines(run_dir) == {} and outcome.best_step is None and outcome.adapter_from == 23


@pytest.mark.parametrize("stop_at", [4, 5, 8, 10, 20, 22, 23])
def test_resume_anywhere_gives_the_same_evals_best_and_adapter(tmp_path, stop_at):
    """Stops before, at (eval skipped, owed) and after eval steps, and at the very end (the resume lands
    exactly on max_steps and only owes the final eval): the same eval lines, predictions, best and adapter."""
    cfg_args = ("train.max_steps=23", "checkpoint.every_steps=7", "checkpoint.keep_last=2")
    straight_pred: list[int] = []
    straight, _, _, straight_dir = run(make_cfg(tmp_path / "straight", *cfg_args), predicted=straight_pred)
    cfg = make_cfg(tmp_path / "split", *cfg_args)
    predicted: list[int] = []
    first, _, _, run_dir = run(cfg, stop_at=stop_at, predicted=predicted)
    assert first.status == "interrupted" and first.step == stop_at
    # A pending signal skips the eval and predictions of an eval step; the checkpoint owes them.
    assert stop_at not in eval_lines(run_dir) and stop_at not in predicted
    checkpoint = CheckpointManager(run_dir).latest_valid()
    assert checkpoint.step == stop_at
    owed = CheckpointManager.trainer_state(checkpoint.path)["owed"]
    assert (owed is not None) is (stop_at % 5 == 0 or stop_at == 23)
    second, _, _, _ = run(cfg, resume_dir=checkpoint.path, predicted=predicted)
    assert second.status == "completed" and second.step == 23
    assert eval_lines(run_dir) == eval_lines(straight_dir)
    assert sorted(set(predicted)) == straight_pred
    assert (second.best_step, second.adapter_from) == (straight.best_step, straight.adapter_from)
    assert adapter_bytes(run_dir) == adapter_bytes(straight_dir)
    assert train_losses(run_dir) == train_losses(straight_dir)


def test_without_keep_best_a_signal_at_the_best_step_does_not_change_the_exported_adapter(tmp_path):
    """keep_best off: the uninterrupted run has no checkpoint at its best step (65, off the grid of 7), so it
    exports the newest; a signal's save at step 65 must not make the resumed run export step 65 instead."""
    cfg_args = ("train.max_steps=80", "checkpoint.every_steps=7", "checkpoint.keep_last=2",
                "checkpoint.keep_best=false")
    straight, _, _, straight_dir = run(make_cfg(tmp_path / "straight", *cfg_args))
    assert straight.best_step == 65 and straight.adapter_from == 80  # the premise: a best off the grid
    cfg = make_cfg(tmp_path / "split", *cfg_args)
    first, _, _, run_dir = run(cfg, stop_at=straight.best_step)
    checkpoint = CheckpointManager(run_dir).latest_valid()
    assert checkpoint.step == straight.best_step
    second, _, _, _ = run(cfg, resume_dir=checkpoint.path)
    assert (second.best_step, second.adapter_from) == (straight.best_step, straight.adapter_from)
    assert adapter_bytes(run_dir) == adapter_bytes(straight_dir)


def test_a_signal_at_an_eval_step_saves_at_once_and_owes_the_eval(tmp_path):
    said: list[str] = []
    predicted: list[int] = []
    outcome, _, _, run_dir = run(make_cfg(tmp_path), stop_at=10, said=said, predicted=predicted)
    assert outcome.status == "interrupted" and outcome.step == 10 and outcome.exit_code == 143
    assert sorted(eval_lines(run_dir)) == [5] and predicted == [5]
    checkpoint = CheckpointManager(run_dir).latest_valid()
    assert checkpoint.step == 10
    assert CheckpointManager.trainer_state(checkpoint.path)["owed"] == {"stop": None}
    assert any("evaluation of step 10 is skipped" in m for m in said)
    events = [r["event"] for r in read_metrics(run_dir) if r["step"] == 10]
    assert events[-2:] == ["checkpoint", "interrupted"]


@pytest.mark.parametrize("signal_at_batch", [1, 2])
def test_a_signal_during_an_eval(tmp_path, signal_at_batch):
    """During the first of the two validation batches: the eval is cut short and owed to the resume.
    During the last one: the eval is complete and recorded, only the predictions are skipped."""
    class SignalMidEval(NumpyBackend):
        calls = 0

        def eval_loss(self, batch):
            if self.updates == 10:
                SignalMidEval.calls += 1
            return super().eval_loss(batch)

    _, _, _, straight_dir = run(make_cfg(tmp_path / "straight"))
    cfg = make_cfg(tmp_path / "split")
    predicted: list[int] = []
    first, _, _, run_dir = run(cfg, backend=SignalMidEval(vocab_size=64), predicted=predicted,
                               interrupted=lambda: 143 if SignalMidEval.calls >= signal_at_batch else None)
    assert first.status == "interrupted" and first.step == 10 and 10 not in predicted
    checkpoint = CheckpointManager(run_dir).latest_valid()
    owed = CheckpointManager.trainer_state(checkpoint.path)["owed"]
    assert checkpoint.step == 10 and (10 in eval_lines(run_dir)) is (owed is None) is (signal_at_batch == 2)
    run(cfg, resume_dir=checkpoint.path)
    assert eval_lines(run_dir) == eval_lines(straight_dir)


def test_a_signal_at_a_plateau_stop_carries_the_stop_to_the_resume(tmp_path):
    args = ("train.learning_rate=0", "train.warmup_steps=0", "early_stopping.warmup_steps=4",
            "early_stopping.check_every_steps=3", "early_stopping.patience=2", "train.max_steps=100",
            "eval.every_steps=5", "early_stopping.stuck_steps=1000")
    straight, _, _, straight_dir = run(make_cfg(tmp_path / "straight", *args))
    assert straight.status == "stopped" and straight.step % 5 != 0  # off the eval schedule...
    assert straight.step in eval_lines(straight_dir)  # ...yet the stopping step is evaluated
    cfg = make_cfg(tmp_path / "split", *args)
    first, _, _, run_dir = run(cfg, stop_at=straight.step)
    assert first.status == "interrupted" and first.step == straight.step  # the signal wins: an eval is owed
    assert not [r for r in read_metrics(run_dir) if r["event"] == "stop"]
    checkpoint = CheckpointManager(run_dir).latest_valid()
    assert CheckpointManager.trainer_state(checkpoint.path)["owed"]["stop"]["code"] == "plateau"
    second, _, _, _ = run(cfg, resume_dir=checkpoint.path)
    assert (second.status, second.step, second.reason) == (straight.status, straight.step, straight.reason)
    assert eval_lines(run_dir) == eval_lines(straight_dir)
    assert second.best_step == straight.best_step and adapter_bytes(run_dir) == adapter_bytes(straight_dir)
    stops = [r for r in read_metrics(run_dir) if r["event"] == "stop"]
    assert len(stops) == 1 and stops[0]["reason"] == "plateau"


def test_a_broken_run_is_not_evaluated_at_its_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"nan_at_step": 7}))
    outcome, _, _, run_dir = run(make_cfg(tmp_path))
    assert outcome.status == "stopped" and outcome.step == 7 and sorted(eval_lines(run_dir)) == [5]


def test_oom_in_validation_splits_the_batch_with_the_same_value(tmp_path, monkeypatch):
    _, _, _, straight_dir = run(make_cfg(tmp_path / "a"))
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"eval_oom_above_rows": 1}))
    said: list[str] = []
    outcome, _, _, run_dir = run(make_cfg(tmp_path / "b"), said=said)
    assert outcome.status == "completed"
    a, b = eval_lines(straight_dir), eval_lines(run_dir)
    assert sorted(a) == sorted(b) == [5, 10, 15, 20, 25, 30]
    for step in a:
        assert a[step]["val_tokens"] == b[step]["val_tokens"]
        np.testing.assert_allclose(b[step]["val_loss"], a[step]["val_loss"], rtol=1e-12)
        assert a[step]["best"] == b[step]["best"]
    assert train_losses(run_dir) == train_losses(straight_dir)  # validation never touches training
    assert len([m for m in said if "out of memory in validation" in m]) == 1  # logged once per run


def test_oom_in_validation_at_one_row_is_a_clear_error_and_keeps_the_step(tmp_path, monkeypatch):
    _, _, _, straight_dir = run(make_cfg(tmp_path / "straight"))
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"eval_oom_above_rows": 0}))
    cfg = make_cfg(tmp_path / "split")
    with pytest.raises(TrainingError, match="validation runs out of memory even on one row.*model.max_seq_length"):
        run(cfg)
    checkpoint = CheckpointManager(Path(cfg.output.dir)).latest_valid()
    assert checkpoint.step == 5  # the first eval step: its work is saved, its eval owed
    assert CheckpointManager.trainer_state(checkpoint.path)["owed"] == {"stop": None}
    monkeypatch.delenv("OVERNIGHT_REF_FAULTS")  # e.g. more memory free on the next try
    outcome, _, _, run_dir = run(cfg, resume_dir=checkpoint.path)
    assert outcome.status == "completed" and eval_lines(run_dir) == eval_lines(straight_dir)


# ---------------------------------------------------------------------------
# The last step a run trains always has its train event (metrics.jsonl, and so TensorBoard, W&B and the report)


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if r["event"] == "train"]


@pytest.mark.parametrize("ending", ["max_steps", "signal", "plateau", "non_finite"])
def test_the_step_a_run_ends_on_has_its_train_event(tmp_path, monkeypatch, ending):
    """report_every=10 puts train events at 1, 10, 20: the step the run ends on (off that grid) gets one too,
    with its own figures, before the stop or interrupted event, and exactly once."""
    args = ["train.report_every=10", "train.max_steps=24"]
    if ending == "plateau":
        args += ["train.learning_rate=0", "train.warmup_steps=0", "early_stopping.warmup_steps=4",
                 "early_stopping.check_every_steps=3", "early_stopping.patience=2", "early_stopping.stuck_steps=1000"]
    if ending == "non_finite":
        monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"nan_at_step": 13}))
    outcome, _, _, run_dir = run(make_cfg(tmp_path, *args), stop_at=17 if ending == "signal" else None)
    end = outcome.step
    assert end == {"max_steps": 24, "signal": 17, "non_finite": 13}.get(ending, end) and end % 10
    assert train_steps(run_dir) == [s for s in (1, 10, 20) if s < end] + [end]
    records = read_metrics(run_dir)
    last = [r for r in records if r["event"] == "train"][-1]
    assert last["step"] == end and last["elapsed_s"] > 0 and set(last) >= {"loss", "lr", "grad_norm", "tokens"}
    ends_with = {"signal": "interrupted", "plateau": "stop", "non_finite": "stop"}.get(ending)
    if ends_with:
        kinds = [r["event"] for r in records]
        assert kinds.index(ends_with) > records.index(last)


def test_a_resume_after_a_signal_does_not_repeat_the_steps_train_event(tmp_path):
    cfg = make_cfg(tmp_path, "train.report_every=10", "train.max_steps=24", "eval.every_steps=100")
    first, _, _, run_dir = run(cfg, stop_at=17)
    assert first.step == 17 and train_steps(run_dir) == [1, 10, 17]
    run(cfg, resume_dir=CheckpointManager(run_dir).latest_valid().path)
    assert train_steps(run_dir) == [1, 10, 17, 20, 24]


def test_a_validation_that_cannot_fit_still_records_its_steps_train_event(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"eval_oom_above_rows": 0}))
    cfg = make_cfg(tmp_path, "train.report_every=10", "eval.every_steps=7")
    with pytest.raises(TrainingError):
        run(cfg)
    assert train_steps(Path(cfg.output.dir)) == [1, 7]


def test_oom_split_regrows_after_the_configured_steps_and_a_resume_makes_the_same_choice(tmp_path, monkeypatch):
    """An out of memory at steps 3 and 12 only (4 rows; 2 fit): split at each, back to 4 rows 5 steps later. A run
    stopped between the split and the regrow resumes with the recorded split and regrows at the same step."""
    monkeypatch.setenv("OVERNIGHT_REF_FAULTS", json.dumps({"oom_at_steps": [3, 12]}))
    sets = ("train.oom_regrow_steps=5", "train.max_steps=20")
    straight, _, _, straight_dir = run(make_cfg(tmp_path / "straight", *sets))
    assert straight.status == "completed"
    events = lambda d: [(r["event"], r["step"], r["micro_splits"]) for r in read_metrics(d)
                        if r["event"] in ("oom", "oom_regrow")]
    assert events(straight_dir) == [("oom", 2, 2), ("oom_regrow", 7, 1), ("oom", 11, 2), ("oom_regrow", 16, 1)]

    cfg = make_cfg(tmp_path / "resumed", *sets)
    first, _, _, run_dir = run(cfg, stop_at=5)
    checkpoint = CheckpointManager(run_dir).latest_valid()
    state = CheckpointManager.trainer_state(checkpoint.path)
    assert (checkpoint.step, state["micro_splits"], state["last_split_step"]) == (5, 2, 2)
    second, _, _, _ = run(cfg, resume_dir=checkpoint.path)
    assert second.status == "completed"
    assert events(run_dir) == events(straight_dir)
    assert train_losses(run_dir) == train_losses(straight_dir)


class _SwappingBackend(NumpyBackend):
    """From update ``slow_from`` on, a step of more than 2 rows per micro-batch takes 5 s instead of 1 s on the
    injected clock, with memory at 95% of the limit: a machine swapping until the micro-batch is halved."""

    def __init__(self, clock: list[float], slow_from: int):
        super().__init__(vocab_size=64)
        self.clock, self.slow_from, self.swapping = clock, slow_from, False

    def train_step(self, micro_batches, lr, step_scales=None):
        result = super().train_step(micro_batches, lr, step_scales)
        self.swapping = self.updates >= self.slow_from and max(b.num_rows for b in micro_batches) > 2
        self.clock[0] += 5.0 if self.swapping else 1.0
        return result

    def memory(self):
        return {"memory_mb": 950.0 if self.swapping else 500.0, "limit_mb": 1000.0}


def test_a_slide_into_swap_warns_once_then_saves_and_splits(tmp_path):
    clock = [0.0]
    backend = _SwappingBackend(clock, slow_from=12)
    said: list[str] = []
    cfg = make_cfg(tmp_path, "train.swap_patience=4", "train.max_steps=20", "eval.every_steps=100")
    outcome, _, _, run_dir = run(cfg, backend=backend, clock=lambda: clock[0], said=said)
    assert outcome.status == "completed"
    records = read_metrics(run_dir)
    swaps = [(r["event"], r["step"]) for r in records if r["event"] in ("swap", "swap_split")]
    assert swaps == [("swap", 14), ("swap_split", 15)]  # slow from step 12: warned at the third, split at the fourth
    assert sum("likely swapping" in line for line in said) == 1
    state = CheckpointManager.trainer_state(CheckpointManager(run_dir).path_for(15))
    assert (state["micro_splits"], state["last_split_step"]) == (2, 15)  # saved with the split it continues with
    assert not backend.swapping  # two rows per micro-batch from step 16 on: out of swap


def test_a_source_that_scores_its_own_steps_gets_no_overfitting_gap_in_the_checkpoint_score(tmp_path):
    """grpo's tracked loss is minus the sampled reward, not a likelihood: val_loss minus it measures no overfitting
    (tests/test_scoring.py shows the worse eval it picked), so the loop scores such a source without the gap."""
    class RewardScored(SyntheticStream):
        scores_own_steps = True

        def after_step(self, step, result):
            return -100.0, None  # minus a large reward: the gap would be val_loss + 100

    def gaps(source_class, out):
        cfg = make_cfg(out)
        _, _, _, run_dir = run(cfg, stream=source_class(cfg.train.batch_size, seed=cfg.train.seed))
        return [r["gap"] for r in read_metrics(run_dir) if r["event"] == "eval"]

    assert all(g > 50 for g in gaps(type("Plain", (RewardScored,), {"scores_own_steps": False}), tmp_path / "a"))
    assert gaps(RewardScored, tmp_path / "b") == [0.0] * 6


# -- batches built ahead on a thread (overnight.data.prefetch) ---------------------------------------------------

class ReadAhead(SyntheticStream):
    prefetch = True  # as TrainStream: the loop builds its batches on a thread


def prefetch_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "overnight-prefetch" and t.is_alive()]


@pytest.mark.parametrize("stop_at", [7, 10])
def test_batches_built_ahead_train_the_same_run_and_resume_exactly(tmp_path, stop_at):
    """Read ahead or not, the same losses; a signal stops the thread and the checkpoint holds the position after the
    last batch the loop took (not the thread's), so the resumed run (reading ahead again) ends identical."""
    sets = ("train.grad_accumulation=2",)
    _, plain, _, plain_dir = run(make_cfg(tmp_path / "plain", *sets))
    cfg = make_cfg(tmp_path / "ahead", *sets)
    first, _, _, run_dir = run(cfg, stream=ReadAhead(cfg.train.batch_size, seed=cfg.train.seed), stop_at=stop_at)
    assert first.status == "interrupted" and not prefetch_threads()
    taken = SyntheticStream(cfg.train.batch_size, seed=cfg.train.seed)
    for _ in range(2 * stop_at):
        taken.next_batch()
    checkpoint = CheckpointManager(run_dir).latest_valid()
    assert CheckpointManager.trainer_state(checkpoint.path)["data"] == taken.state()
    second, resumed, _, _ = run(cfg, stream=ReadAhead(cfg.train.batch_size, seed=cfg.train.seed),
                                resume_dir=checkpoint.path)
    assert second.status == "completed" and not prefetch_threads()
    assert train_losses(run_dir) == train_losses(plain_dir)
    for key in plain.params:
        np.testing.assert_array_equal(plain.params[key], resumed.params[key])


def test_the_read_ahead_thread_ends_when_the_loop_raises(tmp_path):
    class Crashing(NumpyBackend):
        def train_step(self, micro_batches, lr, step_scales=None):
            if self.updates == 3:
                raise RuntimeError("the backend failed")
            return super().train_step(micro_batches, lr, step_scales)

    cfg = make_cfg(tmp_path)
    with pytest.raises(RuntimeError, match="the backend failed"):
        run(cfg, backend=Crashing(vocab_size=64), stream=ReadAhead(cfg.train.batch_size, seed=cfg.train.seed))
    assert not prefetch_threads()
