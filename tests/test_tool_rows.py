"""Tool-calling chat rows (`tools`, `tool_calls`, role "tool") as a user's dataset has them, on the real templates of
Qwen2.5, Qwen3 and Llama 3.1 (tests/chat_templates/): which tokens train is checked against the README's rule
(every assistant turn through its end-of-turn token, call turns included; never a system, user or tool-result token)
read off the rendered text independently of tokenizer._assistant_spans, over conversation shapes beyond
tests/test_chat_models.py's; an assistant text the template would drop is refused by key; and a row tokenizes the
same in another process (a resumed run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from conftest import ROOT
from overnight.data.tokenizer import encode_row, load_tokenizer
from test_chat_models import WEATHER, _call, _targets, chat_model

TESTS = Path(__file__).resolve().parent
END = {"qwen2.5-tools": "<|im_end|>", "qwen3-tools": "<|im_end|>", "llama3.1-tools": "<|eot_id|>"}

RESULT_ONE = {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "RESULT-ONE 18 C"}
RESULT_TWO = {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "RESULT-TWO 20 C"}
CONVERSATIONS = {
    # a call turn that also says something (Qwen writes both; Llama 3.1's template drops the text: refused below)
    "text_and_call": [{"role": "user", "content": "USER-A Weather in Paris?"},
                      {"role": "assistant", "content": "Let me check.", "tool_calls": [_call("Paris", "c1")]},
                      RESULT_ONE, {"role": "assistant", "content": "It is 18 C."}],
    "two_rounds": [{"role": "user", "content": "USER-A Paris, then Lyon?"},
                   {"role": "assistant", "tool_calls": [_call("Paris", "c1")]}, RESULT_ONE,
                   {"role": "assistant", "content": None, "tool_calls": [_call("Lyon", "c2")]}, RESULT_TWO,
                   {"role": "assistant", "content": "Paris 18 C, Lyon 20 C."}],
    "multi_turn": [{"role": "system", "content": "SYSTEM-A Be brief."}, {"role": "user", "content": "USER-A Hi"},
                   {"role": "assistant", "content": "Hello friend."},
                   {"role": "user", "content": "USER-B Weather in Paris?"},
                   {"role": "assistant", "content": "", "tool_calls": [_call("Paris", "c1")]}, RESULT_ONE,
                   {"role": "assistant", "content": "It is 18 C."}],
}
CASES = [(shape, chat) for shape in END for chat in CONVERSATIONS
         if (shape, chat) != ("llama3.1-tools", "text_and_call")]


@pytest.fixture(scope="module")
def folders(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tool-models")
    return {shape: chat_model(root / shape, tiny_model_dir, shape) for shape in END}


def _expected_turn(shape: str, message: dict) -> list[str]:
    """What an assistant turn must show in its trained tokens: its text and each call's function and argument."""
    parts = [message["content"]] if message.get("content") else []
    for call in message.get("tool_calls") or []:
        parts += [call["function"]["name"], json.loads(call["function"]["arguments"])["city"]]
    return parts


@pytest.mark.parametrize("shape, chat", CASES)
def test_every_assistant_turn_trains_through_its_end_token_and_nothing_else_does(shape, chat, folders):
    """One run of target tokens per assistant turn, in order, each holding its text and its calls and ending with the
    template's end-of-turn token (and the newline after it, where the template writes it there); no system, user or
    tool-result text is a target, and all of it is in the rendered row."""
    tok = load_tokenizer(folders[shape], template_now=datetime(2025, 3, 1, 12, 0))
    messages = CONVERSATIONS[chat]
    ids, mask = encode_row(tok, {"messages": messages, "tools": [WEATHER]}, "chat").responses[0]
    text = tok.decode(ids, skip_special_tokens=False)
    runs = _targets(tok, ids, mask)
    turns = [m for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(turns), runs
    for run, message in zip(runs, turns):
        assert run.endswith(END[shape]) or run.endswith(END[shape] + "\n"), run
        assert END[shape] not in run[:run.rindex(END[shape])], run  # one turn, not two
        body = run[:run.rindex(END[shape])]
        for part in _expected_turn(shape, message):
            assert part in body, (part, run)
    others = [m["content"] for m in messages if m["role"] != "assistant"]
    for content in others:
        assert content in text and not any(content in run for run in runs), content
    trained = "".join(runs)
    assert "RESULT" not in trained and "USER-" not in trained and "SYSTEM-" not in trained
    # the tool list is in the prompt, never a target
    assert "The weather in a city" in text and "The weather in a city" not in trained


def test_an_assistant_text_the_template_drops_from_a_call_turn_is_refused_by_key(folders, tmp_path):
    """Llama 3.1's template writes only the call of an assistant turn that has both text and a call: the text would
    silently never be trained. The data check refuses the row naming the file, the line and messages[i].content;
    the same file passes on Qwen2.5, whose template writes both."""
    from overnight.data import check_data

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"messages": CONVERSATIONS["two_rounds"], "tools": [WEATHER]},
            {"messages": CONVERSATIONS["text_and_call"], "tools": [WEATHER]}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    llama = load_tokenizer(folders["llama3.1-tools"], template_now=datetime(2025, 3, 1, 12, 0))
    problems = check_data(data, "sft", tokenizer=llama).problems
    assert [(p.line, p.key) for p in problems] == [(2, "messages[1].content")]
    assert "Let me check." in str(problems[0]) or "assistant message 1" in str(problems[0])
    assert check_data(data, "sft", tokenizer=load_tokenizer(folders["qwen2.5-tools"])).ok


