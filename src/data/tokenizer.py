"""Tokenization from a model folder's Hugging Face tokenizer files, without transformers.

Both backends train on the ids made here, so the same data gives the same tokens on MLX and torch.
The behaviour follows transformers' `AutoTokenizer` on the same folder: tokenizer.json's post-processor
alone decides the special tokens `encode` adds (transformers 5 ignores tokenizer_config.json's
`add_bos_token`/`add_eos_token` when a tokenizer.json exists), and chat templates are rendered with the
same sandboxed Jinja environment and variables. Conversations with tools (a row's `tools`, assistant
`tool_calls`, `tool` turns) render as transformers renders them; a template that would drop them is refused
(require_tool_support), and the loss mask trains every assistant turn, call turns included, never a tool result.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from overnight.config import ConfigError
from overnight.data.formats import DataError


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as serialized AddedToken objects.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fix = _JSON_FIX.get(path.name, _JSON_FIX[""])
        raise DataError(f"{path}: cannot be read as JSON ({exc}) -> {fix}") from None
    return data if isinstance(data, dict) else {}


# What to do about a damaged JSON file of the model folder: config.json is the model's own description, not a
# tokenizer file, so re-saving the tokenizer would not fix it.
_JSON_FIX = {
    "config.json": "the model's configuration is damaged: restore config.json from the original model "
                   "(re-download or re-copy the model folder)",
    "generation_config.json": "restore generation_config.json from the original model, or delete it (it holds "
                              "only generation defaults)",
    "": "re-save the model folder's tokenizer files",
}


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' order: the first one set wins


def _template_message(message: Any, arguments_as_text: bool = False) -> Any:
    """A message as transformers hands it to a template: keys whose value is null are dropped (templates
    test for a missing key), and a reasoning field is also given as `thinking` and `reasoning_content`.
    Tool calls go in the one shape every tool template reads (_template_call); an empty list of them is no calls."""
    if not isinstance(message, dict):
        return message
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    if "tool_calls" in message:
        if message["tool_calls"] == []:  # OpenAI exports write [] for "no calls"; Llama 3.1's template raises on it
            del message["tool_calls"]
        elif isinstance(message["tool_calls"], list):
            message["tool_calls"] = [_template_call(call, arguments_as_text) for call in message["tool_calls"]]
    return message


def _template_call(call: Any, arguments_as_text: bool) -> Any:
    """A tool call as {"type": "function", "function": {"name", "arguments"}} (+ its other keys, e.g. "id"): the
    shape transformers documents, which Qwen's templates unwrap and Llama 3.1's requires; a bare {"name",
    "arguments"} call is wrapped so. ``arguments`` go as an object, a JSON string parsed (Qwen2.5's and Llama 3.1's
    templates `tojson` them, which would quote a string a second time; Qwen3's writes either as JSON), or, for a
    template that only writes text (``arguments_as_text``, found by TextTokenizer.tool_support), as the row's string
    verbatim, an object serialized."""
    if not isinstance(call, dict):
        return call
    if isinstance(call.get("function"), dict):
        outer = {key: value for key, value in call.items() if value is not None}
        function = {key: value for key, value in call["function"].items() if value is not None}
    else:
        outer = {key: value for key, value in call.items() if key not in ("name", "arguments") and value is not None}
        function = {key: call[key] for key in ("name", "arguments") if call.get(key) is not None}
    arguments = function.get("arguments")
    if arguments_as_text and isinstance(arguments, dict):
        function["arguments"] = json.dumps(arguments, ensure_ascii=False)
    elif not arguments_as_text and isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except ValueError:  # the row check refuses such a row; a direct caller gets the text as it is
            pass
    return {**outer, "type": outer.get("type") or "function", "function": function}


def _template_tools(tools: Any) -> Any:
    """The row's tools as the template gets them: a JSON string (how Arrow/parquet datasets often store them)
    parsed; an empty list is no tools (Llama 3.1's template would otherwise announce an empty tool set)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            pass
    return tools or None


def _uses_tools(row_tools: Any, messages: Any) -> tuple[bool, list[tuple[int, Any]]]:
    """(whether the row gives tools, [(index, message)] of the messages that carry tool calls)."""
    calls = [(i, m) for i, m in enumerate(messages if isinstance(messages, list) else [])
             if isinstance(m, dict) and m.get("tool_calls")]
    return _template_tools(row_tools) is not None, calls


def _compile_template(source: str, clock: Callable[[], datetime] = datetime.now):
    """``clock``: what the template's ``strftime_now`` formats (transformers: the current local time)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # transformers uses {% generation %} to track assistant spans; rendering only needs the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        # transformers' `dict` global: a plain dict factory, without attribute access to break out with
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # transformers' `namespace` global: refuses underscore-prefixed attributes
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: clock().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


def _find_chat_template(model_dir: Path, config: dict) -> str | None:
    # Newer transformers save the template beside the config; it wins over tokenizer_config.json.
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(model_dir / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default", else the first
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def _stop_ids(eos_id: int | None, *configs: dict) -> tuple[int, ...]:
    """The token ids a model folder declares as ending a generated answer: the tokenizer's eos, then every
    ``eos_token_id`` of the model folder's config.json and generation_config.json (an int or a list), each once,
    in that order. Chat models list their end-of-turn tokens there beside the eos (Llama 3: <|end_of_text|>,
    <|eom_id|>, <|eot_id|>; Qwen: <|endoftext|>, <|im_end|>; Gemma: <eos>, <end_of_turn>), and transformers' and
    mlx-lm's own generation stop at every one of them. Many folders do not (a base model's config, a fine-tune
    saved without generation_config.json): TextTokenizer.stop_ids adds the chat template's own end-of-turn token."""
    found = [] if eos_id is None else [int(eos_id)]
    for config in configs:
        value = config.get("eos_token_id")
        for token_id in value if isinstance(value, list) else [value]:
            if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0 \
                    and token_id not in found:
                found.append(token_id)
    return tuple(found)


# The probe conversations the end-of-turn token is read from: the answer is a plain word run that no template
# rewrites (strips, splits at </think>, ...); the second conversation is for templates that insist on a system turn.
_PROBE_ANSWER = "Overnight probe answer"
_PROBES = (
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _PROBE_ANSWER}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": _PROBE_ANSWER}],
)


