"""What model scale and vocabulary width do to a training step's peak memory, measured by wait4 on this machine.

    .venv/bin/python bench/memory.py scale   [--backends torch,mlx]        # a ~1B bf16 model vs the tiny one
    .venv/bin/python bench/memory.py vocab   [--backends torch,mlx] [--methods sft,dpo,grpo]

Each figure is one child process (`bench/memory.py step ...`): the backend's real setup (load, quantize, LoRA)
and one real train_step on a batch of random token ids, nothing else; the parent reads the child's peak RSS from
os.wait4. Random weights are written in bf16 by this script, never downloaded.

- scale: a Llama-shaped model of about 0.96B parameters (hidden 2048, 16 layers, 49k vocabulary, bf16 on disk in
  3 shards), one 4-bit step at batch 1 x 64 tokens, minus the same command's peak on the tiny model (what the
  framework itself costs), as a multiple of the bf16 weight size. With --repeat 2 the mlx step runs twice, the
  second launch reading the quantized-weight cache (a resume).
- vocab: a small model (hidden 256, 2 layers) with a 128k and a 32k vocabulary, batch 8 x 1024 target tokens,
  per method; the step's peak at 128k minus the peak at 32k. `--full-logits` scores the targets with the model's
  own forward all at once (what overnight did before the chunked head), for the before figure.

Writes OUT.json and OUT.md (default bench/results/memory-<mode>).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1024 ** 3


def build_model(out: Path, *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                shards: int = 1) -> Path:
    """A random Llama-shaped bf16 model folder: the tiny model's tokenizer and config, wider weights, `shards`
    safetensors files with an index. Written tensor by tensor, so building a 1B model needs ~1 shard of RAM."""
    import torch
    from safetensors.torch import save_file

    from overnight.models.tiny import build_tiny_model

    if (out / "config.json").is_file():
        return out
    build_tiny_model(out, vocab_size=512)
    (out / "model.safetensors").unlink()
    config = json.loads((out / "config.json").read_text())
    config.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=intermediate, head_dim=hidden // heads,
                  torch_dtype="bfloat16", tie_word_embeddings=False)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(0)
    head_dim = hidden // heads

    def normal(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    names = ["model.embed_tokens.weight"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (heads * head_dim, hidden)),
                            ("self_attn.k_proj", (kv_heads * head_dim, hidden)),
                            ("self_attn.v_proj", (kv_heads * head_dim, hidden)),
                            ("self_attn.o_proj", (hidden, heads * head_dim)),
                            ("mlp.gate_proj", (intermediate, hidden)), ("mlp.up_proj", (intermediate, hidden)),
                            ("mlp.down_proj", (hidden, intermediate)),
                            ("input_layernorm", (hidden,)), ("post_attention_layernorm", (hidden,))):
            names.append(p + name + ".weight")
            shapes[p + name + ".weight"] = shape
    names += ["model.norm.weight", "lm_head.weight"]
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per_shard:(s + 1) * per_shard]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        tensors = {n: (torch.ones(shapes[n], dtype=torch.bfloat16) if len(shapes[n]) == 1
                       else normal(*shapes[n], std=(hidden ** -0.5 if n == "lm_head.weight" else 0.02)))
                   for n in part}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
        del tensors
    if shards > 1:
        total = sum(2 * _numel(shapes[n]) for n in names)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


SHAPES = {
    "llama-0.96b-bf16": dict(vocab=49152, hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632, shards=3),
    "tiny-bf16": dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
    "wide-32k": dict(vocab=32768, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512),
    "wide-131k": dict(vocab=131072, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512),
}


def model_folder(models: Path, name: str) -> Path:
    """SHAPES[name] built under ``models`` by a child process: this process never holds torch or a model, since a
    child's peak RSS (ru_maxrss) starts from its parent's RSS at the fork."""
    out = models / name
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "build", "--out", str(out), "--shape", name], check=True)
    return out


def weight_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- the child


def step(args) -> None:
    """One setup + one train_step in this process; prints a JSON line."""
    import numpy as np

    from overnight.backend import Batch, get_backend
    from overnight.config import Config, validate

    cfg = Config()
    cfg.model.path = args.model
    cfg.model.quantization.bits = args.bits
    cfg.model.dtype = args.dtype
    cfg.model.max_seq_length = args.length
    cfg.data.method = args.method
    cfg.lora.layers = -1
    cfg.grpo.beta = 0.04
    cfg.grpo.rewards = ["exact_match"]
    validate(cfg)
    backend = get_backend(args.backend, announce=lambda *a, **k: None)
    started = time.time()
    info = backend.setup(cfg, 0)
    setup_s = time.time() - started
    # This process's peak so far (the load, the quantization, LoRA): which of setup and step sets the peak.
    setup_peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    if args.full_logits:  # the model's own forward on every target at once: the path before the chunked head
        if hasattr(backend, "_plain_head"):
            backend._plain_head = False
        else:
            backend._head = None
            backend._build_steps()
    rng = np.random.default_rng(0)
    rows, length = args.rows, args.length + 1
    ids = rng.integers(4, 500, size=(rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.float32)
    mask[:, 0] = 0
    batch = Batch(ids, mask, np.ones((rows, length), np.int32), 0, paired=args.method in ("dpo", "orpo"))
    if args.method == "grpo":
        batch.advantages = rng.normal(size=rows).astype(np.float32)
    started = time.time()
    result = backend.train_step([batch], 1e-4)
    print(json.dumps({"loss": result.loss, "step_s": time.time() - started, "setup_s": setup_s,
                      "setup_peak_rss_gb": round(setup_peak_gb, 3),
                      "details": {k: str(v) for k, v in info.details.items()}}))


def measured(backend: str, model: Path, *, method="sft", rows=1, length=64, bits=4, dtype="auto",
             full_logits=False, env=None) -> dict:
    """The child's JSON line plus its peak RSS (GB), from os.wait4 on the child itself."""
    cmd = [sys.executable, __file__, "step", "--backend", backend, "--model", str(model), "--method", method,
           "--rows", str(rows), "--length", str(length), "--bits", str(bits), "--dtype", dtype]
    if full_logits:
        cmd.append("--full-logits")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
        if status != 0 or not lines:
            raise RuntimeError(f"{' '.join(cmd)} failed ({status}):\n{err.read()[-3000:]}")
    result = json.loads(lines[-1])
    result["peak_rss_gb"] = usage.ru_maxrss * 1024 / GB  # Linux reports KiB
    return result


