"""The local tiny-model builder: deterministic files that transformers and mlx_lm both load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import has

from overnight.models.tiny import CHAT_TEMPLATE, build_tiny_model, main

FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
         "tokenizer.json", "tokenizer_config.json"]
PROMPT = "The capital of France is Paris. 3 plus 4 is 7."


def test_same_seed_gives_byte_identical_files(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_other_seed_changes_weights_not_tokenizer(tmp_path, tiny_model_dir):
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_config_and_weights_are_llama_shaped(tiny_model_dir):
    from safetensors.numpy import load_file

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is False
    tok_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHAT_TEMPLATE
    vocab = json.loads((tiny_model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab["<|pad|>"] == config["pad_token_id"] and vocab["<|eos|>"] == config["eos_token_id"]
    assert len(vocab) <= config["vocab_size"]

    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    h, kv = config["hidden_size"], config["num_key_value_heads"] * config["head_dim"]
    assert weights["model.embed_tokens.weight"].shape == (config["vocab_size"], h)
    assert weights["lm_head.weight"].shape == (config["vocab_size"], h)
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (kv, h)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (config["intermediate_size"], h)[::-1]
    assert len(weights) == 2 + 1 + config["num_hidden_layers"] * 9
    for name, w in weights.items():
        assert w.dtype == np.float32
        if w.ndim == 2:
            # every matmul input dimension must be divisible by the 4-bit quantization group size
            assert w.shape[1] % 64 == 0, name


def test_sizes_come_from_arguments(tmp_path):
    out = build_tiny_model(tmp_path / "m", seed=3, vocab_size=300, hidden_size=128, num_layers=1, num_heads=2,
                           num_kv_heads=1, intermediate_size=256, corpus=["hello world " * 20, "goodbye moon"])
    config = json.loads((out / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (300, 128, 1)
    assert (config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]) == (1, 64, 256)
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model(tmp_path / "bad", hidden_size=64, num_heads=3)


def test_main_builds_and_rejects_bad_sizes(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--seed", "2", "--hidden-size", "128", "--num-layers", "1"]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["hidden_size"] == 128
    assert main([str(tmp_path / "bad"), "--vocab-size", "100"]) == 2
    assert "vocab_size must be at least" in capsys.readouterr().err
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "hello there"}\nnot json\n')
    assert main([str(tmp_path / "c"), "--corpus", str(corpus)]) == 2
    assert f"{corpus / 'a.jsonl'}:2: not a JSON line" in capsys.readouterr().err
    (corpus / "a.jsonl").write_text('{"text": "hello there"}\n')
    assert main([str(tmp_path / "c"), "--corpus", str(corpus)]) == 0


def test_tokenizers_library_matches_transformers(tiny_model_dir):
    if not has("transformers"):
        pytest.skip("transformers not installed")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for text in [PROMPT, "  leading spaces\nand <|user|> tokens", "ünïcödé 東京", ""]:
        assert raw.encode(text).ids == hf(text).input_ids
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2 and hf.pad_token_id == 0
    messages = [{"role": "user", "content": "What is 3 plus 4?"}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|user|>\nWhat is 3 plus 4?<|eos|>\n<|assistant|>\n"


def _torch_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.dtype == torch.float32
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _mlx_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import mlx.core as mx
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_dir))
    assert tokenizer.eos_token_id == 2
    return np.array(model(mx.array([ids]))[0]).astype(np.float32)


def _ids(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PROMPT).ids


@pytest.mark.torch
def test_loads_in_transformers(tiny_model_dir):
    if not has("torch", "transformers"):
        pytest.skip("torch/transformers not installed")
    logits = _torch_logits(tiny_model_dir, _ids(tiny_model_dir))
    assert logits.shape == (len(_ids(tiny_model_dir)), 512) and np.isfinite(logits).all()


@pytest.mark.mlx
def test_loads_in_mlx_lm(tiny_model_dir):
    if not has("mlx", "mlx_lm"):
        pytest.skip("mlx/mlx_lm not installed")
    logits = _mlx_logits(tiny_model_dir, _ids(tiny_model_dir))
    assert logits.shape == (len(_ids(tiny_model_dir)), 512) and np.isfinite(logits).all()


def test_transformers_and_mlx_logits_agree(tiny_model_dir):
    if not has("torch", "transformers", "mlx", "mlx_lm"):
        pytest.skip("needs both backends' libraries")
    ids = _ids(tiny_model_dir)
    np.testing.assert_allclose(_mlx_logits(tiny_model_dir, ids), _torch_logits(tiny_model_dir, ids), atol=1e-4)
