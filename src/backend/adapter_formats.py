"""`overnight convert-adapter`: a LoRA adapter moved exactly between mlx-lm's format and PEFT's (SPEC §13).

Pure data, no ML framework (SPEC §2): tensors are renamed and transposed as raw safetensors bytes, so every
dtype (bf16 included, which numpy cannot name) crosses bit for bit.

    mlx-lm  adapters.safetensors   model.layers.N.<path>.lora_a  (in, r)   lora_b (r, out)
            adapter_config.json    fine_tune_type, num_layers (the last N blocks), lora_parameters
                                   {rank, scale, dropout, keys (block-relative paths)}, model
    PEFT    adapter_model.safetensors  base_model.model.model.layers.N.<path>.lora_A.weight (r, in)
                                                                          .lora_B.weight (out, r)
            adapter_config.json    r, lora_alpha (scale = lora_alpha / r, or / sqrt(r) with use_rslora),
                                   lora_dropout, target_modules, layers_to_transform, base_model_name_or_path

The module path inside the model (``model.layers.N.self_attn.q_proj``) is kept as it is: mlx-lm's model code
names its modules as the Hugging Face checkpoints do for the architectures both load (Llama, Mistral, Qwen...).
Anything one format can express and the other cannot (per-module ranks, extra trained modules, LoRA on some blocks
that are not the last N) is refused by name, never approximated.

DoRA (src/backend/lora_init.py, DORA) converts too: both libraries keep the same magnitude vector, one value per
output row of the layer, so it moves as it is, renamed:

    mlx-lm  fine_tune_type "dora"; model.layers.N.<path>.m                      (out,)
    PEFT    use_dora true;         base_model.model.model.layers.N.<path>.lora_magnitude_vector  (out,)

A reward model's DoRA adapter is refused (overnight does not train one; see config.py).

A reward model's adapter (`--method reward`) also carries its score head (hidden -> 1), moved as it is, (1, hidden)
on both sides, and in both formats a reward_head.json (REWARD_HEAD) beside it: {"num_labels": 1, "pad_token_id": N,
"score_file": FILE, "score_key": KEY}. Each library's own files hold only what that library reads:

    mlx-lm  adapters.safetensors   LoRA tensors only (mlx_lm.load(model, adapter_path=...) refuses any other)
            score_head.safetensors score.weight (MLX_HEAD_WEIGHTS, MLX_SCORE_KEY)
    PEFT    adapter_model.safetensors  the LoRA tensors and base_model.model.score.weight (PEFT_SCORE_KEY)
            adapter_config.json    task_type SEQ_CLS, modules_to_save ["score"]: LoraConfig's own keys only (PEFT warns
                                   about any other key on every load)
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from overnight.errors import UsageError
from overnight.fsutil import fsync_dir, fsync_file, give_default_modes, pid_alive

MLX_WEIGHTS, PEFT_WEIGHTS, CONFIG = "adapters.safetensors", "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# A reward model's score head (hidden -> 1, objectives.py), beside its LoRA tensors: PEFT's name for a SEQ_CLS
# adapter's modules_to_save ["score"] (what AutoModelForSequenceClassification + PeftModel.from_pretrained read), and
# the name in an mlx adapters.safetensors, where the head is kept as (1, hidden) too.
PEFT_SCORE_KEY, MLX_SCORE_KEY = "base_model.model.score.weight", "score.weight"
# The head's key in a portable checkpoint's weights (src/runs/portable.py stores it as lora.score.weight).
PORTABLE_SCORE_KEY = "score.weight"
# Where a reward adapter says how its score is read (one label, the pad id the score position skips, where the head
# is): a file of its own, since neither adapter_config.json may hold more than its library reads.
REWARD_HEAD = "reward_head.json"
MLX_HEAD_WEIGHTS = "score_head.safetensors"
HEAD_PLACE = {"peft": (PEFT_WEIGHTS, PEFT_SCORE_KEY), "mlx": (MLX_HEAD_WEIGHTS, MLX_SCORE_KEY)}
_MLX_KEY = re.compile(r"^(?P<module>.*\.layers\.(?P<layer>\d+)\.(?P<path>.+))\.(?P<kind>lora_a|lora_b)$")
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.*\.layers\.(?P<layer>\d+)\.(?P<path>.+))"
                       r"\.(?P<kind>lora_A|lora_B)(?:\.default)?\.weight$")
# DoRA's magnitude vectors: mlx-lm's DoRALinear.m, PEFT's lora_magnitude_vector (saved without ".weight").
MLX_MAGNITUDE = re.compile(r"^(?P<module>.*\.layers\.\d+\..+)\.m$")
PEFT_MAGNITUDE = re.compile(r"^base_model\.model\.(?P<module>.*\.layers\.\d+\..+)\.lora_magnitude_vector"
                             r"(?:\.default)?(?:\.weight)?$")
# numpy stand-ins of the same width: bytes are moved, never reinterpreted as numbers.
_ITEM_DTYPE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}

# PEFT features that have no mlx-lm equivalent; each must be off for the conversion to be exact.
_PEFT_UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vectors (use_dora)",
    "rank_pattern": "per-module ranks (rank_pattern)", "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)", "lora_bias": "LoRA bias vectors",
    "layer_replication": "layer_replication", "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layers)",
    "target_parameters": "LoRA on parameters (target_parameters)", "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable token embeddings", "alora_invocation_tokens": "activated LoRA",
}


@dataclass
class Tensor:
    dtype: str  # the safetensors dtype name, kept as it is
    array: np.ndarray  # a same-width numpy view of the raw values


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
            data = handle.read()
    except (OSError, struct.error, ValueError) as exc:
        raise UsageError(f"{path} is not a readable safetensors file ({exc.__class__.__name__}: {exc})") from None
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, meta in header.items():
        if meta["dtype"] not in _ITEM_DTYPE:
            raise UsageError(f"{path}: tensor {name} has dtype {meta['dtype']}, not a float type a LoRA adapter uses")
        start, end = meta["data_offsets"]
        raw = np.frombuffer(data[start:end], dtype=_ITEM_DTYPE[meta["dtype"]])
        tensors[name] = Tensor(meta["dtype"], raw.reshape(meta["shape"]))
    return tensors, metadata


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for name in sorted(tensors):
        tensor = tensors[name]
        blob = np.ascontiguousarray(tensor.array).tobytes()
        header[name] = {"dtype": tensor.dtype, "shape": list(tensor.array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format aligns the data on 8 bytes
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for blob in blobs:
            handle.write(blob)


def detect_format(adapter_dir: Path) -> str:
    if (adapter_dir / MLX_WEIGHTS).is_file():
        return "mlx"
    if (adapter_dir / PEFT_WEIGHTS).is_file():
        return "peft"
    if (adapter_dir / "adapter_model.bin").is_file():
        raise UsageError(f"{adapter_dir} holds a pickled PEFT adapter (adapter_model.bin); re-save it with "
                         "safe_serialization=True (adapter_model.safetensors) and convert that")
    raise UsageError(f"{adapter_dir} is not an adapter folder: it has neither {MLX_WEIGHTS} (mlx-lm) nor "
                     f"{PEFT_WEIGHTS} (PEFT)")


def _read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: an adapter folder needs its config beside the weights") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} does not hold a JSON object")
    return config


def recorded_base(base: str | None) -> str | None:
    """The base model as an adapter records it: a local folder by its absolute path, a hub id as given. A relative
    path (`runs/tiny-model`) only means that folder from where it was typed; anywhere else PEFT's and transformers'
    loaders take it for a hub id."""
    if not base:
        return base
    local = Path(base).expanduser()
    return str(local.resolve()) if local.is_dir() else base


def _base_layer_count(base: str | None) -> int | None:
    """num_hidden_layers of a local base model folder, if one is known."""
    if not base:
        return None
    config_path = Path(base).expanduser() / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    count = config.get("num_hidden_layers")
    return int(count) if isinstance(count, int) else None


@dataclass
class LoraModule:
    module: str  # the path inside the model, e.g. model.layers.3.self_attn.q_proj
    layer: int
    block_path: str  # the path inside its block, e.g. self_attn.q_proj
    a: Tensor  # PEFT layout (r, in)
    b: Tensor  # PEFT layout (out, r)
    magnitude: Tensor | None = None  # DoRA's (out,), the same in both formats


def _transposed(tensor: Tensor) -> Tensor:
    return Tensor(tensor.dtype, tensor.array.T)


def _collect(tensors: dict[str, Tensor], pattern: re.Pattern, a_kind: str, to_peft_layout: bool,
             source: Path) -> list[LoraModule]:
    parts: dict[str, dict] = {}
    for name, tensor in tensors.items():
        match = pattern.match(name)
        if not match:
            raise UsageError(f"{source}: tensor {name!r} is not a LoRA weight inside a numbered block "
                             "(layers.N.); only plain LoRA on block layers converts exactly")
        if tensor.array.ndim != 2:
            raise UsageError(f"{source}: tensor {name!r} has shape {list(tensor.array.shape)}; LoRA on stacked "
                             "expert layers (MoE) has no PEFT equivalent, only 2-D LoRA matrices convert")
        entry = parts.setdefault(match["module"], {"layer": int(match["layer"]), "path": match["path"]})
        tensor = _transposed(tensor) if to_peft_layout else tensor
        entry["a" if match["kind"] == a_kind else "b"] = tensor
    modules = []
    for module, entry in sorted(parts.items(), key=lambda kv: (kv[1]["layer"], kv[0])):
        if "a" not in entry or "b" not in entry:
            raise UsageError(f"{source}: {module} has only one of its two LoRA matrices")
        modules.append(LoraModule(module, entry["layer"], entry["path"], entry["a"], entry["b"]))
    if not modules:
        raise UsageError(f"{source} holds no LoRA weights")
    ranks = {m.a.array.shape[0] for m in modules} | {m.b.array.shape[1] for m in modules}
    if len(ranks) != 1:
        raise UsageError(f"{source}: the LoRA modules have different ranks {sorted(ranks)}; mlx-lm and a plain "
                         "PEFT config hold one rank for all")
    return modules


def _last_blocks(layers: list[int], total: int | None, source: str) -> int:
    """mlx-lm puts LoRA on the last ``num_layers`` blocks: the adapter's blocks must be exactly those."""
    lowest = min(layers)
    top = total if total is not None else max(layers) + 1
    if layers != list(range(lowest, top)):
        raise UsageError(f"{source}: LoRA sits on blocks {layers}, which are not the last blocks of a "
                         f"{top}-block model; mlx-lm can only hold LoRA on the last N blocks")
    return top - lowest


