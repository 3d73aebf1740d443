"""`overnight validate-data`: the report, its exit codes, and a fuzz over malformed lines."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
from conftest import DATA_DIR, ROOT

from overnight.config import Config
from overnight.data import DataError, TrainStream, check_data, load_tokenizer
from overnight.commands.validate_data import validate_data_main


def run(path, method=None, model=None, **kw) -> tuple[int, str]:
    lines: list[str] = []
    code = validate_data_main(str(path), method, str(model) if model else None, out=lines.append, **kw)
    return code, "\n".join(lines)


def test_clean_bundled_data(tiny_model_dir):
    code, text = run(DATA_DIR)
    assert code == 0 and "method sft, inferred" in text and "train.jsonl: 400 valid row(s), chat format" in text
    assert "no problems" in text and "pass --model" in text
    code, text = run(DATA_DIR / "preference", model=tiny_model_dir)
    assert code == 0 and "method dpo" in text
    assert "tokens per pair (longer side): min " in text and "0 longer than max_seq_length 2048" in text
    code, text = run(DATA_DIR / "text", method="cpt", model=tiny_model_dir, max_seq_length=16)
    assert code == 0 and "longer than max_seq_length 16" in text and "would be" not in text  # packed


def test_token_statistics(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    texts = ["a", "a b c d e f", "word " * 40]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lengths = sorted(len(tok.encode(t)) + 1 for t in texts)
    code, text = run(tmp_path, model=tiny_model_dir, max_seq_length=10)
    assert code == 0
    assert (f"tokens per row: min {lengths[0]}, median {lengths[1]}, max {lengths[2]}; "
            "1 longer than max_seq_length 10 (would be truncated)") in text


def test_problems_exit_2_with_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "ok"}\n{"text": 1}\n\nnope\n')
    (tmp_path / "valid.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n')
    code, text = run(tmp_path)
    assert code == 2 and "2 problem(s):" in text
    assert f"{tmp_path / 'train.jsonl'}:2: key 'text': must be a string" in text
    assert f"{tmp_path / 'train.jsonl'}:4: not valid JSON" in text
    assert "1 blank line(s) skipped" in text
    code, text = run(tmp_path, method="dpo")
    assert code == 2 and f"{tmp_path / 'valid.jsonl'}:1: key 'completion': rows are in completion format" in text


def test_usage_errors_exit_2(tmp_path, tiny_model_dir):
    code, text = run(tmp_path / "missing")
    assert code == 2 and "no such file or folder" in text
    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    code, text = run(tmp_path, method="ppo")
    assert code == 2 and "unknown method 'ppo'" in text
    code, text = run(tmp_path, model=tmp_path)
    assert code == 2 and "no tokenizer.json" in text


# ---------------------------------------------------------------------------
# Fuzz: every malformed line is refused with exit 2 and its file:line, never a traceback.

VALID = {
    "sft": lambda i: {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]},
    "cpt": lambda i: {"text": f"document {i}"},
    "dpo": lambda i: {"prompt": f"p{i}", "chosen": "yes", "rejected": "no"},
}
KEYS = {"sft": "messages", "cpt": "text", "dpo": "chosen"}
JUNK_VALUES = [None, True, 0, -1.5, [], {}, [1, "a"], {"a": {"b": []}}, "", "   "]


def malformed_line(rng: random.Random, method: str) -> bytes:
    """A line that no method's check may accept. Each kind is invalid by construction."""
    good = json.dumps(VALID[method](99))
    kind = rng.randrange(12)
    if kind == 0:  # cut short: the closing brace is always lost
        line = good[:rng.randrange(1, len(good) - 1)].encode()
    elif kind == 1:  # invalid UTF-8 bytes spliced in
        raw = bytearray(good.encode())
        raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xFE, 0xC0, 0x80, 0xF8])
        line = bytes(raw)
    elif kind == 2:  # JSON, but not an object
        line = json.dumps(rng.choice([1, "text", [good], None, True, 2.5])).encode()
    elif kind == 3:  # an object without any format's keys
        line = json.dumps({rng.choice(["q", "input", "output", "conversations", "prompt"]): "x"}).encode()
    elif kind == 4:  # the format's key holding a wrong value
        row = VALID[method](1)
        row[KEYS[method]] = rng.choice(JUNK_VALUES[:-2] if method != "cpt" else JUNK_VALUES)
        line = json.dumps(row).encode()
    elif kind == 5:  # random printable garbage (the 'x' keeps it from being a JSON value)
        line = ("x" + "".join(rng.choice('{}[]":,abc 0129\\') for _ in range(rng.randrange(30)))).encode()
    elif kind == 6:  # deep nesting
        depth = rng.choice([50, 5000, 200000])
        line = ("[" * depth + "]" * depth).encode()
    elif kind == 7:  # an integer too long for Python's int parser
        line = ('{"text": ' + "9" * 5000 + "}").encode()
    elif kind == 8:  # a raw control character inside a string
        line = good.replace("yes", "y\x01s").replace("q99", "q\x0299").replace("document", "doc\x00ument").encode()
    elif kind == 9:  # another method's row
        other = rng.choice([m for m in VALID if m != method])
        line = json.dumps(VALID[other](5)).encode()
    elif kind == 10:  # broken messages / missing keys inside the format
        line = json.dumps(rng.choice([
            {"messages": [{"role": "bot", "content": "x"}]},
            {"messages": [{"role": "user"}]},
            {"messages": "hello"},
            {"prompt": "a", "chosen": "b"},
            {"prompt": "a", "rejected": "b"},
            {"text": ""},
        ])).encode()
    else:  # trailing garbage after a valid object
        line = (good + rng.choice([",", "}", " x", "{}", "]"])).encode()
    return line.replace(b"\n", b" ").replace(b"\r", b" ")


