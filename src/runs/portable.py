"""The backend-neutral part of a checkpoint (SPEC §13): what a resume needs, in one layout both backends read.

Each checkpoint holds ``portable.safetensors`` beside the backend's native files. Its tensors are float32:

    lora.<module>.A              (rank, in_features)    the LoRA down-projection, PEFT's lora_A layout
    lora.<module>.B              (out_features, rank)   the up-projection (PEFT's lora_B; mlx-lm stores both transposed)
    lora.<module>.M              (out_features,)        DoRA's magnitude (lora.use_dora only; PEFT's
                                                        lora_magnitude_vector, mlx-lm's m: the same vector)
    adam.exp_avg.<module>.A|B|M  AdamW's first moment, same shape as the weight it belongs to
    adam.exp_avg_sq.<module>.A|B|M AdamW's second moment

where ``<module>`` is the neutral module name of src/backend/lora_init.py (``layers.3.self_attn.q_proj``). The
safetensors metadata holds the format, the AdamW step count (bias correction), the backend that wrote it and
the LoRA shape. The loop state (step, data position, early stopping, best) is trainer_state.json, already
neutral. Framework RNG states cannot cross, and no file here pretends they do.

The model a portable checkpoint continues on must be the same model (``model_shape``): the same architecture
(config.json without its quantization entries) and the same weight tensors by name and logical shape, so a
4-bit MLX conversion of a model and the Hugging Face folder it came from match, while another model of the
same size does not when its tensors differ in name or shape. Weight values are not compared (that would read
gigabytes); the same-backend fingerprint, which compares weight files, stays the check within one backend.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np

from overnight.backend import PortableState

FILE = "portable.safetensors"
FORMAT = "overnight-portable-1"
_KINDS = ("lora", "adam.exp_avg", "adam.exp_avg_sq")


class PortableError(ValueError):
    """A portable checkpoint is missing, unreadable or does not fit this run."""


def write(directory: Path, state: PortableState, backend: str) -> Path:
    """Write ``state`` into ``directory`` (a checkpoint's temporary folder: the manager fsyncs and hashes it)."""
    from safetensors.numpy import save_file

    if state.has_moments and not (set(state.exp_avg) == set(state.exp_avg_sq) == set(state.weights)):
        raise PortableError("AdamW moments and LoRA weights name different modules")
    tensors = {}
    for kind, group in zip(_KINDS, (state.weights, state.exp_avg, state.exp_avg_sq)):
        for key, value in group.items():
            tensors[f"{kind}.{key}"] = np.ascontiguousarray(value, dtype=np.float32)
    meta = {**state.meta, "format": FORMAT, "backend": backend, "adam_step": str(int(state.adam_step)),
            "moments": "yes" if state.has_moments else "no"}
    path = Path(directory) / FILE
    save_file(tensors, str(path), metadata=meta)
    _sort_metadata(path)
    return path


def _sort_metadata(path: Path) -> None:
    """The safetensors writer orders __metadata__ by a hash map's iteration, which changes from process to process:
    the same state gave different bytes on every save. Its keys sorted in place, the header the same length (the
    same compact JSON, only reordered), so the same state is the same file."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) != len(raw.rstrip(b" ")):
            return  # not the compact form this expects: left as written (still a valid file)
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


def read(directory: Path) -> PortableState:
    from safetensors.numpy import load_file

    path = Path(directory) / FILE
    if not path.is_file():
        raise PortableError(f"{path} is missing: the checkpoint was written before portable checkpoints existed, "
                            "so it can only be resumed on the backend that wrote it")
    meta = _metadata(path)
    if meta.get("format") != FORMAT:
        raise PortableError(f"{path}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
    groups: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in _KINDS}
    for name, value in load_file(str(path)).items():
        kind = next((k for k in sorted(_KINDS, key=len, reverse=True) if name.startswith(k + ".")), None)
        if kind is None:
            raise PortableError(f"{path}: unexpected tensor {name!r}")
        groups[kind][name[len(kind) + 1:]] = value
    return PortableState(groups["lora"], groups["adam.exp_avg"], groups["adam.exp_avg_sq"],
                         int(meta.get("adam_step", 0)), meta)


def _metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length)).get("__metadata__", {}) or {}


def check_fits(state: PortableState, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """``expected``: this run's LoRA weights by neutral key and shape. Raise naming what differs."""
    missing = sorted(set(expected) - set(state.weights))
    extra = sorted(set(state.weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state.weights) if tuple(state.weights[k].shape) != expected[k])
    if missing or extra or wrong:
        raise PortableError(
            f"the portable checkpoint in {where} does not fit this run's LoRA (lora.rank, lora.layers or "
            f"lora.targets differ?): missing {missing[:3]}, unexpected {extra[:3]}, other shape {wrong[:3]}")
    if not state.has_moments:
        raise PortableError(
            f"the portable checkpoint in {where} holds no AdamW moments (it was trained with "
            f"{state.meta.get('optimizer', 'an optimizer whose state is not portable')}); "
            "it cannot continue exactly on another backend")


# ---------------------------------------------------------------------------------------------- same model

# What defines the computation. Other config.json entries vary with the tool that wrote the folder
# (transformers 5 rewrites rope_theta into rope_parameters, mlx_lm.convert adds "quantization", names differ).
_ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
                      "hidden_act", "attention_bias", "mlp_bias")
