"""Side-by-side benchmark: overnight vs each engine's own reference trainer, same model, data, LoRA, batch.

    .venv/bin/python bench/run.py                        # this machine's short default
    .venv/bin/python bench/run.py --model /path/to/hf-model --steps 200 --warmup 20 --seq 2048 \
        --batch-size 8 --rounds 5 --backends torch,mlx --bits 0,4 --out bench/results/big

Pairs: torch = overnight's torch backend vs HF Trainer + PEFT (fp32 on CPU); mlx = overnight's mlx
backend vs mlx_lm.tuner.trainer.train (mlx_lm.lora's trainer); grpo = overnight's GRPO sampler (torch) vs
transformers' model.generate(do_sample=True) on the same micro-batch, plus the real grpo run's seconds per step
and eval. Runs alternate A B A B ..., each in its own subprocess. See bench/README.md for the definitions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "worker.py"
REFERENCE = {"torch": ("hf", "HF Trainer + PEFT"), "mlx": ("mlxlm", "mlx_lm.lora trainer"),
             "grpo": ("hfgen", "transformers generate")}
# The grpo pair's prompts: questions whose answers run past grpo.max_new_tokens, so the measured steps sample
# full-length completions (as a GRPO night mostly does) rather than stopping at an early end of sequence.
GRPO_TOPICS = ["the city of Paris", "how bees make honey", "the history of the bicycle", "why the sky is blue",
               "how a steam engine works", "the life of a river otter", "how to bake bread", "the planet Jupiter",
               "the rules of chess", "how volcanoes form", "the Roman aqueducts", "how rainbows appear",
               "the migration of whales", "how a compass works", "the invention of paper", "the water cycle",
               "how glaciers move", "the game of cricket", "how vaccines train the body", "the Great Wall of China",
               "how clocks keep time", "the life cycle of a frog", "how airplanes fly", "the ocean tides",
               "how coffee is grown", "the moons of Mars", "how bridges carry weight", "the history of tea",
               "how ants find food", "the aurora borealis", "how a piano makes sound", "the deserts of Africa"]
DEFAULT_CADENCE = 250  # overnight's default eval.every_steps and checkpoint.every_steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/smollm2-hf", help="Hugging Face model folder (both engines load it)")
    p.add_argument("--data", default=str(ROOT / "data"), help="folder with train.jsonl and val.jsonl (chat rows)")
    p.add_argument("--backends", default="torch,mlx", help="comma list of torch, mlx, grpo")
    p.add_argument("--bits", default="0,4", help="comma list of 0 (plain LoRA) and 4 (QLoRA)")
    p.add_argument("--steps", type=int, default=25, help="optimizer steps per run (warm-up included)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the steady-state rate")
    p.add_argument("--rounds", type=int, default=3, help="A B pairs per setting")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="max_seq_length")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--layers", type=int, default=16, help="LoRA on the last N blocks (-1 all)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--render", metavar="RESULT.json",
                   help="runs nothing: re-derive the default-cadence shares from a result's measured parts and "
                        "rewrite its JSON and markdown (for results written before a figure was added)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest"),
                   help="result path without extension: writes OUT.json and OUT.md")
    p.add_argument("--overnight-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra --set for the overnight side (e.g. eval.predictions=0)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    g = p.add_argument_group("grpo pair")
    g.add_argument("--grpo-batch", type=int, default=4, help="prompts per micro-batch (train.batch_size)")
    g.add_argument("--grpo-group", type=int, default=4, help="completions per prompt (grpo.group_size)")
    g.add_argument("--new-tokens", type=int, default=64, help="grpo.max_new_tokens; the sampler pair draws all")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--reps", type=int, default=2, help="timed micro-batches per sampler run (after a warm-up)")
    g.add_argument("--grpo-steps", type=int, default=3, help="steps of the real grpo run (the first is warm-up)")
    g.add_argument("--eval-prompts", type=int, default=16, help="grpo.eval_prompts of the real grpo run")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per run (OMP/MKL/torch), the same for both sides; 0 leaves the default. "
                        "On a machine shared with other work, 1 avoids threads spinning at barriers")
    return p.parse_args(argv)


def make_batches(args, path: Path) -> dict:
    """The steps' batches exactly as overnight's own data pipeline yields them for this config."""
    from overnight import data
    from overnight.config import build_config

    cfg = build_config(None, {"model.path": args.model, "data.path": args.data, "train.batch_size": args.batch_size,
                              "model.max_seq_length": args.seq, "train.seed": args.seed})
    tok = data.load_tokenizer(Path(args.model))
    train_file, _ = data.find_data_files(Path(args.data))
    stream = data.TrainStream(train_file, tok, cfg)
    arrays, inputs, targets = {"count": np.array(args.steps)}, 0, 0
    for i in range(args.steps):
        b = stream.next_batch()
        arrays[f"ids_{i}"], arrays[f"mask_{i}"], arrays[f"attn_{i}"] = b.input_ids, b.loss_mask, b.attention_mask
        if i >= args.warmup:
            inputs += int(b.attention_mask.sum())
            targets += int(b.loss_mask.sum())
    stream.close()
    np.savez(path, **arrays)
    measured = args.steps - args.warmup
    return {"input_tokens_per_step": inputs / measured, "target_tokens_per_step": targets / measured}


def base_spec(args, batches: Path) -> dict:
    """What every run of a setting shares (bench/worker.py reads it); each run adds its side, backend and bits."""
    return {"model": args.model, "data": args.data, "batches": str(batches), "steps": args.steps,
            "batch_size": args.batch_size, "seq": args.seq, "rank": args.rank, "alpha": args.alpha,
            "dropout": args.dropout, "layers": args.layers, "targets": args.targets.split(","), "lr": args.lr,
            "seed": args.seed, "overnight_set": args.overnight_set, "threads": args.threads}


def run_one(spec: dict, workdir: Path, timeout: int) -> dict:
    spec_path = workdir / f"spec-{spec['tag']}.json"
    result_path = workdir / f"result-{spec['tag']}.json"
    spec_path.write_text(json.dumps(spec))
    log = open(workdir / f"log-{spec['tag']}.txt", "w")
    # OVERNIGHT_SUPERVISOR=off: `overnight train` trains in this process (not a supervised child) where the timers are.
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OVERNIGHT_SUPERVISOR="off")
    if spec.get("threads"):
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.Popen([sys.executable, str(WORKER), str(spec_path), str(result_path)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0 or not result_path.exists():
        tail = (workdir / f"log-{spec['tag']}.txt").read_text()[-3000:]
        raise RuntimeError(f"run {spec['tag']} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(result_path.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0  # this child alone (wait4), Linux reports KiB
    return result


def steady(result: dict, warmup: int) -> float:
    ends = result["step_ends"]
    return (len(ends) - warmup) / (ends[-1] - ends[warmup - 1]) if warmup > 0 else len(ends) / ends[-1]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True).stdout.strip() or cpu
        except OSError:
            pass
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "mlx", "mlx_lm", "numpy"):
        try:
            from importlib.metadata import version

            versions[name] = version(name if name != "mlx_lm" else "mlx-lm")
        except Exception:  # noqa: BLE001
            pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions, "loadavg_start": load}


def summarize(args, pair: str, bits: int, runs: dict[str, list[dict]], tokens: dict) -> dict:
    ref_side = REFERENCE[pair][0]
    out = {"backend": pair, "bits": bits, "reference": REFERENCE[pair][1], "sides": {}}
    for side in ("overnight", ref_side):
        rates = [steady(r, args.warmup) for r in runs[side]]
        rss = [r["peak_rss_mb"] for r in runs[side]]
        sps = statistics.median(rates)
        entry = {"steps_per_s": sps, "steps_per_s_runs": rates,
                 "input_tokens_per_s": sps * tokens["input_tokens_per_step"],
                 "target_tokens_per_s": sps * tokens["target_tokens_per_step"],
                 "peak_rss_mb": statistics.median(rss), "peak_rss_mb_runs": rss,
                 "first_loss": runs[side][0]["first_loss"], "wall_s_runs": [r["wall_s"] for r in runs[side]]}
        entry["compute_dtype"] = runs[side][0].get("compute_dtype")
        if all("peak_gpu_mb" in r for r in runs[side]):  # CUDA: torch's own peak allocation in each run
            entry["peak_gpu_mb"] = statistics.median(r["peak_gpu_mb"] for r in runs[side])
            entry["peak_gpu_reserved_mb"] = statistics.median(r["peak_gpu_reserved_mb"] for r in runs[side])
        if side == "overnight":
            entry.update(overhead(args, runs[side]))
        out["sides"][side] = entry
    a, b = out["sides"]["overnight"], out["sides"][ref_side]
    out["speedup_steps_per_s"] = a["steps_per_s"] / b["steps_per_s"]
    out["speedup_runs"] = [x / y for x, y in zip(a["steps_per_s_runs"], b["steps_per_s_runs"])]
    out["peak_rss_ratio"] = a["peak_rss_mb"] / b["peak_rss_mb"]
    if "peak_gpu_mb" in a and "peak_gpu_mb" in b:
        out["peak_gpu_ratio"] = a["peak_gpu_mb"] / b["peak_gpu_mb"]
    out["same_data_first_loss_rel_diff"] = abs(a["first_loss"] - b["first_loss"]) / abs(b["first_loss"])
    return out


def overhead(args, runs: list[dict]) -> dict:
    """What overnight spends outside train_step, as shares of the loop's wall time.

    measured: in these runs (default cadence, so the only eval, predictions and checkpoint are the ones at the
    final step). default cadence: one cycle of it projected from the measured parts (cadence_shares), split into
    the loop + checkpoint overhead (data, metrics, progress line, heartbeat, checkpoint save and rotation: what
    overnight adds to any trainer) and the evaluation with its predictions (work the user's config asks for,
    which a reference trainer configured to evaluate pays too)."""
    measured, parts = [], []
    for r in runs:
        n = len(r["step_s"])
        events = r["eval_s"] + r["generate_s"] + r["checkpoint_s"]  # predictions run after the eval, outside it
        per_step_other = max(0.0, r["outside_step_s"] - events) / n
        measured.append(r["outside_step_s"] / r["loop_s"])
        parts.append({"per_step_loop_ms": per_step_other * 1e3, "eval_s": r["eval_s"], "generate_s": r["generate_s"],
                      "checkpoint_s": r["checkpoint_s"], "step_s": statistics.mean(r["step_s"][args.warmup:]),
                      "steps": n})
    return {"overhead_measured": statistics.median(measured), "overhead_parts": parts, **cadence_shares(parts)}


def cadence_shares(parts: list[dict]) -> dict:
    """Shares of one default-cadence cycle (DEFAULT_CADENCE steps, one eval with its predictions, one checkpoint)
    from each run's measured parts; medians over runs."""
    loop_ckpt, evals, total = [], [], []
    for p in parts:
        per_step_loop = p["per_step_loop_ms"] / 1e3
        cycle = DEFAULT_CADENCE * (p["step_s"] + per_step_loop) + p["eval_s"] + p["generate_s"] + p["checkpoint_s"]
        loop_ckpt.append((DEFAULT_CADENCE * per_step_loop + p["checkpoint_s"]) / cycle)
        evals.append((p["eval_s"] + p["generate_s"]) / cycle)
        total.append(loop_ckpt[-1] + evals[-1])
    return {"overhead_default_cadence": statistics.median(loop_ckpt),
            "eval_share_default_cadence": statistics.median(evals),
            "outside_step_default_cadence": statistics.median(total)}


