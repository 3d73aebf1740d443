"""`overnight status` and `overnight checkpoints`: read-only views of a run directory (nothing is moved,
quarantined or created, so they are safe while a run trains)."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Callable

from overnight.fsutil import pid_alive
from overnight.runs import lock
from overnight.runs.checkpoint import CheckpointManager
from overnight.errors import UsageError
from overnight.runs.rundir import read_metrics

STALE_AFTER_S = 15 * 60  # a heartbeat this old, with no lock to ask, means the run is gone


def run_dir_arg(path: str) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a run directory (no such folder)")
    return run_dir


def read_heartbeat(path: Path) -> tuple[dict | None, str]:
    """(heartbeat, problem): a missing, empty, garbled or ill-typed file gives (None or partial, why)."""
    if not path.is_file():
        return None, "no heartbeat.json"
    try:
        beat = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError) as exc:
        return None, f"heartbeat.json is unreadable ({exc.__class__.__name__}: {str(exc)[:80]})"
    if not isinstance(beat, dict):
        return None, "heartbeat.json does not hold a JSON object"
    # Keep only fields of the right type, so a hand-edited or foreign file cannot crash the report.
    types = {"pid": int, "host": str, "step": int, "time": (int, float), "state": str, "reason": str}
    bad = [k for k, t in types.items() if k in beat and beat[k] is not None
           and (not isinstance(beat[k], t) or isinstance(beat[k], bool))]
    clean = {k: v for k, v in beat.items() if k not in bad}
    return clean, (f"heartbeat.json has fields of the wrong type ({', '.join(bad)}); they are ignored" if bad else "")


def resume_point(run_dir: Path) -> str:
    """Which checkpoint a resume would start from: the newest that verifies (read-only, nothing quarantined)."""
    manager = CheckpointManager(run_dir, log=lambda message: None)
    skipped: list = []
    found = manager.latest_valid(read_only=True, skipped=skipped)
    notes = "".join(f"; {i.path.name} is invalid ({i.why}) and would be quarantined" for i in skipped)
    if found is not None:
        return f"a resume would start from step {found.step} ({found.path}){notes}"
    if skipped or manager.quarantined():
        return f"no checkpoint verifies: a resume would be refused (see overnight checkpoints {run_dir}){notes}"
    return "no checkpoint yet"


def _unrecorded_failure(run_dir: Path, beat: dict) -> dict | None:
    """The run's failed event when heartbeat.json missed it: on a full disk the heartbeat (a new file, renamed) can
    fail to be written where one more line still fits in metrics.jsonl, and a run that failed must not read as
    interrupted, or as the completed run it was resumed from."""
    if beat.get("state") == "failed":
        return None
    lifecycle = [r for r in read_metrics(run_dir)
                 if r.get("event") in ("start", "resume", "stop", "end", "failed", "interrupted")]
    if not lifecycle or lifecycle[-1].get("event") != "failed":
        return None
    last, beat_time = lifecycle[-1], beat.get("time")
    if isinstance(beat_time, (int, float)) and isinstance(last.get("time"), (int, float)) and last["time"] < beat_time:
        return None  # the heartbeat is newer: a later start that wrote no event yet
    return last


def show_status(run_dir: Path, say: Callable[[str], None]) -> None:
    beat, problem = read_heartbeat(run_dir / "heartbeat.json")
    if problem and problem != "no heartbeat.json":
        say(f"warning: {problem}")
    beat = beat or {}
    held, holder = lock.holder(run_dir)
    failure = _unrecorded_failure(run_dir, beat)
    if failure is not None and not held:
        beat = {**beat, "state": "failed", "step": failure.get("step", beat.get("step")),
                "reason": failure.get("reason")}
    step, state = beat.get("step", "?"), beat.get("state") or "running"
    age = time.time() - beat["time"] if "time" in beat else None
    ago = f"{age:.0f}s ago" if age is not None else "at an unknown time"
    why_not = "no process holds the run's lock"
    if held is None and beat and state == "running":
        # No lock file (a run from before the lock existed): the heartbeat is all there is. An old
        # heartbeat means interrupted even when its pid is alive again (pids are reused).
        if age is not None and age < STALE_AFTER_S and (
                beat.get("host") != socket.gethostname() or pid_alive(beat.get("pid"))):
            held, holder = True, {"pid": beat.get("pid"), "host": beat.get("host")}
        else:
            why_not = f"stale heartbeat from {ago}"
    if held:
        # The lock, not the heartbeat, says whether a process owns the run.
        stuck = f"; no heartbeat for {age / 60:.0f} min, it may be stuck" if age and age > STALE_AFTER_S else ""
        say(f"running at step {step} (heartbeat {ago}, {lock.describe(holder)}){stuck}")
    elif not beat:
        say(f"{run_dir}: not running (no usable heartbeat.json, and no process holds the run's lock)")
    elif (state == "running" and held is False and beat.get("host") not in (None, socket.gethostname())
          and age is not None and age < STALE_AFTER_S):
        # Free as seen from here, but a shared volume's filesystem may not carry flocks between hosts: the
        # other host's run can hold its lock where we cannot see it, and a resume here would be a second writer.
        say(f"interrupted at step {step}, or still running on host {beat['host']} (pid {beat.get('pid', '?')}, "
            f"heartbeat {ago}): its lock is free as seen from this host, which a shared filesystem may not "
            f"share between hosts; check on {beat['host']} before continuing with: overnight train ... --auto-resume")
    elif state == "running":
        say(f"interrupted at step {step} ({why_not}); continue with: overnight train ... --auto-resume")
    elif state == "stopped":
        say(f"stopped early at step {step}: {beat.get('reason')}")
    elif state == "interrupted":  # Ctrl-C, SIGTERM: told what to do like a run that was killed
        say(f"interrupted at step {step}: {beat.get('reason')}; continue with: overnight train ... --auto-resume")
    elif state == "completed":
        say(f"completed at step {step}: {beat.get('reason')}")
    else:
        say(f"{state} at step {step}: {beat.get('reason')}")
    restarts = restarts_note(run_dir)
    if restarts:
        say(restarts)
    say(resume_point(run_dir))


def restarts_note(run_dir: Path) -> str | None:
    """The supervisor's restarts of this run since it started (overnight.runs.supervise), newest last."""
    records = read_metrics(run_dir)
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    since_start = records[starts[-1] if starts else 0:]
    restarts = [r for r in since_start if r.get("event") in ("restart", "restarts_exhausted")]
    if not restarts:
        return None
    last = restarts[-1]
    count = sum(1 for r in restarts if r.get("event") == "restart")
    where = f" during step {last['during_step']}" if isinstance(last.get("during_step"), int) else ""
    split = (f"; step {last['split_at_step']} was given to a new process with the micro-batch split "
             f"{last['new_micro_splits']} ways" if "split_at_step" in last and "new_micro_splits" in last else "")
    gave_up = "; restarts exhausted, so it was not started again" if last.get("event") == "restarts_exhausted" else ""
    return (f"restarted after a crash {count} time{'s' if count != 1 else ''}; last: {last.get('cause', '?')}{where}"
            f"{split}{gave_up} (details: restart events in metrics.jsonl)")


