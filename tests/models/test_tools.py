"""bnlab's inference tools and torch's own tools (via ``revert``) on model code written like
torchvision/timm."""

import copy

import pytest
import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

from bnlab import nn as bnn
from models.checks import TORCH_BN, batch, check_fold, close, pair
from models.zoo import MODELS


@pytest.mark.parametrize("name", MODELS)
def test_fold_batchnorm_is_correct_or_refuses_with_a_reason(name):
    reference, ours = pair(MODELS[name])
    check_fold(reference, ours, batch()[0])


@pytest.mark.parametrize("name", MODELS)
def test_revert_restores_the_torch_model_for_torchs_tools(name):
    reference, ours = pair(MODELS[name])
    x, _ = batch()
    with torch.no_grad():
        ours.train()(x)  # new running statistics, then back to torch's classes
    reverted = bnn.revert(ours)
    assert [type(m) for m in reverted.modules()] == [type(m) for m in reference.modules()]
    assert list(reverted.state_dict()) == list(reference.state_dict())
    reverted.eval(), reference.eval()
    reference.load_state_dict(reverted.state_dict())
    with torch.no_grad():
        expected = reference(x)
        close(reverted(x), expected, "reverted eval output")
        fused = fx_optimization.fuse(copy.deepcopy(reverted))  # exact types only
        left = [m for m in fused.modules() if type(m) is nn.BatchNorm2d]
        close(fused(x), expected, "torch.fx fuse of the reverted model")
    plain = sum(type(m) is nn.BatchNorm2d for m in reverted.modules())
    assert plain == 0 or len(left) < plain, "fx fuse folded none of the conv -> BN pairs"
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(reverted))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == sum(isinstance(m, TORCH_BN) for m in reverted.modules())  # fmt: skip
