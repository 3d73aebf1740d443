"""Data pipeline: formats, refusals, tokenization, batches, and a resumable, deterministic order."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_DIR, has

from overnight.config import Config
from overnight.data import (
    DataError,
    TrainStream,
    check_data,
    eval_batches,
    find_data_files,
    load_tokenizer,
    prediction_prompts,
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def make_cfg(method="sft", batch_size=4, max_seq_length=128, seed=0, streaming=True, **data) -> Config:
    cfg = Config()
    cfg.data.method = method
    cfg.data.streaming = streaming
    cfg.train.batch_size = batch_size
    cfg.train.seed = seed
    cfg.model.max_seq_length = max_seq_length
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def write_jsonl(path: Path, rows: list, raw: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if raw else (json.dumps(row) + "\n").encode())
    return path


def targets(tok, batch, b: int) -> str:
    ids = batch.input_ids[b][batch.loss_mask[b] == 1]
    return tok.decode(ids, skip_special_tokens=False)


def real(tok, batch, b: int) -> str:
    return tok.decode(batch.input_ids[b][batch.attention_mask[b] == 1], skip_special_tokens=False)


def item_numbers(tok, batch) -> list[int]:
    """Rows written as {"text": "item N ..."}: which rows a batch holds."""
    return [int(real(tok, batch, b).split("item ")[1].split()[0]) for b in range(batch.num_rows)]


def numbered_rows(n: int, rng_seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(rng_seed)
    return [{"text": f"item {i} " + "word " * int(rng.integers(1, 30))} for i in range(n)]


# ---------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_matches_transformers(tok, tiny_model_dir):
    if not has("transformers"):
        pytest.skip("transformers not installed")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for text in ["What is 3 plus 4?", " two  spaces\n\nand <|assistant|> here", "Zürich 東京 🙂", ""]:
        assert tok.encode(text) == hf(text).input_ids
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    for gen in (False, True):
        text = tok.apply_chat_template(chat, gen)
        assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        hf_ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
        hf_ids = hf_ids if isinstance(hf_ids, list) else hf_ids["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == hf_ids


def test_add_bos_and_eos_flags_follow_transformers(tmp_path, tiny_model_dir):
    """With a tokenizer.json, transformers ignores tokenizer_config.json's add_bos_token/add_eos_token."""
    if not has("transformers"):
        pytest.skip("transformers not installed")
    from transformers import AutoTokenizer

    model = tmp_path / "flags"
    model.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        (model / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    config.update(add_bos_token=False, add_eos_token=True)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_tokenizer(model), AutoTokenizer.from_pretrained(str(model))
    assert ours.encode("a b c") == hf("a b c").input_ids
    assert ours.prefix_ids == [ours.bos_id] and ours.suffix_ids == []


def test_chat_template_generation_tags_and_missing_template(tmp_path, tiny_model_dir):
    model = tmp_path / "tagged"
    model.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        (model / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}{% endgeneration %}"
        "{% else %}U: {{ m.content }}{% endif %}\n{{ '\\n' }}{% endfor %}")
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    # trim_blocks eats the newline after a block tag, as in transformers; the '\n' expression stays
    assert load_tokenizer(model).apply_chat_template(chat) == "U: x\nA: y\n"
    (model / "chat_template.jinja").unlink()
    bare = load_tokenizer(model)
    assert not bare.has_chat_template
    with pytest.raises(DataError, match="no chat template"):
        bare.apply_chat_template(chat)
    cfg = make_cfg()
    with pytest.raises(DataError, match="chat template"):
        TrainStream(DATA_DIR / "train.jsonl", bare, cfg)
    report = check_data(DATA_DIR, "sft", tokenizer=bare, cfg=cfg)
    assert [p.line for p in report.problems] == [1, 1] and "no chat template" in str(report.problems[0])


TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools is not none %}TOOLS {{ tools | tojson }}{% else %}[no tools]{% endif %}"
    "{% if documents is not none %}DOCS {{ documents | length }}{% else %}[no documents]{% endif %}"
    "{{ image_token }}{{ audio_token }}{{ dict(kind=\"chat\") | tojson }}\n"
    "{% set ns = namespace(turns=0) %}"
    "{% for m in messages %}{% set ns.turns = ns.turns + 1 %}<|{{ m.role }}|>{{ ns.turns }}"
    "{% if m.name is defined %}({{ m.name }}){% else %}(anonymous){% endif %}"
    "{% if m.thinking is defined %}<think>{{ m.thinking }}|{{ m.reasoning_content }}</think>{% endif %}"
    "{{ m.content }}{{ eos_token }}{{ sep_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ ns.turns + 1 }}{% endif %}"
)


