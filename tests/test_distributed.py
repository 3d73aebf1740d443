"""Data parallel (src/distributed.py): the global batch and its shares, the agreed decisions, the launcher
commands, and the real loop run by two ranks (threads sharing a numpy all-reduce, tests/threadworld.py) against one process taking
the same global batch. The real backends' jobs (torchrun / mlx.launch processes) are in test_distributed_jobs.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from overnight import distributed
from overnight.runs import launch
from overnight.backend import Batch, noise_seed
from overnight.runs.checkpoint import CheckpointManager
from overnight.runs.effects import FollowerEffects, RunEffects
from overnight.config import build_config
from overnight.train.loop import train
from overnight.train.progress import Progress
from overnight.runs.rundir import RunFiles, read_metrics
from overnight.train.stopping import Stop, agreed_stop
from overnight.train.validation import Validator

from refbackend import NumpyBackend, SyntheticStream
from threadworld import run_ranks


# -- who this process is --------------------------------------------------------------------------------

def test_launcher_is_read_from_the_launchers_own_variables():
    assert distributed.launcher({}) is None
    assert distributed.launcher({"WORLD_SIZE": "1", "RANK": "0"}) is None  # torchrun --nproc_per_node 1
    assert distributed.launcher({"WORLD_SIZE": "2", "RANK": "1"}) == "torchrun"
    assert distributed.launcher({"MLX_RANK": "0", "MLX_HOSTFILE": ""}) is None  # mlx.launch -n 1
    assert distributed.launcher({"MLX_RANK": "1", "MLX_HOSTFILE": "/tmp/hosts.json"}) == "mlx.launch"
    assert distributed.env_rank({"WORLD_SIZE": "2", "RANK": "1"}) == 1
    assert distributed.env_rank({"MLX_RANK": "1", "MLX_HOSTFILE": "/tmp/h"}) == 1
    assert distributed.env_rank({"RANK": "3"}) == 0  # not launched: a stray RANK says nothing


def test_a_single_process_joins_nothing():
    world = distributed.join(object(), environ={})
    assert (world.rank, world.size) == (0, 1)
    assert world.all_sum([1.0, 2.0]).tolist() == [1.0, 2.0]


def test_a_backend_without_data_parallel_is_refused_under_a_launcher():
    from overnight.errors import UsageError

    class Plain:
        name = "plain"

    with pytest.raises(UsageError, match="no data-parallel support"):
        distributed.join(Plain(), environ={"WORLD_SIZE": "2", "RANK": "0"})


def test_devices_flag_becomes_the_backends_launcher():
    argv = ["cfg.yaml", "--devices", "2", "--auto-resume", "--devices=4", "--output", "run"]
    assert launch.without_devices_flag(argv) == ["cfg.yaml", "--auto-resume", "--output", "run"]
    torch_cmd = launch.launch_command("torch", 2, ["cfg.yaml"])
    assert torch_cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert torch_cmd[-4:] == ["-m", "overnight", "train", "cfg.yaml"]
    mlx_cmd = launch.launch_command("mlx", 2, ["cfg.yaml"])
    assert mlx_cmd[0].endswith("mlx.launch") and mlx_cmd[1:5] == ["-n", "2", "--backend", "ring"]
    assert mlx_cmd[mlx_cmd.index("--") + 1:][1:] == ["-m", "overnight", "train", "cfg.yaml"]


def test_devices_below_one_is_a_usage_error(capsys):
    from overnight.commands.cli import main

    assert main(["train", "--devices", "0"]) == 2
    assert "--devices 0" in capsys.readouterr().err


# -- `--devices`: the supervisor between the user and the launcher ------------------------------------------

# A stand-in launcher (what torchrun / mlx.launch do for this purpose: start N ranks with the launcher's variables
# and wait for them) and a stand-in rank that notes itself as `python -m overnight` does, then acts out its part.
STAND_IN_LAUNCHER = """
import os, subprocess, sys
parts = sys.argv[2:]
ranks = [subprocess.Popen([sys.executable, sys.argv[1], part], env=dict(os.environ, RANK=str(rank),
         WORLD_SIZE=str(len(parts)))) for rank, part in enumerate(parts)]
sys.exit(max(abs(rank.wait()) for rank in ranks) and 1)  # like torchrun: 1 whatever a rank said
"""
STAND_IN_RANK = """
import os, signal, sys, time
from overnight.runs.launch import note_rank_exit, note_rank_started
part = sys.argv[1]
def leave(signum, frame):
    note_rank_exit(128 + signum)
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, leave)
signal.signal(signal.SIGINT, leave)
note_rank_started()
if part == "hang":
    os.kill(os.getpid(), signal.SIGSTOP)  # alive, never answering (SIGKILL still works)
if part == "port":  # what a rank whose port another program took does in the join (lifecycle.run_train)
    from overnight.runs.launch import note_port_taken
    note_port_taken()
    note_rank_exit(1)
    sys.exit(1)
if part.startswith("exit"):
    time.sleep(0.5)
    note_rank_exit(int(part[4:]))
    sys.exit(int(part[4:]))
