"""src/data/tokenizer.py: the stop tokens a model folder declares (the rest of the tokenizer: tests/test_data.py)."""
from __future__ import annotations

from pathlib import Path

from overnight.data.tokenizer import _stop_ids, load_tokenizer

from conftest import with_stop_ids


def two_stop_ids(model_dir: Path, out: Path) -> tuple[Path, int, int]:
    """The tiny model as a chat model that lists its end-of-turn token beside its eos in generation_config.json
    (as Llama 3, Qwen and Gemma do); returns (folder, eos id, the other stop id)."""
    tok = load_tokenizer(model_dir)
    other = next(i for i in range(tok.vocab_size) if i not in (tok.eos_id, tok.bos_id, tok.pad_id))
    return with_stop_ids(model_dir, out, [tok.eos_id, other]), tok.eos_id, other


def test_the_tiny_models_only_stop_token_is_its_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.eos_id is not None and tok.stop_ids == (tok.eos_id,)


def test_every_eos_id_of_generation_config_is_a_stop_id(tiny_model_dir, tmp_path):
    folder, eos, other = two_stop_ids(tiny_model_dir, tmp_path / "chat")
    tok = load_tokenizer(folder)
    assert tok.eos_id == eos  # the eos used for training rows is unchanged
    assert tok.stop_ids == (eos, other)
    assert all(type(i) is int for i in tok.stop_ids)


def test_stop_ids_come_from_the_tokenizer_config_and_generation_config_each_once():
    assert _stop_ids(2, {"eos_token_id": [7, 2]}, {"eos_token_id": 9}) == (2, 7, 9)
    assert _stop_ids(None, {"eos_token_id": 5}, {}) == (5,)
    assert _stop_ids(3, {}, {"eos_token_id": [3, 3, None, "x", True, -1, 4]}) == (3, 4)
    assert _stop_ids(None, {}, {}) == ()
