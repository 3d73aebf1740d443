import math

import pytest

from overnight.config import build_config
from overnight.train.schedule import lr_at


def train_cfg(*sets):
    return build_config(None, {}, ["train.learning_rate=1.0", "train.warmup_steps=10", "train.max_steps=110", *sets]).train


def test_warmup_is_linear_and_reaches_the_peak():
    t = train_cfg()
    assert [lr_at(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


@pytest.mark.parametrize("schedule, mid, end", [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0), ("constant", 1.0, 1.0)])
def test_decay_shapes(schedule, mid, end):
    t = train_cfg(f"train.schedule={schedule}")
    assert lr_at(60, t) == pytest.approx(mid)
    assert lr_at(110, t) == pytest.approx(end, abs=1e-12)


def test_min_lr_ratio_is_the_floor():
    t = train_cfg("train.min_lr_ratio=0.1")
    assert lr_at(110, t) == pytest.approx(0.1) and lr_at(500, t) == pytest.approx(0.1)


def test_pure_function_of_step():
    t = train_cfg()
    assert [lr_at(s, t) for s in range(110)] == [lr_at(s, t) for s in range(110)]
    assert all(math.isfinite(lr_at(s, t)) for s in range(200))