time.sleep(60)
"""


def supervise_stand_ins(tmp_path, *parts, signal_after_s=None, grace_s=1.0):
    import os
    import signal
    import sys
    import threading

    from overnight.runs.launch import supervise

    (tmp_path / "launcher.py").write_text(STAND_IN_LAUNCHER)
    (tmp_path / "rank.py").write_text(STAND_IN_RANK)
    if signal_after_s is not None:  # the user's `kill` to the `overnight train --devices` process
        threading.Timer(signal_after_s, os.kill, (os.getpid(), signal.SIGTERM)).start()
    command = [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "rank.py"), *parts]
    return supervise(command, len(parts), poll_s=0.05, grace_s=grace_s)


def test_devices_job_exits_with_the_ranks_code_not_the_launchers(tmp_path):
    assert supervise_stand_ins(tmp_path, "exit0", "exit0") == 0
    assert supervise_stand_ins(tmp_path, "exit1", "exit2") == 2  # the one the user must act on
    assert supervise_stand_ins(tmp_path, "exit3", "exit0") == 3


def test_a_job_whose_port_was_taken_starts_again_at_once_on_a_new_command(tmp_path, capsys):
    """The other rank waits in the join for the one that could not listen: it is stopped at once, not after the
    straggler grace, and the job starts again from a new command (new ports); the end said is the last job's."""
    import sys
    import time

    from overnight.runs import launch

    (tmp_path / "launcher.py").write_text(STAND_IN_LAUNCHER)
    (tmp_path / "rank.py").write_text(STAND_IN_RANK)
    attempts = [["port", "wait"], ["exit0", "exit0"]]

    def command():
        return [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "rank.py"), *attempts.pop(0)]

    started = time.monotonic()
    assert launch.supervise(command, 2, poll_s=0.05, grace_s=60.0, attempts=3) == 0
    assert time.monotonic() - started < 30 and not attempts
    err = capsys.readouterr().err
    assert "starting the job again on other ports (2 of 3)" in err and "job ended" not in err, err

    attempts[:] = [["port", "wait"]] * 2  # taken every time: the last attempt's end is the job's
    assert launch.supervise(command, 2, poll_s=0.05, grace_s=60.0, attempts=2) == 1
    err = capsys.readouterr().err
    assert err.count("starting the job again") == 1 and "the 2-process job ended with exit code 1" in err, err


def test_free_ports_are_consecutive_free_and_below_the_ephemeral_range(monkeypatch):
    """mlx.launch's ring listens on --starting-port + rank: the second port must be free too, and outside the range
    the kernel hands to outgoing connections (a port there can be taken between the choice and the bind)."""
    import random
    import socket

    from overnight.runs import launch

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    draws = [taken - 1]  # the first draw's second port is held by "another program"
    real_randint = random.randint
    monkeypatch.setattr(random, "randint", lambda low, high: draws.pop(0) if draws else real_randint(low, high))
    try:
        first = launch.free_ports(4)
    finally:
        held.close()
    assert first != taken - 1 and not draws
    assert first + 4 < launch._ephemeral_low()
    for port in range(first, first + 4):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_devices_job_relays_a_signal_to_every_rank_and_exits_with_its_code(tmp_path, capsys):
    import time

    started = time.monotonic()
    assert supervise_stand_ins(tmp_path, "wait", "wait", signal_after_s=1.5) == 143
    assert time.monotonic() - started < 30  # both ranks got it: neither waited out its 60 s
    assert "the 2-process job ended with exit code 143 (interrupted by SIGTERM)" in capsys.readouterr().err


def test_devices_job_kills_a_hung_rank_once_another_has_failed(tmp_path):
    import time

    started = time.monotonic()
    # mlx.launch alone would wait for the stopped rank forever
    assert supervise_stand_ins(tmp_path, "exit1", "hang", grace_s=1.0) == 1
    assert time.monotonic() - started < 30


def test_job_exit_code_prefers_what_the_user_must_act_on_then_rank_zero():
    from overnight.runs.launch import job_exit_code

    assert job_exit_code({0: 0, 1: 0}, 2, 0, None) == 0
    assert job_exit_code({0: 143, 1: 143}, 2, 1, 15) == 143
    assert job_exit_code({0: 1}, 2, 0, None) == 1  # rank 1 was killed; mlx.launch said 0
    assert job_exit_code({0: 0}, 2, 0, None) == 1  # a rank that left no code died
    assert job_exit_code({1: 130}, 2, 1, None) == 130
    assert job_exit_code({}, 2, 0, 2) == 130  # the signal came before any rank could handle it


def test_a_taken_port_is_retried_even_when_rank_zero_handled_the_launchers_sigterm():
    """A rank whose port was taken exits 1; mlx.launch then SIGTERMs rank 0, which, when it handles the signal
    before the supervisor's kill (a loaded machine), exits 143 and spoke for the job: it ended 143 instead of
    starting again on other ports (test_mlx_job_whose_port_another_program_holds_starts_again_and_trains failed so
    in a full run beside other work)."""
    from overnight.runs.launch import job_exit_code, port_outcome

    assert port_outcome(job_exit_code({0: 143, 1: 1}, 2, 1, None), True, False) == (1, True)
    assert port_outcome(job_exit_code({1: 1}, 2, 1, None), True, False) == (1, True)  # rank 0 killed first
    # the user's own Ctrl-C / SIGTERM during the join is theirs: no retry, their code
    assert port_outcome(job_exit_code({0: 143, 1: 1}, 2, 1, 15), True, True) == (143, False)
    assert port_outcome(job_exit_code({0: 143, 1: 143}, 2, 1, None), False, False) == (143, False)
    assert port_outcome(job_exit_code({0: 2, 1: 1}, 2, 1, None), True, False) == (2, False)  # a refusal wins

# -- the global batch -----------------------------------------------------------------------------------

class _Counter:
    def __init__(self):
        self.served = 0

    def next_batch(self):
        self.served += 1
        ids = np.full((1, 3), self.served, dtype=np.int32)
        return Batch(ids, np.array([[0, 1, 1]], np.float32), np.ones((1, 3), np.int32))


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_draws_the_whole_step_and_trains_its_share(rank):
    world = type("W", (), {"rank": rank, "size": 2})()
    stream = _Counter()
    whole, mine = distributed.step_batches(stream, 3, world, step=7, seed=42)
    assert stream.served == 6 and [int(b.input_ids[0, 0]) for b in whole] == [1, 2, 3, 4, 5, 6]
    assert [int(b.input_ids[0, 0]) for b in mine] == ([1, 2, 3] if rank == 0 else [4, 5, 6])
    # The dropout key is the micro-batch's place in the whole step, whoever trains it.
    assert [b.noise_seed for b in whole] == [noise_seed(42, 7, i) for i in range(6)]
    assert len({b.noise_seed for b in whole}) == 6


