"""Each training method's parts, by name: what checks its rows need before any work, and which batch source,
validator and predictor a run of it trains with. overnight.runs asks this registry instead of branching on the
method; a new method is one entry here (and its objective in overnight.backend.objectives)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from overnight import data
from overnight.data.source import BatchSource
from overnight.train.validation import RewardValidator, Validator


@dataclass
class MethodParts:
    source: BatchSource  # the loop's batches
    validator: object  # .enabled, .run(backend, cancelled, say, world) -> the eval figures (Validator's shape)
    predict: Callable[[int], None] | None  # sample generations after an eval (predictions.jsonl), or None


@dataclass
class PartsRequest:
    """What every method's parts are built from."""

    cfg: object
    backend: object
    tokenizer: object
    train_file: Path
    val_file: Path | None
    run_dir: Path
    say: Callable[[str], None]
    world: object
    writes_predictions: bool  # rank 0 of a job (or the single process): the one that writes predictions.jsonl


class Supervised:
    """sft, cpt, dpo, orpo: fixed batches from the data order, token-weighted validation loss, greedy predictions
    for a few fixed validation prompts."""

    @staticmethod
    def check(cfg, train_file: Path, val_file: Path | None) -> None:
        """Refusals beyond the data check (which every method gets): none."""

    @staticmethod
    def build(r: PartsRequest) -> MethodParts:
        cfg, val_file = r.cfg, r.val_file
        eval_batch_size = cfg.eval.batch_size or cfg.train.batch_size
        validator = Validator(_fixed_eval_batches(r))
        predict = None
        if val_file and cfg.eval.predictions > 0 and r.writes_predictions:
            prompts = data.prediction_prompts(val_file, r.tokenizer, cfg, cfg.eval.predictions)
            predict = greedy_predictor(r.backend, r.tokenizer, prompts, cfg.eval.max_new_tokens, r.run_dir, r.say,
                                       batch_size=eval_batch_size)
        return MethodParts(data.TrainStream(r.train_file, r.tokenizer, cfg), validator, predict)


def _fixed_eval_batches(r: PartsRequest) -> Callable[[], list] | None:
    """The fixed validation subset's batches, built when the first eval asks (None without a validation file)."""
    if not r.val_file:
        return None
    cfg = r.cfg
    eval_batch_size = cfg.eval.batch_size or cfg.train.batch_size
    return lambda: data.eval_batches(r.val_file, r.tokenizer, cfg, cfg.eval.max_batches, eval_batch_size)


class Reward:
    """reward: the preference pairs dpo reads, in the same order and batches; validation scores the fixed pairs
    (val_loss and val_accuracy, overnight.train.validation.RewardValidator). No predictions: a reward model does not
    generate."""

    check = Supervised.check

    @staticmethod
    def build(r: PartsRequest) -> MethodParts:
        validator = RewardValidator(_fixed_eval_batches(r), r.cfg.reward.center_coefficient)
        return MethodParts(data.TrainStream(r.train_file, r.tokenizer, r.cfg), validator, None)


class Grpo:
    """grpo: sampled completions scored by the rewards in place of fixed batches (overnight.methods.grpo)."""

    @staticmethod
    def check(cfg, train_file: Path, val_file: Path | None) -> None:
        """A reward that cannot be imported, or rows without the fields a reward reads, is a config or data error
        found before any work (exit 2)."""
        from overnight.methods.grpo import check_reward_fields
        from overnight.methods.rewards import load_rewards

        check_reward_fields([train_file, val_file], load_rewards(cfg))

    @staticmethod
    def build(r: PartsRequest) -> MethodParts:
        from overnight.methods import grpo, rewards

        reward_list = rewards.load_rewards(r.cfg)
        rewards.bind(reward_list, r.backend, r.tokenizer, r.cfg.model.dtype)  # a reward model loads here, once
        source = grpo.GrpoSource(r.train_file, r.tokenizer, r.cfg, r.backend, reward_list, r.say, r.world,
                                 run_dir=r.run_dir if r.writes_predictions else None)
        validator = grpo.GrpoValidator(r.val_file, r.tokenizer, r.cfg, reward_list)
        predict = None
        if r.val_file and r.cfg.eval.predictions > 0 and r.writes_predictions:
            predict = grpo.predictor(validator, r.run_dir, r.say)
        return MethodParts(source, validator, predict)


METHODS = {"sft": Supervised, "cpt": Supervised, "dpo": Supervised, "orpo": Supervised, "grpo": Grpo,
           "reward": Reward}


def method(name: str):
    """The parts of a method the config validated (config.py refuses any other name first)."""
    return METHODS[name]


def greedy_predictor(backend, tokenizer, prompts, max_new_tokens: int, run_dir: Path,
                     say: Callable[[str], None], batch_size: int = 8) -> Callable[[int], None]:
    """predictions.jsonl: a greedy continuation of each fixed prompt after every eval, ``batch_size`` prompts per
    generate call (the eval's batch size: it fits where the eval does). Non-critical (SPEC §8): a failure is one
    warning and training goes on."""
    failed = []

    def predict(step: int) -> None:
        try:
            answers = []
            for a in range(0, len(prompts), max(1, batch_size)):
                answers += backend.generate([ids for _, ids in prompts[a:a + batch_size]], max_new_tokens,
                                            tokenizer.stop_ids)
            with open(Path(run_dir) / "predictions.jsonl", "a", encoding="utf-8") as handle:
                for (text, _), new_ids in zip(prompts, answers):
                    handle.write(json.dumps({"step": step, "prompt": text,
                                             "output": tokenizer.decode(list(map(int, new_ids)))}) + "\n")
        except Exception as exc:  # noqa: BLE001 (predictions are non-critical, SPEC §8)
            if not failed:
                failed.append(1)
                say(f"warning: predictions failed ({exc.__class__.__name__}: {exc}); training goes on")

    return predict
