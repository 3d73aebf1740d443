"""The MLX backend, run for real on the tiny model (mlx[cpu] on Linux, Metal on a Mac).

Batches are built here by hand from the bundled JSONL with the model's own tokenizer, so these
tests depend on the backend contract only, not on the data pipeline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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

import dp_mlx_worker  # noqa: E402  (tests/ is on sys.path: one rank of the data-parallel jobs below)

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

    def encode(text):
        return tok.encode(text, add_special_tokens=False).ids

    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line).get("messages")
        if not messages or messages[-1]["role"] != "assistant":
            continue
        prompt = "<|bos|>" + "".join(f"<|{m['role']}|>\n{m['content']}<|eos|>\n" for m in messages[:-1])
        prompt += "<|assistant|>\n"
        answer = messages[-1]["content"] + "<|eos|>"
        pairs.append((encode(prompt), encode(answer)))
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
    cfg.lora.targets = over.pop("targets", ["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"])
    cfg.lora.use_dora = over.pop("use_dora", False)
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


def test_the_adapter_records_a_relative_model_path_as_absolute(tiny_model_dir, tmp_path, monkeypatch):
    """`--model runs/tiny-model` means that folder only from where it was typed; the adapter is opened from
    anywhere (mlx-lm, convert-adapter -> PEFT), so it records the absolute path."""
    monkeypatch.chdir(tiny_model_dir.parent)
    backend = MLXBackend()
    backend.setup(_config(Path(tiny_model_dir.name), layers=1, targets=["q_proj"]), 0)
    backend.save(tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["model"] == str(tiny_model_dir.resolve())


def test_every_lora_target_must_match_in_the_blocks_that_get_lora(tiny_model_dir):
    """The rule and the words are torch's (src/backend/lora_targets.py): one good target does not excuse a typo,
    and a module outside the blocks (the head) is not a target."""
    with pytest.raises(ConfigError, match=r"'lora.targets': vproj matches no module of the blocks that get LoRA "
                                          r"\(block 1\); the modules there are: mlp.down_proj.*did you mean v_proj"):
        MLXBackend().setup(_config(tiny_model_dir, layers=1, targets=["q_proj", "vproj"]), 0)
    with pytest.raises(ConfigError, match="lm_head matches no module"):
        MLXBackend().setup(_config(tiny_model_dir, targets=["q_proj", "lm_head"]), 0)


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
    # Adam divides by sqrt(v): float rounding in near-zero gradients moves a few weights by ~1e-5 (lr is 2e-3).
    wa, wb = _adapter(whole), _adapter(split)
    assert all(np.allclose(wa[k], wb[k], rtol=0, atol=1e-4) for k in wa)


def test_save_load_continue_is_bit_exact(tiny_model_dir, sft_data, tmp_path):
    steps, _ = sft_data
    kw = dict(dropout=0.1, weight_decay=0.01)  # dropout draws from the RNG, so its state must resume too
    lrs = [LR * (1 - i / 12) for i in range(10)]
    straight = _backend(tiny_model_dir, **kw)
    expected = []
    for i in range(10):
        expected.append(straight.train_step(steps[i], lrs[i]))
        if i == 4:
            straight.save(tmp_path)
            straight.eval_loss(steps[0][0])  # an eval between save and the next step changes nothing
            straight.generate(steps[0][0].input_ids[0, :5], 3, ())

    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "adapter", "adapter/adapter_config.json", "adapter/adapters.safetensors", "mlx_state.json",
        "optimizer.safetensors"]
    resumed = _backend(tiny_model_dir, seed=123, **kw)  # everything that matters comes from the checkpoint
    resumed.load(tmp_path)
    got = [resumed.train_step(steps[i], lrs[i]) for i in range(5, 10)]
    assert [(r.loss, r.grad_norm, r.tokens) for r in got] == [(r.loss, r.grad_norm, r.tokens) for r in expected[5:]]
    a, b = _adapter(straight), _adapter(resumed)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    sa, sb = dict(tree_flatten(straight.optimizer.state)), dict(tree_flatten(resumed.optimizer.state))
    assert sa.keys() == sb.keys() and all(np.array_equal(np.array(sa[k]), np.array(sb[k])) for k in sa)
    assert int(sb["step"].item()) == 10


def test_load_refuses_a_checkpoint_of_another_adapter(tiny_model_dir, tmp_path):
    _backend(tiny_model_dir, rank=8).save(tmp_path)
    with pytest.raises(ValueError, match="lora_parameters"):
        _backend(tiny_model_dir, rank=4).load(tmp_path)


@pytest.mark.parametrize("bits, dropout", [(0, 0.0), (4, 0.1)], ids=["plain", "qlora-dropout"])
def test_grad_checkpoint_gives_the_same_step(tiny_model_dir, sft_data, bits, dropout):
    """The recomputed forward of a checkpointed block must draw the same LoRA dropout masks as the forward
    (else the gradients are of another function), and the masks must not depend on checkpointing at all."""
    steps, _ = sft_data
    plain = _backend(tiny_model_dir, bits=bits, dropout=dropout)
    ckpt = _backend(tiny_model_dir, bits=bits, dropout=dropout, grad_checkpoint=True)
    for micro in steps[:3]:
        a, b = plain.train_step(micro, LR), ckpt.train_step(micro, LR)
        assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    for name, value in _adapter(plain).items():
        np.testing.assert_allclose(_adapter(ckpt)[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    if dropout:  # the masks really are drawn: the same step without dropout differs
        no_dropout = _backend(tiny_model_dir, bits=bits)
        first = no_dropout.train_step(steps[0], LR)
        redo = _backend(tiny_model_dir, bits=bits, dropout=dropout).train_step(steps[0], LR)
        assert abs(first.grad_norm - redo.grad_norm) > 1e-4 * first.grad_norm
    assert ckpt.eval_loss(steps[0][0]) == pytest.approx(plain.eval_loss(steps[0][0]), rel=1e-5)
    prompt = steps[0][0].input_ids[0, :6]
    assert np.array_equal(ckpt.generate(prompt, 4, ()), plain.generate(prompt, 4, ()))
    # The class patch is per instance: a model loaded without the flag still runs plainly.
    assert getattr(ckpt.model.layers[0], "_overnight_checkpoint", False)
    assert not getattr(plain.model.layers[0], "_overnight_checkpoint", False)


def test_qlora_4bit_in_memory_trains(tiny_model_dir, sft_data):
    steps, val = sft_data
    backend = MLXBackend()
    info = backend.setup(_config(tiny_model_dir, bits=4), 0)
    assert "quantized in memory" in info.details["quantization"]
    base = backend.model.layers[0].self_attn.q_proj.linear
    assert isinstance(base, nn.QuantizedLinear) and base.bits == 4 and base.group_size == 64
    before = _val_loss(backend, val)
    losses = [backend.train_step(steps[i % len(steps)], LR).loss for i in range(30)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert _val_loss(backend, val) < before - 0.5


def test_prequantized_mlx_model_is_used_as_is(tiny_model_dir, tmp_path):
    from mlx_lm import convert

    mlx_dir = tmp_path / "tiny-4bit"
    convert(str(tiny_model_dir), str(mlx_dir), quantize=True, q_group_size=64, q_bits=4)
    backend = MLXBackend()
    info = backend.setup(_config(mlx_dir, bits=4), 0)
    assert info.details["quantization"].startswith("pre-quantized 4-bit")
    assert isinstance(backend.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert not any(key.endswith("note") for key in info.details if key != "lora_layers_note"), info.details
    # model.quantization asking for something else is said as not applied (it was used as is without a word)
    for over, said in (({"bits": 8}, "model.quantization.bits=8"), ({"bits": 0}, "model.quantization.bits=0")):
        info = MLXBackend().setup(_config(mlx_dir, **over), 0)
        assert info.details["quantization_note"].startswith(f"{said} is not applied: {mlx_dir} is quantized already "
                                                            "(4-bit, group 64)"), info.details
    cfg = _config(mlx_dir, bits=4)
    cfg.model.quantization.group_size = 16  # not one MLX quantizes with, but nothing is quantized here
    info = MLXBackend().setup(cfg, 0)
    assert info.details["quantization_note"].startswith("model.quantization.group_size=16 is not applied")


def test_a_group_size_mlx_cannot_quantize_with_is_refused_before_loading(tiny_model_dir, monkeypatch):
    """mx.quantize takes groups of 32, 64 or 128: another raised a ValueError from inside the load (a crash, exit 1,
    that the supervisor restarted into the same failure)."""
    from overnight.backends import mlx_load

    monkeypatch.setattr(mlx_load, "load_base", lambda *a, **k: pytest.fail("loaded before the refusal"))
    for group in (16, 100, 256):
        cfg = _config(tiny_model_dir, bits=4)
        cfg.model.quantization.group_size = group
        with pytest.raises(ConfigError, match=f"config key 'model.quantization.group_size': MLX quantizes in groups "
                                              f"of 32, 64 or 128 weights, not {group}"):
            MLXBackend().setup(cfg, 0)


def test_a_folder_another_library_saved_quantized_is_refused_as_such(tiny_model_dir, tmp_path):
    """A bitsandbytes 4-bit upload failed in mlx-lm's load on its absmax/quant_map tensors, said as weight files to
    check; it is refused for what it is, before loading, as the torch backend refuses an MLX-quantized folder."""
    import shutil

    folder = tmp_path / "bnb-4bit"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"config key 'model.path': {folder} is saved quantized by bitsandbytes .*"
                                          "--backend torch"):
        MLXBackend().setup(_config(folder, bits=4), 0)


def test_layers_a_group_size_leaves_unquantized_are_said(tiny_model_dir):
    """mlx-lm's quantize_model skips a layer whose input size is not a multiple of the group size: at group 128 the
    tiny model (hidden 64) kept 14 of its 16 layers in float32 under a banner saying 4-bit."""
    cfg = _config(tiny_model_dir, bits=4)
    cfg.model.quantization.group_size = 128
    backend = MLXBackend()
    info = backend.setup(cfg, 0)
    assert not isinstance(backend.model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    assert isinstance(backend.model.layers[0].mlp.down_proj.linear, nn.QuantizedLinear)  # its input is 128 wide
    note = info.details["quantization_note"]
    assert note.startswith("model.quantization.group_size=128: 14 of 16 layers stay unquantized (their input size "
                           "is not a multiple of 128, e.g. "), note
    assert note.endswith("-> model.quantization.group_size=64 quantizes them all")
    assert "quantization_note" not in MLXBackend().setup(_config(tiny_model_dir, bits=4), 0).details


def test_deterministic_off_and_float16_compute_are_said(tiny_model_dir, tmp_path):
    """train.deterministic=false changed nothing on mlx without a word; float16 compute (named, or the checkpoint's
    under auto) has no loss scaling on mlx either, as torch's banner already said."""
    import shutil

    from safetensors.numpy import load_file, save_file

    half = tmp_path / "tiny-float16"
    shutil.copytree(tiny_model_dir, half)
    weights = load_file(str(half / "model.safetensors"))
    save_file({k: v.astype(np.float16) for k, v in weights.items()}, str(half / "model.safetensors"))
    details = MLXBackend().setup(_config(half), 0).details
    assert details["compute_dtype"] == "float16"
    assert details["float16_note"].startswith("model.dtype=auto (the checkpoint's float16) computes without loss "
                                              "scaling")
    cfg = _config(tiny_model_dir)
    cfg.train.deterministic = False
    cfg.model.dtype = "float16"
    details = MLXBackend().setup(cfg, 0).details
    assert details["deterministic_note"].startswith("train.deterministic=false changes nothing on mlx")
    assert details["compute_dtype"] == "float16"
    assert details["float16_note"].startswith("model.dtype=float16 computes without loss scaling")
    details = MLXBackend().setup(_config(tiny_model_dir), 0).details
    assert details["compute_dtype"] == "float32"
    assert not {"deterministic_note", "float16_note"} & set(details)