def test_an_oom_split_keys_each_piece_from_its_micro_batch():
    batch = Batch(np.zeros((4, 3), np.int32), np.ones((4, 3), np.float32), np.ones((4, 3), np.int32),
                  noise_seed=noise_seed(1, 2, 3))
    pieces = batch.split(2)
    assert [p.noise_seed for p in pieces] == [noise_seed(batch.noise_seed, 0), noise_seed(batch.noise_seed, 1)]
    assert Batch(batch.input_ids, batch.loss_mask, batch.attention_mask).split(2)[0].noise_seed is None


def test_eval_batches_are_dealt_round_robin_with_equal_rounds():
    worlds = [type("W", (), {"rank": r, "size": 2})() for r in range(2)]
    assert [list(distributed.eval_share(5, w)) for w in worlds] == [[0, 2, 4], [1, 3, None]]
    assert list(distributed.eval_share(3, distributed.Solo())) == [0, 1, 2]



def test_all_gather_json_gives_every_rank_every_ranks_value_bit_for_bit():
    """What one rank computed (grpo's completions) reaches all, floats exactly, through sums of small integers that
    a float32 ring (mlx) carries exactly too."""
    values = [{"ids": [1, 2, 3], "logp": [-0.1, float(np.float32(-1e-7)), 1 / 3], "reward": None},
              ["é", 2 ** 40, [np.nextafter(1.0, 2.0)] * 300]]  # ranks send texts of different lengths
    sent = []

    def rank(world):
        all_sum = world.all_sum
        world.all_sum = lambda v: sent.append(np.asarray(v)) or all_sum(v)
        return distributed.all_gather_json(world, values[world.rank])

    gathered = run_ranks(2, rank)
    assert gathered[0] == gathered[1] == values
    payload = [v for v in sent if v.size > 2]
    assert payload and all(((v == np.round(v)) & (v >= 0) & (v < 2 ** 16)).all() for v in payload)
    assert distributed.all_gather_json(distributed.Solo(), values[0]) == [values[0]]

# -- agreed decisions -----------------------------------------------------------------------------------

def test_rank_zeros_stop_and_best_hold_on_every_rank_and_any_ranks_signal_counts():
    def decide(world):
        mine = Stop("plateau", "rank 0's reason") if world.rank == 0 else Stop("grad_spike", "ignored")
        signal = 143 if world.rank == 1 else None
        return (agreed_stop(world, mine), distributed.agreed_flag(world, world.rank == 0),
                distributed.agreed_signal(world, signal), agreed_stop(world, None if world.rank == 0
                                                                                  else Stop("stuck", "x")))

    zero, one = run_ranks(2, decide)
    assert zero[0].message == "rank 0's reason" and one[0].code == "plateau"
    assert zero[1] is True and one[1] is True
    assert zero[2] == one[2] == 143
    assert zero[3] is None and one[3] is None


# -- the real loop on two ranks -------------------------------------------------------------------------

def make_cfg(run_dir: Path, grad_accumulation: int, *sets: str):
    base = ["model.path=" + str(run_dir.parent / "no-model"), "output.dir=" + str(run_dir), "train.batch_size=4",
            f"train.grad_accumulation={grad_accumulation}", "train.max_steps=24", "train.learning_rate=0.05",
            "train.warmup_steps=3", "train.report_every=1", "lora.rank=4", "lora.dropout=0.1",
            "eval.every_steps=5", "checkpoint.every_steps=8", "early_stopping.warmup_steps=100"]
    return build_config(None, {}, base + list(sets))


def train_rank(world, run_dir: Path, grad_accumulation: int, stop_at: dict | None = None, resume: bool = False,
               faults: dict | None = None):
    """One rank of a job (or the single process, world Solo) through the real loop with the numpy backend."""
    cfg = make_cfg(run_dir, grad_accumulation)
    run_dir.mkdir(parents=True, exist_ok=True)
    backend = NumpyBackend(vocab_size=64)
    backend.faults = (faults or {}).get(world.rank, {})
    backend.setup(cfg, cfg.train.seed)
    backend.world = world
    stream = SyntheticStream(cfg.train.batch_size, seed=cfg.train.seed)
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, log=lambda m: None)
    resume_state = None
    if resume:
        found = checkpoints.latest_valid(read_only=True)
        backend.load(found.path)
        resume_state = CheckpointManager.trainer_state(found.path)
    val_stream = SyntheticStream(4, seed=999, samples_per_epoch=12)
    validator = Validator(lambda: [val_stream.next_batch() for _ in range(3)])  # 3 batches: uneven over 2 ranks
    progress = Progress(cfg.train.max_steps, enabled=False)
    effects = (RunEffects(RunFiles(run_dir, warn=lambda m: None), checkpoints, backend, progress,
                          fingerprint={"test": 1}, model_path=cfg.model.path, say=lambda m: None)
               if world.rank == 0 else FollowerEffects(progress))
    at = (stop_at or {}).get(world.rank)
    interrupted = (lambda: 143 if progress.step >= at else None) if at else (lambda: None)
    outcome = train(cfg, backend, stream, validator, effects, resume_state=resume_state, interrupted=interrupted,
                    world=world)
    return outcome, {k: v.copy() for k, v in backend.params.items()}


def events(run_dir: Path, kind: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir) if r["event"] == kind}


