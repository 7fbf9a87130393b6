"""convert/revert: torch's BN layers to bnlab's and back, keeping tensors, mode and classes."""

import copy
import warnings

import pytest
import torch
import torch.fx.experimental.optimization
from torch import nn

from bnlab import nn as bnn
from bnlab.compat import TORCH_BN_HAS_BIAS


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: torch BN subclass with ``drop`` and ``act`` inside."""

    def __init__(self, num_features, act_layer=nn.ReLU):
        super().__init__(num_features)
        self.drop, self.act = nn.Identity(), act_layer()  # in place: tests/models

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, momentum=None, eps=1e-3),
        BNAct(4, nn.SiLU),
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(4, affine=False)),
        nn.BatchNorm1d(4, track_running_stats=False),
    )


def test_convert_swaps_classes_and_keeps_the_very_tensors():
    torch_model = model().double().eval()
    torch_model[1].weight.requires_grad_(False)
    tensors = {k: v for k, v in torch_model.state_dict(keep_vars=True).items()}
    act = torch_model[2].act
    converted = bnn.convert(torch_model, nonfinite="raise")
    assert [type(converted[i]) for i in (1, 2, 4)] == [bnn.BatchNorm2d, bnn.BatchNormAct2d, bnn.BatchNorm1d]  # fmt: skip
    assert type(converted[3][1]) is bnn.BatchNorm1d
    assert converted[2].act is act and converted[1].nonfinite == "raise"
    assert converted[1].momentum is None and converted[1].eps == 1e-3
    for key, value in converted.state_dict(keep_vars=True).items():
        assert value is tensors[key], key
    assert not converted[1].weight.requires_grad and converted[2].weight.requires_grad
    assert not converted[1].training and converted[1].weight.dtype == torch.float64


def test_converted_model_computes_what_torch_computed():
    torch.manual_seed(0)
    reference = model()
    converted = bnn.convert(copy.deepcopy(reference))
    x = torch.randn(5, 3, 2, 3)
    for training in (True, False):
        reference.train(training), converted.train(training)
        torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.state_dict(), reference.state_dict())


def test_the_root_converts_and_other_subclasses_stay_with_a_warning():
    assert type(bnn.convert(nn.BatchNorm3d(2))) is bnn.BatchNorm3d
    with pytest.warns(UserWarning, match=r"left as they are.*own \(OwnForward\)"):
        converted = bnn.convert(nn.Sequential(nn.BatchNorm2d(2), nn.ModuleDict({"own": OwnForward(2)})))  # fmt: skip
    assert type(converted[1]["own"]) is OwnForward


def test_revert_restores_torch_classes_and_the_users_subclass():
    torch.manual_seed(0)
    reference = model()
    original_bn_act = reference[2]
    converted = bnn.convert(copy.deepcopy(reference))
    converted.train()(torch.randn(5, 3, 2, 3))  # new running statistics, then back to torch
    state = copy.deepcopy(converted.state_dict())
    reverted = bnn.revert(converted)
    assert [type(reverted[i]) for i in (1, 2, 4)] == [nn.BatchNorm2d, BNAct, nn.BatchNorm1d]
    assert type(reverted[3][1]) is nn.BatchNorm1d and reverted[3][1].affine is False
    assert reverted[4].track_running_stats is False and reverted[1].momentum is None
    assert type(reverted[2].act) is nn.SiLU and reverted[2] is not original_bn_act
    torch.testing.assert_close(reverted.state_dict(), state)


def test_revert_passes_bias_only_when_it_is_not_the_default(monkeypatch):
    init = nn.BatchNorm2d.__init__

    def old_torch_init(self, *args, **kwargs):  # torch versions without ``bias=``
        if "bias" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'bias'")
        init(self, *args, **kwargs)

    monkeypatch.setattr(nn.BatchNorm2d, "__init__", old_torch_init)
    assert type(bnn.revert(bnn.BatchNorm2d(3))) is nn.BatchNorm2d
    assert type(bnn.revert(bnn.SyncBatchNorm(3))) is nn.SyncBatchNorm
    monkeypatch.undo()
    if not TORCH_BN_HAS_BIAS:  # this torch's BN cannot drop the bias: bnlab's stays, warned
        with pytest.warns(UserWarning, match=r"no torch counterpart.*<root> \(BatchNorm2d\)"):
            assert type(bnn.revert(bnn.BatchNorm2d(3, bias=False))) is bnn.BatchNorm2d
        return
    no_bias = bnn.revert(bnn.BatchNorm2d(3, bias=False))
    assert no_bias.bias is None and no_bias.weight is not None


def test_revert_leaves_bnlab_only_modules_with_a_warning():
    with pytest.warns(UserWarning, match=r"no torch counterpart.*0 \(GhostBatchNorm2d\), 1 \(BatchNormAct2d\)"):  # fmt: skip
        reverted = bnn.revert(nn.Sequential(bnn.GhostBatchNorm2d(4, 2), bnn.BatchNormAct2d(4)))
    assert type(reverted[0]) is bnn.GhostBatchNorm2d


def test_sync_batchnorm_converts_and_reverts_with_its_process_group():
    group = object()
    converted = bnn.convert(nn.SyncBatchNorm(3, process_group=group))
    assert type(converted) is bnn.SyncBatchNorm and converted.process_group is group
    reverted = bnn.revert(converted)
    assert type(reverted) is nn.SyncBatchNorm and reverted.process_group is group


def test_revert_then_torch_tools_work():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        reference[1].running_var.uniform_(0.5, 2), reference[1].running_mean.normal_()
    reverted = bnn.revert(bnn.convert(copy.deepcopy(reference)))
    fused = torch.fx.experimental.optimization.fuse(reverted)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules()), "fx fuse folded it"
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-5, atol=1e-5)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(bnn.revert(bnn.convert(copy.deepcopy(reference))))  # fmt: skip
    assert type(synced[1]) is nn.SyncBatchNorm
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(bnn.convert(synced)[1]) is bnn.SyncBatchNorm


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module, got int"):
        bnn.convert(3)
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module, got str"):
        bnn.revert("x")
    with pytest.raises(ValueError, match="nonfinite"):
        bnn.convert(nn.BatchNorm2d(2), nonfinite="ignore")
