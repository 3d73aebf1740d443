"""A run started on an older overnight and resumed by this one (pip install -U between a crash and the morning's
--auto-resume): the checkpoints on disk hold the older release's records, which lack every field added since. The
oldest release checked is a36948f: a run it trained to a checkpoint, resumed here, matched an uninterrupted run
loss for loss and byte for byte (torch and mlx, sft and grpo, parquet data, SIGKILL and SIGTERM; checked with its
worktree). Its checkpoint files are the ones written now, less the fingerprint fields below, and its metrics' start
event had no "setup"; these tests age a checkpoint written now into that record, so they need no old worktree."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from overnight.config import build_config
from overnight.data import find_data_files
from overnight.runs import fingerprint as fp
from overnight.runs import resume

from conftest import DATA_DIR, has

# What a36948f's checkpoints record: the manifest's fingerprint fields and its training keys (TRAINING_KEYS then,
# model.path recorded but never compared). A field or key added since must let such a checkpoint resume unchanged.
A36948F_FINGERPRINT = frozenset({
    "chat_template_now", "init_adapter", "world_size", "model", "model_shape", "model_path", "backend", "train_data",
    "val_data", "train_source", "val_source", "config", "reward_models"})
A36948F_CONFIG = frozenset({
    "model.quantization.bits", "model.quantization.group_size", "model.max_seq_length", "model.dtype", "lora.rank",
    "lora.alpha", "lora.dropout", "lora.layers", "lora.targets", "lora.use_dora", "data.method", "data.packing",
    "data.mask_prompt", "data.truncate", "data.chat_template_kwargs", "train.batch_size", "train.grad_accumulation",
    "train.learning_rate", "train.schedule", "train.warmup_steps", "train.min_lr_ratio", "train.weight_decay",
    "train.max_grad_norm", "train.optimizer", "train.seed", "preference.beta", "grpo.group_size",
    "grpo.max_new_tokens", "grpo.temperature", "grpo.top_p", "grpo.beta", "grpo.epsilon", "grpo.loss_type",
    "grpo.iterations", "grpo.rewards", "grpo.reward_weights", "grpo.chat_template", "reward.center_coefficient",
    "packing"})


def as_a36948f_recorded(fingerprint: dict) -> dict:
    older = {k: v for k, v in fingerprint.items() if k in A36948F_FINGERPRINT}
    older["config"] = {k: v for k, v in fingerprint["config"].items() if k in A36948F_CONFIG}
    return older


@pytest.fixture(autouse=True)
def own_caches(tmp_path_factory, monkeypatch):
    """Converted copies in a temp folder, for the CLI runs too (they inherit os.environ)."""
    caches = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("OVERNIGHT_CACHE", str(caches / "overnight"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(caches / "hf-datasets"))


def parquet_data(target: Path) -> Path:
    """The bundled rows, cut short, as train.parquet and val.parquet: a source overnight converts, so a checkpoint
    written now records its conversion (train_conversion, val_conversion), which a36948f's did not."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from faults_util import make_small_data

    rows = make_small_data(target / "jsonl")
    target.mkdir(exist_ok=True)
    for name in ("train", "val"):
        table = [json.loads(line) for line in (rows / f"{name}.jsonl").read_text().splitlines() if line.strip()]
        pq.write_table(pa.Table.from_pylist(table), target / f"{name}.parquet")
    return target


@pytest.mark.skipif(not has("pyarrow"), reason="needs pyarrow (overnight[data])")
def test_an_older_record_of_the_same_run_has_no_differences(tmp_path, tiny_model_dir):
    data = parquet_data(tmp_path / "data")
    train, val = find_data_files(data)
    cfg = build_config(None, {"model.path": str(tiny_model_dir)}, [])
    current = fp.compute(cfg, train, val, backend="torch")
    assert current["train_conversion"] and current["val_conversion"]  # what the aged record leaves out
    older = as_a36948f_recorded(current)
    assert fp.differences(older, current) == []
    assert resume.check_fingerprint(older, current, 4, allow_change=False) == []


def _age_checkpoints(run: Path) -> list[int]:
    """Every committed checkpoint of ``run`` rewritten as a36948f recorded it, sealed again (COMMIT holds the
    manifest's sha256); the start event without "setup". Returns the steps aged."""
    aged = []
    for folder in sorted((run / "checkpoints").glob("step-*")):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert "train_conversion" in manifest["fingerprint"]  # written now: there is something to take away
        manifest["fingerprint"] = as_a36948f_recorded(manifest["fingerprint"])
        text = json.dumps(manifest, indent=1, sort_keys=True)
        (folder / "manifest.json").write_text(text)
        (folder / "COMMIT").write_text(json.dumps({"manifest_sha256": hashlib.sha256(text.encode()).hexdigest(),
                                                   "step": manifest["step"]}))
        aged.append(manifest["step"])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for line in lines:
        if line["event"] == "start":
            line.pop("setup", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return aged


@pytest.mark.skipif(not has("pyarrow"), reason="needs pyarrow (overnight[data])")
@pytest.mark.parametrize("backend", [
    pytest.param("torch", marks=[pytest.mark.torch, pytest.mark.skipif(not has("torch", "transformers", "peft"),
                                                                       reason="needs the torch backend")]),
    pytest.param("mlx", marks=[pytest.mark.mlx, pytest.mark.skipif(not has("mlx", "mlx_lm"),
                                                                   reason="needs the mlx backend")])])
def test_a_checkpoint_recorded_by_a36948f_resumes_exactly(backend, tiny_model_dir, tmp_path):
    """The default path (4-bit base, LoRA dropout, an eval between checkpoints) on converted data: killed after the
    step-4 checkpoint and step 5, aged, then resumed as a user would (plain --backend, --auto-resume) to the end."""
    from faults_util import assert_adapter_equal, assert_losses_match, metrics, run_cli, train_args

    data = parquet_data(tmp_path / "data")

    def args(out: Path, recording: bool = False) -> list[str]:
        """recording: the backend that can kill itself at a given step (faults_util); else the one users name."""
        made = train_args(backend, tiny_model_dir, data, out, 6, every=4, eval_every=3, bits=4)
        return made if recording else [backend if a == made[made.index("--backend") + 1] else a for a in made]

    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_cli(args(ref))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    killed = run_cli(args(run, recording=True), kill_before_step=6)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert _age_checkpoints(run) == [3, 4]  # step 3: the best after its eval; step 4: on schedule

    resumed = run_cli(args(run) + ["--auto-resume"])
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming from step 4" in resumed.stdout
    assert "changed" not in resumed.stdout + resumed.stderr, resumed.stdout + resumed.stderr
    assert "Traceback" not in resumed.stderr
    (event,) = [e for e in metrics(run) if e["event"] == "resume"]
    assert event["from_step"] == 4 and not event.get("overridden") and event["setup"]
    assert_losses_match(run, ref, 6)  # every train line, the killed process's included
    assert {e["step"]: e["val_loss"] for e in metrics(run) if e["event"] == "eval"} == \
        {e["step"]: e["val_loss"] for e in metrics(ref) if e["event"] == "eval"}
    assert_adapter_equal(run, ref)
