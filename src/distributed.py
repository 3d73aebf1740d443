"""Data parallel (SPEC §12): which process of a job this is, the global batch each rank takes its share of, and
the few decisions every rank must take together. No runtime of our own: the collectives are the framework's
(torch.distributed, mx.distributed) behind Backend.connect; this module only says when to call them.

The rule that keeps a job exact: every rank draws the whole step's micro-batches from the one data order
(batch_size x grad_accumulation x world size rows) and trains only its share, with the whole step's
normalisers; the backend sums the gradients once per step. A step is then the same arithmetic as one process
taking all the micro-batches, so losses match it and a resume with another world size (same global batch) goes
on exactly where it stopped. What is decided (stop, new best, a signal, an out-of-memory split) is decided once
and shared, so all ranks stop, split or save together.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from overnight.backend import Batch, noise_seed
from overnight.errors import UsageError

DEFAULT_TIMEOUT_S = 600.0  # a collective waiting longer than this means a peer died or hangs


def launcher(environ: Mapping[str, str] = os.environ) -> str | None:
    """The launcher that started this process as one of several, or None for a plain single process."""
    world = environ.get("WORLD_SIZE", "").strip()
    if world.isdigit() and int(world) > 1:
        return "torchrun"
    if environ.get("MLX_RANK") is not None and environ.get("MLX_HOSTFILE"):  # mlx.launch leaves it empty for -n 1
        return "mlx.launch"
    return None


def env_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's rank as its launcher set it (before any collective exists): who may print."""
    for key in ("RANK", "MLX_RANK"):
        value = environ.get(key, "").strip()
        if value.isdigit() and launcher(environ):
            return int(value)
    return 0


class Solo:
    """The Collective of a single process: every collective returns its input."""

    rank, size = 0, 1

    def all_sum(self, values) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    all_max = broadcast = all_sum

    def barrier(self) -> None:
        pass


def join(backend, environ: Mapping[str, str] = os.environ, timeout_s: float = DEFAULT_TIMEOUT_S):
    """The Collective of this process: Solo, or the job the launcher started, joined through the backend."""
    started_by = launcher(environ)
    if started_by is None:
        return Solo()
    connect = getattr(backend, "connect", None)
    if connect is None:
        raise UsageError(f"started by {started_by}, but backend {backend.name!r} has no data-parallel support: "
                         "run `overnight train` as one process")
    return connect(timeout_s)


def step_batches(stream, grad_accumulation: int, world, step: int, seed: int) -> tuple[list[Batch], list[Batch]]:
    """(the whole step's micro-batches, this rank's share). Each micro-batch's dropout key is set from its place in
    the whole step, so one process taking all of them and N processes taking a share draw the same masks."""
    whole = [stream.next_batch() for _ in range(grad_accumulation * world.size)]
    for index, batch in enumerate(whole):
        batch.noise_seed = noise_seed(seed, step, index)
    return whole, whole[world.rank * grad_accumulation:(world.rank + 1) * grad_accumulation]


def agreed_signal(world, local: int | None) -> int | None:
    """A signal that reached any rank (a launcher relays one to all, a `kill` reaches one): the highest code."""
    if world.size == 1:
        return local
    code = int(world.all_max(np.array([local or 0], dtype=np.float64))[0])
    return code or None


def agreed_flag(world, value: bool) -> bool:
    """Rank 0's yes/no on every rank (a new best, and so a save)."""
    if world.size == 1:
        return value
    return bool(world.broadcast(np.array([1.0 if value else 0.0]))[0])


def all_gather_json(world, value) -> list:
    """Every rank's ``value`` (anything JSON holds), in rank order, on every rank: what only one rank computed
    (grpo's sampled completions) for all to use. The JSON text travels as uint16 pieces in a float64 sum where each
    rank fills its own row and adds zeros to the others', which every Collective carries exactly (mlx's float32
    ring too); floats come back bit for bit, as JSON writes each one's shortest exact form."""
    if world.size == 1:
        return [value]
    text = json.dumps(value).encode()
    lengths = np.zeros(world.size)
    lengths[world.rank] = len(text)
    lengths = world.all_sum(lengths).astype(np.int64)
    width = (int(lengths.max()) + 1) // 2
    rows = np.zeros((world.size, width))
    rows[world.rank] = np.frombuffer(text.ljust(2 * width, b"\0"), dtype=np.uint16)
    rows = np.asarray(world.all_sum(rows.ravel())).reshape(world.size, width)
    return [json.loads(rows[rank].astype(np.uint16).tobytes()[:lengths[rank]]) for rank in range(world.size)]


