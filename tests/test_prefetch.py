"""Batches built ahead on a thread (overnight.data.prefetch): the same batches and states as the plain source, a
resume from the wrapper's state continues exactly, a producer's error reaches the caller unchanged, the thread ends,
and a source that samples with the model (grpo) is never read ahead."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import DATA_DIR

from overnight.config import Config
from overnight.data import DataError, TrainStream, load_tokenizer
from overnight.data.prefetch import Prefetched, prefetching
from overnight.data.source import BatchSource

from refbackend import SyntheticStream


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "overnight-prefetch" and t.is_alive()]


def same_batch(a, b) -> None:
    for field in ("input_ids", "loss_mask", "attention_mask"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def stream_cfg(batch_size: int = 3) -> Config:
    cfg = Config()
    cfg.train.batch_size, cfg.train.seed, cfg.model.max_seq_length = batch_size, 5, 64
    return cfg


def test_train_stream_read_ahead_gives_the_same_batches_and_states_across_a_restore(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)

    def stream():
        return TrainStream(DATA_DIR / "train.jsonl", tok, stream_cfg(batch_size=40))

    plain, ahead = stream(), Prefetched(stream(), depth=3)
    try:
        for i in range(12):  # past an epoch's end
            same_batch(ahead.next_batch(), plain.next_batch())
            # The state after the last batch handed out, not after what the thread has built by now.
            assert ahead.state() == plain.state()
            if i == 6:
                saved = ahead.state()
        assert ahead.running and plain.epoch >= 1
        reference = stream()
        reference.restore(saved)
        expected = [reference.next_batch() for _ in range(8)]
        # A resumed run: a fresh stream restored from the saved state continues after batch 7, thread and all.
        resumed = Prefetched(stream(), depth=3)
        resumed.restore(saved)
        for want in expected:
            same_batch(resumed.next_batch(), want)
        resumed.close()
        # The running wrapper restored in place: its thread restarts from the restored position.
        ahead.restore(saved)
        for want in expected:
            same_batch(ahead.next_batch(), want)
        assert ahead.state() == reference.state()
    finally:
        ahead.close()
        plain.close()
    assert not prefetch_threads()


class Failing(SyntheticStream):
    """Fails while building batch ``fail_at`` (0-based) with a data error, as a row changed on disk would."""

    prefetch = True

    def __init__(self, fail_at: int):
        super().__init__(2, seed=3)
        self.fail_at, self.built = fail_at, 0

    def next_batch(self):
        if self.built == self.fail_at:
            raise DataError("data/train.jsonl:7: key 'messages': expected a list -> fix the row")
        self.built += 1
        return super().next_batch()


def test_an_error_while_building_reaches_the_caller_with_its_type_and_message():
    plain = SyntheticStream(2, seed=3)
    ahead = Prefetched(Failing(fail_at=4), depth=2)
    for _ in range(4):
        same_batch(ahead.next_batch(), plain.next_batch())
    with pytest.raises(DataError, match=r"^data/train.jsonl:7: key 'messages': expected a list -> fix the row$"):
        ahead.next_batch()
    assert not ahead.running  # the producer ended on its error
    assert ahead.state() == plain.state()  # the position of the last good batch handed out
    with pytest.raises(DataError):  # asked again, the same error, not a hang
        ahead.next_batch()
    ahead.stop()
    assert not prefetch_threads()


class Slow(SyntheticStream):
    prefetch = True

    def next_batch(self):
        time.sleep(0.01)
        return super().next_batch()


def test_stop_ends_a_thread_blocked_on_a_full_queue_and_puts_the_source_back():
    source = Slow(2, seed=1)
    ahead = Prefetched(source, depth=2)
    first = ahead.next_batch()
    deadline = time.monotonic() + 5
    while ahead._queue.qsize() < 2 and time.monotonic() < deadline:  # the producer fills the queue and waits
        time.sleep(0.01)
    assert ahead._queue.full() and source.position > 2  # built ahead of the one batch handed out
    started = time.monotonic()
    ahead.stop()
    assert time.monotonic() - started < 2 and not prefetch_threads()
    # The source itself is back where the consumer is: right after the first batch.
    assert source.state() == {"epoch": 0, "position": 2}
    plain = SyntheticStream(2, seed=1)
    same_batch(first, plain.next_batch())
    same_batch(ahead.next_batch(), plain.next_batch())  # a new thread continues from there
    ahead.stop()


class Sampling(BatchSource):
    """Stands for grpo's sampler: a source that did not opt in."""

    def next_batch(self):
        raise AssertionError("not called")

    def state(self):
        return {}

    def restore(self, state):
        pass


def test_only_sources_that_opt_in_are_read_ahead():
    from overnight.methods.grpo import GrpoSource

    assert GrpoSource.prefetch is False and BatchSource.prefetch is False  # grpo samples with the current weights
    assert TrainStream.prefetch is True
    sampling = Sampling()
    assert prefetching(sampling, 4) is sampling
    assert isinstance(prefetching(Slow(2), 4), Prefetched)
