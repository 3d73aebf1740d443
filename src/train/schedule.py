"""The learning-rate schedule: a pure function of the step, so a resume needs only the step."""
from __future__ import annotations

import math


def lr_at(step: int, train) -> float:
    """Learning rate for optimizer update number ``step`` (0-based) under ``train`` (a TrainConfig).

    Linear warmup from lr/warmup to lr over ``warmup_steps``, then cosine, linear or constant
    decay to ``learning_rate * min_lr_ratio`` at ``max_steps``.
    """
    peak = train.learning_rate
    warmup = train.warmup_steps
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if train.schedule == "constant":
        return peak
    floor = peak * train.min_lr_ratio
    span = max(1, train.max_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if train.schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    if train.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {train.schedule!r}")
