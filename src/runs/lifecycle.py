"""`overnight train`: one run's lifecycle.

run_train checks everything it can before anything is written or loaded (config, data, the method's own checks,
the backend), hands a `--devices` job to its launcher, takes the run directory's lock and runs a TrainingRun:
plan the resume -> open the outputs -> set up the model -> build the method's parts -> restore -> train -> finish,
every resource released in one place. It returns an exit code, or raises the typed errors the CLI maps
(overnight.errors)."""
from __future__ import annotations

import json
import os
import re
import sys
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from overnight import data, distributed
from overnight.backend import BackendUnavailable, PeerLost, PortTaken, get_backend
from overnight.config import ConfigError, build_config, dump_config
from overnight.errors import EXIT_CRASH, EXIT_OK, EXIT_USAGE, ResumeRefused, RunLocked, TrainingError, UsageError
from overnight.fsutil import drop_jsonl_lines_after
from overnight.integrations.cloud import KeepAwake, runpod_warning
from overnight.integrations.notify import Notifier
from overnight.integrations.trackers import open_reporter
from overnight.methods.registry import PartsRequest, method
from overnight.models.provided import resolve_model_path
from overnight.runs import fingerprint as fp
from overnight.runs import init_adapter, launch, lock, portable, resume, supervise
from overnight.runs.checkpoint import CheckpointError, CheckpointInfo, CheckpointManager, disk_full
from overnight.runs.console import is_quiet, quiet_this_process, say, stderr_now
from overnight.runs.effects import FollowerEffects, RunEffects
from overnight.runs.rundir import PREDICTIONS_FILE, RunFiles, last_logged_step
from overnight.runs.signals import SignalFlag, StoppedDuringSetup, stop_setup_on_signals
from overnight.train import loop, schedule
from overnight.train.progress import DataCheckProgress, Progress

# What the CLI reports as a message, without a traceback (everything else is a crash).
EXPECTED_ERRORS = (ConfigError, UsageError, ResumeRefused, BackendUnavailable, data.DataError, TrainingError,
                   CheckpointError)


def run_train(args, flags: dict) -> int:
    stop_setup_on_signals()  # until the loop takes SIGTERM/SIGINT over: a stop during setup is said, not silent
    run_dirs: list[Path] = []
    try:
        return _run_train(args, flags, run_dirs)
    except StoppedDuringSetup as stop:
        if not is_quiet():
            stderr_now(f"\n{stopped_during_setup_note(stop.signal_name, run_dirs[0] if run_dirs else None)}")
        return stop.code


def _run_train(args, flags: dict, run_dirs: list[Path]) -> int:
    launch.requested_devices(args)  # a bad --devices is refused before anything is read
    supervise.become_child()  # a supervised child ends with its supervisor
    supervised_code = supervised(args, flags)
    if supervised_code is not None:
        return supervised_code
    if distributed.env_rank() != 0:  # rank 0 speaks for the job; the others stay quiet unless they fail
        quiet_this_process()
        args.quiet = True
    checked = check_before_training(args, flags)
    run_dir = output_dir(checked.cfg)
    run_dirs.append(run_dir)
    backend = get_backend(checked.cfg.backend, announce=say)  # imports the framework, loads no model
    job_code = launch.relaunch_on_devices(args, backend.name, getattr(args, "train_argv", []), say)
    if job_code is not None:
        return job_code
    try:
        world = distributed.join(backend, timeout_s=checked.cfg.train.collective_timeout_s)
    except PortTaken as exc:  # nothing started: the supervisor starts the job again on other ports
        launch.note_port_taken()
        raise TrainingError(f"{exc}; nothing was started") from None
    except PeerLost as exc:
        raise TrainingError(f"{exc}; nothing was started or changed. Start the job again") from None
    schedule.apply_epochs(checked.cfg, checked.report, world.size)  # train.epochs -> max_steps, for this job's size
    run = TrainingRun(args, checked, run_dir, backend, world)
    if world.rank != 0:  # rank 0 owns RUN_DIR (lock, files, checkpoints); this rank follows its decisions
        return run.execute()
    create_output_dir(run_dir)
    fd = lock.acquire(run_dir)  # from here to exit this process alone touches RUN_DIR
    try:
        return run.execute()
    finally:
        lock.release(fd)