def write_grpo_data(folder: Path, val_rows: int) -> Path:
    """train.jsonl and val.jsonl of chat rows asking for a paragraph (GRPO_TOPICS): val_rows for the eval."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": f"Write a detailed paragraph about {t}."}]} for t in GRPO_TOPICS]
    split = max(1, len(rows) - val_rows)
    for name, part in (("train.jsonl", rows[:split]), ("val.jsonl", rows[split:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def grpo_sets(args, bits: int) -> list[str]:
    """The grpo pair's config as --set items: the sampler side's backend.setup and the step side's CLI both read it."""
    return [f"model.path={args.model}", "data.method=grpo", f"model.quantization.bits={bits}",
            f"model.max_seq_length={args.seq}", f"lora.rank={args.rank}", f"lora.alpha={args.alpha}",
            f"lora.dropout={args.dropout}", f"lora.layers={args.layers}", f"lora.targets=[{args.targets}]",
            f"train.learning_rate={args.lr}", f"train.seed={args.seed}", f"train.batch_size={args.grpo_batch}",
            f"grpo.group_size={args.grpo_group}", f"grpo.max_new_tokens={args.new_tokens}",
            f"grpo.temperature={args.temperature}", f"grpo.top_p={args.top_p}",
            "grpo.rewards=[length_penalty=50]", f"grpo.eval_prompts={args.eval_prompts}"]


