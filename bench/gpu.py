"""The CUDA path measured in one go (run it through bench/gpu.sh, which makes overnight and any carried wheels
importable first). Every step writes its figures to files and a failed step is recorded, never the end of the
script. The steps, in the order they run (what the open issues need most first, since a GPU session is short):

  env         device, versions, the device's bf16 peak (its data sheet's dense figure) and a measured matmul rate
  cuda_tests  `pytest -m cuda` on the test files that hold cuda tests (the Liger kernel's among them; the dry run
              only collects them)
  resume      a 4-bit run SIGKILLed and continued with --auto-resume, losses exact (tests/test_faults.py's case)
  build       a Llama-3-8B-width model with random bf16 weights built here (no download) and fewer blocks than 32
              (--blocks: said so); kept in /tmp, so a second call on the same machine loads it again
  llama8b_*   bench/run.py's torch pair (overnight vs HF Trainer + PEFT + bitsandbytes, QLoRA nf4, bf16) on it,
              batch x seq 8 x 2048, then overnight alone with train.deterministic=false (what the global
              deterministic mode costs); 16 x 1024 comes later
  grpo        bench/run.py's grpo pair on SmolLM2 (4-bit): overnight's batched sampler vs the same sampler one
              prompt's group per call ("before", in the same process) vs transformers' generate, 4 prompts x group 4
              x 64 new tokens, generated tokens/s ([5/8]'s figure: decoding is memory-bound on a GPU), plus the
              real grpo run's seconds per step and eval
  llama8b_8x2048_liger  overnight alone at 8 x 2048 with model.loss_kernel=liger: tokens/s and peak GPU memory
              beside the pair's overnight side (the chunked head), for the loss kernel's default
  smollm2     the torch pair on SmolLM2-135M: the real folder where one is found (--smollm2 or overnight's model
              cache), else random weights of its shape (said so in the result)
  mlx_tests   the mlx backend's tests on this GPU, where mlx with its CUDA backend imports (else skipped, said so)

Time: each step has a budget (FULL below), enforced by the timeouts of the processes it starts, and the whole run a
deadline (--deadline-s, counted from bench/gpu.sh's start, wheel installs included): a step whose budget no longer
fits before the deadline is recorded as "not run: time" and the next one that fits still runs, so the command ends
inside one device call with what it measured written down. The run ends by printing the command for the steps it
did not reach; `--merge A.json B.json --out OUT` (no GPU needed) puts two such runs of one device together.

tokens/s: non-padding input tokens per second of the steady steps. MFU = tokens/s x bench/flops.py's
mfu_flops_per_token (4 x linear parameters for a frozen base, plus attention) / the device's bf16 peak.
Files: OUT.json and OUT.md only (bench/run.py's own results are embedded), since a device call returns few files.
`--dry-run` runs every step on CPU at tiny sizes into a temp folder (CI runs it, so the script cannot rot).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import flops  # noqa: E402
import memory  # noqa: E402
import run as pairs  # noqa: E402

# Dense bf16 tensor-core TFLOP/s from the vendors' data sheets (no sparsity), matched in this order on the name.
BF16_PEAK_TFLOPS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
                    ("RTX 4090", 165.0), ("RTX 6000 Ada", 364.0)]
# Written into the built model's folder when it is complete (a killed build leaves none).
BUILT = ".built"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LLAMA8B = dict(vocab=128256, hidden=4096, heads=32, kv_heads=8, intermediate=14336)  # Llama-3.1-8B's widths
SMOLLM2 = dict(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536)
WORDS = ("the river runs past old stone bridges while birds call over quiet fields and a slow wind moves the "
         "grass near small houses where people cook bread and talk about weather markets music and long roads").split()

# The full run's sizes and each step's budget in seconds: the cap the step's processes run under (a pair's two
# runs half each, grpo's three runs a third each). The deadline (from bench/gpu.sh's start) leaves 50 s of a
# 600 s device call for the last step's overrun and the files; the steps up to grpo (what the open issues wait for)
# fit inside it even if each takes its whole budget (475 s after ~30 s of wheel installs and env).
FULL = dict(shapes=[(8, 2048), (16, 1024)], steps=12, warmup=4, blocks=4, rank=16, deadline_s=550,
            budget=dict(cuda_tests=110, resume=75, build=45, llama8b_8x2048=100, llama8b_8x2048_det_off=55, grpo=90,
                        llama8b_8x2048_liger=55, smollm2=60, llama8b_16x1024=90, mlx_tests=45))
# The dry run checks that every step still runs, at the least cost: one shape (the second runs the same code), the
# smollm2 step only finds its model (its pair is the same code as llama8b_*), the GPU tests only collected.
DRY = dict(shapes=[(2, 64)], steps=3, warmup=1, blocks=2, rank=4, deadline_s=3600,
           budget=dict(cuda_tests=60, resume=30, build=30, llama8b_2x64=120, llama8b_2x64_det_off=60, grpo=120,
                       llama8b_2x64_liger=60, smollm2=30, mlx_tests=10))
# bench/gpu.sh exports its start (epoch seconds) here, so the deadline counts the wheel installs before gpu.py.
STARTED_ENV = "OVERNIGHT_GPU_STARTED"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny sizes, into a temp folder")
    p.add_argument("--out", help="result path without extension (default bench/results/<gpu>; dry run: a temp folder)")
    p.add_argument("--smollm2", help="a SmolLM2-135M Hugging Face folder (default: overnight's model cache)")
    p.add_argument("--blocks", type=int, help="blocks of the 8B-width model (32 in the real one)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (warm-up included)")
    p.add_argument("--only", help="comma list of the steps to run, by name (env always runs; the llama8b_* steps "
                                  "bring build along)")
    p.add_argument("--deadline-s", type=float,
                   help=f"seconds from bench/gpu.sh's start by which the run ends: a step whose budget does not fit "
                        f"in what is left is recorded as not run (default {FULL['deadline_s']}; dry run "
                        f"{DRY['deadline_s']})")
    p.add_argument("--merge", nargs="+", metavar="RESULT.json",
                   help="runs nothing: puts the results of runs on one device together into --out (a later run's "
                        "step replaces an earlier one's where it ran)")
    args = p.parse_args(argv)
    if args.merge:
        if not args.out:
            p.error("--merge needs --out (the merged result's path without extension)")
        return merge([Path(f) for f in args.merge], Path(args.out))
    sizes = dict(DRY if args.dry_run else FULL)
    sizes["blocks"] = args.blocks or sizes["blocks"]
    sizes["steps"] = args.steps or sizes["steps"]
    names = step_names(sizes)
    only = None
    if args.only:
        only = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = sorted(only - set(names))
        if unknown:
            p.error(f"--only: no step named {', '.join(unknown)}; the steps are {','.join(names)}")
        if any(name.startswith("llama8b_") for name in only):
            only.add("build")
    started = float(os.environ.get(STARTED_ENV) or time.time())
    deadline_s = args.deadline_s if args.deadline_s is not None else sizes["deadline_s"]
    deadline_at = started + deadline_s
    work = Path(tempfile.mkdtemp(prefix="overnight-gpu-"))
    env = env_step(args.dry_run)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="overnight-gpu-dry-")) / "gpu" if args.dry_run
                                           else ROOT / "bench" / "results" / slug(env["device"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"dry_run": args.dry_run, "env": env, "sizes": {k: v for k, v in sizes.items() if k != "budget"},
              "budgets_s": sizes["budget"], "deadline_s": deadline_s,
              "flop_count": " ".join(flops.mfu_flops_per_token.__doc__.split("LoRA step on a frozen base: ")[1].split()),
              "steps": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))}

    def record(name: str, step: dict) -> None:
        result["steps"][name] = step
        status = "ok" if step["ok"] else ("not run" if step["ok"] is None else "FAILED")
        print(f"   {name}: {status} in {step['seconds']} s" + (f" ({step.get('note')})" if step.get("note") else "")
              + ("" if step["ok"] is not False else f"\n   {step.get('error', step.get('tail', ''))[-600:]}"),
              flush=True)
        write(result, out)  # after every step: a run cut short still leaves what it measured

    try:
        steps = [(name, fn) for name, fn in planned_steps(args, sizes, work, env) if not only or name in only]
        run_steps(steps, sizes["budget"], deadline_at, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write(result, out)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    missed = [name for name, step in result["steps"].items() if step["ok"] is None]
    if missed:
        print(f"not reached before the deadline: {','.join(missed)}\n  next call: bench/gpu.sh --only "
              f"{','.join(missed)} --deadline-s SECONDS --out OUT2\n  then, with both results here: python "
              f"bench/gpu.py --merge FIRST.json OUT2.json --out bench/results/{slug(env['device'])}", flush=True)
    return 1 if any(step["ok"] is False for step in result["steps"].values()) else 0


def step_names(sizes: dict) -> list[str]:
    """The steps' names in the order they run (planned_steps yields them so)."""
    first, *rest = [f"llama8b_{b}x{s}" for b, s in sizes["shapes"]]
    return ["cuda_tests", "resume", "build", first, first + "_det_off", "grpo", first + "_liger", "smollm2", *rest,
            "mlx_tests"]


