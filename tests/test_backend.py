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
