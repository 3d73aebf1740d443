"""The fingerprint counts the model by content, never by how its path is spelled (and a hub id by its id)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from overnight.runs import fingerprint as fp
from overnight.config import build_config

from conftest import ROOT
from test_cli import base_args, overnight


def compute(model: str, tmp_path: Path, backend: str = "numpy-reference") -> dict:
    train = tmp_path / "train.jsonl"
    if not train.exists():
        train.write_text('{"text": "hello"}\n')
    return fp.compute(build_config(None, {"model.path": model}, []), train, None, backend=backend)


def test_the_same_folder_spelled_three_ways_is_the_same_model(tmp_path, tiny_model_dir, monkeypatch):
    link = tmp_path / "link-to-model"
    link.symlink_to(tiny_model_dir)
    monkeypatch.chdir(tiny_model_dir.parent)
    absolute = compute(str(tiny_model_dir), tmp_path)
    for spelling in (f"./{tiny_model_dir.name}", str(link), str(tiny_model_dir) + "/"):
        other = compute(spelling, tmp_path)
        assert other["model"] == absolute["model"] and fp.differences(absolute, other) == [], spelling
        assert other["model_path"] == spelling  # kept for people reading the manifest
    assert "model.path" not in absolute["config"] and absolute["backend"] == "numpy-reference"


def test_different_model_contents_are_named(tmp_path, tiny_model_dir):
    changed = shutil.copytree(tiny_model_dir, tmp_path / "changed")
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (changed / "config.json").write_text(json.dumps(config))
    changes = fp.differences(compute(str(tiny_model_dir), tmp_path), compute(str(changed), tmp_path))
    assert len(changes) == 1 and changes[0].startswith("model:") and "config.json or weight files differ" in changes[0]
    assert str(tiny_model_dir) in changes[0]


def test_hub_ids_are_their_own_identity(tmp_path):
    a, b = compute("org/model-a", tmp_path), compute("org/model-b", tmp_path)
    assert fp.differences(a, compute("org/model-a", tmp_path)) == []
    assert fp.differences(a, b) == ["model: 'org/model-a' -> 'org/model-b'"]


def test_an_older_fingerprint_with_model_path_in_its_config_still_matches(tmp_path, tiny_model_dir):
    current = compute(str(tiny_model_dir), tmp_path)
    older = json.loads(json.dumps(current))
    older["config"]["model.path"] = "/somewhere/else/model"
    del older["model_path"], older["backend"]
    assert fp.differences(older, current) == []


def test_resume_accepts_the_same_model_by_another_path_and_refuses_another_model(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert overnight(*base_args(tiny_model_dir, out, 5)).returncode == 0
    link = tmp_path / "model-link"
    link.symlink_to(tiny_model_dir)
    relative = Path(os.path.relpath(tiny_model_dir, ROOT))  # the CLI runs in ROOT
    for steps, model in ((6, relative), (7, link)):
        resumed = overnight(*base_args(model, out, steps), "--auto-resume")
        assert resumed.returncode == 0, (model, resumed.stderr)
    changed = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (changed / "config.json").write_text(json.dumps(config))
    refused = overnight(*base_args(changed, out, 8), "--auto-resume")
    assert refused.returncode == 3 and "model:" in refused.stderr and "--allow-config-change" in refused.stderr


def test_the_adapter_a_run_started_from_is_compared_by_content(tmp_path, tiny_model_dir):
    """lora.init_from: another adapter (or none) on resume is a named change; the same weights under another path
    are not (the fingerprint of a run from before the key has none, like a run from the seeded weights)."""
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "hello"}\n')
    cfg = build_config(None, {"model.path": str(tiny_model_dir)}, [])
    a = {"path": "/adapters/a", "sha256": "a" * 64}
    started = fp.compute(cfg, train, None, init_adapter=a)
    assert started["init_adapter"] == a
    moved = fp.compute(cfg, train, None, init_adapter={"path": "/elsewhere/a", "sha256": "a" * 64})
    assert fp.differences(started, moved) == []
    other = fp.compute(cfg, train, None, init_adapter={"path": "/adapters/a", "sha256": "b" * 64})
    assert fp.differences(started, other) == [
        f"lora.init_from: /adapters/a (weights sha256 {'a' * 12}) -> /adapters/a (weights sha256 {'b' * 12})"]
    seeded = fp.compute(cfg, train, None)
    assert fp.differences(started, seeded) == [
        f"lora.init_from: /adapters/a (weights sha256 {'a' * 12}) -> none (the seeded initial weights)"]
    older = {k: v for k, v in seeded.items() if k != "init_adapter"}
    assert fp.differences(older, seeded) == []


def test_another_methods_keys_do_not_block_a_resume_and_this_methods_do(tmp_path):
    """An sft checkpoint records grpo.beta and preference.beta too (every training key): that grpo's defaults
    moved, or a dpo beta was set, changes nothing an sft run computes. For a grpo run they are refused."""
    current = compute("org/model", tmp_path)
    older = json.loads(json.dumps(current))
    older["config"].update({"grpo.beta": 0.04, "grpo.loss_type": "grpo", "preference.beta": 0.5})
    assert current["config"]["data.method"] == "sft"
    assert fp.differences(older, current) == []
    for saved in (older, current):
        saved["config"]["data.method"] = "grpo"
    assert fp.differences(older, current) == ["grpo.beta: 0.04 -> 0.0", "grpo.loss_type: 'grpo' -> 'dapo'"]
    older["config"]["data.method"] = "dpo"
    changes = fp.differences(older, current)
    assert "data.method: 'dpo' -> 'grpo'" in changes and not any(c.startswith("preference.beta") for c in changes)


def test_a_copy_that_only_a_newer_converter_wrote_otherwise_is_not_called_a_changed_file():
    """Checkpoints record which converter wrote a converted copy and from which source: the same source under
    another converter is overnight's change (and the refusal offers no "undo"); another source is the user's. A file
    of the user's own (recorded as None) is never the converter's."""
    saved = {"train_data": "a", "train_source": "data/train.parquet",
             "train_conversion": {"converter": 1, "source": "s1"}}
    newer = {"train_data": "b", "train_source": "data/train.parquet",
             "train_conversion": {"converter": 2, "source": "s1"}}
    [change] = fp.differences(saved, newer)
    assert change.startswith("train data as overnight converts it: data/train.parquet is unchanged, but overnight's "
                             "converter changed since the checkpoint (version 1 -> 2: float32"), change
    assert fp.only_conversion_changed(saved, newer, [change])
    edited = dict(newer, train_conversion={"converter": 2, "source": "s2"})
    assert fp.differences(saved, edited) == ["train data file contents (data/train.parquet differs from the data the "
                                             "checkpoint was trained on)"]
    own = dict(saved, train_conversion=None)
    assert fp.differences(own, newer)[0].startswith("train data file contents (data/train.parquet differs from the "
                                                    "data the checkpoint was trained on)")
    assert not fp.only_conversion_changed(saved, edited, fp.differences(saved, edited))
