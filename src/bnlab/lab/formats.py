"""Readers for the real datasets' file formats: MNIST IDX and CIFAR-10 python pickles.

Every failure names the file and says what was expected. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataFormatError(ValueError):
    """A data file is missing, truncated or not in the expected format."""


def find_file(directory: Path, candidates: list[str], what: str) -> Path:
    """The first of ``candidates`` (with or without ``.gz``) that exists in ``directory``."""
    for name in candidates:
        for suffix in ("", ".gz"):
            path = directory / f"{name}{suffix}"
            if path.is_file():
                return path
    raise DataFormatError(
        f"{what}: no file {candidates[0]}[.gz] (or {', '.join(candidates[1:])}) in {directory}"
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip): 2 zero bytes, a dtype code, the rank, big-endian sizes."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (expected an IDX file)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataFormatError(
            f"{path}: cannot read as {'gzip ' if opener is gzip.open else ''}IDX: {error}"
        ) from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFormatError(
            f"{path}: not an IDX file (expected magic 0x0000 <dtype> <rank>, got {raw[:4].hex() or 'empty file'})"
        )
    dtype, rank = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataFormatError(
            f"{path}: {state}: shape {shape} of {dtype} needs {expected} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw[header:], dtype=dtype).reshape(shape)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle plain containers and NumPy arrays only: a data file cannot run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found (expected a CIFAR-10 python batch)")
    try:
        with open(path, "rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="bytes").load()
    except Exception as error:
        raise DataFormatError(f"{path}: not a CIFAR-10 python pickle batch ({error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataFormatError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"{path}: expected data of shape (N, 3072) and N labels, "
            f"got {data.shape} and {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(
            f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}"
        )
    return data.reshape(-1, 3, 32, 32).astype(np.uint8), labels
