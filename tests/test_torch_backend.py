"""The PyTorch backend for real on CPU (plain LoRA, bitsandbytes 4-bit and 8-bit); CUDA-only paths behind `cuda`."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import has

pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="needs torch, transformers and peft"),
]

SENTENCES = [
    "The capital of France is Paris.",
    "The capital of Japan is Tokyo.",
    "3 plus 4 is 7. 8 plus 4 is 12.",
    "The opposite of hot is cold.",
    "Reverse the words: red blue green",
    "The cat sat quietly near the garden.",
    "Rain fell all morning and the sun was warm.",
    "What is the capital of Austria? Vienna.",
]
PREFERENCES = [
    ("What is 7 plus 10?\n", "7 plus 10 is 17.", "7 plus 10 is 15."),
    ("What is the capital of Cuba?\n", "The capital of Cuba is Havana.", "The capital of Cuba is Oslo."),
    ("What is 8 plus 4?\n", "8 plus 4 is 12.", "8 plus 4 is 10."),
    ("Opposite of up?\n", "The opposite of up is down.", "The opposite of up is left."),
]


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def make_config(model_dir: Path, bits: int = 0, **overrides):
    from overnight.config import Config, set_dotted

    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.model.quantization.bits = bits
    cfg.lora.rank = 8
    cfg.lora.alpha = 16.0
    cfg.lora.dropout = 0.0
    cfg.lora.layers = -1
    for key, value in overrides.items():
        set_dotted(cfg, key.replace("__", "."), json.dumps(value))
    return cfg


def make_backend(model_dir: Path, bits: int = 0, seed: int = 0, **overrides):
    from overnight.backends.torch_backend import TorchBackend

    backend = TorchBackend()
    info = backend.setup(make_config(model_dir, bits, **overrides), seed)
    return backend, info


def tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def sft_batch(model_dir: Path, sentences=SENTENCES, pad_id: int = 0):
    """Right-padded rows whose every token after the first is a target."""
    rows = [enc.ids for enc in tokenizer(model_dir).encode_batch(list(sentences))]
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    loss_mask = np.zeros((len(rows), width), np.float32)
    attention = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        attention[i, : len(row)] = 1
        loss_mask[i, 1: len(row)] = 1
    from overnight.backend import Batch

    return Batch(ids, loss_mask, attention, pad_id)


def preference_batch(model_dir: Path, pad_id: int = 0, preferences=PREFERENCES):
    """Rows 2i / 2i+1 = prompt + chosen / prompt + rejected; only the response tokens are targets."""
    from overnight.backend import Batch

    tok = tokenizer(model_dir)
    rows, starts = [], []
    for prompt, chosen, rejected in preferences:
        prompt_ids = tok.encode(prompt).ids
        for answer in (chosen, rejected):
            rows.append(prompt_ids + tok.encode(answer, add_special_tokens=False).ids)
            starts.append(len(prompt_ids))
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    loss_mask = np.zeros((len(rows), width), np.float32)
    attention = np.zeros((len(rows), width), np.int32)
    for i, (row, start) in enumerate(zip(rows, starts)):
        ids[i, : len(row)] = row
        attention[i, : len(row)] = 1
        loss_mask[i, start: len(row)] = 1
    return Batch(ids, loss_mask, attention, pad_id, paired=True)


def lora_weights(backend) -> dict[str, np.ndarray]:
    return {name: p.detach().cpu().float().numpy().copy()
            for name, p in backend._model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("bits", [0, 4])
def test_training_lowers_loss(tiny_model_dir, bits):
    backend, info = make_backend(tiny_model_dir, bits=bits)
    assert 0 < info.trainable_params < info.total_params
    batch = sft_batch(tiny_model_dir)
    losses = [backend.train_step([batch], 1e-2).loss for _ in range(30)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_step_result_is_token_weighted_and_eval_agrees(tiny_model_dir):
    backend, _ = make_backend(tiny_model_dir)
    batch = sft_batch(tiny_model_dir)
    total, tokens = backend.eval_loss(batch)
    assert tokens == batch.num_target_tokens
    result = backend.train_step([batch], 1e-3)
    assert result.tokens == batch.num_target_tokens
    # Same weights, no dropout: the step's loss is the evaluated loss per target token.
    assert result.loss == pytest.approx(total / tokens, rel=1e-6)
    assert result.grad_norm > 0


def test_splitting_into_micro_batches_gives_the_same_update(tiny_model_dir):
    batch = sft_batch(tiny_model_dir)
    whole, _ = make_backend(tiny_model_dir)
    split, _ = make_backend(tiny_model_dir)
    # Uneven rows per part: a plain mean of per-micro-batch means would differ from the token-weighted loss.
    parts = batch.split(3)
    assert len({p.num_target_tokens for p in parts}) > 1
    for _ in range(3):
        a = whole.train_step([batch], 1e-2)
        b = split.train_step(parts, 1e-2)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4)
        assert b.tokens == a.tokens
    # Adam divides by sqrt(v), which magnifies float rounding on tiny gradients; each step moves weights ~1e-2.
    for name, value in lora_weights(whole).items():
        np.testing.assert_allclose(lora_weights(split)[name], value, rtol=1e-3, atol=1e-5)


def test_gradients_are_clipped_to_max_grad_norm(tiny_model_dir, monkeypatch):
    import torch

    backend, _ = make_backend(tiny_model_dir, train__max_grad_norm=1e-3)
    batch = sft_batch(tiny_model_dir)
    backend.train_step([batch], 1e-2)  # B moves off zero, so A gets gradients too
    before = lora_weights(backend)
    seen = {}
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen["norm"] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in backend._params])).item()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    result = backend.train_step([batch], 1e-2)
    assert result.grad_norm > 1e-2  # reported before clipping
    assert seen["norm"] == pytest.approx(1e-3, rel=1e-3)  # applied after clipping
    assert any(not np.array_equal(before[k], v) for k, v in lora_weights(backend).items())


def test_same_seed_same_losses_other_seed_other_init(tiny_model_dir):
    batch = sft_batch(tiny_model_dir)
    runs = []
    for seed in (3, 3, 4):
        backend, _ = make_backend(tiny_model_dir, seed=seed, lora__dropout=0.1)
        runs.append([backend.train_step([batch], 1e-2).loss for _ in range(4)])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_lora_layers_targets_and_scale(tiny_model_dir):
    backend, info = make_backend(tiny_model_dir, lora__layers=1, lora__targets=["q_proj", "v_proj"])
    names = [n for n, p in backend._model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    assert info.details["lora_layers"] == [1]
    from peft.tuners.lora import LoraLayer

    scales = {m.scaling["default"] for m in backend._model.modules() if isinstance(m, LoraLayer)}
    assert scales == {2.0}  # alpha / rank = 16 / 8


def test_unknown_target_is_a_config_error(tiny_model_dir):
    from overnight.config import ConfigError

    with pytest.raises(ConfigError, match="lora.targets"):
        make_backend(tiny_model_dir, lora__targets=["no_such_proj"])


@pytest.mark.parametrize("before_loading", [True, False], ids=["on-the-skeleton", "on-the-loaded-model"])
def test_every_lora_target_must_match_in_the_blocks_that_get_lora(tiny_model_dir, monkeypatch, before_loading):
    """PEFT errs only when no target matches at all: a typo beside a good target trained the good one alone, and
    lm_head (outside the blocks) got LoRA on torch while mlx refused it. Now both refuse, in the same words: before
    the weights load, and again on the loaded model (for an architecture the meta device cannot build)."""
    from overnight.backends.torch_backend import TorchBackend
    from overnight.config import ConfigError

    if not before_loading:
        monkeypatch.setattr(TorchBackend, "_check_lora_targets_before_loading", lambda self, model_dir: None)
    with pytest.raises(ConfigError, match=r"'lora.targets': vproj matches no module of the blocks that get LoRA "
                                          r"\(block 1\); the modules there are: mlp.down_proj.*did you mean v_proj"):
        make_backend(tiny_model_dir, lora__layers=1, lora__targets=["q_proj", "vproj"])
    with pytest.raises(ConfigError, match="lm_head matches no module"):
        make_backend(tiny_model_dir, lora__targets=["q_proj", "lm_head"])


def test_a_misspelt_lora_target_exits_2_on_the_default_4bit_path(tiny_model_dir, tmp_path):
    """What the user runs: `overnight train --set lora.targets=[q_proj, vproj]` with the defaults (4-bit QLoRA)."""
    import os
    import subprocess
    import sys

    from conftest import DATA_DIR, ROOT

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "overnight", "train", "--backend", "torch", "--model", str(tiny_model_dir),
         "--data", str(DATA_DIR), "--output", str(out), "--max-steps", "2", "--quiet",
         "--set", "lora.targets=[q_proj, vproj]"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'lora.targets': vproj matches no module" in result.stderr and "self_attn.v_proj" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_grad_checkpointing_is_on_and_changes_nothing(tiny_model_dir):
    """With LoRA dropout on, the recomputed forward must replay the forward's masks: same losses, same
    gradient norms, same weights with checkpointing on or off (4-bit, as users run it)."""
    batch = sft_batch(tiny_model_dir)
    runs, weights = [], []
    for flag in (False, True):
        backend, info = make_backend(tiny_model_dir, bits=4, lora__dropout=0.1, model__grad_checkpoint=flag)
        # what transformers' is_activation_checkpointing reads (5.17, the GPU image's, has no such property)
        blocks = backend._model.base_model.model.modules()
        assert any(getattr(m, "gradient_checkpointing", False) for m in blocks) == flag
        runs.append([(r.loss, r.grad_norm) for r in (backend.train_step([batch], 1e-2) for _ in range(3))])
        weights.append(lora_weights(backend))
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6)
    for name, value in weights[0].items():
        np.testing.assert_allclose(weights[1][name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    no_dropout, _ = make_backend(tiny_model_dir, bits=4)
    assert abs(no_dropout.train_step([batch], 1e-2).grad_norm - runs[0][0][1]) > 1e-4 * runs[0][0][1]


# --------------------------------------------------------------------------- quantization


def test_4bit_layers_are_really_nf4_double_quant(tiny_model_dir):
    import bitsandbytes as bnb
    import torch

    backend, info = make_backend(tiny_model_dir, bits=4)
    linear4 = [m for m in backend._model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # 2 blocks x (q, k, v, o, gate, up, down); lm_head stays full precision.
    assert len(linear4) == 14
    for module in linear4:
        weight = module.weight
        assert weight.dtype == torch.uint8
        assert weight.quant_state.quant_type == "nf4"
        assert weight.quant_state.nested  # double quantization: the absmax scales are quantized too
        out_features, in_features = weight.quant_state.shape
        assert weight.numel() * 2 == out_features * in_features  # two 4-bit values per byte
    assert "nf4" in info.details["quantization"]
    # The adapters train in fp32 beside the frozen 4-bit weights.
    assert {p.dtype for p in backend._params} == {torch.float32}


def test_an_earlier_eval_does_not_change_4bit_training(tiny_model_dir):
    """bitsandbytes repacks a Linear4bit weight the first time it runs in eval mode without grad on CPUs with
    AVX512-BF16, after which training rounds differently (and backprops through an unregistered kernel). A
    resumed process re-runs steps without the evals the first process ran, so this must not matter. (On a CPU
    without AVX512-BF16 bitsandbytes never repacks and this passes trivially.)"""
    batch = sft_batch(tiny_model_dir)
    evaluated, _ = make_backend(tiny_model_dir, bits=4)
    fresh, _ = make_backend(tiny_model_dir, bits=4)
    evaluated.eval_loss(batch)
    evaluated.generate(batch.input_ids[0, :4], 3, ())
    after_eval = [evaluated.train_step([batch], 1e-2).loss for _ in range(3)]
    assert [fresh.train_step([batch], 1e-2).loss for _ in range(3)] == after_eval
    for name, value in lora_weights(fresh).items():
        assert np.array_equal(lora_weights(evaluated)[name], value), name


def test_8bit_path_trains(tiny_model_dir):
    import bitsandbytes as bnb

    backend, _ = make_backend(tiny_model_dir, bits=8)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in backend._model.modules())
    batch = sft_batch(tiny_model_dir)
    losses = [backend.train_step([batch], 1e-2).loss for _ in range(10)]
    assert losses[-1] < losses[0]


@pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")
def test_a_folder_saved_quantized_is_said_as_it_is_and_computes_in_the_configs_dtype(tiny_model_dir, tmp_path):
    """A bitsandbytes 4-bit upload (config.json's quantization_config) loads 4-bit whatever model.quantization says:
    the banner read "not quantized" (bits 0) or "int8" (bits 8) over 4-bit layers, and the folder's
    bnb_4bit_compute_dtype, not model.dtype, ran every 4-bit matmul."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    saved = tmp_path / "tiny-bnb-4bit"
    quantized = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), device_map={"": "cpu"}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    quantized.save_pretrained(str(saved))
    for extra in tiny_model_dir.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            shutil.copy(extra, saved / extra.name)
    for bits in (0, 8):
        backend, info = make_backend(saved, bits=bits)
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in backend._model.modules())
        assert info.details["quantization"] == ("pre-quantized bitsandbytes nf4 (saved in the model folder), used as "
                                                "is")
        assert info.details["quantization_note"].startswith(
            f"model.quantization.bits={bits} is not applied: {saved} is saved quantized (bitsandbytes nf4)")
    backend, info = make_backend(saved, bits=4, model__dtype="bfloat16")
    assert "quantization_note" not in info.details
    layers = [m for m in backend._model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {torch.bfloat16}
    assert math.isfinite(backend.train_step([sft_batch(tiny_model_dir)], 1e-2).loss)


def test_settings_bitsandbytes_and_the_cpu_do_not_use_are_said(tiny_model_dir):
    """model.quantization.group_size on an int8 base and train.deterministic=false on the CPU changed nothing
    without a word (the 4-bit group size note was the only one)."""
    _, info = make_backend(tiny_model_dir, bits=8, model__quantization__group_size=32, train__deterministic=False)
    assert info.details["note"] == ("model.quantization.group_size=32 is not used by bitsandbytes' int8, which "
                                    "scales each row of a weight as a whole (LLM.int8)")
    assert info.details["deterministic_note"].startswith("train.deterministic=false changes nothing on the CPU")
    _, info = make_backend(tiny_model_dir)
    assert not {"note", "deterministic_note", "quantization_note"} & set(info.details)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("bits", [0, 4])
def test_save_load_continue_equals_uninterrupted(tiny_model_dir, tmp_path, bits):
    batches = [sft_batch(tiny_model_dir, SENTENCES[i:] + SENTENCES[:i]) for i in range(6)]
    lrs = [1e-2, 8e-3, 6e-3, 4e-3, 2e-3, 1e-3]
    opts = dict(lora__dropout=0.1, train__weight_decay=0.01)

    straight, _ = make_backend(tiny_model_dir, bits=bits, seed=7, **opts)
    expected = [straight.train_step([b], lr).loss for b, lr in zip(batches, lrs)]

    first, _ = make_backend(tiny_model_dir, bits=bits, seed=7, **opts)
    got = [first.train_step([b], lr).loss for b, lr in zip(batches[:3], lrs[:3])]
    import random

    import torch

    py_state, np_state = random.getstate(), np.random.get_state()[1].copy()
    first.save(tmp_path)
    # Global RNGs drift after the save (as in a real process that goes on or restarts); load must undo it.
    torch.rand(100)
    np.random.rand(10)
    random.random()
    resumed, _ = make_backend(tiny_model_dir, bits=bits, seed=99, **opts)
    resumed.load(tmp_path)
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state)
    got += [resumed.train_step([b], lr).loss for b, lr in zip(batches[3:], lrs[3:])]

    assert got == expected
    final = lora_weights(resumed)
    for name, value in lora_weights(straight).items():
        assert np.array_equal(final[name], value), name


