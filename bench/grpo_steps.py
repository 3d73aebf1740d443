"""GRPO before/after on one code tree: the real `overnight train --method grpo` (seconds per step, the sampling's
seconds and calls per step, the final eval's seconds) and the sampler at one micro-batch (prompts x group x new
tokens, no stop token: generated tokens/s), in this process. Whichever `overnight` is importable is measured, so
the same command measures an older commit through PYTHONPATH:

    git worktree add /tmp/before eca7ef9 && mkdir /tmp/before/pkgs
    ln -s /tmp/before/src /tmp/before/pkgs/overnight && ln -s /tmp/before/backends /tmp/before/src/backends
    PYTHONPATH=/tmp/before/pkgs OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_steps.py --api old --out before.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_steps.py --out after.json

--api old calls Backend.sample the way commits before batched sampling took it (one prompt, its group's seeds);
--api new hands it the micro-batch's rows. Both runs print and save the sampled tokens, so the two can be compared
for equality (same seeds: same completions).

--sampler-only measures the sampler alone: the same command sets the backend up, and at the run's first sampling
call (the adapter as initialised, before any update) the timed micro-batches run, the result is written and the
process exits, without the steps or the eval. Cheap enough to alternate the two trees several rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import write_grpo_data  # noqa: E402  (plain json: works with any overnight on the path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", choices=("old", "new"), default="new")
    p.add_argument("--backend", choices=("torch", "mlx"), default="torch")
    p.add_argument("--bits", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--work", default="/tmp/overnight-grpo-steps", help="data and run folder")
    p.add_argument("--steps", type=int, default=3, help="grpo steps (the first is left out of seconds per step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=16, help="validation prompts (the eval answers all of them)")
    p.add_argument("--reps", type=int, default=2, help="timed micro-batches of the sampler (after a warm-up)")
    p.add_argument("--sampler-only", action="store_true", help="the sampler alone, at the run's first sampling call")
    p.add_argument("--out", required=True, help="result JSON")
    args = p.parse_args(argv)

    # The run in this process (the timers are patched in here): no supervising parent that would start the training
    # in a child, as `overnight train` does when stdin is not a terminal (overnight.runs.supervise).
    os.environ["OVERNIGHT_SUPERVISOR"] = "off"
    from overnight.commands import cli
    from overnight.methods import grpo

    if args.backend == "torch":
        from overnight.backends.torch_backend import TorchBackend as cls
    else:
        from overnight.backends.mlx_backend import MLXBackend as cls
    rec = {"sample_s": [], "sample_tokens": [], "step_ends": [], "eval_s": [], "backend": []}
    setup, sample, step, evaluate = cls.setup, cls.sample, cls.train_step, grpo.GrpoValidator.run

    def timed_setup(self, *a, **k):
        rec["backend"].append(self)
        return setup(self, *a, **k)

    def timed_sample(self, *a, **k):
        if args.sampler_only:  # the backend is set up; no step, no eval
            result = {"api": args.api, "backend": args.backend, "bits": args.bits, "model": args.model,
                      "sampler_only": True}
            measure_sampler(self, result)
            sys.stdout.flush()
            os._exit(0)  # the training run is not wanted past this point
        t0 = time.perf_counter()
        out = sample(self, *a, **k)
        rec["sample_s"].append(time.perf_counter() - t0)
        rec["sample_tokens"].append(int((out >= 0).sum()))
        return out

    def timed_step(self, *a, **k):
        result = step(self, *a, **k)
        rec["step_ends"].append(time.perf_counter())
        return result

    def timed_eval(self, *a, **k):
        t0 = time.perf_counter()
        result = evaluate(self, *a, **k)
        rec["eval_s"].append(time.perf_counter() - t0)
        rec["eval_prompts"] = len(self._chosen)
        return result

    def measure_sampler(backend, result: dict) -> None:
        from overnight.data import load_tokenizer
        from overnight.data.tokenizer import encode_prompt

        tok = load_tokenizer(Path(cli_model_path(args.model)))
        rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()][:args.batch]
        prompts = [np.asarray(encode_prompt(tok, r, "chat"), np.int32) for r in rows]
        seeds = [[grpo.completion_seed(42, 0, i, k) for k in range(args.group)] for i in range(args.batch)]

        def micro_batch(n: int) -> np.ndarray:
            if args.api == "old":
                return np.concatenate([sample(backend, p, s, n, 1.0, 1.0, ()) for p, s in zip(prompts, seeds)])
            return sample(backend, [p for p in prompts for _ in range(args.group)], [x for s in seeds for x in s], n,
                          1.0, 1.0, ())

        micro_batch(2)
        times, cpu = [], []
        for _ in range(args.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            out = micro_batch(args.new_tokens)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        # The process's CPU seconds beside the wall clock: on a machine shared with other work the wall clock also
        # counts the time this process waited for a core (one thread here: CPU seconds <= wall seconds).
        tokens = int((out >= 0).sum())
        result.update(sampler_s=times, sampler_cpu_s=cpu, sampler_tokens=tokens,
                      sampler_tokens_per_s=tokens / min(times), sampler_tokens_per_cpu_s=tokens / min(cpu),
                      sampled=out.tolist())
        print(json.dumps({k: v for k, v in result.items() if k != "sampled"}))
        Path(args.out).write_text(json.dumps(result))

    cls.setup, cls.sample, cls.train_step, grpo.GrpoValidator.run = timed_setup, timed_sample, timed_step, timed_eval
    work = Path(args.work)
    data_dir = write_grpo_data(work / "data", args.eval_prompts)
    # grpo.beta and loss_type pinned to the values before TRL's defaults were taken (beta 0.04, grpo): the same work
    # on both sides of a before/after pair. eval.max_batches x batch covers the validation file on the old code,
    # which chose eval.max_batches x batch prompts; grpo.eval_prompts is left at its default (all of them here).
    code = cli.main(["train", "--backend", args.backend, "--model", args.model, "--data", str(data_dir),
                     "--method", "grpo", "--output", str(work / f"run-{args.api}"), "--fresh", "--quiet",
                     "--max-steps", str(args.steps), "--batch-size", str(args.batch),
                     "--set", f"grpo.group_size={args.group}", "--set", f"grpo.max_new_tokens={args.new_tokens}",
                     "--set", "grpo.beta=0.04", "--set", "grpo.loss_type=grpo",
                     "--set", "grpo.rewards=[length_penalty=50]", "--set", f"model.quantization.bits={args.bits}",
                     "--set", "model.max_seq_length=192", "--set", f"eval.max_batches={args.eval_prompts}",
                     "--set", "train.seed=42"])
    if code != 0:
        raise SystemExit(f"overnight train exited {code}")
    ends = rec["step_ends"]
    result = {"api": args.api, "backend": args.backend, "bits": args.bits, "model": args.model,
              "step_s": (ends[-1] - ends[0]) / (len(ends) - 1), "eval_s": rec["eval_s"],
              "eval_prompts": rec.get("eval_prompts"), "sample_calls_per_step": len(rec["sample_s"]) / len(ends),
              "sampling_s_per_step": sum(rec["sample_s"]) / len(ends),
              "sampled_tokens_per_step": sum(rec["sample_tokens"]) / len(ends)}

    measure_sampler(rec["backend"][0], result)
    return 0


def cli_model_path(name: str) -> str:
    """A provided model's name (smollm2-135m) as its folder in the overnight cache, a path as it is."""
    if Path(name).exists():
        return name
    from overnight.models import provided

    return str(provided.cache_dir() / "models" / provided.MODELS[name].folder_name)


if __name__ == "__main__":
    sys.exit(main())