def _heldout_loss(model, batches) -> float:
    total = count = 0.0
    for b in batches:
        logits = model(mx.array(b.input_ids[:, :-1]))
        mask = mx.array(b.loss_mask[:, 1:])
        total += (nn.losses.cross_entropy(logits, mx.array(b.input_ids[:, 1:])) * mask).sum().item()
        count += float(b.loss_mask[:, 1:].sum())
    return total / count


def test_mlx_lm_loads_the_adapter_and_it_beats_the_base(trained, sft_data, tiny_model_dir, tmp_path):
    import mlx_lm

    backend, _, _, val_after = trained
    _, val = sft_data
    backend.save(tmp_path)
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"]["scale"] == 16.0 / 8 and config["lora_parameters"]["rank"] == 8

    tuned, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(tmp_path / "adapter"))
    base, _ = mlx_lm.load(str(tiny_model_dir))
    tuned_loss, base_loss = _heldout_loss(tuned, val), _heldout_loss(base, val)
    assert tuned_loss == pytest.approx(val_after, rel=1e-5)  # same model as the backend's, dropout off
    assert tuned_loss < base_loss - 1.0, (base_loss, tuned_loss)


class _FixedMask(nn.Module):
    """A dropout whose mask is given, so a layer's training forward can be compared with the reference."""

    def __init__(self, mask):
        super().__init__()
        self._mask = mask

    def __call__(self, x):
        return x * self._mask


