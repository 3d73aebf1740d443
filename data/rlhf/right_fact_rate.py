"""How often a policy's sampled answers name the right fact, on fixed questions: the RLHF walkthrough's measure of
whether GRPO against the reward model taught the policy anything true (the per-batch `contains` figure in
metrics.jsonl asks 4 other questions each batch and swings between 0 and 0.75; this asks every question the same
number of times, before and after).

    python data/rlhf/right_fact_rate.py runs/rlhf-sft/adapter runs/rlhf/adapter [--split train|val] [--samples 8]

Each adapter is loaded on the torch backend as configs/rlhf.yaml sets the policy up (its base, LoRA shape, dtype),
and answers each question of data/rlhf/grpo/<split>.jsonl `--samples` times with the sampler GRPO uses (temperature
1.0, 24 new tokens, the same seeds for every adapter); an answer is right when it holds the question's key words
(the built-in `contains` reward's rule). Prints one line per adapter: the share right and its standard error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def rate(adapter: Path, rows: list[dict], samples: int) -> tuple[float, int]:
    from overnight.backend import generator_seed, get_backend
    from overnight.config import build_config
    from overnight.data.tokenizer import encode_prompt, load_tokenizer
    from overnight.models.provided import resolve_model_path
    from overnight.runs import init_adapter

    # output.dir: nothing is written; a folder of its own, so an adapter inside runs/rlhf is not "this run's"
    cfg = build_config(ROOT / "configs" / "rlhf.yaml", {}, [f"lora.init_from={adapter}", "backend=torch",
                                                            f"output.dir={tempfile.mkdtemp()}"])
    cfg.model.path = resolve_model_path(cfg.model.path, say=lambda _: None)
    weights = init_adapter.check(cfg, warn=lambda _: None)
    backend = get_backend("torch", announce=lambda _: None)
    backend.setup(cfg, cfg.train.seed)
    init_adapter.load_into(backend, weights)
    tok = load_tokenizer(Path(cfg.model.path))
    prompts, seeds, answers = [], [], []
    for i, row in enumerate(rows):
        prompt = np.asarray(encode_prompt(tok, row, "chat"), dtype=np.int32)
        for k in range(samples):  # the rows of one prompt adjacent: it is prefilled once
            prompts.append(prompt)
            seeds.append(generator_seed(cfg.train.seed * 1_000_003 + i * 1009 + k))
            answers.append(row["answer"])
    right = 0
    for start in range(0, len(prompts), 64):
        out = backend.sample(prompts[start:start + 64], seeds[start:start + 64], cfg.grpo.max_new_tokens,
                             cfg.grpo.temperature, 1.0, tok.stop_ids)
        for ids, answer in zip(out, answers[start:start + 64]):
            right += answer in tok.decode([t for t in ids.tolist() if t >= 0])
    return right / (len(rows) * samples), len(rows) * samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", type=Path)
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    path = ROOT / "data" / "rlhf" / "grpo" / f"{args.split}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for adapter in args.adapters:
        share, n = rate(adapter.resolve(), rows, args.samples)
        print(f"{adapter}: {share:.3f} of {n} sampled answers name the right fact (standard error "
              f"{math.sqrt(share * (1 - share) / n):.3f}; {len(rows)} questions of {path.name})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