def make_grpo_prompts(args, data_dir: Path, path: Path) -> None:
    """The first micro-batch's prompt ids exactly as overnight's grpo pipeline encodes them (chat template)."""
    from overnight import data
    from overnight.config import build_config
    from overnight.data.batches import _open_source
    from overnight.methods import grpo, rewards

    cfg = build_config(None, None, grpo_sets(args, 0))
    tok = data.load_tokenizer(Path(args.model))
    source = _open_source(data_dir / "train.jsonl", tok, cfg, streaming=False)
    rows = grpo.PromptRows(source, tok, cfg, rewards.load_rewards(cfg))
    prompts = [rows.get(i)[0] for i in range(args.grpo_batch)]
    np.savez(path, count=np.array(len(prompts)), **{f"p_{i}": p for i, p in enumerate(prompts)})


def run_grpo_pair(args, bits: int, base: dict, work: Path) -> dict:
    data_dir = write_grpo_data(work / "grpo-data", args.eval_prompts)
    prompts = work / "grpo-prompts.npz"
    make_grpo_prompts(args, data_dir, prompts)
    spec = dict(base, backend="torch", bits=bits, sets=grpo_sets(args, bits), prompts=str(prompts),
                group=args.grpo_group, new_tokens=args.new_tokens, temperature=args.temperature, top_p=args.top_p,
                reps=args.reps, grpo_data=str(data_dir), batch=args.grpo_batch)
    runs: dict[str, list[dict]] = {"grpo-sampler": [], "hfgen": []}
    tokens = args.grpo_batch * args.grpo_group * args.new_tokens
    for rnd in range(args.rounds):
        for side in runs:
            tag = f"grpo-{bits}-{side}-{rnd}"
            t0 = time.time()
            r = run_one(dict(spec, side=side, tag=tag, out_dir=str(work / tag)), work, args.timeout)
            runs[side].append(r)
            print(f"{tag}: {tokens / statistics.median(r['sample_s']):.1f} generated tokens/s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB, {time.time() - t0:.0f} s", flush=True)
    tag = f"grpo-{bits}-step"
    step = run_one(dict(spec, side="grpo-step", tag=tag, steps=args.grpo_steps, out_dir=str(work / tag)), work,
                   args.timeout)
    shutil.rmtree(work / tag, ignore_errors=True)
    return summarize_grpo(args, bits, runs, step)


