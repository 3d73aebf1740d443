"""DoRA (lora.use_dora) on the default path (4-bit base, dropout on), as a user runs it: each backend's layer computes
src/backend/lora_init.py's DORA with its own dequantized weight, a new DoRA adapter is the base model in every compute
dtype, and what each backend saves scores the same in PEFT as it did in training.

The two backends quantize differently by design (bitsandbytes nf4, mlx affine) and draw dropout from different RNGs,
so the cross-backend loss parity (tests/test_parity.py) runs full precision without dropout; on the default path
each backend is held here to the one definition instead, with its own dequantized weight and a fixed dropout mask
(tests/test_mlx_backend.py holds the mlx layer so).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import has

TORCH = pytest.mark.skipif(not has("torch", "transformers", "peft", "bitsandbytes"), reason="needs the torch backend")
MLX = pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="needs the mlx backend")


def torch_backend(model_dir: Path, bits: int, dora: bool = True, **over):
    from test_torch_backend import make_backend

    return make_backend(model_dir, bits=bits, lora__use_dora=dora, **over)[0]


def torch_dequantized(base_layer):
    """The base weight the forward uses: bitsandbytes' dequantized nf4 on a 4-bit base."""
    if type(base_layer).__name__ == "Linear4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(base_layer.weight.data, base_layer.weight.quant_state)
    return base_layer.weight


def torch_dora_layers(backend) -> dict[str, object]:
    return {name: module for name, module in backend._model.named_modules()
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector}


# --------------------------------------------------------------------------- torch


