"""Batches built ahead on a background thread, so a fast device never waits for tokenizing and collating.

Only for a source whose batches do not depend on the model (``BatchSource.prefetch``: TrainStream opts in; grpo's
sampler, which draws with the current policy, does not). The thread calls the source's own ``next_batch`` in order,
so the batches and their order are exactly the source's; what a checkpoint records is the source's position right
after the last batch the loop took, never the one the thread has reached."""
from __future__ import annotations

import copy
import queue
import threading
from typing import TYPE_CHECKING, Any

from overnight.data.source import BatchSource

if TYPE_CHECKING:
    from overnight.backend import Batch, StepResult

__all__ = ["Prefetched", "prefetching"]

_PUT_POLL_S = 0.2  # how soon a producer blocked on a full queue notices it was stopped
_JOIN_S = 30.0  # a batch being built when the run ends is finished first; a hung read is left to the daemon flag


def prefetching(source: BatchSource, depth: int) -> BatchSource:
    """``source`` read ``depth`` batches ahead on a thread when it allows it (``source.prefetch``), else itself."""
    return Prefetched(source, depth) if source.prefetch else source


class Prefetched(BatchSource):
    """``source`` with up to ``depth`` batches built ahead. The thread starts on the first ``next_batch``; ``stop()``
    ends it (the loop calls it however training ends). ``state()`` is the source's state right after the last batch
    handed out; ``restore()`` stops the thread, restores the source, and the next ``next_batch`` starts a new one."""

    def __init__(self, source: BatchSource, depth: int):
        self.source = source
        self.depth = max(1, int(depth))
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stopping: threading.Event | None = None
        # The source's state after the last batch handed out; None while nothing runs ahead (the source's own).
        self._state: dict | None = None
        self._error: BaseException | None = None

    @property
    def scores_own_steps(self) -> bool:  # type: ignore[override]
        return self.source.scores_own_steps

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def next_batch(self) -> Batch:
        if self._error is not None:  # the producer died on this batch: the plain source would raise it again
            raise self._error
        if self._queue is None:
            self._start()
        assert self._queue is not None
        kind, value, state = self._queue.get()
        if kind == "error":
            self._error = value
            self._join()
            # The same exception object, type and message: a data error reads exactly as it does without the thread.
            raise value
        self._state = state
        return value

    def state(self) -> dict:
        return copy.deepcopy(self._state) if self._state is not None else self.source.state()

    def restore(self, state: dict) -> None:
        self.stop()
        self.source.restore(state)
        self._state, self._error = None, None

    def after_step(self, step: int, result: StepResult) -> tuple[float, Any]:
        return self.source.after_step(step, result)

    def step_stats(self) -> dict:
        return self.source.step_stats()

    def stop(self) -> None:
        """End the thread (idempotent) and put the source back at the position after the last batch handed out,
        so the source itself, and a thread started later, continue exactly where the loop is."""
        if self._queue is None:
            return
        assert self._stopping is not None
        self._stopping.set()
        self._drain()
        self._join()
        alive = self.running
        self._queue = self._stopping = self._thread = None
        if self._state is not None and not alive:  # a producer still inside a hung read keeps the source
            self.source.restore(self._state)
            self._state = None

    def close(self) -> None:
        self.stop()
        self.source.close()

    # -- the thread ----------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self._state = self.source.state()  # nothing handed out yet: where the source stands now
        self._queue = queue.Queue(maxsize=self.depth)
        self._stopping = threading.Event()
        # A daemon: a producer stuck in a read never keeps the process alive after the run has ended.
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stopping),
                                        name="overnight-prefetch", daemon=True)
        self._thread.start()

    def _produce(self, out: queue.Queue, stopping: threading.Event) -> None:
        try:
            while not stopping.is_set():
                batch = self.source.next_batch()
                # Taken here, in order, so each batch carries the position right after it.
                item = ("batch", batch, copy.deepcopy(self.source.state()))
                if not self._put(out, stopping, item):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the loop's thread, which raises it
            self._put(out, stopping, ("error", exc, None))

    @staticmethod
    def _put(out: queue.Queue, stopping: threading.Event, item: tuple) -> bool:
        while not stopping.is_set():
            try:
                out.put(item, timeout=_PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def _join(self) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(_JOIN_S)
