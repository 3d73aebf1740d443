"""Helpers for the fault-injection suite (tests/test_faults.py).

Imported in two places:
  * by the tests, for launching `overnight train` as a real subprocess and judging what it left;
  * inside that subprocess, as a backend plugin (``--backend faults_util:RecordingTorch`` etc., with
    PYTHONPATH=tests), where a thin subclass of the real backend records which samples each optimizer
    step consumed. Nothing in the product is changed for this: the recorder wraps the backend from
    the outside and, only when ``OVERNIGHT_TEST_RECORD`` is set, wraps ``TrainStream._sequences`` (the
    one place a batch's sample indices pass through) and ``TrainStream.next_batch`` (which groups them by batch)
    for the lifetime of that subprocess.

With OVERNIGHT_TEST_KILL_BEFORE_STEP=N the recorder SIGKILLs its own process when the loop asks for step N,
that is after step N-1 and whatever eval and save followed it: a crash at an exact place, not a random one.
With OVERNIGHT_TEST_ABORT_AT_STEP=N it SIGABRTs itself at step N while that step's micro-batch is not split
(N:always: however it is split), as a Metal out-of-memory does.

Record lines (JSON, appended to the file named by OVERNIGHT_TEST_RECORD):
  {"pid": ..., "step": N, "batches": [[epoch, [sample, ...]], ...]}   one per optimizer step N
A resumed process re-runs the steps after its checkpoint and records them again; the later line wins.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA_DIR = ROOT / "data"

# -- inside the subprocess: recording backends ------------------------------------------------------

# The loop builds batches ahead on a thread (overnight.data.prefetch), so the draws seen so far run ahead of the
# steps trained: _PENDING holds one entry per batch built, in order, and each step takes its own batches from it.
_PENDING: list = []
_BUILDING: list = []  # the draws of the batch being built now
_PATCHED: list = []


def _patch_stream() -> None:
    if _PATCHED:
        return
    from overnight import data

    original = data.TrainStream._sequences

    def _sequences(self, members):
        _BUILDING.append([int(self.epoch), [int(i) for i in members]])
        return original(self, members)

    original_next = data.TrainStream.next_batch

    def next_batch(self):
        try:
            return original_next(self)
        finally:
            _PENDING.append(_BUILDING[:])
            _BUILDING.clear()

    data.TrainStream._sequences = _sequences
    data.TrainStream.next_batch = next_batch
    _PATCHED.append(original)


def _recording(base: type) -> type:
    class Recording(base):  # type: ignore[misc, valid-type]
        def setup(self, cfg, seed):
            self._rec_path = os.environ.get("OVERNIGHT_TEST_RECORD")
            self._rec_sleep = float(os.environ.get("OVERNIGHT_TEST_SLEEP_S", "0") or 0)
            self._rec_step = 0
            self._rec_accumulation = cfg.train.grad_accumulation
            self._rec_per_step = cfg.train.grad_accumulation * int(os.environ.get("WORLD_SIZE", "1") or 1)
            if self._rec_path:
                _patch_stream()
            return super().setup(cfg, seed)

        def load(self, directory):
            super().load(directory)
            self._rec_step = json.loads((Path(directory) / "trainer_state.json").read_text())["step"]

        def train_step(self, micro_batches, lr, step_scales=None):
            if self._rec_step + 1 == int(os.environ.get("OVERNIGHT_TEST_KILL_BEFORE_STEP", "0") or 0):
                os.kill(os.getpid(), signal.SIGKILL)  # a deterministic crash: after step N-1's eval and save, if any
            abort_at, _, when = os.environ.get("OVERNIGHT_TEST_ABORT_AT_STEP", "").partition(":")
            if abort_at and self._rec_step + 1 == int(abort_at) and (
                    when == "always" or len(micro_batches) <= self._rec_accumulation):
                # What a Metal out-of-memory does: SIGABRT from C++, at this step while its micro-batch is whole
                # (":always": at any split).
                os.kill(os.getpid(), signal.SIGABRT)
            if self._rec_sleep:
                time.sleep(self._rec_sleep)
            result = super().train_step(micro_batches, lr, step_scales)
            self._rec_step += 1
            if self._rec_path:
                batches = [draw for built in _PENDING[:self._rec_per_step] for draw in built]
                del _PENDING[:self._rec_per_step]
                with open(self._rec_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"pid": os.getpid(), "step": self._rec_step, "batches": batches}) + "\n")
            return result

    Recording.__name__ = Recording.__qualname__ = f"Recording{base.__name__}"
    return Recording


def __getattr__(name: str):  # PEP 562: build a recording backend only when the CLI asks for it
    if name == "RecordingNumpy":
        from refbackend import NumpyBackend

        return _recording(NumpyBackend)
    if name == "RecordingTorch":
        from overnight.backends.torch_backend import TorchBackend

        return _recording(TorchBackend)
    if name == "RecordingMLX":
        from overnight.backends.mlx_backend import MLXBackend

        return _recording(MLXBackend)
    raise AttributeError(name)


# -- in the tests: launching the CLI ---------------------------------------------------------------

BACKEND_SPECS = {"numpy": "faults_util:RecordingNumpy", "torch": "faults_util:RecordingTorch",
                 "mlx": "faults_util:RecordingMLX"}
NO_EVAL = 10**6


def make_small_data(target: Path, train_rows: int = 26, val_rows: int = 8, source: Path = DATA_DIR) -> Path:
    """A copy of the bundled data (``source``: data/ or one of its method folders), cut short so a short run
    crosses several epochs (26 rows at batch 4 is 6 full batches and a last one of 2)."""
    target.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train_rows), ("val.jsonl", val_rows)):
        lines = [line for line in (source / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        (target / name).write_text("\n".join(lines[:rows]) + "\n", encoding="utf-8")
    return target


def train_args(backend: str, model: Path, data: Path, out: Path, steps: int, *extra: str, every: int = 4,
               eval_every: int = NO_EVAL, keep_last: int = 3, rank: int = 4, lr: float = 0.01, bits: int = 0,
               keep_best: bool = True) -> list[str]:
    """bits=0 is plain LoRA; bits=4 is the default users run (QLoRA: bitsandbytes NF4 on torch, MLX
    affine 4-bit on mlx). keep_best=False saves only on schedule, so an eval need not be followed by
    a save at its own step."""
    return ["train", "--backend", BACKEND_SPECS[backend], "--model", str(model), "--data", str(data),
            "--output", str(out), "--max-steps", str(steps), "--batch-size", "4", "--quiet",
            "--set", "train.report_every=1", "--set", f"checkpoint.every_steps={every}",
            "--set", f"checkpoint.keep_last={keep_last}", "--set", f"eval.every_steps={eval_every}",
            "--set", "eval.max_batches=2", "--set", "eval.predictions=1", "--set", "eval.max_new_tokens=4",
            "--set", "train.warmup_steps=2", "--set", f"lora.rank={rank}", "--set", "lora.dropout=0.05",
            "--set", "model.max_seq_length=128", "--set", f"model.quantization.bits={bits}",
            "--set", f"checkpoint.keep_best={'true' if keep_best else 'false'}",
            "--set", f"train.learning_rate={lr}",
            # Early stopping on, checked often, but never allowed to stop: its state must survive resumes.
            "--set", "early_stopping.warmup_steps=2", "--set", "early_stopping.check_every_steps=3",
            "--set", "early_stopping.patience=100000", *extra]


def cli_env(fault: str | None = None, record: Path | None = None, sleep_s: float = 0.0, kill_before_step: int = 0,
            **ref_faults) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["OVERNIGHT_REF_FAULTS"] = json.dumps(ref_faults)
    env.pop("OVERNIGHT_FAULT", None)
    env.pop("OVERNIGHT_TEST_RECORD", None)
    env.pop("OVERNIGHT_TEST_KILL_BEFORE_STEP", None)
    if fault:
        env["OVERNIGHT_FAULT"] = fault
    if kill_before_step:
        env["OVERNIGHT_TEST_KILL_BEFORE_STEP"] = str(kill_before_step)
    if record:
        env["OVERNIGHT_TEST_RECORD"] = str(record)
    if sleep_s:
        env["OVERNIGHT_TEST_SLEEP_S"] = str(sleep_s)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_cli(args: list[str], timeout: float = 300, **env_kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True,
                          env=cli_env(**env_kw), stdin=subprocess.DEVNULL, timeout=timeout, cwd=ROOT)


class Launch:
    """A CLI subprocess whose output goes to files (no pipe can fill up and stall it)."""

    def __init__(self, args: list[str], logdir: Path, name: str, **env_kw):
        logdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logdir / f"{name}.out", logdir / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "overnight", *args], stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env=cli_env(**env_kw), cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self):
        return self.proc.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self._out.close()
            self._err.close()
        return code

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return f"--- stdout ---\n{self.stdout[-n:]}\n--- stderr ---\n{self.stderr[-n:]}"


def heartbeat(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / "heartbeat.json").read_text())
    except (OSError, ValueError):
        return None


def wait_heartbeat(run_dir: Path, launch: Launch, min_step: int = 0, timeout: float = 120) -> dict | None:
    """The first heartbeat this process wrote with step >= min_step; None if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beat = heartbeat(run_dir)
        if beat and beat.get("pid") == launch.pid and beat.get("step", -1) >= min_step:
            return beat
        if launch.poll() is not None:
            return None
        time.sleep(0.005)
    raise AssertionError(f"no heartbeat from pid {launch.pid} within {timeout}s\n{launch.tail()}")


