"""LoRA's initial weights, drawn once without any ML framework so both backends start from the same adapter.

PEFT initialises lora_A with kaiming_uniform(a=sqrt(5)) on its (r, in) weight and mlx-lm draws lora_a
from U(-1/sqrt(in), 1/sqrt(in)) on (in, r): the same law, but from two different RNGs, so the same
seed gave two different models. Here A is drawn from U(-1/sqrt(in), 1/sqrt(in)) by numpy, keyed by
the seed and a backend-neutral module name, and B is zero (so the adapter starts as a no-op, as in
both libraries). Each backend loads A in its own layout (PEFT (r, in), mlx-lm (in, r)).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def neutral_module_name(path: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj`` (PEFT) and ``model.layers.3.self_attn.q_proj``
    (mlx-lm) both become ``layers.3.self_attn.q_proj``."""
    match = _BLOCK.search(path)
    if not match:
        raise ValueError(f"LoRA module {path!r} is not inside a numbered transformer block (layers.N.)")
    return f"layers.{int(match.group(1))}.{match.group(2)}"


def lora_a(seed: int, module: str, rank: int, in_features: int) -> np.ndarray:
    """lora_A as PEFT stores it, (rank, in_features) float32, for ``module`` (a neutral name)."""
    words = np.frombuffer(hashlib.sha256(module.encode()).digest()[:16], dtype=np.uint32)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, words)]))
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(rank, in_features)).astype(np.float32)


# The portable/neutral name of DoRA's magnitude vector: ``layers.3.self_attn.q_proj.M``, (out_features,) float32,
# beside ``.A`` and ``.B`` (src/runs/portable.py).
MAGNITUDE_SUFFIX = ".M"

DORA = """DoRA (lora.use_dora), as both backends compute it: PEFT's definition (peft/tuners/lora/dora.py, 0.22).

For a linear layer y = W x + b (W the base weight, dequantized when the base is 4-bit), LoRA's A (r, in),
B (out, r), scale s = alpha / rank, the magnitude m (out,) and dropout D (identity in eval):

    n = || W + s B A ||  per output row, treated as a constant (no gradient flows through it)
    g = m / n
    y = W x + b + (g - 1) * (W D(x)) + g * s * B A D(x)

m starts as || W || per row, computed in float32 on both backends whatever the compute dtype (B is zero at the
start, so the layer starts as the base). Without dropout (eval, or
lora.dropout 0) this is g * (W x + s B A x) + b, which is also what mlx-lm's DoRALinear computes, so the adapter
overnight saves loads in mlx-lm and in PEFT and scores the same in both. In training with dropout on, mlx-lm's
DoRALinear computes g * (W x + s B A D(x)) + b instead (dropout on the LoRA term only, the base term rescaled
undropped), so the mlx backend trains with a layer of its own that computes the line above. The merged weight
(fuse) is g * (W + s B A), the bias unchanged. No epsilon: a row of W + s B A whose norm is 0 cannot occur with a
trained base."""


def dora_magnitude(weight: np.ndarray) -> np.ndarray:
    """DoRA's initial magnitude: the row norms of the base weight (out, in), float32 (out,)."""
    return np.linalg.norm(np.asarray(weight, dtype=np.float64), axis=1).astype(np.float32)


def dora_forward(x: np.ndarray, dropped_x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, a: np.ndarray,
                 b: np.ndarray, magnitude: np.ndarray, scale: float) -> np.ndarray:
    """DORA's output in float64, the reference the backends' layers are tested against: ``x`` (..., in),
    ``dropped_x`` the same input after the layer's dropout (``x`` itself in eval), A (r, in), B (out, r)."""
    w = np.asarray(weight, dtype=np.float64)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x, dropped_x = np.asarray(x, dtype=np.float64), np.asarray(dropped_x, dtype=np.float64)
    g = np.asarray(magnitude, dtype=np.float64) / np.linalg.norm(w + scale * b @ a, axis=1)
    y = x @ w.T + (g - 1.0) * (dropped_x @ w.T) + g * scale * (dropped_x @ a.T @ b.T)
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)