# The tool probes: a tool, and a call under another name, with a value no template writes by itself, so finding
# them in the rendered text tells that the template rendered what it was given (and not the tool list alone).
_PROBE_TOOL = {"type": "function", "function": {
    "name": "overnight_probe_tool", "description": "Overnight probe tool.",
    "parameters": {"type": "object", "properties": {"probe_argument": {"type": "string"}},
                   "required": ["probe_argument"]}}}
_PROBE_CALL = {"name": "overnight_probe_call", "arguments": {"probe_argument": "overnight probe value"}}
_PROBE_SECOND_CALL = {"name": "overnight_probe_second_call", "arguments": {"probe_argument": "overnight probe value"}}


@dataclass(frozen=True)
class ToolSupport:
    """What a chat template does with tools, found once per tokenizer by rendering probe conversations.
    ``renders_tools`` / ``renders_calls``: None when the template refused every probe conversation (the rows'
    own renderings then decide). ``arguments_as_text``: the template writes a call's arguments only when given as
    a JSON string (it concatenates them as text); every template with tools seen so far takes an object.
    ``several_calls``: whether one assistant turn may hold more than one call (False: the template refuses two, as
    Llama 3.1's raises "only supports single tool-calls at once", or leaves one out); None when not probed."""

    renders_tools: bool | None
    renders_calls: bool | None
    arguments_as_text: bool = False
    several_calls: bool | None = None


