"""GRPO end to end (SPEC §9, §8): it learns a reward on both backends, the objective is the one in
src/backend/objectives.py on both (parity on identical completions, against the numpy reference), the dead-reward circuit
breaker, a raising reward, bad data, and exact resume under SIGKILL (same completions, losses, adapter bytes); as a user
meets it: prompt rows through the chat template, completions.jsonl, a reward that exits, and the README's example."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, ROOT, has
from overnight.runs.rundir import read_metrics

GRPO_DATA = DATA_DIR / "grpo"
REWARDS = GRPO_DATA / "rewards.py"
needs_torch = pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="needs the torch backend")
needs_mlx = pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="needs the mlx backend")


def grpo_args(backend: str, model, out, steps: int, *extra: str, reward: str = "even_tokens") -> list[str]:
    return ["train", "--backend", backend, "--model", str(model), "--data", str(GRPO_DATA), "--method", "grpo",
            "--output", str(out), "--max-steps", str(steps), "--batch-size", "4", "--quiet",
            "--set", f"grpo.rewards=[{reward if ':' in reward else f'{REWARDS}:{reward}'}]",
            "--set", "grpo.max_new_tokens=8",
            "--set", "model.quantization.bits=0", "--set", "model.max_seq_length=64", "--set", "train.report_every=1",
            "--set", "train.learning_rate=2e-2", "--set", "train.warmup_steps=2", "--set", "lora.rank=8",
            "--set", "lora.dropout=0", "--set", "lora.layers=-1", "--set", "grpo.beta=0.0",
            "--set", "eval.every_steps=1000", "--set", "grpo.eval_prompts=4", "--set", "checkpoint.every_steps=1000",
            *extra]


def cli(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=timeout, **kw)


def train_events(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r["event"] == "train"]


# -- learning -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, steps", [pytest.param("torch", 30, marks=[needs_torch, pytest.mark.torch]),
                                            pytest.param("mlx", 30, marks=[needs_mlx, pytest.mark.mlx])])
def test_a_learnable_reward_rises(backend, steps, tiny_model_dir, tmp_path):
    """The share of even token ids in a completion: about 0.5 for the random tiny model, and learnable."""
    out = tmp_path / "run"
    result = cli(grpo_args(backend, tiny_model_dir, out, steps, "--set", "eval.every_steps=12",
                           "--set", "eval.predictions=2"))
    assert result.returncode == 0, result.stdout + result.stderr
    events = train_events(out)
    rewards = [e["reward"] for e in events]
    assert len(rewards) == steps
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    print(f"{backend}: mean reward of the first 5 steps {first:.3f}, of the last 5 {last:.3f}")
    assert last > first + 0.05, rewards
    assert {"rewards/even_tokens/mean", "rewards/even_tokens/std", "reward_std", "completion_len"} <= set(events[0])
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    assert evals and all(e["val_loss"] == -e["val_reward"] for e in evals)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 * len(evals)
    assert set(predictions[0]) >= {"step", "prompt", "output", "rewards", "reward"}
    assert "even_tokens" in predictions[0]["rewards"]


# -- the objective on both backends ---------------------------------------------------------------------

def _config(model_dir, loss_type: str, iterations: int, temperature: float = 1.0):
    from overnight.config import Config

    cfg = Config()
    cfg.model.path, cfg.model.quantization.bits, cfg.model.max_seq_length = str(model_dir), 0, 64
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.layers = 4, 8.0, 0.0, -1
    cfg.data.method = "grpo"
    cfg.train.weight_decay = 0.0
    cfg.grpo.rewards, cfg.grpo.beta, cfg.grpo.epsilon = ["exact_match"], 0.2, 0.2
    cfg.grpo.loss_type, cfg.grpo.iterations, cfg.grpo.max_new_tokens = loss_type, iterations, 12
    cfg.grpo.temperature = temperature
    return cfg


def _completions_batch(vocab: int):
    """Fixed rows: prompts of 3..6 tokens, completions of 2..12, right-padded; advantages of two groups."""
    from overnight.data import collate

    rng = np.random.default_rng(5)
    seqs = []
    for _ in range(8):
        prompt, completion = rng.integers(3, vocab, rng.integers(3, 7)), rng.integers(3, vocab, rng.integers(2, 13))
        seqs.append((prompt.tolist() + completion.tolist(), [0] * len(prompt) + [1] * len(completion)))
    batch = collate(seqs, 0, 64)
    batch.advantages = rng.normal(size=8).astype(np.float32)
    return batch, rng


@needs_torch
@needs_mlx
@pytest.mark.torch
@pytest.mark.mlx
@pytest.mark.parametrize("loss_type, iterations, temperature", [("grpo", 1, 1.0), ("dr_grpo", 2, 1.0),
                                                                ("dapo", 2, 0.7)])
def test_grpo_objective_parity_between_backends_and_the_numpy_reference(loss_type, iterations, temperature,
                                                                        tiny_model_dir):
    """Both backends' step losses equal the numpy reference (objectives.grpo_reference) on their own log-probs,
    and those are the log-softmax of the logits / grpo.temperature (the sampling policy's, as TRL)."""
    import torch

    from overnight.backend import objectives
    from overnight.backends.mlx_backend import MLXBackend
    from overnight.backends.torch_backend import TorchBackend

    cfg = _config(tiny_model_dir, loss_type, iterations, temperature)
    backends = {"torch": TorchBackend(), "mlx": MLXBackend()}
    for backend in backends.values():
        backend.setup(cfg, 3)
    batch, rng = _completions_batch(300)
    losses = {name: [] for name in backends}
    for step in range(4):
        if iterations > 1:  # an older policy than the current one: ratios away from 1, some clipped
            batch.old_logp = (backends["torch"].token_logps(batch) + rng.normal(0, 0.3, batch.loss_mask.shape)
                              * batch.loss_mask).astype(np.float32)
        logp = {name: b.token_logps(batch) for name, b in backends.items()}
        ref = backends["torch"].token_logps(batch, adapter=False)
        if step == 0:  # the model's own logits, tempered by hand
            with torch.no_grad():
                ids = torch.as_tensor(batch.input_ids, dtype=torch.long)
                logits = backends["torch"]._model(input_ids=ids, attention_mask=torch.as_tensor(
                    batch.attention_mask)).logits.float()
                by_hand = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids[:, 1:, None])[..., 0]
            np.testing.assert_allclose(logp["torch"][:, 1:], by_hand.numpy() * batch.loss_mask[:, 1:], atol=1e-5)
        expected, kl = objectives.grpo_reference(
            logp["torch"][:, 1:], batch.loss_mask[:, 1:], batch.advantages, beta=0.2, epsilon=0.2,
            loss_type=loss_type, max_new_tokens=12, ref_logp=ref[:, 1:],
            old_logp=None if batch.old_logp is None else batch.old_logp[:, 1:])
        for name, backend in backends.items():
            # Two micro-batches: the normalisation is the step's, not the micro-batch's.
            result = backend.train_step(batch.split(2), 1e-2)
            losses[name].append(result.loss)
            assert result.loss == pytest.approx(expected, rel=2e-3, abs=1e-6), (name, step)
            if step > 0:
                assert result.extras["kl"] == pytest.approx(kl, rel=2e-2, abs=1e-7), (name, step)
        assert np.allclose(logp["torch"], logp["mlx"], atol=2e-4)
    print(f"grpo {loss_type} losses: {losses}")
    assert losses["torch"][-1] != losses["torch"][0]  # the policy moved (and with it ratios and KL)


