"""The real loop driven by the numpy reference backend: stops, best choice, rotation, resume exactness."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from overnight.checkpoint import CheckpointManager
from overnight.config import build_config
from overnight.loop import TrainingError, train
from overnight.progress import Progress
from overnight.rundir import RunFiles, read_metrics
from overnight.validate import Validator

from refbackend import NumpyBackend, SyntheticStream


def make_cfg(tmp_path: Path, *sets: str):
    base = ["model.path=" + str(tmp_path / "no-model"), "output.dir=" + str(tmp_path / "run"),
            "train.batch_size=4", "train.max_steps=30", "train.learning_rate=0.05", "train.warmup_steps=3",
            "train.report_every=1", "lora.rank=4", "lora.dropout=0.1", "eval.every_steps=5",
            "checkpoint.every_steps=10", "early_stopping.warmup_steps=100"]
    return build_config(None, {}, base + list(sets))


def run(cfg, *, stream=None, backend=None, resume_dir=None, stop_at=None, validator=True, monkeypatch=None):
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
    progress = Progress(cfg.train.max_steps, enabled=False)
    interrupted = (lambda: 143 if progress.step >= stop_at else None) if stop_at else (lambda: None)
    outcome = train(cfg, backend, stream, validate, checkpoints, files, progress, fingerprint={"test": 1},
                    resume_state=resume_state, interrupted=interrupted, say=lambda m: None)
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