class TextTokenizer:
    """encode / decode / chat template over `tokenizers.Tokenizer` + tokenizer_config.json.

    ``template_kwargs``: extra variables every chat template rendering gets (data.chat_template_kwargs, e.g.
    ``enable_thinking: False`` for Qwen3), as transformers' ``apply_chat_template(**kwargs)``.
    ``template_now``: the time the template's ``strftime_now`` formats (Llama 3's "Today Date"); a run pins it
    to its start so a row renders the same tokens on every day the run lasts; None is the current time."""

    def __init__(self, model_dir: Path, template_kwargs: dict | None = None, template_now: datetime | None = None):
        from tokenizers import Tokenizer

        self.template_kwargs: dict = dict(template_kwargs or {})
        self.template_now = template_now
        self.model_dir = Path(model_dir)
        path = self.model_dir / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{self.model_dir}: no tokenizer.json -> the model folder needs Hugging Face fast "
                            "tokenizer files (tokenizer.json, tokenizer_config.json)")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception for a malformed file
            raise DataError(f"{path}: cannot be loaded by `tokenizers` ({exc})") from None
        config = _read_json(self.model_dir / "tokenizer_config.json")
        special_map = _read_json(self.model_dir / "special_tokens_map.json")
        model_config = _read_json(self.model_dir / "config.json")

        # The named special tokens, as transformers' `special_tokens_map`: the standard names, any other
        # string-valued `*_token` key of tokenizer_config.json, and a dict of `extra_special_tokens`.
        # Chat templates see them all as variables (e.g. {{ bos_token }}).
        self.special_tokens: dict[str, str] = {}
        named = {key: value for key, value in config.items() if key.endswith("_token")}
        extra = config.get("extra_special_tokens")
        named.update(extra if isinstance(extra, dict) else {})
        for name in (*SPECIAL_TOKEN_NAMES, *named):
            text = _token_text(named.get(name)) or (_token_text(special_map.get(name))
                                                    if name in SPECIAL_TOKEN_NAMES else None)
            if text is not None:
                self.special_tokens[name] = text
        self.bos_id = self._id_of("bos_token", model_config.get("bos_token_id"))
        self.eos_id = self._id_of("eos_token", model_config.get("eos_token_id"))
        pad = self._id_of("pad_token", model_config.get("pad_token_id"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self._declared_stop_ids = _stop_ids(self.eos_id, model_config,
                                            _read_json(self.model_dir / "generation_config.json"))
        self._stop_ids: tuple[int, ...] | None = None
        self._end_of_turn: tuple[int | None] | None = None
        self._tool_support: ToolSupport | None = None

        # What encode(add_special_tokens=True) puts around a text, found by asking the post-processor.
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
        self.prefix_ids: list[int] = full[:start]
        self.suffix_ids: list[int] = full[start + len(bare):]

        self.chat_template_source = _find_chat_template(self.model_dir, config)
        self._template = None
        self.vocab_size = self._tok.get_vocab_size()

    def _id_of(self, name: str, fallback: Any) -> int | None:
        text = self.special_tokens.get(name)
        if text is not None:
            token_id = self._tok.token_to_id(text)
            if token_id is not None:
                return token_id
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback if isinstance(fallback, int) else None

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template_source is not None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """What ends a generated answer, decided here once for predictions, GRPO sampling and its validation on
        every backend (Backend.generate / sample stop at any of them): the ids the model folder declares
        (_stop_ids), then the chat template's end-of-turn token when it is another one, since a chat model ends
        its answer with that token and would otherwise run on into invented turns until max_new_tokens."""
        if self._stop_ids is None:
            found = list(self._declared_stop_ids)
            if self.end_of_turn_id is not None and self.end_of_turn_id not in found:
                found.append(self.end_of_turn_id)
            self._stop_ids = tuple(found)
        return self._stop_ids

    @property
    def end_of_turn_id(self) -> int | None:
        """The added token the chat template closes an assistant turn with (Llama 3 <|eot_id|>, Gemma
        <end_of_turn>, ChatML/Qwen <|im_end|>; often the eos itself), found by rendering a short conversation and
        reading the first token after the answer, whitespace skipped. None without a template, when the template
        refuses the probe conversations, or when text (not an added token) follows the answer."""
        if self._end_of_turn is None:
            self._end_of_turn = (self._find_end_of_turn(),)
        return self._end_of_turn[0]

    @property
    def end_of_turn_text(self) -> str | None:
        return None if self.end_of_turn_id is None else self._tok.id_to_token(self.end_of_turn_id)

    def _find_end_of_turn(self) -> int | None:
        if self.chat_template_source is None:
            return None
        added = self._tok.get_added_tokens_decoder()
        for conversation in _PROBES:
            try:
                text = self.apply_chat_template(conversation)
            except Exception:  # noqa: BLE001 (a template that refuses this conversation: try the next one)
                continue
            at = text.rfind(_PROBE_ANSWER)
            if at < 0:
                continue
            for token_id in self._tok.encode(text[at + len(_PROBE_ANSWER):], add_special_tokens=False).ids:
                if token_id in added:
                    return int(token_id)
                if self._tok.decode([token_id], skip_special_tokens=False).strip():
                    return None
            return None
        return None

    @property
    def tool_support(self) -> ToolSupport:
        if self._tool_support is None:
            self._tool_support = self._probe_tool_support()
        return self._tool_support

    def _probe_tool_support(self) -> ToolSupport:
        """Tools: the probe tool's name is in the text rendered with it and the text differs from the one rendered
        without. Calls: the call's name and its argument's value are in the text of a conversation whose answer is
        only the call (no content, then empty content for templates that read it unconditionally); arguments as an
        object first, a JSON string second. The second base conversation is for templates that insist on a system
        turn, as in _PROBES."""
        if self.chat_template_source is None:
            return ToolSupport(None, None)
        bases = [conversation[:-1] for conversation in _PROBES]
        name = _PROBE_TOOL["function"]["name"]
        renders_tools = None
        for base in bases:
            try:
                with_tools = self._render(base, True, [_PROBE_TOOL])
                without = self._render(base, True, None)
            except Exception:  # noqa: BLE001 (a template that refuses this conversation: try the next one)
                continue
            renders_tools = name in with_tools and with_tools != without
            break
        value = _PROBE_CALL["arguments"]["probe_argument"]
        call = {"type": "function", "function": _PROBE_CALL}
        rendered_any = False
        for as_text in (False, True):
            for base in bases:
                for answer in ({"role": "assistant", "tool_calls": [call]},
                               {"role": "assistant", "content": "", "tool_calls": [call]}):
                    try:
                        text = self._render(base + [answer], False, [_PROBE_TOOL] if renders_tools else None,
                                            as_text)
                    except Exception:  # noqa: BLE001
                        continue
                    rendered_any = True
                    # an object written as Python's repr (a template that prints it as text) does not count
                    if _PROBE_CALL["name"] in text and value in text and repr(_PROBE_CALL["arguments"]) not in text:
                        second = {"type": "function", "function": _PROBE_SECOND_CALL}
                        several = self._renders_both_calls(base + [{**answer, "tool_calls": [call, second]}],
                                                           [_PROBE_TOOL] if renders_tools else None, as_text)
                        return ToolSupport(renders_tools, True, as_text, several)
        return ToolSupport(renders_tools, False if rendered_any else None)

    def _renders_both_calls(self, conversation: list[dict], tools: Any, as_text: bool) -> bool:
        """Whether the template writes both calls of a turn that has two (in the form one call rendered in)."""
        try:
            text = self._render(conversation, False, tools, as_text)
        except Exception:  # noqa: BLE001 (Llama 3.1's raise_exception: one call per turn)
            return False
        return _PROBE_CALL["name"] in text and _PROBE_SECOND_CALL["name"] in text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids without added special tokens, and each token's (start, end) character span in ``text``."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list[dict] | str | None = None) -> str:
        """The rendered conversation text; tokenize it with add_special_tokens=False (the template
        already holds the special tokens, as in transformers).

        The template sees what transformers' `apply_chat_template` (5.x) gives it with no documents: `messages`
        (keys holding null dropped; a reasoning field also under `thinking` and `reasoning_content`; tool calls in
        transformers' documented shape, see _template_call), `tools` (the row's list of JSON-schema specs, a JSON
        string parsed; None when there are none), `documents=None`, `add_generation_prompt`, and every named
        special token."""
        has_calls = any(isinstance(m, dict) and m.get("tool_calls") for m in messages)
        as_text = has_calls and self.tool_support.arguments_as_text
        return self._render(messages, add_generation_prompt, _template_tools(tools), as_text)

    def _render(self, messages: list[dict], add_generation_prompt: bool, tools: Any,
                arguments_as_text: bool = False) -> str:
        if self.chat_template_source is None:
            raise DataError(f"{self.model_dir}: the tokenizer has no chat template -> use prompt/completion or "
                            "text rows, or a model whose tokenizer_config.json has a chat_template")
        if self._template is None:
            try:
                self._template = _compile_template(self.chat_template_source,
                                                   lambda: self.template_now or datetime.now())
            except Exception as exc:  # jinja2.TemplateSyntaxError: the model's template itself is broken
                raise DataError(f"{self.model_dir}: the chat template is not valid Jinja ({exc}) -> fix chat_template "
                                "in the model's tokenizer_config.json (or chat_template.jinja), or use "
                                "prompt/completion rows") from None
        # As transformers: the user's kwargs may shadow a special token's name; the variables overnight itself
        # sets come last (config.py refuses them as chat_template_kwargs keys).
        variables = {**self.special_tokens, **self.template_kwargs,
                     "messages": [_template_message(m, arguments_as_text) for m in messages], "tools": tools,
                     "documents": None, "add_generation_prompt": add_generation_prompt}
        return self._template.render(**variables)


def load_tokenizer(model_dir: Path, template_kwargs: dict | None = None,
                   template_now: datetime | None = None) -> TextTokenizer:
    """The model folder's tokenizer; see TextTokenizer for the chat template's kwargs and pinned time."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"{model_dir}: not a model folder -> pass a local folder with tokenizer.json "
                        "(a hub id must be downloaded first)")
    return TextTokenizer(model_dir, template_kwargs, template_now)


# ---------------------------------------------------------------------------
# Rows -> token ids and loss masks

@dataclass
class Encoded:
    """A row as tokens: a shared prompt and one response per sequence (a preference pair has two).
    For chat and text rows the whole sequence is the "response" and the prompt is empty; the loss
    mask (1 = target) then marks the assistant turns."""

    prompt: list[int]
    prompt_mask: list[int]
    responses: list[tuple[list[int], list[int]]]
    keep: int = 0  # leading prompt tokens (BOS) that left-truncation must keep

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(ids) for ids, _ in self.responses)


def _with_eos(tok: TextTokenizer, ids: list[int]) -> list[int]:
    if tok.eos_id is not None and (not ids or ids[-1] != tok.eos_id):
        ids = ids + [tok.eos_id]
    return ids


def require_tool_support(tok: TextTokenizer, tools: Any, messages: list, name: str = "messages") -> None:
    """DataError (naming the key) when the row gives tools or tool calls that the model's chat template would drop
    from the text: the model would then learn answers to tools it was never shown, or the calls not at all."""
    has_tools, calls = _uses_tools(tools, messages)
    if not has_tools and not calls:
        return
    if tok.chat_template_source is None:  # said once per file by the data check (no chat template at all)
        return
    support = tok.tool_support
    if has_tools and support.renders_tools is False:
        raise DataError(f"the chat template of {tok.model_dir} ignores 'tools' (it renders the same text with and "
                        "without them), so the model would learn to call tools it is never shown -> use a model whose "
                        "chat template renders tools (e.g. Qwen2.5, Qwen3 or Llama 3.1 Instruct), or describe the "
                        "tools as text in the system message and remove 'tools'", key="tools")
    if calls and support.renders_calls is False:
        raise DataError(f"the chat template of {tok.model_dir} drops tool calls from the assistant's turn, so they "
                        "would not be trained -> use a model whose chat template renders 'tool_calls' (e.g. Qwen2.5, "
                        "Qwen3 or Llama 3.1 Instruct), or write the calls into the assistant's 'content' as text",
                        key=f"{name}[{calls[0][0]}].tool_calls")
    several = next(((i, len(m["tool_calls"])) for i, m in calls
                    if isinstance(m["tool_calls"], list) and len(m["tool_calls"]) > 1), None)
    if several and support.several_calls is False:
        i, count = several
        raise DataError(f"the chat template of {tok.model_dir} renders one tool call per assistant turn (it refuses "
                        f"or drops a second one), and assistant message {i} has {count} -> split them into turns: an "
                        "assistant message with one call, then that call's tool result, then the next call's "
                        "assistant message", key=f"{name}[{i}].tool_calls")


def _call_names(message: dict) -> list[str]:
    names = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call.get("function"), dict) else call
        names.append(str(function.get("name", "")))
    return names


def _assistant_spans(tok: TextTokenizer, messages: list[dict], text: str,
                     tools: Any = None) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in the rendered ``text``: from the end of the rendered
    generation prompt to the end of the rendered turn, so the end-of-turn tokens are learned too. A turn of
    tool calls is a span like any other; tool results, wherever the template puts them (Qwen: inside a user
    turn), lie between spans and are never targets."""
    spans = []
    search = 0
    # What closes a turn, so the fallback below makes it a target too: a model that never learns it never stops.
    closers = [t for t in (tok.end_of_turn_text, tok.special_tokens.get("eos_token")) if t]
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        span = None
        before = None
        try:
            before = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools)
            upto = tok.apply_chat_template(messages[:i + 1], tools=tools)
            if len(before) < len(upto) and text.startswith(upto) and upto.startswith(before):
                span = (len(before), len(upto))
        except Exception:
            span = None
        calls = _call_names(message)
        if span is None and calls:
            # A call turn rendered differently when it is the last one (Qwen3 writes a think block only there): it
            # starts where the generation prompt ends and runs to its end-of-turn token.
            ends = []
            if before is not None and text.startswith(before) and len(before) >= search:
                ends = [at + len(c) for c in closers if (at := text.find(c, len(before))) >= 0]
            if not ends:
                raise DataError(f"the chat template does not render assistant message {i} (tool calls) after the "
                                "conversation before it, so its tokens cannot be found for the loss mask -> set "
                                "data.mask_prompt=false", key=f"messages[{i}]")
            span = (len(before), min(ends))
        if span is None:
            # Templates that render earlier turns differently (e.g. dropping reasoning): find the content.
            content = message.get("content", "")
            start = text.find(content, search)
            if start < 0:
                raise DataError(f"the chat template does not render assistant message {i} verbatim, so its "
                                "tokens cannot be found for the loss mask -> set data.mask_prompt=false")
            end = start + len(content)
            closer = next((c for c in closers if text.startswith(c, end)), "")
            end += len(closer)
            span = (start, end)
        missing = [name for name in calls if name not in text[span[0]:span[1]]]
        if missing:
            raise DataError(f"the chat template leaves tool call '{missing[0]}' out of assistant message {i}, so the "
                            "call would not be trained -> use a model whose chat template renders 'tool_calls', or "
                            "write the call into the assistant's 'content' as text", key=f"messages[{i}].tool_calls")
        # A call turn's text, which some templates drop beside a call (Llama 3.1 writes only the call): it would
        # silently never be trained. The part after a reasoning block is what templates show (Qwen3 moves the rest).
        content = message.get("content")
        visible = content.split("</think>")[-1].strip() if calls and isinstance(content, str) else ""
        if visible and visible not in text[span[0]:span[1]]:
            raise DataError(f"the chat template of {tok.model_dir} writes only the tool call of assistant message {i} "
                            f"and drops its text ({visible[:40]!r}), so the text would not be trained -> put the text "
                            "in an assistant message of its own before the call, or remove it",
                            key=f"messages[{i}].content")
        spans.append(span)
        search = span[1]
    return spans


def encode_row(tok: TextTokenizer, row: dict, fmt: str, mask_prompt: bool = True) -> Encoded:
    """Token ids and loss masks for one validated row.

    text: BOS (if the tokenizer adds one) + text + EOS, all targets.
    completion / preference: BOS + prompt, then each response + EOS; prompt tokens are targets only
    for completion rows with mask_prompt off. Prompt and response are tokenized separately so the
    boundary is exact. chat: the model's chat template; with mask_prompt only assistant turns are
    targets."""
    if fmt == "text":
        ids = _with_eos(tok, tok.prefix_ids + tok.encode(row["text"], add_special_tokens=False))
        mask = [0] * len(tok.prefix_ids) + [1] * (len(ids) - len(tok.prefix_ids))
        return Encoded([], [], [(ids, mask)])
    if fmt == "chat":
        tools = row.get("tools")
        require_tool_support(tok, tools, row["messages"])
        text = _render(tok, row["messages"], tools=tools)
        ids, offsets = tok.encode_with_offsets(text)
        if not mask_prompt:
            return Encoded([], [], [(ids, [1] * len(ids))])
        starts = np.array([s for s, _ in offsets], dtype=np.int64)
        ends = np.array([e for _, e in offsets], dtype=np.int64)
        mask = np.zeros(len(ids), dtype=bool)
        for a, b in _assistant_spans(tok, row["messages"], text, tools):
            mask |= (starts < b) & (ends > a)
        return Encoded([], [], [(ids, mask.astype(int).tolist())])
    if fmt == "preference" and isinstance(row["prompt"], list):
        return _encode_chat_pair(tok, row)
    prompt = tok.prefix_ids + tok.encode(row["prompt"], add_special_tokens=False)
    keep = len(tok.prefix_ids)
    if fmt == "completion":
        resp = _with_eos(tok, tok.encode(row["completion"], add_special_tokens=False))
        prompt_mask = [0] * keep + [0 if mask_prompt else 1] * (len(prompt) - keep)
        return Encoded(prompt, prompt_mask, [(resp, [1] * len(resp))], keep)
    if fmt == "preference":
        pair = []
        for key in ("chosen", "rejected"):
            resp = _with_eos(tok, tok.encode(row[key], add_special_tokens=False))
            pair.append((resp, [1] * len(resp)))
        return Encoded(prompt, [0] * len(prompt), pair, keep)
    raise ValueError(f"unknown format {fmt}")


def _render(tok: TextTokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: Any = None) -> str:
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"the chat template failed on this row ({exc}) -> check roles and their order") from None


