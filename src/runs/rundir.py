"""The run directory's small files (SPEC §5): metrics.jsonl, heartbeat.json, config.yaml.

Metrics and heartbeat are non-critical (SPEC §8): a failure is logged once and training goes on."""
from __future__ import annotations

import errno
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Callable

from overnight.fsutil import atomic_write_text

# Everything overnight writes into a run directory, in one place: `--fresh` and the archive of a run
# that died before its first checkpoint move exactly these, never a user's other files. The lock file
# (.lock, see lock.py) and earlier archive-* folders stay where they are.
OWNED_NAMES = ("config.yaml", "metrics.jsonl", "heartbeat.json", "predictions.jsonl", "completions.jsonl",
               "checkpoints", "adapter", "tb", "wandb", "report.png")
PREDICTIONS_FILE = "predictions.jsonl"  # written by the methods' predictors (src/methods), trimmed on resume
# Temporary names of the writes above that a crash can leave behind (atomic writes, the adapter export).
OWNED_TEMP_PREFIXES = ("adapter.tmp-", ".heartbeat.json.tmp-", ".config.yaml.tmp-", ".predictions.jsonl.tmp-",
                       ".completions.jsonl.tmp-")



def owned_entries(run_dir: Path) -> list[Path]:
    """The entries of RUN_DIR that belong to the run (see OWNED_NAMES), in a stable order."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(e for e in run_dir.iterdir() if e.name in OWNED_NAMES or e.name.startswith(OWNED_TEMP_PREFIXES))


def _clean(value):
    # JSON has no NaN/inf: record them as strings so the line stays parseable and the fact is kept.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunFiles:
    def __init__(self, run_dir: Path, warn: Callable[[str], None] = print, reporter=None):
        self.dir = Path(run_dir)
        self.reporter = reporter  # TensorBoard / W&B (reporting.Reporter): fed every event, warns once itself
        self.metrics_path = self.dir / "metrics.jsonl"
        self.heartbeat_path = self.dir / "heartbeat.json"
        self._warn = warn
        self._warned: set[str] = set()

    def _once(self, what: str, exc: Exception) -> None:
        if what not in self._warned:
            self._warned.add(what)
            self._warn(f"warning: could not write {what} ({exc}); training goes on")

    def event(self, event: str, step: int, **fields) -> None:
        record = {"event": event, "step": step, "time": round(time.time(), 3)}
        record.update({k: _clean(v) for k, v in fields.items()})
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            self._once("metrics.jsonl", exc)
        if self.reporter is not None:
            self.reporter.event(record)

    def report_state(self) -> dict:
        """What the reporting sinks need to continue after a resume (the W&B run id), for the loop state."""
        return self.reporter.state() if self.reporter is not None else {}

    def heartbeat(self, step: int, state: str = "running", **fields) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "step": step, "time": time.time(),
                  "state": state}
        record.update({k: _clean(v) for k, v in fields.items()})
        try:
            atomic_write_text(self.heartbeat_path, json.dumps(record), durable=False)
        except OSError as exc:
            if not (exc.errno in (errno.ENOSPC, errno.EDQUOT) and _overwrite(self.heartbeat_path, json.dumps(record))):
                self._once("heartbeat.json", exc)


def _overwrite(path: Path, text: str) -> bool:
    """On a full disk a new file cannot be made, but the heartbeat's own blocks can be written over, so the state
    that matters most then (failed: disk full) still reaches `overnight status`. Not atomic: a reader may see a
    torn file, which status words as a warning, never as another state."""
    try:
        with open(path, "r+b") as handle:
            data = text.encode()
            handle.write(data)
            handle.truncate(len(data))
        return True
    except OSError:
        return False


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill mid-write: skip it, keep the rest
    return records


def last_logged_step(run_dir: Path) -> int:
    """The highest step metrics.jsonl records (0 for none)."""
    steps = [r.get("step") for r in read_metrics(run_dir) if isinstance(r, dict)]
    return max((s for s in steps if isinstance(s, int) and not isinstance(s, bool)), default=0)
