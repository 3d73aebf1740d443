"""Batched sampling and greedy generation (Backend.sample / Backend.generate, src/methods/grpo.py): a micro-batch's
completions in one batch, left-padded prompts of different lengths, per-row random streams, rows that end early
masked out. Both backends on the tiny model, on the default path (4-bit base, LoRA dropout on) with a non-zero
adapter: a completion depends only on its own prompt and seed, never on the rows beside it, so one batch, one
prompt at a time and an out-of-memory split all sample the very same completions; the batched greedy answers are
the one-at-a-time ones."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA_DIR, has

GRPO_DATA = DATA_DIR / "grpo"
BACKENDS = [
    pytest.param("torch", marks=[pytest.mark.torch, pytest.mark.skipif(not has("torch", "transformers", "peft"),
                                                                         reason="needs the torch backend")]),
    pytest.param("mlx", marks=[pytest.mark.mlx, pytest.mark.skipif(not has("mlx", "mlx_lm"),
                                                                     reason="needs the mlx backend")]),
]
# Prompts of different lengths (so the batch is left-padded), each continued by GROUP rows.
PROMPTS = [np.array(p, dtype=np.int32) for p in ([5, 6, 7], [9, 40, 41, 42, 43, 44, 45], [300, 301, 17, 18, 19])]
GROUP = 2
SEEDS = [1000 + 7 * r for r in range(len(PROMPTS) * GROUP)]


def _config(model_dir):
    from overnight.config import Config

    cfg = Config()  # the defaults: 4-bit base, LoRA dropout on
    cfg.model.path, cfg.model.max_seq_length = str(model_dir), 64
    cfg.data.method = "grpo"
    cfg.train.batch_size = 2
    cfg.grpo.rewards, cfg.grpo.max_new_tokens = ["regex=1"], 8
    assert cfg.model.quantization.bits == 4 and cfg.lora.dropout > 0
    return cfg


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tiny_model_dir):
    if request.param == "torch":
        from overnight.backends.torch_backend import TorchBackend as cls
    else:
        from overnight.backends.mlx_backend import MLXBackend as cls
    backend = cls()
    backend.setup(_config(tiny_model_dir), 0)
    # A non-zero adapter (LoRA B starts at 0), so the sampled policy is the adapted one.
    rng = np.random.default_rng(3)
    weights = backend.portable_state().weights
    backend.init_lora({k: (rng.normal(size=v.shape) * 0.3).astype(np.float32) for k, v in weights.items()})
    return backend


def _rows():
    return [p for p in PROMPTS for _ in range(GROUP)]


def test_a_completion_depends_only_on_its_prompt_and_seed(backend):
    whole = backend.sample(_rows(), SEEDS, 10, 0.8, 1.0, ())
    assert whole.shape == (6, 10) and whole.dtype == np.int64 and (whole >= 0).all()
    assert len({tuple(r) for r in whole}) == 6  # each seed its own completion
    # One prompt at a time (the single-prompt form), one row alone, and another order (other neighbours and
    # another padding for every row) give each row the same tokens.
    for n, prompt in enumerate(PROMPTS):
        group = slice(n * GROUP, (n + 1) * GROUP)
        assert np.array_equal(backend.sample(prompt, SEEDS[group], 10, 0.8, 1.0, ()), whole[group])
    assert np.array_equal(backend.sample([PROMPTS[1]], [SEEDS[3]], 10, 0.8, 1.0, ())[0], whole[3])
    order = [4, 5, 0, 1, 2, 3]
    assert np.array_equal(backend.sample([_rows()[r] for r in order], [SEEDS[r] for r in order], 10, 0.8, 1.0, ()),
                          whole[order])
    # The top-p set too: the whole batch, and the batch in halves as an out of memory splits it.
    nucleus = backend.sample(_rows(), SEEDS, 10, 1.0, 0.9, ())
    halves = [backend.sample(_rows()[a:b], SEEDS[a:b], 10, 1.0, 0.9, ()) for a, b in ((0, 3), (3, 6))]
    assert np.array_equal(np.concatenate(halves), nucleus)
    assert backend.sample(_rows(), SEEDS, 0, 1.0, 1.0, ()).shape == (6, 0)
    assert backend.sample(PROMPTS[0], [], 5, 1.0, 1.0, ()).shape == (0, 5)


def _ended(free: np.ndarray, stop_ids: tuple[int, ...]) -> np.ndarray:
    """Each row of ``free`` as it reads when it ends at its first token in ``stop_ids`` (kept, then -1)."""
    out = free.copy()
    for row in out:
        hits = np.flatnonzero(np.isin(row, stop_ids))
        if hits.size:
            row[hits[0] + 1:] = -1
    return out


def test_a_row_that_ends_early_leaves_its_neighbours_alone(backend):
    """Rows that meet a stop token keep it, then hold -1; every other row's tokens are the ones it draws without
    that stop token. The same whether the end is read back every token or every few (on an accelerator)."""
    free = backend.sample(_rows(), SEEDS, 12, 1.0, 1.0, ())
    stop = (int(free[0, 2]),)
    expected = _ended(free, stop)
    ended = [r for r in range(6) if (expected[r] == -1).any()]
    assert 0 in ended and len(ended) < 6  # row 0 ends early, some row runs to the end
    # Every row ending by its second token ends the batch early (after the check that sees it).
    everyone = tuple(int(t) for t in free[:, 1])
    assert (_ended(free, everyone)[:, 2:] == -1).all()
    for every in (1, 4, 8):
        backend._stop_every = every
        try:
            assert np.array_equal(backend.sample(_rows(), SEEDS, 12, 1.0, 1.0, stop), expected), every
            assert np.array_equal(backend.sample(_rows(), SEEDS, 12, 1.0, 1.0, everyone), _ended(free, everyone))
        finally:
            backend._stop_every = None


def test_batched_greedy_answers_are_the_one_at_a_time_answers(backend):
    prompts = PROMPTS + [np.array([2, 3], dtype=np.int32)]
    alone = [backend.generate(p, 9, ()) for p in prompts]
    assert all(a.shape == (9,) for a in alone)
    batched = backend.generate(prompts, 9, ())
    assert isinstance(batched, list) and all(np.array_equal(a, b) for a, b in zip(alone, batched, strict=True))
    # A stop token one answer meets early: that answer ends before it, the others are untouched unless they
    # meet it too.
    stop = int(alone[1][3])
    cut = [a[: np.flatnonzero(a == stop)[0]] if (a == stop).any() else a for a in alone]
    stopped = backend.generate(prompts, 9, (stop,))
    assert all(np.array_equal(a, b) for a, b in zip(cut, stopped, strict=True)) and len(cut[1]) <= 3
    assert backend.generate([], 9, ()) == [] and backend.generate(prompts, 0, ())[0].size == 0


def test_torch_decoding_never_reads_the_padding_mask_back_per_token(backend, monkeypatch):
    """Handed a 2-D padding mask, transformers reads back to the host at every forward whether any key is padding
    (masking_utils.fast_all); on a GPU that is a wait per token. The decode steps hand it their own mask instead:
    only the prefill asks."""
    if backend.name != "torch":
        pytest.skip("transformers' mask")
    from transformers import masking_utils

    asked, fast_all = [], masking_utils.fast_all
    monkeypatch.setattr(masking_utils, "fast_all", lambda mask: asked.append(1) or fast_all(mask))

    def reads(run) -> int:
        asked.clear()
        run()
        return len(asked)

    prefill = reads(lambda: backend.sample(_rows(), SEEDS, 1, 1.0, 1.0, ()))
    assert prefill > 0  # the padded prompts' prefill: transformers builds that mask
    assert reads(lambda: backend.sample(_rows(), SEEDS, 10, 1.0, 1.0, ())) == prefill
    assert reads(lambda: backend.generate(PROMPTS, 10, ())) == reads(lambda: backend.generate(PROMPTS, 1, ()))


# -- out of memory ----------------------------------------------------------------------------------------------

class Tight:
    """The backend, except that any sample/generate call over ``limit`` rows runs out of memory."""

    def __init__(self, backend, limit: int):
        self.backend, self.limit, self.calls = backend, limit, []

    def _check(self, rows: int) -> None:
        from overnight.backend import OutOfMemory

        self.calls.append(rows)
        if rows > self.limit:
            raise OutOfMemory(f"out of memory at {rows} rows")

    def sample(self, prompts, seeds, *args):
        self._check(len(seeds))
        return self.backend.sample(prompts, seeds, *args)

    def generate(self, prompts, *args):
        self._check(len(prompts))
        return self.backend.generate(prompts, *args)


def test_out_of_memory_halves_the_sampling_batch_and_samples_the_same_completions(backend):
    from overnight.methods.grpo import sample_rows, sampling_split
    from overnight.train.loop import TrainingError

    g = _config(".").grpo
    whole = sample_rows(backend, _rows(), SEEDS, g, (), sampling_split())
    tight, split, said = Tight(backend, 2), sampling_split(), []
    assert np.array_equal(sample_rows(tight, _rows(), SEEDS, g, (), split, said.append), whole)
    assert tight.calls == [6, 3, 1, 2, 1, 2] and split.parts == 4  # 6 rows, then halves, then quarters
    assert said and all("same completions" in s for s in said)
    # The split is kept: the next micro-batch goes straight in parts.
    tight.calls.clear()
    assert np.array_equal(sample_rows(tight, _rows(), SEEDS, g, (), split, said.append), whole)
    assert max(tight.calls) <= 2 and len(said) == 2
    with pytest.raises(TrainingError, match="out of memory sampling even one completion at a time"):
        sample_rows(Tight(backend, 0), _rows(), SEEDS, g, (), sampling_split(), said.append)


def test_the_eval_answers_in_batches_as_one_at_a_time_and_halves_out_of_memory(backend, tiny_model_dir):
    from overnight.data import load_tokenizer
    from overnight.methods import grpo, rewards
    from overnight.train.loop import TrainingError

    cfg = _config(tiny_model_dir)
    cfg.eval.predictions = 8

    def run(backend, batch_size: int, say=print):
        cfg.eval.batch_size = batch_size
        validator = grpo.GrpoValidator(GRPO_DATA / "val.jsonl", load_tokenizer(tiny_model_dir), cfg,
                                       rewards.load_rewards(cfg))
        return validator.run(backend, say=say), validator.last

    one_by_one = Tight(backend, 1)
    alone = run(one_by_one, 1)
    assert len(one_by_one.calls) == 8 and set(one_by_one.calls) == {1}
    default = Tight(backend, 100)
    assert run(default, 0) == alone  # batch_size x group_size = 8 prompts: one call
    assert default.calls == [8]
    said = []
    assert run(Tight(backend, 3), 0, said.append) == alone and said
    with pytest.raises(TrainingError, match="validation runs out of memory generating one answer"):
        run(Tight(backend, 0), 0, said.append)


def test_predictions_are_generated_in_batches_in_order(tmp_path):
    """The other methods' predictions.jsonl: the fixed prompts answered batch_size at a time, each line its own
    prompt's answer, in order."""
    import json

    from overnight.backend import as_prompts
    from overnight.methods.registry import greedy_predictor

    class Greedy:
        def __init__(self):
            self.calls = []

        def generate(self, prompts, max_new_tokens, stop_ids):
            rows, single = as_prompts(prompts)
            assert not single
            self.calls.append(len(rows))
            return [row[::-1][:max_new_tokens] for row in rows]

    class Tok:
        stop_ids = ()

        @staticmethod
        def decode(ids):
            return " ".join(map(str, ids))

    prompts = [(f"p{i}", np.arange(i + 1, dtype=np.int32) + 10 * i) for i in range(5)]
    backend = Greedy()
    greedy_predictor(backend, Tok(), prompts, 3, tmp_path, say=pytest.fail, batch_size=2)(7)
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert backend.calls == [2, 2, 1]
    assert [(d["step"], d["prompt"], d["output"]) for d in lines] == [
        (7, text, " ".join(map(str, ids[::-1][:3]))) for text, ids in prompts]
