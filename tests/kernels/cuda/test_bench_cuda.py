"""``bnlab.bench.cuda`` end to end on tiny shapes (a dry run of the GPU table's code path)."""

import torch

from bnlab.bench import cuda as bench


def test_cuda_bench_table_runs(device, monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", device)
    shapes = {"tiny": ((6, 5), torch.float32, "contiguous")}
    result = bench.run_benchmarks(repeats=2, warmup=1, shapes=shapes, fused={"add-relu": ("tiny",)}, modes=("train-fwd+bwd",))  # fmt: skip
    assert [(r["case"], r["mode"]) for r in result["rows"]] == [("tiny", "train-fwd+bwd"), ("tiny", "add-relu")]  # fmt: skip
    for row in result["rows"]:
        assert row["bnlab_ms"] > 0 and row["torch_ms"] > 0 and row["floor_ms"] > 0
    assert "Triton" in bench.format_table(result) and "batch_norm" in result["entry"]
