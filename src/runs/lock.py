"""One owner per run directory (SPEC §7): an flock on RUN_DIR/.lock, held for the whole run.

The kernel drops an flock when its holder exits in any way, SIGKILL included, so a lock never outlives
its run and needs no staleness rules. The file's contents (pid, host) only name the holder; they are
cleared on a clean release so that a run that was refused leaves the file's bytes as it found them."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from overnight.errors import RunLocked, UsageError

LOCK_NAME = ".lock"
# `overnight status` takes the lock for an instant to see whether it is free; a train starting at that
# very moment retries for this long instead of reporting the status probe as the owner.
RETRY_S, RETRY_EVERY_S = 0.5, 0.05


def _read_holder(fd: int) -> dict:
    # The holder writes its pid just after it gets the lock: give it a moment before saying "unknown".
    for _ in range(20):
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict):
            return holder
        time.sleep(0.05)
    return {}


def describe(holder: dict) -> str:
    if not holder:
        return "another process (its pid is not recorded)"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"


def acquire(run_dir: Path) -> int:
    """Lock RUN_DIR (which must exist) and return the descriptor to hand to release(). Raises RunLocked
    (exit 3) naming the holder, having changed nothing, or UsageError when the folder is not writable."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise UsageError(f"output.dir {run_dir} is not writable ({exc.strerror}: {path}); choose a writable folder "
                         "with --output DIR (or fix its permissions)") from None
    deadline = time.monotonic() + RETRY_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLocked(
                    f"{run_dir} is in use by {describe(holder)} (another `overnight train` on the same run "
                    "directory). Nothing was changed. Wait for it to finish, stop it, or pass another --output DIR"
                ) from None
            time.sleep(RETRY_EVERY_S)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError:
        pass  # naming the holder is a courtesy; the lock itself is what protects the run
    return fd


def release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # closing drops the flock


def holder(run_dir: Path) -> tuple[bool | None, dict]:
    """(held, holder) without taking the run: held is None when there is no lock file (never run by this
    version), True when a live process holds it, False when it is free. Read-only: creates nothing."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None, {}
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, _read_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, {}
    finally:
        os.close(fd)


