"""Checkpoints: the commit protocol (SPEC §7), verification, quarantine and rotation.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` that counts only when its ``COMMIT`` file
exists and its ``manifest.json`` verifies (sha256 and size of every file). It is written into
``step-N.tmp-<random>/`` beside its final place, every file fsynced, manifest then COMMIT written
last, renamed into place, and the parent folder fsynced. A kill at any moment therefore leaves
either the previous checkpoints alone or the new one complete; never a mix.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from overnight.fsutil import atomic_write_text, fsync_dir, fsync_file, sha256_file
from overnight.runs.rundir import OWNED_TEMP_PREFIXES

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A save could not be committed; the previous checkpoints are untouched."""


class NonFiniteWeights(CheckpointError):
    """The adapter holds NaN or inf: such weights are never committed."""


@dataclass
class CheckpointInfo:
    step: int
    path: Path
    valid: bool
    why: str = ""  # why it is invalid


def _fault(point: str) -> None:
    """Fault injection for the crash tests: OVERNIGHT_FAULT=<point>[:<nth>[:action]] SIGKILLs this
    process the nth time (default first) the save reaches ``point``; the action ``enospc`` raises the
    OSError a full disk gives instead, ``raise`` an unexpected RuntimeError (a crash), and ``sleep=S``
    sleeps S seconds (a slow save, to signal the process inside it). Unset in normal use."""
    spec = os.environ.get("OVERNIGHT_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    nth, _, action = rest.partition(":")
    _fault.counts[point] = _fault.counts.get(point, 0) + 1
    if _fault.counts[point] == int(nth or 1):
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)
        if action == "raise":
            raise RuntimeError(f"injected fault at {point}")
        if action.startswith("sleep="):
            time.sleep(float(action[len("sleep="):]))
            return
        os.kill(os.getpid(), signal.SIGKILL)


_fault.counts = {}


DISK_FULL_BELOW = 1 << 20  # bytes free under which a failed write is taken to be a full disk


