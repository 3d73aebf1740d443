"""`lora.init_from` / `--init-adapter PATH`: a new run whose LoRA starts from an existing adapter's weights instead
of the seeded initial ones (mlx-lm's --resume-adapter-file); its optimizer and schedule start at step 0.

The adapter is read once, before anything is written (backend/adapter_weights.py: either format, framework-free),
and refused by name when it cannot be this run's LoRA: another rank, scale, target modules, blocks or base model.
What needs the model set up (exact module names and shapes) is checked again right before the backend takes the
weights. The run's fingerprint records the adapter's path and the sha256 of its weights, so a resume with another
adapter is refused like any other change."""
from __future__ import annotations

import json
import math
from pathlib import Path

from overnight.backend import lora_targets
from overnight.backend.adapter_weights import AdapterWeights, fit_differences, read_adapter
from overnight.config import ConfigError
from overnight.errors import UsageError
from overnight.runs.portable import model_shape, same_model_differences

KEY = "config key 'lora.init_from'"


def check(cfg, warn=print) -> AdapterWeights | None:
    """The adapter ``cfg.lora.init_from`` names, read and checked against the config and the base model; None when
    the run starts from the seeded weights. Sets ``cfg.lora.init_from`` to the adapter folder's absolute path (the
    config.yaml a run records then works from any directory). ConfigError (exit 2) naming what does not fit."""
    if not cfg.lora.init_from:
        return None
    try:
        adapter = read_adapter(cfg.lora.init_from)
    except UsageError as exc:
        raise ConfigError(f"{KEY}: {exc}; give an adapter folder (a run's adapter/, a checkpoint's folder, or a "
                          "PEFT / mlx-lm adapter)") from None
    run_dir = Path(cfg.output.dir).expanduser().resolve() if cfg.output.dir.strip() else None
    if run_dir is not None and (adapter.folder == run_dir or run_dir in adapter.folder.parents):
        raise ConfigError(f"{KEY}: {adapter.folder} is inside this run's output.dir {run_dir}, which the run "
                          "rewrites (adapter/), rotates (checkpoints/) and --fresh moves aside; copy the adapter "
                          "elsewhere first, or train into another --output")
    problems = config_differences(adapter, cfg) + base_differences(adapter, cfg.model.path, warn)
    if problems:
        raise ConfigError(f"{KEY}: the adapter in {adapter.folder} does not fit this run: " + "; ".join(problems))
    cfg.lora.init_from = str(adapter.folder)
    return adapter


def config_differences(adapter: AdapterWeights, cfg) -> list[str]:
    """Rank, scale, target modules and blocks, against the config (the blocks when the model folder is local)."""
    lora, out = cfg.lora, []
    if adapter.rank != lora.rank:
        out.append(f"its rank is {adapter.rank}, this run's lora.rank is {lora.rank} (set --lora-rank "
                   f"{adapter.rank})")
    elif not math.isclose(adapter.scale, lora.alpha / lora.rank, rel_tol=1e-9):
        out.append(f"it scales its update by {adapter.scale:g}, this run by lora.alpha / lora.rank = "
                   f"{lora.alpha:g} / {lora.rank} = {lora.alpha / lora.rank:g} (set lora.alpha="
                   f"{adapter.scale * lora.rank:g})")
    unnamed = [p for p in adapter.block_paths if not any(lora_targets.names(t, p) for t in lora.targets)]
    unused = [t for t in lora.targets if not any(lora_targets.names(t, p) for p in adapter.block_paths)]
    if unnamed or unused:
        leaves = sorted({p.rsplit(".", 1)[-1] for p in adapter.block_paths})
        out.append(f"it has LoRA on {', '.join(adapter.block_paths)}, this run's lora.targets are "
                   f"[{', '.join(lora.targets)}] (set lora.targets=[{', '.join(leaves)}])")
    total = _block_count(cfg.model.path)
    if total is not None:
        expected = lora_targets.lora_blocks(total, lora.layers)
        if adapter.blocks[-1] >= total:
            out.append(f"it has LoRA on blocks {_span(adapter.blocks)}, and this model has {total} blocks (another "
                       "base model?)")
        elif adapter.blocks != expected:
            last_n = total - adapter.blocks[0]
            fix = (f"set --lora-layers {last_n}" if adapter.blocks == list(range(adapter.blocks[0], total))
                   else "overnight puts LoRA on the last N blocks (lora.layers), which cannot hold these")
            out.append(f"it has LoRA on blocks {_span(adapter.blocks)} of this {total}-block model, this run's "
                       f"lora.layers={lora.layers} puts it on blocks {_span(expected)} ({fix})")
    return out


def base_differences(adapter: AdapterWeights, model_path: str, warn=print) -> list[str]:
    """The adapter's recorded base model against this run's model.path. Two folders are compared by architecture
    and weight names and shapes (an MLX conversion of a model matches its Hugging Face original); two hub ids by
    name. Anything else cannot be told apart here and is a warning: the module shapes are still checked against
    the model itself before the weights are loaded."""
    base = adapter.base
    if not base or base == model_path:
        return []
    recorded, ours = Path(base).expanduser(), Path(model_path).expanduser()
    entry = "base_model_name_or_path" if adapter.format == "peft" else "model"
    fix = f" (if it is the same model, write this model.path as {entry} in {adapter.folder / 'adapter_config.json'})"
    if recorded.is_dir() and ours.is_dir():
        if recorded.resolve() == ours.resolve():
            return []
        changes = same_model_differences(model_shape(str(recorded)), model_shape(str(ours)))
        return [f"it was trained on {base}, and this run's model.path {model_path} is another model "
                f"({'; '.join(changes[:3])})"] if changes else []
    if not (recorded.exists() or ours.exists() or recorded.is_absolute() or ours.is_absolute()):
        return [f"it was trained on {base!r}, this run's model.path is {model_path!r}{fix}"]  # two hub ids
    warn(f"warning: {KEY}: the adapter records its base model as {base!r}, which cannot be compared with this run's "
         f"model.path {model_path!r} from here; only its module shapes are checked")
    return []


def load_into(backend, adapter: AdapterWeights) -> None:
    """Hand the adapter's weights to the backend that set up this run's LoRA, after checking every module name and
    shape against it. ConfigError (exit 2) naming what differs."""
    if not (hasattr(backend, "init_lora") and hasattr(backend, "portable_state")):
        raise ConfigError(f"{KEY}: backend {backend.name!r} cannot start from an adapter (it has no init_lora)")
    expected = {k: tuple(v.shape) for k, v in backend.portable_state().weights.items()}
    problems = fit_differences(adapter, expected)
    if problems:
        raise ConfigError(f"{KEY}: the adapter in {adapter.folder} does not fit this run's LoRA on "
                          f"{backend.name} (another base model, or other lora.targets?): " + "; ".join(problems))
    backend.init_lora(adapter.weights)
    adapter.weights = {}  # the backend holds them now: a large adapter is not kept twice for the whole run


def describe(adapter: AdapterWeights) -> str:
    """For the banner."""
    return (f"LoRA starts from {adapter.folder} ({adapter.format} adapter, rank {adapter.rank}, "
            f"{adapter.modules} modules); optimizer and schedule start at step 0")


def _block_count(model_path: str) -> int | None:
    try:
        config = json.loads((Path(model_path).expanduser() / "config.json").read_text(encoding="utf-8"))
        count = config.get("text_config", config).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and count > 0 else None


def _span(blocks: list[int]) -> str:
    if blocks == list(range(blocks[0], blocks[-1] + 1)):
        return f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0])
    return ", ".join(map(str, blocks))
