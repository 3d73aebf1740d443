"""The progress display, ETA and memory health (SPEC §6). The clock (and the terminal) are injected for tests.

On a terminal, one tqdm line, fitted to the width so loss, eta and memory health always show:

    Training: 45% | loss=3.2 | loss_avg=3.4 | eta=6:30 | ckpt=-150 | memory_mb=14051 | mem_delta=+245

When stderr is a file or a pipe (nohup, `> log 2>&1`), a plain line instead, at the first step, every 10% or
60 s (whichever comes first) and at the end: no carriage returns, so the log reads line by line next morning:

    06:12:03 Training: 45% | step=450/1000 | loss=3.2 | loss_avg=3.4 | eta=6:30 | ckpt=-150 | memory_mb=14051 | ...

A method that scores its own steps (grpo) shows its reward in place of the loss, whose objective is ~0 there:

    Training: 45% | reward=0.62 | reward_avg=0.48 | eta=6:30 | ckpt=-150 | memory_mb=14051 | mem_delta=+245
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from typing import Callable

# One threshold for the near-limit warning and the swap watch.
from overnight.train.memory import NEAR_LIMIT

WINDOW = 50  # step times for the ETA
LEAK_RATIO = 0.5  # memory grown by more than 50% since the baseline looks like a leak
BASELINE_AFTER = 10  # steps after start/resume before the memory baseline is taken (post-warmup)
PLAIN_EVERY_FRACTION = 0.1  # a plain (non-terminal) line every 10% of the run...
PLAIN_EVERY_S = 60.0  # ...or every minute, whichever comes first
LEAK_MARK = "⚠"


def _fmt(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def format_eta(hours: float) -> str:
    """h:mm, rounded up to the minute so a run with time left never shows 0:00 (0:03, 12:40, ? unknown)."""
    if not math.isfinite(hours):
        return "?"
    minutes = math.ceil(round(hours * 60.0, 6))
    return f"{minutes // 60}:{minutes % 60:02d}"


# Set by the supervisor (runs/supervise.py) for its training child when the supervisor's own stderr is a terminal:
# the child's stderr is then a pipe the supervisor copies to that terminal byte for byte, so the progress line may
# redraw itself with \r as it would on the terminal directly.
STDERR_IS_TERMINAL_ENV = "OVERNIGHT_STDERR_IS_TERMINAL"


def _is_terminal(out) -> bool:
    if out is sys.stderr and os.environ.get(STDERR_IS_TERMINAL_ENV) == "1":
        return True
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _columns(out) -> int:
    try:
        return os.get_terminal_size(out.fileno()).columns or 80  # 0: a pseudo-terminal nobody sized
    except (AttributeError, ValueError, OSError):
        return 80


def fit(fields: dict[str, str], percent: str, width: int) -> str:
    """The longest rendering of the fields that fits ``width`` columns. Fields go in this order: the
    "Training:" label, the separators, loss_avg and ckpt, then the long names; loss, eta and the memory
    (with its leak mark) stay to the end, and the leak mark survives even a hard cut. The first two fields are
    the figure and its average: loss and loss_avg, or reward and reward_avg."""
    f = fields
    name, avg = list(f)[:2]
    mem_delta = f["mem_delta"]
    candidates = [
        f"Training: {percent} | " + " | ".join(f"{k}={v}" for k, v in f.items()),
        f"{percent} " + " ".join(f"{k}={v}" for k, v in f.items()),
        f"{percent} {name}={f[name]} avg={f[avg]} eta={f['eta']} ckpt={f['ckpt']} "
        f"mem={f['memory_mb']}MB {mem_delta}",
        f"{percent} {name}={f[name]} eta={f['eta']} mem={f['memory_mb']}MB {mem_delta}",
        f"{name}={f[name]} eta={f['eta']} mem{mem_delta}",
    ]
    for line in candidates:
        if len(line) <= width:
            return line
    line = f"{name}={f[name]} eta={f['eta']}"  # a hard cut: no half numbers, but the leak mark stays
    if LEAK_MARK in mem_delta:
        return line[:max(0, width - 2)] + " " + LEAK_MARK
    return line[:max(1, width)]


def eval_line(step: int, evaluation: dict, score: float, new_best: bool, best_step: int | None) -> str:
    """One line per eval, so the morning-after log shows how validation went without reading metrics.jsonl."""
    verdict = "new best" if new_best else f"best is still step {best_step}" if best_step is not None else "not scored"
    # A perplexity means something for the likelihood losses only: a reward model shows its pairwise accuracy, grpo
    # the reward of its greedy answers (its val_loss is that reward's negative).
    if "val_reward" in evaluation:
        figures = f"val_reward={evaluation['val_reward']:.4g}"
    elif "val_accuracy" in evaluation:
        figures = f"val_loss={evaluation['val_loss']:.4g} accuracy={evaluation['val_accuracy']:.3g}"
    else:
        figures = f"val_loss={evaluation['val_loss']:.4g} ppl={evaluation['val_ppl']:.4g}"
    return f"eval step {step}: {figures} score={score:.4g} ({verdict})"


def checkpoint_line(step: int, best_step: int | None, removed: list[int]) -> str:
    """One line per committed checkpoint: which is best, and what rotation removed."""
    best_note = (" (the best so far)" if best_step == step
                 else f"; best is step {best_step}" if best_step is not None else "")
    gone = f"; removed step {', '.join(map(str, removed))}" if removed else ""
    return f"checkpoint step {step} saved{best_note}{gone}"


class Progress:
    def __init__(self, total_steps: int, start_step: int = 0, clock: Callable[[], float] = time.monotonic,
                 out=None, enabled: bool = True, warn: Callable[[str], None] | None = None, *,
                 terminal: bool | None = None, columns: Callable[[], int] | None = None,
                 wall_clock: Callable[[], str] = lambda: time.strftime("%H:%M:%S")):
        self.total = total_steps
        self.step = start_step
        self.clock = clock
        self.step_times: deque[float] = deque(maxlen=WINDOW)
        self._started_at: float | None = None
        self._steps_seen = 0
        self.baseline_mb: float | None = None
        self.warn = warn or self.write  # above the progress line, never through it
        self._limit_warned = False
        self.last_line = ""  # the full line, every field (what a plain line shows)
        self.out = out if out is not None else sys.stderr
        self.enabled = enabled
        self.terminal = _is_terminal(self.out) if terminal is None else terminal
        self.columns = columns or (lambda: _columns(self.out))
        self.wall_clock = wall_clock
        self._plain_every = max(1, math.ceil(PLAIN_EVERY_FRACTION * total_steps))
        self._plain_at: float | None = None  # clock time of the last plain line
        self._plain_pending = False  # a state newer than the last plain line
        self._bar = None
        if enabled and self.terminal:
            from tqdm import tqdm

            # The description is fitted to the width here, so tqdm never cuts the line.
            self._bar = tqdm(total=total_steps, initial=start_step, file=self.out, bar_format="{desc}",
                             dynamic_ncols=True)

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
               limit_mb: float | None = None, reward: float | None = None) -> str:
        """``loss_avg`` comes from the loop's checkpointed loss window, so it survives a resume. ``reward``: the
        step's mean reward of a source that scores its own steps (grpo), shown in place of the loss; such a source
        tracks -reward as its loss (GrpoSource.after_step), so the window's average reward is -loss_avg."""
        self.step = step
        self._steps_seen += 1
        if self.baseline_mb is None and self._steps_seen >= BASELINE_AFTER:
            self.baseline_mb = memory_mb
        delta = memory_mb - self.baseline_mb if self.baseline_mb is not None else 0.0
        mem_delta = f"{delta:+.0f}"
        if self.baseline_mb and delta > LEAK_RATIO * self.baseline_mb:
            mem_delta += " " + LEAK_MARK
        if limit_mb and memory_mb > NEAR_LIMIT * limit_mb and not self._limit_warned:
            self._limit_warned = True
            self.warn(f"warning: memory {memory_mb:.0f} MB is above {NEAR_LIMIT:.0%} of the device's limit "
                      f"({limit_mb:.0f} MB: Metal's recommended working set, or the GPU's total); lower batch_size "
                      f"or max_seq_length, or enable grad_checkpoint")
        figure = {"loss": _fmt(loss), "loss_avg": _fmt(loss_avg)} if reward is None else \
            {"reward": _fmt(reward), "reward_avg": _fmt(0.0 - loss_avg)}
        fields = {**figure, "eta": format_eta(self.eta_hours()), "ckpt": f"-{steps_since_ckpt}",
                  "memory_mb": f"{memory_mb:.0f}", "mem_delta": mem_delta}
        percent = f"{100.0 * step / max(1, self.total):.0f}%"
        self.last_line = f"Training: {percent} | " + " | ".join(f"{k}={v}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_description_str(fit(fields, percent, max(20, self.columns() - 1)), refresh=True)
        elif self.enabled:
            self._plain_pending = True
            now = self.clock()
            if (self._plain_at is None or step >= self.total or step % self._plain_every == 0
                    or now - self._plain_at >= PLAIN_EVERY_S):
                self._plain_line(now)
        return self.last_line

    def _plain_line(self, now: float) -> None:
        """One full line for a log file: the wall-clock time, the step and every field."""
        self._plain_at, self._plain_pending = now, False
        percent, rest = self.last_line[len("Training: "):].split(" | ", 1)
        self._print(f"{self.wall_clock()} Training: {percent} | step={self.step}/{self.total} | {rest}", self.out)

    @staticmethod
    def _print(message: str, out) -> None:
        try:  # non-critical (SPEC §8): a closed or full output never stops training
            print(message, file=out, flush=True)
        except (OSError, ValueError):
            pass

    def write(self, message: str) -> None:
        """Print a message (on stdout) without breaking the progress line."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stdout)
        else:
            self._print(message, sys.stdout)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._plain_pending:  # the end of the run, or where it stopped
            self._plain_line(self.clock())


class DataCheckProgress:
    """``checking data: train.jsonl 120,000 rows (12%)`` while the data check reads a large file, so a big
    dataset is not ~15 s of silence. Nothing for a file checked within ``first_after`` seconds; then every
    ``every_s`` seconds: redrawn in place on a terminal, a plain line otherwise. Call it as ``(path, rows,
    done_bytes, total_bytes)`` for every row; ``done()`` ends the line."""

    def __init__(self, out=None, clock: Callable[[], float] = time.monotonic, terminal: bool | None = None,
                 first_after: float = 2.0, every_s: float = 5.0):
        self.out = out if out is not None else sys.stderr
        self.clock = clock
        self.terminal = _is_terminal(self.out) if terminal is None else terminal
        self.first_after, self.every_s = first_after, every_s
        self._start = clock()
        self._next = self._start + first_after
        self._drawn = False
        self._calls = 0

    def __call__(self, path, rows: int, done_bytes: int, total_bytes: int) -> None:
        self._calls += 1
        if self._calls % 256 != 1:  # the clock is read once every 256 rows, not for every row
            return
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.every_s
        share = f" ({100.0 * done_bytes / total_bytes:.0f}%)" if total_bytes else ""
        line = f"checking data: {getattr(path, 'name', path)} {rows:,} rows{share}"
        try:  # non-critical (SPEC §8)
            if self.terminal:
                self.out.write("\r" + line + "\033[K")
                self.out.flush()
                self._drawn = True
            else:
                print(line, file=self.out, flush=True)
        except (OSError, ValueError):
            pass

    def done(self) -> None:
        if self._drawn:
            try:
                self.out.write("\r\033[K")
                self.out.flush()
            except (OSError, ValueError):
                pass
            self._drawn = False