def _encode_chat_pair(tok: TextTokenizer, row: dict) -> Encoded:
    """A conversational preference row (TRL's format: ``prompt`` a list of messages, ``chosen`` and ``rejected``
    lists of assistant messages) through the model's chat template, as TRL's trainers render it: the prompt with the
    generation prompt, each answer the rest of the whole conversation's text (its end-of-turn token included, no
    EOS added). So a reward model trained on these rows reads the text a GRPO reward model is handed (the chat
    template of prompt + completion)."""
    tools = row.get("tools")
    for key in ("prompt", "chosen", "rejected"):
        require_tool_support(tok, tools, row[key], key)
    prompt_text = _render(tok, row["prompt"], add_generation_prompt=True, tools=tools)
    prompt = tok.encode(prompt_text, add_special_tokens=False)
    pair = []
    for key in ("chosen", "rejected"):
        full = _render(tok, row["prompt"] + row[key], tools=tools)
        if not full.startswith(prompt_text):
            raise DataError(f"key '{key}': the chat template renders the prompt with the answer differently from the "
                            "prompt alone (it does not begin with the prompt's text), so the answer's tokens cannot "
                            "be told apart -> give prompt, chosen and rejected as plain strings instead")
        resp = tok.encode(full[len(prompt_text):], add_special_tokens=False)
        pair.append((resp, [1] * len(resp)))
    prefix = tok.prefix_ids
    keep = len(prefix) if prefix and prompt[:len(prefix)] == prefix else 0
    return Encoded(prompt, [0] * len(prompt), pair, keep)


