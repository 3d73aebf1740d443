"""The loop's memory policies (overnight.train.memory) with injected step times and memory figures."""
from __future__ import annotations

import pytest

from overnight.runs.rundir import read_metrics
from overnight.train.memory import MicroSplits, SwapWatch


def test_regrow_after_the_configured_steps_without_an_out_of_memory():
    splits = MicroSplits(regrow_steps=3)
    assert not splits.regrow_due(0)  # never split: nothing to regrow
    splits.split(4, 2)  # the step trained with 4 completed steps needed two pieces
    assert [splits.regrow_due(s) for s in (4, 5, 6, 7)] == [False, False, False, True]
    assert splits.regrow() == 2 and splits.splits == 1 and not splits.regrow_due(8)


def test_regrow_zero_keeps_the_split_for_good():
    splits = MicroSplits(regrow_steps=0, splits=4, last_split_step=1)
    assert not any(splits.regrow_due(s) for s in range(1, 10_000, 97))


def test_regrow_state_round_trips_and_an_old_checkpoint_counts_from_its_step():
    splits = MicroSplits(regrow_steps=5)
    splits.split(10, 4)
    again = MicroSplits(regrow_steps=5)
    again.restore(splits.state())
    assert again.state() == {"micro_splits": 4, "last_split_step": 10}
    assert [again.regrow_due(s) for s in (14, 15)] == [False, True]
    old = MicroSplits(regrow_steps=5)
    old.restore({"micro_splits": 2})  # a checkpoint written before the split's step was recorded
    assert [old.regrow_due(s) for s in (30, 34, 35)] == [False, False, True]


def feed(watch: SwapWatch, times, memory_mb=95.0, limit_mb=100.0):
    return [watch.after_step(t, memory_mb, limit_mb) for t in times]


def test_swap_warns_once_then_splits_after_patience_slow_steps_near_the_limit():
    watch = SwapWatch(patience=5)
    assert feed(watch, [1.0] * 10) == [None] * 10  # the history the median needs
    assert feed(watch, [4.0] * 5) == [None, None, "warn", None, "split"]
    # After a split the history starts again, and the warning is not repeated.
    assert feed(watch, [1.0] * 10 + [4.0] * 5) == [None] * 10 + [None, None, None, None, "split"]


def test_slow_steps_far_from_the_limit_or_interrupted_are_not_swap():
    watch = SwapWatch(patience=3)
    feed(watch, [1.0] * 10)
    assert feed(watch, [10.0] * 6, memory_mb=50.0) == [None] * 6  # slow but memory is fine: not swap
    assert feed(watch, [10.0] * 6, limit_mb=None) == [None] * 6  # no known limit (CPU): never judged
    assert feed(watch, [4.0, 4.0, 1.0, 4.0, 4.0, 1.0]) == [None] * 6  # a normal step between resets the count
    assert feed(watch, [2.9] * 6) == [None] * 6  # under 3x the median


def test_swap_needs_a_history_and_never_splits_with_patience_zero():
    fresh = SwapWatch(patience=2)
    assert feed(fresh, [1.0] * 3 + [50.0] * 3) == [None] * 6  # too few steps for a median
    warn_only = SwapWatch(patience=0)
    feed(warn_only, [1.0] * 10)
    assert feed(warn_only, [5.0] * 50).count("warn") == 1 and "split" not in feed(warn_only, [5.0] * 50)


# --------------------------------------------------------------------------- through `overnight train`


def test_cli_an_oom_split_regrows_and_says_so(tiny_model_dir, tmp_path):
    from test_cli import base_args, overnight

    out = tmp_path / "run"
    done = overnight(*base_args(tiny_model_dir, out, 6, "--set", "train.oom_regrow_steps=2"),
                     faults={"oom_at_steps": [2]})
    assert done.returncode == 0, done.stderr
    records = read_metrics(out)
    assert [(r["event"], r["step"], r["micro_splits"]) for r in records if r["event"] in ("oom", "oom_regrow")] \
        == [("oom", 1, 2), ("oom_regrow", 3, 1)]
    assert "out of memory: micro-batch halved" in done.stdout
    assert "2 steps without running out of memory at x2: trying the original micro-batch again" in done.stdout


@pytest.mark.parametrize("key", ["train.oom_regrow_steps", "train.swap_patience"])
def test_cli_a_negative_memory_setting_is_refused_naming_the_key(tiny_model_dir, tmp_path, key):
    from test_cli import base_args, overnight

    done = overnight(*base_args(tiny_model_dir, tmp_path / "run", 2, "--set", f"{key}=-1"))
    assert done.returncode == 2 and f"'{key}' must not be negative" in done.stderr and "Traceback" not in done.stderr
