"""Each method's training objective, written once (SPEC §9); both backends implement exactly this.

Notation for one optimizer step made of micro-batches (rows right-padded, ``loss_mask`` marks target
tokens, preference rows come in pairs: row 2i chosen, row 2i+1 rejected):

  nll(row)      summed negative log-likelihood of the row's target tokens under the policy
  logp(row)     -nll(row);  avg_logp(row) = logp(row) / target tokens of the row
  T             target tokens in the step (sft, cpt: all rows; orpo: chosen rows only)
  P             preference pairs in the step

  sft, cpt   L = sum over rows of nll(row) / T                       (mean target-token cross-entropy)
  dpo        L = sum over pairs of -logsigmoid(beta * margin) / P,
             margin = (logp(chosen) - ref_logp(chosen)) - (logp(rejected) - ref_logp(rejected)),
             ref = the same base model with the adapter switched off (no dropout)
  orpo       L = sum over chosen rows of nll(row) / T  +  beta * sum over pairs of -logsigmoid(log_or) / P,
             log_or = log_odds(chosen) - log_odds(rejected),  log_odds(x) = a - log(1 - exp(a)), a = avg_logp(x)
             (TRL's ORPO: mean chosen-token NLL + beta * mean over pairs of the odds-ratio loss;
             a is clamped to at most AVG_LOGP_MAX so log(1 - exp(a)) stays finite)
  reward     a reward model: the base with LoRA plus a score head w (hidden -> 1, no bias, float32, zero at the start,
             trained fully). r(row) = w . h(row)[s(row)], h the final hidden states (after the final norm: the input
             of the LM head, which a reward step never computes), s(row) the score position (score_positions):
             the rightmost position whose token is not the batch's pad id, 0 if there is none. That is exactly
             the token transformers' AutoModelForSequenceClassification reads (GenericForSequenceClassification,
             transformers 5: the rightmost token != config.pad_token_id), so an exported model with
             pad_token_id = the tokenizer's pad id scores every row as training did, whatever the padding; when
             pad = eos (SmolLM2, most chat models) the row's closing eos is that pad and the score sits on the
             token before it, in training and in transformers alike.
             L = sum over pairs of [-logsigmoid(r(chosen) - r(rejected)) + c * (r(chosen) + r(rejected))^2] / P,
             c = reward.center_coefficient (TRL's RewardTrainer.compute_loss, TRL main at commit 00b6d2b:
             the mean Bradley-Terry loss plus center_rewards_coefficient * mean (r_chosen + r_rejected)^2, the
             same over one batch). Validation also counts pairwise accuracy: r(chosen) > r(rejected), a tie
             counting as wrong (TRL's accuracy metric).

  grpo       every row is one sampled completion (prompt + completion; loss_mask marks the completion tokens,
             its EOS included) with an advantage A (src/methods/rewards.py: its reward against its group's). Per token t:
               logp_t      log-prob of the token under the policy (adapter on, training mode), from the logits
                           divided by grpo.temperature: the distribution the completion was sampled from, so
                           the ratio and the KL refer to the sampling policy (TRL does the same)
               old_t       the same under the policy that sampled it: logp_t itself, detached, when
                           grpo.iterations = 1 (on-policy: ratio 1, gradient A * grad logp); else the value
                           recorded when the batch was generated (adapter on, no dropout)
               ref_t       the same under the reference (adapter off, no dropout); only when beta > 0
               ratio_t     exp(logp_t - old_t)
               kl_t        exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (the k3 estimator, >= 0)
               l_t         -min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon) * A) + beta * kl_t
             grpo:     L = sum over rows of (sum_t l_t / n_row) / N              n_row: the row's completion tokens
             dr_grpo:  L = sum over rows of (sum_t l_t / max_new_tokens) / N    (Dr. GRPO: one constant, so
                       long and short completions weigh the same per token)
             dapo:     L = sum over rows of sum_t l_t / C                     (token-level: every completion token
                       of the step weighs the same, whatever its completion's length)
             N = completions (rows) in the step, C = completion tokens in the step; beta, epsilon, loss_type,
             max_new_tokens are grpo.*. These are TRL's GRPOTrainer definitions (grpo_trainer.py _compute_loss at
             TRL 1.10): its grpo, dr_grpo and dapo loss types, logits / temperature, the k3 KL added per token.
             The logged kl is the token-weighted mean of kl_t over the step's completion tokens.

The normalisers T and P are those of the whole step, not of each micro-batch: every micro-batch adds
``token_scale * (its token sums) + pair_scale * (its pair sums)``, so splitting a step into more
micro-batches (gradient accumulation, the OOM fallback) changes nothing. beta is ``preference.beta``.

Validation reports, per batch, (value * weight, weight) with the batch's own normalisers and
weight = T (sft, cpt) or P (dpo, orpo); the validator divides the summed values by the summed
weights, so sft/cpt val_loss is total loss / total target tokens over the fixed subset.

A step whose loss or gradient norm is not finite is reported but not applied (``update_applies``).

How the backends compute logp: the decoder runs on the whole batch, the output head only on the target positions
(``target_slots``), in chunks of ``logit_chunk_rows`` positions, each chunk's logits taken to float32 for the
log-softmax and recomputed in the backward pass. No (targets x vocabulary) tensor exists beyond one chunk: on a
128k vocabulary the full logits of a batch of 8 x 1024 targets are 4 GB in float32, and their gradient as much again.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

AVG_LOGP_MAX = -1e-7
# The most logits one chunk of the output head holds: 2**24 is 64 MB in float32 (the chunk's softmax gradient as much
# again), whatever the vocabulary: 128 target positions a chunk at 128k rows, 512 at 32k.
LOGIT_CHUNK_ELEMENTS = 1 << 24
PAIRED = ("dpo", "orpo", "reward")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


def logit_chunk_rows(vocab_size: int, multiple: int = 1) -> int:
    """Target positions per chunk of the output head: as many as keep one chunk's logits within
    LOGIT_CHUNK_ELEMENTS, rounded down to ``multiple`` (at least ``multiple``)."""
    rows = max(1, LOGIT_CHUNK_ELEMENTS // max(int(vocab_size), 1))
    return max(multiple, rows // multiple * multiple)


class TargetSlots(NamedTuple):
    """The target positions of a batch, flat: ``index`` into the (B, T-1) next-token grid (row-major), the ``row``
    of each, its loss-mask ``weight``; ``count`` real ones, then padding (index 0, row 0, weight 0) up to a multiple
    of the bucket, so a compiled step sees few shapes."""
    index: np.ndarray
    row: np.ndarray
    weight: np.ndarray
    count: int


def target_slots(loss_mask: np.ndarray, bucket: int = 1) -> TargetSlots:
    """TargetSlots of ``loss_mask`` (B, T): loss_mask[:, t] weighs the score of token t given tokens before it, so
    the next-token grid is loss_mask[:, 1:]."""
    grid = np.asarray(loss_mask, dtype=np.float32)[:, 1:]
    flat = grid.reshape(-1)
    index = np.flatnonzero(flat)
    size = max(bucket, -(-index.size // bucket) * bucket) if bucket > 1 else index.size
    padded = np.zeros(size, dtype=np.int64)
    padded[:index.size] = index
    weight = np.zeros(size, dtype=np.float32)
    weight[:index.size] = flat[index]
    return TargetSlots(padded, padded // max(grid.shape[1], 1), weight, int(index.size))


def counts(method: str, batches: Sequence) -> tuple[int, int]:
    """(T, P) of a step made of ``batches`` (overnight.backend.Batch)."""
    tokens = pairs = 0
    for batch in batches:
        if method == "orpo":
            tokens += int(batch.loss_mask[0::2, 1:].sum())
        elif method not in PAIRED:
            tokens += int(batch.loss_mask[:, 1:].sum())
        if method in PAIRED:
            pairs += batch.num_rows // 2
    return tokens, pairs


def step_scales(method: str, batches: Sequence, grpo_loss_type: str = "grpo") -> tuple[float, float, int]:
    """(token_scale, pair_scale, weight): the factors each micro-batch's sums are multiplied by, and
    the step's weight (T, P, N or C; 0 means the step has nothing to learn from)."""
    if method == "grpo" and grpo_loss_type == "dapo":  # token_scale is 1/C; rows are not divided (divisor 1)
        tokens = sum(int(batch.loss_mask[:, 1:].sum()) for batch in batches)
        return (1.0 / tokens if tokens else 0.0), 0.0, tokens
    if method == "grpo":  # token_scale is 1/N; each row's own divisor is grpo_row_divisor's
        rows = sum(batch.num_rows for batch in batches)
        return (1.0 / rows if rows else 0.0), 0.0, rows
    tokens, pairs = counts(method, batches)
    weight = pairs if method in ("dpo", "reward") else tokens
    return (1.0 / tokens if tokens else 0.0), (1.0 / pairs if pairs else 0.0), weight


