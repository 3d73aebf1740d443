"""The command line as a user runs it: real subprocesses, the real data pipeline and tiny model's
tokenizer, and the numpy reference backend (plugged in as module:Class) for speed."""
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

TESTS = Path(__file__).resolve().parent
REF = "refbackend:NumpyBackend"


def env(**faults) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), e.get("PYTHONPATH", "")])
    e["OVERNIGHT_REF_FAULTS"] = json.dumps(faults)
    e.pop("OVERNIGHT_FAULT", None)
    return e


def base_args(model: Path, out: Path, steps: int = 12, *extra: str) -> list[str]:
    return ["train", "--backend", REF, "--model", str(model), "--data", str(DATA_DIR), "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "4", "--quiet",
            "--set", "train.report_every=1", "--set", "eval.every_steps=4", "--set", "checkpoint.every_steps=5",
            "--set", "eval.max_batches=2", "--set", "train.warmup_steps=2", "--set", "lora.rank=4",
            "--set", "model.max_seq_length=128", "--set", "train.learning_rate=0.02", *extra]


def overnight(*args: str, faults: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True,
                          env=env(**(faults or {})), stdin=subprocess.DEVNULL, timeout=timeout, cwd=ROOT, **kw)


def on_terminal(args: list[str], answer: bytes | None, columns: int | None = None) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal (``columns`` wide, if given); when it asks, type ``answer``
    (b"\\x04" is Ctrl-D)."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        try:
            if columns:  # fd 1 is the pseudo-terminal here
                import fcntl
                import struct
                import termios

                fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
            os.execve(sys.executable, [sys.executable, "-m", "overnight", *args], env())
        finally:
            os._exit(99)
    seen = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
        if answer is not None and b"[Y/n]" in seen:
            os.write(fd, answer)
            answer = None
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"}


def test_train_help_shows_every_spec_flag():
    out = overnight("train", "--help").stdout
    for flag in ("--set", "--backend", "--auto-resume", "--fresh", "--resume-from", "--before-step", "--output",
                 "--model", "--data", "--method", "--batch-size", "--lora-rank", "--lora-layers", "--max-steps",
                 "--learning-rate", "--no-streaming", "--seed", "--epochs"):
        assert flag in out, flag


