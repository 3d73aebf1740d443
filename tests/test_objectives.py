"""The objectives written once (src/backend/objectives.py): normalisers and the numpy reference."""
from __future__ import annotations

import math

import numpy as np
import pytest

from overnight.backend import Batch
from overnight.backend import objectives
from overnight.backend.objectives import counts, eval_weight, reference_value, step_scales


def _batch(mask_rows, paired=False) -> Batch:
    mask = np.asarray(mask_rows, dtype=np.float32)
    ids = np.ones(mask.shape, dtype=np.int32)
    return Batch(ids, mask, np.ones(mask.shape, dtype=np.int32), 0, paired)


def test_step_normalisers_are_the_whole_steps_and_survive_a_split():
    pairs = _batch([[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 1], [0, 0, 1, 1]], paired=True)
    assert counts("orpo", [pairs]) == (5, 2)  # chosen rows' targets only (column 0 is never a target)
    assert counts("dpo", [pairs]) == (0, 2)
    assert counts("sft", [pairs]) == (8, 0)
    for method in ("sft", "cpt", "dpo", "orpo"):
        assert step_scales(method, pairs.split(2)) == step_scales(method, [pairs])
    assert step_scales("orpo", [pairs]) == (1 / 5, 1 / 2, 5)
    assert eval_weight("orpo", pairs) == 2 and eval_weight("sft", pairs) == 8
    assert step_scales("sft", [_batch([[0, 0, 0]])])[2] == 0  # nothing to learn from: the backends refuse it


def test_reference_values():
    logp, tokens = [-4.0, -6.0, -2.0, -9.0], [2, 3, 1, 3]
    assert reference_value("sft", logp, tokens) == pytest.approx(21 / 9)
    assert reference_value("dpo", logp, tokens, beta=0.1, ref_logp=logp) == pytest.approx(math.log(2))

    def log_odds(a):
        return a - math.log(1 - math.exp(a))

    def neg_logsigmoid(x):
        return math.log1p(math.exp(-x))

    expected = (4 + 2) / 3 + 0.5 * (neg_logsigmoid(log_odds(-2.0) - log_odds(-2.0))
                                     + neg_logsigmoid(log_odds(-2.0) - log_odds(-3.0))) / 2
    assert reference_value("orpo", logp, tokens, beta=0.5) == pytest.approx(expected)
    # A chosen answer the model is certain of (avg logp 0) stays finite.
    assert math.isfinite(reference_value("orpo", [0.0, -1.0], [2, 2]))


def test_a_step_is_applied_only_when_its_loss_and_norm_are_finite():
    from overnight.backend.objectives import update_applies

    assert update_applies(2.5, 0.75) and update_applies(0.0, 0.0)
    for loss, norm in [(math.nan, 1.0), (1.0, math.nan), (math.inf, 1.0), (1.0, math.inf), (-math.inf, 1.0),
                       (math.nan, math.nan)]:
        assert not update_applies(loss, norm), (loss, norm)
    assert not update_applies(float(np.float32("nan")), 1.0)  # what a backend's .item() hands it


def test_grpo_mean_kl_is_over_the_steps_completion_tokens():
    from overnight.backend.objectives import mean_kl

    assert mean_kl(3.0, 12.0) == 0.25
    assert mean_kl(0.0, 0.0) == 0.0  # no completion tokens: 0, not a division by zero


def test_target_slots_list_every_target_position_then_padding_weighed_zero():
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0.5, 1]], np.float32)
    slots = objectives.target_slots(mask, bucket=4)
    # the next-token grid is mask[:, 1:] (4 columns): row 0 targets columns 1, 2; row 1 columns 0, 2, 3
    assert slots.count == 5
    assert slots.index.tolist() == [1, 2, 4, 6, 7, 0, 0, 0]
    assert slots.row.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert slots.weight.tolist() == [1, 1, 1, 0.5, 1, 0, 0, 0]
    assert objectives.target_slots(mask).index.size == 5  # no bucket: no padding


def test_a_chunk_of_the_head_holds_the_same_number_of_logits_whatever_the_vocabulary():
    assert objectives.logit_chunk_rows(131072) == 128
    assert objectives.logit_chunk_rows(32768) == 512
    assert objectives.logit_chunk_rows(49152, multiple=64) == 320
    assert objectives.logit_chunk_rows(10 ** 9, multiple=64) == 64  # at least one bucket