@pytest.mark.parametrize("bits", [0, 4], ids=["float", "4-bit"])
def test_dora_layer_computes_the_one_definition(bits):
    """The mlx DoRA layer's output is lora_init.DORA's (PEFT's) in training, dropout included, and in eval; mlx-lm's
    own DoRALinear is not (it rescales the undropped base output), which is why the backend has its own."""
    from mlx_lm.tuner.dora import DoRALinear

    from overnight.backend import lora_init
    from overnight.backends.mlx_backend import _dora_layer_class

    rng = np.random.default_rng(0)
    linear = nn.Linear(64, 24, bias=True)
    linear.weight = mx.array(rng.normal(0, 0.2, (24, 64)).astype(np.float32))
    linear.bias = mx.array(rng.normal(0, 0.2, 24).astype(np.float32))
    if bits:
        linear = nn.QuantizedLinear.from_linear(linear, group_size=32, bits=bits)
    layer = DoRALinear.from_base(linear, r=4, dropout=0.5, scale=2.0)
    weight = np.array(layer._dequantized_weight())
    assert np.allclose(np.array(layer.m), lora_init.dora_magnitude(weight), rtol=1e-5)  # the initial magnitude
    layer.lora_b = mx.array(rng.normal(0, 0.3, (4, 24)).astype(np.float32))
    layer.m = layer.m * mx.array(rng.uniform(0.5, 1.5, 24).astype(np.float32))
    x = rng.normal(0, 1, (3, 64)).astype(np.float32)
    mask = (rng.uniform(size=(3, 64)) > 0.5).astype(np.float32) * 2.0
    params = [np.array(v) for v in (layer.linear.bias, layer.lora_a.T, layer.lora_b.T, layer.m)]

    def reference(dropped):
        return lora_init.dora_forward(x, dropped, weight, params[0], params[1], params[2], params[3], 2.0)

    layer.dropout = _FixedMask(mx.array(mask))
    layer.train()
    mlx_lm_training = np.array(layer(mx.array(x)))
    layer.__class__ = _dora_layer_class()
    assert np.allclose(np.array(layer(mx.array(x))), reference(x * mask), rtol=1e-4, atol=1e-5)
    assert not np.allclose(mlx_lm_training, reference(x * mask), rtol=1e-2, atol=1e-3)
    layer.dropout = nn.Dropout(0.5)
    layer.eval()
    assert np.allclose(np.array(layer(mx.array(x))), reference(x), rtol=1e-4, atol=1e-5)


def test_dora_trains_saves_and_mlx_lm_loads_it(tiny_model_dir, sft_data, tmp_path):
    """DoRA on the default path (4-bit base, dropout on): the magnitudes train, the adapter is mlx-lm's own DoRA
    layout (fine_tune_type dora, .m beside lora_a/lora_b) and mlx_lm.load scores with it as the backend does, and
    the adapter switched off (dpo's and grpo's reference) is the base alone, magnitudes included."""
    import mlx_lm

    from overnight.backend import lora_init

    steps, val = sft_data
    backend = _backend(tiny_model_dir, bits=4, dropout=0.1, use_dora=True, targets=["q_proj", "v_proj"])
    before = _adapter(backend)
    for micro_batches in steps[:3]:
        backend.train_step(micro_batches, 1e-2)
    after = _adapter(backend)
    magnitudes = sorted(k for k in after if k.endswith(".m"))
    assert len(magnitudes) == 4 and len(after) == 12  # 2 blocks x q_proj, v_proj x (lora_a, lora_b, m)
    assert all(not np.allclose(before[k], after[k]) for k in magnitudes)
    backend.save(tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "dora"
    assert backend._portable_key(magnitudes[0]) == lora_init.neutral_module_name(magnitudes[0][:-2]) + ".M"

    backend._set_training(False)
    tuned, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(tmp_path / "adapter"))
    assert _heldout_loss(tuned, val[:1]) == pytest.approx(_val_loss(backend, val[:1]), rel=1e-4)
    base = MLXBackend()
    base.setup(_config(tiny_model_dir, bits=4, targets=["q_proj", "v_proj"]), 0)  # LoRA, B = 0: the base
    assert np.allclose(backend.token_logps(val[0], adapter=False), base.token_logps(val[0]), atol=1e-5)
    assert not np.allclose(backend.token_logps(val[0]), base.token_logps(val[0]), atol=1e-3)


def test_generate_is_greedy_bounded_and_stops_at_eos(trained):
    backend = trained[0]
    prompt = np.array([1, 4, 204, 286, 264, 267], dtype=np.int64)
    out = backend.generate(prompt, 8, ())
    assert out.shape == (8,) and out.dtype.kind == "i"
    assert np.array_equal(out, backend.generate(prompt, 8, ()))
    # Greedy: each token is the argmax after the prompt plus what came before.
    seq = [int(t) for t in prompt]
    for token in out[:3]:
        logits = backend.model(mx.array([seq]))
        assert int(mx.argmax(logits[0, -1]).item()) == token
        seq.append(int(token))
    stop = int(out[2])
    first = list(out).index(stop)
    assert np.array_equal(backend.generate(prompt, 8, (stop,)), out[:first])
    assert backend.generate(prompt, 0, ()).size == 0


