"""Which checkpoint is best: a multi-metric score (SPEC §8), lower is better.

    score = 0.5 * val_loss
          + 0.3 * gap        max(0, val_loss - mean of the last 100 train losses): overfitting penalty (0 for grpo)
          + 0.1 * ppl_ratio  val perplexity / first val perplexity: < 1 once it improved
          + 0.1 * momentum   relative change of train loss across the window (needs >= 10 losses):
                             negative while the loss still falls, a bonus for a run still improving
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np

WINDOW = 100
MIN_TREND = 10


def momentum(losses) -> float:
    values = np.asarray([v for v in losses if math.isfinite(v)], dtype=np.float64)
    if len(values) < MIN_TREND:
        return 0.0
    slope = np.polyfit(np.arange(len(values)), values, 1)[0]
    mean = float(np.mean(values))
    if mean == 0:
        return 0.0
    return float(np.clip(slope * len(values) / abs(mean), -1.0, 1.0))


class BestTracker:
    def __init__(self):
        self.train_losses: deque[float] = deque(maxlen=WINDOW)
        self.first_val_loss: float | None = None
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_val_loss: float | None = None

    def add_train_loss(self, loss: float) -> None:
        self.train_losses.append(loss)

    def loss_avg(self, last: int = 50) -> float:
        """Moving average of the last ``last`` finite train losses (the progress line's loss_avg)."""
        recent = [v for v in list(self.train_losses)[-last:] if math.isfinite(v)]
        return sum(recent) / len(recent) if recent else float("nan")

    def score(self, val_loss: float, overfit_gap: bool = True) -> dict:
        """``overfit_gap``: whether val_loss - train loss measures overfitting. Not for a source that scores its own
        steps (grpo: its tracked loss is minus the sampled answers' reward, its val_loss minus the greedy answers'):
        there a falling training reward narrowed the gap, so a worse policy scored better."""
        if self.first_val_loss is None:
            self.first_val_loss = val_loss
        finite = [v for v in self.train_losses if math.isfinite(v)]
        gap = max(0.0, val_loss - float(np.mean(finite))) if finite and overfit_gap else 0.0
        ppl_ratio = math.exp(min(50.0, val_loss - self.first_val_loss))
        trend = momentum(self.train_losses)
        score = 0.5 * val_loss + 0.3 * gap + 0.1 * ppl_ratio + 0.1 * trend
        return {"score": score, "gap": gap, "ppl_ratio": ppl_ratio, "momentum": trend}

    def offer(self, step: int, score: float, val_loss: float) -> bool:
        """Record an evaluated step; True when it is the new best."""
        if not math.isfinite(score):
            return False
        if self.best_score is None or score < self.best_score:
            self.best_score, self.best_step, self.best_val_loss = score, step, val_loss
            return True
        return False

    def state(self) -> dict:
        return {"train_losses": list(self.train_losses), "first_val_loss": self.first_val_loss,
                "best_score": self.best_score, "best_step": self.best_step, "best_val_loss": self.best_val_loss}

    def restore(self, state: dict) -> None:
        self.train_losses = deque(state["train_losses"], maxlen=WINDOW)
        self.first_val_loss = state["first_val_loss"]
        self.best_score = state["best_score"]
        self.best_step = state["best_step"]
        self.best_val_loss = state["best_val_loss"]