def disk_full(exc: BaseException, folder: Path, by_free_space: bool = True) -> bool:
    """Writers report a full disk in their own ways: OSError(ENOSPC) from Python, "No space left on
    device (os error 28)" inside a SafetensorError, and a bare RuntimeError from torch.save and
    mx.save_safetensors. The errno, the text, or else (``by_free_space``: for an error met while writing) the
    filesystem itself (almost nothing free) tells."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(exc) for text in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return True
        exc = exc.__cause__ or exc.__context__
    if not by_free_space:
        return False
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BELOW
    except OSError:
        return False


def _size(n: int, decimals: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.{decimals}f} {unit}"
    return f"{n} bytes"


def sizes_that_differ(a: int, b: int) -> tuple[str, str]:
    """Two byte counts worded with just enough digits to tell them apart: a refusal that reads "1 MB free, about
    1 MB needed" hides the very difference it is about."""
    for decimals in (1, 2, 3):
        shown = _size(a, decimals), _size(b, decimals)
        if shown[0] != shown[1] or a == b:
            return shown
    return f"{a:,} bytes", f"{b:,} bytes"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def safetensors_all_finite(path: Path) -> bool:
    """Read a safetensors file with numpy alone (bf16 included) and check every float is finite."""
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = meta["dtype"]
            start, end = meta["data_offsets"]
            handle.seek(base + start)
            raw = handle.read(end - start)
            if dtype == "BF16":
                values = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif dtype in ("F16", "F32", "F64"):
                values = np.frombuffer(raw, dtype={"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])
            else:
                continue
            if not np.isfinite(values).all():
                return False
    return True


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int = 3, keep_best: bool = True, log: Callable[[str], None] = print):
        self.root = Path(run_dir) / "checkpoints"
        self.quarantine_dir = self.root / "quarantine"
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.log = log
        self.protected: set[int] = set()  # e.g. the checkpoint this run resumed from
        # The newest checkpoint this process knows to be committed (resumed from, or saved): what an
        # abort can name without reading the disk.
        self.last_committed: int | None = None

    # -- listing and verification ------------------------------------------------------------

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def path_for(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def verify(self, path: Path) -> tuple[bool, str]:
        commit = path / "COMMIT"
        manifest_path = path / "manifest.json"
        if not commit.is_file():
            return False, "no COMMIT file (the save never finished)"
        if not manifest_path.is_file():
            return False, "manifest.json is missing"
        try:
            manifest_bytes = manifest_path.read_bytes()
            manifest = json.loads(manifest_bytes)
        except (OSError, ValueError) as exc:
            return False, f"manifest.json is unreadable ({exc.__class__.__name__})"
        try:
            expected = json.loads(commit.read_text())["manifest_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return False, "COMMIT is unreadable"
        if hashlib.sha256(manifest_bytes).hexdigest() != expected:
            return False, "manifest.json does not match COMMIT"
        match = STEP_DIR.match(path.name)
        if match and manifest.get("step") != int(match.group(1)):
            return False, f"manifest step {manifest.get('step')} does not match the folder name"
        for rel, meta in manifest.get("files", {}).items():
            file = path / rel
            if not file.is_file():
                return False, f"{rel} is missing"
            size = file.stat().st_size
            if size != meta["size"]:
                return False, f"{rel} has {size} bytes, the manifest says {meta['size']}"
            if sha256_file(file) != meta["sha256"]:
                return False, f"{rel} does not match its sha256 (corrupted)"
        if TRAINER_STATE not in manifest.get("files", {}):
            return False, f"{TRAINER_STATE} is not in the manifest"
        return True, ""

    def list(self) -> list[CheckpointInfo]:
        infos = []
        for step, path in self._step_dirs():
            ok, why = self.verify(path)
            infos.append(CheckpointInfo(step, path, ok, why))
        return infos

    def quarantine(self, info: CheckpointInfo) -> Path:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / f"{info.path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        os.rename(info.path, target)
        (target / "QUARANTINED.txt").write_text(f"{info.why}\n")
        fsync_dir(self.root)
        self.log(f"warning: checkpoint {info.path.name} is invalid ({info.why}); moved to {target}")
        return target

    def latest_valid(self, at_step: int | None = None, before_step: int | None = None,
                     read_only: bool = False, skipped: list | None = None) -> CheckpointInfo | None:
        """The newest checkpoint that verifies (optionally exactly at_step, or the newest below
        before_step). Invalid ones met on the way are quarantined, never deleted; with ``read_only``
        (status, crash messages) they are left in place. Each invalid one is appended to ``skipped``."""
        for step, path in reversed(self._step_dirs()):
            if at_step is not None and step != at_step:
                continue
            if before_step is not None and step >= before_step:
                continue
            ok, why = self.verify(path)
            info = CheckpointInfo(step, path, ok, why)
            if ok:
                return info
            if skipped is not None:
                skipped.append(info)
            if not read_only:
                self.quarantine(info)
        return None

    def quarantined(self) -> list[Path]:
        return sorted(self.quarantine_dir.iterdir()) if self.quarantine_dir.is_dir() else []

    def _supersede(self, path: Path) -> Path:
        """Move a committed checkpoint out of the timeline into checkpoints/superseded/ (kept, never deleted)."""
        target = self.root / "superseded" / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        target.parent.mkdir(exist_ok=True)
        os.rename(path, target)
        return target

    def set_aside_after(self, step: int) -> list[Path]:
        """Resuming from an older checkpoint (--resume-from, --before-step) starts a new timeline: the old
        timeline's later checkpoints move to ``checkpoints/superseded/`` (kept, never deleted), so a later
        save at the same step writes the new state and a crash never resumes the abandoned timeline."""
        moved = [self._supersede(path) for later, path in self._step_dirs() if later > step]
        if moved:
            fsync_dir(self.root)
            self.log(f"resuming from step {step}: {len(moved)} later checkpoint(s) of the previous timeline were "
                     f"moved to {self.root / 'superseded'}")
        return moved

    def cleanup_leftovers(self) -> list[Path]:
        """Remove ``*.tmp-*`` folders: saves (or deletions) a crash interrupted. They never count. Also the
        run folder's own: an adapter export or a heartbeat rewrite a crash cut short (the next run
        exports the adapter again)."""
        removed = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if ".tmp-" in entry.name:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        if self.root.parent.is_dir():
            for entry in self.root.parent.iterdir():
                if entry.name.startswith(OWNED_TEMP_PREFIXES):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed.append(entry)
        if removed:
            fsync_dir(self.root)
        return removed

    @staticmethod
    def trainer_state(path: Path) -> dict:
        return json.loads((path / TRAINER_STATE).read_text())

    @staticmethod
    def manifest(path: Path) -> dict:
        return json.loads((path / "manifest.json").read_text())

    # -- saving ------------------------------------------------------------------------------

    def _estimate_bytes(self) -> int:
        dirs = self._step_dirs()
        if not dirs:
            return 0
        return sum(f.stat().st_size for f in _files(dirs[-1][1]))

    def save(self, step: int, write: Callable[[Path], None], trainer_state: dict, fingerprint: dict,
             versions: dict) -> Path:
        """Commit a checkpoint for ``step``; ``write(folder)`` lets the backend write its files.

        The new state is always committed: a checkpoint already at this step (which one owner per run
        directory should make impossible) is moved to checkpoints/superseded/, never silently kept in
        place of what the caller asked to save, and never deleted.

        The commit protocol (SPEC §7), in this order: files into a ``.tmp-`` folder, each fsynced; the
        manifest; COMMIT last; rename into place; fsync the parent. The ``_fault`` points mark where the
        crash tests cut it."""
        final = self.path_for(step)
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_free_space(step)
        tmp = self.root / f"{final.name}.tmp-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            self._write_files(tmp, step, write, trainer_state)
            self._seal(tmp, step, fingerprint, versions)
            _fault("before_rename")
            self._clear_final(final, step)
            os.rename(tmp, final)
            _fault("after_rename")
            fsync_dir(self.root)
        except BaseException as exc:
            # Judged before the partial save is removed: disk_full may look at what the filesystem has left.
            full = isinstance(exc, Exception) and not isinstance(exc, CheckpointError) and disk_full(exc, self.root)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise CheckpointError(
                    f"disk full while saving step {step} into {self.root}; the partial save was removed and the "
                    "previous checkpoints are intact. Free some space and resume with --auto-resume "
                    f"(the writer said: {str(exc)[:200] or exc.__class__.__name__})"
                ) from None
            if isinstance(exc, OSError):
                raise CheckpointError(f"could not save step {step} into {self.root}: {exc}") from None
            raise
        self.last_committed = step
        return final

    def _check_free_space(self, step: int) -> None:
        """Refuse a save the disk cannot hold (the last checkpoint's size and a margin) before writing a byte."""
        needed = int(self._estimate_bytes() * 1.2) + (1 << 20)
        free = shutil.disk_usage(self.root).free
        if free < needed:
            shown_free, shown_needed = sizes_that_differ(free, needed)
            raise CheckpointError(
                f"not enough free disk space in {self.root} to save step {step}: {shown_free} free, "
                f"about {shown_needed} needed; free some space (old runs, archive-* folders) and resume"
            )

    @staticmethod
    def _write_files(tmp: Path, step: int, write: Callable[[Path], None], trainer_state: dict) -> None:
        """The backend's files and the trainer state into ``tmp``; non-finite adapter weights are never saved."""
        write(tmp)
        _fault("after_backend_files")
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1), durable=False)
        for weights in sorted((tmp / "adapter").glob("*.safetensors")):
            if not safetensors_all_finite(weights):
                raise NonFiniteWeights(f"refusing to save step {step}: the adapter weights are not finite")

    @staticmethod
    def _seal(tmp: Path, step: int, fingerprint: dict, versions: dict) -> None:
        """fsync every file, then the manifest (size and sha256 of each), then COMMIT last, then every folder:
        a folder with a COMMIT that verifies holds exactly what was written."""
        files = {}
        for file in _files(tmp):
            fsync_file(file)
            files[file.relative_to(tmp).as_posix()] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
        _fault("after_files")
        manifest = {"format": FORMAT_VERSION, "step": step, "files": files, "fingerprint": fingerprint,
                    "versions": versions, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest_text = json.dumps(manifest, indent=1, sort_keys=True)
        atomic_write_text(tmp / "manifest.json", manifest_text)
        _fault("before_commit")
        digest = hashlib.sha256(manifest_text.encode()).hexdigest()
        atomic_write_text(tmp / "COMMIT", json.dumps({"manifest_sha256": digest, "step": step}))
        for folder in sorted({p.parent for p in _files(tmp)}, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)

    def _clear_final(self, final: Path, step: int) -> None:
        """Move whatever already holds ``final``'s name out of the way (superseded or quarantined, never deleted)."""
        if not final.exists():
            return
        ok, why = self.verify(final)
        if ok:
            aside = self._supersede(final)
            self.log(f"warning: a committed checkpoint for step {step} was already there; it was moved to "
                     f"{aside} and the current state is saved in its place")
        else:  # an invalid leftover under the final name: keep it, out of the way
            self.quarantine(CheckpointInfo(step, final, False, why))

    def rotate(self, best_step: int | None) -> list[int]:
        """Keep the last ``keep_last`` committed checkpoints, the best (if keep_best) and the protected ones.

        Each victim is first renamed to a ``.tmp-`` name (atomic), so a crash mid-delete leaves a
        leftover that the next start removes, never a half-deleted checkpoint that looks real."""
        committed = [step for step, path in self._step_dirs() if (path / "COMMIT").is_file()]
        keep = set(committed[-self.keep_last:]) | self.protected
        if self.keep_best and best_step is not None:
            keep.add(best_step)
        removed = []
        for step in committed:
            if step in keep:
                continue
            doomed = self.root / f"{self.path_for(step).name}.tmp-delete-{secrets.token_hex(3)}"
            os.rename(self.path_for(step), doomed)
            _fault("during_rotation")
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(step)
        if removed:
            fsync_dir(self.root)
        return removed

    def prune_on_resume(self, best_step: int | None) -> list[int]:
        """Rotate once when a run resumes (its checkpoint already in ``protected``), so a keep_last lowered on the
        command line frees its space before the first save needs it rather than after: a disk filled by the old
        setting would otherwise refuse that very save."""
        removed = self.rotate(best_step)
        if removed:
            kept = ", ".join(str(step) for step, _ in self._step_dirs())
            self.log(f"checkpoint.keep_last={self.keep_last}: removed step {', '.join(map(str, removed))} "
                     f"(kept: {kept})")
        return removed


def export_adapter(checkpoint: Path, run_dir: Path, adapter_format: str | None = None,
                   base: str | None = None) -> Path:
    """Copy a checkpoint's native adapter folder to RUN_DIR/adapter/, replacing it atomically.

    adapter_format (``peft`` | ``mlx``): the format of the backend that finished the run. A run moved across
    backends (--allow-backend-change) can pick a best checkpoint the other backend wrote; its adapter is
    converted (exactly, src/backend/adapter_formats.py) so adapter/ always loads in the library the run ended on."""
    from overnight.backend.adapter_formats import convert_adapter, detect_format

    target = Path(run_dir) / "adapter"
    tmp = Path(run_dir) / f"adapter.tmp-{secrets.token_hex(4)}"
    source = Path(checkpoint) / "adapter"
    with tempfile.TemporaryDirectory() as scratch:
        if adapter_format and detect_format(source) != adapter_format:
            source = convert_adapter(source, adapter_format, Path(scratch) / "adapter", base, say=lambda _: None)
        shutil.copytree(source, tmp)
    for file in _files(tmp):
        fsync_file(file)
    fsync_dir(tmp)
    if target.exists():
        old = Path(run_dir) / f"adapter.tmp-old-{secrets.token_hex(4)}"
        os.rename(target, old)
        _fault("during_export")
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_dir(Path(run_dir))
    return target