def test_generation_and_sampling_stop_at_every_stop_id_the_model_folder_lists(trained, tiny_model_dir, tmp_path):
    """A chat model's generation_config.json lists its end-of-turn token beside its eos: the tokenizer's stop_ids
    carry both, and greedy generation and sampling end at the second one too."""
    from overnight.data.tokenizer import load_tokenizer

    from conftest import with_stop_ids

    backend = trained[0]
    prompt = np.array([1, 4, 204, 286, 264, 267], dtype=np.int64)
    eos = load_tokenizer(tiny_model_dir).eos_id
    out = backend.generate(prompt, 8, ())
    assert eos not in out.tolist()
    turn_end = int(out[2])
    stop_ids = load_tokenizer(with_stop_ids(tiny_model_dir, tmp_path / "chat", [eos, turn_end])).stop_ids
    assert stop_ids == (eos, turn_end)
    first = out.tolist().index(turn_end)
    assert np.array_equal(backend.generate(prompt, 8, stop_ids), out[:first])

    rows = backend.sample(prompt, [11, 12], 10, 1.0, 0.9, ())
    assert np.array_equal(backend.sample(prompt, [12], 10, 1.0, 0.9, ())[0], rows[1])  # each row its own seed's
    row = rows[0]
    unused = next(i for i in range(3, 500) if i not in row.tolist())
    stop = int(row[3])
    first = row.tolist().index(stop)
    stopped = backend.sample(prompt, [11], 10, 1.0, 0.9, (unused, stop))[0]
    assert np.array_equal(stopped[:first + 1], row[:first + 1]) and (stopped[first + 1:] == -1).all()


