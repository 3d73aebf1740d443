"""One training run, assembled: config -> data check -> backend -> lock -> resume decision -> setup ->
train -> final report. Returns an exit code, or raises the typed errors the CLI maps (errors.py)."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from overnight import distributed
from overnight.runs import fingerprint as fp
from overnight.runs import lock, portable, resume
from overnight.backend import BackendUnavailable, PeerLost, get_backend
from overnight.runs.checkpoint import CheckpointError, CheckpointManager
from overnight.config import ConfigError, build_config, dump_config
from overnight.errors import EXIT_CRASH, EXIT_OK, EXIT_USAGE, ResumeRefused, UsageError
from overnight.integrations.cloud import KeepAwake, runpod_warning
from overnight.integrations.notify import Notifier
from overnight.integrations.trackers import open_reporter
from overnight.runs.rundir import RunFiles, last_logged_step


_SILENT: list[bool] = []  # set in the processes of a data-parallel job other than rank 0: one voice per job


def say(message: str) -> None:
    """Print for the person reading the log. Console output is non-critical (SPEC §8): when stdout's reader
    went away (`overnight ... | head`, a closed terminal), the rest goes to /dev/null and the work goes on."""
    if _SILENT:
        return
    try:
        print(message, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _stderr(message: str) -> None:
    # os.write, not print: called from signal handlers, where print can hit a half-written buffer
    # ("reentrant call inside <_io.BufferedWriter>").
    os.write(2, (message + "\n").encode(errors="replace"))


class SignalFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes the step, commits a checkpoint and exits 143/130.
    A second signal aborts at once without saving: ``on_abort(code)`` records it and ends the process
    with os._exit, so no exception can surface half-way through a save or an atexit handler."""

    def __init__(self, on_abort, relay_window_s: float = 0.0):
        self.code = None
        self.on_abort = on_abort
        # Under a launcher one Ctrl-C arrives twice (from the terminal, and relayed by torchrun): a repeat within
        # this window is that same signal, not the second one that aborts.
        self.relay_window_s = relay_window_s
        self._first = 0.0

    def __call__(self) -> int | None:
        return self.code

    def _handle(self, signum, frame):
        if self.code is not None and time.monotonic() - self._first < self.relay_window_s:
            return
        if self.code is not None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            self.on_abort(128 + signum)
            return
        self.code = 128 + signum
        self._first = time.monotonic()
        if _SILENT:
            return
        _stderr(f"\nreceived {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                "(send it again to abort without saving)")

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)


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


def checkpoint_note(step: int | None) -> str:
    if step is None:
        return "no checkpoint was committed yet, so there is nothing to resume from"
    return f"the last committed checkpoint (step {step}) is intact; continue with: overnight train ... --auto-resume"


def crash_note(run_dir: Path) -> str:
    """For a crash: read the disk (read-only) rather than trust memory, since the crash may be anywhere."""
    try:
        found = CheckpointManager(run_dir, log=lambda m: None).latest_valid(read_only=True)
    except Exception:  # noqa: BLE001 (a message about a crash must not crash)
        return "the checkpoints could not be read; see overnight checkpoints RUN_DIR"
    return checkpoint_note(found.step if found else None)


def output_dir(cfg) -> Path:
    """output.dir as a path that can be a run directory, or ConfigError (exit 2). Creates nothing."""
    raw = (cfg.output.dir or "").strip()
    if not raw:
        raise ConfigError("output.dir is empty: set the run directory with --output DIR or output.dir in the config")
    run_dir = Path(raw).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir {run_dir} is a file, not a folder: choose another path with --output DIR")
    return run_dir


def create_output_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"output.dir {run_dir} cannot be created ({exc.strerror or exc}"
                         f"{': ' + exc.filename if exc.filename else ''}); choose a writable place with --output DIR "
                         "(or fix the permissions of its parent folder)") from None