def test_chat_template_variables_match_transformers(tmp_path, tiny_model_dir):
    """A template that branches on tools/documents (undefined is not none!), reads a null-valued key, a
    reasoning field, extra named special tokens, namespace() and dict(): rendered exactly as transformers."""
    if not has("transformers"):
        pytest.skip("transformers not installed")
    from transformers import AutoTokenizer

    model = tmp_path / "tools"
    model.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        (model / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    config.update(chat_template=TOOLS_TEMPLATE, sep_token="<|sep|>", image_token="<|image|>",
                  extra_special_tokens={"audio_token": "<|audio|>"})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_tokenizer(model), AutoTokenizer.from_pretrained(str(model))
    assert ours.special_tokens == hf.special_tokens_map
    chats = [
        [{"role": "user", "content": "Hi", "name": None}, {"role": "assistant", "content": "Hello."}],
        [{"role": "system", "content": "Be brief.", "name": "rules"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4", "reasoning": "two and two", "tool_calls": None}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "thinking": "t",
                                             "reasoning_content": None}],
    ]
    for chat in chats:
        for gen in (False, True):
            text = ours.apply_chat_template(chat, gen)
            assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert "[no tools][no documents]<|image|><|audio|>" in text and "<|sep|>" in text
    # A training row through the same path: the answer (with its reasoning) is the target.
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": chats[1]}])
    batch = TrainStream(path, ours, make_cfg(batch_size=1, max_seq_length=1024)).next_batch()
    assert real(ours, batch, 0) == hf.apply_chat_template(chats[1], tokenize=False)
    assert targets(ours, batch, 0) == "(anonymous)<think>two and two|two and two</think>4<|eos|><|sep|>\n"
    # The same sandbox rules: namespace() refuses underscore names, as transformers' does.
    ours.chat_template_source, ours._template = "{% set ns = namespace(_x=1) %}{{ ns._x }}", None
    with pytest.raises(Exception, match="underscore"):
        ours.apply_chat_template(chats[0])
    with pytest.raises(Exception, match="underscore"):
        hf.apply_chat_template(chats[0], tokenize=False, chat_template=ours.chat_template_source)


def test_load_tokenizer_refuses_a_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="not a model folder"):
        load_tokenizer(tmp_path / "missing")


# ---------------------------------------------------------------------------
# Formats


def test_chat_loss_only_on_assistant_turns(tok, tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "2 plus 2 is 4."}, {"role": "user", "content": "And 3 plus 3?"},
            {"role": "assistant", "content": "3 plus 3 is 6."}]
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": chat}])
    batch = TrainStream(path, tok, make_cfg(batch_size=1)).next_batch()
    assert real(tok, batch, 0) == tok.apply_chat_template(chat)
    assert targets(tok, batch, 0) == "2 plus 2 is 4.<|eos|>\n3 plus 3 is 6.<|eos|>\n"
    full = TrainStream(path, tok, make_cfg(batch_size=1, mask_prompt=False)).next_batch()
    assert full.loss_mask[0].sum() == full.attention_mask[0].sum() - 1  # all but the first token


def test_prompt_completion_and_text_rows(tok, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    batch = TrainStream(path, tok, make_cfg(batch_size=1)).next_batch()
    assert real(tok, batch, 0) == "<|bos|>Q: 2+2?\nA: 4<|eos|>"
    assert targets(tok, batch, 0) == " 4<|eos|>"
    unmasked = TrainStream(path, tok, make_cfg(batch_size=1, mask_prompt=False)).next_batch()
    assert targets(tok, unmasked, 0) == "Q: 2+2?\nA: 4<|eos|>"

    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "The cat sat."}])
    batch = TrainStream(path, tok, make_cfg(batch_size=1)).next_batch()
    assert real(tok, batch, 0) == "<|bos|>The cat sat.<|eos|>"
    assert targets(tok, batch, 0) == "The cat sat.<|eos|>"


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_pairs(tok, method):
    cfg = make_cfg(method=method, batch_size=3)
    stream = TrainStream(DATA_DIR / "preference" / "train.jsonl", tok, cfg)
    batch = stream.next_batch()
    assert batch.paired and batch.num_rows == 6
    rows = [json.loads(line) for line in (DATA_DIR / "preference" / "train.jsonl").read_text().splitlines()]
    triples = {(r["prompt"], r["chosen"], r["rejected"]) for r in rows}
    for i in range(3):
        chosen, rejected = real(tok, batch, 2 * i), real(tok, batch, 2 * i + 1)
        prompt = chosen.removeprefix("<|bos|>").split("\n")[0] + "\n"
        assert rejected.startswith("<|bos|>" + prompt)
        chosen_target, rejected_target = targets(tok, batch, 2 * i), targets(tok, batch, 2 * i + 1)
        assert chosen_target.endswith("<|eos|>") and rejected_target.endswith("<|eos|>")
        assert (prompt, chosen_target[:-7], rejected_target[:-7]) in triples
    assert [len(b.input_ids) for b in batch.split(2)] == [2, 4]  # pairs stay together


def chat_pair(q: str, good: str, bad: str) -> dict:
    return {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}]}


@pytest.mark.parametrize("method", ["dpo", "reward"])
def test_conversational_preference_rows_go_through_the_chat_template(tmp_path, tok, method):
    """TRL's conversational preference rows: each side is the chat template's rendering of prompt + answer, the
    targets the answer's turn (end-of-turn included), the prompt its rendering with the generation prompt."""
    rows = [chat_pair("Capital of Quillmere?", "Ostravel.", "Hobmire."), chat_pair("2+2?", "4", "5")]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert check_data(path, method, tokenizer=tok).ok
    batch = TrainStream(path, tok, make_cfg(method=method, batch_size=2, streaming=False)).next_batch()
    assert batch.paired and batch.num_rows == 4
    seen = set()
    for b in range(4):
        row = rows[0] if "Quillmere" in real(tok, batch, b) else rows[1]
        side = "chosen" if b % 2 == 0 else "rejected"
        assert real(tok, batch, b) == tok.apply_chat_template(row["prompt"] + row[side])
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True)
        assert targets(tok, batch, b) == real(tok, batch, b)[len(prompt):]
        seen.add((id(row), side))
    assert len(seen) == 4
    shown = prediction_prompts(path, tok, make_cfg(method=method), 1)
    assert shown[0][0] == tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True)


