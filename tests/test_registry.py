"""The per-method registry (overnight.methods.registry) and the batch-source protocol the loop relies on."""
from pathlib import Path

import pytest

from overnight.backend import StepResult
from overnight.config import CHOICES, build_config
from overnight.data import TrainStream
from overnight.data.source import BatchSource
from overnight.methods.grpo import GrpoSource
from overnight.methods.registry import METHODS, PartsRequest, method

from conftest import DATA_DIR


def test_every_method_the_config_accepts_has_its_parts_and_no_other():
    assert set(METHODS) == set(CHOICES["data.method"])


def test_both_batch_sources_implement_the_protocol_the_loop_calls_unconditionally():
    for source in (TrainStream, GrpoSource):
        assert issubclass(source, BatchSource)
        for hook in ("next_batch", "state", "restore", "after_step", "step_stats", "close"):
            assert callable(getattr(source, hook))
    assert GrpoSource.scores_own_steps and not TrainStream.scores_own_steps


def test_a_source_of_fixed_batches_tracks_the_step_loss_and_adds_nothing():
    class Fixed(BatchSource):
        pass

    result = StepResult(loss=1.25, tokens=10, grad_norm=0.5)
    assert Fixed().after_step(3, result) == (1.25, None)
    assert Fixed().step_stats() == {}
    Fixed().close()
    with pytest.raises(NotImplementedError):
        Fixed().next_batch()


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_supervised_parts_are_a_stream_a_validator_and_a_predictor_for_rank_0_only(name, tiny_model_dir, tmp_path):
    from overnight import data

    data_dir = DATA_DIR / ("preference" if name == "dpo" else "")
    cfg = build_config(None, {}, [f"model.path={tiny_model_dir}", f"data.path={data_dir}", f"data.method={name}",
                                  "eval.predictions=2", "train.batch_size=2"])
    train_file, val_file = data.find_data_files(Path(cfg.data.path))
    tok = data.load_tokenizer(tiny_model_dir)
    request = dict(cfg=cfg, backend=None, tokenizer=tok, train_file=train_file, val_file=val_file, run_dir=tmp_path,
                   say=print, world=None)
    parts = method(name).build(PartsRequest(**request, writes_predictions=True))
    try:
        assert isinstance(parts.source, TrainStream) and parts.validator.enabled and parts.predict is not None
        assert parts.source.next_batch().paired == (name == "dpo")
    finally:
        parts.source.close()
    follower = method(name).build(PartsRequest(**request, writes_predictions=False))
    follower.source.close()
    assert follower.predict is None
