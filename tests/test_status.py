"""`overnight status`: the lock says whether a run is alive, a bad heartbeat never crashes it, and it names the
checkpoint a resume would start from without touching anything."""
from __future__ import annotations

import json
import os
import socket
import time

import pytest

from overnight.runs import lock

from test_cli import base_args, overnight
from test_lock import tree


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("status") / "run"
    result = overnight(*base_args(tiny_model_dir, out, 12))
    assert result.returncode == 0, result.stderr
    return out


def status(run_dir) -> str:
    result = overnight("status", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def beat(run_dir, **fields) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "step": 7, "time": time.time(), "state": "running"}
    (run_dir / "heartbeat.json").write_text(json.dumps(record | fields))


def test_completed_run_names_its_resume_point(finished_run):
    text = status(finished_run)
    assert "completed at step 12" in text and "a resume would start from step 12" in text


def test_running_heartbeat_without_a_lock_holder_is_interrupted(tmp_path):
    (tmp_path / ".lock").write_bytes(b"")  # a run of this version was here; nobody holds its lock
    beat(tmp_path)  # our own pid, alive, on this host, just now: the heartbeat alone would say "running"
    text = status(tmp_path)
    assert "interrupted at step 7" in text and "no process holds the run's lock" in text


def test_the_lock_holder_is_running(tmp_path):
    beat(tmp_path, pid=1, time=time.time() - 3600)  # the heartbeat says nothing useful; the lock does
    fd = lock.acquire(tmp_path)
    try:
        text = status(tmp_path)
    finally:
        lock.release(fd)
    assert "running at step 7" in text and f"pid {os.getpid()}" in text and "may be stuck" in text


def test_without_a_lock_file_an_old_heartbeat_is_interrupted_even_if_its_pid_lives(tmp_path):
    beat(tmp_path, time=time.time() - 2 * 3600)  # pid alive (ours: a reused pid looks just like this)
    assert "interrupted at step 7 (stale heartbeat" in status(tmp_path)
    beat(tmp_path)
    assert "running at step 7" in status(tmp_path)
    assert not (tmp_path / ".lock").exists()  # status created nothing


@pytest.mark.parametrize("content, problem", [
    ("", "heartbeat.json is unreadable"),
    ("{not json", "heartbeat.json is unreadable"),
    ("[1, 2, 3]", "does not hold a JSON object"),
    ('{"pid": "abc", "host": 5, "step": "x", "time": "yesterday", "state": "running"}', "wrong type"),
])
def test_a_bad_heartbeat_is_a_warning_not_a_traceback(tmp_path, content, problem):
    (tmp_path / ".lock").write_bytes(b"")
    (tmp_path / "heartbeat.json").write_text(content)
    text = status(tmp_path)
    assert "warning:" in text and problem in text
    assert "not running" in text or "interrupted" in text


def test_status_reads_past_an_invalid_checkpoint_without_moving_it(finished_run, tmp_path):
    import shutil

    run = shutil.copytree(finished_run, tmp_path / "copy")
    (run / "checkpoints" / "step-00000012" / "COMMIT").unlink()
    before = tree(run)
    text = status(run)
    assert "step-00000012 is invalid (no COMMIT file" in text and "would be quarantined" in text
    assert "a resume would start from step 10" in text
    assert tree(run) == before and not (run / "checkpoints" / "quarantine").exists()


def test_status_of_a_missing_folder_is_a_usage_error(tmp_path):
    result = overnight("status", str(tmp_path / "nope"))
    assert result.returncode == 2 and "not a run directory" in result.stderr


def test_checkpoints_marks_the_best_the_run_ended_with(finished_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    listing = overnight("checkpoints", str(run))
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:] if line.split()[0].isdigit()}
    assert len(rows) >= 2
    other = next(step for step, line in rows.items() if not line.rstrip().endswith("*"))
    # An eval owed to a resume and run at the very end can crown a best after the newest checkpoint was
    # written: the run's end record is the later truth.
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"event": "end", "step": 12, "status": "completed", "best_step": int(other)}) + "\n")
    listing = overnight("checkpoints", str(run))
    marked = [line.split()[0] for line in listing.stdout.splitlines()[1:] if line.rstrip().endswith("*")]
    assert marked == [other]