def check_data_showing_progress(data, cfg, tokenizer, quiet: bool):
    """The full data check; on a large file it shows how far it got (on stderr) instead of silence."""
    from overnight.train.progress import DataCheckProgress

    shown = None if quiet else DataCheckProgress()
    try:
        return data.check_data(Path(cfg.data.path), cfg.data.method, tokenizer=tokenizer, cfg=cfg, on_progress=shown)
    finally:
        if shown is not None:
            shown.done()


def banner(cfg, info, report, run_dir: Path, resumed_from: int | None, processes: int = 1) -> list[str]:
    """What the run is about to do, for whoever reads the log next morning (the backend line, and why, is
    printed by the registry before this)."""
    t = cfg.train
    lines = [f"model: {cfg.model.path} | trainable params {info.trainable_params:,} of {info.total_params:,} "
             f"({100.0 * info.trainable_params / max(1, info.total_params):.3f}%)"]
    for name, f in (("train", report.train), ("val", report.val)):
        if f is not None:
            tokens = f", {int(f.lengths.sum()):,} tokens" if f.lengths is not None and len(f.lengths) else ""
            lines.append(f"data {name}: {f.path} | {f.rows:,} rows{tokens}")
    if report.val is None:
        lines.append("data val: none (no evaluation; the final adapter is the last checkpoint)")
    lines.append(f"plan: {t.max_steps:,} steps | effective batch {t.batch_size * t.grad_accumulation * processes} "
                 f"(batch {t.batch_size} x accumulation {t.grad_accumulation}"
                 + (f" x {processes} processes, data parallel)" if processes > 1 else ")"))
    lines.append((f"eval every {cfg.eval.every_steps} steps | " if report.val is not None else "")
                 + f"checkpoint every {cfg.checkpoint.every_steps} steps (keep last {cfg.checkpoint.keep_last}"
                 f"{' + best' if cfg.checkpoint.keep_best else ''})")
    lines.append(f"run dir: {run_dir}" + (f" | resuming from step {resumed_from}" if resumed_from is not None else ""))
    return lines


def relaunch_on_devices(args, backend_name: str, argv: list[str]) -> int | None:
    """`overnight train --devices N`: run the backend's launcher with N of them and return the job's exit code
    (None: train in this process)."""
    devices = _devices(args)
    if devices == 1 or distributed.launcher():
        return None
    command = distributed.launch_command(backend_name, devices, distributed.without_devices_flag(argv))
    if not os.access(command[0], os.X_OK):
        raise UsageError(f"--devices {devices}: cannot start {command[0]} (not found or not executable)")
    say(f"starting {devices} processes: {' '.join(command)}")
    sys.stdout.flush()
    return distributed.supervise(command, devices)


def _devices(args) -> int:
    devices = getattr(args, "devices", None)
    if devices is not None and devices < 1:
        raise UsageError(f"--devices {devices}: give the number of processes (one per GPU, or per Mac), 1 or more")
    return devices or 1


def run_train(args, flags: dict) -> int:
    from overnight import data

    _devices(args)  # a bad --devices is refused before anything is read
    if distributed.env_rank() != 0:  # rank 0 speaks for the job; the others stay quiet unless they fail
        _SILENT.append(True)
        args.quiet = True
    cfg = build_config(Path(args.config) if args.config else None, flags, args.set)
    if not cfg.model.path:
        raise ConfigError("no model given: pass --model PATH_OR_ID or set model.path in the config")
    # A model overnight provides without a hub (`overnight models`) is named, e.g. smollm2-135m: the backends
    # get its cached folder (fetched and converted once). The fingerprint compares models by content.
    from overnight.models.provided import resolve_model_path

    cfg.model.path = resolve_model_path(cfg.model.path, say)

    # Refuse bad data before anything is written or loaded. With a local model folder the check
    # tokenizes every row exactly as training will; a hub model is checked again once downloaded.
    train_file, val_file = data.find_data_files(Path(cfg.data.path))
    local_model = Path(cfg.model.path).expanduser()
    tokenizer = data.load_tokenizer(local_model) if local_model.is_dir() else None
    report = check_data_showing_progress(data, cfg, tokenizer, args.quiet)
    report.raise_if_problems()
    if cfg.data.method == "grpo":  # a reward that cannot be imported is a config error, found before any work
        from overnight.methods.grpo import check_reward_fields
        from overnight.methods.rewards import load_rewards

        check_reward_fields([train_file, val_file], load_rewards(cfg))
    run_dir = output_dir(cfg)
    backend = get_backend(cfg.backend, announce=say)  # imports the framework, loads no model
    job_code = relaunch_on_devices(args, backend.name, getattr(args, "train_argv", []))
    if job_code is not None:
        return job_code
    world = distributed.join(backend, timeout_s=cfg.train.collective_timeout_s)
    if world.rank != 0:  # rank 0 owns RUN_DIR (lock, files, checkpoints); this rank follows its decisions
        return _guarded(args, cfg, run_dir, backend, data, train_file, val_file, tokenizer, report, world)

    create_output_dir(run_dir)
    fd = lock.acquire(run_dir)  # from here to exit this process alone touches RUN_DIR
    try:
        return _guarded(args, cfg, run_dir, backend, data, train_file, val_file, tokenizer, report, world)
    finally:
        lock.release(fd)


