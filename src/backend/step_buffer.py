"""The data-parallel step buffer: what one optimizer step of a job (SPEC §12) puts into its single all-reduce,
and how the summed vector is read back. Both backends build and read it exactly as written here.

After its local forward and backward passes, every process of the job builds one flat float32 vector and the
job sums it (one all_reduce / all_sum per optimizer step, what DDP's no_sync accumulation ends with):

    [ g_1 | g_2 | ... | g_k | loss_sum | kl_sum | kl_tokens | tokens | out_of_memory ]
      '---- gradients ----'   '------------------ figures (FIELDS) -----------------'

  g_i            the i-th trainable LoRA parameter's gradient, flattened, in the backend's own parameter order
                 (the same on every rank: every rank built the same model). Zeros where a parameter has no
                 gradient, and everywhere on a rank that ran out of memory. ``gradient_slices`` says where each
                 one lies; the gradients are the backend's framework arrays, so the backend writes and reads them.
  loss_sum       the rank's objective summed over its micro-batches (0 after an out of memory)
  kl_sum         grpo: the rank's sum of kl_t over its completion tokens (0 for other methods, or beta = 0)
  kl_tokens      grpo: the completion tokens kl_sum is over (the logged kl is kl_sum / kl_tokens of the sums)
  tokens         the target tokens of the rank's micro-batches (the step's, once summed)
  out_of_memory  1 where the rank ran out of memory in its passes, else 0: a rank that ran out still takes
                 part in the all-reduce (so no rank is left waiting in it), and a positive sum makes every rank
                 raise OutOfMemory before anything is applied; the loop then splits the step on every rank.

Summed, not averaged: each rank's objective is already scaled by the whole step's 1/T or 1/P
(objectives.step_scales over all ranks' micro-batches), so the sums are the one-process step's gradient and
loss. Counts and the flag are integers, exact in float32 up to 2**24 per step.

The figures are written in FIELDS order by ``in_order`` (any values: floats, or a framework's 0-d arrays
stacked on the device without a host sync) or ``pack_figures`` (a numpy vector), and read back from the summed
vector's tail by ``read_figures``.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Sequence

import numpy as np

from overnight.backend.objectives import mean_kl

FIELDS = ("loss_sum", "kl_sum", "kl_tokens", "tokens", "out_of_memory")
LOSS_SUM, KL_SUM, KL_TOKENS, TOKENS, OUT_OF_MEMORY = range(len(FIELDS))  # each figure's place after the gradients


@dataclass(frozen=True)
class StepFigures:
    """The figures of one step's buffer, as one rank packs them or as the summed vector gives them back. Its
    fields are FIELDS, in that order (tests/test_step_buffer.py holds them to it)."""

    loss_sum: float = 0.0
    kl_sum: float = 0.0
    kl_tokens: float = 0.0
    tokens: int = 0
    out_of_memory: bool = False

    @property
    def kl(self) -> float:
        """grpo's logged kl (objectives.mean_kl) from the step's sums."""
        return mean_kl(self.kl_sum, self.kl_tokens)


def in_order(**figures):
    """The figures (every name in FIELDS, given by keyword) as a list in buffer order. Values pass through as
    they are, so a backend can hand its framework's scalars and stack them where they live."""
    if set(figures) != set(FIELDS):
        missing, unknown = sorted(set(FIELDS) - set(figures)), sorted(set(figures) - set(FIELDS))
        raise TypeError(f"step buffer figures: missing {missing}, unknown {unknown}")
    return [figures[name] for name in FIELDS]


def pack_figures(figures: StepFigures, dtype=np.float32) -> np.ndarray:
    """The figures as the buffer's tail: a numpy vector of len(FIELDS) values in FIELDS order."""
    return np.asarray([float(value) for value in astuple(figures)], dtype=dtype)


def read_figures(tail: Sequence[float]) -> StepFigures:
    """The figures from the summed vector's tail (exactly len(FIELDS) values, in FIELDS order)."""
    values = [float(v) for v in tail]
    if len(values) != len(FIELDS):
        raise ValueError(f"a step buffer's figures are {len(FIELDS)} values ({', '.join(FIELDS)}), got {len(values)}")
    return StepFigures(loss_sum=values[LOSS_SUM], kl_sum=values[KL_SUM], kl_tokens=values[KL_TOKENS],
                       tokens=int(round(values[TOKENS])), out_of_memory=values[OUT_OF_MEMORY] > 0)


def gradient_slices(sizes: Sequence[int]) -> list[slice]:
    """Where each gradient lies in the buffer, for parameters of ``sizes`` elements in the order given."""
    bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))]).tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def figures_slice(sizes: Sequence[int]) -> slice:
    """Where the figures lie: right after the gradients of parameters of ``sizes`` elements."""
    start = int(sum(int(n) for n in sizes))
    return slice(start, start + len(FIELDS))


def buffer_size(sizes: Sequence[int]) -> int:
    """The buffer's length: every gradient, then the figures."""
    return figures_slice(sizes).stop
