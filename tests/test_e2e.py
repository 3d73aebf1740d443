"""End to end on the real torch backend, cross-backend parity, and the demo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@needs_torch
@pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="mlx backend not installed")
def test_both_backends_agree_on_first_step_and_eval_loss(tiny_model_dir):
    """Same model folder, data and seed, no quantization: the same numbers within 1e-3 relative."""
    from overnight import data
    from overnight.backend import get_backend
    from overnight.config import build_config

    cfg = build_config(None, {}, [f"model.path={tiny_model_dir}", f"data.path={DATA_DIR}", "model.quantization.bits=0",
                                  "lora.dropout=0", "train.batch_size=4", "model.max_seq_length=256",
                                  "train.learning_rate=1e-3"])
    tokenizer = data.load_tokenizer(tiny_model_dir)
    train_file, val_file = data.find_data_files(DATA_DIR)
    batches = data.eval_batches(val_file, tokenizer, cfg, 2, 4)
    results = {}
    for name in ("torch", "mlx"):
        backend = get_backend(name, announce=None)
        backend.setup(cfg, cfg.train.seed)
        evals = [backend.eval_loss(b) for b in batches]
        val = sum(s for s, _ in evals) / sum(n for _, n in evals)
        stream = data.TrainStream(train_file, tokenizer, cfg)
        first = backend.train_step([stream.next_batch()], 1e-3)
        results[name] = (val, first.loss, first.tokens)
    (t_val, t_loss, t_tokens), (m_val, m_loss, m_tokens) = results["torch"], results["mlx"]
    assert t_tokens == m_tokens
    assert abs(t_loss - m_loss) / abs(t_loss) < 1e-3, results
    assert abs(t_val - m_val) / abs(t_val) < 1e-3, results


@pytest.mark.slow
@needs_torch
def test_demo_runs_and_says_where_things_are(tmp_path):
    env = dict(os.environ, OVERNIGHT_DEMO_SKIP_INSTALL="1")
    result = subprocess.run(["bash", str(ROOT / "demo.sh"), "--max-steps", "20", "--quiet", "--output", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter" in result.stdout and "metrics" in result.stdout
    assert (tmp_path / "demo" / "adapter" / "adapter_config.json").is_file()
