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

# The real templates of models that call tools (Qwen2.5-Instruct, Qwen3, Llama 3.1 Instruct), as their
# tokenizer_config.json ships them: tests/chat_templates/.
TEMPLATES = TESTS / "chat_templates"

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
    "qwen2.5-tools": {"bos": None, "eos": "<|im_end|>", "turn": "<|im_end|>", "pad": "<|endoftext|>",
                      "special": ["<|im_start|>"], "added": ["<tool_call>", "</tool_call>", "<tool_response>",
                                                             "</tool_response>"],
                      "template": (TEMPLATES / "qwen2.5.jinja").read_text(), "generation_eos": ["eos"]},
    "qwen3-tools": {"bos": None, "eos": "<|endoftext|>", "turn": "<|im_end|>", "pad": "<|endoftext|>",
                    "special": ["<|im_start|>"], "added": ["<think>", "</think>", "<tool_call>", "</tool_call>",
                                                           "<tool_response>", "</tool_response>"],
                    "template": (TEMPLATES / "qwen3.jinja").read_text(), "generation_eos": ["turn", "eos"]},
    "llama3.1-tools": {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "turn": "<|eot_id|>", "pad": None,
                       "special": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"],
                       "added": [], "template": (TEMPLATES / "llama3.1.jinja").read_text(),
                       "generation_eos": ["eos", "turn"]},
}


def chat_model(out: Path, base: Path, shape: str, turn_id: int | None = None) -> Path:
    """A model folder with ``base``'s weights and a ``shape`` tokenizer: the 256 byte symbols at ids 0-255, the
    special tokens from 256 on (the end-of-turn token at ``turn_id`` when given, swapped with what was there), the
    rest of the model's vocabulary filled with tokens that no text encodes to."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    spec = SHAPES[shape]
    size = json.loads((base / "config.json").read_text())["vocab_size"]
    named = list(dict.fromkeys([spec["eos"], spec["turn"]] + [t for t in (spec["bos"], spec["pad"]) if t]))
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

def _backend(name: str, model_dir: Path, max_seq_length: int = 256):
    """The backend on the tiny model with the defaults (4-bit, dropout on)."""
    from overnight.config import Config

    cfg = Config()
    cfg.model.path, cfg.model.max_seq_length = str(model_dir), max_seq_length
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


# -- tools (issue 30, part 2) ------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(city: str, call_id: str) -> dict:
    """A call as OpenAI's API writes it: arguments as JSON text."""
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


# Two calls in one turn and their two results (Qwen writes both results into one user turn); Llama 3.1's template
# takes one call a turn.
TOOL_CHATS = {
    "parallel": [
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("Paris", "c1"), _call("Lyon", "c2")]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "RESULT-ONE 18 C"},
        {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "RESULT-TWO 20 C"},
        {"role": "assistant", "content": "Paris 18 C, Lyon 20 C."}],
    "single": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [_call("Paris", "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "RESULT-ONE 18 C"},
        {"role": "assistant", "content": "18 C."}],
}
CALL = '{"name": "get_weather", "arguments": {"city": "%s"}}'
# What each template makes the model learn: every assistant turn, the call turns included, nothing else.
TOOL_TARGETS = {
    ("qwen2.5-tools", "parallel"): [f"<tool_call>\n{CALL % 'Paris'}\n</tool_call>\n<tool_call>\n{CALL % 'Lyon'}\n"
                                    "</tool_call><|im_end|>\n", "Paris 18 C, Lyon 20 C.<|im_end|>\n"],
    # Qwen3 writes a think block into the last answer only, so the call turn (not last) is found by its end token
    ("qwen3-tools", "parallel"): [f"<tool_call>\n{CALL % 'Paris'}\n</tool_call>\n<tool_call>\n{CALL % 'Lyon'}\n"
                                  "</tool_call><|im_end|>",
                                  "<think>\n\n</think>\n\nParis 18 C, Lyon 20 C.<|im_end|>\n"],
    ("llama3.1-tools", "single"): ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                   "18 C.<|eot_id|>"],
}


