"""Memory policies of the loop, free of any framework and any clock so tests can drive them with injected values.

MicroSplits: how many pieces each micro-batch is cut into after an out of memory (or a slide into swap), and when
the original micro-batch is tried again. It is part of the checkpoint's trainer state, so a resumed run splits and
regrows at exactly the steps the uninterrupted run would have.

SwapWatch: a step that takes over 3x the median step time while memory is near the device's limit, for several
steps in a row, is a run sliding into swap (unified memory on a Mac pages out instead of failing). It warns once,
and after ``patience`` such steps asks the loop to save and split the micro-batch as if the step had run out of
memory. It reads step times and memory figures handed to it, never the time or the device itself.
"""
from __future__ import annotations

from collections import deque
from statistics import median

SLOW_RATIO = 3.0  # a step over 3x the median step time is slow
NEAR_LIMIT = 0.9  # memory above 90% of the device's limit is near it (the progress line's warning uses the same)
WARN_AFTER = 3  # slow steps near the limit in a row before the warning: one slow step is a pause, not swap
MIN_HISTORY = 10  # normal steps the median needs before any step is judged
HISTORY = 50  # normal step times kept for the median


class MicroSplits:
    """``splits``: pieces per micro-batch (1 = the configured micro-batch); ``last_split_step``: the step (the
    loop's count of completed steps when it was trained) at which it last had to split, None when never."""

    def __init__(self, regrow_steps: int, splits: int = 1, last_split_step: int | None = None):
        self.regrow_steps = regrow_steps
        self.splits = splits
        self.last_split_step = last_split_step

    def split(self, step: int, splits: int) -> None:
        """The step ``step`` needed ``splits`` pieces (an out of memory, a slide into swap, a split at launch)."""
        self.splits, self.last_split_step = splits, step

    def regrow_due(self, step: int) -> bool:
        """Before training at ``step``: has the split held for ``regrow_steps`` steps without another out of
        memory, so the original micro-batch is worth another try? Never with regrow_steps 0."""
        if self.splits <= 1 or self.regrow_steps <= 0:
            return False
        if self.last_split_step is None:  # split by a checkpoint older than this record: count from here
            self.last_split_step = step
        return step - self.last_split_step >= self.regrow_steps

    def regrow(self) -> int:
        """Back to the original micro-batch; returns the split it leaves."""
        previous, self.splits = self.splits, 1
        return previous

    def state(self) -> dict:
        return {"micro_splits": self.splits, "last_split_step": self.last_split_step}

    def restore(self, trainer_state: dict) -> None:
        self.splits = trainer_state.get("micro_splits", 1)
        self.last_split_step = trainer_state.get("last_split_step")


class SwapWatch:
    """Call ``after_step`` with each training step's time and memory figures; it answers None, "warn" (once per
    run: slow steps near the limit, several in a row) or "split" (``patience`` of them in a row; 0 = never)."""

    def __init__(self, patience: int, *, ratio: float = SLOW_RATIO, near: float = NEAR_LIMIT,
                 warn_after: int = WARN_AFTER, min_history: int = MIN_HISTORY):
        self.patience, self.ratio, self.near = patience, ratio, near
        self.warn_after, self.min_history = warn_after, min_history
        self.times: deque[float] = deque(maxlen=HISTORY)
        self.slow_in_row = 0
        self.warned = False

    def after_step(self, step_time: float, memory_mb: float, limit_mb: float | None) -> str | None:
        near = bool(limit_mb) and memory_mb >= self.near * limit_mb
        typical = median(self.times) if len(self.times) >= self.min_history else None
        if typical is not None and near and step_time > self.ratio * typical:
            # A slow step stays out of the history, so a long slide never becomes the new normal.
            self.slow_in_row += 1
        else:
            self.slow_in_row = 0
            self.times.append(step_time)
            return None
        if self.patience and self.slow_in_row >= self.patience:
            self.reset()
            return "split"
        if self.slow_in_row >= self.warn_after and not self.warned:
            self.warned = True
            return "warn"
        return None

    def median_s(self) -> float | None:
        return median(self.times) if self.times else None

    def reset(self) -> None:
        """After a split the steps have a new shape: their times start a new history."""
        self.times.clear()
        self.slow_in_row = 0