def wait_heartbeat_any(run_dir: Path, launch: Launch, min_step: int = 0, timeout: float = 120) -> dict | None:
    """As wait_heartbeat, for a job whose rank 0 (a child of the launcher) writes the heartbeat."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        beat = heartbeat(run_dir)
        if beat and beat.get("pid") != launch.pid and beat.get("step", -1) >= min_step \
                and beat.get("state") == "running":
            return beat
        if launch.poll() is not None:
            return None
        time.sleep(0.005)
    raise AssertionError(f"no heartbeat from the job under pid {launch.pid} within {timeout}s\n{launch.tail()}")


# -- judging a run directory -----------------------------------------------------------------------

def metrics(run_dir: Path) -> list[dict]:
    from overnight.runs.rundir import read_metrics

    return read_metrics(Path(run_dir))


def train_lines(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run_dir) if r["event"] == "train"]


def last_losses(run_dir: Path) -> dict[int, float]:
    return dict(train_lines(run_dir))  # a re-run step's later line wins


def assert_losses_match(run_dir: Path, reference: Path, max_steps: int) -> None:
    """Every train line ever written (first tries and re-runs alike) equals the uninterrupted run's
    loss at that step, bit for bit, and the last-written loss exists for every step."""
    ref = last_losses(reference)
    assert sorted(ref) == list(range(1, max_steps + 1)), "the reference run lacks steps"
    got = last_losses(run_dir)
    assert got == ref, {s: (got.get(s), ref.get(s)) for s in sorted(set(got) | set(ref)) if got.get(s) != ref.get(s)}
    wrong = [(s, loss, ref[s]) for s, loss in train_lines(run_dir) if loss != ref[s]]
    assert not wrong, f"re-run steps differ from the uninterrupted run: {wrong[:5]}"


def tree_bytes(folder: Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _json_canonical(value):
    """JSON with every list of strings sorted: PEFT writes adapter_config.json's target_modules from a
    Python set, whose order follows the per-process string hash seed, so only the order may differ."""
    if isinstance(value, dict):
        return {k: _json_canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_json_canonical(v) for v in value]
        return sorted(items) if all(isinstance(v, str) for v in items) else items
    return value


def assert_adapter_equal(run_dir: Path, reference: Path) -> None:
    """The exported adapters are equal: weights (every .safetensors: the writers here embed only fixed
    metadata, {"format": ...}) and every other file byte for byte, except JSON files, which are
    compared as data up to the order of string lists (see _json_canonical)."""
    got, ref = tree_bytes(Path(run_dir) / "adapter"), tree_bytes(Path(reference) / "adapter")
    assert sorted(got) == sorted(ref)
    assert any(name.endswith(".safetensors") for name in ref)
    differ = []
    for name in ref:
        if name.endswith(".json") and got[name] != ref[name]:
            if _json_canonical(json.loads(got[name])) == _json_canonical(json.loads(ref[name])):
                continue
        if got[name] != ref[name]:
            differ.append(name)
    assert not differ, f"adapter files differ from the uninterrupted run: {differ}"


def sha_tree(folder: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree_bytes(folder).items()}


def effective_record(record: Path) -> dict[int, list]:
    steps: dict[int, list] = {}
    if Path(record).is_file():
        for line in Path(record).read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by SIGKILL
            steps[entry["step"]] = entry["batches"]  # later wins
    return steps


def assert_each_sample_once_per_epoch(record: Path, reference_record: Path, max_steps: int,
                                      samples_per_epoch: int) -> int:
    """The steps that make up the final run consumed the same batches as the uninterrupted run, and
    every epoch they cover used each sample exactly once (the last epoch: at most once). Returns the
    number of complete epochs seen."""
    got, ref = effective_record(record), effective_record(reference_record)
    assert sorted(got) == list(range(1, max_steps + 1)), f"steps recorded: {sorted(got)}"
    assert got == ref, [s for s in range(1, max_steps + 1) if got.get(s) != ref.get(s)][:5]
    seen: dict[int, list[int]] = {}
    for step in range(1, max_steps + 1):
        for epoch, members in got[step]:
            seen.setdefault(epoch, []).extend(members)
    epochs = sorted(seen)
    assert epochs == list(range(len(epochs))), epochs
    for epoch in epochs[:-1]:
        assert sorted(seen[epoch]) == list(range(samples_per_epoch)), f"epoch {epoch}: {sorted(seen[epoch])}"
    last = seen[epochs[-1]]
    assert len(last) == len(set(last)) and set(last) <= set(range(samples_per_epoch))
    return len(epochs) - 1 + (sorted(last) == list(range(samples_per_epoch)))


def checkpoint_manager(run_dir: Path):
    from overnight.runs.checkpoint import CheckpointManager

    return CheckpointManager(Path(run_dir), log=lambda message: None)


def assert_checkpoints_sound(run_dir: Path) -> int | None:
    """Every folder under a final name verifies and holds its own step (never a mix of two);
    returns the newest step (None when there is none). Read-only: nothing is quarantined."""
    manager = checkpoint_manager(run_dir)
    newest = None
    for info in manager.list():
        assert info.valid, f"{info.path.name} is under a final name but does not verify: {info.why}"
        assert manager.trainer_state(info.path)["step"] == info.step
        assert manager.manifest(info.path)["step"] == info.step
        newest = info.step
    return newest


def leftovers(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if ".tmp-" in p.name) if root.is_dir() else []


def stray_temp_files(run_dir: Path) -> list[str]:
    """Anything with a temp name anywhere in the run folder (saves, deletions, exports, heartbeats)."""
    return sorted(p.relative_to(run_dir).as_posix() for p in Path(run_dir).rglob("*") if ".tmp-" in p.name)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


class Trials:
    """Collects what each trial did, so a failure shows the seed and the story up to it."""

    def __init__(self, name: str, seed: int):
        self.name, self.seed, self.lines = name, seed, []

    def log(self, line: str) -> None:
        self.lines.append(line)

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, AssertionError):
            story = "\n".join(self.lines[-40:])
            raise AssertionError(f"{self.name} failed with seed {self.seed} "
                                 f"(rerun with FAULTS_SEED={self.seed}):\n{exc}\n--- trials ---\n{story}") from exc
        return False
