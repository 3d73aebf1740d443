"""The machines runs happen on (SPEC §8): a RunPod pod, whose container disk dies with a preempted spot
instance, and a Mac, which may go to sleep in the middle of the night. Both non-critical: a warning, never
a refusal; a missing `caffeinate` is warned about once and the run goes on."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping

PERSISTENT_VOLUME = Path("/workspace")  # RunPod's volume disk: it outlives the pod's container disk


def runpod_warning(run_dir: Path, env: Mapping[str, str] | None = None,
                   volume: Path = PERSISTENT_VOLUME) -> str | None:
    """A warning when this is a RunPod pod and the run directory is off the persistent volume, else None.
    Symlinks are resolved on both sides: a path that only looks like /workspace (a link to the container
    disk) is not safe, and a link into the volume is."""
    env = os.environ if env is None else env
    pod = env.get("RUNPOD_POD_ID")
    if not pod:
        return None
    where = Path(run_dir).expanduser().resolve()
    safe = Path(volume).resolve()
    if where == safe or safe in where.parents:
        return None
    return (f"warning: this is a RunPod pod ({pod}) and the run directory {where} is not on the persistent volume "
            f"{volume}: a spot pod's container disk is lost when it is preempted, and the checkpoints with it. "
            f"Put output.dir under {volume} (e.g. --output {volume}/runs/{where.name or 'overnight'})")


class KeepAwake:
    """On macOS, `caffeinate -i -w <our pid>` for the run: no idle sleep while it trains. caffeinate exits by
    itself when our process does (-w), so even a SIGKILL leaves nothing behind; stop() ends it at once."""

    def __init__(self, enabled: bool = True, warn: Callable[[str], None] = print, platform: str | None = None,
                 pid: int | None = None, command: str = "caffeinate"):
        self.enabled = enabled
        self.platform = sys.platform if platform is None else platform
        self.pid = os.getpid() if pid is None else pid
        self.command = command
        self._warn = warn
        self.process: subprocess.Popen | None = None

    def start(self) -> bool:
        if not self.enabled or self.platform != "darwin":
            return False
        argv = [self.command, "-i", "-w", str(self.pid)]
        try:
            # Its own session: a Ctrl-C at the terminal (which also reaches the whole foreground group) must
            # not end it while the run is still saving its last checkpoint.
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            self._warn(f"warning: could not keep the Mac awake ({self.command}: {reason}); it may sleep "
                       "during the run (System Settings > Energy, or run under `caffeinate -i`); training goes on")
            return False
        return True

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            process.terminate()
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        except OSError:
            pass
