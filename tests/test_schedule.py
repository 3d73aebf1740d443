import math

import pytest

from overnight.config import build_config
from overnight.train.schedule import lr_at


def train_cfg(*sets):
    return build_config(None, {}, ["train.learning_rate=1.0", "train.warmup_steps=10", "train.max_steps=110", *sets]).train


def test_warmup_is_linear_and_reaches_the_peak():
    t = train_cfg()
    assert [lr_at(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


@pytest.mark.parametrize("schedule, mid, end", [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0), ("constant", 1.0, 1.0)])
def test_decay_shapes(schedule, mid, end):
    t = train_cfg(f"train.schedule={schedule}")
    assert lr_at(60, t) == pytest.approx(mid)
    assert lr_at(110, t) == pytest.approx(end, abs=1e-12)


def test_min_lr_ratio_is_the_floor():
    t = train_cfg("train.min_lr_ratio=0.1")
    assert lr_at(110, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)


def test_pure_function_of_step():
    t = train_cfg()
    assert [lr_at(s, t) for s in range(110)] == [lr_at(s, t) for s in range(110)]
    assert all(math.isfinite(lr_at(s, t)) for s in range(200))


# -- train.epochs -------------------------------------------------------------------------------------------------

from fractions import Fraction  # noqa: E402
from pathlib import Path  # noqa: E402

from overnight.config import ConfigError  # noqa: E402
from overnight.data import DataReport, FileReport  # noqa: E402
from overnight.train.schedule import apply_epochs, epoch_plan, plan_warnings  # noqa: E402


def rows_report(rows: int, packing: bool = False, lengths=None) -> DataReport:
    import numpy as np

    train = FileReport(Path("train.jsonl"), rows=rows, lengths=None if lengths is None else np.asarray(lengths))
    return DataReport("cpt" if packing else "sft", train, None, 64, packing=packing)


@pytest.mark.parametrize("sets, processes, steps, per_epoch, text", [
    (["train.epochs=3"], 1, 120, Fraction(40), "3 epochs of 40 steps"),  # 320 rows / batch 8 = 40
    (["train.epochs=1"], 1, 40, Fraction(40), "1 epoch of 40 steps"),
    (["train.epochs=3", "train.grad_accumulation=3"], 1, 40, Fraction(40, 3), "3 epochs of 13.3 steps"),
    (["train.epochs=1", "train.grad_accumulation=3"], 1, 14, Fraction(40, 3), "1 epoch of 13.3 steps, rounded up"),
    (["train.epochs=2", "train.grad_accumulation=2"], 2, 20, Fraction(10), "2 epochs of 10 steps"),  # 4 batches a step
    (["train.epochs=0.3"], 1, 12, Fraction(40), "0.3 epochs of 40 steps"),  # 0.3 * 40 is 12, not 12.000000000000002
    (["train.epochs=3", "train.batch_size=7"], 1, 138, Fraction(46), "3 epochs of 46 steps"),  # the last batch smaller
    (["train.epochs=2", "data.method=grpo", "grpo.rewards=[exact_match]", "grpo.iterations=2"], 1, 160, Fraction(80),
     "2 epochs of 80 steps"),  # each generated batch is trained on twice
])
def test_epochs_become_steps_from_the_rows_batch_accumulation_and_processes(sets, processes, steps, per_epoch, text):
    cfg = build_config(None, {}, list(sets))
    plan = apply_epochs(cfg, rows_report(320), processes)
    assert (plan.max_steps, plan.steps_per_epoch, plan.describe()) == (steps, per_epoch, text)
    assert cfg.train.max_steps == steps


def test_packed_epochs_count_blocks_of_tokens_and_need_them_counted():
    cfg = build_config(None, {}, ["train.epochs=1", "data.method=cpt", "model.max_seq_length=64", "train.batch_size=2"])
    # 640 tokens = 10 blocks; one token more is a block with nothing to predict (left out), two are one more block
    assert epoch_plan(cfg, rows_report(9, True, [600, 40]), 1).max_steps == 5
    assert epoch_plan(cfg, rows_report(9, True, [601, 40]), 1).max_steps == 5
    assert epoch_plan(cfg, rows_report(9, True, [602, 40]), 1).max_steps == 6
    with pytest.raises(ConfigError, match="train.epochs with packed data.*--model DIR"):
        epoch_plan(cfg, rows_report(9, True, None), 1)  # a hub model: no tokenizer before the model loads
    assert epoch_plan(build_config(), rows_report(9), 1) is None  # max_steps given: nothing derived


@pytest.mark.parametrize("method, data_dir, sets", [
    ("sft", "", ["train.batch_size=3", "train.grad_accumulation=2"]),
    ("dpo", "preference", ["train.batch_size=7"]),
    ("cpt", "text", ["model.max_seq_length=45", "train.batch_size=3"]),
])
def test_the_derived_steps_take_exactly_the_epochs_of_the_real_stream(tiny_model_dir, method, data_dir, sets):
    """max_steps for 2 epochs draws every batch of two passes over the data, and then the stream is at the next
    epoch's start."""
    from conftest import DATA_DIR
    from overnight import data
    from overnight.data.batches import TrainStream

    path = DATA_DIR / data_dir
    cfg = build_config(None, {}, [f"model.path={tiny_model_dir}", f"data.path={path}", f"data.method={method}",
                                  "train.epochs=2", *sets])
    tok = data.load_tokenizer(tiny_model_dir)
    steps = apply_epochs(cfg, data.check_data(path, method, tokenizer=tok, cfg=cfg), 1).max_steps
    stream = TrainStream(path / "train.jsonl", tok, cfg)
    seen = 0
    for _ in range(steps * cfg.train.grad_accumulation):
        seen += stream.next_batch().num_rows // (2 if method == "dpo" else 1)
    state = stream.state()
    if method == "cpt":  # blocks: the second epoch's documents are all used (its last, smaller batch drawn)
        assert (state["epoch"], state["position"]) in ((2, 0), (1, stream.samples_per_epoch))
    else:
        assert seen == 2 * stream.samples_per_epoch and (state["epoch"], state["position"]) == \
            (1, stream.samples_per_epoch)
    stream.close()


# -- what the banner warns about ------------------------------------------------------------------------------------

def test_a_run_shorter_than_its_warmup_is_warned_about_with_the_lr_it_reaches_and_the_fix():
    cfg = build_config(None, {}, ["train.max_steps=24", "eval.every_steps=6", "checkpoint.every_steps=6"])
    assert [lr_at(23, cfg.train) / cfg.train.learning_rate] == pytest.approx([0.48])  # the 48%
    assert plan_warnings(cfg, 0, evaluates=True) == [
        "train.warmup_steps 50 is longer than the run (24 steps): the learning rate climbs to only 48% of "
        "train.learning_rate 0.0001, at the last step, and never decays; for a warmup of a tenth of the run: "
        "--set train.warmup_steps=2"]
    assert plan_warnings(build_config(None, {}, ["train.max_steps=50", "eval.every_steps=6",
                                                 "checkpoint.every_steps=6"]), 0, evaluates=True) == []


def test_intervals_the_run_never_reaches_are_warned_about():
    cfg = build_config(None, {}, ["train.max_steps=24", "train.warmup_steps=2"])
    warned = plan_warnings(cfg, 0, evaluates=True)
    assert len(warned) == 2
    assert warned[0].startswith("eval.every_steps 250 is more than the run's 24 steps: the only eval is the final "
                                "step's") and "--set eval.every_steps=6" in warned[0]
    assert warned[1].startswith("checkpoint.every_steps 250 is more than the run's 24 steps: no checkpoint on that "
                                "interval before the last step, so a crash or kill can lose the whole run")
    assert [w.split(" ")[0] for w in plan_warnings(cfg, 0, evaluates=False)] == ["checkpoint.every_steps"]
    # Evals along the way: a new best still saves a checkpoint, and the warning says so.
    cfg = build_config(None, {}, ["train.max_steps=24", "train.warmup_steps=2", "eval.every_steps=8"])
    assert plan_warnings(cfg, 0, evaluates=True)[0].startswith(
        "checkpoint.every_steps 250 is more than the run's 24 steps: no checkpoint on that interval before the last "
        "step (only an eval with a new best saves one)")
    # A resumed run: what matters is the next step on the interval after the start.
    cfg = build_config(None, {}, ["train.max_steps=800", "train.warmup_steps=2"])
    assert plan_warnings(cfg, 700, evaluates=True) == []  # 750 is on both intervals
    resumed = plan_warnings(cfg, 750, evaluates=True)
    assert [w.split(":")[0] for w in resumed] == [
        "eval.every_steps 250 has no step between this start (step 750) and the run's end (step 800)",
        "checkpoint.every_steps 250 has no step between this start (step 750) and the run's end (step 800)"]
    assert "can lose every step since 750" in resumed[1]
    assert plan_warnings(cfg, 800, evaluates=True) == []  # nothing left to train


def test_the_shipped_presets_are_not_warned_about():
    root = Path(__file__).resolve().parents[1]
    for preset in sorted((root / "configs").glob("*.yaml")):
        cfg = build_config(preset)
        assert plan_warnings(cfg, 0, evaluates=True) == [], preset.name
        assert cfg.warnings == [], preset.name
