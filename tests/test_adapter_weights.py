"""An adapter's weights in the neutral layout (src/backend/adapter_weights.py): both formats read to the same numbers,
bf16 widened exactly, the folder found from a run or checkpoint folder, and what does not fit named. Framework-free:
the adapters are written here byte by byte in PEFT's layout and converted with convert-adapter's own code."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from overnight.backend.adapter_formats import PEFT_PREFIX, Tensor, convert_adapter, write_safetensors
from overnight.backend.adapter_weights import as_float32, find_adapter, fit_differences, read_adapter
from overnight.errors import UsageError

RANK, HIDDEN, KV = 4, 64, 32  # the tiny model's q_proj (64 -> 64) and v_proj (64 -> 32)


def peft_adapter(folder: Path, blocks=(1,), rank: int = RANK, alpha: float = 8.0, dtype: str = "F32",
                 base: str | None = None, seed: int = 0, **config) -> tuple[Path, dict[str, np.ndarray]]:
    """A PEFT adapter as save_pretrained writes it, with random A and B; returns it and its neutral weights."""
    rng = np.random.default_rng(seed)
    tensors, neutral = {}, {}
    for block in blocks:
        for path, out in (("self_attn.q_proj", HIDDEN), ("self_attn.v_proj", KV)):
            a = rng.standard_normal((rank, HIDDEN)).astype(np.float32)
            b = rng.standard_normal((out, rank)).astype(np.float32)
            if dtype == "BF16":  # values bf16 holds exactly, stored as their top 16 bits
                a, b = [(x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for x in (a, b)]
            name = f"model.layers.{block}.{path}"
            for kind, value in (("lora_A", a), ("lora_B", b)):
                stored = (value.view(np.uint32) >> np.uint32(16)).astype(np.uint16) if dtype == "BF16" else value
                tensors[f"{PEFT_PREFIX}{name}.{kind}.weight"] = Tensor(dtype, stored)
            neutral[f"layers.{block}.{path}.A"], neutral[f"layers.{block}.{path}.B"] = a, b
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"], "bias": "none",
        "base_model_name_or_path": base, "layers_to_transform": list(blocks), **config}))
    return folder, neutral


def test_a_peft_adapter_reads_in_the_neutral_layout(tmp_path):
    folder, neutral = peft_adapter(tmp_path / "a", blocks=(0, 1), base="/models/tiny")
    got = read_adapter(folder)
    assert got.format == "peft" and got.rank == RANK and got.scale == 2.0 and got.blocks == [0, 1]
    assert got.block_paths == ["self_attn.q_proj", "self_attn.v_proj"] and got.base == "/models/tiny"
    assert sorted(got.weights) == sorted(neutral)
    for key, value in neutral.items():
        assert got.weights[key].dtype == np.float32 and np.array_equal(got.weights[key], value), key
    assert got.weights["layers.0.self_attn.v_proj.B"].shape == (KV, RANK)  # (out, rank), PEFT's layout
    assert len(got.sha256) == 64 and got.identity() == {"path": str(folder.resolve()), "sha256": got.sha256}


def test_the_mlx_format_reads_to_the_same_numbers(tmp_path):
    folder, neutral = peft_adapter(tmp_path / "peft", blocks=(0, 1), layers_to_transform=None)  # every block
    convert_adapter(folder, "mlx", tmp_path / "mlx", say=lambda m: None)
    got = read_adapter(tmp_path / "mlx")
    assert got.format == "mlx" and got.scale == 2.0 and got.rank == RANK and got.blocks == [0, 1]
    assert sorted(got.weights) == sorted(neutral)
    assert all(np.array_equal(got.weights[k], v) for k, v in neutral.items())


def test_bf16_is_widened_exactly(tmp_path):
    folder, neutral = peft_adapter(tmp_path / "a", dtype="BF16")
    got = read_adapter(folder)
    assert all(got.weights[k].dtype == np.float32 and np.array_equal(got.weights[k], v) for k, v in neutral.items())
    half = Tensor("F16", np.array([[0.5, -2.25]], dtype=np.float16))
    assert as_float32(half).tolist() == [[0.5, -2.25]]


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    folder, _ = peft_adapter(tmp_path / "a", alpha=8.0, use_rslora=True)
    assert read_adapter(folder).scale == 8.0 / 2.0


def test_a_run_or_checkpoint_folder_finds_its_adapter(tmp_path):
    folder, _ = peft_adapter(tmp_path / "run" / "adapter")
    assert find_adapter(tmp_path / "run") == find_adapter(folder) == folder.resolve()


@pytest.mark.parametrize("make, says", [
    ("missing", "no such file or folder"), ("empty", "neither adapters.safetensors"),
    ("pickled", "adapter_model.bin"), ("dora", "DoRA"), ("bias", "bias='all'")])
def test_what_cannot_start_a_run_is_named(tmp_path, make, says):
    folder = tmp_path / "a"
    if make in ("dora", "bias"):
        peft_adapter(folder, **({"use_dora": True} if make == "dora" else {"bias": "all"}))
    elif make != "missing":
        folder.mkdir()
        if make == "pickled":
            (folder / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(UsageError, match=says):
        read_adapter(folder)


def test_fit_differences_name_missing_extra_and_other_shapes(tmp_path):
    folder, neutral = peft_adapter(tmp_path / "a")
    adapter = read_adapter(folder)
    expected = {k: v.shape for k, v in neutral.items()}
    assert fit_differences(adapter, expected) == []
    more = {**expected, "layers.0.self_attn.q_proj.A": (RANK, HIDDEN)}
    assert fit_differences(adapter, more) == ["this run has LoRA the adapter lacks: layers.0.self_attn.q_proj.A"]
    wider = {**expected, "layers.1.self_attn.q_proj.A": (RANK, 128)}
    assert fit_differences(adapter, wider) == [
        "layers.1.self_attn.q_proj.A is [4, 64] in the adapter, [4, 128] in this run"]
    fewer = {k: v for k, v in expected.items() if "v_proj" not in k}
    assert fit_differences(adapter, fewer) == [
        "the adapter has LoRA this run lacks: layers.1.self_attn.v_proj.A, layers.1.self_attn.v_proj.B"]