def test_two_ranks_train_exactly_as_one_process_with_the_same_global_batch(tmp_path):
    single, single_weights = train_rank(distributed.Solo(), tmp_path / "one", grad_accumulation=2)
    ranks = run_ranks(2, lambda world: train_rank(world, tmp_path / "two", grad_accumulation=1))
    assert single.status == "completed" and all(o.status == "completed" and o.step == 24 for o, _ in ranks)
    one, two = tmp_path / "one", tmp_path / "two"
    assert events(two, "train", "loss") == pytest.approx(events(one, "train", "loss"), rel=1e-12)
    assert events(two, "eval", "val_loss") == pytest.approx(events(one, "eval", "val_loss"), rel=1e-12)
    assert len(events(two, "eval", "val_loss")) == 5
    for name in single_weights:
        np.testing.assert_array_equal(ranks[0][1][name], ranks[1][1][name])  # the ranks never drift apart
        np.testing.assert_allclose(ranks[0][1][name], single_weights[name], rtol=1e-12)
    # One writer: the checkpoints and the adapter are rank 0's, in the one run directory.
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.startswith("step")) == \
        sorted(p.name for p in (one / "checkpoints").iterdir() if p.name.startswith("step"))
    state = CheckpointManager.trainer_state(CheckpointManager(two).latest_valid(read_only=True).path)
    assert state["world_size"] == 2


def test_a_signal_on_one_rank_stops_both_at_the_same_step_and_one_process_resumes_exactly(tmp_path):
    single, single_weights = train_rank(distributed.Solo(), tmp_path / "one", grad_accumulation=2)
    run_dir = tmp_path / "job"
    first = run_ranks(2, lambda world: train_rank(world, run_dir, 1, stop_at={1: 11}))
    assert [(o.status, o.step, o.exit_code) for o, _ in first] == [("interrupted", 11, 143)] * 2
    assert CheckpointManager(run_dir).latest_valid(read_only=True).step == 11
    # World size 2 -> 1 with the same global batch (grad_accumulation 1 x 2 = 2 x 1): the run goes on exactly.
    resumed, weights = train_rank(distributed.Solo(), run_dir, grad_accumulation=2, resume=True)
    assert resumed.status == "completed" and resumed.step == 24
    assert events(run_dir, "train", "loss") == pytest.approx(events(tmp_path / "one", "train", "loss"), rel=1e-12)
    for name in single_weights:
        np.testing.assert_allclose(weights[name], single_weights[name], rtol=1e-12)


def test_an_out_of_memory_on_one_rank_makes_every_rank_split_the_same_step(tmp_path):
    """Rank 1 alone cannot hold 4 rows: both ranks halve their micro-batches together (same effective batch) and
    train on in step; with the split the run is the one-process run that split the same way."""
    ranks = run_ranks(2, lambda world: train_rank(world, tmp_path / "two", 1, faults={1: {"oom_above_rows": 2}}))
    assert all(o.status == "completed" and o.step == 24 for o, _ in ranks)
    for name in ranks[0][1]:
        np.testing.assert_array_equal(ranks[0][1][name], ranks[1][1][name])
    ooms = [r for r in read_metrics(tmp_path / "two") if r["event"] == "oom"]
    assert [(r["step"], r["micro_splits"]) for r in ooms] == [(0, 2)]
    single, weights = train_rank(distributed.Solo(), tmp_path / "one", 2, faults={0: {"oom_above_rows": 2}})
    assert events(tmp_path / "two", "train", "loss") == pytest.approx(events(tmp_path / "one", "train", "loss"),
                                                                      rel=1e-12)
    for name in weights:
        np.testing.assert_allclose(ranks[0][1][name], weights[name], rtol=1e-12)


def test_another_world_size_is_refused_unless_the_global_batch_is_the_same():
    from overnight.runs import fingerprint as fp

    def print_(world, ga):
        return {"world_size": world, "config": {"train.batch_size": 4, "train.grad_accumulation": ga}}

    assert fp.differences(print_(2, 1), print_(1, 2)) == []
    assert fp.differences(print_(2, 2), print_(4, 1)) == []
    [change] = fp.differences(print_(2, 1), print_(1, 1))
    assert "global batch" in change and "train.grad_accumulation=2" in change
    [change] = fp.differences(print_(1, 3), print_(2, 1))
    assert "impossible" in change
    assert fp.differences(print_(2, 1), print_(2, 2)) == ["train.grad_accumulation: 1 -> 2"]


# -- real jobs: `overnight train --devices 2` (torchrun, gloo on CPU; mlx.launch, ring on localhost) ---------

from conftest import has  # noqa: E402

import faults_util as fu  # noqa: E402

JOB_STEPS = 12


def job_args(backend: str, model: Path, data: Path, out: Path, grad_accumulation: int, devices: int) -> list[str]:
    """The default path: 4-bit base, LoRA dropout 0.05, evals (every 3) between checkpoints (every 4)."""
    return fu.train_args(backend, model, data, out, JOB_STEPS, "--set", f"train.grad_accumulation={grad_accumulation}",
                         "--set", "train.seed=7", *(["--devices", str(devices)] if devices > 1 else []),
                         every=4, eval_every=3, bits=4, keep_best=False)


def run_job(args: list[str], logdir: Path, name: str, timeout: float = 400) -> fu.Launch:
    launch = fu.Launch(args, logdir, name)
    code = launch.wait(timeout)
    assert code == 0, launch.tail()
    return launch