@pytest.mark.parametrize("row, key, says", [
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": [{"role": "assistant",
                                                                              "content": "b"}]},
     "chosen", "is a str while another"),
    (dict(chat_pair("q", "a", "b"), prompt=[{"role": "assistant", "content": "q"}]), "prompt",
     "ends with a assistant turn"),
    (dict(chat_pair("q", "a", "b"), rejected=[{"role": "user", "content": "b"}]), "rejected", "holds a user message"),
    (dict(chat_pair("q", "a", "b"), chosen=[{"role": "assistant", "content": 3}]), "chosen[0].content",
     "must be a string"),
    (dict(chat_pair("q", "a", "b"), chosen=[]), "chosen", "non-empty list"),
])
def test_conversational_preference_rows_are_refused_by_key(tmp_path, tok, row, key, says):
    path = write_jsonl(tmp_path / "train.jsonl", [chat_pair("q", "a", "b"), row])
    report = check_data(path, "dpo", tokenizer=tok)
    assert not report.ok
    [problem] = report.problems
    assert (problem.line, problem.key) == (2, key) and says in problem.message, problem


def test_bundled_data_is_small_and_valid(tok):
    total = sum(p.stat().st_size for p in DATA_DIR.rglob("*") if p.is_file())
    assert total < 1_000_000
    for path, method in [(DATA_DIR, "sft"), (DATA_DIR / "preference", "dpo"), (DATA_DIR / "text", "cpt")]:
        report = check_data(path, method, tokenizer=tok)
        assert report.ok, report.problems
        assert report.train.rows >= 200 and report.val is not None and report.val.rows >= 30


def test_sample_data_script_reproduces_the_files(tmp_path):
    script = (DATA_DIR / "make_sample_data.py").read_text()
    copy = tmp_path / "make_sample_data.py"
    copy.write_text(script)
    subprocess.run([sys.executable, str(copy)], check=True)
    from overnight.models.tiny import SAMPLE_FILES  # the files this script owns (data/demo/ has its own script)

    for name in SAMPLE_FILES:
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_rlhf_data_script_reproduces_the_files_and_they_are_valid(tmp_path, tok):
    """data/rlhf: the walkthrough's reward-model pairs and grpo prompts, regenerated byte for byte; each file passes
    the data check of the method that reads it; the chosen answer is the demo's own answer to the question."""
    subprocess.run([sys.executable, str(DATA_DIR / "rlhf" / "make_rlhf_data.py"), str(tmp_path)], check=True)
    for name in ("preference/train.jsonl", "preference/val.jsonl", "grpo/train.jsonl", "grpo/val.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / "rlhf" / name).read_bytes(), name
    for folder, method in (("preference", "reward"), ("grpo", "grpo")):
        report = check_data(DATA_DIR / "rlhf" / folder, method, tokenizer=tok)
        assert report.ok and report.val is not None, report.problems
    demo = {}
    for line in (DATA_DIR / "demo" / "train.jsonl").read_text().splitlines():
        q, a = json.loads(line)["messages"]
        demo[q["content"]] = a["content"]
    pairs = [json.loads(line) for line in (DATA_DIR / "rlhf" / "preference" / "train.jsonl").read_text().splitlines()]
    for row in pairs:
        assert row["chosen"][0]["content"] == demo[row["prompt"][0]["content"]]
        assert row["rejected"][0]["content"] != row["chosen"][0]["content"]


# ---------------------------------------------------------------------------
# Files and refusals


def test_find_data_files(tmp_path):
    write_jsonl(tmp_path / "a" / "train.jsonl", [{"text": "x"}])
    assert find_data_files(tmp_path / "a") == (tmp_path / "a" / "train.jsonl", None)
    write_jsonl(tmp_path / "a" / "valid.jsonl", [{"text": "x"}])
    assert find_data_files(tmp_path / "a")[1] == tmp_path / "a" / "valid.jsonl"
    write_jsonl(tmp_path / "a" / "val.jsonl", [{"text": "x"}])
    assert find_data_files(tmp_path / "a")[1] == tmp_path / "a" / "val.jsonl"
    assert find_data_files(tmp_path / "a" / "val.jsonl") == (tmp_path / "a" / "val.jsonl", None)
    write_jsonl(tmp_path / "b" / "training.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"missing train.jsonl \(found: training.jsonl\)"):
        find_data_files(tmp_path / "b")
    with pytest.raises(DataError, match="no such file or folder"):
        find_data_files(tmp_path / "nope")
    with pytest.raises(DataError, match="missing train.jsonl"):
        check_data(tmp_path / "b", "sft")
    (tmp_path / "c" / "train.jsonl").mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(DataError, match=r"c/train.jsonl: is not a file"):
        find_data_files(tmp_path / "c")
    with pytest.raises(DataError, match="is neither a file nor a folder"):  # e.g. --data /dev/null
        find_data_files(Path("/dev/null"))


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _tool_row(tools=TOOLS, call=None, result=None) -> bytes:
    """One chat row with a tool call and its result (as OpenAI writes them), with one piece replaced."""
    call = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}] \
        if call is None else call
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": call},
                result or {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18 C, sunny"},
                {"role": "assistant", "content": "It is 18 C and sunny."}]
    return (json.dumps({"tools": tools, "messages": messages}) + "\n").encode()


TOOL_ROW = _tool_row()

