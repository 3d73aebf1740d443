"""A reward model on the torch backend (grpo.rewards=[reward_model=PATH], src/methods/reward_model.py):
transformers' AutoModelForSequenceClassification, with PeftModel on it for a SEQ_CLS adapter, in eval mode, on the
policy's device in its compute dtype, without gradients. Unquantized whatever model.quantization says: its scores
are then the ones transformers gives for the same folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from overnight.backend import OutOfMemory
from overnight.backend.adapter_formats import convert_adapter
from overnight.backends import noise
from overnight.backends.torch_backend import _is_oom
from overnight.config import ConfigError
from overnight.errors import UsageError


class TorchRewardScorer:
    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device
        # the sequence classifier itself (under PeftModel's wrappers): its backbone and its score head
        self.classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.backbone = getattr(self.classifier, self.classifier.base_model_prefix)

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        try:
            with torch.inference_mode():
                ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64), device=self.device)
                mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64), device=self.device)
                hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
                rows = torch.arange(ids.shape[0], device=self.device)
                at = torch.as_tensor(np.asarray(positions, dtype=np.int64), device=self.device)
                # the head on the chosen position only: the same product transformers takes there (its forward
                # applies the head to every position, then picks this one)
                scores = self.classifier.score(hidden[rows, at])[:, 0]
                return scores.float().cpu().numpy().astype(np.float64)
        except Exception as exc:  # noqa: BLE001 - torch's out of memory arrives as several classes
            if _is_oom(exc):
                raise OutOfMemory(str(exc)) from None
            raise


def _with_mlx_adapter(model, adapter_dir: Path, spec: str):
    """An mlx reward run's adapter as the PEFT SEQ_CLS model it stands for: converted by `overnight
    convert-adapter`'s own code (exact both ways, tested there) into a temporary folder, then loaded as any PEFT
    reward adapter is."""
    import shutil
    import tempfile

    from peft import PeftModel

    scratch = Path(tempfile.mkdtemp(prefix="overnight-reward-adapter-"))
    try:
        try:
            converted = convert_adapter(adapter_dir, "peft", scratch / "adapter", say=lambda _line: None)
        except (UsageError, ConfigError, ValueError, KeyError) as exc:
            raise ConfigError(f"config key 'grpo.rewards': {spec}: {adapter_dir}: not a reward adapter overnight can "
                              f"read ({exc})") from None
        return PeftModel.from_pretrained(model, str(converted), is_trainable=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_scorer(backend, model_dir: Path, adapter_dir: Path | None, adapter_format: str | None, dtype: str,
                spec: str) -> TorchRewardScorer:
    """The reward model on the device and in the compute dtype the torch backend picked for the policy (its
    ``placement``, set in setup); ``dtype`` is already in the latter. The score position comes from the core, so
    the model's config.pad_token_id is not used."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    device, compute_dtype = backend.placement
    noise.hide_loading_bars()
    verbosity = hf_logging.get_verbosity()
    # A SEQ_CLS adapter's base is often the causal LM itself: transformers reports its lm_head as unexpected and the
    # head as newly initialised, which the adapter's saved head then replaces; what is really missing is checked below.
    hf_logging.set_verbosity_error()
    try:
        # straight onto a GPU (no host copy of a big reward model first), as the torch backend loads the policy
        placement = {"device_map": {"": device.index}} if device.type == "cuda" else {}
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=1, dtype=compute_dtype, output_loading_info=True, **placement)
        missing = set(info.get("missing_keys") or ()) - ({"score.weight"} if adapter_dir is not None else set())
        if missing:
            raise ConfigError(f"config key 'grpo.rewards': {spec}: {model_dir} lacks weights the model needs "
                              f"({', '.join(sorted(missing)[:5])}): re-copy the model folder")
        if adapter_format == "mlx":
            model = _with_mlx_adapter(model, Path(adapter_dir), spec)
        elif adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file raises SafetensorError, an unknown model ValueError
        if _is_oom(exc):
            raise ConfigError(f"config key 'grpo.rewards': {spec}: out of memory loading the reward model beside "
                              "the policy: use a smaller reward model, or a smaller policy (model.quantization)") \
                from None
        raise ConfigError(f"config key 'grpo.rewards': {spec}: transformers cannot load it as a sequence "
                          f"classifier ({exc.__class__.__name__}: {str(exc)[:300]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device)
    model.eval()  # no dropout
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return TorchRewardScorer(model, device)
