"""What an overnight run prints, read the next morning: the start banner, one line per eval and per checkpoint,
plain progress lines when stderr is a file, the data check's progress, and no library noise."""
from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
import warnings

import pytest

from conftest import DATA_DIR, has
from test_cli import base_args, env, on_terminal, overnight
from overnight.train.progress import DataCheckProgress

PLAIN = re.compile(r"^\d\d:\d\d:\d\d Training: (\d+)% \| step=(\d+)/(\d+) \| loss=(\S+) \| loss_avg=(\S+) \| "
                   r"eta=(\d+:\d\d|\?) \| ckpt=-(\d+) \| memory_mb=(\d+) \| mem_delta=([+-]\d+)( ⚠)?$")
EVAL = re.compile(r"^eval step (\d+): val_loss=\S+ ppl=\S+ score=\S+ \((new best|best is still step \d+)\)$")
CHECKPOINT = re.compile(r"^checkpoint step (\d+) saved( \(the best so far\)|; best is step \d+)?(; removed step [\d, ]+)?$")


def loud(args: list[str]) -> list[str]:
    return [a for a in args if a != "--quiet"]


def test_stderr_in_a_file_gets_plain_lines_and_stdout_tells_the_story(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err:
        result = subprocess.run([sys.executable, "-m", "overnight", *loud(base_args(tiny_model_dir, out, 20))],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env(), stdin=subprocess.DEVNULL,
                                timeout=120)
    assert result.returncode == 0, result.stdout
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "\r" not in stderr and "\x1b" not in stderr
    progress = [line for line in stderr.splitlines() if "Training:" in line]
    assert progress and all(PLAIN.match(line) for line in progress), progress
    steps = [int(PLAIN.match(line).group(2)) for line in progress]
    assert steps[0] == 1 and steps[-1] == 20 and steps == sorted(steps)  # the first step, every 10%, the end
    assert set(range(2, 21, 2)) <= set(steps)

    lines = result.stdout.splitlines()
    evals = [EVAL.match(line) for line in lines if line.startswith("eval step")]
    assert [int(m.group(1)) for m in evals] == [4, 8, 12, 16, 20], lines
    assert evals[0].group(2) == "new best"
    checkpoints = [CHECKPOINT.match(line) for line in lines if line.startswith("checkpoint step")]
    assert all(checkpoints), lines
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.group(1) for m in checkpoints] == [str(e["step"]) for e in events if e["event"] == "checkpoint"]
    # the best checkpoint is named as such, and rotation says what it removed
    best_steps = {e["step"] for e in events if e["event"] == "eval" and e["best"]}
    for m in checkpoints:
        if int(m.group(1)) in best_steps:
            assert m.group(2) == " (the best so far)"
    assert any(m.group(3) for m in checkpoints)


def test_start_banner_names_the_run_and_a_resume_says_from_where(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    first = overnight(*base_args(tiny_model_dir, out, 6, "--set", "train.grad_accumulation=2"))
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert re.search(r"^model: .* \| trainable params [\d,]+ of [\d,]+", first.stdout, re.M)
    train = next(line for line in lines if line.startswith("data train:"))
    rows = sum(1 for line in (DATA_DIR / "train.jsonl").read_text().splitlines() if line.strip())
    assert re.fullmatch(rf"data train: .*train\.jsonl \| {rows:,} rows, [\d,]+ tokens", train), train
    assert any(line.startswith("data val:") and "rows" in line for line in lines)
    assert "plan: 6 steps | effective batch 8 (batch 4 x accumulation 2)" in lines
    assert "eval every 4 steps | checkpoint every 5 steps (keep last 3 + best)" in lines
    assert f"run dir: {out}" in lines
    assert lines.index(train) < next(i for i, line in enumerate(lines) if line.startswith("eval step"))

    more = overnight(*base_args(tiny_model_dir, out, 9, "--set", "train.grad_accumulation=2", "--auto-resume",
                                "--allow-config-change"))
    assert more.returncode == 0, more.stderr
    assert f"run dir: {out} | resuming from step 6" in more.stdout.splitlines()


def test_terminal_line_fits_80_columns(tmp_path, tiny_model_dir):
    code, text = on_terminal(loud(base_args(tiny_model_dir, tmp_path / "run", 8)), None, columns=80)
    assert code == 0, text
    drawn = [part.strip() for chunk in text.split("\n") for part in chunk.split("\r") if re.search(r"(^|\s)loss=", part)]
    assert drawn, text
    for line in drawn:
        line = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line)
        assert len(line) <= 79, line
        assert re.search(r"eta=(\d+:\d\d|\?)", line) and "mem" in line, line
    assert any("step 8" in line for line in text.splitlines() if line.startswith("eval step"))


def test_quiet_prints_no_progress_but_still_the_evals_and_checkpoints(tmp_path, tiny_model_dir):
    result = overnight(*base_args(tiny_model_dir, tmp_path / "run", 8))
    assert result.returncode == 0
    assert "Training:" not in result.stderr + result.stdout
    assert any(EVAL.match(line) for line in result.stdout.splitlines())
    assert any(CHECKPOINT.match(line) for line in result.stdout.splitlines())


