"""The one-line progress display, ETA and memory health (SPEC §6). The clock is injected for tests.

    Training: 45% | loss=3.2 | loss_avg=3.4 | eta_h=6.5 | ckpt=-150 | memory_mb=14051 | mem_delta=+245
"""
from __future__ import annotations

import math
import sys
import time
from collections import deque
from typing import Callable

WINDOW = 50  # step times for the ETA
LEAK_RATIO = 0.5  # memory grown by more than 50% since the baseline looks like a leak
NEAR_LIMIT = 0.9  # warn when memory passes 90% of the device's recommended working set
BASELINE_AFTER = 10  # steps after start/resume before the memory baseline is taken (post-warmup)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, clock: Callable[[], float] = time.monotonic,
                 out=None, enabled: bool = True, warn: Callable[[str], None] = print):
        self.total = total_steps
        self.step = start_step
        self.clock = clock
        self.step_times: deque[float] = deque(maxlen=WINDOW)
        self._started_at: float | None = None
        self._steps_seen = 0
        self.baseline_mb: float | None = None
        self.warn = warn
        self._limit_warned = False
        self.last_line = ""
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=out or sys.stderr,
                             bar_format="Training: {percentage:.0f}% | {desc}", dynamic_ncols=True)

    # The loop brackets only the training step with these, so eval and checkpoint time never
    # enter the ETA.
    def step_started(self) -> None:
        self._started_at = self.clock()

    def step_finished(self) -> float:
        elapsed = self.clock() - self._started_at if self._started_at is not None else 0.0
        self.step_times.append(elapsed)
        self._started_at = None
        return elapsed

    def eta_hours(self) -> float:
        if not self.step_times:
            return float("nan")
        per_step = sum(self.step_times) / len(self.step_times)
        return per_step * max(0, self.total - self.step) / 3600.0

    def update(self, step: int, loss: float, loss_avg: float, steps_since_ckpt: int, memory_mb: float,
               limit_mb: float | None = None) -> str:
        """``loss_avg`` comes from the loop's checkpointed loss window, so it survives a resume."""
        self.step = step
        self._steps_seen += 1
        if self.baseline_mb is None and self._steps_seen >= BASELINE_AFTER:
            self.baseline_mb = memory_mb
        delta = memory_mb - self.baseline_mb if self.baseline_mb is not None else 0.0
        mem_delta = f"{delta:+.0f}"
        if self.baseline_mb and delta > LEAK_RATIO * self.baseline_mb:
            mem_delta += " ⚠"
        if limit_mb and memory_mb > NEAR_LIMIT * limit_mb and not self._limit_warned:
            self._limit_warned = True
            self.warn(f"warning: memory {memory_mb:.0f} MB is above {NEAR_LIMIT:.0%} of the recommended working "
                      f"set ({limit_mb:.0f} MB); lower batch_size or max_seq_length, or enable grad_checkpoint")
        eta = self.eta_hours()
        postfix = (f"loss={_fmt(loss)} | loss_avg={_fmt(loss_avg)} | "
                   f"eta_h={eta:.1f} | ckpt=-{steps_since_ckpt} | memory_mb={memory_mb:.0f} | mem_delta={mem_delta}")
        self.last_line = f"Training: {100.0 * step / max(1, self.total):.0f}% | {postfix}"
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_description_str(postfix, refresh=True)
        return self.last_line

    def write(self, message: str) -> None:
        """Print a message without breaking the progress line."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
