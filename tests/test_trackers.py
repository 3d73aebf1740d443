"""TensorBoard and W&B reporting (src/integrations/trackers.py): what reaches them, after a kill and a resume too, and that
a failing or missing one warns once while training completes. Real `overnight train` subprocesses on the
numpy reference backend; the TensorBoard files are read back with TensorBoard's own reader when installed."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overnight.integrations.trackers import Reporter, scalars
from overnight.runs.rundir import read_metrics

from conftest import ROOT, has
from test_cli import base_args, env

needs_tbx = pytest.mark.skipif(not has("tensorboardX"), reason="tensorboardX is not installed (the report extra)")
needs_wandb = pytest.mark.skipif(not has("wandb"), reason="wandb is not installed (the report extra)")


def train(args: list[str], extra_env: dict | None = None, faults: dict | None = None, timeout: float = 120):
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True,
                          env={**env(**(faults or {})), **(extra_env or {})}, stdin=subprocess.DEVNULL,
                          timeout=timeout, cwd=ROOT)


def kill_then_resume(model: Path, out: Path, steps: int, kill_after: int, extra: list[str],
                     extra_env: dict | None = None, faults: dict | None = None) -> subprocess.CompletedProcess:
    """SIGKILL the run once it has logged step ``kill_after`` (past its checkpoint at 5, so steps are trained
    twice; each step sleeps long enough that the next checkpoint is not reached first), then continue it with
    --auto-resume."""
    process = subprocess.Popen([sys.executable, "-m", "overnight", *base_args(model, out, steps, *extra)],
                               env={**env(sleep_s=0.3, **(faults or {})), **(extra_env or {})}, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            records = read_metrics(out)
            if any(r.get("event") == "train" and r.get("step", 0) >= kill_after for r in records):
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    return train([*base_args(model, out, steps, *extra), "--auto-resume"], extra_env, faults)


def trained_twice(out: Path) -> list[int]:
    steps = [r["step"] for r in read_metrics(out) if r.get("event") == "train"]
    return sorted({s for s in steps if steps.count(s) > 1})


# -- reading TensorBoard files back ----------------------------------------------------------------

def _records(path: Path):
    data, i = path.read_bytes(), 0
    while i + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[i:i + 8])
        yield data[i + 12:i + 12 + length]
        i += 12 + length + 4


def tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows it: its EventAccumulator when installed; otherwise the
    event files parsed with tensorboardX's protobufs, applying TensorBoard's purge rule (a session START at
    step N discards what earlier sessions wrote at steps >= N)."""
    if has("tensorboard"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(tb_dir))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        for raw in _records(path):
            event = event_pb2.Event()
            event.ParseFromString(raw)
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: [(s, v) for s, v in values if s < event.step] for tag, values in out.items()}
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def last_per_step(out: Path, event: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(out) if r.get("event") == event and key in r}


# -- units -----------------------------------------------------------------------------------------

def test_scalars_are_the_numeric_fields_of_measuring_events():
    record = {"event": "train", "step": 3, "time": 1.0, "loss": 2.5, "lr": 1e-4, "tokens": 12, "grad_norm": "nan",
              "note": "text", "flag": True, "memory_mb": None}
    got = scalars(record)
    assert set(got) == {"train/loss", "train/lr", "train/tokens", "train/grad_norm"}
    assert got["train/loss"] == 2.5 and got["train/grad_norm"] != got["train/grad_norm"]  # NaN kept
    assert scalars({"event": "reward", "step": 1, "mean": 0.5}) == {"reward/mean": 0.5}  # later events too
    for lifecycle in ("start", "resume", "checkpoint", "stop", "end", "failed", "interrupted"):
        assert scalars({"event": lifecycle, "step": 1, "from_step": 1, "best_step": 2}) == {}


def test_a_sink_that_fails_is_warned_about_once_and_the_others_go_on():
    class Broken:
        name = "Broken"

        def event(self, record):
            raise OSError("disk full")

        def state(self):
            return {}

        def close(self, code):
            pass

    class Good(Broken):
        name = "Good"

        def __init__(self):
            self.seen = []

        def event(self, record):
            self.seen.append(record["step"])

    warnings, good = [], Good()
    reporter = Reporter([Broken(), good], warn=warnings.append)
    for step in range(1, 5):
        reporter.event({"event": "train", "step": step, "loss": 1.0})
    reporter.close()
    assert len(warnings) == 1 and "Broken" in warnings[0] and "training goes on" in warnings[0]
    assert good.seen == [1, 2, 3, 4]


