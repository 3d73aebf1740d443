"""MLX backend: LoRA / QLoRA on Apple Silicon (and on Linux CPU through ``mlx[cpu]``).

Built on mlx-lm's pieces: ``load_model`` reads Hugging Face or MLX folders, ``quantize_model``
makes the in-memory 4-bit base, ``linear_to_lora_layers`` attaches the adapters, and the saved
adapter folder is the one ``mlx_lm.load(model, adapter_path=...)`` reads.

Objectives and their normalisation are src/backend/objectives.py's (SPEC §9), the same as the torch backend's;
the AdamW is torch's (bias correction on); LoRA A comes from src/backend/lora_init.py.
``StepResult.tokens`` is the number of target tokens in the step (in a data-parallel job, all ranks'), as torch's.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from overnight.backend import lora_init, lora_targets, objectives, step_buffer
from overnight.backend import Batch, OutOfMemory, PeerLost, PortableState, PortTaken, SetupInfo, StepResult, \
    as_prompts, as_stop_ids
from overnight.backend.adapter_formats import MLX_HEAD_WEIGHTS, MLX_SCORE_KEY, PORTABLE_SCORE_KEY, REWARD_HEAD, \
    recorded_base, reward_head_text
from overnight.config import ConfigError
from overnight.fsutil import atomic_write_text, fsync_dir, fsync_file

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "mlx_state.json"
_MB = 1024 * 1024
CACHE_SHARE = 0.25  # of the recommended working set, the most MLX may keep cached (see _set_memory_limit)
# Sampling on Metal reads back whether every row has ended once per this many tokens (see MLXBackend._decode).
STOP_CHECK_EVERY = 8


# ---------------------------------------------------------------------------
# Objectives (src/backend/objectives.py): each returns this micro-batch's share of the step objective, its token
# sums times token_scale (1/T of the step) plus its pair sums times pair_scale (1/P of the step).

def _neg_logsigmoid(x):
    return mx.logaddexp(mx.zeros_like(x), -x)


def _logps_of(logits, targets, temperature: float = 1.0):
    """log softmax(logits / temperature)[target] per row, in float32 whatever the model's dtype (bf16 log-probs
    lose the differences dpo and grpo take between close values). grpo's temperature is its sampling one, so its
    log-probs are those of the policy that sampled (objectives.py); every other method's is 1."""
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    return mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)


def find_plain_head(model) -> tuple[Any, int]:
    """(head, vocabulary size): the output head as a function of the decoder's hidden states, when the model's logits
    are exactly ``head(model.model(inputs))`` (lm_head or the tied embedding's as_linear, then Gemma's final
    soft-capping if the config has one), else None. Decided by a probe (a 4-token forward compared both ways) rather
    than a list of architectures, so a model whose head does something else is never silently scored differently."""
    probe = mx.array([[1, 2, 3, 4]], dtype=mx.int32)
    try:
        want = model(probe).astype(mx.float32)
    except Exception:  # noqa: BLE001 - a model that needs more than token ids: its own forward, chunked by default size
        return None, int(getattr(getattr(model, "args", None), "vocab_size", 0) or 1 << 17)
    vocab = int(want.shape[-1])
    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None, vocab
    if getattr(model, "lm_head", None) is not None:
        project = model.lm_head
    elif hasattr(getattr(inner, "embed_tokens", None), "as_linear"):
        project = inner.embed_tokens.as_linear
    else:
        return None, vocab
    cap = getattr(getattr(model, "args", None), "final_logit_softcapping", None)

    def head(hidden):
        logits = project(hidden)
        return mx.tanh(logits / cap) * cap if cap else logits

    try:
        got = head(inner(probe)).astype(mx.float32)
        same = want.shape == got.shape and bool(mx.allclose(want, got, rtol=1e-3, atol=1e-3).item())
    except Exception:  # noqa: BLE001 - any model whose parts do not compose this way takes the full-logits path
        return None, vocab
    return (head if same else None), vocab


def target_logps(model, head, chunk_rows: int, inputs, index, targets, temperature: float = 1.0):
    """log p of each target slot (objectives.target_slots), float32 (S,). With a plain head the decoder runs on the
    batch and the head on the slots only, ``chunk_rows`` at a time (_chunked_head_logps), so no (slots x vocabulary)
    array outlives one chunk. Without one (head None) the model's own full logits are taken at the slots."""
    if head is None:
        logits = model(inputs)
        return _logps_of(logits.reshape(-1, logits.shape[-1])[index], targets, temperature)
    hidden = model.model(inputs)
    hidden = hidden.reshape(-1, hidden.shape[-1])[index]
    if targets.shape[0] <= chunk_rows:
        # One chunk: its logits are at their largest when the backward starts either way, so recomputing them in
        # the backward would only add the head's matmul once more.
        return _logps_of(head(hidden), targets, temperature)
    return _chunked_head_logps(head, chunk_rows, temperature)(hidden, targets)


def _chunked_head_logps(head, chunk_rows: int, temperature: float = 1.0):
    """_logps_of(head(hidden), targets, temperature), ``chunk_rows`` rows at a time, one chunk's logits alive at once in the
    forward and in the backward (which recomputes them). Two things make that so. The backward is written here:
    mx.checkpoint per chunk frees each chunk's logits after its forward, but the recomputations are independent
    branches of the graph, and MLX builds its evaluation order breadth-first up to 20 branches wide
    (MLX_BFS_MAX_WIDTH), so every chunk's logits were alive together (+1.6 GB at 2 x 1024 targets, 128k vocabulary).
    And each chunk, forward and backward, waits on the previous one through mx.depends, a dependency without data,
    which leaves MLX a single order. The head is frozen base weights (LoRA targets are inside the blocks), so the
    hidden states are the only input that takes a gradient."""
    @mx.custom_function
    def logps(hidden, targets):
        pieces = []
        for s in range(0, targets.shape[0], chunk_rows):
            chunk = hidden[s:s + chunk_rows]
            if pieces:
                chunk = mx.depends(chunk, pieces[-1])
            pieces.append(_logps_of(head(chunk), targets[s:s + chunk_rows], temperature))
        return mx.concatenate(pieces)

    @logps.vjp
    def logps_vjp(primals, cotangent, output):
        hidden, targets = primals
        grads = []
        for s in range(0, targets.shape[0], chunk_rows):
            chunk = hidden[s:s + chunk_rows]
            if grads:
                chunk = mx.depends(chunk, grads[-1])
            chunk_targets = targets[s:s + chunk_rows]
            _, (grad,) = mx.vjp(lambda h: _logps_of(head(h), chunk_targets, temperature), [chunk],
                                [cotangent[s:s + chunk_rows]])
            grads.append(grad)
        return mx.concatenate(grads), mx.zeros_like(targets)

    return logps


def _row_sums(values, rows, num_rows: int):
    """Per-row sums of slot values, (num_rows,): a one-hot product, which compile and grad take as any matmul."""
    return (mx.arange(num_rows)[:, None] == rows[None, :]).astype(mx.float32) @ values


def make_grpo_objective(g, has_old: bool, logps):
    """This micro-batch's share of the grpo objective (src/backend/objectives.py) and its KL sum over completion tokens:
    sum over rows of (the row's per-token losses / its divisor), times token_scale (1/N of the step). Per slot:
    ``old`` and ``ref`` are the recorded and reference log-probs at the slot, ``adv`` is per row."""
    def grpo(model, token_scale, pair_scale, inputs, index, targets, weights, rows, adv, old, ref):
        logp = logps(model, inputs, index, targets)
        old = old if has_old else mx.stop_gradient(logp)
        ratio = mx.exp(logp - old)
        a = adv[rows]
        per_token = -mx.minimum(ratio * a, mx.clip(ratio, 1.0 - g.epsilon, 1.0 + g.epsilon) * a)
        kl_sum = mx.zeros((), dtype=mx.float32)
        if g.beta > 0:
            diff = ref - logp
            kl = mx.exp(diff) - diff - 1.0
            per_token = per_token + g.beta * kl
            kl_sum = mx.stop_gradient((kl * weights).sum())
        num_rows = inputs.shape[0]
        if g.loss_type in ("dr_grpo", "dapo"):  # a constant: max_new_tokens, or 1 (dapo's 1/C is token_scale)
            divisor = objectives.grpo_row_divisor(g.loss_type, 0, g.max_new_tokens)
        else:
            divisor = mx.maximum(_row_sums(weights, rows, num_rows), 1.0)
        per_row = _row_sums(per_token * weights, rows, num_rows) / divisor
        return per_row.sum() * token_scale, kl_sum

    return grpo


