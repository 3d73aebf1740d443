"""Reading JSONL training data and refusing bad files before anything is trained or written.

Four row formats (SPEC §9), detected per file from its first row:
    chat        {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    completion  {"prompt": ..., "completion": ...}
    text        {"text": ...}
    preference  {"prompt": ..., "chosen": ..., "rejected": ...}  (strings, or TRL's conversational form: prompt a
                list of messages ending with a user turn or a tool result, chosen and rejected lists of assistant
                messages)
    prompt      {"prompt": ..., any other fields}  (grpo: only the prompt; the other fields go to the rewards)
grpo also takes chat rows whose conversation ends with a user turn or a tool result (the model writes the next one).
Conversations may use tools (transformers' shape): a `tools` list of JSON-schema function specs on the row,
`tool_calls` on assistant messages, `tool` messages holding each result; see _message_problems.
Every problem names file, line and key, and says what to do about it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from overnight.backend.objectives import PAIRED

FORMAT_KEYS = {
    "chat": ("messages",),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}
METHOD_FORMATS = {
    "sft": ("chat", "completion", "text"),
    "cpt": ("text",),
    "dpo": ("preference",),
    "orpo": ("preference",),
    "reward": ("preference",),
    "grpo": ("prompt", "chat"),
}
ROLES = ("system", "user", "assistant", "tool")
PROMPT_END_ROLES = ("user", "tool")  # a prompt (grpo, a preference pair's) ends where the assistant answers next
EXAMPLES = {
    "chat": '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
    "completion": '{"prompt": "Q: 2+2?\\nA:", "completion": " 4"}',
    "text": '{"text": "Some document."}',
    "preference": '{"prompt": "Q: 2+2?", "chosen": "4", "rejected": "5"}',
    "chat_preference": ('{"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", '
                        '"content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}'),
    "prompt": '{"prompt": "Q: 2+2?", "answer": "4"}',
    "tools": ('{"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", '
              '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}], "messages": [...]}'),
    "tool_call": ('{"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", '
                  '"arguments": {"city": "Paris"}}}]}'),
    "tool_result": '{"role": "tool", "name": "get_weather", "content": "18 C, sunny"}',
}
MAX_KEPT_PROBLEMS = 1000  # all problems are counted; this many are kept with their text
SHOWN_PROBLEMS = 20


class DataError(Exception):
    """A problem with the user's data: the CLI prints the message and exits 2. ``key``: the row's key it is about,
    when one is (the data check shows it beside the file and line)."""

    def __init__(self, message: str = "", key: str | None = None):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------
# Naming rows as the user knows them

@dataclass(frozen=True)
class SourceLabel:
    """How the user knows a JSONL file that overnight wrote from their data (src/data/sources.py): every message
    names the source (a parquet file, a saved dataset's split, a hub dataset's split) and its row, never the cache
    file. Line N of the converted file is row N of the source, counted from 1 (``index`` N-1 is what ds[i] and
    df.iloc[i] take); a JSONL file converted only to rename its keys keeps the original's line numbers."""

    name: str
    columns: dict[str, str] = field(default_factory=dict)  # row key -> the user's column (data.columns)
    command_args: tuple[str, ...] = ()  # what `overnight validate-data` is given to check the same rows
    shards: tuple[tuple[str, int], ...] = ()  # (file, rows) when several files make the split: rows named per file
    lines: bool = False  # the original is JSONL: its lines are named as they are in that file

    def at(self, line: int) -> str:
        if self.lines:
            return f"{self.name}:{line}"
        name, row = self.name, line
        for shard, rows in self.shards:
            name = shard
            if row <= rows:
                break
            row -= rows
        return f"{name} row {row} (index {row - 1})"

    def key(self, key: str) -> str:
        """``'K':`` naming the user's column where data.columns renamed it (messages[0].role -> turns[0].role)."""
        head = key.split("[", 1)[0].split(".", 1)[0]
        if head not in self.columns:
            return f"'{key}':"
        return f"'{self.columns[head]}{key[len(head):]}' (data.columns maps it to '{head}'):"


_LABELS: dict[str, SourceLabel] = {}


