"""SyncBatchNorm across 2 and 3 gloo processes with uneven batches, conversion helpers."""

import pytest
import torch
import torch.multiprocessing as mp

from bnlab import nn as bnn
from distributed_workers import sync_bn_expect_error, sync_bn_foreign_group, sync_bn_worker
from helpers import sync_reference


@pytest.mark.parametrize("sizes", [[5, 3], [5, 3, 0]])
def test_sync_bn_equals_bn_on_the_concatenated_batch(tmp_path, sizes):
    seed = 11
    mp.start_processes(sync_bn_worker, args=(len(sizes), sizes, seed, str(tmp_path)), nprocs=len(sizes), start_method="spawn")  # fmt: skip
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    x, out, bn = sync_reference(sizes, seed)
    tol = 1e-9  # float64; measured errors stay below 1e-11
    assert (torch.cat([r["out"] for r in results]) - out).abs().max() <= tol
    assert (torch.cat([r["grad"] for r in results]) - x.grad).abs().max() <= tol
    assert (sum(r["weight_grad"] for r in results) - bn.weight.grad).abs().max() <= tol
    assert (sum(r["bias_grad"] for r in results) - bn.bias.grad).abs().max() <= tol
    for r in results:
        assert (r["running_mean"] - bn.running_mean).abs().max() <= tol
        assert (r["running_var"] - bn.running_var).abs().max() <= tol
        assert r["count"].item() == 1
    assert results[-1]["out"].shape[0] == sizes[-1]


def test_refused_batches_fail_on_every_rank_and_are_not_counted(tmp_path):
    mp.start_processes(sync_bn_expect_error, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")  # fmt: skip
    for rank in range(2):
        one_value, nan, count = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert (
            "ValueError: input: Expected more than 1 value per channel when training, got 1 in "
            "the global batch" in one_value
        )
        assert nan.startswith("FloatingPointError: batch_norm: non-finite batch statistics in channel(s) [0]")  # fmt: skip
        assert count == "counted 0"


def test_single_process_falls_back_to_batchnorm():
    x = torch.randn(8, 4, 3)
    sync, plain = bnn.SyncBatchNorm(4), bnn.BatchNorm1d(4)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    sync.eval()
    torch.testing.assert_close(sync(x), plain.eval()(x))


def test_convert_and_revert_keep_state_and_classes():
    ghost = bnn.GhostBatchNorm2d(4, 2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), bnn.BatchNorm1d(5, nonfinite="raise"), ghost)  # fmt: skip
    model[1](torch.randn(6, 4, 2, 2) * 3)
    trained = {k: v.clone() for k, v in model[1].state_dict().items()}
    converted = bnn.convert_sync_batchnorm(model)
    assert isinstance(converted[1], bnn.SyncBatchNorm) and isinstance(
        converted[2], bnn.SyncBatchNorm
    )
    assert converted[2].nonfinite == "raise"
    assert type(converted[3]) is bnn.GhostBatchNorm2d, "a subclass keeps its own behaviour"
    reverted = bnn.revert_sync_batchnorm(converted)
    assert type(reverted[1]) is torch.nn.BatchNorm2d and type(reverted[2]) is bnn.BatchNorm1d
    state = reverted[1].state_dict()
    assert list(state) == list(trained) and state["num_batches_tracked"].item() == 1
    for key, value in trained.items():
        assert torch.equal(state[key], value), key


def test_convert_takes_torchs_sync_batchnorm_and_reverts_to_it():
    """torch.nn.SyncBatchNorm (e.g. from torch's own convert_sync_batchnorm) becomes bnlab's,
    keeping its state and process group, and reverts to torch's class."""
    group = object()  # (a stand-in: only carried over, not used in one process)
    theirs = torch.nn.SyncBatchNorm(4, momentum=0.2, process_group=group)
    with torch.no_grad():
        theirs.running_mean.uniform_(), theirs.weight.uniform_()
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    ours = bnn.convert_sync_batchnorm(torch.nn.Sequential(theirs))[0]
    assert type(ours) is bnn.SyncBatchNorm and ours.process_group is group
    assert ours.momentum == 0.2
    for key, value in state.items():
        assert torch.equal(ours.state_dict()[key], value), key
    back = bnn.revert_sync_batchnorm(torch.nn.Sequential(ours))[0]
    assert type(back) is torch.nn.SyncBatchNorm and back.process_group is group


def test_a_rank_outside_the_process_group_gets_a_clear_error(tmp_path):
    mp.start_processes(sync_bn_foreign_group, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")  # fmt: skip
    message = (tmp_path / "rank1.txt").read_text()
    assert "process_group: this rank (1) is not a member of the process group" in message
