"""Build a tiny Llama-shaped model folder locally, with no ML framework and no download.

Weights are numpy float32 written with safetensors; the tokenizer is a byte-level BPE trained with
`tokenizers` on a text corpus (by default the bundled sample data). The folder has the Hugging Face
layout that both `mlx_lm.load` and `transformers.AutoModelForCausalLM.from_pretrained` read.
Same arguments and seed => byte-identical files, so tests and benchmarks are reproducible.

    python -m overnight.models.tiny OUT_DIR [--seed N] [--hidden-size 64] [--num-layers 2] ...
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from overnight.fsutil import give_default_modes

ROOT = Path(__file__).resolve().parents[2]
BUNDLED_DATA = ROOT / "data"

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# Ids follow this order: pad 0, bos 1, eos 2, then the role markers the chat template uses.
SPECIAL_TOKENS = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]

# Every message is "<|role|>\n{content}<|eos|>\n"; a generation prompt opens an assistant turn.
# Written with explicit '\n' literals so Jinja's trim_blocks/lstrip_blocks cannot change it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Used only when the bundled data folder is absent (e.g. a non-editable install) and no corpus is given.
FALLBACK_CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo. 3 plus 4 is 7.",
    "The cat sat quietly near the garden. Rain fell all morning. The sun was warm.",
    "What is the opposite of hot? The opposite of hot is cold. Reverse the words: red blue green",
    "A small model learns the shape of short answers first, and the facts later.",
]


# The sample files the tests train on. Named, not globbed: a dataset added under data/ later (the demo's) must not
# change the tiny model's vocabulary, and with it every number the tests pin.
SAMPLE_FILES = ("train.jsonl", "val.jsonl", "preference/train.jsonl", "preference/val.jsonl", "text/train.jsonl",
                "text/val.jsonl")


def bundled_corpus(data_dir: Path = BUNDLED_DATA) -> list[str]:
    """Every string in the bundled sample files (or in every JSONL file of another folder): message contents,
    prompts, answers, texts, in a fixed order."""
    texts: list[str] = []

    def collect(value) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, dict):
            for key in sorted(value):
                if key != "role":
                    collect(value[key])

    data_dir = Path(data_dir)
    if data_dir.resolve() == BUNDLED_DATA.resolve():
        paths = [data_dir / name for name in SAMPLE_FILES if (data_dir / name).is_file()]
    else:
        paths = sorted(data_dir.rglob("*.jsonl"))
    for path in paths:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    collect(json.loads(line.decode("utf-8")))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({exc}); fix it or leave the file out") from None
    return texts


def train_tokenizer(corpus: list[str], vocab_size: int):
    """A GPT-2 style byte-level BPE whose post-processor prepends <|bos|>, like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tok


def init_weights(rng: np.random.Generator, vocab_size: int, hidden: int, layers: int, heads: int,
                 kv_heads: int, intermediate: int, std: float = 0.02) -> dict[str, np.ndarray]:
    head_dim = hidden // heads

    def normal(*shape: int, scale: float = std) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # Output projections get a smaller std (GPT-2's residual scaling) so activations stay tame with depth.
    out_std = std / np.sqrt(2 * layers)
    weights = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim, scale=out_std)
        weights[p + "mlp.gate_proj.weight"] = normal(intermediate, hidden)
        weights[p + "mlp.up_proj.weight"] = normal(intermediate, hidden)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, intermediate, scale=out_std)
        weights[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        weights[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    # The head gets std 1/sqrt(hidden) so a unit-RMS final state can reach logits of about +-sqrt(hidden):
    # with 0.02 the logits could never leave a near-uniform distribution, whatever LoRA learns upstream.
    weights["lm_head.weight"] = normal(vocab_size, hidden, scale=1.0 / np.sqrt(hidden))
    return weights


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_model(out_dir: Path, *, seed: int = 0, vocab_size: int = 512, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                     max_position_embeddings: int = 1024, corpus: list[str] | None = None) -> Path:
    """Write a random-weight Llama model with a trained BPE tokenizer into ``out_dir`` and return it."""
    from safetensors.numpy import save_file

    _check_shape(vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                 max_position_embeddings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = bundled_corpus() if BUNDLED_DATA.is_dir() else []
        corpus = corpus or FALLBACK_CORPUS
    tok = train_tokenizer(corpus, vocab_size)
    pad_id, bos_id, eos_id = (tok.token_to_id(t) for t in (PAD, BOS, EOS))
    # The embedding keeps the requested size even when a small corpus yields fewer merges.
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(out_dir / "tokenizer.json"))

    rng = np.random.default_rng(seed)
    weights = init_weights(rng, vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    give_default_modes(out_dir / "model.safetensors")  # safetensors writes 0600

    _write_json(out_dir / "config.json", _llama_config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id))
    _write_tokenizer_side(out_dir, bos_id, eos_id, pad_id, max_position_embeddings)
    return out_dir


def _check_shape(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, max_position_embeddings: int) -> None:
    """Refuse a shape no Llama can have, before anything is written."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("intermediate_size", intermediate_size),
                        ("max_position_embeddings", max_position_embeddings)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def _llama_config(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                  num_kv_heads: int, max_position_embeddings: int, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """config.json of a Hugging Face Llama with this shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def _write_tokenizer_side(out_dir: Path, bos_id: int, eos_id: int, pad_id: int, max_position_embeddings: int) -> None:
    """generation_config.json, tokenizer_config.json and special_tokens_map.json next to tokenizer.json."""
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False,
    })
    _write_json(out_dir / "tokenizer_config.json", {
        # The generic fast class loads tokenizer.json as it is; LlamaTokenizer would rebuild it differently.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "model_max_length": max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m overnight.models.tiny",
                                description="Build a tiny random Llama model with a trained BPE tokenizer.")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--max-position-embeddings", type=int, default=1024)
    p.add_argument("--corpus", type=Path, default=None,
                   help="a folder of .jsonl files to train the tokenizer on (default: the bundled data/)")
    args = p.parse_args(argv)
    corpus = None
    if args.corpus is not None:
        if not args.corpus.is_dir():
            print(f"error: --corpus {args.corpus} is not a folder of .jsonl files", file=sys.stderr)
            return 2
        try:
            corpus = bundled_corpus(args.corpus)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not corpus:
            print(f"error: --corpus {args.corpus} holds no text in *.jsonl files", file=sys.stderr)
            return 2
    try:
        out = build_tiny_model(args.out_dir, seed=args.seed, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                               num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                               intermediate_size=args.intermediate_size,
                               max_position_embeddings=args.max_position_embeddings, corpus=corpus)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"tiny model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