def job_pids(agent: int) -> list[int]:
    """The launcher and every process under it (the ranks run in sessions of their own, so a process group
    kill would miss them)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [agent], [agent]
    while frontier:
        children = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def rank_pids(launch: fu.Launch) -> list[int]:
    """The processes running `python -m overnight train` under `overnight train --devices` (itself one, the root
    of the tree) and its launcher: the ranks."""
    ranks = []
    for pid in job_pids(launch.pid)[1:]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        head = cmdline[:4]  # python [-u] -m overnight: not torchrun (-m torch.distributed.run), not mlx.launch
        if b"-m" in head and cmdline[cmdline.index(b"-m") + 1:cmdline.index(b"-m") + 2] == [b"overnight"]:
            ranks.append(pid)
    return ranks


def kill_all(pids: list[int]) -> None:
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def losses_close(run_dir: Path, reference: Path, event: str = "train", key: str = "loss") -> None:
    got = {r["step"]: r[key] for r in fu.metrics(run_dir) if r["event"] == event}
    ref = {r["step"]: r[key] for r in fu.metrics(reference) if r["event"] == event}
    assert sorted(got) == sorted(ref) and ref
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])


@pytest.fixture(scope="module")
def torch_jobs(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 2-process job and one process with the same global batch (grad_accumulation 2)."""
    if not has("torch", "transformers", "peft", "bitsandbytes"):
        pytest.skip("needs torch, transformers, peft and bitsandbytes")
    root = tmp_path_factory.mktemp("torch_jobs")
    data = fu.make_small_data(root / "data")
    two = root / "two"
    run_job(job_args("torch", tiny_model_dir, data, two, 1, 2), root / "logs", "two")
    one = root / "one"
    run_job(job_args("torch", tiny_model_dir, data, one, 2, 1), root / "logs", "one")
    return {"root": root, "data": data, "two": two, "one": one, "model": tiny_model_dir}


@pytest.mark.torch
def test_torch_two_processes_match_one_process_with_the_same_global_batch(torch_jobs):
    two, one = torch_jobs["two"], torch_jobs["one"]
    losses_close(two, one)
    losses_close(two, one, "eval", "val_loss")
    start = [r for r in fu.metrics(two) if r["event"] == "start"]
    assert len(start) == 1  # one writer: rank 0
    assert (two / "adapter" / "adapter_model.safetensors").is_file()
    from overnight.runs.checkpoint import CheckpointManager

    found = CheckpointManager(two).latest_valid(read_only=True)
    assert CheckpointManager.trainer_state(found.path)["world_size"] == 2


@pytest.mark.torch
def test_torch_accelerate_launch_trains_the_same_job_as_devices(torch_jobs, tmp_path):
    """`accelerate launch` (its torchrun path; on a machine without a GPU the ranks use gloo) is the same
    job as `--devices 2`: same adapter bytes, one writer."""
    import subprocess
    import sys

    if not has("accelerate"):
        pytest.skip("needs accelerate")
    out = tmp_path / "run"
    args = job_args("torch", torch_jobs["model"], torch_jobs["data"], out, 1, 2)
    del args[args.index("--devices"):args.index("--devices") + 2]
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "-m", "overnight", *args],
                          capture_output=True, text=True, env=fu.cli_env(), stdin=subprocess.DEVNULL, timeout=400,
                          cwd=fu.ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 processes, data parallel" in done.stdout + done.stderr
    assert len([r for r in fu.metrics(out) if r["event"] == "start"]) == 1
    fu.assert_adapter_equal(out, torch_jobs["two"])
    losses_close(out, torch_jobs["two"])


@pytest.mark.torch
@pytest.mark.parametrize("victim", ["job", pytest.param("rank1", marks=pytest.mark.soak)])  # CI time: one kill each
def test_torch_sigkill_then_auto_resume_ends_with_the_uninterrupted_adapter(torch_jobs, victim, tmp_path):
    import random

    seed = int(__import__("os").environ.get("FAULTS_SEED") or random.SystemRandom().randrange(1 << 30))
    at = random.Random(seed).randint(3, JOB_STEPS - 2)
    out = tmp_path / "run"
    args = job_args("torch", torch_jobs["model"], torch_jobs["data"], out, 1, 2)
    launch = fu.Launch(args, tmp_path / "logs", "first")
    beat = fu.wait_heartbeat_any(out, launch, min_step=at, timeout=300)
    assert beat is not None, launch.tail()
    if victim == "job":
        kill_all(job_pids(launch.pid))
    else:
        others = [pid for pid in rank_pids(launch) if pid != beat["pid"]]
        assert len(others) == 1, (rank_pids(launch), beat)
        kill_all(others)
    code = launch.wait(120)
    assert code != 0, f"seed {seed}: the job was killed at step >= {at} but exited 0\n{launch.tail()}"
    if victim == "rank1":  # rank 0 says what happened and what to do (torchrun adds its own failure report)
        assert code == 1, launch.tail()
        assert "another process of this data-parallel job stopped answering or died" in launch.stderr, launch.tail()
        assert ("continue with: overnight train ... --auto-resume" in launch.stderr  # or, killed before step 4:
                or "no checkpoint was committed yet" in launch.stderr), launch.tail()
        assert "crashed unexpectedly" not in launch.stderr and "/src/" not in launch.stderr, launch.tail()
        _no_launcher_report(launch.stderr)
    resumed = fu.Launch([*args, "--auto-resume"], tmp_path / "logs", "resumed")
    assert resumed.wait(400) == 0, f"seed {seed}\n{resumed.tail()}"
    fu.assert_adapter_equal(out, torch_jobs["two"])
    losses_close(out, torch_jobs["two"])


