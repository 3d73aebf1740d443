"""`overnight train --devices N` (SPEC §12): run the backend's launcher (torchrun, mlx.launch) with N ranks of
`overnight train` as a supervised child, relay the user's signals to every rank, and exit with the job's code
(SPEC §3). A rank notes its pid and exit code in a job folder (note_rank_started / note_rank_exit, called by
`python -m overnight`)."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Mapping

from overnight.distributed import env_rank, launcher
from overnight.errors import UsageError
from overnight.runs import lock


def free_ports(count: int, attempts: int = 200) -> int:
    """A first port such that it and the next ``count - 1`` are free now: mlx.launch's ring listens on
    --starting-port + rank, so every one of them must be, not only the first. Drawn below the kernel's ephemeral
    range, where the outgoing connections of every other program on the machine take their ports; a port inside
    it can be taken between this probe and the rank's bind."""
    import random

    low = _ephemeral_low()
    for _ in range(attempts):
        first = random.randint(max(1024, low - 12000), low - count - 1)
        probes = []
        try:
            for port in range(first, first + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise UsageError(f"--devices {count}: found no {count} free consecutive ports on this machine for mlx.launch")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as source:
            return int(source.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS's range starts at 49152


def _torchrun(devices: int, train_args: list[str]) -> list[str]:
    """torchrun: one process per GPU (NCCL; gloo on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
            "-m", "overnight", "train", *train_args]


def _mlx_launch(devices: int, train_args: list[str]) -> list[str]:
    """mlx.launch's ring backend on this machine."""
    mlx_launch = shutil.which("mlx.launch") or os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    return [mlx_launch, "-n", str(devices), "--backend", "ring", "--starting-port", str(free_ports(devices)),
            "--", sys.executable, "-m", "overnight", "train", *train_args]


LAUNCHERS = {"torch": _torchrun, "mlx": _mlx_launch}  # each backend's own runtime's launcher (SPEC §12)


def launch_command(backend_name: str, devices: int, train_args: list[str]) -> list[str]:
    """The launcher command that runs `overnight train TRAIN_ARGS` as ``devices`` processes on this machine."""
    if backend_name not in LAUNCHERS:
        raise UsageError(f"--devices: backend {backend_name!r} has no launcher; start it with its own launcher")
    return LAUNCHERS[backend_name](devices, train_args)


# The launchers end a job without its exit code (torchrun exits 1 whatever a rank said; mlx.launch exits 0 even when
# a rank failed), and mlx.launch waits forever for a rank that stopped answering. So `--devices` does not hand
# over the process: it starts the launcher in a session of its own, each rank notes its pid and exit code in a
# job folder, and this process relays Ctrl-C / SIGTERM to the ranks and exits with the job's code (SPEC §3).
JOB_DIR_ENV = "OVERNIGHT_JOB_DIR"
ENDINGS = {1: "failed", 2: "input refused", 3: "resume refused", 130: "interrupted by Ctrl-C",
           143: "interrupted by SIGTERM"}  # SPEC §3
STRAGGLER_GRACE_S = 30.0  # after a rank failed, how long the others get to leave before they are killed (torchrun's)


# In the job folder: a file the supervisor holds an exclusive flock on for as long as it lives (the kernel drops it
# when the supervisor dies in any way, SIGKILL included, and a zombie holds no lock, unlike a pid that `kill -0`
# still finds), and, for a launcher whose own reports the user must not see (torchrun's), a FIFO the ranks write
# their stderr to, which the supervisor relays live.
ALIVE_NAME, STDERR_NAME = "supervisor.alive", "ranks.stderr"
QUIET_LAUNCHERS = {"torch"}  # torchrun prints a ChildFailedError traceback after every stop that is not exit 0
ORPHAN_EXIT = 1


def note_rank_started(environ: Mapping[str, str] = os.environ) -> None:
    """A rank under `--devices` says where it is, so the signals the user sends reach it, sends its stderr to the
    supervisor's relay, and ends when the supervisor does."""
    _note_rank(environ, "pid", os.getpid())
    job_dir = environ.get(JOB_DIR_ENV)
    if not job_dir or not launcher(environ):
        return
    _stderr_to_relay(os.path.join(job_dir, STDERR_NAME))
    watch_supervisor(os.path.join(job_dir, ALIVE_NAME))


def _stderr_to_relay(fifo: str) -> None:
    if not os.path.exists(fifo):
        return
    try:  # non-blocking open: with nobody reading (the supervisor is gone) it fails instead of hanging
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    sys.stderr.flush()
    os.dup2(fd, 2)
    os.close(fd)


def watch_supervisor(alive_path: str, on_gone=None) -> None:
    """End this rank as soon as the `--devices` supervisor is gone. Its launcher (torchrun, mlx.launch), not the
    supervisor, is this process's parent, so a parent-death signal would not fire; a process group would not
    either (the ranks run in sessions of their own). The rank exits at once, without saving: the supervisor
    was killed, not asked to stop (a SIGTERM/Ctrl-C to it is relayed and saves), every rank is leaving at the
    same moment so no collective save could complete, and whoever sent the SIGKILL wants the machine back now.
    Checkpoints are committed atomically, so an exit in the middle of one leaves the previous one intact."""
    import fcntl
    import threading

    try:
        fd = os.open(alive_path, os.O_RDONLY)
        supervisor = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    except OSError:
        return

    def gone() -> None:
        try:
            os.write(2, (f"overnight: `overnight train --devices` (pid {supervisor}), which started this job, is "
                         f"gone; rank {env_rank()} stops now without saving. Continue with: overnight train ... "
                         "--auto-resume\n").encode())
        except OSError:
            pass  # its stderr went with it
        os._exit(ORPHAN_EXIT)

    def wait() -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # blocks (without the GIL) until the supervisor's lock is dropped
        except OSError:
            return
        (on_gone or gone)()

    threading.Thread(target=wait, name="overnight-supervisor-watch", daemon=True).start()


def note_rank_exit(code: int, environ: Mapping[str, str] = os.environ) -> None:
    _note_rank(environ, "exit", code)


def note_port_taken(environ: Mapping[str, str] = os.environ) -> None:
    """This rank could not listen on its port (another program took it after free_ports chose it): the supervisor
    ends the job at once and starts it again on other ports."""
    _note_rank(environ, "port", 1)


def _note_rank(environ: Mapping[str, str], kind: str, value: int) -> None:
    job_dir = environ.get(JOB_DIR_ENV)
    if not job_dir or not launcher(environ):
        return
    path = os.path.join(job_dir, f"rank-{env_rank(environ)}.{kind}")
    try:  # written then renamed: the supervisor never reads half a number
        with open(path + ".tmp", "w") as out:
            out.write(str(int(value)))
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # the job folder is gone (the supervisor was killed): nobody is listening


def leader_refused_by_lock(run_dir, environ: Mapping[str, str] = os.environ) -> str | None:
    """On a rank other than 0 that lost rank 0 before training: when the run directory's lock is held by a process
    that is not this job's rank 0, rank 0 was refused the run (exit 3) and did not die; the message says so and
    names the holder (None: something else happened). Only a `--devices` job knows its rank 0's pid."""
    job_dir = environ.get(JOB_DIR_ENV)
    if not job_dir or not os.path.isdir(job_dir):
        return None
    leader = read_rank_notes(job_dir, "pid").get(0)
    held, holder = lock.holder(run_dir)
    if not held or leader is None or holder.get("pid") == leader:
        return None
    return (f"rank {env_rank(environ)} stops too: rank 0 could not take the run directory {run_dir}, which "
            f"{lock.describe(holder)} holds (another `overnight train` on the same run directory). Nothing was "
            "changed. Wait for it to finish, stop it, or pass another --output DIR")


def read_rank_notes(job_dir: str, kind: str) -> dict[int, int]:
    notes = {}
    for name in os.listdir(job_dir):
        rank, _, ext = name.partition(".")
        if ext == kind and rank.startswith("rank-") and rank[5:].isdigit():
            try:
                with open(os.path.join(job_dir, name)) as source:
                    notes[int(rank[5:])] = int(source.read())
            except (OSError, ValueError):
                continue
    return notes


def job_exit_code(exits: Mapping[int, int], devices: int, launcher_code: int, signalled: int | None) -> int:
    """One exit code for the job (SPEC §3). A rank's 2 or 3 (the user must change something) comes first, then rank
    0's (it speaks for the job: 0, 1, 130, 143), then any rank's failure; a rank that left no code died (killed)."""
    for code in (2, 3):
        if code in exits.values():
            return code
    failures = [exits[rank] for rank in sorted(exits) if exits[rank] != 0]
    if exits.get(0):
        return exits[0]
    if failures:
        return failures[0]
    if len(exits) == devices:
        return 0
    if not exits and signalled:  # the signal came before any rank could handle it
        return 128 + signalled
    return launcher_code if launcher_code > 0 else 1


def port_outcome(code: int, port_noted: bool, signalled: bool) -> tuple[int, bool]:
    """(the job's exit code, whether to start it again on other ports) once a rank noted that its port was taken.
    The launcher then stops the other ranks with SIGTERM (mlx.launch does), and a rank that handles it in time exits
    143 like a user's stop (it won the race against the supervisor's kill under load: session 15's CI-like run); with
    no signal received here that 143 is the launcher's, and the job ended because of the port."""
    if port_noted and not signalled and code == 143:
        code = 1
    return code, code == 1 and port_noted and not signalled


class _Relay:
    """The ranks' stderr (a FIFO in the job folder) copied to this process's stderr as it comes."""

    def __init__(self, fifo: str):
        import threading

        os.mkfifo(fifo, 0o600)
        self.read_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.keep_fd = os.open(fifo, os.O_WRONLY)  # no EOF between one rank closing it and the next opening it
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="overnight-stderr-relay", daemon=True)
        self.thread.start()

    def _pump(self) -> bool:
        try:
            data = os.read(self.read_fd, 65536)
        except OSError:  # BlockingIOError: nothing waiting
            return False
        got = bool(data)
        while data:
            try:
                data = data[os.write(2, data):]
            except OSError:
                return False
        return got

    def _run(self) -> None:
        import select

        while not self.stopping.is_set():
            ready, _, _ = select.select([self.read_fd], [], [], 0.2)
            if ready:
                self._pump()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        while self._pump():  # what the ranks wrote last
            pass
        os.close(self.keep_fd)
        os.close(self.read_fd)


PORT_ATTEMPTS = 3  # a job whose port was taken before a rank could listen on it is started again, on other ports


def supervise(command, devices: int, poll_s: float = 0.2, grace_s: float = STRAGGLER_GRACE_S,
              quiet_launcher: bool = False, attempts: int = 1) -> int:
    """Run the launcher ``command`` (N ranks of `overnight train`; or a function that makes one, drawing new ports
    each time) to the end and return the job's exit code. A job that ended because a rank's port was taken (no rank
    trained: it happens at the join) is started again with a new command, up to ``attempts`` times in all.
    With ``quiet_launcher`` the launcher's own stderr is kept from the user (shown only when no rank ever started)
    and the ranks' stderr reaches the user through a relay, so overnight's messages are the last words."""
    for attempt in range(1, attempts + 1):
        last = attempt == attempts
        code, port_taken = _supervise_once(command() if callable(command) else command, devices, poll_s, grace_s,
                                           quiet_launcher, final=last)
        if not port_taken or last:
            return code
        print(f"a port chosen for the job was taken by another program before a rank could listen on it; starting "
              f"the job again on other ports ({attempt + 1} of {attempts})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def _supervise_once(command: list[str], devices: int, poll_s: float, grace_s: float, quiet_launcher: bool,
                    final: bool) -> tuple[int, bool]:
    """(the job's exit code, whether it ended only because a port was taken and no signal came: worth a retry).
    The job's end is said unless it is such a retry and not the ``final`` attempt."""
    import shutil as _shutil
    import signal
    import subprocess
    import tempfile

    job_dir = tempfile.mkdtemp(prefix="overnight-job-")
    received: list[int] = []
    told: dict[int, int] = {}  # rank pid -> how many of the received signals it has been sent

    def relay_pending() -> None:
        for pid in read_rank_notes(job_dir, "pid").values():
            for signum in received[told.get(pid, 0):]:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
            told[pid] = len(received)

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        relay_pending()

    alive_fd = _hold_alive(job_dir)
    relay = _Relay(os.path.join(job_dir, STDERR_NAME)) if quiet_launcher else None
    launcher_log = open(os.path.join(job_dir, "launcher.log"), "w+b") if quiet_launcher else None
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, on_signal) for signum in handled}
    try:
        # A session of its own: Ctrl-C reaches this process only, which passes it to the ranks (not to the
        # launcher, which would die of it and drop the ranks' last words).
        launched = subprocess.Popen(command, env=dict(os.environ, **{JOB_DIR_ENV: job_dir}), start_new_session=True,
                                    stderr=launcher_log)
        _wait_for_launcher(launched, job_dir, poll_s, grace_s, relay_pending)
        if relay is not None:
            relay.close()
            relay = None
        started, exits = read_rank_notes(job_dir, "pid"), read_rank_notes(job_dir, "exit")
        if launcher_log is not None and not started:  # the launcher failed by itself: its words are all there is
            launcher_log.seek(0)
            sys.stderr.write(launcher_log.read().decode(errors="replace"))
        code, port_taken = port_outcome(job_exit_code(exits, devices, launched.returncode,
                                                      received[0] if received else None),
                                        bool(read_rank_notes(job_dir, "port")), bool(received))
        if code and (final or not port_taken):
            _say_job_end(code, devices, started, exits)
        return code, port_taken
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if relay is not None:
            relay.close()
        if launcher_log is not None:
            launcher_log.close()
        os.close(alive_fd)
        _shutil.rmtree(job_dir, ignore_errors=True)


