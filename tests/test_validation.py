"""The Validator on its own: lazy batches, token weighting, cancellation, and out-of-memory splitting."""
from __future__ import annotations

import numpy as np
import pytest

from overnight.backend import Batch, OutOfMemory
from overnight.train.loop import TrainingError
from overnight.train.validation import Validator


def make_batch(rows: int, width: int = 8, seed: int = 0, paired: bool = False) -> Batch:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, (rows, width)).astype(np.int32)
    mask = (rng.random((rows, width)) < 0.7).astype(np.float32)
    mask[:, 0] = 0
    return Batch(ids, mask, np.ones_like(ids), 0, paired)


class RowLosses:
    """A backend whose loss per row is a fixed function of the row: (sum, tokens) add up over any split.
    Batches with more rows than ``limit`` raise OutOfMemory; every call's row count is recorded."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.calls: list[int] = []

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        self.calls.append(batch.num_rows)
        if self.limit is not None and batch.num_rows > self.limit:
            raise OutOfMemory("too many rows")
        if batch.paired:
            assert batch.num_rows % 2 == 0, "a preference pair was cut in half"
        per_token = np.log1p(batch.input_ids.astype(np.float64)) * batch.loss_mask
        return float(per_token.sum()), int(batch.loss_mask.sum())


def test_batches_are_made_at_the_first_eval_only():
    made = []
    validator = Validator(lambda: made.append(1) or [make_batch(4)])
    assert validator.enabled and made == []
    first = validator.run(RowLosses())
    second = validator.run(RowLosses())
    assert made == [1] and first == second and first["val_tokens"] > 0
    assert not Validator(None).enabled and Validator(None).run(RowLosses()) is None


def test_loss_is_total_loss_over_total_tokens():
    batches = [make_batch(4, seed=1), make_batch(3, seed=2)]
    result = Validator(lambda: batches).run(RowLosses())
    sums = [RowLosses().eval_loss(b) for b in batches]
    assert result["val_tokens"] == sum(t for _, t in sums)
    assert result["val_loss"] == pytest.approx(sum(s for s, _ in sums) / result["val_tokens"], rel=1e-15)


def test_a_pending_signal_skips_the_eval_before_reading_anything():
    made = []
    validator = Validator(lambda: made.append(1) or [make_batch(4)])
    assert validator.run(RowLosses(), cancelled=lambda: 143) is None and made == []


def test_a_signal_between_batches_cuts_the_eval_short():
    backend = RowLosses()
    assert Validator(lambda: [make_batch(4), make_batch(4)]).run(
        backend, cancelled=lambda: 143 if backend.calls else None) is None
    assert backend.calls == [4]  # the second batch was never scored


@pytest.mark.parametrize("paired", [False, True])
def test_out_of_memory_splits_the_batch_with_the_same_value(paired):
    batches = [make_batch(8, seed=3, paired=paired), make_batch(6, seed=4, paired=paired)]
    expected = Validator(lambda: batches).run(RowLosses())
    said: list[str] = []
    backend = RowLosses(limit=2)
    validator = Validator(lambda: batches)
    got = validator.run(backend, say=said.append)
    assert got["val_tokens"] == expected["val_tokens"]
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-12)
    assert len(said) == 1 and "out of memory in validation" in said[0] and "eval.batch_size" in said[0]
    # The split is remembered per batch: the next eval goes straight to pieces that fit, same value.
    backend.calls.clear()
    assert validator.run(backend, say=said.append) == got
    assert max(backend.calls) <= 2 and len(said) == 1


def test_one_row_that_does_not_fit_is_a_clear_error():
    with pytest.raises(TrainingError, match=r"even on one row \(8 tokens wide\).*model.max_seq_length"):
        Validator(lambda: [make_batch(4)]).run(RowLosses(limit=0), say=lambda m: None)
    with pytest.raises(TrainingError, match="even on one preference pair"):
        Validator(lambda: [make_batch(4, paired=True)]).run(RowLosses(limit=1), say=lambda m: None)