@pytest.mark.torch
def test_torch_a_two_process_run_continues_as_one_process_with_the_same_global_batch(torch_jobs, tmp_path):
    out = tmp_path / "run"
    fu.copy_run(torch_jobs["two"], out)
    from overnight.runs.checkpoint import CheckpointManager

    # Back to step 4 of the 2-process run, then on as one process: grad_accumulation 2 keeps the global batch.
    refused = fu.run_cli([*job_args("torch", torch_jobs["model"], torch_jobs["data"], out, 1, 1), "--resume-from",
                          "4"])
    assert refused.returncode == 3 and "global batch" in refused.stderr and "grad_accumulation=2" in refused.stderr, \
        refused.stderr
    done = fu.run_cli([*job_args("torch", torch_jobs["model"], torch_jobs["data"], out, 2, 1), "--resume-from", "4"],
                      timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    losses_close(out, torch_jobs["one"])
    assert CheckpointManager(out).latest_valid(read_only=True).step == JOB_STEPS


@pytest.mark.torch
def test_torch_sigterm_to_one_rank_stops_the_job_with_one_save_and_resume_is_exact(torch_jobs, tmp_path):
    """A signal that reaches rank 1 alone (`kill PID`): every rank finishes the step, rank 0 commits it once."""
    import signal

    out = tmp_path / "run"
    args = job_args("torch", torch_jobs["model"], torch_jobs["data"], out, 1, 2)
    launch = fu.Launch(args, tmp_path / "logs", "first")
    beat = fu.wait_heartbeat_any(out, launch, min_step=5, timeout=300)
    assert beat is not None, launch.tail()
    [other] = [pid for pid in rank_pids(launch) if pid != beat["pid"]]
    import os

    os.kill(other, signal.SIGTERM)
    assert launch.wait(120) == 143, launch.tail()  # SPEC §3, not torchrun's 1
    _no_launcher_report(launch.stderr)
    stopped = [r for r in fu.metrics(out) if r["event"] == "interrupted"]
    assert len(stopped) == 1 and stopped[0]["signal"] == signal.SIGTERM, launch.tail()
    saved = [r["step"] for r in fu.metrics(out) if r["event"] == "checkpoint"]
    assert saved[-1] == stopped[0]["step"] and len(saved) == len(set(saved)), saved
    resumed = fu.Launch([*args, "--auto-resume"], tmp_path / "logs", "resumed")
    assert resumed.wait(400) == 0, resumed.tail()
    fu.assert_adapter_equal(out, torch_jobs["two"])
    losses_close(out, torch_jobs["two"])


@pytest.mark.torch
def test_torch_a_hung_rank_ends_the_job_after_the_collective_timeout(torch_jobs, tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "run"
    args = [*job_args("torch", torch_jobs["model"], torch_jobs["data"], out, 1, 2),
            "--set", "train.collective_timeout_s=10"]
    launch = fu.Launch(args, tmp_path / "logs", "first")
    beat = fu.wait_heartbeat_any(out, launch, min_step=5, timeout=300)  # after the checkpoint of step 4
    assert beat is not None, launch.tail()
    [other] = [pid for pid in rank_pids(launch) if pid != beat["pid"]]
    os.kill(other, signal.SIGSTOP)  # alive, never answering
    started = time.monotonic()
    try:
        assert launch.wait(120) == 1, launch.tail()
    finally:
        os.kill(other, signal.SIGCONT) if launch.poll() is None else None
    assert "another process of this data-parallel job stopped answering or died" in launch.stderr, launch.tail()
    assert time.monotonic() - started < 90
    assert fu.assert_checkpoints_sound(out) >= 4


MLX_STEPS = 8


@pytest.fixture(scope="module")
def mlx_jobs(tiny_model_dir, tmp_path_factory):
    if not has("mlx", "mlx_lm"):
        pytest.skip("needs mlx and mlx-lm")
    root = tmp_path_factory.mktemp("mlx_jobs")
    data = fu.make_small_data(root / "data")
    runs = {}
    for name, ga, devices in (("two", 1, 2), ("one", 2, 1)):
        runs[name] = root / name
        run_job(mlx_args(tiny_model_dir, data, runs[name], ga, devices), root / "logs", name)
    return {"root": root, "data": data, "model": tiny_model_dir, **runs}


def mlx_args(model: Path, data: Path, out: Path, grad_accumulation: int, devices: int) -> list[str]:
    args = job_args("mlx", model, data, out, grad_accumulation, devices)
    args[args.index("--max-steps") + 1] = str(MLX_STEPS)
    return args


@pytest.mark.mlx
def test_mlx_two_processes_match_one_process_with_the_same_global_batch(mlx_jobs):
    losses_close(mlx_jobs["two"], mlx_jobs["one"])
    losses_close(mlx_jobs["two"], mlx_jobs["one"], "eval", "val_loss")
    assert len([r for r in fu.metrics(mlx_jobs["two"]) if r["event"] == "start"]) == 1


@pytest.mark.mlx
@pytest.mark.parametrize("victim", ["job", pytest.param("rank1", marks=pytest.mark.soak),
                                    pytest.param("sigterm", marks=pytest.mark.soak)])  # torch's CI runs a SIGTERM
def test_mlx_a_kill_or_sigterm_then_auto_resume_ends_with_the_uninterrupted_adapter(mlx_jobs, victim, tmp_path):
    """SIGKILL of every process, SIGKILL of rank 1, SIGTERM to `overnight train --devices 2` (as Ctrl-C or a
    spot reclaim would): the exit code says which (mlx.launch alone exits 0 whatever happened)."""
    import signal

    import random

    seed = int(__import__("os").environ.get("FAULTS_SEED") or random.SystemRandom().randrange(1 << 30))
    at = random.Random(seed).randint(3, MLX_STEPS - 2)
    out = tmp_path / "run"
    args = mlx_args(mlx_jobs["model"], mlx_jobs["data"], out, 1, 2)
    launch = fu.Launch(args, tmp_path / "logs", "first")
    beat = fu.wait_heartbeat_any(out, launch, min_step=at, timeout=300)
    assert beat is not None, launch.tail()
    if victim == "job":
        kill_all(job_pids(launch.pid))
    elif victim == "rank1":
        others = [pid for pid in rank_pids(launch) if pid != beat["pid"]]
        assert len(others) == 1, (rank_pids(launch), beat)
        kill_all(others)
    else:
        import os

        os.kill(launch.pid, signal.SIGTERM)
    code = launch.wait(120)
    if victim == "rank1":
        assert code == 1, launch.tail()
        assert "another process of this data-parallel job stopped answering or died" in launch.stderr, launch.tail()
    if victim == "sigterm":
        assert code == 143, launch.tail()
        stopped = [r for r in fu.metrics(out) if r["event"] == "interrupted"]
        saved = [r["step"] for r in fu.metrics(out) if r["event"] == "checkpoint"]
        assert len(stopped) == 1 and saved[-1] == stopped[0]["step"], launch.tail()
    resumed = fu.Launch([*args, "--auto-resume"], tmp_path / "logs", "resumed")
    assert resumed.wait(400) == 0, resumed.tail()
    fu.assert_adapter_equal(out, mlx_jobs["two"])
    losses_close(out, mlx_jobs["two"])


@pytest.mark.mlx
def test_mlx_job_whose_port_another_program_holds_starts_again_and_trains(mlx_jobs, tmp_path, monkeypatch, capfd):
    """The CI failure of session 11: rank 1's ring port (--starting-port + 1) was in use; the job died with a
    traceback. Now the rank says so, rank 0 is stopped at once and the job starts again on other ports."""
    import socket

    from overnight.commands.cli import main
    from overnight.runs import launch

    first = launch.free_ports(2)
    held = socket.socket()  # "another program" listening on rank 1's port
    held.bind(("127.0.0.1", first + 1))
    held.listen()
    draws, real_free_ports = [first], launch.free_ports
    monkeypatch.setattr(launch, "free_ports", lambda count: draws.pop(0) if draws else real_free_ports(count))
    out = tmp_path / "run"
    args = mlx_args(mlx_jobs["model"], mlx_jobs["data"], out, 1, 2)
    args[args.index("--backend") + 1] = "mlx"
    args[args.index("--max-steps") + 1] = "2"
    try:
        code = main(args)
    finally:
        held.close()
    captured = capfd.readouterr()
    err = captured.err
    assert code == 0, err
    assert not draws and "could not listen on the port mlx.launch gave it" in err, (captured.out, err)
    assert "starting the job again on other ports (2 of 3)" in err and "Traceback" not in err, err
    assert [r["step"] for r in fu.metrics(out) if r["event"] == "train"][-1] == 2


def _cuda_devices() -> int:
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=120)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


@pytest.mark.cuda
def test_cuda_nccl_two_gpus_match_one_process(tiny_model_dir, tmp_path):
    """NCCL, QLoRA per rank (bf16 over 4-bit on each GPU): 2 processes = 1 process with the same global batch."""
    if _cuda_devices() < 2:
        pytest.skip("needs 2 GPUs")
    data = fu.make_small_data(tmp_path / "data")
    two, one = tmp_path / "two", tmp_path / "one"
    run_job(job_args("torch", tiny_model_dir, data, two, 1, 2), tmp_path / "logs", "two")
    run_job(job_args("torch", tiny_model_dir, data, one, 2, 1), tmp_path / "logs", "one")
    losses_close(two, one)
    losses_close(two, one, "eval", "val_loss")


@pytest.mark.cuda
def test_cuda_more_processes_than_gpus_is_a_clear_error(tiny_model_dir, tmp_path):
    gpus = _cuda_devices()
    if gpus < 1:
        pytest.skip("needs a GPU")
    data = fu.make_small_data(tmp_path / "data")
    out = tmp_path / "run"
    launch = fu.Launch(job_args("torch", tiny_model_dir, data, out, 1, gpus + 1), tmp_path / "logs", "over")
    assert launch.wait(300) != 0
    assert f"{gpus} visible GPU(s): start one process per GPU" in launch.stderr, launch.tail()


# -- `--devices`: ranks end with their supervisor; the user reads overnight's words, not the launcher's -------------

# A stand-in rank that notes itself as `python -m overnight` does, says a word on stderr, and waits; the launcher
# (the stand-in above) is followed here by a report of its own, as torchrun's after a failed rank.
NOISY_LAUNCHER = STAND_IN_LAUNCHER.replace("sys.exit(", "print('Traceback (most recent call last): launcher noise', "
                                           "file=sys.stderr, flush=True)\nsys.exit(", 1)
TALKING_RANK = """
import os, sys, time
from overnight.runs.launch import note_rank_exit, note_rank_started
note_rank_started()
with open(os.path.join(sys.argv[2], f"rank-{os.environ['RANK']}.pid"), "w") as out:
    out.write(str(os.getpid()))
print(f"rank {os.environ['RANK']} speaks on stderr", file=sys.stderr, flush=True)
if sys.argv[1].startswith("exit"):
    note_rank_exit(int(sys.argv[1][4:]))
    sys.exit(int(sys.argv[1][4:]))
time.sleep(60)
"""


def _talking_job(tmp_path, *parts) -> list[str]:
    import sys

    (tmp_path / "launcher.py").write_text(NOISY_LAUNCHER)
    (tmp_path / "rank.py").write_text(TALKING_RANK.replace("sys.argv[2]", repr(str(tmp_path))))
    return [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "rank.py"), *parts]


