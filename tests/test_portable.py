"""Portable checkpoints (SPEC §13, src/runs/portable.py): start on one backend, continue on the other.

The cross-backend tests run `overnight train` as users do: 10 steps on one backend, then the same command with
--max-steps 20 --auto-resume --allow-backend-change on the other; steps 11-20 must match a 20-step run on the
target backend within 2e-3 relative (no quantization, no dropout: two RNGs cannot agree on draws)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA_DIR, ROOT, has
from overnight.runs import portable
from overnight.runs.checkpoint import export_adapter
from overnight.runs.rundir import read_metrics

BOTH = pytest.mark.skipif(not has("torch", "transformers", "peft", "mlx", "mlx_lm"), reason="needs both backends")
TOLERANCE = 2e-3


# ------------------------------------------------------------------------------------------ the layout


def _state(rng, moments=True) -> portable.PortableState:
    weights = {"layers.0.self_attn.q_proj.A": rng.normal(size=(4, 64)).astype(np.float32),
               "layers.0.self_attn.q_proj.B": rng.normal(size=(64, 4)).astype(np.float32)}
    if not moments:
        return portable.PortableState(weights, meta={"optimizer": "paged_adamw_8bit"})
    return portable.PortableState(weights, {k: v * 0.1 for k, v in weights.items()},
                                  {k: v * v for k, v in weights.items()}, adam_step=7)


def test_write_and_read_round_trip_exactly(tmp_path):
    state = _state(np.random.default_rng(0))
    portable.write(tmp_path, state, "mlx")
    back = portable.read(tmp_path)
    assert back.adam_step == 7 and back.meta["backend"] == "mlx" and back.has_moments
    for ours, theirs in ((state.weights, back.weights), (state.exp_avg, back.exp_avg),
                         (state.exp_avg_sq, back.exp_avg_sq)):
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key])


def test_the_same_state_is_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders several metadata keys by a per-process hash: the same state was a different file in each
    run (found comparing an upgraded resume with a fresh run). Written in separate processes, byte for byte equal."""
    code = ("import sys, numpy as np; from pathlib import Path; sys.path.insert(0, sys.argv[2]); "
            "from test_portable import _state; from overnight.runs import portable; "
            "portable.write(Path(sys.argv[1]), _state(np.random.default_rng(0)), 'torch')")
    files = []
    for i in range(4):
        (tmp_path / str(i)).mkdir()
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(i)), str(ROOT / "tests")], check=True,
                       cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": str(i)})
        files.append((tmp_path / str(i) / portable.FILE).read_bytes())
    assert all(f == files[0] for f in files)
    assert portable.read(tmp_path / "0").meta["backend"] == "torch"


def test_a_checkpoint_that_does_not_fit_is_refused_naming_what_differs(tmp_path):
    state = _state(np.random.default_rng(0))
    expected = {k: v.shape for k, v in state.weights.items()}
    portable.check_fits(state, expected, "here")
    with pytest.raises(portable.PortableError, match="lora.rank.*other shape"):
        portable.check_fits(state, {**expected, "layers.0.self_attn.q_proj.A": (8, 64)}, "here")
    with pytest.raises(portable.PortableError, match="missing.*v_proj"):
        portable.check_fits(state, {**expected, "layers.0.self_attn.v_proj.A": (4, 64)}, "here")
    with pytest.raises(portable.PortableError, match="no AdamW moments.*paged_adamw_8bit"):
        portable.check_fits(_state(np.random.default_rng(0), moments=False), expected, "here")
    with pytest.raises(portable.PortableError, match="before portable checkpoints existed"):
        portable.read(tmp_path / "nothing")


@pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="needs mlx-lm to convert the model")
def test_an_mlx_4bit_conversion_is_the_same_model_as_its_hugging_face_folder(tiny_model_dir, tmp_path):
    from mlx_lm.convert import convert

    from overnight.models.tiny import build_tiny_model

    converted = tmp_path / "mlx-4bit"
    convert(str(tiny_model_dir), str(converted), quantize=True, q_bits=4, q_group_size=32)
    assert json.loads((converted / "config.json").read_text()).get("quantization")  # really another folder
    original, quantized = portable.model_shape(str(tiny_model_dir)), portable.model_shape(str(converted))
    assert portable.same_model_differences(original, quantized) == []
    other = portable.model_shape(str(build_tiny_model(tmp_path / "other", seed=0, num_layers=3)))
    changes = portable.same_model_differences(original, other)
    assert any("num_hidden_layers" in c for c in changes) and any("tensors" in c for c in changes)


# ------------------------------------------------------------------------------------------ across backends


def run(backend: str, model, out, max_steps: int, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", "--backend", backend, "--model", str(model), "--data", str(DATA_DIR), "--output", str(out),
            "--max-steps", str(max_steps), "--batch-size", "4", "--lora-rank", "4", "--quiet",
            "--set", "lora.alpha=8", "--set", "lora.dropout=0", "--set", "lora.layers=-1",
            "--set", "model.quantization.bits=0", "--set", "model.max_seq_length=128",
            "--set", "train.learning_rate=3e-3", "--set", "train.warmup_steps=3", "--set", "train.weight_decay=0.01",
            "--set", "train.grad_accumulation=2", "--set", "train.report_every=1", "--set", "train.schedule=constant",
            "--set", "eval.every_steps=5", "--set", "eval.max_batches=3", "--set", "eval.predictions=0",
            "--set", "checkpoint.every_steps=5", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=900, cwd=ROOT)


def train_losses(out) -> dict[int, float]:
    # A resumed run logs its own lines after the first run's: the last line per step is what counts.
    return {r["step"]: r["loss"] for r in read_metrics(out) if r["event"] == "train"}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


