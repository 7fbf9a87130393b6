"""`bnlab bench` in tiny smoke configurations (no timing assertions), and allocator tuning."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnlab import allocator
from bnlab import nn as bnn
from bnlab.bench.kernels import MODES, cases, run_benchmarks
from bnlab.bench.models import arms
from bnlab.bench.report import markdown, render
from bnlab.bench.resnets import resnet
from bnlab.bench.timing import alternate, bootstrap_interval, cost_ratio, median_ratio
from bnlab.cli import app
from bnlab.lab.endtoend import compare_epochs


def test_run_benchmarks_smoke(tmp_path):
    shapes = {"tiny": (4, 3, 5, 5), "flat": (16, 8)}
    result = run_benchmarks(shapes, repeats=2, warmup=1)
    assert len(result["rows"]) == len(cases(shapes)) * len(MODES) == 9
    for row in result["rows"]:
        assert row["bnlab_ms"] > 0 and row["torch_ms"] > 0 and row["floor_ms"] > 0
        assert row["speedup"] == row["torch_ms"] / row["bnlab_ms"]
    render(result, tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert markdown(result).count("\n") == 10


def test_epoch_comparison_smoke():
    result = compare_epochs(repeats=1, images=64, batch_size=32, channels=(4, 8))
    assert result["bnlab"] > 0 and result["torch"] > 0 and result["speedup"] > 0


def test_cli_bench_quick(tmp_path, monkeypatch):
    monkeypatch.setattr("bnlab.bench.kernels.SHAPES", {"small": (4, 3, 5, 5)})
    result = CliRunner().invoke(app, ["bench", "--quick", "--no-tuned", "--no-epoch", "--no-models", "--repeats", "2", "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bench.json").exists() and "speed-up" in result.output


def test_tuned_allocator_environment():
    env = allocator.tuned_environ({"A": "1"})
    assert env["A"] == "1" and int(env["MALLOC_MMAP_THRESHOLD_"]) == 4 << 30
    code = "import os; print(os.environ['MALLOC_TRIM_THRESHOLD_'])"
    out = subprocess.run([sys.executable, "-m", "bnlab", "tuned", "--", sys.executable, "-c", code], capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == str(4 << 30)


def test_alternate_rotates_the_order_and_counts_rounds():
    calls = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)  # fmt: skip
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [3, 3] and min(times["a"]) >= 0
    with pytest.raises(ValueError, match="rounds: expected at least 1, got 0"):
        alternate({"a": lambda: None}, rounds=0, warmup=0)


def test_alternate_adds_rounds_until_min_seconds(monkeypatch):
    """--model-seconds: rounds continue, whole rounds only, until the time is spent (a fake
    clock: 0.5 s per reading)."""
    from bnlab.bench import timing

    clock = iter(0.5 * i for i in range(10_000))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    times = alternate({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=0, min_seconds=10.0)
    assert len(times["a"]) == len(times["b"]) > 2
    clock = iter(0.5 * i for i in range(10_000))
    assert len(alternate({"a": lambda: None}, rounds=2, warmup=0, min_seconds=0.0)["a"]) == 2
    with pytest.raises(ValueError, match="min_seconds: expected a number >= 0, got -1"):
        alternate({"a": lambda: None}, rounds=1, warmup=0, min_seconds=-1)


def test_bootstrap_interval_holds_the_statistic_and_pairs_rounds():
    rng = np.random.default_rng(0)
    slow, fast = 2.0 + 0.1 * rng.random(30), 1.0 + 0.05 * rng.random(30)
    low, high = bootstrap_interval(median_ratio, slow, fast, resamples=500)
    assert low <= median_ratio(slow, fast) <= high and 1.8 < low < high < 2.2
    # identical candidates paired by round: every resample gives exactly 1
    assert bootstrap_interval(median_ratio, slow, slow, resamples=50) == (1.0, 1.0)
    assert cost_ratio(np.array([3.0]), np.array([5.0]), np.array([1.0])) == 0.5
    with pytest.raises(ValueError, match="samples: expected equally long"):
        bootstrap_interval(median_ratio, [1.0, 2.0], [1.0])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_have_torchvisions_layout(name):
    model = resnet(name, width=4, classes=7)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert (
        convs == {"resnet18": 20, "resnet50": 53}[name]
    )  # torchvision's counts, downsample included
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="name: expected one of"):
        resnet("resnet34")


def test_arms_share_weights_and_differ_only_in_bn():
    models = arms("resnet18", torch.randn(2, 3, 32, 32), width=4)
    kinds = {name: {type(m) for m in model.modules()} for name, model in models.items()}
    assert torch.nn.BatchNorm2d in kinds["torch"] and bnn.BatchNorm2d in kinds["bnlab"]
    assert bnn.BatchNormAct2d in kinds["bnlab-fused"] and bnn.BatchNormAct2d not in kinds["bnlab"]
    assert not any(issubclass(k, (torch.nn.BatchNorm2d, bnn.BatchNorm2d)) for k in kinds["identity"])  # fmt: skip
    for name in ("bnlab", "bnlab-fused", "identity"):
        torch.testing.assert_close(models[name].conv1.weight, models["torch"].conv1.weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")  # fmt: skip
def test_bench_device_cuda_without_a_gpu_is_one_clear_error():

    result = CliRunner().invoke(app, ["bench", "--device", "cuda"])
    assert result.exit_code == 2
    assert "device: expected a CUDA device for --device cuda, torch sees none" in result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")  # fmt: skip
def test_triton_entry_with_a_cpu_tensor_says_it_needs_cuda():
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from bnlab.kernels.cuda.autograd import batch_norm\n"
        "try:\n    batch_norm(torch.randn(4, 3), None, None, training=True)\n"
        "except ValueError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert "input: expected a CUDA tensor for bnlab's Triton kernels, got one on cpu" in out.stdout, out.stderr  # fmt: skip


def test_rows_faster_than_their_floor_are_flagged():
    from bnlab.bench.report import disturbed

    row = {"shape": "small", "layout": "contiguous", "mode": "eval-fwd", "floor_ms": 1.0}
    rows = [{**row, "bnlab_ms": 2.0, "torch_ms": 3.0}, {**row, "mode": "train-fwd", "bnlab_ms": 0.5, "torch_ms": 3.0}]  # fmt: skip
    assert disturbed({"rows": rows}) == ["small contiguous train-fwd"]