def make_objective(method: str, beta: float, logps):
    """This micro-batch's share of the step objective (src/backend/objectives.py) from its target slots; ``logps`` is
    target_logps bound to the model's head."""
    def cross_entropy(model, token_scale, pair_scale, inputs, index, targets, weights, rows):
        return -(logps(model, inputs, index, targets) * weights).sum() * token_scale

    def orpo(model, token_scale, pair_scale, inputs, index, targets, weights, rows):
        num_rows = inputs.shape[0]
        row_logp = _row_sums(logps(model, inputs, index, targets) * weights, rows, num_rows)
        avg_logp = mx.minimum(row_logp / mx.maximum(_row_sums(weights, rows, num_rows), 1.0), objectives.AVG_LOGP_MAX)
        log_odds = avg_logp - mx.log(-mx.expm1(avg_logp))
        odds_ratio_loss = _neg_logsigmoid(log_odds[0::2] - log_odds[1::2]).sum()
        return -row_logp[0::2].sum() * token_scale + beta * odds_ratio_loss * pair_scale

    def dpo(model, token_scale, pair_scale, inputs, index, targets, weights, rows, ref_logps):
        row_logp = _row_sums(logps(model, inputs, index, targets) * weights, rows, inputs.shape[0])
        margin = (row_logp[0::2] - ref_logps[0::2]) - (row_logp[1::2] - ref_logps[1::2])
        return _neg_logsigmoid(beta * margin).sum() * pair_scale

    return {"sft": cross_entropy, "cpt": cross_entropy, "orpo": orpo, "dpo": dpo}[method]


def reward_scores(model, inputs, positions):
    """reward's r(row), float32 (B,) (src/backend/objectives.py): the score head (``model.score``, float32) on the
    decoder's final-normed hidden state at each row's score position; the LM head never runs."""
    hidden = model.model(inputs)
    picked = hidden[mx.arange(inputs.shape[0]), positions].astype(mx.float32)
    return (picked @ model.score.weight.T)[:, 0]


def make_reward_objective(center_coefficient: float):
    def reward(model, token_scale, pair_scale, inputs, positions):
        r = reward_scores(model, inputs, positions)
        pair_losses = _neg_logsigmoid(r[0::2] - r[1::2])
        if center_coefficient:
            pair_losses = pair_losses + center_coefficient * (r[0::2] + r[1::2]) ** 2
        return pair_losses.sum() * pair_scale

    return reward


# ---------------------------------------------------------------------------
# Helpers


# How MLX words an allocation that failed when it raises instead of aborting: its allocators' "[metal::malloc]
# Attempting to allocate N bytes which is greater than the maximum allowed buffer size of M bytes.", "[metal::malloc]
# Resource limit (N) exceeded.", "[malloc] Unable to allocate N bytes." (and "[cuda::malloc] ..."), and Metal's
# "[METAL] Command buffer execution failed: Insufficient Memory" where it reaches Python.
_OOM_TEXTS = ("out of memory", "outofmemory", "unable to allocate", "insufficient memory", "malloc]",
              "maximum allowed buffer size")


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, (OutOfMemory, PeerLost)):  # overnight's own, which already say what happened
        return False
    text = str(exc).lower()
    return any(s in text for s in _OOM_TEXTS)


def _no_answer(timeout_s: float, where: str) -> None:
    """The watchdog's end of a collective that never completes: one line on stderr, exit 1 at once (the
    main thread is blocked inside MLX and cannot be interrupted)."""
    os.write(2, (f"error: no answer from the other processes of this data-parallel job for {timeout_s:.0f} s "
                 f"({where}): one of them died or stopped; the last committed checkpoint is intact, continue "
                 "with: overnight train ... --auto-resume\n").encode())
    os._exit(1)


class MLXCollective:
    """The Collective protocol (src/backend/__init__.py) over mx.distributed (mlx.launch's ring backend). A peer that died
    makes MLX raise at once ("connection to a peer was lost"): PeerLost. A peer that is alive but never answers
    would hang forever (MLX collectives have no timeout), so a watchdog thread ends this process with a message
    once one collective has waited timeout_s."""

    def __init__(self, group, timeout_s: float):
        self.group, self.rank, self.size, self.timeout_s = group, group.rank(), group.size(), timeout_s
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="overnight-collective-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                _no_answer(self.timeout_s, f"{self._what} on rank {self.rank} of {self.size}")

    def run(self, what: str, compute):
        """compute() issues the collective; it is evaluated here under the watchdog."""
        self._what, self._deadline = what, time.monotonic() + self.timeout_s
        try:
            result = compute()
            mx.eval(result)
            return result
        except RuntimeError as exc:
            raise PeerLost(f"another process of this data-parallel job stopped answering or died ({what} on rank "
                           f"{self.rank} of {self.size}): {str(exc)[:200]}") from None
        finally:
            self._deadline = None

    def _reduce(self, values, reduce, what: str) -> np.ndarray:
        # The ring backend reduces float32: a float64 value travels as float32 high part + float32 remainder, so
        # sums of eval losses and step numbers keep ~1e-14 relative precision.
        values = np.asarray(values, dtype=np.float64)
        high = values.astype(np.float32)
        low = (values - high.astype(np.float64)).astype(np.float32)
        if reduce is mx.distributed.all_max:  # the max of the high parts; flags and codes are exact in float32
            out = self.run(what, lambda: reduce(mx.array(high), group=self.group))
            return np.array(out, dtype=np.float64)
        out = np.array(self.run(what, lambda: reduce(mx.array(np.concatenate([high, low])), group=self.group)))
        return out[:len(values)].astype(np.float64) + out[len(values):].astype(np.float64)

    def all_sum(self, values) -> np.ndarray:
        return self._reduce(values, mx.distributed.all_sum, "a sum")

    def all_max(self, values) -> np.ndarray:
        return self._reduce(values, mx.distributed.all_max, "an agreement")

    def broadcast(self, values) -> np.ndarray:
        mine = np.asarray(values, dtype=np.float64)
        return self._reduce(mine if self.rank == 0 else np.zeros_like(mine), mx.distributed.all_sum,
                            "a broadcast from rank 0")

    def barrier(self) -> None:
        self._reduce(np.zeros(1), mx.distributed.all_sum, "a barrier")


