"""One process of a 2-process torch data-parallel job for tests/test_torch_backend.py (gloo on CPU).

Started as `python tests/dp_torch_worker.py JOB.json` with MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and
LOCAL_RANK set, as torchrun would. JOB.json names the tiny model, the config overrides, a pickle of the steps'
micro-batches (each step: the whole step's list, every batch with its noise_seed), the learning rate, what to do
(``mode``) and where to write this rank's results (``out`` with {rank} in it, an .npz).

mode "train": connect, set up, and for each step train this rank's half of the whole list with the whole list's
step_scales. With ``oom_rank`` set, that rank's first forward raises torch.OutOfMemoryError: every rank must get
OutOfMemory with its weights untouched; the step is then taken again, as the loop would.
mode "solo": the same steps in one process that is not connected (every micro-batch of each step).
mode "dead": rank 1 connects and exits at once; rank 0 sets up and trains, and must get PeerLost.
mode "silent": rank 1 connects and then never takes part; rank 0 must get PeerLost once timeout_s has passed.
"""
from __future__ import annotations

import json
import pickle
import sys
import time

import numpy as np


def weights(backend) -> dict[str, np.ndarray]:
    # every trained parameter, as the optimizer sees them: LoRA and, for reward, the score head
    return {name: p.detach().cpu().float().numpy().copy() for name, p in zip(backend._param_names, backend._params)}


def main(job_path: str) -> int:
    import os

    job = json.loads(open(job_path).read())
    solo = job["mode"] == "solo"  # the reference: one process, no connect, every micro-batch of each step
    rank, size = (0, 1) if solo else (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))

    import torch

    from overnight.backend import objectives
    from overnight.backend import OutOfMemory, PeerLost
    from overnight.backends.torch_backend import TorchBackend
    from overnight.config import Config, set_dotted

    cfg = Config()
    cfg.model.path = job["model_dir"]
    for key, value in job["overrides"].items():
        set_dotted(cfg, key, json.dumps(value))
    with open(job["batches"], "rb") as fh:
        steps = pickle.load(fh)

    backend = TorchBackend()
    if not solo:
        world = backend.connect(float(job["timeout_s"]))
        assert (world.rank, world.size) == (rank, size)
    out: dict[str, np.ndarray] = {}
    if job["mode"] == "dead" and rank == 1:
        os._exit(0)  # gone before the first collective, without leaving the group
    if job["mode"] == "silent" and rank == 1:
        # Alive but never answering: stays until rank 0 has written its result (at most 5 minutes: rank 0 sets up
        # its model first, which takes minutes on a loaded 2-core machine).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not os.path.exists(job["out"].format(rank=0)):
            time.sleep(0.2)
        os._exit(0)
    backend.setup(cfg, int(job["seed"]))
    for name, value in weights(backend).items():
        out["init/" + name] = value

    if job.get("oom_rank") == rank:
        real = backend._objective
        fired = []

        def run_out_once(*args, **kwargs):
            if not fired:
                fired.append(True)
                raise torch.OutOfMemoryError("CUDA out of memory (simulated on this rank)")
            return real(*args, **kwargs)

        backend._objective = run_out_once

    losses, norms, tokens = [], [], []
    for index, whole in enumerate(steps):
        share = len(whole) // size
        mine = whole[rank * share:(rank + 1) * share]
        scales = objectives.step_scales(cfg.data.method, whole, cfg.grpo.loss_type)
        started = time.monotonic()
        if job["mode"] in ("dead", "silent"):
            try:
                backend.train_step(mine, float(job["lr"]), scales)
            except PeerLost as exc:
                out["peer_lost_after_s"] = np.array(time.monotonic() - started)
                out["peer_lost_message"] = np.array(str(exc))
            break
        if index == 0 and job.get("oom_rank") is not None:
            before = weights(backend)
            try:
                backend.train_step(mine, float(job["lr"]), scales)
            except OutOfMemory as exc:
                out["oom_message"] = np.array(str(exc))
            after = weights(backend)
            out["oom_weights_unchanged"] = np.array(all(np.array_equal(before[k], after[k]) for k in before))
            assert all(p.grad is None for p in backend._params), "gradients left behind by the OOM"
        result = backend.train_step(mine, float(job["lr"]), scales)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        tokens.append(result.tokens)
    out["losses"] = np.array(losses, dtype=np.float64)
    out["norms"] = np.array(norms, dtype=np.float64)
    out["tokens"] = np.array(tokens, dtype=np.int64)
    for name, value in weights(backend).items():
        out["final/" + name] = value
    np.savez(job["out"].format(rank=rank), **out)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
