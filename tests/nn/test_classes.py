"""bnlab.nn.classes: the BN class for (dims, implementation), is_batchnorm, each module's dims."""

import pytest
import torch
from torch import nn

from bnlab import nn as bnn


class BatchNormAct2d(nn.BatchNorm2d):
    """A BN subclass with its own forward, the way timm writes BatchNormAct2d."""

    def forward(self, x):
        return torch.relu(super().forward(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batchnorm_class_for_dims_and_implementation(dims):
    assert bnn.batchnorm_class(dims) is getattr(bnn, f"BatchNorm{dims}d")
    assert bnn.batchnorm_class(dims, "torch") is getattr(nn, f"BatchNorm{dims}d")
    assert bnn.batchnorm_dims(bnn.batchnorm_class(dims)(3)) == dims


def test_batchnorm_class_none_is_sync_and_bad_arguments_are_named():
    assert bnn.batchnorm_class(None) is bnn.SyncBatchNorm
    assert bnn.batchnorm_class(None, "torch") is nn.SyncBatchNorm
    with pytest.raises(ValueError, match="implementation: expected one of"):
        bnn.batchnorm_class(2, "tf")
    with pytest.raises(ValueError, match="dims: expected 1, 2, 3 or None, got 4"):
        bnn.batchnorm_class(4)


@pytest.mark.parametrize(
    ("module", "dims"),
    [
        (nn.BatchNorm1d(3), 1),
        (nn.BatchNorm3d(3), 3),
        (nn.LazyBatchNorm2d(), 2),
        (BatchNormAct2d(3), 2),
        (bnn.GhostBatchNorm1d(3, 2), 1),
        (bnn.GhostBatchNorm2d(3, 2), 2),
        (bnn.BatchRenorm1d(3), 1),
        (bnn.BatchRenorm2d(3), 2),
        (bnn.SyncBatchNorm(3), None),
        (nn.SyncBatchNorm(3), None),
    ],
)
def test_every_module_knows_its_dims(module, dims):
    assert bnn.is_batchnorm(module)
    assert bnn.batchnorm_dims(module) == dims
    assert bnn.batchnorm_dims(type(module)) == dims


def test_sync_dims_come_from_the_class_it_was_converted_from():
    model = nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4), nn.BatchNorm3d(4))
    converted = bnn.convert_sync_batchnorm(model)
    assert [bnn.batchnorm_dims(m) for m in converted[1:]] == [1, 3]


def test_is_batchnorm_and_is_plain_batchnorm():
    assert not bnn.is_batchnorm(nn.GroupNorm(1, 3)) and not bnn.is_batchnorm(nn.Conv2d(3, 3, 1))
    plain = [nn.BatchNorm2d(3), nn.SyncBatchNorm(3), bnn.BatchNorm2d(3), bnn.SyncBatchNorm(3),
             bnn.GhostBatchNorm2d(3, 2), bnn.BatchRenorm2d(3)]  # fmt: skip
    assert all(bnn.is_plain_batchnorm(m) for m in plain)
    assert bnn.is_batchnorm(BatchNormAct2d(3)) and not bnn.is_plain_batchnorm(BatchNormAct2d(3))
    fused = bnn.BatchNormAct2d(3, act="relu")
    assert bnn.is_batchnorm(fused) and not bnn.is_plain_batchnorm(fused)
    assert bnn.batchnorm_dims(fused) == 2 and bnn.batchnorm_dims(bnn.BatchNormAct1d) == 1
    assert not bnn.is_plain_batchnorm(nn.ReLU())


def test_dims_for_rank_and_input_ranks():
    assert [bnn.dims_for_rank(r) for r in (2, 3, 4, 5)] == [1, 1, 2, 3]
    with pytest.raises(ValueError, match="rank: expected an input rank from 2 to 5, got 6"):
        bnn.dims_for_rank(6)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 1), bnn.SyncBatchNorm(3), nn.Flatten(), nn.BatchNorm1d(12)
    )
    model.train()
    ranks = bnn.input_ranks(model, torch.randn(4, 2, 2, 2))
    assert ranks == {"1": 4, "3": 2}
    assert model.training and model[1].training, "modes are restored"
    assert int(model[1].num_batches_tracked) == 0, "nothing is updated"


def test_revert_sync_batchnorm_picks_the_class_by_dims():
    model = nn.Sequential(nn.Linear(3, 4), bnn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match="dims: this SyncBatchNorm was not made by convert_sync"):
        bnn.revert_sync_batchnorm(model)
    reverted = bnn.revert_sync_batchnorm(model, dims=1)
    assert type(reverted[1]) is bnn.BatchNorm1d
    reverted[1].train()(torch.randn(5, 4))  # 2-D input, which BatchNorm2d would reject
