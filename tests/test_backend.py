import numpy as np
import pytest

from overnight.backend import Batch, BackendUnavailable, choose_backend

from conftest import has


def test_auto_rule_on_a_machine_without_apple_silicon_or_cuda(monkeypatch):
    import overnight.backend as backend

    monkeypatch.setattr(backend, "_is_apple_silicon", lambda: False)
    monkeypatch.setattr(backend, "_torch_cuda_visible", lambda: False)
    name, why = choose_backend("auto")
    assert name == ("torch" if has("torch", "transformers", "peft") else "mlx")
    assert "first installed" in why
    monkeypatch.setattr(backend, "_is_apple_silicon", lambda: True)
    if has("mlx", "mlx_lm"):
        assert choose_backend("auto") == ("mlx", "Apple Silicon with mlx installed")
    monkeypatch.setattr(backend, "_is_apple_silicon", lambda: False)
    monkeypatch.setattr(backend, "_torch_cuda_visible", lambda: True)
    if has("torch", "transformers", "peft"):
        assert choose_backend("auto") == ("torch", "CUDA is visible to torch")


def test_unknown_or_missing_backend_is_a_clear_error(monkeypatch):
    import overnight.backend as backend

    with pytest.raises(BackendUnavailable, match="choose auto, mlx or torch"):
        choose_backend("jax")
    monkeypatch.setattr(backend, "_installed", lambda modules: False)
    with pytest.raises(BackendUnavailable, match=r"pip install 'overnight\[mlx\]'"):
        choose_backend("mlx")


def test_split_keeps_rows_and_preference_pairs_together():
    ids = np.arange(24, dtype=np.int32).reshape(6, 4)
    batch = Batch(ids, np.ones_like(ids, dtype=np.float32), np.ones_like(ids))
    parts = batch.split(4)
    assert [p.num_rows for p in parts] == [1, 2, 1, 2]
    np.testing.assert_array_equal(np.concatenate([p.input_ids for p in parts]), ids)
    paired = Batch(ids, np.ones_like(ids, dtype=np.float32), np.ones_like(ids), paired=True)
    assert [p.num_rows for p in paired.split(8)] == [2, 2, 2]


def test_generator_seeds_are_folded_into_the_range_both_frameworks_take():
    from overnight.backend import GENERATOR_SEED_LIMIT, generator_seed

    assert GENERATOR_SEED_LIMIT == 2**63
    assert [generator_seed(s) for s in (0, 11, 2**63 - 1, 2**63, 2**64 - 1)] == [0, 11, 2**63 - 1, 0, 2**63 - 1]
    assert isinstance(generator_seed(np.uint64(2**64 - 1)), int)


def test_completion_seeds_are_those_the_backends_used_to_reduce_themselves():
    # The backends used to seed each row with int(s) % 2**63 of the raw 64-bit draw; the core now hands them that
    # number, so sampled completions (and resumed grpo runs) do not change.
    from overnight.methods.grpo import _SAMPLE_STREAM, completion_seed

    for key in [(0, 0, 0, 0), (42, 7, 123, 3), (2**31, 10**6, 5, 15)]:
        raw = int(np.random.SeedSequence([*key, _SAMPLE_STREAM]).generate_state(1, np.uint64)[0])
        assert completion_seed(*key) == raw % 2**63 and 0 <= completion_seed(*key) < 2**63
    # pinned (the first draw is above 2**63, folded): a changed seed changes every sampled completion
    assert [completion_seed(3, 1, 4, k) for k in (0, 1)] == [8125389102508611407, 227099772655813114]


def test_stop_ids_are_a_tuple_of_ints_whatever_the_caller_had():
    from overnight.backend import as_stop_ids

    assert as_stop_ids((2, 7)) == (2, 7) and as_stop_ids([np.int64(5)]) == (5,)
    assert as_stop_ids(None) == () and as_stop_ids(3) == (3,) and as_stop_ids(np.int32(4)) == (4,)
    assert all(type(i) is int for i in as_stop_ids(np.array([1, 2])))
