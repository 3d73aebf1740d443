"""A run as a whole: where it may write, how it ends on a second signal and on a crash (real subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overnight.runs.checkpoint import CheckpointManager
from overnight.runs.rundir import read_metrics

from conftest import DATA_DIR, ROOT
from test_cli import base_args, env, overnight, wait_for_step


def refused_with(result, code: int, *needles: str) -> None:
    text = result.stdout + result.stderr
    assert result.returncode == code, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def with_output(model: Path, output: str, *extra: str) -> list[str]:
    args = base_args(model, Path("unused"), 5, *extra)
    args[args.index("--output") + 1] = output
    return args


def test_empty_output_dir_is_refused(tiny_model_dir):
    refused_with(overnight(*with_output(tiny_model_dir, "")), 2, "output.dir is empty", "--output")


def test_output_dir_that_is_a_file_is_refused(tmp_path, tiny_model_dir):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    refused_with(overnight(*with_output(tiny_model_dir, str(target))), 2, f"output.dir {target} is a file")
    assert target.read_text() == "not a folder"


def test_output_dir_under_a_file_is_refused_naming_the_path(tmp_path, tiny_model_dir):
    parent = tmp_path / "a-file"
    parent.write_text("x")
    refused_with(overnight(*with_output(tiny_model_dir, str(parent / "run"))), 2,
                 f"output.dir {parent / 'run'} cannot be created", "--output DIR")


def test_output_dir_in_a_read_only_place_is_refused(tiny_model_dir):
    target = Path("/sys/overnight-test-run")
    try:
        target.mkdir()
    except OSError:
        pass  # what we want: this place refuses writes, even to root
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    refused_with(overnight(*with_output(tiny_model_dir, str(target))), 2, f"output.dir {target} cannot be created")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions (the /sys and under-a-file variants "
                    "cover a refused write as root)")
@pytest.mark.parametrize("where", ["parent", "run_dir"])
def test_output_dir_without_write_permission_is_refused(tmp_path, tiny_model_dir, where):
    parent = tmp_path / "locked"
    parent.mkdir()
    run_dir = parent / "run"
    if where == "run_dir":
        run_dir.mkdir()
        os.chmod(run_dir, 0o500)
    else:
        os.chmod(parent, 0o500)
    try:
        refused_with(overnight(*with_output(tiny_model_dir, str(run_dir))), 2, f"output.dir {run_dir}", "--output")
    finally:
        os.chmod(parent, 0o700)
        if run_dir.exists():
            os.chmod(run_dir, 0o700)


def run_with_fault(args: list[str], fault: str, **faults) -> subprocess.Popen:
    e = env(**faults)
    e["OVERNIGHT_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-m", "overnight", *args], env=e, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def wait_for_save_in_progress(run_dir: Path, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((run_dir / "checkpoints").glob("step-*.tmp-*")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no save started")


@pytest.mark.parametrize("nth, committed", [(1, None), (2, 3)])
def test_second_sigint_during_a_save_aborts_cleanly(tmp_path, tiny_model_dir, nth, committed):
    """The first SIGINT asks for a save; the second arrives inside it (the save is slowed by the fault hook)."""
    out = tmp_path / "run"
    every = "3" if committed else "1000"
    args = base_args(tiny_model_dir, out, 40, "--set", "eval.every_steps=1000", "--set", f"checkpoint.every_steps={every}")
    proc = run_with_fault(args, f"after_backend_files:{nth}:sleep=60", sleep_s=0.3)
    wait_for_step(out, 4 if committed else 1, proc)
    proc.send_signal(signal.SIGINT)
    wait_for_save_in_progress(out, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr and "Exception ignored" not in stdout + stderr, stderr
    if committed:
        assert f"aborted without saving; the last committed checkpoint (step {committed}) is intact" in stderr
    else:
        assert "aborted without saving; no checkpoint was committed yet" in stderr
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["state"] == "interrupted" and "second signal" in beat["reason"]
    latest = CheckpointManager(out, log=lambda m: None).latest_valid(read_only=True)
    assert (latest.step if latest else None) == committed
    if committed:  # the unfinished save is a leftover the next start removes; the resume is from the intact one
        resumed = overnight(*base_args(tiny_model_dir, out, 6, "--set", "eval.every_steps=1000"), "--auto-resume")
        assert resumed.returncode == 0, resumed.stderr
        assert [r["from_step"] for r in read_metrics(out) if r["event"] == "resume"] == [committed]


@pytest.mark.parametrize("nth, note", [(1, "no checkpoint was committed yet"),
                                       (2, "the last committed checkpoint (step 3) is intact")])
def test_a_crash_names_the_checkpoint_only_when_there_is_one(tmp_path, tiny_model_dir, nth, note):
    out = tmp_path / "run"
    args = base_args(tiny_model_dir, out, 12, "--set", "eval.every_steps=1000", "--set", "checkpoint.every_steps=3")
    proc = run_with_fault(args, f"after_backend_files:{nth}:raise")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stdout + stderr
    assert "RuntimeError: injected fault" in stderr  # a real crash keeps its traceback for the report
    assert f"overnight crashed unexpectedly; {note}" in stderr
    assert [r["event"] for r in read_metrics(out)][-1] == "failed"


def test_validate_data_takes_max_seq_length(tiny_model_dir):
    result = overnight("validate-data", str(DATA_DIR), "--model", str(tiny_model_dir), "--max-seq-length", "64")
    assert "max_seq_length 64" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_data_file_edited_under_a_running_job_is_named_as_changed(tmp_path, tiny_model_dir):
    """Once reported as invalid JSON on a line the truncated file no longer had."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (data / name).write_bytes((DATA_DIR / name).read_bytes())
    out = tmp_path / "run"
    args = base_args(tiny_model_dir, out, 40, "--set", "eval.every_steps=1000")
    args[args.index("--data") + 1] = str(data)
    proc = subprocess.Popen([sys.executable, "-m", "overnight", *args], env=env(sleep_s=0.1), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    wait_for_step(out, 2, proc)
    rows = (data / "train.jsonl").read_bytes()
    (data / "train.jsonl").write_bytes(rows[:len(rows) // 2])  # an editor saving in place, mid-row
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stdout + stderr
    assert "train.jsonl: the file changed while the run was using it" in stderr, stderr
    assert "not valid JSON" not in stderr and "Traceback" not in stderr
    assert "failed at step" in overnight("status", str(out)).stdout


def test_a_sigterm_before_training_started_says_so(tmp_path, tiny_model_dir):
    """Once exit 143 and not a word: SIGTERM's default action, before the loop took the signal over."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "overnight", *base_args(tiny_model_dir, out, 4)],
                            env=env(setup_sleep_s=60), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().startswith("backend:")  # the model "loads" for a minute from here
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)  # 30 s was passed once on a loaded 2-core machine
    assert proc.returncode == 143, stdout + stderr
    assert "stopped by SIGTERM before training started; nothing was trained or saved" in stderr, stderr
    assert "no checkpoint exists yet: the same command starts the run again" in stderr
    assert "Traceback" not in stderr and not (out / "metrics.jsonl").exists()


def test_dora_on_a_backend_that_does_not_build_it_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    """The numpy reference backend has no DoRA layers: lora.use_dora=true there is exit 2 naming the key and the
    backend, not a plain-LoRA run under a config that says DoRA."""
    run = tmp_path / "run"
    args = base_args(tiny_model_dir, run, 5, "--set", "lora.use_dora=true")
    result = overnight(*args)
    refused_with(result, 2, "lora.use_dora", "does not build DoRA layers")
    assert not (run / "checkpoints").exists()


@pytest.fixture(scope="module")
def bf16_tiny_model(tmp_path_factory) -> Path:
    """The tiny model saved in bfloat16, as most hub checkpoints are: on CPU (float32 compute) the torch backend
    keeps its embedding and head 16-bit, a setup detail the start banner says."""
    import torch
    from safetensors.torch import load_file, save_file

    from overnight.models.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path_factory.mktemp("bf16-tiny") / "model", seed=0)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return folder


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_the_setup_details_that_change_a_step_are_said_at_start_and_all_are_recorded(backend, tmp_path,
                                                                                       bf16_tiny_model):
    """A real run on each backend: the log says which loss head computes the loss, how the base model is held
    (quantization, compute dtype, torch's 16-bit embedding and head, mlx's base weights) and the backend's notes;
    the start event records every detail under `setup`, and a resume records them again (another machine may
    choose another head for the same config)."""
    pytest.importorskip("mlx" if backend == "mlx" else "torch")
    out = tmp_path / "run"
    args = base_args(bf16_tiny_model, out, 1)
    args[args.index("--backend") + 1] = backend
    first = overnight(*args, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    setup = next(r for r in read_metrics(out) if r["event"] == "start")["setup"]
    said = first.stdout.splitlines()
    assert setup["loss_head"].startswith("output head on target positions only")
    assert f"loss head: {setup['loss_head']}" in said, first.stdout
    assert any(line.startswith("base model: 4-bit") or line.startswith("base model: bitsandbytes nf4")
               for line in said), first.stdout
    # lora.layers 16 (the default) on a 2-block model: all blocks, said on either backend
    assert setup["lora_layers_note"] == "lora.layers=16 but the model has 2 blocks; using all"
    assert f"note: {setup['lora_layers_note']}" in said, first.stdout
    if backend == "torch":
        assert "kept in the checkpoint's 16-bit dtype" in setup["stored_16bit"]
        assert f"16-bit storage: {setup['stored_16bit']}" in said, first.stdout
        assert setup["compute_dtype"] == "float32" and setup["lora_layers"] == [0, 1]
    else:
        assert f"base weights: {setup['base_weights']}" in said, first.stdout
        assert setup["lora_keys"] and setup["lora_layers"] == 2
    resumed = overnight(*args[:args.index("--max-steps") + 1], "2", *args[args.index("--max-steps") + 2:],
                        "--auto-resume", timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert next(r for r in read_metrics(out) if r["event"] == "resume")["setup"] == setup
    assert f"loss head: {setup['loss_head']}" in resumed.stdout.splitlines()
