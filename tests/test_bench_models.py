"""The real-model section of `bnlab bench` in tiny configurations (no timing assertions)."""

import json

import torch
from typer.testing import CliRunner

from bnlab.bench.models import run_models
from bnlab.bench.report import models_markdown, models_table
from bnlab.cli import app


def test_run_models_smoke():
    result = run_models(["resnet18"], {"b2-32": (2, 32)}, rounds=2, warmup=1, width=4, resamples=20)  # fmt: skip
    assert [(r["mode"], r["batch"], r["side"]) for r in result["rows"]] == [("train", 2, 32), ("eval", 2, 32)]  # fmt: skip
    for row in result["rows"]:
        assert all(row["finite"].values()) and row["torch_ms"] > 0 and row["bnlab_ms"] > 0
        low, high = row["speedup_ci"]
        assert low <= high and row["speedup"] == row["torch_ms"] / row["bnlab_ms"]
        assert [len(t) for t in row["times_ms"].values()] == [2, 2, 2, 2]
    assert result["threads"] == torch.get_num_threads() and result["allocator"] in ("default", "tuned")  # fmt: skip
    assert models_markdown(result).count("\n") == 5 and models_table(result).row_count == 2


def test_cli_bench_models_only(tmp_path):
    argv = ["bench", "--no-kernels", "--no-epoch", "--no-tuned", "--networks", "resnet18", "--sizes", "b2-32", "--model-rounds", "2", "--model-warmup", "0", "--model-width", "4", "--out", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert len(saved["models"]["rows"]) == 2 and "not a reportable figure" in result.output
    bad = CliRunner().invoke(app, ["bench", "--no-kernels", "--no-epoch", "--no-tuned", "--sizes", "8x64", "--out", str(tmp_path)])  # fmt: skip
    assert bad.exit_code != 0 and "b<batch>-<side>" in bad.output
