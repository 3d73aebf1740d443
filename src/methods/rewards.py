"""GRPO reward functions: loading, built-ins, and scoring a batch of completions (SPEC §9).

A reward has TRL's signature, so a reward function written for TRL's GRPOTrainer works unchanged:

    f(prompts: list, completions: list, completion_ids: list[list[int]], **fields) -> list[float | None]

one entry per completion (a list, a numpy array, a generator; an ``async def`` reward is awaited, as TRL
does); ``prompts`` repeats each prompt once per completion of its group. For prompt rows
prompts and completions are strings; for chat rows (TRL's "conversational" data) a prompt is the list of
messages and a completion is ``[{"role": "assistant", "content": text}]``. Every other key of the data row
(e.g. ``answer``) arrives as a keyword argument holding one value per completion. ``None`` means "this
reward does not apply to this completion": it is left out of that completion's weighted sum (TRL's nansum)
and of the reward's mean and std.

A reward is named in grpo.rewards as
  - a built-in: exact_match[=FIELD], contains[=FIELD], regex=PATTERN, length_penalty[=CHARS];
  - reward_model=PATH: a one-label sequence classifier scoring prompt + completion (src/methods/reward_model.py);
  - "package.module:function" (importable from the working directory or the Python path);
  - "path/to/file.py:function" (relative to the working directory).
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from overnight.config import ConfigError
from overnight.train.loop import TrainingError

BUILTINS = ("exact_match", "contains", "regex", "length_penalty", "reward_model")
# Beyond this a reward is no score a person meant: its group's std and the advantages stop being numbers.
LIMIT = 1e30
# What a user's function may raise that is still its failure, named: sys.exit() and a stray KeyboardInterrupt too
# (the run's own Ctrl-C never arrives as an exception here: src/runs/signals.py turns it into a flag), so neither
# ends the process past the run's records with its heartbeat left "running".
CAUGHT = (Exception, SystemExit, KeyboardInterrupt)
_PACKAGE = Path(__file__).resolve().parents[1]  # overnight's own files: their frames are not the user's
_ASYNCIO = Path(asyncio.__file__).resolve().parent  # nor those of the event loop an async reward is awaited in


class RewardError(TrainingError):
    """A reward function failed or returned something unusable while training: the run stops before the
    step's update, naming the function and the row."""


