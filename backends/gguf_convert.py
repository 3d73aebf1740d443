"""GGUF -> Hugging Face folder, for `overnight models get` (src/models/provided.py runs this in a child process, so the
core never imports a framework: SPEC §2).

transformers dequantizes the GGUF (with the `gguf` package), but refuses to save a model it loaded from GGUF, so
the weights go into a fresh model built from the same config without its quantization_config, and that is saved
(NOTES.md, "SmolLM2-135M-Instruct without a hub").

    python -m overnight.backends.gguf_convert FILE.gguf OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar per tensor is noise in a CLI that prints its own steps
    directory, name = str(gguf_path.parent), gguf_path.name
    out.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = "float32"
    fresh = type(loaded)(config)
    state = loaded.state_dict()
    missing_keys, unexpected = fresh.load_state_dict(state, strict=False)
    # Tied embeddings leave lm_head out of a saved state dict; anything else missing is a broken conversion.
    missing_keys = [k for k in missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing_keys or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing_keys[:5]}, unexpected {list(unexpected)[:5]}")
    fresh.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, fresh, state
    # transformers 5 names its own class ("TokenizersBackend"), which older transformers cannot load; the
    # generic fast class loads everywhere. The chat template also goes into tokenizer_config.json for readers
    # that do not know chat_template.jinja.
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "backend"):
        tok_config.pop(key, None)
    if tokenizer.chat_template and "chat_template" not in tok_config:
        tok_config["chat_template"] = tokenizer.chat_template
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")




if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