def test_fuzz_malformed_lines_always_exit_2_with_file_line(tmp_path, tiny_model_dir, capsys):
    rng = random.Random(20240611)
    tok = load_tokenizer(tiny_model_dir)
    for trial in range(300):
        method = rng.choice(list(VALID))
        n = rng.randrange(2, 8)  # two good rows at least, so the file's format is never a tie with the bad one
        lines = [json.dumps(VALID[method](i)).encode() for i in range(n)]
        bad_at = rng.randrange(n + 1)
        lines.insert(bad_at, malformed_line(rng, method))
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        path = folder / "train.jsonl"
        path.write_bytes(b"\n".join(lines) + rng.choice([b"\n", b""]))
        bad_line = bad_at + 1
        model = tiny_model_dir if trial % 5 == 0 else None
        code, text = run(folder, method=method, model=model)
        assert code == 2, (trial, lines[bad_at], text)
        assert f"{path}:{bad_line}:" in text, (trial, lines[bad_at], text)

        report = check_data(folder, method, tokenizer=tok if model else None)
        with pytest.raises(DataError, match=f"{path}:{bad_line}:"):
            report.raise_if_problems()
        if trial % 10 == 0:
            # Used without the check, the stream still refuses with file:line (or, for rows that only
            # break the method's format rules, at construction).
            cfg = Config()
            cfg.data.method = method
            cfg.train.batch_size = 2
            with pytest.raises(DataError):
                stream = TrainStream(path, tok, cfg)
                for _ in range(n + 2):
                    stream.next_batch()
    assert "Traceback" not in capsys.readouterr().out


# ---------------------------------------------------------------------------
# A max_seq_length that leaves rows no target token


def test_validate_data_refuses_a_max_seq_length_that_leaves_nothing_to_learn(tiny_model_dir):
    code, text = run(DATA_DIR, model=tiny_model_dir, max_seq_length=8)
    assert code == 2
    assert "400 with no target token within max_seq_length 8 (e.g. line 1; they would train nothing)" in text
    assert (f"{DATA_DIR / 'train.jsonl'}:1: no row has a target token within model.max_seq_length=8 "
            "(data.mask_prompt=true), so training would learn nothing") in text
    assert "raise model.max_seq_length to at least 33 or set data.mask_prompt=false" in text
    code, text = run(DATA_DIR, model=tiny_model_dir, max_seq_length=20)  # some rows only: counted, not refused
    assert code == 0 and "75 with no target token within max_seq_length 20 (e.g. line 2;" in text
    assert run(DATA_DIR, model=tiny_model_dir, max_seq_length=33)[1].count("no target token") == 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_validate_data_refuses_a_max_seq_length_below_one(bad):
    code, text = run(DATA_DIR, max_seq_length=bad)
    assert code == 2 and "max_seq_length must be a whole number of tokens, at least 1" in text