def refuse_beyond_plain_lora(config: dict, where: Path, holder: str, purpose: str, dora_ok: bool = False) -> None:
    """A PEFT adapter_config.json that is more than plain LoRA (another PEFT type, DoRA unless ``dora_ok`` and the
    other features in _PEFT_UNSUPPORTED, bias vectors) cannot ``purpose`` (be converted exactly, start a run):
    UsageError naming the key, since ``holder`` (mlx-lm's LoRA, overnight's LoRA) has nowhere to put it."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{where}: peft_type is {config.get('peft_type')}; only a LoRA adapter can {purpose}")
    for key, what in _PEFT_UNSUPPORTED.items():
        if key == "use_dora" and dora_ok:
            continue
        if config.get(key):
            raise UsageError(f"{where}: {what} ({key}={config[key]!r}) has no place in {holder}; this adapter "
                             f"cannot {purpose}")
    if config.get("bias", "none") != "none":
        raise UsageError(f"{where}: bias={config['bias']!r} trains bias vectors {holder} does not have; only "
                         f"bias='none' can {purpose}")


# What PEFT puts in a SEQ_CLS adapter's modules_to_save on its own (peft_model.CLASSIFIER_MODULE_NAMES, whatever the
# model calls its head: "classifier" and "score" before PEFT 0.22, "pre_classifier" too since): only "score" is a
# decoder-only classifier's head, and only its weight may be in the file.
_SEQ_CLS_MODULES = {"score", "classifier", "pre_classifier"}


@dataclass
class ScoreHead:
    weight: Tensor  # (1, hidden), the safetensors dtype kept
    pad_token_id: int  # the token the score is read before (objectives.score_positions): part of the model


def _check_head(tensor: Tensor | None, where: Path, key: str) -> Tensor:
    if tensor is None:
        raise UsageError(f"{where}: a reward model's adapter must hold its score head {key}; it is missing")
    if tensor.array.ndim != 2 or tensor.array.shape[0] != 1:
        raise UsageError(f"{where}: the score head {key} has shape {list(tensor.array.shape)}; a reward model has "
                         "one label, (1, hidden): a classifier with more labels does not convert")
    return tensor


def reward_head_text(fmt: str, pad_token_id: int) -> str:
    """reward_head.json of a reward adapter in ``fmt`` (peft | mlx): what the score is, where it is read, where the
    head is stored."""
    weights, key = HEAD_PLACE[fmt]
    return json.dumps({"num_labels": 1, "pad_token_id": int(pad_token_id), "score_file": weights, "score_key": key},
                      indent=2, sort_keys=True) + "\n"


def read_reward_head(adapter_dir: Path, fmt: str) -> dict | None:
    """A reward adapter's reward_head.json, checked against the ``fmt`` layout (None when there is none);
    UsageError naming the file and the key that is wrong."""
    path = Path(adapter_dir) / REWARD_HEAD
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path} is not readable JSON ({exc})") from None
    weights, key = HEAD_PLACE[fmt]
    expected = {"num_labels": 1, "score_file": weights, "score_key": key}
    if not isinstance(spec, dict):
        raise UsageError(f"{path} must be a JSON object like {json.loads(reward_head_text(fmt, 0))}")
    for name, value in expected.items():
        if spec.get(name) != value:
            raise UsageError(f"{path}: {name} is {spec.get(name)!r}; a {fmt} reward adapter has {name} {value!r}"
                             + (" (a reward model has one label, whose output is the reward)"
                                if name == "num_labels" else ""))
    pad = spec.get("pad_token_id")
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise UsageError(f"{path}: pad_token_id is {pad!r}; it must be the token id the score position skips (the "
                         "pad id the model was trained with, a whole number >= 0)")
    return spec


def peft_score_head(config: dict, tensors: dict[str, Tensor], adapter_dir: Path,
                    base: str | None) -> ScoreHead | None:
    """A PEFT SEQ_CLS adapter's score head, taken out of ``tensors`` (None for any other task type); UsageError
    naming what is wrong. The pad id is the adapter's reward_head.json's (what a torch reward run writes), else its
    base's config.json pad_token_id, which is what transformers reads the score with. convert-adapter and the
    torch fuse."""
    if config.get("task_type") != "SEQ_CLS":
        return None
    where = adapter_dir / CONFIG
    saved = config.get("modules_to_save")
    if not isinstance(saved, list) or "score" not in saved or not set(saved) <= _SEQ_CLS_MODULES:
        raise UsageError(f"{where}: a SEQ_CLS adapter converts when its trained head is 'score' (modules_to_save "
                         f"[\"score\"], as a reward model's); this one has modules_to_save={saved!r}")
    spec = read_reward_head(adapter_dir, "peft")
    head = _check_head(tensors.pop(PEFT_SCORE_KEY, None), adapter_dir / PEFT_WEIGHTS, PEFT_SCORE_KEY)
    # adapter_config.json's own pad_token_id: where reward runs of overnight before reward_head.json recorded it
    pad = spec["pad_token_id"] if spec else config.get("pad_token_id")
    if not isinstance(pad, int):
        base_config = Path(base or config.get("base_model_name_or_path") or "").expanduser() / "config.json"
        pad = json.loads(base_config.read_text(encoding="utf-8")).get("pad_token_id") \
            if base_config.is_file() else None
    if not isinstance(pad, int):
        raise UsageError(f"{where}: the adapter has no {REWARD_HEAD} and no local base model's config.json names a "
                         "pad_token_id: the score is read at the last token that is not the pad token, so it is part "
                         f"of the model. Write {adapter_dir / REWARD_HEAD} as {reward_head_text('peft', 0).strip()} "
                         "with the pad id the model was trained with, or pass --base MODEL_DIR")
    return ScoreHead(head, pad)


def mlx_score_head(adapter_dir: Path) -> ScoreHead | None:
    """An mlx reward adapter's score head (reward_head.json + score_head.safetensors; None when it has neither);
    convert-adapter and the mlx fuse."""
    adapter_dir = Path(adapter_dir)
    spec = read_reward_head(adapter_dir, "mlx")
    weights = adapter_dir / MLX_HEAD_WEIGHTS
    if spec is None:
        if weights.is_file():
            raise UsageError(f"{adapter_dir}: {MLX_HEAD_WEIGHTS} holds a score head but {REWARD_HEAD}, which says "
                             "how the score is read (the pad id), is missing; copy the whole adapter folder")
        return None
    if not weights.is_file():
        raise UsageError(f"{adapter_dir}: {REWARD_HEAD} names a score head in {MLX_HEAD_WEIGHTS}, which is missing; "
                         "copy the whole adapter folder")
    tensors, _ = read_safetensors(weights)
    head = _check_head(tensors.pop(MLX_SCORE_KEY, None), weights, MLX_SCORE_KEY)
    if tensors:
        raise UsageError(f"{weights} holds {sorted(tensors)[:3]} beside {MLX_SCORE_KEY}; it holds the score head only")
    return ScoreHead(head, spec["pad_token_id"])


def split_magnitudes(tensors: dict[str, Tensor], pattern: re.Pattern, dora: bool, source: Path) -> dict[str, Tensor]:
    """DoRA's magnitude vectors taken out of ``tensors``, by module path; a magnitude in an adapter whose config does
    not say DoRA is refused (it would be dropped, and the adapter would be another model)."""
    magnitudes = {}
    for name in [n for n in tensors if pattern.match(n)]:
        magnitudes[pattern.match(name)["module"]] = tensors.pop(name)
    if magnitudes and not dora:
        raise UsageError(f"{source} holds DoRA magnitude vectors ({sorted(magnitudes)[0]}, ...) but its "
                         f"{CONFIG} does not say DoRA; the config and the weights do not belong together")
    return magnitudes


def _attach_magnitudes(modules: list[LoraModule], magnitudes: dict[str, Tensor], source: Path) -> None:
    """Each DoRA module gets its magnitude, (out_features,): every module one, none left over."""
    for m in modules:
        magnitude = magnitudes.pop(m.module, None)
        out = m.b.array.shape[0]
        if magnitude is None or magnitude.array.shape != (out,):
            raise UsageError(f"{source}: the DoRA module {m.module} needs a magnitude vector of shape [{out}]; it has "
                             + ("none" if magnitude is None else f"{list(magnitude.array.shape)}"))
        m.magnitude = magnitude
    if magnitudes:
        raise UsageError(f"{source}: DoRA magnitudes for {sorted(magnitudes)[:3]}, which have no LoRA matrices")


def _refuse_dora_reward(dora: bool, head: ScoreHead | None, where: Path) -> None:
    if dora and head is not None:
        raise UsageError(f"{where}: a reward model with DoRA is not covered (overnight trains reward models with "
                         "plain LoRA only); it cannot be converted exactly")


def _peft_to_mlx(adapter_dir: Path, base: str | None) -> tuple[dict[str, Tensor], dict, dict, ScoreHead | None]:
    config = _read_config(adapter_dir)
    tensors, _ = read_safetensors(adapter_dir / PEFT_WEIGHTS)
    head = peft_score_head(config, tensors, adapter_dir, base)
    plain = {k: v for k, v in config.items() if k != "modules_to_save"} if head else config
    refuse_beyond_plain_lora(plain, adapter_dir / CONFIG, "mlx-lm's LoRA", "be converted exactly", dora_ok=True)
    dora = bool(config.get("use_dora"))
    _refuse_dora_reward(dora, head, adapter_dir / CONFIG)
    magnitudes = split_magnitudes(tensors, PEFT_MAGNITUDE, dora, adapter_dir / PEFT_WEIGHTS)
    modules = _collect(tensors, _PEFT_KEY, "lora_A", to_peft_layout=False, source=adapter_dir / PEFT_WEIGHTS)
    if dora:
        _attach_magnitudes(modules, magnitudes, adapter_dir / PEFT_WEIGHTS)
    rank = int(config.get("r", modules[0].a.array.shape[0]))
    if rank != modules[0].a.array.shape[0]:
        raise UsageError(f"{adapter_dir / CONFIG}: r={rank} but the weights have rank {modules[0].a.array.shape[0]}")
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
    layers = sorted({m.layer for m in modules})
    base = base or config.get("base_model_name_or_path")
    total = _base_layer_count(base)
    if total is None and config.get("layers_to_transform") is not None:
        # Blocks 0-1 of a 2-block model and of a 4-block one look the same here; mlx-lm counts from the end.
        raise UsageError(f"{adapter_dir / CONFIG}: LoRA sits on blocks {layers} only; pass --base MODEL_DIR (a "
                         "local model folder) so the number of blocks can be checked (mlx-lm counts the last N)")
    num_layers = _last_blocks(layers, total, str(adapter_dir))
    block_paths = sorted({m.block_path for m in modules})
    mlx_config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(config.get("lora_dropout", 0.0)),
                            "keys": block_paths},
        # Kept so a conversion back to PEFT restores lora_alpha exactly rather than recomputing it from scale.
        "overnight": {"lora_alpha": alpha, "use_rslora": bool(config.get("use_rslora")), "converted_from": "peft"},
    }
    if base:
        mlx_config["model"] = recorded_base(str(base))
    out = {}
    for m in modules:
        out[f"{m.module}.lora_a"] = _transposed(m.a)
        out[f"{m.module}.lora_b"] = _transposed(m.b)
        if m.magnitude is not None:
            out[f"{m.module}.m"] = m.magnitude
    if head:
        mlx_config["overnight"]["method"] = "reward"
    return out, mlx_config, {"format": "mlx"}, head


def _mlx_to_peft(adapter_dir: Path, base: str | None) -> tuple[dict[str, Tensor], dict, dict, ScoreHead | None]:
    config = _read_config(adapter_dir)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise UsageError(f"{adapter_dir / CONFIG}: fine_tune_type is {kind!r}; only LoRA and DoRA adapters convert "
                         "to PEFT ('full' is not an adapter)")
    dora = kind == "dora"
    params = config.get("lora_parameters") or {}
    tensors, _ = read_safetensors(adapter_dir / MLX_WEIGHTS)
    head = mlx_score_head(adapter_dir)
    _refuse_dora_reward(dora, head, adapter_dir / CONFIG)
    magnitudes = split_magnitudes(tensors, MLX_MAGNITUDE, dora, adapter_dir / MLX_WEIGHTS)
    modules = _collect(tensors, _MLX_KEY, "lora_a", to_peft_layout=True, source=adapter_dir / MLX_WEIGHTS)
    if dora:
        _attach_magnitudes(modules, magnitudes, adapter_dir / MLX_WEIGHTS)
    rank = modules[0].a.array.shape[0]
    if "rank" in params and int(params["rank"]) != rank:
        raise UsageError(f"{adapter_dir / CONFIG}: rank {params['rank']} but the weights have rank {rank}")
    scale = float(params.get("scale", 20.0))  # mlx-lm's default when the config leaves it out
    extra = config.get("overnight") or {}
    use_rslora = bool(extra.get("use_rslora"))
    alpha = extra.get("lora_alpha")
    expected_scale = None if alpha is None else (alpha / rank ** 0.5 if use_rslora else alpha / rank)
    if alpha is None or not np.isclose(expected_scale, scale, rtol=1e-12, atol=0.0):
        alpha, use_rslora = scale * rank, False  # scale is what mlx-lm applies; alpha is derived from it
    layers = sorted({m.layer for m in modules})
    total = _base_layer_count(base or config.get("model"))
    _last_blocks(layers, total, str(adapter_dir))
    block_paths = sorted({m.block_path for m in modules})
    leaves = [p.rsplit(".", 1)[-1] for p in block_paths]
    # PEFT matches target_modules as name suffixes: the leaf names are the usual spelling, but two blocks
    # paths sharing a leaf (self_attn.q_proj, cross_attn.q_proj) would then catch more than was trained.
    targets = sorted(set(leaves)) if len(set(leaves)) == len(leaves) else block_paths
    everywhere = layers[0] == 0
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora,
        "lora_dropout": float(params.get("dropout", 0.0)), "target_modules": targets, "bias": "none",
        "layers_to_transform": None if everywhere else layers, "layers_pattern": None,
        "base_model_name_or_path": recorded_base(str(base or config.get("model") or "")), "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "use_dora": dora,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    out = {}
    for m in modules:
        out[f"{PEFT_PREFIX}{m.module}.lora_A.weight"] = m.a
        out[f"{PEFT_PREFIX}{m.module}.lora_B.weight"] = m.b
        if m.magnitude is not None:
            out[f"{PEFT_PREFIX}{m.module}.lora_magnitude_vector"] = m.magnitude
    if head:  # what a torch reward run saves: AutoModelForSequenceClassification + PeftModel.from_pretrained read it
        out[PEFT_SCORE_KEY] = head.weight
        peft_config |= {"task_type": "SEQ_CLS", "modules_to_save": ["score"]}
    return out, peft_config, {"format": "pt"}, head


def convert_adapter(adapter_dir: Path, to: str, output: Path, base: str | None = None,
                    say: Callable[[str], None] = print) -> Path:
    adapter_dir, output = Path(adapter_dir), Path(output)
    if not adapter_dir.is_dir():
        raise UsageError(f"{adapter_dir} is not a folder: give an adapter folder (a run's adapter/, or a "
                         "checkpoint's checkpoints/step-N/adapter/)")
    if to not in ("peft", "mlx"):
        raise UsageError(f"--to must be peft or mlx, not {to!r}")
    source = detect_format(adapter_dir)
    if source == to:
        raise UsageError(f"{adapter_dir} is already a {to} adapter; nothing to convert")
    check_output_dir(output)
    tensors, config, metadata, head = (_mlx_to_peft if to == "peft" else _peft_to_mlx)(adapter_dir, base)
    weights_name = PEFT_WEIGHTS if to == "peft" else MLX_WEIGHTS

    def write(folder: Path) -> None:
        write_safetensors(folder / weights_name, tensors, metadata)
        (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if head:  # laid out as that backend's reward run writes it, so its scorer, fuse and a resume read it
            if to == "mlx":
                write_safetensors(folder / MLX_HEAD_WEIGHTS, {MLX_SCORE_KEY: head.weight}, metadata)
            (folder / REWARD_HEAD).write_text(reward_head_text(to, head.pad_token_id), encoding="utf-8")

    write_folder_atomically(output, write, say)
    dora = bool(config.get("use_dora")) or config.get("fine_tune_type") == "dora"
    modules = (len(tensors) - (1 if head and to == "peft" else 0)) // (3 if dora else 2)
    say(f"converted {source} adapter {adapter_dir} -> {to} adapter {output} ({modules} "
        f"{'DoRA' if dora else 'LoRA'} modules, rank {config.get('r') or config['lora_parameters']['rank']}"
        f"{', and the reward score head' if head else ''})")
    if to == "peft" and not config["base_model_name_or_path"]:
        say("note: base_model_name_or_path is empty; pass --base MODEL to record which model the adapter belongs to")
    return output


# -- output folders (shared with fuse) ----------------------------------------------------------------------

def check_output_dir(output: Path) -> None:
    """An output is a new folder or an empty one: nothing a user had there is ever overwritten."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"--output {output} already exists and is not an empty folder; choose a new path")
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: its parent folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise UsageError(f"--output {output}: no permission to write in {output.parent}")


