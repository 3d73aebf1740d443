"""`overnight report RUN_DIR [--output FILE.png]`: the run's curves as one PNG and a short text summary.

Read-only and safe on a run that is still training: it reads the metrics.jsonl that is there (a half-written
last line is skipped). After a resume, the steps after the checkpoint were trained again: a `resume` line
drops what the earlier process recorded past the step it resumed from, so the curves and the summary follow
the timeline that counts (last line per step wins). Lines from older versions (fewer fields, no time, no
`end`) are read with what they have. matplotlib is an optional extra; the summary needs nothing."""
from __future__ import annotations

import importlib
import json
import math
import os
import secrets
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from overnight.errors import EXIT_OK, UsageError

EXTRA_HINT = "pip install 'overnight[report]'"
MEASURED = ("train", "eval", "checkpoint", "oom", "stop", "interrupted")  # dropped past a resume point
MA_STEPS = 50  # the loop's loss_avg window, used for old lines that lack loss_avg


@dataclass
class Timeline:
    train: dict[int, dict] = field(default_factory=dict)
    evals: dict[int, dict] = field(default_factory=dict)
    checkpoints: list[int] = field(default_factory=list)
    ooms: list[tuple[int, int | None]] = field(default_factory=list)
    resumes: list[int] = field(default_factory=list)
    backend_moves: list[tuple[int, str]] = field(default_factory=list)  # (step, backend) of --allow-backend-change
    stop: dict | None = None
    end: dict | None = None
    last: dict | None = None  # the newest line of any kind: how the record ends
    start: dict | None = None
    sessions: list[list[float]] = field(default_factory=list)  # the times of each process's lines
    lines: int = 0
    skipped: int = 0


def _number(value) -> float | None:
    """A metric as a float (NaN and inf included, which metrics.jsonl keeps as strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def read_records(path: Path) -> tuple[list[dict], int]:
    """The well-formed records of metrics.jsonl and how many lines were not (a line cut by a kill, a run
    still writing its last line, a hand edit)."""
    records, skipped = [], 0
    with open(path, "rb") as handle:
        raw = handle.read()
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(record.get("event") if isinstance(record, dict) else None, str) \
                or not isinstance(step, int) or isinstance(step, bool):
            skipped += 1
            continue
        records.append(record)
    return records, skipped


def build_timeline(records: list[dict]) -> Timeline:
    t = Timeline(lines=len(records))
    session: list[float] = []
    for r in records:
        event, step = r["event"], r["step"]
        if event in ("start", "resume") and session:
            t.sessions.append(session)
            session = []
        if _number(r.get("time")) is not None:
            session.append(float(r["time"]))
        if event == "resume":
            # The resumed process trains every step after this one again: what was recorded past it belongs
            # to an abandoned timeline (or is about to be rewritten with the same values).
            at = r.get("from_step", step) if isinstance(r.get("from_step"), int) else step
            t.train = {s: v for s, v in t.train.items() if s <= at}
            t.evals = {s: v for s, v in t.evals.items() if s <= at}
            t.checkpoints = [s for s in t.checkpoints if s <= at]
            t.ooms = [(s, n) for s, n in t.ooms if s <= at]
            t.stop = t.stop if t.stop and t.stop["step"] <= at else None
            t.resumes.append(at)
            t.backend_moves = [m for m in t.backend_moves if m[0] < at]
            if isinstance(r.get("backend_change"), dict) and r["backend_change"].get("to"):
                t.backend_moves.append((at, r["backend_change"]["to"]))
            t.end = None
        elif event == "start":
            t.start = r
        elif event == "train":
            t.train[step] = r
        elif event == "eval":
            t.evals[step] = r
        elif event == "checkpoint":
            if step not in t.checkpoints:
                t.checkpoints.append(step)
        elif event == "oom":
            # Recorded before the loop counts the step it happened in: the line's step is the one before.
            t.ooms.append((step + 1, r.get("micro_splits")))
        elif event == "stop":
            t.stop = r
        elif event == "end":
            t.end = r
        t.last = r
    if session:
        t.sessions.append(session)
    t.checkpoints.sort()
    return t


def best_eval(t: Timeline) -> tuple[int | None, str]:
    """The best step and how it was chosen: the run's own record first, then the eval lines."""
    if t.end and isinstance(t.end.get("best_step"), int):
        return t.end["best_step"], "recorded at the end of the run"
    marked = [s for s, r in t.evals.items() if r.get("best") is True]
    if marked:
        return max(marked), "the newest eval marked best"
    scored = [(v, s) for s, r in t.evals.items() if (v := _number(r.get("score"))) is not None and math.isfinite(v)]
    if scored:
        return min(scored)[1], "the lowest score"
    losses = [(v, s) for s, r in t.evals.items()
              if (v := _number(r.get("val_loss"))) is not None and math.isfinite(v)]
    if losses:
        return min(losses)[1], "the lowest val_loss (this run recorded no score)"
    return None, ""