def _save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """Write through a temporary name, fsync, rename: mx.save_safetensors truncates its target in
    place (a kill mid-write leaves a corrupt file) and appends `.safetensors` to any other name."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _resolve_model_dir(path: str) -> Path:
    from overnight.backend import hub

    return hub.resolve_model_dir(path, backend="mlx")


def _load_model(model_dir: Path, quantization: Any, details: dict[str, Any], dtype: Any = None) -> nn.Module:
    """The base model, read lazily and quantized block by block when model.quantization.bits asks and the folder is
    not quantized already, or read from the quantized-weight cache (backends/mlx_load.py); says which in
    details["quantization"] and details["base_weights"]."""
    from overnight.backends import mlx_load

    return mlx_load.load_base(model_dir, quantization, details, is_oom=_is_oom, dtype=dtype)


# The group sizes mx.quantize takes for affine quantization (mlx 0.32: "The supported group sizes are 32, 64, and
# 128"); any other raised ValueError from inside the load, a crash the supervisor restarted.
MLX_GROUP_SIZES = (32, 64, 128)


def _check_quantization(model_dir: Path, quantization: Any, details: dict[str, Any]) -> None:
    """model.quantization against what this folder and MLX can do, before anything loads: a folder another library
    saved quantized, or a group size MLX cannot quantize with, is refused by name; on a folder mlx-lm quantized
    already (used as it is), values other than the folder's are said as not applied."""
    from overnight.backend import model_folder

    config = model_folder.read_config(model_dir)
    recorded = model_folder.mlx_quantization(model_dir, config)
    saved = config.get("quantization_config")
    if recorded is None and isinstance(saved, dict) and saved:
        # mlx-lm's load then failed on the extra tensors (absmax, quant_map, ...), said as weight files to check
        raise ConfigError(f"config key 'model.path': {model_dir} is saved quantized by "
                          f"{saved.get('quant_method') or 'another library'} (config.json's quantization_config), "
                          "which mlx-lm cannot read. Give the mlx backend the original unquantized model (it "
                          "quantizes it itself as it loads: model.quantization.bits), or train this one with "
                          "--backend torch")
    if recorded is not None:
        differs = [f"model.quantization.{key}={getattr(quantization, key)}" for key in ("bits", "group_size")
                   if recorded and recorded.get(key) != getattr(quantization, key)]
        if differs:
            details["quantization_note"] = (
                f"{differs[0]} is not applied: {model_dir} is quantized already ({recorded['bits']}-bit, group "
                f"{recorded['group_size']}) and trains as it is; give the original model to quantize it another way")
        return
    if quantization.bits and quantization.group_size not in MLX_GROUP_SIZES:
        raise ConfigError(f"config key 'model.quantization.group_size': MLX quantizes in groups of "
                          f"{', '.join(map(str, MLX_GROUP_SIZES[:-1]))} or {MLX_GROUP_SIZES[-1]} weights, not "
                          f"{quantization.group_size} -> model.quantization.group_size=64 (the default)")


def _unquantized_note(model: nn.Module, group_size: int) -> str | None:
    """mlx-lm's quantize_model leaves a layer whose input size is not a multiple of the group size in full
    precision without a word (a 576-wide model at group 128 kept every attention projection): said, with the group
    sizes that would quantize them all."""
    left = [(name, int(m.weight.shape[-1])) for name, m in model.named_modules()
            if hasattr(m, "to_quantized") and hasattr(m, "weight") and m.weight.shape[-1] % group_size]
    if not left:
        return None
    quantized = sum(1 for _, m in model.named_modules() if hasattr(m, "scales") and hasattr(m, "group_size"))
    fits = [g for g in MLX_GROUP_SIZES if all(size % g == 0 for _, size in left)]
    name, size = left[0]
    return (f"model.quantization.group_size={group_size}: {len(left)} of {len(left) + quantized} layers stay "
            f"unquantized (their input size is not a multiple of {group_size}, e.g. {name}: {size})"
            + (f" -> model.quantization.group_size={max(fits)} quantizes them all" if fits else ""))


def _say_compute_dtype(model: nn.Module, named: str, details: dict[str, Any]) -> None:
    """details["compute_dtype"]: the dtype of the weights that stay floating (model.dtype, or with auto the
    checkpoint's), which activations take; float16 is said as torch says it (no loss scaling on either)."""
    kinds = [v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    dtype = max(set(kinds), key=kinds.count) if kinds else mx.float32
    details["compute_dtype"] = str(dtype).rsplit(".", 1)[-1]
    if dtype == mx.float16:
        which = "model.dtype=float16" if named == "float16" else "model.dtype=auto (the checkpoint's float16)"
        details["float16_note"] = (f"{which} computes without loss scaling: gradients smaller than float16 can hold "
                                   "are lost; model.dtype=bfloat16 or float32 has no such floor")


def _lora_keys(layers: list[nn.Module], num_layers: int, targets: list[str]) -> list[str]:
    """The paths inside a block (mlx-lm's `keys`) that lora.targets names in the last num_layers blocks, by the
    rule both backends share (src/backend/lora_targets.py)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear, nn.Embedding, nn.QuantizedEmbedding)
    blocks = lora_targets.lora_blocks(len(layers), num_layers)
    paths = [f"layers.{index}.{p}" for index in blocks for p, m in layers[index].named_modules()
             if p and (isinstance(m, kinds) or hasattr(m, "to_lora"))]
    return lora_targets.resolve(targets, paths, blocks)


class _KeyBox:
    """Holds a dropout key outside the module tree (an mx.array attribute would become a parameter)."""
    key = None


class KeyedDropout(nn.Module):
    """LoRA dropout whose mask comes from a key its block hands it (see _patch_blocks), not from the global
    RNG at call time, so the recomputation of a checkpointed block draws the very same mask."""

    def __init__(self, p: float):
        super().__init__()
        self._p_keep = 1.0 - p
        self._box = _KeyBox()

    def __call__(self, x):
        if self._p_keep == 1.0 or not self.training:
            return x
        mask = mx.random.bernoulli(self._p_keep, x.shape, key=self._box.key)
        return (mask * x) * (1.0 / self._p_keep)


def _patch_blocks(layers: list[nn.Module], grad_checkpoint: bool) -> None:
    """Give each block's LoRA dropouts keys drawn once per block call, and optionally recompute the block's
    activations in the backward pass (gradient checkpointing).

    mx.checkpoint re-runs the block in the backward pass; with dropout drawing from the global RNG the
    recomputation would use another mask than the forward (wrong gradients). Drawing one key per block
    call outside the checkpoint and passing it in makes forward and recompute see the same masks, and the
    masks are the same with checkpointing on or off.
    Python looks `__call__` up on the class, so the class is patched (as mlx-lm does), but only instances
    flagged here change: other models of the same class in the process are untouched.
    """
    cls = type(layers[0])
    if not getattr(cls, "_overnight_block_patch", False):
        call = cls.__call__

        def patched_call(self, *args, **kwargs):
            dropouts = getattr(self, "_overnight_dropouts", [])
            checkpoint = getattr(self, "_overnight_checkpoint", False)
            # Eval and generation (KV cache) run plainly: no dropout, nothing to recompute.
            if not self.training or not (dropouts or checkpoint):
                return call(self, *args, **kwargs)

            def with_keys(key, *args, **kwargs):
                boxes = [d._box for d in dropouts]
                for box, sub in zip(boxes, mx.random.split(key, len(boxes)) if boxes else []):
                    box.key = sub
                try:
                    return call(self, *args, **kwargs)
                finally:
                    for box in boxes:
                        box.key = None

            # A fresh key from the global stream (re-seeded per update from (seed, update), so resumable).
            key = (mx.random.randint(0, 2**31 - 1, (2,)) if dropouts else mx.zeros((2,))).astype(mx.uint32)
            if not checkpoint:
                return with_keys(key, *args, **kwargs)

            def inner(params, key, *args, **kwargs):
                self.update(params)
                # mx.checkpoint differentiates with respect to every input; a key has no gradient.
                return with_keys(mx.stop_gradient(key), *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), key, *args, **kwargs)

        cls.__call__ = patched_call
        cls._overnight_block_patch = True
    for layer in layers:
        layer._overnight_checkpoint = grad_checkpoint
        layer._overnight_dropouts = []
        for _, module in sorted(layer.named_modules(), key=lambda item: item[0]):
            if "lora_a" in module and isinstance(getattr(module, "dropout", None), nn.Dropout):
                p = 1.0 - module.dropout._p_1
                if p > 0:
                    module.dropout = KeyedDropout(p)
                    layer._overnight_dropouts.append(module.dropout)


def _dora_layer_class():
    """DoRA as overnight defines it (src/backend/lora_init.py, DORA: PEFT's), on mlx-lm's DoRALinear: the same
    parameters (lora_a, lora_b, m) under the same names, so a saved adapter is mlx-lm's own and mlx_lm.load reads it,
    and its fuse() is mlx-lm's. Only the training forward differs: mlx-lm's rescales the undropped base output, PEFT's
    (this one) takes the base term's rescaling from the dropped input too. With dropout off both are
    g * (W x + s B A x) + b. Built on first use, so importing this module does not import mlx-lm's tuner."""
    global _DORA_LAYER
    if _DORA_LAYER is not None:
        return _DORA_LAYER
    from mlx_lm.tuner.dora import DoRALinear

    class PeftDoRALinear(DoRALinear):
        def __call__(self, x):
            base = self.linear(x)  # the quantized matmul on a 4-bit base, the bias included
            if not self.scale:  # scale 0 is how the backend turns adapters off (_lora_off): the base alone
                return base
            weight = self._dequantized_weight().astype(mx.float32)
            # The norm in float32 with its gradient stopped, as PEFT's (A and B detached in it too).
            norm = mx.stop_gradient(mx.linalg.norm(weight + (self.scale * self.lora_b.T) @ self.lora_a.T, axis=1))
            g = self.m / norm
            dropped = self.dropout(x)
            if dropped is x:  # no dropout (eval, or lora.dropout 0): W x is the base output without its bias
                base_term = base - self.linear.bias if "bias" in self.linear else base
            else:
                base_term = dropped @ weight.T.astype(x.dtype)
            lora = (dropped @ self.lora_a) @ self.lora_b
            return base + ((g - 1.0) * base_term + g * (self.scale * lora)).astype(x.dtype)

    _DORA_LAYER = PeftDoRALinear
    return _DORA_LAYER


_DORA_LAYER = None


def _use_peft_dora(model: nn.Module) -> None:
    """Give every DoRA layer linear_to_lora_layers made the PEFT forward (_dora_layer_class); DoRA on anything but a
    linear layer (an embedding, stacked experts) is refused by name: PEFT's and mlx-lm's differ there, and
    overnight defines only the linear one."""
    from mlx_lm.tuner.dora import DoRALinear

    layer_class = _dora_layer_class()
    for name, module in model.named_modules():
        if type(module) is DoRALinear:
            module.__class__ = layer_class  # same parameters, same fuse(): only __call__ changes
        elif "lora_a" in module and not isinstance(module, DoRALinear):
            raise ConfigError(f"config key 'lora.use_dora': {name} ({type(module).__name__}) is not a linear layer, "
                              "and overnight's DoRA covers linear layers only; take it out of lora.targets")


def _init_lora_a(model: nn.Module, seed: int) -> None:
    """The framework-free initial lora_a (src/backend/lora_init.py), so torch and mlx start from the same adapter."""
    for name, module in model.named_modules():
        if "lora_a" in module and isinstance(module.get("lora_a"), mx.array):
            in_features, rank = module.lora_a.shape
            values = lora_init.lora_a(seed, lora_init.neutral_module_name(name), rank, in_features)
            module.lora_a = mx.array(values.T).astype(module.lora_a.dtype)


def _step_seed(seed: int, step: int) -> int:
    # The dropout key of every update is a pure function of (seed, step): a resume, an OOM retry
    # or an extra eval in between cannot shift it.
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0])


