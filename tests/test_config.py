from __future__ import annotations

from pathlib import Path

import pytest

from overnight.config import ConfigError, build_config, load_yaml


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


def test_lora_use_dora_is_an_off_by_default_training_key_refused_where_it_cannot_work():
    from overnight.config import TRAINING_KEYS

    assert build_config().lora.use_dora is False and "lora.use_dora" in TRAINING_KEYS
    assert build_config(None, {}, ["lora.use_dora=true"]).lora.use_dora is True
    with pytest.raises(ConfigError, match="lora.use_dora.*data.method reward"):
        build_config(None, {}, ["lora.use_dora=true", "data.method=reward"])
    with pytest.raises(ConfigError, match="lora.use_dora.*lora.init_from"):
        build_config(None, {}, ["lora.use_dora=true", "lora.init_from=/some/adapter"])
    with pytest.raises(ConfigError, match="lora.use_dora"):
        build_config(None, {}, ["lora.use_dora=sometimes"])


def test_preference_beta_is_a_training_key_with_the_papers_default():
    from overnight.config import TRAINING_KEYS

    assert build_config().preference.beta == 0.1 and "preference.beta" in TRAINING_KEYS
    assert build_config(None, {}, ["preference.beta=0.25"]).preference.beta == 0.25


@pytest.mark.parametrize("item, needle", [
    ("lora.targets=[q_proj, v_proj", "did you mean --set 'lora.targets=[q_proj, v_proj]'"),
    ("lora.targets=[q_proj,", "quote the whole argument"),  # `--set lora.targets=[q_proj, v_proj]` split by the shell
    ("lora.targets={q_proj: 1", "lora.targets"),
    ("lora.targets=[q_proj]]", "write a list as --set 'lora.targets=[a, b]'"),
    ("lora.targets=q_proj, v_proj]", "looks like a list with a bracket missing"),
    ("grpo.reward_weights=[1.0, 2.0", "grpo.reward_weights"),
])
def test_a_malformed_list_in_set_is_refused_naming_the_key_and_the_right_form(item, needle):
    """Before: "[q_proj, v_proj" was taken as text and split at the comma, training a module named "[q_proj"."""
    with pytest.raises(ConfigError) as err:
        build_config(None, {}, [item])
    key = item.split("=")[0]
    assert key in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("item, expected", [
    ("train.batch_size=[1, 2]", "expected an integer"), ("train.learning_rate=[1e-4]", "expected a number"),
    ("data.streaming=[true]", "expected true or false"), ("model.path=[a, b]", "expected text"),
    ("model.path={a: b}", "expected text"), ("lora.targets=5", "expected a list"),
    ("lora.targets={q_proj: v_proj}", "expected a list"), ("lora.targets=[[q_proj]]", "expected text"),
    ("train={max_steps: [3]}", "expected an integer"), ("train=5", "must be a mapping"),
])
def test_a_list_where_a_value_goes_and_the_reverse_are_refused_by_name(item, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        build_config(None, {}, [item])
    assert ("'train.max_steps'" if item.startswith("train={") else item.split("=")[0]) in str(err.value)


def test_text_yaml_cannot_read_is_still_text_and_brackets_inside_items_are_kept():
    assert build_config(None, {}, ["model.path=@my-models/x"]).model.path == "@my-models/x"
    assert build_config(None, {}, ["grpo.rewards=regex=[0-9]+"]).grpo.rewards == ["regex=[0-9]+"]
    assert build_config(None, {}, ["grpo.rewards=[exact_match, 'regex=\\[A-D\\]']"]).grpo.rewards == \
        ["exact_match", "regex=\\[A-D\\]"]


def test_a_yaml_key_given_twice_warns_naming_the_file_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, "lora: {rank: 4}\ntrain:\n  learning_rate: 1e-4\n  batch_size: 2\n"
                           "  learning_rate: 2e-4\n")
    cfg = build_config(path)
    assert cfg.train.learning_rate == 2e-4  # the last one, as PyYAML reads it
    assert cfg.warnings == [f"config file {path}: key 'train.learning_rate' is given twice (lines 3 and 5); the "
                            "value on line 5 is used (PyYAML keeps the last), remove the other"]
    assert build_config(write(tmp_path, "train:\n  learning_rate: 1e-4\nlora:\n  rank: 4\n")).warnings == []
    # Three times is one warning; a key brought in by a merge (<<: *anchor) is meant to be overridden.
    warnings: list[str] = []
    load_yaml(write(tmp_path, "base: &b {rank: 4}\nlora:\n  <<: *b\n  rank: 8\n  alpha: 1\n  alpha: 2\n"
                              "  alpha: 3\n"), warnings)
    assert warnings == [f"config file {tmp_path / 'c.yaml'}: key 'lora.alpha' is given 3 times (lines 5, 6 and 7); "
                        "the value on line 7 is used (PyYAML keeps the last), remove the others"]


