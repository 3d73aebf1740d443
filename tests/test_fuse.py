"""`overnight fuse`: a run's adapter merged into its base gives the model base + adapter, as a standalone folder.

Real runs: `overnight train` on the tiny model for a few steps at a large learning rate, so LoRA B is far from zero
and the adapter moves the logits (checked, so a no-op adapter could not pass). Everything in float32. Each fused
folder is loaded by its own library (transformers; mlx_lm.load) and compared with the base + the checkpoint's
adapter: logits within 1e-4 and the same greedy tokens."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, ROOT, has
from overnight.backend import Batch

needs_torch = pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="torch backend not installed")
needs_mlx = pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="mlx backend not installed")

TOKENS = np.array([[1, 40, 71, 300, 12, 5, 99, 250, 3, 17, 64, 128]], dtype=np.int64)
TOLERANCE = 1e-4
ADAPTER_EFFECT = 0.05  # the least max |logits change| the trained adapter must cause
NEW_TOKENS = 12


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600, cwd=ROOT)


def train(backend: str, model: Path, out: Path, bits: int, steps: int = 4, *extra: str) -> Path:
    """Checkpoints at steps 2 and 4 (each evaluated, so the best is recorded)."""
    result = cli("train", "--backend", backend, "--model", str(model), "--data", str(DATA_DIR), "--output", str(out),
                 "--max-steps", str(steps), "--batch-size", "4", "--lora-rank", "4", "--quiet",
                 "--set", f"model.quantization.bits={bits}", "--set", "model.max_seq_length=128",
                 "--set", "lora.alpha=8", "--set", "lora.dropout=0", "--set", "lora.layers=-1",
                 "--set", "train.learning_rate=2e-2", "--set", "train.warmup_steps=0",
                 "--set", "eval.every_steps=2", "--set", "eval.max_batches=2", "--set", "eval.predictions=0",
                 "--set", "checkpoint.every_steps=2", *extra)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return out


def fuse(run: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    result = cli("fuse", str(run), "--output", str(output), *extra)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def greedy(logits_of, steps: int = NEW_TOKENS) -> list[int]:
    ids = TOKENS[0].tolist()
    for _ in range(steps):
        ids.append(int(np.argmax(logits_of(np.array([ids]))[0, -1])))
    return ids[TOKENS.shape[1]:]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def safetensors_header(folder: Path) -> dict:
    header = {}
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header |= {k: v for k, v in json.loads(handle.read(length)).items() if k != "__metadata__"}
    return header


def umask_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def assert_umask_modes(folder: Path) -> None:
    """Every file as readable as any other file the user writes (safetensors alone writes 0600)."""
    found = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}
    assert set(found.values()) == {umask_mode()}, found


def assert_base_files_copied(base: Path, fused: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (fused / name).read_bytes() == (base / name).read_bytes(), name
    assert "chat_template" in json.loads((fused / "tokenizer_config.json").read_text())


# -- torch ----------------------------------------------------------------------------------------------------

def torch_forward(model):
    import torch

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(ids)).logits.float().numpy()

    return logits


def torch_model(model_dir: Path, adapter: Path | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


@pytest.fixture(scope="module")
def torch_run(tiny_model_dir, tmp_path_factory) -> Path:
    return train("torch", tiny_model_dir, tmp_path_factory.mktemp("torch") / "run", bits=0)


def check_torch_fused(base: Path, adapter: Path, fused: Path) -> float:
    reference = torch_forward(torch_model(base, adapter))
    merged = torch_forward(torch_model(fused))
    assert max_diff(reference(TOKENS), torch_forward(torch_model(base))(TOKENS)) > ADAPTER_EFFECT
    diff = max_diff(reference(TOKENS), merged(TOKENS))
    assert diff < TOLERANCE, diff
    assert greedy(reference) == greedy(merged)
    return diff


@needs_torch
@pytest.mark.torch
def test_torch_fuse_is_base_plus_adapter_as_a_transformers_folder(torch_run, tiny_model_dir, tmp_path):
    before = sorted(p.relative_to(torch_run) for p in torch_run.rglob("*"))
    # What a SIGKILLed fuse to this output left (its pid is gone), and the temporary of a fuse to the same output
    # still running (this test's process is alive): the first is removed and said, the second left alone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed, running = tmp_path / f".fused.tmp-{gone.pid}-5eed5eed", tmp_path / f".fused.tmp-{os.getpid()}-5eed5eed"
    for leftover in (killed, running):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"\0" * (2 << 20))
    result = fuse(torch_run, tmp_path / "fused")
    assert result.returncode == 0, result.stderr
    assert f"removed {killed}: 2.0 MB left by an earlier write to {tmp_path / 'fused'} that was interrupted" \
        in result.stdout
    assert not killed.exists() and running.is_dir()
    best = json.loads((torch_run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["best"]
    assert f"checkpoint step {best['best_step']} (the best checkpoint; verified)" in result.stdout
    starred = [line.split()[0] for line in cli("checkpoints", str(torch_run)).stdout.splitlines()
               if line.rstrip().endswith("*")]
    assert starred == [str(best["best_step"])]  # the one `overnight checkpoints` marks as best
    fused = tmp_path / "fused"
    diff = check_torch_fused(tiny_model_dir, torch_run / "checkpoints" / f"step-{best['best_step']:08d}" / "adapter",
                             fused)
    print(f"torch fuse: max |logits diff| {diff:.2e}")
    assert not (json.loads((fused / "config.json").read_text())).get("quantization_config")
    assert {meta["dtype"] for meta in safetensors_header(fused).values()} == {"F32"}
    assert not any("lora" in name for name in safetensors_header(fused))
    assert_base_files_copied(tiny_model_dir, fused)
    assert_umask_modes(fused)
    assert sorted(p.relative_to(torch_run) for p in torch_run.rglob("*")) == before  # read-only on the run
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name] == [running]  # none of this fuse's own


@needs_torch
@pytest.mark.torch
def test_torch_fuse_of_a_chosen_step_uses_that_checkpoint(torch_run, tiny_model_dir, tmp_path):
    result = fuse(torch_run, tmp_path / "fused", "--checkpoint", "2")
    assert result.returncode == 0, result.stderr
    assert "checkpoint step 2 (step 2, as asked; verified)" in result.stdout
    step2 = torch_run / "checkpoints" / "step-00000002" / "adapter"
    step4 = torch_run / "checkpoints" / "step-00000004" / "adapter"
    merged = torch_forward(torch_model(tmp_path / "fused"))(TOKENS)
    assert max_diff(merged, torch_forward(torch_model(tiny_model_dir, step2))(TOKENS)) < TOLERANCE
    assert max_diff(merged, torch_forward(torch_model(tiny_model_dir, step4))(TOKENS)) > ADAPTER_EFFECT / 10
    latest = fuse(torch_run, tmp_path / "latest", "--checkpoint", "latest", "--gguf")
    assert latest.returncode == 0 and "checkpoint step 4 (the latest valid checkpoint" in latest.stdout
    # No GGUF writer in transformers: the exact llama.cpp command instead, and no file pretending to be one.
    folder = tmp_path / "latest"
    assert f"convert_hf_to_gguf.py {folder} --outfile {folder / 'model.gguf'}" in latest.stdout
    assert not list((tmp_path / "latest").glob("*.gguf"))


@needs_torch
@pytest.mark.torch
def test_torch_fuse_of_a_qlora_run_merges_into_the_full_precision_base(tiny_model_dir, tmp_path):
    run = train("torch", tiny_model_dir, tmp_path / "qlora", bits=4, steps=2)
    assert json.loads((run / "checkpoints" / "step-00000002" / "backend_state.json").read_text())[
        "quantization_bits"] == 4
    result = fuse(run, tmp_path / "fused")
    assert result.returncode == 0, result.stderr
    fused = tmp_path / "fused"
    assert "quantization_config" not in json.loads((fused / "config.json").read_text())
    header = safetensors_header(fused)
    assert {meta["dtype"] for meta in header.values()} == {"F32"}
    assert header["model.layers.0.self_attn.q_proj.weight"]["shape"] == [64, 64]  # not packed 4-bit
    diff = check_torch_fused(tiny_model_dir, run / "checkpoints" / "step-00000002" / "adapter", fused)
    print(f"torch QLoRA fuse (vs the fp32 base + adapter): max |logits diff| {diff:.2e}")


# -- mlx ------------------------------------------------------------------------------------------------------

def mlx_forward(model):
    import mlx.core as mx

    def logits(ids: np.ndarray) -> np.ndarray:
        return np.array(model(mx.array(ids.astype(np.int32))).astype(mx.float32))

    return logits


def mlx_trained_model(base: Path, adapter: Path | None, bits: int):
    """The model as the run trained it: the base quantized in memory (bits 4) or not, with the adapter."""
    import contextlib
    import io

    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model, quantize_model

    model, config = load_model(Path(base))
    if bits:
        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = quantize_model(model, config, group_size=64, bits=bits)
    if adapter is not None:
        model = load_adapters(model, str(adapter))
    model.eval()
    return model


def mlx_fused(folder: Path):
    import mlx_lm

    return mlx_lm.load(str(folder))[0]


@pytest.fixture(scope="module")
def mlx_run(tiny_model_dir, tmp_path_factory) -> Path:
    return train("mlx", tiny_model_dir, tmp_path_factory.mktemp("mlx") / "run", bits=0)


@pytest.fixture(scope="module")
def mlx_4bit_run(tiny_model_dir, tmp_path_factory) -> Path:
    return train("mlx", tiny_model_dir, tmp_path_factory.mktemp("mlx4") / "run", bits=4)


def best_adapter(run: Path) -> Path:
    state = json.loads((run / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    return run / "checkpoints" / f"step-{state['best']['best_step']:08d}" / "adapter"


@needs_mlx
@pytest.mark.mlx
def test_mlx_fuse_is_base_plus_adapter_as_an_mlx_folder(mlx_run, tiny_model_dir, tmp_path):
    result = fuse(mlx_run, tmp_path / "fused", "--gguf")
    assert result.returncode == 0, result.stderr
    fused = tmp_path / "fused"
    reference = mlx_forward(mlx_trained_model(tiny_model_dir, best_adapter(mlx_run), bits=0))
    merged = mlx_forward(mlx_fused(fused))
    assert max_diff(reference(TOKENS), mlx_forward(mlx_trained_model(tiny_model_dir, None, 0))(TOKENS)) > ADAPTER_EFFECT
    diff = max_diff(reference(TOKENS), merged(TOKENS))
    print(f"mlx fuse: max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE
    assert greedy(reference) == greedy(merged)
    assert "quantization" not in json.loads((fused / "config.json").read_text())
    assert_base_files_copied(tiny_model_dir, fused)
    assert_umask_modes(fused)
    # mlx-lm's GGUF writer (llama is one of its architectures); transformers reads it back as the same model.
    assert (fused / "model.gguf").is_file() and "GGUF (mlx-lm's exporter)" in result.stdout
    if has("torch", "transformers", "gguf"):
        import torch
        from transformers import AutoModelForCausalLM

        gguf_model = AutoModelForCausalLM.from_pretrained(str(fused), gguf_file="model.gguf", dtype=torch.float32)
        gguf_diff = max_diff(torch_forward(gguf_model.eval())(TOKENS), merged(TOKENS))
        print(f"mlx GGUF read by transformers: max |logits diff| {gguf_diff:.2e}")
        assert gguf_diff < TOLERANCE


@needs_mlx
@pytest.mark.mlx
def test_mlx_fuse_of_a_4bit_run_keeps_the_quantization_and_dequantize_gives_floats(mlx_4bit_run, tiny_model_dir,
                                                                                   tmp_path):
    adapter = best_adapter(mlx_4bit_run)
    trained = mlx_forward(mlx_trained_model(tiny_model_dir, adapter, bits=4))(TOKENS)
    base_4bit = mlx_forward(mlx_trained_model(tiny_model_dir, None, bits=4))(TOKENS)
    assert max_diff(trained, base_4bit) > ADAPTER_EFFECT

    q4 = fuse(mlx_4bit_run, tmp_path / "q4")
    assert q4.returncode == 0, q4.stderr
    # How much of the adapter's change the requantization loses is said, measured on the merged weights.
    said = re.search(r"note: the merged weights are quantized again to 4 bits .* with an error of (\d+)% of that "
                     r"change.*--dequantize writes a full-precision folder", q4.stdout)
    assert said and 0 < int(said[1]) < 100, q4.stdout
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    header = safetensors_header(tmp_path / "q4")
    assert "model.layers.0.self_attn.q_proj.scales" in header
    assert header["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "U32"
    # Merged weights are quantized again (as mlx-lm's fuse does), so they round: close to the trained model,
    # far closer than the base was, not equal.
    requantized = mlx_forward(mlx_fused(tmp_path / "q4"))(TOKENS)
    print(f"mlx 4-bit fuse: max |logits diff| {max_diff(requantized, trained):.3f} "
          f"(the adapter moves them {max_diff(trained, base_4bit):.3f})")
    assert max_diff(requantized, trained) < 0.5 * max_diff(trained, base_4bit)

    fp = fuse(mlx_4bit_run, tmp_path / "fp", "--dequantize")
    assert fp.returncode == 0 and "quantized again" not in fp.stdout, fp.stdout
    config = json.loads((tmp_path / "fp" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert {meta["dtype"] for meta in safetensors_header(tmp_path / "fp").values()} == {"F32"}
    model = mlx_fused(tmp_path / "fp")
    diff = max_diff(mlx_forward(model)(TOKENS), trained)
    print(f"mlx 4-bit fuse --dequantize: max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE
    assert greedy(mlx_forward(model)) == greedy(mlx_forward(mlx_trained_model(tiny_model_dir, adapter, bits=4)))

    refused = fuse(mlx_4bit_run, tmp_path / "gguf", "--gguf")
    assert refused.returncode == 2 and "add --dequantize" in refused.stderr
    assert not (tmp_path / "gguf").exists()


def test_a_base_typed_as_a_relative_path_is_found_from_another_folder(tiny_model_dir, tmp_path, monkeypatch):
    """`--model tiny-model` was typed in the folder that holds it; fuse run anywhere else takes the absolute path the
    adapter recorded (the base identity check still applies to it)."""
    from overnight.commands.fuse import _base_path

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    monkeypatch.chdir(tmp_path)
    assert _base_path(tiny_model_dir.name, adapter) == str(tiny_model_dir)
    monkeypatch.chdir(tiny_model_dir.parent)
    assert _base_path(tiny_model_dir.name, adapter) == tiny_model_dir.name  # it means that folder from here
    (adapter / "adapter_config.json").write_text(json.dumps({"model": "org/model"}))
    monkeypatch.chdir(tmp_path)
    assert _base_path("gone/model", adapter) == "gone/model"  # nothing better recorded: said as it is


def test_an_exporter_whose_fuse_was_killed_ends_itself(tmp_path):
    """Nobody is left to rename what it writes, and the next fuse removes that folder: it must not go on filling it."""
    import signal
    import time

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"result": str(tmp_path / "result.json")}))
    exporter = ("import sys, time; from overnight.commands.fuse import run_export_job; "
                "sys.exit(run_export_job(lambda job: time.sleep(60), sys.argv[1:]))")
    fuse_stand_in = ("import subprocess, sys; "
                     "child = subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); "
                     "print(child.pid, flush=True); child.wait()")
    parent = subprocess.Popen([sys.executable, "-c", fuse_stand_in, exporter, str(job)], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the exporter is inside export()
    assert parent.poll() is None
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    import psutil

    def running() -> bool:  # reparented, it may linger as a zombie until init reaps it: that is ended
        try:
            return psutil.Process(child).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert running(), "the exporter ended before its fuse was killed"
    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(), "the exporter outlived its fuse by 10 s"
    assert not (tmp_path / "result.json").exists()


# -- refusals -------------------------------------------------------------------------------------------------

@needs_torch
@pytest.mark.torch
def test_refusals_name_the_problem_with_their_exit_code(torch_run, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    cases = [
        ([str(tmp_path / "no-such-run")], 2, "is not a run directory"),
        ([str(empty)], 3, "has no valid checkpoint to fuse"),
        ([str(torch_run), "--checkpoint", "soon"], 2, "--checkpoint must be best, latest or a step number"),
        ([str(torch_run), "--checkpoint", "999"], 3, "no checkpoint at step 999 (checkpoints at steps 2, 4"),
        ([str(torch_run / "checkpoints" / "step-00000002")], 2, "--checkpoint 2 --output"),
    ]
    for args, code, message in cases:
        result = cli("fuse", *args, "--output", str(tmp_path / "out"))
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "out").exists()
    result = cli("fuse", str(torch_run), "--output", str(busy))
    assert result.returncode == 2 and "not an empty folder" in result.stderr
    assert (busy / "mine.txt").read_text() == "keep"


@needs_torch
@pytest.mark.torch
def test_a_corrupt_checkpoint_is_never_fused_and_best_falls_back(torch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(torch_run, run)
    weights = run / "checkpoints" / "step-00000004" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = fuse(run, tmp_path / "out4", "--checkpoint", "4")
    assert result.returncode == 3
    assert "does not verify: adapter/adapter_model.safetensors does not match its sha256" in result.stderr
    result = fuse(run, tmp_path / "best")
    assert result.returncode == 0, result.stderr
    assert "checkpoint step 2" in result.stdout and "step-00000004 is invalid" in result.stdout
    assert weights.is_file() and not (run / "checkpoints" / "quarantine").exists()  # fuse only reads


@needs_torch
@pytest.mark.torch
def test_another_base_model_is_refused(torch_run, tmp_path):
    from overnight.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", hidden_size=32, intermediate_size=64)
    result = fuse(torch_run, tmp_path / "out", "--base", str(other))
    assert result.returncode == 3 and "is not the one this run trained on" in result.stderr
    result = fuse(torch_run, tmp_path / "out", "--base", str(tmp_path / "gone"))
    assert result.returncode == 2 and "does not exist" in result.stderr


@needs_torch
@pytest.mark.torch
def test_a_base_whose_weights_cannot_be_read_is_a_clear_error(torch_run, tiny_model_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8  # the header length: same size, so still "the same model" by name and size
    weights.write_bytes(bytes(data))
    result = fuse(torch_run, tmp_path / "out", "--base", str(damaged))
    assert result.returncode == 2, result.stderr
    assert f"cannot load the base model {damaged}" in result.stderr
    assert not (tmp_path / "out").exists()


@needs_torch
@pytest.mark.torch
def test_the_torch_fuse_keeps_the_dtype_the_base_was_saved_in(tmp_path):
    from safetensors.numpy import save_file

    from overnight.backends.torch_export import checkpoint_dtype

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))  # no dtype: the weights tell
    save_file({"w": np.zeros((2, 2), np.float16)}, str(tmp_path / "model.safetensors"))
    assert checkpoint_dtype(tmp_path) == "float16"


@needs_mlx
@pytest.mark.mlx
@pytest.mark.slow
def test_mlx_fuse_on_a_pre_quantized_mlx_base_keeps_its_quantization(tiny_model_dir, tmp_path):
    import contextlib
    import io

    from mlx_lm.convert import convert

    base = tmp_path / "base-mlx-4bit"
    with contextlib.redirect_stdout(io.StringIO()):
        convert(str(tiny_model_dir), mlx_path=str(base), quantize=True, q_bits=4, q_group_size=32)
    run = train("mlx", base, tmp_path / "run", bits=0)  # a pre-quantized base is used as it is
    adapter = best_adapter(run)
    trained = mlx_forward(mlx_trained_model(base, adapter, bits=0))(TOKENS)
    assert max_diff(trained, mlx_forward(mlx_trained_model(base, None, bits=0))(TOKENS)) > ADAPTER_EFFECT
    assert fuse(run, tmp_path / "q").returncode == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (config["quantization"]["bits"], config["quantization"]["group_size"]) == (4, 32)
    assert fuse(run, tmp_path / "fp", "--dequantize").returncode == 0
    assert "quantization" not in json.loads((tmp_path / "fp" / "config.json").read_text())
    assert max_diff(mlx_forward(mlx_fused(tmp_path / "fp"))(TOKENS), trained) < TOLERANCE


# -- torch: shard by shard ------------------------------------------------------------------------------------

def peft_adapter(base: Path, out: Path, targets=("q_proj", "v_proj", "down_proj"), seed: int = 0,
                 dora: bool = False) -> Path:
    """A PEFT adapter as a torch run saves it, with B far from zero (init_lora_weights=False keeps nn.Linear's init);
    with ``dora``, DoRA with its magnitudes moved off their start."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(torch_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                         init_lora_weights=False, use_dora=dora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    model.save_pretrained(str(out))
    return out


# Started from a small Python, not from pytest: a child's peak RSS counts the image it was forked from until exec.
_MEASURED = ("import json, os, subprocess, sys\n"
             "child = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,\n"
             "                         stderr=open(sys.argv[1], 'w'))\n"
             "_, status, usage = os.wait4(child.pid, 0)\n"
             "print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss]))\n")


def start_torch_exporter(base: Path, adapter: Path, output: Path) -> tuple[subprocess.Popen, Path]:
    """The child `overnight fuse` starts, as fuse starts it (a job file), under a launcher that reports its exit code
    and peak RSS (wait4: that child alone)."""
    scratch = output.parent / f"{output.name}-job"
    scratch.mkdir()
    output.mkdir()
    job = scratch / "job.json"
    job.write_text(json.dumps({"base": str(base), "adapter": str(adapter), "output": str(output),
                               "result": str(scratch / "result.json"), "dequantize": False, "gguf": False,
                               "bits": 0, "group_size": 64}))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-c", _MEASURED, str(scratch / "stderr"), sys.executable, "-m",
            "overnight.backends.torch_export", str(job)]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True), scratch / "stderr"