def _guarded(args, cfg, run_dir, backend, data, *rest) -> int:
    from overnight.train.loop import TrainingError

    world = rest[-1]
    try:
        return _locked(args, cfg, run_dir, backend, data, *rest)
    except PeerLost as exc:
        raise TrainingError(f"{exc}; {crash_note(run_dir)}") from None
    except Exception as exc:
        if isinstance(exc, _expected_errors(data)):
            raise
        traceback.print_exc()
        who = f" (rank {world.rank} of {world.size})" if world.size > 1 else ""
        print(f"overnight crashed unexpectedly{who}; {crash_note(run_dir)}. Please report the traceback above.",
              file=sys.stderr, flush=True)
        return EXIT_CRASH



def _expected_errors(data) -> tuple:
    """What the CLI reports as a message, without a traceback (everything else is a crash)."""
    from overnight.train.loop import TrainingError

    return (ConfigError, UsageError, ResumeRefused, BackendUnavailable, data.DataError, TrainingError,
            CheckpointError)


class _NoFiles:
    """The run files of a rank other than 0: rank 0 writes the job's one metrics.jsonl and heartbeat."""

    reporter = None

    def __init__(self, run_dir: Path):
        self.dir = run_dir

    def event(self, *args, **fields) -> None:
        pass

    heartbeat = event

    def report_state(self) -> dict:
        return {}


def _resume_plan(args, run_dir, checkpoints, world):
    """The checkpoint to resume from, or None. Rank 0 decides (it may archive or clean up files) and tells the
    others; when its decision raised, the others hear so (_LeaderFailed) and leave quietly."""
    leader = world.rank == 0
    if leader:
        try:
            # Under a launcher no process reads the terminal: an existing run needs --auto-resume or --fresh.
            resume_from = resume.decide_resume(args, run_dir, checkpoints, say, **(
                {"interactive": lambda: False} if world.size > 1 else {}))
        except BaseException:
            world.broadcast(np.array([-2.0]))
            raise
        world.broadcast(np.array([-1.0 if resume_from is None else float(resume_from.step)]))
        return resume_from
    step = int(world.broadcast(np.array([0.0]))[0])
    if step == -2:
        raise _LeaderFailed()
    return None if step < 0 else checkpoints.latest_valid(at_step=step, read_only=True)


class _LeaderFailed(Exception):
    """Rank 0 stopped before training (its message says why); the other ranks end quietly with exit 2."""