def test_the_run_length_is_max_steps_or_epochs_never_both(tmp_path):
    both = write(tmp_path, "train:\n  max_steps: 100\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml sets both train.max_steps and train.epochs"):
        build_config(both)
    with pytest.raises(ConfigError, match="the command line sets both"):
        build_config(None, {"train.max_steps": 5}, ["train.epochs=2"])
    with pytest.raises(ConfigError, match="the command line sets both"):
        build_config(None, {"train.epochs": 2.0}, ["train.max_steps=5"])
    # The command line's one replaces the YAML's other (flags beat YAML).
    in_steps = write(tmp_path, "train:\n  max_steps: 100\n")
    assert build_config(in_steps, {"train.epochs": 3.0}).train.epochs == 3.0
    in_epochs = write(tmp_path, "train:\n  epochs: 2\n")
    assert build_config(in_epochs).train.epochs == 2.0
    cfg = build_config(in_epochs, {"train.max_steps": 7})
    assert (cfg.train.epochs, cfg.train.max_steps) == (None, 7)
    from overnight.config import TRAINING_KEYS

    assert build_config().train.epochs is None and "train.epochs" not in TRAINING_KEYS  # like max_steps: extendable
    for bad in ("0", "-1", ".nan", ".inf"):
        with pytest.raises(ConfigError, match="train.epochs"):
            build_config(None, {}, [f"train.epochs={bad}"])


def test_the_dumped_config_of_an_epochs_run_records_the_steps_and_loads_again(tmp_path):
    from overnight.config import dump_config

    cfg = build_config(None, {}, ["train.epochs=3"])
    cfg.train.max_steps = 120  # as derived at the start of the run
    dump_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# train.max_steps 120 was derived from train.epochs 3")
    again = build_config(tmp_path / "config.yaml")
    assert (again.train.max_steps, again.train.epochs) == (120, None)


def test_model_dtype_is_one_of_the_named_dtypes():
    from overnight.config import Config, ConfigError, set_dotted, validate

    cfg = Config()
    set_dotted(cfg, "model.dtype", "bf16")
    with pytest.raises(ConfigError, match="model.dtype.*bfloat16"):
        validate(cfg)
    set_dotted(cfg, "model.dtype", "bfloat16")
    assert validate(cfg).model.dtype == "bfloat16"


def test_grpo_takes_trls_loss_types_and_defaults_and_a_positive_eval_prompt_count():
    cfg = build_config(sets=["data.method=grpo", "grpo.rewards=[exact_match]"])
    assert (cfg.grpo.loss_type, cfg.grpo.beta, cfg.grpo.eval_prompts) == ("dapo", 0.0, 32)
    for loss_type in ("dapo", "grpo", "dr_grpo"):
        assert build_config(sets=[f"grpo.loss_type={loss_type}"]).grpo.loss_type == loss_type
    with pytest.raises(ConfigError, match="grpo.eval_prompts"):
        build_config(sets=["grpo.eval_prompts=0"])


def test_data_columns_maps_row_keys_and_refuses_other_keys_by_name(tmp_path):
    from overnight.config import ROW_KEYS
    from overnight.data.formats import FORMAT_KEYS

    assert set(ROW_KEYS) == {k for keys in FORMAT_KEYS.values() for k in keys}
    cfg = build_config(write(tmp_path, "data:\n  columns: {prompt: question, completion: answer}\n"
                                       "  hf_dataset: {name: org/set, config: en, val_split: dev}\n"))
    assert cfg.data.columns == {"prompt": "question", "completion": "answer"}
    assert (cfg.data.hf_dataset.name, cfg.data.hf_dataset.config, cfg.data.hf_dataset.train_split,
            cfg.data.hf_dataset.val_split) == ("org/set", "en", "train", "dev")
    with pytest.raises(ConfigError, match=r"'question' is not a key of any row format .*did you mean "
                                          r"\{prompt: question\}\? the row key comes first"):
        build_config(sets=["data.columns={question: prompt}"])
    with pytest.raises(ConfigError, match=r"'promt' is not a key of any row format .*did you mean 'prompt'"):
        build_config(sets=["data.columns={promt: q}"])
    with pytest.raises(ConfigError, match="column 'q' is mapped to more than one row key"):
        build_config(sets=["data.columns={prompt: q, text: q}"])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.hf_dataset.split' \(did you mean"):
        build_config(sets=["data.hf_dataset.split=train"])