def summarize_grpo(args, bits: int, runs: dict[str, list[dict]], step: dict) -> dict:
    """Generated tokens/s (every row draws all new tokens: no stop token) of each sampler, medians over the runs of
    each run's median micro-batch; the real run's seconds per step (steady: first step left out) and eval."""
    tokens = args.grpo_batch * args.grpo_group * args.new_tokens

    def rate(times_per_run: list[list[float]]) -> tuple[float, list[float]]:
        rates = [tokens / statistics.median(t) for t in times_per_run]
        return statistics.median(rates), rates

    ours, ours_runs = rate([r["sample_s"] for r in runs["grpo-sampler"]])
    before, before_runs = rate([r["before_s"] for r in runs["grpo-sampler"]])
    ref, ref_runs = rate([r["sample_s"] for r in runs["hfgen"]])
    assert all(r["tokens"] == tokens for side in runs.values() for r in side), "a sampler drew fewer tokens"
    return {"backend": "grpo", "bits": bits, "reference": REFERENCE["grpo"][1],
            "shape": {"prompts": args.grpo_batch, "group": args.grpo_group, "new_tokens": args.new_tokens,
                      "temperature": args.temperature, "top_p": args.top_p},
            "sides": {"overnight": {"tokens_per_s": ours, "tokens_per_s_runs": ours_runs,
                                    "compute_dtype": runs["grpo-sampler"][0].get("compute_dtype"),
                                    "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs["grpo-sampler"])},
                      "before": {"tokens_per_s": before, "tokens_per_s_runs": before_runs},
                      "hfgen": {"tokens_per_s": ref, "tokens_per_s_runs": ref_runs,
                                "compute_dtype": runs["hfgen"][0].get("compute_dtype"),
                                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs["hfgen"])}},
            "speedup_vs_reference": ours / ref, "speedup_vs_before": ours / before,
            "same_tokens_as_before": all(r["same_tokens_as_before"] for r in runs["grpo-sampler"]),
            "device": runs["grpo-sampler"][0]["device"],
            "step": {k: step[k] for k in ("step_s", "sample_s_per_step", "sample_calls_per_step",
                                          "sampled_tokens_per_step", "eval_s", "eval_prompts")},
            "step_peak_rss_mb": step["peak_rss_mb"]}