def register_label(path: Path, label: SourceLabel) -> None:
    _LABELS[os.path.realpath(path)] = label


def label_of(path: Path | None) -> SourceLabel | None:
    return _LABELS.get(os.path.realpath(path)) if path is not None else None


def where(path: Path, line: int | None = None) -> str:
    """``path:line`` for the user's own file; the source and row the user knows for a converted one."""
    label = label_of(path)
    if label is None:
        return f"{path}:{line}" if line is not None else str(path)
    return label.at(line) if line is not None else label.name


def empty_fix(path: Path) -> str:
    """What to do about a file or split with no rows, in the terms of the source the user has."""
    label = label_of(path)
    if label is None or label.lines:
        return "add one JSON object per line"
    return "add rows to it, or leave it out of the data (a validation split is optional)"


def row_ref(path: Path, line: int) -> str:
    """A row as a phrase after the file was named: "line 5", or "row 5 (index 4)" (in which shard, if several)."""
    label = label_of(path)
    if label is None or label.lines:
        return f"line {line}"
    shown = label.at(line)
    return shown[len(label.name) + 1:] if shown.startswith(label.name + " ") else shown


def key_text(path: Path, key: str | None) -> str:
    """`` key 'K':`` as Problem and the stream's refusals print it, K in the user's column names."""
    if not key:
        return ""
    label = label_of(path)
    return f" key {label.key(key)}" if label else f" key '{key}':"


@dataclass
class Problem:
    file: Path
    line: int | None  # None: the problem is about the whole file
    key: str | None
    message: str
    hint: str = ""

    def __str__(self) -> str:
        hint = f" -> {self.hint}" if self.hint else ""
        return f"{where(self.file, self.line)}:{key_text(self.file, self.key)} {self.message}{hint}"


def validate_data_command(path: Path, method: str | None, model_dir: Path | str | None = None,
                          max_seq_length: int | None = None, sets: tuple[str, ...] = ()) -> str:
    """The `overnight validate-data` command that checks what the run checked: the method decides which rows fit
    (validate-data infers sft or dpo otherwise), only a tokenizer finds rows too long for max_seq_length, and
    ``sets`` are the --set values without which validate-data refuses the config (grpo's rewards)."""
    import shlex

    label = label_of(path)
    parts = ["overnight validate-data", *(label.command_args if label else [str(path)])]
    if method:
        parts += ["--method", method]
    for item in sets:
        parts += ["--set", shlex.quote(item)]
    if model_dir:
        parts += ["--model", str(model_dir)]
        if max_seq_length is not None:
            parts += ["--max-seq-length", str(max_seq_length)]
    return "`" + " ".join(parts) + "`"


def format_keys_text(fmt: str) -> str:
    return ", ".join(f"'{k}'" for k in FORMAT_KEYS[fmt])


def method_needs(method: str) -> str:
    return " or ".join(f"{fmt} rows ({format_keys_text(fmt)})" for fmt in METHOD_FORMATS[method])


# ---------------------------------------------------------------------------
# Lines

def line_content(raw: bytes, at_file_start: bool) -> bytes:
    """The line without surrounding whitespace (and without a UTF-8 byte-order mark at the file start)."""
    if at_file_start and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.strip()


def iter_lines(path: Path, counts: Any = None) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line start, content) for each non-blank line.
    Blank lines are skipped and, when ``counts`` is given, counted in ``counts.blank_lines``."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            content = line_content(raw, offset == 0)
            if content:
                yield lineno, offset, content
            elif counts is not None:
                counts.blank_lines += 1
            offset += len(raw)


def line_number_at(path: Path, offset: int) -> int:
    """The 1-based line number of the line starting at ``offset`` (only used to word an error)."""
    count = 0
    with open(path, "rb") as f:
        remaining = offset
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count + 1


