"""An existing LoRA adapter's weights in the one layout both backends load (`lora.init_from`, a new run started from
an adapter, like mlx-lm's --resume-adapter-file): framework-free, so torch and mlx receive the same numbers.

Either format is read (adapter_formats: PEFT's adapter_model.safetensors, mlx-lm's adapters.safetensors) into

    <module>.A   (rank, in_features)    float32, PEFT's lora_A layout
    <module>.B   (out_features, rank)   float32, PEFT's lora_B layout

with ``<module>`` the neutral module name (lora_init.neutral_module_name, ``layers.3.self_attn.q_proj``): the keys
and layout of Backend.portable_state().weights, which is what the backend is checked against and handed. Values
are widened to float32 exactly (bf16 and fp16 included), never rounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from overnight.backend import lora_init
from overnight.backend.adapter_formats import (_MLX_KEY, _PEFT_KEY, CONFIG, MLX_WEIGHTS,
                                               PEFT_WEIGHTS, Tensor, _collect, _read_config, detect_format,
                                               read_safetensors, refuse_beyond_plain_lora)
from overnight.errors import UsageError
from overnight.fsutil import sha256_file


@dataclass
class AdapterWeights:
    folder: Path  # the adapter folder (holding the weights file and adapter_config.json)
    format: str  # "peft" | "mlx"
    weights: dict[str, np.ndarray]  # neutral keys, float32, PEFT layout (see the module docstring)
    rank: int
    scale: float  # what the adapter's update is multiplied by (alpha / rank, or mlx-lm's scale)
    blocks: list[int]  # the block indices it has LoRA on
    block_paths: list[str]  # the module paths inside a block, e.g. ["self_attn.q_proj", "self_attn.v_proj"]
    base: str | None  # the base model its config records (PEFT base_model_name_or_path, mlx-lm "model")
    sha256: str  # of the weights file: what the run's fingerprint records
    modules: int  # LoRA modules (pairs of A and B)

    def identity(self) -> dict:
        return {"path": str(self.folder), "sha256": self.sha256}


def find_adapter(path: str | Path) -> Path:
    """The adapter folder ``path`` names: an adapter folder itself, or a folder with one in ``adapter/`` (a run
    directory's final adapter, a checkpoint's). UsageError saying what is there when there is none."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder" + (" (no such file or folder)" if not folder.exists() else ""))
    for candidate in (folder, folder / "adapter"):
        if (candidate / MLX_WEIGHTS).is_file() or (candidate / PEFT_WEIGHTS).is_file():
            return candidate.resolve()
    detect_format(folder / "adapter" if (folder / "adapter").is_dir() else folder)  # raises, saying what is there
    raise UsageError(f"{folder} holds no adapter")


def as_float32(tensor: Tensor) -> np.ndarray:
    """The tensor's values as float32, exactly: bf16 is the top half of a float32's bits."""
    if tensor.dtype == "BF16":
        return (tensor.array.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return tensor.array.astype(np.float32)


def read_adapter(path: str | Path) -> AdapterWeights:
    """Read an adapter folder (or a run / checkpoint folder holding ``adapter/``) of either format. Raises
    UsageError naming what cannot be used: an unreadable file, DoRA and the other PEFT features a plain LoRA
    start cannot hold."""
    folder = find_adapter(path)
    kind = detect_format(folder)
    config = _read_config(folder)
    if kind == "peft":
        refuse_beyond_plain_lora(config, folder / CONFIG, "overnight's LoRA", "start a run")
        tensors, _ = read_safetensors(folder / PEFT_WEIGHTS)
        modules = _collect(tensors, _PEFT_KEY, "lora_A", to_peft_layout=False, source=folder / PEFT_WEIGHTS)
        rank = modules[0].a.array.shape[0]
        alpha = float(config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        base = config.get("base_model_name_or_path")
    else:
        if config.get("fine_tune_type", "lora") != "lora":
            raise UsageError(f"{folder / CONFIG}: fine_tune_type is {config.get('fine_tune_type')!r}; only a plain "
                             "LoRA adapter can start a run")
        tensors, _ = read_safetensors(folder / MLX_WEIGHTS)
        modules = _collect(tensors, _MLX_KEY, "lora_a", to_peft_layout=True, source=folder / MLX_WEIGHTS)
        rank = modules[0].a.array.shape[0]
        scale = float((config.get("lora_parameters") or {}).get("scale", 20.0))  # mlx-lm's default
        base = config.get("model")
    weights = {}
    for m in modules:
        name = lora_init.neutral_module_name(m.module)
        weights[f"{name}.A"], weights[f"{name}.B"] = as_float32(m.a), as_float32(m.b)
    return AdapterWeights(folder, kind, weights, int(rank), float(scale), sorted({m.layer for m in modules}),
                          sorted({m.block_path for m in modules}), str(base) if base else None,
                          sha256_file(folder / (PEFT_WEIGHTS if kind == "peft" else MLX_WEIGHTS)), len(modules))


def fit_differences(adapter: AdapterWeights, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps the adapter from being this run's initial LoRA: ``expected`` is the run's LoRA by neutral key
    and shape (Backend.portable_state()). Empty when it fits exactly."""
    missing = sorted(set(expected) - set(adapter.weights))
    extra = sorted(set(adapter.weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(adapter.weights) if tuple(adapter.weights[k].shape) != expected[k])
    out = []
    if missing:
        out.append(f"this run has LoRA the adapter lacks: {_some(missing)}")
    if extra:
        out.append(f"the adapter has LoRA this run lacks: {_some(extra)}")
    for key in wrong[:3]:
        out.append(f"{key} is {list(adapter.weights[key].shape)} in the adapter, {list(expected[key])} in this run")
    if len(wrong) > 3:
        out.append(f"... and {len(wrong) - 3} more of another shape")
    return out


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
