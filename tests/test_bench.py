"""Smoke test of the benchmark harness (bench/run.py): tiny model, 3 steps a side, one round, so the harness
cannot rot silently. The benchmark itself never runs in CI."""
from __future__ import annotations

import json
import os
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
           "--overnight-set", "eval.max_new_tokens=2",
           # the grpo pair at its smallest shape
           "--backends", "torch,mlx,grpo", "--grpo-batch", "2", "--grpo-group", "2", "--new-tokens", "4",
           "--reps", "1", "--grpo-steps", "2", "--eval-prompts", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert {"cpu", "cores", "versions"} <= set(data["machine"])
    assert [s["backend"] for s in data["settings"]] == ["torch", "mlx", "grpo"]
    for setting in data["settings"][:2]:
        for key in ("speedup_steps_per_s", "peak_rss_ratio", "same_data_first_loss_rel_diff"):
            assert setting[key] > 0 or key == "same_data_first_loss_rel_diff", (key, setting[key])
        # Same model, same batches: the first step's loss (LoRA B = 0, the base model's) agrees across trainers.
        assert setting["same_data_first_loss_rel_diff"] < 1e-3
        ours = setting["sides"]["overnight"]
        assert 0 <= ours["overhead_measured"] < 1 and 0 <= ours["overhead_default_cadence"] < 1
        # The evaluation the config asks for is reported beside the overhead, never hidden: the two add up.
        assert 0 < ours["eval_share_default_cadence"] < 1
        assert ours["outside_step_default_cadence"] == pytest.approx(
            ours["overhead_default_cadence"] + ours["eval_share_default_cadence"])
        assert all(side["steps_per_s"] > 0 and side["peak_rss_mb"] > 0 for side in setting["sides"].values())
    # The grpo pair: overnight's sampler, the sampler it replaced (the same tokens) and transformers' generate each
    # draw every row's tokens; the real grpo run reports its step (one sampling call) and its eval.
    grpo = data["settings"][2]
    assert grpo["same_tokens_as_before"] is True and grpo["speedup_vs_reference"] > 0
    assert all(side["tokens_per_s"] > 0 for side in grpo["sides"].values())
    step = grpo["step"]
    assert step["step_s"] > 0 and step["sample_calls_per_step"] == 1 and step["eval_prompts"] == 2
    assert step["sampled_tokens_per_step"] > 0 and len(step["eval_s"]) == 1
    table = out.with_suffix(".md").read_text()
    assert "| torch | none | overnight |" in table and "HF Trainer + PEFT" in table and "mlx_lm.lora" in table
    assert "| none | overnight |" in table and "| none | transformers generate |" in table
    assert "bench/run.py --model" in table  # the command that produced it

    # --render re-derives the figures from the measured parts alone and gives the same table.
    rendered = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--render", str(out.with_suffix(".json"))],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert out.with_suffix(".md").read_text() == table


def _bench_flops():
    """bench/flops.py (bench/ is scripts, not a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import flops
    finally:
        sys.path.pop(0)
    return flops


def test_flop_ceiling_counts_the_head_and_the_backward_depth():
    per_token = _bench_flops().per_token
    config = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152}
    # Every position a target and LoRA on every block: overnight does exactly the reference's matmuls.
    assert per_token(config, -1, 1.0)["ceiling_vs_reference"] == pytest.approx(1.0)
    assert per_token(config, -1, 1.0)["ceiling_vs_reference_4bit"] == pytest.approx(1.0)
    partial = per_token(config, 16, 0.198)
    # SmolLM2-135M, the bench's data: the head at 20% of positions is the whole exact saving.
    assert partial["ceiling_vs_reference"] == pytest.approx(1.261, abs=1e-3)
    assert partial["ceiling_vs_reference_4bit"] == pytest.approx(1.546, abs=1e-3)


def test_gpu_script_dry_run_writes_every_step_with_numbers(tmp_path):
    """bench/gpu.sh --dry-run: the GPU script's every step on CPU at tiny sizes (one short pair, the
    deterministic-off side, the cuda tests and the GPU resume test collected), so the script cannot rot before a GPU
    machine runs it."""
    out = tmp_path / "gpu"
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=420, cwd=ROOT,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    data = json.loads(out.with_suffix(".json").read_text())
    steps = data["steps"]
    assert list(steps) == ["cuda_tests", "smollm2", "build", "llama8b_2x64", "llama8b_2x64_det_off", "grpo",
                           "resume", "mlx_tests"]
    assert all(s["ok"] for s in steps.values()), {k: s.get("error") for k, s in steps.items()}
    assert steps["cuda_tests"]["collected"] >= 3 and steps["resume"]["collected"] == 1
    pair = steps["llama8b_2x64"]
    assert pair["same_data_first_loss_rel_diff"] < 1e-3 and pair["speedup_tokens_per_s"] > 0
    assert all(side["tokens_per_s"] > 0 and side["achieved_tflops"] > 0 for side in pair["sides"].values())
    assert steps["llama8b_2x64_det_off"]["tokens_per_s"] > 0
    grpo = steps["grpo"]
    assert grpo["same_tokens_as_before"] and all(v > 0 for v in grpo["sampler_tokens_per_s"].values()), grpo
    assert data["env"]["matmul_tflops_measured"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| llama8b_2x64 | 2 x 64 | overnight |" in table and "4 x the linear layers' parameters" in table


def test_mfu_counts_four_times_the_linear_parameters_plus_attention():
    mfu_flops_per_token = _bench_flops().mfu_flops_per_token
    llama8b = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256}
    # Llama-3.1-8B: 8.03B parameters, of which 7.50B in linear layers (the 0.53B embedding is a lookup).
    assert mfu_flops_per_token(llama8b, 0) == pytest.approx(4 * 7.504e9, rel=1e-3)
    assert mfu_flops_per_token(llama8b, 2048) - mfu_flops_per_token(llama8b, 0) == 12 * 32 * 4096 * 2048
