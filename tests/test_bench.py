"""`bnlab bench` in a tiny smoke configuration (no timing assertions), and allocator tuning."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from bnlab import allocator
from bnlab.bench import MODES, cases, run_benchmarks
from bnlab.benchreport import markdown, render
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
    monkeypatch.setattr("bnlab.bench.SHAPES", {"small": (4, 3, 5, 5)})
    result = CliRunner().invoke(app, ["bench", "--quick", "--no-tuned", "--no-epoch", "--repeats", "2", "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bench.json").exists() and "speed-up" in result.output


def test_tuned_allocator_environment():
    env = allocator.tuned_environ({"A": "1"})
    assert env["A"] == "1" and int(env["MALLOC_MMAP_THRESHOLD_"]) == 4 << 30
    code = "import os; print(os.environ['MALLOC_TRIM_THRESHOLD_'])"
    out = subprocess.run([sys.executable, "-m", "bnlab", "tuned", "--", sys.executable, "-c", code], capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == str(4 << 30)
