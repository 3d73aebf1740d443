"""`lora.init_from` / `--init-adapter` (src/runs/init_adapter.py): a new run whose LoRA starts from an existing adapter.
The checks against the config and the base model, in process; then `overnight train` as a user runs it: a mismatch
refused before anything is written, and real runs on torch (the default 4-bit QLoRA) and mlx whose LoRA starts at
the adapter's weights exactly (learning rate 0 keeps them: the first checkpoint holds them, and the first eval gives
the adapter's own val loss), across formats, and the adapter recorded where a resume compares it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from overnight.backend.adapter_formats import convert_adapter
from overnight.backend.adapter_weights import read_adapter
from overnight.config import ConfigError, build_config
from overnight.runs import init_adapter
from overnight.runs.checkpoint import CheckpointManager
from overnight.runs.rundir import read_metrics

from conftest import DATA_DIR, ROOT, has
from test_adapter_weights import peft_adapter
from test_cli import base_args, env


def cfg_for(model: Path, adapter: Path, tmp_path: Path, *sets: str):
    return build_config(None, {}, [f"model.path={model}", f"lora.init_from={adapter}", f"output.dir={tmp_path / 'run'}",
                                   "lora.rank=4", "lora.alpha=8", "lora.layers=1", "lora.targets=[q_proj, v_proj]",
                                   *sets])


def test_a_fitting_adapter_is_read_and_recorded_by_its_absolute_path(tmp_path, tiny_model_dir, monkeypatch):
    folder, neutral = peft_adapter(tmp_path / "adapters" / "a", base=str(tiny_model_dir))
    monkeypatch.chdir(tmp_path)
    cfg = cfg_for(tiny_model_dir, Path("adapters/a"), tmp_path)
    adapter = init_adapter.check(cfg)
    assert cfg.lora.init_from == str(folder.resolve()) and sorted(adapter.weights) == sorted(neutral)
    assert init_adapter.check(cfg_for(tiny_model_dir, folder, tmp_path, "lora.init_from=")) is None


@pytest.mark.parametrize("sets, says", [
    (["lora.rank=8"], "its rank is 4, this run's lora.rank is 8 (set --lora-rank 4)"),
    (["lora.alpha=32"], "it scales its update by 2, this run by lora.alpha / lora.rank = 32 / 4 = 8 (set lora.alpha=8)"),
    (["lora.targets=[q_proj, k_proj, v_proj]"], "it has LoRA on self_attn.q_proj, self_attn.v_proj, this run's "
                                                "lora.targets are [q_proj, k_proj, v_proj] (set lora.targets=[q_proj, v_proj])"),
    (["lora.targets=[q_proj]"], "(set lora.targets=[q_proj, v_proj])"),
    (["lora.layers=-1"], "it has LoRA on blocks 1 of this 2-block model, this run's lora.layers=-1 puts it on blocks "
                         "0-1 (set --lora-layers 1)"),
])
def test_an_adapter_that_does_not_fit_the_config_is_refused_naming_the_key(tmp_path, tiny_model_dir, sets, says):
    folder, _ = peft_adapter(tmp_path / "a", base=str(tiny_model_dir))
    with pytest.raises(ConfigError) as refused:
        init_adapter.check(cfg_for(tiny_model_dir, folder, tmp_path, *sets))
    message = str(refused.value)
    assert message.startswith(f"config key 'lora.init_from': the adapter in {folder} does not fit this run: ")
    assert says in message


def test_an_adapter_of_another_base_model_is_refused(tmp_path, tiny_model_dir):
    from overnight.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=0, hidden_size=32)
    folder, _ = peft_adapter(tmp_path / "a", base=str(other))
    with pytest.raises(ConfigError) as refused:
        init_adapter.check(cfg_for(tiny_model_dir, folder, tmp_path))
    assert f"it was trained on {other}, and this run's model.path {tiny_model_dir} is another model" in str(refused.value)
    assert "config.json hidden_size: 32 -> 64" in str(refused.value)
    link = tmp_path / "same-model"
    link.symlink_to(tiny_model_dir)  # the same folder by another spelling is the same model
    same, _ = peft_adapter(tmp_path / "b", base=str(link))
    assert init_adapter.check(cfg_for(tiny_model_dir, same, tmp_path)) is not None


def test_a_base_that_cannot_be_compared_here(tmp_path, tiny_model_dir):
    hub, _ = peft_adapter(tmp_path / "hub", base="org/model-a")
    with pytest.raises(ConfigError, match="it was trained on 'org/model-a', this run's model.path is 'org/model-b' "
                                          r"\(if it is the same model, write this model.path as base_model_name_or_path"):
        init_adapter.check(cfg_for("org/model-b", hub, tmp_path))
    # a relative path typed in another folder (none of that name here: demo.sh makes a runs/tiny-model)
    elsewhere, _ = peft_adapter(tmp_path / "rel", base=f"runs/{tmp_path.name}-model")
    warned: list[str] = []
    assert init_adapter.check(cfg_for(tiny_model_dir, elsewhere, tmp_path), warn=warned.append) is not None
    assert len(warned) == 1 and "cannot be compared" in warned[0] and "only its module shapes are checked" in warned[0]


def test_an_adapter_inside_the_run_directory_is_refused(tmp_path, tiny_model_dir):
    folder, _ = peft_adapter(tmp_path / "run" / "checkpoints" / "step-00000004" / "adapter")
    with pytest.raises(ConfigError, match="is inside this run's output.dir .*copy the adapter elsewhere first"):
        init_adapter.check(cfg_for(tiny_model_dir, folder.parent, tmp_path))


def test_a_missing_adapter_is_refused_naming_the_key(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"config key 'lora.init_from': .*no-such is not a folder \(no such file"):
        init_adapter.check(cfg_for(tiny_model_dir, tmp_path / "no-such", tmp_path))


# -- through `overnight train` -------------------------------------------------------------------------------------

def overnight(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env(),
                          stdin=subprocess.DEVNULL, timeout=timeout, cwd=ROOT)


def test_a_mismatching_adapter_exits_2_before_anything_is_written(tmp_path, tiny_model_dir):
    folder, _ = peft_adapter(tmp_path / "a", base=str(tiny_model_dir))
    out = tmp_path / "run"
    fits = ["--set", "lora.layers=1", "--set", "lora.targets=[q_proj, v_proj]", "--set", "lora.alpha=8"]
    result = overnight(*base_args(tiny_model_dir, out, 4, *fits), "--init-adapter", str(folder), "--set", "lora.rank=8")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (f"error: config key 'lora.init_from': the adapter in {folder} does not fit this run: its "
                             "rank is 4, this run's lora.rank is 8 (set --lora-rank 4)\n")
    assert "Traceback" not in result.stderr and not out.exists()


def real_args(backend: str, model: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """The default path (4-bit QLoRA, dropout 0.05) on the tiny model, LoRA on its last block."""
    return ["train", "--backend", backend, "--model", str(model), "--data", str(DATA_DIR), "--output", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--lora-rank", "4", "--quiet", "--set", "lora.layers=1",
            "--set", "model.max_seq_length=96", "--set", "eval.max_batches=1", "--set", "eval.predictions=0", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A 2-step torch run whose adapter has moved well away from the seeded start (B is no longer zero)."""
    if not has("torch", "transformers", "peft"):
        pytest.skip("torch backend not installed")
    out = tmp_path_factory.mktemp("init-adapter") / "trained"
    result = overnight(*real_args("torch", tiny_model_dir, out, 2, "--learning-rate", "0.01",
                                  "--set", "train.warmup_steps=0", "--set", "checkpoint.every_steps=1"))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def val_loss(run_dir: Path) -> float:
    return [r["val_loss"] for r in read_metrics(run_dir) if r["event"] == "eval"][-1]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = read_adapter(a).weights, read_adapter(b).weights
    assert sorted(wa) == sorted(wb) and all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.mark.torch
