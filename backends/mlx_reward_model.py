"""A reward model on the mlx backend (grpo.rewards=[reward_model=PATH], src/methods/reward_model.py): the backbone
through mlx-lm (its model code for the folder's model_type; the final-normed hidden states of ``model.model``), a
PEFT SEQ_CLS adapter's LoRA (or an mlx reward run's adapter: mlx-lm's own layout) applied as mlx-lm LoRA layers
(unmerged: the product PEFT computes), and the score
head as an mx.array, read at the position the core chose (transformers' rule). In the folder's dtype (model.dtype
when set), unquantized, without gradients."""
from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from overnight.backend import OutOfMemory
from overnight.backends.mlx_backend import _is_oom
from overnight.config import ConfigError
from overnight.backend.adapter_formats import MLX_HEAD_WEIGHTS
from overnight.methods.reward_model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD, MLX_ADAPTER_WEIGHTS, PEFT_HEAD

_PEFT_PREFIX = "base_model.model."
# PEFT features whose product the plain LoRA layers below would not compute: refused by name, never approximated
_UNSUPPORTED = {"use_dora": "DoRA", "rank_pattern": "per-module ranks (rank_pattern)",
                "alpha_pattern": "per-module alphas (alpha_pattern)", "lora_bias": "LoRA bias vectors",
                "fan_in_fan_out": "fan_in_fan_out", "layer_replication": "layer_replication",
                "trainable_token_indices": "trainable token embeddings", "target_parameters": "target_parameters"}


class MLXRewardScorer:
    def __init__(self, backbone: nn.Module, head: mx.array):
        self.backbone, self.head = backbone, head

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        # Right padding: causal attention keeps the padding after a row's scored position out of its hidden state,
        # so the attention mask is not needed.
        try:
            hidden = self.backbone(mx.array(np.asarray(input_ids, dtype=np.int32)))
            rows = mx.arange(hidden.shape[0])
            picked = hidden[rows, mx.array(np.asarray(positions, dtype=np.int32))]
            scores = (picked @ self.head.T)[:, 0].astype(mx.float32)
            mx.eval(scores)
        except Exception as exc:  # noqa: BLE001 - Metal's out of memory arrives as a RuntimeError
            if _is_oom(exc):
                raise OutOfMemory(str(exc)) from None
            raise
        return np.array(scores, dtype=np.float64)


def _fail(spec: str, what: str) -> ConfigError:
    return ConfigError(f"config key 'grpo.rewards': {spec}: {what}")


def _module(root: nn.Module, path: str):
    """(parent, name, module) of a dotted module path such as model.layers.0.self_attn.q_proj, or None."""
    parent, node = None, root
    for part in path.split("."):
        parent = node
        try:
            node = node[int(part)] if part.isdigit() and isinstance(node, (list, tuple)) else getattr(node, part)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return parent, path.rsplit(".", 1)[-1], node


def _peft_lora(adapter_dir: Path, config: dict, spec: str) -> tuple[dict[str, tuple[mx.array, mx.array]], float,
                                                                    mx.array]:
    """A PEFT SEQ_CLS adapter as ({module path: (lora_a (in, r), lora_b (r, out))}, scale, head)."""
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise _fail(spec, f"{adapter_dir} uses {what}, which the mlx backend does not score with; use the torch "
                              "backend, or an adapter without it")
    weights = mx.load(str(adapter_dir / ADAPTER_WEIGHTS))
    rank = int(config.get("r") or 8)
    alpha = float(config.get("lora_alpha") or rank)
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        if key == PEFT_HEAD:
            continue
        for kind in ("lora_A", "lora_B"):
            suffix = f".{kind}.weight"
            if key.startswith(_PEFT_PREFIX) and key.endswith(suffix):
                pairs.setdefault(key[len(_PEFT_PREFIX):-len(suffix)], {})[kind] = value
                break
        else:
            raise _fail(spec, f"{adapter_dir / ADAPTER_WEIGHTS} holds {key}, which is neither a LoRA weight of a "
                              "linear layer nor the score head: the mlx backend cannot score with it")
    # PEFT (r, in) / (out, r) -> mlx-lm (in, r) / (r, out)
    return ({path: (pair["lora_A"].T, pair["lora_B"].T) if len(pair) == 2 else (None, None)
             for path, pair in pairs.items()}, scale, weights[PEFT_HEAD])


