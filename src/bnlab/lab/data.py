"""Datasets for the lab: embedded ones that need no download, and real files the user has.

Embedded: ``digits`` (scikit-learn's 1,797 8×8 images, shipped with scikit-learn),
``mnist1d`` (generated procedurally by the ``mnist1d`` package with its published arguments:
the canonical 4,000 train / 1,000 test split, validation carved from the 4,000), and the
synthetic ``spirals``. Real files: ``mnist`` (IDX, raw or .gz) and ``cifar10`` (python
pickle batches) from ``data_dir``.

Splits are deterministic; inputs are standardized per channel with statistics of the
training split only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnlab.lab.formats import DataFormatError, find_file, read_cifar_batch, read_idx

EMBEDDED = ("digits", "mnist1d", "spirals")
REAL = ("mnist", "cifar10")
SPLIT_SEED = 0
# Each dataset's input shape, known without loading it: (C, H, W) images, (C, L) signals,
# or (features,) vectors. An experiment checks it fits its models before it runs.
INPUT_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "spirals": (2,), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}  # fmt: skip
# The files of the real datasets, each found raw or with .gz: {what: candidate names}.
MNIST_FILES = {f"MNIST {part} {kind}": [f"{part}-{kind}-idx{rank}-ubyte", f"{part}-{kind}.idx{rank}-ubyte"] for part in ("train", "t10k") for kind, rank in (("images", 3), ("labels", 1))}  # fmt: skip
CIFAR10_FILES = {**{f"CIFAR-10 training batch {i}": [f"data_batch_{i}"] for i in range(1, 6)}, "CIFAR-10 test batch": ["test_batch"]}  # fmt: skip
CIFAR10_FOLDER = "cifar-10-batches-py"


@dataclass(frozen=True)
class Dataset:
    """Standardized float32 inputs and int64 labels, split three ways.

    Shape: x_* (N, *input_shape); y_* (N,).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train)} train / {len(self.x_val)} val / "
            f"{len(self.x_test)} test, input {self.input_shape}, {self.num_classes} classes"
        )


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Per-channel (axis 1) standardization with the training split's statistics."""
    axes = (0, *range(2, train.ndim))
    mean = train.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = train.std(axis=axes, keepdims=True, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _split(x: np.ndarray, y: np.ndarray, fractions=(0.7, 0.15)) -> tuple[np.ndarray, ...]:
    """Shuffle with a fixed seed, then cut into train / val / test."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    x, y = x[order], y[order]
    n_train = round(fractions[0] * len(y))
    n_val = round(fractions[1] * len(y))
    cuts = (n_train, n_train + n_val)
    return (
        x[: cuts[0]],
        y[: cuts[0]],
        x[cuts[0] : cuts[1]],
        y[cuts[0] : cuts[1]],
        x[cuts[1] :],
        y[cuts[1] :],
    )


def _holdout(x: np.ndarray, y: np.ndarray, n_val: int) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_val, y_val)``: a fixed random ``n_val`` examples held out."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    train, val = order[n_val:], order[:n_val]
    return x[train], y[train], x[val], y[val]


def _finish(name: str, parts: tuple[np.ndarray, ...], num_classes: int) -> Dataset:
    x_train, y_train, x_val, y_val, x_test, y_test = parts
    x_train, x_val, x_test = _standardize(x_train.astype(np.float64), x_val, x_test)
    labels = [np.asarray(y, dtype=np.int64) for y in (y_train, y_val, y_test)]
    return Dataset(name, x_train, labels[0], x_val, labels[1], x_test, labels[2], num_classes)


@functools.cache
def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _finish("digits", _split(bunch.images[:, None, :, :], bunch.target), 10)


MNIST1D_VAL = 500  # carved from the published 4,000 training examples


@functools.cache
def _mnist1d() -> Dataset:
    """The published MNIST-1D (Greydanus 2020): 4,000 train / 1,000 test, 40 samples each."""
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # noqa: NPY002  (make_dataset reseeds the global generator)
    try:
        raw = make_dataset(get_dataset_args())  # procedural generation; never the download path
    finally:
        np.random.set_state(state)  # noqa: NPY002
    split = _holdout(raw["x"][:, None, :], raw["y"], MNIST1D_VAL)
    return _finish("mnist1d", (*split, raw["x_test"][:, None, :], raw["y_test"]), 10)


@functools.cache
def _spirals(num_samples: int = 1500, num_classes: int = 3) -> Dataset:
    """Interleaved noisy 2-d spirals, one arm per class."""
    rng = np.random.default_rng(SPLIT_SEED)
    per_class = num_samples // num_classes
    radius = np.tile(np.linspace(0.05, 1.0, per_class), num_classes)
    labels = np.repeat(np.arange(num_classes), per_class)
    angle = labels * 2 * np.pi / num_classes + radius * 3.0 + rng.normal(0, 0.15, radius.shape)
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return _finish("spirals", _split(x, labels), num_classes)


def _mnist(data_dir: Path) -> Dataset:
    def read(what: str) -> np.ndarray:
        return read_idx(find_file(data_dir, MNIST_FILES[what], what))

    images = [read(f"MNIST {p} images") for p in ("train", "t10k")]
    labels = [read(f"MNIST {p} labels") for p in ("train", "t10k")]
    for image, label, part in zip(images, labels, ("train", "t10k"), strict=True):
        if image.ndim != 3 or label.ndim != 1 or len(image) != len(label):
            raise DataFormatError(
                f"{data_dir}: MNIST {part} images must be (N, H, W) with N labels, "
                f"got {image.shape} and {label.shape}"
            )
    x, y = images[0][:, None].astype(np.float64) / 255.0, labels[0]
    test_x = images[1][:, None].astype(np.float64) / 255.0
    split = _holdout(x, y, max(1, len(y) // 12))  # 5,000 of MNIST's 60,000
    return _finish("mnist", (*split, test_x, labels[1]), 10)


def _cifar10_root(data_dir: Path) -> Path:
    """``data_dir``, or its cifar-10-batches-py folder (as the archive unpacks) if it has one."""
    return data_dir / CIFAR10_FOLDER if (data_dir / CIFAR10_FOLDER).is_dir() else data_dir


def _cifar10(data_dir: Path) -> Dataset:
    root = _cifar10_root(data_dir)
    batches = [read_cifar_batch(find_file(root, names, what)) for what, names in CIFAR10_FILES.items()]  # fmt: skip
    train, (test_x, test_y) = batches[:-1], batches[-1]
    x = np.concatenate([b[0] for b in train]).astype(np.float64) / 255.0
    y = np.concatenate([b[1] for b in train])
    split = _holdout(x, y, max(1, len(y) // 10))  # 5,000 of CIFAR-10's 50,000
    return _finish("cifar10", (*split, test_x / 255.0, test_y), 10)


def files_problem(name: str, data_dir: str | Path) -> str | None:
    """None if ``data_dir`` holds every file the real dataset ``name`` needs (without reading
    them); else what was expected and what was found, for a message before any work."""
    directory = Path(data_dir).expanduser()
    if name == "mnist":
        where, files = directory, MNIST_FILES
        expected = f"the 4 MNIST IDX files {', '.join(c[0] for c in files.values())} (raw or .gz) in {str(data_dir)!r}"  # fmt: skip
    else:
        where, files = _cifar10_root(directory), CIFAR10_FILES
        expected = f"the 6 CIFAR-10 python batches {', '.join(c[0] for c in files.values())} in {str(data_dir)!r} or in its {CIFAR10_FOLDER} folder"  # fmt: skip
    missing = []
    for what, candidates in files.items():
        try:
            find_file(where, candidates, what)
        except DataFormatError:
            missing.append(candidates[0])
    if not missing:
        return None
    entries = sorted(p.name for p in where.iterdir()) if where.is_dir() else []
    if not entries:
        return f"expected {expected}, got an empty directory"
    shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")  # fmt: skip
    return f"expected {expected}, got a directory without {', '.join(missing)} (it holds {shown})"  # fmt: skip


def load_dataset(
    name: str, data_dir: str | Path | None = None, max_train: int | None = None
) -> Dataset:
    """Load a dataset by name; ``max_train`` keeps the first N training examples."""
    if name in EMBEDDED:
        dataset = {"digits": _digits, "mnist1d": _mnist1d, "spirals": _spirals}[name]()
    elif name in REAL:
        if data_dir is None:
            raise ValueError(
                f"data_dir: dataset {name!r} is read from your files; pass --data-dir DIR"
            )
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataFormatError(f"{path}: data_dir is not a directory")
        dataset = _mnist(path) if name == "mnist" else _cifar10(path)
    else:
        raise ValueError(f"name: expected one of {EMBEDDED + REAL}, got {name!r}")
    if max_train is not None and max_train < len(dataset.y_train):
        if max_train < 1:
            raise ValueError(f"max_train: expected a positive integer, got {max_train}")
        dataset = Dataset(
            dataset.name,
            dataset.x_train[:max_train],
            dataset.y_train[:max_train],
            dataset.x_val,
            dataset.y_val,
            dataset.x_test,
            dataset.y_test,
            dataset.num_classes,
        )
    return dataset
