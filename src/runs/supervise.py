"""Supervision of an unattended single-process `overnight train` (`--auto-resume`, or no terminal on stdin): the
command trains in a child process and starts it again with `--auto-resume` when it dies of a crash (a signal such
as SIGKILL from the OOM killer, SIGSEGV / SIGABRT from a framework, or exit 1 from an unexpected error), up to
train.max_restarts times. A child that dies twice in a row during the same optimizer step is started again with that
step's micro-batch split doubled (the in-process out-of-memory split, recorded the same way): a Metal
out-of-memory aborts the process from C++, so the in-process fallback never gets to run.

The `--devices` supervisor (overnight.runs.launch) is the model: the child runs in a session of its own, so a
Ctrl-C reaches this process only and is passed on once (two would abort the child without a save)."""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from overnight.distributed import launcher
from overnight.integrations.notify import Notifier
from overnight.runs.checkpoint import CheckpointManager
from overnight.runs.rundir import RunFiles
from overnight.train.progress import STDERR_IS_TERMINAL_ENV

# Unset: this process may supervise. "PID:FD": this process is the training child of supervisor PID, which reads
# its stderr from the pipe whose reading end is FD here too (see become_child). "off": never
# supervise (the test suite sets it for the tests that kill the trainer themselves and expect it to stay dead).
SUPERVISOR_ENV = "OVERNIGHT_SUPERVISOR"
# "STEP:SPLITS": the child starts optimizer step STEP with the micro-batch split SPLITS ways. An environment variable
# rather than a file in the run directory: it belongs to exactly one launch, so it cannot outlive the supervisor and
# surprise a later `--auto-resume` typed by hand (which, once that step is checkpointed, restores the split anyway).
SPLIT_ENV = "OVERNIGHT_SPLIT_AT_STEP"
NEVER_RESTARTED = frozenset({0, 2, 3, 130, 143})  # success, the user's mistake or refusal, asked to stop (SPEC §3)
CRASH_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL,
                           signal.SIGFPE})
PARENT_POLL_S = 0.2
RESTART_DELAY_S = 1.0  # a moment for the memory of the dead child to be given back before the next one loads
STDERR_TAIL_LINES = 20


def should_supervise(args, max_restarts: int, environ: Mapping[str, str] = os.environ, stdin=None) -> bool:
    """A plain single-process run nobody is watching: --auto-resume given, or stdin not a terminal."""
    if environ.get(SUPERVISOR_ENV) or max_restarts < 1:
        return False
    if (getattr(args, "devices", None) or 1) > 1 or launcher(environ):
        return False  # a --devices job has its own supervisor; a rank never supervises
    if getattr(args, "auto_resume", False):
        return True
    stdin = sys.stdin if stdin is None else stdin
    try:
        return not stdin.isatty()
    except (AttributeError, ValueError, OSError):
        return True  # no usable stdin at all: nobody can answer a question either