def test_train_refuses_a_max_seq_length_with_no_target_before_anything_is_written(tmp_path, tiny_model_dir):
    """The real command line: exit 2 with file, line, length and fixes, no traceback, no run directory."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "overnight", "train", "--backend", "refbackend:NumpyBackend", "--model",
         str(tiny_model_dir), "--data", str(DATA_DIR), "--output", str(out), "--max-steps", "3", "--quiet",
         "--set", "model.max_seq_length=8"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{DATA_DIR / 'train.jsonl'}:1: no row has a target token within model.max_seq_length=8" in result.stderr
    assert "data.mask_prompt=false" in result.stderr and not out.exists()


def test_the_hint_in_a_training_refusal_checks_what_the_run_checked(tmp_path, tiny_model_dir):
    """grpo prompts that end with the answer: wrong for grpo, fine for the sft validate-data infers. The hint once
    omitted --method, so the command it suggested reported no problems."""
    import shlex

    from test_cli import base_args, overnight

    chat = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    (tmp_path / "train.jsonl").write_text((json.dumps(chat) + "\n") * 25)
    args = base_args(tiny_model_dir, tmp_path / "run", 2, "--method", "grpo", "--set", "grpo.rewards=[exact_match]")
    args[args.index("--data") + 1] = str(tmp_path)
    refused = overnight(*args)
    assert refused.returncode == 2 and "25 problem(s)" in refused.stderr, refused.stderr
    hint = refused.stderr.split("... and 5 more (`", 1)[1].split("`", 1)[0]
    assert hint == (f"overnight validate-data {tmp_path} --method grpo --set 'grpo.rewards=[exact_match]' "
                    f"--model {tiny_model_dir} --max-seq-length 128"), hint
    checked = overnight(*shlex.split(hint)[1:])
    assert checked.returncode == 2 and "25 problem(s):" in checked.stdout, checked.stdout + checked.stderr
    assert run(tmp_path)[0] == 0  # the hint without --method: "no problems"


# validate-data refuses and warns as train does, on the same flags


def train_check(tmp_path, model, data, method, sets, capsys, argv=None) -> tuple[str, str]:
    """train's own pre-training check (config, data, method) as the command line runs it, without the model:
    (the error it refuses with or "", the warnings it said)."""
    from overnight.commands.cli import FLAG_KEYS, build_parser
    from overnight.runs.lifecycle import EXPECTED_ERRORS, check_before_training

    argv = argv or (["train", "--model", str(model), "--data", str(data), "--method", method, "--output",
                     str(tmp_path / "run")] + [a for s in sets for a in ("--set", s)])
    args = build_parser().parse_args(argv)
    capsys.readouterr()
    try:
        check_before_training(args, {key: getattr(args, name) for name, key in FLAG_KEYS.items()})
        error = ""
    except EXPECTED_ERRORS as exc:
        error = str(exc)
    said = capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    return error, "\n".join(line for line in said.splitlines() if line.startswith("warning: "))


def test_validate_data_refuses_a_grpo_row_without_the_field_a_reward_reads(tmp_path, tiny_model_dir, capsys):
    sets = ["grpo.rewards=[exact_match=solution]"]
    error, _ = train_check(tmp_path, tiny_model_dir, DATA_DIR / "grpo", "grpo", sets, capsys)
    assert "train.jsonl:1: key 'solution': missing; reward exact_match=solution reads it" in error
    code, text = run(DATA_DIR / "grpo", "grpo", tiny_model_dir, sets=sets)
    assert code == 2 and f"error: {error}" in text
    assert run(DATA_DIR / "grpo", "grpo", tiny_model_dir, sets=["grpo.rewards=[exact_match=answer]"])[0] == 0


def test_validate_data_warns_of_a_config_key_the_method_never_reads(tmp_path, tiny_model_dir, capsys):
    sets = ["grpo.group_size=8", "preference.beta=0.2"]
    error, warnings = train_check(tmp_path, tiny_model_dir, DATA_DIR, "sft", sets, capsys)
    assert error == "" and warnings.count("warning: ") == 2
    assert "config key 'grpo.group_size' is set to 8, but data.method sft does not read it" in warnings
    code, text = run(DATA_DIR, "sft", tiny_model_dir, sets=sets)
    assert code == 0 and warnings and warnings in text
    code, text = run(DATA_DIR, None, None, sets=sets)  # inferred sft from the rows: the same words
    assert code == 0 and warnings in text
    assert "warning" not in run(DATA_DIR, "sft", None)[1]


def test_validate_data_checks_the_config_for_the_method_it_checks(tmp_path, tiny_model_dir, capsys):
    """--method grpo with no grpo.rewards: train refuses the config; validate-data checked it as sft's and said the
    data was ready."""
    from overnight.config import ConfigError

    error, _ = train_check(tmp_path, tiny_model_dir, DATA_DIR / "grpo", "grpo", [], capsys)
    assert error.startswith("config key 'grpo.rewards' is empty: method grpo needs at least one reward")
    with pytest.raises(ConfigError) as refused:
        run(DATA_DIR / "grpo", "grpo", tiny_model_dir)
    assert str(refused.value) == error


def test_validate_data_reads_the_runs_config_file_as_train_does(tmp_path, tiny_model_dir, capsys):
    """--config: the YAML's method, data, local model and keys, with train's warning and refusal."""
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{path: {tiny_model_dir}}}\ndata: {{path: {DATA_DIR / 'grpo'}, method: grpo}}\n"
                      "grpo: {rewards: [exact_match=solution]}\npreference: {beta: 0.3}\n")
    error, warnings = train_check(tmp_path, None, None, None, [], capsys,
                                  ["train", str(config), "--output", str(tmp_path / "run")])
    assert "key 'solution': missing" in error and "config key 'preference.beta' is set to 0.3" in warnings
    lines: list[str] = []
    assert validate_data_main(None, None, None, out=lines.append, config=str(config)) == 2
    assert lines[0] == warnings and f"error: {error}" in lines
    config.write_text(config.read_text().replace("solution", "answer"))
    lines = []
    assert validate_data_main(None, None, None, out=lines.append, config=str(config)) == 0
    assert "tokens per row" in "\n".join(lines)  # the config's local model: train's length checks


def test_validate_data_piped_into_head_is_no_crash(tiny_model_dir):
    """`overnight validate-data ... | head -1`: the reader goes away after a line; it crashed with a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "overnight", "validate-data", str(DATA_DIR), "--model",
                             str(tiny_model_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err