def grpo_markdown(settings: list[dict]) -> list[str]:
    if not settings:
        return []
    shape = settings[0]["shape"]
    lines = ["", f"GRPO sampling ({settings[0]['device']}): one micro-batch of {shape['prompts']} prompts x group "
             f"{shape['group']} x {shape['new_tokens']} new tokens (every row draws all of them: no stop token), "
             f"temperature {shape['temperature']:g}, top_p {shape['top_p']:g}; generated tokens/s, medians. "
             "'before' is the sampler batching replaced (one prompt's group per call, a host read per token), "
             "run in the same process on the same model and seeds. The real grpo run: seconds per step (first step "
             "left out) with the sampling's share, and its final eval (greedy answers of grpo.eval_prompts prompts).",
             "",
             "| quant | sampler | generated tok/s | overnight / transformers generate | overnight / before | "
             "same tokens as before | grpo s/step | sampling s/step | eval s (prompts) |",
             "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for s in settings:
        quant = {0: "none", 4: "4-bit"}[s["bits"]]
        step = s["step"]
        step_s = f"{step['step_s']:.2f}" if step["step_s"] is not None else ""
        evals = f"{step['eval_s'][-1]:.1f} ({step['eval_prompts']})" if step["eval_s"] else ""
        lines.append(f"| {quant} | overnight | {s['sides']['overnight']['tokens_per_s']:.1f} | "
                     f"**{s['speedup_vs_reference']:.2f}x** | **{s['speedup_vs_before']:.2f}x** | "
                     f"{'yes' if s['same_tokens_as_before'] else 'NO'} | {step_s} | {step['sample_s_per_step']:.2f} | "
                     f"{evals} |")
        lines.append(f"| {quant} | before | {s['sides']['before']['tokens_per_s']:.1f} |  |  |  |  |  |  |")
        lines.append(f"| {quant} | {s['reference']} | {s['sides']['hfgen']['tokens_per_s']:.1f} |  |  |  |  |  |  |")
    return lines


def compute(settings: list[dict]) -> str:
    """The compute dtype each trainer ran in, as their runs recorded it; results from before it was recorded ran on
    the CPU in float32."""
    seen = {}
    for s in settings:
        for side, entry in s["sides"].items():
            name = "overnight" if side == "overnight" else s["reference"]
            if entry.get("compute_dtype"):
                seen.setdefault(name, entry["compute_dtype"])
    if not seen:
        return "fp32 compute"
    if len(set(seen.values())) == 1:
        return f"{next(iter(seen.values()))} compute"
    return "compute " + ", ".join(f"{name} {dtype}" for name, dtype in seen.items())


def markdown(result: dict) -> str:
    m = result["machine"]
    c = result["config"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'] or [])}, at end "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_end'] or [])}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
    ]
    if c.get("command"):
        lines.append(f"Command: `{c['command']}`.")
    training = [s for s in result["settings"] if s["backend"] != "grpo"]
    gpu = any("peak_gpu_mb" in e for s in training for e in s["sides"].values())
    lines += [
        f"Model {Path(c['model']).name}, {compute(training)}; LoRA rank {c['rank']}, alpha {c['alpha']:g} (scale "
        f"{c['alpha'] / c['rank']:g}), dropout {c['dropout']:g}, {c['targets']} on the last {c['layers']} blocks; "
        f"batch {c['batch_size']}, max_seq_length {c['seq']}, {c['steps']} steps ({c['warmup']} warm-up left out), "
        f"{c['rounds']} alternating rounds (A B A B ...), medians; CPU threads per run: "
        f"{c['threads'] or 'default'}. Tokens: non-padding input tokens "
        f"({result['tokens']['input_tokens_per_step']:.0f} per step; target tokens "
        f"{result['tokens']['target_tokens_per_step']:.0f}).",
        "",
        "| backend | quant | trainer | steps/s | input tok/s | peak RSS MB | "
        + ("peak GPU MB | " if gpu else "") + "overnight / ref steps/s | "
        + ("GPU memory ratio | " if gpu else "RSS ratio | ")
        + "loop+ckpt overhead, default cadence | eval+predictions, default cadence |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if gpu else ""),
    ] if training else [
        f"Model {Path(c['model']).name}, {compute(result['settings'])}; LoRA rank {c['rank']}, alpha {c['alpha']:g}, dropout "
        f"{c['dropout']:g}, {c['targets']} on the last {c['layers']} blocks; max_seq_length {c['seq']}; "
        f"{c['rounds']} alternating rounds; CPU threads per run: {c['threads'] or 'default'}."]
    for s in training:
        quant = {0: "none", 4: "4-bit"}[s["bits"]]
        for side, entry in s["sides"].items():
            name = "overnight" if side == "overnight" else s["reference"]
            ratio = f"**{s['speedup_steps_per_s']:.2f}x**" if side == "overnight" else ""
            rss = f"{s['peak_rss_ratio']:.2f}" if side == "overnight" else ""
            if gpu:  # on a GPU the memory that matters is the device's: torch's own peak allocation
                rss = f"{s['peak_gpu_ratio']:.2f}" if side == "overnight" and "peak_gpu_ratio" in s else ""
            over = f"{100 * entry['overhead_default_cadence']:.2f}%" if side == "overnight" else ""
            evals = f"{100 * entry['eval_share_default_cadence']:.2f}%" if side == "overnight" else ""
            lines.append(f"| {s['backend']} | {quant} | {name} | {entry['steps_per_s']:.3f} | "
                         f"{entry['input_tokens_per_s']:.0f} | {entry['peak_rss_mb']:.0f} | "
                         + (f"{entry['peak_gpu_mb']:.0f} | " if gpu and "peak_gpu_mb" in entry else "| " if gpu else "")
                         + f"{ratio} | {rss} | {over} | "
                         f"{evals} |")
    lines += grpo_markdown([s for s in result["settings"] if s["backend"] == "grpo"])
    return "\n".join(lines) + "\n"