def supervised(args, flags: dict) -> int | None:
    """An unattended run trains in a child this process starts again after a crash (overnight.runs.supervise); its
    exit code, or None to train here. Decided before the data check and the framework import: the child does both."""
    argv = getattr(args, "train_argv", None)
    if not argv or not supervise.should_supervise(args, max_restarts=1):
        return None
    cfg = build_config(Path(args.config) if args.config else None, flags, args.set)
    if cfg.train.max_restarts < 1:
        return None
    return supervise.supervise_train(argv, output_dir(cfg), cfg.train.max_restarts, cfg.notify.webhook_url)


# -- before anything is written ----------------------------------------------------------------------------------

@dataclass
class Checked:
    """The config and data of a run, checked before anything is written or loaded."""

    cfg: object
    train_file: Path
    val_file: Path | None
    tokenizer: object | None  # None for a hub model: checked again once the backend downloaded it
    report: object  # the data check's DataReport (rows, tokens, warnings)
    init_adapter: object | None = None  # lora.init_from, read and checked (init_adapter.AdapterWeights)
    template_now: object | None = None  # the run's pinned time for chat templates (fingerprint.run_template_now)


def check_before_training(args, flags: dict) -> Checked:
    """Refuse bad config and data first (exit 2). With a local model folder the check tokenizes every row exactly
    as training will."""
    cfg = build_config(Path(args.config) if args.config else None, flags, args.set)
    if launch.requested_devices(args) == 1 or distributed.launcher():  # a --devices parent leaves it to its rank 0
        for warning in cfg.warnings:
            say(f"warning: {warning}")
    if not cfg.model.path:
        raise ConfigError("no model given: pass --model PATH_OR_ID or set model.path in the config")
    # A model overnight provides without a hub (`overnight models`) is named, e.g. smollm2-135m: the backends
    # get its cached folder (fetched and converted once). The fingerprint compares models by content.
    cfg.model.path = resolve_model_path(cfg.model.path, say)
    adapter = init_adapter.check(cfg, warn=say)  # lora.init_from: read once, refused by name when it cannot fit
    train_file, val_file = data.find_data_files(Path(cfg.data.path), cfg.data.columns, cfg.data.hf_dataset)
    local_model = Path(cfg.model.path).expanduser()
    template_now = fp.run_template_now(_run_dir_or_none(cfg), fresh=args.fresh)
    tokenizer = data.load_tokenizer(local_model, cfg.data.chat_template_kwargs, template_now) \
        if local_model.is_dir() else None
    report = check_data_showing_progress(cfg, tokenizer, args.quiet)
    report.raise_if_problems()
    method(cfg.data.method).check(cfg, train_file, val_file)
    return Checked(cfg, train_file, val_file, tokenizer, report, adapter, template_now)


def _run_dir_or_none(cfg) -> Path | None:
    try:
        return output_dir(cfg)
    except ConfigError:  # said after the data check, where it always was
        return None


def check_data_showing_progress(cfg, tokenizer, quiet: bool):
    """The full data check; on a large file it shows how far it got (on stderr) instead of silence."""
    shown = None if quiet else DataCheckProgress()
    try:
        return data.check_data(Path(cfg.data.path), cfg.data.method, tokenizer=tokenizer, cfg=cfg, on_progress=shown)
    finally:
        if shown is not None:
            shown.done()


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


# -- where the run starts ----------------------------------------------------------------------------------------

@dataclass
class ResumePlan:
    """Where a run starts: from scratch (checkpoint None), or from a checkpoint and what comes with it."""

    fingerprint: dict  # this run's: what its checkpoints will record
    checkpoint: CheckpointInfo | None = None
    state: dict | None = None  # the checkpoint's trainer state
    saved_fingerprint: dict | None = None
    moved_from: str | None = None  # the backend of a run continued with --allow-backend-change (SPEC §13)
    overridden: list[str] = field(default_factory=list)  # the changes --allow-config-change let through
    nothing_left: str | None = None  # there is nothing to train (max_steps reached, stopped early): why

    @property
    def start_step(self) -> int:
        return self.state["step"] if self.state else 0


