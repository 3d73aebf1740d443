"""Smoke test of bench/memory.py, the harness behind the README's "Memory at scale" figures: it builds a model
folder and measures one real setup + train_step in a child, reading the child's peak by wait4. Tiny shapes only;
the measurements themselves never run in CI."""
from __future__ import annotations

import importlib.util
import math

import pytest

from conftest import ROOT, has

pytestmark = [pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="needs torch"), pytest.mark.torch]


def _memory_bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_bench_builds_a_model_and_measures_a_step(tmp_path):
    """One backend: the harness is the same code for both (the child calls the backend registry)."""
    bench = _memory_bench()
    model = bench.model_folder(tmp_path, "tiny-bf16")  # built by a child process, as the modes do
    assert (model / "config.json").is_file() and bench.weight_bytes(model) > 0
    run = bench.measured("torch", model, method="dpo", rows=2, length=16, bits=0)
    assert math.isfinite(run["loss"]) and run["step_s"] > 0, run
    # wait4's peak is the whole child's; the setup's own peak (rounded to 1 MB by the child) is part of it
    assert 0 < run["setup_peak_rss_gb"] <= run["peak_rss_gb"] + 1e-3 and run["peak_rss_gb"] < 8, run
    assert "output head on target positions only" in run["details"]["loss_head"], run