def _mlx_lora(adapter_dir: Path, config: dict, spec: str) -> tuple[dict[str, tuple[mx.array, mx.array]], float,
                                                                   mx.array]:
    """An mlx reward adapter (mlx-lm's layout, the head as score.weight in score_head.safetensors) as _peft_lora's
    triple."""
    if config.get("fine_tune_type", "lora") != "lora":
        raise _fail(spec, f"{adapter_dir}: fine_tune_type {config.get('fine_tune_type')!r}; plain LoRA only")
    weights = mx.load(str(adapter_dir / MLX_ADAPTER_WEIGHTS))
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        module, _, kind = key.rpartition(".")
        if kind not in ("lora_a", "lora_b"):
            raise _fail(spec, f"{adapter_dir / MLX_ADAPTER_WEIGHTS} holds {key}, which is not a LoRA weight")
        pairs.setdefault(module, {})[kind] = value
    scale = float((config.get("lora_parameters") or {}).get("scale", 20.0))  # mlx-lm's default
    return ({path: (pair.get("lora_a"), pair.get("lora_b")) for path, pair in pairs.items()}, scale,
            mx.load(str(adapter_dir / MLX_HEAD_WEIGHTS))[HEAD])


def _apply_lora(model: nn.Module, adapter_dir: Path, pairs: dict[str, tuple[mx.array, mx.array]],
                scale: float, spec: str) -> None:
    """The LoRA weights as mlx-lm LoRA layers on ``model`` (float32, added to the layer's output as mlx-lm and PEFT
    both do)."""
    from mlx_lm.tuner.lora import LoRALinear

    for path, (lora_a, lora_b) in sorted(pairs.items()):
        found = _module(model, path)
        if found is None or not isinstance(found[2], (nn.Linear, nn.QuantizedLinear)) or lora_a is None \
                or lora_b is None:
            raise _fail(spec, f"{adapter_dir}: LoRA on {path}, which is not a linear layer of the mlx-lm model")
        parent, name, linear = found
        layer = LoRALinear.from_base(linear, r=int(lora_a.shape[1]), dropout=0.0, scale=scale)
        layer.lora_a, layer.lora_b = lora_a.astype(mx.float32), lora_b.astype(mx.float32)
        setattr(parent, name, layer)


def load_scorer(backend, model_dir: Path, adapter_dir: Path | None, adapter_format: str | None, dtype: str,
                spec: str) -> MLXRewardScorer:
    import json

    from overnight.backends.mlx_load import load_hf_model

    try:
        # lazy, not strict: the weights hold the score head, which mlx-lm's causal LM has no place for, and no LM
        # head, which is never computed (its random init is never evaluated, so it costs no memory)
        model, _ = load_hf_model(model_dir, lazy=True, strict=False)
    except Exception as exc:  # noqa: BLE001 - an unknown model_type is a ValueError, a bad file another class
        raise _fail(spec, f"mlx-lm cannot load {model_dir} ({exc.__class__.__name__}: {str(exc)[:300]})") from None
    backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module):
        raise _fail(spec, f"the mlx-lm model for {model_dir} has no backbone at .model, so its hidden states "
                          "cannot be scored on the mlx backend; use the torch backend")
    stored: dict[str, mx.array] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        stored.update(mx.load(str(path)))  # lazy: nothing is read that is not evaluated
    if hasattr(model, "sanitize"):
        stored = model.sanitize(stored)
    missing = [f"model.{name}" for name, _ in tree_flatten(backbone.parameters()) if f"model.{name}" not in stored]
    if missing:
        raise _fail(spec, f"{model_dir} lacks weights the model needs ({', '.join(missing[:5])}): re-copy the folder")
    if dtype != "auto":
        model.set_dtype(getattr(mx, dtype))
    # the head computes in the model's dtype, as transformers' score Linear does; the LoRA weights stay float32
    # (added in float32, then cast, as mlx-lm's LoRALinear and PEFT both do)
    model_dtype = next(v.dtype for _, v in tree_flatten(backbone.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    if adapter_dir is not None:
        config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        read = _mlx_lora if adapter_format == "mlx" else _peft_lora
        pairs, scale, head = read(Path(adapter_dir), config, spec)
        _apply_lora(model, Path(adapter_dir), pairs, scale, spec)
    else:
        head = stored[HEAD]
    head = head.astype(model_dtype)
    backbone.eval()
    for _, value in tree_flatten(backbone.parameters()):  # one tensor at a time: never two copies of a big one
        mx.eval(value)
    mx.eval(head)
    return MLXRewardScorer(backbone, head)