def relaunch_argv(argv: list[str]) -> list[str]:
    """The child's arguments after its first death: the same run, continued (--auto-resume), never started over or
    sent back to a chosen checkpoint again."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--resume-from", "--before-step"):
            skip = True
        elif arg == "--fresh" or arg.startswith(("--resume-from=", "--before-step=")):
            continue
        else:
            out.append(arg)
    return out if "--auto-resume" in out else [*out, "--auto-resume"]


def forced_split(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """(step, micro_splits) the supervisor asked this child to use from that step on, or None."""
    raw = environ.get(SPLIT_ENV, "")
    step, _, splits = raw.partition(":")
    if not (step.isdigit() and splits.isdigit()):
        return None
    return int(step), int(splits)


def become_child(environ: Mapping[str, str] = os.environ) -> None:
    """In the supervised child, first thing: end with the supervisor. Its stderr is a pipe the supervisor reads, and
    a write to it after the supervisor died would crash the child mid-save (BrokenPipeError), so this is a watcher
    rather than the parent-death signal (which would race it; macOS has none anyway): the child also holds the
    pipe's reading end, so the pipe stays whole, and once the supervisor is gone the watcher points stderr at
    /dev/null and sends the child a SIGTERM: it saves at the end of its step (exit 143) and frees the lock."""
    supervisor, _, pipe = environ.get(SUPERVISOR_ENV, "").partition(":")
    if not supervisor.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(supervisor):
            time.sleep(PARENT_POLL_S)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        if pipe.isdigit():
            try:  # a write blocked on a full pipe gets its room back
                os.set_blocking(int(pipe), False)
                while os.read(int(pipe), 65536):
                    pass
            except OSError:
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="overnight-supervisor-watch", daemon=True).start()


def describe_death(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# How overnight's last word on stderr starts: its own message for a failure a restart would only repeat, or its
# report of a crash (overnight crashed unexpectedly, after the traceback; Python's own header when the exception
# escaped overnight's handler).
_OWN_MESSAGE = ("error: ", "resume refused: ")
_CRASH_REPORT = ("overnight crashed unexpectedly", "Traceback (most recent call last):")


def is_restartable(code: int, stderr_tail: list[str]) -> bool:
    """A crash the user did not cause and did not ask for. An exit 1 whose last message is overnight's own `error:`
    (out of memory at one row, a checkpoint it cannot write, a training breaker, a user's reward function that
    raised) would only say the same again. Whichever of that message and a crash report comes last decides, read
    from the end: what follows either (the message's own lines, indented or not: a user's exception text, a reward's
    frames; a library's line at exit) does not. An exit 1 with neither is a crash overnight never explained."""
    if code < 0:
        return -code in CRASH_SIGNALS
    if code != 1:
        return False
    last = next((line for line in reversed(stderr_tail) if line.startswith(_OWN_MESSAGE + _CRASH_REPORT)), "")
    return not last.startswith(_OWN_MESSAGE)


class _Tee:
    """The child's stderr, passed through as it comes (the user still reads it live) and its last lines kept."""

    def __init__(self, stream):
        self.lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        # The last line that decides restartability (is_restartable), kept even once the tail has moved past it: an
        # error message followed by more than STDERR_TAIL_LINES lines of its own must not read as an unexplained crash.
        self._last_word: str | None = None
        self._partial = b""
        self._thread = threading.Thread(target=self._pump, args=(stream,), name="overnight-stderr-tee", daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        out = getattr(sys.stderr, "buffer", None)
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            try:
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stderr.write(chunk.decode(errors="replace"))
                    sys.stderr.flush()
            except (OSError, ValueError):
                pass  # nobody reads our stderr any more: keep the tail for the record
            pieces = (self._partial + chunk).replace(b"\r", b"\n").split(b"\n")
            self._partial = pieces.pop()[-4096:]
            self._keep(p.decode(errors="replace") for p in pieces if p.strip())
        if self._partial.strip():
            self._keep([self._partial.decode(errors="replace")])

    def _keep(self, lines) -> None:
        for line in lines:
            self.lines.append(line)
            if line.startswith(_OWN_MESSAGE + _CRASH_REPORT):
                self._last_word = line

    def tail(self) -> list[str]:
        """The last lines, with the deciding line first when it has scrolled out of them (it came before them)."""
        self._thread.join(5.0)
        lines = list(self.lines)
        if self._last_word is not None and self._last_word not in lines:
            lines.insert(0, self._last_word)
        return lines


def supervise_train(argv: list[str], run_dir: Path, max_restarts: int, webhook_url: str | None,
                    say_error=None, delay_s: float = RESTART_DELAY_S) -> int:
    """Run `overnight train ARGV` as a child until it ends by itself; return its exit code (SPEC §3)."""
    say_error = say_error or (lambda message: print(message, file=sys.stderr, flush=True))
    received: list[int] = []
    child: list[subprocess.Popen] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        if child and child[0].poll() is None:
            try:
                child[0].send_signal(signum)
            except OSError:
                pass

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    deaths: list[dict] = []
    env = _child_env()
    args = list(argv)
    try:
        while True:
            code, tail = _run_child(args, env, child)
            if received:  # the user or the platform asked to stop: the child saved and said so
                return code if code >= 0 else 128 + received[0]
            if code in NEVER_RESTARTED or not is_restartable(code, tail):
                return code if code >= 0 else 128 - code
            done, under_way, splits = training_step(run_dir, child[0].pid)
            death = {"cause": describe_death(code), "during_step": under_way,
                     "micro_splits": splits, **({"signal": signal.Signals(-code).name} if code < 0
                                               else {"exit_code": code})}
            deaths.append(death)
            if len(deaths) > max_restarts:
                _give_up(run_dir, webhook_url, deaths, max_restarts, done, tail, say_error)
                return 1
            split = repeated_step_split(deaths, under_way, splits)
            if split:
                env[SPLIT_ENV] = f"{split[0]}:{split[1]}"
            else:
                env.pop(SPLIT_ENV, None)
            _record(run_dir, webhook_url, "restart", done or 0,
                    {**death, "restart": len(deaths), "max_restarts": max_restarts, "stderr_tail": tail,
                     **({"split_at_step": split[0], "new_micro_splits": split[1]} if split else {})})
            say_error(f"overnight: the trainer died ({death['cause']}) during step {under_way or '?'}; starting it "
                      f"again with --auto-resume (restart {len(deaths)} of {max_restarts})"
                      + (f"; it died twice in a row at step {split[0]}, so that step runs with the micro-batch "
                         f"split {split[1]} ways (same effective batch, same data)" if split else ""))
            args = relaunch_argv(args)
            deadline = time.monotonic() + delay_s
            while time.monotonic() < deadline and not received:
                time.sleep(0.05)
            if received:
                return 128 + received[0]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(SPLIT_ENV, None)
    try:  # the progress line keeps redrawing in place through the pipe when the user's stderr is a terminal
        env[STDERR_IS_TERMINAL_ENV] = "1" if sys.stderr.isatty() else "0"
    except (AttributeError, ValueError, OSError):
        env[STDERR_IS_TERMINAL_ENV] = "0"
    return env


def _run_child(args: list[str], env: dict[str, str], child: list[subprocess.Popen]) -> tuple[int, list[str]]:
    """Start `overnight train ARGS` (kept in ``child`` for the signal relay), copy its stderr through, wait: its
    exit code (negative: the signal) and its last stderr lines."""
    read_end, write_end = os.pipe()
    env[SUPERVISOR_ENV] = f"{os.getpid()}:{read_end}"
    try:
        child[:] = [subprocess.Popen([sys.executable, "-m", "overnight", "train", *args], env=env,
                                     stderr=write_end, pass_fds=(read_end,), start_new_session=True)]
    finally:
        os.close(write_end)
    reader = os.fdopen(read_end, "rb", buffering=0)
    tee = _Tee(reader)
    code = _wait(child[0])
    tail = tee.tail()
    reader.close()
    return code, tail


def repeated_step_split(deaths: list[dict], under_way: int | None, splits: int | None) -> tuple[int, int] | None:
    """(step, micro_splits) for the next launch when the last two deaths were during the same step: smaller pieces
    of the same data; None otherwise."""
    if under_way is not None and splits and len(deaths) >= 2 and deaths[-2]["during_step"] == under_way:
        return under_way, splits * 2
    return None


def _give_up(run_dir: Path, webhook_url: str | None, deaths: list[dict], max_restarts: int, done: int | None,
             tail: list[str], say_error) -> None:
    """Restarts used up: recorded (event, webhook, a failed heartbeat) and said, naming the last causes."""
    death = deaths[-1]
    causes = "; ".join(f"{d['cause']} during step {d['during_step'] or '?'}" for d in deaths[-3:])
    _record(run_dir, webhook_url, "restarts_exhausted", done or 0,
            {**death, "restarts": max_restarts, "stderr_tail": tail})
    try:
        RunFiles(run_dir, warn=lambda message: None).heartbeat(
            done or 0, "failed", reason=f"{death['cause']}; restarts exhausted")
    except Exception:  # noqa: BLE001 (non-critical)
        pass
    say_error(f"overnight: the trainer died {len(deaths)} times and train.max_restarts is {max_restarts}, so it is "
              f"not started again (last: {causes}). The messages above say what it printed; "
              f"{_checkpoint_note(run_dir)}")


def _wait(process: subprocess.Popen) -> int:
    while True:
        try:
            return process.wait()
        except InterruptedError:
            continue


def training_step(run_dir: Path, pid: int) -> tuple[int | None, int | None, int | None]:
    """(steps done, the step under way, its micro_splits) from heartbeat.json; None where it does not say, and all
    None when process ``pid`` did not write it (it died while loading: an older child's step would be no clue)."""
    try:
        beat = json.loads((Path(run_dir) / "heartbeat.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None, None
    if not isinstance(beat, dict) or beat.get("pid") != pid:
        return None, None, None

    def number(key: str) -> int | None:
        value = beat.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return number("step"), number("training_step"), number("micro_splits")


def _record(run_dir: Path, webhook_url: str | None, kind: str, step: int, fields: dict) -> None:
    """metrics.jsonl and the webhook; non-critical, like every record (SPEC §8)."""
    try:
        if Path(run_dir).is_dir():
            RunFiles(run_dir, warn=lambda message: None).event(kind, step, **fields)
    except Exception:  # noqa: BLE001
        pass
    notify = Notifier(webhook_url)
    notify(kind, **{**fields, "run_dir": str(run_dir), "step": step,
                    "stderr_tail": "\n".join(fields.get("stderr_tail", [])[-5:])})
    notify.close()


def _checkpoint_note(run_dir: Path) -> str:
    try:
        found = CheckpointManager(run_dir, log=lambda m: None).latest_valid(read_only=True)
    except Exception:  # noqa: BLE001 (a message about a crash must not crash)
        return "the checkpoints could not be read; see overnight checkpoints RUN_DIR"
    if found is None:
        return "no checkpoint was committed yet"
    return (f"the last committed checkpoint (step {found.step}) is intact; continue with: overnight train ... "
            "--auto-resume")


__all__ = ["SPLIT_ENV", "SUPERVISOR_ENV", "become_child", "forced_split", "relaunch_argv",
           "should_supervise", "supervise_train"]
