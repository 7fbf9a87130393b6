"""User errors on the command line: each is refused with exit status 2 and one message that
names the option, what it expects and what it got; never a traceback, and nothing written.

The commands run as a user runs them (``python -m bnlab ...`` in a subprocess); most are
refused while the command line is parsed, before torch is imported."""

import os
import re
import subprocess
import sys

import pytest

from bnlab.lab.data import load_dataset

ENV = {**os.environ, "COLUMNS": "250", "TERMINAL_WIDTH": "250", "NO_COLOR": "1"}


def bnlab(*args: str, cwd=None) -> tuple[int, str]:
    """(exit status, stdout + stderr with rich's box drawing and line breaks taken out)."""
    result = subprocess.run([sys.executable, "-m", "bnlab", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)  # fmt: skip
    text = re.sub(r"[│╭╮╰╯─]", " ", result.stdout + result.stderr)
    return result.returncode, " ".join(text.split())


def refused(args: list[str], message: str, cwd=None) -> str:
    code, output = bnlab(*args, cwd=cwd)
    assert code == 2, output
    assert "Traceback" not in output, output
    assert message in output, output
    return output


CASES = [
    # train: counts, numbers, choices
    (["train", "--steps", "0"], "Invalid value for '--steps': expected a positive integer, got 0"),
    (["train", "--steps", "-1"], "Invalid value for '--steps': expected a positive integer, got -1"),
    (["train", "--nproc", "0"], "Invalid value for '--nproc': expected a positive integer, got 0"),
    (["train", "--global-batch", "1"], "Invalid value for '--global-batch': expected an integer >= 2 (BatchNorm needs more than one value per channel), got 1"),
    (["train", "--lr", "-1"], "Invalid value for '--lr': expected a positive finite number, got -1.0"),
    (["train", "--lr", "0"], "Invalid value for '--lr': expected a positive finite number, got 0.0"),
    (["train", "--lr", "nan"], "Invalid value for '--lr': expected a positive finite number, got nan"),
    (["train", "--seed", "-1"], "Invalid value for '--seed': expected an integer >= 0, got -1"),
    (["train", "--dtype", "float16"], "Invalid value for '--dtype': expected one of float32, float64, got 'float16'"),
    (["train", "--data", "mnist"], "Invalid value for '--data': expected one of digits, mnist1d, spirals, got 'mnist'"),
    (["train", "--backend", "mpi"], "Invalid value for '--backend': expected one of auto, gloo, nccl, got 'mpi'"),
    (["train", "--device", "tpu"], "Invalid value for '--device': expected one of auto, cpu, cuda, got 'tpu'"),
    # bench
    (["bench", "--model-rounds", "0"], "Invalid value for '--model-rounds': expected a positive integer, got 0"),
    (["bench", "--repeats", "0"], "Invalid value for '--repeats': expected a positive integer, got 0"),
    (["bench", "--repeats", "-3"], "Invalid value for '--repeats': expected a positive integer, got -3"),
    (["bench", "--threads", "-1"], "Invalid value for '--threads': expected an integer >= 0, got -1"),
    (["bench", "--model-warmup", "-1"], "Invalid value for '--model-warmup': expected an integer >= 0, got -1"),
    (["bench", "--model-seconds", "-1"], "Invalid value for '--model-seconds': expected a non-negative finite number, got -1.0"),
    (["bench", "--model-width", "0"], "Invalid value for '--model-width': expected a positive integer, got 0"),
    (["bench", "--sizes", "b0-64"], "Invalid value for '--sizes': expected a positive batch and side, got 'b0-64'"),
    (["bench", "--sizes", "b1-32"], "Invalid value for '--sizes': expected batch × ⌈side/32⌉² >= 2"),
    (["bench", "--sizes", "8x64"], "Invalid value for '--sizes': expected b<batch>-<side> such as b8-64, got '8x64'"),
    (["bench", "--sizes", ","], "Invalid value for '--sizes': expected at least one size such as b8-64, got ','"),
    (["bench", "--device", "tpu"], "Invalid value for '--device': expected one of cpu, cuda, got 'tpu'"),
    (["bench", "--networks", "resnet9"], "Invalid value for '--networks': expected names from resnet18, resnet50, comma-separated, got 'resnet9'"),
    # check, fold
    (["check", "--seed", "-1"], "Invalid value for '--seed': expected an integer >= 0, got -1"),
    (["fold", "model.pt", "-o", "folded.pt", "--input-shape", "1,a"], "Invalid value for '--input-shape': expected positive integers separated by commas, such as 1,3,224,224, got '1,a'"),
    (["fold", "model.pt", "-o", "folded.pt", "--input-shape", "1,0,8"], "got '1,0,8'"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_option_is_refused_with_its_name(tmp_path, args, message):
    refused(args, message, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_train_refuses_a_batch_that_does_not_split_or_fit(tmp_path):
    refused(["train", "--nproc", "3", "--global-batch", "32"], "Invalid value for '--global-batch': expected a multiple of the 3 ranks, got 32", cwd=tmp_path)  # fmt: skip
    examples = len(load_dataset("digits").y_train)
    refused(["train", "--global-batch", "5000"], f"Invalid value for '--global-batch': expected at most the {examples} training examples of digits, got 5000", cwd=tmp_path)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nosuch"], "Invalid value for '--data': expected one of digits, mnist1d, spirals, mnist, cifar10, got 'nosuch'"),
        (["--impl", "nosuch"], "Invalid value for '--impl': expected one of bnlab, torch, got 'nosuch'"),
        (["--seed", "-1"], "Invalid value for '--seed': expected an integer >= 0, got -1"),
        (["--data", "mnist"], "Invalid value for '--data-dir': expected the directory of your mnist files with --data mnist, got none"),
        (["--data", "mnist", "--data-dir", "nowhere"], "Invalid value for '--data-dir': expected an existing directory, got 'nowhere'"),
        (["nosuch"], "Invalid value for NAMES: unknown experiment(s) ['nosuch']; expected names from ['batch-size',"),
    ],
)  # fmt: skip
def test_run_refuses_before_creating_a_run_directory(tmp_path, args, message):
    name = [] if args == ["nosuch"] else ["whitening-cost"]
    refused(["run", *name, *args, "--out", "out"], message, cwd=tmp_path)
    assert not (tmp_path / "out").exists(), "no run directory, no report"


def test_run_refuses_a_file_as_out(tmp_path):
    (tmp_path / "out").write_text("")
    refused(["run", "whitening-cost", "--out", "out"], "Invalid value for '--out': expected a directory, got the file 'out'", cwd=tmp_path)  # fmt: skip


def test_report_without_runs_names_out(tmp_path):
    refused(["report", "--out", "empty"], "Invalid value for '--out': expected finished runs (bnlab run writes them) under 'empty', found none", cwd=tmp_path)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mnist-cnn", "--data", "spirals"], "Invalid value for '--data': for experiment mnist-cnn, expected one of digits, mnist1d, mnist, cifar10 (its models take (C, L) signals or (C, H, W) images), got 'spirals' (inputs of shape (2,))"),
        (["placement", "--data", "spirals"], "Invalid value for '--data': for experiment placement, expected one of digits, mnist1d, mnist, cifar10"),
        (["--data", "spirals"], "Invalid value for '--data': for experiment batch-size, expected one of digits,"),
        (["mnist-cnn", "--data", "mnist", "--data-dir", "empty"], "Invalid value for '--data-dir': expected the 4 MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (raw or .gz) in 'empty', got an empty directory"),
        (["mnist-cnn", "--data", "cifar10", "--data-dir", "empty"], "Invalid value for '--data-dir': expected the 6 CIFAR-10 python batches data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch in 'empty' or in its cifar-10-batches-py folder, got an empty directory"),
        (["mnist-cnn", "--data-dir", "empty"], "Invalid value for '--data-dir': expected --data-dir only with --data mnist or --data cifar10 (the other datasets are built in), got 'empty' with no --data"),
        (["mnist-cnn", "--data", "digits", "--data-dir", "empty"], "got 'empty' with --data digits"),
    ],
)  # fmt: skip
def test_run_refuses_data_that_does_not_fit_before_creating_a_run_directory(tmp_path, args, message):  # fmt: skip
    (tmp_path / "empty").mkdir()
    refused(["run", *args, "--out", "out"], message, cwd=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["empty"], "no run directory, no report"


def test_run_names_the_missing_data_files(tmp_path):
    (tmp_path / "mnist").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte", "notes.txt"):
        (tmp_path / "mnist" / name).write_bytes(b"")
    refused(["run", "mnist-cnn", "--data", "mnist", "--data-dir", "mnist", "--out", "out"], "in 'mnist', got a directory without t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (it holds notes.txt, train-images-idx3-ubyte.gz, train-labels-idx1-ubyte)", cwd=tmp_path)  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["directory", "under a file", "/proc"])
def test_train_checks_out_while_parsing(tmp_path, where):
    (tmp_path / "somedir").mkdir()
    (tmp_path / "afile").write_text("")
    if where == "directory":
        args, message = ["--out", "somedir"], "Invalid value for '--out': expected a file path, got the directory 'somedir'"  # fmt: skip
    elif where == "under a file":
        args, message = ["--out", "afile/x.json"], "Invalid value for '--out': expected a file path in a folder that exists or can be created, got 'afile/x.json' ("  # fmt: skip
    else:
        if not os.path.isdir("/proc") or os.path.exists("/proc/nonexistent"):
            pytest.skip("needs Linux's /proc")
        args, message = ["--out", "/proc/nonexistent/x.json"], "Invalid value for '--out': expected a file path in a folder that exists or can be created, got '/proc/nonexistent/x.json' (cannot create a folder in '/proc'"  # fmt: skip
    refused(["train", "--steps", "1", *args], message, cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "somedir"], "nothing written"
    assert list((tmp_path / "somedir").iterdir()) == []
