"""SPEC §8 cloud and Mac: the RunPod volume warning and keeping a Mac awake with caffeinate (a stand-in script
on PATH plays caffeinate; the platform is injected, so this runs on Linux)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overnight.commands import cli
from overnight.runs import lifecycle as run
from overnight.integrations.cloud import KeepAwake, runpod_warning

from conftest import DATA_DIR, ROOT
from test_cli import REF, env


def test_no_warning_off_runpod(tmp_path):
    assert runpod_warning(tmp_path / "run", env={}) is None


def test_runpod_warns_when_the_run_dir_is_off_the_volume(tmp_path):
    volume = tmp_path / "workspace"
    volume.mkdir()
    message = runpod_warning(tmp_path / "root-disk" / "run", env={"RUNPOD_POD_ID": "abc123"}, volume=volume)
    assert message and "abc123" in message and "preempted" in message and str(volume) in message
    assert "output.dir" in message


def test_runpod_is_quiet_on_the_volume_and_resolves_symlinks(tmp_path):
    volume, disk = tmp_path / "workspace", tmp_path / "container-disk"
    volume.mkdir()
    disk.mkdir()
    env = {"RUNPOD_POD_ID": "abc123"}
    assert runpod_warning(volume / "runs" / "a", env=env, volume=volume) is None
    assert runpod_warning(volume, env=env, volume=volume) is None
    (tmp_path / "link-into-volume").symlink_to(volume)
    assert runpod_warning(tmp_path / "link-into-volume" / "run", env=env, volume=volume) is None
    (volume / "link-out").symlink_to(disk)  # looks like /workspace/..., lives on the container disk
    assert runpod_warning(volume / "link-out" / "run", env=env, volume=volume) is not None


def test_train_prints_the_runpod_warning(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "overnight", "train", "--backend", REF, "--model", str(tiny_model_dir), "--data",
         str(DATA_DIR), "--output", str(out), "--max-steps", "2", "--batch-size", "2", "--quiet",
         "--set", "eval.every_steps=100"],
        capture_output=True, text=True, env={**env(), "RUNPOD_POD_ID": "pod-xyz"}, stdin=subprocess.DEVNULL,
        timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "pod-xyz" in result.stdout and "not on the persistent volume /workspace" in result.stdout


def stand_in_caffeinate(folder: Path, record: Path) -> Path:
    """A `caffeinate` that records its argv and pid, then waits like the real one (until it is ended)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "caffeinate"
    script.write_text(f'#!/bin/sh\necho "$$ $*" > "{record}"\nexec sleep 60\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise AssertionError(f"{path} was not written")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_caffeinate_started_with_our_pid_and_stopped(tmp_path, monkeypatch):
    record = tmp_path / "argv"
    stand_in_caffeinate(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    awake = KeepAwake(True, platform="darwin", pid=4242)
    assert awake.start()
    pid, *argv = wait_for(record).split()
    assert argv == ["-i", "-w", "4242"]
    assert int(pid) == awake.process.pid
    awake.stop()
    assert awake.process is None and not alive(int(pid))


def test_caffeinate_only_on_macos_and_only_when_enabled(tmp_path, monkeypatch):
    record = tmp_path / "argv"
    stand_in_caffeinate(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert not KeepAwake(True, platform="linux").start()
    assert not KeepAwake(False, platform="darwin").start()
    time.sleep(0.2)
    assert not record.exists()
    KeepAwake(False, platform="darwin").stop()  # nothing started: nothing to stop


def test_missing_caffeinate_warns_and_goes_on(tmp_path):
    warnings = []
    awake = KeepAwake(True, warn=warnings.append, platform="darwin", command=str(tmp_path / "no-such-caffeinate"))
    assert not awake.start()
    assert len(warnings) == 1 and "could not keep the Mac awake" in warnings[0] and "training goes on" in warnings[0]
    awake.stop()


def test_a_run_keeps_the_mac_awake_for_its_lifetime(tmp_path, monkeypatch, tiny_model_dir, capsys):
    """Through `overnight train` in this process (so the platform can be injected): caffeinate -i -w <our pid>
    runs while the run trains and is gone when it returns; output.keep_awake=false starts nothing."""
    record = tmp_path / "argv"
    stand_in_caffeinate(tmp_path / "bin", record)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    started = []

    def on_mac(*args, **kwargs):
        awake = KeepAwake(*args, platform="darwin", **kwargs)
        started.append(awake)
        return awake

    monkeypatch.setattr(run, "KeepAwake", on_mac)
    args = ["train", "--backend", REF, "--model", str(tiny_model_dir), "--data", str(DATA_DIR), "--max-steps", "2",
            "--batch-size", "2", "--quiet", "--set", "eval.every_steps=100"]
    assert cli.main([*args, "--output", str(tmp_path / "run")]) == 0
    pid, *argv = wait_for(record).split()
    assert argv == ["-i", "-w", str(os.getpid())]
    assert started and started[0].process is None
    deadline = time.monotonic() + 5
    while alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)  # terminated by stop(); reaped by Popen.wait
    assert not alive(int(pid))

    record.unlink()
    assert cli.main([*args, "--output", str(tmp_path / "run2"), "--set", "output.keep_awake=false"]) == 0
    time.sleep(0.2)
    assert not record.exists()


@pytest.fixture(autouse=True)
def _restore_signals():
    """cli.main installs the run's SIGTERM/SIGINT handlers in this process; put pytest's back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)

