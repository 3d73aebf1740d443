"""A data-parallel job's Collective (src/backend/__init__.py) over threads, for tests of the loop and the sources without a
launcher: each rank is a thread, and every collective combines the ranks' vectors in rank order (so every rank gets
the same floats, as gloo/NCCL all-reduces give)."""
from __future__ import annotations

import threading

import numpy as np


class _Shared:
    def __init__(self, size: int):
        self.size = size
        self.slots: list = [None] * size
        self.barrier = threading.Barrier(size)


class ThreadWorld:
    """The Collective protocol over threads: every rank puts its vector in a slot, all combine the slots in rank
    order (so every rank gets the same floats, as gloo/NCCL all-reduces give)."""

    def __init__(self, rank: int, shared: _Shared):
        self.rank, self.size, self.shared = rank, shared.size, shared

    def _exchange(self, values, combine):
        self.shared.slots[self.rank] = np.array(values, dtype=np.float64)
        self.shared.barrier.wait(timeout=60)
        result = combine(self.shared.slots)
        self.shared.barrier.wait(timeout=60)
        return result

    def all_sum(self, values):
        return self._exchange(values, lambda slots: np.sum(slots, axis=0))

    def all_max(self, values):
        return self._exchange(values, lambda slots: np.max(slots, axis=0))

    def broadcast(self, values):
        return self._exchange(values, lambda slots: slots[0].copy())

    def barrier(self):
        self._exchange([0.0], lambda slots: None)


def run_ranks(size: int, target) -> list:
    """target(world) on `size` threads; their results in rank order (an exception in any is raised)."""
    shared, results, errors = _Shared(size), [None] * size, []

    def body(rank):
        try:
            results[rank] = target(ThreadWorld(rank, shared))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            shared.barrier.abort()

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results
