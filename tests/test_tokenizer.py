"""src/data/tokenizer.py: the stop tokens a model folder declares (the rest of the tokenizer: tests/test_data.py)."""
from __future__ import annotations

import json
from pathlib import Path

from overnight.data.tokenizer import _stop_ids, load_tokenizer

from conftest import with_stop_ids


def two_stop_ids(model_dir: Path, out: Path) -> tuple[Path, int, int]:
    """The tiny model as a chat model that lists its end-of-turn token beside its eos in generation_config.json
    (as Llama 3, Qwen and Gemma do); returns (folder, eos id, the other stop id)."""
    tok = load_tokenizer(model_dir)
    other = next(i for i in range(tok.vocab_size) if i not in (tok.eos_id, tok.bos_id, tok.pad_id))
    return with_stop_ids(model_dir, out, [tok.eos_id, other]), tok.eos_id, other


def test_the_tiny_models_only_stop_token_is_its_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.eos_id is not None and tok.stop_ids == (tok.eos_id,)


def test_every_eos_id_of_generation_config_is_a_stop_id(tiny_model_dir, tmp_path):
    folder, eos, other = two_stop_ids(tiny_model_dir, tmp_path / "chat")
    tok = load_tokenizer(folder)
    assert tok.eos_id == eos  # the eos used for training rows is unchanged
    assert tok.stop_ids == (eos, other)
    assert all(type(i) is int for i in tok.stop_ids)


def test_stop_ids_come_from_the_tokenizer_config_and_generation_config_each_once():
    assert _stop_ids(2, {"eos_token_id": [7, 2]}, {"eos_token_id": 9}) == (2, 7, 9)
    assert _stop_ids(None, {"eos_token_id": 5}, {}) == (5,)
    assert _stop_ids(3, {}, {"eos_token_id": [3, 3, None, "x", True, -1, 4]}) == (3, 4)
    assert _stop_ids(None, {}, {}) == ()


def _with_template(model_dir: Path, out: Path, template: str) -> Path:
    import json
    import shutil

    shutil.copytree(model_dir, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return out


def test_the_end_of_turn_token_is_the_added_token_right_after_the_answer(tiny_model_dir, tmp_path):
    """Whitespace between the answer and the token is skipped; text there, or a template that refuses both probe
    conversations, gives no end-of-turn token (the stop set is then the declared one); a template that wants a
    system turn gets the second probe."""
    tok = load_tokenizer(tiny_model_dir)
    user = tok._tok.token_to_id("<|user|>")
    cases = {
        "spaced": ("{% for m in messages %}{{ m['content'] }}\n <|user|>\n{% endfor %}", user),
        "text": ("{% for m in messages %}{{ m['content'] }} done<|user|>{% endfor %}", None),
        "refuses": ("{{ raise_exception('no') }}", None),
        "needs_system": ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
                         "{% for m in messages %}{{ m['content'] }}<|user|>{% endfor %}", user),
    }
    for name, (template, expected) in cases.items():
        found = load_tokenizer(_with_template(tiny_model_dir, tmp_path / name, template))
        assert found.end_of_turn_id == expected, name
        assert found.stop_ids == (tok.eos_id,) + ((expected,) if expected is not None else ()), name


def test_the_probe_renders_with_the_chat_template_kwargs(tiny_model_dir, tmp_path):
    template = ("{% for m in messages %}{{ m['content'] }}{% if close %}<|user|>{% else %}<|system|>{% endif %}"
                "{% endfor %}")
    folder = _with_template(tiny_model_dir, tmp_path / "kw", template)
    ids = load_tokenizer(tiny_model_dir)._tok
    assert load_tokenizer(folder, {"close": True}).end_of_turn_id == ids.token_to_id("<|user|>")
    assert load_tokenizer(folder, {"close": False}).end_of_turn_id == ids.token_to_id("<|system|>")


# -- tools: what the template is given -----------------------------------------------------------------------------

CALL_TEXT = '{"city": "Paris"}'


def _call_turn(arguments) -> list[dict]:
    return [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": arguments}]}]


def test_tool_call_arguments_go_in_the_form_the_template_writes(tiny_model_dir, tmp_path):
    """Templates that `tojson` the arguments (Qwen2.5, Llama 3.1) get an object, a JSON text parsed, so it is not
    quoted twice; a template that can only concatenate text (as DeepSeek's does) gets text, the row's own string
    verbatim; one that would print a Python dict gets text too. A bare {"name", "arguments"} call is wrapped in
    transformers' {"type": "function", "function": ...} shape."""
    calls = "{% for m in messages %}{% for c in m.tool_calls or [] %}[{{ c.type }}:{{ c.function.name }}:%s]" \
            "{% endfor %}{% endfor %}"
    cases = {
        "tojson": (calls.replace("%s", "{{ c.function.arguments | tojson }}"), False,
                   '[function:get_weather:{"city": "Paris"}]'),
        "concatenates": (calls.replace("%s", "{{ '' + c.function.arguments }}"), True, "[function:get_weather:%s]"),
        "prints": (calls.replace("%s", "{{ c.function.arguments }}"), True, "[function:get_weather:%s]"),
    }
    for name, (template, as_text, expected) in cases.items():
        tok = load_tokenizer(_with_template(tiny_model_dir, tmp_path / name, template))
        assert tok.tool_support.renders_calls and tok.tool_support.arguments_as_text == as_text, name
        for arguments in ({"city": "Paris"}, CALL_TEXT, '{"city":"Paris"}'):
            text = tok.apply_chat_template(_call_turn(arguments))
            shown = arguments if isinstance(arguments, str) else CALL_TEXT
            assert text == (expected % shown if as_text else expected), (name, arguments)


def test_a_template_that_refuses_every_probe_leaves_the_decision_to_the_rows(tiny_model_dir, tmp_path):
    from overnight.data.tokenizer import ToolSupport, require_tool_support

    tiny = load_tokenizer(tiny_model_dir)
    assert tiny.tool_support == ToolSupport(False, False)  # the probes render: tools and calls leave no trace
    refusing = load_tokenizer(_with_template(tiny_model_dir, tmp_path / "refuses", "{{ raise_exception('no') }}"))
    assert refusing.tool_support == ToolSupport(None, None)
    require_tool_support(refusing, [{"name": "f"}], _call_turn({}))  # not refused here: the row's rendering decides


def test_tools_given_as_json_text_are_parsed_and_an_empty_list_is_no_tools(tiny_model_dir, tmp_path):
    template = "{% if tools is not none %}{{ tools | tojson }}{% else %}none{% endif %}"
    tok = load_tokenizer(_with_template(tiny_model_dir, tmp_path / "tools", template))
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(chat, tools=tools) == tok.apply_chat_template(chat, tools=json.dumps(tools)) == \
        json.dumps(tools)
    assert tok.apply_chat_template(chat, tools=[]) == tok.apply_chat_template(chat) == "none"
    assert tok.tool_support.renders_tools and not tok.tool_support.renders_calls