def _locked(args, cfg, run_dir, backend, data, train_file, val_file, tokenizer, report, world) -> int:
    from overnight.train.loop import train
    from overnight.train.progress import Progress
    from overnight.train.validation import Validator

    leader = world.rank == 0
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, log=say)
    try:
        resume_from = _resume_plan(args, run_dir, checkpoints, world)
    except _LeaderFailed:
        return EXIT_USAGE
    fingerprint = fp.compute(cfg, train_file, val_file, backend=backend.name, world_size=world.size)
    resume_state, overridden = None, []
    if resume_from is not None:
        saved = checkpoints.manifest(resume_from.path)["fingerprint"]
        moved_from = resume.check_backend(saved, backend.name, resume_from.step, args.allow_backend_change)
        overridden = resume.check_fingerprint(saved, fingerprint, resume_from.step, args.allow_config_change,
                                              across_backends=moved_from is not None)
        resume_state = checkpoints.trainer_state(resume_from.path)
        nothing = (resume.beyond_max_steps(resume_state["step"], cfg.train.max_steps)
                   or resume.stopped_early(run_dir, args))
        if nothing:
            say(nothing)
            return EXIT_OK
        checkpoints.protected.add(resume_from.step)
        checkpoints.last_committed = resume_from.step

    cloud_warning = runpod_warning(run_dir) if leader else None
    if cloud_warning:
        say(cloud_warning)
    if leader:
        files = RunFiles(run_dir, warn=say, reporter=open_reporter(cfg, run_dir, resume_state, warn=say, say=say,
                                                                   last_logged_step=lambda: last_logged_step(run_dir)))
        notify = Notifier(cfg.notify.webhook_url)
    else:
        files, notify = _NoFiles(run_dir), Notifier("")
    awake = KeepAwake(cfg.output.keep_awake if leader else False, warn=say)
    awake.start()
    try:
        info = backend.setup(cfg, cfg.train.seed)
        if tokenizer is None:
            tokenizer = data.load_tokenizer(Path(info.model_dir))
            report = check_data_showing_progress(data, cfg, tokenizer, args.quiet)
            report.raise_if_problems()
        for line in banner(cfg, info, report, run_dir, resume_from.step if resume_from is not None else None,
                           world.size):
            say(line)
        for warning in report.warnings():
            say(f"warning: {warning}")
        eval_batch_size = cfg.eval.batch_size or cfg.train.batch_size
        predict = None
        if cfg.data.method == "grpo":  # sampled completions and rewards in place of fixed batches (src/methods/grpo.py)
            from overnight.methods import grpo, rewards

            reward_list = rewards.load_rewards(cfg)
            stream = grpo.GrpoSource(train_file, tokenizer, cfg, backend, reward_list, say, world)
            validator = grpo.GrpoValidator(val_file, tokenizer, cfg, reward_list)
            if val_file and cfg.eval.predictions > 0 and leader:
                predict = grpo.predictor(validator, run_dir, say)
        else:
            stream = data.TrainStream(train_file, tokenizer, cfg)
            validator = Validator(
                (lambda: data.eval_batches(val_file, tokenizer, cfg, cfg.eval.max_batches, eval_batch_size))
                if val_file else None)
        if val_file and cfg.eval.predictions > 0 and predict is None and leader:
            prompts = data.prediction_prompts(val_file, tokenizer, cfg, cfg.eval.predictions)
            predict = _predictor(backend, tokenizer, prompts, cfg.eval.max_new_tokens, run_dir)
        if resume_from is not None:
            try:
                if moved_from:  # another backend's run: its portable copy (src/runs/portable.py, SPEC §13)
                    portable.load_moved(backend, resume_from.path)
                else:
                    backend.load(resume_from.path)
            except portable.PortableError as exc:
                raise ResumeRefused(f"the run cannot move from {moved_from!r} to {backend.name!r}: {exc}") from None
            except Exception as exc:
                if not overridden or isinstance(exc, ConfigError):
                    raise
                raise ResumeRefused(
                    f"--allow-config-change cannot carry this change ({'; '.join(overridden)}): the checkpoint at "
                    f"step {resume_from.step} does not load into the changed setup ({exc.__class__.__name__}: "
                    f"{str(exc)[:300]}). Undo the change, or start over with --fresh") from None
            if leader:
                checkpoints.set_aside_after(resume_from.step)  # --resume-from / --before-step: a new timeline
            world.barrier()  # every rank has loaded the checkpoint before any trains on
            say(f"resuming from step {resume_from.step} ({resume_from.path})")
            moved = None
            if moved_from:
                moved = {"from": moved_from, "to": backend.name,
                         "quantization": fp.quantization_change(saved, fingerprint),
                         "rng": "not carried: dropout draws from here differ from an uninterrupted run"}
                bits = [side["model.quantization.bits"] for side in moved["quantization"].values()]
                quantized = [f"{b}-bit" if b else "unquantized" for b in bits]
                say(f"continuing a {moved_from} run on {backend.name} (--allow-backend-change): LoRA weights, AdamW "
                    "moments and the data position carried over; dropout draws differ from here"
                    + (f"; the base model was {quantized[0]} on {moved_from} and is {quantized[1]} on "
                       f"{backend.name}, each backend's own format" if any(bits) else ""))
            files.event("resume", resume_from.step, from_step=resume_from.step, overridden=overridden or None,
                        backend_change=moved)
            notify("job_started", run_dir=str(run_dir), resumed_from=resume_from.step)
            if overridden:
                say("warning: resuming despite changes (--allow-config-change): " + "; ".join(overridden))
        else:
            files.event("start", 0, backend=backend.name, trainable_params=info.trainable_params,
                        total_params=info.total_params)
            notify("job_started", run_dir=str(run_dir))
        if leader:
            dump_config(cfg, run_dir / "config.yaml")

        start_step = resume_state["step"] if resume_state else 0
        progress = Progress(cfg.train.max_steps, start_step, enabled=not args.quiet)

        ended: list[str] = []  # the run's final state, once recorded

        def abort(code: int) -> None:
            # The second signal: no save. Record it, say what is safe, and leave without unwinding.
            if ended:  # e.g. while waiting for the webhook at exit: the run's own record stands
                _stderr(f"\nexiting at once; the run had already ended ({ended[0]})")
                os._exit(code)
            try:
                files.heartbeat(progress.step, "interrupted", reason="aborted by a second signal")
            except BaseException:  # noqa: BLE001
                pass
            _stderr(f"\naborted without saving; {checkpoint_note(checkpoints.last_committed)}")
            os._exit(code)

        flag = SignalFlag(abort, relay_window_s=3.0 if world.size > 1 else 0.0)
        flag.install()
        files.heartbeat(start_step)
        try:
            outcome = train(cfg, backend, stream, validator, checkpoints, files, progress, fingerprint=fingerprint,
                            resume_state=resume_state, interrupted=flag, predict=predict, notify=notify,
                            say=progress.write if leader else (lambda message: None), world=world)
        except Exception as exc:
            ended.append("failed")
            progress.close()
            reason = f"{exc.__class__.__name__}: {exc}"
            files.heartbeat(progress.step, "failed", reason=reason)
            files.event("failed", progress.step, reason=reason)
            notify("job_failed", reason=str(exc))
            raise
        progress.close()
        state = {"completed": "completed", "stopped": "stopped", "interrupted": "interrupted"}[outcome.status]
        ended.append(state)
        files.heartbeat(outcome.step, state, reason=outcome.reason)
        if outcome.status == "interrupted":
            say(f"interrupted by {outcome.reason} at step {outcome.step}; checkpoint committed. "
                "Continue with: overnight train ... --auto-resume")
            return outcome.exit_code
        files.event("end", outcome.step, status=outcome.status, reason=outcome.reason,
                    best_step=outcome.best_step, adapter_from=outcome.adapter_from)
        notify("job_completed", step=outcome.step, status=outcome.status, reason=outcome.reason)
        say(f"{'stopped early' if outcome.status == 'stopped' else 'finished'} at step {outcome.step}: "
            f"{outcome.reason}")
        if outcome.adapter_from is not None:
            say(f"adapter (from step {outcome.adapter_from}"
                f"{', the best checkpoint' if outcome.adapter_from == outcome.best_step else ''}): "
                f"{run_dir / 'adapter'}")
        say(f"metrics: {run_dir / 'metrics.jsonl'} | checkpoints: {checkpoints.root}")
        return EXIT_OK
    finally:
        awake.stop()
        if files.reporter is not None:
            files.reporter.close(1 if sys.exc_info()[0] is not None else 0)
        notify.close()