# ---------------------------------------------------------------------------


class MLXBackend:
    name = "mlx"
    adapter_format = "mlx"  # what its adapter/ folders hold (src/backend/adapter_formats.py)
    supports_dora = True  # lora.use_dora (src/backend/lora_init.py, DORA)
    loss_kernels = ("chunked",)  # model.loss_kernel: Liger's kernels are CUDA (Triton) only

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.optimizer: optim.Optimizer | None = None
        self.method = "sft"
        self.seed = 0
        self.updates = 0
        self.max_grad_norm = 0.0
        self.adapter_config: dict[str, Any] = {}
        self._lora_modules: list[nn.Module] = []
        self._training = None
        self._stop_every: int | None = None  # tests: the stop check's interval (None: the device's)
        self._head = None  # find_plain_head's, or None: the full-logits path
        self._chunk_rows = 64
        self.limit_bytes: int | None = None
        self._world: MLXCollective | None = None  # set by connect() in a data-parallel job

    def connect(self, timeout_s: float) -> MLXCollective:
        """Join the job mlx.launch started (MLX_RANK, MLX_HOSTFILE) over mx.distributed's ring backend. The ring's
        rank 0 waits for its peers without a limit when one never comes: the same watchdog bounds the join."""
        joined = threading.Event()

        def watch():
            if not joined.wait(timeout_s):
                _no_answer(timeout_s, f"joining the job as rank {os.environ.get('MLX_RANK', '?')}")

        threading.Thread(target=watch, name="overnight-join-watchdog", daemon=True).start()
        try:
            group = mx.distributed.init(strict=True, backend="ring")
        except Exception as exc:  # noqa: BLE001
            if "bind" in str(exc).lower():  # the ring's "Couldn't bind socket (error: 98)": EADDRINUSE
                raise PortTaken(f"rank {os.environ.get('MLX_RANK', '?')} could not listen on the port mlx.launch "
                                f"gave it ({exc}): another program holds it") from None
            raise PeerLost(f"could not join the data-parallel job started by mlx.launch: {exc}") from None
        finally:
            joined.set()
        self._world = MLXCollective(group, timeout_s)
        return self._world

    # -- setup -------------------------------------------------------------

    def setup(self, cfg: Any, seed: int) -> SetupInfo:
        """Load the model (quantized in memory if asked), attach LoRA with the framework-free initial weights, build
        the optimizer and the compiled steps: the steps below, in this order."""
        from mlx_lm.utils import get_total_parameters

        if cfg.train.optimizer != "adamw":
            raise ConfigError(
                f"config key 'train.optimizer': {cfg.train.optimizer} runs only on the torch backend with CUDA; "
                "use adamw with the mlx backend"
            )
        self._read_config(cfg, seed)
        details: dict[str, Any] = {"device": str(mx.default_device()), "method": self.method}
        if not cfg.train.deterministic:
            details["deterministic_note"] = ("train.deterministic=false changes nothing on mlx: it has no "
                                             "deterministic mode to turn off (the key switches torch's on CUDA)")
        model_dir = _resolve_model_dir(cfg.model.path)
        _check_quantization(model_dir, cfg.model.quantization, details)
        model = _load_model(model_dir, cfg.model.quantization, details,
                            None if cfg.model.dtype == "auto" else getattr(mx, cfg.model.dtype))
        _say_compute_dtype(model, cfg.model.dtype, details)
        if details["quantization"].endswith("quantized in memory"):
            note = _unquantized_note(model, cfg.model.quantization.group_size)
            if note:
                details["quantization_note"] = note
        base_params = get_total_parameters(model)
        # Before LoRA is attached: the probe's forward then sees the base alone, dropout not yet in the graph.
        self._head, vocab = find_plain_head(model)
        self._chunk_rows = objectives.logit_chunk_rows(vocab, multiple=64)
        details["loss_head"] = (f"output head on target positions only, {self._chunk_rows} a chunk"
                                if self._head is not None else "full logits (the model's head is not a plain "
                                "projection of its decoder's output)")
        lora_parameters = self._apply_lora(model, cfg, details)
        if self.method == "reward":
            self._attach_score_head(model, model_dir)
        self.model = model
        self._build_optimizer(cfg.train)
        self._build_steps()
        self._set_training(True)
        self._set_memory_limit(details)
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        details.update(lora_layers=self.adapter_config["num_layers"], lora_keys=lora_parameters["keys"],
                       lora_scale=lora_parameters["scale"])
        return SetupInfo(trainable_params=int(trainable), total_params=int(base_params + trainable),
                         model_dir=Path(model_dir), details=details)

    def _attach_score_head(self, model: nn.Module, model_dir) -> None:
        """reward: the score head (objectives.py) as the model's trainable ``score`` (hidden -> 1, no bias, float32,
        zero at the start), so the optimizer, the clip, the all-reduce buffer and the checkpoints take it with the
        LoRA weights; refused by name where the decoder's hidden states cannot be reached."""
        from overnight.data.tokenizer import load_tokenizer

        inner = getattr(model, "model", None)
        probe = mx.array([[1, 2, 3]], dtype=mx.int32)
        try:
            hidden = inner(probe) if callable(inner) else None
        except Exception:  # noqa: BLE001 - refused below by name
            hidden = None
        if hidden is None or hidden.ndim != 3 or hidden.shape[:2] != probe.shape:
            raise ConfigError(f"config key 'data.method': reward needs the decoder of {type(model).__name__} "
                              "without its output head (mlx-lm's model.model), and this architecture does not "
                              "expose one; train a reward model on a Llama/Qwen/Mistral-style model")
        head = nn.Linear(int(hidden.shape[-1]), 1, bias=False)
        head.weight = mx.zeros((1, int(hidden.shape[-1])), dtype=mx.float32)
        model.score = head
        self.pad_id = load_tokenizer(Path(model_dir)).pad_id

    def _read_config(self, cfg: Any, seed: int) -> None:
        self.method = cfg.data.method
        self.center_coefficient = float(cfg.reward.center_coefficient)
        self.beta = float(cfg.preference.beta)
        self.grpo = cfg.grpo
        self.seed = int(seed)
        self.max_grad_norm = float(cfg.train.max_grad_norm)

    def _apply_lora(self, model: nn.Module, cfg: Any, details: dict[str, Any]) -> dict[str, Any]:
        """Freeze the base and turn lora.targets of the last lora.layers blocks (-1: all) into LoRA layers with the
        framework-free lora_a and keyed dropout; sets the adapter_config mlx-lm reads back. Returns the LoRA
        parameters (rank, scale, dropout, keys)."""
        from mlx_lm.tuner.utils import linear_to_lora_layers

        blocks = len(model.layers)
        num_layers = blocks if cfg.lora.layers == -1 else min(cfg.lora.layers, blocks)
        note = lora_targets.lora_blocks_note(blocks, cfg.lora.layers)
        if note:
            details["lora_layers_note"] = note
        lora_parameters = {
            "rank": cfg.lora.rank,
            "scale": cfg.lora.alpha / cfg.lora.rank,
            "dropout": cfg.lora.dropout,
            "keys": _lora_keys(list(model.layers), num_layers, list(cfg.lora.targets)),
        }
        model.freeze()
        use_dora = bool(cfg.lora.use_dora)
        try:
            linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=use_dora)
        except ValueError as exc:  # mlx-lm's "SwitchLinear doesn't support DoRA yet."
            if not use_dora:
                raise
            raise ConfigError(f"config key 'lora.use_dora': {exc} Take such layers out of lora.targets") from None
        if use_dora:
            _use_peft_dora(model)
        _init_lora_a(model, self.seed)
        _patch_blocks(list(model.layers), bool(cfg.model.grad_checkpoint))
        self._lora_modules = [m for _, m in model.named_modules()
                              if "lora_a" in m and isinstance(getattr(m, "scale", None), float)]
        self.adapter_config = {
            "fine_tune_type": "dora" if use_dora else "lora",  # what mlx_lm.load reads to make DoRA layers
            "num_layers": num_layers,
            "lora_parameters": lora_parameters,
            "model": recorded_base(str(cfg.model.path)),
            "overnight": {"lora_alpha": cfg.lora.alpha, "method": self.method, "quantization": details["quantization"]},
        }
        return lora_parameters

    def _build_optimizer(self, train: Any) -> None:
        # torch.optim.AdamW's algorithm exactly (bias correction, eps 1e-8 outside the sqrt, decoupled decay);
        # mlx's default leaves bias correction off, which makes early steps ~3x larger (SPEC §4 parity).
        self.optimizer = optim.AdamW(learning_rate=train.learning_rate, weight_decay=train.weight_decay,
                                     betas=[0.9, 0.999], eps=1e-8, bias_correction=True)
        # A fixed state tree from the start: load() replaces leaves in it and compile sees one structure.
        self.optimizer.init(self.model.trainable_parameters())
        mx.eval(self.model.parameters(), self.optimizer.state)

    def _set_memory_limit(self, details: dict[str, Any]) -> None:
        recommended = mx.device_info().get("max_recommended_working_set_size")
        if recommended:
            # The memory limit is where evaluation stops queueing work and waits for the GPU to finish (and free)
            # what is in flight (mlx/transforms.cpp); the default, 1.5x the working set, lets a long run drift into
            # swap overnight. The wired limit keeps that much of MLX's buffers resident (macOS 15+; above the
            # working set it raises, hence exactly it, as mlx-lm sets it). MLX already reclaims its cache before
            # an allocation would take the total past 95% of the working set (allocator.cpp's gc limit).
            self.limit_bytes = int(recommended)
            mx.set_memory_limit(self.limit_bytes)
            try:
                mx.set_wired_limit(self.limit_bytes)
                details["wired_limit_mb"] = round(self.limit_bytes / _MB)
            except (RuntimeError, ValueError) as exc:
                details["wired_limit_note"] = f"wired limit not set: {exc}"
            details["memory_limit_mb"] = round(self.limit_bytes / _MB)
            # MLX keeps freed buffers for reuse up to the memory limit by default, so over a night the cache can
            # hold what the model and the next step's activations need and push the process into swap; a quarter
            # of the working set is plenty to reuse a step's buffers.
            mx.set_cache_limit(int(self.limit_bytes * CACHE_SHARE))
            details["cache_limit_mb"] = round(self.limit_bytes * CACHE_SHARE / _MB)

    def _build_steps(self) -> None:
        """(Re)compile the step functions. mx.compile captures the state trees it is given, so this
        runs again whenever one of them is replaced (load, an OOM restore)."""
        model, optimizer = self.model, self.optimizer
        if self.method == "grpo":
            objective = make_grpo_objective(self.grpo, self.grpo.iterations > 1, self._logps)
        elif self.method == "reward":
            objective = make_reward_objective(self.center_coefficient)
        else:
            objective = make_objective(self.method, self.beta, self._logps)
        value_and_grad = nn.value_and_grad(model, objective)
        max_norm = self.max_grad_norm

        def accumulate(acc, *scales_and_batch):
            loss, grads = value_and_grad(model, *scales_and_batch)
            if acc is not None:
                grads = tree_map(lambda a, g: a + g, acc, grads)
            return loss, grads

        def update(grads):
            if max_norm > 0:
                grads, norm = optim.clip_grad_norm(grads, max_norm)
            else:
                norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
            optimizer.update(model, grads)
            return norm

        state = [model.state, optimizer.state]
        # value_and_grad writes traced parameters into the model, so the model is an output too.
        self._accumulate = mx.compile(accumulate, inputs=[model.state, mx.random.state],
                                      outputs=[model.state, mx.random.state])
        self._update = mx.compile(update, inputs=state, outputs=state)
        self._eval = mx.compile(lambda *scales_and_batch: objective(model, *scales_and_batch), inputs=[model.state])

    def _set_training(self, training: bool) -> None:
        # Dropout reads the flag while a graph is traced; each compiled function only ever runs
        # in one mode, so a cached trace never sees the other one.
        if self._training is not training:
            self.model.train(training)
            self._training = training

    @contextlib.contextmanager
    def _lora_off(self):
        scales = [m.scale for m in self._lora_modules]
        for m in self._lora_modules:
            m.scale = 0.0
        try:
            yield
        finally:
            for m, s in zip(self._lora_modules, scales):
                m.scale = s

    def _logps(self, model, inputs, index, targets):
        return target_logps(model, self._head, self._chunk_rows, inputs, index, targets,
                            self.grpo.temperature if self.method == "grpo" else 1.0)

    def _device_batch(self, batch: Batch) -> tuple[mx.array, ...]:
        """(inputs, then the target slots: index, targets, weights, rows; then the method's own arrays). Slots are
        padded to a multiple of 64 (objectives.target_slots) so compiled steps see few shapes."""
        ids = np.asarray(batch.input_ids, dtype=np.int32)
        if batch.paired != (self.method in objectives.PAIRED):
            raise ValueError(f"method {self.method} got a batch with paired={batch.paired}")
        if self.method == "reward":  # the whole rows: the score position may be the last column
            return mx.array(ids), mx.array(objectives.score_positions(ids, batch.pad_id).astype(np.int32))
        slots = objectives.target_slots(batch.loss_mask, bucket=64)
        inputs = mx.array(ids[:, :-1])
        arrays = (inputs, mx.array(slots.index.astype(np.int32)), mx.array(ids[:, 1:].reshape(-1)[slots.index]),
                  mx.array(slots.weight), mx.array(slots.row.astype(np.int32)))
        if self.method == "grpo":
            return (*arrays, *self._grpo_inputs(batch, slots, arrays))
        if self.method != "dpo":
            return arrays
        # The reference policy is the frozen base: the same weights with every LoRA scale at 0,
        # no dropout. Its graph is recorded now, so restoring the scales afterwards is safe.
        ref = _row_sums(self._reference_logps(arrays) * arrays[3], arrays[4], ids.shape[0])
        mx.async_eval(ref)
        return (*arrays, ref)

    def _reference_logps(self, arrays) -> mx.array:
        """The slots' log-probs under the reference (adapter off, no dropout), out of the graph."""
        was_training = self._training
        self._set_training(False)
        with self._lora_off():
            ref = mx.stop_gradient(self._logps(self.model, *arrays[:3]))
        self._set_training(was_training)
        return ref

    def _grpo_inputs(self, batch: Batch, slots: objectives.TargetSlots, arrays) -> tuple:
        if batch.advantages is None:
            raise ValueError("method grpo needs batches of sampled completions with advantages (src/methods/grpo.py)")
        adv = mx.array(np.asarray(batch.advantages, dtype=np.float32))
        if batch.old_logp is not None:
            old = mx.array(np.asarray(batch.old_logp[:, 1:], dtype=np.float32).reshape(-1)[slots.index])
        else:
            old = mx.zeros(slots.index.shape, dtype=mx.float32)
        if self.grpo.beta > 0:  # the reference: adapter off, no dropout (as dpo's)
            ref = self._reference_logps(arrays)
            mx.async_eval(ref)
        else:
            ref = mx.zeros(slots.index.shape, dtype=mx.float32)
        return adv, old, ref

    def sample(self, prompts, seeds: list[int], max_new_tokens: int, temperature: float,
               top_p: float, stop_ids: tuple[int, ...]) -> np.ndarray:
        """One sampled continuation per seed, all rows in one batch (src/backend/__init__.py), KV cache, adapter
        on, no dropout. Each row has its own key chain (mx.random.key(seed), split once per token whatever the
        batch): Gumbel-max over the top-p set."""
        n, max_new_tokens = len(seeds), int(max_new_tokens)
        rows, single = as_prompts(prompts)
        rows = rows * n if single else rows
        if len(rows) != n:
            raise ValueError(f"sample: {len(rows)} prompts for {n} seeds")
        if n == 0 or max_new_tokens <= 0:
            return np.full((n, max(0, max_new_tokens)), -1, dtype=np.int64)
        keys = [mx.random.key(int(s)) for s in seeds]  # generator_seed's range

        def draw(logits):
            scaled = logits / temperature
            if top_p < 1.0:
                # Keep the most likely tokens whose probability reaches top_p (the first one always).
                probs = mx.softmax(scaled, axis=-1)
                ordered = -mx.sort(-probs, axis=-1)
                kept = (mx.cumsum(ordered, axis=-1) - ordered) < top_p
                floor = mx.min(mx.where(kept, ordered, mx.inf), axis=-1, keepdims=True)
                scaled = mx.where(probs >= floor, scaled, -mx.inf)
            noise = []
            for r in range(n):
                keys[r], sub = mx.random.split(keys[r])
                noise.append(mx.random.gumbel(shape=(scaled.shape[-1],), key=sub))
            return mx.argmax(scaled + mx.stack(noise), axis=-1)

        return self._decode(rows, max_new_tokens, as_stop_ids(stop_ids), draw)

    def _stop_check_every(self) -> int:
        # On the CPU (mlx[cpu]) a read-back waits for nothing a later one would not, and saves the forward passes a
        # later check would run after the last row ended; on Metal each one stalls the queue.
        if self._stop_every is not None:
            return self._stop_every
        return 1 if mx.default_device() == mx.cpu else STOP_CHECK_EVERY

    def _decode(self, rows: list[np.ndarray], max_new_tokens: int, stop_ids: tuple[int, ...], choose) -> np.ndarray:
        """The rows' continuations in one batch: int64 (rows, max_new_tokens), each row's stop token kept and -1
        after it. ``choose(logits)`` picks every row's next token from its float32 logits (rows, vocab).

        Rows of one prompt are adjacent. Each distinct prompt is prefilled alone (batch 1, no padding: its cache
        and logits are what it would get on its own), then the rows' caches are merged as mlx-lm's BatchGenerator
        merges them (its BatchKVCache: each row left-padded to the longest prompt, the padding masked, each row's
        own RoPE offset), so a row decodes as it would alone (up to the rounding of batched kernels). A row that
        has ended is still fed (its tokens are masked out): it never changes another row. Whether every row has
        ended is read back every _stop_check_every() tokens; in between, each step is queued with async_eval."""
        from mlx_lm.models.cache import make_prompt_cache

        self._set_training(False)
        n = len(rows)
        try:
            starts = [r for r in range(n) if r == 0 or not np.array_equal(rows[r], rows[r - 1])]
            owner = np.repeat(np.arange(len(starts)), np.diff(starts + [n]))
            caches, last = [], []
            for r in starts:
                cache = make_prompt_cache(self.model)
                logits = self.model(mx.array(rows[r].astype(np.int32)[None]), cache=cache)[:, -1]
                mx.eval(logits, [c.state for c in cache])
                caches.append(cache)
                last.append(logits.astype(mx.float32))
            cache = [caches[0][layer].merge([caches[o][layer] for o in owner]) for layer in range(len(caches[0]))]
            del caches
            logits = mx.concatenate([last[o] for o in owner], axis=0)
            stop = mx.array(list(stop_ids), dtype=mx.int32) if stop_ids else None
            done = mx.zeros((n,), dtype=mx.bool_)
            every, steps = self._stop_check_every(), []
            for t in range(max_new_tokens):
                token = choose(logits).astype(mx.int32)
                steps.append(mx.where(done, -1, token))
                if stop is not None:
                    done = done | (token[:, None] == stop[None]).any(axis=1)
                mx.async_eval(steps[-1], done)
                if t + 1 == max_new_tokens or (stop is not None and (t + 1) % every == 0 and done.all().item()):
                    break
                logits = self.model(token[:, None], cache=cache)[:, -1].astype(mx.float32)
            out = np.full((n, max_new_tokens), -1, dtype=np.int64)
            out[:, :len(steps)] = np.array(mx.stack(steps, axis=1)).astype(np.int64)
            return out
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise
            mx.clear_cache()
            raise OutOfMemory(str(exc)) from exc

    def token_logps(self, batch: Batch, adapter: bool = True) -> np.ndarray:
        self._set_training(False)
        ids = np.asarray(batch.input_ids, dtype=np.int32)
        slots = objectives.target_slots(batch.loss_mask, bucket=64)
        with contextlib.nullcontext() if adapter else self._lora_off():
            values = self._logps(self.model, mx.array(ids[:, :-1]), mx.array(slots.index.astype(np.int32)),
                                 mx.array(ids[:, 1:].reshape(-1)[slots.index]))
            values = np.array(values)
        out = np.zeros(batch.loss_mask.shape, dtype=np.float32)
        index = slots.index[:slots.count]
        out[index // (ids.shape[1] - 1), index % (ids.shape[1] - 1) + 1] = values[:slots.count]
        return out

    # -- training ----------------------------------------------------------

    def train_step(self, micro_batches: list[Batch], lr: float,
                   step_scales: tuple[float, float, int] | None = None) -> StepResult:
        token_scale, pair_scale, weight = step_scales or objectives.step_scales(
            self.method, micro_batches, self.grpo.loss_type)
        scales = (mx.array(token_scale, dtype=mx.float32), mx.array(pair_scale, dtype=mx.float32))
        if weight == 0:
            raise ValueError(
                "a training step has no target tokens: every label is masked "
                "(prompts longer than model.max_seq_length with data.mask_prompt on?)"
            )
        self._set_training(True)
        self.optimizer.learning_rate = lr
        mx.random.seed(_step_seed(self.seed, self.updates))
        grads = before = None
        try:
            grads, figures = self._step_gradients(micro_batches, scales)
            before = (self.model.trainable_parameters(), tree_map(lambda x: x, self.optimizer.state))
            norm = self._apply_update(grads, before)
        except (RuntimeError, MemoryError) as exc:
            if isinstance(exc, PeerLost) or not _is_oom(exc):
                raise
            if before is not None:
                self._restore(before)
            # Drop the step's buffers (here and in the frames of the failed call) before handing the cache back.
            grads = None
            traceback.clear_frames(exc.__traceback__)
            mx.clear_cache()
            raise OutOfMemory(str(exc)) from exc
        self.updates += 1
        loss_value, norm_value = figures.loss_sum, float(norm.item())
        if not objectives.update_applies(loss_value, norm_value):
            self._restore(before)  # reported (the loop stops on it), never applied: the weights stay finite
        extras = {"kl": figures.kl} if self.method == "grpo" and self.grpo.beta > 0 else {}
        return StepResult(loss=loss_value, tokens=figures.tokens, grad_norm=norm_value, extras=extras)

    @property
    def _shared(self) -> bool:
        return self._world is not None and self._world.size > 1

    def _step_gradients(self, micro_batches: list[Batch], scales: tuple) -> tuple:
        """(the step's gradients, its step_buffer.StepFigures): this process's passes, and in a data-parallel job
        the one all-reduce that makes both the whole step's. In a job, an out of memory in the passes becomes the
        buffer's flag: this rank still takes part in the all-reduce (so the others are not left waiting in it),
        and every rank raises there."""
        ran_out = False
        try:
            loss_sum, grads, kl_sum = self._local_passes(micro_batches, scales)
        except (RuntimeError, MemoryError) as exc:
            if not (self._shared and _is_oom(exc)):
                raise
            loss_sum = grads = kl_sum = None
            ran_out = True
        if ran_out:  # outside the except block, so the failed passes' buffers are gone
            mx.clear_cache()
        figures = step_buffer.StepFigures(
            loss_sum=0.0 if loss_sum is None else float(loss_sum.item()),
            kl_sum=0.0 if kl_sum is None else float(kl_sum.item()),
            kl_tokens=float(sum(b.loss_mask[:, 1:].sum() for b in micro_batches)),  # grpo: the kl mean's divisor
            tokens=sum(int(b.loss_mask.sum()) for b in micro_batches),
            out_of_memory=ran_out)
        return self._all_reduce(grads, figures) if self._shared else (grads, figures)

    def _local_passes(self, micro_batches: list[Batch], scales: tuple) -> tuple:
        """Forward and backward of each micro-batch: (objective sum, accumulated gradients, grpo KL sum or None),
        evaluated, so an out of memory surfaces here with the weights untouched."""
        acc = loss_sum = kl_sum = None
        for batch in micro_batches:
            if batch.noise_seed is not None:  # this micro-batch's dropout masks, whichever rank runs it
                mx.random.seed(batch.noise_seed)
            loss, acc = self._accumulate(acc, *scales, *self._device_batch(batch))
            if isinstance(loss, (tuple, list)):  # grpo: (objective, KL sum)
                loss, kl = loss
                kl_sum = kl if kl_sum is None else kl_sum + kl
            loss_sum = loss if loss_sum is None else loss_sum + loss
            # Schedules this micro-batch without waiting for it, and cuts the lazy graph so the
            # next one does not hold its activations.
            mx.async_eval(loss_sum, acc)
        # One wait before the update: an OOM in forward/backward surfaces here, weights untouched.
        mx.eval(loss_sum, acc)
        return loss_sum, acc, kl_sum

    def _apply_update(self, grads, before):
        """Clip and step (the compiled update), evaluated here; returns the global norm before clipping. In a job,
        an out of memory here is PeerLost with this rank's weights restored: after the all-reduce the ranks cannot
        agree on a retry any more (this one would split the step while the others applied it), so this process
        ends and the job resumes from its checkpoint."""
        try:
            norm = self._update(grads)
            mx.eval(norm, self.model.trainable_parameters(), self.optimizer.state)
            return norm
        except (RuntimeError, MemoryError) as exc:
            if self._shared and _is_oom(exc):
                self._restore(before)
                raise PeerLost(f"out of memory in the optimizer update on rank {self._world.rank} of "
                               f"{self._world.size}, after the gradients were shared: {str(exc)[:200]}") from None
            raise

    def _all_reduce(self, grads, figures: step_buffer.StepFigures) -> tuple:
        """Data parallel: the step's one all_sum of the buffer src/backend/step_buffer.py lays out (every LoRA
        gradient, then the figures, as one float32 vector; summed, not averaged: each rank's objective is already
        scaled by the whole step's 1/T). ``grads`` is None when this rank ran out of memory: it adds zeros. Returns
        the summed (gradients, figures); any rank's out of memory raises here on every rank, before anything is
        applied."""
        if grads is None:
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        leaves = tree_flatten(grads)
        flat = mx.concatenate([g.astype(mx.float32).reshape(-1) for _, g in leaves]
                              + [mx.array(step_buffer.pack_figures(figures))])
        world = self._world
        summed = world.run("the gradient all-reduce", lambda: mx.distributed.all_sum(flat, group=world.group))
        sizes = [g.size for _, g in leaves]
        figures = step_buffer.read_figures(np.array(summed[step_buffer.figures_slice(sizes)]))
        if figures.out_of_memory:
            raise RuntimeError("out of memory on a process of this data-parallel job")
        rebuilt = [(path, summed[part].reshape(g.shape).astype(g.dtype))
                   for (path, g), part in zip(leaves, step_buffer.gradient_slices(sizes))]
        return tree_unflatten(rebuilt), figures

    def _restore(self, before) -> None:
        self.model.update(before[0])
        self.optimizer.state = before[1]
        self._build_steps()  # compile captured the replaced optimizer state

    def reward_scores(self, batch: Batch) -> np.ndarray:
        """reward: each row's score, float32 (B,), without gradients or dropout."""
        self._set_training(False)
        try:
            return np.array(mx.stop_gradient(reward_scores(self.model, *self._device_batch(batch))))
        except (RuntimeError, MemoryError) as exc:
            if _is_oom(exc):
                mx.clear_cache()
                raise OutOfMemory(str(exc)) from exc
            raise

    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """(objective x weight, weight) with the batch's own normalisers (src/backend/objectives.py)."""
        token_scale, pair_scale, _ = objectives.step_scales(self.method, [batch], self.grpo.loss_type)
        weight = objectives.eval_weight(self.method, batch)
        self._set_training(False)
        try:
            loss = self._eval(mx.array(token_scale, dtype=mx.float32), mx.array(pair_scale, dtype=mx.float32),
                              *self._device_batch(batch))
            return float(loss.item()) * weight, weight
        except (RuntimeError, MemoryError) as exc:
            if _is_oom(exc):
                mx.clear_cache()
                raise OutOfMemory(str(exc)) from exc
            raise

    def generate(self, prompts, max_new_tokens: int, stop_ids: tuple[int, ...]):
        """Greedy continuations with a KV cache, each ending before its first stop token (not included) or at
        max_new_tokens: one array for one prompt, a list for a list, decoded in one batch (see _decode)."""
        rows, single = as_prompts(prompts)
        stop_ids = as_stop_ids(stop_ids)
        if not rows or max_new_tokens <= 0:
            answers = [np.zeros(0, dtype=np.int64) for _ in rows]
        else:
            out = self._decode(rows, int(max_new_tokens), stop_ids, lambda logits: mx.argmax(logits, axis=-1))
            answers = [_until_stop(row, stop_ids) for row in out]
        return answers[0] if single else answers

    # -- checkpoints -------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        adapter_dir = directory / "adapter"
        adapter_dir.mkdir(parents=True, exist_ok=True)
        lora = dict(tree_flatten(self.model.trainable_parameters()))
        # mlx_lm.load(model, adapter_path=...) refuses any tensor of adapters.safetensors that is not LoRA (SPEC §5):
        # a reward model's head goes in a file of its own, and how its score is read in reward_head.json.
        head = lora.pop(MLX_SCORE_KEY, None)
        _save_safetensors(adapter_dir / ADAPTER_WEIGHTS, lora, {"format": "mlx"})
        if head is not None:
            _save_safetensors(adapter_dir / MLX_HEAD_WEIGHTS, {MLX_SCORE_KEY: head}, {"format": "mlx"})
            atomic_write_text(adapter_dir / REWARD_HEAD, reward_head_text("mlx", self.pad_id))
        atomic_write_text(adapter_dir / ADAPTER_CONFIG, json.dumps(self.adapter_config, indent=2) + "\n")
        _save_safetensors(directory / OPTIMIZER_FILE, dict(tree_flatten(self.optimizer.state)), {"format": "mlx"})
        state = {
            "updates": self.updates,
            # The RNG is re-seeded from (seed, update count) before every update, so these two
            # numbers are the whole MLX random state training depends on.
            "rng": {"seed": self.seed, "step": self.updates},
            "method": self.method,
            "versions": self.versions(),
        }
        atomic_write_text(directory / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        adapter_dir = directory / "adapter"
        saved_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        for key in ("num_layers", "lora_parameters"):
            if saved_config.get(key) != self.adapter_config[key]:
                raise ValueError(
                    f"checkpoint {directory}: adapter {key} {saved_config.get(key)!r} differs from this run's "
                    f"{self.adapter_config[key]!r}"
                )
        weights = mx.load(str(adapter_dir / ADAPTER_WEIGHTS))
        if (adapter_dir / MLX_HEAD_WEIGHTS).is_file():
            weights |= mx.load(str(adapter_dir / MLX_HEAD_WEIGHTS))
        _check_same_tree("adapter", weights, dict(tree_flatten(self.model.trainable_parameters())))
        opt_saved = mx.load(str(directory / OPTIMIZER_FILE))
        _check_same_tree("optimizer state", opt_saved, dict(tree_flatten(self.optimizer.state)))
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))

        self.model.load_weights(list(weights.items()), strict=False)
        self.optimizer.state = tree_map_with_path(lambda path, _: opt_saved[path], self.optimizer.state)
        self.updates = int(state["updates"])
        self.seed = int(state["rng"]["seed"])
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self._build_steps()

    @staticmethod
    def _portable_key(path: str) -> str:
        # mlx-lm keeps lora_a (in, r) and lora_b (r, out): the neutral layout is their transposes.
        if path == MLX_SCORE_KEY:
            return PORTABLE_SCORE_KEY
        module, _, which = path.rpartition(".")
        suffix = {"lora_a": ".A", "lora_b": ".B", "m": lora_init.MAGNITUDE_SUFFIX}[which]
        return lora_init.neutral_module_name(module) + suffix

    def portable_state(self) -> PortableState:
        params = dict(tree_flatten(self.model.trainable_parameters()))
        moments = dict(tree_flatten(self.optimizer.state))

        def neutral(values: dict[str, mx.array], suffix: str) -> dict[str, np.ndarray]:
            return {self._portable_key(path): _neutral_layout(path, np.array(values[path + suffix].astype(mx.float32)))
                    for path in params}

        return PortableState(neutral(params, ""), neutral(moments, ".m"), neutral(moments, ".v"),
                             int(self.optimizer.state["step"].item()), {"optimizer": "adamw"})

    def init_lora(self, weights: dict[str, np.ndarray]) -> None:
        """lora.init_from: the adapter's weights instead of the seeded ones (Backend.init_lora); the optimizer has
        taken no step, so it starts as new."""
        params = dict(tree_flatten(self.model.trainable_parameters()))
        self.model.load_weights([(path, mx.array(_neutral_layout(path, weights[self._portable_key(path)])).astype(value.dtype))
                                 for path, value in params.items()], strict=False)
        mx.eval(self.model.trainable_parameters())
        self._build_steps()  # as after load(): the compiled steps start from the model's state as it is now

    def load_portable(self, state: PortableState) -> None:
        params = dict(tree_flatten(self.model.trainable_parameters()))
        self.model.load_weights([(path, mx.array(_neutral_layout(path, state.weights[self._portable_key(path)])).astype(value.dtype))
                                 for path, value in params.items()], strict=False)
        by_suffix = {"m": state.exp_avg, "v": state.exp_avg_sq}

        def restored(path: str, value: mx.array) -> mx.array:
            if path == "step":
                return mx.array(state.adam_step, mx.uint64)
            param, _, which = path.rpartition(".")
            if param in params and which in by_suffix:
                return mx.array(_neutral_layout(param, by_suffix[which][self._portable_key(param)])).astype(value.dtype)
            return value  # learning_rate: the loop sets it every step

        self.optimizer.state = tree_map_with_path(restored, self.optimizer.state)
        # Dropout keys come from (seed, update count) (_step_seed), so the continued run draws what an
        # uninterrupted mlx run would from here on.
        self.updates = state.adam_step
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self._build_steps()

    # -- reporting ---------------------------------------------------------

    def memory(self) -> dict[str, float]:
        """memory_mb (what the leak mark and the near-limit warning watch) is the memory the arrays hold: MLX's
        active memory on Metal, where the cache is reclaimable and capped (_set_memory_limit) so counting it would
        mark a healthy run as leaking; on CPU, where MLX's buffers live inside the process, the larger of that
        and the RSS. The cache is reported beside it (cache_mb)."""
        import psutil

        active, cache = mx.get_active_memory() / _MB, mx.get_cache_memory() / _MB
        rss = psutil.Process().memory_info().rss / _MB
        figures = {
            "memory_mb": active if self.limit_bytes else max(active, rss),
            "active_mb": active,
            "peak_mb": mx.get_peak_memory() / _MB,
            "cache_mb": cache,
            "rss_mb": rss,
        }
        if self.limit_bytes:
            figures["limit_mb"] = self.limit_bytes / _MB
        return figures

    def versions(self) -> dict[str, str]:
        import mlx_lm

        return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__}


def _until_stop(row: np.ndarray, stop_ids: tuple[int, ...]) -> np.ndarray:
    """A decoded row up to its first stop token (not included), its -1 tail dropped."""
    row = row[row >= 0].astype(np.int64)
    hits = np.flatnonzero(np.isin(row, stop_ids))
    return row[: hits[0]] if hits.size else row


def _neutral_layout(path: str, value: np.ndarray) -> np.ndarray:
    """A trainable array between mlx's layout and the neutral one (both ways: a transpose is its own inverse):
    LoRA's lora_a/lora_b transposed, the reward score head (1, hidden) in both as it is, DoRA's magnitude (out,)
    too (.T of a vector is the vector)."""
    return value if path == MLX_SCORE_KEY else value.T


def _check_same_tree(what: str, saved: dict[str, mx.array], current: dict[str, mx.array]) -> None:
    missing, extra = sorted(set(current) - set(saved)), sorted(set(saved) - set(current))
    wrong = [k for k in set(saved) & set(current)
             if saved[k].shape != current[k].shape or saved[k].dtype != current[k].dtype]
    if missing or extra or wrong:
        raise ValueError(
            f"checkpoint {what} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}, "
            f"different shape/dtype {sorted(wrong)[:3]}"
        )