def test_saved_adapter_loads_with_peft_from_pretrained(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    backend, _ = make_backend(tiny_model_dir)
    batch = sft_batch(tiny_model_dir)
    for _ in range(5):
        backend.train_step([batch], 1e-2)
    backend.save(tmp_path)
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and not config.get("use_rslora")

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids, attn, want = assert_peft_logits_match(backend, loaded, batch)
    with torch.no_grad(), loaded.disable_adapter():
        plain = loaded(input_ids=ids, attention_mask=attn).logits
    assert not torch.allclose(plain, want)  # the adapter really changes the model


def test_peft_dora_layer_computes_the_one_definition():
    """PEFT's DoRA, which the torch backend trains with, is lora_init.DORA (the definition the mlx backend's layer
    is held to), in training with a dropout mask and in eval: a PEFT upgrade that changed it fails here."""
    import torch
    from peft import LoraConfig, get_peft_model

    from overnight.backend import lora_init

    class Mask(torch.nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.mask = mask

        def forward(self, x):
            return x * self.mask

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 24)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["0"], use_dora=True))
    layer = model.base_model.model[0]
    weight, bias = layer.base_layer.weight.detach().numpy(), layer.base_layer.bias.detach().numpy()
    magnitude = layer.lora_magnitude_vector["default"].weight
    np.testing.assert_allclose(magnitude.detach().numpy(), lora_init.dora_magnitude(weight), rtol=1e-5)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
        magnitude.mul_(torch.rand(24) + 0.5)
    x = torch.randn(3, 64)
    mask = (torch.rand(3, 64) > 0.5).float() * 2.0
    layer.lora_dropout["default"] = Mask(mask)
    arrays = [t.detach().numpy() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight, magnitude)]
    model.train()
    with torch.no_grad():
        trained = model(x).numpy()
    want = lora_init.dora_forward(x.numpy(), (x * mask).numpy(), weight, bias, *arrays, 2.0)
    np.testing.assert_allclose(trained, want, rtol=1e-4, atol=1e-5)
    model.eval()
    with torch.no_grad():
        evaluated = model(x).numpy()
    np.testing.assert_allclose(evaluated, lora_init.dora_forward(x.numpy(), x.numpy(), weight, bias, *arrays, 2.0),
                               rtol=1e-4, atol=1e-5)