def test_unknown_key_exits_2_naming_it(tmp_path):
    result = overnight("train", "--set", "bogus.key=1", "--output", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "bogus" in result.stderr and "Traceback" not in result.stderr
    result = overnight("train", "--set", "train.learning_rat=1e-4", "--model", "m")
    assert result.returncode == 2 and "learning_rate" in result.stderr


@pytest.mark.parametrize("extra, key", [
    (["--set", "train.learning_rate=nan"], "train.learning_rate"),
    (["--set", "train.learning_rate=inf"], "train.learning_rate"),
    (["--set", "train.learning_rate=-.inf"], "train.learning_rate"), (["--seed", "-3"], "train.seed"),
    (["--set", "lora.alpha=nan"], "lora.alpha"),
])
def test_non_finite_numbers_and_negative_seeds_exit_2_naming_the_key(tmp_path, tiny_model_dir, extra, key):
    out = tmp_path / "run"
    result = overnight(*base_args(tiny_model_dir, out, 3), *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"config key '{key}'" in result.stderr and "Traceback" not in result.stdout + result.stderr
    assert not out.exists()


def test_bad_data_exits_2_before_anything_is_written(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    out = tmp_path / "run"
    args = base_args(tiny_model_dir, out)
    args[args.index("--data") + 1] = str(data)
    result = overnight(*args)
    assert result.returncode == 2, result.stderr
    assert "train.jsonl:2" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_full_run_writes_the_run_directory(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = overnight(*base_args(tiny_model_dir, out))
    assert result.returncode == 0, result.stderr + result.stdout
    assert "backend: refbackend:NumpyBackend" in result.stdout
    for name in ("config.yaml", "metrics.jsonl", "heartbeat.json", "predictions.jsonl", "adapter"):
        assert (out / name).exists(), name
    events = {r["event"] for r in read_metrics(out)}
    assert {"start", "train", "eval", "checkpoint", "end"} <= events
    train = [r for r in read_metrics(out) if r["event"] == "train"][0]
    assert {"loss", "loss_avg", "lr", "tokens", "tokens_per_sec", "grad_norm", "memory_mb", "elapsed_s"} <= set(train)
    assert "completed at step 12" in overnight("status", str(out)).stdout
    listing = overnight("checkpoints", str(out)).stdout
    assert "12" in listing and "valid" in listing and "*" in listing
    heartbeat = json.loads((out / "heartbeat.json").read_text())
    assert heartbeat["state"] == "completed" and heartbeat["step"] == 12 and heartbeat["pid"]


def test_existing_run_without_terminal_or_flag_is_refused_then_fresh_archives(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 5)).returncode == 0
    refused = overnight(*base_args(tiny_model_dir, out, 10))
    assert refused.returncode == 3
    assert "--auto-resume" in refused.stderr and "--fresh" in refused.stderr
    fresh = overnight(*base_args(tiny_model_dir, out, 5), "--fresh")
    assert fresh.returncode == 0, fresh.stderr
    archives = list(out.glob("archive-*"))
    assert len(archives) == 1 and (archives[0] / "checkpoints" / "step-00000005" / "COMMIT").is_file()
    assert [r["event"] for r in read_metrics(out)][0] == "start"


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads((run_dir / "heartbeat.json").read_text())["step"] >= step:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the run never reached step %d" % step)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_exits_and_resume_is_exact(tmp_path, tiny_model_dir, sig, code):
    straight = tmp_path / "straight"
    assert overnight(*base_args(tiny_model_dir, straight, 16)).returncode == 0
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "overnight", *base_args(tiny_model_dir, out, 16)],
                            env=env(sleep_s=0.15), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    wait_for_step(out, 3, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    interrupted = [r for r in read_metrics(out) if r["event"] == "interrupted"]
    assert len(interrupted) == 1
    stopped_at = interrupted[0]["step"]
    assert 3 <= stopped_at < 16
    assert CheckpointManager(out).latest_valid().step == stopped_at
    assert "interrupted" in overnight("status", str(out)).stdout
    resumed = overnight(*base_args(tiny_model_dir, out, 16), "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["from_step"] for r in read_metrics(out) if r["event"] == "resume"] == [stopped_at]
    assert losses(out) == losses(straight)
    assert (out / "adapter" / "adapter.safetensors").read_bytes() == \
        (straight / "adapter" / "adapter.safetensors").read_bytes()


def test_config_change_on_resume_is_refused_naming_fields_unless_allowed(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 5)).returncode == 0
    changed = base_args(tiny_model_dir, out, 10, "--set", "lora.rank=8", "--auto-resume")
    refused = overnight(*changed)
    assert refused.returncode == 3 and "lora.rank: 4 -> 8" in refused.stderr
    assert "--allow-config-change" in refused.stderr
    # A change the saved state can still carry (the learning rate) goes ahead when explicitly allowed.
    new_lr = base_args(tiny_model_dir, out, 10, "--set", "train.learning_rate=0.01", "--auto-resume")
    assert overnight(*new_lr).returncode == 3
    allowed = overnight(*new_lr, "--allow-config-change")
    assert allowed.returncode == 0, allowed.stderr
    resume = [r for r in read_metrics(out) if r["event"] == "resume"]
    assert resume[-1]["from_step"] == 5 and "train.learning_rate: 0.02 -> 0.01" in resume[-1]["overridden"]


def test_resume_from_and_before_step(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 12, "--set", "checkpoint.keep_last=5")).returncode == 0
    result = overnight(*base_args(tiny_model_dir, out, 12, "--set", "checkpoint.keep_last=5"), "--before-step", "8")  # checkpoints: 4, 5, 8 (new bests), 10, 12
    assert result.returncode == 0, result.stderr
    assert [r["from_step"] for r in read_metrics(out) if r["event"] == "resume"] == [5]
    missing = overnight(*base_args(tiny_model_dir, out, 12, "--set", "checkpoint.keep_last=5"), "--resume-from", "7")
    assert missing.returncode == 3 and "no valid checkpoint at step 7" in missing.stderr


def test_terminal_prompt_yes_and_no(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 5)).returncode == 0

    def run_with_answer(answer: str) -> tuple[int, str]:
        code, text = on_terminal(base_args(tiny_model_dir, out, 8), answer.encode() + b"\n")
        assert "Resume from step 5? [Y/n]" in text
        return code, text

    code, text = run_with_answer("n")
    assert code == 3 and "--fresh" in text
    code, text = run_with_answer("y")
    assert code == 0, text
    assert [r["from_step"] for r in read_metrics(out) if r["event"] == "resume"] == [5]


@pytest.mark.parametrize("command", ["status", "checkpoints", "train"])
def test_a_reader_that_goes_away_never_costs_a_traceback_or_the_run(command, tmp_path, tiny_model_dir):
    """`overnight status RUN | head -1`, or a train whose terminal closed: console output is non-critical."""
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 6)).returncode == 0
    args = base_args(tiny_model_dir, out, 12, "--auto-resume") if command == "train" else [command, str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "overnight", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env(), cwd=ROOT)
    proc.stdout.close()  # the reader is gone before the first line is written
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr[-2000:]
    if command == "train":  # the run went on to the end regardless
        assert max(r["step"] for r in read_metrics(out) if r["event"] == "train") == 12