def test_memory_and_versions(trained):
    backend = trained[0]
    figures = backend.memory()
    for key in ("memory_mb", "active_mb", "peak_mb", "cache_mb", "rss_mb"):
        assert isinstance(figures[key], float) and figures[key] >= 0
    assert figures["active_mb"] > 0 and figures["peak_mb"] >= figures["active_mb"]
    if mx.device_info().get("max_recommended_working_set_size") is None:  # CPU: MLX's buffers are in the RSS
        assert "limit_mb" not in figures
        assert figures["memory_mb"] == max(figures["rss_mb"], figures["active_mb"])
    else:  # Metal: the arrays' memory, never the reclaimable cache
        assert figures["limit_mb"] > 0 and figures["memory_mb"] == figures["active_mb"]
    import mlx_lm

    assert backend.versions() == {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def test_out_of_memory_is_reported_and_leaves_the_weights(tiny_model_dir, sft_data, monkeypatch):
    steps, _ = sft_data
    backend = _backend(tiny_model_dir)
    backend.train_step(steps[0], LR)
    before = _adapter(backend)
    step_before = int(backend.optimizer.state["step"].item())

    real_update = backend._update

    def failing_update(*args):
        real_update(*args)  # the update is applied lazily; the failure surfaces as MLX would report it
        raise RuntimeError("[metal::malloc] Unable to allocate 4294967296 bytes.")

    monkeypatch.setattr(backend, "_update", failing_update)
    with pytest.raises(OutOfMemory):
        backend.train_step(steps[1], LR)
    after = _adapter(backend)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert int(backend.optimizer.state["step"].item()) == step_before

    def broken_accumulate(*args):
        raise RuntimeError("[compile] something else went wrong")

    monkeypatch.setattr(backend, "_accumulate", broken_accumulate)
    with pytest.raises(RuntimeError, match="something else"):
        backend.train_step(steps[1], LR)


def test_after_an_oom_the_step_retries_as_if_nothing_happened(tiny_model_dir, sft_data):
    steps, _ = sft_data
    reference = _backend(tiny_model_dir, dropout=0.1)
    expected = [reference.train_step(steps[i], LR) for i in range(3)]

    backend = _backend(tiny_model_dir, dropout=0.1)
    backend.train_step(steps[0], LR)
    real_update = backend._update

    def failing_update(*args):
        real_update(*args)
        raise MemoryError()

    backend._update = failing_update
    with pytest.raises(OutOfMemory):
        backend.train_step(steps[1], LR)
    assert backend._update is not failing_update  # recompiled against the restored state
    # Weights, optimizer and dropout RNG are back where they were: the retried step is the original one.
    got = [backend.train_step(steps[i], LR) for i in (1, 2)]
    assert [(r.loss, r.grad_norm) for r in got] == [(r.loss, r.grad_norm) for r in expected[1:]]


def test_a_step_without_targets_is_refused(tiny_model_dir, sft_data):
    steps, _ = sft_data
    empty = steps[0][0]
    empty = Batch(empty.input_ids, np.zeros_like(empty.loss_mask), empty.attention_mask)
    with pytest.raises(ValueError, match="no target tokens"):
        _backend(tiny_model_dir).train_step([empty], LR)


# ---------------------------------------------------------------------------
# Preference methods


def test_dpo_starts_at_log2_and_learns(tiny_model_dir):
    backend = _backend(tiny_model_dir, method="dpo")
    batch = _preference_batch(tiny_model_dir, 0, 8)
    total, pairs = backend.eval_loss(batch)
    # LoRA B starts at zero, so the policy equals the reference: every pair's loss is log 2.
    assert pairs == 8 and total / pairs == pytest.approx(np.log(2), rel=1e-5)
    results = [backend.train_step(batch.split(2), LR) for _ in range(8)]
    assert results[0].loss == pytest.approx(np.log(2), rel=1e-5)
    assert results[0].tokens == batch.num_target_tokens
    total, pairs = backend.eval_loss(batch)
    assert total / pairs < np.log(2) - 0.3


def test_orpo_is_the_trl_objective_and_learns(tiny_model_dir):
    from overnight.backend.objectives import reference_value

    backend = _backend(tiny_model_dir, method="orpo")
    batch = _preference_batch(tiny_model_dir, 0, 8)
    total, pairs = backend.eval_loss(batch)
    assert pairs == 8
    # The base (LoRA B is zero) scores every row; the objective from those numbers must be what ORPO reports.
    sft = _backend(tiny_model_dir)
    rows = [sft.eval_loss(Batch(batch.input_ids[i:i + 1], batch.loss_mask[i:i + 1], batch.attention_mask[i:i + 1]))
            for i in range(batch.num_rows)]
    expected = reference_value("orpo", [-nll for nll, _ in rows], [n for _, n in rows], beta=0.1)
    assert total / pairs == pytest.approx(expected, rel=1e-5)
    first = backend.train_step(batch.split(2), LR)  # split: the step's normalisers, not each micro-batch's
    assert first.loss == pytest.approx(expected, rel=1e-5)
    for _ in range(10):
        backend.train_step([batch], LR)
    assert backend.eval_loss(batch)[0] / pairs < expected - 1.0


def test_reward_trains_its_head_and_lora_and_a_split_step_is_the_same(tiny_model_dir):
    """reward on mlx: log 2 from the zero head, head and LoRA both train, a split step is the same step, accuracy
    above chance, eval_loss is the numpy formula over the backend's own scores."""
    from overnight.backend.objectives import pairs_ranked_right, reward_reference

    batch = _preference_batch(tiny_model_dir, 0, 4)
    whole, split = (_backend(tiny_model_dir, method="reward") for _ in range(2))
    assert "score.weight" in _adapter(whole) and _adapter(whole)["score.weight"].dtype == np.float32
    total, pairs = whole.eval_loss(batch)
    assert pairs == 4 and total / pairs == pytest.approx(np.log(2), rel=1e-6)
    before = _adapter(whole)
    losses = []
    for _ in range(12):
        a, b = whole.train_step([batch], 1e-2), split.train_step(batch.split(4), 1e-2)
        assert b.loss == pytest.approx(a.loss, rel=1e-4, abs=2e-5)  # float sums in another order
        losses.append(a.loss)
    after = _adapter(whole)
    assert not np.allclose(after["score.weight"], before["score.weight"])
    assert any(not np.allclose(after[k], before[k]) for k in after if k.endswith("lora_b"))
    assert losses[-1] < losses[0] - 0.2, losses
    scores = whole.reward_scores(batch)
    assert pairs_ranked_right(scores) > 2
    total, pairs = whole.eval_loss(batch)
    assert total / pairs == pytest.approx(reward_reference(scores), rel=1e-5)


def test_paired_batches_must_match_the_method(tiny_model_dir, sft_data):
    steps, _ = sft_data
    with pytest.raises(ValueError, match="paired"):
        _backend(tiny_model_dir, method="dpo").train_step(steps[0], LR)


# ---------------------------------------------------------------------------
# The whole program


def _train_cli(model_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "overnight", "train", "--backend", "mlx", "--model", str(model_dir),
           "--data", str(DATA), "--output", str(out), "--lora-rank", "8",
           "--set", "eval.every_steps=6", "--set", "checkpoint.every_steps=6", "--set", "train.report_every=1",
           "--set", "train.batch_size=4", "--set", "train.learning_rate=2e-3", "--set", "train.warmup_steps=2",
           "--set", "eval.max_batches=4", "--set", "eval.max_new_tokens=8", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.mark.slow
def test_cli_end_to_end(tiny_model_dir, tmp_path):
    import mlx_lm

    run_dir = tmp_path / "run"
    proc = _train_cli(tiny_model_dir, run_dir, "--max-steps", "12")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "heartbeat.json", "predictions.jsonl",
                 "adapter/adapters.safetensors", "adapter/adapter_config.json"):
        assert (run_dir / name).is_file(), name
    for step in (6, 12):
        ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
        for name in ("COMMIT", "manifest.json", "adapter/adapters.safetensors", "adapter/adapter_config.json",
                     "optimizer.safetensors", "mlx_state.json"):
            assert (ckpt / name).is_file(), f"{ckpt}/{name}"
    train = _events(run_dir, "train")
    assert [e["step"] for e in train] == list(range(1, 13))
    for key in ("loss", "loss_avg", "lr", "tokens", "tokens_per_sec", "grad_norm", "memory_mb", "elapsed_s"):
        assert key in train[-1], key
    evals = _events(run_dir, "eval")
    assert [e["step"] for e in evals] == [6, 12]
    # Step 1's loss is the base model's (LoRA B starts at zero): the adapter is clearly better on held-out rows.
    assert all(e["val_loss"] < train[0]["loss"] - 0.5 for e in evals), (train[0]["loss"], evals)
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(run_dir / "adapter"))
    assert model(mx.array([[1, 4, 204]])).shape == (1, 3, 512)