class _LeaderFailed(Exception):
    """Rank 0 stopped before training (its message says why); the other ranks end quietly with exit 2."""


def plan_resume(args, cfg, checked: Checked, run_dir: Path, checkpoints: CheckpointManager, backend_name: str,
                world) -> ResumePlan:
    """Decide where this run starts (rank 0 decides and tells the others) and check that the checkpoint may be
    continued with this config and backend: ResumeRefused (exit 3) naming what changed otherwise."""
    checkpoint = _agreed_checkpoint(args, run_dir, checkpoints, world)
    fingerprint = fp.compute(cfg, checked.train_file, checked.val_file, backend=backend_name, world_size=world.size,
                             init_adapter=checked.init_adapter.identity() if checked.init_adapter else None,
                             template_now=checked.template_now)
    if checkpoint is None:
        return ResumePlan(fingerprint)
    saved = checkpoints.manifest(checkpoint.path)["fingerprint"]
    moved_from = resume.check_backend(saved, backend_name, checkpoint.step, args.allow_backend_change)
    overridden = resume.check_fingerprint(saved, fingerprint, checkpoint.step, args.allow_config_change,
                                          across_backends=moved_from is not None)
    state = checkpoints.trainer_state(checkpoint.path)
    nothing_left = resume.beyond_max_steps(state["step"], cfg.train.max_steps) or resume.stopped_early(run_dir, args)
    if not nothing_left:
        resume.check_data_position(state["data"], cfg, checked.train_file, checked.report.train.rows,
                                   checkpoint.step, run_dir)
    return ResumePlan(fingerprint, checkpoint, state, saved, moved_from, overridden, nothing_left)


def _agreed_checkpoint(args, run_dir: Path, checkpoints: CheckpointManager, world) -> CheckpointInfo | None:
    """The checkpoint to resume from, or None. Rank 0 decides (it may archive or clean up files) and tells the
    others; when its decision raised, the others hear so (_LeaderFailed) and leave quietly."""
    if world.rank == 0:
        try:
            # Under a launcher no process reads the terminal: an existing run needs --auto-resume or --fresh.
            chosen = resume.decide_resume(args, run_dir, checkpoints, say, **(
                {"interactive": lambda: False} if world.size > 1 else {}))
        except BaseException:
            world.broadcast(np.array([-2.0]))
            raise
        world.broadcast(np.array([-1.0 if chosen is None else float(chosen.step)]))
        return chosen
    step = int(world.broadcast(np.array([0.0]))[0])
    if step == -2:
        raise _LeaderFailed()
    return None if step < 0 else checkpoints.latest_valid(at_step=step, read_only=True)


# -- the run -----------------------------------------------------------------------------------------------------

class _NoFiles:
    """The run files of a rank other than 0: rank 0 writes the job's one metrics.jsonl and heartbeat."""

    reporter = None

    def __init__(self, run_dir: Path):
        self.dir = run_dir

    def event(self, *args, **fields) -> None:
        pass

    heartbeat = event


