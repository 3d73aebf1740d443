"""What the training loop asks of a source of batches: one protocol that the supervised stream (sft, cpt, dpo, orpo:
overnight.data.batches.TrainStream) and grpo's sampler (overnight.methods.grpo.GrpoSource) both implement, so the
loop calls every hook unconditionally and never asks which kind of source it holds."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotations: the loop's value types live above this layer
    from overnight.backend import Batch, StepResult


class BatchSource:
    """Subclass it: ``next_batch``, ``state`` and ``restore`` are required; the hooks after them default to what a
    source of fixed batches needs (nothing).

    The order of batches must be a pure function of the seed and the position, and ``state()`` must hold that
    position, so a resumed run draws exactly the batches the uninterrupted one would have drawn."""

    # True for a source that scores its own steps (grpo's rewards): after_step names the loss the run tracks and
    # may stop the run with its own circuit breaker, so the loop's loss-unchanged (stuck) rule is off for it
    # (grpo's objective is ~0 by construction).
    scores_own_steps = False
    # True for a source whose batches do not depend on the model, so the loop may build them ahead on a thread
    # (overnight.data.prefetch). Off unless a source opts in: grpo samples each batch with the current policy, so
    # a batch built ahead would come from stale weights.
    prefetch = False

    def next_batch(self) -> Batch:
        raise NotImplementedError

    def state(self) -> dict:
        """Everything needed to continue the order from here (JSON-serialisable; saved in every checkpoint)."""
        raise NotImplementedError

    def restore(self, state: dict) -> None:
        raise NotImplementedError

    def after_step(self, step: int, result: StepResult) -> tuple[float, Any]:
        """After each optimizer step: (the loss the run tracks, a Stop or None). A source of fixed batches tracks
        the step's own loss and never stops the run itself."""
        return result.loss, None

    def step_stats(self) -> dict:
        """Extra figures for this step's train event in metrics.jsonl (grpo: rewards, completion lengths)."""
        return {}

    def close(self) -> None:
        """Release open files; called once when the run ends, however it ends."""
