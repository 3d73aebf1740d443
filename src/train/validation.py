"""Validation: lazy, on a fixed subset, token-weighted (SPEC §6)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from overnight.backend import Batch, OutOfMemory, objectives
from overnight.distributed import Solo, eval_share
from overnight.errors import TrainingError


class Validator:
    """Runs the same fixed validation batches at every eval.

    ``make_batches`` is only called at the first eval, so the validation file costs nothing
    (no reading, no memory) before then. None means there is no validation file: eval is a no-op.

    Out of memory in ``backend.eval_loss``: the batch is cut in 2, 4, ... parts (preference pairs stay
    together) and its (loss sum, tokens) are the sums over the parts, so the value is the unsplit one up
    to float rounding. The cut is remembered per batch, so later evals of the run skip the failed tries
    and score every batch the same way. One row (pair) that still does not fit stops the run with a
    TrainingError saying what to change.
    """

    def __init__(self, make_batches: Callable[[], list[Batch]] | None):
        self._make_batches = make_batches
        self._batches: list[Batch] | None = None
        self._parts: list[int] = []  # per batch: how many parts it is cut into (grows on out-of-memory)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._make_batches is not None

    def run(self, backend, cancelled: Callable[[], object] = lambda: None,
            say: Callable[[str], None] = print, world=Solo()) -> dict | None:
        """{"val_loss", "val_ppl", "val_tokens"}; None without a validation file, without any target token,
        or when ``cancelled()`` turns true between batches (a signal: the caller saves at once).

        In a data-parallel job (``world``) each rank scores every size-th batch and the sums are added up, so
        the value is the single-process one up to float rounding; ``cancelled`` must then be a collective
        (asked once per round on every rank), so all ranks give up at the same batch."""
        if self._make_batches is None or cancelled():
            return None
        if self._batches is None:
            self._batches = self._make_batches()
            self._parts = [1] * len(self._batches)
        totals = np.zeros(self.FIGURES, dtype=np.float64)
        for i in eval_share(len(self._batches), world):
            if cancelled():
                return None
            if i is None:  # this rank has no batch in the last round
                continue
            totals += self._sums(backend, i, say)
        if world.size > 1:
            totals = np.asarray(world.all_sum(totals), dtype=np.float64)
        total_loss, total_tokens = float(totals[0]), int(round(totals[1]))
        if total_tokens == 0:
            return None
        val_loss = total_loss / total_tokens
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": total_tokens,
                **self._more(totals)}

    FIGURES = 2  # what _measure sums per batch: (loss x weight, weight), then any the method adds

    def _measure(self, backend, piece: Batch) -> np.ndarray:
        loss_sum, weight = backend.eval_loss(piece)
        return np.array([loss_sum, int(weight)], dtype=np.float64)

    def _more(self, totals: np.ndarray) -> dict:
        """The eval figures a method adds from its summed figures beyond the first two."""
        return {}

    def _sums(self, backend, i: int, say: Callable[[str], None]) -> np.ndarray:
        batch = self._batches[i]
        while True:
            pieces = batch.split(self._parts[i]) if self._parts[i] > 1 else [batch]
            try:
                return sum((self._measure(backend, piece) for piece in pieces), np.zeros(self.FIGURES))
            except OutOfMemory:
                unit = 2 if batch.paired else 1
                if max(p.num_rows for p in pieces) <= unit:
                    what = "one preference pair" if batch.paired else "one row"
                    raise TrainingError(
                        f"validation runs out of memory even on {what} ({batch.input_ids.shape[1]} tokens wide): "
                        "lower model.max_seq_length (rows are cut to it), or free device memory; eval.batch_size "
                        "does not help here, each batch was already split down to one row") from None
                self._parts[i] *= 2
                if not self._warned:
                    self._warned = True
                    say(f"out of memory in validation: eval batches are split (now {self._parts[i]} parts of "
                        f"{batch.num_rows} rows) and the parts summed, so the value is unchanged; a smaller "
                        "eval.batch_size avoids the failed tries")


class RewardValidator(Validator):
    """reward: val_loss is the reward objective over the fixed pairs (weight = pairs), from the scores the backend
    gives (Backend.reward_scores) and objectives' numpy formula, so both backends are judged by one definition;
    val_accuracy is the fraction of pairs whose chosen row scores above its rejected one (a tie is wrong)."""

    FIGURES = 3

    def __init__(self, make_batches: Callable[[], list[Batch]] | None, center_coefficient: float = 0.0):
        super().__init__(make_batches)
        self.center_coefficient = center_coefficient

    def _measure(self, backend, piece: Batch) -> np.ndarray:
        scores = np.asarray(backend.reward_scores(piece), dtype=np.float64)
        losses = objectives.reward_pair_losses(scores, self.center_coefficient)
        return np.array([losses.sum(), losses.size, objectives.pairs_ranked_right(scores)], dtype=np.float64)

    def _more(self, totals: np.ndarray) -> dict:
        return {"val_accuracy": float(totals[2] / totals[1])}