@needs_torch
@pytest.mark.torch
def test_sampling_is_seeded_per_completion(tiny_model_dir):
    """The same seed gives the same completion whatever else is sampled beside it (so a group can be split on
    out of memory), and a resumed run, given the same seeds, draws the same tokens."""
    from overnight.backends.torch_backend import TorchBackend

    backend = TorchBackend()
    backend.setup(_config(tiny_model_dir, "grpo", 1), 0)
    prompt = np.array([5, 6, 7], dtype=np.int32)
    both = backend.sample(prompt, [11, 12], 10, 1.0, 0.9, None)
    assert both.shape == (2, 10) and (both >= 0).all()
    assert np.array_equal(backend.sample(prompt, [12], 10, 1.0, 0.9, None)[0], both[1])
    assert not np.array_equal(both[0], both[1])
    eos = int(both[0, 3])
    stopped = backend.sample(prompt, [11], 10, 1.0, 0.9, eos)[0]
    first = int(np.flatnonzero(both[0] == eos)[0])
    assert stopped[first] == eos and (stopped[first + 1:] == -1).all()


# -- the batch source without a framework ---------------------------------------------------------------

class FakeSampler:
    """Completions drawn by numpy from each seed alone, as the Backend protocol asks of sample()."""

    def __init__(self):
        self.calls = 0

    def sample(self, prompt_ids, seeds, max_new_tokens, temperature, top_p, eos_id):
        self.calls += 1
        return np.stack([np.random.default_rng(s).integers(3, 60, max_new_tokens) for s in seeds])

    def token_logps(self, batch, adapter=True):
        return -np.asarray(batch.loss_mask, np.float32)

    def generate(self, prompts, max_new_tokens, eos_id):
        from overnight.backend import as_prompts

        self.calls += 1
        rows, single = as_prompts(prompts)
        answers = [np.random.default_rng(int(np.sum(p))).integers(3, 60, max_new_tokens) for p in rows]
        return answers[0] if single else answers


def _source(model_dir, reward: str, accumulation: int = 1, world=None, **grpo):
    from overnight.methods import grpo as grpo_mod
    from overnight.methods import rewards
    from overnight.config import Config
    from overnight.data import load_tokenizer

    cfg = Config()
    cfg.model.path, cfg.model.max_seq_length = str(model_dir), 64
    cfg.data.method = "grpo"
    cfg.train.batch_size, cfg.train.grad_accumulation = 2, accumulation
    cfg.grpo.rewards, cfg.grpo.max_new_tokens, cfg.grpo.dead_reward_patience = [reward], 6, 2
    for key, value in grpo.items():
        setattr(cfg.grpo, key, value)
    tok = load_tokenizer(model_dir)
    sampler = FakeSampler()
    extra = {} if world is None else {"world": world}
    return grpo_mod.GrpoSource(GRPO_DATA / "train.jsonl", tok, cfg, sampler, rewards.load_rewards(cfg),
                               **extra), sampler


def _step(loss: float = 0.0):
    from overnight.backend import StepResult

    return StepResult(loss=loss, tokens=1, grad_norm=0.0)