class TrainingRun:
    """One `overnight train` in this process, in torchtune's recipe shape: small setup steps, then train, then
    finish; execute() runs them in order and releases what they opened in one place."""

    def __init__(self, args, checked: Checked, run_dir: Path, backend, world):
        self.args, self.checked, self.cfg = args, checked, checked.cfg
        self.run_dir, self.backend, self.world = run_dir, backend, world
        self.leader = world.rank == 0
        self.checkpoints = CheckpointManager(run_dir, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_best,
                                             log=say)
        self.start_step, self.failure_recorded = 0, False

    def execute(self) -> int:
        """The run, with failures translated: a lost peer or a user's mistake is a message; anything else is a
        crash reported with its traceback and what is safe on disk."""
        try:
            return self._execute()
        except PeerLost as exc:
            refused = None if self.leader else launch.leader_refused_by_lock(self.run_dir)
            if refused:  # not a peer that died: rank 0 was refused the run, and has said so
                raise RunLocked(refused) from None
            raise TrainingError(f"{exc}; {crash_note(self.run_dir)}") from None
        except EXPECTED_ERRORS:
            raise
        except Exception as exc:
            if disk_full(exc, self.run_dir, by_free_space=False):  # a write outside a save: config.yaml, adapter/
                self._record_failure(f"disk full: {exc}")
                where = getattr(exc, "filename", None) or f"in {self.run_dir}"
                raise TrainingError(f"disk full while writing {where} ({exc.__class__.__name__}: {exc}); free some "
                                    f"space, then: {crash_note(self.run_dir)}") from None
            traceback.print_exc()
            self._record_failure(f"{exc.__class__.__name__}: {exc}")
            who = f" (rank {self.world.rank} of {self.world.size})" if self.world.size > 1 else ""
            print(f"overnight crashed unexpectedly{who}; {crash_note(self.run_dir)}. Please report the traceback "
                  "above.", file=sys.stderr, flush=True)
            return EXIT_CRASH

    def _record_failure(self, reason: str) -> None:
        """A failure outside the loop (which records its own) where the run directory already tells a state, so
        `overnight status` says failed rather than the interrupted or completed run this one resumed. A refusal
        never gets here, and a directory with no record yet gets none."""
        if not self.leader or self.failure_recorded:
            return
        if not ((self.run_dir / "heartbeat.json").exists() or (self.run_dir / "metrics.jsonl").exists()):
            return
        try:
            files, step = RunFiles(self.run_dir, warn=lambda message: None), self.start_step
            files.heartbeat(step, "failed", reason=reason)
            files.event("failed", step, reason=reason)
        except Exception:  # noqa: BLE001 (recording a failure must not hide it)
            pass

    def _execute(self) -> int:
        try:
            plan = plan_resume(self.args, self.cfg, self.checked, self.run_dir, self.checkpoints, self.backend.name,
                               self.world)
        except _LeaderFailed:
            return EXIT_USAGE
        if plan.nothing_left:
            say(plan.nothing_left)
            return EXIT_OK
        if self.cfg.lora.use_dora and not getattr(self.backend, "supports_dora", False):
            # a backend that does not know the key would train plain LoRA under a config that says DoRA; said
            # after the resume check, so a resumed run that changed the key hears that first (exit 3)
            raise ConfigError(f"config key 'lora.use_dora': backend {self.backend.name} does not build DoRA layers "
                              "(it does not declare supports_dora) -> use --backend torch or mlx, or "
                              "lora.use_dora=false")
        kernels = getattr(self.backend, "loss_kernels", ("chunked",))
        if self.cfg.model.loss_kernel not in kernels:
            raise ConfigError(f"config key 'model.loss_kernel': backend {self.backend.name} computes the loss with "
                              f"{' or '.join(kernels)}, not {self.cfg.model.loss_kernel} -> "
                              f"model.loss_kernel={kernels[0]}")
        self.start_step = plan.start_step
        if plan.checkpoint is not None:  # never rotated away; what an abort names as safe
            self.checkpoints.protected.add(plan.checkpoint.step)
            self.checkpoints.last_committed = plan.checkpoint.step
        with ExitStack() as cleanup:
            files, notify = self._open_outputs(plan, cleanup)
            info = self._setup_model()
            self._announce(plan, info)
            parts = method(self.cfg.data.method).build(PartsRequest(
                self.cfg, self.backend, self.checked.tokenizer, self.checked.train_file, self.checked.val_file,
                self.run_dir, say, self.world, writes_predictions=self.leader))
            cleanup.callback(parts.source.close)
            if plan.state is not None:  # a place in the data the source cannot continue: refused, nothing written
                resume.check_source_position(parts.source, plan.state["data"], plan.checkpoint.step, self.run_dir)
            self._restore(plan, info, files, notify)
            return self._train(plan, parts, files, notify)

    def _open_outputs(self, plan: ResumePlan, cleanup: ExitStack):
        """The run's records (rank 0: metrics, heartbeat, trackers), the webhook, and keeping the machine awake."""
        cloud_warning = runpod_warning(self.run_dir) if self.leader else None
        if cloud_warning:
            say(cloud_warning)
        if self.leader:
            reporter = open_reporter(self.cfg, self.run_dir, plan.state, warn=say, say=say,
                                     last_logged_step=lambda: last_logged_step(self.run_dir))
            files, notify = RunFiles(self.run_dir, warn=say, reporter=reporter), Notifier(self.cfg.notify.webhook_url)
        else:
            files, notify = _NoFiles(self.run_dir), Notifier("")
        cleanup.callback(notify.close)  # last: the final notifications are sent (bounded) after everything else
        if files.reporter is not None:
            cleanup.push(lambda failed, *_: files.reporter.close(1 if failed is not None else 0))
        awake = KeepAwake(self.cfg.output.keep_awake if self.leader else False, warn=say)
        awake.start()
        cleanup.callback(awake.stop)
        return files, notify

    def _setup_model(self):
        """Load the model and add LoRA; a hub model's rows are checked now that its tokenizer is here."""
        info = self.backend.setup(self.cfg, self.cfg.train.seed)
        checked = self.checked
        if checked.tokenizer is None:
            checked.tokenizer = data.load_tokenizer(Path(info.model_dir), self.cfg.data.chat_template_kwargs,
                                                    checked.template_now)
            checked.report = check_data_showing_progress(self.cfg, checked.tokenizer, self.args.quiet)
            checked.report.raise_if_problems()
        return info

    def _announce(self, plan: ResumePlan, info) -> None:
        """What the run is about to do, and what the data check and the plan (steps against warmup and
        intervals) warned about."""
        for line in banner(self.cfg, info, self.checked.report, self.run_dir,
                           plan.checkpoint.step if plan.checkpoint else None, self.world.size):
            say(line)
        if plan.checkpoint is None and self.checked.init_adapter is not None:
            say(f"init: {init_adapter.describe(self.checked.init_adapter)}")
        for warning in self.checked.report.warnings() + schedule.plan_warnings(
                self.cfg, plan.start_step, evaluates=self.checked.report.val is not None):
            say(f"warning: {warning}")

    def _restore(self, plan: ResumePlan, info, files, notify) -> None:
        """Continue from the plan's checkpoint, or record a fresh start."""
        if plan.checkpoint is None:
            start = self.checked.init_adapter
            if start is not None:  # a new run from an adapter's weights (lora.init_from); the optimizer stays new
                init_adapter.load_into(self.backend, start)
            files.event("start", 0, backend=self.backend.name, trainable_params=info.trainable_params,
                        total_params=info.total_params, setup=setup_record(info.details),
                        **({"init_adapter": start.identity()} if start else {}))
            notify("job_started", run_dir=str(self.run_dir))
        else:
            self._load_checkpoint(plan)
            if self.leader:
                self.checkpoints.set_aside_after(plan.checkpoint.step)  # --resume-from / --before-step: new timeline
                # A keep_last lowered on resume frees its space now, before the first save needs it.
                self.checkpoints.prune_on_resume((plan.state.get("best") or {}).get("best_step"))
                # The evals after the checkpoint run again: their predictions would be in the file twice, and a line
                # a kill cut would swallow the next one.
                try:
                    drop_jsonl_lines_after(self.run_dir / PREDICTIONS_FILE, plan.checkpoint.step)
                except OSError as exc:
                    say(f"warning: trimming {PREDICTIONS_FILE} to step {plan.checkpoint.step} failed ({exc}); it may "
                        "hold the evals after it twice; training goes on")
            self.world.barrier()  # every rank has loaded the checkpoint before any trains on
            say(f"resuming from step {plan.checkpoint.step} ({plan.checkpoint.path})")
            # the setup again: another machine or library may pick another loss head or dtype for the same config
            files.event("resume", plan.checkpoint.step, from_step=plan.checkpoint.step,
                        overridden=plan.overridden or None, backend_change=self._backend_change(plan),
                        setup=setup_record(info.details))
            notify("job_started", run_dir=str(self.run_dir), resumed_from=plan.checkpoint.step)
            if plan.overridden:
                say("warning: resuming despite changes (--allow-config-change): " + "; ".join(plan.overridden))
        if self.leader:
            dump_config(self.cfg, self.run_dir / "config.yaml")

    def _load_checkpoint(self, plan: ResumePlan) -> None:
        try:
            if plan.moved_from:  # another backend's run: its portable copy (src/runs/portable.py, SPEC §13)
                portable.load_moved(self.backend, plan.checkpoint.path)
            else:
                self.backend.load(plan.checkpoint.path)
        except portable.PortableError as exc:
            raise ResumeRefused(f"the run cannot move from {plan.moved_from!r} to {self.backend.name!r}: "
                                f"{exc}") from None
        except Exception as exc:
            if not plan.overridden or isinstance(exc, ConfigError):
                raise
            raise ResumeRefused(
                f"--allow-config-change cannot carry this change ({'; '.join(plan.overridden)}): the checkpoint at "
                f"step {plan.checkpoint.step} does not load into the changed setup ({exc.__class__.__name__}: "
                f"{str(exc)[:300]}). Undo the change, or start over with --fresh") from None

    def _backend_change(self, plan: ResumePlan) -> dict | None:
        """A run continued on another backend: said, and recorded in its resume event."""
        if not plan.moved_from:
            return None
        name = self.backend.name
        moved = {"from": plan.moved_from, "to": name,
                 "quantization": fp.quantization_change(plan.saved_fingerprint, plan.fingerprint),
                 "rng": "not carried: dropout draws from here differ from an uninterrupted run"}
        bits = [side["model.quantization.bits"] for side in moved["quantization"].values()]
        quantized = [f"{b}-bit" if b else "unquantized" for b in bits]
        say(f"continuing a {plan.moved_from} run on {name} (--allow-backend-change): LoRA weights, AdamW "
            "moments and the data position carried over; dropout draws differ from here"
            + (f"; the base model was {quantized[0]} on {plan.moved_from} and is {quantized[1]} on "
               f"{name}, each backend's own format" if any(bits) else ""))
        return moved

    def _train(self, plan: ResumePlan, parts, files, notify) -> int:
        progress = Progress(self.cfg.train.max_steps, plan.start_step, enabled=not self.args.quiet)
        ended: list[str] = []  # the run's final state, once recorded
        flag = SignalFlag(self._abort(files, progress, ended), relay_window_s=3.0 if self.world.size > 1 else 0.0)
        flag.install()
        files.heartbeat(plan.start_step)
        if self.leader:
            effects = RunEffects(files, self.checkpoints, self.backend, progress, fingerprint=plan.fingerprint,
                                 model_path=self.cfg.model.path, notify=notify, predict=parts.predict)
        else:
            effects = FollowerEffects(progress)
        try:
            outcome = loop.train(self.cfg, self.backend, parts.source, parts.validator, effects,
                                 resume_state=plan.state, interrupted=flag, world=self.world,
                                 split_at=supervise.forced_split())
        except Exception as exc:
            ended.append("failed")
            self.failure_recorded = True
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
        return self._finish(outcome, files, notify)

    def _abort(self, files, progress: Progress, ended: list[str]):
        def abort(code: int) -> None:
            # The second signal: no save. Record it, say what is safe, and leave without unwinding.
            if ended:  # e.g. while waiting for the webhook at exit: the run's own record stands
                stderr_now(f"\nexiting at once; the run had already ended ({ended[0]})")
                os._exit(code)
            try:
                files.heartbeat(progress.step, "interrupted", reason="aborted by a second signal")
            except BaseException:  # noqa: BLE001
                pass
            stderr_now(f"\naborted without saving; {checkpoint_note(self.checkpoints.last_committed)}")
            os._exit(code)

        return abort

    def _finish(self, outcome: loop.Outcome, files, notify) -> int:
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
                f"{self.run_dir / 'adapter'}")
        say(f"metrics: {self.run_dir / 'metrics.jsonl'} | checkpoints: {self.checkpoints.root}")
        return EXIT_OK


