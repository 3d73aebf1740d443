"""src/backend/step_buffer.py: the data-parallel step buffer both backends build and read back."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from overnight.backend import step_buffer
from overnight.backend.step_buffer import FIELDS, StepFigures, pack_figures, read_figures


def test_the_figures_come_in_the_order_both_backends_rely_on():
    # The torch backend stacks its figures on the device and mlx packs them on the host; both read the summed tail
    # through read_figures. Changing this order changes the wire format of every data-parallel step.
    assert FIELDS == ("loss_sum", "kl_sum", "kl_tokens", "tokens", "out_of_memory")
    assert tuple(f.name for f in dataclasses.fields(StepFigures)) == FIELDS
    assert [step_buffer.LOSS_SUM, step_buffer.KL_SUM, step_buffer.KL_TOKENS, step_buffer.TOKENS,
            step_buffer.OUT_OF_MEMORY] == [FIELDS.index(name) for name in FIELDS]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_then_read_gives_the_figures_back(dtype):
    figures = StepFigures(loss_sum=3.25, kl_sum=0.125, kl_tokens=17.0, tokens=42, out_of_memory=True)
    packed = pack_figures(figures, dtype)
    assert packed.dtype == dtype and packed.shape == (len(FIELDS),)
    assert packed.tolist() == [3.25, 0.125, 17.0, 42.0, 1.0]
    assert packed[step_buffer.TOKENS] == 42 and packed[step_buffer.OUT_OF_MEMORY] == 1
    assert read_figures(packed) == figures
    assert read_figures(pack_figures(StepFigures())) == StepFigures()
    # float32 keeps a float32 loss bit for bit (what the backends hand it)
    loss = float(np.float32(2.718281828))
    assert read_figures(pack_figures(StepFigures(loss_sum=loss))).loss_sum == loss


def test_the_summed_buffers_of_two_ranks_read_back_as_the_steps_figures():
    sizes = [6, 0, 4]  # gradients of three parameters (one with no elements)
    ranks = [(np.arange(10, dtype=np.float32), StepFigures(loss_sum=1.5, kl_sum=0.25, kl_tokens=3, tokens=7)),
             (np.ones(10, dtype=np.float32), StepFigures(loss_sum=0.5, kl_sum=0.5, kl_tokens=5, tokens=9,
                                                         out_of_memory=True))]
    buffers = [np.concatenate([grads, pack_figures(figures)]) for grads, figures in ranks]
    assert all(b.size == step_buffer.buffer_size(sizes) == 10 + len(FIELDS) for b in buffers)
    summed = buffers[0] + buffers[1]
    figures = read_figures(summed[step_buffer.figures_slice(sizes)])
    assert figures == StepFigures(loss_sum=2.0, kl_sum=0.75, kl_tokens=8.0, tokens=16, out_of_memory=True)
    assert figures.kl == pytest.approx(0.75 / 8.0)
    parts = step_buffer.gradient_slices(sizes)
    assert parts == [slice(0, 6), slice(6, 6), slice(6, 10)]
    assert np.array_equal(np.concatenate([summed[p] for p in parts]), np.arange(10) + 1.0)
    assert step_buffer.figures_slice(sizes) == slice(10, 10 + len(FIELDS))
    assert not read_figures(buffers[0][step_buffer.figures_slice(sizes)]).out_of_memory


def test_in_order_lays_out_any_values_and_wants_every_figure():
    # what the torch backend stacks on the device: any objects, in FIELDS order
    assert step_buffer.in_order(out_of_memory="f", tokens="t", kl_tokens="n", kl_sum="k", loss_sum="l") == \
        ["l", "k", "n", "t", "f"]
    with pytest.raises(TypeError, match="missing \\['tokens'\\]"):
        step_buffer.in_order(loss_sum=0, kl_sum=0, kl_tokens=0, out_of_memory=0)
    with pytest.raises(TypeError, match="unknown \\['norm'\\]"):
        step_buffer.in_order(loss_sum=0, kl_sum=0, kl_tokens=0, tokens=0, out_of_memory=0, norm=0)


def test_read_figures_refuses_a_tail_of_another_length():
    with pytest.raises(ValueError, match="5 values"):
        read_figures([1.0, 2.0, 3.0, 4.0])


def test_kl_of_a_step_without_completion_tokens_is_zero_not_a_division_by_zero():
    assert StepFigures().kl == 0.0
    assert StepFigures(kl_sum=0.5, kl_tokens=0.5).kl == 0.5  # at least 1 in the divisor
