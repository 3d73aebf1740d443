"""What a local model folder is, read before a framework loads it, so a folder that cannot work is refused in words
that say what is wrong with it, not in the library's (transformers' "no `quant_method` attribute" for an MLX
4-bit folder, mlx-lm's bare KeyError for a config.json without model_type), and never with advice to re-download
weight files that are fine. Both backends call it; it reads JSON and safetensors headers only.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from overnight.config import ConfigError


def read_config(model_dir: Path) -> dict:
    """The folder's config.json as a dict, or a ConfigError naming the file, what is wrong and what to do."""
    path = Path(model_dir) / "config.json"
    restore = "restore config.json from the original model (re-download or re-copy the model folder)"
    if not path.is_file():
        raise ConfigError(f"config key 'model.path': {model_dir} has no config.json, so it is not a Hugging Face or "
                          "MLX model folder: give the folder that holds config.json and the weight files")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config key 'model.path': {path} is not valid JSON (line {exc.lineno}, column "
                          f"{exc.colno}: {exc.msg}); the model's configuration is damaged: {restore}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config key 'model.path': {path} cannot be read ({exc}); {restore}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config key 'model.path': {path} holds a JSON {type(config).__name__}, not the object a "
                          f"model configuration is; {restore}")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ConfigError(f"config key 'model.path': {path} has no \"model_type\" (such as \"llama\" or "
                          f"\"qwen2\"), which says which architecture the weights are for: the file is incomplete "
                          f"or not a model configuration; {restore}")
    return config


def mlx_quantization(model_dir: Path, config: dict) -> dict | None:
    """The quantization of a folder mlx-lm quantized (`mlx_lm.convert -q`, mlx-community models): config.json's
    "quantization" ({"group_size", "bits"}), or packed weights with ``.scales`` and ``.biases`` beside them when
    the config does not say. None for any other folder (a bitsandbytes / GPTQ "quantization_config" included)."""
    recorded = config.get("quantization")
    if isinstance(recorded, dict) and "bits" in recorded and "group_size" in recorded:
        return recorded
    names = _weight_names(Path(model_dir))
    scaled = {name[: -len(".scales")] for name in names if name.endswith(".scales")}
    if any(f"{module}.biases" in names and f"{module}.weight" in names for module in scaled):
        return {}
    return None


def _weight_names(model_dir: Path) -> set[str]:
    index = model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
        names: set[str] = set()
        for weights in sorted(model_dir.glob("*.safetensors"))[:1]:  # one shard is enough to tell the layout
            with open(weights, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                names.update(json.loads(handle.read(length)))
        return names
    except (OSError, ValueError, struct.error, AttributeError):
        return set()  # unreadable weights are the loader's to report


def refuse_mlx_quantized_for_torch(model_dir: Path, config: dict) -> None:
    """transformers cannot read mlx-lm's packed 4-bit layout; say so instead of its error about quant_method."""
    q = mlx_quantization(model_dir, config)
    if q is None:
        return
    what = f"{q['bits']}-bit, group size {q['group_size']}" if q else "packed weights with scales and biases"
    raise ConfigError(
        f"config key 'model.path': {model_dir} is an MLX-quantized model ({what}, mlx-lm's format), which the torch "
        "backend (transformers + bitsandbytes) cannot load. Train it with --backend mlx, or give the torch backend "
        "the original unquantized model (it quantizes to 4-bit itself as it loads: model.quantization.bits)"
    )
