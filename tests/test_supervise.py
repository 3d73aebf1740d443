"""Supervision of an unattended `overnight train` (src/runs/supervise.py): real CLI subprocesses on the tiny model,
the numpy reference backend for the many cheap cases (faults_util's hooks crash the child at exact steps), and one
torch 4-bit default run killed from outside, the way the OOM killer does it."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import faults_util as fu
from conftest import has
from overnight.commands.status import show_status
from overnight.runs import supervise

STEPS = 8


@pytest.fixture(autouse=True)
def supervised(monkeypatch):
    """conftest turns supervision off for the suite; these tests are about it."""
    monkeypatch.delenv(supervise.SUPERVISOR_ENV, raising=False)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return fu.make_small_data(tmp_path_factory.mktemp("supervise-data"))


@pytest.fixture(scope="module")
def numpy_reference(tmp_path_factory, tiny_model_dir, small_data) -> tuple[Path, Path]:
    """An uninterrupted run in this process's own way (not supervised) and the batches each step consumed."""
    base = tmp_path_factory.mktemp("supervise-ref")
    record = base / "record.jsonl"
    done = fu.run_cli(fu.train_args("numpy", tiny_model_dir, small_data, base / "run", STEPS), record=record)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "run", record


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in fu.metrics(run_dir) if r.get("event") == kind]


