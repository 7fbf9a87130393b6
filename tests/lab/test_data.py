"""Embedded datasets, splits, standardization, and the real-format readers on fixture files."""

import gzip
import pickle

import numpy as np
import pytest

from bnlab.lab.data import EMBEDDED, INPUT_SHAPES, files_problem, load_dataset
from bnlab.lab.formats import DataFormatError, read_cifar_batch, read_idx


@pytest.mark.parametrize(
    ("name", "shape", "classes", "total"),
    [("digits", (1, 8, 8), 10, 1797), ("mnist1d", (1, 40), 10, 5000), ("spirals", (2,), 3, 1500)],
)
def test_embedded_datasets(name, shape, classes, total):
    data = load_dataset(name)
    assert data.input_shape == shape and data.num_classes == classes
    assert len(data.y_train) + len(data.y_val) + len(data.y_test) == total
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    axes = (0, *range(2, data.x_train.ndim))
    np.testing.assert_allclose(data.x_train.mean(axis=axes), 0.0, atol=1e-4)
    assert not np.allclose(data.x_val.mean(axis=axes), 0.0, atol=1e-6), (
        "val uses train's statistics"
    )


def test_mnist1d_is_the_published_split():
    from mnist1d.data import get_dataset_args, make_dataset

    published = make_dataset(get_dataset_args())
    data = load_dataset("mnist1d")
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (3500, 500, 1000)
    np.testing.assert_array_equal(data.y_test, published["y_test"])
    held = np.concatenate([data.y_train, data.y_val])
    assert sorted(held.tolist()) == sorted(published["y"].tolist())
    # the test inputs are the published ones up to the standardization (an affine map)
    raw, ours = published["x_test"].ravel(), data.x_test[:, 0].astype(np.float64).ravel()
    slope, intercept = np.polyfit(raw, ours, 1)
    np.testing.assert_allclose(slope * raw + intercept, ours, atol=1e-4)


def test_splits_are_deterministic_and_disjoint():
    a, b = load_dataset("spirals"), load_dataset("spirals")
    np.testing.assert_array_equal(a.x_train, b.x_train)
    rows = {tuple(r) for r in a.x_train.round(5)}
    assert not rows & {tuple(r) for r in a.x_test.round(5)}


def test_mnist1d_generation_leaves_global_numpy_state_alone():
    np.random.seed(123)  # noqa: NPY002
    expected = np.random.rand()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    load_dataset("mnist1d")
    assert np.random.rand() == expected  # noqa: NPY002


def test_max_train_and_bad_names():
    assert len(load_dataset("digits", max_train=100).y_train) == 100
    with pytest.raises(ValueError, match="name: expected one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="pass --data-dir DIR"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="max_train: expected a positive integer"):
        load_dataset("digits", max_train=0)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(directory, n_train=60, n_test=20, gz=False):
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files[f"{prefix}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28))
        files[f"{prefix}-labels-idx1-ubyte"] = rng.integers(0, 10, n)
    for name, array in files.items():
        raw = _idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return files


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    files = _write_mnist(tmp_path, gz=gz)
    data = load_dataset("mnist", tmp_path)
    assert data.input_shape == (1, 28, 28)
    assert len(data.y_train) + len(data.y_val) == 60 and len(data.y_test) == 20
    np.testing.assert_array_equal(data.y_test, files["t10k-labels-idx1-ubyte"])


def test_idx_errors_name_the_file(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(
        DataFormatError, match=r"train-images-idx3-ubyte: truncated: shape \(60, 28, 28\)"
    ):
        load_dataset("mnist", tmp_path)
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte: not an IDX file"):
        read_idx(path)
    path.unlink()
    with pytest.raises(
        DataFormatError, match=r"MNIST train images: no file train-images-idx3-ubyte\[.gz\]"
    ):
        load_dataset("mnist", tmp_path)
    bad_gz = tmp_path / "x.gz"
    bad_gz.write_bytes(b"not gzip")
    with pytest.raises(DataFormatError, match=r"x\.gz: cannot read as gzip IDX"):
        read_idx(bad_gz)
    with pytest.raises(DataFormatError, match="data_dir is not a directory"):
        load_dataset("mnist", tmp_path / "nowhere")


def _write_cifar(directory, n=20):
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        (directory / name).write_bytes(pickle.dumps(batch))


def test_cifar10_pickle_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _write_cifar(root)
    data = load_dataset("cifar10", tmp_path)
    assert data.input_shape == (3, 32, 32)
    assert len(data.y_train) + len(data.y_val) == 100 and len(data.y_test) == 20


def test_cifar_errors_name_the_file(tmp_path):
    _write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(DataFormatError, match=r"data_batch_3: expected data of shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path)
    path.write_bytes(pickle.dumps({"wrong": 1}))
    with pytest.raises(
        DataFormatError, match="data_batch_3: expected a dict with b'data' and b'labels'"
    ):
        read_cifar_batch(path)
    path.write_bytes(
        pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4})[:-20]
    )
    with pytest.raises(DataFormatError, match="data_batch_3: not a CIFAR-10 python pickle batch"):
        read_cifar_batch(path)


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataFormatError, match=r"refusing to load builtins\.print"):
        read_cifar_batch(path)


def test_cifar10_runs_the_small_resnet(tmp_path):
    from bnlab.lab.runner import run_experiment
    from bnlab.lab.runs import load_run

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    _write_cifar(root)
    run_dir = run_experiment(
        "mnist-cnn", root=tmp_path / "runs", progress=False, echo=None, data="cifar10",
        data_dir=str(tmp_path), epochs=1, num_seeds=1, lr_grid=(0.05,), tuning_epochs=1,
    )  # fmt: skip
    _, saved = load_run(run_dir)
    assert saved["metrics"]["arch"] == "resnet" and saved["metrics"]["dataset"] == "cifar10"
    assert saved["data"][0].startswith("cifar10:"), "the run says which data it used"


def test_input_shapes_are_known_without_loading():
    for name in EMBEDDED:
        assert INPUT_SHAPES[name] == load_dataset(name).input_shape


def test_files_problem_checks_the_files_without_reading_them(tmp_path):
    assert files_problem("mnist", tmp_path).endswith("got an empty directory")
    _write_mnist(tmp_path, gz=True)
    assert files_problem("mnist", tmp_path) is None
    (tmp_path / "t10k-labels-idx1-ubyte.gz").rename(tmp_path / "t10k-labels.idx1-ubyte")
    assert files_problem("mnist", tmp_path) is None, "the '.idx' spelling is accepted"
    (tmp_path / "t10k-labels.idx1-ubyte").unlink()
    assert "got a directory without t10k-labels-idx1-ubyte (it holds t10k-images" in files_problem("mnist", tmp_path)  # fmt: skip
    root = tmp_path / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    assert "got an empty directory" in files_problem("cifar10", tmp_path / "cifar")
    _write_cifar(root)
    assert files_problem("cifar10", tmp_path / "cifar") is None