def test_the_source_resumes_exactly_and_replays_for_iterations(tiny_model_dir):
    source, sampler = _source(tiny_model_dir, f"{REWARDS}:even_tokens", iterations=2)
    first = source.next_batch()
    source.after_step(1, _step())
    saved = json.loads(json.dumps(source.state()))  # as a checkpoint stores it
    replayed = source.next_batch()  # step 2 trains again on step 1's completions (no sampling)
    assert sampler.calls == 1 and np.array_equal(replayed.input_ids, first.input_ids)  # the micro-batch in one call
    assert np.array_equal(replayed.old_logp, first.old_logp) and replayed.advantages is not None
    source.after_step(2, _step())
    later = [source.next_batch() for _ in range(2)]
    restored, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", iterations=2)
    restored.restore(saved)
    again = [restored.next_batch() for _ in range(3)]
    for a, b in zip([replayed] + later, again):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.advantages, b.advantages)
        assert np.array_equal(a.loss_mask, b.loss_mask) and np.array_equal(a.old_logp, b.old_logp)
    assert not np.array_equal(later[0].input_ids, first.input_ids)
    # Completion tokens are targets (their EOS too); the prompt is not.
    assert first.loss_mask.sum() == 2 * 4 * 6



def test_two_ranks_sample_their_share_and_hold_the_whole_step_as_one_source(tiny_model_dir):
    """A data-parallel job's sources (threads here, tests/threadworld.py): each rank samples only the micro-batches
    it trains, yet every rank serves the whole step as one process at grad_accumulation 2 does (same completions,
    rewards, step figures, saved state with the replay), and the eval deals its prompts out and gets the same value."""
    from threadworld import run_ranks

    from overnight.methods import grpo as grpo_mod
    from overnight.methods import rewards

    def steps(source, validator, world=None) -> dict:
        served, stats, asked = [], [], []
        for step in range(1, 4):  # iterations 2: step 2 replays step 1's batches, step 3 samples again
            served += [source.next_batch() for _ in range(2)]
            source.after_step(step, _step())
            stats.append(source.step_stats())
        extra = {} if world is None else {"world": world}
        evaluation = validator.run(source.backend, cancelled=lambda: asked.append(1), **extra)
        return {"batches": served, "stats": stats, "state": json.loads(json.dumps(source.state())),
                "samples": source.backend.calls, "eval": evaluation, "last": validator.last, "asked": len(asked)}

    def validator_for(source):
        return grpo_mod.GrpoValidator(GRPO_DATA / "val.jsonl", source.tok, source.cfg,
                                      rewards.load_rewards(source.cfg))

    def rank(world):
        source, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", world=world, iterations=2)
        source.cfg.grpo.eval_prompts = 4  # 2 for each rank
        source.cfg.eval.batch_size = 2  # in one batch
        return steps(source, validator_for(source), world)

    one, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", accumulation=2, iterations=2)
    one.cfg.grpo.eval_prompts = 4
    one.cfg.eval.batch_size = 2
    alone = steps(one, validator_for(one))
    ranks = run_ranks(2, rank)
    for got in ranks:
        for a, b in zip(got["batches"], alone["batches"], strict=True):
            for field in ("input_ids", "loss_mask", "attention_mask", "advantages", "old_logp"):
                assert np.array_equal(getattr(a, field), getattr(b, field)), field
        assert got["stats"] == alone["stats"] and got["state"] == alone["state"]
        assert got["eval"] == alone["eval"] and got["last"] == alone["last"]
        assert len(got["state"]["replay"]) == 2  # a checkpoint holds both ranks' micro-batches
    # Each rank sampled half: 2 generated steps x its micro-batch (its 2 prompts' completions in one call), and
    # one of the eval's 2 batches of 2 prompts; asked as often.
    assert [got["samples"] for got in ranks] == [3, 3] and alone["samples"] == 6
    assert ranks[0]["asked"] == ranks[1]["asked"] == 2 and alone["asked"] == 3


def test_a_failure_on_one_rank_fails_every_rank_with_its_message(tiny_model_dir):
    """Out of memory at one completion on rank 1 (or a raising reward, a bad row): rank 0 is not left waiting in the
    exchange; both raise what rank 1 met, so the job ends at once and rank 0 records the real reason."""
    from threadworld import run_ranks

    from overnight.backend import OutOfMemory
    from overnight.train.loop import TrainingError

    from overnight.methods import grpo as grpo_mod
    from overnight.methods import rewards

    def rank(world):
        source, sampler = _source(tiny_model_dir, f"{REWARDS}:even_tokens", world=world)
        source.cfg.eval.batch_size = 2  # eval batches for both ranks
        validator = grpo_mod.GrpoValidator(GRPO_DATA / "val.jsonl", source.tok, source.cfg,
                                           rewards.load_rewards(source.cfg))
        if world.rank == 1:
            sampler.sample = sampler.generate = lambda *args: (_ for _ in ()).throw(OutOfMemory("sampling"))
        said = []
        for attempt in (source.next_batch, lambda: validator.run(sampler, world=world)):
            try:
                attempt()
            except TrainingError as exc:
                said.append(str(exc))
        return said

    messages = run_ranks(2, rank)
    assert messages[0] == messages[1] and len(messages[0]) == 2
    assert "out of memory sampling even one completion" in messages[0][0]
    assert "validation runs out of memory generating one answer" in messages[0][1]