def _hold_alive(job_dir: str) -> int:
    """A file the ranks watch (watch_supervisor), locked by this process until it ends, however it ends: the kernel
    drops the lock with the process, so a rank learns of a SIGKILLed supervisor at once."""
    import fcntl

    alive_fd = os.open(os.path.join(job_dir, ALIVE_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    os.write(alive_fd, str(os.getpid()).encode())
    fcntl.flock(alive_fd, fcntl.LOCK_EX)
    return alive_fd


def _wait_for_launcher(launched, job_dir: str, poll_s: float, grace_s: float, relay_pending) -> None:
    """Until the launcher ends: relay signals to ranks that started late, and once a rank has failed, give the others
    ``grace_s`` to leave before they are killed (a stopped or hung rank: no collective will ever free it)."""
    import signal
    import time

    first_failure = None
    while launched.poll() is None:
        time.sleep(poll_s)
        relay_pending()  # ranks that started after a signal came still get it
        exits = read_rank_notes(job_dir, "exit")
        if first_failure is None and any(exits.values()):
            first_failure = time.monotonic()
        # A rank whose port was taken: the others wait for it in the join, where no work can be lost.
        patience = 0.0 if read_rank_notes(job_dir, "port") else grace_s
        if first_failure is not None and time.monotonic() - first_failure > patience:
            for rank, pid in read_rank_notes(job_dir, "pid").items():
                if rank not in exits:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass


def _say_job_end(code: int, devices: int, started: dict, exits: dict) -> None:
    """The last lines on the console, after the ranks' own words: ranks that left no exit code, and the job's."""
    for rank in sorted(set(started) - set(exits)):
        print(f"rank {rank} (pid {started[rank]}) ended without an exit code of its own: killed (by the OOM "
              "killer, a `kill -9`, or this job once it stopped answering) or a hard crash", file=sys.stderr, flush=True)
    print(f"the {devices}-process job ended with exit code {code} ({ENDINGS.get(code, 'failed')}); the "
          f"messages above say what happened and what to do", file=sys.stderr, flush=True)


def without_devices_flag(argv: list[str]) -> list[str]:
    """argv after `train` with --devices N (or --devices=N) taken out, for the processes the launcher starts."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--devices":
            skip = True
        elif not arg.startswith("--devices="):
            out.append(arg)
    return out


def requested_devices(args) -> int:
    """--devices N as a number of processes (1 when absent); below 1 is refused before anything is read."""
    devices = getattr(args, "devices", None)
    if devices is not None and devices < 1:
        raise UsageError(f"--devices {devices}: give the number of processes (one per GPU, or per Mac), 1 or more")
    return devices or 1


def relaunch_on_devices(args, backend_name: str, argv: list[str], say) -> int | None:
    """`overnight train --devices N`: run the backend's launcher with N of them and return the job's exit code
    (None: train in this process)."""
    devices = requested_devices(args)
    if devices == 1 or launcher():
        return None
    def command() -> list[str]:  # each attempt draws its own ports
        made = launch_command(backend_name, devices, without_devices_flag(argv))
        if not os.access(made[0], os.X_OK):
            raise UsageError(f"--devices {devices}: cannot start {made[0]} (not found or not executable)")
        say(f"starting {devices} processes: {' '.join(made)}")
        sys.stdout.flush()
        return made

    return supervise(command, devices, quiet_launcher=backend_name in QUIET_LAUNCHERS, attempts=PORT_ATTEMPTS)