def parse_line(content: bytes) -> tuple[Any, tuple[str, str] | None]:
    """(value, None) or (None, (message, hint))."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, (f"invalid UTF-8 at byte {exc.start + 1} of the line",
                      "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) or remove the line")
    try:
        value = json.loads(text)
    except RecursionError:
        return None, ("JSON nested too deeply", "each line must be one flat JSON object")
    except json.JSONDecodeError as exc:
        return None, (f"not valid JSON ({exc.msg} at column {exc.colno})",
                      "each line must be one complete JSON object; check quotes, commas and brackets")
    except ValueError as exc:  # e.g. an integer literal too long for Python's int parser
        return None, (f"not valid JSON ({exc})", "each line must be one JSON object")
    if not isinstance(value, dict):
        return None, (f"the line is a JSON {type(value).__name__.replace('dict', 'object')}, not an object",
                      "each line must be one JSON object such as " + EXAMPLES["text"])
    return value, None


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "chat"
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    if "prompt" in row:
        return "prompt"
    return None


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def row_problems(row: dict, fmt: str, method: str | None = None) -> list[tuple[str | None, str, str]]:
    """(key, message, hint) for each way ``row`` fails the ``fmt`` format (for ``method``: a grpo conversation
    is a prompt, so it ends with a user turn instead of holding an answer)."""
    out: list[tuple[str | None, str, str]] = []
    for key in FORMAT_KEYS[fmt]:
        if key not in row:
            out.append((key, "missing", f"{fmt} rows need {format_keys_text(fmt)}, e.g. {EXAMPLES[fmt]}"))
    if out:
        return out
    conversational = fmt == "chat" or (fmt == "preference" and any(isinstance(row[k], list) for k in FORMAT_KEYS[fmt]))
    if row.get("tools") not in (None, []):
        if conversational or fmt == "prompt":  # prompt rows: rendered as a user turn under grpo.chat_template
            out += _tools_problems(row["tools"])
        else:
            out.append(("tools", f"{fmt} rows are not rendered by the chat template, so their tools would reach the "
                        "model nowhere", f"give the row as 'messages' with the tools beside them: {EXAMPLES['tools']}"))
        if out:
            return out
    if fmt == "preference" and conversational:
        return _chat_preference_problems(row)
    if fmt == "chat":
        messages = row["messages"]
        out = _message_problems(messages, "messages", EXAMPLES["chat"])
        if out:
            return out
        if method == "grpo":
            if messages[-1].get("role") not in PROMPT_END_ROLES:
                out.append(("messages", f"ends with a {messages[-1].get('role')} turn; a grpo prompt ends with a user "
                            "turn or a tool result (the model writes the answer)", "remove the trailing turns or the "
                            "line"))
        elif not any(m.get("role") == "assistant" for m in messages):
            out.append(("messages", "has no assistant message, so there is nothing to learn",
                        "add the answer as {\"role\": \"assistant\", \"content\": ...} or remove the line"))
        return out
    for key in FORMAT_KEYS[fmt]:
        value = row[key]
        if not _is_text(value):
            out.append((key, f"must be a string, got {type(value).__name__}", f"e.g. {EXAMPLES[fmt]}"))
        elif (key != "prompt" or fmt == "prompt") and not value.strip():
            out.append((key, "is empty, so there is nothing to learn", "fill it in or remove the line"))
    return out


def _message_problems(messages: Any, name: str, example: str) -> list[tuple[str | None, str, str]]:
    """(key, message, hint) for each way ``messages`` (the value of key ``name``) is not a non-empty list of
    {"role", "content"} objects with known roles and string contents. An assistant message may carry
    ``tool_calls`` instead of (or beside) content; a tool message carries the tool's result as its content
    (its ``name`` and ``tool_call_id`` go to the template as given)."""
    if not isinstance(messages, list) or not messages:
        return [(name, "must be a non-empty list of {\"role\", \"content\"} objects", f"e.g. {example}")]
    out: list[tuple[str | None, str, str]] = []
    for i, msg in enumerate(messages):
        key = f"{name}[{i}]"
        if not isinstance(msg, dict):
            out.append((key, "must be an object with 'role' and 'content'", f"e.g. {example}"))
            continue
        role = msg.get("role")
        if role not in ROLES:
            hint = "use one of " + ", ".join(ROLES)
            if role in ("human", "gpt", "bot", "model"):
                hint += " (ShareGPT-style 'human'/'gpt' become 'user'/'assistant')"
            out.append((key + ".role", f"is {role!r}", hint))
        calls = msg.get("tool_calls")
        if calls not in (None, []) and role != "assistant":
            out.append((key + ".tool_calls", f"is on a {role} message; only the assistant calls tools",
                        f"move the calls to the assistant turn: {EXAMPLES['tool_call']}"))
            continue
        call_problems = _tool_call_problems(calls, key + ".tool_calls") if calls is not None else []
        out += call_problems
        content = msg.get("content")
        if calls and content is None:
            pass  # a turn of only tool calls
        elif role == "tool" and content is None:
            out.append((key + ".content", "missing: a tool message holds the tool's result in 'content'",
                        f"e.g. {EXAMPLES['tool_result']}"))
        elif not _is_text(content):
            out.append((key + ".content", f"must be a string, got {type(content).__name__}",
                        "put the message text in 'content' as a string" + (
                            " (a tool's structured result as its JSON text)" if role == "tool" else "")))
        for field_name in ("name", "tool_call_id"):
            if role == "tool" and msg.get(field_name) is not None and not _is_text(msg[field_name]):
                out.append((f"{key}.{field_name}", f"must be a string, got {type(msg[field_name]).__name__}",
                            f"e.g. {EXAMPLES['tool_result']}"))
    return out


def _parses_to_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _tools_problems(tools: Any) -> list[tuple[str | None, str, str]]:
    """``tools``: a list of function specs as transformers takes them (JSON schema, {"type": "function",
    "function": {"name", "description", "parameters"}}, or the bare {"name", ...}), or that list as a JSON string
    (how Arrow/parquet datasets often store it)."""
    hint = f"give a list of JSON-schema function specs: {EXAMPLES['tools']}"
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (ValueError, RecursionError):
            return [("tools", "is a string that is not valid JSON", hint)]
    if not isinstance(tools, list):
        return [("tools", f"must be a list of tool specs, got {type(tools).__name__}", hint)]
    out: list[tuple[str | None, str, str]] = []
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            out.append((f"tools[{j}]", f"must be an object (a function spec), got {type(tool).__name__}", hint))
            continue
        function = tool.get("function", tool)
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name.strip():
            where = "function.name" if "function" in tool else "name"
            out.append((f"tools[{j}].{where}", "missing: a tool spec names its function", hint))
    return out


def _tool_call_problems(calls: Any, key: str) -> list[tuple[str | None, str, str]]:
    """``tool_calls``: a list of {"type": "function", "function": {"name", "arguments"}} (OpenAI's and
    transformers' shape; the bare {"name", "arguments"} too), ``arguments`` an object or a JSON string of one."""
    hint = f"e.g. {EXAMPLES['tool_call']}"
    if not isinstance(calls, list):
        return [(key, f"must be a list of tool calls, got {type(calls).__name__}", hint)]
    out: list[tuple[str | None, str, str]] = []
    for j, call in enumerate(calls):
        at = f"{key}[{j}]"
        if not isinstance(call, dict):
            out.append((at, f"must be an object, got {type(call).__name__}", hint))
            continue
        if call.get("type") not in (None, "function"):
            out.append((at + ".type", f"is {call['type']!r}; only function calls render", hint))
        if "function" in call:
            function, at = call["function"], at + ".function"
            if not isinstance(function, dict):
                out.append((at, f"must be an object with 'name' and 'arguments', got {type(function).__name__}",
                            hint))
                continue
        else:
            function = call
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            out.append((at + ".name", "missing: a tool call names the function it calls", hint))
        arguments = function.get("arguments")
        if arguments is None:
            out.append((at + ".arguments", "missing", "give the call's arguments as an object ({} for none), "
                        + hint))
        elif isinstance(arguments, str):
            if not _parses_to_object(arguments):
                out.append((at + ".arguments", "is a string that is not a JSON object",
                            "give the arguments as an object, or as the JSON text of one (OpenAI's form): "
                            "'{\"city\": \"Paris\"}'"))
        elif not isinstance(arguments, dict):
            out.append((at + ".arguments", f"must be an object (or the JSON text of one), got "
                        f"{type(arguments).__name__}", hint))
    return out


def _chat_preference_problems(row: dict) -> list[tuple[str | None, str, str]]:
    """A conversational preference row (TRL's format): ``prompt`` the conversation so far, ending with a user turn,
    ``chosen`` and ``rejected`` the assistant's answers, each a list of messages, rendered by the chat template."""
    example = EXAMPLES["chat_preference"]
    out: list[tuple[str | None, str, str]] = []
    for key in FORMAT_KEYS["preference"]:
        if not isinstance(row[key], list):
            out.append((key, f"is a {type(row[key]).__name__} while another of prompt/chosen/rejected is a list of "
                        "messages", f"give all three as strings, or all three as lists of messages: e.g. {example}"))
    if out:
        return out
    for key in FORMAT_KEYS["preference"]:
        out += _message_problems(row[key], key, example)
    if out:
        return out
    if row["prompt"][-1].get("role") not in PROMPT_END_ROLES:
        out.append(("prompt", f"ends with a {row['prompt'][-1].get('role')} turn; the prompt ends with the user turn "
                    "(or the tool result) the answers reply to", f"e.g. {example}"))
    for key in ("chosen", "rejected"):
        roles = sorted({m["role"] for m in row[key]} - {"assistant"})
        if roles:
            out.append((key, f"holds a {roles[0]} message; an answer is the assistant's turn",
                        f"put only {{\"role\": \"assistant\", ...}} messages in {key}, e.g. {example}"))
        elif not any((m.get("content") or "").strip() or m.get("tool_calls") for m in row[key]):
            out.append((key, "is empty, so there is nothing to learn", "fill it in or remove the line"))
    return out


# ---------------------------------------------------------------------------
# A file that changes under a run

@dataclass(frozen=True)
class FileStamp:
    """What tells that a file changed without reading it again: which file (device, inode), its size and its
    modification time."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.mtime_ns / 1e9))
        return f"{self.size:,} bytes, modified {when}"


# Each data file as this process's data check read it (realpath -> stamp): the rows are read again later (streamed
# as training goes, the validation file at the first eval), and they must still be the rows that were checked.
_CHECKED: dict[str, FileStamp] = {}


def stamp_of(path: Path) -> FileStamp | None:
    try:
        return FileStamp.of(os.stat(path))
    except OSError:
        return None


def checked_stamp(path: Path) -> FileStamp | None:
    """The file as the data check of this process found it, or None when it was not checked here."""
    return _CHECKED.get(os.path.realpath(path))


def changed_file_error(path: Path, was: FileStamp, now: FileStamp | None) -> DataError:
    """Said instead of what reading a changed file would give (a row that does not parse, on a line that may no
    longer exist, or silently other rows)."""
    if label_of(path) is not None:  # overnight's own copy of the user's rows (src/data/sources.py), in its cache
        return DataError(
            f"{where(path)}: overnight's converted copy of these rows ({path}) changed while the run was using it "
            f"(when it was checked: {was.describe()}; now: {now.describe() if now else 'gone'}) -> leave the cache "
            "folder alone while a run uses it; remove the copy (it is written again from the source) and continue "
            "with --auto-resume")
    return DataError(
        f"{path}: the file changed while the run was using it (when it was checked: {was.describe()}; now: "
        f"{now.describe() if now else 'gone'}). overnight reads the rows again after checking them (as it trains, "
        "and at the first evaluation), so it stopped rather than use rows nobody checked -> put the original file "
        "back and continue with --auto-resume (each checkpoint records its sha256), or train on the new file in a "
        "new run (--fresh, or another --output); to prepare new data while a run uses a file, edit a copy")


# ---------------------------------------------------------------------------
# Files

# What --data (data.path) may name; src/data/sources.py reads all but the first through a converted JSONL copy.
ACCEPTED_DATA = ("a folder holding train.jsonl (one JSON object per line; val.jsonl or valid.jsonl for validation), "
                 "train.parquet (val.parquet, validation.parquet, valid.parquet or test.parquet), the hub's "
                 "data/train-00000-of-00002.parquet shards (validation-/val-/valid-/test- shards), or what "
                 "datasets' save_to_disk wrote (a DatasetDict with train and validation/val/valid/test, or one "
                 "Dataset); a .jsonl or .parquet file; or a hub dataset id in data.hf_dataset.name")


def find_data_files(data_path: Path, columns: dict[str, str] | None = None,
                    hf_dataset: Any = None) -> tuple[Path, Path | None]:
    """(train file, validation file or None) as JSONL, whatever the source (src/data/sources.py): ``columns`` is
    data.columns, ``hf_dataset`` data.hf_dataset (its name, when set, replaces ``data_path``)."""
    from overnight.data import sources  # it reads JSONL through this module: imported here, not at the top

    return sources.find_data_files(data_path, columns, hf_dataset)


def find_jsonl_files(data_path: Path) -> tuple[Path, Path | None]:
    """(train file, validation file or None) of JSONL data. A folder needs train.jsonl and may hold val.jsonl or
    valid.jsonl (val.jsonl wins when both exist); a single file is used as the training file. The other sources
    come here when they found none of their layouts, for this refusal."""
    data_path = Path(data_path)
    if not data_path.exists():
        raise DataError(f"{data_path}: no such file or folder -> pass --data with {ACCEPTED_DATA}")
    if data_path.is_file():
        return data_path, None
    if not data_path.is_dir():  # a device, a pipe, a socket: nothing rows can be read from twice
        raise DataError(f"{data_path}: is neither a file nor a folder -> pass --data with {ACCEPTED_DATA}")
    train = data_path / "train.jsonl"
    if not train.is_file():
        if train.exists():
            raise DataError(f"{train}: is not a file -> train.jsonl must be a file with one JSON object per line")
        try:
            found = sorted(p.name for p in data_path.iterdir()
                           if p.suffix in (".jsonl", ".json", ".parquet", ".arrow", ".csv", ".tsv") or p.is_dir())
        except OSError as exc:
            raise DataError(f"{data_path}: cannot be read ({exc.strerror or exc}) -> check its permissions") from None
        extra = f" (found: {', '.join(found[:12])}{', ...' if len(found) > 12 else ''})" if found else ""
        raise DataError(f"{data_path}: missing train.jsonl{extra} and none of the other layouts overnight reads -> "
                        f"pass --data with {ACCEPTED_DATA}")
    for name in ("val.jsonl", "valid.jsonl"):
        if (data_path / name).is_file():
            return train, data_path / name
    return train, None


@dataclass
class FileReport:
    path: Path
    format: str | None = None
    format_line: int | None = None  # the line the format was detected from
    rows: int = 0
    blank_lines: int = 0
    problems: list[Problem] = field(default_factory=list)
    problem_count: int = 0
    lengths: np.ndarray | None = None  # tokens per row (a pair counts its longer side), when a tokenizer was given
    too_long: int = 0
    # Rows left with no target token within max_seq_length (a prompt that fills it, with data.mask_prompt):
    # how many, the first one's line, and the max_seq_length that would give every such row one.
    no_targets: int = 0
    no_target_line: int | None = None
    needed_max_len: int | None = None

    def add(self, line: int | None, key: str | None, message: str, hint: str = "") -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_KEPT_PROBLEMS:
            self.problems.append(Problem(self.path, line, key, message, hint))


def no_target_fix(f: FileReport, mask_prompt: bool) -> str:
    """What to change so that rows with no target token within max_seq_length train again."""
    fix = "raise model.max_seq_length" + (f" to at least {f.needed_max_len}" if f.needed_max_len else "")
    if mask_prompt and f.format in ("chat", "completion"):
        fix += " or set data.mask_prompt=false (the prompt is then trained on too)"
    return fix


@dataclass
class DataReport:
    method: str
    train: FileReport
    val: FileReport | None
    max_seq_length: int | None = None
    truncate: bool = True
    packing: bool = False
    mask_prompt: bool = True
    data_path: Path | None = None  # as the user named it (a folder or a file), for the validate-data hint
    model_dir: Path | None = None  # the tokenizer's folder, when the rows were tokenized
    sets: tuple[str, ...] = ()  # --set values the validate-data hint needs (validate_data_command)

    @property
    def files(self) -> list[FileReport]:
        return [self.train] + ([self.val] if self.val is not None else [])

    @property
    def problems(self) -> list[Problem]:
        return [p for f in self.files for p in f.problems]

    @property
    def problem_count(self) -> int:
        return sum(f.problem_count for f in self.files)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def warnings(self) -> list[str]:
        """One line per file with rows longer than max_seq_length (packed data has none: it is cut into blocks)."""
        out = []
        for f in self.files:
            if f.too_long and not self.packing:
                action = "truncated to fit" if self.truncate else "dropped (data.truncate=false)"
                out.append(f"{where(f.path)}: {f.too_long} of {f.rows} rows are longer than max_seq_length="
                           f"{self.max_seq_length} tokens and will be {action}")
            if f.no_targets:
                out.append(f"{where(f.path)}: {f.no_targets} of {f.rows} rows (e.g. "
                           f"{row_ref(f.path, f.no_target_line)}) have no target token within max_seq_length="
                           f"{self.max_seq_length} and are left out (nothing in them to learn or score); "
                           f"{no_target_fix(f, self.mask_prompt)}")
        return out

    def raise_if_problems(self) -> None:
        if self.ok:
            return
        shown = self.problems[:SHOWN_PROBLEMS]
        lines = [f"{self.problem_count} problem(s) in the data; nothing was trained or written:"]
        lines += [f"  {p}" for p in shown]
        if self.problem_count > len(shown):
            named = self.train.path if label_of(self.train.path) else self.data_path or self.train.path
            command = validate_data_command(named, self.method, self.model_dir, self.max_seq_length, self.sets)
            lines.append(f"  ... and {self.problem_count - len(shown)} more ({command} lists them all)")
        raise DataError("\n".join(lines))


@dataclass
class _Tally:
    """Rows of one format seen in a file (the file's format is chosen after the pass)."""

    first_line: int
    count: int = 0
    valid: int = 0
    lines: list[int] = field(default_factory=list)  # the first MAX_KEPT_PROBLEMS line numbers
    lengths: list[int] = field(default_factory=list)
    no_targets: int = 0
    no_target_line: int | None = None
    needed_max_len: int | None = None


Measure = Callable[[dict, str], "tuple[int, int | None, int | None]"]


def check_file(path: Path, method: str, measure: Measure | None = None,
               max_seq_length: int | None = None,
               on_line: Callable[[int, int], None] | None = None) -> FileReport:
    """One full pass over ``path``: every line parsed and checked. The file's format is the most common
    one among the formats the method can use (else the most common overall), so a single odd row is
    the one reported, wherever it is.

    ``measure(row, fmt)`` -> (tokens, target tokens within max_seq_length or None when that does not
    apply, the max_seq_length that would leave the row a target or None) fills the token statistics."""
    report = FileReport(path)
    tallies: dict[str, _Tally] = {}
    try:
        if not path.is_file():
            report.add(None, None, "is not a file", "pass a .jsonl file or a folder holding train.jsonl")
            return report
        before = stamp_of(path)
        for lineno, offset, content in iter_lines(path, report):
            if on_line is not None:  # (line number, bytes read): the caller's progress display
                on_line(lineno, offset)
            _check_line(report, tallies, lineno, content, method, measure)
    except OSError as exc:
        report.add(None, None, f"cannot be read ({exc.strerror or exc})", "check the path and its permissions")
        return report
    after = stamp_of(path)
    if before is None or after != before:
        report.add(None, None, "changed while it was being checked", "check it again once nothing writes to it")
    else:
        _CHECKED[os.path.realpath(path)] = after

    if tallies:
        _settle_format(report, tallies, method)
    if report.rows == 0 and report.problem_count == 0:
        report.add(None, None, "is empty (no rows)", f"{empty_fix(path)}; method {method} needs {method_needs(method)}")
    if measure is not None:
        report.lengths = np.asarray(tallies[report.format].lengths if report.rows else [], dtype=np.int64)
        if max_seq_length is not None:
            report.too_long = int((report.lengths > max_seq_length).sum())
    return report


def _check_line(report: FileReport, tallies: dict[str, _Tally], lineno: int, content: bytes, method: str,
                measure: Measure | None) -> None:
    """Parse and check one line, counting it under its format's tally; every problem goes into ``report``."""
    row, err = parse_line(content)
    if err:
        report.add(lineno, None, *err)
        return
    fmt = detect_format(row)
    if fmt is None:
        found = ", ".join(f"'{k}'" for k in list(row)[:8]) or "none"
        report.add(lineno, None, f"the row has none of the keys of a known format (found keys: {found})",
                   _unknown_format_hint(row, method))
        return
    tally = tallies.setdefault(fmt, _Tally(lineno))
    tally.count += 1
    if len(tally.lines) < MAX_KEPT_PROBLEMS:
        tally.lines.append(lineno)
    row_errs = row_problems(row, fmt, method)
    for key, message, hint in row_errs:
        report.add(lineno, key, message, hint)
    if row_errs:
        return
    tally.valid += 1
    if measure is not None and fmt in METHOD_FORMATS[method]:
        _measure_row(report, tally, row, fmt, lineno, measure)


def _unknown_format_hint(row: dict, method: str) -> str:
    """What to do with a row of no known format, naming the likely near miss."""
    hint = f"method {method} needs {method_needs(method)}"
    if "conversations" in row:
        return "ShareGPT 'conversations' must be converted to 'messages' with 'role'/'content'; " + hint
    if "prompt" in row:
        needed = "'chosen' and 'rejected'" if method in PAIRED else "'completion'"
        return f"a 'prompt' needs {needed}; " + hint
    return hint + " (other names for these keys are mapped with data.columns, e.g. {prompt: question})"


def _measure_row(report: FileReport, tally: _Tally, row: dict, fmt: str, lineno: int, measure: Measure) -> None:
    """Token statistics of one valid row; a row the tokenizer refuses is a problem, not a crash."""
    try:
        length, targets, needed = measure(row, fmt)
    except DataError as exc:
        report.add(lineno, exc.key, str(exc))
        return
    tally.lengths.append(length)
    if targets == 0:
        tally.no_targets += 1
        tally.no_target_line = tally.no_target_line or lineno
        if needed is not None:
            tally.needed_max_len = max(tally.needed_max_len or 0, needed)


def _settle_format(report: FileReport, tallies: dict[str, _Tally], method: str) -> None:
    """Choose the file's format after the pass (the most common the method can use, else the most common),
    report every row of another format, and take the row counts from the chosen one."""
    fitting = [f for f in tallies if f in METHOD_FORMATS[method]] or list(tallies)
    fmt = max(fitting, key=lambda f: (tallies[f].count, -tallies[f].first_line))
    chosen = tallies[fmt]
    report.format, report.format_line = fmt, chosen.first_line
    for other, tally in tallies.items():
        if other == fmt:
            continue
        for lineno in tally.lines:
            report.add(lineno, FORMAT_KEYS[other][-1],
                       f"row is in {other} format but the file is in {fmt} format (like "
                       f"{row_ref(report.path, chosen.first_line)})",
                       f"one file holds one format; make this row {format_keys_text(fmt)}")
        report.problem_count += tally.count - len(tally.lines)
    if fmt in METHOD_FORMATS[method]:
        report.rows = chosen.valid
        report.no_targets, report.no_target_line = chosen.no_targets, chosen.no_target_line
        report.needed_max_len = chosen.needed_max_len
    else:
        better = [m for m, fmts in METHOD_FORMATS.items() if fmt in fmts]
        report.add(chosen.first_line, FORMAT_KEYS[fmt][-1],
                   f"rows are in {fmt} format, which method '{method}' cannot train on",
                   f"method {method} needs {method_needs(method)}; {fmt} rows fit --method {' or '.join(better)}")
    report.problems.sort(key=lambda p: p.line or 0)
    del report.problems[MAX_KEPT_PROBLEMS:]
