"""`overnight convert-adapter` (SPEC §13): an adapter converted to the other library's format gives the same model
there. Each adapter is made by its own library (PEFT's save_pretrained, mlx-lm's LoRA layers and file layout) with
random non-zero B, on the tiny model in float32; the converted one is loaded by the other library and its logits
are compared with the original's, after checking that the adapter moves the logits at all."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, ROOT, has
from overnight.backend.adapter_formats import convert_adapter
from overnight.errors import UsageError

pytestmark = [pytest.mark.skipif(not has("torch", "transformers", "peft", "mlx", "mlx_lm"),
                                 reason="needs both backends"), pytest.mark.torch, pytest.mark.mlx]

TOKENS = np.array([[1, 40, 71, 300, 12, 5, 99, 250, 3, 17, 64, 128]], dtype=np.int64)
ADAPTER_EFFECT = 1e-2  # the least max |logits change| an adapter must cause for a comparison to mean anything
TOLERANCE = 1e-5


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "overnight", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600, cwd=cwd)


def umask_mode() -> int:
    """What open() gives a new file here: the mode every file overnight writes for the user must have."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def modes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}


# -- the two libraries' views of one model ------------------------------------------------------------------

def torch_logits(model_dir: Path, adapter: Path | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS)).logits.float().numpy()


def mlx_logits(model_dir: Path, adapter: Path | None = None) -> np.ndarray:
    import mlx.core as mx
    import mlx_lm

    model, _ = mlx_lm.load(str(model_dir), adapter_path=None if adapter is None else str(adapter))
    return np.array(model(mx.array(TOKENS.astype(np.int32))).astype(mx.float32))


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


# -- adapters as each library writes them -------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """PEFT LoRA on the last of the two blocks (layers_to_transform), attention and MLP targets, rank 4, alpha 8."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                        layers_to_transform=[1], task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def mlx_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """mlx-lm LoRA on the last block, q_proj and up_proj, rank 4, scale 3 (no alpha recorded: mlx-lm's own)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(tiny_model_dir))
    model.freeze()
    params = {"rank": 4, "scale": 3.0, "dropout": 0.05, "keys": ["self_attn.q_proj", "mlp.up_proj"]}
    linear_to_lora_layers(model, 1, params)
    mx.random.seed(2)
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.2
    out = tmp_path_factory.mktemp("mlx") / "adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())),
                        metadata={"format": "mlx"})
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": params, "model": str(tiny_model_dir)}))
    return out


# -- both directions ----------------------------------------------------------------------------------------

