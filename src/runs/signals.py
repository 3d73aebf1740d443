"""SIGTERM / SIGINT during a run (SPEC §7): the first sets a flag the loop reads after each step (it finishes the
step, commits a checkpoint and exits 143 / 130); a second aborts at once without saving. Before the loop takes the
signals over (imports, the data check, loading the model), either one ends the setup at once, and says so."""
from __future__ import annotations

import signal
import time

from overnight.runs.console import is_quiet, stderr_now


class SignalFlag:
    """Called, it returns the pending exit code (128 + signal) or None. A second signal aborts at once without
    saving: ``on_abort(code)`` records it and ends the process with os._exit, so no exception can surface half-way
    through a save or an atexit handler."""

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
        if is_quiet():
            return
        stderr_now(f"\nreceived {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                   "(send it again to abort without saving)")

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)


class StoppedDuringSetup(BaseException):
    """A SIGTERM or SIGINT before training started. A BaseException, like KeyboardInterrupt, so that no ``except
    Exception`` on the way (a library loading the model, the crash handler) takes it for a failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.code = 128 + signum


def stop_setup_on_signals() -> None:
    """Until SignalFlag.install: SIGTERM's default would end the process with 143 and not a word (a spot pod's
    preemption, `kill`, a scheduler), so both signals raise StoppedDuringSetup where the setup is, and the command
    says what state the run directory is in. A second signal while that unwinds ends the process at once."""
    def stop(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        raise StoppedDuringSetup(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
