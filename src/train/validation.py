"""Validation: lazy, on a fixed subset, token-weighted (SPEC §6)."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from overnight.backend import Batch, OutOfMemory
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
        total_loss, total_tokens = 0.0, 0
        for i in eval_share(len(self._batches), world):
            if cancelled():
                return None
            if i is None:  # this rank has no batch in the last round
                continue
            loss_sum, tokens = self._loss(backend, i, say)
            total_loss += loss_sum
            total_tokens += tokens
        if world.size > 1:
            total_loss, total_tokens = world.all_sum(np.array([total_loss, total_tokens], dtype=np.float64))
            total_loss, total_tokens = float(total_loss), int(round(total_tokens))
        if total_tokens == 0:
            return None
        val_loss = total_loss / total_tokens
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": total_tokens}

    def _loss(self, backend, i: int, say: Callable[[str], None]) -> tuple[float, int]:
        batch = self._batches[i]
        while True:
            pieces = batch.split(self._parts[i]) if self._parts[i] > 1 else [batch]
            try:
                results = [backend.eval_loss(piece) for piece in pieces]
                return sum(r[0] for r in results), sum(int(r[1]) for r in results)
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
