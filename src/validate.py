"""Validation: lazy, on a fixed subset, token-weighted (SPEC §6)."""
from __future__ import annotations

import math
from typing import Callable

from .backend import Batch


class Validator:
    """Runs the same fixed validation batches at every eval.

    ``make_batches`` is only called at the first eval, so the validation file costs nothing
    (no reading, no memory) before then. None means there is no validation file: eval is a no-op.
    """

    def __init__(self, make_batches: Callable[[], list[Batch]] | None):
        self._make_batches = make_batches
        self._batches: list[Batch] | None = None

    @property
    def enabled(self) -> bool:
        return self._make_batches is not None

    def run(self, backend) -> dict | None:
        if self._make_batches is None:
            return None
        if self._batches is None:
            self._batches = self._make_batches()
        total_loss, total_tokens = 0.0, 0
        for batch in self._batches:
            loss_sum, tokens = backend.eval_loss(batch)
            total_loss += loss_sum
            total_tokens += tokens
        if total_tokens == 0:
            return None
        val_loss = total_loss / total_tokens
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": total_tokens}