def finish_torch_exporter(started: tuple[subprocess.Popen, Path]) -> int:
    """The exporter's peak RSS in bytes, once it exited 0."""
    launcher, stderr = started
    out, _ = launcher.communicate(timeout=300)
    code, peak = json.loads(out)
    assert code == 0, stderr.read_text()
    return peak * (1 if sys.platform == "darwin" else 1024)


def shard_model(model: Path, out: Path, shards: int = 3) -> Path:
    """``model`` (one model.safetensors) as a sharded checkpoint: model-0000i-of-0000n.safetensors, blocks split
    evenly, with the model.safetensors.index.json transformers writes and reads."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(model, out, ignore=shutil.ignore_patterns("model.safetensors"))
    weights = load_file(str(model / "model.safetensors"))
    layers = 1 + max(int(name.split(".")[2]) for name in weights if name.startswith("model.layers."))

    def shard_of(name: str) -> int:
        return int(name.split(".")[2]) * shards // layers if name.startswith("model.layers.") else \
            (0 if name.startswith("model.embed") else shards - 1)

    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: array for name, array in weights.items() if shard_of(name) == i}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(array.nbytes for array in weights.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    return out


@needs_torch
@pytest.mark.torch
def test_torch_fuse_of_a_sharded_base_merges_shard_by_shard(tiny_model_dir, tmp_path):
    """Base + adapter as PEFT computes it (tight), written in the base's shards, in memory about one shard: the
    exporter's peak RSS over its peak on the tiny model stays under 1.5x the largest shard, where loading the model
    whole (as transformers + PEFT's merge did) costs all three shards and more. ~60 MB of float32 in shards of ~20 MB,
    well above the noise in the exporter's import footprint."""
    import torch
    from peft import LoraConfig, get_peft_model

    from overnight.models.tiny import build_tiny_model

    base = shard_model(build_tiny_model(tmp_path / "single", hidden_size=384, intermediate_size=1152, num_layers=9,
                                        num_heads=6, num_kv_heads=2), tmp_path / "sharded")
    torch.manual_seed(0)
    model = get_peft_model(torch_model(base / ".." / "single"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    reference = torch_forward(model)(TOKENS)
    with model.disable_adapter():
        assert max_diff(reference, torch_forward(model)(TOKENS)) > ADAPTER_EFFECT
    model.save_pretrained(str(tmp_path / "adapter"))
    del model

    # Both at once (each its own process, so neither's peak counts the other's): the wall time of one.
    small = start_torch_exporter(tiny_model_dir, peft_adapter(tiny_model_dir, tmp_path / "tiny-adapter"),
                                 tmp_path / "tiny-fused")
    sharded = start_torch_exporter(base, tmp_path / "adapter", tmp_path / "fused")
    baseline, peak = finish_torch_exporter(small), finish_torch_exporter(sharded)
    fused = tmp_path / "fused"
    shards = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards) == 3 and sorted(p.name for p in fused.glob("*.safetensors")) == shards
    index = json.loads((fused / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    largest = max((base / name).stat().st_size for name in shards)
    model_size = sum((base / name).stat().st_size for name in shards)
    print(f"sharded torch fuse: peak RSS {peak / 2**20:.0f} MB, tiny-model fuse {baseline / 2**20:.0f} MB; increase "
          f"{(peak - baseline) / 2**20:.1f} MB for a {model_size / 2**20:.0f} MB model in shards of at most "
          f"{largest / 2**20:.0f} MB")
    assert peak - baseline < 1.5 * largest

    diff = max_diff(reference, torch_forward(torch_model(fused))(TOKENS))
    print(f"sharded torch fuse: max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE
    assert (fused / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert not any("lora" in name for name in safetensors_header(fused))


def export_in_process(base: Path, adapter: Path, output: Path) -> dict:
    from overnight.backends.torch_export import export

    output.mkdir()
    return export({"base": str(base), "adapter": str(adapter), "output": str(output)})


@needs_torch
@pytest.mark.torch
def test_torch_fuse_sums_in_float32_and_stores_each_tensor_in_its_own_dtype(tiny_model_dir, tmp_path):
    """A bf16 base: every merged tensor is exactly (W in fp32 + scale * B @ A in fp32) rounded once to bf16 as torch
    rounds, every other tensor the base's bytes unchanged."""
    import torch
    from safetensors.torch import load_file, save_file

    base = tmp_path / "bf16"
    shutil.copytree(tiny_model_dir, base)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(base / "model.safetensors")).items()}
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = peft_adapter(tiny_model_dir, tmp_path / "adapter", targets=("q_proj",))
    export_in_process(base, adapter, tmp_path / "fused")
    fused = load_file(str(tmp_path / "fused" / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = lora[f"{prefix}.lora_A.weight"].float().numpy(), lora[f"{prefix}.lora_B.weight"].float().numpy()
    name = "model.layers.0.self_attn.q_proj.weight"
    summed = weights[name].float().numpy() + np.float32(8 / 4) * (b @ a)
    expected = torch.from_numpy(summed).to(torch.bfloat16)
    truncated = torch.from_numpy((summed.view(np.uint32) >> 16).astype(np.int16)).view(torch.bfloat16)
    assert not torch.equal(expected, truncated)  # so the check below tells rounding from truncation
    assert fused[name].dtype == torch.bfloat16 and torch.equal(fused[name], expected)
    assert not torch.equal(fused[name], weights[name])
    untouched = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(fused[untouched], weights[untouched]) and fused[untouched].dtype == torch.bfloat16


@needs_torch
@pytest.mark.torch
def test_the_numpy_bf16_rounding_is_torchs_over_the_whole_float_range():
    """Subnormals to values that round up to inf: the same bits as torch's cast, and inf caught as not finite."""
    import torch

    from overnight.backends.torch_export import _all_finite, from_float32, to_float32

    rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        values = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-44, 39, 200_000)).astype(np.float32)
    values = np.concatenate([values[np.isfinite(values)], np.float32([3.3895e38, 3.4e38, 1e-40, -0.0, 0.0])])
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got = from_float32(values.copy(), "BF16")
    assert np.array_equal(got, expected)
    assert not _all_finite(got, "BF16") and np.isinf(to_float32(got, "BF16")).sum() == 1  # 3.4e38 -> inf
    assert _all_finite(got[:-4], "BF16")


@needs_torch
@pytest.mark.torch
def test_torch_fuse_of_a_pickled_bin_base_writes_safetensors(tiny_model_dir, tmp_path):
    """A hub model with only pytorch_model.bin (the hub download takes it when there is no safetensors) fuses too."""
    import torch
    from safetensors.torch import load_file

    base = tmp_path / "bin"
    shutil.copytree(tiny_model_dir, base)
    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    adapter = peft_adapter(tiny_model_dir, tmp_path / "adapter")
    export_in_process(base, adapter, tmp_path / "fused")
    assert sorted(p.name for p in (tmp_path / "fused").glob("*.safetensors")) == ["model.safetensors"]
    reference = torch_forward(torch_model(tiny_model_dir, adapter))(TOKENS)
    assert max_diff(reference, torch_forward(torch_model(tmp_path / "fused"))(TOKENS)) < TOLERANCE


@needs_torch
@pytest.mark.torch
def test_torch_fuse_refuses_what_it_cannot_merge_exactly(tiny_model_dir, tmp_path):
    """A LoRA module with no checkpoint tensor, a merge that overflows the stored dtype, DoRA without its magnitudes:
    each refused by name, never a model with some weights silently left unmerged."""
    import torch
    from safetensors.torch import load_file, save_file

    from overnight.commands.fuse import ExportRefused

    adapter = peft_adapter(tiny_model_dir, tmp_path / "adapter", targets=("q_proj",))
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter, renamed)
    lora = load_file(str(renamed / "adapter_model.safetensors"))
    save_file({k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qkv_proj"): v for k, v in lora.items()},
              str(renamed / "adapter_model.safetensors"))
    with pytest.raises(ExportRefused, match=r"LoRA module model\.layers\.1\.self_attn\.qkv_proj matches no tensor"):
        export_in_process(tiny_model_dir, renamed, tmp_path / "out1")

    half = tmp_path / "fp16"
    shutil.copytree(tiny_model_dir, half)
    weights = {k: v.to(torch.float16) for k, v in load_file(str(half / "model.safetensors")).items()}
    save_file(weights, str(half / "model.safetensors"), metadata={"format": "pt"})
    huge = tmp_path / "huge"
    shutil.copytree(adapter, huge)
    save_file({k: v * 1e4 for k, v in lora.items()}, str(huge / "adapter_model.safetensors"))
    with pytest.raises(ExportRefused, match=r"merging the adapter into model\.layers\.0\.self_attn\.q_proj\.weight "
                                            r"gives non-finite values in float16"):
        export_in_process(half, huge, tmp_path / "out2")

    dora = tmp_path / "dora"
    shutil.copytree(adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ExportRefused, match="DoRA module .* needs a magnitude vector"):
        export_in_process(tiny_model_dir, dora, tmp_path / "out3")


@needs_torch
@pytest.mark.torch
def test_torch_fuse_merges_dora_as_peft_does(tiny_model_dir, tmp_path):
    """A PEFT DoRA adapter (lora.use_dora) fused: each merged weight is (m / ||W + s·B·A||) · (W + s·B·A), as
    PEFT's merge_and_unload makes it, and the fused folder gives PeftModel's logits and greedy tokens."""
    import torch
    from safetensors.torch import load_file

    adapter = peft_adapter(tiny_model_dir, tmp_path / "adapter", dora=True)
    export_in_process(tiny_model_dir, adapter, tmp_path / "fused")
    check_torch_fused(tiny_model_dir, adapter, tmp_path / "fused")
    merged = torch_model(tiny_model_dir, adapter).merge_and_unload(safe_merge=True)
    ours = load_file(str(tmp_path / "fused" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(ours[name], merged.state_dict()[name], rtol=1e-5, atol=1e-6)


@needs_mlx
@pytest.mark.mlx
@pytest.mark.parametrize("bits", [0, 4])
def test_mlx_fuse_merges_a_dora_run_with_mlx_lms_own_fuse(tiny_model_dir, tmp_path, bits):
    """An mlx DoRA adapter as the backend saves it (lora.use_dora, trained a few steps) fused by the mlx exporter
    (mlx-lm's DoRALinear.fuse) gives the logits and greedy tokens of the adapter as mlx_lm.load reads it. On a 4-bit
    base the merged weights are quantized again (closer to the trained model than the base was, not equal), and
    with --dequantize they are the trained model's floats."""
    from overnight.backends.mlx_backend import MLXBackend
    from overnight.backends.mlx_export import export
    from overnight.config import Config

    cfg = Config()
    cfg.model.path, cfg.model.quantization.bits, cfg.lora.layers = str(tiny_model_dir), bits, -1
    cfg.lora.rank, cfg.lora.dropout, cfg.lora.use_dora = 4, 0.0, True
    backend = MLXBackend()
    backend.setup(cfg, 0)
    ids = np.concatenate([TOKENS, TOKENS[:, ::-1]]).astype(np.int32)
    batch = Batch(ids, np.ones(ids.shape, np.float32), np.ones(ids.shape, np.int32), pad_id=0)
    for _ in range(3):
        backend.train_step([batch], 2e-2)
    backend.save(tmp_path / "checkpoint")
    adapter = tmp_path / "checkpoint" / "adapter"
    reference = mlx_forward(mlx_trained_model(tiny_model_dir, adapter, bits=bits))
    base = mlx_forward(mlx_trained_model(tiny_model_dir, None, bits))(TOKENS)
    assert max_diff(reference(TOKENS), base) > ADAPTER_EFFECT
    for dequantize in ((False, True) if bits else (False,)):
        out = tmp_path / f"fused-{dequantize}"
        out.mkdir()
        export({"base": str(tiny_model_dir), "adapter": str(adapter), "output": str(out), "bits": bits,
                "group_size": 64, "dequantize": dequantize, "gguf": False, "reward": False})
        config = json.loads((out / "config.json").read_text())
        assert ("quantization" in config) == (bits == 4 and not dequantize)
        merged = mlx_forward(mlx_fused(out))
        diff = max_diff(reference(TOKENS), merged(TOKENS))
        print(f"mlx DoRA fuse, bits {bits}, dequantize {dequantize}: max |logits diff| {diff:.2e}")
        if bits == 4 and not dequantize:
            assert diff < 0.5 * max_diff(reference(TOKENS), base)
            continue
        assert diff < TOLERANCE
        assert greedy(reference) == greedy(merged)


# -- reward models (--method reward): a standalone sequence-classification folder -----------------------------

def train_reward(backend: str, model: Path, out: Path, bits: int) -> Path:
    """2 reward steps on the bundled preference pairs at a large learning rate (the head and LoRA far from their
    start), one checkpoint."""
    result = cli("train", "--backend", backend, "--model", str(model), "--data", str(DATA_DIR / "preference"),
                 "--method", "reward", "--output", str(out), "--max-steps", "2", "--batch-size", "4",
                 "--lora-rank", "4", "--quiet", "--set", f"model.quantization.bits={bits}",
                 "--set", "model.max_seq_length=128", "--set", "lora.dropout=0", "--set", "lora.layers=-1",
                 "--set", "train.learning_rate=5e-2", "--set", "train.warmup_steps=0",
                 "--set", "eval.every_steps=100", "--set", "eval.max_batches=1", "--set", "checkpoint.every_steps=2")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return out


def run_scores(run: Path, backend_name: str, batch) -> np.ndarray:
    """The scores of the run's own model: its backend set up from its config.yaml, its step-2 checkpoint loaded."""
    from overnight.config import build_config

    cfg = build_config(run / "config.yaml")
    if backend_name == "torch":
        from overnight.backends.torch_backend import TorchBackend as Backend
    else:
        from overnight.backends.mlx_backend import MLXBackend as Backend
    backend = Backend()
    backend.setup(cfg, cfg.train.seed)
    backend.load(run / "checkpoints" / "step-00000002")
    return backend.reward_scores(batch)


def check_reward_fused(run: Path, backend: str, base: Path, fused: Path) -> float:
    """The folder opens in AutoModelForSequenceClassification on its own (every weight found, none left over),
    holds no LM head, and scores rows as the run did."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from test_adapter_formats import reward_batch

    config = json.loads((fused / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    assert config["id2label"] == {"0": "LABEL_0"} and "quantization" not in config
    header = safetensors_header(fused)
    assert "lm_head.weight" not in header and header["score.weight"]["shape"] == [1, 64]
    assert not any("lora" in name for name in header)
    assert_base_files_copied(base, fused)
    model, info = AutoModelForSequenceClassification.from_pretrained(str(fused), dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = reward_batch(base, pad_id=0)
    with torch.no_grad():
        theirs = model.eval()(input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
                              attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64))).logits[:, 0]
    ours = run_scores(run, backend, batch)
    assert np.ptp(ours) > 1e-3  # a trained head and LoRA: equal scores would prove nothing
    diff = max_diff(theirs.numpy(), ours)
    assert diff < TOLERANCE, (theirs, ours)
    return diff


@needs_torch
@pytest.mark.torch
def test_torch_fuse_of_a_reward_run_is_a_sequence_classifier_that_scores_as_the_run(tiny_model_dir, tmp_path):
    import warnings

    from peft import PeftConfig

    run = train_reward("torch", tiny_model_dir, tmp_path / "run", bits=0)
    # the run's adapter: only keys PEFT's LoraConfig knows (it warns about any other on every load), the pad id
    # in reward_head.json beside it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert PeftConfig.from_pretrained(str(run / "adapter")).task_type == "SEQ_CLS"
    assert not caught, [str(w.message) for w in caught]
    assert json.loads((run / "adapter" / "reward_head.json").read_text())["pad_token_id"] == 0
    result = fuse(run, tmp_path / "fused")
    assert result.returncode == 0, result.stderr
    assert "LlamaForSequenceClassification folder (one label)" in result.stdout
    diff = check_reward_fused(run, "torch", tiny_model_dir, tmp_path / "fused")
    print(f"torch reward fuse: max |score diff| {diff:.2e}")
    assert_umask_modes(tmp_path / "fused")


@needs_mlx
@needs_torch
@pytest.mark.mlx
def test_mlx_fuse_of_a_4bit_reward_run_is_a_sequence_classifier_that_scores_as_the_run(tiny_model_dir, tmp_path):
    """4-bit: the base quantized as the run had it, LoRA merged by mlx-lm, then dequantized (transformers reads no
    mlx quantization), so the float folder is exactly the model the run scored with."""
    import mlx_lm

    run = train_reward("mlx", tiny_model_dir, tmp_path / "run", bits=4)
    # SPEC §5: the run's adapter loads with mlx-lm's own loader (the causal LM with LoRA; the head is in
    # score_head.safetensors, which mlx-lm does not read)
    mlx_lm.load(str(tiny_model_dir), adapter_path=str(run / "adapter"))
    assert json.loads((run / "adapter" / "reward_head.json").read_text())["score_file"] == "score_head.safetensors"
    result = fuse(run, tmp_path / "fused")
    assert result.returncode == 0, result.stderr
    assert "LlamaForSequenceClassification folder (one label)" in result.stdout
    diff = check_reward_fused(run, "mlx", tiny_model_dir, tmp_path / "fused")
    print(f"mlx 4-bit reward fuse: max |score diff| {diff:.2e}")


def test_a_reward_run_asked_for_a_gguf_is_refused_before_anything_is_read_or_written(tmp_path):
    """llama.cpp's GGUF holds a causal LM, with no place for a reward model's score head: exit 2 naming why and what
    to do instead, before the checkpoint is read."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  method: reward\n")
    result = fuse(run, tmp_path / "fused", "--gguf")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "reward model" in result.stderr and "score head" in result.stderr and "without --gguf" in result.stderr
    assert not (tmp_path / "fused").exists()


@needs_torch
def test_a_model_type_transformers_cannot_classify_is_refused_by_name(tmp_path):
    from overnight.backends.torch_export import sequence_classifier_architecture
    from overnight.commands.fuse import ExportRefused

    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert sequence_classifier_architecture(tmp_path, llama) == "LlamaForSequenceClassification"
    with pytest.raises(ExportRefused, match="no sequence-classification class for model_type 'novel'.*"
                                            "no NovelForSequenceClassification"):
        sequence_classifier_architecture(tmp_path, {"model_type": "novel", "architectures": ["NovelForCausalLM"]})
    with pytest.raises(ExportRefused, match="not a ...ForCausalLM"):
        sequence_classifier_architecture(tmp_path, {"model_type": "llama"})


@needs_torch
@pytest.mark.torch
def test_a_fuse_that_fills_the_disk_says_so_without_a_traceback_and_leaves_nothing(torch_run, tmp_path):
    out = tmp_path / "out" / "fused"
    out.parent.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OVERNIGHT_FAULT="fuse-write:3:enospc")
    result = subprocess.run([sys.executable, "-m", "overnight", "fuse", str(torch_run), "--output", str(out)],
                            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=600, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "disk full while writing the fused model" in result.stderr, result.stderr
    assert "No space left on device" in result.stderr and "free that much in" in result.stderr, result.stderr
    assert list(out.parent.iterdir()) == []


@needs_torch
def test_the_base_files_copied_include_the_named_chat_templates(tiny_model_dir, tmp_path):
    """transformers keeps a model's extra chat templates (tool_use, rag, ...) as additional_chat_templates/NAME.jinja;
    a fused model without them fails apply_chat_template(chat_template="tool_use") that the base served."""
    from transformers import AutoTokenizer

    from overnight.commands.fuse import copy_base_files

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'TOOLS:' + messages[0]['content'] }}")
    fused = tmp_path / "fused"
    fused.mkdir()
    copied = copy_base_files(base, fused)
    assert "additional_chat_templates/tool_use.jinja" in copied
    tokenizer = AutoTokenizer.from_pretrained(str(fused))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="tool_use", tokenize=False)
    assert text == "TOOLS:hi"


@needs_torch
@needs_mlx
@pytest.mark.mlx
@pytest.mark.parametrize("missing", ["mlx", "torch"])
def test_a_checkpoint_whose_backend_is_not_installed_here_is_fused_by_the_other(missing, mlx_run, torch_run,
                                                                                 tiny_model_dir, tmp_path, monkeypatch):
    """A portable run moved from the Mac to a GPU box: its best checkpoint may be mlx's, on a machine without mlx
    (and the other way). Its adapter crosses exactly and the installed backend's exporter fuses it (before: exit 2,
    'mlx backend not installed')."""
    from overnight.commands import fuse as fuse_module

    run = mlx_run if missing == "mlx" else torch_run
    monkeypatch.setattr(fuse_module, "_installed", lambda modules: missing not in modules)
    said: list[str] = []
    result = fuse_module.fuse(run, "best", tmp_path / "fused", say=said.append)
    assert any(f"written by the {missing} backend, which is not installed here" in line for line in said), said
    if missing == "mlx":
        assert result["format"] == "Hugging Face folder for transformers"
        reference = mlx_forward(mlx_trained_model(tiny_model_dir, best_adapter(run), bits=0))
        merged = torch_forward(torch_model(tmp_path / "fused"))
    else:
        assert result["format"] == "MLX folder for mlx_lm.load"
        reference = torch_forward(torch_model(tiny_model_dir, best_adapter(run)))
        merged = mlx_forward(mlx_fused(tmp_path / "fused"))
    assert max_diff(reference(TOKENS), merged(TOKENS)) < TOLERANCE
    assert greedy(reference) == greedy(merged)


@needs_torch
@pytest.mark.torch
def test_a_fuse_interrupted_with_ctrl_c_says_so_and_leaves_nothing(torch_run, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OVERNIGHT_FAULT="fuse-write:1:sleep=60")
    # SIG_DFL in the child: a suite started in the background by a script (`.ci/run &`) hands every process SIGINT
    # ignored (POSIX), and fuse, unlike train, keeps what it was given: the Ctrl-C a terminal sends is the case here.
    proc = subprocess.Popen([sys.executable, "-m", "overnight", "fuse", str(torch_run), "--output", str(out / "fused")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(out.glob(".fused.tmp-*/*.safetensors")):  # the exporter is inside its first write
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert f"fuse interrupted; nothing was written to {out / 'fused'}" in stderr, stderr
    assert "training" not in stderr and "Traceback" not in stderr, stderr
    assert list(out.iterdir()) == []


def test_ctrl_c_that_reaches_another_thread_still_stops_the_exporter_wait(tmp_path, monkeypatch):
    """The kernel may hand SIGINT to any thread of the fuse process (a library's); Python then only sets its flag,
    and a wait on the exporter with no timeout did not see it until the exporter ended: the suite's Ctrl-C test hung
    60 s once in a full run. The wait wakes twice a second, so the KeyboardInterrupt comes at once, the exporter
    killed."""
    import signal
    import threading
    import time

    from overnight.commands import fuse

    slow = tmp_path / "slow_exporter.py"
    slow.write_text("import time\ntime.sleep(30)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setitem(fuse.EXPORTERS, "torch", "slow_exporter")

    def interrupt_from_this_thread():
        time.sleep(1.0)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # delivered here, not to the main thread

    # Python's own Ctrl-C handler, as in a terminal (a suite run in the background inherits SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_from_this_thread, daemon=True).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            fuse._run_exporter("torch", {}, tmp_path)
        assert time.monotonic() - started < 10
    finally:
        signal.signal(signal.SIGINT, previous)
