"""Real chat models (issue 26, item 4): the stop set comes from the chat template too (Llama 3 <|eot_id|>, Gemma
<end_of_turn>, Qwen <|im_end|>), data.chat_template_kwargs reaches every rendering, and a run pins strftime_now
to its start. The tokenizers are built here in each model family's shape: byte-level, no merges, every special
token at an id the test chooses, on the tiny model's weights."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, ROOT, has
from overnight.data.tokenizer import encode_prompt, encode_row, load_tokenizer

TESTS = Path(__file__).resolve().parent

# The Llama 3.1 template's date line and turn layout (tools left out), as the real one writes them.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Gemma's template, verbatim.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Qwen3's layout: the last answer carries an (empty) think block, and enable_thinking=false closes one in the
# generation prompt, so the model answers without thinking.
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Each family: its named tokens, its other special tokens, its template, and which tokens its
# generation_config.json lists as eos_token_id (Llama 3.0 and Gemma 1 folders list the eos alone).
SHAPES = {
    "llama3": {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "turn": "<|eot_id|>", "pad": None,
               "special": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"], "added": [],
               "template": LLAMA3_TEMPLATE, "generation_eos": ["eos"]},
    "gemma": {"bos": "<bos>", "eos": "<eos>", "turn": "<end_of_turn>", "pad": "<pad>",
              "special": ["<start_of_turn>"], "added": [], "template": GEMMA_TEMPLATE, "generation_eos": ["eos"]},
    "qwen3": {"bos": None, "eos": "<|endoftext|>", "turn": "<|im_end|>", "pad": "<|endoftext|>",
              "special": ["<|im_start|>"], "added": ["<think>", "</think>"], "template": QWEN3_TEMPLATE,
              "generation_eos": ["turn", "eos"]},
}


def chat_model(out: Path, base: Path, shape: str, turn_id: int | None = None) -> Path:
    """A model folder with ``base``'s weights and a ``shape`` tokenizer: the 256 byte symbols at ids 0-255, the
    special tokens from 256 on (the end-of-turn token at ``turn_id`` when given, swapped with what was there), the
    rest of the model's vocabulary filled with tokens that no text encodes to."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    spec = SHAPES[shape]
    size = json.loads((base / "config.json").read_text())["vocab_size"]
    named = [spec["eos"], spec["turn"]] + [t for t in (spec["bos"], spec["pad"]) if t and t != spec["eos"]]
    specials = named + spec["special"]
    order = sorted(pre_tokenizers.ByteLevel.alphabet()) + specials + spec["added"]
    order += [f"<unused{i}>" for i in range(size - len(order))]
    if turn_id is not None:
        at = order.index(spec["turn"])
        order[at], order[turn_id] = order[turn_id], order[at]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(order)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
    if spec["bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], order.index(spec["bos"]))])
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    shutil.copy(base / "model.safetensors", out / "model.safetensors")
    ids = {name: (order.index(spec[name]) if spec[name] else None) for name in ("bos", "eos", "pad", "turn")}
    config = json.loads((base / "config.json").read_text())
    config.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["bos"], "eos_token_id": [ids[n] for n in spec["generation_eos"]]}))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": spec["template"],
         **{f"{n}_token": spec[n] for n in ("bos", "eos", "pad") if spec[n]}}))
    return out


def ids_of(folder: Path) -> dict[str, int]:
    tok = json.loads((folder / "tokenizer.json").read_text())
    return tok["model"]["vocab"]


# -- the stop set ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, expected", [
    ("llama3", ["<|end_of_text|>", "<|eot_id|>"]),  # generation_config lists the eos alone: the template adds eot
    ("gemma", ["<eos>", "<end_of_turn>"]),
    ("qwen3", ["<|endoftext|>", "<|im_end|>"]),  # the eos, then generation_config's list (im_end first) once each
])
def test_the_stop_set_is_the_eos_the_model_folders_eos_ids_and_the_templates_end_of_turn(
        shape, expected, tiny_model_dir, tmp_path):
    folder = chat_model(tmp_path / shape, tiny_model_dir, shape)
    vocab = ids_of(folder)
    tok = load_tokenizer(folder)
    assert tok.end_of_turn_id == vocab[SHAPES[shape]["turn"]]
    assert tok.stop_ids == tuple(vocab[t] for t in expected)
    assert all(type(i) is int for i in tok.stop_ids)


def test_a_turn_that_ends_in_eos_adds_nothing_and_qwen3s_turn_end_needs_no_generation_config(
        tiny_model_dir, tmp_path):
    tiny = load_tokenizer(tiny_model_dir)  # "<|assistant|>\n{answer}<|eos|>\n"
    assert tiny.end_of_turn_id == tiny.eos_id and tiny.stop_ids == (tiny.eos_id,)
    folder = chat_model(tmp_path / "qwen3", tiny_model_dir, "qwen3")
    (folder / "generation_config.json").unlink()  # a fine-tune saved without it
    vocab = ids_of(folder)
    assert load_tokenizer(folder).stop_ids == (vocab["<|endoftext|>"], vocab["<|im_end|>"])