def test_a_run_given_in_epochs_derives_its_steps_and_warns_about_its_short_plan(tmp_path, tiny_model_dir):
    """--epochs: max_steps from the data (400 rows / batch 4 = 100 steps an epoch), said in the banner and recorded
    in config.yaml; the defaults' warmup (50) and intervals (250) are more than its 3 steps, which the banner
    says; a key given twice in the YAML is warned about with both lines."""
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  learning_rate: 0.02\n  batch_size: 4\n  learning_rate: 0.01\n"
                      "lora: {rank: 4}\nmodel: {max_seq_length: 64}\neval: {max_batches: 1, predictions: 0}\n")
    out = tmp_path / "run"
    result = overnight("train", str(config), "--backend", REF, "--model", str(tiny_model_dir), "--data",
                       str(DATA_DIR), "--output", str(out), "--epochs", "0.03", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"warning: config file {config}: key 'train.learning_rate' is given twice (lines 2 and 4); the value on " \
           "line 4 is used (PyYAML keeps the last), remove the other" in lines
    rows = sum(1 for line in (DATA_DIR / "train.jsonl").read_text().splitlines() if line.strip())
    assert rows == 400  # the bundled sample data: 100 batches of 4 an epoch, so 0.03 epochs are 3 steps
    assert "plan: 3 steps (0.03 epochs of 100 steps) | effective batch 4 (batch 4 x accumulation 1)" in lines
    warned = [line.split(" ")[1] for line in lines if line.startswith("warning: ") and "config file" not in line]
    assert warned == ["train.warmup_steps", "eval.every_steps", "checkpoint.every_steps"]
    assert "finished at step 3: reached max_steps 3" in result.stdout
    assert [r["step"] for r in read_metrics(out) if r["event"] == "end"] == [3]
    saved = (out / "config.yaml").read_text()
    assert "max_steps: 3\n" in saved and "learning_rate: 0.01\n" in saved and "derived from train.epochs 0.03" in saved


@pytest.mark.parametrize("extra, needles", [
    (["--epochs", "2", "--max-steps", "10"], ["sets both train.max_steps and train.epochs"]),
    (["--epochs", "2", "--set", "train.max_steps=10"], ["sets both train.max_steps and train.epochs"]),
    (["--set", "lora.targets=[q_proj, v_proj"], ["--set lora.targets", "'[q_proj, v_proj'",
                                                 "did you mean --set 'lora.targets=[q_proj, v_proj]'"]),
    # what the shell makes of an unquoted `--set lora.targets=[q_proj, v_proj]` without a config file
    (["--set", "lora.targets=[q_proj,", "v_proj]"], ["--set lora.targets", "quote the whole argument"]),
    (["--set", "train.batch_size=[4, 8]"], ["config key 'train.batch_size': expected an integer"]),
])
def test_two_run_lengths_or_a_malformed_set_value_exit_2_naming_them(tmp_path, tiny_model_dir, extra, needles):
    out = tmp_path / "run"
    result = overnight("train", "--backend", REF, "--model", str(tiny_model_dir), "--data", str(DATA_DIR),
                       "--output", str(out), *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr and not out.exists()


def test_reward_refuses_rows_that_are_not_preference_pairs_naming_file_line_and_key(tmp_path, tiny_model_dir):
    """`--method reward` reads dpo's rows and gets dpo's refusals, before any model is loaded: exit 2, the file, the
    line and the missing key."""
    data = tmp_path / "data"
    data.mkdir()
    good = json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    (data / "train.jsonl").write_text(good + "\n" + json.dumps({"prompt": "Q?", "chosen": "yes"}) + "\n")
    result = overnight("train", "--backend", "torch", "--model", str(tiny_model_dir), "--data", str(data),
                       "--method", "reward", "--output", str(tmp_path / "run"), "--max-steps", "2")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{data / 'train.jsonl'}:2" in result.stderr and "'rejected'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