# -- what the log says -------------------------------------------------------------------------------------------

def banner(cfg, info, report, run_dir: Path, resumed_from: int | None, processes: int = 1) -> list[str]:
    """What the run is about to do, for whoever reads the log next morning (the backend line, and why, is
    printed by the registry before this)."""
    t = cfg.train
    lines = [f"model: {cfg.model.path} | trainable params {info.trainable_params:,} of {info.total_params:,} "
             f"({100.0 * info.trainable_params / max(1, info.total_params):.3f}%)"]
    lines += setup_lines(getattr(info, "details", None) or {})
    for name, f in (("train", report.train), ("val", report.val)):
        if f is not None:
            tokens = f", {int(f.lengths.sum()):,} tokens" if f.lengths is not None and len(f.lengths) else ""
            lines.append(f"data {name}: {f.path} | {f.rows:,} rows{tokens}")
    if report.val is None:
        lines.append("data val: none (no evaluation; the final adapter is the last checkpoint)")
    epochs = schedule.epoch_plan(cfg, report, processes)
    lines.append(f"plan: {t.max_steps:,} steps{f' ({epochs.describe()})' if epochs else ''} | "
                 f"effective batch {t.batch_size * t.grad_accumulation * processes} "
                 f"(batch {t.batch_size} x accumulation {t.grad_accumulation}"
                 + (f" x {processes} processes, data parallel)" if processes > 1 else ")"))
    lines.append((f"eval every {cfg.eval.every_steps} steps | " if report.val is not None else "")
                 + f"checkpoint every {cfg.checkpoint.every_steps} steps (keep last {cfg.checkpoint.keep_last}"
                 f"{' + best' if cfg.checkpoint.keep_best else ''})")
    lines.append(f"run dir: {run_dir}" + (f" | resuming from step {resumed_from}" if resumed_from is not None else ""))
    return lines