@pytest.mark.slow
def test_cli_resume_matches_the_uninterrupted_run(tiny_model_dir, tmp_path):
    import shutil

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    proc = _train_cli(tiny_model_dir, straight, "--max-steps", "12")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same run, as if the process had died right after committing step 6.
    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-00000012")
    proc = _train_cli(tiny_model_dir, crashed, "--max-steps", "12", "--auto-resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [e["from_step"] for e in _events(crashed, "resume")] == [6]

    def after_resume(run_dir, kind):
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        start = max((i for i, e in enumerate(lines) if e["event"] == "resume"), default=-1) + 1
        return [e for e in lines[start:] if e["event"] == kind]

    resumed = [(e["step"], e["loss"], e["grad_norm"]) for e in after_resume(crashed, "train")]
    original = [(e["step"], e["loss"], e["grad_norm"]) for e in _events(straight, "train") if e["step"] > 6]
    assert resumed == original and [s for s, _, _ in resumed] == list(range(7, 13))
    original_evals = [e["val_loss"] for e in _events(straight, "eval") if e["step"] > 6]
    assert [e["val_loss"] for e in after_resume(crashed, "eval")] == original_evals


def test_a_non_finite_step_is_reported_but_never_applied(tiny_model_dir, sft_data):
    steps, _ = sft_data
    backend = _backend(tiny_model_dir)
    backend.train_step(steps[0], LR)
    before = _adapter(backend)
    # Poison the frozen embedding of a token the next batch uses: its loss and gradients are NaN.
    embed = backend.model.model.embed_tokens
    token = int(steps[1][0].input_ids[0, 1])
    embed.weight = mx.where(mx.arange(embed.weight.shape[0])[:, None] == token, mx.array(float("nan")), embed.weight)
    result = backend.train_step(steps[1], LR)
    assert not np.isfinite(result.loss)
    after = _adapter(backend)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(np.isfinite(v).all() for v in after.values())


# ---------------------------------------------------------------------------
# Data parallel over mx.distributed (mlx.launch, ring backend on localhost): tests/dp_mlx_worker.py is one rank.

DP_SEED, DP_STEPS = 7, 3
MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")


def _free_ports(count: int) -> int:
    from overnight.runs.launch import free_ports

    return free_ports(count)


@pytest.fixture(scope="module")
def dp_batches(sft_data, tmp_path_factory) -> Path:
    """The whole step: 4 micro-batches of 4 rows, 2 per rank."""
    steps, _ = sft_data
    whole = steps[0] + steps[1]
    path = tmp_path_factory.mktemp("dp") / "batches.npz"
    arrays = {"count": np.array(len(whole))}
    for i, b in enumerate(whole):
        arrays.update({f"ids{i}": b.input_ids, f"mask{i}": b.loss_mask, f"attn{i}": b.attention_mask})
    np.savez(path, **arrays)
    return path


def _dp_spec(model_dir, batches, out: Path, mode: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"model": str(model_dir), "batches": str(batches), "out": str(out), "mode": mode,
                                "steps": DP_STEPS, "lr": LR, "seed": DP_SEED, "bits": 4, "dropout": 0.05,
                                "timeout_s": 3.0}))
    return spec


