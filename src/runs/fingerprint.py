"""What a checkpoint was trained on: model, data files and the config fields that change training.

A resume whose fingerprint differs is refused (SPEC §7), naming the changed fields. The model counts by
content (config.json and the weight files' names and sizes), not by how its path is spelled: `./m`,
`/abs/m` and a symlink to it are the same model. A hub id is its own identity."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Callable

from overnight.config import TRAINING_KEYS, Config, applies_to_method
from overnight.data import sources
from overnight.data.formats import where
from overnight.methods import reward_model
from overnight.fsutil import sha256_file
from overnight.runs.checkpoint import STEP_DIR
from overnight.runs.portable import model_shape, same_model_differences

_MODEL_FILES = ("config.json",)
# Recorded for people reading a manifest, never compared: the model is compared by content instead.
NOT_COMPARED = ("model.path",)
# A run moved to the other backend (--allow-backend-change) may change these; they are recorded, not refused.
MAY_DIFFER_ACROSS_BACKENDS = ("model.quantization.bits", "model.quantization.group_size", "model.dtype")
# Training keys newer than some checkpoints, with the value those checkpoints trained with (the same as the
# default's effect), so an older run resumes unless the user changed the key.
# grpo.chat_template: before the key, "prompt" rows reached the model as bare text (false); a grpo run from then
# resumed on a model with a chat template must say grpo.chat_template=false to keep its prompts.
ADDED_KEYS = {"data.chat_template_kwargs": {}, "model.dtype": "auto", "grpo.chat_template": "false",
              "lora.use_dora": False}


TEMPLATE_NOW = "chat_template_now"


def run_template_now(run_dir: Path | None, fresh: bool = False,
                     now: Callable[[], datetime] = datetime.now) -> datetime:
    """The time chat templates' ``strftime_now`` renders in this run (Llama 3 writes "Today Date: ..." into every
    conversation): pinned to the run's start, so a run resumed after midnight tokenizes its rows, its eval subset
    and its prompts as before. A run that continues finds it in its checkpoints (each records its run's start
    time); a new run (or --fresh) takes now and its checkpoints record that. Read before the resume is decided,
    since the data check already renders rows; a run directory holds one run, so any committed checkpoint of it
    tells (the newest first)."""
    root = Path(run_dir) / "checkpoints" if run_dir is not None and not fresh else None
    steps = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), reverse=True) \
        if root is not None and root.is_dir() else []
    for path in steps:
        try:
            if (path / "COMMIT").is_file():
                recorded = json.loads((path / "manifest.json").read_text(encoding="utf-8"))["fingerprint"]
                if recorded.get(TEMPLATE_NOW):
                    return datetime.fromisoformat(recorded[TEMPLATE_NOW])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged checkpoint is the resume's to refuse or set aside; another one may tell
    return now().replace(microsecond=0)


def _model_identity(path: str) -> dict:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return {"id": path}  # a hub id: the id (and the backend's revision pinning) is all we know up front
    digest = hashlib.sha256()
    for name in _MODEL_FILES:
        if (folder / name).is_file():
            digest.update((folder / name).read_bytes())
    # Weight files are large: their names and sizes identify them well enough, and cost nothing to read.
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    for weight in weights:
        digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return {"config_and_weights": digest.hexdigest()}


def _file_digest(path: Path | None) -> str | None:
    return sha256_file(path) if path is not None else None


def compute(cfg: Config, train_file: Path, val_file: Path | None, backend: str | None = None,
            world_size: int = 1, init_adapter: dict | None = None, template_now: datetime | None = None) -> dict:
    """``backend`` (the Backend's ``name``) is recorded so a resume on another backend is refused before
    the model is loaded; it is checked on its own (resume.check_backend), not by differences().
    ``world_size``: the processes of a data-parallel job; what must not change is the global batch.
    ``init_adapter``: the adapter lora.init_from started the LoRA from ({"path", "sha256"}; AdapterWeights.identity,
    hashed once when the adapter was read); compared by its sha256 alone.
    ``template_now``: the time chat templates render as now in this run (run_template_now); recorded, never
    compared."""
    keys = [key for key in TRAINING_KEYS if key not in NOT_COMPARED]
    return {
        TEMPLATE_NOW: template_now.isoformat(timespec="seconds") if template_now else None,
        "init_adapter": init_adapter,
        "world_size": world_size,
        "model": _model_identity(cfg.model.path),
        "model_shape": model_shape(cfg.model.path),  # "the same model" across backends (src/runs/portable.py)
        "model_path": cfg.model.path,
        "backend": backend,
        # The JSONL the run reads, by content: a parquet file, a saved dataset or a hub dataset is read through its
        # converted copy (src/data/sources.py), so a changed source is changed content here too.
        "train_data": _file_digest(train_file),
        "val_data": _file_digest(val_file),
        # Recorded to name the data in a refusal as the user knows it, never compared (the content is).
        "train_source": where(train_file),
        "val_source": where(val_file) if val_file is not None else None,
        # Which converter wrote a converted copy, from which source: a copy that a newer converter writes otherwise
        # is then told apart from a source the user changed (conversion_change). Never compared by itself.
        "train_conversion": sources.conversion_of(train_file),
        "val_conversion": sources.conversion_of(val_file),
        "config": {key: json.loads(json.dumps(cfg.get(key))) for key in keys} | {"packing": cfg.packing},
        # grpo.rewards=[reward_model=PATH]: the model by content (reward_model.identity), so retraining it between a
        # run and its resume is a changed reward, while moving its folder is not
        "reward_models": reward_model.identities(list(cfg.grpo.rewards)) if cfg.data.method == "grpo" else {},
    }


def differences(saved: dict, current: dict, across_backends: bool = False) -> list[str]:
    """Human-readable list of what changed, e.g. ["lora.rank: 16 -> 8", "train data file contents"].

    across_backends: the run moves to the other backend, whose model folder may be another conversion of the
    same model (an MLX 4-bit folder, the Hugging Face original): the model is compared by architecture and
    tensor names/shapes (src/runs/portable.py), and quantization may differ (quantization_change records it)."""
    changes = []
    old_model, new_model = saved.get("model"), current.get("model")
    if across_backends:
        if "model_shape" not in saved:
            changes.append("model: the checkpoint predates portable checkpoints, so its model cannot be compared "
                           "across backends")
        else:
            changes += [f"model: {c}" for c in same_model_differences(saved["model_shape"], current["model_shape"])]
    elif old_model != new_model:
        if isinstance(old_model, dict) and isinstance(new_model, dict) and "id" in old_model and "id" in new_model:
            changes.append(f"model: {old_model['id']!r} -> {new_model['id']!r}")
        else:
            was = (saved.get("model_path") or saved.get("config", {}).get("model.path")
                   or (old_model or {}).get("id", ""))
            changes.append(f"model: {current.get('model_path')!r} is not the model the checkpoint was trained on"
                           + (f" ({was!r})" if was else "") + " (config.json or weight files differ)")
    old_init, new_init = saved.get("init_adapter"), current.get("init_adapter")
    if (old_init or {}).get("sha256") != (new_init or {}).get("sha256"):  # by content: a moved copy is the same
        changes.append(f"lora.init_from: {_adapter_name(old_init)} -> {_adapter_name(new_init)}")
    old_models, new_models = saved.get("reward_models") or {}, current.get("reward_models") or {}
    for spec in sorted(set(old_models) & set(new_models)):  # a spec added or removed is grpo.rewards' difference
        if old_models[spec] != new_models[spec]:
            changes.append(f"grpo.rewards: the reward model of {spec} changed (its config, tokenizer or weights)")
    described = False  # what the converter changed is said once, with the first split it concerns
    for split, what in (("train", "train data file contents"), ("val", "validation data file contents")):
        if saved.get(f"{split}_data") != current.get(f"{split}_data"):
            converted = conversion_change(saved, current, split, describe=not described)
            maybe = "" if converted else _maybe_converted(saved, current, split, describe=not described)
            described = described or bool(converted or maybe)
            changes.append(converted or what + _source_named(current.get(f"{split}_source"), maybe))
    # Checkpoints written before model.path stopped counting still carry it: skip it on both sides.
    old_cfg = {k: v for k, v in saved.get("config", {}).items() if k not in NOT_COMPARED}
    new_cfg = {k: v for k, v in current.get("config", {}).items() if k not in NOT_COMPARED}
    if old_cfg:
        old_cfg = {k: v for k, v in ADDED_KEYS.items() if k in new_cfg} | old_cfg
    # Keys of another method's objective (an sft run's grpo.beta) change nothing this run computes; a change of
    # method itself is data.method's difference.
    method = new_cfg.get("data.method", old_cfg.get("data.method"))
    old_cfg = {k: v for k, v in old_cfg.items() if applies_to_method(k, method)}
    new_cfg = {k: v for k, v in new_cfg.items() if applies_to_method(k, method)}
    changes += _global_batch_change(saved.get("world_size", 1), current.get("world_size", 1), old_cfg, new_cfg)
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if across_backends and key in MAY_DIFFER_ACROSS_BACKENDS:
            continue
        if old_cfg.get(key) != new_cfg.get(key):
            changes.append(f"{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    return changes


def conversion_change(saved: dict, current: dict, split: str, describe: bool = True) -> str | None:
    """When the data of ``split`` ("train", "val") differs only because overnight converts the user's source
    (sources.py) differently now: what to tell the user, who did not change their file; None otherwise. Known from
    the source digest both checkpoints record, or, for a checkpoint from before converters were recorded (version
    1), from the earlier converter's copy still in the cache having the checkpoint's sha256."""
    now = current.get(f"{split}_conversion")
    if not now:
        return None
    was = saved.get(f"{split}_conversion")
    if f"{split}_conversion" in saved and not was:  # trained on a file of the user's own
        return None
    if was:
        if was.get("source") != now["source"] or was.get("converter") == now["converter"]:
            return None
        old_version = was.get("converter")
    else:
        old_version = 1
        if sources.earlier_copy_sha256(now["source"], old_version) != saved.get(f"{split}_data"):
            return None
    name = current.get(f"{split}_source") or "the data"
    return (f"{'train' if split == 'train' else 'validation'} data as overnight converts it: {name} is unchanged, "
            f"but overnight's converter changed since the checkpoint ({_converter_versions(old_version, now, describe)}"
            "), so the JSONL copy the run reads differs")


def _converter_versions(old_version: int, now: dict, describe: bool = True) -> str:
    changed = "; ".join(sources.CONVERSION_CHANGES[v] for v in range(old_version + 1, now["converter"] + 1)
                        if v in sources.CONVERSION_CHANGES) if describe else ""
    return f"version {old_version} -> {now['converter']}{': ' + changed if changed else ''}"


def _maybe_converted(saved: dict, current: dict, split: str, describe: bool = True) -> str:
    """For a converted source whose checkpoint predates the converter record, when the earlier converter's copy is
    gone from the cache: the converter may be the difference, which only the user can tell."""
    now = current.get(f"{split}_conversion")
    if not now or f"{split}_conversion" in saved or now["converter"] <= 1:
        return ""
    return (f"; if you did not change it, the difference is overnight's converter, which changed since the checkpoint "
            f"({_converter_versions(1, now, describe)}): --allow-config-change continues on the new conversion")


def only_conversion_changed(saved: dict, current: dict, changes: list[str]) -> bool:
    """Whether every change is overnight's own conversion of unchanged data (nothing the user can undo)."""
    return bool(changes) and len(changes) == sum(
        conversion_change(saved, current, split) is not None for split in ("train", "val")
        if saved.get(f"{split}_data") != current.get(f"{split}_data"))


def _source_named(source: str | None, maybe_converted: str = "") -> str:
    return f" ({source} differs from the data the checkpoint was trained on{maybe_converted})" if source else ""


def _adapter_name(init: dict | None) -> str:
    return f"{init['path']} (weights sha256 {init['sha256'][:12]})" if init else "none (the seeded initial weights)"


def quantization_change(saved: dict, current: dict) -> dict:
    """The base model's quantization before and after a backend change (recorded in the resume event): the
    same bits still mean another format on each backend (mlx affine groups, bitsandbytes NF4)."""
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    return {"from": {key: old_cfg.get(key) for key in MAY_DIFFER_ACROSS_BACKENDS},
            "to": {key: new_cfg.get(key) for key in MAY_DIFFER_ACROSS_BACKENDS}}


def _global_batch_change(old_world: int, new_world: int, old_cfg: dict, new_cfg: dict) -> list[str]:
    """Another number of processes may continue a run when the global batch is the same (the data position is
    global, src/distributed.py): grad_accumulation x processes is compared, not grad_accumulation alone. Pops
    train.grad_accumulation from both configs when the process count changed."""
    if old_world == new_world:
        return []
    key = "train.grad_accumulation"
    old_ga, new_ga = old_cfg.pop(key, 1), new_cfg.pop(key, 1)
    if old_ga * old_world == new_ga * new_world:
        return []
    return [f"global batch: {key} {old_ga} x {old_world} process{'es' if old_world > 1 else ''} = "
            f"{old_ga * old_world} micro-batches per step -> {new_ga} x {new_world} = {new_ga * new_world}; with "
            f"{new_world} process{'es' if new_world > 1 else ''} set {key}="
            + (f"{old_ga * old_world // new_world}" if (old_ga * old_world) % new_world == 0 else
               f"(impossible: {old_ga * old_world} is not a multiple of {new_world})")
            + " (train.batch_size unchanged) to continue exactly"]
