"""`overnight fuse` for torch runs: the PEFT adapter merged into the full-precision base, saved as a Hugging Face
folder that transformers loads on its own. Run by src/commands/fuse.py in a child process (the core imports no framework):

    python -m overnight.backends.torch_export JOB.json

The base is merged unquantized, also for a QLoRA run: merging into 4-bit weights would round the merged weights to
4 bits (and bitsandbytes' merge is lossy), so the fused model is base + scale·B·A in the dtype each tensor of the
base checkpoint was saved in, the sum taken in float32.

Shard by shard, never the whole model: each weight file of the base is read tensor by tensor and written to the
output as it is read (same shard names, same tensor order); a LoRA target gets W + scale·B·A on its way through,
every other tensor is copied byte for byte. Memory is a few tensors plus the adapter, not the model: a 70B base
(140 GB in bf16) fuses on a machine with 16 GB of RAM. Plain reads, not mmap: pages of a mapped shard would stay
resident (and count) until the file is closed. A base saved as pytorch_model*.bin is read one shard at a time
(torch.load with mmap) and written as safetensors.

The arithmetic is numpy's (bf16 as its bit pattern, rounded to nearest-even as torch rounds): the exporter starts
in a fraction of a second and holds no framework's memory; torch is imported only to read a pickled .bin shard.

Every adapter tensor must land on a checkpoint tensor (never a silently unmerged weight), a merged value that is
not finite in the stored dtype is refused (PEFT's safe_merge), and an adapter that is more than plain LoRA or DoRA
is refused by name. DoRA merges as PEFT's merge does (src/backend/lora_init.py, DORA): the row norms of
W + scale·B·A taken once, and the merged weight is (m / norm) · (W + scale·B·A), all in float32.

A reward run's adapter (PEFT SEQ_CLS: LoRA + the score head) gives a sequence-classification folder on the same
path: the LM head's tensors are left out as their shard is copied, the score head is written last into the last
shard, and config.json names the base's class with ForCausalLM -> ForSequenceClassification
(sequence_classifier_architecture).
"""
from __future__ import annotations

import json
import math
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from overnight.backend.adapter_formats import CONFIG, PEFT_MAGNITUDE, PEFT_WEIGHTS, ScoreHead, Tensor, \
    peft_score_head, read_safetensors, refuse_beyond_plain_lora, split_magnitudes
from overnight.commands.fuse import ExportRefused, copy_base_files, run_export_job, sequence_classifier_config
from overnight.errors import UsageError
from overnight.runs.checkpoint import _fault

_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# How each float dtype's bytes are viewed in numpy: bf16 as its raw 16 bits.
_RAW = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_STORED_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                  "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
# PEFT's saved names: base_model.model.<module>.lora_A.weight (the adapter name is dropped on save).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_COPY_CHUNK = 16 << 20  # untouched tensors (a 2 GB embedding) pass through in pieces of this size
# A reward model's head in its fused folder: transformers' decoder-only sequence classifiers name it so
SCORE_WEIGHT = "score.weight"


def checkpoint_dtype(base_dir: Path) -> str:
    """The dtype the base was saved in: config.json's dtype (torch_dtype before transformers 5), else the dtype of
    the floating tensors in its first weight file."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") or {}
    named = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    if isinstance(named, str) and named in _SAFETENSORS_DTYPES.values():
        return named
    for weights in sorted(base_dir.glob("*.safetensors")):
        with open(weights, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        dtypes = [meta["dtype"] for name, meta in header.items() if name != "__metadata__"]
        for dtype in dtypes:
            if dtype in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[dtype]
    return "float32"


# -- the adapter ----------------------------------------------------------------------------------------------

def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A copy of ``raw`` (``dtype``'s raw view) in float32; float64 stays float64 (nothing is gained by less)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float64 if dtype == "F64" else np.float32)


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to ``dtype`` (round to nearest, ties to even, as torch's casts do), as its raw view. It
    works in place on ``values`` (the largest merged tensor of a 70B is ~1 GB in float32: no copies to spare)."""
    if dtype == "BF16":
        bits = values.view(np.uint32)
        odd = (bits >> 16) & np.uint32(1)
        bits += np.uint32(0x7FFF)
        bits += odd
        del odd
        bits >>= 16
        return bits.astype(np.uint16)
    with np.errstate(over="ignore"):  # an overflow to inf is refused by the caller, by name
        return values.astype(_RAW[dtype])