REFUSALS = [
    # (lines, method, expected line, expected key, words in the message)
    ([b'{"text": "ok"}\n', b'{"text": "a",}\n'], "sft", 2, None, "not valid JSON"),
    ([b'{"text": "ok"}\n', b'{"text": "caf\xe9"}\n'], "sft", 2, None, "invalid UTF-8"),
    ([b'{"text": "ok"}\n', b'{"question": "a", "answer": "b"}\n'], "sft", 2, None, "none of the keys"),
    ([b'{"prompt": "a", "chosen": "b"}\n'], "dpo", 1, "rejected", "missing"),
    ([b'{"text": "ok"}\n'], "dpo", 1, "text", "cannot train on"),
    ([b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'], "cpt",
     1, "messages", "cannot train on"),
    ([b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'], "sft", 1, "rejected", "cannot train on"),
    ([b'{"text": "ok"}\n', b'{"prompt": "a", "completion": "b"}\n'], "sft", 2, "completion", "file is in text"),
    ([b'{"text": "odd one"}\n'] + [b'{"prompt": "a", "completion": "b"}\n'] * 2, "sft", 1, "text",
     "file is in completion format"),
    ([b'{"text": "x"}\n'] * 2 + [b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'], "dpo", 1, "text",
     "file is in preference format"),
    ([b'{"messages": [{"role": "human", "content": "a"}]}\n'], "sft", 1, "messages[0].role", "ShareGPT"),
    ([b'{"messages": [{"role": "user", "content": "a"}]}\n'], "sft", 1, "messages", "no assistant"),
    ([b'{"text": ["a"]}\n'], "sft", 1, "text", "must be a string"),
    ([b'{"prompt": "a", "completion": "  "}\n'], "sft", 1, "completion", "is empty"),
    ([b'["text", "a"]\n'], "sft", 1, None, "not an object"),
    # conversations with tools (a good row first: the bad one is named by its own line)
    ([TOOL_ROW, _tool_row(tools={"name": "get_weather"})], "sft", 2, "tools", "must be a list"),
    ([_tool_row(tools='[{"name": "get_weather"')], "sft", 1, "tools", "not valid JSON"),
    ([_tool_row(tools=[{"type": "function", "function": {"description": "no name"}}])], "sft", 1,
     "tools[0].function.name", "names its function"),
    ([_tool_row(call={"type": "function", "function": {"name": "get_weather", "arguments": {}}})], "sft", 1,
     "messages[1].tool_calls", "must be a list"),
    ([_tool_row(call=[{"type": "function", "function": {"arguments": {"city": "Paris"}}}])], "sft", 1,
     "messages[1].tool_calls[0].function.name", "names the function"),
    ([_tool_row(call=[{"name": "get_weather", "arguments": "city=Paris"}])], "sft", 1,
     "messages[1].tool_calls[0].arguments", "not a JSON object"),
    ([_tool_row(call=[{"name": "get_weather", "arguments": '["Paris"]'}])], "sft", 1,
     "messages[1].tool_calls[0].arguments", "not a JSON object"),
    ([_tool_row(call=[{"name": "get_weather", "arguments": ["Paris"]}])], "sft", 1,
     "messages[1].tool_calls[0].arguments", "must be an object"),
    ([_tool_row(call=[{"type": "function", "function": {"name": "get_weather"}}])], "sft", 1,
     "messages[1].tool_calls[0].function.arguments", "{} for none"),
    ([_tool_row(result={"role": "tool", "name": "get_weather"})], "sft", 1, "messages[2].content",
     "holds the tool's result"),
    ([_tool_row(result={"role": "tool", "content": {"temp": 18}})], "sft", 1, "messages[2].content",
     "JSON text"),
    ([_tool_row(result={"role": "user", "content": "x", "tool_calls": [{"name": "f", "arguments": {}}]})], "sft",
     1, "messages[2].tool_calls", "only the assistant calls tools"),
    ([b'{"prompt": "Weather?", "completion": " Sunny.", "tools": [{"name": "get_weather"}]}\n'], "sft", 1,
     "tools", "not rendered by the chat template"),
]


@pytest.mark.parametrize("lines,method,line,key,words", REFUSALS)
def test_refusals_name_file_line_key_and_hint(tmp_path, lines, method, line, key, words):
    path = write_jsonl(tmp_path / "d" / "train.jsonl", lines, raw=True)
    report = check_data(tmp_path / "d", method)
    assert not report.ok
    problem = report.problems[0]
    assert (problem.file, problem.line, problem.key) == (path, line, key)
    assert words in problem.message + problem.hint and problem.hint
    with pytest.raises(DataError) as err:
        report.raise_if_problems()
    assert f"{path}:{line}:" in str(err.value) and "nothing was trained or written" in str(err.value)
    if key:
        assert f"key '{key}'" in str(err.value)


def test_tool_rows_in_every_shape_transformers_takes_pass_the_row_check(tmp_path):
    """OpenAI's wire form (arguments as JSON text, content null, ids), transformers' (arguments an object, no
    content), a bare {"name", "arguments"} call, tools as a JSON string (as parquet stores them), an empty calls list,
    a grpo prompt ending with a tool result, and a conversational preference pair whose answer is a call."""
    bare = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    rows = [TOOL_ROW, _tool_row(call=bare), _tool_row(tools=json.dumps(TOOLS)), _tool_row(tools=[]),
            json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello", "tool_calls": []}]}).encode() + b"\n"]
    write_jsonl(tmp_path / "sft" / "train.jsonl", rows, raw=True)
    assert check_data(tmp_path / "sft", "sft").ok
    prompt = json.loads(TOOL_ROW)["messages"][:3]
    write_jsonl(tmp_path / "grpo" / "train.jsonl", [{"messages": prompt, "tools": TOOLS}])
    assert check_data(tmp_path / "grpo", "grpo").ok
    pair = {"prompt": prompt[:1], "tools": TOOLS, "chosen": prompt[1:2],
            "rejected": [{"role": "assistant", "content": "I cannot know."}]}
    write_jsonl(tmp_path / "dpo" / "train.jsonl", [pair])
    assert check_data(tmp_path / "dpo", "dpo").ok
    write_jsonl(tmp_path / "dpo2" / "train.jsonl", [{**pair, "chosen": [{"role": "assistant", "content": ""}]}])
    assert [p.key for p in check_data(tmp_path / "dpo2", "dpo").problems] == ["chosen"]  # empty, no call either


def test_empty_files_and_blank_lines(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [b"\n", b"   \n"], raw=True)
    report = check_data(tmp_path / "d", "sft")
    assert [str(p) for p in report.problems] == [
        f"{tmp_path / 'd' / 'train.jsonl'}: is empty (no rows) -> add one JSON object per line; method sft needs "
        "chat rows ('messages') or completion rows ('prompt', 'completion') or text rows ('text')"]
    write_jsonl(tmp_path / "d" / "train.jsonl", [b'\xef\xbb\xbf{"text": "a"}\n', b"\n", b'{"text": "b"}'], raw=True)
    write_jsonl(tmp_path / "d" / "val.jsonl", [], raw=True)
    report = check_data(tmp_path / "d", "sft")
    assert report.train.rows == 2 and report.train.blank_lines == 1
    assert [(p.file.name, p.line) for p in report.problems] == [("val.jsonl", None)]
    write_jsonl(tmp_path / "d" / "val.jsonl", [{"text": "a"}])
    assert check_data(tmp_path / "d", "sft").ok


def test_problem_list_is_capped_in_the_error(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [b"oops\n"] * 30, raw=True)
    report = check_data(tmp_path / "d", "sft")
    assert report.problem_count == 30
    with pytest.raises(DataError) as err:
        report.raise_if_problems()
    text = str(err.value)
    assert text.count("not valid JSON") == 20 and "and 10 more" in text and "validate-data" in text


def test_packing_is_refused_for_preference_methods(tok):
    cfg = make_cfg(method="dpo", packing=True)
    report = check_data(DATA_DIR / "preference", "dpo", cfg=cfg)
    assert "data.packing cannot be used with method dpo" in str(report.problems[0])
    with pytest.raises(DataError, match="data.packing"):
        TrainStream(DATA_DIR / "preference" / "train.jsonl", tok, cfg)


def test_stream_refuses_a_bad_line_with_file_and_line(tok, tmp_path):
    """Without check_data first, a bad row still stops with file:line, never a traceback."""
    lines = [b'{"text": "a b c"}\n'] * 5 + [b'{"text": 3}\n', b"\n", b"{broken\n"]
    path = write_jsonl(tmp_path / "train.jsonl", lines, raw=True)
    for streaming in (True, False):
        with pytest.raises(DataError, match=r"train.jsonl:(6|8):"):
            stream = TrainStream(path, tok, make_cfg(batch_size=2, streaming=streaming))
            for _ in range(4):
                stream.next_batch()
    with pytest.raises(DataError, match="cannot train on"):
        TrainStream(path, tok, make_cfg(method="dpo"))


# ---------------------------------------------------------------------------
# Too-long rows


def test_too_long_rows_truncated_or_dropped_and_counted(tok, tmp_path):
    rows = [{"text": "short one"}] * 6 + [{"text": "long " * 80}] * 2
    d = tmp_path / "d"
    write_jsonl(d / "train.jsonl", rows)
    cfg = make_cfg(batch_size=8, max_seq_length=32)
    report = check_data(d, "sft", tokenizer=tok, cfg=cfg)
    assert report.ok and report.train.too_long == 2
    assert report.warnings() == [f"{d / 'train.jsonl'}: 2 of 8 rows are longer than max_seq_length=32 tokens "
                                 "and will be truncated to fit"]
    batch = TrainStream(d / "train.jsonl", tok, cfg).next_batch()
    assert batch.num_rows == 8 and batch.input_ids.shape[1] == 32
    assert batch.attention_mask.sum(1).max() == 32

    cfg = make_cfg(batch_size=8, max_seq_length=32, truncate=False)
    assert "will be dropped" in check_data(d, "sft", tokenizer=tok, cfg=cfg).warnings()[0]
    stream = TrainStream(d / "train.jsonl", tok, cfg)
    batch = stream.next_batch()
    assert batch.num_rows == 6 and stream.dropped == 2
    write_jsonl(d / "all_long.jsonl", rows[6:])
    with pytest.raises(DataError, match="every row is longer than max_seq_length=32"):
        TrainStream(d / "all_long.jsonl", tok, cfg).next_batch()
    report = check_data(d / "all_long.jsonl", "sft", tokenizer=tok, cfg=cfg)
    assert "every row is longer than max_seq_length=32" in str(report.problems[0])
    cfg = make_cfg(batch_size=8, max_seq_length=32, method="cpt")
    assert check_data(d, "cpt", tokenizer=tok, cfg=cfg).warnings() == []  # packing cuts documents anyway


def chat_row(system_words: int, answer: str = "ok") -> dict:
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": answer}]
    if system_words:
        messages.insert(0, {"role": "system", "content": "rule " * system_words})
    return {"messages": messages}


def test_rows_with_no_target_within_max_seq_length_are_refused_when_all(tok, tmp_path):
    """With data.mask_prompt the bundled conversations' answers start after token 13: a max_seq_length
    of 8 leaves no row anything to learn. Refused up front, naming file, line, length and the fixes."""
    cfg = make_cfg(max_seq_length=8)
    report = check_data(DATA_DIR, "sft", tokenizer=tok, cfg=cfg)
    assert not report.ok and report.train.no_targets == report.train.rows == 400
    problem = str(report.problems[0])
    assert problem.startswith(f"{DATA_DIR / 'train.jsonl'}:1: no row has a target token within "
                              "model.max_seq_length=8 (data.mask_prompt=true), so training would learn nothing")
    needed = max(len(tok.encode(tok.apply_chat_template(json.loads(line)["messages"][:-1], True),
                                add_special_tokens=False))
                 for line in (DATA_DIR / "train.jsonl").read_text().splitlines()) + 1
    assert f"raise model.max_seq_length to at least {needed} or set data.mask_prompt=false" in problem
    with pytest.raises(DataError, match="train.jsonl:1: no row has a target token"):
        report.raise_if_problems()
    assert check_data(DATA_DIR, "sft", tokenizer=tok, cfg=make_cfg(max_seq_length=8, mask_prompt=False)).ok
    assert check_data(DATA_DIR, "sft", tokenizer=tok, cfg=make_cfg(max_seq_length=needed)).train.no_targets == 0
    # Without the check, training still never makes a step with no target: it says what is wrong.
    with pytest.raises(DataError, match="no row has a target token within model.max_seq_length=8"):
        TrainStream(DATA_DIR / "train.jsonl", tok, cfg).next_batch()


def test_a_few_rows_with_no_target_warn_and_are_left_out_of_training(tok, tmp_path):
    rows = [chat_row(0, f"answer {i}") for i in range(6)] + [chat_row(60, "lost 1"), chat_row(60, "lost 2")]
    path = write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    cfg = make_cfg(batch_size=8, max_seq_length=32)
    report = check_data(path.parent, "sft", tokenizer=tok, cfg=cfg)
    assert report.ok and (report.train.no_targets, report.train.no_target_line) == (2, 7)
    assert report.warnings()[-1].startswith(f"{path}: 2 of 8 rows (e.g. line 7) have no target token within "
                                            "max_seq_length=32 and are left out")
    assert "data.mask_prompt=false" in report.warnings()[-1]
    stream = TrainStream(path, tok, cfg)
    batch = stream.next_batch()
    assert batch.num_rows == 6 and stream.no_targets == 2 and (batch.loss_mask.sum(1) > 0).all()
    assert not any("lost" in real(tok, batch, b) for b in range(batch.num_rows))
    kept = eval_batches(path, tok, cfg, max_batches=1, batch_size=8)
    assert [b.num_rows for b in kept] == [6] and (kept[0].loss_mask.sum(1) > 0).all()
    # More than half of the rows with nothing to learn: refused, counts in the message.
    path = write_jsonl(tmp_path / "e" / "train.jsonl", rows[:3] + [chat_row(60)] * 4)
    report = check_data(path.parent, "sft", tokenizer=tok, cfg=cfg)
    assert not report.ok and str(report.problems[0]).startswith(
        f"{path}:4: 4 of 7 rows (more than half) have no target token within model.max_seq_length=32")


@pytest.mark.parametrize("method,path", [("sft", "val.jsonl"), ("dpo", "preference/train.jsonl"),
                                         ("cpt", "text/train.jsonl")])
def test_a_max_seq_length_of_one_leaves_nothing_to_learn(tok, method, path):
    report = check_data(DATA_DIR / path, method, tokenizer=tok, cfg=make_cfg(method=method, max_seq_length=1))
    assert not report.ok and "model.max_seq_length" in str(report.problems[0])
    if method != "cpt":
        assert "no row has a target token" in str(report.problems[0])


def test_long_prompt_is_cut_from_the_left_keeping_bos_and_response(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl",
                       [{"prompt": "filler " * 60 + "END?", "chosen": "yes", "rejected": "no way"}])
    batch = TrainStream(path, tok, make_cfg(method="dpo", batch_size=1, max_seq_length=24)).next_batch()
    for b, answer in ((0, "yes"), (1, "no way")):
        assert real(tok, batch, b).startswith("<|bos|>") and real(tok, batch, b).endswith("END?" + answer + "<|eos|>")
        assert targets(tok, batch, b) == answer + "<|eos|>"
        assert batch.attention_mask[b].sum() <= 24


# ---------------------------------------------------------------------------
# Batches and order


def test_padding_masks_and_bucketing(tok, tmp_path):
    rows = [{"text": "item %d " % i + ("x" if i % 2 else "long words " * 12)} for i in range(64)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    stream = TrainStream(path, tok, make_cfg(batch_size=4))
    for _ in range(16):
        batch = stream.next_batch()
        width = batch.input_ids.shape[1]
        lengths = batch.attention_mask.sum(1)
        assert width % 8 == 0 and width - 8 < lengths.max() <= width
        assert batch.input_ids.dtype == np.int32 and batch.loss_mask.dtype == np.float32
        assert (batch.loss_mask[:, 0] == 0).all()
        assert (batch.input_ids[batch.attention_mask == 0] == tok.pad_id).all()
        assert (batch.loss_mask[batch.attention_mask == 0] == 0).all()
        parity = {n % 2 for n in item_numbers(tok, batch)}
        assert len(parity) == 1  # a whole window fits here, so short and long rows never share a batch


def test_every_sample_once_per_epoch_and_epochs_differ(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", numbered_rows(150))
    stream = TrainStream(path, tok, make_cfg(batch_size=4))
    assert stream.samples_per_epoch == 150
    epochs: list[list[int]] = [[], []]
    while True:
        numbers = item_numbers(tok, stream.next_batch())
        if stream.epoch == 2:  # `epoch` is the epoch of the batch just served
            break
        epochs[stream.epoch] += numbers
    assert sorted(epochs[0]) == list(range(150)) and sorted(epochs[1]) == list(range(150))
    assert epochs[0] != epochs[1]
    other = TrainStream(path, tok, make_cfg(batch_size=4, seed=1))
    assert [n for _ in range(10) for n in item_numbers(tok, other.next_batch())] != epochs[0][:40]


def batches_equal(a, b) -> bool:
    return (a.paired == b.paired and np.array_equal(a.input_ids, b.input_ids)
            and np.array_equal(a.loss_mask, b.loss_mask) and np.array_equal(a.attention_mask, b.attention_mask))


CASES = {
    "sft-rows": ("sft", "train.jsonl", {}),
    "dpo-pairs": ("dpo", "preference/train.jsonl", {}),
    "cpt-packed": ("cpt", "text/train.jsonl", {}),
    "sft-packed": ("sft", "train.jsonl", {"packing": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_resume_sees_the_same_batches(tok, case):
    method, rel, extra = CASES[case]
    cfg = make_cfg(method=method, batch_size=16, max_seq_length=64, **extra)
    path = DATA_DIR / rel
    reference = TrainStream(path, tok, cfg)
    expected = [reference.next_batch() for _ in range(70)]  # spans epoch boundaries for every case
    assert reference.epoch >= 1
    for k in (0, 1, 13, 29, 55):
        first = TrainStream(path, tok, cfg)
        for _ in range(k):
            first.next_batch()
        state = json.loads(json.dumps(first.state()))
        resumed = TrainStream(path, tok, make_cfg(method=method, batch_size=16, max_seq_length=64,
                                                  streaming=False, **extra))
        resumed.restore(state)
        assert resumed.epoch == first.epoch
        for j in range(k, min(k + 12, len(expected))):
            assert batches_equal(resumed.next_batch(), expected[j]), (case, k, j)


def test_streaming_equals_non_streaming(tok):
    for method, rel, extra in CASES.values():
        cfgs = [make_cfg(method=method, batch_size=8, max_seq_length=48, streaming=s, **extra) for s in (True, False)]
        a, b = (TrainStream(DATA_DIR / rel, tok, c) for c in cfgs)
        assert a.source.rows is None and b.source.rows is not None
        for _ in range(40):
            assert batches_equal(a.next_batch(), b.next_batch())


def test_restore_refuses_a_state_from_other_data_or_batch_size(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", numbered_rows(20))
    state = TrainStream(path, tok, make_cfg(batch_size=4)).state()
    with pytest.raises(DataError, match="batch_size 4 -> 2"):
        TrainStream(path, tok, make_cfg(batch_size=2)).restore(state)
    write_jsonl(tmp_path / "train.jsonl", numbered_rows(21))
    with pytest.raises(DataError, match="samples_per_epoch 20 -> 21"):
        TrainStream(path, tok, make_cfg(batch_size=4)).restore(state)


def test_a_file_edited_under_a_streaming_run_is_named_as_changed(tok, tmp_path):
    """Rewritten in place while streamed: once "not valid JSON" on a line that no longer existed."""
    path = write_jsonl(tmp_path / "train.jsonl", numbered_rows(40))
    stream = TrainStream(path, tok, make_cfg(batch_size=4))
    stream.next_batch()
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 3] + b"\n")  # truncated mid-row, same file
    with pytest.raises(DataError, match="the file changed while the run was using it") as err:
        for _ in range(10):
            stream.next_batch()
    assert "not valid JSON" not in str(err.value) and "--auto-resume" in str(err.value)
    stream.close()


def test_a_file_replaced_by_a_rename_keeps_serving_the_rows_that_were_indexed(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", numbered_rows(40))
    straight = TrainStream(path, tok, make_cfg(batch_size=4, streaming=False))
    stream = TrainStream(path, tok, make_cfg(batch_size=4))
    write_jsonl(tmp_path / "new.jsonl", numbered_rows(3, rng_seed=1)).replace(path)
    for _ in range(12):
        assert batches_equal(stream.next_batch(), straight.next_batch())
    stream.close()


@pytest.mark.parametrize("streaming", [True, False])
def test_a_file_changed_after_the_data_check_is_refused_when_read(tok, tmp_path, streaming):
    """Between the check and the reading (a model that takes minutes to load): the rows read are not the ones
    checked, whichever way they are read."""
    d = tmp_path / "d"
    write_jsonl(d / "train.jsonl", numbered_rows(20))
    write_jsonl(d / "val.jsonl", numbered_rows(8))
    cfg = make_cfg(streaming=streaming)
    assert check_data(d, "sft", tokenizer=tok, cfg=cfg).ok
    write_jsonl(d / "val.jsonl", numbered_rows(9))
    with pytest.raises(DataError, match=r"val.jsonl: the file changed while the run was using it \(when it was "
                                        r"checked: [\d,]+ bytes"):
        eval_batches(d / "val.jsonl", tok, cfg, 2, 4)
    TrainStream(d / "train.jsonl", tok, cfg).close()  # unchanged: fine


def test_packing_blocks(tok):
    cfg = make_cfg(method="cpt", batch_size=4, max_seq_length=40)
    stream = TrainStream(DATA_DIR / "text" / "train.jsonl", tok, cfg)
    batch = stream.next_batch()
    assert batch.input_ids.shape == (4, 40) and batch.attention_mask.all()
    text = tok.decode(batch.input_ids.reshape(-1), skip_special_tokens=False)
    assert "<|eos|><|bos|>" in text  # documents joined, each ending with EOS
    first_epoch_tokens = 0
    while stream.epoch == 0:
        first_epoch_tokens += int(stream.next_batch().attention_mask.sum())
    docs = [json.loads(line)["text"] for line in (DATA_DIR / "text" / "train.jsonl").read_text().splitlines()]
    assert first_epoch_tokens + 4 * 40 == sum(len(tok.encode(d)) + 1 for d in docs)


def test_a_packed_scrap_with_nothing_to_predict_is_skipped(tok, tmp_path):
    """A document cut so that its last block is one token (its EOS): alone in a batch, that would be a
    step with no target at all. It is skipped in training and in validation."""
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "one two three four five"}])
    length = len(tok.encode("one two three four five")) + 1  # BOS ... EOS
    cfg = make_cfg(method="cpt", batch_size=1, max_seq_length=length - 1)
    stream = TrainStream(path, tok, cfg)
    batches = [stream.next_batch() for _ in range(4)]
    assert all(b.num_target_tokens > 0 for b in batches) and stream.epoch == 3
    assert all(b.attention_mask.sum() == length - 1 for b in batches)  # the same full block, epoch after epoch
    assert [b.num_rows for b in eval_batches(path, tok, cfg, 5, 1)] == [1]
    with pytest.raises(DataError, match="max_seq_length=1 leaves packed blocks no token to predict"):
        TrainStream(path, tok, make_cfg(method="cpt", max_seq_length=1))


# ---------------------------------------------------------------------------
# Validation batches and prompts


def test_eval_batches_are_a_fixed_subset(tok):
    cfg = make_cfg(batch_size=4)
    a = eval_batches(DATA_DIR / "val.jsonl", tok, cfg, max_batches=3, batch_size=5)
    b = eval_batches(DATA_DIR / "val.jsonl", tok, cfg, max_batches=3, batch_size=5)
    assert len(a) == 3 and all(x.num_rows == 5 for x in a)
    assert all(batches_equal(x, y) for x, y in zip(a, b))
    c = eval_batches(DATA_DIR / "val.jsonl", tok, make_cfg(seed=7), max_batches=3, batch_size=5)
    assert not all(batches_equal(x, y) for x, y in zip(a, c))
    everything = eval_batches(DATA_DIR / "val.jsonl", tok, cfg, max_batches=100, batch_size=8)
    assert sum(x.num_rows for x in everything) == 48
    pairs = eval_batches(DATA_DIR / "preference" / "val.jsonl", tok, make_cfg(method="dpo"), 2, 4)
    assert [x.num_rows for x in pairs] == [8, 8] and pairs[0].paired
    packed = eval_batches(DATA_DIR / "text" / "val.jsonl", tok, make_cfg(method="cpt", max_seq_length=32), 2, 4)
    assert [x.input_ids.shape for x in packed] == [(4, 32), (4, 32)]


def test_prediction_prompts(tok):
    cfg = make_cfg()
    chat = prediction_prompts(DATA_DIR / "val.jsonl", tok, cfg, 3)
    first = json.loads((DATA_DIR / "val.jsonl").read_text().splitlines()[0])["messages"]
    assert len(chat) == 3 and chat[0][0] == tok.apply_chat_template(first[:-1], add_generation_prompt=True)
    assert chat[0][0].endswith("<|assistant|>\n") and chat[0][1].dtype == np.int32
    assert tok.decode(chat[0][1], skip_special_tokens=False) == chat[0][0]
    pref = prediction_prompts(DATA_DIR / "preference" / "val.jsonl", tok, make_cfg(method="dpo"), 2)
    assert pref[0][0].startswith("What is") and pref[0][1][0] == tok.bos_id
    text = prediction_prompts(DATA_DIR / "text" / "val.jsonl", tok, make_cfg(method="cpt"), 1)
    full = json.loads((DATA_DIR / "text" / "val.jsonl").read_text().splitlines()[0])["text"]
    assert full.startswith(text[0][0]) and 0 < len(text[0][0]) <= len(full) // 2 + 1
    assert prediction_prompts(DATA_DIR / "val.jsonl", tok, cfg, 0) == []


def custom_template_model(tmp_path, tiny_model_dir, template: str) -> Path:
    model = tmp_path / "custom"
    model.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        (model / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_a_template_that_refuses_a_prediction_prompt_skips_that_prompt(tmp_path, tiny_model_dir):
    # Valid for training (the whole conversation renders), but its prompt (no turn before the answer)
    # is refused by the template: predictions are non-critical, so that row just gives no prompt.
    template = ("{% if messages | length == 0 %}{{ raise_exception('empty conversation') }}{% endif %}"
                "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = load_tokenizer(custom_template_model(tmp_path, tiny_model_dir, template))
    rows = [{"messages": [{"role": "assistant", "content": "I speak first."}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    path = write_jsonl(tmp_path / "d" / "val.jsonl", rows)
    assert check_data(write_jsonl(tmp_path / "d" / "train.jsonl", rows).parent, "sft", tokenizer=tok).ok
    assert [text for text, _ in prediction_prompts(path, tok, make_cfg(), 2)] == ["<|user|>Hi<|eos|><|assistant|>"]


def test_a_broken_chat_template_is_a_data_error_naming_the_model(tmp_path, tiny_model_dir):
    tok = load_tokenizer(custom_template_model(tmp_path, tiny_model_dir, "{% for m in messages %}{{ m.content }"))
    report = check_data(DATA_DIR, "sft", tokenizer=tok)
    assert not report.ok and "the chat template is not valid Jinja" in str(report.problems[0])
    assert str(report.problems[0]).startswith(f"{DATA_DIR / 'train.jsonl'}:1:")
    with pytest.raises(DataError, match=f"{tok.model_dir}: the chat template is not valid Jinja"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_core_data_modules_import_no_ml_framework():
    code = ("import sys, overnight.data, overnight.commands.validate_data, overnight.models.tiny; "
            "bad = [m for m in ('torch', 'mlx', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