def test_grpo_loss_types_normalise_as_trl_does():
    """dapo: every completion token of the step weighs the same (1/C, rows not divided); grpo: each row's token
    mean, over N; dr_grpo: tokens over N x max_new_tokens. The step's scales survive a split into micro-batches."""
    step = _batch([[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert step_scales("grpo", [step], "dapo") == (1 / 10, 0.0, 10)
    assert step_scales("grpo", [step], "grpo") == (1 / 4, 0.0, 4)
    for loss_type in objectives.GRPO_LOSS_TYPES:
        assert step_scales("grpo", step.split(2), loss_type) == step_scales("grpo", [step], loss_type)
    rng = np.random.default_rng(0)
    logp = rng.normal(-2.0, 0.5, step.loss_mask.shape)
    mask, adv = step.loss_mask, np.array([1.0, -1.0, 0.5, -0.5])
    per_token = -adv[:, None] * np.ones_like(logp)  # on-policy, beta 0: l_t = -A
    expected = {"dapo": (per_token * mask).sum() / mask.sum(),
                "grpo": ((per_token * mask).sum(axis=1) / mask.sum(axis=1)).sum() / 4,
                "dr_grpo": (per_token * mask).sum() / (4 * 8)}
    for loss_type, value in expected.items():
        got, _ = objectives.grpo_reference(logp, mask, adv, beta=0.0, epsilon=0.2, loss_type=loss_type,
                                           max_new_tokens=8)
        assert got == pytest.approx(value, rel=1e-12), loss_type
    # Two micro-batches, each with the step's C: their sum is the step's value.
    halves = [objectives.grpo_reference(logp[a:b], mask[a:b], adv[a:b], beta=0.0, epsilon=0.2, loss_type="dapo",
                                        max_new_tokens=8, tokens_in_step=mask.sum())[0] for a, b in ((0, 2), (2, 4))]
    assert sum(halves) == pytest.approx(expected["dapo"], rel=1e-12)


def test_reward_scores_at_the_token_transformers_reads():
    """The score position is the rightmost token that is not the pad id (transformers' sequence classifiers):
    with pad = eos the closing eos is padding too, so the score sits on the token before it."""
    eos = pad = 2
    ids = np.array([[1, 7, 8, 2, 2, 2],    # ends with eos, right-padded with the same id
                    [1, 7, 8, 9, 5, 6],    # fills the batch: its last column
                    [2, 2, 2, 2, 2, 2]])   # nothing but pads: position 0, as transformers' argmax
    assert objectives.score_positions(ids, pad).tolist() == [2, 5, 0]
    assert objectives.score_positions(np.where(ids == eos, 0, ids), 0).tolist() == [2, 5, 0]
    with_eos = np.array([[1, 7, 8, 2, 0, 0]])  # pad != eos: the eos itself carries the score
    assert objectives.score_positions(with_eos, 0).tolist() == [3]


def test_reward_objective_is_trls_with_centering_and_splits_change_nothing():
    scores = np.array([1.5, -0.5, 0.2, 0.4, -1.0, -3.0, 0.0, 0.0])
    chosen, rejected = scores[0::2], scores[1::2]
    bt = np.log1p(np.exp(-(chosen - rejected)))
    assert objectives.reward_reference(scores) == pytest.approx(bt.mean(), rel=1e-12)
    center = 0.01 * ((chosen + rejected) ** 2).mean()  # TRL: loss.mean() + c * mean((r_c + r_r)^2)
    assert objectives.reward_reference(scores, 0.01) == pytest.approx(bt.mean() + center, rel=1e-12)
    # A step cut into micro-batches: each adds its pair sums times the whole step's 1/P.
    batch = _batch(np.ones((8, 4)), paired=True)
    _, pair_scale, weight = step_scales("reward", [batch])
    assert weight == 4 and pair_scale == 0.25 and eval_weight("reward", batch) == 4
    parts = batch.split(3)
    assert all(p.paired and p.num_rows % 2 == 0 for p in parts)
    _, split_scale, _ = step_scales("reward", parts)
    bounds = np.cumsum([0] + [p.num_rows for p in parts])
    summed = sum(objectives.reward_pair_losses(scores[a:b], 0.01).sum() * split_scale
                 for a, b in zip(bounds[:-1], bounds[1:]))
    assert summed == pytest.approx(objectives.reward_reference(scores, 0.01), rel=1e-12)
    assert objectives.pairs_ranked_right(scores) == 2  # a tie is not ranked right (TRL's accuracy)