def test_dora_on_4bit_trains_and_peft_loads_it_with_the_same_logits(tiny_model_dir, tmp_path):
    """lora.use_dora on the default 4-bit path: the magnitudes train, the adapter is a PEFT DoRA adapter (use_dora,
    lora_magnitude_vector under PEFT's own name) that PeftModel.from_pretrained on the same 4-bit base reads back to
    the same logits, and the portable copy names the magnitudes <module>.M."""
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    backend, _ = make_backend(tiny_model_dir, bits=4, lora__use_dora=True, lora__targets=["q_proj", "v_proj"],
                              lora__dropout=0.1)
    before = lora_weights(backend)
    batch = sft_batch(tiny_model_dir)
    for _ in range(3):
        backend.train_step([batch], 1e-2)
    after = lora_weights(backend)
    magnitudes = [k for k in after if "lora_magnitude_vector" in k]
    assert len(magnitudes) == 4 and all(not np.allclose(before[k], after[k]) for k in magnitudes)
    backend.save(tmp_path)
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector" in saved
    assert sorted(k for k in backend.portable_state().weights if k.endswith(".M")) == [
        f"layers.{i}.self_attn.{p}.M" for i in (0, 1) for p in ("q_proj", "v_proj")]

    from overnight.backends.torch_backend import _keep_4bit_weights_unpacked

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=backend._quantization_config(4))
    _keep_4bit_weights_unpacked(base)  # bitsandbytes' CPU repacking rounds otherwise (the backend's own rule)
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    assert_peft_logits_match(backend, loaded, batch)


def assert_peft_logits_match(backend, loaded, batch):
    """The PEFT model loaded from the backend's saved adapter gives the backend's own logits on ``batch``;
    (input ids, attention mask, the logits) as tensors, for more checks."""
    import torch

    ids = torch.as_tensor(batch.input_ids, dtype=torch.long)
    attn = torch.as_tensor(batch.attention_mask, dtype=torch.long)
    backend._model.eval()
    with torch.no_grad():
        want = backend._model(input_ids=ids, attention_mask=attn).logits
        got = loaded(input_ids=ids, attention_mask=attn).logits
    torch.testing.assert_close(got, want)
    return ids, attn, want


def test_resume_with_another_optimizer_is_refused(tiny_model_dir, tmp_path):
    from overnight.config import ConfigError

    backend, _ = make_backend(tiny_model_dir)
    backend.train_step([sft_batch(tiny_model_dir)], 1e-3)
    backend.save(tmp_path)
    state = json.loads((tmp_path / "backend_state.json").read_text())
    assert state["optimizer"] == "adamw"
    state["optimizer"] = "paged_adamw_8bit"
    (tmp_path / "backend_state.json").write_text(json.dumps(state))
    other, _ = make_backend(tiny_model_dir)
    with pytest.raises(ConfigError, match="train.optimizer"):
        other.load(tmp_path)


def test_resume_into_a_different_lora_shape_is_refused(tiny_model_dir, tmp_path):
    backend, _ = make_backend(tiny_model_dir)
    backend.save(tmp_path)
    other, _ = make_backend(tiny_model_dir, lora__layers=1)
    with pytest.raises(ValueError, match="LoRA parameters"):
        other.load(tmp_path)


@pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")
def test_8bit_optimizer_state_round_trips_on_cpu(tiny_model_dir, tmp_path):
    """bitsandbytes runs its 8-bit AdamW un-paged on CPU; this exercises the save/load path the CUDA paged one uses
    (quantized state1/state2 + absmax, wrapped by bitsandbytes' state_dict) without a GPU."""
    import warnings

    import torch

    def backend(seed):
        # Rank 64 makes the adapter matrices 4096 values, bitsandbytes' threshold for 8-bit state.
        b, _ = make_backend(tiny_model_dir, bits=4, seed=seed, lora__rank=64, lora__alpha=128.0, lora__dropout=0.1)
        b._optimizer_name = "paged_adamw_8bit"  # bypasses the CPU refusal on purpose
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b._optimizer = b._build_optimizer()
        return b

    batches = [sft_batch(tiny_model_dir, SENTENCES[i:] + SENTENCES[:i]) for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        straight = backend(1)
        expected = [straight.train_step([b], 1e-2).loss for b in batches]
        assert any(s.get("state1") is not None and s["state1"].dtype == torch.uint8
                   for s in straight._optimizer.state.values())
        first = backend(1)
        got = [first.train_step([b], 1e-2).loss for b in batches[:3]]
        first.save(tmp_path)
        resumed = backend(2)
        resumed.load(tmp_path)
        got += [resumed.train_step([b], 1e-2).loss for b in batches[3:]]
    assert got == expected


@pytest.mark.skipif(has("torch") and cuda_available(), reason="checks the CPU refusal")
def test_paged_optimizer_is_refused_on_cpu(tiny_model_dir):
    from overnight.config import ConfigError

    with pytest.raises(ConfigError, match="train.optimizer"):
        make_backend(tiny_model_dir, train__optimizer="paged_adamw_8bit")


# --------------------------------------------------------------------------- preference methods


def test_dpo_starts_at_log2_and_learns(tiny_model_dir):
    backend, _ = make_backend(tiny_model_dir, data__method="dpo")
    batch = preference_batch(tiny_model_dir)
    total, pairs = backend.eval_loss(batch)
    assert pairs == len(PREFERENCES)
    # LoRA B starts at zero, so policy == reference and every pair's loss is -log sigmoid(0).
    assert total / pairs == pytest.approx(math.log(2), abs=1e-6)
    losses = [backend.train_step([batch], 1e-2).loss for _ in range(15)]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.05


def test_orpo_learns_and_split_matches(tiny_model_dir):
    batch = preference_batch(tiny_model_dir)
    whole, _ = make_backend(tiny_model_dir, data__method="orpo")
    split, _ = make_backend(tiny_model_dir, data__method="orpo")
    parts = batch.split(2)
    assert all(p.paired and p.num_rows % 2 == 0 for p in parts)
    losses = []
    for _ in range(15):
        a = whole.train_step([batch], 1e-2)
        b = split.train_step(parts, 1e-2)
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
        losses.append(a.loss)
    assert losses[-1] < losses[0] - 0.5


def test_orpo_is_the_trl_objective(tiny_model_dir):
    from overnight.backend import Batch
    from overnight.backend.objectives import reference_value

    batch = preference_batch(tiny_model_dir)
    backend, _ = make_backend(tiny_model_dir, data__method="orpo", preference__beta=0.3)
    sft, _ = make_backend(tiny_model_dir)  # LoRA B is zero at the start: policy = base for both
    rows = [sft.eval_loss(Batch(batch.input_ids[i:i + 1], batch.loss_mask[i:i + 1], batch.attention_mask[i:i + 1]))
            for i in range(batch.num_rows)]
    expected = reference_value("orpo", [-nll for nll, _ in rows], [n for _, n in rows], beta=0.3)
    total, pairs = backend.eval_loss(batch)
    assert total / pairs == pytest.approx(expected, rel=1e-5)
    assert backend.train_step(batch.split(2), 1e-2).loss == pytest.approx(expected, rel=1e-5)


def test_reward_trains_its_head_and_lora_and_a_split_step_is_the_same(tiny_model_dir):
    """reward: a zero score head gives log 2 on every pair; the head and LoRA both train (the head first: LoRA
    has no gradient while the head is zero); splitting the step into pairs changes nothing; accuracy rises above
    chance; eval_loss is the numpy formula over the backend's own scores, centering term included."""
    from overnight.backend.objectives import pairs_ranked_right, reward_reference

    batch = preference_batch(tiny_model_dir)
    whole, _ = make_backend(tiny_model_dir, data__method="reward", reward__center_coefficient=0.05)
    split, _ = make_backend(tiny_model_dir, data__method="reward", reward__center_coefficient=0.05)
    assert whole._param_names[-1] == "score.weight" and whole._score.weight.dtype.is_floating_point
    total, pairs = whole.eval_loss(batch)
    assert pairs == len(PREFERENCES) and total / pairs == pytest.approx(math.log(2), abs=1e-6)
    def trainable(backend):
        return {n: p.detach().float().numpy().copy() for n, p in zip(backend._param_names, backend._params)}

    before = trainable(whole)
    losses = []
    for _ in range(12):
        a = whole.train_step([batch], 1e-2)
        b = split.train_step(batch.split(4), 1e-2)
        assert b.loss == pytest.approx(a.loss, rel=1e-4)  # float sums in another order, 10 steps on
        losses.append(a.loss)
    after = trainable(whole)
    assert not np.allclose(after["score.weight"], before["score.weight"])
    assert any(not np.allclose(after[k], before[k]) for k in after if "lora_B" in k)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0] - 0.2, losses
    scores = whole.reward_scores(batch)
    assert pairs_ranked_right(scores) > len(PREFERENCES) / 2
    total, pairs = whole.eval_loss(batch)
    assert total / pairs == pytest.approx(reward_reference(scores, 0.05), rel=1e-5)


