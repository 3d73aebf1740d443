"""End to end on the real torch backend, and the demo (cross-backend parity: tests/test_parity.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from overnight.rundir import read_metrics

from conftest import DATA_DIR, ROOT, has

needs_torch = pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="torch backend not installed")


def cli(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=timeout, cwd=ROOT)


@needs_torch
@pytest.mark.torch
def test_torch_cli_end_to_end_writes_a_peft_loadable_adapter(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = cli("train", "--backend", "torch", "--model", str(tiny_model_dir), "--data", str(DATA_DIR),
                 "--output", str(out), "--max-steps", "30", "--batch-size", "8", "--quiet",
                 "--set", "model.quantization.bits=4", "--set", "train.learning_rate=3e-3",
                 "--set", "train.warmup_steps=5", "--set", "eval.every_steps=10", "--set", "eval.max_batches=4",
                 "--set", "checkpoint.every_steps=10", "--set", "train.report_every=1", "--set", "lora.layers=-1",
                 "--set", "model.max_seq_length=256")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "metrics.jsonl", "heartbeat.json", "predictions.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    evals = [r["val_loss"] for r in read_metrics(out) if r["event"] == "eval"]
    assert evals[-1] < evals[0]

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


@pytest.mark.slow
@needs_torch
def test_demo_runs_and_says_where_things_are(tmp_path):
    env = dict(os.environ, OVERNIGHT_DEMO_SKIP_INSTALL="1")
    result = subprocess.run(["bash", str(ROOT / "demo.sh"), "--max-steps", "20", "--quiet", "--output", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter" in result.stdout and "metrics" in result.stdout
    assert (tmp_path / "demo" / "adapter" / "adapter_config.json").is_file()
