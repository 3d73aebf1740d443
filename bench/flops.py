"""Matmul FLOPs per input token of one LoRA training step, overnight vs the reference trainers, from a model's
config.json: the ceiling an exact optimisation can reach, to read beside bench/run.py's measured ratios.

Counted: the linear layers (2 x in x out per token and pass), forward and the backward passes autograd really
runs: with the base frozen, only input gradients, and only from the top down to the lowest block with LoRA
(the reference's QLoRA path calls prepare_model_for_kbit_training, whose enable_input_require_grads makes
autograd go through every block). LoRA's own matmuls, attention scores, norms and the optimizer are left out
(a few % at rank 16). overnight runs the output head and its loss only at target positions; the reference at
every position.

    python bench/flops.py MODEL_DIR --lora-layers 16 --target-fraction 0.198
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def per_token(config: dict, lora_layers: int, target_fraction: float) -> dict:
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = hidden // heads * config.get("num_key_value_heads", heads)
    block = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)  # q, o, k, v, gate, up, down
    head = 2 * hidden * config["vocab_size"]
    lora_layers = layers if lora_layers < 0 else min(lora_layers, layers)
    body_forward = layers * block
    reference = body_forward + head + lora_layers * block + head
    reference_kbit = body_forward + head + layers * block + head
    overnight = body_forward + target_fraction * head + lora_layers * block + target_fraction * head
    return {"reference_mflop": reference / 1e6, "reference_4bit_mflop": reference_kbit / 1e6,
            "overnight_mflop": overnight / 1e6, "ceiling_vs_reference": reference / overnight,
            "ceiling_vs_reference_4bit": reference_kbit / overnight}


def mfu_flops_per_token(config: dict, seq: int) -> float:
    """The FLOPs per input token that MFU counts for a LoRA step on a frozen base: 4 x the linear layers' parameters
    (forward, and the backward's input gradients; a frozen base computes no weight gradients; the embedding lookup
    left out, the output head counted) plus attention's scores and values, 12 x layers x hidden x seq (forward and
    backward, as PaLM counts them: the causal mask not discounted). LoRA's own matmuls are left out."""
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = hidden // heads * config.get("num_key_value_heads", heads)
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter) + hidden * config["vocab_size"]
    return 4.0 * linear + 12.0 * layers * hidden * seq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--lora-layers", type=int, default=16)
    p.add_argument("--target-fraction", type=float, required=True,
                   help="target tokens / input tokens of the data (bench/run.py prints both per step)")
    args = p.parse_args(argv)
    config = json.loads((args.model / "config.json").read_text())
    for key, value in per_token(config, args.lora_layers, args.target_fraction).items():
        print(f"{key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
