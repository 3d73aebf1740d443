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


# The README's test command runs the suite in 2 pytest-xdist workers, each test file on one worker (--dist loadfile),
# so a file's session and module fixtures (reference runs, data-parallel jobs) are built once. test_faults, about
# half the suite's time, is cut in one unit per backend, so both workers share it and each backend's uninterrupted
# reference runs are still built once. The longest units go first (measured: pytest --durations), so the two workers
# end together instead of one waiting out a long file it started last. (xdist's own --dist loadgroup would say the
# same with markers, but it renames node ids in a way pytest 9.2 no longer honours, so it silently groups nothing.)
LONGEST_FIRST = ("test_faults.py::torch", "test_faults.py::mlx", "test_e2e.py", "test_distributed.py", "test_grpo.py",
                 "test_faults.py::numpy", "test_fuse.py", "test_models.py", "test_parity.py", "test_mlx_backend.py",
                 "test_portable.py", "test_torch_backend.py", "test_bench.py")


def work_unit(nodeid: str) -> str:
    """The unit a worker takes whole: the test file, or for test_faults the file and the backend under test."""
    path, _, rest = nodeid.partition("::")
    name = Path(path).name
    if name != "test_faults.py":
        return name
    backend = rest.partition("[")[2].split("-")[0].rstrip("]")
    return f"{name}::{backend if backend in ('torch', 'mlx') else 'numpy'}"


def pytest_collection_modifyitems(config, items):
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable: file order otherwise


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # the units in LONGEST_FIRST order, not by how many tests each holds

    class FilesAndFaultsByBackend(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return FilesAndFaultsByBackend(config, log)
