"""The MLX backend, run for real on the tiny model (mlx[cpu] on Linux, Metal on a Mac).

Batches are built here by hand from the bundled JSONL with the model's own tokenizer, so these
tests depend on the backend contract only, not on the data pipeline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from overnight.backend import Batch, OutOfMemory  # noqa: E402
from overnight.backends.mlx_backend import MLXBackend  # noqa: E402
from overnight.config import Config, ConfigError  # noqa: E402

pytestmark = pytest.mark.mlx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


# ---------------------------------------------------------------------------
# Hand-built batches


def _tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def _chat_pairs(model_dir: Path, path: Path, limit: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) in the tiny model's chat format; the answer ends with eos."""
    tok = _tokenizer(model_dir)
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line).get("messages")
        if not messages or messages[-1]["role"] != "assistant":
            continue
        prompt = "<|bos|>" + "".join(f"<|{m['role']}|>\n{m['content']}<|eos|>\n" for m in messages[:-1])
        prompt += "<|assistant|>\n"
        answer = messages[-1]["content"] + "<|eos|>"
        pairs.append((tok.encode(prompt, add_special_tokens=False).ids, tok.encode(answer, add_special_tokens=False).ids))
        if len(pairs) == limit:
            break
    assert len(pairs) == limit, f"{path} has fewer than {limit} chat rows"
    return pairs


def _batch(pairs, paired: bool = False) -> Batch:
    rows = [p + a for p, a in pairs]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    attn = np.zeros((len(rows), width), np.int32)
    for i, ((p, a), row) in enumerate(zip(pairs, rows)):
        ids[i, : len(row)] = row
        attn[i, : len(row)] = 1
        mask[i, len(p): len(row)] = 1  # answer tokens are the targets
    return Batch(ids, mask, attn, pad_id=0, paired=paired)


def _preference_batch(model_dir: Path, start: int, pairs: int) -> Batch:
    tok = _tokenizer(model_dir)
    lines = (DATA / "preference" / "train.jsonl").read_text(encoding="utf-8").splitlines()[start: start + pairs]
    rows = []
    for line in lines:
        row = json.loads(line)
        prompt = tok.encode(row["prompt"], add_special_tokens=False).ids
        for key in ("chosen", "rejected"):
            rows.append((prompt, tok.encode(row[key] + "<|eos|>", add_special_tokens=False).ids))
    return _batch(rows, paired=True)


@pytest.fixture(scope="module")
def sft_data(tiny_model_dir):
    train = _chat_pairs(tiny_model_dir, DATA / "train.jsonl", 160)
    val = _chat_pairs(tiny_model_dir, DATA / "val.jsonl", 32)
    steps = [[_batch(train[i: i + 4]), _batch(train[i + 4: i + 8])] for i in range(0, len(train), 8)]
    val_batches = [_batch(val[i: i + 8]) for i in range(0, len(val), 8)]
    return steps, val_batches


def _config(model_dir: Path, **over) -> Config:
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.model.quantization.bits = over.pop("bits", 0)
    cfg.model.grad_checkpoint = over.pop("grad_checkpoint", False)
    cfg.lora.rank = over.pop("rank", 8)
    cfg.lora.alpha = over.pop("alpha", 16.0)
    cfg.lora.dropout = over.pop("dropout", 0.0)
    cfg.lora.layers = over.pop("layers", -1)
    cfg.lora.targets = over.pop("targets", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    cfg.data.method = over.pop("method", "sft")
    cfg.train.weight_decay = over.pop("weight_decay", 0.0)
    cfg.train.max_grad_norm = over.pop("max_grad_norm", 1.0)
    assert not over, f"unknown overrides {over}"
    return cfg


def _backend(model_dir: Path, seed: int = 0, **over) -> MLXBackend:
    backend = MLXBackend()
    backend.setup(_config(model_dir, **over), seed)
    return backend


def _val_loss(backend, batches) -> float:
    total = count = 0
    for b in batches:
        s, n = backend.eval_loss(b)
        total, count = total + s, count + n
    return total / count


def _adapter(backend) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())}