def _all_finite(stored: np.ndarray, dtype: str) -> bool:
    """Whether a raw view holds no inf or NaN (a finite float32 sum can still round up to inf in a narrower dtype)."""
    if dtype == "BF16":
        exponent = np.uint16(0x7F80)
        return not np.any((stored & exponent) == exponent)
    return bool(np.isfinite(stored).all())


@dataclass
class LoraPair:
    module: str  # the module's path in the model, e.g. model.layers.0.self_attn.q_proj
    a: np.ndarray  # float32 (r, in)
    b: np.ndarray  # float32 (out, r)
    scale: float
    merged: bool = False
    magnitude: np.ndarray | None = None  # DoRA's m, float32 (out,)


def read_adapter(adapter_dir: Path) -> dict[str, LoraPair]:
    """The adapter's LoRA pairs by module path; anything that is not plain LoRA is refused by name."""
    return _read_adapter(adapter_dir, False)[0]


def read_reward_adapter(adapter_dir: Path, base: str | None) -> tuple[dict[str, LoraPair], ScoreHead]:
    """A reward adapter's LoRA pairs and its score head (PEFT SEQ_CLS, the head in modules_to_save)."""
    pairs, head = _read_adapter(adapter_dir, True, base)
    if head is None:
        raise ExportRefused(f"{adapter_dir / CONFIG}: the run trained a reward model, but its adapter is not a "
                            "SEQ_CLS adapter with a score head (task_type is not SEQ_CLS)")
    return pairs, head