_PACKED = re.compile(r"\.(scales|biases)$")


def model_shape(path: str) -> dict | None:
    """The model's architecture (the config.json entries that define the computation) and its weight tensors'
    names and logical shapes, quantization undone; None for a hub id (nothing local to read: the id itself is
    compared then). Never raises: a damaged folder gets an identity that matches nothing, and the backend's
    load reports the damage by name."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("config.json is not an object")
    except (OSError, ValueError):
        config = {"unreadable config.json": True}
    quant = config.get("quantization") or {}
    bits = int(quant.get("bits", 0) or 0) if isinstance(quant, dict) else 0
    tensors: dict[str, list] = {}
    for file in sorted(folder.glob("*.safetensors")):
        header = _header(file)
        if header is None:
            tensors[f"unreadable:{file.name}"] = [file.stat().st_size]
            continue
        for name, info in header.items():
            if name == "__metadata__" or _PACKED.search(name):
                continue  # MLX's quantization scales and biases: not part of the original model
            shape = list(info.get("shape", [])) if isinstance(info, dict) else []
            if bits and f"{name[:-len('.weight')]}.scales" in header and info.get("dtype") == "U32" and shape:
                shape[-1] = shape[-1] * 32 // bits  # packed uint32 words back to input features
            tensors[_hf_name(name)] = shape
    architecture = {k: config[k] for k in _ARCHITECTURE_KEYS + ("unreadable config.json",) if k in config}
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    architecture["rope_theta"] = config.get("rope_theta", rope.get("rope_theta"))
    # The tensor list of a large model is long: a manifest keeps its digest and count.
    listing = json.dumps(sorted(tensors.items())).encode()
    return {"architecture": architecture, "tensors": hashlib.sha256(listing).hexdigest(), "tensor_count": len(tensors)}


def _hf_name(name: str) -> str:
    # mlx_lm saves a model under the names it loaded them by (sanitize keeps HF names for Llama-like models);
    # a leading "model." is normalised anyway, since that is the only spelling difference seen in practice.
    return name[len("model."):] if name.startswith("model.") else name


def _header(file: Path) -> dict | None:
    """The safetensors header (names, dtypes, shapes), or None when the file is too damaged to have one."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > file.stat().st_size:
                return None
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    return header if isinstance(header, dict) else None


def same_model_differences(saved: dict | None, current: dict | None) -> list[str]:
    """What makes two models not the same model in the portable sense (empty: the same)."""
    if saved is None or current is None:
        return [] if saved == current else ["one side is a hub id, the other a local folder"]
    changes = []
    a, b = saved["architecture"], current["architecture"]
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            changes.append(f"config.json {key}: {a.get(key)!r} -> {b.get(key)!r}")
    if saved["tensors"] != current["tensors"]:
        changes.append(f"the weight tensors' names or shapes differ ({saved['tensor_count']} tensors -> "
                       f"{current['tensor_count']})")
    return changes


def save_resumable(backend, directory: Path) -> None:
    """A checkpoint's backend part: the native files (what each engine's tools load), then the portable copy.
    A backend without portable_state (a third-party one) writes only its native files."""
    backend.save(directory)
    if hasattr(backend, "portable_state"):
        write(directory, backend.portable_state(), backend.name)


def load_moved(backend, directory: Path) -> PortableState:
    """Continue a run another backend made: read its portable copy, check it against the LoRA this backend set
    up (names and shapes), hand it over."""
    if not (hasattr(backend, "load_portable") and hasattr(backend, "portable_state")):
        raise PortableError(f"backend {backend.name!r} cannot continue another backend's run (no load_portable)")
    state = read(directory)
    check_fits(state, {k: tuple(v.shape) for k, v in backend.portable_state().weights.items()}, str(directory))
    backend.load_portable(state)
    return state
