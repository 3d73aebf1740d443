"""GRPO in the one loop (SPEC §9): a batch source that samples, scores and normalises, a validator that scores
greedy answers, and the dead-reward circuit breaker (SPEC §8).

The loop asks ``next_batch()`` for each micro-batch as for any method. Here that takes the next
``train.batch_size`` prompts of the resumable order (data.TrainStream's), has the backend sample
``grpo.group_size`` completions of each, decodes them, calls the rewards (src/methods/rewards.py), and returns one
Batch of prompt+completion rows whose loss_mask marks the completion tokens and whose ``advantages`` hold each
completion's reward against its group's. The objective is src/backend/objectives.py's.

Determinism: completion k of the sample at file index i, drawn for the c-th micro-batch of the run, is sampled
from the seed SeedSequence([train.seed, c, i, k]). The state is the prompt order's position, c, the breaker's
count and (grpo.iterations > 1) the generated batches still to be replayed, so a resumed run samples exactly
the completions the uninterrupted one did.

With grpo.iterations = k > 1 each generated step is trained on k times (TRL's num_iterations): the batches
carry the per-token log-probs of the policy that sampled them (adapter on, no dropout), and the ratio to them
is clipped to 1 +- grpo.epsilon.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from overnight.methods import rewards as rw
from overnight.backend import Batch, OutOfMemory, generator_seed
from overnight.data.batches import TrainStream, _open_source, _rng, collate
from overnight.data.source import BatchSource
from overnight.data.formats import DataError, where
from overnight.data.tokenizer import encode_prompt, fit_prompt, prompts_use_chat_template
from overnight.distributed import Solo, all_gather_json, eval_share
from overnight.fsutil import drop_jsonl_lines_after
from overnight.train.loop import TrainingError
from overnight.train.stopping import Stop

STATE_VERSION = 1
COMPLETIONS_FILE = "completions.jsonl"
_SAMPLE_STREAM = 0x6E90_5A11  # keeps completion seeds apart from every other seeded stream
_EVAL_STREAM = 0x5EED_E7A2


def completion_seed(seed: int, call: int, index: int, k: int) -> int:
    """The seed of one completion, in the range Backend.sample takes (overnight.backend.generator_seed)."""
    draw = np.random.SeedSequence([seed, call, index, k, _SAMPLE_STREAM]).generate_state(1, np.uint64)[0]
    return generator_seed(draw)


class RowSplit:
    """How many contiguous parts a batch of rows is generated in: one, doubled at each out of memory and kept so
    for the rest of the process (each row depends on its own prompt and seed only, so the rows are the same in
    any number of parts, and a resumed run, which starts again at one, samples the same). Out of memory at one
    row a part is TrainingError(failure)."""

    def __init__(self, doing: str, failure: str):
        self.parts, self.doing, self.failure = 1, doing, failure

    def run(self, n: int, part: Callable[[int, int], Any], say: Callable[[str], None] = print) -> list:
        """[part(a, b) for each part [a, b) of range(n)], in order."""
        while True:
            parts = max(1, min(self.parts, n))
            bounds = np.linspace(0, n, parts + 1).astype(int)
            try:
                return [part(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
            except OutOfMemory:
                if parts >= n:
                    raise TrainingError(self.failure) from None
                self.parts = parts * 2
                say(f"out of memory while {self.doing}: from now on each batch goes in {self.parts} parts (the same "
                    "completions, more slowly)")


def sampling_split() -> RowSplit:
    return RowSplit("sampling", "out of memory sampling even one completion at a time; lower grpo.max_new_tokens or "
                    "model.max_seq_length, or use a smaller model")


def sample_rows(backend, prompts: list[np.ndarray], seeds: list[int], g, stop_ids: tuple[int, ...], split: RowSplit,
                say: Callable[[str], None] = print) -> np.ndarray:
    """A micro-batch's completions, row r continuing prompts[r] from seeds[r] (the rows of one prompt adjacent),
    in one backend.sample call, or in the parts ``split`` says after an out of memory."""
    return np.concatenate(split.run(len(seeds), lambda a, b: backend.sample(
        prompts[a:b], seeds[a:b], g.max_new_tokens, g.temperature, g.top_p, stop_ids), say))


class PromptRows:
    """Prompt rows of one file as the model sees them, and as the rewards see them (TRL's shapes)."""

    def __init__(self, source, tokenizer, cfg, reward_list: list[rw.Reward]):
        self.source, self.tok, self.cfg, self.rewards = source, tokenizer, cfg, reward_list
        self.room = cfg.model.max_seq_length - cfg.grpo.max_new_tokens
        if self.room < 1:
            raise DataError(f"model.max_seq_length={cfg.model.max_seq_length} leaves no room for a prompt before "
                            f"grpo.max_new_tokens={cfg.grpo.max_new_tokens} -> raise model.max_seq_length or lower "
                            "grpo.max_new_tokens")
        # "prompt" rows as a user turn of the chat template (grpo.chat_template); the rewards still get the text
        self.templated = prompts_use_chat_template(tokenizer, cfg.grpo.chat_template)

    def name(self, i: int) -> str:
        return where(self.source.path, self.source.lineno(i))

    def get(self, i: int) -> tuple[np.ndarray, Any, dict]:
        """(prompt ids, the prompt as rewards get it, the row's other fields)."""
        row = self.source.checked_row(i)
        for reward in self.rewards:
            if reward.field is not None and reward.field not in row:
                raise DataError(f"{self.name(i)}: key '{reward.field}': missing; reward {reward.name} reads it "
                                f"-> add '{reward.field}' to every row, or name the field (e.g. exact_match=solution)")
        try:
            ids = encode_prompt(self.tok, row, self.source.format, self.templated)
        except DataError as exc:
            raise DataError(f"{self.name(i)}: {exc}") from None
        ids = fit_prompt(self.tok, ids, self.room)
        key = "messages" if self.source.format == "chat" else "prompt"
        fields = {k: v for k, v in row.items() if k != key}
        return np.asarray(ids, dtype=np.int32), row[key], fields

    def completion(self, ids: np.ndarray) -> tuple[list[int], str, Any]:
        """(token ids up to and with the stop token, decoded text, the completion as rewards get it)."""
        ids = [int(t) for t in ids if t >= 0]
        text = self.tok.decode(ids)
        shaped = [{"role": "assistant", "content": text}] if self.source.format == "chat" else text
        return ids, text, shaped


def score_groups(prows: PromptRows, reward_list, indices: list[int], prompts: list, fields: list[dict],
                 completions: list[list[tuple]], group_size: int) -> rw.Scored:
    """Call the rewards on every completion of these groups (one call per reward, as TRL does)."""
    flat_prompts = [p for p in prompts for _ in range(group_size)]
    flat = [c for group in completions for c in group]
    keys = sorted(set().union(*[f.keys() for f in fields])) if fields else []
    flat_fields = {k: [f.get(k) for f in fields for _ in range(group_size)] for k in keys}
    return rw.score(reward_list, flat_prompts, [c[2] for c in flat], [c[0] for c in flat], flat_fields,
                    lambda g: prows.name(indices[g]), len(indices), group_size)


def check_reward_fields(files: list[Path | None], reward_list: list[rw.Reward]) -> None:
    """Before training: every row has the fields the built-in rewards read (DataError, exit 2, naming the first
    row without one), so a missing field is not found hours into a run."""
    from overnight.data.formats import iter_lines, parse_line

    needed = [r for r in reward_list if r.field is not None]
    for path in [f for f in files if f is not None] if needed else []:
        for lineno, _, content in iter_lines(Path(path)):
            row, err = parse_line(content)
            for reward in needed if err is None else []:
                if reward.field not in row:
                    raise DataError(f"{where(Path(path), lineno)}: key '{reward.field}': missing; reward "
                                    f"{reward.name} reads it -> add '{reward.field}' to every row, or name the field "
                                    "the answer is in (e.g. exact_match=solution)")


class GrpoSource(BatchSource):
    """The loop's batch source for grpo: next_batch(), state(), restore(), plus after_step() (reward figures
    and the dead-reward breaker) and step_stats() for the train event."""

    scores_own_steps = True  # the dead-reward breaker replaces the loss-unchanged rule (the objective is ~0)

    def __init__(self, train_file: Path, tokenizer, cfg, backend, reward_list: list[rw.Reward],
                 say: Callable[[str], None] = print, world=Solo(), run_dir: Path | None = None):
        self.world = world
        # Where completions.jsonl goes (and the dead-reward message looks for what it names): rank 0's run
        # directory; None on the other ranks, which hold the same step and write nothing.
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._log_failed = False
        self.order = TrainStream(train_file, tokenizer, cfg)  # only its resumable order of prompt rows is used
        self.rows = PromptRows(self.order.source, tokenizer, cfg, reward_list)
        self.tok, self.cfg, self.g, self.backend = tokenizer, cfg, cfg.grpo, backend
        self.rewards, self.say = reward_list, say
        self.calls = 0  # micro-batches served so far: the sampling seed's counter
        self._split = sampling_split()
        self.dead_run = 0
        self._step: list[dict] = []  # the current step's generated micro-batches (saved while iterations replay it)
        self._pending: list[rw.Scored] = []
        self._lengths: list[int] = []
        self._stats: dict = {}

    # -- batches -----------------------------------------------------------

    def next_batch(self) -> Batch:
        per_step = self.cfg.train.grad_accumulation * self.world.size  # the global step's micro-batches
        micro, step = self.calls % per_step, self.calls // per_step
        if micro == 0 and not (self.g.iterations > 1 and step % self.g.iterations):
            self._step = self._generate_step(self.calls, per_step)
        saved = self._step[micro]
        self.calls += 1
        batch, scored = _unpack(saved, self.tok.pad_id)
        self._pending.append(scored)
        self._lengths.append(int(batch.loss_mask.sum()))
        return batch

    def _generate_step(self, first_call: int, per_step: int) -> list[dict]:
        """The whole step's micro-batches. Every rank draws the step's prompts from the one order but samples and
        scores only its share (the micro-batches it trains, src/distributed.py); the shares are then gathered, so
        every rank holds the whole step: its rewards for the step's figures and the breaker, and the replay state
        rank 0 saves. Completion seeds follow the global micro-batch count, so any number of ranks samples the same."""
        accumulation, mine, failure = self.cfg.train.grad_accumulation, [], None
        for micro in range(per_step):
            members = [int(i) for i in self.order.next_members()]
            if micro // accumulation == self.world.rank and failure is None:
                try:
                    mine.append(self._generate(first_call + micro, members))
                except SHARED_FAILURES as exc:  # told to every rank, which all fail with it (none left waiting)
                    failure = exc
        shares = all_gather_json(self.world, {"batches": mine, "failed": _describe(failure)})
        _raise_first_failure(shares, failure)
        return [saved for share in shares for saved in share["batches"]]

    def _generate(self, call: int, members: list[int]) -> dict:
        size = self.g.group_size
        got = [self.rows.get(i) for i in members]
        seeds = [completion_seed(self.cfg.train.seed, call, i, k) for i in members for k in range(size)]
        # Every completion of the micro-batch in one batch: decoding is memory-bound, so a token of B x G rows
        # takes little longer than a token of one prompt's G.
        sampled = sample_rows(self.backend, [ids for ids, _, _ in got for _ in range(size)], seeds, self.g,
                              self.tok.stop_ids, self._split, self.say)
        seqs, prompts, fields, groups = [], [], [], []
        for n, (ids, prompt, row_fields) in enumerate(got):
            group = [self.rows.completion(row) for row in sampled[n * size:(n + 1) * size]]
            for completion_ids, _, _ in group:
                seqs.append((ids.tolist() + completion_ids, [0] * len(ids) + [1] * len(completion_ids)))
            prompts.append(prompt)
            fields.append(row_fields)
            groups.append(group)
        scored = score_groups(self.rows, self.rewards, members, prompts, fields, groups, self.g.group_size)
        batch = collate(seqs, self.tok.pad_id, self.cfg.model.max_seq_length)
        batch.advantages = rw.advantages(scored.total, self.g.group_size, self.g.loss_type)
        if self.g.iterations > 1:
            batch.old_logp = self.backend.token_logps(batch)
        return _pack(batch, scored)

    # -- per step ----------------------------------------------------------

    def after_step(self, step: int, result) -> tuple[float, Stop | None]:
        """(the step's tracked loss, a stop or None). The tracked loss is -(mean total reward): the loop's
        loss_avg, plateau check and checkpoint score follow the reward, since the grpo objective is ~0 by
        construction (advantages are centred per group)."""
        scored, self._pending = self._pending, []
        lengths, self._lengths = self._lengths, []
        self._stats = rw.stats(self.rewards, scored)
        self._stats["completion_len"] = sum(lengths) / max(1, sum(len(s.total) for s in scored))
        self._stats.update(result.extras)
        groups = np.concatenate([s.total for s in scored]).reshape(-1, self.g.group_size)
        all_zero = bool(np.all(groups == 0))
        no_advantage = bool(np.all(groups.max(axis=1) == groups.min(axis=1)))
        self.dead_run = self.dead_run + 1 if (all_zero or no_advantage) else 0
        tracked = -self._stats["reward"]
        every = self.g.log_completions_every
        dead = self.dead_run >= self.g.dead_reward_patience
        # Also the first step, the last, and a dead run's last (its completions show what went wrong).
        if every and (step % every == 0 or step in (1, self.cfg.train.max_steps) or dead):
            self._log_completions(step)
        if not math.isfinite(result.loss):  # the tracked reward stays finite: the objective is checked here
            return tracked, Stop("non_finite", f"the grpo loss became {result.loss} at step {step}; lower "
                                 "train.learning_rate, and check for fp16/bf16 overflow")
        kl = result.extras.get("kl")
        if kl is not None and not math.isfinite(kl):
            return tracked, Stop("non_finite", f"the KL to the reference became {kl} at step {step}; lower "
                                 "train.learning_rate or grpo.beta, and check for fp16/bf16 overflow")
        if dead:
            names, chat = ", ".join(r.name for r in self.rewards), self.rows.source.format == "chat"
            # None is "does not apply" and counts 0 in the total (TRL's nansum): that is what to look at, not scores
            none_applied = all(bool(np.isnan(s.per_reward).all()) for s in scored)
            what = ("no reward applied: every reward returned None for every completion" if none_applied
                    else "every reward was 0") if all_zero else (
                f"every completion of each prompt got the same reward ({float(groups.mean()):.4g} on average; if "
                "that is the best score possible, the task is learned and the run can end here)")
            return tracked, Stop("dead_reward", (
                f"dead reward: {what} on {self.dead_run} steps in a row (grpo.dead_reward_patience="
                f"{self.g.dead_reward_patience}) up to step {step}, so there was no advantage to learn from. "
                f"Rewards: {names}. Check that the reward functions score these completions (see "
                f"{self._where_to_look()}), that grpo.max_new_tokens (now {self.g.max_new_tokens}) leaves room "
                f"for an answer, that the prompts reach the model as it expects (grpo.chat_template, now "
                f"{self.g.chat_template}: {'its chat template' if self.rows.templated or chat else 'plain text'}), "
                "and that grpo.temperature gives varied completions"))
        return tracked, None

    def step_stats(self) -> dict:
        return dict(self._stats)

    def _where_to_look(self) -> str:
        """The files that show this run's completions, named only where they exist (predictions.jsonl needs an
        eval with eval.predictions, completions.jsonl grpo.log_completions_every)."""
        places = [f"{name} ({what})" for name, what in (
            (COMPLETIONS_FILE, "the sampled completions with each reward and advantage"),
            ("predictions.jsonl", "the evals' greedy answers with their rewards"))
            if self.run_dir is not None and (self.run_dir / name).is_file()]
        return ", ".join(places + ["the rewards/*/mean figures in metrics.jsonl"])

    def _log_completions(self, step: int) -> None:
        """completions.jsonl (TRL's completions table): one line per completion of this step, as trained: the
        prompt as the model saw it (chat template included), the completion as the rewards saw it, its length in
        tokens, each reward (null where one did not apply), the weighted total and the advantage. Rank 0 only;
        appended (a resume first drops the lines past its checkpoint: _trim_completions); non-critical: a
        failure to write is one warning and training goes on."""
        if self.run_dir is None:
            return
        import json

        keys = [r.key or r.name for r in self.rewards]
        try:
            with open(self.run_dir / COMPLETIONS_FILE, "a", encoding="utf-8") as handle:
                for saved in self._step:
                    for b, ids in enumerate(saved["input_ids"]):
                        mask, attention = saved["loss_mask"][b], saved["attention_mask"][b]
                        prompt = [t for t, m, a in zip(ids, mask, attention) if a and not m]
                        answer = [t for t, m in zip(ids, mask) if m]
                        handle.write(json.dumps({
                            "step": step, "prompt": self.tok.decode(prompt, skip_special_tokens=False),
                            "completion": self.tok.decode(answer), "tokens": len(answer),
                            "rewards": dict(zip(keys, saved["per_reward"][b])), "reward": saved["total"][b],
                            "advantage": saved["advantages"][b]}, ensure_ascii=False) + "\n")
        except Exception as exc:  # noqa: BLE001 (a record for people, SPEC §8: training goes on)
            if not self._log_failed:  # said once; later steps try again (a disk that had filled up may have room)
                self._log_failed = True
                self.say(f"warning: writing {COMPLETIONS_FILE} failed ({exc.__class__.__name__}: {exc}); training "
                         "goes on")

    # -- state -------------------------------------------------------------

    def state(self) -> dict:
        return {"version": STATE_VERSION, "order": self.order.state(), "calls": self.calls, "dead_run": self.dead_run,
                "replay": self._step if self.g.iterations > 1 else [], "group_size": self.g.group_size,
                "iterations": self.g.iterations}

    def restore(self, state: dict) -> None:
        for key in ("group_size", "iterations"):
            if state.get(key) != getattr(self.g, key):
                raise DataError(f"the saved grpo position was made with grpo.{key}={state.get(key)} and this run "
                                f"has {getattr(self.g, key)} -> resume with the same setting, or start fresh")
        self.order.restore(state["order"])
        self.calls, self.dead_run, self._step = int(state["calls"]), int(state["dead_run"]), list(state["replay"])
        # The global micro-batches per step do not change on a resume (a job's world size may, its global batch not).
        self._trim_completions(self.calls // (self.cfg.train.grad_accumulation * self.world.size))

    def _trim_completions(self, step: int) -> None:
        """completions.jsonl as the uninterrupted run had it at the checkpoint: the lines of the steps after it
        (which this process samples and logs again, the same) and a line a kill cut mid-write are dropped, so
        the file never holds a step twice nor a torn line glued to the next one. Non-critical, as the writing."""
        if self.run_dir is None:
            return
        try:
            drop_jsonl_lines_after(self.run_dir / COMPLETIONS_FILE, step)
        except OSError as exc:
            self._log_failed = True
            self.say(f"warning: trimming {COMPLETIONS_FILE} to the checkpoint's step {step} failed "
                     f"({exc.__class__.__name__}: {exc}); it may hold the steps after it twice; training goes on")

    def close(self) -> None:
        self.order.close()


SHARED_FAILURES = (TrainingError, DataError)  # a bad row, a raising reward, out of memory at one completion


def _describe(failure: BaseException | None) -> list[str] | None:
    return None if failure is None else [type(failure).__name__, str(failure)]


def _raise_first_failure(shares: list[dict], own: BaseException | None) -> None:
    """What failed on the lowest rank where something failed, raised on every rank (its own exception where it
    is this rank's), so the loop ends the same way everywhere and rank 0 records the real reason."""
    for share in shares:
        if share["failed"]:
            kind, message = share["failed"]
            if own is not None and _describe(own) == share["failed"]:
                raise own
            raise {cls.__name__: cls for cls in (rw.RewardError, DataError)}.get(kind, TrainingError)(message)


def _pack(batch: Batch, scored: rw.Scored) -> dict:
    """A generated micro-batch as plain data (saved in the checkpoint while it is still to be replayed). Float32
    values go through Python floats, which JSON writes and reads back exactly."""
    return {"input_ids": batch.input_ids.tolist(), "loss_mask": batch.loss_mask.tolist(),
            "attention_mask": batch.attention_mask.tolist(), "advantages": batch.advantages.tolist(),
            "old_logp": None if batch.old_logp is None else batch.old_logp.tolist(),
            "total": scored.total.tolist(), "per_reward": np.where(np.isnan(scored.per_reward), None,
                                                                   scored.per_reward).tolist()}


def _unpack(saved: dict, pad_id: int) -> tuple[Batch, rw.Scored]:
    batch = Batch(np.asarray(saved["input_ids"], np.int32), np.asarray(saved["loss_mask"], np.float32),
                  np.asarray(saved["attention_mask"], np.int32), pad_id, False,
                  np.asarray(saved["advantages"], np.float32),
                  None if saved["old_logp"] is None else np.asarray(saved["old_logp"], np.float32))
    per_reward = np.asarray([[np.nan if v is None else v for v in row] for row in saved["per_reward"]], np.float64)
    return batch, rw.Scored(np.asarray(saved["total"], np.float64), per_reward)


class GrpoValidator:
    """Eval for grpo: the mean total reward of greedy completions of a fixed subset of the validation prompts
    (grpo.eval_prompts of them, drawn from train.seed: each is a whole generation, so the eval.max_batches x
    batch size of the other methods would make an eval of hundreds of generations). val_loss is -(mean reward), so lower is
    better as for every method and the checkpoint score (SPEC §8) works unchanged; val_reward holds the reward
    itself. The first eval.predictions prompts of the subset, with their completions and rewards, are kept for
    predictions.jsonl."""

    def __init__(self, val_file: Path | None, tokenizer, cfg, reward_list: list[rw.Reward]):
        self.val_file, self.tok, self.cfg, self.rewards = val_file, tokenizer, cfg, reward_list
        self._rows: PromptRows | None = None
        self._chosen: list[int] = []
        self.last: list[dict] = []
        self._split = RowSplit("generating the eval's answers", "validation runs out of memory generating one "
                               "answer: lower grpo.max_new_tokens or model.max_seq_length")

    @property
    def enabled(self) -> bool:
        return self.val_file is not None

    def _prepare(self) -> None:
        source = _open_source(Path(self.val_file), self.tok, self.cfg, streaming=False)
        self._rows = PromptRows(source, self.tok, self.cfg, self.rewards)
        want = self.cfg.grpo.eval_prompts
        self._chosen = sorted(int(i) for i in _rng(self.cfg.train.seed, _EVAL_STREAM).permutation(len(source))[:want])

    def run(self, backend, cancelled: Callable[[], object] = lambda: None,
            say: Callable[[str], None] = print, world=Solo()) -> dict | None:
        """The prompts are answered in batches of eval.batch_size prompts (0: train.batch_size x grpo.group_size,
        the rows every sampling call already holds), out of memory in halves, quarters, ... (the same answers).
        In a data-parallel job the batches are dealt round-robin (src/distributed.py eval_share), every rank
        asking ``cancelled`` (an agreement) once per round, and the answers gathered: every rank then scores all
        of them, so the value is the single process's."""
        if not self.enabled or cancelled():
            return None
        if self._rows is None:
            self._prepare()
        size = self.cfg.eval.batch_size or self.cfg.train.batch_size * self.cfg.grpo.group_size
        batches = [range(a, min(a + size, len(self._chosen))) for a in range(0, len(self._chosen), size)]
        answers, failure = [], None  # [position in the subset, answer ids] for this rank's prompts
        for b in eval_share(len(batches), world):
            if cancelled():
                return None
            if b is None or failure is not None:
                continue
            try:
                prompts = [self._rows.get(self._chosen[j])[0] for j in batches[b]]
                new = [answer for part in self._split.run(len(prompts), lambda a, z: backend.generate(
                    prompts[a:z], self.cfg.grpo.max_new_tokens, self.tok.stop_ids), say) for answer in part]
            except SHARED_FAILURES as exc:
                failure = exc
            else:
                answers += [[j, [int(t) for t in ids]] for j, ids in zip(batches[b], new)]
        shares = all_gather_json(world, {"answers": answers, "failed": _describe(failure)})
        _raise_first_failure(shares, failure)
        by_position = dict(item for share in shares for item in share["answers"])
        prompts, fields, groups = [], [], []
        for j, i in enumerate(self._chosen):
            _, prompt, row_fields = self._rows.get(i)
            prompts.append(prompt)
            fields.append(row_fields)
            groups.append([self._rows.completion(np.asarray(by_position[j], dtype=np.int64))])
        scored = score_groups(self._rows, self.rewards, self._chosen, prompts, fields, groups, 1)
        mean = float(scored.total.mean())
        self.last = []
        for g in range(min(self.cfg.eval.predictions, len(self._chosen))):
            self.last.append({"prompt": prompts[g], "output": groups[g][0][1],
                              "rewards": {(r.key or r.name): (None if np.isnan(v) else float(v))
                                          for r, v in zip(self.rewards, scored.per_reward[g])},
                              "reward": float(scored.total[g])})
        return {"val_loss": -mean, "val_ppl": math.exp(min(-mean, 50.0)), "val_reward": mean,
                "val_tokens": len(self._chosen)}


def predictor(validator: GrpoValidator, run_dir: Path, say: Callable[[str], None] = print):
    """predictions.jsonl for grpo: the fixed prompts' greedy completions and their rewards, from the eval that
    just ran (no second generation)."""
    import json

    failed = []

    def predict(step: int) -> None:
        try:
            with open(Path(run_dir) / "predictions.jsonl", "a", encoding="utf-8") as handle:
                for item in validator.last:
                    handle.write(json.dumps({"step": step, **item}) + "\n")
        except Exception as exc:  # noqa: BLE001 (predictions are non-critical, SPEC §8)
            if not failed:
                failed.append(1)
                say(f"warning: predictions failed ({exc.__class__.__name__}: {exc}); training goes on")

    return predict