def run_steps(steps, budgets: dict, deadline_at: float, record, clock=time.time) -> None:
    """Each (name, fn) in turn: fn(budget) -> its figures, or an exception (recorded as the step's failure) while the
    next step still runs; a step whose budget does not fit before ``deadline_at`` is recorded as not run, so a step
    is never cut off by the device call's own limit mid-way. ``record(name, step)`` receives each step's entry."""
    for name, fn in steps:
        budget = budgets[name]
        left = deadline_at - clock()
        if left < budget:
            record(name, {"ok": None, "not_run": "time", "budget_s": budget, "seconds": 0.0,
                          "note": f"not run: time ({max(0, left):.0f} s left before the deadline, budget {budget} s)"})
            continue
        print(f"== {name} (budget {budget} s, {left:.0f} s left before the deadline)", flush=True)
        t0 = clock()
        try:
            step = fn(budget) or {}
            step.setdefault("ok", True)
        except Exception as exc:  # noqa: BLE001 - a failed step is a figure too; the next one still runs
            step = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:],
                    "traceback": traceback.format_exc()[-4000:]}
        step["budget_s"] = budget
        step["seconds"] = round(clock() - t0, 1)
        record(name, step)


def merge(paths: list[Path], out: Path) -> int:
    """The runs' steps in one result: a later run's entry for a step replaces an earlier one's unless it did not
    run. Runs on different devices are refused (their timings do not compare)."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"error: --merge {path}: not a bench/gpu.sh result ({exc})", file=sys.stderr)
            return 2
    devices = sorted({r["env"]["device"] for r in results})
    if len(devices) > 1:
        print(f"error: --merge: these runs were on different devices ({', '.join(devices)}); their timings do not "
              f"compare, so keep them as separate results", file=sys.stderr)
        return 2
    merged = dict(results[0], steps=dict(results[0]["steps"]))
    for r in results[1:]:
        for name, step in r["steps"].items():
            if name not in merged["steps"] or step["ok"] is not None:
                merged["steps"][name] = step
    merged["runs"] = [{"file": str(path), "started": r.get("started"), "finished": r.get("finished"),
                       "matmul_tflops_measured": r["env"]["matmul_tflops_measured"]} for path, r in zip(paths, results)]
    merged["finished"] = results[-1].get("finished")
    out.parent.mkdir(parents=True, exist_ok=True)
    write(merged, out)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


# ----------------------------------------------------------------------------------------------------- steps


def env_step(dry_run: bool) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not dry_run
    device = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    spec = next((peak for name, peak in BF16_PEAK_TFLOPS if name in device), None) if cuda else None
    machine = pairs.machine()
    for name in ("liger-kernel", "triton", "huggingface-hub", "tokenizers", "safetensors"):  # the GPU steps' too
        try:
            machine["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"device": device, "cuda": cuda, "machine": machine, "bf16_peak_tflops_spec": spec,
            "matmul_tflops_measured": matmul_tflops(torch, cuda), "torch_cuda": torch.version.cuda,
            "alloc_conf": {k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}}


def matmul_tflops(torch, cuda: bool) -> float:
    """A large square matmul's rate in the compute dtype (bf16 on CUDA, fp32 on CPU): what this device delivers."""
    n, reps = (8192, 10) if cuda else (256, 3)
    dtype, dev = (torch.bfloat16, "cuda") if cuda else (torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(2):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def planned_steps(args, sizes: dict, work: Path, env: dict):
    """(name, fn(budget)) in step_names' order."""
    dry = args.dry_run
    models = work / "models"
    data = {}

    def data_for(seq: int) -> Path:
        if seq not in data:
            data[seq] = long_rows(work / f"data-{seq}", rows=sizes["steps"] * max(b for b, _ in sizes["shapes"]) + 8,
                                  words=int(seq * 1.3))
        return data[seq]

    # Only the files that hold cuda tests: collecting the whole suite imports all of it (~20 s), and a test module
    # whose imports this machine lacks would fail the step without a cuda test in it.
    where = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in f.read_text())
    yield "cuda_tests", lambda budget: pytest_step(["-m", "cuda", *where] + (["--collect-only"] if dry else []),
                                                   budget, work / "cuda-tests.xml", collect_only=dry)
    yield "resume", lambda budget: pytest_step(
        ["tests/test_faults.py", "-k", "qlora_kill_after_an_eval_before_the_next_checkpoint_is_exact and torch"]
        + (["--collect-only"] if dry else []), budget, work / "resume.xml", collect_only=dry)
    big = {}

    def build(budget):
        shape = dict(LLAMA8B, layers=sizes["blocks"])
        seq = max(s for _, s in sizes["shapes"])
        if dry:  # the same builder and config edits at a size a CPU trains in seconds
            shape = dict(vocab=1024, hidden=64, layers=sizes["blocks"], heads=4, kv_heads=2, intermediate=128)
            folder, reused = random_model(models / "llama8b", shape, seq), False
        else:  # outside the run's temp folder: a second call on the same machine loads it instead of building again
            folder = Path(tempfile.gettempdir()) / f"overnight-gpu-llama8b-{sizes['blocks']}-blocks-{seq}"
            reused = (folder / BUILT).is_file()
            if not reused:
                shutil.rmtree(folder, ignore_errors=True)
                random_model(folder, shape, seq)
                (folder / BUILT).write_text("")
        big["folder"] = folder
        return {"model": str(folder), "shape": shape, "reused": reused,
                "note": f"Llama-3.1-8B widths with random bf16 weights, {sizes['blocks']} of its 32 blocks (time), the "
                        f"tiny model's tokenizer" + ("; built by an earlier run on this machine" if reused else "")
                if not dry else "dry run: a small Llama shape with random weights"}

    def built() -> Path:
        if "folder" not in big:
            raise RuntimeError("the build step did not finish in this run, so there is no 8B-width model to train")
        return big["folder"]

    first, *rest = sizes["shapes"]

    def llama8b(batch: int, seq: int):
        name = f"llama8b_{batch}x{seq}"
        return name, lambda budget: pair(built(), data_for(seq), batch, seq, sizes, budget, work, name, env)

    def grpo(budget):
        folder, note = smollm2_folder(args, models, dry, 256)
        target = work / "grpo"
        small = ["--new-tokens", "8", "--eval-prompts", "2", "--reps", "1", "--grpo-steps", "2"] if dry else \
            ["--new-tokens", "64", "--eval-prompts", "8", "--reps", "2", "--grpo-steps", "2"]
        # three runs (overnight's sampler, transformers' generate, the real grpo step), a third of the budget each
        code = pairs.main(["--model", str(folder), "--backends", "grpo", "--bits", "4", "--rounds", "1",
                           "--timeout", str(max(10, budget // 3)), "--out", str(target), *small])
        if code != 0:
            raise RuntimeError(f"bench/run.py exited {code}")
        run = json.loads(target.with_suffix(".json").read_text())
        setting = run["settings"][0]
        return {"model_note": note, "shape": setting["shape"],
                "sampler_tokens_per_s": {side: v["tokens_per_s"] for side, v in setting["sides"].items()},
                "speedup_vs_before": setting["speedup_vs_before"],
                "speedup_vs_generate": setting["speedup_vs_reference"],
                "same_tokens_as_before": setting["same_tokens_as_before"], "step": setting["step"], "run": run}

    def smollm2(budget):
        seq_b, seq = first
        folder, note = smollm2_folder(args, models, dry, seq)
        if dry:
            return {"model": str(folder), "model_note": note, "skipped": True,
                    "note": "dry run: the model found; its pair is the code the llama8b step runs"}
        figures = pair(folder, data_for(seq), seq_b, seq, sizes, budget, work, "smollm2", env)
        return {**figures, "model_note": note}

    yield "build", build
    yield llama8b(*first)
    yield f"llama8b_{first[0]}x{first[1]}_det_off", lambda budget: overnight_only(
        built(), data_for(first[1]), first[0], first[1], sizes, budget, work, env, ["train.deterministic=false"])
    yield "grpo", grpo
    def liger(budget):
        if dry:
            return {"skipped": True, "note": "dry run: liger runs on CUDA only; the det_off step runs this code"}
        return overnight_only(built(), data_for(first[1]), first[0], first[1], sizes, budget, work, env,
                              ["model.loss_kernel=liger"])

    yield f"llama8b_{first[0]}x{first[1]}_liger", liger
    yield "smollm2", smollm2
    for batch, seq in rest:
        yield llama8b(batch, seq)
    yield "mlx_tests", lambda budget: mlx_step(dry, budget, work)


def smollm2_folder(args, models: Path, dry: bool, seq: int) -> tuple[Path, str]:
    """The real SmolLM2-135M where one is here (it cannot be downloaded on a GPU box), else its shape with random
    weights; the dry run a tiny one."""
    if dry:
        return random_model(models / "smollm2", dict(SMOLLM2, vocab=1024, hidden=64, layers=2, heads=4, kv_heads=2,
                                                     intermediate=128), seq), "dry run: a tiny model"
    candidates = [Path(args.smollm2)] if args.smollm2 else sorted(
        (Path.home() / ".cache" / "overnight" / "models").glob("smollm2-135m*"))
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder, f"SmolLM2-135M-Instruct from {folder}"
    return (random_model(models / "smollm2", SMOLLM2, seq),
            "SmolLM2-135M's shape with random bf16 weights (no SmolLM2 folder on this machine) and the tiny "
            "model's tokenizer")


def random_model(folder: Path, shape: dict, seq: int) -> Path:
    """bench/memory.py's random bf16 Llama, with room for ``seq`` positions."""
    memory.build_model(folder, shards=max(1, shape["layers"] // 4), **shape)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = max(config.get("max_position_embeddings", 0), seq)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def long_rows(folder: Path, rows: int, words: int) -> Path:
    """text rows of ``words`` words each: every row fills max_seq_length (cut to it), so a batch is batch x seq."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, count in (("train.jsonl", rows), ("val.jsonl", 4)):
        with open(folder / name, "w") as f:
            for _ in range(count):
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return folder


def pair_argv(model: Path, data: Path, batch: int, seq: int, sizes: dict, budget: int, out: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--backends", "torch", "--bits", "4",
            "--steps", str(sizes["steps"]), "--warmup", str(sizes["warmup"]), "--rounds", "1",
            "--batch-size", str(batch), "--seq", str(seq), "--rank", str(sizes["rank"]),
            "--alpha", str(2 * sizes["rank"]), "--layers", "-1", "--targets", ALL_LINEAR,
            "--overnight-set", "eval.max_batches=1", "--overnight-set", "eval.predictions=0",
            "--timeout", str(max(10, budget // 2)), "--out", str(out)]


def pair(model: Path, data: Path, batch: int, seq: int, sizes: dict, budget: int, work: Path, name: str,
         env: dict) -> dict:
    """bench/run.py's torch pair at this shape and the GPU figures, its own result embedded (``run``)."""
    target = work / name
    code = pairs.main(pair_argv(model, data, batch, seq, sizes, budget, target))
    if code != 0:
        raise RuntimeError(f"bench/run.py exited {code}")
    result = json.loads(target.with_suffix(".json").read_text())
    setting = result["settings"][0]
    config = json.loads((model / "config.json").read_text())
    figures = {"model": str(model), "batch": batch, "seq": seq, "run": result,
               "same_data_first_loss_rel_diff": setting["same_data_first_loss_rel_diff"],
               "speedup_tokens_per_s": setting["speedup_steps_per_s"],
               "peak_gpu_ratio": setting.get("peak_gpu_ratio"), "sides": {}}
    for side, entry in setting["sides"].items():
        figures["sides"][side] = side_figures(entry["input_tokens_per_s"], entry.get("peak_gpu_mb"), config, seq, env)
    return figures


def side_figures(tokens_per_s: float, peak_gpu_mb: float | None, config: dict, seq: int, env: dict) -> dict:
    achieved = tokens_per_s * flops.mfu_flops_per_token(config, seq) / 1e12
    spec, measured = env["bf16_peak_tflops_spec"], env["matmul_tflops_measured"]
    return {"tokens_per_s": tokens_per_s, "peak_gpu_mb": peak_gpu_mb, "achieved_tflops": achieved,
            "mfu": achieved / spec if spec else None, "of_measured_matmul": achieved / measured}


def overnight_only(model: Path, data: Path, batch: int, seq: int, sizes: dict, budget: int, work: Path, env: dict,
                   sets: list[str]) -> dict:
    """overnight's side alone with extra --sets, on the same batches as the pair at this shape."""
    argv = pair_argv(model, data, batch, seq, sizes, budget, work / "unused")
    for kv in sets:
        argv += ["--overnight-set", kv]
    args = pairs.parse_args(argv)
    tokens = pairs.make_batches(args, work / f"batches-{batch}x{seq}.npz")
    spec = dict(pairs.base_spec(args, work / f"batches-{batch}x{seq}.npz"), side="overnight", backend="torch", bits=4,
                tag=f"only-{batch}x{seq}", out_dir=str(work / f"only-{batch}x{seq}"))
    r = pairs.run_one(spec, work, max(10, budget - 10))  # one run: the whole budget less the batches' making
    tokens_per_s = pairs.steady(r, args.warmup) * tokens["input_tokens_per_step"]
    config = json.loads((model / "config.json").read_text())
    return {"sets": sets, "batch": batch, "seq": seq,
            **side_figures(tokens_per_s, r.get("peak_gpu_mb"), config, seq, env)}


def pytest_step(pytest_args: list[str], budget: int, junit: Path, collect_only: bool = False) -> dict:
    """pytest in its own process group, stopped with everything it started when the budget runs out; then the
    tests that finished are still named (-v prints each as it ends)."""
    # pyproject's addopts deselect `cuda`; a later -m (the cuda step's) takes its place.
    cmd = [sys.executable, "-m", "pytest", "-q" if collect_only else "-v", "-p", "no:cacheprovider", *pytest_args,
           f"--junitxml={junit}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=budget)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI runs a test started hold the GPU too
        output, _ = proc.communicate()
        timed_out = True
    tail = output[-3000:]
    if collect_only:
        collected = len([line for line in output.splitlines() if "::" in line])
        return {"ok": proc.returncode == 0 and collected > 0, "collected": collected, "exit": proc.returncode,
                "note": "dry run: collected, not run", "tail": tail[-800:]}
    tests = dict(re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", output, re.MULTILINE))
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}
    if timed_out:
        counts = {outcome.lower(): sum(1 for o in tests.values() if o == outcome) for outcome in set(tests.values())}
        return {"ok": False, "error": f"pytest did not finish within the step's budget ({budget} s)", **counts,
                "tests": tests, "tail": tail[-1500:]}
    ok = proc.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("failed")
    step = {"ok": ok, **counts, "exit": proc.returncode, "tests": tests, "tail": tail[-1500:]}
    if not ok:
        bad = [test for test, outcome in tests.items() if outcome in ("FAILED", "ERROR")]
        step["error"] = (f"pytest exit {proc.returncode}; " + (f"failed: {', '.join(bad)}; " if bad else "")
                         + tail[-300:])
    return step


def mlx_step(dry: bool, budget: int, work: Path) -> dict:
    if dry:
        return {"ok": True, "skipped": True, "note": "dry run: mlx's tests run on CPU in the normal suite"}
    probe = subprocess.run([sys.executable, "-c", "import mlx.core as mx; print(mx.default_device())"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or "gpu" not in probe.stdout.lower():
        return {"ok": True, "skipped": True,
                "note": "mlx with its CUDA backend is not importable here (its wheels, mlx and mlx-cuda-13 (86 MiB) "
                        "and mlx-lm, would have to be in .whl: more than a device call carries)",
                "probe": (probe.stdout + probe.stderr)[-500:]}
    return pytest_step(["tests/test_mlx_backend.py", "-x"], budget, work / "mlx.xml")


# ---------------------------------------------------------------------------------------------------- output


def write(result: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    env = result["env"]
    spec = env["bf16_peak_tflops_spec"]
    lines = [f"# bench/gpu.sh{' --dry-run' if result['dry_run'] else ''}: {env['device']}", "",
             f"torch CUDA {env['torch_cuda']}; bf16 peak {spec or 'unknown'} TFLOP/s (data sheet, dense); a "
             f"measured matmul {env['matmul_tflops_measured']:.3g} TFLOP/s. Versions: "
             + ", ".join(f"{k} {v}" for k, v in env["machine"]["versions"].items()) + ".",
             f"MFU counts {result['flop_count']}", "",
             "| step | ok | s | figures |", "| --- | --- | ---: | --- |"]
    for name, s in result["steps"].items():
        ok = {True: "yes", False: "**FAILED**", None: "not run"}[s["ok"]]
        lines.append(f"| {name} | {ok} | {s['seconds']} | {summary(s)} |")
    table = [(name, s) for name, s in result["steps"].items() if s.get("sides")]
    if table:
        lines += ["", "| model | batch x seq | trainer | tokens/s | peak GPU MB | MFU | overnight / HF tokens/s | "
                  "peak GPU ratio |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, s in table:
            for side, f in s["sides"].items():
                ours = side == "overnight"
                lines.append(
                    f"| {name} | {s['batch']} x {s['seq']} | {'overnight' if ours else 'HF Trainer + PEFT + bnb'} | "
                    f"{f['tokens_per_s']:.0f} | {fmt(f['peak_gpu_mb'], '.0f')} | {fmt(f['mfu'], '.1%')} | "
                    f"{fmt(s['speedup_tokens_per_s'], '.2f') + 'x' if ours else ''} | "
                    f"{fmt(s['peak_gpu_ratio'], '.2f') if ours else ''} |")
    for name, s in result["steps"].items():
        if s.get("run"):
            lines += ["", f"## {name}: bench/run.py's own table", "", pairs.markdown(s["run"]).rstrip()]
    return "\n".join(lines) + "\n"


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def summary(s: dict) -> str:
    if s["ok"] is None:
        return s["note"]
    if not s["ok"]:
        return s.get("error", "")[-200:].replace("|", "/").replace("\n", " ")
    if "sides" in s:
        ours = s["sides"]["overnight"]
        return (f"overnight {ours['tokens_per_s']:.0f} tok/s, {s['speedup_tokens_per_s']:.2f}x HF; "
                f"{s.get('model_note', '')}").strip("; ")
    if "tokens_per_s" in s:
        return (f"overnight with {' '.join(s['sets'])}: {s['tokens_per_s']:.0f} tok/s"
                + (f", peak GPU {s['peak_gpu_mb']:.0f} MB" if s.get("peak_gpu_mb") is not None else ""))
    if "sampler_tokens_per_s" in s:
        rates = s["sampler_tokens_per_s"]
        return (f"grpo sampling {rates['overnight']:.0f} generated tok/s, {s['speedup_vs_before']:.2f}x one group per "
                f"call, {s['speedup_vs_generate']:.2f}x transformers generate; same tokens as before: "
                f"{'yes' if s['same_tokens_as_before'] else 'NO'}; {s.get('model_note', '')}").strip("; ")
    counts = ", ".join(f"{k} {s[k]}" for k in ("collected", "passed", "failed") if k in s)
    return "; ".join(part for part in (counts, s.get("note", "")) if part)


if __name__ == "__main__":
    sys.exit(main())
