"""Crash-safe resume, proven by fault injection: `overnight train` as a real subprocess on the tiny model.

Backends: "numpy" (the reference backend in tests/refbackend.py: cheap, so it gets the exhaustive
cases), "torch" (real, CPU) and "mlx" (real, mlx[cpu]; skipped when it cannot import or set up).
Every backend runs through a recording subclass (tests/faults_util.py) that notes which samples
each optimizer step consumed; it changes no number.

  a  SIGKILL at random moments, relaunch with --auto-resume until done: losses, adapter and the
     samples consumed equal an uninterrupted run's, bit for bit.
  b  SIGKILL inside a save, at every phase of the commit protocol (OVERNIGHT_FAULT hooks).
  c  Corruption matrix on committed checkpoints: rejected, quarantined, the previous one used.
  d  Disk full: injected ENOSPC, and a real small filesystem (tmpfs in a private mount namespace).
  e  SIGTERM / SIGINT on the real backends (the numpy case is in test_cli.py).
  f  Config mismatch on resume, field by field; the override flag.
  g  Resume modes on the real backends: --resume-from, --before-step; rollback safety.

Counts: the default run does what CI needs (10 random kills and 20+ in-save kills per backend);
`-m soak` runs the same campaigns at 50 / 100. FAULTS_SEED fixes the seed (printed on failure);
FAULTS_REPORT=path appends one JSON line per campaign (trials, where they landed, failures).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from faults_util import (
    DATA_DIR, NO_EVAL, Launch, Trials, assert_adapter_equal, assert_checkpoints_sound, assert_each_sample_once_per_epoch,
    assert_losses_match, checkpoint_manager, copy_run, heartbeat, leftovers, make_small_data, metrics, run_cli,
    sha_tree, stray_temp_files, train_args, train_lines, wait_heartbeat,
)

BACKENDS = ["numpy", "torch", "mlx"]
REAL = ["torch", "mlx"]
SAMPLES = 26  # rows in the small training file (see make_small_data)
POINTS = ["after_backend_files", "after_files", "before_commit", "before_rename", "after_rename",
          "during_rotation"]
PRE_RENAME = POINTS[:4]


def seed_for(name: str) -> int:
    return int(os.environ.get("FAULTS_SEED") or random.SystemRandom().randrange(1 << 30))


def report(**fields) -> None:
    print(json.dumps(fields))
    path = os.environ.get("FAULTS_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(fields) + "\n")


# -- backends and reference runs --------------------------------------------------------------------

_READY: dict[str, str | None] = {}


def require(backend: str, model: Path, data: Path, tmp_root: Path) -> None:
    """Skip a backend that cannot import, or (mlx, still being finished) cannot even run two steps."""
    if backend == "numpy":
        return
    pytest.importorskip(f"overnight.backends.{backend}_backend")
    if backend == "mlx" and backend not in _READY:
        out = tmp_root / f"probe-{backend}"
        result = run_cli(train_args(backend, model, data, out, 2, every=2))
        _READY[backend] = None if result.returncode == 0 else (result.stdout + result.stderr)[-1500:]
    if _READY.get(backend) is not None:
        pytest.skip(f"backend {backend} does not run here yet:\n{_READY[backend]}")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    return make_small_data(tmp_path_factory.mktemp("small-data") / "data")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults-session")


class Reference:
    def __init__(self, run: Path, record: Path, steps: int, wall_s: float, train_s: float, boot_s: float):
        self.run, self.record, self.steps = run, record, steps
        self.wall_s, self.train_s, self.boot_s = wall_s, train_s, boot_s


@pytest.fixture(scope="session")
def reference(tiny_model_dir, small_data, session_dir):
    """Uninterrupted runs, one per (backend, settings), built once per session."""
    cache: dict = {}

    def get(backend: str, steps: int, **settings) -> Reference:
        key = (backend, steps, tuple(sorted(settings.items())))
        if key not in cache:
            require(backend, tiny_model_dir, small_data, session_dir)
            name = f"ref-{backend}-{len(cache)}"
            run, record = session_dir / name, session_dir / f"{name}.record.jsonl"
            began = time.monotonic()
            result = run_cli(train_args(backend, tiny_model_dir, small_data, run, steps, **settings), record=record)
            wall = time.monotonic() - began
            assert result.returncode == 0, result.stdout + result.stderr
            events = metrics(run)
            start = next(r["time"] for r in events if r["event"] == "start")
            train_s = next(r["time"] for r in events if r["event"] == "end") - start
            cache[key] = Reference(run, record, steps, wall, train_s, max(0.2, wall - train_s))
        return cache[key]

    return get


def _marks(name: str, soak: bool) -> list:
    return (([pytest.mark.soak] if soak else []) + ([pytest.mark.torch] if name == "torch" else [])
            + ([pytest.mark.mlx] if name == "mlx" else []))


def backend_params(names=BACKENDS, soak: bool = False):
    return [pytest.param(name, marks=_marks(name, soak), id=name) for name in names]


# Campaigns run under two sets of settings (passed through train_args):
#   "lora"   plain LoRA on a full-precision base (bits=0), on every backend; test ids: numpy, torch, mlx.
#   "qlora4" the default users run: a 4-bit base (bitsandbytes NF4 on torch, MLX affine 4-bit on mlx), LoRA
#            dropout 0.05 (train_args), and evals off the checkpoint grid: evals at 3, 6, 9, ..., checkpoints
#            at 4, 8, 12, ... and keep_best off (a new best saves nothing), so a kill after an eval and before
#            the next checkpoint makes the resumed process re-run steps that, uninterrupted, ran after that
#            eval. A backend whose numbers depend on what ran earlier in the process fails here.
#            Real backends only (the numpy reference has no quantized path); ids: torch-qlora4, mlx-qlora4.
#            Every qlora4 test uses these same settings, so one uninterrupted run per backend serves them all.
QLORA4_STEPS = 24
QLORA4 = dict(every=4, eval_every=3, keep_last=2, keep_best=False, bits=4)


def campaign_params(soak: bool = False):
    """CI runs the commit protocol's campaigns on the numpy reference (plain LoRA, the cheap many-kill case) and on
    each real backend with the defaults users run (qlora4); the real backends' plain-LoRA variants add no path the
    defaults miss and about 7 minutes on 2 cores, so they run with `-m soak`."""
    return ([pytest.param(name, "lora", marks=_marks(name, soak), id=name) for name in BACKENDS
             if soak or name not in REAL]
            + [pytest.param(name, "qlora4", marks=_marks(name, soak), id=f"{name}-qlora4") for name in REAL])


def count(env: str, default: int) -> int:
    return int(os.environ.get(env) or default)


# =================================================================================================
# a. SIGKILL at random moments; relaunch with --auto-resume until done


# (steps, settings, seconds each step sleeps): the 4-bit runs train in well under a second once started, so a
# short sleep per step lets most kills land in a step, an eval or a save rather than after the run ended.
RANDOM_SETTINGS = {"lora": (24, dict(every=4, eval_every=6, keep_last=2), 0.0),
                   "qlora4": (QLORA4_STEPS, QLORA4, 0.05)}


def random_kill_campaign(backend, quant, kills_wanted, reference, tiny_model_dir, small_data, tmp_path):
    steps, settings, sleep_s = RANDOM_SETTINGS[quant]
    ref = reference(backend, steps, **settings)
    seed = seed_for("random")
    rng = random.Random(seed)
    kills, chains, launches = 0, 0, 0
    where = Counter()
    with Trials(f"random SIGKILL ({backend}, {quant})", seed) as trials:
        while kills < kills_wanted:
            chains += 1
            out, record = tmp_path / f"run{chains}", tmp_path / f"run{chains}.record.jsonl"
            while True:
                launches += 1
                launch = Launch(train_args(backend, tiny_model_dir, small_data, out, steps, "--auto-resume",
                                           **settings), tmp_path / "logs", f"{chains}-{launches}", record=record,
                                sleep_s=sleep_s)
                if kills >= kills_wanted:  # enough: let this one finish the run
                    code = launch.wait()
                    assert code == 0, launch.tail()
                    break
                if rng.random() < 0.2:  # anywhere from exec to the first steps: imports, resume decision, load
                    time.sleep(rng.uniform(0, ref.boot_s * 1.2))
                else:
                    beat = wait_heartbeat(out, launch)
                    if beat is not None:
                        left = (ref.train_s + sleep_s * steps) * (steps - beat["step"]) / steps
                        time.sleep(rng.uniform(0, left * 1.15))
                before = heartbeat(out)
                launch.kill()
                code = launch.wait()
                if code == 0:
                    trials.log(f"launch {launches}: finished before the kill")
                    break
                assert code == -signal.SIGKILL, launch.tail()
                kills += 1
                ours = before is not None and before.get("pid") == launch.pid
                mid_save = [p.name for p in leftovers(out) if ".tmp-delete" not in p.name]
                phase = "startup" if not ours else ("in a save" if mid_save else "training/eval")
                where[phase] += 1
                newest = assert_checkpoints_sound(out)
                trials.log(f"launch {launches}: killed ({phase}) at step {before and before.get('step')}, "
                           f"newest checkpoint {newest}, leftovers {[p.name for p in leftovers(out)]}")
                if ours:  # at most one checkpoint interval is ever lost
                    assert before["step"] - (newest or 0) <= settings["every"], (before, newest)
            assert_losses_match(out, ref.run, steps)
            assert_adapter_equal(out, ref.run)
            epochs = assert_each_sample_once_per_epoch(record, ref.record, steps, SAMPLES)
            assert epochs >= 3
            assert not stray_temp_files(out), stray_temp_files(out)
            assert not (out / "checkpoints" / "quarantine").exists(), "a kill left an invalid checkpoint"
    report(case="a_random_sigkill", backend=backend, quant=quant, seed=seed, kills=kills, runs=chains,
           launches=launches, where=dict(where), failures=0)


@pytest.mark.parametrize("backend, quant", campaign_params())
def test_random_sigkill_resume_is_exact(backend, quant, reference, tiny_model_dir, small_data, tmp_path):
    # CI's counts: every kill is a process start (~5 s of imports on 2 cores); `-m soak` runs 50 of each.
    kills = count("FAULTS_KILLS", 6) if quant == "lora" else count("FAULTS_QLORA_KILLS", 3)
    random_kill_campaign(backend, quant, kills, reference, tiny_model_dir, small_data, tmp_path)


@pytest.mark.parametrize("backend, quant", campaign_params(soak=True))
def test_soak_random_sigkill_resume_is_exact(backend, quant, reference, tiny_model_dir, small_data, tmp_path):
    random_kill_campaign(backend, quant, count("FAULTS_SOAK_KILLS", 50), reference, tiny_model_dir, small_data,
                         tmp_path)


@pytest.mark.parametrize("backend", backend_params(REAL))
def test_qlora_kill_after_an_eval_before_the_next_checkpoint_is_exact(backend, reference, tiny_model_dir,
                                                                      small_data, tmp_path):
    """The default 4-bit path, one deterministic crash: evals at 3 and 6, checkpoints at 4 and 8; the
    process dies when it asks for step 7 (after the eval at 6, before the checkpoint at 8). The resumed
    process starts from 4 and re-runs 5 and 6 without the evals at 3 and 6 (and the saves) behind it that
    the uninterrupted process had; every loss and the adapter must still be the same bits. This failed on
    torch while bitsandbytes repacked the 4-bit weights on the first eval (SPEC section 7, README
    Reliability)."""
    steps, settings = QLORA4_STEPS, QLORA4
    ref = reference(backend, steps, **settings)
    out, record = tmp_path / "run", tmp_path / "record.jsonl"
    args = train_args(backend, tiny_model_dir, small_data, out, steps, **settings)
    killed = run_cli(args, record=record, kill_before_step=7)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert [(r["event"], r["step"]) for r in metrics(out) if r["event"] in ("eval", "checkpoint")] == [
        ("eval", 3), ("checkpoint", 4), ("eval", 6)]
    assert max(s for s, _ in train_lines(out)) == 6
    assert assert_checkpoints_sound(out) == 4
    resumed = run_cli(args + ["--auto-resume"], record=record)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [r["from_step"] for r in metrics(out) if r["event"] == "resume"] == [4]
    assert_losses_match(out, ref.run, steps)
    assert_adapter_equal(out, ref.run)
    assert_each_sample_once_per_epoch(record, ref.record, steps, SAMPLES)
    # the eval at 6 ran twice; its predictions are in the file once, as in the uninterrupted run's
    assert (out / "predictions.jsonl").read_text() == (ref.run / "predictions.jsonl").read_text()


# What the default-path kill below trains: a reward model (its score head in every checkpoint), DoRA (its magnitude
# vectors, lora.use_dora).
DEFAULT_PATH_VARIANTS = {"reward": (DATA_DIR / "preference", ("--method", "reward")),
                         "dora": (DATA_DIR, ("--set", "lora.use_dora=true"))}


@pytest.mark.parametrize("variant", list(DEFAULT_PATH_VARIANTS))
@pytest.mark.parametrize("backend", backend_params(REAL))
def test_killed_on_the_default_path_resumes_exactly(backend, variant, tiny_model_dir, tmp_path):
    """A reward model, and DoRA, on the default path (4-bit QLoRA, dropout on): killed when it asks for step 6 (after
    the eval at 3 and the checkpoint at 4), resumed from 4: every train loss, every eval's val_loss (and a reward
    model's val_accuracy) and the adapter (the score head, the DoRA magnitudes included) equal an uninterrupted
    run's, bit for bit."""
    source, extra = DEFAULT_PATH_VARIANTS[variant]
    data = make_small_data(tmp_path / "data", source=source)
    pytest.importorskip(f"overnight.backends.{backend}_backend")
    steps, settings = 8, dict(every=4, eval_every=3, keep_last=2, keep_best=False, bits=4)
    ref = tmp_path / "ref"
    done = run_cli(train_args(backend, tiny_model_dir, data, ref, steps, *extra, **settings))
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "run"
    args = train_args(backend, tiny_model_dir, data, out, steps, *extra, **settings)
    killed = run_cli(args, kill_before_step=6)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert assert_checkpoints_sound(out) == 4
    resumed = run_cli(args + ["--auto-resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_losses_match(out, ref, steps)

    def evals(run):
        return {r["step"]: (r["val_loss"], r.get("val_accuracy")) for r in metrics(run) if r["event"] == "eval"}

    assert sorted(evals(ref)) == [3, 6, 8] and evals(out) == evals(ref)
    assert_adapter_equal(out, ref)


# =================================================================================================
# b. SIGKILL inside a save, at each phase of the commit protocol


IN_SAVE_SETTINGS = {"lora": (30, dict(every=2, eval_every=NO_EVAL, keep_last=2)), "qlora4": (QLORA4_STEPS, QLORA4)}


def in_save_campaign(backend, quant, trials_wanted, reference, tiny_model_dir, small_data, tmp_path):
    steps, settings = IN_SAVE_SETTINGS[quant]
    every = settings["every"]
    ref = reference(backend, steps, **settings)
    seed = seed_for("in-save")
    rng = random.Random(seed)
    plan = [POINTS[i % len(POINTS)] for i in range(trials_wanted)]
    rng.shuffle(plan)
    done, chains, launches, not_reached = Counter(), 0, 0, 0
    with Trials(f"SIGKILL inside a save ({backend}, {quant})", seed) as trials:
        while plan:
            chains += 1
            out = tmp_path / f"run{chains}"
            newest: int | None = None
            while True:
                point, nth = (plan[0], rng.choice([1, 2, 3])) if plan else (None, None)
                stale = leftovers(out)
                had_metrics = (out / "metrics.jsonl").exists()
                seen = len(metrics(out))
                launches += 1
                launch = Launch(train_args(backend, tiny_model_dir, small_data, out, steps, "--auto-resume",
                                           **settings), tmp_path / "logs", f"{chains}-{launches}",
                                fault=f"{point}:{nth}" if point else None)
                code = launch.wait()
                # The start after a kill: leftovers gone, and the newest verified checkpoint resumed.
                assert not [p for p in stale if p.exists()], f"leftovers survived the next start: {stale}"
                if stale:
                    assert "unfinished save" in launch.stdout, launch.tail()
                events = metrics(out) if newest is None else metrics(out)[seen:]
                if newest is not None and not events and point == "during_rotation" and code == -signal.SIGKILL:
                    # A save killed after its rename left its rotation undone; the resume rotates first (so a
                    # lowered keep_last frees space before the first save) and was killed there, before it said
                    # anything: the newest checkpoint stays, a victim is renamed but not yet deleted.
                    assert assert_checkpoints_sound(out) == newest
                    left = [p.name for p in leftovers(out)]
                    assert any(".tmp-delete-" in n for n in left), left
                    plan.pop(0)
                    done[point] += 1
                    trials.log(f"launch {launches}: killed at {point}:{nth} in the resume's rotation; newest "
                               f"{newest}; leftovers {left}")
                    continue
                if newest is None:
                    assert events and events[0]["event"] == "start", (had_metrics, events[:2])
                else:
                    assert events and events[0]["event"] == "resume" and events[0]["from_step"] == newest, \
                        (newest, events[:2], launch.tail())
                if code == 0:
                    if point:
                        not_reached += 1
                        trials.log(f"launch {launches}: {point}:{nth} never reached; the run finished")
                    break
                assert code == -signal.SIGKILL, launch.tail()
                beat = heartbeat(out)
                assert beat["pid"] == launch.pid
                step = beat["step"]  # the step whose save was killed
                known = [r["step"] for r in metrics(out) if r["event"] == "checkpoint"]
                known += [r["from_step"] for r in metrics(out) if r["event"] == "resume"]
                prev = max(known) if known else None
                newest = assert_checkpoints_sound(out)
                left = [p.name for p in leftovers(out)]
                if point in PRE_RENAME:
                    assert newest == prev, (point, step, newest, prev)
                    assert any(n.startswith(f"step-{step:08d}.tmp-") and ".tmp-delete" not in n for n in left), left
                elif point == "after_rename":
                    assert newest == step and (prev is None or prev < step), (step, newest, prev)
                else:  # during_rotation: committed and recorded; a victim renamed but not yet deleted
                    assert newest == step == prev, (step, newest, prev)
                    assert any(".tmp-delete-" in n for n in left), left
                assert step - (newest or 0) <= every, "more than one checkpoint interval lost"
                plan.pop(0)
                done[point] += 1
                trials.log(f"launch {launches}: killed at {point}:{nth} saving step {step}; newest {newest}; "
                           f"leftovers {left}")
            # Each run ends with a clean finish; it must equal the uninterrupted run.
            assert_losses_match(out, ref.run, steps)
            assert_adapter_equal(out, ref.run)
            assert not stray_temp_files(out), stray_temp_files(out)
            assert not (out / "checkpoints" / "quarantine").exists(), "a kill left an invalid checkpoint"
    report(case="b_sigkill_in_save", backend=backend, quant=quant, seed=seed, kills=sum(done.values()),
           per_point=dict(done), runs=chains, launches=launches, not_reached=not_reached, failures=0)


@pytest.mark.parametrize("backend, quant", campaign_params())
def test_sigkill_inside_a_save_never_leaves_a_mix(backend, quant, reference, tiny_model_dir, small_data, tmp_path):
    # CI's counts: one kill at each phase on the real backends (each kill is a process start), two on the numpy
    # reference; `-m soak` runs 102 (17 per phase).
    if quant == "lora":
        trials = count("FAULTS_SAVE_KILLS", 2 * len(POINTS) if backend == "numpy" else len(POINTS))
    else:
        trials = count("FAULTS_QLORA_SAVE_KILLS", len(POINTS))
    in_save_campaign(backend, quant, trials, reference, tiny_model_dir, small_data, tmp_path)


@pytest.mark.parametrize("backend, quant", campaign_params(soak=True))
def test_soak_sigkill_inside_a_save(backend, quant, reference, tiny_model_dir, small_data, tmp_path):
    in_save_campaign(backend, quant, count("FAULTS_SOAK_SAVE_KILLS", 102), reference, tiny_model_dir, small_data,
                     tmp_path)


def test_sigkill_while_replacing_the_exported_adapter(tiny_model_dir, small_data, tmp_path):
    """A kill between moving the old adapter/ aside and moving the new one in leaves no adapter/ and two
    temp folders; the next start removes them and exports the adapter again."""
    out = tmp_path / "run"
    settings = dict(every=4, eval_every=NO_EVAL)
    assert run_cli(train_args("numpy", tiny_model_dir, small_data, out, 8, **settings)).returncode == 0
    longer = train_args("numpy", tiny_model_dir, small_data, out, 12, "--auto-resume", **settings)
    killed = run_cli(longer, fault="during_export:1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not (out / "adapter").exists() and len(list(out.glob("adapter.tmp-*"))) == 2
    again = run_cli(longer)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "unfinished save" in again.stdout
    assert not stray_temp_files(out), stray_temp_files(out)
    assert sha_tree(out / "adapter") == sha_tree(out / "checkpoints" / "step-00000012" / "adapter")


# =================================================================================================
# c. Corruption matrix on committed checkpoints


def _changed(path: Path, data: bytes) -> bool:
    if path.read_bytes() == data:
        return False
    path.write_bytes(data)
    return True


def _data_offset(path: Path, raw: bytes) -> tuple[int, int]:
    """(header end, file end): for safetensors the JSON header ends at 8 + its length."""
    if path.suffix == ".safetensors" and len(raw) >= 8:
        return 8 + int.from_bytes(raw[:8], "little"), len(raw)
    return min(len(raw) // 4, 64), len(raw)


def truncate(path: Path) -> bool:
    return _changed(path, path.read_bytes()[: path.stat().st_size // 2])


def flip_header(path: Path) -> bool:
    raw = bytearray(path.read_bytes())
    if not raw:
        return False
    end, _ = _data_offset(path, raw)
    at = min(max(8, end // 2), len(raw) - 1) if path.suffix == ".safetensors" else min(3, len(raw) - 1)
    raw[at] ^= 0x20
    return _changed(path, bytes(raw))


def flip_data(path: Path) -> bool:
    raw = bytearray(path.read_bytes())
    if not raw:
        return False
    start, end = _data_offset(path, raw)
    at = min(start + (end - start) * 2 // 3, len(raw) - 1)
    raw[at] ^= 0x01
    return _changed(path, bytes(raw))


def zero_tail(path: Path) -> bool:
    raw = path.read_bytes()
    n = max(1, min(64, len(raw) // 2))
    return _changed(path, raw[:-n] + bytes(n))


def empty(path: Path) -> bool:
    return _changed(path, b"")


def delete(path: Path) -> bool:
    path.unlink()
    return True


CORRUPTIONS = [truncate, flip_header, flip_data, zero_tail, empty, delete]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", backend_params())
def test_corrupt_checkpoint_is_quarantined_and_the_previous_used(backend, corrupt, reference, tmp_path):
    """Each file of a real committed checkpoint (weights, optimizer, RNG and trainer state, adapter
    config, manifest.json, COMMIT), corrupted each way: verification rejects it, it is moved to
    quarantine intact (never deleted) with the reason, and the previous checkpoint is chosen."""
    ref = reference(backend, 12, every=4, eval_every=NO_EVAL, keep_last=5)
    source = ref.run / "checkpoints"
    files = sorted(p.relative_to(source / "step-00000012") for p in (source / "step-00000012").rglob("*")
                   if p.is_file())
    assert {"COMMIT", "manifest.json", "trainer_state.json"} <= {f.as_posix() for f in files}
    cases = 0
    for rel in files:
        run = tmp_path / f"case-{rel.as_posix().replace('/', '_')}"
        shutil.copytree(source, run / "checkpoints")
        target = run / "checkpoints" / "step-00000012" / rel
        if not corrupt(target):
            continue  # this way of damaging does not change this file (e.g. its tail is already zeros)
        cases += 1
        manager = checkpoint_manager(run)
        ok, why = manager.verify(manager.path_for(12))
        assert not ok and why, f"{rel}: {corrupt.__name__} was not detected"
        damaged = sha_tree(manager.path_for(12))
        previous = sha_tree(manager.path_for(8))
        chosen = manager.latest_valid()
        assert chosen is not None and chosen.step == 8, f"{rel}: {corrupt.__name__} -> {chosen}"
        assert sha_tree(manager.path_for(8)) == previous
        (moved,) = list(manager.quarantine_dir.iterdir())
        assert moved.name.startswith("step-00000012-")
        assert (moved / "QUARANTINED.txt").read_text().strip() == why
        kept = sha_tree(moved)
        kept.pop("QUARANTINED.txt")
        assert kept == damaged, f"{rel}: the quarantined copy is not what was found"
        assert [i.step for i in manager.list()] == [4, 8]
    assert cases >= len(files) - 2
    report(case="c_corruption", backend=backend, kind=corrupt.__name__, files=len(files), trials=cases, failures=0)


@pytest.mark.parametrize("backend", backend_params())
def test_corrupt_checkpoints_end_to_end_resume_from_the_previous(backend, reference, tiny_model_dir, small_data,
                                                                 tmp_path):
    """Through the CLI: the newest checkpoint lacks COMMIT and the one before has a flipped weight byte;
    --auto-resume quarantines both, resumes from the one before them, and ends equal to the
    uninterrupted run."""
    settings = dict(every=4, eval_every=NO_EVAL, keep_last=5)
    ref = reference(backend, 12, **settings)
    run = copy_run(ref.run, tmp_path / "run")
    (run / "checkpoints" / "step-00000012" / "COMMIT").unlink()
    weights = sorted((run / "checkpoints" / "step-00000008" / "adapter").glob("*.safetensors"))[0]
    assert flip_data(weights)
    result = run_cli(train_args(backend, tiny_model_dir, small_data, run, 12, "--auto-resume", **settings))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("is invalid") == 2, result.stdout
    assert [r["from_step"] for r in metrics(run) if r["event"] == "resume"] == [4]
    quarantined = sorted(p.name[:13] for p in (run / "checkpoints" / "quarantine").iterdir())
    assert quarantined == ["step-00000008", "step-00000012"]
    assert_losses_match(run, ref.run, 12)
    assert_adapter_equal(run, ref.run)


def test_a_best_checkpoint_corrupted_on_disk_is_never_exported(tiny_model_dir, small_data, tmp_path):
    """The final adapter comes from the best checkpoint; if that folder no longer verifies (bit rot
    since it was written), it is quarantined and the newest good checkpoint is exported instead of
    a corrupted copy."""
    out = tmp_path / "run"
    first = run_cli(train_args("numpy", tiny_model_dir, small_data, out, 8, every=4, eval_every=4, keep_last=5))
    assert first.returncode == 0, first.stderr
    best = json.loads((out / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())["best"]["best_step"]
    assert best in (4, 8)
    # The last step is always evaluated (README, Decisions); a learning rate far too high makes step 12 worse
    # than the rotted best, so the best stays the old checkpoint (deterministic on the numpy backend).
    launch = Launch(train_args("numpy", tiny_model_dir, small_data, out, 12, "--auto-resume", every=4,
                               eval_every=NO_EVAL, keep_last=5, lr=1.0) + ["--allow-config-change"],
                    tmp_path / "logs", "resume", sleep_s=0.3)
    assert wait_heartbeat(out, launch, min_step=9) is not None, launch.tail()
    weights = out / "checkpoints" / f"step-{best:08d}" / "adapter" / "adapter.safetensors"
    assert flip_data(weights)  # the best checkpoint rots while the run goes on
    assert launch.wait() == 0, launch.tail()
    exported = (out / "adapter" / "adapter.safetensors").read_bytes()
    assert exported != weights.read_bytes() if weights.exists() else True
    manager = checkpoint_manager(out)
    assert manager.verify(manager.path_for(12))[0]
    assert exported == (manager.path_for(12) / "adapter" / "adapter.safetensors").read_bytes()
    assert any(p.name.startswith(f"step-{best:08d}") for p in manager.quarantine_dir.iterdir())


# =================================================================================================
# d. Disk full


@pytest.mark.parametrize("backend, point", [pytest.param("numpy", p, id=f"numpy-{p}")
                                            for p in ("after_backend_files", "after_files", "before_commit")]
                         + [pytest.param(b, "after_backend_files", id=b, marks=m)
                            for b, m in (("torch", pytest.mark.torch), ("mlx", pytest.mark.mlx))])
def test_disk_full_during_a_save_fails_cleanly_and_resumes(backend, point, reference, tiny_model_dir, small_data,
                                                           tmp_path):
    settings = dict(every=4, eval_every=NO_EVAL, keep_last=3)
    ref = reference(backend, 12, **settings)
    out = tmp_path / "run"
    args = train_args(backend, tiny_model_dir, small_data, out, 12, **settings)
    result = run_cli(args, fault=f"{point}:2:enospc")  # the second save (step 8) finds the disk full
    assert result.returncode == 1, result.stdout + result.stderr
    assert "disk full while saving step 8" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not leftovers(out), "the failed save left its temp folder"
    assert assert_checkpoints_sound(out) == 4
    beat = heartbeat(out)
    assert beat["state"] == "failed" and "disk full" in beat["reason"]
    assert [r for r in metrics(out) if r["event"] == "failed"][-1]["step"] == 8
    resumed = run_cli(args + ["--auto-resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert [r["from_step"] for r in metrics(out) if r["event"] == "resume"] == [4]
    assert_losses_match(out, ref.run, 12)
    assert_adapter_equal(out, ref.run)


def _tmpfs_works(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = where / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{probe}'"],
                            capture_output=True, timeout=30)
    return result.returncode == 0


def in_small_fs(tmp_path: Path, size: str, script: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a shell script with MNT mounted as a fresh tmpfs of ``size`` in a private mount namespace;
    the script copies what the test needs out of MNT before the namespace (and the tmpfs) goes away."""
    if not _tmpfs_works(tmp_path):
        pytest.skip("mounting a tmpfs in a private mount namespace is not permitted here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    body = f"set -u\nmount -t tmpfs -o size={size} tmpfs '{mnt}'\nMNT='{mnt}'\n{script}\n"
    from faults_util import cli_env

    return subprocess.run(["unshare", "-Urm", "bash", "-c", body], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout, cwd=tmp_path)


def _fill(leave_bytes: int) -> str:
    """Shell: fill MNT with a file leaving about ``leave_bytes`` free."""
    return (f"\"$PY\" -c \"import os,sys; m=sys.argv[1]; s=os.statvfs(m); "
            f"free=s.f_bavail*s.f_frsize; open(m+'/filler','wb').write(bytes(max(0, free-{leave_bytes})))\" \"$MNT\"")


@pytest.mark.parametrize("backend", backend_params())
def test_real_full_filesystem_first_save(backend, tiny_model_dir, small_data, tmp_path, session_dir):
    """A real small filesystem (tmpfs) where the first checkpoint does not fit: the backend's own writer
    hits ENOSPC (safetensors, torch.save and mlx each report it differently); the run exits 1 with a
    clear disk-full message, no traceback, and no temp folder left behind."""
    require(backend, tiny_model_dir, small_data, session_dir)
    rank = {"numpy": 192, "torch": 256, "mlx": 256}[backend]  # a checkpoint of about 2-3 MB
    import sys

    args = train_args(backend, tiny_model_dir, small_data, Path("$MNT/run"), 4, every=2, rank=rank)
    quoted = " ".join(f'"{a}"' if "$MNT" in a else f"'{a}'" for a in args)
    result = in_small_fs(tmp_path, "1700k", f"""
PY='{sys.executable}'
"$PY" -m overnight {quoted} > '{tmp_path}/out.txt' 2> '{tmp_path}/err.txt'
echo $? > '{tmp_path}/rc.txt'
df -k "$MNT" > '{tmp_path}/df.txt'
cp -a "$MNT/run" '{tmp_path}/copy'
""")
    assert result.returncode == 0, result.stderr
    rc = int((tmp_path / "rc.txt").read_text())
    err, out = (tmp_path / "err.txt").read_text(), (tmp_path / "out.txt").read_text()
    assert rc == 1, out + err
    assert "disk full while saving step 2" in err and "Traceback" not in err, err
    copy = tmp_path / "copy"
    assert not leftovers(copy), [p.name for p in leftovers(copy)]
    assert assert_checkpoints_sound(copy) is None
    beat = heartbeat(copy)
    assert beat["state"] == "failed" and "disk full" in beat["reason"]


def test_real_full_filesystem_keeps_the_last_good_checkpoint(tiny_model_dir, small_data, tmp_path):
    """A real small filesystem that fills up between two saves: the next save is refused before it
    writes (not enough free space), the run exits 1 naming the reason, the last good checkpoint is
    byte-for-byte intact, and no temp folder is left."""
    import sys

    def args(steps, *extra):
        a = train_args("numpy", tiny_model_dir, small_data, Path("$MNT/run"), steps, *extra, every=4, rank=32)
        return " ".join(f'"{x}"' if "$MNT" in x else f"'{x}'" for x in a)

    result = in_small_fs(tmp_path, "4m", f"""
PY='{sys.executable}'
"$PY" -m overnight {args(4)} > /dev/null 2> '{tmp_path}/err1.txt' || exit 11
cp -a "$MNT/run" '{tmp_path}/before'
{_fill(200 * 1024)}
"$PY" -m overnight {args(8, "--auto-resume")} > '{tmp_path}/out.txt' 2> '{tmp_path}/err.txt'
echo $? > '{tmp_path}/rc.txt'
rm -f "$MNT/filler"
cp -a "$MNT/run" '{tmp_path}/after'
""")
    assert result.returncode == 0, result.stderr + (tmp_path / "err1.txt").read_text()
    err = (tmp_path / "err.txt").read_text()
    assert int((tmp_path / "rc.txt").read_text()) == 1, err
    assert "not enough free disk space" in err and "save step 8" in err and "Traceback" not in err, err
    after = tmp_path / "after"
    assert not leftovers(after)
    assert assert_checkpoints_sound(after) == 4
    assert sha_tree(after / "checkpoints" / "step-00000004") == \
        sha_tree(tmp_path / "before" / "checkpoints" / "step-00000004")


def test_a_full_disk_at_resume_is_a_message_and_status_says_failed(tiny_model_dir, small_data, tmp_path):
    """A run killed mid-way (its heartbeat still says running), resumed on a disk with nothing left: config.yaml
    cannot be written. Once a traceback, and `overnight status` said "interrupted"."""
    import sys

    def args(steps, *extra):
        a = train_args("numpy", tiny_model_dir, small_data, Path("$MNT/run"), steps, *extra, every=4, rank=32)
        return " ".join(f'"{x}"' if "$MNT" in x else f"'{x}'" for x in a)

    killed = ("import json,sys; p=sys.argv[1]; b=json.load(open(p)); b['state']='running'; "
              "open(p,'w').write(json.dumps(b))")
    result = in_small_fs(tmp_path, "4m", f"""
PY='{sys.executable}'
"$PY" -m overnight {args(4)} > /dev/null 2> '{tmp_path}/err1.txt' || exit 11
"$PY" -c "{killed}" "$MNT/run/heartbeat.json"
{_fill(0)}
"$PY" -m overnight {args(8, "--auto-resume")} > '{tmp_path}/out.txt' 2> '{tmp_path}/err.txt'
echo $? > '{tmp_path}/rc.txt'
"$PY" -m overnight status "$MNT/run" > '{tmp_path}/status.txt' 2>&1
""")
    assert result.returncode == 0, result.stderr + (tmp_path / "err1.txt").read_text()
    err = (tmp_path / "err.txt").read_text()
    assert int((tmp_path / "rc.txt").read_text()) == 1, err
    assert "disk full while writing" in err and "step 4) is intact" in err and "Traceback" not in err, err
    status = (tmp_path / "status.txt").read_text()
    assert "failed at step 4: disk full" in status and "interrupted" not in status, status


# =================================================================================================
# e. SIGTERM and SIGINT on the real backends


# CI signals the defaults users run (qlora4) with SIGTERM and SIGINT; the plain-LoRA variants add no path and are
# soak. The signal lands at step 3 or later, so the eval at 3 (which saves nothing) has always run before the
# checkpoint the signal forces.
SIGNAL_SETTINGS = {"lora": (16, dict(every=5, eval_every=6, keep_last=3)), "qlora4": (QLORA4_STEPS, QLORA4)}


@pytest.mark.parametrize("backend, quant, sig, code", [
    pytest.param(b, q, sig, code, marks=_marks(b, q == "lora"), id=f"{b}{'' if q == 'lora' else '-' + q}-{sig.name}")
    for b in REAL for q in ("lora", "qlora4") for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130))])
def test_signal_commits_the_current_step_and_resume_is_exact(backend, quant, sig, code, reference, tiny_model_dir,
                                                             small_data, tmp_path):
    steps, settings = SIGNAL_SETTINGS[quant]
    ref = reference(backend, steps, **settings)
    out, record = tmp_path / "run", tmp_path / "record.jsonl"
    args = train_args(backend, tiny_model_dir, small_data, out, steps, **settings)
    launch = Launch(args, tmp_path / "logs", "signalled", record=record, sleep_s=0.15)
    assert wait_heartbeat(out, launch, min_step=3) is not None, launch.tail()
    launch.kill(sig)
    assert launch.wait() == code, launch.tail()
    (interrupted,) = [r for r in metrics(out) if r["event"] == "interrupted"]
    stopped = interrupted["step"]
    assert 3 <= stopped < steps
    assert assert_checkpoints_sound(out) == stopped  # committed at the step it stopped on
    assert heartbeat(out)["state"] == "interrupted" and heartbeat(out)["step"] == stopped
    resumed = run_cli(args + ["--auto-resume"], record=record)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["from_step"] for r in metrics(out) if r["event"] == "resume"] == [stopped]
    assert_losses_match(out, ref.run, steps)
    assert_adapter_equal(out, ref.run)
    assert_each_sample_once_per_epoch(record, ref.record, steps, SAMPLES)


# =================================================================================================
# f. Config mismatch on resume


def _changed_model(model: Path, target: Path) -> Path:
    """Another model: the same files but one config value. (The model counts by content, so a plain copy
    elsewhere is the same model and resumes.)"""
    shutil.copytree(model, target)
    config = json.loads((target / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (target / "config.json").write_text(json.dumps(config))
    return target


def _changed_data(small_data: Path, target: Path) -> Path:
    target.mkdir()
    shutil.copy(small_data / "val.jsonl", target / "val.jsonl")
    rows = (small_data / "train.jsonl").read_text().splitlines()
    rows[3] = rows[3].replace("?", "??", 1) if "?" in rows[3] else rows[3].replace(".", "..", 1)
    (target / "train.jsonl").write_text("\n".join(rows) + "\n")
    return target


@pytest.mark.parametrize("backend", backend_params())
def test_config_mismatch_is_refused_naming_each_field(backend, reference, tiny_model_dir, small_data, tmp_path):
    settings = dict(every=4, eval_every=NO_EVAL)
    ref = reference(backend, 4, **settings)
    other_model = _changed_model(tiny_model_dir, tmp_path / "model-changed")
    other_data = _changed_data(small_data, tmp_path / "data-changed")
    changes = {  # what the user changes -> what the refusal must name
        "lora.rank": (["--set", "lora.rank=8"], "lora.rank: 4 -> 8"),
        "lora.targets": (["--set", "lora.targets=[q_proj, v_proj]"], "lora.targets:"),
        "lora.use_dora": (["--set", "lora.use_dora=true"], "lora.use_dora: False -> True"),
        "model": (["--model", str(other_model)], "model:"),
        "data": (["--data", str(other_data)], "train data file contents"),
        "seq_len": (["--set", "model.max_seq_length=96"], "model.max_seq_length: 128 -> 96"),
        "batch": (["--batch-size", "2"], "train.batch_size: 4 -> 2"),
        "accumulation": (["--set", "train.grad_accumulation=2"], "train.grad_accumulation: 1 -> 2"),
        "optimizer": (["--set", "train.optimizer=paged_adamw_8bit"], "train.optimizer: 'adamw' -> 'paged_adamw_8bit'"),
    }
    if backend != "numpy":
        # Refused from the fingerprint before the model loads, the same core code on every backend: the numpy
        # reference checks each field; a real backend, the several-at-once case below (each start costs seconds).
        changes = {}
    for name, (extra, named) in changes.items():
        run = copy_run(ref.run, tmp_path / f"run-{name}")
        before = sha_tree(run)
        args = train_args(backend, tiny_model_dir, small_data, run, 8, **settings) + extra + ["--auto-resume"]
        result = run_cli(args)
        assert result.returncode == 3, (name, result.stdout + result.stderr)
        assert named in result.stderr and "--allow-config-change" in result.stderr, (name, result.stderr)
        assert sha_tree(run) == before, f"{name}: a refused resume changed the run directory"
    # Several at once: every one is named.
    run = copy_run(ref.run, tmp_path / "run-several")
    result = run_cli(train_args(backend, tiny_model_dir, small_data, run, 8, **settings)
                     + ["--batch-size", "2", "--set", "lora.rank=8", "--data", str(other_data), "--auto-resume"])
    assert result.returncode == 3
    for named in ("train.batch_size", "lora.rank", "train data file contents"):
        assert named in result.stderr


@pytest.mark.parametrize("backend", backend_params())
def test_config_override_proceeds_and_is_recorded(backend, reference, tiny_model_dir, small_data, tmp_path):
    """--allow-config-change resumes despite changes the saved state can carry, and records them;
    changes it cannot carry (the adapter's shape, the data order, the optimizer's kind) still stop
    with a clear error rather than a crash or a silently wrong run."""
    settings = dict(every=4, eval_every=NO_EVAL)
    ref = reference(backend, 4, **settings)
    other_model = _changed_model(tiny_model_dir, tmp_path / "model-changed")
    other_data = _changed_data(small_data, tmp_path / "data-changed")
    run = copy_run(ref.run, tmp_path / "run-carry")
    extra = ["--set", "model.max_seq_length=96", "--set", "train.grad_accumulation=2", "--data", str(other_data),
             "--model", str(other_model), "--allow-config-change", "--auto-resume"]
    result = run_cli(train_args(backend, tiny_model_dir, small_data, run, 8, **settings) + extra)
    assert result.returncode == 0, result.stdout + result.stderr
    (resume,) = [r for r in metrics(run) if r["event"] == "resume"]
    assert resume["from_step"] == 4
    recorded = " | ".join(resume["overridden"])
    for named in ("model.max_seq_length: 128 -> 96", "train.grad_accumulation: 1 -> 2", "train data file contents",
                  "model:"):
        assert named in recorded, recorded
    assert "resuming despite changes" in result.stdout
    uncarried = {"batch": ["--batch-size", "2"]}  # refused by the data order's restore, whatever the backend
    if backend != "numpy":  # the test-only numpy backend does not check what it loads; the real ones must
        uncarried["lora.rank"] = ["--set", "lora.rank=8"]
        uncarried["lora.targets"] = ["--set", "lora.targets=[q_proj, v_proj]"]
        uncarried["optimizer"] = ["--set", "train.optimizer=paged_adamw_8bit"]
    for name, change in uncarried.items():
        run = copy_run(ref.run, tmp_path / f"run-{name}")
        result = run_cli(train_args(backend, tiny_model_dir, small_data, run, 8, **settings) + change
                         + ["--allow-config-change", "--auto-resume"])
        assert result.returncode in (2, 3), (name, result.returncode, result.stdout + result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert not [r for r in metrics(run) if r["event"] == "train" and r["step"] > 4], name


# =================================================================================================
# g. Resume modes on the real backends


@pytest.mark.parametrize("backend", backend_params(REAL))
def test_resume_from_and_before_step_are_exact(backend, reference, tiny_model_dir, small_data, tmp_path):
    settings = dict(every=4, eval_every=NO_EVAL, keep_last=5)
    ref = reference(backend, 12, **settings)
    for flag, value, expect in (("--resume-from", "4", 4), ("--before-step", "12", 8)):
        run = copy_run(ref.run, tmp_path / f"run{flag}")
        result = run_cli(train_args(backend, tiny_model_dir, small_data, run, 12, **settings) + [flag, value])
        assert result.returncode == 0, result.stdout + result.stderr
        assert [r["from_step"] for r in metrics(run) if r["event"] == "resume"] == [expect]
        assert_losses_match(run, ref.run, 12)
        assert_adapter_equal(run, ref.run)
        assert [i.step for i in checkpoint_manager(run).list()] == [4, 8, 12]


def test_rollback_with_a_change_never_mixes_timelines(tiny_model_dir, small_data, tmp_path):
    """--before-step N with a changed learning rate starts a new timeline from the checkpoint before N.
    The old timeline's later checkpoints are set aside (kept, not deleted): a save at the same step
    writes the new state, and a crash right after the rollback resumes the new timeline, not the
    abandoned one."""
    settings = dict(every=4, eval_every=NO_EVAL, keep_last=5)
    out = tmp_path / "run"
    assert run_cli(train_args("numpy", tiny_model_dir, small_data, out, 12, **settings)).returncode == 0
    old = {s: sha_tree(out / "checkpoints" / f"step-{s:08d}") for s in (4, 8, 12)}
    changed = train_args("numpy", tiny_model_dir, small_data, out, 12, **settings) + [
        "--set", "train.learning_rate=0.002", "--allow-config-change"]
    # Roll back to 4 and die inside the first save (step 8): the old 8 and 12 must not come back.
    killed = run_cli(changed + ["--before-step", "8"], fault="before_commit:1")
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert assert_checkpoints_sound(out) == 4
    resumed = run_cli(changed + ["--auto-resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [r["from_step"] for r in metrics(out) if r["event"] == "resume"] == [4, 4]
    manager = checkpoint_manager(out)
    for step in (8, 12):
        fingerprint = manager.manifest(manager.path_for(step))["fingerprint"]
        assert fingerprint["config"]["train.learning_rate"] == 0.002, f"step {step} is from the old timeline"
    aside = [p for p in (out / "checkpoints").rglob("step-*") if p.is_dir() and p.parent != out / "checkpoints"]
    kept = sorted(sha_tree(p) == old[int(p.name[5:13])] for p in aside if int(p.name[5:13]) in (8, 12))
    assert kept == [True, True], [p.relative_to(out) for p in aside]


def test_fresh_archives_every_file_and_deletes_nothing(tiny_model_dir, small_data, tmp_path):
    out = tmp_path / "run"
    args = train_args("numpy", tiny_model_dir, small_data, out, 8, every=4, eval_every=4)
    assert run_cli(args).returncode == 0
    before = {name: digest for name, digest in sha_tree(out).items() if name != ".lock"}  # the run folder's lock stays
    assert run_cli(args + ["--fresh"]).returncode == 0
    (archive,) = list(out.glob("archive-*"))
    assert sha_tree(archive) == before
