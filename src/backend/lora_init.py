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