# ------------------------------------------------------------------ the data check's progress

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_data_check_shows_progress_on_a_large_file_only(tmp_path):
    from overnight.data import check_data

    rows = 5000
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 5}) + "\n" for i in range(rows)))
    clock, out = Clock(), io.StringIO()
    shown = DataCheckProgress(out=out, clock=clock, terminal=False)

    def slow(path, seen, done, total):  # every row takes 1 ms: a 5 s check
        clock.now += 0.001
        shown(path, seen, done, total)

    report = check_data(tmp_path, "cpt", on_progress=slow)
    shown.done()
    assert report.ok and report.train.rows == rows
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()  # nothing for 2 s, then one every 5 s
    m = re.fullmatch(r"checking data: train\.jsonl ([\d,]+) rows \((\d+)%\)", lines[0])
    assert m and 2000 <= int(m.group(1).replace(",", "")) <= 2300 and 40 <= int(m.group(2)) <= 46, lines

    fast_out = io.StringIO()
    check_data(tmp_path, "cpt", on_progress=DataCheckProgress(out=fast_out, clock=Clock(), terminal=False))
    assert fast_out.getvalue() == ""  # a check that takes under 2 s prints nothing


def test_data_check_progress_redraws_in_place_on_a_terminal_and_clears_after():
    clock, out = Clock(), io.StringIO()
    shown = DataCheckProgress(out=out, clock=clock, terminal=True, first_after=0.0, every_s=1.0)
    for row in range(1, 2000):
        clock.now += 0.01
        shown("train.jsonl", row, row, 2000)
    shown.done()
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") >= 5 and text.endswith("\r\x1b[K")


def test_data_check_progress_never_stops_the_check():
    class Broken:
        def write(self, _):
            raise OSError(5, "Input/output error")

        flush = write

    shown = DataCheckProgress(out=Broken(), clock=Clock(), terminal=True, first_after=0.0)
    shown("train.jsonl", 1, 1, 10)
    shown.done()


# ------------------------------------------------------------------ library noise

NOISE = ("kernels-community", "Loading weights", "MatMul8bitLt", "gemv_4bit", "Input type into Linear4bit",
         "UserWarning", "FutureWarning", "DeprecationWarning", "it/s]")


@pytest.mark.skipif(not has("torch", "transformers", "peft", "bitsandbytes"), reason="needs the torch extra")
@pytest.mark.parametrize("quiet", [True, False])
def test_a_real_4bit_torch_run_prints_no_library_noise(tmp_path, tiny_model_dir, quiet):
    args = ["train", "--backend", "torch", "--model", str(tiny_model_dir), "--data", str(DATA_DIR),
            "--output", str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "4",
            "--set", "model.quantization.bits=4", "--set", "eval.every_steps=2", "--set", "eval.max_batches=1",
            "--set", "eval.predictions=1", "--set", "eval.max_new_tokens=4", "--set", "model.max_seq_length=64",
            *(["--quiet"] if quiet else [])]
    result = overnight(*args, timeout=300)
    assert result.returncode == 0, result.stderr
    for needle in NOISE:
        assert needle not in result.stdout + result.stderr, (needle, result.stderr)
    assert "eval step 2:" in result.stdout and "finished at step 3" in result.stdout
    if not quiet:
        assert "\r" not in result.stderr and "step=3/3" in result.stderr


def test_noise_filters_drop_and_rephrase_only_the_known_messages(capsys):
    from overnight.backends import noise

    noise.install()
    handler_out = io.StringIO()
    handler = logging.StreamHandler(handler_out)
    loggers = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.nn.modules", "bitsandbytes.autograd._functions",
               "kernels._internals.hf_hub")
    for name in loggers:
        logging.getLogger(name).addHandler(handler)
    try:
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "No module named 'kernels'")
        logging.getLogger("kernels._internals.hf_hub").warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
            "Hub is in offline mode.")
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'someone/else'")
        logging.getLogger("bitsandbytes.autograd._functions").warning(
            "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        for _ in range(3):
            logging.getLogger("bitsandbytes.nn.modules").warning(
                "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 (default). "
                "This will lead to slow inference or training speed.")
        logging.getLogger("bitsandbytes.nn.modules").warning("something else entirely")
    finally:
        for name in loggers:
            logging.getLogger(name).removeHandler(handler)
    # the rest of those loggers still speaks
    assert handler_out.getvalue() == "Skipping publisher trust check for 'someone/else'\nsomething else entirely\n"
    said = capsys.readouterr().out
    assert said.count("the 4-bit layers get float16 inputs") == 1 and "bnb_4bit_compute_dtype" not in said

    shown = []
    original = noise._original_showwarning
    noise._original_showwarning = lambda message, *a, **k: shown.append(str(message))
    try:
        for _ in range(2):
            noise._showwarning(UserWarning("bitsandbytes::gemv_4bit: an autograd kernel was not registered to the "
                                           "Autograd key(s) but we are trying to backprop through it."),
                               UserWarning, "x.py", 1)
        noise._showwarning(UserWarning("a warning of the user's own"), UserWarning, "x.py", 1)
    finally:
        noise._original_showwarning = original
    assert shown == ["a warning of the user's own"]
    assert capsys.readouterr().out.count("gemv_4bit") == 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        noise.install()
        warnings.warn_explicit("deprecated inside peft", FutureWarning, "peft/tuners/lora.py", 1,
                               module="peft.tuners.lora")
        warnings.warn_explicit("deprecated in the user's code", FutureWarning, "train.py", 1, module="mytrain")
    assert [str(w.message) for w in caught] == ["deprecated in the user's code"]


def test_validate_data_shows_the_same_progress(tmp_path, monkeypatch):
    from overnight.commands import validate_data as datacheck

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(600)))
    err = io.StringIO()
    monkeypatch.setattr(datacheck, "DataCheckProgress",
                        lambda: DataCheckProgress(out=err, terminal=False, first_after=0.0, every_s=0.0))
    assert datacheck.validate_data_main(str(tmp_path), "cpt", None, out=lambda line: None) == 0
    lines = err.getvalue().splitlines()
    assert [re.fullmatch(r"checking data: train\.jsonl (\d+) rows \(\d+%\)", line).group(1) for line in lines] == [
        "1", "257", "513"]  # the clock is read every 256 rows