# -- generation stops at the end-of-turn token, on both backends -------------------------------------------------

def _backend(name: str, model_dir: Path):
    """The backend on the tiny model with the defaults (4-bit, dropout on)."""
    from overnight.config import Config

    cfg = Config()
    cfg.model.path, cfg.model.max_seq_length = str(model_dir), 256
    cfg.lora.layers = -1
    if name == "torch":
        from overnight.backends.torch_backend import TorchBackend as Backend
    else:
        from overnight.backends.mlx_backend import MLXBackend as Backend
    backend = Backend()
    backend.setup(cfg, 0)
    cfg.grpo.max_new_tokens = 12
    return backend, cfg


def _a_token_to_end_on(out: list[int], avoid: set[int]) -> tuple[int, int]:
    """(token, position): a token first produced at ``position`` >= 1, not in ``avoid`` and with nothing of
    ``avoid`` before it, so a stop set holding it and ``avoid`` stops right there."""
    for k in range(1, len(out)):
        if out[k] not in avoid and out[k] not in out[:k] and not avoid & set(out[:k]):
            return out[k], k
    raise AssertionError(f"no usable token in {out}")


@pytest.mark.parametrize("backend_name", [
    pytest.param("torch", marks=[pytest.mark.torch, pytest.mark.skipif(not has("torch", "transformers", "peft"),
                                                                         reason="needs the torch backend")]),
    pytest.param("mlx", marks=[pytest.mark.mlx, pytest.mark.skipif(not has("mlx", "mlx_lm"),
                                                                     reason="needs the mlx backend")]),
])
def test_predictions_and_grpo_completions_stop_at_the_templates_end_of_turn(backend_name, tiny_model_dir, tmp_path):
    """The random tiny model's own next tokens decide which id the built tokenizer makes <|eot_id|> (the Llama 3
    shape, whose generation_config lists only <|end_of_text|>): predictions (the greedy predictor writing
    predictions.jsonl) and GRPO sampling then end there, where they ran on before."""
    from overnight.methods.grpo import sample_rows, sampling_split
    from overnight.methods.registry import greedy_predictor

    backend, cfg = _backend(backend_name, tiny_model_dir)
    probe = load_tokenizer(chat_model(tmp_path / "probe", tiny_model_dir, "llama3"))
    # A prompt row: no end-of-turn token in the prompt, so moving that token's id leaves the prompt's ids alone.
    row = {"prompt": "What is the capital of France?"}
    prompt = np.asarray(encode_prompt(probe, row, "completion"), dtype=np.int32)
    declared = set(probe.stop_ids)
    greedy = backend.generate(prompt, 12, ()).tolist()
    seed = 11
    sampled = [int(t) for t in sample_rows(backend, [prompt], [seed], cfg.grpo, (), sampling_split()).tolist()[0]
               if t >= 0]

    for name, out in (("greedy", greedy), ("sampled", sampled)):
        turn, k = _a_token_to_end_on(out, declared | set(prompt.tolist()))
        tok = load_tokenizer(chat_model(tmp_path / name, tiny_model_dir, "llama3", turn_id=turn))
        assert tok.end_of_turn_id == turn and turn in tok.stop_ids
        ids = np.asarray(encode_prompt(tok, row, "completion"), dtype=np.int32)
        assert np.array_equal(ids, prompt)
        if name == "greedy":
            predict = greedy_predictor(backend, tok, [(row["prompt"], ids)], 12, tmp_path, say=pytest.fail)
            predict(5)
            line = json.loads((tmp_path / "predictions.jsonl").read_text().splitlines()[-1])
            assert line["output"] == tok.decode(out[:k]) != tok.decode(out)
        else:
            stopped = sample_rows(backend, [ids], [seed], cfg.grpo, tok.stop_ids, sampling_split())[0]
            assert stopped.tolist() == out[:k + 1] + [-1] * (len(stopped) - k - 1)  # the stop token is kept


# -- data.chat_template_kwargs -----------------------------------------------------------------------------------

CHAT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]


