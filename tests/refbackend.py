"""A small numpy reference backend that drives the real loop in tests.

It is a real (if tiny) trainable model: a frozen bigram language model ``E @ W0`` with a low-rank
adapter ``scale * A @ B`` on top, LoRA dropout, hand-written gradients, AdamW with decoupled weight
decay, global-norm clipping, and checkpointable optimizer and RNG state. Everything is float64 and
single-threaded, so the same seed and data give the same losses bit for bit.

Fault knobs for the loop tests come from the environment variable OVERNIGHT_REF_FAULTS (JSON), so
they also work when the CLI runs in a subprocess:
  nan_at_step      the loss and gradients of that update (1-based) are NaN
  apply_nan        also apply that NaN update (a backend that does not guard its weights)
  spike_from_step  from that update on, gradients are multiplied by 1e6 (norm spikes; clipping holds)
  oom_above_rows   a micro-batch with more rows than this raises OutOfMemory
  oom_at_steps     updates (1-based) whose micro-batches of more than oom_at_rows rows (default 2) raise
                   OutOfMemory: an out of memory at those steps only, as a memory spike does
  eval_oom_above_rows  likewise for an eval batch (backend.eval_loss)
  sleep_s          seconds to sleep in each train_step (gives signal tests a window)
  setup_sleep_s    seconds to sleep in setup, as a large model loads (a window before training starts)
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from overnight.backend import Batch, OutOfMemory, SetupInfo, StepResult, as_prompts, as_stop_ids, objectives, \
    step_buffer
from overnight.data.source import BatchSource


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class NumpyBackend:
    name = "numpy-reference"

    def __init__(self, vocab_size: int | None = None, hidden: int = 16):
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.faults = json.loads(os.environ.get("OVERNIGHT_REF_FAULTS", "{}"))
        self.updates = 0

    # -- setup --------------------------------------------------------------------------------
    def setup(self, cfg, seed: int) -> SetupInfo:
        time.sleep(self.faults.get("setup_sleep_s", 0))
        self.cfg = cfg
        model_dir = Path(cfg.model.path)
        if self.vocab_size is None:
            config = model_dir / "config.json"
            self.vocab_size = json.loads(config.read_text())["vocab_size"] if config.is_file() else 64
        vocab, hidden, rank = self.vocab_size, self.hidden, cfg.lora.rank
        frozen = np.random.default_rng(1234)  # "the base model": fixed, independent of the training seed
        self.E = frozen.normal(0, 1.0, (vocab, hidden))
        self.W0 = frozen.normal(0, 0.3, (hidden, vocab))
        init = np.random.default_rng(seed)
        self.params = {"A": init.normal(0, 1 / np.sqrt(hidden), (hidden, rank)), "B": np.zeros((rank, vocab))}
        self.scale = cfg.lora.alpha / cfg.lora.rank
        self.m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.rng = np.random.default_rng(seed + 1)  # dropout
        trainable = sum(p.size for p in self.params.values())
        return SetupInfo(trainable, trainable + self.E.size + self.W0.size, model_dir)

    # -- model --------------------------------------------------------------------------------
    def _forward(self, batch: Batch, train: bool):
        prev = batch.input_ids[:, :-1].reshape(-1)
        target = batch.input_ids[:, 1:].reshape(-1)
        weight = batch.loss_mask[:, 1:].reshape(-1).astype(np.float64)
        h = self.E[prev]
        keep = np.ones_like(h)
        p = self.cfg.lora.dropout
        if train and p > 0:  # keyed like the real backends when the loop gives a key (Batch.noise_seed)
            rng = self.rng if batch.noise_seed is None else np.random.default_rng(batch.noise_seed)
            keep = (rng.random(h.shape) >= p) / (1 - p)
        hd = h * keep
        ha = hd @ self.params["A"]
        logits = h @ self.W0 + self.scale * ha @ self.params["B"]
        logp = _log_softmax(logits)
        nll = -logp[np.arange(len(target)), target]
        return nll, weight, (hd, ha, logp, target)

    def train_step(self, micro_batches: list[Batch], lr: float, step_scales=None) -> StepResult:
        if self.faults.get("sleep_s"):
            time.sleep(self.faults["sleep_s"])
        limit = self.faults.get("oom_above_rows")
        world = getattr(self, "world", None)  # a data-parallel test (tests/test_distributed.py): one all-reduce
        shared = world is not None and world.size > 1
        out_of_memory = limit is not None and any(b.num_rows > limit for b in micro_batches)
        if self.updates + 1 in self.faults.get("oom_at_steps", ()):
            out_of_memory = out_of_memory or any(b.num_rows > self.faults.get("oom_at_rows", 2) for b in micro_batches)
        if out_of_memory and not shared:
            raise OutOfMemory(f"micro-batch over {limit} rows")
        total_tokens = step_scales[2] if step_scales else sum(b.num_target_tokens for b in micro_batches)
        grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        loss_sum = 0.0
        for batch in ([] if out_of_memory else micro_batches):  # a rank out of memory still joins the all-reduce
            nll, weight, (hd, ha, logp, target) = self._forward(batch, train=True)
            loss_sum += float((nll * weight).sum())
            dlogits = np.exp(logp)
            dlogits[np.arange(len(target)), target] -= 1.0
            dlogits *= (weight / max(1, total_tokens))[:, None]
            grads["B"] += self.scale * ha.T @ dlogits
            grads["A"] += self.scale * hd.T @ (dlogits @ self.params["B"].T)
        if shared:  # as the real backends: gradients, then the figures, in one all-reduce (step_buffer's layout)
            keys = sorted(grads)
            sizes = [grads[k].size for k in keys]
            figures = step_buffer.StepFigures(loss_sum=loss_sum, tokens=sum(b.num_target_tokens for b in micro_batches),
                                              out_of_memory=out_of_memory)
            flat = world.all_sum(np.concatenate([grads[k].ravel() for k in keys]
                                                + [step_buffer.pack_figures(figures, np.float64)]))
            figures = step_buffer.read_figures(flat[step_buffer.figures_slice(sizes)])
            if figures.out_of_memory:
                raise OutOfMemory("out of memory on a rank of the job")
            loss_sum = figures.loss_sum
            for k, part in zip(keys, step_buffer.gradient_slices(sizes)):
                grads[k] = flat[part].reshape(grads[k].shape)
        self.updates += 1
        loss = loss_sum / max(1, total_tokens)
        if self.faults.get("spike_from_step") and self.updates >= self.faults["spike_from_step"]:
            grads = {k: g * 1e6 for k, g in grads.items()}
        if self.faults.get("nan_at_step") == self.updates:
            loss = float("nan")
            grads = {k: np.full_like(g, np.nan) for k, g in grads.items()}
        norm = float(np.sqrt(sum(float((g * g).sum()) for g in grads.values())))
        if not objectives.update_applies(loss, norm) and not self.faults.get("apply_nan"):
            # A non-finite step is never applied, so the weights stay finite and can be saved.
            return StepResult(loss, total_tokens, norm)
        clip = self.cfg.train.max_grad_norm
        if clip > 0 and np.isfinite(norm) and norm > clip:
            grads = {k: g * (clip / norm) for k, g in grads.items()}
        self._adamw(grads, lr)
        return StepResult(loss, total_tokens, norm)

    def _adamw(self, grads, lr, beta1=0.9, beta2=0.999, eps=1e-8):
        self.t = getattr(self, "t", 0) + 1
        for k, g in grads.items():
            self.m[k] = beta1 * self.m[k] + (1 - beta1) * g
            self.v[k] = beta2 * self.v[k] + (1 - beta2) * g * g
            m_hat = self.m[k] / (1 - beta1 ** self.t)
            v_hat = self.v[k] / (1 - beta2 ** self.t)
            self.params[k] = self.params[k] * (1 - lr * self.cfg.train.weight_decay) - lr * m_hat / (np.sqrt(v_hat) + eps)

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        limit = self.faults.get("eval_oom_above_rows")
        if limit is not None and batch.num_rows > limit:
            raise OutOfMemory(f"eval batch over {limit} rows")
        nll, weight, _ = self._forward(batch, train=False)
        return float((nll * weight).sum()), int(weight.sum())

    def generate(self, prompts, max_new_tokens: int, stop_ids: tuple[int, ...]):
        rows, single = as_prompts(prompts)  # each prompt answered on its own: the batch changes nothing here
        answers = [self._greedy(row, max_new_tokens, stop_ids) for row in rows]
        return answers[0] if single else answers

    def _greedy(self, prompt_ids: np.ndarray, max_new_tokens: int, stop_ids: tuple[int, ...]) -> np.ndarray:
        out, last, stop_ids = [], int(prompt_ids[-1]), as_stop_ids(stop_ids)
        for _ in range(max_new_tokens):
            h = self.E[last]
            last = int(np.argmax(h @ self.W0 + self.scale * h @ self.params["A"] @ self.params["B"]))
            if last in stop_ids:
                break
            out.append(last)
        return np.asarray(out, dtype=np.int64)

    # -- state --------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        (directory / "adapter").mkdir()
        save_file(dict(self.params),
                  str(directory / "adapter" / "adapter.safetensors"))
        (directory / "adapter" / "adapter_config.json").write_text(
            json.dumps({"rank": self.cfg.lora.rank, "scale": self.scale}))
        save_file({f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()},
                  str(directory / "optimizer.safetensors"))
        (directory / "backend_state.json").write_text(json.dumps(
            {"t": getattr(self, "t", 0), "updates": self.updates, "rng": self.rng.bit_generator.state}))

    def load(self, directory: Path) -> None:
        self.params = load_file(str(directory / "adapter" / "adapter.safetensors"))
        opt = load_file(str(directory / "optimizer.safetensors"))
        self.m = {k: opt[f"m.{k}"] for k in self.params}
        self.v = {k: opt[f"v.{k}"] for k in self.params}
        state = json.loads((directory / "backend_state.json").read_text())
        self.t, self.updates = state["t"], state["updates"]
        self.rng.bit_generator.state = state["rng"]

    def memory(self) -> dict[str, float]:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return {"memory_mb": rss, "rss_mb": rss}

    def versions(self) -> dict[str, str]:
        return {"numpy": np.__version__}


class SyntheticStream(BatchSource):
    """A deterministic, resumable stream of token batches for loop tests that do not need the data
    pipeline: sample i of epoch e is a fixed function of (seed, e, i)."""

    def __init__(self, batch_size: int, vocab_size: int = 64, seq_len: int = 16, seed: int = 0,
                 samples_per_epoch: int = 40):
        self.batch_size, self.vocab_size, self.seq_len = batch_size, vocab_size, seq_len
        self.seed, self.samples_per_epoch = seed, samples_per_epoch
        self.epoch, self.position = 0, 0
        self.consumed: list[tuple[int, int]] = []

    def _sample(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        start = rng.integers(0, self.vocab_size)
        # A learnable pattern: counting up mod vocab from a random start.
        return (start + np.arange(self.seq_len)) % self.vocab_size

    def next_batch(self) -> Batch:
        rows = []
        for _ in range(self.batch_size):
            if self.position >= self.samples_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.samples_per_epoch)
            index = int(order[self.position])
            rows.append(self._sample(index))
            self.consumed.append((self.epoch, index))
            self.position += 1
        ids = np.stack(rows).astype(np.int32)
        mask = np.ones_like(ids, dtype=np.float32)
        mask[:, 0] = 0
        return Batch(ids, mask, np.ones_like(ids))

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
