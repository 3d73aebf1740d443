"""Durable file writes: temp name in the same folder, fsync (F_FULLFSYNC on macOS), rename, fsync the folder."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import sys
from pathlib import Path


def fsync_fd(fd: int) -> None:
    # On macOS plain fsync leaves data in the drive's cache; F_FULLFSYNC flushes it.
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some filesystems (and Windows) cannot open folders; nothing more we can do
    try:
        fsync_fd(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                fsync_fd(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def pid_alive(pid) -> bool:
    """Whether a process with this pid exists on this host (a reused pid reads as alive)."""
    if not isinstance(pid, int) or pid <= 0:  # kill(0 or -1) would address a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def default_file_mode(folder: Path) -> int:
    """The mode a plain open() gives a new file in ``folder``: 0666 less the umask (and whatever default ACL the
    folder has), found by making one, so no process-wide umask has to be flipped to read it."""
    probe = Path(folder) / f".mode-probe-{secrets.token_hex(4)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


def give_default_modes(*paths: Path) -> None:
    """Give the files at ``paths`` (files, or folders taken whole) the mode any other file the user writes there
    gets. safetensors and tempfile.mkstemp create files 0600, so a fused model or an adapter would otherwise be
    unreadable to the group or the server account the umask lets read the user's other files."""
    files = []
    for path in map(Path, paths):
        files.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir()
                     else [path])
    modes: dict[Path, int] = {}
    for file in files:
        if file.parent not in modes:
            modes[file.parent] = default_file_mode(file.parent)
        if stat.S_IMODE(file.lstat().st_mode) != modes[file.parent]:
            os.chmod(file, modes[file.parent])


def overnight_cache_dir() -> Path:
    """overnight's own cache (provided models, converted data): OVERNIGHT_CACHE wins (the tests point it at a temp
    folder), then the XDG cache, then ~/.cache."""
    if os.environ.get("OVERNIGHT_CACHE"):
        return Path(os.environ["OVERNIGHT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "overnight"


def drop_jsonl_lines_after(path: Path, step: int) -> bool:
    """A per-step log (predictions.jsonl, completions.jsonl) as the uninterrupted run had it at checkpoint ``step``:
    the lines of later steps (the resumed run writes those steps again, the same) and a line a kill cut mid-write
    (else the next line is glued to it, both unreadable) are dropped, atomically. False when there was nothing to
    drop; OSError when the file cannot be rewritten (the caller warns: these logs are non-critical)."""
    path = Path(path)
    if not path.is_file():
        return False

    def kept(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step

    text = path.read_text(encoding="utf-8", errors="replace")
    keep = "".join(line + "\n" for line in text.splitlines() if kept(line))
    if keep == text:
        return False
    atomic_write_text(path, keep)
    return True
