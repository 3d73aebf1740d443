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