def test_out_of_memory_splits_a_group_and_never_changes_it():
    from overnight.backend import Batch, OutOfMemory
    from overnight.config import Config
    from overnight.methods.grpo import sample_rows, sampling_split

    class Tight(FakeSampler):  # only one completion fits at a time
        def sample(self, prompt_ids, seeds, *args):
            if len(seeds) > 1:
                raise OutOfMemory("out of memory")
            return super().sample(prompt_ids, seeds, *args)

    g = Config().grpo
    g.max_new_tokens = 5
    said = []
    prompts = [np.array([1, 2])] * 4
    whole = sample_rows(FakeSampler(), prompts, [7, 8, 9, 10], g, None, sampling_split())
    assert np.array_equal(sample_rows(Tight(), prompts, [7, 8, 9, 10], g, None, sampling_split(), said.append),
                          whole)
    assert said and "same completions" in said[-1]
    # The training step's split (loop: halve the micro-batch) carries each row's advantage and old log-probs.
    batch = Batch(np.arange(12).reshape(6, 2).astype(np.int32), np.ones((6, 2), np.float32),
                  np.ones((6, 2), np.int32), 0, False, np.arange(6, dtype=np.float32), np.zeros((6, 2), np.float32))
    parts = batch.split(4)
    assert np.array_equal(np.concatenate([p.advantages for p in parts]), batch.advantages)
    assert all(p.old_logp.shape == p.input_ids.shape for p in parts)


@pytest.mark.parametrize("reward, words", [("length_penalty=1000", "every reward was 0"),
                                           ("regex=.", "every completion of each prompt got the same reward (1")])
def test_no_advantage_for_patience_steps_stops_the_run(reward, words, tiny_model_dir):
    source, _ = _source(tiny_model_dir, reward)
    source.next_batch()
    assert source.after_step(1, _step())[1] is None
    source.next_batch()
    tracked, stop = source.after_step(2, _step())
    assert stop.code == "dead_reward" and words in stop.message and reward in stop.message
    source.next_batch()
    assert source.after_step(3, _step(float("nan")))[1].code == "non_finite"


def test_a_dead_reward_where_no_reward_applied_says_so_not_that_every_reward_was_0(tiny_model_dir, tmp_path):
    """None is "does not apply" (TRL's nansum makes the total 0): a run where every reward returned None for every
    completion is told that, so the user looks at what the function returns None for, not at its scores."""
    (tmp_path / "none_rewards.py").write_text("def never(prompts, completions, **kw):\n"
                                              "    return [None] * len(completions)\n")
    source, _ = _source(tiny_model_dir, f"{tmp_path / 'none_rewards.py'}:never")
    for step in (1, 2):
        source.next_batch()
        _, stop = source.after_step(step, _step())
    assert stop.code == "dead_reward" and "every reward was 0" not in stop.message
    assert "no reward applied: every reward returned None for every completion on 2 steps" in stop.message


def test_the_loss_unchanged_rule_is_off_for_a_source_with_its_own_breaker():
    from overnight.config import EarlyStoppingConfig
    from overnight.train.stopping import EarlyStopping

    cfg = EarlyStoppingConfig(stuck_steps=3)
    plain, grpo = EarlyStopping(cfg), EarlyStopping(cfg, stuck_rule=False)
    assert [plain.after_step(s, 0.0, 1.0) for s in (1, 2, 3)][-1].code == "stuck"
    assert [grpo.after_step(s, 0.0, 1.0) for s in (1, 2, 3)] == [None] * 3
    assert grpo.after_step(4, float("nan"), 1.0).code == "non_finite"


def test_a_dead_streak_is_broken_by_one_step_with_an_advantage(tiny_model_dir):
    source, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens")
    for step in range(1, 6):
        source.next_batch()
        tracked, stop = source.after_step(step, _step())
        assert stop is None and source.dead_run == 0 and -1.0 <= tracked <= 0.0