def test_a_reward_adapter_opens_in_transformers_and_peft_with_the_same_scores(tiny_model_dir, tmp_path):
    """The adapter a reward run saves is PEFT's for AutoModelForSequenceClassification (SEQ_CLS, the head in
    modules_to_save), its adapter_config.json only keys LoraConfig knows (PEFT warns about any other on every load),
    the pad id in reward_head.json: loaded the standard way with that pad id, it scores rows as training did (1e-4),
    and neither that load nor overnight's own (a GRPO reward, torch_reward_model) warns."""
    import warnings

    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification

    from overnight.backend.objectives import score_positions
    from overnight.backends.torch_reward_model import load_scorer

    backend, _ = make_backend(tiny_model_dir, data__method="reward")
    batch = preference_batch(tiny_model_dir, pad_id=backend._pad_id)
    for _ in range(3):
        backend.train_step([batch], 1e-2)
    (tmp_path / "ckpt").mkdir()
    backend.save(tmp_path / "ckpt")
    adapter = tmp_path / "ckpt" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    head = json.loads((adapter / "reward_head.json").read_text())
    assert head == {"num_labels": 1, "pad_token_id": backend._pad_id, "score_file": "adapter_model.safetensors",
                    "score_key": "base_model.model.score.weight"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert PeftConfig.from_pretrained(str(adapter)).task_type == "SEQ_CLS"
    assert not caught, [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(tiny_model_dir), num_labels=1, pad_token_id=head["pad_token_id"], dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
        scorer = load_scorer(backend, tiny_model_dir, adapter, "peft", "float32", "reward_model=ckpt")
    assert not [str(w.message) for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64))).logits[:, 0].numpy()
    ours = backend.reward_scores(batch)
    assert np.abs(ours).max() > 1e-3  # a trained head: equal zeros would prove nothing
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
    positions = score_positions(batch.input_ids, head["pad_token_id"])
    np.testing.assert_allclose(scorer.score(batch.input_ids, batch.attention_mask, positions), ours, rtol=0, atol=1e-4)


def test_preference_method_needs_paired_batches(tiny_model_dir):
    backend, _ = make_backend(tiny_model_dir, data__method="dpo")
    with pytest.raises(ValueError, match="paired"):
        backend.train_step([sft_batch(tiny_model_dir)], 1e-3)


# --------------------------------------------------------------------------- generation and reporting


def test_generate_is_greedy_and_stops_at_eos(tiny_model_dir):
    import torch

    backend, _ = make_backend(tiny_model_dir)
    prompt = np.asarray(tokenizer(tiny_model_dir).encode("The capital of France is").ids)
    out = backend.generate(prompt, 12, ())
    assert out.dtype.kind == "i" and len(out) == 12
    assert np.array_equal(backend.generate(prompt, 12, ()), out)
    # Greedy by hand: argmax of the next-token logits, one token at a time.
    ids = torch.as_tensor(prompt[None], dtype=torch.long)
    with torch.no_grad():
        for _ in range(12):
            nxt = backend._model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert np.array_equal(ids[0, len(prompt):].numpy(), out)
    # Treating the third generated token as end-of-sequence stops right before it.
    eos = int(out[2])
    first = int(np.flatnonzero(out == eos)[0])
    assert np.array_equal(backend.generate(prompt, 12, (eos,)), out[:first])


def test_generation_and_sampling_stop_at_every_stop_id_the_model_folder_lists(tiny_model_dir, tmp_path):
    """A chat model's generation_config.json lists its end-of-turn token beside its eos: the tokenizer's stop_ids
    carry both, and greedy generation and sampling end at the second one too."""
    from overnight.data.tokenizer import load_tokenizer

    from conftest import with_stop_ids

    backend, _ = make_backend(tiny_model_dir)
    prompt = np.asarray(tokenizer(tiny_model_dir).encode("The capital of France is").ids)
    eos = load_tokenizer(tiny_model_dir).eos_id
    out = backend.generate(prompt, 12, ())
    assert eos not in out.tolist()
    turn_end = int(out[2])
    stop_ids = load_tokenizer(with_stop_ids(tiny_model_dir, tmp_path / "chat", [eos, turn_end])).stop_ids
    assert stop_ids == (eos, turn_end)
    first = out.tolist().index(turn_end)
    assert np.array_equal(backend.generate(prompt, 12, stop_ids), out[:first])

    row = backend.sample(prompt, [11], 10, 1.0, 0.9, ())[0]
    unused = next(i for i in range(3, 500) if i not in row.tolist())
    stop = int(row[3])
    first = row.tolist().index(stop)
    stopped = backend.sample(prompt, [11], 10, 1.0, 0.9, (unused, stop))[0]
    assert np.array_equal(stopped[:first + 1], row[:first + 1]) and (stopped[first + 1:] == -1).all()


def test_memory_and_versions(tiny_model_dir):
    backend, _ = make_backend(tiny_model_dir)
    memory = backend.memory()
    assert memory["memory_mb"] > 0 and memory["rss_mb"] > 0
    versions = backend.versions()
    assert {"torch", "transformers", "peft"} <= set(versions)
    if has("bitsandbytes"):
        assert "bitsandbytes" in versions