def _mlx_launch(spec: Path) -> subprocess.Popen:
    cmd = [str(MLX_LAUNCH), "-n", "2", "--backend", "ring", "--starting-port", str(_free_ports(2)), "--",
           sys.executable, str(ROOT / "tests" / "dp_mlx_worker.py"), str(spec)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ranks_by_hand(spec: Path) -> list[subprocess.Popen]:
    """The two ranks started the way mlx.launch starts them (MLX_RANK, MLX_HOSTFILE), without mlx.launch: it
    terminates the other ranks as soon as one exits with an error, which would hide what the survivor does."""
    first = _free_ports(2)
    hostfile = spec.with_name("hosts.json")
    hostfile.write_text(json.dumps([[f"127.0.0.1:{first}"], [f"127.0.0.1:{first + 1}"]]))
    return [subprocess.Popen([sys.executable, str(ROOT / "tests" / "dp_mlx_worker.py"), str(spec)], cwd=ROOT,
                             env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(2)]


def _one_process(model_dir, batches) -> tuple[list, dict[str, np.ndarray], MLXBackend]:
    backend = MLXBackend()
    backend.setup(dp_mlx_worker.config(model_dir, 4, 0.05), DP_SEED)
    whole = dp_mlx_worker.load_batches(str(batches))
    results = []
    for step in range(DP_STEPS):
        mine, scales = dp_mlx_worker.step_batches(whole, DP_SEED, step, 0, 1)
        results.append(backend.train_step(mine, LR))  # step_scales None: over the list itself, the same ones
        assert objectives_scales(mine) == scales
    return results, _adapter(backend), backend


def objectives_scales(batches):
    from overnight.backend import objectives

    return objectives.step_scales("sft", batches)


@pytest.fixture(scope="module")
def dp_two_processes(tiny_model_dir, dp_batches, tmp_path_factory):
    """The 2-process job (mlx.launch) and the one-process reference, run side by side."""
    out = tmp_path_factory.mktemp("dp-train")
    job = _mlx_launch(_dp_spec(tiny_model_dir, dp_batches, out, "train"))
    try:
        reference = _one_process(tiny_model_dir, dp_batches)
        stdout, stderr = job.communicate(timeout=240)
    finally:
        job.kill()
    ranks = [np.load(out / f"rank{r}.npz") for r in range(2) if (out / f"rank{r}.npz").exists()]
    assert len(ranks) == 2, f"mlx.launch exited {job.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return reference, ranks


def test_two_processes_train_as_one_with_the_whole_step(dp_two_processes):
    """4-bit base, LoRA dropout 0.05: each rank backpropagates its half of the step's micro-batches with the whole
    step's normalisers and each micro-batch's keyed dropout; one all_sum per step makes it the one-process step."""
    (results, weights, _), ranks = dp_two_processes
    for r in ranks:
        np.testing.assert_allclose(r["losses"], [x.loss for x in results], rtol=1e-5, atol=0)
        np.testing.assert_allclose(r["norms"], [x.grad_norm for x in results], rtol=1e-5, atol=0)
        for name, value in weights.items():
            np.testing.assert_allclose(r[f"w:{name}"], value, rtol=0, atol=1e-5, err_msg=name)
    # Loss, norm and weights come out of the same summed buffer on both ranks: identical, not just close.
    assert np.array_equal(ranks[0]["losses"], ranks[1]["losses"])
    assert np.array_equal(ranks[0]["norms"], ranks[1]["norms"])
    assert all(np.array_equal(ranks[0][k], ranks[1][k]) for k in ranks[0].files if k.startswith("w:"))


def test_keyed_dropout_is_on_and_depends_only_on_the_batch_key(dp_two_processes, dp_batches):
    """The control for the test above: dropout really draws (two keys give two losses), and a key gives the same
    masks whatever ran before it (the same key twice gives the same loss)."""
    (_, _, backend), _ = dp_two_processes
    batch = dp_mlx_worker.load_batches(str(dp_batches))[0]
    scales = (mx.array(1.0 / batch.num_target_tokens), mx.array(0.0))
    backend._set_training(True)

    def loss(key):
        mx.random.seed(key)
        value, _ = backend._accumulate(None, *scales, *backend._device_batch(batch))
        return value.item()

    first = loss(11)
    assert loss(12) != first
    loss(13)
    assert loss(11) == first
    backend._set_training(False)
    assert backend.eval_loss(batch) == backend.eval_loss(batch)


def test_out_of_memory_on_one_rank_raises_on_both_with_the_weights_untouched(tiny_model_dir, dp_batches,
                                                                           dp_two_processes, tmp_path):
    """Rank 1 runs out of memory in its backward pass at step 1: its flag in the step's all-reduce makes both ranks
    raise OutOfMemory before anything is applied; the step taken again then gives the uninterrupted job."""
    out = tmp_path / "oom"
    job = _mlx_launch(_dp_spec(tiny_model_dir, dp_batches, out, "oom"))
    try:
        stdout, stderr = job.communicate(timeout=240)
    finally:
        job.kill()
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()]
    assert len(reports) == 2, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    assert [r["oom"].split(":")[0] for r in reports] == ["OutOfMemory", "OutOfMemory"], reports
    assert all(r["unchanged"] for r in reports), reports
    _, uninterrupted = dp_two_processes
    for r in range(2):
        got = np.load(out / f"rank{r}.npz")
        assert np.array_equal(got["losses"], uninterrupted[r]["losses"])
        assert all(np.array_equal(got[k], uninterrupted[r][k]) for k in got.files if k.startswith("w:"))


def test_a_dead_peer_is_peer_lost_and_a_silent_one_ends_the_job_after_the_timeout(tiny_model_dir, dp_batches,
                                                                                 tmp_path):
    """What MLX does: a peer that died (SIGKILL) closes its sockets, and the ring's all_sum raises at once ("connection
    to a peer was lost"): PeerLost. A peer that is alive but never answers leaves all_sum waiting forever: the
    watchdog ends the process after the collective timeout (3 s here) with the message and exit code 1."""
    dead = _ranks_by_hand(_dp_spec(tiny_model_dir, dp_batches, tmp_path / "dead", "dead"))
    hung = _ranks_by_hand(_dp_spec(tiny_model_dir, dp_batches, tmp_path / "hang", "hang"))
    try:
        assert dead[0].wait(240) == 0, dead[0].communicate()[1][-3000:]
        assert dead[1].wait(60) == -9
        report = json.loads((tmp_path / "dead" / "rank0.json").read_text())
        assert report["peer"].startswith("PeerLost: another process of this data-parallel job stopped answering "
                                         "or died (the gradient all-reduce on rank 0 of 2)"), report
        assert report["noticed_after_s"] < 3.0, report

        code = hung[0].wait(240)
        ended = time.time()
        stderr = hung[0].communicate()[1]
        assert code == 1, stderr[-3000:]
        assert ("error: no answer from the other processes of this data-parallel job for 3 s (the gradient "
                "all-reduce on rank 0 of 2): one of them died or stopped; the last committed checkpoint is intact, "
                "continue with: overnight train ... --auto-resume") in stderr, stderr[-3000:]
        waited = ended - float((tmp_path / "hang" / "rank0.waiting").read_text())
        assert 3.0 <= waited < 8.0, waited  # the watchdog looks once a second
        assert not (tmp_path / "hang" / "rank0.json").exists()
        assert hung[1].poll() is None  # the silent rank is still there: only the watchdog ended rank 0
    finally:
        for p in dead + hung:
            p.kill()
            p.communicate()


def test_an_oom_in_the_update_of_a_job_ends_it_instead_of_splitting_one_rank(tiny_model_dir, sft_data):
    """After the all-reduce the ranks cannot agree on a retry any more: an OOM in the optimizer update of a job is
    PeerLost (the run ends, --auto-resume continues it), with this rank's weights restored; an OOM before it is
    OutOfMemory through the flag. One process here, its 'job' a stand-in whose collective is the identity."""
    from overnight.backend import PeerLost
    from overnight.backends.mlx_backend import MLXCollective

    steps, _ = sft_data
    backend = _backend(tiny_model_dir)
    world = MLXCollective(mx.distributed.init(), timeout_s=60.0)
    world.size = 2
    backend._world = world
    backend.train_step(steps[0], LR)
    before = _adapter(backend)

    def broken_accumulate(*args):
        raise RuntimeError(dp_mlx_worker.OOM_MESSAGE)

    real_accumulate, backend._accumulate = backend._accumulate, broken_accumulate
    with pytest.raises(OutOfMemory, match="out of memory on a process of this data-parallel job"):
        backend.train_step(steps[1], LR)
    backend._accumulate = real_accumulate
    real_update = backend._update

    def failing_update(*args):
        real_update(*args)
        raise RuntimeError(dp_mlx_worker.OOM_MESSAGE)

    backend._update = failing_update
    with pytest.raises(PeerLost, match="out of memory in the optimizer update on rank 0 of 2"):
        backend.train_step(steps[1], LR)
    after = _adapter(backend)
    assert all(np.array_equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------- memory on Metal, without a Mac


@pytest.mark.parametrize("text, oom", [
    ("[metal::malloc] Attempting to allocate 18253611008 bytes which is greater than the maximum allowed buffer "
     "size of 17179869184 bytes.", True),
    ("[metal::malloc] Resource limit (499000) exceeded.", True),
    ("[malloc] Unable to allocate 1073741824 bytes.", True),
    ("[METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
     True),
    ("[compile] something else went wrong", False),
    ("[reshape] Cannot reshape array of size 6 into shape (4,).", False),
])
def test_allocator_errors_raised_as_exceptions_are_out_of_memory(text, oom):
    from overnight.backend import PeerLost
    from overnight.backends.mlx_backend import _is_oom

    assert _is_oom(RuntimeError(text)) is oom
    assert not _is_oom(PeerLost("out of memory on a process of this data-parallel job"))


def test_metal_memory_watches_active_memory_and_caps_the_cache(monkeypatch):
    """On Metal (a recommended working set): the cache is capped to a quarter of it, the wired limit is set as
    before, and memory_mb is the active memory alone, so a full cache never looks like a leak."""
    calls = {}
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 64 * 2**30})
    for name in ("set_memory_limit", "set_wired_limit", "set_cache_limit"):
        monkeypatch.setattr(mx, name, lambda value, name=name: calls.setdefault(name, value))
    backend = MLXBackend()
    details: dict = {}
    backend._set_memory_limit(details)
    assert calls == {"set_memory_limit": 64 * 2**30, "set_wired_limit": 64 * 2**30, "set_cache_limit": 16 * 2**30}
    assert details["cache_limit_mb"] == 16 * 1024 and details["wired_limit_mb"] == 64 * 1024
    monkeypatch.setattr(mx, "get_active_memory", lambda: 3000 * 2**20)
    monkeypatch.setattr(mx, "get_cache_memory", lambda: 9000 * 2**20)
    figures = backend.memory()
    assert figures["memory_mb"] == 3000 and figures["cache_mb"] == 9000 and figures["limit_mb"] == 64 * 1024


