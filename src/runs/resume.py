"""The resume policy (SPEC §7): fresh, auto-resume, a step, or the terminal prompt; what is refused and why.

Everything here runs with the run directory's lock held (lock.py), so nothing else moves files under it."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from overnight.data import DataError
from overnight.data.formats import where
from overnight.data.batches import order_changes
from overnight.runs import fingerprint as fp
from overnight.runs.checkpoint import CheckpointInfo, CheckpointManager
from overnight.errors import ResumeRefused
from overnight.runs.rundir import owned_entries, read_metrics

FLAGS_HINT = ("Pass --auto-resume to continue it, or --fresh to start over (the old run is archived, nothing is "
              "deleted)")


def archive_run(run_dir: Path) -> Path | None:
    """Move the files of the old run (rundir.OWNED_NAMES: nothing of the user's) into RUN_DIR/archive-<time>/."""
    entries = owned_entries(run_dir)
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    archive, suffix = run_dir / f"archive-{stamp}", 0
    while archive.exists():
        suffix += 1
        archive = run_dir / f"archive-{stamp}-{suffix}"
    archive.mkdir()
    for entry in entries:
        os.rename(entry, archive / entry.name)
    return archive


def ask_to_resume(step: int, run_dir: Path) -> bool:
    """The terminal prompt. Only an explicit yes (or Enter) resumes; Ctrl-D is no answer."""
    try:
        answer = input(f"Resume from step {step}? [Y/n] ").strip().lower()
    except EOFError:
        print(flush=True)
        raise ResumeRefused(f"no answer at the prompt; nothing was changed in {run_dir}. {FLAGS_HINT}") from None
    return answer in ("", "y", "yes")


def _refuse_all_invalid(checkpoints: CheckpointManager, quarantined_now: list[CheckpointInfo]) -> None:
    whys = "; ".join(f"{i.path.name}: {i.why}" for i in quarantined_now)
    raise ResumeRefused(
        f"no checkpoint in {checkpoints.root} verifies, so there is nothing to resume from"
        + (f" ({whys})" if whys else "") + f". The invalid ones are kept in {checkpoints.quarantine_dir}. "
        "Start over with --fresh (the old run is archived, nothing is deleted), or restore a good copy of a "
        "checkpoint into checkpoints/ and run again")


def decide_resume(args, run_dir: Path, checkpoints: CheckpointManager, say: Callable[[str], None],
                  interactive: Callable[[], bool] = lambda: sys.stdin.isatty()) -> CheckpointInfo | None:
    """Return the checkpoint to resume from, or None to start fresh. Raises ResumeRefused (exit 3)."""
    removed = checkpoints.cleanup_leftovers()
    if removed:
        say(f"removed {len(removed)} unfinished save(s) left by an interrupted run")
    if args.fresh:
        archive = archive_run(run_dir)
        if archive:
            say(f"--fresh: the previous run was moved to {archive}")
        return None
    if args.resume_from is not None:
        found = checkpoints.latest_valid(at_step=args.resume_from)
        if found is None:
            steps = [str(i.step) for i in checkpoints.list() if i.valid]
            raise ResumeRefused(f"no valid checkpoint at step {args.resume_from} in {checkpoints.root} "
                                f"(valid steps: {', '.join(steps) or 'none'})")
        return found
    if args.before_step is not None:
        found = checkpoints.latest_valid(before_step=args.before_step)
        if found is None:
            raise ResumeRefused(f"no valid checkpoint before step {args.before_step} in {checkpoints.root}")
        return found
    invalid: list[CheckpointInfo] = []
    latest = checkpoints.latest_valid(skipped=invalid)
    if latest is None:
        # Checkpoints existed but none verifies (now or at an earlier start): starting from step 0 silently
        # would bury a night of work that the user may still restore.
        if invalid or checkpoints.quarantined():
            _refuse_all_invalid(checkpoints, invalid)
        # A run that died before its first checkpoint: nothing to resume; its files are kept aside.
        archive = archive_run(run_dir)
        if archive:
            say(f"no checkpoint to resume from; the previous run's files were moved to {archive}")
        return None
    if args.auto_resume:
        return latest
    if interactive():
        if ask_to_resume(latest.step, run_dir):
            return latest
        raise ResumeRefused(f"not resumed. To start over, run again with --fresh (the run in {run_dir} is "
                            "archived, nothing is deleted)")
    raise ResumeRefused(f"{run_dir} already holds a run with a checkpoint at step {latest.step}. {FLAGS_HINT}")


def check_backend(fingerprint: dict, backend: str, step: int, allow_change: bool) -> str | None:
    """Checked before the model is loaded. Returns the backend the checkpoint was made with when the run moves
    to another one (allowed with --allow-backend-change: it continues from the checkpoint's portable part,
    src/runs/portable.py), None when it stays. A checkpoint that records no backend (older format) is let through."""
    made_with = fingerprint.get("backend")
    if not made_with or made_with == backend:
        return None
    if not allow_change:
        raise ResumeRefused(
            f"the checkpoint at step {step} was made with the {made_with!r} backend and this run uses {backend!r}. "
            f"Resume with --backend {made_with}, or pass --allow-backend-change to continue this run on "
            f"{backend!r} (LoRA weights, AdamW moments and the data position carry over; dropout draws after the "
            "switch differ from an uninterrupted run)")
    return made_with


def check_fingerprint(saved: dict, current: dict, step: int, allow_change: bool,
                      across_backends: bool = False) -> list[str]:
    """The changed fields (empty when none). Raises ResumeRefused unless the user allowed the change."""
    changes = fp.differences(saved, current, across_backends)
    if changes and not allow_change and fp.only_conversion_changed(saved, current, changes):
        raise ResumeRefused(
            f"the checkpoint at step {step} was trained on data that overnight now converts differently; changed: "
            + "; ".join(changes) + ". Your data needs no change: pass --allow-config-change to continue on the new "
            "conversion (the same rows, the changed values as the converter writes them now; the resume event records "
            "it), or start over with --fresh")
    if changes and not allow_change:
        raise ResumeRefused(
            f"the checkpoint at step {step} was trained with a different setup; changed: " + "; ".join(changes)
            + ". Undo the change, start over with --fresh, or pass --allow-config-change to resume anyway")
    return changes


def _cannot_continue(step: int, what: str, fix: str, run_dir: Path) -> ResumeRefused:
    return ResumeRefused(
        f"the checkpoint at step {step} cannot continue: {what}. Nothing was changed in {run_dir}. {fix}; or start a "
        "new run: --fresh (the old run is archived, nothing is deleted) or another --output")


def check_data_position(saved_data: dict, cfg, train_file: Path, train_rows: int, step: int, run_dir: Path) -> None:
    """Checked with the fingerprint, before anything is loaded or written: --allow-config-change lets a changed
    setup resume, but a checkpoint's place in the data order only continues the order it was taken from (the same
    rows, batch size, seed and packing). Refused here (exit 3), rather than after the resume was recorded."""
    order = saved_data.get("order", saved_data)  # grpo keeps its prompt order (a TrainStream position) under "order"
    changes = order_changes(order, cfg, train_rows)
    if not changes:
        return
    if "samples_per_epoch" in changes:
        was, now = changes["samples_per_epoch"]
        raise _cannot_continue(
            step, f"it holds a place in the data order of {was} training rows, and {where(train_file)} now has {now}, "
            "so that order cannot be continued (--allow-config-change cannot carry a change of rows)", "To continue "
            "this run, put back the training file it was trained on (the checkpoints record its sha256)", run_dir)
    names = {"kind": "data.packing", "batch_size": "train.batch_size", "seed": "train.seed"}
    shown = {names.get(k, k): (was == "packed", now == "packed") if k == "kind" else (was, now)
             for k, (was, now) in changes.items() if k != "window_size"}  # window_size follows the batch size
    if "version" in shown:
        was, now = shown["version"]
        raise _cannot_continue(step, f"its place in the data order is in another format (version {was}, this "
                               f"version reads {now})", "To continue this run, use the overnight version that wrote "
                               "it", run_dir)

    def value(v) -> str:  # as the user types it in --set
        return str(v).lower() if isinstance(v, bool) else str(v)

    raise _cannot_continue(
        step, "its place in the data order was drawn with "
        + "; ".join(f"{k}={value(was)} (now {value(now)})" for k, (was, now) in shown.items())
        + ", and --allow-config-change cannot carry that change",
        "To continue this run, set " + " ".join(f"{k}={value(was)}" for k, (was, _) in shown.items()) + " again",
        run_dir)


def check_source_position(source, saved_data: dict, step: int, run_dir: Path) -> None:
    """The batch source's own check of the saved position (grpo adds its own fields), run when the source is built
    and before the resume is recorded, so a position it cannot continue is a refusal, not a failed run."""
    try:
        source.restore(saved_data)
    except DataError as exc:
        # The source's own "-> what to do" is replaced by the choices a resume has.
        raise _cannot_continue(step, str(exc).rsplit(" -> ", 1)[0], "To continue this run, undo the change",
                               run_dir) from None


def beyond_max_steps(step: int, max_steps: int) -> str | None:
    """A run resumed at a step past train.max_steps has nothing to do (and must not re-export its adapter)."""
    if step > max_steps:
        return (f"this run is already at step {step}, beyond train.max_steps {max_steps}; nothing to train "
                f"(raise --max-steps above {step} to continue); adapter/ and the checkpoints are unchanged")
    return None


def stopped_early(run_dir: Path, args) -> str | None:
    """A run that stopped early for a reason (plateau, non-finite loss, a stuck loss, gradient spikes) is
    finished, not interrupted: a plain --auto-resume (a retry loop, a pod that reboots) must not train on
    past that decision. Naming a step (--resume-from, --before-step) is asking to, so that goes on."""
    if args.resume_from is not None or args.before_step is not None:
        return None
    lifecycle = [r for r in read_metrics(run_dir) if r.get("event") in ("start", "resume", "stop", "end")]
    if not lifecycle or lifecycle[-1].get("event") != "end" or lifecycle[-1].get("status") != "stopped":
        return None
    end = lifecycle[-1]
    return (f"this run already stopped early at step {end.get('step')}: {end.get('reason')}. Nothing to train; "
            f"adapter/ and the checkpoints are unchanged. To train on anyway, name the checkpoint: "
            f"--resume-from STEP (see overnight checkpoints {run_dir}), or start over with --fresh")