def update_applies(loss: float, grad_norm: float) -> bool:
    """Whether a step's optimizer update is applied: only when its loss and its global gradient norm (before
    clipping) are both finite. A non-finite step is still reported in its StepResult, and the loop stops the
    run on it at once (SPEC §6); not applying it keeps the weights and the AdamW moments finite, so the
    checkpoint that stop commits (and the adapter chosen from it) can still be used. Both backends ask this,
    with the loss and norm the step reports (in a data-parallel job, the whole step's, the same on every rank,
    so all ranks decide alike)."""
    return math.isfinite(loss) and math.isfinite(grad_norm)


def mean_kl(kl_sum: float, kl_tokens: float) -> float:
    """grpo's logged kl: the step's sum of kl_t over its completion tokens, over their count (at least 1)."""
    return kl_sum / max(kl_tokens, 1.0)


def eval_weight(method: str, batch) -> int:
    tokens, pairs = counts(method, [batch])
    return pairs if method in PAIRED else tokens


def reference_value(method: str, logp, tokens, beta: float = 0.1, ref_logp=None) -> float:
    """The step objective in numpy from per-row summed target log-probs ``logp`` and target counts ``tokens``
    (paired rows interleaved chosen, rejected): the formulas above, for holding the backends to them."""
    logp, tokens = np.asarray(logp, np.float64), np.asarray(tokens, np.float64)
    if method in ("sft", "cpt"):
        return float(-logp.sum() / tokens.sum())

    def neg_logsigmoid(x):
        return np.logaddexp(0.0, -x)

    if method == "dpo":
        ref = np.asarray(ref_logp, np.float64)
        margin = (logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2])
        return float(neg_logsigmoid(beta * margin).mean())
    avg = np.minimum(logp / np.maximum(tokens, 1.0), AVG_LOGP_MAX)
    log_odds = avg - np.log(-np.expm1(avg))
    return float(-logp[0::2].sum() / tokens[0::2].sum() + beta * neg_logsigmoid(log_odds[0::2] - log_odds[1::2]).mean())


