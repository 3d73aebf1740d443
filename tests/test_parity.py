"""One YAML, one model (SPEC §4, §9): the same config trains the same model on torch and on mlx.

Each method runs as users run it, `overnight train` with one config, once per backend, on the same tiny
model and data; every logged train loss and every eval loss must agree within 2e-3 relative over 16+
steps. What makes this hold is written once in framework-free code: the LoRA A init (src/backend/lora_init.py),
the objectives and their normalisation (src/backend/objectives.py); AdamW is torch's algorithm on both.
No quantization (the two backends quantize differently by design) and no dropout (two RNGs).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import DATA_DIR, ROOT, has
from overnight.runs.rundir import read_metrics

pytestmark = [pytest.mark.skipif(not has("torch", "transformers", "peft", "mlx", "mlx_lm"),
                                 reason="needs both backends"), pytest.mark.torch, pytest.mark.mlx]

STEPS = 16
TOLERANCE = 2e-3
DATA = {"sft": DATA_DIR, "cpt": DATA_DIR / "text", "dpo": DATA_DIR / "preference", "orpo": DATA_DIR / "preference",
        "reward": DATA_DIR / "preference"}


def train(backend: str, method: str, model, out, *extra: str) -> list[dict]:
    args = ["train", "--backend", backend, "--model", str(model), "--data", str(DATA[method]), "--method", method,
            "--output", str(out), "--max-steps", str(STEPS), "--batch-size", "4", "--lora-rank", "4", "--quiet",
            "--set", "lora.alpha=8", "--set", "lora.dropout=0", "--set", "lora.layers=-1",
            "--set", "model.quantization.bits=0", "--set", "model.max_seq_length=128",
            "--set", "train.learning_rate=3e-3", "--set", "train.warmup_steps=3", "--set", "train.weight_decay=0.01",
            "--set", "train.grad_accumulation=2", "--set", "train.report_every=1",
            "--set", "eval.every_steps=5", "--set", "eval.max_batches=3", "--set", "eval.predictions=0",
            "--set", "checkpoint.every_steps=100", "--set", "preference.beta=0.2", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env,
                            stdin=subprocess.DEVNULL, timeout=600, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return read_metrics(out)


def by_step(records: list[dict], event: str, field: str) -> dict[int, float]:
    return {r["step"]: r[field] for r in records if r["event"] == event}


@pytest.mark.parametrize("method", ["sft", "cpt", "dpo", "orpo", "reward"])
def test_same_config_same_training_on_torch_and_mlx(method, tiny_model_dir, tmp_path):
    assert_same_training(method, tiny_model_dir, tmp_path)


def test_dora_same_training_on_torch_and_mlx(tiny_model_dir, tmp_path):
    """DoRA (lora.use_dora) as src/backend/lora_init.py's DORA defines it: PEFT's DoRA on torch, the mlx backend's
    own layer on mlx, the same losses. dpo also runs its reference pass, the base with the adapter off, which for
    DoRA must also switch the magnitudes off."""
    assert_same_training("dpo", tiny_model_dir, tmp_path, "--set", "lora.use_dora=true")


def assert_same_training(method: str, model, tmp_path, *extra: str) -> None:
    runs = {name: train(name, method, model, tmp_path / name, *extra) for name in ("torch", "mlx")}
    losses = {name: by_step(records, "train", "loss") for name, records in runs.items()}
    evals = {name: by_step(records, "eval", "val_loss") for name, records in runs.items()}
    assert sorted(losses["torch"]) == sorted(losses["mlx"]) == list(range(1, STEPS + 1))
    assert sorted(evals["torch"]) == sorted(evals["mlx"]) and len(evals["torch"]) >= 3

    def relative(a: float, b: float) -> float:
        return abs(a - b) / max(abs(a), abs(b), 1e-12)

    off = {f"step {s}": (losses["torch"][s], losses["mlx"][s]) for s in losses["torch"]
           if relative(losses["torch"][s], losses["mlx"][s]) > TOLERANCE}
    off |= {f"eval {s}": (evals["torch"][s], evals["mlx"][s]) for s in evals["torch"]
            if relative(evals["torch"][s], evals["mlx"][s]) > TOLERANCE}
    assert not off, off
    # The run really trained (parity of two frozen models would prove nothing).
    first, last = losses["torch"][1], sum(losses["torch"][s] for s in range(STEPS - 3, STEPS + 1)) / 4
    # reward starts at log 2 (a zero score head) and its LoRA has no gradient until the head moves: a slower start
    assert last < first - (0.03 if method == "reward" else 0.05) * abs(first), (first, last)