@needs_torch
@pytest.mark.torch
def test_chat_rows_reach_the_rewards_in_trl_conversational_shape(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."}],
        "answer": w}) + "\n" for w in ("yes", "no", "maybe", "ok")))
    (tmp_path / "shape_reward.py").write_text(
        "def shaped(prompts, completions, completion_ids, answer, **kw):\n"
        "    assert isinstance(prompts[0], list) and prompts[0][-1]['role'] == 'user', prompts[0]\n"
        "    assert completions[0][0]['role'] == 'assistant', completions[0]\n"
        "    assert len(answer) == len(completions) == len(completion_ids)\n"
        "    return [float(len(c[0]['content']) % 2) for c in completions]\n")
    out = tmp_path / "run"
    args = grpo_args("torch", tiny_model_dir, out, 2, reward=f"{tmp_path / 'shape_reward.py'}:shaped")
    args[args.index("--data") + 1] = str(data)
    result = cli(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rewards/shaped/mean" in train_events(out)[0]


# -- the circuit breaker, failures, bad data ------------------------------------------------------------

@needs_torch
@pytest.mark.torch
def test_a_dead_reward_trips_the_circuit_breaker(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = cli(grpo_args("torch", tiny_model_dir, out, 20, "--set", "grpo.dead_reward_patience=3",
                           reward="always_zero"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in result.stdout + result.stderr  # sampling uses the installed transformers' names
    stop = [r for r in read_metrics(out) if r["event"] == "stop"]
    assert stop and stop[0]["reason"] == "dead_reward" and stop[0]["step"] == 3
    message = stop[0]["message"]
    for words in ("every reward was 0", "3 steps in a row", "always_zero", "chat template", "max_new_tokens"):
        assert words in message, message
    assert "dead reward" in result.stdout
    assert (out / "checkpoints" / "step-00000003" / "COMMIT").is_file()
    assert (out / "adapter").is_dir()


@needs_torch
@pytest.mark.torch
def test_a_raising_reward_fails_the_run_before_the_update_naming_function_and_row(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = cli(grpo_args("torch", tiny_model_dir, out, 20, reward="fails_on_seven"))
    assert result.returncode == 1, result.stdout + result.stderr
    sevens = [n for n, line in enumerate((GRPO_DATA / "train.jsonl").read_text().splitlines(), 1)
              if json.loads(line)["answer"] == "7"]
    err = result.stderr
    assert "fails_on_seven raised ValueError: cannot score answer 7 on row" in err, err
    line = int(err.split("train.jsonl:")[1].split(";")[0])
    assert line in sevens
    assert "Traceback" not in err
    events = read_metrics(out)
    failed = [r for r in events if r["event"] == "failed"]
    assert failed and "fails_on_seven" in failed[0]["reason"]
    # No update was applied for the step whose batch failed: its train line was never written.
    assert all(r["step"] <= failed[0]["step"] for r in events if r["event"] == "train")


@needs_torch
@pytest.mark.torch
@pytest.mark.parametrize("rows, extra, words", [
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4, [],
     "train.jsonl:1: key 'messages': ends with a assistant turn; a grpo prompt ends with a user turn"),
    ([{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 2 + 2?"}], ["--set", "grpo.rewards=[exact_match]"],
     "train.jsonl:2: key 'answer': missing; reward exact_match reads it"),
    ([{"prompt": "a", "answer": "2"}], ["--set", "grpo.rewards=[nowhere_module_q:f]"],
     "cannot import module 'nowhere_module_q'"),
    ([{"prompt": "a", "completion": "b"}], [], "rows are in completion format, which method 'grpo' cannot train on"),
])
def test_bad_grpo_input_exits_2_naming_the_place(rows, extra, words, tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = grpo_args("torch", tiny_model_dir, tmp_path / "run", 2, *extra)
    args[args.index("--data") + 1] = str(data)
    result = cli(args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# -- exact resume under SIGKILL ------------------------------------------------------------------------

# The path users run: the default 4-bit base and LoRA dropout (0.05), evals off the checkpoint grid.
DEFAULT_PATH = ["--set", "model.quantization.bits=4", "--set", "lora.dropout=0.05"]
KILL_SETTINGS = {
    # torch: two micro-batches a step and two optimizer steps per generated batch (the replayed batches travel
    # in the checkpoint), with the KL term on.
    "torch": (12, ["--set", "train.grad_accumulation=2", "--set", "grpo.iterations=2", "--set", "grpo.beta=0.05",
                   "--set", "train.batch_size=2", *DEFAULT_PATH]),
    "mlx": (8, ["--set", "train.batch_size=2", "--set", "grpo.beta=0.05", *DEFAULT_PATH]),
}


def _kill_args(backend, model, out, steps, extra):
    return grpo_args(backend, model, out, steps, "--auto-resume", "--set", "checkpoint.every_steps=2",
                     "--set", "checkpoint.keep_last=2", "--set", "eval.every_steps=3",
                     "--set", "grpo.log_completions_every=1", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param("torch", marks=[needs_torch, pytest.mark.torch]),
                                     pytest.param("mlx", marks=[needs_mlx, pytest.mark.mlx])])
def test_grpo_resume_after_random_sigkills_is_exact(backend, tiny_model_dir, tmp_path):
    from faults_util import Launch, assert_adapter_equal, assert_checkpoints_sound, wait_heartbeat

    steps, extra = KILL_SETTINGS[backend]
    ref = tmp_path / "ref"
    result = cli(_kill_args(backend, tiny_model_dir, ref, steps, extra))
    assert result.returncode == 0, result.stdout + result.stderr
    rng = random.Random(1234)
    out, kills, launches = tmp_path / "run", 0, 0
    while True:
        launches += 1
        launch = Launch(_kill_args(backend, tiny_model_dir, out, steps, extra), tmp_path / "logs", str(launches))
        if kills >= 3:
            assert launch.wait() == 0, launch.tail()
            break
        # At a random step's heartbeat, then within a fraction of a step: in a step, an eval, a save, or the
        # start of a resumed process (whose first heartbeat is already past the step drawn).
        beat = wait_heartbeat(out, launch, min_step=rng.randint(1, steps - 2), timeout=300)
        if beat is not None:
            time.sleep(rng.uniform(0, 0.3))
        launch.kill()
        code = launch.wait()
        if code == 0:
            break
        assert code == -signal.SIGKILL, launch.tail()
        kills += 1
        assert_checkpoints_sound(out)
    print(f"{backend}: {kills} SIGKILLs survived in {launches} launches")
    assert kills == 3

    def by_step(run, fields):
        return {e["step"]: tuple(e[f] for f in fields) for e in train_events(run)}

    # Same completions (their rewards and lengths, step by step), same losses, same adapter bytes; every line
    # a killed process wrote before dying matches too.
    fields = ("loss", "reward", "reward_std", "completion_len", "kl")
    expected = by_step(ref, fields)
    assert sorted(expected) == list(range(1, steps + 1))
    assert by_step(out, fields) == expected
    assert all(tuple(e[f] for f in fields) == expected[e["step"]] for e in train_events(out))
    evals = {e["step"]: e["val_reward"] for e in read_metrics(ref) if e["event"] == "eval"}
    assert {e["step"]: e["val_reward"] for e in read_metrics(out) if e["event"] == "eval"} == evals
    # completions.jsonl: each resume dropped what the killed process logged past its checkpoint (a cut line too)
    assert (out / "completions.jsonl").read_text() == (ref / "completions.jsonl").read_text()
    assert_adapter_equal(out, ref)



# -- a data-parallel job --------------------------------------------------------------------------------

DP_STEPS = 6


def _dp_args(backend: str, model, out, accumulation: int, devices: int) -> list[str]:
    """The default path (4-bit base, LoRA dropout 0.05, evals between checkpoints), grpo.iterations 2 so the
    checkpoint of step 3 holds a generated step still to be replayed."""
    return grpo_args(backend, model, out, DP_STEPS, "--set", "model.quantization.bits=4",
                     "--set", "lora.dropout=0.05", "--set", "grpo.iterations=2", "--set", "grpo.beta=0.04",
                     "--set", f"train.grad_accumulation={accumulation}", "--set", "eval.every_steps=2",
                     "--set", "checkpoint.every_steps=3", "--set", "eval.predictions=2",
                     *(["--devices", str(devices)] if devices > 1 else []))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param("torch", marks=[needs_torch, pytest.mark.torch]),
                                     pytest.param("mlx", marks=[needs_mlx, pytest.mark.mlx])])
def test_grpo_two_processes_match_one_process_and_continue_as_one(backend, tiny_model_dir, tmp_path):
    """2 processes (each sampling the prompts it trains, src/methods/grpo.py) = 1 process at grad_accumulation 2: the same
    completions, rewards, losses, evals and adapter bytes; and the 2-process run's checkpoint at step 3 (a step
    still to be replayed in it) continues as 1 process to the same adapter."""
    from faults_util import assert_adapter_equal, copy_run

    two, one = tmp_path / "two", tmp_path / "one"
    for out, accumulation, devices in ((two, 1, 2), (one, 2, 1)):
        done = cli(_dp_args(backend, tiny_model_dir, out, accumulation, devices))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert ("x 2 processes, data parallel" in done.stdout + done.stderr) == (devices == 2)

    def figures(run, event, fields):
        return {e["step"]: tuple(e[f] for f in fields) for e in read_metrics(run) if e["event"] == event}

    fields = ("reward", "reward_std", "completion_len")
    assert figures(two, "train", fields) == figures(one, "train", fields)
    assert sorted(figures(one, "train", fields)) == list(range(1, DP_STEPS + 1))
    assert figures(two, "eval", ("val_reward",)) == figures(one, "eval", ("val_reward",))
    for key in ("loss", "kl"):
        got, want = figures(two, "train", (key,)), figures(one, "train", (key,))
        assert all(got[s][0] == pytest.approx(want[s][0], rel=1e-5, abs=1e-9) for s in want), (key, got, want)
    assert (two / "predictions.jsonl").read_text() == (one / "predictions.jsonl").read_text()  # rank 0 alone
    assert_adapter_equal(two, one)

    resumed = copy_run(two, tmp_path / "resumed")
    done = cli([*_dp_args(backend, tiny_model_dir, resumed, 2, 1), "--resume-from", "3"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert figures(resumed, "train", fields) == figures(one, "train", fields)
    assert_adapter_equal(resumed, one)

# -- as a user meets it: prompts, completions.jsonl, failures, the progress line ---------------------------------

def test_string_prompts_go_through_the_chat_template_when_the_model_has_one(tiny_model_dir):
    """grpo.chat_template auto (the default) renders a "prompt" row as one user turn of the model's template, as its
    "messages" rows are (an instruct model given bare text ends its turn at once); false keeps the bare text; true on a
    model without a template is refused naming the key. The rewards get the row's text either way."""
    from overnight.config import ConfigError, build_config
    from overnight.data import check_data

    auto, _ = _source(tiny_model_dir, "exact_match")
    plain, _ = _source(tiny_model_dir, "exact_match", chat_template="false")
    tok, row = auto.tok, json.loads((GRPO_DATA / "train.jsonl").read_text().splitlines()[0])
    ids, prompt, fields = auto.rows.get(0)
    rendered = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)
    assert ids.tolist() == tok.encode(rendered, add_special_tokens=False)
    seen = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert seen.endswith(f"<|user|>\n{row['prompt']}<|eos|>\n<|assistant|>\n")
    assert plain.rows.get(0)[0].tolist() == tok.prefix_ids + tok.encode(row["prompt"], add_special_tokens=False)
    assert prompt == plain.rows.get(0)[1] == row["prompt"] and fields == {"answer": row["answer"]}

    assert build_config(sets=["grpo.chat_template=true"]).grpo.chat_template == "true"  # YAML's bool, as written
    with pytest.raises(ConfigError, match="'grpo.chat_template': 'always' is not one of auto, true, false"):
        build_config(sets=["grpo.chat_template=always"])
    tok.chat_template_source = None  # a base model's folder: no template
    cfg = build_config(sets=["data.method=grpo", "grpo.rewards=[exact_match]", "grpo.chat_template=true"])
    with pytest.raises(ConfigError, match="'grpo.chat_template' is true, but the model .* has no chat template"):
        check_data(GRPO_DATA, "grpo", tokenizer=tok, cfg=cfg)  # before any work, as `overnight train` checks
    cfg.grpo.chat_template = "auto"
    assert check_data(GRPO_DATA, "grpo", tokenizer=tok, cfg=cfg).train.rows == 32


def test_a_resume_with_another_chat_template_setting_is_refused(tiny_model_dir):
    """A data-affecting key like data.chat_template_kwargs: a checkpoint from before the key trained grpo on bare
    text (false); for another method the key changes nothing and is not compared."""
    from overnight.config import build_config
    from overnight.runs import fingerprint as fp

    def print_of(*sets: str) -> dict:
        cfg = build_config(sets=["grpo.rewards=[exact_match]", f"model.path={tiny_model_dir}", *sets])
        return fp.compute(cfg, GRPO_DATA / "train.jsonl", GRPO_DATA / "val.jsonl")

    auto, plain = print_of("data.method=grpo"), print_of("data.method=grpo", "grpo.chat_template=false")
    assert fp.differences(auto, plain) == ["grpo.chat_template: 'auto' -> 'false'"]
    assert fp.differences(auto, print_of("data.method=grpo")) == []
    old = json.loads(json.dumps(auto))
    del old["config"]["grpo.chat_template"]
    assert fp.differences(old, auto) == ["grpo.chat_template: 'false' -> 'auto'"]
    assert fp.differences(old, plain) == []
    old_sft = print_of("data.method=sft")
    del old_sft["config"]["grpo.chat_template"]
    assert fp.differences(old_sft, print_of("data.method=sft")) == []


def test_completions_jsonl_holds_every_sampled_completion_every_n_steps(tiny_model_dir, tmp_path):
    """TRL's completions table: at step 1, every grpo.log_completions_every steps, the last step and a dead-reward stop,
    one line per completion as trained (prompt as the model saw it, completion as the rewards saw it, each reward, the
    total, the advantage); appended; 0 = never; a failure to write is one warning and training goes on."""
    source, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", log_completions_every=2, dead_reward_patience=99)
    source.run_dir, source.cfg.train.max_steps = tmp_path, 5
    served = {}
    for step in range(1, 6):
        served[step] = source.next_batch()
        assert source.after_step(step, _step())[1] is None
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1] * 8 + [2] * 8 + [4] * 8 + [5] * 8  # 2 prompts x group 4 each
    assert set(lines[0]) == {"step", "prompt", "completion", "tokens", "rewards", "reward", "advantage"}
    tok = source.tok
    for line, b in zip(lines[8:16], range(8)):
        batch = served[2]
        answer = batch.input_ids[b][batch.loss_mask[b] == 1].tolist()
        assert line["completion"] == tok.decode(answer) and line["tokens"] == len(answer) == 6
        assert line["advantage"] == pytest.approx(float(batch.advantages[b]))
        assert line["rewards"]["even_tokens"] == line["reward"] == pytest.approx(sum(t % 2 == 0 for t in answer) / 6)
        assert line["prompt"].endswith("<|assistant|>\n") and "<|user|>\nWhat is" in line["prompt"]
    assert lines[8]["prompt"] == lines[11]["prompt"] != lines[12]["prompt"]  # a group's 4, then the next prompt
    from overnight.runs.rundir import owned_entries

    assert owned_entries(tmp_path) == [tmp_path / "completions.jsonl"]  # --fresh archives it with the old run
    from overnight.distributed import Solo
    from overnight.methods.registry import Grpo, PartsRequest

    for leader in (True, False):  # data parallel: rank 0 alone writes it (every rank holds the whole step)
        parts = Grpo.build(PartsRequest(source.cfg, FakeSampler(), tok, GRPO_DATA / "train.jsonl", None, tmp_path,
                                        print, Solo(), writes_predictions=leader))
        assert parts.source.run_dir == (tmp_path if leader else None)
        parts.source.close()

    said = []
    quiet, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", log_completions_every=0)
    quiet.run_dir = tmp_path / "never"
    broken, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", log_completions_every=1, dead_reward_patience=99)
    broken.run_dir, broken.say = tmp_path / "no" / "such" / "folder", said.append
    for step in (1, 2):
        for source in (quiet, broken):
            source.next_batch()
            assert source.after_step(step, _step())[1] is None
    assert not (tmp_path / "never").exists() and len(said) == 1
    assert said[0].startswith("warning: writing completions.jsonl failed (FileNotFoundError") and "goes on" in said[0]


def test_the_dead_reward_message_names_only_files_that_exist(tiny_model_dir, tmp_path):
    def stopped(run_dir, every: int = 10) -> str:
        source, _ = _source(tiny_model_dir, "regex=.", log_completions_every=every)  # all 1: no advantage
        source.run_dir = run_dir
        for step in (1, 2):
            source.next_batch()
            _, stop = source.after_step(step, _step())
        return stop.message

    message = stopped(tmp_path)  # steps 1 and 2 logged (the first step, and the stop's)
    assert "see completions.jsonl (the sampled completions" in message and "predictions.jsonl" not in message
    assert "rewards/*/mean figures in metrics.jsonl" in message
    assert "grpo.chat_template, now auto: its chat template" in message
    assert [json.loads(line)["step"] for line in (tmp_path / "completions.jsonl").read_text().splitlines()] == \
        [1] * 8 + [2] * 8
    (tmp_path / "predictions.jsonl").write_text("")  # an eval with predictions ran
    assert "predictions.jsonl (the evals' greedy answers" in stopped(tmp_path)
    assert "see the rewards/*/mean figures in metrics.jsonl" in stopped(tmp_path / "off", every=0)
    assert "jsonl (" not in stopped(None)  # a rank other than 0: it writes nothing and names nothing


@needs_torch
@pytest.mark.torch
def test_a_reward_that_calls_sys_exit_fails_the_run_by_name_after_completions_were_logged(tiny_model_dir, tmp_path):
    """Through the CLI: completions.jsonl at steps 1 and 2 (every 2), the progress line shows the reward, and on the
    third step the user's reward calls sys.exit(3): exit 1 naming it with the user's own line, the heartbeat and
    metrics say failed (never exit 3 with the heartbeat left "running")."""
    (tmp_path / "flaky.py").write_text(
        "import sys\n\ncalls = []\n\n\ndef flaky(prompts, completions, completion_ids, **kw):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 2:\n"
        "        sys.exit(3)\n"
        "    return [len(ids) % 2 * 1.0 for ids in completion_ids]\n")
    out = tmp_path / "run"
    args = [a for a in grpo_args("torch", tiny_model_dir, out, 4, "--set", "grpo.log_completions_every=2",
                                 reward=f"{tmp_path / 'flaky.py'}:flaky") if a != "--quiet"]
    args[args.index("--batch-size") + 1] = "2"
    result = cli(args)
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert "flaky.py:flaky raised SystemExit (sys.exit(3) ends the process" in err, err
    assert f"{tmp_path / 'flaky.py'}:9 in flaky: sys.exit(3)" in err and "Traceback" not in err
    assert "reward=" in err and "reward_avg=" in err and "loss=" not in err  # the plain progress lines
    heartbeat = json.loads((out / "heartbeat.json").read_text())
    assert heartbeat["state"] == "failed" and "flaky" in heartbeat["reason"]
    assert [r for r in read_metrics(out) if r["event"] == "failed"]
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1] * 8 + [2] * 8  # batch 2 x group 4
    assert all(line["rewards"]["flaky"] == line["reward"] == line["tokens"] % 2 for line in lines)


# -- the real model -------------------------------------------------------------------------------------

def _smollm2() -> Path | None:
    """The converted model where `overnight models get smollm2-135m` puts it (.ci/run does), or runs/smollm2-135m."""
    from overnight.models import provided as models

    cached = models.cache_dir() / "models" / models.MODELS["smollm2-135m"].folder_name
    return next((p for p in (cached, ROOT / "runs" / "smollm2-135m") if (p / "config.json").is_file()), None)


def readme_grpo_command() -> list[str]:
    """The command of the README's GRPO example, as a user would paste it."""
    import shlex

    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## GRPO (`--method grpo`)", 1)[1]
    block = section.split("```", 2)[1].strip().removeprefix("bash").strip()
    return shlex.split(block.replace("\\\n", " "))


@pytest.mark.slow
@pytest.mark.realmodel
@needs_torch
@pytest.mark.torch
@pytest.mark.skipif(_smollm2() is None or _smollm2().parent.parent == ROOT,  # the README names it: the cache's
                    reason="SmolLM2 is not in overnight's cache (overnight models get smollm2-135m, as .ci/run does)")
def test_the_readme_grpo_example_raises_the_reward_of_smollm2(tmp_path):
    """The README's GRPO example exactly as written (plus where its records go): SmolLM2-135M-Instruct asked for
    capitals in one word, its "prompt" rows through its chat template (grpo.chat_template auto), the built-in
    `contains` reward, 7 new tokens. Its habitual "The capital of X is Y." often does not get to the city within 7
    tokens; GRPO teaches it to answer sooner."""
    command = readme_grpo_command()
    assert command[:2] == ["overnight", "train"] and "--model" in command, command
    out = tmp_path / "run"
    result = cli(command[1:] + ["--output", str(out), "--quiet", "--set", "train.report_every=1"], timeout=1500)
    assert result.returncode == 0, result.stdout + result.stderr
    rewards = [e["reward"] for e in train_events(out)]
    first, last = np.mean(rewards[:4]), np.mean(rewards[-4:])
    print(f"SmolLM2-135M, the README's GRPO example: mean reward of the first 4 steps {first:.3f}, of the last 4 "
          f"{last:.3f}: {rewards}")
    assert last > first + 0.15, rewards
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and "<|im_start|>assistant\n" in lines[0]["prompt"]  # the template was used
    assert lines[-1]["step"] == 16


def test_completions_jsonl_after_a_kill_and_resume_holds_the_uninterrupted_runs_lines(tiny_model_dir, tmp_path):
    """A process killed after its checkpoint at step 1 had logged steps 2 and 3, the last line cut mid-write; the
    resumed one logs steps 2 and 3 again. The file ends as an uninterrupted run's: no step twice, no torn line."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir(), run_dir.mkdir()
    ref, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", log_completions_every=1, dead_reward_patience=99)
    ref.run_dir, ref.cfg.train.max_steps = ref_dir, 3
    for step in (1, 2, 3):
        ref.next_batch()
        ref.after_step(step, _step())
    killed, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", log_completions_every=1, dead_reward_patience=99)
    killed.run_dir, killed.cfg.train.max_steps = run_dir, 3
    killed.next_batch()
    killed.after_step(1, _step())
    saved = json.loads(json.dumps(killed.state()))  # the checkpoint at step 1
    for step in (2, 3):
        killed.next_batch()
        killed.after_step(step, _step())
    with open(run_dir / "completions.jsonl", "a") as handle:
        handle.write('{"step": 4, "prompt": "cut sh')  # SIGKILL mid-write
    resumed, _ = _source(tiny_model_dir, f"{REWARDS}:even_tokens", log_completions_every=1, dead_reward_patience=99)
    resumed.run_dir, resumed.cfg.train.max_steps = run_dir, 3
    resumed.restore(saved)
    for step in (2, 3):
        resumed.next_batch()
        resumed.after_step(step, _step())
    assert (run_dir / "completions.jsonl").read_text() == (ref_dir / "completions.jsonl").read_text()