@TORCH
@pytest.mark.torch
def test_torch_dora_layer_on_a_4bit_base_with_dropout_computes_the_one_definition(tiny_model_dir):
    """PEFT's DoRA on a bitsandbytes 4-bit layer, as the torch backend builds it (dropout on): the magnitude starts as
    the row norms of the dequantized nf4 weight, and the layer's output in training (dropout mask fixed) and in eval
    is lora_init.dora_forward's with that weight."""
    import torch

    from overnight.backend import lora_init

    backend = torch_backend(tiny_model_dir, bits=4, lora__dropout=0.5)
    layers = torch_dora_layers(backend)
    assert len(layers) == 8  # 2 blocks x the default targets q/k/v/o
    for name, layer in layers.items():
        assert type(layer.base_layer).__name__ == "Linear4bit", name
        weight = torch_dequantized(layer.base_layer).float().numpy()
        assert np.allclose(layer.lora_magnitude_vector["default"].weight.detach().numpy(),
                           lora_init.dora_magnitude(weight), rtol=1e-6, atol=0), name

    layer = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    rng = np.random.default_rng(0)
    out_f, in_f = layer.base_layer.out_features, layer.base_layer.in_features
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.from_numpy(rng.normal(0, 0.3, (out_f, 8)).astype(np.float32)))
        layer.lora_magnitude_vector["default"].weight.mul_(
            torch.from_numpy(rng.uniform(0.5, 1.5, out_f).astype(np.float32)))
    weight = torch_dequantized(layer.base_layer).float().numpy()
    params = [layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy(),
              layer.lora_magnitude_vector["default"].weight.detach().numpy()]
    x = rng.normal(0, 1, (3, in_f)).astype(np.float32)
    mask = (rng.uniform(size=(3, in_f)) > 0.5).astype(np.float32) * 2.0

    def reference(dropped):
        return lora_init.dora_forward(x, dropped, weight, None, *params, 2.0)

    with torch.no_grad():
        masked = _peft_dora_with_mask(layer, x, mask)
    assert np.allclose(masked, reference(x * mask), rtol=1e-4, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        assert np.allclose(layer(torch.from_numpy(x)).numpy(), reference(x), rtol=1e-4, atol=1e-5)


def _peft_dora_with_mask(layer, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The layer's training forward with its LoRA dropout replaced by one that applies ``mask`` (a module that is not
    nn.Identity: PEFT then takes the training branch, W D(x) from the dropped input)."""
    import torch

    class FixedMask(torch.nn.Module):
        def forward(self, inputs):
            return inputs * torch.from_numpy(mask).to(inputs.dtype)

    dropout = layer.lora_dropout["default"]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p > 0
    layer.lora_dropout["default"] = FixedMask()
    layer.train()
    try:
        return layer(torch.from_numpy(x)).numpy()
    finally:
        layer.lora_dropout["default"] = dropout


@TORCH
@pytest.mark.torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [0, 4], ids=["float", "4-bit"])
def test_a_new_torch_dora_adapter_is_the_base_in_every_compute_dtype(tiny_model_dir, bits, dtype):
    """m starts as the float32 row norms of the (dequantized) base weight, as on mlx, so the first forward's
    m / ||W + s·B·A|| is 1 and a new DoRA adapter is the base, as a new LoRA one is. bfloat16 is the GPU's compute
    dtype (model.dtype auto on CUDA): PEFT alone stores the norm rounded to bfloat16 there, so every row started
    scaled by up to 2^-9 off the base and off the mlx backend's start."""
    import torch

    from overnight.backend import lora_init
    from test_torch_backend import sft_batch

    batch = sft_batch(tiny_model_dir)
    dora = torch_backend(tiny_model_dir, bits, lora__dropout=0.05, model__dtype=dtype)
    lora = torch_backend(tiny_model_dir, bits, dora=False, lora__dropout=0.05, model__dtype=dtype)
    for name, layer in torch_dora_layers(dora).items():
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.dtype == torch.float32, name
        weight = torch_dequantized(layer.base_layer).float().numpy()
        assert np.allclose(magnitude.detach().numpy(), lora_init.dora_magnitude(weight), rtol=1e-6, atol=0), name
    assert dora.eval_loss(batch) == lora.eval_loss(batch)
    assert np.array_equal(dora.token_logps(batch), lora.token_logps(batch))


@TORCH
@pytest.mark.torch
def test_a_torch_dora_adapter_trained_on_the_default_path_loads_in_peft_with_the_same_logits(tiny_model_dir,
                                                                                             tmp_path):
    """Three steps on a 4-bit base with dropout on, saved: PeftModel.from_pretrained on the same 4-bit base scores
    every target token as the backend does, the magnitudes included (use_dora in the config, moved off their
    start)."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from test_torch_backend import sft_batch

    batch = sft_batch(tiny_model_dir)
    backend = torch_backend(tiny_model_dir, bits=4, lora__dropout=0.1)
    start = {n: l.lora_magnitude_vector["default"].weight.detach().clone() for n, l in torch_dora_layers(backend).items()}
    for _ in range(3):
        backend.train_step([batch], 1e-2)
    backend.save(tmp_path)
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    magnitudes = [k for k in saved if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 8
    moved = [n for n, l in torch_dora_layers(backend).items()
             if not torch.equal(start[n], l.lora_magnitude_vector["default"].weight.detach())]
    assert len(moved) == 8

    ours = backend.token_logps(batch)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=backend._quantization_config(4))
    for module in base.modules():  # the one nf4 layout training used (torch_backend._keep_4bit_weights_unpacked)
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.from_numpy(batch.input_ids.astype(np.int64))
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64))).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].numpy()
    theirs = np.zeros_like(ours)
    theirs[:, 1:] = logps * (batch.loss_mask[:, 1:] > 0)
    targets = batch.loss_mask > 0
    print(f"torch DoRA adapter in PEFT: max |logp diff| {np.abs(ours - theirs)[targets].max():.2e}")
    assert np.allclose(ours[targets], theirs[targets], atol=1e-4)
    assert not np.allclose(ours, backend.token_logps(batch, adapter=False), atol=1e-3)  # the adapter did something


# --------------------------------------------------------------------------- mlx


@MLX
@pytest.mark.mlx
def test_mlx_dora_magnitudes_start_as_the_dequantized_4bit_weights_row_norms_and_the_start_is_the_base(
        tiny_model_dir):
    """On the mlx backend's 4-bit model (dropout on), every DoRA layer's m is dora_magnitude of its own dequantized
    weight (float32), and the new adapter scores as the base (a LoRA adapter with B = 0)."""
    import mlx.core as mx

    from overnight.backend import lora_init
    from overnight.backends.mlx_backend import _dora_layer_class
    from test_mlx_backend import _backend, _batch, _chat_pairs

    batch = _batch(_chat_pairs(tiny_model_dir, Path(__file__).resolve().parents[1] / "data" / "val.jsonl", 8))
    dora = _backend(tiny_model_dir, bits=4, dropout=0.05, use_dora=True)
    lora = _backend(tiny_model_dir, bits=4, dropout=0.05)
    layers = [(n, m) for n, m in dora.model.named_modules() if isinstance(m, _dora_layer_class())]
    assert len(layers) == 14
    for name, layer in layers:
        assert layer._is_quantized(), name
        weight = np.array(layer._dequantized_weight().astype(mx.float32))
        assert np.allclose(np.array(layer.m), lora_init.dora_magnitude(weight), rtol=1e-6, atol=0), name
    assert dora.eval_loss(batch) == pytest.approx(lora.eval_loss(batch), rel=1e-6)


@MLX
@TORCH
@pytest.mark.mlx
@pytest.mark.torch
def test_an_mlx_dora_run_trained_with_dropout_converts_to_peft_and_scores_the_same(tiny_model_dir, tmp_path):
    """An mlx DoRA adapter trained with dropout on (full-precision base: the two backends' 4-bit weights differ by
    design), converted with convert-adapter: PEFT scores every target token as the mlx backend does."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from overnight.backend.adapter_formats import convert_adapter
    from test_mlx_backend import _backend, _batch, _chat_pairs

    data = Path(__file__).resolve().parents[1] / "data"
    train = _chat_pairs(tiny_model_dir, data / "train.jsonl", 16)
    batch = _batch(_chat_pairs(tiny_model_dir, data / "val.jsonl", 8))
    backend = _backend(tiny_model_dir, bits=0, dropout=0.1, use_dora=True, targets=["q_proj", "v_proj", "down_proj"])
    for i in range(0, 16, 4):
        backend.train_step([_batch(train[i:i + 4])], 1e-2)
    backend.save(tmp_path / "mlx")
    peft_dir = convert_adapter(tmp_path / "mlx" / "adapter", "peft", tmp_path / "peft", base=str(tiny_model_dir),
                               say=lambda m: None)
    ours = backend.token_logps(batch)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                                      str(peft_dir)).eval()
    ids = torch.from_numpy(batch.input_ids.astype(np.int64))
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64))).logits.float()
    theirs = np.zeros_like(ours)
    theirs[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0].numpy()
    targets = batch.loss_mask > 0
    targets[:, 0] = False
    print(f"mlx DoRA adapter in PEFT: max |logp diff| {np.abs(ours - theirs)[targets].max():.2e}")
    assert np.allclose(ours[targets], theirs[targets], atol=1e-4)
    assert not np.allclose(ours[targets], backend.token_logps(batch, adapter=False)[targets], atol=1e-3)


@TORCH
@pytest.mark.torch
def test_dora_on_an_8bit_base_on_the_cpu_is_refused_by_name_not_a_traceback_at_the_first_step(tiny_model_dir):
    """bitsandbytes' int8 layer on the CPU cannot be dequantized for DoRA's norm once it has run (PEFT's forward raised
    AttributeError at the first train or eval step): refused at setup, naming the keys, exit 2's ConfigError."""
    import torch

    from overnight.config import ConfigError

    if torch.cuda.is_available():
        pytest.skip("the refusal is for the CPU")
    with pytest.raises(ConfigError, match=r"lora.use_dora.*8-bit.*model.quantization.bits=4"):
        torch_backend(tiny_model_dir, bits=8)