def eval_share(count: int, world) -> Sequence[int | None]:
    """The eval batches this rank scores, round by round: batch i goes to rank i % size, and a rank with nothing
    in the last round gets None (it still takes part in that round's collective)."""
    rounds = -(-count // world.size)
    return [i if i < count else None for i in range(world.rank, rounds * world.size, world.size)]


# -- `overnight train --devices N` -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(backend_name: str, devices: int, train_args: list[str]) -> list[str]:
    """The launcher command that runs `overnight train TRAIN_ARGS` as ``devices`` processes on this machine:
    torchrun for torch (one process per GPU, NCCL; gloo on CPU), mlx.launch's ring backend for mlx."""
    command = [sys.executable, "-m", "overnight", "train", *train_args]
    if backend_name == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
                "-m", "overnight", "train", *train_args]
    if backend_name == "mlx":
        mlx_launch = shutil.which("mlx.launch") or os.path.join(os.path.dirname(sys.executable), "mlx.launch")
        return [mlx_launch, "-n", str(devices), "--backend", "ring", "--starting-port", str(free_port()),
                "--", *command]
    raise UsageError(f"--devices: backend {backend_name!r} has no launcher; start it with its own launcher")


# The launchers end a job without its exit code (torchrun exits 1 whatever a rank said; mlx.launch exits 0 even when
# a rank failed), and mlx.launch waits forever for a rank that stopped answering. So `--devices` does not hand
# over the process: it starts the launcher in a session of its own, each rank notes its pid and exit code in a
# job folder, and this process relays Ctrl-C / SIGTERM to the ranks and exits with the job's code (SPEC §3).
JOB_DIR_ENV = "OVERNIGHT_JOB_DIR"
ENDINGS = {1: "failed", 2: "input refused", 3: "resume refused", 130: "interrupted by Ctrl-C",
           143: "interrupted by SIGTERM"}  # SPEC §3
STRAGGLER_GRACE_S = 30.0  # after a rank failed, how long the others get to leave before they are killed (torchrun's)


def note_rank_started(environ: Mapping[str, str] = os.environ) -> None:
    """A rank under `--devices` says where it is, so the signals the user sends reach it."""
    _note_rank(environ, "pid", os.getpid())


def note_rank_exit(code: int, environ: Mapping[str, str] = os.environ) -> None:
    _note_rank(environ, "exit", code)


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


def supervise(command: list[str], devices: int, poll_s: float = 0.2,
              grace_s: float = STRAGGLER_GRACE_S) -> int:
    """Run the launcher ``command`` (N ranks of `overnight train`) to the end and return the job's exit code."""
    import shutil as _shutil
    import signal
    import subprocess
    import tempfile
    import time

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

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, on_signal) for signum in handled}
    try:
        # A session of its own: Ctrl-C reaches this process only, which passes it to the ranks (not to the
        # launcher, which would die of it and drop the ranks' last words).
        launched = subprocess.Popen(command, env=dict(os.environ, **{JOB_DIR_ENV: job_dir}), start_new_session=True)
        first_failure = None
        while launched.poll() is None:
            time.sleep(poll_s)
            relay_pending()  # ranks that started after a signal came still get it
            exits = read_rank_notes(job_dir, "exit")
            if first_failure is None and any(exits.values()):
                first_failure = time.monotonic()
            if first_failure is not None and time.monotonic() - first_failure > grace_s:
                for rank, pid in read_rank_notes(job_dir, "pid").items():
                    if rank not in exits:  # stopped or hung: no collective will ever free it
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
        signalled = received[0] if received else None
        code = job_exit_code(read_rank_notes(job_dir, "exit"), devices, launched.returncode, signalled)
        if code:  # the last line on the console: torchrun prints its own failure report after the ranks' words
            print(f"the {devices}-process job ended with exit code {code} ({ENDINGS.get(code, 'failed')}); the "
                  f"messages above say what happened and what to do", file=sys.stderr, flush=True)
        return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _shutil.rmtree(job_dir, ignore_errors=True)


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
