"""Atomic writes: whole files or nothing, strict JSON."""

import json
import os

import numpy as np
import pytest

from bnlab import files


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    files.atomic_write_text(path, "one")
    files.atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def _write_with_umask(mask, path):
    old = os.umask(mask)
    try:
        return files.atomic_write_text(path, "x")
    finally:
        os.umask(old)


def test_permissions_follow_the_umask_at_write_time(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        path = _write_with_umask(mask, tmp_path / f"{mask}.txt")
        assert oct(path.stat().st_mode & 0o777) == oct(mode), f"umask {oct(mask)}"


def test_importing_changes_nothing_global(monkeypatch):
    import importlib

    def no_umask(*_args):
        raise AssertionError("bnlab.files touched the process umask at import")

    monkeypatch.setattr(os, "umask", no_umask)
    importlib.reload(files)


def test_failed_write_leaves_old_file_and_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    files.atomic_write_json(path, {"a": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_json_handles_numpy_and_non_finite(tmp_path):
    path = files.atomic_write_json(
        tmp_path / "m.json",
        {"x": np.arange(3), "y": np.float32(1.5), "n": float("nan"), "i": float("inf")},
    )
    assert json.loads(path.read_text()) == {"x": [0, 1, 2], "y": 1.5, "n": None, "i": "inf"}