def _duration(seconds: float) -> str:
    """h:mm:ss, or seconds under a minute: a short run is a few seconds long, not 0:00:00."""
    if seconds < 59.95:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _config_int(run_dir: Path, section: str, key: str) -> int | None:
    try:
        import yaml

        value = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))[section][key]
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    except Exception:  # noqa: BLE001 (a missing or hand-edited config only loses a detail of the summary)
        return None


def _max_steps(run_dir: Path) -> int | None:
    return _config_int(run_dir, "train", "max_steps")


def _fmt(value, digits: int = 4) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.{digits}f}"


def summary(run_dir: Path, t: Timeline) -> list[str]:
    backend = t.start.get("backend") if t.start else None
    backend = backend and backend + "".join(f" -> {to} at step {at}" for at, to in t.backend_moves)
    lines = [f"run: {run_dir}" + (f" (backend {backend})" if backend else "")]
    steps = max([*t.train, *t.evals, *t.checkpoints], default=None)
    max_steps = _max_steps(run_dir)
    lines.append(f"steps: {steps if steps is not None else 'none yet'}"
                 + (f" of {max_steps}" if max_steps else "") + f" ({len(t.train)} train lines, {len(t.evals)} evals, "
                 f"{len(t.checkpoints)} checkpoints)")
    spans = [max(s) - min(s) for s in t.sessions if s]
    timed = [(step, v) for step, r in sorted(t.train.items()) if (v := _number(r.get("elapsed_s"))) is not None]
    training = ""
    if timed:  # the loop's own sum of step times, as of the newest train line (older runs: a report_every step)
        training = f"training steps {_duration(timed[-1][1])}" + (
            f" (to step {timed[-1][0]})" if steps is not None and timed[-1][0] < steps else "")
    if spans:
        wall = f"wall time: {_duration(sum(spans))}" + (f" over {len(spans)} processes" if len(spans) > 1 else "")
        lines.append(wall + (f"; {training}" if training else ""))
    elif training:
        lines.append(f"wall time: not recorded (old format); {training}")
    lines.append(f"resumes: {len(t.resumes)}" + (f" (from step {', '.join(map(str, t.resumes))})" if t.resumes else ""))
    if t.ooms:
        lines.append("out of memory: micro-batch split during step " + ", ".join(
            f"{s}" + (f" (x{n})" if n else "") for s, n in t.ooms))
    rewards = reward_summary(t)
    if rewards:
        lines.append(rewards)
    accuracy = accuracy_summary(t)
    if accuracy:
        lines.append(accuracy)
    lines.append("stop: " + stop_reason(run_dir, t))
    best, how = best_eval(t)
    if best is None:
        lines.append("best: no evaluation recorded")
    else:
        ev = t.evals.get(best, {})
        # grpo's val_loss is -val_reward (so scoring is unchanged): the reward is what its user reads
        parts = ([f"val_reward {_fmt(ev.get('val_reward'))}"] if "val_reward" in ev else []) + [
            f"val_loss {_fmt(ev.get('val_loss'))}" + (" (= -val_reward)" if "val_reward" in ev else "")] + [
            f"{name} {_fmt(ev.get(name))}" for name in ("val_accuracy", "gap", "ppl_ratio", "momentum") if name in ev]
        score = f"score {_fmt(ev.get('score'))} = 0.5 val_loss + 0.3 gap + 0.1 ppl_ratio + 0.1 momentum; " \
            if "score" in ev else ""
        lines.append(f"best: step {best} ({how}): {score}{', '.join(parts)}")
    lines.append("final adapter: " + adapter_source(run_dir, t))
    if t.skipped:
        lines.append(f"note: {t.skipped} line(s) of metrics.jsonl could not be read and were skipped "
                     "(a line cut by a kill, or one still being written)")
    return lines