@BOTH
@pytest.mark.slow
@pytest.mark.parametrize("source,target", [("mlx", "torch"), ("torch", "mlx")])
def test_ten_steps_on_one_backend_then_ten_on_the_other_match_twenty_on_the_other(
        source, target, tiny_model_dir, tmp_path):
    moved, straight = tmp_path / "moved", tmp_path / "straight"
    first = run(source, tiny_model_dir, moved, 10)
    assert first.returncode == 0, first.stderr[-3000:]

    refused = run(target, tiny_model_dir, moved, 20, "--auto-resume")
    assert refused.returncode == 3, refused.stdout[-2000:] + refused.stderr[-2000:]
    message = refused.stdout + refused.stderr
    assert "--allow-backend-change" in message and repr(source) in message and repr(target) in message
    assert "Traceback" not in message

    second = run(target, tiny_model_dir, moved, 20, "--auto-resume", "--allow-backend-change")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    reference = run(target, tiny_model_dir, straight, 20)
    assert reference.returncode == 0, reference.stderr[-3000:]

    continued, uninterrupted = train_losses(moved), train_losses(straight)
    assert sorted(continued) == sorted(uninterrupted) == list(range(1, 21))
    off = {s: (continued[s], uninterrupted[s]) for s in range(11, 21)
           if relative(continued[s], uninterrupted[s]) > TOLERANCE}
    assert not off, off
    # It really trained on after the switch (equal frozen losses would prove nothing).
    assert continued[20] < continued[11] - 0.02 * abs(continued[11]), (continued[11], continued[20])
    resume = [r for r in read_metrics(moved) if r["event"] == "resume"][-1]
    assert resume["from_step"] == 10 and resume["backend_change"]["from"] == source
    assert "dropout" in resume["backend_change"]["rng"]
    report = subprocess.run([sys.executable, "-m", "overnight", "report", str(moved), "--output",
                             str(tmp_path / "r.png")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert f"(backend {source} -> {target} at step 10)" in report.stdout, report.stdout + report.stderr

    # The final adapter is in the target engine's own format, and its library loads it; so is a best checkpoint
    # from before the switch (the other backend wrote it): the export converts it.
    load_in(target, tiny_model_dir, moved / "adapter")
    early = tmp_path / "early"
    early.mkdir()
    export_adapter(moved / "checkpoints" / "step-00000010", early, FORMAT[target], str(tiny_model_dir))
    load_in(target, tiny_model_dir, early / "adapter")


@BOTH
def test_a_dora_state_moves_between_backends_magnitudes_included(tiny_model_dir, tmp_path):
    """DoRA's magnitudes travel in the portable copy (<module>.M with their AdamW moments): three steps on mlx, the
    state through portable.safetensors into torch and back into a new mlx backend, every weight and moment the same,
    and the next step gives the same loss on all three (no quantization, no dropout)."""
    from overnight.backend import Batch
    from overnight.backends.mlx_backend import MLXBackend
    from overnight.backends.torch_backend import TorchBackend
    from overnight.config import Config
    from tokenizers import Tokenizer

    cfg = Config()
    cfg.model.path, cfg.model.quantization.bits = str(tiny_model_dir), 0
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.layers = 4, 8.0, 0.0, -1
    cfg.lora.targets, cfg.lora.use_dora = ["q_proj", "down_proj"], True
    rows = [e.ids for e in Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).encode_batch(
        ["The capital of France is Paris.", "Rain fell all morning and the sun was warm."])]
    ids = np.zeros((2, max(map(len, rows))), np.int32)
    mask = np.zeros(ids.shape, np.float32)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, 1:len(row)] = row, 1
    batch = Batch(ids, mask, (mask > 0) | (np.arange(ids.shape[1]) == 0), pad_id=0)

    def started(backend_class):
        backend = backend_class()
        backend.setup(cfg, 0)
        return backend

    source = started(MLXBackend)
    for _ in range(3):
        source.train_step([batch], 1e-2)
    portable.write(tmp_path, source.portable_state(), "mlx")
    state = portable.read(tmp_path)
    assert sorted(k for k in state.weights if k.endswith(".M")) == [
        f"layers.{i}.{p}.M" for i in (0, 1) for p in ("mlp.down_proj", "self_attn.q_proj")]
    torch_backend = started(TorchBackend)
    portable.check_fits(state, {k: v.shape for k, v in torch_backend.portable_state().weights.items()}, "here")
    torch_backend.load_portable(state)
    back = started(MLXBackend)
    back.load_portable(torch_backend.portable_state())
    for moved in (torch_backend.portable_state(), back.portable_state()):
        for ours, theirs in ((state.weights, moved.weights), (state.exp_avg, moved.exp_avg),
                             (state.exp_avg_sq, moved.exp_avg_sq)):
            assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    losses = [b.train_step([batch], 1e-2).loss for b in (source, torch_backend, back)]
    assert relative(losses[0], losses[1]) < TOLERANCE and losses[0] == losses[2], losses


FORMAT = {"torch": "peft", "mlx": "mlx"}


def load_in(backend: str, model_dir, adapter) -> None:
    """Load ``adapter`` with the backend's own library and check the LoRA weights are the trained ones."""
    if backend == "torch":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter))
        lora_b = [p.detach().abs().max().item() for n, p in model.named_parameters() if "lora_B" in n]
    else:
        from mlx.utils import tree_flatten
        from mlx_lm import load

        model, _ = load(str(model_dir), adapter_path=str(adapter))
        lora_b = [p.abs().max().item() for n, p in tree_flatten(model.parameters()) if n.endswith("lora_b")]
    assert lora_b and max(lora_b) > 0, "no trained LoRA B in the loaded adapter"


@pytest.mark.parametrize("damage", ["truncate", "header", "empty", "config"])
def test_a_damaged_model_folder_gets_an_identity_that_matches_nothing_and_never_raises(damage, tiny_model_dir,
                                                                                       tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "header":
        weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        (broken / "config.json").write_text("{not json")
    shape = portable.model_shape(str(broken))
    assert portable.same_model_differences(portable.model_shape(str(tiny_model_dir)), shape)