def test_two_calls_in_one_turn_on_a_template_that_takes_one_are_refused_by_key_with_the_fix(folders, tmp_path):
    """Llama 3.1's template raises "only supports single tool-calls at once" on a turn with two calls. The data check
    refuses such a row as it refuses any other: the file, the line, messages[i].tool_calls and the fix (one call a
    turn), not the template's own words; validate-data exits 2. Qwen2.5, whose template writes both calls, takes the
    same file."""
    from overnight.data import check_data

    data = tmp_path / "data"
    data.mkdir()
    parallel = [{"role": "user", "content": "USER-A Paris and Lyon?"},
                {"role": "assistant", "content": None, "tool_calls": [_call("Paris", "c1"), _call("Lyon", "c2")]},
                RESULT_ONE, RESULT_TWO, {"role": "assistant", "content": "Paris 18 C, Lyon 20 C."}]
    rows = [{"messages": CONVERSATIONS["two_rounds"], "tools": [WEATHER]}, {"messages": parallel, "tools": [WEATHER]}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    llama = load_tokenizer(folders["llama3.1-tools"], template_now=datetime(2025, 3, 1, 12, 0))
    assert llama.tool_support.several_calls is False
    problems = check_data(data, "sft", tokenizer=llama).problems
    assert [(p.line, p.key) for p in problems] == [(2, "messages[1].tool_calls")]
    said = str(problems[0])
    assert "assistant message 1 has 2" in said and "split them into turns" in said
    assert "single tool-calls" not in said
    qwen = load_tokenizer(folders["qwen2.5-tools"])
    assert qwen.tool_support.several_calls is True
    assert check_data(data, "sft", tokenizer=qwen).ok
    done = subprocess.run([sys.executable, "-m", "overnight", "validate-data", str(data), "--model",
                           str(folders["llama3.1-tools"])], capture_output=True, text=True, cwd=ROOT,
                          stdin=subprocess.DEVNULL, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert f"{data / 'train.jsonl'}:2" in out and "messages[1].tool_calls" in out and "split them into turns" in out
    assert "Traceback" not in out and "single tool-calls" not in out


_ENCODE = """
import json, sys
from datetime import datetime
from overnight.data.tokenizer import encode_row, load_tokenizer
folder, row = sys.argv[1], json.loads(sys.argv[2])
tok = load_tokenizer(folder, template_now=datetime(2025, 3, 1, 23, 59))
print(json.dumps([list(part) for part in encode_row(tok, row, "chat").responses[0]]))
"""


@pytest.mark.parametrize("shape", list(END))
def test_a_tool_row_tokenizes_the_same_in_another_process(shape, folders):
    """A resumed run is another process (another hash seed, a fresh probe of the template's tool support): the same
    row with tools, calls (arguments as OpenAI's JSON text) and results gives the same ids and loss mask."""
    row = {"messages": CONVERSATIONS["two_rounds"], "tools": json.dumps([WEATHER])}
    out = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(TESTS)}
        result = subprocess.run([sys.executable, "-c", _ENCODE, str(folders[shape]), json.dumps(row)],
                                capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert result.returncode == 0, result.stderr
        out.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert out[0] == out[1]
    ids, mask = out[0]
    assert 0 < sum(mask) < len(ids)
