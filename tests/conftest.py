"""Shared fixtures. The tiny model is built once per session into a temp folder (no downloads)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI tests run with stdin not a terminal, which supervises a run (overnight.runs.supervise); the tests that
# kill the trainer themselves expect it to stay dead. tests/test_supervise.py turns supervision back on.
os.environ.setdefault("OVERNIGHT_SUPERVISOR", "off")
# One compute thread per test process (and the CLI runs they start): the README's command runs two xdist workers,
# one per core of CI's 2-core machine, and torch's default of a thread per core made four busy-waiting threads on
# two cores (a tiny model's sampling call measured 14 s that way, 0.5 s with one thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A Llama-shaped model small enough for MLX on CPU: hidden 64, 2 layers, vocab ~512."""
    from overnight.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0)


def with_stop_ids(model_dir: Path, out: Path, stop_ids: list[int]) -> Path:
    """A copy of a model folder whose generation_config.json lists ``stop_ids`` as its eos_token_id: a chat model
    that names its end-of-turn token beside its eos, as Llama 3, Qwen and Gemma do."""
    shutil.copytree(model_dir, out)
    generation = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": list(stop_ids)}))
    return out