def write_folder_atomically(output: Path, write: Callable[[Path], None],
                            say: Callable[[str], None] = lambda _: None) -> None:
    """Fill a temporary folder beside ``output`` and rename it into place, so a crash or an error midway
    leaves no half-written folder under the name the user asked for. The temporary's name holds this process's pid:
    what a killed writer left (a full-size model, for fuse) is removed by the next write to the same output."""
    clear_stale_temporaries(output, say)
    tmp = output.parent / f"{_temp_prefix(output)}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write(tmp)
        give_default_modes(tmp)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            fsync_file(file)
        fsync_dir(tmp)
        if output.exists():
            output.rmdir()  # checked empty above; rename cannot replace a folder on every OS
        os.rename(tmp, output)
        fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_prefix(output: Path) -> str:
    return f".{output.name}.tmp-"


_OURS = re.compile(r"(?P<pid>\d+)-[0-9a-f]+")
_BEFORE_PIDS = re.compile(r"[0-9a-f]{8}")  # what versions before the pid was in the name wrote


def clear_stale_temporaries(output: Path, say: Callable[[str], None]) -> list[Path]:
    """Remove the temporaries of earlier writes to ``output`` whose process is gone (SIGKILL, a crash, a reboot),
    saying what was freed. One whose process still runs is a concurrent write to the same output: left alone (a
    reused pid errs on that side too). One without a pid (written before the pid was recorded) cannot be told
    from a running write of an old version, so it is only pointed out."""
    removed = []
    if not output.parent.is_dir():
        return removed
    prefix = _temp_prefix(output)
    for entry in sorted(output.parent.iterdir()):
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        tail = entry.name[len(prefix):]
        ours = _OURS.fullmatch(tail)
        if ours and int(ours["pid"]) != os.getpid() and not pid_alive(int(ours["pid"])):
            size = _folder_size(entry)
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
                say(f"removed {entry}: {_human_size(size)} left by an earlier write to {output} that was "
                    f"interrupted (its process {ours['pid']} is gone)")
        elif not ours and _BEFORE_PIDS.fullmatch(tail):
            say(f"note: {entry} ({_human_size(_folder_size(entry))}) looks like what an interrupted write to "
                f"{output} left; it was made by an older overnight that did not record its process, so it is not "
                "removed: delete it if no other fuse or convert-adapter to that output is running")
    if removed:
        fsync_dir(output.parent)
    return removed


def _folder_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _human_size(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"
