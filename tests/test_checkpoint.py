"""The commit protocol: what counts as a checkpoint, what gets quarantined, what rotation keeps."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from overnight.runs.checkpoint import CheckpointError, CheckpointManager, NonFiniteWeights, export_adapter


def writer(value: float, nan: bool = False):
    def write(folder: Path) -> None:
        (folder / "adapter").mkdir()
        weights = np.full((4, 4), np.nan if nan else value, dtype=np.float32)
        save_file({"w": weights}, str(folder / "adapter" / "adapter.safetensors"))
        (folder / "optimizer.bin").write_bytes(os.urandom(64) + bytes([int(value) % 256]) * 1000)
    return write


def save(manager: CheckpointManager, step: int, **kw) -> Path:
    return manager.save(step, writer(float(step), **kw), {"step": step}, {"fp": 1}, {"numpy": np.__version__})


@pytest.fixture
def manager(tmp_path):
    return CheckpointManager(tmp_path / "run", keep_last=3, log=lambda m: None)


def test_save_commits_a_verified_folder(manager):
    path = save(manager, 10)
    assert path.name == "step-00000010"
    assert {p.name for p in path.iterdir()} == {"adapter", "optimizer.bin", "trainer_state.json", "manifest.json", "COMMIT"}
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"adapter/adapter.safetensors", "optimizer.bin", "trainer_state.json"}
    assert manifest["step"] == 10 and manifest["fingerprint"] == {"fp": 1} and "numpy" in manifest["versions"]
    assert manager.verify(path) == (True, "")
    assert not list(manager.root.glob("*.tmp-*"))


def corrupt_truncate(path):
    f = path / "optimizer.bin"
    f.write_bytes(f.read_bytes()[:100])


def corrupt_flip_data(path):
    f = path / "optimizer.bin"
    data = bytearray(f.read_bytes())
    data[500] ^= 0xFF
    f.write_bytes(bytes(data))


def corrupt_flip_header(path):
    f = path / "adapter" / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[10] ^= 0x01
    f.write_bytes(bytes(data))


def corrupt_zero_tail(path):
    f = path / "optimizer.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-200] + bytes(200))


def corrupt_no_commit(path):
    (path / "COMMIT").unlink()


def corrupt_no_manifest(path):
    (path / "manifest.json").unlink()


def corrupt_empty_file(path):
    (path / "trainer_state.json").write_bytes(b"")


def corrupt_missing_file(path):
    (path / "optimizer.bin").unlink()


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_flip_data, corrupt_flip_header, corrupt_zero_tail,
                                     corrupt_no_commit, corrupt_no_manifest, corrupt_empty_file, corrupt_missing_file])
def test_a_bad_checkpoint_is_quarantined_and_the_previous_used(manager, corrupt):
    save(manager, 10)
    bad = save(manager, 20)
    corrupt(bad)
    ok, why = manager.verify(bad)
    assert not ok and why
    chosen = manager.latest_valid()
    assert chosen.step == 10
    quarantined = list(manager.quarantine_dir.iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("step-00000020")
    assert (quarantined[0] / "QUARANTINED.txt").read_text().strip() == why
    assert not bad.exists()


def test_leftover_temp_folders_are_removed_and_never_count(manager):
    save(manager, 10)
    leftover = manager.root / "step-00000020.tmp-abcd"
    leftover.mkdir()
    (leftover / "COMMIT").write_text("{}")
    assert manager.latest_valid().step == 10
    assert manager.cleanup_leftovers() == [leftover]
    assert not leftover.exists()


def test_failed_write_removes_its_temp_folder_and_keeps_the_previous(manager):
    save(manager, 10)

    def broken(folder):
        writer(1.0)(folder)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="disk full"):
        manager.save(20, broken, {"step": 20}, {}, {})
    assert not list(manager.root.glob("*.tmp-*"))
    assert manager.latest_valid().step == 10 and manager.verify(manager.path_for(10))[0]


def test_not_enough_free_space_is_refused_before_writing(manager, monkeypatch):
    save(manager, 10)
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 10))
    with pytest.raises(CheckpointError, match="not enough free disk space"):
        save(manager, 20)
    assert [i.step for i in manager.list()] == [10]


@pytest.mark.parametrize("short_by", [1000, 50_000, 600_000])
def test_the_free_space_refusal_words_numbers_that_differ(manager, monkeypatch, short_by):
    """Once "1 MB free, about 1 MB needed": the numbers a user must act on were rounded into each other."""
    save(manager, 10)
    import re
    import shutil

    needed = int(manager._estimate_bytes() * 1.2) + (1 << 20)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, needed - short_by))
    with pytest.raises(CheckpointError) as refused:
        save(manager, 20)
    free, about = re.search(r": (.+) free, about (.+) needed", str(refused.value)).groups()
    assert free != about, str(refused.value)


def test_sizes_that_differ_add_digits_until_they_do():
    from overnight.runs.checkpoint import sizes_that_differ

    assert sizes_that_differ(int(1.04 * 2**20), int(1.31 * 2**20)) == ("1.0 MB", "1.3 MB")
    assert sizes_that_differ(int(1.01 * 2**20), int(1.04 * 2**20)) == ("1.01 MB", "1.04 MB")
    assert sizes_that_differ(2**20, 2**20 + 10) == ("1,048,576 bytes", "1,048,586 bytes")
    assert sizes_that_differ(5 * 2**30, 6 * 2**30) == ("5.0 GB", "6.0 GB")


def test_a_keep_last_lowered_on_resume_is_applied_before_the_first_save(tmp_path):
    """keep_last lowered from 5 to 2 on resume: the old checkpoints go at the resume, not after the first new save
    (which a disk they fill would refuse); the resumed-from one and the best stay."""
    old = CheckpointManager(tmp_path / "run", keep_last=5, log=lambda m: None)
    for step in (10, 20, 30, 40, 50):
        save(old, step)
    said = []
    resumed = CheckpointManager(tmp_path / "run", keep_last=2, log=said.append)
    resumed.protected.add(30)  # --resume-from 30: kept, like the last two (40, 50) and the best (10)
    assert resumed.prune_on_resume(best_step=10) == [20]
    assert [i.step for i in resumed.list()] == [10, 30, 40, 50]
    assert said == ["checkpoint.keep_last=2: removed step 20 (kept: 10, 30, 40, 50)"]


def test_non_finite_weights_are_refused(manager):
    with pytest.raises(NonFiniteWeights):
        save(manager, 10, nan=True)
    assert manager.list() == [] and not list(manager.root.glob("*.tmp-*"))


def test_bf16_weights_are_checked_too(tmp_path):
    from overnight.runs.checkpoint import safetensors_all_finite

    path = tmp_path / "w.safetensors"
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    for payload, finite in ((np.array([0x3F80, 0x4000], np.uint16), True), (np.array([0x3F80, 0x7FC0], np.uint16), False)):
        path.write_bytes(len(header).to_bytes(8, "little") + header + payload.tobytes())
        assert safetensors_all_finite(path) is finite


def test_rotation_keeps_last_best_and_protected(manager):
    for step in (10, 20, 30, 40, 50, 60):
        save(manager, step)
    manager.protected.add(10)
    removed = manager.rotate(best_step=20)
    assert removed == [30]
    assert [i.step for i in manager.list()] == [10, 20, 40, 50, 60]
    assert not list(manager.root.glob("*.tmp-*"))


def test_resume_from_and_before_step(manager):
    for step in (10, 20, 30):
        save(manager, step)
    assert manager.latest_valid(at_step=20).step == 20
    assert manager.latest_valid(before_step=30).step == 20
    assert manager.latest_valid(before_step=10) is None


def test_saving_a_step_that_exists_commits_the_new_state_and_sets_the_old_aside(manager):
    """A `checkpoint` event must never claim a save that did not happen: the old one moves to superseded/."""
    first = save(manager, 10)
    old_bytes = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    path = manager.save(10, writer(99.0), {"step": 10, "new": True}, {"fp": 2}, {})
    assert path == manager.path_for(10) and manager.verify(path) == (True, "")
    assert manager.trainer_state(path) == {"step": 10, "new": True} and manager.manifest(path)["fingerprint"] == {"fp": 2}
    (aside,) = list((manager.root / "superseded").iterdir())
    assert aside.name.startswith("step-00000010-")
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == old_bytes
    assert [i.step for i in manager.list()] == [10] and manager.last_committed == 10


def test_an_invalid_folder_under_the_final_name_is_quarantined_on_save(manager):
    bad = save(manager, 10)
    (bad / "COMMIT").unlink()
    save(manager, 10)
    assert manager.verify(manager.path_for(10))[0]
    (moved,) = manager.quarantined()
    assert "no COMMIT" in (moved / "QUARANTINED.txt").read_text()


def test_read_only_lookup_quarantines_nothing(manager):
    save(manager, 10)
    bad = save(manager, 20)
    (bad / "COMMIT").unlink()
    skipped = []
    assert manager.latest_valid(read_only=True, skipped=skipped).step == 10
    assert [i.step for i in skipped] == [20] and bad.is_dir() and manager.quarantined() == []


def test_fault_hook_can_slow_a_save_or_crash_it(manager, monkeypatch):
    import time

    from overnight.runs import checkpoint

    monkeypatch.setattr(checkpoint._fault, "counts", {})
    monkeypatch.setenv("OVERNIGHT_FAULT", "after_files:1:sleep=0.3")
    started = time.monotonic()
    save(manager, 10)
    assert time.monotonic() - started >= 0.3
    monkeypatch.setattr(checkpoint._fault, "counts", {})
    monkeypatch.setenv("OVERNIGHT_FAULT", "before_commit:1:raise")
    with pytest.raises(RuntimeError, match="injected fault at before_commit"):
        save(manager, 20)
    assert [i.step for i in manager.list()] == [10] and not list(manager.root.glob("*.tmp-*"))


def test_export_adapter_replaces_atomically(manager, tmp_path):
    run_dir = manager.root.parent
    export_adapter(save(manager, 10), run_dir)
    export_adapter(save(manager, 20), run_dir)
    assert (run_dir / "adapter" / "adapter.safetensors").read_bytes() == \
        (manager.path_for(20) / "adapter" / "adapter.safetensors").read_bytes()
    assert not list(run_dir.glob("adapter.tmp-*"))