def fit(enc: Encoded, max_len: int) -> list[tuple[list[int], list[int]]]:
    """The row's sequences (prompt + response), cut to ``max_len`` tokens.

    Chat and text rows lose their end. Prompted rows lose the start of the prompt first (after BOS),
    but keep at least half of ``max_len`` for it, then the end of the response; a pair is cut the
    same way on both sides so chosen and rejected share one prompt."""
    prompt, prompt_mask = enc.prompt, enc.prompt_mask
    if enc.length > max_len and prompt:
        longest = max(len(ids) for ids, _ in enc.responses)
        keep_prompt = max(max_len - longest, min(len(prompt), max_len // 2), enc.keep)
        if keep_prompt < len(prompt):
            tail = keep_prompt - enc.keep
            prompt = prompt[:enc.keep] + (prompt[len(prompt) - tail:] if tail else [])
            prompt_mask = prompt_mask[:enc.keep] + (prompt_mask[len(prompt_mask) - tail:] if tail else [])
    out = []
    for ids, mask in enc.responses:
        room = max(max_len - len(prompt), 0)
        out.append(((prompt + ids[:room])[:max_len], (prompt_mask + mask[:room])[:max_len]))
    return out


def target_tokens(seqs: list[tuple[list[int], list[int]]]) -> int:
    """Target tokens the loss sees in a row's fitted sequences: position 0 never is one (nothing before it
    to predict it from, see data.collate); a preference pair counts its poorer side, since a pair with an
    empty side cannot be compared."""
    return min(int(sum(mask[1:])) for _, mask in seqs)


def shortest_trainable_length(enc: Encoded) -> int | None:
    """The smallest max_seq_length that leaves this row a target token (None: not even untruncated)."""
    if not enc.prompt:  # chat and text rows keep their start: the first target after position 0 decides
        mask = enc.responses[0][1]
        return next((i + 1 for i in range(1, len(mask)) if mask[i]), None)
    return next((n for n in range(2, enc.length + 1) if target_tokens(fit(enc, n))), None)


def prompts_use_chat_template(tok: TextTokenizer, setting: str) -> bool:
    """grpo.chat_template for this model: whether "prompt" rows are rendered as one user turn of its chat template
    (true), or reach it as bare text (false); auto is true when the tokenizer has a chat template. An instruct model
    given bare text tends to end its turn at once, which no reward can score. ConfigError (exit 2) for true on a
    model without a template."""
    if setting == "true" and not tok.has_chat_template:
        raise ConfigError(f"config key 'grpo.chat_template' is true, but the model {tok.model_dir} has no chat "
                          "template (tokenizer_config.json, chat_template.json or chat_template.jinja) -> set "
                          "grpo.chat_template=auto (or false) to give it the prompts as plain text")
    return setting == "true" or (setting == "auto" and tok.has_chat_template)


def encode_prompt(tok: TextTokenizer, row: dict, fmt: str, chat_template: bool = False) -> list[int]:
    """The ids a model continues from (grpo, predictions): a conversation through the chat template with the
    generation prompt; a "prompt" row likewise as one user turn when ``chat_template`` (prompts_use_chat_template),
    else BOS (if the tokenizer adds one) + the prompt text."""
    tools = row.get("tools")
    if fmt == "chat" or (fmt == "prompt" and chat_template):
        messages = row["messages"] if fmt == "chat" else [{"role": "user", "content": row["prompt"]}]
        require_tool_support(tok, tools, messages)
        text = _render(tok, messages, add_generation_prompt=True, tools=tools)
        return tok.encode(text, add_special_tokens=False)
    if fmt == "prompt" and _template_tools(tools) is not None:
        raise DataError("'tools' reach the model only through its chat template, and this prompt is given as plain "
                        "text -> set grpo.chat_template=auto (or true) with a model that has a chat template, or "
                        "remove 'tools'", key="tools")
    return tok.prefix_ids + tok.encode(row["prompt"], add_special_tokens=False)


def fit_prompt(tok: TextTokenizer, ids: list[int], room: int) -> list[int]:
    """``ids`` cut from the left to at most ``room`` tokens, keeping a leading BOS (the model's start)."""
    if len(ids) <= room:
        return ids
    keep = len(tok.prefix_ids) if ids[:len(tok.prefix_ids)] == tok.prefix_ids else 0
    keep = min(keep, room - 1) if room > 1 else 0
    return ids[:keep] + ids[len(ids) - (room - keep):]
