"""TensorBoard and Weights & Biases (config section `report`): every metrics.jsonl record is also handed to
the sinks that are on, from one place (RunFiles.event), so the loop never knows they exist.

Non-critical (SPEC §8): a sink that cannot start or fails later is warned about once and dropped; training
goes on. The libraries are imported only when a sink is on, and never drag an ML framework into the core:
tensorboardX imports torch whenever it can, only to accept tensors, and overnight logs plain floats.

After a resume, the steps after the checkpoint are trained again. TensorBoard is told to purge what an
earlier process wrote from the first re-done step on (purge_step), so its curves match metrics.jsonl's
"last line per step wins". W&B's step only moves forward, so re-done steps below the last one already
logged are not sent again (an exact resume gives the same values); the W&B run id is kept in the
checkpoint's loop state so the resumed process continues the same W&B run."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from overnight.integrations.notify import safe_url

# Events that mark the run's life rather than measure it: text in TensorBoard, summary fields in W&B.
LIFECYCLE = ("start", "resume", "checkpoint", "stop", "interrupted", "end", "failed")
EXTRA_HINT = "pip install 'overnight[report]'"


def scalars(record: dict) -> dict[str, float]:
    """The numeric fields of a measuring event as `event/field` (train/loss, eval/val_loss, oom/micro_splits,
    and whatever a later event adds, e.g. reward statistics). Non-finite values, which metrics.jsonl keeps
    as strings, come back as floats so a NaN loss shows in the charts."""
    event = record.get("event")
    if event in LIFECYCLE:
        return {}
    out = {}
    for key, value in record.items():
        if key in ("event", "step", "time") or isinstance(value, bool):
            continue
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
            value = float(value)
        if isinstance(value, (int, float)):
            out[f"{event}/{key}"] = float(value)
    return out


def describe(record: dict) -> str:
    """One line for a lifecycle event (TensorBoard text)."""
    fields = {k: v for k, v in record.items() if k not in ("event", "step", "time") and v is not None}
    return f"{record.get('event')} at step {record.get('step')}" + (
        ": " + ", ".join(f"{k}={v}" for k, v in fields.items()) if fields else "")


def import_tensorboardx():
    """tensorboardX's SummaryWriter without importing torch into a process that has not imported it (an mlx
    run, `overnight report`): its writer module does `try: import torch` only to accept torch tensors."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardSink:
    name = "TensorBoard"

    def __init__(self, log_dir: Path, purge_step: int | None):
        writer_class = import_tensorboardx()
        # flush_secs: a running run shows up in TensorBoard within half a minute.
        self.writer = writer_class(logdir=str(log_dir), purge_step=purge_step, flush_secs=30)

    def event(self, record: dict) -> None:
        step, event = record["step"], record["event"]
        walltime = record.get("time")
        if event in LIFECYCLE and event != "checkpoint":
            self.writer.add_text(f"run/{event}", describe(record), step, walltime=walltime)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step, walltime=walltime)
        if event in ("eval", "checkpoint", "stop", "end", "interrupted", "failed"):
            self.writer.flush()

    def state(self) -> dict:
        return {}

    def close(self, exit_code: int) -> None:
        self.writer.close()


def tracked_config(cfg) -> dict:
    """The config as W&B stores and shares it: the webhook URL is a credential (its path or query is the token),
    so only its scheme and host go along."""
    data = cfg.to_dict()
    notify = data.get("notify")
    if isinstance(notify, dict) and notify.get("webhook_url"):
        data["notify"] = {**notify, "webhook_url": safe_url(notify["webhook_url"])}
    return data


class WandbSink:
    name = "W&B"

    def __init__(self, cfg, run_dir: Path, run_id: str | None, skip_below: int):
        import wandb

        r = cfg.report
        url = cfg.notify.webhook_url
        if url:
            # W&B records sys.argv (at init, and again when it builds its job at finish), and a webhook URL given
            # as `--set notify.webhook_url=...` would go along with its token. The command line was parsed long
            # before; nothing in this process reads sys.argv again.
            sys.argv = [a.replace(url, safe_url(url)) for a in sys.argv]
        # console "off": the terminal (the progress line, its carriage returns) stays overnight's own.
        settings = wandb.Settings(console="off")
        self.run = wandb.init(project=r.wandb_project or None, entity=r.wandb_entity or None,
                              name=Path(run_dir).resolve().name, dir=str(run_dir), id=run_id,
                              resume="allow" if run_id else None, settings=settings)
        # Not passed to init: on a resume with a changed value (a larger max_steps) init would refuse it.
        self.run.config.update(tracked_config(cfg), allow_val_change=True)
        self.skip_below = skip_below

    def event(self, record: dict) -> None:
        step, event = record["step"], record["event"]
        if event == "end":
            self.run.summary.update({k: v for k, v in record.items() if k not in ("event", "time")})
        elif event in ("stop", "failed", "interrupted"):
            self.run.summary.update({f"{event}_{k}": v for k, v in record.items() if k not in ("event", "time")})
        data = scalars(record)
        if data and step >= self.skip_below:
            self.run.log(data, step=step)

    def state(self) -> dict:
        return {"wandb_run_id": self.run.id}

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


