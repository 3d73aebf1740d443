"""The frozen input embedding and output head kept in the checkpoint's 16-bit dtype when the model computes in float32.

On the CPU (and on GPUs without native bf16) the torch backend computes in float32, and transformers loads every
weight it does not quantize as float32: a bf16 checkpoint's embedding and head, which are frozen, double in size
(0.8 GB for a 1B model with a 49k vocabulary, 2 GB for an 8B model's 128k one: as much as the model's 4-bit blocks).
Upcasting a bf16 or fp16 value to float32 is exact, so nothing is lost by keeping those two matrices as the
checkpoint stores them and upcasting on use: the embedding upcasts the rows it looks up; the head upcasts its
weight a slice of vocabulary rows at a time inside its matmul (one slice in float32 at any moment, never the whole
head; the backward does the same for the input's gradient). Forward values are those of the float32 matrix; the
backward sums the input's gradient over the vocabulary in slices, so it may differ from one float32 matmul in the
last bits.

Only a plain ``nn.Embedding`` and a plain ``nn.Linear`` head qualify (a subclass may compute on its weight in its own
dtype, e.g. Gemma's scaled embedding), and a tied pair only when both do. transformers is asked for the 16-bit dtype
through its per-parameter dtype plan, so the float32 copy is never made, not even while loading; a transformers
without that plan loads float32 and the matrices are narrowed right after (the same values, a higher load peak).
"""
from __future__ import annotations

import contextlib
import json
import re
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

# safetensors' names of the 16-bit float dtypes a float32 compute can upcast from exactly.
_SIXTEEN_BIT = {"BF16": torch.bfloat16, "F16": torch.float16}
# The head's weight is upcast this many bytes of float32 at a time: small enough to stay in a CPU's cache, large
# enough that the per-slice matmuls are not dominated by their launch (measured on this repo's CPU: 1024 rows of
# a 2048-wide head run faster than one float32 matmul over the whole head).
_SLICE_BYTES = 8 << 20


def _checkpoint_dtypes(model_dir: Path, names: list[str]) -> dict[str, str]:
    """The safetensors dtype name (``BF16``) of each of ``names`` the checkpoint stores, read from the files'
    headers (no tensor data is read). A checkpoint without safetensors files gives nothing."""
    index = model_dir / "model.safetensors.index.json"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = {weight_map[name] for name in names if name in weight_map}
        else:
            files = {"model.safetensors"} if (model_dir / "model.safetensors").is_file() else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # a damaged index: the load that follows names it, in the user's words (exit 2)
    found: dict[str, str] = {}
    for file in sorted(files):
        try:
            found.update(_header_dtypes(model_dir / file, names))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
            continue  # a damaged file: the load that follows names it, in the user's words (exit 2)
    return found


def _header_dtypes(path: Path, names: list[str]) -> dict[str, str]:
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        if size > min(path.stat().st_size, 1 << 28):  # a damaged length: never read (or allocate) past the file
            raise ValueError(f"{path}: header length {size}")
        header = json.loads(handle.read(size))
    return {name: header[name]["dtype"] for name in names if name in header}


def _plain_pair(model) -> tuple[tuple[str, torch.nn.Module], ...]:
    """(parameter name, module) of the model's embedding and head weights that may stay 16-bit: plain modules only,
    and a tied pair only when both are plain (their one weight serves both)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    pair = []
    for module, kind in ((embedding, torch.nn.Embedding), (head, torch.nn.Linear)):
        if module is None or getattr(module, "weight", None) is None or id(module) not in names:
            continue
        pair.append((f"{names[id(module)]}.weight", module, type(module) is kind))
    tied = len(pair) == 2 and pair[0][1].weight is pair[1][1].weight
    if tied and not all(plain for _, _, plain in pair):
        return ()
    return tuple((name, module) for name, module, plain in pair if plain)


def plan(skeleton, model_dir: Path, compute_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Parameter name -> the 16-bit dtype it stays in, for the model built as ``skeleton`` (on the meta device)
    from ``model_dir``. Empty unless the compute dtype is float32 and the checkpoint stores the weight in bf16/fp16."""
    if compute_dtype != torch.float32:
        return {}
    pair = _plain_pair(skeleton)
    names = [name for name, _ in pair]
    stored = _checkpoint_dtypes(model_dir, names)
    if len(pair) == 2 and pair[0][1].weight is pair[1][1].weight:  # tied: one weight, stored under either name
        stored = dict.fromkeys(names, next(iter(stored.values()), None))
    return {name: _SIXTEEN_BIT[stored[name]] for name in names if stored.get(name) in _SIXTEEN_BIT}


@contextlib.contextmanager
def loading_in(dtypes: dict[str, torch.dtype]):
    """transformers' from_pretrained, inside, materialises each parameter of ``dtypes`` in its dtype (its dtype plan
    is how it keeps some modules in float32; the same plan keeps these 16-bit)."""
    from transformers import PreTrainedModel

    original = getattr(PreTrainedModel, "_get_dtype_plan", None)
    if not dtypes or original is None:
        yield
        return

    def with_stored(self, dtype):
        extended = dict(original(self, dtype))
        extended.update({f"^{re.escape(name)}$": wanted for name, wanted in dtypes.items()})
        return extended

    PreTrainedModel._get_dtype_plan = with_stored
    try:
        yield
    finally:
        PreTrainedModel._get_dtype_plan = original


def upcast_on_use(model, dtypes: dict[str, torch.dtype], compute_dtype: torch.dtype) -> list[str]:
    """Narrow the loaded ``model``'s weights named in ``dtypes`` if the load left them wider, and make their modules
    compute in ``compute_dtype``: the embedding's output upcast, the head's matmul upcasting its weight in slices.
    Returns the names kept 16-bit."""
    kept = []
    for name, module in _plain_pair(model):
        wanted = dtypes.get(name)
        if wanted is None:
            continue
        if module.weight.dtype != wanted:
            module.weight.data = module.weight.data.to(wanted)
        if isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(lambda _module, _args, out: out.to(compute_dtype))
        else:
            module.forward = _sliced_forward(module)
        kept.append(name)
    return kept


def _sliced_forward(head: torch.nn.Linear):
    rows = max(1, _SLICE_BYTES // (4 * head.weight.shape[1]))

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return _UpcastInSlices.apply(hidden, head.weight, head.bias, rows)

    return forward


class _UpcastInSlices(torch.autograd.Function):
    """``hidden @ weight.T + bias`` in hidden's dtype with a frozen narrower weight, upcast ``rows`` rows at a time;
    nothing upcast is kept for the backward (it upcasts the slices again)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows):
        ctx.save_for_backward(weight)
        ctx.rows = rows
        out = hidden.new_empty(*hidden.shape[:-1], weight.shape[0])
        for start in range(0, weight.shape[0], rows):
            part = slice(start, start + rows)
            out[..., part] = F.linear(hidden, weight[part].to(hidden.dtype),
                                      None if bias is None else bias[part].to(hidden.dtype))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad_out.new_zeros(*grad_out.shape[:-1], weight.shape[1])
            for start in range(0, weight.shape[0], ctx.rows):
                grad_hidden += grad_out[..., start:start + ctx.rows] @ weight[start:start + ctx.rows].to(grad_out.dtype)
        return grad_hidden, None, None, None
