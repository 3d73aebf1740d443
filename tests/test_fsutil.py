"""fsutil: files overnight writes for the user get the mode the user's umask gives any other file."""
from __future__ import annotations

import os

import pytest

from overnight.fsutil import give_default_modes


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_written_0600_get_the_umasks_mode(tmp_path, umask):
    nested = tmp_path / "model" / "sub"
    nested.mkdir(parents=True)
    paths = [tmp_path / "model" / "model.safetensors", nested / "adapter.safetensors", tmp_path / "single.bin"]
    for path in paths:  # as safetensors and tempfile.mkstemp create them
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    old = os.umask(umask)
    try:
        give_default_modes(tmp_path / "model", tmp_path / "single.bin")
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in paths} == {0o666 & ~umask}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(p.name for p in paths)  # no probe left