def _read_adapter(adapter_dir: Path, reward: bool, base: str | None = None
                  ) -> tuple[dict[str, LoraPair], ScoreHead | None]:
    config_path, weights_path = adapter_dir / CONFIG, adapter_dir / PEFT_WEIGHTS
    head = None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        tensors, _ = read_safetensors(weights_path)
        if reward:
            head = peft_score_head(config, tensors, adapter_dir, base)
            if head is not None:  # the head is written whole beside the merged weights, not merged
                config = {k: v for k, v in config.items() if k != "modules_to_save"}
        # A reward model's DoRA adapter is not one overnight trains (config.py refuses it): not covered here either.
        refuse_beyond_plain_lora(config, config_path, "a plain LoRA merge", "be fused", dora_ok=not reward)
        magnitudes = split_magnitudes(tensors, PEFT_MAGNITUDE, bool(config.get("use_dora")), weights_path)
    except (OSError, ValueError) as exc:
        raise ExportRefused(f"the adapter in {adapter_dir} cannot be read ({exc.__class__.__name__}: {exc})") from None
    except UsageError as exc:
        raise ExportRefused(str(exc)) from None
    halves: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        found = _LORA_KEY.match(key)
        if found is None:
            raise ExportRefused(f"{weights_path}: tensor {key} is not a LoRA A/B weight (an embedding LoRA, DoRA "
                                "magnitude or fully trained module?); only plain LoRA on linear layers can be fused")
        halves.setdefault(found["module"], {})[found["kind"]] = to_float32(tensor.array, tensor.dtype)
    pairs = {}
    for module, half in sorted(halves.items()):
        if set(half) != {"lora_A", "lora_B"}:
            raise ExportRefused(f"{weights_path}: {module} has {', '.join(sorted(half))} but not both lora_A and "
                                "lora_B; the adapter is incomplete")
        a, b = half["lora_A"], half["lora_B"]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != rank:
            raise ExportRefused(f"{weights_path}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                                "which do not make a LoRA pair")
        if int(config.get("r", rank)) != rank:
            raise ExportRefused(f"{config_path}: r={config.get('r')} but {module}'s weights have rank {rank}")
        alpha = float(config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs[module] = LoraPair(module, a, b, scale)
        if config.get("use_dora"):
            magnitude = magnitudes.pop(module, None)
            if magnitude is None or magnitude.array.shape != (b.shape[0],):
                found = "none" if magnitude is None else list(magnitude.array.shape)
                raise ExportRefused(f"{weights_path}: the DoRA module {module} needs a magnitude vector of shape "
                                    f"[{b.shape[0]}]; it has {found}")
            pairs[module].magnitude = to_float32(magnitude.array, magnitude.dtype)
    if magnitudes:
        raise ExportRefused(f"{weights_path}: DoRA magnitudes for {sorted(magnitudes)[:3]}, which have no LoRA "
                            "matrices; the adapter is incomplete")
    if not pairs:
        raise ExportRefused(f"{weights_path} holds no LoRA weights")
    return pairs, head


def sequence_classifier_architecture(base_dir: Path, base_config: dict) -> str:
    """The base's causal LM class with ForCausalLM -> ForSequenceClassification (LlamaForCausalLM ->
    LlamaForSequenceClassification), which must be a class transformers has: a model type without one is refused
    by name, since the folder would not open. Looked up in transformers' lazy name table, which imports no model
    code and no torch (the mlx exporter uses it too)."""
    import transformers

    causal = (base_config.get("architectures") or [None])[0]
    name = causal[: -len("ForCausalLM")] + "ForSequenceClassification" \
        if isinstance(causal, str) and causal.endswith("ForCausalLM") else None
    if name is None or name not in dir(transformers):
        raise ExportRefused(
            f"transformers {transformers.__version__} has no sequence-classification class for model_type "
            f"{base_config.get('model_type')!r} (the base {base_dir}, architectures {causal!r}"
            + (f": no {name}" if name else ", not a ...ForCausalLM") + "): a fused reward model could not be "
            "opened. Use the run's adapter as it is (README: Reward models)")
    return name


def is_lm_head(name: str) -> bool:
    """A tensor of the causal LM head, which a sequence classifier does not have (with tied embeddings there is
    none in the checkpoint: the input embeddings, which stay, are the only copy)."""
    return name.startswith("lm_head.")


def match_targets(pairs: dict[str, LoraPair], names: set[str]) -> dict[str, LoraPair]:
    """Checkpoint tensor name -> the LoRA pair merged into it. PEFT names a module by its path in the loaded model
    (model.layers.0.self_attn.q_proj); the checkpoint holds <path>.weight, or <path without the first part>.weight
    when it was saved from the bare base model (transformers loads both). A module with neither is refused."""
    targets = {}
    for module, pair in pairs.items():
        candidates = [f"{module}.weight"]
        if "." in module:
            candidates.append(f"{module.split('.', 1)[1]}.weight")
        found = [name for name in candidates if name in names]
        if not found:
            tail = ".".join(module.split(".")[-2:])
            near = sorted(name for name in names if tail in name)[:3]
            raise ExportRefused(
                f"the adapter's LoRA module {module} matches no tensor of the base checkpoint (looked for "
                f"{' or '.join(candidates)}{'; it has ' + ', '.join(near) if near else ''}); merging the rest "
                "would give a model that is not base + adapter. Is --base the model the run trained on?")
        targets[found[0]] = pair
    return targets


def merge(name: str, raw: np.ndarray, dtype: str, pair: LoraPair) -> np.ndarray:
    """W + scale·B·A, summed in float32 and stored in W's dtype (``raw`` and the result: that dtype's raw view); for
    DoRA that sum rescaled row by row to m / its norm."""
    if dtype not in _RAW:
        raise ExportRefused(f"{name} is stored as {dtype}, not a float weight a LoRA delta can be added to: the base "
                            "is quantized; fuse merges into a full-precision base only (--base DIR)")
    made = [pair.b.shape[0], pair.a.shape[1]]
    if raw.ndim != 2 or list(raw.shape) != made:
        raise ExportRefused(f"{name} has shape {list(raw.shape)} but the adapter's {pair.module} makes {made}: the "
                            "adapter belongs to another model (pass --base DIR with the model the run trained on)")
    summed = to_float32(raw, dtype)
    delta = pair.b @ pair.a
    delta *= np.float32(pair.scale)
    summed += delta
    del delta
    if pair.magnitude is not None:
        with np.errstate(divide="ignore", invalid="ignore"):  # a zero row is non-finite: refused below by name
            summed *= (pair.magnitude / np.linalg.norm(summed, axis=1))[:, None]
    stored = from_float32(summed, dtype) if np.isfinite(summed).all() else None
    if stored is None or not _all_finite(stored, dtype):
        raise ExportRefused(f"merging the adapter into {name} gives non-finite values in {_SAFETENSORS_DTYPES[dtype]}: "
                            f"the adapter ({pair.module}) is broken or too large for this dtype; fuse another "
                            "checkpoint (--checkpoint STEP)")
    pair.merged = True
    return stored


# -- the base's weight files ----------------------------------------------------------------------------------

def weight_shards(base_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """The base's weight files in order, and its weight_map when it has an index."""
    for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
        index = base_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ExportRefused(f"cannot read {index} ({exc.__class__.__name__}: {exc}): re-copy the base "
                                    "model, or pass --base DIR") from None
            shards = sorted(set(weight_map.values()))
            missing = [shard for shard in shards if not (base_dir / shard).is_file()]
            if missing:
                raise ExportRefused(f"the base model {base_dir} is incomplete: {index_name} names "
                                    f"{', '.join(missing[:3])}, which is not there; re-copy or re-download it")
            return shards, weight_map
        if (base_dir / single).is_file():
            return [single], None
    raise ExportRefused(f"the base model {base_dir} has no weights fuse can read (model*.safetensors or "
                        "pytorch_model*.bin): pass --base DIR with the Hugging Face folder the run trained on")


def output_name(shard: str) -> str:
    """pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors; a safetensors name is kept."""
    if shard.endswith(".bin"):
        return "model" + shard[len("pytorch_model"):-len(".bin")] + ".safetensors"
    return shard


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensors' entries, __metadata__, where the data starts) of a safetensors file."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size - 8:
                raise ValueError(f"its header length {length} is larger than the file")
            header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None) or {}
        for meta in header.values():
            start, end = meta["data_offsets"]
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end):
                raise ValueError("bad data_offsets")
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError) as exc:
        raise ExportRefused(f"cannot load the base model {path.parent}: {path.name} is not a readable safetensors "
                            f"file ({exc.__class__.__name__}: {str(exc)[:200]}). Check that its weight files are "
                            "complete (re-copy the model), or pass --base DIR") from None
    return header, metadata, 8 + length


