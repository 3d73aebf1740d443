"""The learning-rate schedule: a pure function of the step, so a resume needs only the step. Also the run's length
when it is given in epochs, and what the start banner warns about the plan (a warmup longer than the run, an eval or
checkpoint interval the run never reaches)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from overnight.config import ConfigError
from overnight.data.batches import batches_per_epoch


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


# -- train.epochs ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpochPlan:
    epochs: float
    max_steps: int
    steps_per_epoch: Fraction  # optimizer steps in one pass over the data (not whole when batches do not divide)

    def describe(self) -> str:
        """For the banner: "3 epochs of 40 steps"."""
        per = self.steps_per_epoch
        per_text = f"{int(per):,}" if per.denominator == 1 else f"{float(per):,.1f}"
        rounded = "" if per * Fraction(repr(self.epochs)) == self.max_steps else ", rounded up"
        return (f"{self.epochs:g} epoch{'' if self.epochs == 1 else 's'} of {per_text} "
                f"step{'' if per == 1 else 's'}{rounded}")


def epoch_plan(cfg, report, processes: int) -> EpochPlan | None:
    """train.epochs as optimizer steps for this data (the data check's counts), or None when the run's length is
    train.max_steps. A step takes grad_accumulation batches on each of ``processes``; the stream runs on across
    an epoch's end, so the steps are the epochs' batches over a step's, rounded up (every row is seen ``epochs``
    times; HF Trainer's rounding). grpo trains grpo.iterations steps on each generated batch. Deterministic: the
    same data and config give the same max_steps on every start, a resume included; changed data changes the
    fingerprint, which a resume refuses."""
    t = cfg.train
    if t.epochs is None:
        return None
    per_epoch = batches_per_epoch(report, t.batch_size, cfg.model.max_seq_length)
    if per_epoch is None:
        raise ConfigError("train.epochs with packed data counts the tokens of the training file, which needs the "
                          "model's tokenizer before training: give a local model folder (--model DIR), or set "
                          "train.max_steps instead")
    iterations = cfg.grpo.iterations if cfg.data.method == "grpo" else 1
    per_step = t.grad_accumulation * processes
    generated = max(1, math.ceil(Fraction(repr(t.epochs)) * per_epoch / per_step))
    return EpochPlan(t.epochs, generated * iterations, Fraction(per_epoch * iterations, per_step))


def apply_epochs(cfg, report, processes: int) -> EpochPlan | None:
    """Set train.max_steps from train.epochs (when given), before anything reads it."""
    plan = epoch_plan(cfg, report, processes)
    if plan is not None:
        cfg.train.max_steps = plan.max_steps
    return plan


# -- what the banner warns about ---------------------------------------------------------------------------------

def plan_warnings(cfg, start_step: int, evaluates: bool) -> list[str]:
    """Settings this run's length makes do something other than what they say: said at the start, not
    changed (a warmup scaled to the run would move with every new max_steps, and the schedule with it)."""
    t, out = cfg.train, []
    steps = t.max_steps
    if start_step >= steps:  # nothing left to train (at most an owed eval): nothing to warn about
        return out
    if t.warmup_steps > steps:
        out.append(f"train.warmup_steps {t.warmup_steps} is longer than the run ({steps} steps): the learning rate "
                   f"climbs to only {100 * steps / t.warmup_steps:.0f}% of train.learning_rate {t.learning_rate:g}, "
                   f"at the last step, and never decays; for a warmup of a tenth of the run: "
                   f"--set train.warmup_steps={max(1, steps // 10)}")
    evals = _beyond_the_end("eval.every_steps", cfg.eval.every_steps, start_step, steps)
    if evaluates and evals:
        out.append(f"{evals}: the only eval is the final step's; for evals along the way: "
                   f"--set eval.every_steps={max(1, steps // 4)}")
    saves = _beyond_the_end("checkpoint.every_steps", cfg.checkpoint.every_steps, start_step, steps)
    if saves:
        since = "the whole run" if start_step == 0 else f"every step since {start_step}"
        out.append(f"{saves}: no checkpoint on that interval before the last step"
                   + (" (only an eval with a new best saves one)" if evaluates and not evals else "")
                   + f", so a crash or kill can lose {since} (SIGTERM and Ctrl-C still save); "
                   f"--set checkpoint.every_steps={max(1, steps // 4)}")
    return out


def _beyond_the_end(key: str, every: int, start_step: int, max_steps: int) -> str | None:
    """Said when the interval's next step after ``start_step`` lies past the run's end (the loop saves and
    evaluates at multiples of it, and at the end)."""
    if (start_step // every + 1) * every <= max_steps:
        return None
    if start_step == 0:
        return f"{key} {every} is more than the run's {max_steps} steps"
    return f"{key} {every} has no step between this start (step {start_step}) and the run's end (step {max_steps})"
