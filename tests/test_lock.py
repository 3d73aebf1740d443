"""One owner per run directory (SPEC §7): the flock itself, and two real `overnight train` processes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overnight.runs import lock
from overnight.errors import RunLocked, UsageError
from overnight.runs.rundir import read_metrics

from conftest import ROOT
from test_cli import base_args, env, overnight


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_lock_names_its_holder_and_is_cleared_on_release(tmp_path):
    fd = lock.acquire(tmp_path)
    try:
        held, holder = lock.holder(tmp_path)
        assert held is True and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            lock.acquire(tmp_path)
    finally:
        lock.release(fd)
    assert lock.holder(tmp_path) == (False, {})
    assert (tmp_path / ".lock").read_bytes() == b""  # a refused run leaves the file's bytes as it found them
    lock.release(lock.acquire(tmp_path))  # free again


def test_holder_creates_nothing_where_no_run_ever_was(tmp_path):
    assert lock.holder(tmp_path) == (None, {})
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_place_is_a_usage_error_naming_it(tmp_path):
    with pytest.raises(UsageError, match="output.dir .*not writable"):
        lock.acquire(tmp_path / "no-such-folder")


def test_the_kernel_releases_the_lock_of_a_killed_holder(tmp_path):
    code = ("import sys, time; from overnight.runs import lock; lock.acquire(__import__('pathlib').Path(sys.argv[1])); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        held, who = lock.holder(tmp_path)
        assert held is True and who["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert lock.holder(tmp_path)[0] is False
    lock.release(lock.acquire(tmp_path))


def wait_for_heartbeat_of(run_dir: Path, pid: int, proc, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads((run_dir / "heartbeat.json").read_text())["pid"] == pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first run never wrote its heartbeat")


def test_a_second_train_on_a_running_run_dir_is_refused_and_changes_nothing(tmp_path, tiny_model_dir):
    """The issue: two `overnight train` on one run dir interleaved checkpoints and exported one run's
    weights with the other's score. Now the second exits 3 naming the first, whatever its mode."""
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 5)).returncode == 0
    # The first run resumes and then spends 15 s in each step, writing nothing until its last step's save.
    quiet = ["--set", "train.report_every=1000", "--set", "eval.every_steps=1000", "--set", "checkpoint.every_steps=1000"]
    first = subprocess.Popen([sys.executable, "-m", "overnight", *base_args(tiny_model_dir, out, 8, *quiet),
                              "--auto-resume"], env=env(sleep_s=15), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        wait_for_heartbeat_of(out, first.pid, first)
        time.sleep(0.5)
        before = tree(out)
        for mode in (["--auto-resume"], ["--fresh"], ["--resume-from", "5"], ["--before-step", "5"], []):
            second = overnight(*base_args(tiny_model_dir, out, 8), *mode)
            assert second.returncode == 3, (mode, second.stdout + second.stderr)
            assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, (mode, second.stderr)
            assert "Traceback" not in second.stderr + second.stdout
        status = overnight("status", str(out))
        assert status.returncode == 0 and "running at step 5" in status.stdout and f"pid {first.pid}" in status.stdout
        assert first.poll() is None, "the first run must still be training for the comparison to mean anything"
        assert tree(out) == before, "a refused second run changed the run directory"
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # The kernel dropped the killed run's lock: the run is interrupted, and resumes.
    assert "interrupted at step 5" in overnight("status", str(out)).stdout
    resumed = overnight(*base_args(tiny_model_dir, out, 8), "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["from_step"] for r in read_metrics(out) if r["event"] == "resume"] == [5, 5]
