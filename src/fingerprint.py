"""What a checkpoint was trained on: model, data files and the config fields that change training.

A resume whose fingerprint differs is refused (SPEC §7), naming the changed fields."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import TRAINING_KEYS, Config
from .fsutil import sha256_file

_MODEL_FILES = ("config.json",)


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


def compute(cfg: Config, train_file: Path, val_file: Path | None) -> dict:
    return {
        "model": _model_identity(cfg.model.path),
        "train_data": _file_digest(train_file),
        "val_data": _file_digest(val_file),
        "config": {key: json.loads(json.dumps(cfg.get(key))) for key in TRAINING_KEYS} | {"packing": cfg.packing},
    }


def differences(saved: dict, current: dict) -> list[str]:
    """Human-readable list of what changed, e.g. ["lora.rank: 16 -> 8", "train data file contents"]."""
    changes = []
    if saved.get("model") != current.get("model"):
        changes.append("model (path or weights)")
    if saved.get("train_data") != current.get("train_data"):
        changes.append("train data file contents")
    if saved.get("val_data") != current.get("val_data"):
        changes.append("validation data file contents")
    old_cfg, new_cfg = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if old_cfg.get(key) != new_cfg.get(key):
            changes.append(f"{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    return changes
