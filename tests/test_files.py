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
    assert oct(path.stat().st_mode & 0o777) != oct(0o600), "usual permissions, not mkstemp's"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


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