def stop_reason(run_dir: Path, t: Timeline) -> str:
    if t.end:
        status = t.end.get("status") or "ended"
        return f"{'stopped early' if status == 'stopped' else status} at step {t.end['step']}: {t.end.get('reason')}"
    last = t.last or {}
    if last.get("event") == "interrupted":
        return f"interrupted at step {last['step']} (signal {last.get('signal')}); resume with --auto-resume"
    if last.get("event") == "failed":
        return f"failed at step {last['step']}: {last.get('reason')}"
    if t.stop:  # a run from before the end line
        return f"stopped early at step {t.stop['step']}: {t.stop.get('message') or t.stop.get('reason')}"
    return f"no end recorded: still running, or killed (overnight status {run_dir} tells which)"


def adapter_source(run_dir: Path, t: Timeline) -> str:
    where = run_dir / "adapter"
    if t.end and isinstance(t.end.get("adapter_from"), int):
        source = t.end["adapter_from"]
        return f"{where}, from step {source}" + (" (the best checkpoint)" if source == t.end.get("best_step")
                                                 else " (the newest good checkpoint)")
    if t.end:
        return "none (no checkpoint was left to export)"
    if where.is_dir():
        return f"{where} (its source step was not recorded)"
    return "none yet (the run has not ended)"


# -- the plot ---------------------------------------------------------------------------------------