def wait_child_at(run_dir: Path, launch: fu.Launch, training_step: int, timeout: float = 120) -> dict:
    """The heartbeat the training child wrote before ``training_step`` (its pid is not the supervisor's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beat = fu.heartbeat(run_dir)
        if beat and beat.get("pid") != launch.pid and (beat.get("training_step") or 0) >= training_step:
            return beat
        assert launch.poll() is None, launch.tail()
        time.sleep(0.01)
    raise AssertionError(f"the child never reached step {training_step}\n{launch.tail()}")


# -- the decisions, in-process -------------------------------------------------------------------------------------

def test_a_relaunch_continues_the_same_run_and_never_starts_it_over():
    assert supervise.relaunch_argv(["--fresh", "--output", "o"]) == ["--output", "o", "--auto-resume"]
    assert supervise.relaunch_argv(["--resume-from", "4", "--before-step=9", "-q"]) == ["-q", "--auto-resume"]
    assert supervise.relaunch_argv(["--auto-resume", "x"]) == ["--auto-resume", "x"]


def test_only_crashes_are_restarted():
    for code in (-signal.SIGKILL, -signal.SIGSEGV, -signal.SIGABRT):
        assert supervise.is_restartable(code, [])
    assert supervise.is_restartable(1, ["Traceback ...", "overnight crashed unexpectedly; ..."])
    for code in (0, 2, 3, 130, 143, -signal.SIGTERM, -signal.SIGINT):
        assert not supervise.is_restartable(code, [])
    # overnight's own message for a failure a restart would only repeat (one row per micro-batch still OOM)
    assert not supervise.is_restartable(1, ["error: out of memory even at one example per micro-batch; try"])
    # a message whose continuation lines are indented (a reward function's own frames) is still overnight's own
    assert not supervise.is_restartable(1, ["error: reward r.py:f raised ValueError: boom on row t.jsonl:3; ...",
                                            "  /home/u/r.py:2 in f: raise ValueError(\"boom\")", ""])
    assert supervise.is_restartable(1, ["error: an earlier warning", "Traceback (most recent call last):",
                                        '  File "x.py", line 1', "ValueError: boom"])


def test_overnights_own_error_is_found_under_unindented_lines_after_it():
    """The message decides, not the last unindented line: a user's exception whose message runs over unindented
    lines (pydantic's ValidationError names each field on a line of its own), and a library's line printed at exit
    after overnight's message (multiprocessing's resource tracker), were restarted as crashes. An exit 1 overnight
    never explained is still restarted."""
    reward = ["error: reward judge.py:score raised ValidationError: 1 validation error for Verdict",
              "score", "  Input should be a valid number [type=float_parsing, input_value='n/a', input_type=str]",
              "  judge.py:14 in score: return [Verdict.model_validate_json(r).score for r in replies]"]
    assert not supervise.is_restartable(1, reward)
    leaked = ["error: out of memory even at one example per micro-batch; try model.grad_checkpoint=true",
              "/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There "
              "appear to be 1 leaked semaphore objects to clean up at shutdown",
              "  warnings.warn('resource_tracker: There appear to be %d '"]
    assert not supervise.is_restartable(1, leaked)
    # a crash whose exception message has a line starting like overnight's message is still a crash
    assert supervise.is_restartable(1, ["Traceback (most recent call last):", '  File "x.py", line 1',
                                        "RuntimeError: nvrtc compilation failed:", "error: identifier undefined",
                                        "overnight crashed unexpectedly; checkpoint 20 is safe. Please report it"])
    assert supervise.is_restartable(1, ["step 40/100 loss 1.23", "Segmentation fault in a worker thread"])
    assert supervise.is_restartable(1, [])


def test_an_error_whose_own_lines_outrun_the_tail_is_still_overnights():
    """The stderr tail keeps STDERR_TAIL_LINES lines; a message longer than that (a reward's exception listing many
    fields) pushed its `error:` line out, and the run read as a crash nobody explained and was restarted."""
    read_end, write_end = os.pipe()
    tee = supervise._Tee(os.fdopen(read_end, "rb", buffering=0))
    message = ["step 3/10 loss 2.1", "error: reward judge.py:score raised ValidationError: 40 validation errors"]
    message += [f"field_{i}\n  Input should be a valid number" for i in range(supervise.STDERR_TAIL_LINES)]
    os.write(write_end, ("\n".join(message) + "\n").encode())
    os.close(write_end)
    tail = tee.tail()
    assert tail[0] == message[1] and len(tail) == supervise.STDERR_TAIL_LINES + 1
    assert not supervise.is_restartable(1, tail)
    # the crash report that comes after an earlier error still decides
    read_end, write_end = os.pipe()
    tee = supervise._Tee(os.fdopen(read_end, "rb", buffering=0))
    os.write(write_end, ("error: first\n" + "x\n" * 30 + "Traceback (most recent call last):\n" + "  f\n" * 30).encode())
    os.close(write_end)
    assert supervise.is_restartable(1, tee.tail())


def test_who_is_supervised():
    class Args:
        auto_resume, devices = False, None

    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert supervise.should_supervise(Args(), 3, environ={}, stdin=Tty(False))
    assert not supervise.should_supervise(Args(), 3, environ={}, stdin=Tty(True))
    resumed = Args()
    resumed.auto_resume = True
    assert supervise.should_supervise(resumed, 3, environ={}, stdin=Tty(True))
    assert not supervise.should_supervise(resumed, 0, environ={}, stdin=Tty(False))  # train.max_restarts=0
    assert not supervise.should_supervise(resumed, 3, environ={supervise.SUPERVISOR_ENV: "123"}, stdin=Tty(False))
    job = Args()
    job.devices = 2
    assert not supervise.should_supervise(job, 3, environ={}, stdin=Tty(False))
    assert supervise.forced_split({supervise.SPLIT_ENV: "6:2"}) == (6, 2)
    assert supervise.forced_split({}) is None


# -- real processes, the numpy reference backend ----------------------------------------------------------------

def test_a_killed_child_is_restarted_and_the_run_ends_as_if_nothing_happened(
        tmp_path, tiny_model_dir, small_data, numpy_reference):
    reference, reference_record = numpy_reference
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    args = fu.train_args("numpy", tiny_model_dir, small_data, run_dir, STEPS)
    launch = fu.Launch(args, tmp_path, "sup", record=record, sleep_s=0.15)
    beat = wait_child_at(run_dir, launch, 6)
    os.kill(beat["pid"], signal.SIGKILL)  # what the OOM killer does to the trainer
    assert launch.wait(120) == 0, launch.tail()
    fu.assert_losses_match(run_dir, reference, STEPS)
    fu.assert_adapter_equal(run_dir, reference)
    assert fu.effective_record(record) == fu.effective_record(reference_record)
    (restart,) = events(run_dir, "restart")
    assert restart["signal"] == "SIGKILL" and restart["cause"] == "killed by SIGKILL"
    assert restart["during_step"] >= 6 and restart["step"] == restart["during_step"] - 1
    assert "restart 1 of 3" in launch.stderr
    said: list[str] = []
    show_status(run_dir, said.append)
    assert any(line.startswith("restarted after a crash 1 time; last: killed by SIGKILL") for line in said), said
    # A refusal (exit 3: the run exists, no --auto-resume, nobody to ask) is the user's to answer: not restarted.
    refused = fu.run_cli(args)
    assert refused.returncode == 3 and "starting it again" not in refused.stderr, refused.stderr[-2000:]


def test_a_step_that_kills_the_child_twice_runs_split_in_a_third(tmp_path, tiny_model_dir, small_data):
    # Without dropout: a split micro-batch draws its dropout masks per piece, so only then is the split step's
    # loss the same number as the unsplit one's (the numpy reference sums the same rows either way).
    def train(run_dir: Path) -> list[str]:
        return fu.train_args("numpy", tiny_model_dir, small_data, run_dir, STEPS, "--set", "lora.dropout=0")

    reference, reference_record = tmp_path / "ref", tmp_path / "ref.jsonl"
    assert fu.run_cli(train(reference), record=reference_record).returncode == 0
    run_dir, record = tmp_path / "run", tmp_path / "record.jsonl"
    args = train(run_dir)
    env = fu.cli_env(record=record)
    env["OVERNIGHT_TEST_ABORT_AT_STEP"] = "6"  # SIGABRT at step 6 while its micro-batch is whole (a Metal OOM)
    done = fu.subprocess.run([fu.sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env,
                             stdin=fu.subprocess.DEVNULL, timeout=120, cwd=fu.ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = events(run_dir, "restart")
    assert first["during_step"] == second["during_step"] == 6 and first["signal"] == "SIGABRT"
    assert "split_at_step" not in first and (second["split_at_step"], second["new_micro_splits"]) == (6, 2)
    (oom,) = events(run_dir, "oom")
    assert oom == {**oom, "step": 5, "micro_splits": 2, "cause": "repeated crash"}
    assert "micro-batch split 2 ways" in done.stderr and "split 2 ways (accumulation x2)" in done.stdout
    # The same effective batch and data: every step consumed the same samples as the uninterrupted run, and the
    # split is in the checkpoint, so a later resume keeps it.
    assert fu.effective_record(record) == fu.effective_record(reference_record)
    state = json.loads((run_dir / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["micro_splits"] == 2
    got, ref = fu.last_losses(run_dir), fu.last_losses(reference)
    assert got.keys() == ref.keys(), (got, ref)
    assert all(abs(got[s] - ref[s]) < 1e-9 for s in ref), (got, ref)


def test_restarts_exhausted_exit_1_naming_the_causes(tmp_path, tiny_model_dir, small_data):
    from test_notify import Recorder

    hook = Recorder()
    run_dir = tmp_path / "run"
    args = fu.train_args("numpy", tiny_model_dir, small_data, run_dir, STEPS, "--set", "train.max_restarts=1",
                         "--set", f"notify.webhook_url={hook.url}", every=2)
    env = fu.cli_env()
    env["OVERNIGHT_TEST_ABORT_AT_STEP"] = "3:always"
    done = fu.subprocess.run([fu.sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env,
                             stdin=fu.subprocess.DEVNULL, timeout=120, cwd=fu.ROOT)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "died 2 times and train.max_restarts is 1" in last and "killed by SIGABRT during step 3" in last, last
    assert "checkpoint (step 2) is intact" in last and "Traceback" not in done.stderr
    assert len(events(run_dir, "restart")) == 1 and len(events(run_dir, "restarts_exhausted")) == 1
    said: list[str] = []
    show_status(run_dir, said.append)
    assert said[0].startswith("failed at step 2: killed by SIGABRT; restarts exhausted"), said
    sent = [e for e in hook.events if e["event"] in ("restart", "restarts_exhausted")]
    hook.close()
    assert [e["event"] for e in sent] == ["restart", "restarts_exhausted"], hook.events
    assert sent[0]["signal"] == "SIGABRT" and sent[0]["during_step"] == 3 and sent[0]["run_dir"] == str(run_dir)


def test_a_heartbeat_another_process_wrote_says_nothing_about_this_death(tmp_path):
    (tmp_path / "heartbeat.json").write_text(json.dumps({"pid": 1, "step": 5, "training_step": 6, "micro_splits": 2}))
    assert supervise.training_step(tmp_path, 1) == (5, 6, 2)
    assert supervise.training_step(tmp_path, 2) == (None, None, None)  # died while loading: no step of its own


def test_exit_2_is_not_restarted(tmp_path, tiny_model_dir):
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"text": "fine"}\n{not json\n')
    done = fu.run_cli(fu.train_args("numpy", tiny_model_dir, bad, tmp_path / "run", STEPS))
    assert done.returncode == 2 and "starting it again" not in done.stderr, done.stderr[-2000:]
    assert "problem(s) in the data" in done.stderr and done.stderr.count("error:") == 1


def test_a_signal_to_the_supervisor_reaches_the_child_which_saves(tmp_path, tiny_model_dir, small_data):
    run_dir = tmp_path / "run"
    launch = fu.Launch(fu.train_args("numpy", tiny_model_dir, small_data, run_dir, 40), tmp_path, "sup",
                       sleep_s=0.1)
    wait_child_at(run_dir, launch, 3)
    launch.kill(signal.SIGTERM)
    assert launch.wait(60) == 143, launch.tail()
    assert "starting it again" not in launch.stderr
    (interrupted,) = events(run_dir, "interrupted")
    assert fu.checkpoint_manager(run_dir).latest_valid().step == interrupted["step"]


def test_a_supervised_run_stopped_by_sigterm_resumes_exactly(tmp_path, tiny_model_dir, small_data, numpy_reference):
    """SIGTERM to the supervisor: one save, 143; a plain `--auto-resume` then ends as the uninterrupted run does."""
    reference, _ = numpy_reference
    run_dir = tmp_path / "run"
    args = fu.train_args("numpy", tiny_model_dir, small_data, run_dir, STEPS)
    launch = fu.Launch(args, tmp_path, "sup", sleep_s=0.3)  # 8 steps: time for the signal to land mid-run
    wait_child_at(run_dir, launch, 3)
    launch.kill(signal.SIGTERM)
    assert launch.wait(60) == 143, launch.tail()
    assert len(events(run_dir, "interrupted")) == 1 and not events(run_dir, "restart")
    done = fu.run_cli(args + ["--auto-resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    fu.assert_losses_match(run_dir, reference, STEPS)
    fu.assert_adapter_equal(run_dir, reference)


def test_the_child_does_not_outlive_a_killed_supervisor(tmp_path, tiny_model_dir, small_data):
    from overnight.runs import lock

    run_dir = tmp_path / "run"
    launch = fu.Launch(fu.train_args("numpy", tiny_model_dir, small_data, run_dir, 200), tmp_path, "sup",
                       sleep_s=0.1)
    child = wait_child_at(run_dir, launch, 3)["pid"]
    launch.kill(signal.SIGKILL)
    launch.wait(10)
    deadline = time.monotonic() + 10
    while fu.heartbeat(run_dir).get("state") == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    # The parent-death signal is a SIGTERM: the child saves its step and leaves (143), the lock free.
    assert fu.heartbeat(run_dir)["state"] == "interrupted"
    deadline = time.monotonic() + 10
    while lock.holder(run_dir)[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lock.holder(run_dir)[0]
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # a zombie until init reaps it: gone within a few seconds
            os.kill(child, 0)
            time.sleep(0.05)


# -- the default path on torch (4-bit QLoRA, dropout) ------------------------------------------------------------

TORCH_STEPS = 6


def torch_4bit_args(run_dir: Path, tiny_model_dir: Path, small_data: Path, backend: str = "torch") -> list[str]:
    """The default users run: 4-bit QLoRA, dropout, evals (3, 6) off the checkpoint grid (2, 4, 6)."""
    return fu.train_args(backend, tiny_model_dir, small_data, run_dir, TORCH_STEPS, bits=4, every=2, eval_every=3,
                         keep_best=False)


def torch_child_killed_in_step_4(tmp_path: Path, tiny_model_dir: Path, small_data: Path,
                                 backend: str = "torch") -> Path:
    """A supervised 4-bit run whose training child is SIGKILLed in step 4 (after the eval at 3, before the
    checkpoint at 4): the restarted child resumes from step 2 and trains 3 and 4 again. Finished, exit 0."""
    run_dir = tmp_path / "run"
    launch = fu.Launch(torch_4bit_args(run_dir, tiny_model_dir, small_data, backend), tmp_path, "sup", sleep_s=0.2)
    os.kill(wait_child_at(run_dir, launch, 4, timeout=240)["pid"], signal.SIGKILL)
    assert launch.wait(400) == 0, launch.tail()
    (restart,) = events(run_dir, "restart")
    assert restart["signal"] == "SIGKILL" and restart["during_step"] == 4, restart
    return run_dir


torch_4bit = pytest.mark.skipif(not has("torch", "bitsandbytes"), reason="torch + bitsandbytes not installed")


@pytest.mark.parametrize("backend", [
    pytest.param("torch", marks=[torch_4bit, pytest.mark.torch]),
    pytest.param("mlx", marks=[pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="mlx not installed"),
                               pytest.mark.mlx])])
def test_4bit_sigkill_of_the_child_is_survived(backend, tmp_path, tiny_model_dir, small_data):
    """CI's variant (two processes, not three), on both backends' defaults (torch: bitsandbytes NF4; mlx: MLX
    affine 4-bit): the steps the restarted child trained again have the same losses and the same eval, bit for bit,
    as the first child's; the soak variant below compares with an uninterrupted run too (losses and adapter bytes;
    tests/test_faults.py covers that resume path on every CI run)."""
    run_dir = torch_child_killed_in_step_4(tmp_path, tiny_model_dir, small_data, backend)
    lines = fu.train_lines(run_dir)
    assert sorted(set(step for step, _ in lines)) == list(range(1, TORCH_STEPS + 1))
    again = {step for step, _ in lines if sum(1 for other, _ in lines if other == step) > 1}
    assert 3 in again, lines
    assert all(len({loss for other, loss in lines if other == step}) == 1 for step in again), lines
    evals = [(r["step"], r["val_loss"]) for r in events(run_dir, "eval")]
    assert [e for e in evals if e[0] == 3] == [evals[0]] * 2 and (run_dir / "adapter").is_dir(), evals


@torch_4bit
@pytest.mark.soak
def test_torch_4bit_sigkill_of_the_child_is_survived_exactly(tmp_path, tiny_model_dir, small_data):
    reference = tmp_path / "ref"
    done = fu.run_cli(torch_4bit_args(reference, tiny_model_dir, small_data))
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = torch_child_killed_in_step_4(tmp_path, tiny_model_dir, small_data)
    fu.assert_losses_match(run_dir, reference, TORCH_STEPS)
    fu.assert_adapter_equal(run_dir, reference)


@pytest.mark.torch
@pytest.mark.skipif(not has("torch", "transformers", "peft"), reason="needs torch")
def test_a_reward_function_that_raises_is_not_restarted(tmp_path, tiny_model_dir):
    """A user's reward that raises fails the run once (exit 1, its frames named): restarting would fail the same way
    and, before that, log the same completions again."""
    (tmp_path / "rewards.py").write_text("def broken(prompts, completions, **kw):\n    raise ValueError('boom')\n")
    args = ["train", "--backend", "torch", "--model", str(tiny_model_dir), "--data", str(fu.DATA_DIR / "grpo"),
            "--method", "grpo", "--output", str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "2", "--quiet",
            "--set", f"grpo.rewards=[{tmp_path / 'rewards.py'}:broken]", "--set", "grpo.max_new_tokens=4",
            "--set", "model.max_seq_length=64", "--set", "eval.every_steps=1000", "--set", "grpo.eval_prompts=2"]
    done = fu.run_cli(args)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "broken raised ValueError: boom" in done.stderr and "rewards.py:2 in broken" in done.stderr
    assert "starting it again" not in done.stderr, done.stderr[-2000:]
    assert len(events(tmp_path / "run", "failed")) == 1