def _targets(tok, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of consecutive target tokens."""
    runs, run = [], []
    for token, m in zip(ids, mask):
        if m:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [tok.decode(r, skip_special_tokens=False) for r in runs + ([run] if run else [])]


@pytest.mark.parametrize("shape, chat", sorted(TOOL_TARGETS))
def test_tool_conversations_render_as_transformers_and_train_every_assistant_turn_but_no_tool_result(
        shape, chat, tiny_model_dir, tmp_path):
    """The real templates of Qwen2.5, Qwen3 and Llama 3.1: overnight's rendering equals transformers' given the same
    conversation with the arguments as objects (overnight takes OpenAI's JSON text too), and the loss mask covers the
    call turns and the answers, never the tool results (Qwen renders those inside a user turn)."""
    from transformers import AutoTokenizer

    folder = chat_model(tmp_path / shape, tiny_model_dir, shape)
    tok, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    messages = TOOL_CHATS[chat]
    as_objects = json.loads(json.dumps(messages))
    for message in as_objects:
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    for upto, gen in ((len(messages), False), (len(messages) - 1, True), (2, False)):
        theirs = hf.apply_chat_template(as_objects[:upto], tools=[WEATHER], tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(messages[:upto], gen, tools=[WEATHER]) == theirs
        assert tok.apply_chat_template(as_objects[:upto], gen, tools=json.dumps([WEATHER])) == theirs
    ids, mask = encode_row(tok, {"messages": messages, "tools": [WEATHER]}, "chat").responses[0]
    assert ids == tok.encode(hf.apply_chat_template(as_objects, tools=[WEATHER], tokenize=False), False)
    targets = _targets(tok, ids, mask)
    assert targets == TOOL_TARGETS[shape, chat]
    assert not any("RESULT" in t for t in targets)
    text = tok.decode(ids, skip_special_tokens=False)
    assert "RESULT-ONE 18 C" in text and "get_weather" in text.split(targets[0])[0]  # the tools are in the prompt


def test_a_template_that_drops_tools_or_calls_is_refused_at_the_data_check(tiny_model_dir, tmp_path):
    """The tiny model's template and Gemma's know no tools: a row with tools, or with tool calls, is refused before
    training (exit 2) naming the file, the line, the key, the model's template and what to do; rows without tools
    still pass. A template that renders both passes the same file."""
    from overnight.data import check_data

    data = tmp_path / "data"
    data.mkdir()
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    only_tools = {**plain, "tools": [WEATHER]}
    only_calls = {"messages": TOOL_CHATS["single"][1:3] + [{"role": "assistant", "content": "Sunny."}]}
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (plain, only_tools, only_calls)))
    result = _validate_data(str(data), "--model", str(tiny_model_dir))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if " key '" in line]
    assert len(lines) == 2
    assert lines[0].startswith(f"{data / 'train.jsonl'}:2: key 'tools': the chat template of {tiny_model_dir} "
                               "ignores 'tools'") and "use a model whose chat template renders tools" in lines[0]
    assert lines[1].startswith(f"{data / 'train.jsonl'}:3: key 'messages[1].tool_calls': the chat template of "
                               f"{tiny_model_dir} drops tool calls") and "into the assistant's 'content'" in lines[1]

    gemma = load_tokenizer(chat_model(tmp_path / "gemma", tiny_model_dir, "gemma"))
    keys = [(p.line, p.key) for p in check_data(data, "sft", tokenizer=gemma).problems]
    assert keys == [(2, "tools"), (3, "messages[1].tool_calls")]
    qwen = load_tokenizer(chat_model(tmp_path / "qwen", tiny_model_dir, "qwen2.5-tools"))
    assert check_data(data, "sft", tokenizer=qwen).ok


def test_grpo_prompts_and_preference_pairs_render_the_rows_tools(tiny_model_dir, tmp_path):
    """A GRPO prompt (a conversation ending with a user turn or a tool result, or a "prompt" row under
    grpo.chat_template) is rendered with its row's tools; so is a conversational preference pair, whose answer may be
    a call. A "prompt" row given as plain text cannot carry tools: refused by key."""
    from transformers import AutoTokenizer

    from overnight.data import DataError

    folder = chat_model(tmp_path / "qwen", tiny_model_dir, "qwen2.5-tools")
    tok, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    after_results = TOOL_CHATS["parallel"][:4]
    ids = encode_prompt(tok, {"messages": after_results, "tools": [WEATHER]}, "chat")
    listed = tok.decode(ids, skip_special_tokens=False).split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(listed) == WEATHER
    assert tok.decode(ids, skip_special_tokens=False).endswith("RESULT-TWO 20 C\n</tool_response><|im_end|>\n"
                                                                 "<|im_start|>assistant\n")
    prompt_row = {"prompt": "Weather in Paris?", "tools": [WEATHER]}
    assert tok.decode(encode_prompt(tok, prompt_row, "prompt", chat_template=True), skip_special_tokens=False) == \
        hf.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER], tokenize=False,
                               add_generation_prompt=True)
    with pytest.raises(DataError, match="plain text") as refused:
        encode_prompt(tok, prompt_row, "prompt", chat_template=False)
    assert refused.value.key == "tools"

    pair = {"prompt": after_results[:1], "tools": [WEATHER], "chosen": after_results[1:2],
            "rejected": [{"role": "assistant", "content": "I cannot know."}]}
    enc = encode_row(tok, pair, "preference")
    assert "get_weather" in tok.decode(enc.prompt, skip_special_tokens=False)
    assert [tok.decode(r, skip_special_tokens=False) for r, _ in enc.responses] == [
        TOOL_TARGETS["qwen2.5-tools", "parallel"][0], "I cannot know.<|im_end|>\n"]
    with pytest.raises(DataError, match="drops tool calls") as refused:
        encode_row(load_tokenizer(tiny_model_dir), {**pair, "tools": []}, "preference")
    assert refused.value.key == "chosen[0].tool_calls"


BACKENDS = [
    pytest.param("torch", marks=[pytest.mark.torch, pytest.mark.skipif(not has("torch", "transformers", "peft"),
                                                                         reason="needs the torch backend")]),
    pytest.param("mlx", marks=[pytest.mark.mlx, pytest.mark.skipif(not has("mlx", "mlx_lm"),
                                                                     reason="needs the mlx backend")]),
]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_training_on_tool_calls_weights_the_calls_and_answers_and_never_the_tool_results(
        backend_name, tiny_model_dir, tmp_path):
    """A real run's steps (the defaults: 4-bit, dropout on) on a batch of two tool conversations in Qwen2.5's
    template: the tokens the backend trains on are exactly those of the assistant turns, call turns included, counted
    from the template's text independently of the mask, and every token of the tool results has no loss weight."""
    from overnight.data import TrainStream

    folder = chat_model(tmp_path / "qwen", tiny_model_dir, "qwen2.5-tools")
    tok = load_tokenizer(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": TOOL_CHATS[chat], "tools": [WEATHER]}) + "\n"
                            for chat in ("parallel", "single")))
    backend, cfg = _backend(backend_name, folder, max_seq_length=1024)
    cfg.train.batch_size = 2
    batch = TrainStream(data, tok, cfg).next_batch()
    single = [f"<tool_call>\n{CALL % 'Paris'}\n</tool_call><|im_end|>\n", "18 C.<|im_end|>\n"]
    expected = sum(len(tok.encode(t, False)) for t in TOOL_TARGETS["qwen2.5-tools", "parallel"] + single)
    assert batch.num_target_tokens == expected
    results = 0
    for b in range(batch.num_rows):
        ids = [int(i) for i in batch.input_ids[b][batch.attention_mask[b] == 1]]
        for result in ("\n<tool_response>\nRESULT-ONE 18 C\n</tool_response>",
                       "\n<tool_response>\nRESULT-TWO 20 C\n</tool_response>"):
            span = tok.encode(result, False)
            at = next((k for k in range(len(ids)) if ids[k:k + len(span)] == span), None)
            if at is not None:
                results += 1
                assert not batch.loss_mask[b][at:at + len(span)].any()
    assert results == 3
    steps = [backend.train_step([batch], 1e-2) for _ in range(3)]
    assert [s.tokens for s in steps] == [expected] * 3
    assert all(np.isfinite(s.loss) for s in steps) and steps[-1].loss < steps[0].loss