class ShardWriter:
    """A safetensors file written tensor by tensor: the header first (every shape and dtype is known before any
    data), then each tensor's bytes as they come, so no shard is ever whole in memory."""

    def __init__(self, path: Path, entries: list[tuple[str, str, list[int], int]], metadata: dict):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape, size in entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, data) -> None:
        _fault("fuse-write")  # the full-disk test's (OVERNIGHT_FAULT); nothing in normal use
        self.handle.write(data)

    def close(self) -> None:
        self.handle.close()


def _tensor_bytes(tensor) -> memoryview:
    """A torch tensor's bytes, without a copy when it is contiguous."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _extra_entries(extra: dict[str, Tensor]) -> list[tuple[str, str, list[int], int]]:
    return [(name, t.dtype, list(t.array.shape), t.array.nbytes) for name, t in extra.items()]


def _write_extra(writer: ShardWriter, extra: dict[str, Tensor]) -> None:
    for tensor in extra.values():
        writer.write(np.ascontiguousarray(tensor.array).reshape(-1).view(np.uint8))


def fuse_safetensors_shard(source: Path, dest: Path, targets: dict[str, LoraPair],
                           drop: Callable[[str], bool] | None = None,
                           extra: dict[str, Tensor] | None = None) -> dict[str, int]:
    """Copy one safetensors shard into ``dest``, merging the targets it holds; a reward fuse leaves out the tensors
    ``drop`` names and appends ``extra`` after the rest. Returns {tensor: bytes}."""
    header, metadata, data_start = read_header(source)
    order = sorted((name for name in header if not (drop and drop(name))),
                   key=lambda name: header[name]["data_offsets"][0])
    entries = [(name, header[name]["dtype"], list(header[name]["shape"]),
                header[name]["data_offsets"][1] - header[name]["data_offsets"][0]) for name in order]
    extra = extra or {}
    writer = ShardWriter(dest, entries + _extra_entries(extra), metadata or {"format": "pt"})
    try:
        with open(source, "rb") as handle:
            for name, dtype, shape, size in entries:
                handle.seek(data_start + header[name]["data_offsets"][0])
                if name not in targets:
                    _copy_bytes(handle, writer, size, source)
                    continue
                raw = bytearray(size)
                if handle.readinto(raw) != size:
                    raise ExportRefused(f"{source} ends inside tensor {name}: the file is truncated; re-copy the "
                                        "base model, or pass --base DIR")
                weight = np.frombuffer(raw, dtype=_RAW.get(dtype, np.uint8))
                weight = weight.reshape(shape) if dtype in _RAW else weight
                writer.write(merge(name, weight, dtype, targets[name]).reshape(-1).view(np.uint8))
                del raw, weight
        _write_extra(writer, extra)
    finally:
        writer.close()
    return {name: size for name, _, _, size in entries + _extra_entries(extra)}


def _copy_bytes(handle, writer: ShardWriter, size: int, source: Path) -> None:
    left = size
    while left:
        chunk = handle.read(min(left, _COPY_CHUNK))
        if not chunk:
            raise ExportRefused(f"{source} is truncated (its header promises more data than the file holds): "
                                "re-copy the base model, or pass --base DIR")
        writer.write(chunk)
        left -= len(chunk)


def fuse_bin_shard(source: Path, dest: Path, targets: dict[str, LoraPair], drop: Callable[[str], bool] | None = None,
                   extra: dict[str, Tensor] | None = None) -> dict[str, int]:
    """A pickled pytorch_model*.bin shard (memory-mapped when it is in torch's zip format) written as safetensors;
    ``drop`` and ``extra`` as in fuse_safetensors_shard."""
    import torch

    try:
        state = torch.load(str(source), map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be mapped: this one shard is read whole
        state = torch.load(str(source), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign pickle
        raise ExportRefused(f"cannot load the base model {source.parent}: {source.name}: "
                            f"{exc.__class__.__name__}: {str(exc)[:300]}") from None
    if drop:
        state = {name: tensor for name, tensor in state.items() if not drop(name)}
    codes = {getattr(torch, name): code for code, name in _STORED_DTYPES.items()}
    entries = []
    for name, tensor in state.items():
        if tensor.dtype not in codes:
            raise ExportRefused(f"{name} in {source} has dtype {tensor.dtype}, which safetensors cannot hold here")
        entries.append((name, codes[tensor.dtype], list(tensor.shape), tensor.numel() * tensor.element_size()))
    extra = extra or {}
    writer = ShardWriter(dest, entries + _extra_entries(extra), {"format": "pt"})
    try:
        for (name, tensor), (_, dtype, shape, _) in zip(state.items(), entries):
            data = _tensor_bytes(tensor)
            if name in targets:
                raw = np.frombuffer(data, dtype=_RAW.get(dtype, np.uint8))
                data = merge(name, raw.reshape(shape) if dtype in _RAW else raw, dtype, targets[name])
                data = data.reshape(-1).view(np.uint8)
            writer.write(data)
        _write_extra(writer, extra)
    finally:
        writer.close()
    return {name: size for name, _, _, size in entries + _extra_entries(extra)}


def _names_in(base_dir: Path, shards: list[str], weight_map: dict[str, str] | None) -> dict[str, str]:
    """Tensor name -> the shard holding it, from the index, or from the one file's header."""
    if weight_map is not None:
        return dict(weight_map)
    shard = shards[0]
    if shard.endswith(".safetensors"):
        return {name: shard for name in read_header(base_dir / shard)[0]}
    import torch

    try:
        state = torch.load(str(base_dir / shard), map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - fuse_bin_shard says what is wrong with it
        return {}
    return {name: shard for name in state}


def hf_weight_names(base_dir: Path) -> set[str]:
    """The tensor names of a Hugging Face folder's weight files (from the index or the headers)."""
    return set(_names_in(base_dir, *weight_shards(base_dir)))


def export(job: dict) -> dict:
    from overnight.backend import hub

    base_dir = hub.resolve_model_dir(job["base"], backend="torch")
    base_config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    if base_config.get("quantization_config") or base_config.get("quantization"):
        quant = base_config.get("quantization_config") or {}
        method = quant.get("quant_method", "mlx") if isinstance(quant, dict) else "quantized"
        raise ExportRefused(f"the base model {base_dir} is saved pre-quantized ({method}); fuse merges into a "
                            "full-precision base only: give the unquantized original with --base DIR")
    reward = bool(job.get("reward"))
    if reward:
        architecture = sequence_classifier_architecture(base_dir, base_config)
        pairs, head = read_reward_adapter(Path(job["adapter"]), str(base_dir))
    else:
        pairs, head = read_adapter(Path(job["adapter"])), None
    shards, weight_map = weight_shards(base_dir)
    located = _names_in(base_dir, shards, weight_map)
    targets = match_targets(pairs, set(located))
    if reward and SCORE_WEIGHT in located:
        raise ExportRefused(f"the base model {base_dir} already holds a {SCORE_WEIGHT}: it is a sequence classifier, "
                            "not the causal LM a reward run trains on; pass --base DIR with the run's base")
    output = Path(job["output"])
    sizes: dict[str, int] = {}
    new_map: dict[str, str] = {}
    for shard in shards:
        mine = {name: pair for name, pair in targets.items() if located.get(name) == shard}
        fuse_one = fuse_bin_shard if shard.endswith(".bin") else fuse_safetensors_shard
        # The score head goes last, into the last shard: a reader that samples a file's end sees it (reward_model.py)
        extra = {SCORE_WEIGHT: head.weight} if head is not None and shard == shards[-1] else None
        written = fuse_one(base_dir / shard, output / output_name(shard), mine, is_lm_head if reward else None, extra)
        sizes |= written
        new_map |= {name: output_name(shard) for name in written}
    unmerged = sorted(pair.module for pair in pairs.values() if not pair.merged)
    if unmerged:  # an index that names a shard for a tensor the shard does not hold
        raise ExportRefused(f"the adapter's LoRA modules {', '.join(unmerged[:5])} were not found in the base's weight "
                            f"files (its index and files disagree): re-copy the base model, or pass --base DIR")
    if weight_map is not None:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(new_map.items()))}
        (output / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if reward:
        config = sequence_classifier_config(base_config, architecture, head.pad_token_id)
        (output / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    else:
        # The architecture is the base's, unchanged by a merge: its config.json as it is (no quantization to drop,
        # the dtype it names is the dtype written).
        (output / "config.json").write_bytes((base_dir / "config.json").read_bytes())
    copied = copy_base_files(base_dir, output)
    dtype_name = checkpoint_dtype(base_dir)
    kind = (f"Hugging Face {architecture} folder (one label) for AutoModelForSequenceClassification" if reward
            else "Hugging Face folder for transformers")
    return {"base_dir": str(base_dir), "format": kind, "weights": f"{dtype_name}, full precision",
            "dtype": dtype_name, "copied": copied, "merged": len(targets), "shards": len(shards)}


if __name__ == "__main__":
    sys.exit(run_export_job(export, sys.argv[1:]))