def render(path: Path) -> int:
    result = json.loads(path.read_text())
    for setting in result["settings"]:
        if setting["backend"] != "grpo":
            ours = setting["sides"]["overnight"]
            ours.update(cadence_shares(ours["overhead_parts"]))
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(Path(args.render))
    if args.warmup >= args.steps:
        raise SystemExit("--warmup must be smaller than --steps")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="overnight-bench-"))
    info = machine()
    batches = work / "batches.npz"
    tokens = make_batches(args, batches)
    base = base_spec(args, batches)
    settings = []
    try:
        for pair in [b.strip() for b in args.backends.split(",") if b.strip()]:
            for bits in [int(b) for b in args.bits.split(",")]:
                if pair == "grpo":
                    settings.append(run_grpo_pair(args, bits, base, work))
                    s = settings[-1]
                    print(f"== grpo bits={bits}: overnight {s['sides']['overnight']['tokens_per_s']:.1f} generated "
                          f"tokens/s, {s['speedup_vs_reference']:.2f}x transformers generate, "
                          f"{s['speedup_vs_before']:.2f}x before", flush=True)
                    continue
                runs: dict[str, list[dict]] = {"overnight": [], REFERENCE[pair][0]: []}
                for rnd in range(args.rounds):
                    for side in ("overnight", REFERENCE[pair][0]):
                        tag = f"{pair}-{bits}-{side}-{rnd}"
                        spec = dict(base, side=side, backend=pair, bits=bits, tag=tag, out_dir=str(work / tag))
                        t0 = time.time()
                        r = run_one(spec, work, args.timeout)
                        runs[side].append(r)
                        print(f"{tag}: {steady(r, args.warmup):.3f} steps/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                              f"{time.time() - t0:.0f} s", flush=True)
                        shutil.rmtree(work / tag, ignore_errors=True)
                settings.append(summarize(args, pair, bits, runs, tokens))
                s = settings[-1]
                print(f"== {pair} bits={bits}: overnight/ref {s['speedup_steps_per_s']:.2f}x steps/s, "
                      f"RSS ratio {s['peak_rss_ratio']:.2f}, loop+checkpoint overhead "
                      f"{100 * s['sides']['overnight']['overhead_default_cadence']:.2f}%, eval+predictions "
                      f"{100 * s['sides']['overnight']['eval_share_default_cadence']:.2f}% (default cadence)",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = {k: getattr(args, k) for k in ("model", "data", "steps", "warmup", "rounds", "batch_size", "seq", "rank",
                                             "alpha", "dropout", "layers", "targets", "lr", "seed", "overnight_set", "threads",
                                             "grpo_batch", "grpo_group", "new_tokens", "temperature", "top_p", "reps",
                                             "grpo_steps", "eval_prompts")}
    config["command"] = " ".join([Path(sys.executable).name, "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"machine": info, "config": config, "tokens": tokens, "token_definition":
              "input_tokens: non-padding input tokens (attention_mask sum); target_tokens: loss-mask tokens",
              "settings": settings, "loadavg_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
