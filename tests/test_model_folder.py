"""A model folder that cannot work is refused saying what is wrong with it (src/backend/model_folder.py, and the
tokenizer's read of config.json): a damaged config.json is not a tokenizer problem, and an MLX-quantized folder
on torch is not a download to repeat."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from overnight.backend import model_folder
from overnight.config import ConfigError

from conftest import DATA_DIR, ROOT, has

TESTS = Path(__file__).resolve().parent


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120, cwd=ROOT)


def train_args(model: Path, out: Path, backend: str) -> list[str]:
    return ["train", "--backend", backend, "--model", str(model), "--data", str(DATA_DIR), "--output", str(out),
            "--max-steps", "2", "--quiet"]


def copy_with_config(model_dir: Path, out: Path, text: str) -> Path:
    shutil.copytree(model_dir, out)
    (out / "config.json").write_text(text)
    return out


def mlx_quantized(model_dir: Path, out: Path) -> Path:
    """What `mlx_lm.convert -q` writes for the tiny model (mlx-lm quantizes every Linear and Embedding whose input
    width divides by the group size): packed uint32 weights with .scales and .biases, and the config's
    "quantization" (also as "quantization_config"). Made with mlx.core's own quantize, without mlx_lm's 5 s
    import."""
    import mlx.core as mx

    shutil.copytree(model_dir, out)
    weights = mx.load(str(out / "model.safetensors"))
    packed = {}
    for name, value in weights.items():
        if name.endswith(".weight") and value.ndim == 2 and value.shape[-1] % 64 == 0:
            stem = name[: -len(".weight")]
            packed[name], packed[f"{stem}.scales"], packed[f"{stem}.biases"] = mx.quantize(value, group_size=64, bits=4)
        else:
            packed[name] = value
    mx.save_safetensors(str(out / "model.safetensors"), packed, metadata={"format": "mlx"})
    config = json.loads((out / "config.json").read_text())
    config["quantization"] = config["quantization_config"] = {"group_size": 64, "bits": 4, "mode": "affine"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_damaged_config_json_is_named_with_what_to_do(tiny_model_dir, tmp_path):
    broken = copy_with_config(tiny_model_dir, tmp_path / "broken", '{"model_type": "llama",\n')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON \(line 2, column 1: .*restore config.json"):
        model_folder.read_config(broken)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    del config["model_type"]
    untyped = copy_with_config(tiny_model_dir, tmp_path / "untyped", json.dumps(config))
    with pytest.raises(ConfigError, match=r'config.json has no "model_type" \(such as "llama"'):
        model_folder.read_config(untyped)
    listed = copy_with_config(tiny_model_dir, tmp_path / "listed", "[]")
    with pytest.raises(ConfigError, match="holds a JSON list"):
        model_folder.read_config(listed)
    assert model_folder.read_config(tiny_model_dir)["model_type"] == "llama"

    # Where a user meets it: the data check reads config.json first (for the model's stop ids).
    result = cli(*train_args(broken, tmp_path / "run", "refbackend:NumpyBackend"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "config.json: cannot be read as JSON" in result.stderr and "restore config.json" in result.stderr
    assert "tokenizer" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not has("mlx"), reason="mlx is not installed")
def test_an_mlx_quantized_folder_is_recognised_by_its_config_or_its_weights(tiny_model_dir, tmp_path):
    folder = mlx_quantized(tiny_model_dir, tmp_path / "q4")
    config = json.loads((folder / "config.json").read_text())
    assert model_folder.mlx_quantization(folder, config) == {"group_size": 64, "bits": 4, "mode": "affine"}
    del config["quantization"], config["quantization_config"]
    assert model_folder.mlx_quantization(folder, config) == {}  # the packed weights say it
    assert model_folder.mlx_quantization(tiny_model_dir, config) is None
    bnb = dict(config, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    assert model_folder.mlx_quantization(tiny_model_dir, bnb) is None


@pytest.mark.torch
@pytest.mark.skipif(not has("mlx", "torch", "transformers", "peft"), reason="needs mlx (to quantize) and torch")
def test_an_mlx_quantized_folder_on_torch_says_so_and_what_to_use(tiny_model_dir, tmp_path):
    folder = mlx_quantized(tiny_model_dir, tmp_path / "q4")
    result = cli(*train_args(folder, tmp_path / "run", "torch"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is an MLX-quantized model (4-bit, group size 64" in result.stderr
    assert "--backend mlx" in result.stderr and "original unquantized model" in result.stderr
    assert "re-download" not in result.stderr and "Traceback" not in result.stderr