def test_registry_finds_the_backend():
    from overnight.backend import get_backend
    from overnight.backends.torch_backend import TorchBackend

    assert isinstance(get_backend("torch", announce=None), TorchBackend)


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.cuda
def test_cuda_qlora_bf16_trains_and_reports_memory(tiny_model_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    backend, info = make_backend(tiny_model_dir, bits=4, model__grad_checkpoint=True)
    assert info.details["device"].startswith("cuda")
    if torch.cuda.is_bf16_supported():
        assert info.details["compute_dtype"] == "bfloat16"
    batch = sft_batch(tiny_model_dir)
    losses = [backend.train_step([batch], 1e-2).loss for _ in range(30)]
    assert losses[-1] < losses[0] - 0.5
    memory = backend.memory()
    assert {"memory_mb", "allocated_mb", "reserved_mb", "peak_mb", "rss_mb"} <= set(memory)
    assert 0 < memory["allocated_mb"] <= memory["reserved_mb"]
    assert memory["peak_mb"] >= memory["allocated_mb"]


@pytest.mark.cuda
def test_cuda_paged_adamw_8bit_trains_and_resumes(tiny_model_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    batches = [sft_batch(tiny_model_dir, SENTENCES[i:] + SENTENCES[:i]) for i in range(6)]
    opts = dict(train__optimizer="paged_adamw_8bit", lora__dropout=0.1)
    straight, _ = make_backend(tiny_model_dir, bits=4, seed=5, **opts)
    expected = [straight.train_step([b], 1e-2).loss for b in batches]
    assert expected[-1] < expected[0]

    first, _ = make_backend(tiny_model_dir, bits=4, seed=5, **opts)
    got = [first.train_step([b], 1e-2).loss for b in batches[:3]]
    first.save(tmp_path)
    resumed, _ = make_backend(tiny_model_dir, bits=4, seed=6, **opts)
    resumed.load(tmp_path)
    got += [resumed.train_step([b], 1e-2).loss for b in batches[3:]]
    np.testing.assert_allclose(got, expected, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_out_of_memory_becomes_backend_oom(tiny_model_dir):
    import torch

    from overnight.backend import Batch, OutOfMemory

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    backend, _ = make_backend(tiny_model_dir)
    free, _ = torch.cuda.mem_get_info()
    # Logits alone (rows x 1024 x vocab 512 x 4 bytes) exceed the free memory.
    rows = int(free // (1024 * 512 * 4)) + 8
    ids = np.ones((rows, 1024), np.int32)
    huge = Batch(ids, np.ones_like(ids, dtype=np.float32), np.ones_like(ids))
    with pytest.raises(OutOfMemory):
        backend.train_step([huge], 1e-3)
    assert all(p.grad is None for p in backend._params)
    small = sft_batch(tiny_model_dir)
    assert math.isfinite(backend.train_step([small], 1e-3).loss)  # still usable afterwards


# --------------------------------------------------------------------------- keyed dropout, data parallel (gloo)


def keyed(batch, key: int):
    from dataclasses import replace

    return replace(batch, noise_seed=key)


def test_dropout_masks_follow_the_batch_noise_seed(tiny_model_dir):
    """With dropout on, a micro-batch's loss depends on its noise_seed alone: not on what ran before it."""
    backend, _ = make_backend(tiny_model_dir, bits=4, lora__dropout=0.05)
    batch = sft_batch(tiny_model_dir)
    backend.train_step([batch], 1e-2)  # B moves off zero, so the adapter (and its dropout) changes the loss

    def loss(key):
        # lr 0: the weights stay put (AdamW's decay is lr-scaled too), so only the masks can change the loss
        return backend.train_step([keyed(batch, key)], 0.0).loss

    first = loss(11)
    import torch

    torch.rand(1000)  # draws from the global stream in between: keyed masks must not notice
    assert loss(11) == first
    assert loss(12) != first  # the control: dropout is really on and really keyed
    assert loss(11) == first


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DP_STEPS, DP_MICRO, DP_SEED, DP_TIMEOUT_S = 3, 4, 7, 15.0
SILENT_TIMEOUT_S = 4.0


def _dp_steps(model_dir: Path) -> list:
    """Each step's whole list of micro-batches (2 sentences each, uneven token counts), keyed as the loop keys
    them (src/distributed.py step_batches)."""
    from overnight.backend import noise_seed

    steps = []
    for step in range(DP_STEPS):
        order = SENTENCES[step:] + SENTENCES[:step]
        steps.append([keyed(sft_batch(model_dir, order[2 * i: 2 * i + 2]), noise_seed(DP_SEED, step, i))
                      for i in range(DP_MICRO)])
    return steps


def _dp_reward_steps(model_dir: Path) -> list:
    """reward: each step's whole list, one preference pair per micro-batch (a rank takes two pairs)."""
    from overnight.backend import noise_seed

    steps = []
    for step in range(DP_STEPS):
        order = PREFERENCES[step:] + PREFERENCES[:step]
        pairs = preference_batch(model_dir, preferences=order).split(len(order))
        steps.append([keyed(pair, noise_seed(DP_SEED, step, i)) for i, pair in enumerate(pairs)])
    return steps


def _start(job: dict, path: Path, rank: int | None, port: int | None):
    import os
    import subprocess
    import sys

    path.write_text(json.dumps(job))
    # CPU and gloo even where a GPU is visible (two ranks on one GPU would be refused; tests/test_distributed.py
    # has the NCCL job).
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    worker = Path(__file__).with_name("dp_torch_worker.py")
    return subprocess.Popen([sys.executable, str(worker), str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def dp_jobs(tiny_model_dir, tmp_path_factory):
    """Four jobs at once, each process with one thread: a 2-process job (rank 1's first forward runs out of
    memory, then the step is taken again), the same steps in one process, and two 2-process jobs whose rank 1
    exits right after joining, or stays but never answers. 4-bit NF4 base and LoRA dropout 0.05: the default path."""
    import pickle
    import time

    if not has("bitsandbytes"):
        pytest.skip("needs bitsandbytes")
    root = tmp_path_factory.mktemp("dp_torch")
    with open(root / "batches.pkl", "wb") as fh:
        pickle.dump(_dp_steps(tiny_model_dir), fh)
    with open(root / "reward.pkl", "wb") as fh:
        pickle.dump(_dp_reward_steps(tiny_model_dir), fh)
    base = {"model_dir": str(tiny_model_dir), "batches": str(root / "batches.pkl"), "seed": DP_SEED, "lr": 1e-2,
            "timeout_s": DP_TIMEOUT_S,
            "overrides": {"model.quantization.bits": 4, "lora.rank": 8, "lora.alpha": 16.0, "lora.dropout": 0.05,
                          "lora.layers": -1}}
    train_port, dead_port, silent_port, reward_port = _free_port(), _free_port(), _free_port(), _free_port()
    reward = {**base, "mode": "train", "batches": str(root / "reward.pkl"),
              "overrides": {**base["overrides"], "data.method": "reward"}}
    procs = {}
    for rank in (0, 1):
        procs[f"reward{rank}"] = _start({**reward, "out": str(root / "reward{rank}.npz")}, root / f"reward{rank}.json",
                                        rank, reward_port)
        procs[f"train{rank}"] = _start({**base, "mode": "train", "oom_rank": 1, "out": str(root / "train{rank}.npz")},
                                       root / f"train{rank}.json", rank, train_port)
        procs[f"dead{rank}"] = _start({**base, "mode": "dead", "out": str(root / "dead{rank}.npz")},
                                      root / f"dead{rank}.json", rank, dead_port)
        procs[f"silent{rank}"] = _start({**base, "mode": "silent", "timeout_s": SILENT_TIMEOUT_S,
                                         "out": str(root / "silent{rank}.npz")}, root / f"silent{rank}.json", rank,
                                        silent_port)
    procs["solo"] = _start({**base, "mode": "solo", "out": str(root / "solo{rank}.npz")}, root / "solo.json",
                           None, None)
    procs["reward_solo"] = _start({**reward, "mode": "solo", "out": str(root / "reward_solo{rank}.npz")},
                                  root / "reward_solo.json", None, None)
    started = time.monotonic()
    logs = {}
    for name, proc in procs.items():
        try:
            logs[name] = proc.communicate(timeout=max(1.0, 420 - (time.monotonic() - started)))[0]
        except Exception:
            for other in procs.values():
                other.kill()
            raise
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{logs[name][-3000:]}"
    out = {}
    for name, file in (("rank0", "train0"), ("rank1", "train1"), ("solo", "solo0"), ("dead0", "dead0"),
                       ("silent0", "silent0"), ("reward0", "reward0"), ("reward1", "reward1"),
                       ("reward_solo", "reward_solo0")):
        with np.load(root / f"{file}.npz") as data:
            out[name] = {k: data[k] for k in data.files}
    out["dead1_wrote"] = (root / "dead1.npz").exists()
    return out


def _lora(result: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}


@pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")
def test_two_processes_match_one_process_taking_every_micro_batch(dp_jobs):
    rank0, rank1, solo = dp_jobs["rank0"], dp_jobs["rank1"], dp_jobs["solo"]
    # The same starting adapter everywhere (LoRA A from the seed, B zero), 4-bit base loaded per rank.
    for name, value in _lora(solo, "init/").items():
        assert np.array_equal(_lora(rank0, "init/")[name], value)
        assert np.array_equal(_lora(rank1, "init/")[name], value)
    # The whole step's figures on every rank, bit for bit, and the one process's up to float summation order.
    assert len(solo["losses"]) == DP_STEPS
    for key in ("losses", "norms", "tokens"):
        assert np.array_equal(rank0[key], rank1[key]), key
    np.testing.assert_allclose(rank0["losses"], solo["losses"], rtol=1e-5)
    np.testing.assert_allclose(rank0["norms"], solo["norms"], rtol=1e-5)
    assert np.array_equal(rank0["tokens"], solo["tokens"])  # the whole step's target tokens, not this rank's
    final0, final1, final_solo = _lora(rank0, "final/"), _lora(rank1, "final/"), _lora(solo, "final/")
    assert final0.keys() == final_solo.keys() and final0
    moved = 0.0
    for name, value in final_solo.items():
        assert np.array_equal(final0[name], final1[name]), name  # the ranks never drift apart
        np.testing.assert_allclose(final0[name], value, rtol=1e-5, atol=1e-5)
        moved = max(moved, float(np.abs(value - _lora(solo, "init/")[name]).max()))
    assert moved > 1e-3  # the steps really trained


@pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")
def test_reward_two_processes_match_one_process_score_head_included(dp_jobs):
    """--method reward data parallel: each rank scores its own pairs, the Bradley-Terry loss is normalised over the
    whole step's pairs, and the score head (trained fully, outside LoRA) is all-reduced with the LoRA weights."""
    rank0, rank1, solo = dp_jobs["reward0"], dp_jobs["reward1"], dp_jobs["reward_solo"]
    for key in ("losses", "norms", "tokens"):
        assert np.array_equal(rank0[key], rank1[key]), key
    np.testing.assert_allclose(rank0["losses"], solo["losses"], rtol=1e-5)
    np.testing.assert_allclose(rank0["norms"], solo["norms"], rtol=1e-5)
    assert rank0["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # the zero head: every pair a coin toss
    final0, final1, final_solo = _lora(rank0, "final/"), _lora(rank1, "final/"), _lora(solo, "final/")
    heads = [name for name in final_solo if name.endswith("score.weight")]
    assert heads and final0.keys() == final_solo.keys()
    for name, value in final_solo.items():
        assert np.array_equal(final0[name], final1[name]), name
        np.testing.assert_allclose(final0[name], value, rtol=1e-5, atol=1e-5)
    assert float(np.abs(final_solo[heads[0]] - _lora(solo, "init/")[heads[0]]).max()) > 1e-3


@pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")
def test_out_of_memory_on_one_rank_raises_on_every_rank_with_weights_untouched(dp_jobs):
    rank0, rank1 = dp_jobs["rank0"], dp_jobs["rank1"]
    assert "simulated on this rank" in str(rank1["oom_message"])
    assert "another process of this data-parallel job ran out of memory" in str(rank0["oom_message"])
    assert bool(rank0["oom_weights_unchanged"]) and bool(rank1["oom_weights_unchanged"])
    # ...and the job goes on: the same step taken again matched the one process (previous test).


@pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")
def test_a_dead_peer_is_peer_lost_within_the_timeout(dp_jobs):
    dead = dp_jobs["dead0"]
    assert "peer_lost_message" in dead, "rank 0 finished a step without its peer"
    assert "another process of this data-parallel job stopped answering or died" in str(dead["peer_lost_message"])
    assert "the gradient all-reduce" in str(dead["peer_lost_message"])
    assert float(dead["peer_lost_after_s"]) < DP_TIMEOUT_S + 10
    assert not dp_jobs["dead1_wrote"]


@pytest.mark.skipif(not has("bitsandbytes"), reason="needs bitsandbytes")
def test_a_silent_peer_is_peer_lost_once_the_timeout_has_passed(dp_jobs):
    silent = dp_jobs["silent0"]
    assert "peer_lost_message" in silent, "rank 0 finished a step without its peer"
    assert "stopped answering or died (the gradient all-reduce" in str(silent["peer_lost_message"])
    assert SILENT_TIMEOUT_S - 1 <= float(silent["peer_lost_after_s"]) < SILENT_TIMEOUT_S + 10


# --------------------------------------------------------------------------- memory figures and allocation failures


@pytest.mark.parametrize("text, oom", [
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", True),
    ("CUDA error: out of memory", True),
    ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`", False),
    ("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x4)", False),
])
def test_library_allocation_failures_are_out_of_memory(text, oom):
    from overnight.backend import OutOfMemory, PeerLost
    from overnight.backends.torch_backend import _is_oom

    assert _is_oom(RuntimeError(text)) is oom
    assert not _is_oom(OutOfMemory("out of memory in a step")) and not _is_oom(PeerLost("out of memory on rank 1"))


def test_a_model_that_does_not_fit_is_said_not_crashed(tiny_model_dir, monkeypatch):
    """Out of memory while the base model loads (on a GPU, or in host memory while its weights are read) ends as
    overnight's error with what to change, not a traceback a supervised run would be relaunched into; the host's
    failure is torch's own, from an allocation that cannot succeed."""
    import torch
    import transformers

    from overnight.backends.torch_backend import _is_oom
    from overnight.errors import TrainingError

    def too_big(*args, **kwargs):
        return torch.empty(2 ** 50, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory

    try:
        too_big()
    except RuntimeError as exc:
        assert _is_oom(exc), exc
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", too_big)
    with pytest.raises(TrainingError, match=r"out of memory loading the base model .*can't allocate memory.*host "
                                            r"memory: use model.quantization.bits=4, a smaller model"):
        make_backend(tiny_model_dir)


def test_a_cublas_allocation_failure_in_a_step_becomes_backend_oom(tiny_model_dir, monkeypatch):
    from overnight.backend import OutOfMemory

    backend, _ = make_backend(tiny_model_dir)
    batch = sft_batch(tiny_model_dir)

    def failing(*args):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(backend, "_local_passes", failing)
    with pytest.raises(OutOfMemory, match="CUBLAS_STATUS_ALLOC_FAILED"):
        backend.train_step([batch], 1e-3)
    monkeypatch.setattr(backend, "_local_passes", lambda *a: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # any other failure is not retried as an OOM
        backend.train_step([batch], 1e-3)


def test_expandable_segments_unless_the_user_configured_the_allocator():
    """Under the name the torch installed reads without a warning: torch 2.9 renamed PYTORCH_CUDA_ALLOC_CONF to
    PYTORCH_ALLOC_CONF and warns on every run that sets the old one; torch before 2.9 reads only the old one."""
    import torch

    from overnight.backends.torch_backend import prefer_expandable_segments

    for version, name in (("2.4.1", "PYTORCH_CUDA_ALLOC_CONF"), ("2.8.0+cu128", "PYTORCH_CUDA_ALLOC_CONF"),
                          ("2.9.0", "PYTORCH_ALLOC_CONF"), ("2.11.0+cu130", "PYTORCH_ALLOC_CONF"),
                          ("2.13.0+cpu", "PYTORCH_ALLOC_CONF")):
        environ: dict = {}
        assert prefer_expandable_segments(environ, version) and environ == {name: "expandable_segments:True"}, version
    installed: dict = {}
    assert prefer_expandable_segments(installed)  # this machine's torch, read from its metadata
    wanted = "PYTORCH_ALLOC_CONF" if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 9) \
        else "PYTORCH_CUDA_ALLOC_CONF"
    assert installed == {wanted: "expandable_segments:True"}
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"):
        mine = {key: "max_split_size_mb:128"}
        assert not prefer_expandable_segments(mine, "2.11.0") and mine == {key: "max_split_size_mb:128"}


def test_cuda_memory_is_the_peak_since_the_last_report_with_the_device_total(monkeypatch):
    """The CUDA figures without a GPU: the peak is read then reset, and the device total is the limit."""
    import torch

    from overnight.backends.torch_backend import TorchBackend

    mb = 2**20
    peaks, resets = [5000 * mb, 3000 * mb], []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peaks[len(resets)])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20_000 * mb, 80_000 * mb))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000 * mb)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6000 * mb)
    backend = TorchBackend()
    backend._device = torch.device("cuda", 0)
    first, second = backend.memory(), backend.memory()
    assert (first["memory_mb"], second["memory_mb"]) == (5000, 3000) and len(resets) == 2
    assert first["limit_mb"] == 80_000 and first["free_mb"] == 20_000 and first["allocated_mb"] == 1000


# --------------------------------------------------------------------------- dtype and the chunked head


def test_bf16_4bit_keeps_the_residual_stream_and_every_unquantized_weight_in_bf16(tiny_model_dir):
    """model.dtype=bfloat16 on CPU is the GPU's path: no float32 copy of embeddings, norms or head (PEFT's
    prepare_model_for_kbit_training made them float32, and with them every hidden state between blocks)."""
    import torch

    backend, info = make_backend(tiny_model_dir, bits=4, model__dtype="bfloat16")
    assert info.details["compute_dtype"] == "bfloat16"
    model = backend._model
    frozen_float = {name: p.dtype for name, p in model.named_parameters()
                    if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen_float and set(frozen_float.values()) == {torch.bfloat16}, frozen_float
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    between_blocks = []
    handles = [layer.register_forward_hook(lambda m, a, out: between_blocks.append(
        (out[0] if isinstance(out, tuple) else out).dtype)) for layer in model.get_base_model().model.layers]
    batch = sft_batch(tiny_model_dir)
    try:
        bf16_loss = backend.train_step([batch], 1e-3).loss
    finally:
        for handle in handles:
            handle.remove()
    assert between_blocks and set(between_blocks) == {torch.bfloat16}
    fp32_loss = make_backend(tiny_model_dir, bits=4)[0].train_step([batch], 1e-3).loss
    assert abs(bf16_loss - fp32_loss) < 2e-2, (bf16_loss, fp32_loss)


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo", "grpo"])
def test_the_head_in_chunks_gives_the_full_logits_values(tiny_model_dir, method, monkeypatch):
    """Target positions scored a few at a time (checkpointed chunks) equal the model's own full forward: losses and
    gradients of every method, the 4-bit default with dropout, to 1e-5."""
    import torch

    from overnight.backend import objectives

    batch = _method_batch(tiny_model_dir, method)
    figures = {}
    for way in ("chunks", "full"):
        monkeypatch.setattr(objectives, "LOGIT_CHUNK_ELEMENTS", 7 * 512)  # 7 positions a chunk at this vocabulary
        backend, info = make_backend(tiny_model_dir, bits=4, lora__dropout=0.1, data__method=method,
                                     grpo__beta=0.05)
        assert backend._chunk_rows == 7 and backend._plain_head
        if way == "full":
            backend._plain_head = False  # the model's own forward computes the logits, all at once
        figures[way] = _loss_and_grads(backend, batch, method)
    assert figures["chunks"][0] == pytest.approx(figures["full"][0], rel=1e-5, abs=1e-6)
    for chunked, full in zip(figures["chunks"][1], figures["full"][1]):
        assert torch.allclose(chunked, full, rtol=1e-4, atol=1e-6)


def test_a_model_whose_logits_are_not_its_heads_keeps_its_own_forward(tiny_model_dir, monkeypatch):
    """A model that post-processes its logits beyond what overnight knows (here: a scale, as Cohere's and Granite's
    do) is found by the setup probe and scored by its own forward, never by the bare head."""
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.forward

    def scaled_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", scaled_forward)
    backend, info = make_backend(tiny_model_dir, bits=0)
    assert not backend._plain_head and "own head" in info.details["loss_head"]


def test_weight_shards_are_read_not_memory_mapped_while_the_model_loads(tiny_model_dir, monkeypatch):
    """transformers keeps every shard mapped until the whole model is loaded (the checkpoint's size in RSS on top of
    the model it builds; bench/memory.py scale measures it); the backend has it read each tensor instead."""
    import transformers.modeling_utils as loading

    backends_used = []
    original = loading.safe_open

    def spy(*args, **kwargs):
        backends_used.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loading, "safe_open", spy)
    make_backend(tiny_model_dir, bits=4)
    assert backends_used == ["pread"]


# --------------------------------------------------------------------------- 16-bit checkpoints, float32 compute


@pytest.fixture(scope="module")
def sixteen_bit_twins(tmp_path_factory):
    """{tied: (bf16 folder, float32 folder)}: the tiny model's weights rounded to bf16 and saved once as bf16 and once
    as float32 (the same values), untied and tied: the float32 twin loads the way every checkpoint did before."""
    import torch
    from safetensors.torch import load_file, save_file

    from overnight.models.tiny import build_tiny_model

    twins = {}
    for tied in (False, True):
        root = tmp_path_factory.mktemp("tied" if tied else "untied")
        build_tiny_model(root / "bf16")
        weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(root / "bf16" / "model.safetensors")).items()}
        config = json.loads((root / "bf16" / "config.json").read_text())
        if tied:
            weights.pop("lm_head.weight")
            config["tie_word_embeddings"] = True
        config["torch_dtype"] = "bfloat16"
        (root / "bf16" / "config.json").write_text(json.dumps(config))
        save_file(weights, str(root / "bf16" / "model.safetensors"), metadata={"format": "pt"})
        (root / "fp32").mkdir()
        for item in (root / "bf16").iterdir():
            (root / "fp32" / item.name).write_bytes(item.read_bytes())
        save_file({k: v.float() for k, v in weights.items()}, str(root / "fp32" / "model.safetensors"),
                  metadata={"format": "pt"})
        twins[tied] = (root / "bf16", root / "fp32")
    return twins


def _run_figures(backend, model_dir: Path) -> dict:
    """Three train steps' losses, an eval loss, sampled and greedy tokens: what a run computes."""
    batch = sft_batch(model_dir)
    prompt = batch.input_ids[0, :5]
    return {"losses": [backend.train_step([batch], 1e-3).loss for _ in range(3)],
            "eval": backend.eval_loss(batch),
            "sampled": backend.sample([prompt, batch.input_ids[1, :4]], [3, 4], 6, 1.0, 1.0, ()).tolist(),
            "greedy": [row.tolist() for row in backend.generate([prompt], 6, ())]}


@pytest.mark.parametrize("tied", [False, True])
def test_float32_compute_keeps_a_16bit_checkpoints_embedding_and_head_16bit_with_the_same_run(sixteen_bit_twins,
                                                                                             monkeypatch, tied):
    """The CPU's float32 default on a bf16 checkpoint: the frozen embedding and head are never made float32 (not even
    while loading: they are 0.47x of a 1B model's bf16 size in float32), the hidden states between blocks are float32,
    and training, eval and sampling give the float32 twin's figures (the 4-bit default, dropout on)."""
    import torch
    from transformers import AutoModelForCausalLM

    bf16_dir, fp32_dir = sixteen_bit_twins[tied]
    loaded_dtypes = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        loaded_dtypes.append({model.get_input_embeddings().weight.dtype, model.get_output_embeddings().weight.dtype})
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    backend, info = make_backend(bf16_dir, bits=4, lora__dropout=0.1)
    assert loaded_dtypes == [{torch.bfloat16}]
    assert info.details["compute_dtype"] == "float32" and "kept in the checkpoint's 16-bit" in info.details["stored_16bit"]
    model = backend._model
    assert (model.get_input_embeddings().weight.dtype, model.get_output_embeddings().weight.dtype) == \
        (torch.bfloat16, torch.bfloat16)
    vocab = model.get_input_embeddings().weight.shape[0]
    assert not [name for name, p in model.named_parameters() if p.dtype == torch.float32 and p.shape[0] == vocab]
    between_blocks = []
    handles = [layer.register_forward_hook(lambda m, a, out: between_blocks.append(
        (out[0] if isinstance(out, tuple) else out).dtype)) for layer in model.get_base_model().model.layers]
    try:
        got = _run_figures(backend, bf16_dir)
    finally:
        for handle in handles:
            handle.remove()
    assert set(between_blocks) == {torch.float32}
    twin, twin_info = make_backend(fp32_dir, bits=4, lora__dropout=0.1)
    assert "stored_16bit" not in twin_info.details
    want = _run_figures(twin, fp32_dir)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-6)
    assert got["eval"][0] == pytest.approx(want["eval"][0], rel=1e-6) and got["eval"][1] == want["eval"][1]
    assert (got["sampled"], got["greedy"]) == (want["sampled"], want["greedy"])


def test_bfloat16_compute_and_float32_checkpoints_load_as_before(sixteen_bit_twins, tiny_model_dir):
    """Nothing is kept narrower than the compute dtype unless upcasting it is exact and the compute is float32."""
    import torch

    bf16_dir, _ = sixteen_bit_twins[False]
    _, info = make_backend(bf16_dir, bits=4, model__dtype="bfloat16")
    assert "stored_16bit" not in info.details
    backend, info = make_backend(tiny_model_dir, bits=4)
    assert "stored_16bit" not in info.details
    assert backend._model.get_output_embeddings().weight.dtype == torch.float32


def test_the_sliced_head_equals_the_float32_matmul_and_its_gradient():
    """The head's matmul upcasting its 16-bit weight a slice at a time (slices not dividing the vocabulary, a bias,
    a (B, T, H) input): the float32 matmul's values and input gradient, to float rounding."""
    import torch

    from overnight.backends import torch_stored_dtype

    torch.manual_seed(0)
    head = torch.nn.Linear(24, 103, bias=True).to(torch.bfloat16).requires_grad_(False)
    wide = torch.nn.Linear(24, 103, bias=True).requires_grad_(False)
    wide.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    head.forward = torch_stored_dtype._sliced_forward(head)
    hidden = torch.randn(2, 5, 24, requires_grad=True)
    for rows in (7, 103, 500):
        sliced = torch_stored_dtype._UpcastInSlices.apply(hidden, head.weight, head.bias, rows)
        full = wide(hidden)
        assert torch.allclose(sliced, full, rtol=1e-6, atol=1e-7)
        grad = torch.randn_like(full)
        (sliced_grad,) = torch.autograd.grad(sliced, hidden, grad)
        (full_grad,) = torch.autograd.grad(full, hidden, grad)
        assert torch.allclose(sliced_grad, full_grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(head(hidden), wide(hidden), rtol=1e-6, atol=1e-7)


def test_a_subclassed_embedding_stays_in_the_compute_dtype(sixteen_bit_twins):
    """A module that computes on its own weight (Gemma scales its embedding in the weight's dtype) is not narrowed:
    alone it keeps float32, and a tied pair with it keeps both float32; a plain head beside it is still narrowed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from overnight.backends import torch_stored_dtype

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    for tied, expected in ((False, {"lm_head.weight"}), (True, set())):
        bf16_dir, _ = sixteen_bit_twins[tied]
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(bf16_dir)))
        assert set(torch_stored_dtype.plan(skeleton, bf16_dir, torch.float32)) == \
            {"model.embed_tokens.weight", "lm_head.weight"}  # tied: one weight, stored under the embedding's name
        plain = skeleton.get_input_embeddings()
        scaled = ScaledEmbedding(plain.num_embeddings, plain.embedding_dim, device="meta")
        if tied:
            scaled.weight = plain.weight
        skeleton.set_input_embeddings(scaled)
        assert set(torch_stored_dtype.plan(skeleton, bf16_dir, torch.float32)) == expected


@pytest.mark.parametrize("index", ["", '{"weight_map": {"model.embed', '["model-00001-of-00002.safetensors"]',
                                   '{"weight_map": ["model.embed_tokens.weight"]}'],
                         ids=["empty", "cut", "list", "map-a-list"])
def test_a_damaged_shard_index_is_named_not_a_traceback(tiny_model_dir, tmp_path, index):
    """A sharded checkpoint whose model.safetensors.index.json is damaged (an interrupted copy): the float32
    compute's look at the stored dtypes reads that index before transformers does, and raised its JSONDecodeError
    (a crash: exit 1, restarted by the supervisor) where the load says which folder to re-copy (exit 2)."""
    from safetensors.torch import load_file, save_file

    from overnight.config import ConfigError

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        save_file({name: weights[name] for name in part}, str(model / f"model-0000{number}-of-00002.safetensors"),
                  metadata={"format": "pt"})
    (model / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ConfigError, match=r"config key 'model.path': cannot load .*weight files are complete"):
        make_backend(model, bits=4)


# --------------------------------------------------------------------------- model.loss_kernel=liger


def _method_batch(model_dir: Path, method: str):
    batch = preference_batch(model_dir) if method in ("dpo", "orpo") else sft_batch(model_dir)
    if method == "grpo":
        batch.advantages = np.random.default_rng(0).normal(size=batch.num_rows).astype(np.float32)
        batch.old_logp = None
    return batch


def _loss_and_grads(backend, batch, method: str):
    import torch

    from overnight.backend import objectives

    backend._model.train()
    torch.manual_seed(3)
    token_scale, pair_scale, _ = objectives.step_scales(method, [batch])
    loss = backend._local_passes([batch], token_scale, pair_scale).item()
    return loss, [p.grad.detach().float().clone() for p in backend._params]


def _torch_flce(input, weight, target, bias=None, reduction="mean", softcap=None, **_ignored):
    """Liger's liger_fused_linear_cross_entropy computed by plain torch ops (its Triton kernel runs only on CUDA):
    what the kernel returns, so the CPU test checks the call overnight makes (arguments, sign, temperature)."""
    import torch
    import torch.nn.functional as F

    logits = F.linear(input, weight, bias).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, target, reduction=reduction)


@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_the_liger_call_computes_the_chunked_heads_values(tiny_model_dir, method, monkeypatch):
    """model.loss_kernel=liger hands Liger's fused linear cross-entropy the target positions' hidden states, the head
    and the targets (grpo: the hidden states / temperature): with the kernel's values computed by torch (its Triton
    kernel needs CUDA; test_cuda_liger_loss_kernel runs the real one) losses and LoRA gradients are the chunked
    head's, 4-bit with dropout."""
    batch = _method_batch(tiny_model_dir, method)
    overrides = dict(bits=4, lora__dropout=0.1, data__method=method, grpo__beta=0.05, grpo__temperature=0.7)
    backend, _ = make_backend(tiny_model_dir, **overrides)
    chunked = _loss_and_grads(backend, batch, method)
    backend, _ = make_backend(tiny_model_dir, **overrides)
    backend._liger = _torch_flce
    liger = _loss_and_grads(backend, batch, method)
    assert liger[0] == pytest.approx(chunked[0], rel=1e-5, abs=1e-6)
    for got, want in zip(liger[1], chunked[1]):
        assert np.allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6)


def test_liger_is_refused_by_name_where_it_cannot_run(tiny_model_dir, tmp_path):
    """On a machine without CUDA (this one), on the mlx backend, and for a reward model: exit 2 naming the key and
    the way out, before any step."""
    from overnight.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.loss_kernel.*CUDA GPUs.*model.loss_kernel=chunked"):
        make_backend(tiny_model_dir, bits=4, model__loss_kernel="liger")
    from test_grpo import cli

    data = Path(__file__).resolve().parent.parent / "data"
    done = cli(["train", "--backend", "torch", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                str(tmp_path / "run"), "--max-steps", "1", "--quiet", "--set", "model.loss_kernel=liger"])
    assert done.returncode == 2 and "config key 'model.loss_kernel'" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if has("mlx"):
        done = cli(["train", "--backend", "mlx", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                    str(tmp_path / "mlx"), "--max-steps", "1", "--quiet", "--set", "model.loss_kernel=liger"])
        assert done.returncode == 2, done.stderr[-2000:]
        assert "backend mlx computes the loss with chunked, not liger" in done.stderr
    done = cli(["train", "--backend", "torch", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                str(tmp_path / "typo"), "--max-steps", "1", "--quiet", "--set", "model.loss_kernel=ligre"])
    assert done.returncode == 2 and "model.loss_kernel" in done.stderr and "liger" in done.stderr


@pytest.mark.parametrize("version", ["0.6.4", "0.8.1", "0.8.2"])
def test_a_liger_kernel_whose_per_token_gradients_are_wrong_is_refused(tiny_model_dir, tmp_path, monkeypatch,
                                                                      version):
    """Before 0.8.2 Liger's fused linear cross-entropy with reduction "none" scales every token's input gradient by
    the first token's upstream gradient (Liger-Kernel #1298): dpo's and grpo's per-token weights differ, so the LoRA
    gradients would be silently wrong. Such an install is refused by its version (read from its metadata, so this
    CPU checks it too); 0.8.2 gets as far as the GPU check."""
    from overnight.config import ConfigError

    info = tmp_path / f"liger_kernel-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: liger-kernel\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    if version == "0.8.2":
        with pytest.raises(ConfigError, match=r"liger runs on CUDA GPUs"):
            make_backend(tiny_model_dir, model__loss_kernel="liger")
    else:
        with pytest.raises(ConfigError, match=rf"model.loss_kernel.*liger-kernel {version}.*gradient.*"
                                              r"liger-kernel>=0.8.2.*model.loss_kernel=chunked"):
            make_backend(tiny_model_dir, model__loss_kernel="liger")


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["sft", "dpo", "grpo"])
def test_cuda_liger_loss_kernel(tiny_model_dir, method):
    """The real kernel on the GPU (bf16, 4-bit, dropout): losses and LoRA gradients of the chunked head's to bf16
    rounding, and its setup says so."""
    pytest.importorskip("liger_kernel")
    batch = _method_batch(tiny_model_dir, method)
    overrides = dict(bits=4, lora__dropout=0.1, data__method=method, grpo__beta=0.05, grpo__temperature=0.7)
    chunked = _loss_and_grads(make_backend(tiny_model_dir, **overrides)[0], batch, method)
    backend, info = make_backend(tiny_model_dir, model__loss_kernel="liger", **overrides)
    assert "Liger" in info.details["loss_head"]
    liger = _loss_and_grads(backend, batch, method)
    print(f"liger {method}: loss {liger[0]:.6f} vs chunked {chunked[0]:.6f}")
    assert liger[0] == pytest.approx(chunked[0], rel=2e-2, abs=1e-3)
    for got, want in zip(liger[1], chunked[1]):
        cosine = float((got * want).sum() / (got.norm() * want.norm() + 1e-30))
        assert cosine > 0.99, cosine


def test_importing_the_backend_never_asks_the_hub_for_a_bitsandbytes_kernel(tmp_path):
    """bitsandbytes 0.50 on an AVX512-BF16 CPU fetches a 4-bit kernel from the hub at import (the `kernels`
    package): a network call at run time, and rounding that would depend on reaching the hub. A `kernels` whose
    get_kernel leaves a mark shows it is never called, and the package is importable again afterwards."""
    import subprocess
    import sys

    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    mark = tmp_path / "asked"
    (fake / "__init__.py").write_text(
        f"def get_kernel(*args, **kwargs):\n    open({str(mark)!r}, 'w').write(repr(args))\n    raise RuntimeError('no')\n")
    code = ("import sys, overnight.backends.torch_backend, bitsandbytes.functional as f; import kernels; "
            "print(bool(f.has_avx512bf16()), 'kernels' in sys.modules)")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not mark.exists(), mark.read_text()
    assert done.stdout.split()[1] == "True"
    # The mark is reachable at all: bitsandbytes imported with the fake in place, on a CPU that asks
    control = subprocess.run([sys.executable, "-c",
                              "import bitsandbytes.functional as f; print(bool(f.has_avx512bf16()))"],
                             capture_output=True, text=True, env=env, timeout=300)
    if control.stdout.strip() == "True":
        assert mark.exists()


def test_float16_compute_is_said_to_have_no_loss_scaling(tiny_model_dir):
    """model.dtype=float16 trains without a grad scaler (as mlx-lm's fp16 does): the start banner says so, since
    gradients below float16's range are lost without any error; bfloat16 and float32 carry no such note."""
    _, info = make_backend(tiny_model_dir, bits=0, model__dtype="float16")
    assert info.details["compute_dtype"] == "float16"
    assert "without loss scaling" in info.details["float16_note"]
    _, info = make_backend(tiny_model_dir, bits=0, model__dtype="bfloat16")
    assert "float16_note" not in info.details