def test_devices_job_relays_the_ranks_stderr_and_keeps_the_launchers_report_from_the_user(tmp_path, capfd):
    from overnight.runs.launch import supervise

    assert supervise(_talking_job(tmp_path, "exit1", "exit0"), 2, poll_s=0.05, grace_s=1.0, quiet_launcher=True) == 1
    err = capfd.readouterr().err
    assert "rank 0 speaks on stderr" in err and "rank 1 speaks on stderr" in err, err
    assert "launcher noise" not in err, err
    assert err.strip().splitlines()[-1].startswith("the 2-process job ended with exit code 1"), err


def test_devices_job_shows_the_launchers_report_when_no_rank_started(tmp_path, capfd):
    import sys

    from overnight.runs.launch import supervise

    command = [sys.executable, "-c", "import sys; print('torchrun: bad port', file=sys.stderr); sys.exit(1)"]
    assert supervise(command, 2, poll_s=0.05, quiet_launcher=True) == 1
    assert "torchrun: bad port" in capfd.readouterr().err


def test_ranks_end_within_a_second_or_two_of_a_sigkilled_supervisor(tmp_path):
    """`kill -9` of `overnight train --devices`: its ranks (children of the launcher, not of the supervisor) leave
    instead of training on, orphaned, holding the run's lock."""
    import signal
    import subprocess
    import sys
    import time

    command = _talking_job(tmp_path, "wait", "wait")
    supervisor = subprocess.Popen([sys.executable, "-c", "import sys; from overnight.runs.launch import supervise; "
                                   f"supervise({command!r}, 2, quiet_launcher=True)"], stderr=subprocess.PIPE)
    pid_files = [tmp_path / "rank-0.pid", tmp_path / "rank-1.pid"]
    deadline = time.monotonic() + 30
    while not all(p.exists() and p.read_text() for p in pid_files):
        assert time.monotonic() < deadline and supervisor.poll() is None, supervisor.stderr.read()
        time.sleep(0.05)
    ranks = [int(p.read_text()) for p in pid_files]
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait()
    killed = time.monotonic()
    while any(_running(pid) for pid in ranks):
        assert time.monotonic() - killed < 5, [pid for pid in ranks if _running(pid)]
        time.sleep(0.05)
    supervisor.stderr.close()


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent (Linux /proc; elsewhere kill -0)."""
    import os
    from pathlib import Path

    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def test_a_follower_names_the_lock_holder_when_rank_0_was_refused_the_run(tmp_path):
    import os

    from overnight.runs import launch, lock

    job = tmp_path / "job"
    job.mkdir()
    (job / "rank-0.pid").write_text("999999")
    env = {launch.JOB_DIR_ENV: str(job), "RANK": "1", "WORLD_SIZE": "2"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert launch.leader_refused_by_lock(run_dir, env) is None  # the lock is free: a peer did die
    fd = lock.acquire(run_dir)
    try:
        said = launch.leader_refused_by_lock(run_dir, env)
        assert said and f"pid {os.getpid()}" in said and "rank 1 stops too" in said and "another --output" in said
        (job / "rank-0.pid").write_text(str(os.getpid()))  # rank 0 itself holds it: some other rank died
        assert launch.leader_refused_by_lock(run_dir, env) is None
        assert launch.leader_refused_by_lock(run_dir, {"RANK": "1", "WORLD_SIZE": "2"}) is None  # not --devices
    finally:
        lock.release(fd)


def _no_launcher_report(stderr: str) -> None:
    """torchrun's ChildFailedError report ('overnight FAILED', a traceback) never reaches the user; overnight's
    line is the last."""
    assert "Traceback" not in stderr and "FAILED" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("the 2-process job ended with exit code"), stderr[-3000:]


@pytest.mark.torch
def test_torch_devices_lock_conflict_is_named_on_every_rank_without_a_traceback(tiny_model_dir, tmp_path):
    if not has("torch", "transformers", "peft", "bitsandbytes"):
        pytest.skip("needs torch, transformers, peft and bitsandbytes")
    from overnight.runs import lock

    out = tmp_path / "run"
    out.mkdir()
    fd = lock.acquire(out)  # another `overnight train` on the same run directory
    try:
        args = job_args("torch", tiny_model_dir, fu.make_small_data(tmp_path / "data"), out, 1, 2)
        launch = fu.Launch(args, tmp_path / "logs", "locked")
        assert launch.wait(300) == 3, launch.tail()
    finally:
        lock.release(fd)
    import os

    assert "rank 1 stops too: rank 0 could not take the run directory" in launch.stderr, launch.tail()
    assert f"pid {os.getpid()}" in launch.stderr and "died" not in launch.stderr, launch.tail()
    _no_launcher_report(launch.stderr)


@pytest.mark.soak  # ~45-85 s of two `--devices 2` jobs; CI keeps the mechanism's cheap stand-in test above
@pytest.mark.torch
def test_torch_sigkill_of_the_supervisor_ends_every_rank_and_auto_resume_is_exact(torch_jobs, tmp_path):
    import os
    import signal
    import time

    from overnight.runs import lock

    out = tmp_path / "run"
    args = job_args("torch", torch_jobs["model"], torch_jobs["data"], out, 1, 2)
    launch = fu.Launch(args, tmp_path / "logs", "first", sleep_s=0.3)  # slow steps: killed mid-run, not at the end
    beat = fu.wait_heartbeat_any(out, launch, min_step=5, timeout=300)
    assert beat is not None, launch.tail()
    job = job_pids(launch.pid)[1:]  # the launcher and the ranks
    assert len(rank_pids(launch)) == 2, launch.tail()
    os.kill(launch.pid, signal.SIGKILL)
    launch.wait(30)
    killed = time.monotonic()
    while any(_running(pid) for pid in job) or lock.holder(out)[0]:
        assert time.monotonic() - killed < 10, ([pid for pid in job if _running(pid)], lock.holder(out))
        time.sleep(0.05)
    assert fu.heartbeat(out)["step"] < JOB_STEPS, "the job had finished before the kill: nothing was tested"
    resumed = fu.Launch([*args, "--auto-resume"], tmp_path / "logs", "resumed")
    assert resumed.wait(400) == 0, resumed.tail()
    fu.assert_adapter_equal(out, torch_jobs["two"])
    losses_close(out, torch_jobs["two"])
