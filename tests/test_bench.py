"""Smoke test of the benchmark harness (bench/run.py): tiny model, 3 steps a side, one round, so the harness
cannot rot silently. The benchmark itself never runs in CI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, has

pytestmark = [pytest.mark.skipif(not has("torch", "transformers", "peft", "mlx", "mlx_lm"),
                                 reason="needs both backends"), pytest.mark.torch, pytest.mark.mlx]


def test_bench_writes_json_and_markdown_with_ratios(tiny_model_dir, tmp_path):
    out = tmp_path / "result"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--model", str(tiny_model_dir), "--steps", "3",
           "--warmup", "1", "--rounds", "1", "--bits", "0", "--seq", "64", "--batch-size", "2", "--rank", "4",
           "--alpha", "8", "--layers", "2", "--targets", "q_proj,v_proj", "--out", str(out),
           "--overnight-set", "eval.max_batches=1", "--overnight-set", "eval.predictions=1",
           "--overnight-set", "eval.max_new_tokens=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert {"cpu", "cores", "versions"} <= set(data["machine"])
    assert [s["backend"] for s in data["settings"]] == ["torch", "mlx"]
    for setting in data["settings"]:
        for key in ("speedup_steps_per_s", "peak_rss_ratio", "same_data_first_loss_rel_diff"):
            assert setting[key] > 0 or key == "same_data_first_loss_rel_diff", (key, setting[key])
        # Same model, same batches: the first step's loss (LoRA B = 0, the base model's) agrees across trainers.
        assert setting["same_data_first_loss_rel_diff"] < 1e-3
        ours = setting["sides"]["overnight"]
        assert 0 <= ours["overhead_measured"] < 1 and 0 <= ours["overhead_default_cadence"] < 1
        assert all(side["steps_per_s"] > 0 and side["peak_rss_mb"] > 0 for side in setting["sides"].values())
    table = out.with_suffix(".md").read_text()
    assert "| torch | none | overnight |" in table and "HF Trainer + PEFT" in table and "mlx_lm.lora" in table