def _text(completion: Any) -> str:
    """The text of a completion in either of TRL's shapes (a string, or a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _field_values(name: str, field: str, fields: dict, n: int) -> list:
    if field not in fields:
        raise KeyError(f"reward {name} reads the row field '{field}', which the row lacks "
                       f"(fields: {', '.join(sorted(fields)) or 'none'})")
    return fields[field]


def exact_match(field: str = "answer") -> Callable:
    def reward(prompts, completions, **fields):
        wanted = _field_values(f"exact_match={field}", field, fields, len(completions))
        return [float(_text(c).strip() == str(w).strip()) for c, w in zip(completions, wanted)]
    return reward


def contains(field: str = "answer") -> Callable:
    def reward(prompts, completions, **fields):
        wanted = _field_values(f"contains={field}", field, fields, len(completions))
        return [float(str(w) in _text(c)) for c, w in zip(completions, wanted)]
    return reward


def regex(pattern: str) -> Callable:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise ConfigError(f"config key 'grpo.rewards': regex={pattern!r} is not a valid regular expression "
                          f"({exc})") from None

    def reward(prompts, completions, **fields):
        return [float(compiled.search(_text(c)) is not None) for c in completions]
    return reward


def length_penalty(chars: str = "100") -> Callable:
    try:
        limit = int(chars)
        if limit < 1:
            raise ValueError
    except ValueError:
        raise ConfigError(f"config key 'grpo.rewards': length_penalty={chars!r} needs a positive number of "
                          "characters, e.g. length_penalty=200") from None

    def reward(prompts, completions, **fields):
        # 0 up to the limit, then -1 for every further `limit` characters: a pull towards short answers that
        # never outweighs a correctness reward of 1 for an answer within twice the limit.
        return [-max(0, len(_text(c)) - limit) / limit for c in completions]
    return reward


def reward_model(path: str, spec: str = ""):
    from overnight.methods.reward_model import RewardModel

    return RewardModel(path, spec or f"reward_model={path}")


_MAKERS = {"exact_match": exact_match, "contains": contains, "regex": regex, "length_penalty": length_penalty,
           "reward_model": reward_model}


@dataclass
class Reward:
    name: str  # as given in grpo.rewards (the metrics key)
    func: Callable
    weight: float
    field: str | None = None  # the row field a built-in reads (checked on every row before it is used)
    key: str = ""  # its name in metrics.jsonl (rewards/KEY/mean): TRL's, the function name (the built-in's spec)


def _load_file(spec: str, path_text: str, func_name: str) -> Callable:
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"config key 'grpo.rewards': {spec}: no such file {path} (relative paths are from the "
                          f"working directory {Path.cwd()})")
    module_name = f"_overnight_reward_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except CAUGHT as exc:  # the user's file: any error is theirs to see, named, with their lines
            raise ConfigError(f"config key 'grpo.rewards': {spec}: importing {path} failed "
                              f"({_raised(exc)}){user_frames(exc)}") from None
        sys.modules[module_name] = module
    return _attribute(spec, module, func_name, str(path))


def _load_module(spec: str, module_name: str, func_name: str) -> Callable:
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # as `python -m` would: a module beside the config is found
    try:
        module = importlib.import_module(module_name)
    except CAUGHT as exc:
        raise ConfigError(f"config key 'grpo.rewards': {spec}: cannot import module '{module_name}' "
                          f"({_raised(exc)}); give an importable module or a file path "
                          f"like path/to/rewards.py:function{user_frames(exc)}") from None
    return _attribute(spec, module, func_name, module_name)


def _attribute(spec: str, module, func_name: str, where: str) -> Callable:
    func = getattr(module, func_name, None)
    if func is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"config key 'grpo.rewards': {spec}: {where} has no function '{func_name}'"
                          + (f" (functions there: {', '.join(found[:10])})" if found else ""))
    if not callable(func):
        raise ConfigError(f"config key 'grpo.rewards': {spec}: '{func_name}' in {where} is not a function")
    return func


def load_reward(spec: str) -> Callable:
    spec = spec.strip()
    name, _, arg = spec.partition("=")
    if name in _MAKERS:
        if name == "regex" and not arg:
            raise ConfigError("config key 'grpo.rewards': regex needs a pattern, e.g. regex=^<answer>.*</answer>$")
        if name == "reward_model":
            return reward_model(arg.strip(), spec)
        return _MAKERS[name](arg) if arg else _MAKERS[name]()
    if ":" not in spec:
        raise ConfigError(f"config key 'grpo.rewards': '{spec}' is neither a built-in ({', '.join(BUILTINS)}) nor "
                          "'package.module:function' nor 'path/to/file.py:function'")
    target, func_name = spec.rsplit(":", 1)
    if target.endswith(".py") or "/" in target or "\\" in target:
        return _load_file(spec, target, func_name)
    return _load_module(spec, target, func_name)


def load_rewards(cfg) -> list[Reward]:
    """grpo.rewards as callables with their weights; ConfigError (exit 2) naming the entry that cannot load."""
    specs, weights = list(cfg.grpo.rewards), list(cfg.grpo.reward_weights) or [1.0] * len(cfg.grpo.rewards)
    out = []
    for spec, weight in zip(specs, weights):
        name, _, arg = spec.strip().partition("=")
        field = (arg or "answer") if name in ("exact_match", "contains") else None
        func = load_reward(spec)
        # a reward model by its folder's name (as TRL names one), not by its whole path
        key = func.key if name == "reward_model" else spec.strip() if name in _MAKERS else spec.rsplit(":", 1)[1]
        key = key if key not in {r.key for r in out} else f"{key}_{len(out)}"
        out.append(Reward(spec, func, float(weight), field, key))
    return out


def bind(rewards: Sequence[Reward], backend, tokenizer, dtype: str = "auto") -> None:
    """Load the rewards that run on the training backend (reward models) once, before training: each scores with its
    own tokenizer, rendering chat templates with the policy tokenizer's template variables and pinned time
    (data.chat_template_kwargs, as TRL passes its chat_template_kwargs to the reward model's template)."""
    from overnight.methods.reward_model import RewardModel

    for reward in rewards:
        if isinstance(reward.func, RewardModel):
            reward.func.bind(backend, getattr(tokenizer, "template_kwargs", None),
                             getattr(tokenizer, "template_now", None), dtype)


@dataclass
class Scored:
    total: np.ndarray  # (N,) the weighted sum of each completion's rewards (None ones left out)
    per_reward: np.ndarray  # (N, R), NaN where a reward returned None


def score(rewards: Sequence[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          fields: dict[str, list], row_name: Callable[[int], str], groups: int, group_size: int) -> Scored:
    """Call every reward once on the whole batch of ``groups`` x ``group_size`` completions. ``row_name(g)``
    names group g's data row (file:line) for the error that says which row a reward failed on."""
    n = len(completions)
    table = np.full((n, len(rewards)), np.nan, dtype=np.float64)
    for j, reward in enumerate(rewards):
        try:
            values = _call(reward, prompts=prompts, completions=completions, completion_ids=completion_ids, **fields)
        except CAUGHT as exc:  # whatever a user's reward raises stops the run, named
            raise RewardError(_failure(reward, exc, _failing_row(reward, prompts, completions, completion_ids,
                                                                 fields, row_name, groups, group_size))) from None
        try:
            if isinstance(values, (str, bytes, dict, set, frozenset)):  # iterable, but no list of scores
                raise TypeError
            values = list(values)
        except TypeError:
            raise RewardError(f"reward {reward.name} returned {type(values).__name__}, not a list with one number "
                              f"(or None) per completion (rows from {row_name(0)}); no update was applied") from None
        if len(values) != n:
            raise RewardError(f"reward {reward.name} returned {len(values)} values for {n} completions "
                              f"(rows from {row_name(0)}); it must return one per completion; no update was applied")
        for i, value in enumerate(values):
            if value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number) or abs(number) > LIMIT or isinstance(value, (str, bytes)):
                raise RewardError(f"reward {reward.name} returned {value!r} for completion {i % group_size + 1} of "
                                  f"row {row_name(i // group_size)}; a reward must be a finite number within "
                                  f"+-{LIMIT:g}, or None; no update was applied")
            table[i, j] = number
    weights = np.array([r.weight for r in rewards], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.nansum(table * weights, axis=1)
        spread = (np.std(total.reshape(groups, group_size), axis=1, ddof=1) if group_size > 1
                  else np.zeros(groups))
    for g in range(groups):
        part = total[g * group_size:(g + 1) * group_size]
        if not (np.all(np.isfinite(part)) and np.isfinite(spread[g])):
            raise RewardError(f"the weighted rewards ({', '.join(f'{r.name} x {r.weight:g}' for r in rewards)}) of "
                              f"row {row_name(g)} are {part.tolist()}: their sum or their spread (the group's std, "
                              "which scales the advantages) is no finite number; scale the rewards or "
                              "grpo.reward_weights down; no update was applied")
    return Scored(total, table)


def _call(reward: Reward, **kwargs) -> Any:
    """What the reward returns, with all of its own code run here, where its exceptions are its failure: an
    ``async def`` reward awaited (TRL's GRPOTrainer takes those), a generator's or other iterator's body read out."""
    values = reward.func(**kwargs)
    if inspect.isawaitable(values):
        async def wait():
            return await values

        values = asyncio.run(wait())
    if isinstance(values, Iterator):
        values = list(values)
    return values


def _raised(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"SystemExit (sys.exit({exc.code!r}) ends the process: a reward returns its scores instead)"
    return f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__


def user_frames(exc: BaseException, keep: int = 8) -> str:
    """The lines of the user's own code the exception came through (file:line in function: source), innermost
    last: overnight's frames and importlib's are left out, so what shows is the place to fix. Empty when none."""
    lines = []
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        if frame.filename.startswith("<") or any(p in path.resolve().parents for p in (_PACKAGE, _ASYNCIO)):
            continue
        lines.append(f"  {frame.filename}:{frame.lineno} in {frame.name}" + (f": {frame.line}" if frame.line else ""))
    return ("\n" + "\n".join(lines[-keep:])) if lines else ""


def _failure(reward: Reward, exc: BaseException, row: str | None) -> str:
    where = f"on row {row}" if row else "on this batch"
    return (f"reward {reward.name} raised {_raised(exc)} {where}; the run stops before this step's "
            "update (a failing reward is never scored 0). Fix the function or the row, then resume with --auto-resume"
            + user_frames(exc))


def _failing_row(reward, prompts, completions, completion_ids, fields, row_name, groups, group_size) -> str | None:
    """The first row whose group alone makes the reward raise (a batched call hides which one did)."""
    for g in range(groups):
        part = slice(g * group_size, (g + 1) * group_size)
        try:
            _call(reward, prompts=prompts[part], completions=completions[part], completion_ids=completion_ids[part],
                  **{k: v[part] for k, v in fields.items()})
        except CAUGHT:
            return row_name(g)
    return None


def advantages(total: np.ndarray, group_size: int, loss_type: str) -> np.ndarray:
    """Each completion's reward against its group's (TRL's): grpo and dapo (r - mean) / (std + 1e-4) with the
    unbiased std of the group (TRL's scale_rewards="group", its default); dr_grpo r - mean (Dr. GRPO drops the std
    scaling, which favours easy and hard groups)."""
    groups = np.asarray(total, dtype=np.float64).reshape(-1, group_size)
    centered = groups - groups.mean(axis=1, keepdims=True)
    if loss_type in ("grpo", "dapo"):
        centered = centered / (groups.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return centered.reshape(-1).astype(np.float32)


def stats(rewards: Sequence[Reward], scored: Sequence[Scored]) -> dict[str, float]:
    """The step's reward figures for metrics.jsonl: the weighted total's mean and std, and each reward's."""
    total = np.concatenate([s.total for s in scored])
    table = np.concatenate([s.per_reward for s in scored])
    out = {"reward": float(total.mean()), "reward_std": float(total.std())}
    for j, reward in enumerate(rewards):
        column = table[:, j]
        column = column[np.isfinite(column)]
        key = reward.key or reward.name
        out[f"rewards/{key}/mean"] = float(column.mean()) if column.size else None
        out[f"rewards/{key}/std"] = float(column.std()) if column.size else None
    return out
