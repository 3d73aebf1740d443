"""One process of a data-parallel MLX test job (tests/test_mlx_backend.py), started by `mlx.launch -n 2 --backend
ring` or by the test itself with MLX_RANK / MLX_HOSTFILE set: `python tests/dp_mlx_worker.py SPEC.json`.

SPEC.json: {"model", "batches" (an .npz the test wrote: the whole step's micro-batches), "out" (a folder), "mode",
"steps", "lr", "seed", "bits", "dropout"}. Every step trains on the same whole list of micro-batches: rank r takes its
half, with the whole list's step_scales and each micro-batch's noise_seed from its place in the whole step, as the
core does. Each rank writes OUT/rank{r}.npz (losses, grad norms, the final LoRA weights) and OUT/rank{r}.json.

Modes: "train" (just that); "oom" (rank 1 runs out of memory in its backward pass at step 1: both ranks must raise
OutOfMemory with the weights unchanged, then the step is taken again); "dead" (rank 1 kills itself with SIGKILL at
step 1, rank 0 is waiting in the gradient all-reduce); "hang" (rank 1 stops answering at step 1 without dying).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from overnight.backend import objectives
from overnight.backend import Batch, OutOfMemory, PeerLost, noise_seed
from overnight.config import Config

OOM_MESSAGE = "[metal::malloc] Unable to allocate 4294967296 bytes."


def config(model_dir: str, bits: int, dropout: float) -> Config:
    cfg = Config()
    cfg.model.path = str(model_dir)
    cfg.model.quantization.bits = bits
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 8, 16.0, dropout
    cfg.lora.targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg.data.method = "sft"
    cfg.train.weight_decay, cfg.train.max_grad_norm = 0.0, 1.0
    return cfg


def load_batches(path: str) -> list[Batch]:
    data = np.load(path)
    return [Batch(data[f"ids{i}"], data[f"mask{i}"], data[f"attn{i}"]) for i in range(int(data["count"]))]


def step_batches(whole: list[Batch], seed: int, step: int, rank: int, size: int) -> tuple[list[Batch], tuple]:
    """(this rank's share, the whole step's step_scales), keyed as src/distributed.py's step_batches keys them."""
    keyed = [Batch(b.input_ids, b.loss_mask, b.attention_mask, noise_seed=noise_seed(seed, step, i))
             for i, b in enumerate(whole)]
    per = len(keyed) // size
    return keyed[rank * per:(rank + 1) * per], objectives.step_scales("sft", keyed)


def adapter(backend) -> dict[str, np.ndarray]:
    from mlx.utils import tree_flatten

    return {k: np.array(v) for k, v in tree_flatten(backend.model.trainable_parameters())}


def main(spec_path: str) -> int:
    from overnight.backends.mlx_backend import MLXBackend

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    backend = MLXBackend()
    world = backend.connect(timeout_s=120.0)  # generous while the ranks load at different speeds
    rank, size = world.rank, world.size
    backend.setup(config(spec["model"], spec["bits"], spec["dropout"]), spec["seed"])
    world.barrier()
    whole = load_batches(spec["batches"])
    mode, report = spec["mode"], {"rank": rank, "size": size}
    losses, norms = [], []
    step = 0
    while step < spec["steps"]:
        mine, scales = step_batches(whole, spec["seed"], step, rank, size)
        if step == 1 and mode in ("oom", "dead", "hang") and "fault_done" not in report:
            report["fault_done"] = True
            world.timeout_s = float(spec.get("timeout_s", 3.0))
            if rank == 1 and mode == "dead":
                os.kill(os.getpid(), signal.SIGKILL)
            if rank == 1 and mode == "hang":
                time.sleep(3600)
            if mode == "oom":
                before = adapter(backend)
                real = backend._accumulate
                if rank == 1:
                    def failing(*args):
                        raise RuntimeError(OOM_MESSAGE)
                    backend._accumulate = failing
                try:
                    backend.train_step(mine, spec["lr"], scales)
                    report["oom"] = "no error"
                except OutOfMemory as exc:
                    report["oom"] = f"OutOfMemory: {exc}"
                backend._accumulate = real
                after = adapter(backend)
                report["unchanged"] = all(np.array_equal(before[k], after[k]) for k in before)
                world.timeout_s = 120.0
                continue  # the loop's answer to an OOM: the same step again (here whole, nothing was applied)
            (out / f"rank{rank}.waiting").write_text(repr(time.time()))
            started = time.monotonic()
            try:
                backend.train_step(mine, spec["lr"], scales)
                report["peer"] = "no error"
            except PeerLost as exc:
                report["peer"] = f"PeerLost: {exc}"
            report["noticed_after_s"] = time.monotonic() - started
            (out / f"rank{rank}.json").write_text(json.dumps(report))
            return 0
        result = backend.train_step(mine, spec["lr"], scales)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        step += 1
    np.savez(out / f"rank{rank}.npz", losses=np.array(losses), norms=np.array(norms),
             **{f"w:{k}": v for k, v in adapter(backend).items()})
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
