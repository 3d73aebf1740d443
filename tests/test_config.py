from __future__ import annotations

import pytest

from overnight.config import ConfigError, build_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_spec():
    cfg = build_config()
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.layers) == (16, 32.0, 0.05, 16)
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.max_grad_norm) == (8, 2000, 50, 1.0)
    assert (cfg.eval.every_steps, cfg.eval.max_batches, cfg.checkpoint.every_steps, cfg.checkpoint.keep_last) == (250, 50, 250, 3)
    es = cfg.early_stopping
    assert (es.patience, es.min_delta, es.warmup_steps, es.grad_spike_threshold, es.grad_spike_patience) == (5, 0.01, 50, 1000.0, 3)
    assert cfg.model.quantization.bits == 4 and cfg.data.streaming and cfg.data.mask_prompt


def test_precedence_defaults_yaml_flags_set(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1e-5\n  batch_size: 2\n  max_steps: 10\nlora:\n  rank: 4\n")
    cfg = build_config(path, {"train.batch_size": 3, "lora.rank": None}, ["train.max_steps=7"])
    assert cfg.train.learning_rate == 1e-5 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.batch_size == 3  # flag beats YAML
    assert cfg.lora.rank == 4  # an unset flag does not override
    assert cfg.train.max_steps == 7  # --set beats everything


def test_packing_defaults_on_for_cpt():
    assert build_config(None, {}, ["data.method=cpt"]).packing is True
    assert build_config(None, {}, ["data.method=sft"]).packing is False


@pytest.mark.parametrize("sets, needle", [
    (["bogus.key=1"], "bogus"),
    (["train.learning_rat=1"], "did you mean 'learning_rate'"),
    (["lora.rnak=4"], "did you mean 'rank'"),
    (["train.batch_size=many"], "train.batch_size"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.schedule=cosin"], "did you mean 'cosine'"),
    (["data.method=rlhf"], "data.method"),
    (["lora.dropout=1.5"], "lora.dropout"),
    (["data.streaming=maybe"], "data.streaming"),
    (["train"], "KEY=VALUE"),
])
def test_bad_values_name_the_key(sets, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        build_config(None, {}, sets)


def test_yaml_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml line \d+ is not valid YAML"):
        build_config(write(tmp_path, "train:\n  batch_size: [1\n"))
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'train.bach_size'.*batch_size"):
        build_config(write(tmp_path, "train:\n  bach_size: 2\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")


def test_lists_from_set_and_yaml():
    cfg = build_config(None, {}, ["lora.targets=[q_proj, v_proj]"])
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert build_config(None, {}, ["lora.targets=q_proj,o_proj"]).lora.targets == ["q_proj", "o_proj"]


def test_every_bundled_preset_loads():
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(presets) >= 7
    for preset in presets:
        build_config(preset)


@pytest.mark.parametrize("item, key", [
    ("train.learning_rate=nan", "train.learning_rate"), ("train.learning_rate=.inf", "train.learning_rate"),
    ("train.learning_rate=-.inf", "train.learning_rate"), ("lora.alpha=nan", "lora.alpha"),
    ("train.seed=-1", "train.seed"), ("preference.beta=-0.5", "preference.beta"),
])
def test_non_finite_numbers_and_negative_seeds_are_refused_by_name(item, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config(None, {}, [item])


def test_preference_beta_is_a_training_key_with_the_papers_default():
    from overnight.config import TRAINING_KEYS

    assert build_config().preference.beta == 0.1 and "preference.beta" in TRAINING_KEYS
    assert build_config(None, {}, ["preference.beta=0.25"]).preference.beta == 0.25
