"""Data-parallel training (DDP + SyncBatchNorm over gloo) against the single-process run.

Nothing here depends on timing or a free port: ``launch`` meets through a file, torchrun
runs ``--standalone`` (its store binds port 0 itself), and every timeout is generous, since
a failing rank stops the others through the launcher at once (see distributed_workers.py).
"""

import json
import subprocess
import sys

import pytest
from torch.multiprocessing import ProcessRaisedException
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.lab.distributed import DistributedConfig, launch, train_steps

TIMEOUT = 600.0  # seconds; bounds a real hang only (a loaded 2-core machine took 160 s)


def test_two_ranks_match_one_process_in_float64(tmp_path):
    config = DistributedConfig(steps=20, global_batch=32, dtype="float64", timeout=TIMEOUT, out=str(tmp_path / "loss.json"))  # fmt: skip
    single = train_steps(config)
    launch(config, nproc=2)
    saved = json.loads((tmp_path / "loss.json").read_text())
    assert saved["world_size"] == 2
    assert max(abs(a - b) for a, b in zip(saved["loss"], single, strict=True)) < 1e-8
    assert single[-1] < single[0], "it learns"


def test_a_failing_rank_stops_every_rank_with_its_error():
    config = DistributedConfig(steps=50, global_batch=32, fail_rank=1, fail_step=2, timeout=TIMEOUT)
    with pytest.raises(ProcessRaisedException, match="rank 1 failed on purpose at step 2"):
        launch(config, nproc=2)


def test_bad_split_is_named():
    with pytest.raises(
        ValueError, match="global_batch: expected a multiple of the 3 ranks, got 32"
    ):
        train_steps(DistributedConfig(steps=1, global_batch=32), rank=0, world=3)


def test_cli_train_float32_and_torchrun(tmp_path):
    runner = CliRunner()
    single = runner.invoke(app, ["train", "--steps", "15", "--global-batch", "32", "--out", str(tmp_path / "one.json")])  # fmt: skip
    assert single.exit_code == 0, single.output
    double = runner.invoke(app, ["train", "--nproc", "2", "--steps", "15", "--global-batch", "32", "--out", str(tmp_path / "two.json")])  # fmt: skip
    assert double.exit_code == 0 and "2 rank(s)" in double.output, double.output
    one, two = (json.loads((tmp_path / f).read_text())["loss"] for f in ("one.json", "two.json"))
    # float32: kernels vs SyncBatchNorm's torch path and a different summation order
    assert max(abs(a - b) / abs(b) for a, b in zip(one, two, strict=True)) < 1e-4
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bnlab.lab.distributed",
                "--steps", "15", "--global-batch", "32", "--timeout", str(TIMEOUT), "--out", str(tmp_path / "torchrun.json")]  # fmt: skip
    subprocess.run(torchrun, check=True, capture_output=True, timeout=TIMEOUT)
    three = json.loads((tmp_path / "torchrun.json").read_text())["loss"]
    assert max(abs(a - b) for a, b in zip(two, three, strict=True)) < 1e-6
    bad = runner.invoke(app, ["train", "--nproc", "0"])
    assert bad.exit_code == 2 and "'--nproc': expected a positive integer, got 0" in bad.output