def test_tensorboardx_is_imported_without_torch():
    code = (
        "import sys, json\n"
        "from overnight.integrations.trackers import import_tensorboardx\n"
        "writer = import_tensorboardx()(logdir=sys.argv[1])\n"
        "writer.add_scalar('train/loss', 1.5, 1)\n"
        "writer.close()\n"
        + ("import wandb\n" if has("wandb") else "")
        + "frameworks = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx', 'tensorflow'))\n"
        "print(json.dumps(frameworks))\n"
    )
    if not has("tensorboardX"):
        pytest.skip("tensorboardX is not installed (the report extra)")
    import tempfile

    with tempfile.TemporaryDirectory() as tb:
        out = subprocess.run([sys.executable, "-c", code, tb], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == []
        assert list(Path(tb).glob("events.out.tfevents.*"))


# -- TensorBoard through `overnight train` ---------------------------------------------------------

@needs_tbx
def test_tensorboard_holds_every_train_and_eval_scalar(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = train(base_args(tiny_model_dir, out, 12, "--set", "report.tensorboard=true"))
    assert result.returncode == 0, result.stderr
    assert f"tensorboard --logdir {out / 'tb'}" in result.stdout
    got = tb_scalars(out / "tb")
    for tag, (event, key) in {"train/loss": ("train", "loss"), "train/lr": ("train", "lr"),
                              "train/grad_norm": ("train", "grad_norm"), "train/loss_avg": ("train", "loss_avg"),
                              "train/tokens_per_sec": ("train", "tokens_per_sec"),
                              "train/memory_mb": ("train", "memory_mb"), "eval/val_loss": ("eval", "val_loss"),
                              "eval/score": ("eval", "score"), "eval/gap": ("eval", "gap")}.items():
        expected = last_per_step(out, event, key)
        assert [s for s, _ in got[tag]] == sorted(expected), tag
        assert [v for _, v in got[tag]] == pytest.approx([expected[s] for s in sorted(expected)], rel=1e-6), tag
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in got["eval/val_loss"]] == [4, 8, 12]


@needs_tbx
def test_tensorboard_ends_at_the_last_step_off_the_report_grid(tmp_path, tiny_model_dir):
    """report_every=5 on a 7-step run: TensorBoard (like metrics.jsonl) has train scalars at 1, 5 and 7, so its
    curves end where the run ended, not at step 5."""
    out = tmp_path / "run"
    result = train(base_args(tiny_model_dir, out, 7, "--set", "report.tensorboard=true",
                             "--set", "train.report_every=5"))
    assert result.returncode == 0, result.stderr
    got = tb_scalars(out / "tb")
    assert [s for s, _ in got["train/loss"]] == [1, 5, 7] == sorted(last_per_step(out, "train", "loss"))
    assert [s for s, _ in got["train/lr"]] == [1, 5, 7]


@needs_tbx
def test_tensorboard_after_a_kill_and_resume_has_each_step_once(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = kill_then_resume(tiny_model_dir, out, 12, 7, ["--set", "report.tensorboard=true"])
    assert result.returncode == 0, result.stderr
    assert trained_twice(out), "the kill came after the checkpoint, so some steps were trained twice"
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2  # one file per process
    got = tb_scalars(out / "tb")
    expected = last_per_step(out, "train", "loss")
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))  # purged and rewritten, never twice
    assert [v for _, v in got["train/loss"]] == pytest.approx([expected[s] for s in range(1, 13)], rel=1e-6)
    assert [s for s, _ in got["eval/val_loss"]] == [4, 8, 12]


FAILING_WRITER = """
import os


class SummaryWriter:
    # A stand-in for tensorboardX: root ignores permissions, and the real writer's own I/O happens in a
    # background thread, so the test decides where it fails: at start (an unwritable folder) or mid-run.
    def __init__(self, logdir, **kwargs):
        if os.environ["SHIM_TB_FAIL"] == "start":
            raise PermissionError(13, "Permission denied", logdir)
        self.calls = 0

    def add_scalar(self, *args, **kwargs):
        self.calls += 1
        if self.calls > 20:
            raise OSError(28, "No space left on device")

    def add_text(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass
"""