def setup_lines(details: dict) -> list[str]:
    """The backend's setup details that change what a step computes or how much memory it takes, one line each;
    the rest (LoRA layers, optimizer, ...) only go into the start/resume event (setup_record)."""
    lines = []
    if details.get("quantization"):
        compute = f" | compute {details['compute_dtype']}" if details.get("compute_dtype") else ""
        device = re.sub(r"^Device\((\w+), \d+\)$", r"\1", str(details.get("device") or ""))  # mlx: Device(gpu, 0)
        device = f" | device {device}" if device else ""
        lines.append(f"base model: {'not quantized' if details['quantization'] == 'none' else details['quantization']}"
                     f"{compute}{device}")
    for key, label in (("base_weights", "base weights"), ("loss_head", "loss head"),
                       ("stored_16bit", "16-bit storage")):
        if details.get(key):
            lines.append(f"{label}: {details[key]}")
    lines += [f"note: {value}" for key, value in details.items() if key.endswith("note") and value]
    return lines


def setup_record(details: dict) -> dict:
    """All the setup details as metrics.jsonl holds them (JSON values; anything else as its text)."""
    return json.loads(json.dumps(details, default=str))


def checkpoint_note(step: int | None) -> str:
    if step is None:
        return "no checkpoint was committed yet, so there is nothing to resume from"
    return f"the last committed checkpoint (step {step}) is intact; continue with: overnight train ... --auto-resume"


def stopped_during_setup_note(signal_name: str, run_dir: Path | None) -> str:
    """A signal before training started: nothing was trained, and what the run directory holds (read-only)."""
    said = f"stopped by {signal_name} before training started; nothing was trained or saved"
    if run_dir is None or not (run_dir / "checkpoints").is_dir():
        return f"{said}, and no checkpoint exists yet: the same command starts the run again"
    return f"{said}; {crash_note(run_dir)}"


def crash_note(run_dir: Path) -> str:
    """For a crash: read the disk (read-only) rather than trust memory, since the crash may be anywhere."""
    try:
        found = CheckpointManager(run_dir, log=lambda m: None).latest_valid(read_only=True)
    except Exception:  # noqa: BLE001 (a message about a crash must not crash)
        return "the checkpoints could not be read; see overnight checkpoints RUN_DIR"
    return checkpoint_note(found.step if found else None)