def test_enable_thinking_reaches_generation_prompts_and_the_training_mask_as_in_transformers(
        tiny_model_dir, tmp_path):
    folder = chat_model(tmp_path / "qwen3", tiny_model_dir, "qwen3")
    default, no_thinking = load_tokenizer(folder), load_tokenizer(folder, {"enable_thinking": False})
    think = "<think>\n\n</think>\n\n"
    # Generation (predictions, GRPO): the prompt closes an empty think block only when asked.
    prompt = {"messages": CHAT[:1]}
    assert not default.decode(encode_prompt(default, prompt, "chat"), skip_special_tokens=False).endswith(think)
    assert no_thinking.decode(encode_prompt(no_thinking, prompt, "chat"),
                              skip_special_tokens=False).endswith("<|im_start|>assistant\n" + think)
    # Training rows: the same text either way, but with thinking off the think block is part of the prompt the
    # model is given, not something it learns to write.
    rows = [encode_row(t, {"messages": CHAT}, "chat").responses[0] for t in (default, no_thinking)]
    assert rows[0][0] == rows[1][0]
    targets = [default.decode([i for i, m in zip(*r) if m], skip_special_tokens=False) for r in rows]
    assert targets == [think + "Blue.<|im_end|>\n", "Blue.<|im_end|>\n"]
    # transformers renders the same text with the same kwargs.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    for gen in (False, True):
        assert hf.apply_chat_template(CHAT[:2 - gen], tokenize=False, add_generation_prompt=gen,
                                      enable_thinking=False) == \
            no_thinking.apply_chat_template(CHAT[:2 - gen], add_generation_prompt=gen)


def test_a_qwen3_answer_after_a_dropped_turn_still_learns_its_end_of_turn(tiny_model_dir, tmp_path):
    """A template that renders an earlier answer differently than alone (here: the think block only on the last
    answer) sends the loss mask to its text search; the turn's <|im_end|> must be a target there too, or the
    model never learns to stop after such a turn."""
    folder = chat_model(tmp_path / "qwen3", tiny_model_dir, "qwen3")
    tok = load_tokenizer(folder)
    chat = CHAT + [{"role": "user", "content": "Another."}, {"role": "assistant", "content": "Red."}]
    ids, mask = encode_row(tok, {"messages": chat}, "chat").responses[0]
    targets = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert targets.startswith("Blue.<|im_end|>")


def _validate_data(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overnight", "validate-data", *args], capture_output=True,
                          text=True, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=60)


def test_validate_data_renders_with_chat_template_kwargs_and_refuses_a_non_mapping(tiny_model_dir, tmp_path):
    """Llama 3's template takes a date_string kwarg in place of today's date: a longer one makes every row that
    many byte tokens longer in validate-data's statistics."""
    folder = chat_model(tmp_path / "llama3", tiny_model_dir, "llama3")
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    date = "the first day of a long summer"  # 30 bytes, against the 11 of "%d %b %Y"

    def longest(*extra: str) -> int:
        result = _validate_data(str(data), "--model", str(folder), *extra)
        assert result.returncode == 0, result.stdout + result.stderr
        return int(result.stdout.split("max ")[1].split(";")[0])

    assert longest("--set", f"data.chat_template_kwargs={{date_string: {date}}}") - longest() == len(date) - 11
    refused = _validate_data(str(data), "--model", str(folder), "--set", "data.chat_template_kwargs=enable_thinking")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "config key 'data.chat_template_kwargs': expected a mapping" in refused.stderr


# -- strftime_now is pinned to the run's start -------------------------------------------------------------------

def test_a_row_tokenizes_the_same_on_two_days_when_the_date_is_pinned(tiny_model_dir, tmp_path, monkeypatch):
    import overnight.data.tokenizer as tokenizer_module

    folder = chat_model(tmp_path / "llama3", tiny_model_dir, "llama3")
    today = [datetime(2025, 3, 1, 23, 59)]

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return today[0]

    monkeypatch.setattr(tokenizer_module, "datetime", Clock)
    pinned = load_tokenizer(folder, template_now=datetime(2025, 3, 1, 22, 0))
    unpinned = load_tokenizer(folder)
    row = {"messages": CHAT}
    before = encode_row(pinned, row, "chat").responses[0], encode_row(unpinned, row, "chat").responses[0]
    assert "Today Date: 01 Mar 2025" in unpinned.decode(before[1][0])
    today[0] = datetime(2025, 3, 2, 0, 1)  # after midnight
    after = encode_row(pinned, row, "chat").responses[0], encode_row(unpinned, row, "chat").responses[0]
    assert after[0] == before[0]
    assert after[1] != before[1]  # without the pin the row changes: the test can fail


def _write_checkpoint(run_dir: Path, step: int, fingerprint: dict, commit: bool = True) -> None:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"step": step, "fingerprint": fingerprint}))
    if commit:
        (folder / "COMMIT").write_text("{}")