def score_positions(input_ids, pad_id: int) -> np.ndarray:
    """reward: each row's score position s(row), int64 (B,): its rightmost token that is not ``pad_id`` (0 when
    every token is), computed as transformers' sequence classifiers do, so both backends and an exported model
    read the score at the same token."""
    real = np.asarray(input_ids) != int(pad_id)
    return (np.arange(real.shape[1], dtype=np.int64)[None, :] * real).argmax(axis=1).astype(np.int64)


def reward_pair_losses(scores, center_coefficient: float = 0.0) -> np.ndarray:
    """reward: each pair's term of L (before dividing by P) in float64, from per-row scores (chosen, rejected
    interleaved)."""
    r = np.asarray(scores, np.float64)
    chosen, rejected = r[0::2], r[1::2]
    return np.logaddexp(0.0, -(chosen - rejected)) + center_coefficient * (chosen + rejected) ** 2


def reward_reference(scores, center_coefficient: float = 0.0) -> float:
    """reward's L in numpy from per-row scores of one step (chosen, rejected interleaved)."""
    return float(reward_pair_losses(scores, center_coefficient).mean())


def pairs_ranked_right(scores) -> int:
    """reward's accuracy count: pairs whose chosen row scores strictly above its rejected one (a tie is wrong)."""
    r = np.asarray(scores, np.float64)
    return int((r[0::2] > r[1::2]).sum())


def grpo_row_divisor(loss_type: str, row_tokens, max_new_tokens: int):
    """What a row's summed per-token grpo loss is divided by: its completion tokens (grpo; at least 1), the
    constant max_new_tokens (dr_grpo) or 1 (dapo, whose step scale divides by the step's completion tokens). Works
    on numbers and numpy arrays; the backends mirror it."""
    if loss_type == "dr_grpo":
        return float(max_new_tokens)
    if loss_type == "dapo":
        return 1.0
    return np.maximum(row_tokens, 1.0)


def grpo_reference(logp, mask, advantages, *, beta: float, epsilon: float, loss_type: str, max_new_tokens: int,
                   ref_logp=None, old_logp=None, rows_in_step: int | None = None,
                   tokens_in_step: float | None = None) -> tuple[float, float]:
    """(L, mean kl) of the grpo formula above in float64 numpy, from per-token log-probs (B, T) aligned with
    ``mask`` (1 on completion tokens), taken from logits / temperature. ``old_logp`` None is the on-policy case
    (ratio 1). N and C default to this batch's."""
    logp = np.asarray(logp, np.float64)
    mask = np.asarray(mask, np.float64)
    adv = np.asarray(advantages, np.float64)[:, None]
    ratio = np.exp(logp - np.asarray(old_logp, np.float64)) if old_logp is not None else np.ones_like(logp)
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv)
    kl = np.zeros_like(logp)
    if beta > 0:
        diff = np.asarray(ref_logp, np.float64) - logp
        kl = np.exp(diff) - diff - 1.0
        per_token = per_token + beta * kl
    row = (per_token * mask).sum(axis=1) / grpo_row_divisor(loss_type, mask.sum(axis=1), max_new_tokens)
    if loss_type == "dapo":
        scale = tokens_in_step if tokens_in_step is not None else mask.sum()
    else:
        scale = rows_in_step if rows_in_step is not None else logp.shape[0]
    return float(row.sum() / scale), float((kl * mask).sum() / max(mask.sum(), 1.0))