LR = 2e-3


# ---------------------------------------------------------------------------
# Setup


def test_setup_counts_lora_layout_and_seeded_init(tiny_model_dir):
    backend = MLXBackend()
    info = backend.setup(_config(tiny_model_dir, layers=1, targets=["q_proj", "v_proj"], rank=4, alpha=8.0), seed=3)
    # hidden 64, 4 heads of 16, 2 kv heads: q_proj 64->64, v_proj 64->32; LoRA adds r*(in+out) each, last block only.
    assert info.trainable_params == 4 * (64 + 64) + 4 * (64 + 32)
    assert info.total_params > 100_000 + info.trainable_params
    assert Path(info.model_dir) == Path(tiny_model_dir)
    assert info.details["lora_layers"] == 1 and info.details["lora_scale"] == 2.0
    assert info.details["lora_keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    names = list(_adapter(backend))
    assert names and all(n.startswith("model.layers.1.") for n in names)
    # Only LoRA is trainable; the base stays frozen.
    assert all(n.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for n in names)

    same, other = _backend(tiny_model_dir, seed=3, layers=1, targets=["q_proj", "v_proj"], rank=4, alpha=8.0), \
        _backend(tiny_model_dir, seed=4, layers=1, targets=["q_proj", "v_proj"], rank=4, alpha=8.0)
    a, b, c = _adapter(backend), _adapter(same), _adapter(other)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith("lora_a"))


def test_setup_refuses_unknown_targets_and_cuda_only_optimizer(tiny_model_dir):
    with pytest.raises(ConfigError, match="qq_proj"):
        MLXBackend().setup(_config(tiny_model_dir, targets=["qq_proj"]), 0)
    cfg = _config(tiny_model_dir)
    cfg.train.optimizer = "paged_adamw_8bit"
    with pytest.raises(ConfigError, match="train.optimizer"):
        MLXBackend().setup(cfg, 0)
    cfg = _config(tiny_model_dir)
    cfg.model.path = str(tiny_model_dir / "missing")
    with pytest.raises(ConfigError, match="model.path"):
        MLXBackend().setup(cfg, 0)


# ---------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def trained(tiny_model_dir, sft_data):
    """40 SFT steps of 8 rows in 2 micro-batches; returns the backend and its loss history."""
    steps, val = sft_data
    backend = _backend(tiny_model_dir, dropout=0.05)
    val_before = _val_loss(backend, val)
    results = [backend.train_step(steps[i % len(steps)], LR) for i in range(40)]
    return backend, results, val_before, _val_loss(backend, val)


def test_sft_lowers_train_and_val_loss(trained):
    backend, results, val_before, val_after = trained
    losses = [r.loss for r in results]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert all(np.isfinite(losses)) and all(r.grad_norm > 0 for r in results)
    assert all(r.tokens > 0 for r in results)
    assert last < first - 1.0, (first, last)
    assert val_after < val_before - 1.0, (val_before, val_after)


def _pad(x: np.ndarray, width: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _merge(micro: list[Batch]) -> Batch:
    width = max(m.input_ids.shape[1] for m in micro)
    return Batch(*(np.concatenate([_pad(getattr(m, f), width) for m in micro])
                   for f in ("input_ids", "loss_mask", "attention_mask")))


def test_loss_is_token_weighted_and_split_invariant(tiny_model_dir, sft_data):
    steps, _ = sft_data
    whole, split = _backend(tiny_model_dir), _backend(tiny_model_dir)
    for micro in steps[:3]:
        merged = _merge(micro)
        # Before the update both see the same weights: the step loss is total loss / total tokens.
        sums = [whole.eval_loss(m) for m in micro]
        expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
        a = whole.train_step([merged], LR)
        b = split.train_step(merged.split(4), LR)
        assert a.tokens == b.tokens == merged.num_target_tokens == sum(n for _, n in sums)
        assert a.loss == pytest.approx(expected, rel=1e-5)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
    wa, wb = _adapter(whole), _adapter(split)
    assert all(np.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