def test_peft_adapter_converted_to_mlx_gives_the_same_logits_in_mlx_lm(peft_adapter, tiny_model_dir, tmp_path):
    original = torch_logits(tiny_model_dir, peft_adapter)
    assert max_diff(original, torch_logits(tiny_model_dir)) > ADAPTER_EFFECT
    out = convert_adapter(peft_adapter, "mlx", tmp_path / "mlx", base=str(tiny_model_dir), say=lambda m: None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["num_layers"] == 1
    assert config["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.1,
                                         "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}
    converted = mlx_logits(tiny_model_dir, out)
    diff = max_diff(original, converted)
    print(f"peft -> mlx: max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE


def test_mlx_adapter_converted_to_peft_gives_the_same_logits_in_peft(mlx_adapter, tiny_model_dir, tmp_path):
    original = mlx_logits(tiny_model_dir, mlx_adapter)
    assert max_diff(original, mlx_logits(tiny_model_dir)) > ADAPTER_EFFECT
    out = convert_adapter(mlx_adapter, "peft", tmp_path / "peft", say=lambda m: None)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 12.0, 0.05)
    assert config["target_modules"] == ["q_proj", "up_proj"] and config["layers_to_transform"] == [1]
    assert config["base_model_name_or_path"] == str(tiny_model_dir)  # from the mlx config's "model"
    converted = torch_logits(tiny_model_dir, out)
    diff = max_diff(original, converted)
    print(f"mlx -> peft: max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE


def test_a_round_trip_is_bit_exact_and_keeps_alpha(peft_adapter, tmp_path):
    from safetensors.numpy import load_file

    there = convert_adapter(peft_adapter, "mlx", tmp_path / "mlx", say=lambda m: None)
    back = convert_adapter(there, "peft", tmp_path / "back", base="/models/tiny", say=lambda m: None)
    original, returned = (load_file(str(p / "adapter_model.safetensors")) for p in (peft_adapter, back))
    assert set(original) == set(returned)
    assert all(original[k].dtype == returned[k].dtype and np.array_equal(original[k], returned[k]) for k in original)
    config = json.loads((back / "adapter_config.json").read_text())
    source = json.loads((peft_adapter / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "lora_dropout", "layers_to_transform", "use_rslora"):
        assert config[key] == source[key], key
    assert sorted(config["target_modules"]) == sorted(source["target_modules"])
    assert config["base_model_name_or_path"] == "/models/tiny"


def test_bf16_weights_cross_bit_for_bit(peft_adapter, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(str(peft_adapter / "adapter_model.safetensors")).items()}
    save_file(weights, str(bf16 / "adapter_model.safetensors"), metadata={"format": "pt"})
    (bf16 / "adapter_config.json").write_text((peft_adapter / "adapter_config.json").read_text())
    there = convert_adapter(bf16, "mlx", tmp_path / "mlx", say=lambda m: None)
    mlx_side = load_file(str(there / "adapters.safetensors"))
    key = next(iter(weights))
    module = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
    assert mlx_side[f"{module}.lora_a"].dtype == torch.bfloat16
    back = load_file(str(convert_adapter(there, "peft", tmp_path / "back", say=lambda m: None)
                         / "adapter_model.safetensors"))
    assert all(torch.equal(back[k], weights[k]) for k in weights)


def test_a_trained_run_adapter_converts_through_the_cli(tiny_model_dir, tmp_path, monkeypatch):
    """overnight's own torch adapter (from `overnight train`, a few steps at a large learning rate) -> mlx. The
    model is given as a relative path, as users type it: the adapters record it absolute, so PEFT opens the adapter
    from anywhere; and their files have the umask's mode (safetensors alone writes 0600)."""
    run = tmp_path / "run"
    result = cli("train", "--backend", "torch", "--model", tiny_model_dir.name, "--data", str(DATA_DIR),
                 "--output", str(run), "--max-steps", "3", "--batch-size", "4", "--lora-rank", "4", "--quiet",
                 "--set", "model.quantization.bits=0", "--set", "model.max_seq_length=128",
                 "--set", "train.learning_rate=2e-2", "--set", "train.warmup_steps=0", "--set", "lora.dropout=0",
                 "--set", "eval.every_steps=100", "--set", "eval.predictions=0", "--set", "checkpoint.every_steps=100",
                 cwd=tiny_model_dir.parent)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    base = str(tiny_model_dir.resolve())
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert set(modes(run / "adapter").values()) == {umask_mode()}, modes(run / "adapter")
    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded base is found, not taken for a hub id
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(str(run / "adapter")).peft_config["default"].r == 4
    original = torch_logits(tiny_model_dir, run / "adapter")
    assert max_diff(original, torch_logits(tiny_model_dir)) > ADAPTER_EFFECT
    result = cli("convert-adapter", str(run / "adapter"), "--to", "mlx", "--output", str(tmp_path / "mlx"))
    assert result.returncode == 0, result.stderr
    assert "converted peft adapter" in result.stdout
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["model"] == base
    assert set(modes(tmp_path / "mlx").values()) == {umask_mode()}
    diff = max_diff(original, mlx_logits(tiny_model_dir, tmp_path / "mlx"))
    print(f"trained run, peft -> mlx: max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE


def test_a_local_base_is_recorded_by_its_absolute_path_and_a_hub_id_as_given(mlx_adapter, tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    local = convert_adapter(mlx_adapter, "peft", tmp_path / "local", base=tiny_model_dir.name, say=lambda m: None)
    assert json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model_dir.resolve())
    hub = convert_adapter(mlx_adapter, "peft", tmp_path / "hub", base="HuggingFaceTB/SmolLM2-135M", say=lambda m: None)
    assert json.loads((hub / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M"
    back = convert_adapter(local, "mlx", tmp_path / "back", say=lambda m: None)
    assert json.loads((back / "adapter_config.json").read_text())["model"] == str(tiny_model_dir.resolve())


def test_what_a_killed_write_left_is_removed_by_the_next_write_to_that_output(mlx_adapter, tmp_path):
    """A killed fuse or convert-adapter leaves `.OUTPUT.tmp-PID-*` (a full-size model, for fuse). The next write to
    that output removes it, saying what it freed; a temporary whose process still runs (a concurrent write) stays,
    and so does one from before the pid was recorded, which is only pointed out."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid is dead
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_tmp = tmp_path / f".out.tmp-{gone.pid}-0a1b2c3d"
        live_tmp = tmp_path / f".out.tmp-{alive.pid}-0a1b2c3d"
        legacy_tmp = tmp_path / ".out.tmp-9f8e7d6c"
        other_tmp = tmp_path / f".other.tmp-{gone.pid}-0a1b2c3d"  # another output's: not this write's business
        for folder in (dead_tmp, live_tmp, legacy_tmp, other_tmp):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"\0" * (3 << 20))
        said = []
        convert_adapter(mlx_adapter, "peft", tmp_path / "out", say=said.append)
        assert not dead_tmp.exists() and live_tmp.is_dir() and legacy_tmp.is_dir() and other_tmp.is_dir()
        assert said[0] == (f"removed {dead_tmp}: 3.0 MB left by an earlier write to {tmp_path / 'out'} that was "
                           f"interrupted (its process {gone.pid} is gone)")
        assert said[1].startswith(f"note: {legacy_tmp} (3.0 MB) looks like what an interrupted write") and \
            "delete it if no other fuse" in said[1]
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")) == \
            sorted([live_tmp.name, legacy_tmp.name])  # nothing of this write's own is left either
    finally:
        alive.kill()
        alive.wait()


# -- refusals -----------------------------------------------------------------------------------------------

def test_cli_refusals_exit_2_with_a_message_and_no_traceback(peft_adapter, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    cases = {
        "missing folder": (["convert-adapter", str(tmp_path / "nope"), "--to", "mlx", "--output", str(tmp_path / "o1")],
                           "is not a folder"),
        "not an adapter": (["convert-adapter", str(busy), "--to", "mlx", "--output", str(tmp_path / "o2")],
                           "is not an adapter folder"),
        "same format": (["convert-adapter", str(peft_adapter), "--to", "peft", "--output", str(tmp_path / "o3")],
                        "already a peft adapter"),
        "output in use": (["convert-adapter", str(peft_adapter), "--to", "mlx", "--output", str(busy)],
                          "not an empty folder"),
    }
    for name, (args, message) in cases.items():
        result = cli(*args)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert message in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
    assert (busy / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()


def test_what_mlx_lm_cannot_hold_is_refused_by_name(peft_adapter, tmp_path):
    def variant(name: str, **changes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes((peft_adapter / "adapter_model.safetensors").read_bytes())
        config = json.loads((peft_adapter / "adapter_config.json").read_text()) | changes
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return folder

    # DoRA converts (below), but not a DoRA config whose weights lack the magnitudes
    with pytest.raises(UsageError, match="DoRA module .* needs a magnitude vector of shape"):
        convert_adapter(variant("dora", use_dora=True), "mlx", tmp_path / "o1")
    with pytest.raises(UsageError, match="rank_pattern"):
        convert_adapter(variant("ranks", rank_pattern={"q_proj": 8}), "mlx", tmp_path / "o2")
    with pytest.raises(UsageError, match="modules_to_save"):
        convert_adapter(variant("extra", modules_to_save=["lm_head"]), "mlx", tmp_path / "o3")
    # LoRA on block 1 of a 3-block model is not "the last N blocks".
    fake_base = tmp_path / "base3"
    fake_base.mkdir()
    (fake_base / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    with pytest.raises(UsageError, match="last N blocks"):
        convert_adapter(peft_adapter, "mlx", tmp_path / "o4", base=str(fake_base))
    # Without a local base the block count is unknown, and "blocks [1]" could be any block of a bigger model.
    with pytest.raises(UsageError, match="pass --base MODEL_DIR"):
        convert_adapter(variant("hub", base_model_name_or_path="org/model"), "mlx", tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


# -- reward models (--method reward): LoRA + the score head -------------------------------------------------

@pytest.fixture(scope="module")
def peft_dora_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """PEFT DoRA on both blocks, q_proj and up_proj, rank 4, alpha 8; B and the magnitudes moved off their start."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(torch.rand_like(param) + 0.5)
    out = tmp_path_factory.mktemp("peft-dora") / "adapter"
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def test_a_dora_adapter_converts_both_ways_exactly(peft_dora_adapter, tiny_model_dir, tmp_path):
    """PEFT DoRA -> mlx-lm DoRA (fine_tune_type dora, the magnitudes as .m) scores the same in mlx_lm.load, and back
    to PEFT is the same bytes, magnitudes included. A magnitude in an adapter that does not say DoRA is refused."""
    from safetensors.numpy import load_file

    original = torch_logits(tiny_model_dir, peft_dora_adapter)
    there = convert_adapter(peft_dora_adapter, "mlx", tmp_path / "mlx", base=str(tiny_model_dir), say=lambda m: None)
    assert json.loads((there / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    magnitudes = [k for k in load_file(str(there / "adapters.safetensors")) if k.endswith(".m")]
    assert len(magnitudes) == 4 and "model.layers.0.self_attn.q_proj.m" in magnitudes
    diff = max_diff(original, mlx_logits(tiny_model_dir, there))
    print(f"peft dora -> mlx: max |logits diff| {diff:.2e}")
    assert diff < TOLERANCE
    back = convert_adapter(there, "peft", tmp_path / "back", say=lambda m: None)
    before, after = (load_file(str(p / "adapter_model.safetensors")) for p in (peft_dora_adapter, back))
    assert set(before) == set(after) and all(np.array_equal(before[k], after[k]) for k in before)
    assert json.loads((back / "adapter_config.json").read_text())["use_dora"] is True
    assert max_diff(original, torch_logits(tiny_model_dir, back)) == 0.0

    lora_config = tmp_path / "not-dora"
    shutil.copytree(there, lora_config)
    config = json.loads((lora_config / "adapter_config.json").read_text())
    (lora_config / "adapter_config.json").write_text(json.dumps(config | {"fine_tune_type": "lora"}))
    with pytest.raises(UsageError, match="holds DoRA magnitude vectors .* does not say DoRA"):
        convert_adapter(lora_config, "peft", tmp_path / "o1", say=lambda m: None)


@pytest.fixture(scope="module")
def peft_reward_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward adapter as PEFT itself writes one (SEQ_CLS: modules_to_save ["classifier", "score"], and
    "pre_classifier" since PEFT 0.22; no pad id recorded), random LoRA B and head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    out = tmp_path_factory.mktemp("peft-reward") / "adapter"
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def reward_batch(model_dir: Path, pad_id: int):
    """Four preference pairs of the bundled data, right-padded with ``pad_id``, each row closed by eos."""
    from tokenizers import Tokenizer

    from overnight.backend import Batch

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rows = []
    for line in (DATA_DIR / "preference" / "val.jsonl").read_text(encoding="utf-8").splitlines()[:4]:
        row = json.loads(line)
        rows += [tok.encode(row["prompt"] + row[k] + "<|eos|>", add_special_tokens=False).ids
                 for k in ("chosen", "rejected")]
    ids = np.full((len(rows), max(map(len, rows))), pad_id, np.int32)
    attention = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], attention[i, : len(row)] = row, 1
    return Batch(ids, attention.astype(np.float32), attention, pad_id, paired=True)


@pytest.fixture(scope="module")
def mlx_reward(tiny_model_dir, tmp_path_factory):
    """(the mlx backend after 3 reward steps, a batch, the adapter it saved)."""
    from overnight.backends.mlx_backend import MLXBackend
    from overnight.config import Config

    cfg = Config()
    cfg.model.path, cfg.model.quantization.bits, cfg.data.method = str(tiny_model_dir), 0, "reward"
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.layers = 4, 8.0, 0.0, -1
    backend = MLXBackend()
    backend.setup(cfg, seed=0)
    batch = reward_batch(tiny_model_dir, backend.pad_id)
    for _ in range(3):
        backend.train_step([batch], 2e-2)
    out = tmp_path_factory.mktemp("mlx-reward")
    backend.save(out)
    return backend, batch, out / "adapter"


def test_a_reward_adapter_round_trips_exactly_both_ways(peft_reward_adapter, mlx_reward, tmp_path):
    """PEFT's SEQ_CLS adapter -> mlx (through the CLI) -> PEFT, and an mlx reward run's adapter -> PEFT -> mlx: every
    tensor back bit for bit, the score head included, and what says where the score is read (pad id, one label)."""
    from safetensors.numpy import load_file

    there = tmp_path / "mlx"
    result = cli("convert-adapter", str(peft_reward_adapter), "--to", "mlx", "--output", str(there))
    assert result.returncode == 0, result.stderr
    assert "(4 LoRA modules, rank 4, and the reward score head)" in result.stdout
    source = load_file(str(peft_reward_adapter / "adapter_model.safetensors"))
    assert "score.weight" not in load_file(str(there / "adapters.safetensors"))  # mlx-lm's file: LoRA only
    assert np.array_equal(load_file(str(there / "score_head.safetensors"))["score.weight"],
                          source["base_model.model.score.weight"])
    assert json.loads((there / "reward_head.json").read_text()) == {  # the pad id from the base's config.json
        "num_labels": 1, "pad_token_id": 0, "score_file": "score_head.safetensors", "score_key": "score.weight"}
    back = convert_adapter(there, "peft", tmp_path / "back", say=lambda m: None)
    returned = load_file(str(back / "adapter_model.safetensors"))
    assert set(returned) == set(source)
    assert all(returned[k].dtype == source[k].dtype and np.array_equal(returned[k], source[k]) for k in source)
    config = json.loads((back / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    assert json.loads((back / "reward_head.json").read_text()) == {
        "num_labels": 1, "pad_token_id": 0, "score_file": "adapter_model.safetensors",
        "score_key": "base_model.model.score.weight"}

    _, _, adapter = mlx_reward
    peft_side = convert_adapter(adapter, "peft", tmp_path / "peft", say=lambda m: None)
    again = convert_adapter(peft_side, "mlx", tmp_path / "again", say=lambda m: None)
    for name in ("adapters.safetensors", "score_head.safetensors"):
        original, returned = (load_file(str(p / name)) for p in (adapter, again))
        assert set(original) == set(returned)
        assert all(returned[k].dtype == original[k].dtype and np.array_equal(returned[k], original[k])
                   for k in original)
    assert (again / "reward_head.json").read_bytes() == (adapter / "reward_head.json").read_bytes()
    first, last = (json.loads((p / "adapter_config.json").read_text()) for p in (adapter, again))
    assert (last["num_layers"], last["lora_parameters"]) == (first["num_layers"], first["lora_parameters"])


def test_a_reward_adapter_is_what_mlx_lm_and_peft_each_load_without_a_complaint(mlx_reward, tiny_model_dir,
                                                                                tmp_path):
    """SPEC §5: an mlx reward run's adapter loads with mlx-lm's own loader (its adapters.safetensors holds LoRA
    tensors only: the head is in score_head.safetensors), as the causal LM with LoRA; converted to PEFT, its
    adapter_config.json holds only keys LoraConfig knows (PEFT warns about any other on every load)."""
    import warnings

    import mlx_lm
    from mlx.utils import tree_flatten
    from safetensors.numpy import load_file

    from peft import PeftConfig

    _, _, adapter = mlx_reward
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(adapter))  # refuses a tensor that is not LoRA
    loaded = dict(tree_flatten(model.parameters()))
    saved = load_file(str(adapter / "adapters.safetensors"))
    assert saved and all(np.array_equal(np.array(loaded[k]), v) for k, v in saved.items())
    out = convert_adapter(adapter, "peft", tmp_path / "peft", say=lambda m: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert PeftConfig.from_pretrained(str(out)).task_type == "SEQ_CLS"
    assert not caught, [str(w.message) for w in caught]


def test_a_checkpoint_verifies_the_reward_heads_own_files(mlx_reward, tmp_path):
    """score_head.safetensors and reward_head.json are in the checkpoint's manifest like every file of the adapter
    folder: a damaged head (same size, one byte changed) makes the checkpoint invalid, naming the file."""
    from overnight.runs.checkpoint import CheckpointManager

    backend, _, _ = mlx_reward
    manager = CheckpointManager(tmp_path / "run", log=lambda m: None)
    for name in ("score_head.safetensors", "reward_head.json"):
        path = manager.save(1, backend.save, trainer_state={}, fingerprint={}, versions={})
        assert {f"adapter/{name}", "adapter/adapters.safetensors"} <= set(manager.manifest(path)["files"])
        assert manager.verify(path) == (True, "")
        damaged = bytearray((path / "adapter" / name).read_bytes())
        damaged[-2] ^= 1
        (path / "adapter" / name).write_bytes(bytes(damaged))
        assert manager.verify(path) == (False, f"adapter/{name} does not match its sha256 (corrupted)")
        shutil.rmtree(path)


def test_an_mlx_reward_adapter_converted_to_peft_scores_as_the_mlx_backend(mlx_reward, tiny_model_dir, tmp_path):
    """The converted adapter opens the standard way (AutoModelForSequenceClassification with the pad id it records,
    then PeftModel) and scores rows as the mlx backend that trained it (1e-4)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    backend, batch, adapter = mlx_reward
    out = convert_adapter(adapter, "peft", tmp_path / "peft", say=lambda m: None)
    pad = json.loads((out / "reward_head.json").read_text())["pad_token_id"]
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1, pad_token_id=pad,
                                                               dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(out)).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(batch.input_ids.astype(np.int64)),
                       attention_mask=torch.from_numpy(batch.attention_mask.astype(np.int64))).logits[:, 0].numpy()
    ours = backend.reward_scores(batch)
    assert np.abs(ours).max() > 1e-3 and np.ptp(ours) > 1e-3  # a trained head: equal zeros would prove nothing
    print(f"mlx reward adapter -> peft: max |score diff| {np.abs(theirs - ours).max():.2e}")
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)


def test_a_reward_adapter_that_does_not_convert_exactly_is_refused_by_name(peft_reward_adapter, mlx_reward, tmp_path):
    from safetensors.numpy import load_file, save_file

    def variant(name: str, source: Path, weights_name: str, drop=(), add=None, head_spec=None, remove=(),
                **changes) -> Path:
        folder = tmp_path / name
        shutil.copytree(source, folder)
        tensors = {k: v for k, v in load_file(str(source / weights_name)).items() if k not in drop} | (add or {})
        save_file(tensors, str(folder / weights_name))
        config = json.loads((source / "adapter_config.json").read_text()) | changes
        (folder / "adapter_config.json").write_text(json.dumps(config))
        if head_spec:
            spec = json.loads((folder / "reward_head.json").read_text()) | head_spec
            (folder / "reward_head.json").write_text(json.dumps(spec))
        for file in remove:
            (folder / file).unlink()
        return folder

    peft, head = peft_reward_adapter, "base_model.model.score.weight"
    cases = [
        (variant("lm_head", peft, "adapter_model.safetensors", modules_to_save=["score", "lm_head"]), "mlx",
         "modules_to_save=['score', 'lm_head']"),
        (variant("labels", peft, "adapter_model.safetensors", add={head: np.ones((3, 64), np.float32)}), "mlx",
         "has shape [3, 64]; a reward model has one label"),
        (variant("nohead", peft, "adapter_model.safetensors", drop=(head,)), "mlx",
         f"must hold its score head {head}"),
        (variant("nopad", peft, "adapter_model.safetensors", base_model_name_or_path="org/model"), "mlx",
         "the adapter has no reward_head.json and no local base model's config.json names a pad_token_id"),
        (variant("twolabels", mlx_reward[2], "adapters.safetensors", head_spec={"num_labels": 2}), "peft",
         "reward_head.json: num_labels is 2"),
        (variant("nopadid", mlx_reward[2], "adapters.safetensors", head_spec={"pad_token_id": None}), "peft",
         "reward_head.json: pad_token_id is None"),
        (variant("headless", mlx_reward[2], "adapters.safetensors", remove=["score_head.safetensors"]), "peft",
         "names a score head in score_head.safetensors, which is missing"),
        (variant("unsaid", mlx_reward[2], "adapters.safetensors", remove=["reward_head.json"]), "peft",
         "score_head.safetensors holds a score head but reward_head.json"),
        # the head inside mlx-lm's own file (which mlx_lm.load refuses) is not an mlx adapter overnight writes
        (variant("inside", mlx_reward[2], "adapters.safetensors", remove=["score_head.safetensors"],
                 add={"score.weight": np.ones((1, 64), np.float32)}), "peft",
         "names a score head in score_head.safetensors, which is missing"),
    ]
    for i, (folder, to, message) in enumerate(cases):
        with pytest.raises(UsageError, match=re.escape(message)):
            convert_adapter(folder, to, tmp_path / f"o{i}", say=lambda m: None)
        assert not (tmp_path / f"o{i}").exists()
    # a torch reward run of overnight before reward_head.json kept the pad id in adapter_config.json: still read
    legacy = variant("legacy", peft, "adapter_model.safetensors", base_model_name_or_path="org/model",
                     num_labels=1, pad_token_id=5)
    out = convert_adapter(legacy, "mlx", tmp_path / "legacy-mlx", say=lambda m: None)
    assert json.loads((out / "reward_head.json").read_text())["pad_token_id"] == 5