@pytest.mark.parametrize("when", ["start", "mid-run"])
def test_a_failing_tensorboard_warns_once_and_training_completes(tmp_path, tiny_model_dir, when):
    shim = tmp_path / "shim" / "tensorboardX"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(FAILING_WRITER)
    out = tmp_path / "run"
    result = train(base_args(tiny_model_dir, out, 10, "--set", "report.tensorboard=true"),
                   {"PYTHONPATH": os.pathsep.join([str(shim.parent), env()["PYTHONPATH"]]), "SHIM_TB_FAIL": when})
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stdout.splitlines() if "TensorBoard" in line and "warning" in line]
    assert len(warned) == 1 and "training goes on" in warned[0], result.stdout
    assert ("Permission denied" if when == "start" else "No space left on device") in warned[0]
    assert (out / "adapter").is_dir() and [r for r in read_metrics(out) if r.get("event") == "end"]
    assert max(r["step"] for r in read_metrics(out) if r.get("event") == "train") == 10


def test_a_missing_library_warns_naming_the_extra_and_training_completes(tmp_path, tiny_model_dir):
    shim = tmp_path / "shim"
    for name in ("tensorboardX", "wandb"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f'raise ImportError("No module named {name} (test shim)")\n')
    out = tmp_path / "run"
    result = train(base_args(tiny_model_dir, out, 4, "--set", "report.tensorboard=true", "--set", "report.wandb=true"),
                   {"PYTHONPATH": os.pathsep.join([str(shim), env()["PYTHONPATH"]])})
    assert result.returncode == 0, result.stderr
    for name in ("tensorboardX", "wandb"):
        assert f"{name} is not installed (pip install 'overnight[report]')" in result.stdout
    assert (out / "adapter").is_dir() and not (out / "tb").exists()


# -- W&B (offline) ---------------------------------------------------------------------------------

def wandb_env(tmp_path: Path) -> dict:
    home = tmp_path / "wandb-home"
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(home / "config"),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data")}


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


@needs_wandb
def test_wandb_offline_run_is_created_and_named_in_the_checkpoint(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = train(base_args(tiny_model_dir, out, 5, "--set", "report.wandb=true"), wandb_env(tmp_path))
    assert result.returncode == 0, result.stderr
    runs = offline_runs(out)
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    run_id = runs[0].name.rsplit("-", 1)[1]
    assert f"W&B: run {run_id}" in result.stdout
    state = json.loads((out / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["report"] == {"wandb_run_id": run_id}


@needs_wandb
def test_wandb_continues_the_same_run_after_a_kill_and_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = kill_then_resume(tiny_model_dir, out, 12, 7, ["--set", "report.wandb=true"], wandb_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert trained_twice(out)
    runs = offline_runs(out)
    ids = {run.name.rsplit("-", 1)[1] for run in runs}
    assert len(runs) == 2 and len(ids) == 1, runs  # one folder per process, one W&B run
    assert f"W&B: run {ids.pop()} (continued)" in result.stdout


@needs_wandb
def test_wandb_that_cannot_log_in_warns_once_and_training_completes(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    no_login = {**wandb_env(tmp_path), "WANDB_MODE": "online", "HOME": str(tmp_path / "home"), "WANDB_API_KEY": "",
                "NETRC": str(tmp_path / "no-netrc")}
    result = train(base_args(tiny_model_dir, out, 5, "--set", "report.wandb=true"), no_login)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stdout.splitlines() if line.startswith("warning: W&B")]
    assert len(warned) == 1 and "training goes on" in warned[0] and "WANDB_MODE=offline" in warned[0]
    assert (out / "adapter").is_dir()
    state = json.loads((out / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["report"] == {}


@needs_wandb
def test_wandb_config_does_not_carry_the_webhook_url(tmp_path, tiny_model_dir):
    # The webhook URL is a credential (its path or query is the token); W&B's config is uploaded and shared.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/hooks/T0SECRET"
    out = tmp_path / "run"
    result = train(base_args(tiny_model_dir, out, 2, "--set", "report.wandb=true", "--set",
                             f"notify.webhook_url={url}"), wandb_env(tmp_path))
    assert result.returncode == 0, result.stderr
    [run] = offline_runs(out)
    stored = b"".join(p.read_bytes() for p in run.rglob("*") if p.is_file())
    assert f"http://127.0.0.1:{url.split(':')[2].split('/')[0]}/...".encode() in stored  # what may be shown
    assert b"T0SECRET" not in stored
    assert "T0SECRET" not in result.stdout + result.stderr