# ---------------------------------------------------------------------------
# The output head on target positions, in chunks


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo", "grpo"])
def test_the_head_in_chunks_gives_the_full_logits_values(tiny_model_dir, sft_data, method):
    """Target slots scored 16 at a time (each chunk recomputed in the backward) equal the model's own full logits taken at the
    slots: loss and gradients of every method, on the 4-bit default with dropout, to 1e-5."""
    batch = _preference_batch(tiny_model_dir, 0, 4) if method in ("dpo", "orpo") else _merge(sft_data[0][0])
    cfg = _config(tiny_model_dir, bits=4, dropout=0.1, method=method)
    cfg.grpo.beta = 0.05
    if method == "grpo":
        batch.advantages = np.random.default_rng(0).normal(size=batch.num_rows).astype(np.float32)
    backend = MLXBackend()
    backend.setup(cfg, 0)
    assert backend._head is not None
    backend._chunk_rows = 16
    assert int(batch.loss_mask[:, 1:].sum()) > 2 * 16  # several chunks
    backend._build_steps()
    scales = (mx.array(0.01, dtype=mx.float32), mx.array(0.25, dtype=mx.float32))
    figures = {}
    for way in ("chunks", "full"):
        if way == "full":
            backend._head = None
            backend._build_steps()
        backend._set_training(True)
        mx.random.seed(5)
        loss, grads = backend._accumulate(None, *scales, *backend._device_batch(batch))
        loss = loss[0] if isinstance(loss, (tuple, list)) else loss
        figures[way] = (float(loss.item()), {k: np.array(v) for k, v in tree_flatten(grads)})
    assert figures["chunks"][0] == pytest.approx(figures["full"][0], rel=1e-5, abs=1e-6)
    for key, full in figures["full"][1].items():
        np.testing.assert_allclose(figures["chunks"][1][key], full, rtol=1e-4, atol=1e-6)


def test_the_head_probe_finds_a_plain_head_and_refuses_a_scaled_one(tiny_model_dir):
    from mlx_lm.models import llama

    from overnight.backends.mlx_backend import find_plain_head

    backend = _backend(tiny_model_dir)
    head, vocab = find_plain_head(backend.model)
    assert head is not None and vocab == backend.model.args.vocab_size

    class ScaledLogits(llama.Model):  # logits beyond the bare head, as Cohere's scale or Granite's divisor
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return super().__call__(inputs, cache=cache, input_embeddings=input_embeddings) * 0.5

    backend.model.__class__ = ScaledLogits
    assert find_plain_head(backend.model)[0] is None


def test_bf16_keeps_every_floating_weight_and_the_stream_in_bf16(tiny_model_dir, sft_data):
    batch = sft_data[0][0][0]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = _config(tiny_model_dir, bits=4)
        cfg.model.dtype = dtype
        backend = MLXBackend()
        backend.setup(cfg, 0)
        frozen = {k: v.dtype for k, v in tree_flatten(backend.model.parameters())
                  if "lora" not in k and mx.issubdtype(v.dtype, mx.floating)}
        assert set(frozen.values()) == {getattr(mx, dtype)}, frozen
        hidden = backend.model.model(mx.array(batch.input_ids[:, :-1].astype(np.int32)))
        assert hidden.dtype == getattr(mx, dtype)
        losses[dtype] = backend.train_step([batch], 1e-3).loss
    assert abs(losses["bfloat16"] - losses["float32"]) < 2e-2, losses


def test_the_head_chunks_are_evaluated_one_at_a_time():
    """Peak memory of the chunked head's loss and gradient does not grow with the number of chunks: one chunk's
    logits at a time, forward and backward (MLX evaluates independent branches together unless told otherwise)."""
    import mlx.nn as nn

    from overnight.backends.mlx_backend import _chunked_head_logps, _logps_of

    mx.random.seed(0)
    hidden_size, vocab, chunk_rows = 32, 16384, 64  # one chunk's fp32 logits: 4 MiB
    head = nn.Linear(hidden_size, vocab, bias=False)
    head.freeze()
    mx.eval(head.parameters())
    peaks = {}
    for rows in (4 * chunk_rows, 16 * chunk_rows):
        hidden = mx.random.normal((rows, hidden_size))
        targets = mx.random.randint(0, vocab, (rows,))
        mx.eval(hidden, targets)
        logps = _chunked_head_logps(head, chunk_rows)
        loss_and_grad = mx.value_and_grad(lambda h: logps(h, targets).sum())
        mx.clear_cache()
        mx.reset_peak_memory()
        loss, grad = loss_and_grad(hidden)
        mx.eval(loss, grad)
        peaks[rows] = mx.get_peak_memory()
        full_loss, full_grad = mx.value_and_grad(lambda h: _logps_of(head(h), targets).sum())(hidden)
        assert loss.item() == pytest.approx(full_loss.item(), rel=1e-5)
        np.testing.assert_allclose(np.array(grad), np.array(full_grad), rtol=1e-4, atol=1e-6)
    chunk_logits = chunk_rows * vocab * 4
    # 12 more chunks evaluated side by side would add 12 x 4 MiB and more
    assert peaks[16 * chunk_rows] - peaks[4 * chunk_rows] < 2 * chunk_logits, peaks