# ---------------------------------------------------------------------------------------------- the modes


def scale(args) -> dict:
    models = Path(args.models)
    big, tiny = model_folder(models, "llama-0.96b-bf16"), model_folder(models, "tiny-bf16")
    size = weight_bytes(big)
    out = {"model": str(big), "weights_gb": size / GB, "runs": {}}
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = {"OVERNIGHT_CACHE": cache}
            base = measured(backend, tiny, length=args.length, dtype=args.dtype, env=env)
            runs = [measured(backend, big, length=args.length, dtype=args.dtype, env=env) for _ in range(args.repeat)]
        for i, run in enumerate(runs):
            over = run["peak_rss_gb"] - base["peak_rss_gb"]
            out["runs"][f"{backend}/{args.dtype}#{i + 1}"] = {
                "peak_rss_gb": run["peak_rss_gb"], "setup_peak_rss_gb": run["setup_peak_rss_gb"],
                "tiny_peak_rss_gb": base["peak_rss_gb"], "over_tiny_gb": over,
                "x_bf16_weights": over * GB / size, "tokens": args.length, "setup_s": run["setup_s"],
                "step_s": run["step_s"], "base_weights": run["details"].get("base_weights"),
                "quantization": run["details"].get("quantization"), "loss": run["loss"]}
            print(backend, i + 1, json.dumps(out["runs"][f"{backend}/{args.dtype}#{i + 1}"]), flush=True)
    return out


def vocab(args) -> dict:
    models = Path(args.models)
    shapes = {32768: model_folder(models, "wide-32k"), 131072: model_folder(models, "wide-131k")}
    out = {"rows": args.rows, "length": args.length, "runs": {}}
    for backend in args.backends.split(","):
        for method in args.methods.split(","):
            figures = {v: measured(backend, m, method=method, rows=args.rows, length=args.length, bits=args.bits,
                                   full_logits=args.full_logits) for v, m in shapes.items()}
            key = f"{backend}/{method}" + ("/full-logits" if args.full_logits else "")
            out["runs"][key] = {"peak_128k_gb": figures[131072]["peak_rss_gb"],
                                "peak_32k_gb": figures[32768]["peak_rss_gb"],
                                "diff_gb": figures[131072]["peak_rss_gb"] - figures[32768]["peak_rss_gb"],
                                "step_s_128k": figures[131072]["step_s"], "bits": args.bits,
                                "head": figures[131072]["details"].get("loss_head")}
            print(key, json.dumps(out["runs"][key]), flush=True)
    return out


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# bench/memory.py {result['mode']}", "", f"`{' '.join(result['argv'])}`", ""]
    for key, run in result["runs"].items():
        lines.append(f"- **{key}**: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in run.items()))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    child = sub.add_parser("step")
    child.add_argument("--backend", required=True)
    child.add_argument("--model", required=True)
    child.add_argument("--method", default="sft")
    child.add_argument("--rows", type=int, default=1)
    child.add_argument("--length", type=int, default=64)
    child.add_argument("--bits", type=int, default=4)
    child.add_argument("--dtype", default="auto")
    child.add_argument("--full-logits", action="store_true")
    build = sub.add_parser("build")
    build.add_argument("--out", required=True)
    build.add_argument("--shape", required=True, choices=sorted(SHAPES))
    for name in ("scale", "vocab"):
        mode = sub.add_parser(name)
        mode.add_argument("--backends", default="torch,mlx")
        mode.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "overnight-bench-models"))
        mode.add_argument("--out", default=None)
    sub.choices["scale"].add_argument("--repeat", type=int, default=2)
    sub.choices["scale"].add_argument("--length", type=int, default=64, help="tokens of the one row")
    sub.choices["scale"].add_argument("--dtype", default="auto", help="model.dtype")
    sub.choices["vocab"].add_argument("--methods", default="sft,dpo,grpo")
    sub.choices["vocab"].add_argument("--rows", type=int, default=8)
    sub.choices["vocab"].add_argument("--length", type=int, default=1024)
    sub.choices["vocab"].add_argument("--bits", type=int, default=4)
    sub.choices["vocab"].add_argument("--full-logits", action="store_true")
    args = p.parse_args(argv)
    if args.mode == "step":
        return step(args)
    if args.mode == "build":
        build_model(Path(args.out), **SHAPES[args.shape])
        return None
    out = Path(args.out or ROOT / "bench" / "results" / f"memory-{args.mode}")
    result = {"mode": args.mode, "argv": sys.argv, **(scale(args) if args.mode == "scale" else vocab(args))}
    earlier = out.with_suffix(".json")
    if earlier.is_file():  # a run of some backends or methods adds to the figures of the others
        result["runs"] = {**json.loads(earlier.read_text()).get("runs", {}), **result["runs"]}
    write(result, out)


if __name__ == "__main__":
    main()
