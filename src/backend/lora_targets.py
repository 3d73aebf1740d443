"""Which modules `lora.targets` names: one rule for both backends, so a config trains the same modules on each.

A target names a module inside a transformer block by its last part (``q_proj``) or a longer tail of its path
(``self_attn.q_proj``): the rule PEFT and mlx-lm both use. PEFT alone would accept a list where only some targets
match (it errs only when nothing does), so a typo like ``vproj`` beside ``q_proj`` would train q_proj alone and
exit 0; here every target must match a module in the blocks that get LoRA (the last ``lora.layers``), or the run is
refused naming it and the modules that are there. Both backends hand in the module paths of their model
(``model.layers.3.self_attn.q_proj``); nothing here knows a framework.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable

from overnight.config import ConfigError

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def in_block(path: str) -> tuple[int, str] | None:
    """(block index, path inside the block) of a module path such as ``model.layers.3.self_attn.q_proj``; None
    for a module outside the numbered blocks (embeddings, the head)."""
    match = _BLOCK.search(path)
    return (int(match.group(1)), match.group(2)) if match else None


def names(target: str, path: str) -> bool:
    """Whether ``target`` names the module at ``path`` (a path inside a block)."""
    return path == target or path.endswith("." + target)


def lora_blocks(num_blocks: int, layers: int) -> list[int]:
    """The blocks that get LoRA: the last ``layers`` of ``num_blocks`` (-1, or more than there are: all)."""
    first = 0 if layers == -1 or layers >= num_blocks else num_blocks - layers
    return list(range(first, num_blocks))


def lora_blocks_note(num_blocks: int, layers: int) -> str | None:
    """What a user is told when ``lora.layers`` asks for more blocks than the model has: all of them get LoRA (the
    default 16 on a smaller model is not an error), and the start log says so on either backend."""
    if layers > num_blocks:
        return f"lora.layers={layers} but the model has {num_blocks} blocks; using all"
    return None


def resolve(targets: Iterable[str], module_paths: Iterable[str], blocks: Iterable[int]) -> list[str]:
    """The block-relative paths (``self_attn.q_proj``) that ``targets`` name among ``module_paths`` (the paths of
    the modules LoRA can wrap) inside ``blocks``. A target that names none of them is a ConfigError naming it,
    the modules there, and the closest name."""
    targets, wanted = list(targets), set(blocks)
    inside = sorted({where[1] for where in map(in_block, module_paths) if where and where[0] in wanted})
    found: set[str] = set()
    missing = []
    for target in targets:
        hits = [path for path in inside if names(target, path)]
        if not hits:
            missing.append(target)
        found.update(hits)
    if missing:
        leaves = sorted({path.rsplit(".", 1)[-1] for path in inside})
        close = [guess for target in missing
                 for guess in difflib.get_close_matches(target.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.6)]
        first, last = min(wanted, default=0), max(wanted, default=0)
        where = f"block {first}" if first == last else f"blocks {first}-{last}"
        raise ConfigError(
            f"config key 'lora.targets': {', '.join(missing)} "
            f"{'matches' if len(missing) == 1 else 'match'} no module of the blocks that get LoRA ({where}); "
            f"the modules there are: {', '.join(inside) or '(none LoRA can wrap)'}. Name a module by its last "
            f"part (q_proj) or a longer path (self_attn.q_proj)"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    return sorted(found)