def _series(records: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for step in sorted(records):
        value = _number(records[step].get(key))
        if value is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def _moving_average(steps: list[int], values: list[float]) -> list[float]:
    """The mean of the finite values recorded in the last MA_STEPS steps, at each recorded step."""
    out, window = [], deque()
    for step, value in zip(steps, values):
        if math.isfinite(value):
            window.append((step, value))
        while window and window[0][0] <= step - MA_STEPS:
            window.popleft()
        out.append(sum(v for _, v in window) / len(window) if window else float("nan"))
    return out


def plot(t: Timeline, output: Path, title: str, eval_every: int | None = None) -> list[str]:
    """Write the PNG; returns the panels left empty, each with why (the summary says so too)."""
    fig, empty = figure(t, title, eval_every)
    _save_png(fig, output)
    return empty


def figure(t: Timeline, title: str, eval_every: int | None = None):
    """(the matplotlib Figure, ["val loss: why it is empty", ...])."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state; Agg renders the PNG

    best, _ = best_eval(t)
    fig = Figure(figsize=(13, 10), dpi=100)
    axes = fig.subplots(3, 2, sharex=True).ravel()
    empty = []
    for ax, (name, lines) in zip(axes, _panels(t)):
        if not any(xs for xs, _, _ in lines):
            why = _why_empty(name, t, eval_every)
            _empty_panel(ax, name, why)
            empty.append(f"{name}: {why}")
            continue
        _draw_panel(ax, name, lines)
        _mark_events(ax, t, best)
    if best is not None and best in t.evals and _number(t.evals[best].get("val_loss")) is not None:
        axes[1].plot([best], [_number(t.evals[best]["val_loss"])], marker="*", ms=14, color="tab:green", ls="")
    for ax in axes[-2:]:
        ax.set_xlabel("step")
    fig.legend(handles=_marker_legend(best), loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return fig, empty


def _panels(t: Timeline) -> list:
    """(title, [(steps, values, line style), ...]) for each of the six panels, in reading order. A grpo run's
    first panel is its reward (its objective is ~0 by construction, so its train loss says nothing)."""
    steps, loss = _series(t.train, "loss")
    ma_steps, ma = _series(t.train, "loss_avg")
    if len(ma_steps) < len(steps):  # lines from before loss_avg was recorded
        ma_steps, ma = steps, _moving_average(steps, loss)
    first = ("train loss", [(steps, loss, dict(lw=0.8, alpha=0.45, label="loss")),
                            (ma_steps, ma, dict(lw=1.8, label=f"moving average ({MA_STEPS} steps)"))])
    if is_reward_run(t):
        first = ("reward", _reward_lines(t))
    return [
        first,
        _val_panel(t),
        ("learning rate", [(*_series(t.train, "lr"), dict())]),
        ("grad norm", [(*_series(t.train, "grad_norm"), dict(lw=0.8))]),
        ("memory (MB)", [(*_series(t.train, "memory_mb"), dict())]),
        ("tokens/s", [(*_series(t.train, "tokens_per_sec"), dict(lw=0.8))]),
    ]


def _val_panel(t: Timeline) -> tuple:
    val_loss = (*_series(t.evals, "val_loss"), dict(marker="o", ms=3, label="val_loss"))
    accuracy = _series(t.evals, "val_accuracy")
    if not accuracy[0]:
        return "val loss", [val_loss]
    # a reward model's evals (--method reward): its pairwise accuracy beside its loss, both on a 0..1-ish scale
    return "val loss & pairwise accuracy", [val_loss, (*accuracy, dict(marker="s", ms=3, label="val_accuracy"))]


def is_reward_run(t: Timeline) -> bool:
    """A run whose train lines carry a reward (grpo)."""
    return any("reward" in r for r in t.train.values())


def _reward_lines(t: Timeline) -> list:
    """The step's mean reward, its moving average (the loop tracks -reward as a grpo run's loss, so loss_avg is
    -(average reward)), each reward's own mean when there are several, and the evals' greedy val_reward."""
    steps, reward = _series(t.train, "reward")
    ma_steps, ma = _series(t.train, "loss_avg")
    ma = [-v for v in ma]
    if len(ma_steps) < len(steps):
        ma_steps, ma = steps, _moving_average(steps, reward)
    lines = [(steps, reward, dict(lw=0.8, alpha=0.45, label="reward")),
             (ma_steps, ma, dict(lw=1.8, label=f"moving average ({MA_STEPS} steps)"))]
    names = sorted({k for r in t.train.values() for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    if len(names) > 1:
        lines += [(*_series(t.train, k), dict(lw=0.8, ls="--", label=k[len("rewards/"):-len("/mean")]))
                  for k in names]
    lines.append((*_series(t.evals, "val_reward"), dict(marker="o", ms=4, ls="", label="val_reward (greedy)")))
    return lines


def reward_summary(t: Timeline) -> str | None:
    """'reward: 0.12 over the first 5 steps -> 0.80 over the last 5 ...' for a grpo run, else None."""
    steps, reward = _series(t.train, "reward")
    if not steps:
        return None
    n = max(1, min(5, len(reward) // 2))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    line = (f"reward: {mean(reward[:n]):.4f} (mean of the first {n} train lines) -> {mean(reward[-n:]):.4f} (the "
            f"last {n}, to step {steps[-1]})")
    _, val = _series(t.evals, "val_reward")
    return line + (f"; val_reward {val[0]:.4f} -> {val[-1]:.4f} over {len(val)} evals" if val else "")


def accuracy_summary(t: Timeline) -> str | None:
    """'val_accuracy: 0.5000 (step 2) -> 0.9375 (step 250) over 3 evals; best 0.9375 at step 250' for a reward model
    run (its evals' pairwise accuracy), else None."""
    steps, accuracy = _series(t.evals, "val_accuracy")
    if not steps:
        return None
    top = max(range(len(accuracy)), key=lambda i: (accuracy[i], -steps[i]))
    return (f"val_accuracy: {accuracy[0]:.4f} (step {steps[0]}) -> {accuracy[-1]:.4f} (step {steps[-1]}) over "
            f"{len(steps)} evals; highest {accuracy[top]:.4f} at step {steps[top]}")


def _why_empty(name: str, t: Timeline, eval_every: int | None) -> str:
    if name == "val loss":
        if t.end and t.end.get("status") == "completed":  # with validation on, the last step is always evaluated
            return "no eval recorded: the run had no validation file (val.jsonl)"
        due = f" (every {eval_every} steps and at the end)" if eval_every else ""
        return f"no eval recorded yet{due}, or the run has no validation file"
    if not t.train:
        return "no train step recorded yet"
    return "not in this run's train lines (written by an older version)"


def _empty_panel(ax, name: str, why: str) -> None:
    """A panel with nothing to draw shows why instead of empty axes with made-up ranges."""
    ax.set_title(name, fontsize=10)
    ax.set_axis_off()
    ax.text(0.5, 0.5, why.replace(": ", ":\n", 1), ha="center", va="center", transform=ax.transAxes,
            color="grey", wrap=True)


SPARSE = 30  # up to this many points a line also marks each one: a run of a few steps is a few dots


def _draw_panel(ax, name: str, lines: list) -> None:
    ax.set_title(name, fontsize=10)
    ax.grid(True, alpha=0.3)
    drawn = False
    for xs, ys, style in lines:
        if xs:
            if len(xs) <= SPARSE and "marker" not in style:  # a single point has no line to see
                style = {**style, "marker": "o", "ms": 3}
            ax.plot(xs, ys, **style)
            drawn = True
    if drawn and name == "grad norm":
        finite = [v for v in lines[0][1] if math.isfinite(v) and v > 0]
        if finite and max(finite) / min(finite) > 100:  # one spike would flatten the rest
            ax.set_yscale("log")
    if drawn and (name in ("train loss", "reward") or len([xs for xs, _, _ in lines if xs]) > 1):
        ax.legend(fontsize=8, loc="upper right" if name == "train loss" else "lower right")


def _mark_events(ax, t: Timeline, best: int | None) -> None:
    """Vertical lines at checkpoints, resumes, out-of-memory splits, the best checkpoint and the stop."""
    for s in t.checkpoints:
        ax.axvline(s, color="grey", ls=":", lw=0.8)
    for s in t.resumes:
        ax.axvline(s, color="tab:blue", ls="--", lw=1.2)
    for s, _ in t.ooms:
        ax.axvline(s, color="tab:orange", ls="-.", lw=1.2)
    if best is not None:
        ax.axvline(best, color="tab:green", lw=1.5, alpha=0.7)
    end_step = (t.end or {}).get("step") if (t.end or {}).get("status") == "stopped" else None
    stop_step = t.stop["step"] if t.stop else end_step
    if stop_step is not None:
        ax.axvline(stop_step, color="tab:red", lw=1.5)


def _marker_legend(best: int | None) -> list:
    """The figure's legend for the vertical markers _mark_events draws (the panels' lines have their own)."""
    from matplotlib.lines import Line2D

    return [Line2D([], [], color="grey", ls=":", label="checkpoint"),
            Line2D([], [], color="tab:green", lw=1.5, label=f"best (step {best})" if best is not None else "best"),
            Line2D([], [], color="tab:blue", ls="--", label="resume"),
            Line2D([], [], color="tab:orange", ls="-.", label="out of memory: micro-batch split"),
            Line2D([], [], color="tab:red", lw=1.5, label="early stop")]


def _save_png(fig, output: Path) -> None:
    # Written beside the target and renamed: an image viewer (or a second report) never sees half a PNG.
    tmp = output.with_name(f".{output.name}.tmp-{secrets.token_hex(4)}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()


def report_main(run_dir_arg: str, output_arg: str | None, say: Callable[[str], None] = print) -> int:
    run_dir = Path(run_dir_arg)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a run directory (no such folder)")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"{run_dir} has no metrics.jsonl: nothing to report (is it a run directory, and has the "
                         "run started?)")
    try:
        records, skipped = read_records(metrics)
    except OSError as exc:
        raise UsageError(f"{metrics} cannot be read ({exc.strerror or exc})") from None
    if not records:
        raise UsageError(f"{metrics} holds no metrics yet" + (f" ({skipped} unreadable line(s))" if skipped else "")
                         + ": nothing to report")
    timeline = build_timeline(records)
    timeline.skipped = skipped
    for line in summary(run_dir, timeline):
        say(line)
    output = Path(output_arg) if output_arg else run_dir / "report.png"
    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {output.parent} does not exist")
    try:
        # Imported, not just looked up: a broken install is refused here, not halfway through the plot.
        importlib.import_module("matplotlib")
    except ImportError:
        raise UsageError(f"the plot needs matplotlib, an optional extra: {EXTRA_HINT} "
                         "(the summary above needs nothing)") from None
    try:
        empty = plot(timeline, output, f"overnight report: {run_dir.resolve().name}",
                     _config_int(run_dir, "eval", "every_steps"))
    except OSError as exc:
        raise UsageError(f"cannot write {output} ({exc.strerror or exc}); choose another place with "
                         "--output FILE.png") from None
    say(f"plot: {output}")
    for panel in empty:
        say(f"  empty panel, {panel}")
    return EXIT_OK
