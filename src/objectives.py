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

The normalisers T and P are those of the whole step, not of each micro-batch: every micro-batch adds
``token_scale * (its token sums) + pair_scale * (its pair sums)``, so splitting a step into more
micro-batches (gradient accumulation, the OOM fallback) changes nothing. beta is ``preference.beta``.

Validation reports, per batch, (value * weight, weight) with the batch's own normalisers and
weight = T (sft, cpt) or P (dpo, orpo); the validator divides the summed values by the summed
weights, so sft/cpt val_loss is total loss / total target tokens over the fixed subset.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

AVG_LOGP_MAX = -1e-7
PAIRED = ("dpo", "orpo")


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


def step_scales(method: str, batches: Sequence) -> tuple[float, float, int]:
    """(token_scale, pair_scale, weight): the factors each micro-batch's sums are multiplied by, and
    the step's weight (T or P; 0 means the step has nothing to learn from)."""
    tokens, pairs = counts(method, batches)
    weight = pairs if method == "dpo" else tokens
    return (1.0 / tokens if tokens else 0.0), (1.0 / pairs if pairs else 0.0), weight


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