def list_checkpoints(run_dir: Path, say: Callable[[str], None]) -> None:
    manager = CheckpointManager(run_dir, log=lambda message: None)
    infos = manager.list()
    if infos:
        _checkpoint_table(manager, infos, run_dir, say)
    else:
        say(f"no checkpoints in {manager.root}")
    # Also when the timeline is empty: `status` sends a user here when no checkpoint verifies.
    for entry in manager.quarantined():
        why = (entry / "QUARANTINED.txt").read_text().strip() if (entry / "QUARANTINED.txt").exists() else ""
        say(f"{'':>8}  quarantined: {entry.name} ({why})")
    # Out of the timeline but whole: a user who resumed from an earlier step may still want one (its best, to
    # fuse), and nothing else says where they went.
    superseded = manager.root / "superseded"
    for entry in sorted(superseded.iterdir()) if superseded.is_dir() else []:
        say(f"{'':>8}  superseded: {entry} (set aside by a resume from an earlier step; kept, not verified)")


def _checkpoint_table(manager: CheckpointManager, infos: list, run_dir: Path, say: Callable[[str], None]) -> None:
    records = read_metrics(run_dir)
    evals = {r.get("step"): r for r in records if r.get("event") == "eval"}
    best_step, newest = None, None
    for info in reversed(infos):
        if info.valid:
            newest = info.step
            best = manager.trainer_state(info.path).get("best")
            best_step = best.get("best_step") if isinstance(best, dict) else None
            break
    ends = [r for r in records if r.get("event") == "end"]
    if ends and newest is not None and isinstance(ends[-1].get("step"), int) and ends[-1]["step"] >= newest:
        # A run that ended after the newest checkpoint (an eval owed to the resume, run at the very end)
        # knows its final best better than that checkpoint does.
        best_step = ends[-1].get("best_step", best_step)
    say(f"{'step':>8}  {'status':<40} {'val_loss':>9} {'score':>9}  best")
    for info in infos:
        ev = evals.get(info.step, {})
        status = "valid" if info.valid else f"INVALID: {info.why}"
        val = f"{ev['val_loss']:.4f}" if isinstance(ev.get("val_loss"), float) else "-"
        score = f"{ev['score']:.4f}" if isinstance(ev.get("score"), float) else "-"
        say(f"{info.step:>8}  {status[:40]:<40} {val:>9} {score:>9}  {'*' if info.step == best_step else ''}")
