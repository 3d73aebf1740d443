"""Command line: argv -> Config -> run; exit codes (SPEC §3); the resume decision (SPEC §7)."""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from . import fingerprint as fp
from .backend import BackendUnavailable, get_backend
from .checkpoint import CheckpointError, CheckpointManager
from .config import ConfigError, build_config, dump_config
from .rundir import RunFiles, read_metrics

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_RESUME_REFUSED = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143

# Short flags users already type (train_qlora-style) and the config keys they set.
FLAG_KEYS = {
    "model": "model.path", "data": "data.path", "method": "data.method", "batch_size": "train.batch_size",
    "lora_rank": "lora.rank", "lora_layers": "lora.layers", "max_steps": "train.max_steps",
    "learning_rate": "train.learning_rate", "seed": "train.seed", "output": "output.dir", "backend": "backend",
}


class UsageError(Exception):
    """Bad usage, config or data: exit 2."""


class ResumeRefused(Exception):
    """Exit 3."""


def say(message: str) -> None:
    print(message, flush=True)


# -- the resume decision ---------------------------------------------------------------------------

def archive_run(run_dir: Path) -> Path | None:
    """Move everything of the old run into RUN_DIR/archive-<timestamp>/ (nothing is deleted)."""
    entries = [e for e in run_dir.iterdir() if not e.name.startswith("archive-")] if run_dir.is_dir() else []
    if not entries:
        return None
    archive = run_dir / f"archive-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while archive.exists():
        suffix += 1
        archive = run_dir / f"archive-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    archive.mkdir()
    for entry in entries:
        os.rename(entry, archive / entry.name)
    return archive


def decide_resume(args, run_dir: Path, checkpoints: CheckpointManager):
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
    latest = checkpoints.latest_valid()
    if latest is None:
        # Nothing to resume. Files of a run that died before its first checkpoint are kept aside.
        archive = archive_run(run_dir) if (run_dir / "metrics.jsonl").exists() else None
        if archive:
            say(f"no checkpoint to resume from; the previous run's files were moved to {archive}")
        return None
    if args.auto_resume:
        return latest
    if sys.stdin.isatty():
        answer = input(f"Resume from step {latest.step}? [Y/n] ").strip().lower()
        if answer in ("", "y", "yes"):
            return latest
        raise ResumeRefused(f"not resumed. To start over, run again with --fresh (the run in {run_dir} is "
                            "archived, nothing is deleted)")
    raise ResumeRefused(f"{run_dir} already holds a run with a checkpoint at step {latest.step}. Pass --auto-resume "
                        "to continue it, or --fresh to start over (the old run is archived, nothing is deleted)")


# -- train -----------------------------------------------------------------------------------------

class SignalFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, commits a checkpoint and exits 143/130.
    A second signal aborts at once (the last committed checkpoint stays)."""

    def __init__(self):
        self.code = None

    def __call__(self) -> int | None:
        return self.code

    def _handle(self, signum, frame):
        if self.code is not None:
            raise KeyboardInterrupt
        self.code = 128 + signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
              "(send it again to abort without saving)", file=sys.stderr, flush=True)

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)


def _notifier(url: str | None):
    """Webhook POSTs in a background thread: a slow or failing webhook never stops training."""
    if not url:
        return lambda *a, **k: None
    import threading
    import urllib.request

    warned = []

    def post(event: str, **fields):
        body = json.dumps({"event": event, "host": socket.gethostname(), "time": time.time(), **fields}).encode()

        def send():
            try:
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                urllib.request.urlopen(request, timeout=10).close()
            except Exception as exc:  # noqa: BLE001 (non-critical by contract)
                if not warned:
                    warned.append(1)
                    print(f"warning: webhook {url} failed ({exc}); training goes on", file=sys.stderr)

        threading.Thread(target=send, daemon=True).start()

    return post


def _predictor(backend, tokenizer, prompts, max_new_tokens: int, run_dir: Path):
    failed = []

    def predict(step: int) -> None:
        try:
            with open(run_dir / "predictions.jsonl", "a", encoding="utf-8") as handle:
                for text, ids in prompts:
                    new_ids = backend.generate(ids, max_new_tokens, tokenizer.eos_id)
                    handle.write(json.dumps({"step": step, "prompt": text,
                                             "output": tokenizer.decode(list(map(int, new_ids)))}) + "\n")
        except Exception as exc:  # noqa: BLE001 (predictions are non-critical, SPEC §8)
            if not failed:
                failed.append(1)
                say(f"warning: predictions failed ({exc.__class__.__name__}: {exc}); training goes on")

    return predict


def cmd_train(args) -> int:
    from . import data
    from .loop import train
    from .progress import Progress
    from .validate import Validator

    flags = {key: getattr(args, name) for name, key in FLAG_KEYS.items()}
    if args.no_streaming:
        flags["data.streaming"] = False
    cfg = build_config(Path(args.config) if args.config else None, flags, args.set)
    if not cfg.model.path:
        raise ConfigError("no model given: pass --model PATH_OR_ID or set model.path in the config")
    run_dir = Path(cfg.output.dir)

    # Refuse bad data before anything is written or loaded. With a local model folder the check
    # tokenizes every row exactly as training will; a hub model is checked again once downloaded.
    train_file, val_file = data.find_data_files(Path(cfg.data.path))
    local_model = Path(cfg.model.path).expanduser()
    tokenizer = data.load_tokenizer(local_model) if local_model.is_dir() else None
    report = data.check_data(Path(cfg.data.path), cfg.data.method, tokenizer=tokenizer, cfg=cfg)
    report.raise_if_problems()

    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, log=say)
    resume_from = decide_resume(args, run_dir, checkpoints)
    fingerprint = fp.compute(cfg, train_file, val_file)
    resume_state = None
    overridden: list[str] = []
    if resume_from is not None:
        changes = fp.differences(checkpoints.manifest(resume_from.path)["fingerprint"], fingerprint)
        if changes and not args.allow_config_change:
            raise ResumeRefused(
                f"the checkpoint at step {resume_from.step} was trained with a different setup; changed: "
                + "; ".join(changes) + ". Undo the change, start over with --fresh, or pass --allow-config-change "
                "to resume anyway")
        overridden = changes
        resume_state = checkpoints.trainer_state(resume_from.path)
        checkpoints.protected.add(resume_from.step)

    run_dir.mkdir(parents=True, exist_ok=True)
    files = RunFiles(run_dir, warn=say)
    notify = _notifier(cfg.notify.webhook_url)
    backend = get_backend(cfg.backend, announce=say)
    info = backend.setup(cfg, cfg.train.seed)
    say(f"model: {cfg.model.path} | trainable params {info.trainable_params:,} of {info.total_params:,} "
        f"({100.0 * info.trainable_params / max(1, info.total_params):.3f}%)")
    if tokenizer is None:
        tokenizer = data.load_tokenizer(Path(info.model_dir))
        report = data.check_data(Path(cfg.data.path), cfg.data.method, tokenizer=tokenizer, cfg=cfg)
        report.raise_if_problems()
    for warning in report.warnings():
        say(f"warning: {warning}")
    stream = data.TrainStream(train_file, tokenizer, cfg)
    eval_batch_size = cfg.eval.batch_size or cfg.train.batch_size
    validator = Validator(
        (lambda: data.eval_batches(val_file, tokenizer, cfg, cfg.eval.max_batches, eval_batch_size))
        if val_file else None)
    predict = None
    if val_file and cfg.eval.predictions > 0:
        prompts = data.prediction_prompts(val_file, tokenizer, cfg, cfg.eval.predictions)
        predict = _predictor(backend, tokenizer, prompts, cfg.eval.max_new_tokens, run_dir)
    if resume_from is not None:
        try:
            backend.load(resume_from.path)
        except Exception as exc:
            if not overridden or isinstance(exc, ConfigError):
                raise
            raise ResumeRefused(
                f"--allow-config-change cannot carry this change ({'; '.join(overridden)}): the checkpoint at step "
                f"{resume_from.step} does not load into the changed setup ({exc.__class__.__name__}: "
                f"{str(exc)[:300]}). Undo the change, or start over with --fresh") from None
        checkpoints.set_aside_after(resume_from.step)  # --resume-from / --before-step: a new timeline
        say(f"resuming from step {resume_from.step} ({resume_from.path})")
        files.event("resume", resume_from.step, from_step=resume_from.step, overridden=overridden or None)
        if overridden:
            say("warning: resuming despite changes (--allow-config-change): " + "; ".join(overridden))
    else:
        files.event("start", 0, backend=backend.name, trainable_params=info.trainable_params,
                    total_params=info.total_params)
        notify("job_started", run_dir=str(run_dir))
    dump_config(cfg, run_dir / "config.yaml")

    flag = SignalFlag()
    flag.install()
    start_step = resume_state["step"] if resume_state else 0
    progress = Progress(cfg.train.max_steps, start_step, enabled=not args.quiet, warn=say)
    files.heartbeat(start_step)
    try:
        outcome = train(cfg, backend, stream, validator, checkpoints, files, progress, fingerprint=fingerprint,
                        resume_state=resume_state, interrupted=flag, predict=predict, notify=notify,
                        say=progress.write)
    except KeyboardInterrupt:
        progress.close()
        files.heartbeat(progress.step, "interrupted", reason="aborted by a second signal")
        say("aborted without saving; the last committed checkpoint is intact")
        return EXIT_SIGINT
    except BaseException as exc:
        progress.close()
        files.heartbeat(progress.step, "failed", reason=f"{exc.__class__.__name__}: {exc}")
        files.event("failed", progress.step, reason=f"{exc.__class__.__name__}: {exc}")
        notify("job_failed", reason=str(exc))
        raise
    progress.close()
    state = {"completed": "completed", "stopped": "stopped", "interrupted": "interrupted"}[outcome.status]
    files.heartbeat(outcome.step, state, reason=outcome.reason)
    if outcome.status == "interrupted":
        say(f"interrupted by {outcome.reason} at step {outcome.step}; checkpoint committed. "
            "Continue with: overnight train ... --auto-resume")
        return outcome.exit_code
    files.event("end", outcome.step, status=outcome.status, reason=outcome.reason,
                best_step=outcome.best_step, adapter_from=outcome.adapter_from)
    notify("job_completed", step=outcome.step, status=outcome.status, reason=outcome.reason)
    say(f"{'stopped early' if outcome.status == 'stopped' else 'finished'} at step {outcome.step}: {outcome.reason}")
    if outcome.adapter_from is not None:
        say(f"adapter (from step {outcome.adapter_from}"
            f"{', the best checkpoint' if outcome.adapter_from == outcome.best_step else ''}): {run_dir / 'adapter'}")
    say(f"metrics: {run_dir / 'metrics.jsonl'} | checkpoints: {checkpoints.root}")
    return EXIT_OK


# -- inspection commands ---------------------------------------------------------------------------

def _run_dir_arg(path: str) -> Path:
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a run directory (no such folder)")
    return run_dir


def cmd_checkpoints(args) -> int:
    run_dir = _run_dir_arg(args.run_dir)
    manager = CheckpointManager(run_dir)
    infos = manager.list()
    if not infos:
        say(f"no checkpoints in {manager.root}")
        return EXIT_OK
    evals = {r["step"]: r for r in read_metrics(run_dir) if r.get("event") == "eval"}
    best_step = None
    for info in reversed(infos):
        if info.valid:
            best_step = manager.trainer_state(info.path)["best"]["best_step"]
            break
    say(f"{'step':>8}  {'status':<40} {'val_loss':>9} {'score':>9}  best")
    for info in infos:
        ev = evals.get(info.step, {})
        status = "valid" if info.valid else f"INVALID: {info.why}"
        val = f"{ev['val_loss']:.4f}" if isinstance(ev.get("val_loss"), float) else "-"
        score = f"{ev['score']:.4f}" if isinstance(ev.get("score"), float) else "-"
        say(f"{info.step:>8}  {status[:40]:<40} {val:>9} {score:>9}  {'*' if info.step == best_step else ''}")
    if manager.quarantine_dir.is_dir():
        for entry in sorted(manager.quarantine_dir.iterdir()):
            why = (entry / "QUARANTINED.txt").read_text().strip() if (entry / "QUARANTINED.txt").exists() else ""
            say(f"{'':>8}  quarantined: {entry.name} ({why})")
    return EXIT_OK


STALE_AFTER_S = 15 * 60


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_status(args) -> int:
    run_dir = _run_dir_arg(args.run_dir)
    path = run_dir / "heartbeat.json"
    if not path.is_file():
        say(f"{run_dir}: not started (no heartbeat.json)")
        return EXIT_OK
    beat = json.loads(path.read_text())
    state, step = beat.get("state", "running"), beat.get("step")
    age = time.time() - beat.get("time", 0)
    if state == "running":
        same_host = beat.get("host") == socket.gethostname()
        alive = _pid_alive(int(beat.get("pid", -1))) if same_host else age < STALE_AFTER_S
        if alive:
            say(f"running at step {step} (heartbeat {age:.0f}s ago, pid {beat.get('pid')} on {beat.get('host')})")
        else:
            say(f"interrupted at step {step} (stale heartbeat from {age / 60:.0f} min ago); "
                "continue with: overnight train ... --auto-resume")
    elif state == "stopped":
        say(f"stopped early at step {step}: {beat.get('reason')}")
    elif state == "completed":
        say(f"completed at step {step}: {beat.get('reason')}")
    else:
        say(f"{state} at step {step}: {beat.get('reason')}")
    return EXIT_OK


def cmd_validate_data(args) -> int:
    from .datacheck import validate_data_main

    return validate_data_main(args.path, args.method, args.model)


def cmd_tiny_model(args) -> int:
    from .tinymodel import build_tiny_model

    out = build_tiny_model(Path(args.output), seed=args.seed)
    say(f"tiny model written to {out}")
    return EXIT_OK


# -- argv ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overnight", description="LoRA/QLoRA fine-tuning you can leave overnight.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run", description="Train a LoRA/QLoRA adapter. "
                       "Precedence: built-in defaults < CONFIG.yaml < flags < --set.")
    t.add_argument("config", nargs="?", help="YAML config (see configs/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.learning_rate=2e-4 (repeatable)")
    t.add_argument("--backend", choices=None, help="auto | mlx | torch (or package.module:Class)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--auto-resume", action="store_true", help="resume from the newest good checkpoint, no question")
    mode.add_argument("--fresh", action="store_true", help="start over; the old run is archived, nothing deleted")
    mode.add_argument("--resume-from", type=int, metavar="STEP", help="resume from the checkpoint at STEP")
    mode.add_argument("--before-step", type=int, metavar="N", help="resume from the newest checkpoint before step N")
    t.add_argument("--output", metavar="DIR", help="run directory (output.dir)")
    t.add_argument("--model", metavar="ID_OR_PATH", help="model folder or hub id (model.path)")
    t.add_argument("--data", metavar="DIR", help="folder with train.jsonl and val.jsonl (data.path)")
    t.add_argument("--method", choices=["sft", "cpt", "dpo", "orpo"], help="data.method")
    t.add_argument("--batch-size", type=int, metavar="N", help="train.batch_size")
    t.add_argument("--lora-rank", type=int, metavar="N", help="lora.rank")
    t.add_argument("--lora-layers", type=int, metavar="N", help="lora.layers (last N blocks, -1 all)")
    t.add_argument("--max-steps", type=int, metavar="N", help="train.max_steps")
    t.add_argument("--learning-rate", type=float, metavar="F", help="train.learning_rate")
    t.add_argument("--no-streaming", action="store_true", help="load the data into memory (data.streaming=false)")
    t.add_argument("--seed", type=int, metavar="N", help="train.seed")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the model, data or training config changed (recorded in metrics)")
    t.add_argument("--quiet", action="store_true", help="no progress line")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("checkpoints", help="list checkpoints: step, validity, val loss, score, best")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.set_defaults(func=cmd_checkpoints)

    s = sub.add_parser("status", help="running / interrupted / completed / failed / stopped early")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.set_defaults(func=cmd_status)

    v = sub.add_parser("validate-data", help="check a dataset before training")
    v.add_argument("path", metavar="DIR_OR_FILE")
    v.add_argument("--method", choices=["sft", "cpt", "dpo", "orpo"], default=None)
    v.add_argument("--model", metavar="DIR", default=None, help="tokenize with this model's tokenizer for length stats")
    v.set_defaults(func=cmd_validate_data)

    m = sub.add_parser("tiny-model", help="build a tiny random Llama-shaped model locally (for demos and tests)")
    m.add_argument("output", metavar="DIR")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UsageError, BackendUnavailable, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except ResumeRefused as exc:
        print(f"resume refused: {exc}", file=sys.stderr, flush=True)
        return EXIT_RESUME_REFUSED
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CRASH
    except KeyboardInterrupt:
        return EXIT_SIGINT
    except Exception as exc:  # noqa: BLE001
        from .loop import TrainingError

        if isinstance(exc, TrainingError):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            print("overnight crashed unexpectedly; the last committed checkpoint is intact. "
                  "Please report the traceback above.", file=sys.stderr, flush=True)
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