class Reporter:
    """The sinks that are on, fed one record at a time. A sink that raises is warned about once and dropped."""

    def __init__(self, sinks: list, warn: Callable[[str], None] = print):
        self.sinks = list(sinks)
        self._warn = warn
        self._wandb_run_id: str | None = None

    def _drop(self, sink, exc: BaseException, when: str) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)
        self._warn(f"warning: {sink.name} reporting failed {when} ({exc.__class__.__name__}: {str(exc)[:200]}); "
                   "it is off for the rest of this run, training goes on")

    def event(self, record: dict) -> None:
        for sink in list(self.sinks):
            try:
                sink.event(record)
            except Exception as exc:  # noqa: BLE001 (non-critical by contract)
                self._drop(sink, exc, f"at step {record.get('step')}")

    def state(self) -> dict:
        """What a resumed process needs to continue the same reports (kept in the checkpoint's loop state)."""
        state = {"wandb_run_id": self._wandb_run_id} if self._wandb_run_id else {}
        for sink in self.sinks:
            try:
                state.update(sink.state())
            except Exception:  # noqa: BLE001
                pass
        return state

    def close(self, exit_code: int = 0) -> None:
        for sink in list(self.sinks):
            try:
                sink.close(exit_code)
            except Exception as exc:  # noqa: BLE001
                self._drop(sink, exc, "while closing")
        self.sinks = []


def open_reporter(cfg, run_dir: Path, resume_state: dict | None, warn: Callable[[str], None] = print,
                  say: Callable[[str], None] = print, last_logged_step: Callable[[], int] = lambda: 0) -> Reporter:
    """Start the sinks the config turns on. Call before the run's start/resume event is written.
    ``last_logged_step``: the highest step metrics.jsonl holds (W&B steps only move forward, so a resumed run's
    first W&B step comes after it)."""
    run_dir = Path(run_dir)
    sinks = []
    saved = (resume_state or {}).get("report") or {}
    resumed_step = resume_state["step"] if resume_state else None
    reporter = Reporter([], warn)
    if cfg.report.tensorboard:
        try:
            # The resumed process re-does every step after the checkpoint: purge what an earlier process wrote
            # from there on. (Its owed eval at the checkpoint's own step was never written, so nothing clashes.)
            sinks.append(TensorBoardSink(run_dir / "tb", resumed_step + 1 if resumed_step is not None else None))
            say(f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}")
        except ImportError:
            warn(f"warning: report.tensorboard is on but tensorboardX is not installed ({EXTRA_HINT}); "
                 "training goes on without TensorBoard")
        except Exception as exc:  # noqa: BLE001
            warn(f"warning: TensorBoard could not start ({exc.__class__.__name__}: {str(exc)[:200]}); "
                 "training goes on without it")
    if cfg.report.wandb:
        run_id = saved.get("wandb_run_id")
        reporter._wandb_run_id = run_id  # kept in later checkpoints even if W&B fails to start this time
        try:
            sink = WandbSink(cfg, run_dir, run_id, last_logged_step() if resume_state else 0)
            sinks.append(sink)
            reporter._wandb_run_id = sink.run.id
            say(f"W&B: run {sink.run.id}" + (" (continued)" if run_id else "")
                + (f" {sink.run.url}" if getattr(sink.run, "url", None) else f" ({sink.run.dir})"))
        except ImportError:
            warn(f"warning: report.wandb is on but wandb is not installed ({EXTRA_HINT}); "
                 "training goes on without W&B")
        except Exception as exc:  # noqa: BLE001
            warn(f"warning: W&B could not start ({exc.__class__.__name__}: {str(exc)[:200]}); training goes on "
                 "without it (for no network: WANDB_MODE=offline, then `wandb sync` later)")
    reporter.sinks = sinks
    return reporter