def test_a_torch_run_starts_from_an_mlx_format_adapter(tmp_path, trained, tiny_model_dir):
    trained_adapter = read_adapter(trained / "adapter")
    assert any(np.abs(w).max() > 0 for k, w in trained_adapter.weights.items() if k.endswith(".B"))
    mlx_copy = convert_adapter(trained / "adapter", "mlx", tmp_path / "as-mlx", say=lambda m: None)
    out = tmp_path / "from-adapter"
    result = overnight(*real_args("torch", tiny_model_dir, out, 1, "--learning-rate", "0",
                                  "--init-adapter", str(mlx_copy)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"init: LoRA starts from {mlx_copy} (mlx adapter, rank 4, 4 modules)" in result.stdout
    assert_same_weights(out / "checkpoints" / "step-00000001", trained / "adapter")  # learning rate 0: the start
    assert val_loss(out) == pytest.approx(val_loss(trained), rel=1e-6)  # the adapter's own val loss
    recorded = {"path": str(mlx_copy), "sha256": read_adapter(mlx_copy).sha256}
    assert [r for r in read_metrics(out) if r["event"] == "start"][0]["init_adapter"] == recorded
    # What a resume compares (test_fingerprint: another adapter is a named change).
    manifest = CheckpointManager.manifest(out / "checkpoints" / "step-00000001")
    assert manifest["fingerprint"]["init_adapter"] == recorded


@pytest.mark.mlx
@pytest.mark.skipif(not has("mlx", "mlx_lm"), reason="mlx backend not installed")
def test_an_mlx_run_starts_from_a_torch_adapter(tmp_path, trained, tiny_model_dir):
    out = tmp_path / "mlx-from-torch"
    result = overnight(*real_args("mlx", tiny_model_dir, out, 1, "--learning-rate", "0",
                                  "--init-adapter", str(trained)))  # the run folder: its adapter/
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"init: LoRA starts from {trained / 'adapter'} (peft adapter, rank 4, 4 modules)" in result.stdout
    assert_same_weights(out / "adapter", trained / "adapter")  # written by mlx, in mlx-lm's format
    assert read_adapter(out / "adapter").format == "mlx"