@pytest.mark.parametrize("sets, needle", [
    (["lora.alpha=0"], "'lora.alpha' must be above 0"),
    (["data.method=dpo", "preference.beta=0"], "'preference.beta' must be above 0 for method dpo"),
    (["early_stopping.grad_spike_threshold=0"], "'early_stopping.grad_spike_threshold' must be above 0"),
    (["early_stopping.grad_spike_threshold=-5"], "'early_stopping.grad_spike_threshold' must be above 0"),
    (["eval.max_new_tokens=0"], "'eval.max_new_tokens' is 0 while eval.predictions is 3"),
])
def test_a_value_that_would_train_or_predict_nothing_is_refused_by_name(sets, needle):
    """lora.alpha 0 scales LoRA's update to 0 (no gradient either), dpo's beta 0 makes every pair's loss log 2, a
    spike threshold of 0 stops every run after grad_spike_patience steps, and predictions of 0 tokens are empty:
    each was accepted and trained (or predicted) nothing without a word."""
    with pytest.raises(ConfigError, match=needle):
        build_config(None, {}, sets)


def test_the_same_values_where_they_mean_something_are_accepted():
    assert build_config(None, {}, ["data.method=orpo", "preference.beta=0"]).preference.beta == 0  # orpo's sft term
    assert build_config(None, {}, ["eval.max_new_tokens=0", "eval.predictions=0"]).eval.max_new_tokens == 0
    assert build_config(None, {}, ["early_stopping.grad_spike_threshold=.inf"]).early_stopping.grad_spike_threshold \
        == float("inf")


@pytest.mark.parametrize("sets, key, why", [
    (["grpo.temperature=0.7"], "grpo.temperature", "data.method sft does not read it (only grpo does)"),
    (["data.method=grpo", "grpo.rewards=[exact_match]", "eval.max_batches=4"], "eval.max_batches",
     "data.method grpo does not read it (only sft, cpt, dpo, orpo and reward do; its eval answers grpo.eval_prompts"),
    (["data.method=grpo", "grpo.rewards=[exact_match]", "eval.max_new_tokens=10"], "eval.max_new_tokens",
     "its answers are grpo.max_new_tokens long"),
    (["data.method=grpo", "grpo.rewards=[exact_match]", "early_stopping.stuck_steps=4"], "early_stopping.stuck_steps",
     "its breaker is grpo.dead_reward_patience"),
    (["data.method=reward", "eval.predictions=5"], "eval.predictions", "a reward model generates nothing"),
    (["data.method=dpo", "data.mask_prompt=false"], "data.mask_prompt", "a pair's prompt is never a target"),
    (["preference.beta=0.5"], "preference.beta", "only dpo and orpo do"),
    (["reward.center_coefficient=0.01"], "reward.center_coefficient", "only reward does"),
    (["early_stopping.enabled=false", "early_stopping.patience=3"], "early_stopping.patience",
     "early_stopping.enabled is false"),
    (["report.wandb_project=mine"], "report.wandb_project", "report.wandb is false"),
    (["data.hf_dataset.config=main"], "data.hf_dataset.config", "data.hf_dataset.name is not set"),
    (["data.hf_dataset.name=org/set", "data.path=mine"], "data.path", "data.hf_dataset.name is set"),
    (["model.quantization.bits=0", "model.quantization.group_size=32"], "model.quantization.group_size",
     "model.quantization.bits is 0 (nothing is quantized)"),
])
def test_a_key_this_run_never_reads_is_said_at_the_start(sets, key, why):
    """A key of another method, or one that another key switches off, changed nothing without a word; it is a
    warning naming the key and why (one YAML may serve several methods, so not refused)."""
    warnings = build_config(None, {}, sets).warnings
    assert len(warnings) == 1 and warnings[0].startswith(f"config key '{key}' is set to ") and why in warnings[0], \
        warnings
    assert warnings[0].endswith("it changes nothing in this run")


def test_keys_left_at_their_defaults_and_the_shipped_configs_warn_of_nothing(tmp_path):
    """A config.yaml a run wrote holds every key at its value, other methods' defaults included; and no preset
    sets a key its method does not read (configs/grpo.yaml had eval.max_batches)."""
    from overnight.config import Config, dump_config

    dumped = tmp_path / "config.yaml"
    dump_config(Config(), dumped)
    assert build_config(dumped).warnings == []
    assert build_config(None, {}, ["data.method=sft", "grpo.temperature=1.0", "eval.predictions=3"]).warnings == []
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        assert build_config(path, {}, ["model.path=m"]).warnings == [], path


@pytest.mark.parametrize("url", ["hooks.example.com/services/T0SECRET", "ftp://hooks.example.com/T0SECRET",
                                 "https//hooks.example.com/T0SECRET"])
def test_a_webhook_url_nothing_can_be_posted_to_is_refused_without_echoing_it(url):
    """Without http(s):// the webhook failed at run time as one warning and no notification arrived all night; the
    refusal names the key, never the URL (its path carries the secret)."""
    with pytest.raises(ConfigError) as refused:
        build_config(None, None, [f"notify.webhook_url={url}"])
    assert "notify.webhook_url" in str(refused.value) and "T0SECRET" not in str(refused.value)
    assert build_config(None, None, ["notify.webhook_url=https://hooks.example.com/T0SECRET"]).notify.webhook_url

