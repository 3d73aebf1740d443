"""The MLX base model load (backends/mlx_load.py): lazily read, quantized block by block, and the quantized-weight
cache that lets the next start skip the full-precision read. Everything runs in-process on small models."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from overnight.backends import mlx_load  # noqa: E402
from overnight.backends.mlx_backend import MLXBackend, _is_oom  # noqa: E402
from overnight.config import Config, ConfigError  # noqa: E402
from overnight.runs.lifecycle import banner  # noqa: E402

pytestmark = pytest.mark.mlx

Q4 = SimpleNamespace(bits=4, group_size=64)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private overnight cache in which every model is big enough to be cached."""
    root = tmp_path / "cache"
    monkeypatch.setenv("OVERNIGHT_CACHE", str(root))
    monkeypatch.setattr(mlx_load, "CACHE_MIN_BYTES", 0)
    return root / mlx_load.CACHE_FOLDER


def _load(model_dir: Path, quantization=Q4) -> tuple[object, dict]:
    details: dict = {}
    return mlx_load.load_base(Path(model_dir), quantization, details, is_oom=_is_oom), details


def _weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.view(mx.uint8) if v.dtype == mx.bfloat16 else v) for k, v in tree_flatten(model.parameters())}


def _assert_bit_identical(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape, k
        assert np.array_equal(wa[k], wb[k]), k


def _no_quantize(monkeypatch) -> None:
    import mlx_lm.utils

    def refuse(*args, **kwargs):
        raise AssertionError("quantize_model was called although the cache holds the weights")

    monkeypatch.setattr(mlx_lm.utils, "quantize_model", refuse)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []


def _write_llama(out: Path, *, blocks: int, hidden: int, intermediate: int, vocab: int = 512, seed: int = 0) -> int:
    """A Llama-shaped folder with random bf16 weights (no tokenizer: loading needs none); returns its weight bytes."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": blocks, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False}))
    key = mx.random.key(seed)
    weights = {}

    def add(name, *shape):
        nonlocal key
        key, sub = mx.random.split(key)
        weights[name] = (0.02 * mx.random.normal(shape, key=sub)).astype(mx.bfloat16)

    kv = hidden // 2
    add("model.embed_tokens.weight", vocab, hidden)
    for i in range(blocks):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
                            ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (intermediate, hidden)), ("mlp.up_proj", (intermediate, hidden)),
                            ("mlp.down_proj", (hidden, intermediate))):
            add(p + name + ".weight", *shape)
        weights[p + "input_layernorm.weight"] = mx.ones((hidden,), dtype=mx.bfloat16)
        weights[p + "post_attention_layernorm.weight"] = mx.ones((hidden,), dtype=mx.bfloat16)
    weights["model.norm.weight"] = mx.ones((hidden,), dtype=mx.bfloat16)
    add("lm_head.weight", vocab, hidden)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    return sum(v.nbytes for v in weights.values())


def test_cached_weights_are_bit_identical_and_a_second_load_does_not_quantize(tiny_model_dir, cache, monkeypatch):
    fresh, first = _load(tiny_model_dir)
    [entry] = _entries(cache)
    assert first["quantization"] == "4-bit affine (group 64), quantized in memory"
    assert first["base_weights"].startswith("quantized as read; cached in ") and str(entry) in first["base_weights"]
    assert {p.name for p in entry.iterdir()} == {"model.safetensors", "config.json", "manifest.json"}

    _no_quantize(monkeypatch)
    cached, second = _load(tiny_model_dir)
    assert second["base_weights"] == f"4-bit weights read from the quantized-weight cache: {entry}"
    assert second["quantization"] == first["quantization"]  # the adapter records the same base either way
    _assert_bit_identical(fresh, cached)
    ids = mx.array([[1, 5, 9, 14]])
    assert np.array_equal(np.array(fresh(ids)), np.array(cached(ids)))


def test_a_second_setup_reads_the_cache(tiny_model_dir, cache, monkeypatch):
    cfg = Config()
    cfg.model.path, cfg.lora.layers, cfg.lora.dropout = str(tiny_model_dir), 1, 0.0
    first = MLXBackend().setup(cfg, 0)
    assert "cached in" in first.details["base_weights"]
    _no_quantize(monkeypatch)
    backend = MLXBackend()
    second = backend.setup(cfg, 0)
    assert "read from the quantized-weight cache" in second.details["base_weights"]
    assert backend.adapter_config["overnight"]["quantization"] == "4-bit affine (group 64), quantized in memory"
    assert (second.trainable_params, second.total_params) == (first.trainable_params, first.total_params)
    # and the start banner says it, for whoever reads the log
    lines = banner(cfg, second, SimpleNamespace(train=None, val=None), cache.parent / "run", None)
    assert f"base weights: {second.details['base_weights']}" in lines


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no manifest", "other key"])
def test_a_damaged_entry_is_not_trusted_but_rebuilt(tiny_model_dir, cache, damage):
    fresh, _ = _load(tiny_model_dir)
    [entry] = _entries(cache)
    weights = entry / "model.safetensors"
    if damage == "flipped byte":  # same size, so only the sha256 can tell
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "no manifest":  # as a writer killed before its manifest would leave it, were it ever renamed
        (entry / "manifest.json").unlink()
    else:
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["key"]["bits"] = 8
        (entry / "manifest.json").write_text(json.dumps(manifest))
    rebuilt, details = _load(tiny_model_dir)
    assert "was unusable" in details["base_weights"] and "cached in" in details["base_weights"]
    _assert_bit_identical(fresh, rebuilt)
    assert _entries(cache) == [entry]
    _, again = _load(tiny_model_dir)  # and the rebuilt entry is good
    assert "read from the quantized-weight cache" in again["base_weights"]


def test_a_killed_writer_leaves_nothing_that_looks_like_an_entry(tiny_model_dir, cache, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the process dying mid-write

    with monkeypatch.context() as m:
        m.setattr(mlx_load, "atomic_write_text", killed)
        with pytest.raises(KeyboardInterrupt):
            _load(tiny_model_dir)
    assert list(cache.iterdir()) == []
    # what a writer that really died leaves (pid 2**22 + 1 is above Linux's and macOS's pid_max) is swept away
    left = cache / f".tiny-4bit-g64-0123.tmp-{2 ** 22 + 1}-abcd1234"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"partial")
    _, details = _load(tiny_model_dir)
    assert "cached in" in details["base_weights"]
    assert not left.exists() and len(_entries(cache)) == 1


def test_a_changed_model_gets_another_entry_and_a_copy_the_same(tiny_model_dir, cache, tmp_path):
    _load(tiny_model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)  # copy2: same bytes, same modification times
    _, details = _load(copy)
    assert "read from the quantized-weight cache" in details["base_weights"]

    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = np.full(16, 0.5, np.float32).tobytes()  # new values in the last tensor: same header, same size
    weights.write_bytes(bytes(data))
    other, details = _load(changed)
    assert "cached in" in details["base_weights"]
    assert len(_entries(cache)) == 2
    cached_other, details = _load(changed)
    assert "read from the quantized-weight cache" in details["base_weights"]
    base, _ = _load(tiny_model_dir)
    _assert_bit_identical(other, cached_other)
    a, b = _weights(base), _weights(cached_other)
    assert [k for k in a if not np.array_equal(a[k], b[k])]

    key = mlx_load.CacheEntry.for_model(tiny_model_dir, 4, 64)
    assert mlx_load.CacheEntry.for_model(tiny_model_dir, 8, 64).name != key.name
    assert mlx_load.CacheEntry.for_model(tiny_model_dir, 4, 32).name != key.name


def test_a_hub_snapshot_is_keyed_by_its_blob_sha256_not_its_time(tiny_model_dir, tmp_path, cache):
    # huggingface_hub stores each file once as blobs/<sha256 of its content> and links the snapshot to it
    repo = tmp_path / "models--org--tiny"
    blob = repo / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "model.safetensors", blob)
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", snapshot / "config.json")
    (snapshot / "model.safetensors").symlink_to(blob)
    key, size = mlx_load.content_key(snapshot)
    assert key["weights"][0]["content"] == "sha256:" + "ab" * 32 and size == blob.stat().st_size
    os.utime(blob, (1, 1))  # a re-download: the same content, another time
    assert mlx_load.content_key(snapshot)[0] == key
    assert mlx_load.CacheEntry.for_model(snapshot, 4, 64).name.startswith("models--org--tiny-4bit-g64-")


def test_the_cache_keeps_the_most_recently_used_entries(tiny_model_dir, cache, tmp_path, monkeypatch):
    monkeypatch.setattr(mlx_load, "CACHE_KEEP", 2)
    models = []
    for i in range(3):
        folder = tmp_path / f"m{i}"
        _write_llama(folder, blocks=1, hidden=64, intermediate=128, seed=i)
        # Models written within one tick of the kernel's coarse clock share an mtime, and these three share their
        # headers and sizes too: then the key cannot tell them apart (README says so). Real models never do both.
        stamp = (1_700_000_000 + i) * 10**9
        os.utime(folder / "model.safetensors", ns=(stamp, stamp))
        models.append(folder)
    _load(models[0])
    _load(models[1])
    _load(models[0])  # used again: now the most recent
    _load(models[2])
    names = {p.name.split("-")[0] for p in _entries(cache)}
    assert names == {"m0", "m2"}


def test_small_models_and_unquantized_loads_write_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OVERNIGHT_CACHE", str(tmp_path / "cache"))
    _, details = _load(tiny_model_dir)  # the default threshold: the test suite never fills the user's cache
    assert "not cached" in details["base_weights"]
    monkeypatch.setattr(mlx_load, "CACHE_MIN_BYTES", 0)
    _, details = _load(tiny_model_dir, SimpleNamespace(bits=0, group_size=64))
    assert details["quantization"] == "none" and "base_weights" not in details
    assert not (tmp_path / "cache").exists()


def test_a_full_disk_leaves_the_run_uncached_not_failed(tiny_model_dir, cache, monkeypatch):
    monkeypatch.setattr(mlx_load, "KEEP_FREE_BYTES", 1 << 62)
    model, details = _load(tiny_model_dir)
    assert details["base_weights"].startswith("quantized as read; not cached: ") and "GiB free" in details["base_weights"]
    assert _entries(cache) == []


def test_a_truncated_weight_file_is_a_config_error_naming_the_folder(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4096)
    with pytest.raises(ConfigError, match=r"model\.path.*broken.*weight files are complete"):
        _load(broken)


def measure_load_peaks(model_dir: str) -> dict:
    """MLX's peak memory loading ``model_dir`` fresh and then from the cache; run in a process of its own by the
    test below (the peak is process-wide: what other tests left in this process's MLX state moves it)."""
    mx.clear_cache()
    mx.reset_peak_memory()
    model, _ = _load(Path(model_dir))
    quantized = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    fresh_peak = mx.get_peak_memory()
    del model
    mx.clear_cache()
    mx.reset_peak_memory()
    model, details = _load(Path(model_dir))
    return {"quantized": quantized, "fresh_peak": fresh_peak, "cached_peak": mx.get_peak_memory(),
            "base_weights": details["base_weights"]}


@pytest.mark.parametrize("bits", [0, 4])
def test_a_model_that_does_not_fit_is_said_not_crashed(tiny_model_dir, monkeypatch, bits):
    """An allocation MLX refuses while the base loads (Metal's words for a tensor over its largest buffer) ends as
    overnight's error with what to change, not a crash a supervised run would be relaunched into; any other failure
    is still the model folder's."""
    from overnight.errors import TrainingError

    def refused(model):
        raise RuntimeError("[metal::malloc] Attempting to allocate 18253611008 bytes which is greater than the "
                           "maximum allowed buffer size of 17179869184 bytes.")

    monkeypatch.setattr(mlx_load, "evaluate_by_block", refused)
    with pytest.raises(TrainingError, match="out of memory loading the base model .*maximum allowed buffer size") \
            as raised:
        _load(tiny_model_dir, SimpleNamespace(bits=bits, group_size=64))
    assert ("model.quantization.bits=4" in str(raised.value)) is (bits != 4)


def test_peak_memory_is_the_quantized_model_plus_about_one_block(tmp_path, cache):
    # 8 blocks of 1.3 MB in bf16: reading the whole model before quantizing it (mlx_lm.load, then
    # quantize_model) peaks above the full-precision size; block by block stays near quantized + one block.
    import subprocess
    import sys

    full = _write_llama(tmp_path / "m", blocks=8, hidden=256, intermediate=512)
    block = full / 8
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_mlx_load as t; "
            "t.mlx_load.CACHE_MIN_BYTES = 0; print(json.dumps(t.measure_load_peaks(sys.argv[2])))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    assert "read from the quantized-weight cache" in peaks["base_weights"]
    assert peaks["fresh_peak"] < peaks["quantized"] + 2 * block < 0.6 * full
    assert peaks["cached_peak"] < peaks["quantized"] + 0.5 * block


@pytest.mark.torch
def test_a_transformers_5_config_keeps_its_rope_theta(tiny_model_dir, tmp_path):
    """transformers 5 saves rope_theta only inside rope_parameters (the SmolLM2 folder overnight converts: 100000);
    mlx-lm 0.32 reads the top-level key and fell back to 10000, so the mlx policy computed other logits than torch's
    for the same model. Now both read 100000: the logits agree."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _ = _load(model_dir, SimpleNamespace(bits=0, group_size=64))
    ids = np.arange(1, 49, dtype=np.int64)[None, :] * 7 % 400 + 3
    ours = np.array(model(mx.array(ids)).astype(mx.float32))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.as_tensor(ids)).logits.numpy()
    assert reference.config.rope_parameters["rope_theta"] == 100000.0
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
