"""Early stopping and the circuit breaker: plain state machines whose state goes into checkpoints."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Stop:
    code: str  # plateau | grad_spike | non_finite | stuck
    message: str  # the exact reason, printed and recorded in metrics.jsonl


class EarlyStopping:
    """Decides, step by step, whether the run should stop and why.

    Always on, whatever ``enabled`` says, because they mean the run is broken:
      - a non-finite loss stops at once;
      - a loss that does not change for ``stuck_steps`` steps in a row (circuit breaker; grpo has its own,
        the dead-reward rule of src/methods/grpo.py, instead).
    On when ``enabled``:
      - a gradient norm above ``grad_spike_threshold`` on ``grad_spike_patience`` consecutive steps;
      - a plateau: after ``warmup_steps``, every ``check_every_steps`` the moving average of the
        train loss is compared with the best so far; ``patience`` checks in a row without an
        improvement of at least ``min_delta`` stop the run.
    """

    def __init__(self, cfg, stuck_rule: bool = True):
        self.cfg = cfg
        self.stuck_rule = stuck_rule  # off for grpo: its objective is ~0 by construction; dead_reward replaces it
        self.best_avg: float | None = None
        self.best_step: int | None = None
        self.bad_checks = 0
        self.spike_run = 0
        self.stuck_run = 0
        self.last_loss: float | None = None

    def after_step(self, step: int, loss: float, grad_norm: float) -> Stop | None:
        cfg = self.cfg
        if not math.isfinite(loss):
            return Stop("non_finite", f"loss became {loss} at step {step}; check the learning rate, "
                        "the data at this step, and fp16/bf16 overflow")
        if self.last_loss is not None and abs(loss - self.last_loss) <= 1e-9 * max(1.0, abs(loss)):
            self.stuck_run += 1
        else:
            self.stuck_run = 0
        self.last_loss = loss
        if self.stuck_rule and self.stuck_run + 1 >= cfg.stuck_steps:
            return Stop("stuck", f"loss stayed at {loss:.6g} for {cfg.stuck_steps} steps in a row up to step "
                        f"{step}; check that the learning rate is not 0, the adapter is trainable, "
                        "and the data is not one repeated batch")
        if not cfg.enabled:
            return None
        if not math.isfinite(grad_norm) or grad_norm > cfg.grad_spike_threshold:
            self.spike_run += 1
        else:
            self.spike_run = 0
        if self.spike_run >= cfg.grad_spike_patience:
            return Stop("grad_spike", f"gradient norm {grad_norm:.4g} exceeded grad_spike_threshold "
                        f"{cfg.grad_spike_threshold:g} on {self.spike_run} consecutive steps (up to step {step}); "
                        "lower the learning rate or max_grad_norm")
        return None

    def check_due(self, step: int) -> bool:
        return self.cfg.enabled and step > self.cfg.warmup_steps and step % self.cfg.check_every_steps == 0

    def check_plateau(self, step: int, loss_avg: float) -> Stop | None:
        if self.best_avg is None or loss_avg < self.best_avg - self.cfg.min_delta:
            self.best_avg, self.best_step, self.bad_checks = loss_avg, step, 0
            return None
        self.bad_checks += 1
        if self.bad_checks >= self.cfg.patience:
            return Stop("plateau", f"train loss_avg {loss_avg:.4f} has not improved on the best {self.best_avg:.4f} "
                        f"(step {self.best_step}) by min_delta {self.cfg.min_delta:g} for {self.bad_checks} checks "
                        f"in a row (patience {self.cfg.patience}) at step {step}")
        return None

    def state(self) -> dict:
        return {"best_avg": self.best_avg, "best_step": self.best_step, "bad_checks": self.bad_checks,
                "spike_run": self.spike_run, "stuck_run": self.stuck_run, "last_loss": self.last_loss}

    def restore(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


STOP_CODES = ("plateau", "grad_spike", "non_finite", "stuck", "dead_reward")


def agreed_stop(world, stop: Stop | None) -> Stop | None:
    """Rank 0's early-stopping decision on every rank (the message is rank 0's to print)."""
    if world.size == 1:
        return stop
    code = STOP_CODES.index(stop.code) + 1 if stop is not None and world.rank == 0 else 0
    agreed = int(world.broadcast(np.array([code], dtype=np.float64))[0])
    if world.rank == 0 or not agreed:
        return stop if agreed else None
    return Stop(STOP_CODES[agreed - 1], "rank 0 decided to stop")
