"""One benchmark run in its own process: `python bench/worker.py SPEC.json RESULT.json`.

Sides (spec["side"]):
  overnight       the real `overnight train` (its CLI, loop, eval, checkpoints), with timers wrapped
                  around the backend's train_step, the validator, generation and the checkpoint save
  hf              HF Trainer + PEFT (transformers' own training loop), fed the same batches
  mlxlm           mlx_lm.tuner.trainer.train (what `mlx_lm.lora` runs), fed the same batches
  grpo-sampler    the grpo pair (torch): overnight's sampler (Backend.sample) on one micro-batch of prompts x group,
                  no stop token, and the sampler it replaced (one prompt's group at a time, a host read per token)
  hfgen           the grpo pair's reference: transformers' `model.generate(do_sample=True, ...)` (PEFT LoRA of the
                  same shape) on the same prompts, left-padded, num_return_sequences = group
  grpo-step       the real `overnight train --method grpo` for a few steps: seconds per step, the sampling's share,
                  and the final eval's seconds

Every side records `step_ends`: perf_counter() seconds (relative to the first step's start) at which
optimizer step k had finished, k = 1..N, plus `first_loss`: the loss of step 1 (LoRA B starts at 0, so
it is the base model's loss on batch 1 whatever the dropout: equal on both sides iff the data is).
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _now() -> float:
    return time.perf_counter()


def _load_batches(path: str) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    n = int(data["count"])
    return [{"input_ids": data[f"ids_{i}"], "loss_mask": data[f"mask_{i}"], "attention_mask": data[f"attn_{i}"]}
            for i in range(n)]


# --------------------------------------------------------------------------- overnight


def run_overnight(spec: dict) -> dict:
    from overnight.runs import checkpoint
    from overnight.commands import cli
    from overnight.train import loop, validation as validate

    backend_module = {"torch": "overnight.backends.torch_backend", "mlx": "overnight.backends.mlx_backend"}
    module = __import__(backend_module[spec["backend"]], fromlist=["x"])
    cls = module.TorchBackend if spec["backend"] == "torch" else module.MLXBackend
    rec = {"step_starts": [], "step_ends": [], "step_s": [], "eval_s": [], "generate_s": [], "checkpoint_s": [],
           "loop_s": None, "losses": []}

    def timed(owner, name, key, hook=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = _now()
            if hook:
                hook(t0)
            try:
                return original(*args, **kwargs)
            finally:
                rec[key].append(_now() - t0)
        setattr(owner, name, wrapper)
        return original

    original_step = cls.train_step

    def train_step(self, micro_batches, lr, step_scales=None):
        t0 = _now()
        result = original_step(self, micro_batches, lr, step_scales)
        t1 = _now()
        rec["step_starts"].append(t0)
        rec["step_ends"].append(t1)
        rec["step_s"].append(t1 - t0)
        rec["losses"].append(result.loss)
        return result

    cls.train_step = train_step
    timed(validate.Validator, "run", "eval_s")
    timed(cls, "generate", "generate_s")
    timed(checkpoint.CheckpointManager, "save", "checkpoint_s")
    original_train = loop.train

    def train(*args, **kwargs):
        t0 = _now()
        try:
            return original_train(*args, **kwargs)
        finally:
            rec["loop_s"] = _now() - t0
            rec["loop_start"] = t0
    loop.train = train

    s = spec
    argv = ["train", "--model", s["model"], "--data", s["data"], "--backend", s["backend"], "--output", s["out_dir"],
            "--batch-size", str(s["batch_size"]), "--lora-rank", str(s["rank"]), "--lora-layers", str(s["layers"]),
            "--max-steps", str(s["steps"]), "--quiet", "--fresh",
            "--set", f"model.max_seq_length={s['seq']}", "--set", f"lora.alpha={s['alpha']}",
            "--set", f"lora.dropout={s['dropout']}", "--set", f"lora.targets=[{','.join(s['targets'])}]",
            "--set", f"model.quantization.bits={s['bits']}", "--set", f"train.learning_rate={s['lr']}",
            "--set", f"train.seed={s['seed']}"]
    argv += [x for kv in s.get("overnight_set", []) for x in ("--set", kv)]
    t0 = _now()
    code = cli.main(argv)
    wall = _now() - t0
    if code != 0:
        raise SystemExit(f"overnight train exited {code}")
    origin = rec["step_starts"][0]
    # The dtype overnight chose (model.dtype auto: bf16 on a GPU that has it, fp32 on the CPU), from the run's record.
    start = next((json.loads(line) for line in (Path(s["out_dir"]) / "metrics.jsonl").read_text().splitlines()
                  if '"start"' in line and json.loads(line).get("event") == "start"), {})
    compute = (start.get("setup") or {}).get("compute_dtype")
    # What the loop spends outside train_step: data, metrics, progress, memory, eval, predictions, checkpoints.
    outside = rec["loop_s"] - sum(rec["step_s"])
    return {"step_ends": [t - origin for t in rec["step_ends"]], "step_s": rec["step_s"],
            "first_loss": rec["losses"][0], "losses": rec["losses"], "wall_s": wall, "loop_s": rec["loop_s"],
            "setup_s": rec["loop_start"] - t0, "outside_step_s": outside, "eval_s": sum(rec["eval_s"]),
            "evals": len(rec["eval_s"]), "generate_s": sum(rec["generate_s"]),
            "checkpoint_s": sum(rec["checkpoint_s"]), "checkpoints": len(rec["checkpoint_s"]),
            "compute_dtype": compute}


# --------------------------------------------------------------------------- HF Trainer + PEFT


def run_hf(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    s = spec
    batches = _load_batches(s["batches"])[: s["steps"]]
    cuda = torch.cuda.is_available()
    # overnight's choice: bf16 where the GPU has it natively, fp32 on CPU and older GPUs.
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    kwargs = {"dtype": dtype}
    if s["bits"] == 4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if s["bits"] == 4 or cuda:
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(s["model"], **kwargs)
    model.config.use_cache = False
    if s["bits"] == 4:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    n_layers = model.config.num_hidden_layers
    layers = None if s["layers"] == -1 or s["layers"] >= n_layers else list(range(n_layers - s["layers"], n_layers))
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                             target_modules=list(s["targets"]), layers_to_transform=layers,
                                             bias="none", task_type="CAUSAL_LM"))

    def to_inputs(b):
        ids = torch.from_numpy(b["input_ids"].astype(np.int64))
        labels = ids.masked_fill(torch.from_numpy(b["loss_mask"]) == 0, -100)
        out = {"input_ids": ids, "attention_mask": torch.from_numpy(b["attention_mask"].astype(np.int64)),
               "labels": labels}
        return {k: v.to(model.device) for k, v in out.items()} if cuda else out

    model.train()  # as the Trainer will: bitsandbytes repacks a 4-bit weight (another kernel) on an eval-mode call
    with torch.no_grad():
        first_loss = float(model(**to_inputs(batches[0])).loss)  # LoRA B = 0: the base model's loss

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return to_inputs(batches[i])

    class SameBatches(Trainer):
        # The exact batches overnight trains on, in its order (each item is a whole step's batch).
        def get_train_dataloader(self):
            return torch.utils.data.DataLoader(Batches(), batch_size=None, shuffle=False)

    ends: list[float] = []
    starts: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            starts.append(_now())

        def on_step_end(self, args, state, control, **kw):
            ends.append(_now())

    args = TrainingArguments(
        output_dir=s["out_dir"], max_steps=s["steps"], per_device_train_batch_size=s["batch_size"],
        learning_rate=s["lr"], weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=not cuda, bf16=dtype == torch.bfloat16,
        dataloader_num_workers=0, seed=s["seed"], disable_tqdm=True, remove_unused_columns=False)
    trainer = SameBatches(model=model, args=args, train_dataset=Batches(), callbacks=[Clock()])
    t0 = _now()
    trainer.train()
    wall = _now() - t0
    origin = starts[0]
    return {"step_ends": [t - origin for t in ends], "first_loss": first_loss, "wall_s": wall,
            "optimizer": str(args.optim), "compute_dtype": str(dtype).replace("torch.", "")}


# --------------------------------------------------------------------------- mlx_lm.lora


def run_mlxlm(spec: dict) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, default_loss, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, quantize_model

    s = spec
    batches = _load_batches(s["batches"])[: s["steps"]]
    model, config = load_model(Path(s["model"]))
    if s["bits"] == 4:
        model, config = quantize_model(model, config, group_size=64, bits=4, mode="affine")
    model.freeze()
    # mlx_lm.lora's own adapter setup (lora.py train_model): scale is a plain multiplier = alpha / rank.
    keys = sorted({p for p, _ in model.layers[-1].named_modules() if p.split(".")[-1] in s["targets"]})
    linear_to_lora_layers(model, s["layers"] if s["layers"] != -1 else len(model.layers),
                          {"rank": s["rank"], "scale": s["alpha"] / s["rank"], "dropout": s["dropout"], "keys": keys})

    def to_arrays(b):
        # default_loss scores target positions t with offset <= t <= length (1-based over targets), so a
        # contiguous loss mask [a, z] of the input ids is exactly (offset, length) = (a, z).
        rows = []
        for m in b["loss_mask"]:
            idx = np.flatnonzero(m)
            if idx.size != idx[-1] - idx[0] + 1:
                raise SystemExit("mlx_lm's default_loss needs one contiguous target span per row")
            rows.append((int(idx[0]), int(idx[-1])))
        return mx.array(b["input_ids"].astype(np.int32)), mx.array(np.asarray(rows, dtype=np.int32))

    first_loss = float(default_loss(model, *to_arrays(batches[0]))[0].item())
    yields: list[float] = []

    def same_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        for b in batches + batches[-1:]:  # one more: step k has ended when batch k+1 is asked for
            yields.append(_now())
            yield to_arrays(b)

    optimizer = optim.AdamW(learning_rate=s["lr"], weight_decay=0.0)
    args = TrainingArgs(batch_size=s["batch_size"], iters=len(batches) + 1, steps_per_report=10,
                        steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=s["seq"],
                        adapter_file=str(Path(s["out_dir"]) / "adapters.safetensors"))
    Path(s["out_dir"]).mkdir(parents=True, exist_ok=True)
    import contextlib
    import io

    t0 = _now()
    with contextlib.redirect_stdout(io.StringIO()):
        train(model, optimizer, list(range(len(batches))), None, args, iterate_batches=same_batches)
    wall = _now() - t0
    origin = yields[0]
    return {"step_ends": [t - origin for t in yields[1:len(batches) + 1]], "first_loss": first_loss,
            "wall_s": wall}


# --------------------------------------------------------------------------- the grpo pair


def _grpo_rows(spec: dict) -> tuple[list[np.ndarray], list[int]]:
    """The micro-batch: each prompt (as overnight's grpo pipeline encodes it) for `group` rows, and the seeds
    overnight's grpo draws for them (the run's first micro-batch)."""
    from overnight.methods.grpo import completion_seed

    data = np.load(spec["prompts"])
    prompts = [data[f"p_{i}"] for i in range(int(data["count"]))]
    group = spec["group"]
    return ([p for p in prompts for _ in range(group)],
            [completion_seed(spec["seed"], 0, i, k) for i in range(len(prompts)) for k in range(group)])


def _timed_reps(spec: dict, sample) -> tuple[list[float], np.ndarray]:
    sample(2)  # warm-up: first-call allocations and kernel choices
    times, out = [], None
    for _ in range(spec["reps"]):
        t0 = _now()
        out = sample(spec["new_tokens"])
        times.append(_now() - t0)
    return times, out


def sample_one_group_at_a_time(backend, prompt_ids, seeds, max_new_tokens, temperature, top_p, stop_ids):
    """overnight's sampler before batching (commit eca7ef9, TorchBackend._sample): one prompt's group per call, the
    prompt prefilled for every row, each token read back to the host. The same per-row streams and arithmetic,
    so it draws the same tokens as Backend.sample, which the result checks."""
    import math

    import torch

    n = len(seeds)
    out = np.full((n, int(max_new_tokens)), -1, dtype=np.int64)
    with torch.no_grad(), backend._autocast():
        dev, model = backend._device, backend._model
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
        ids = torch.as_tensor(np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1), device=dev).repeat(n, 1)
        result = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache_name = "cache" if "cache" in result else "past_key_values"
        past, logits = result[cache_name], result.logits[:, -1].float()
        done = np.zeros(n, dtype=bool)
        for t in range(max_new_tokens):
            scaled = logits / temperature
            if top_p < 1.0:
                order = torch.argsort(scaled, dim=-1, descending=True)
                probs = torch.softmax(scaled.gather(-1, order), dim=-1)
                drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
                drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
                scaled = scaled.masked_fill(drop, -math.inf)
            noise = torch.stack([torch.rand(scaled.shape[-1], generator=g, device=dev, dtype=torch.float64)
                                 for g in gens])
            gumbel = -torch.log(-torch.log(noise.clamp(min=1e-300)))
            token = torch.argmax(scaled.double() + gumbel, dim=-1)
            chosen = token.cpu().numpy()
            out[~done, t] = chosen[~done]
            done |= np.isin(chosen, stop_ids)
            if done.all() or t + 1 == max_new_tokens:
                break
            result = model(input_ids=token.view(n, 1), use_cache=True, **{cache_name: past})
            past, logits = result[cache_name], result.logits[:, -1].float()
    return out


def run_grpo_sampler(spec: dict) -> dict:
    from overnight.backends.torch_backend import TorchBackend
    from overnight.config import build_config

    backend = TorchBackend()
    backend.setup(build_config(None, None, spec["sets"]), spec["seed"])
    rows, seeds = _grpo_rows(spec)
    group, temperature, top_p = spec["group"], spec["temperature"], spec["top_p"]
    batched, out = _timed_reps(spec, lambda n: backend.sample(rows, seeds, n, temperature, top_p, ()))

    def before(n):
        return np.concatenate([sample_one_group_at_a_time(backend, rows[a], seeds[a:a + group], n, temperature,
                                                          top_p, ()) for a in range(0, len(rows), group)])

    previous, old = _timed_reps(spec, before)
    return {"rows": len(rows), "tokens": int((out >= 0).sum()), "sample_s": batched, "before_s": previous,
            "before_tokens": int((old >= 0).sum()), "same_tokens_as_before": bool(np.array_equal(out, old)),
            "device": str(backend.placement[0]), "compute_dtype": str(backend.placement[1]).replace("torch.", "")}


def run_hfgen(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    s = spec
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    kwargs = {"dtype": dtype}
    if s["bits"] == 4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if s["bits"] == 4 or cuda:
        kwargs["device_map"] = {"": 0 if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(s["model"], **kwargs)
    n_layers = model.config.num_hidden_layers
    layers = None if s["layers"] == -1 or s["layers"] >= n_layers else list(range(n_layers - s["layers"], n_layers))
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                             target_modules=list(s["targets"]), layers_to_transform=layers,
                                             bias="none", task_type="CAUSAL_LM"))
    model.eval()
    data = np.load(s["prompts"])
    prompts = [data[f"p_{i}"] for i in range(int(data["count"]))]
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    attn = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], attn[i, width - len(p):] = p, 1
    device = model.device
    ids, attn = torch.from_numpy(ids).to(device), torch.from_numpy(attn).to(device)
    torch.manual_seed(s["seed"])

    def sample(n):
        # min_new_tokens = max_new_tokens: no row ends early, the same n tokens per row as overnight's side;
        # top_k=0: plain top-p sampling as overnight's (transformers' default would add top-k 50).
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=s["temperature"],
                                 top_p=s["top_p"], top_k=0, max_new_tokens=n, min_new_tokens=n,
                                 num_return_sequences=s["group"], pad_token_id=0, use_cache=True)
        return out[:, width:].cpu().numpy()

    times, out = _timed_reps(s, sample)
    return {"rows": int(out.shape[0]), "tokens": int(out.size), "sample_s": times,
            "compute_dtype": str(dtype).replace("torch.", "")}


def run_grpo_step(spec: dict) -> dict:
    from overnight.backends import torch_backend
    from overnight.commands import cli
    from overnight.methods import grpo

    cls = torch_backend.TorchBackend
    rec = {"step_ends": [], "sample_s": [], "sample_tokens": [], "eval_s": []}
    original_sample, original_step, original_eval = cls.sample, cls.train_step, grpo.GrpoValidator.run

    def sample(self, *args, **kwargs):
        t0 = _now()
        out = original_sample(self, *args, **kwargs)
        rec["sample_s"].append(_now() - t0)
        rec["sample_tokens"].append(int((out >= 0).sum()))
        return out

    def train_step(self, *args, **kwargs):
        result = original_step(self, *args, **kwargs)
        rec["step_ends"].append(_now())
        return result

    def evaluate(self, *args, **kwargs):
        t0 = _now()
        try:
            return original_eval(self, *args, **kwargs)
        finally:
            rec["eval_s"].append(_now() - t0)
            rec["eval_prompts"] = len(self._chosen)

    cls.sample, cls.train_step, grpo.GrpoValidator.run = sample, train_step, evaluate
    s = spec
    argv = ["train", "--backend", "torch", "--model", s["model"], "--data", s["grpo_data"], "--method", "grpo",
            "--output", s["out_dir"], "--max-steps", str(s["steps"]), "--batch-size", str(s["batch"]), "--quiet",
            "--fresh", *[x for kv in s["sets"] + s.get("overnight_set", []) for x in ("--set", kv)]]
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"overnight train exited {code}")
    ends = rec["step_ends"]
    per_step = len(rec["sample_s"]) // max(1, len(ends))
    return {"step_ends": ends, "step_s": (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None,
            "sample_s_per_step": sum(rec["sample_s"]) / len(ends), "sample_calls_per_step": per_step,
            "sampled_tokens_per_step": sum(rec["sample_tokens"]) / len(ends), "eval_s": rec["eval_s"],
            "eval_prompts": rec.get("eval_prompts")}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    result = {"overnight": run_overnight, "hf": run_hf, "mlxlm": run_mlxlm, "grpo-sampler": run_grpo_sampler,
              "hfgen": run_hfgen, "grpo-step": run_grpo_step}[spec["side"]](spec)
    result["self_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():  # this run's own process: its peak is this side's alone
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
