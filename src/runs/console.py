"""What a run prints for the person reading its log. In a data-parallel job rank 0 speaks for the job; the other
ranks stay quiet (their failures still reach stderr)."""
from __future__ import annotations

import os
import sys

_QUIET: list[bool] = []  # set in the processes of a data-parallel job other than rank 0: one voice per job


def quiet_this_process() -> None:
    _QUIET.append(True)


def is_quiet() -> bool:
    return bool(_QUIET)


def say(message: str) -> None:
    """Print for the person reading the log. Console output is non-critical (SPEC §8): when stdout's reader
    went away (`overnight ... | head`, a closed terminal), the rest goes to /dev/null and the work goes on."""
    if _QUIET:
        return
    try:
        print(message, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def stderr_now(message: str) -> None:
    """A line on stderr that is safe to write from a signal handler: os.write, not print, which can hit a
    half-written buffer there ("reentrant call inside <_io.BufferedWriter>")."""
    os.write(2, (message + "\n").encode(errors="replace"))