def test_a_failure_the_heartbeat_missed_reads_as_failed_not_interrupted(tmp_path):
    """A full disk can refuse the heartbeat (a new file, renamed) and still take one more metrics.jsonl line: the
    run failed, and status once said "interrupted"."""
    from overnight.commands.status import show_status

    def said() -> str:
        lines: list[str] = []
        show_status(tmp_path, lines.append)
        return "\n".join(lines)

    (tmp_path / ".lock").write_bytes(b"")
    beat(tmp_path, time=time.time() - 60)  # its last good write, while training
    events = [{"event": "resume", "step": 4, "time": time.time() - 70},
              {"event": "failed", "step": 8, "time": time.time() - 5, "reason": "CheckpointError: disk full"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    assert "failed at step 8: CheckpointError: disk full" in said()
    with open(tmp_path / "metrics.jsonl", "a") as handle:  # resumed since, and killed: interrupted again
        handle.write(json.dumps({"event": "resume", "step": 4, "time": time.time()}) + "\n")
    assert "interrupted at step 7" in said()


def test_a_failed_heartbeat_is_written_over_the_old_one_when_no_new_file_fits(tmp_path, monkeypatch):
    import errno

    from overnight.runs import rundir

    files = rundir.RunFiles(tmp_path, warn=lambda message: None)
    files.heartbeat(7)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "atomic_write_text", disk_full)
    files.heartbeat(8, "failed", reason="disk full")
    written = json.loads((tmp_path / "heartbeat.json").read_text())
    assert written["state"] == "failed" and written["step"] == 8 and written["reason"] == "disk full"


def test_checkpoints_lists_those_a_resume_from_an_earlier_step_set_aside(finished_run, tmp_path):
    import shutil

    from overnight.runs.checkpoint import CheckpointManager

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    manager = CheckpointManager(run, log=lambda message: None)
    first = manager.list()[0].step
    moved = manager.set_aside_after(first)  # what --resume-from FIRST does before training again
    assert moved
    listing = overnight("checkpoints", str(run))
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    for path in moved:
        line = next((line for line in listing.stdout.splitlines() if path.name in line), None)
        assert line is not None and "superseded" in line, listing.stdout
        assert str(path) in line  # where to find it, e.g. to fuse the abandoned timeline's best


def test_checkpoints_shows_the_quarantined_when_none_is_left_in_the_timeline(finished_run, tmp_path):
    import shutil

    from overnight.runs.checkpoint import CheckpointInfo, CheckpointManager

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    manager = CheckpointManager(run, log=lambda message: None)
    for info in manager.list():
        manager.quarantine(CheckpointInfo(info.step, info.path, False, "damaged by the test"))
    assert "overnight checkpoints" in status(run)  # status sends the user there ...
    listing = overnight("checkpoints", str(run))
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    assert listing.stdout.count("quarantined: step-") == len(manager.quarantined())  # ... which shows them
    assert "damaged by the test" in listing.stdout


def test_a_fresh_heartbeat_from_another_host_is_not_called_interrupted_outright(tmp_path):
    # A shared volume whose filesystem does not carry flocks between hosts (some NFS/Lustre/SMB setups): the run
    # on the other host holds its lock where this host cannot see it. "interrupted; continue with --auto-resume"
    # would have the user start a second trainer on the same folder.
    (tmp_path / ".lock").write_bytes(b"")
    beat(tmp_path, host="gpu-node-7", pid=4242)
    text = status(tmp_path)
    assert "gpu-node-7" in text and "pid 4242" in text and "check" in text, text
    beat(tmp_path, host="gpu-node-7", pid=4242, time=time.time() - 3 * 3600)  # long silent: gone
    text = status(tmp_path)
    assert "interrupted at step 7" in text and "gpu-node-7" not in text, text


def test_a_run_stopped_by_a_signal_says_how_to_continue(tmp_path):
    (tmp_path / ".lock").write_bytes(b"")
    beat(tmp_path, state="interrupted", reason="SIGINT: checkpoint saved at step 7")
    text = status(tmp_path)
    assert "interrupted at step 7: SIGINT" in text and "--auto-resume" in text, text