def test_the_runs_pinned_time_is_read_back_from_its_checkpoints_unless_it_starts_fresh(tmp_path):
    from overnight.runs.fingerprint import run_template_now

    now = lambda: datetime(2025, 3, 2, 8, 30, 15, 123)  # noqa: E731
    run = tmp_path / "run"
    assert run_template_now(None, now=now) == run_template_now(run, now=now) == datetime(2025, 3, 2, 8, 30, 15)
    _write_checkpoint(run, 2, {"chat_template_now": "2025-03-01T23:50:00"})
    _write_checkpoint(run, 4, {"chat_template_now": "2025-03-01T23:50:00"})
    _write_checkpoint(run, 6, {"chat_template_now": "2025-03-02T08:00:00"}, commit=False)  # never committed
    assert run_template_now(run, now=now) == datetime(2025, 3, 1, 23, 50)
    assert run_template_now(run, fresh=True, now=now) == datetime(2025, 3, 2, 8, 30, 15)
    older = tmp_path / "older"  # checkpoints from before the time was recorded: the run pins now
    _write_checkpoint(older, 2, {"config": {}})
    assert run_template_now(older, now=now) == datetime(2025, 3, 2, 8, 30, 15)


def test_chat_template_kwargs_are_in_the_fingerprint_and_an_older_checkpoint_without_them_resumes(tmp_path):
    from overnight.config import build_config
    from overnight.runs import fingerprint as fp

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": CHAT}) + "\n")

    def fingerprint(*sets: str) -> dict:
        return fp.compute(build_config(None, {"model.path": "org/model"}, list(sets)), train, None)

    plain, off = fingerprint(), fingerprint("data.chat_template_kwargs={enable_thinking: false}")
    assert fp.differences(plain, off) == ["data.chat_template_kwargs: {} -> {'enable_thinking': False}"]
    older = json.loads(json.dumps(plain))
    del older["config"]["data.chat_template_kwargs"]
    assert fp.differences(older, plain) == []
    assert fp.differences(older, off) == ["data.chat_template_kwargs: {} -> {'enable_thinking': False}"]


def test_a_resumed_run_renders_its_rows_with_the_time_it_started(tiny_model_dir, tmp_path):
    """Through `overnight train` (the numpy reference backend): the first launch records its start in the
    checkpoint, the resumed launch renders its validation prompts (predictions.jsonl) with that time, not its own."""
    folder = chat_model(tmp_path / "llama3", tiny_model_dir, "llama3")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # The time of day too: a resume seconds later shows which clock rendered (a date differs only at midnight).
    config["chat_template"] = LLAMA3_TEMPLATE.replace('"%d %b %Y"', '"%d %b %Y %H:%M:%S"')
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    out = tmp_path / "run"

    def train(steps: int) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "overnight", "train", "--backend", "refbackend:NumpyBackend", "--model",
             str(folder), "--data", str(DATA_DIR), "--output", str(out), "--max-steps", str(steps),
             "--batch-size", "2", "--quiet", "--auto-resume", "--set", "eval.every_steps=2",
             "--set", "checkpoint.every_steps=2", "--set", "eval.max_batches=1", "--set", "eval.predictions=1",
             "--set", "model.max_seq_length=384", "--set", "lora.rank=4"],
            capture_output=True, text=True, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    train(2)
    started = json.loads((out / "checkpoints" / "step-00000002" / "manifest.json").read_text())
    pinned = started["fingerprint"]["chat_template_now"]
    time.sleep(1.1)  # the resumed launch's own clock is at least a second later
    train(4)
    resumed = json.loads((out / "checkpoints" / "step-00000004" / "manifest.json").read_text())
    assert resumed["fingerprint"]["chat_template_now"] == pinned
    prompts = [json.loads(line)["prompt"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    shown = datetime.fromisoformat(pinned).strftime("Today Date: %d %b %Y %H:%M:%S")
    assert len(prompts) == 2 and all(shown in p for p in prompts)


def test_chat_template_kwargs_must_be_a_mapping_of_plain_values_named_by_key():
    from overnight.config import ConfigError, build_config

    def kwargs(*sets: str) -> dict:
        return build_config(None, {}, list(sets)).data.chat_template_kwargs

    assert kwargs() == {} and kwargs("data.chat_template_kwargs=") == {} and kwargs("data.chat_template_kwargs=~") == {}
    assert kwargs("data.chat_template_kwargs={enable_thinking: false, x: [1, {a: b}]}") == \
        {"enable_thinking": False, "x": [1, {"a": "b"}]}
    assert kwargs("data.chat_template_kwargs.enable_thinking=false") == {"enable_thinking": False}
    refused = {
        "data.chat_template_kwargs=enable_thinking": "expected a mapping of template variables",
        "data.chat_template_kwargs=[a]": "expected a mapping of template variables",
        "data.chat_template_kwargs={messages: []}": "'messages' is set by overnight itself",
        "data.chat_template_kwargs={1: x}": "1 is not a variable name",
        "data.chat_template_kwargs={date_string: 2024-07-26}": "'data.chat_template_kwargs.date_string': "
                                                             "datetime.date(2024, 7, 26) is not text",
    }
    for item, message in refused.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            kwargs(item)
