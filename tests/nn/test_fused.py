"""BatchNormAct1d/2d/3d: act(drop(bn(x)) + residual), checked against torch's BN + ops."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import nn as bnn

SHAPES = {bnn.BatchNormAct1d: (6, 4, 5), bnn.BatchNormAct2d: (4, 4, 3, 5), bnn.BatchNormAct3d: (3, 4, 2, 3, 2)}  # fmt: skip
TORCH = {bnn.BatchNormAct1d: nn.BatchNorm1d, bnn.BatchNormAct2d: nn.BatchNorm2d, bnn.BatchNormAct3d: nn.BatchNorm3d}  # fmt: skip


def _pair(cls, act):
    torch.manual_seed(0)
    ours, theirs = cls(4, act=act), TORCH[cls](4)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5), theirs.bias.normal_()
        theirs.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("cls", SHAPES)
@pytest.mark.parametrize("act", ["relu", "identity", nn.SiLU()])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_bn_then_add_then_activation(cls, act, residual, training):
    ours, theirs = _pair(cls, act)
    ours.train(training), theirs.train(training)
    activation = {"relu": torch.relu, "identity": lambda t: t}.get(act, F.silu)
    x = torch.randn(SHAPES[cls], dtype=torch.float64).float()
    r = torch.randn(SHAPES[cls]) if residual else None
    inputs = [t.clone().requires_grad_(True) for t in ([x, r] if residual else [x])]
    twins = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = ours(*inputs)
    expected = theirs(twins[0])
    expected = activation(expected + twins[1] if residual else expected)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(out)
    out.backward(dy), expected.backward(dy)
    for mine, reference in zip(inputs, twins, strict=True):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked == theirs.num_batches_tracked


def test_in_place_activation_and_drop_module_run_after_bn():
    torch.manual_seed(0)
    ours = bnn.BatchNormAct2d(3, act=nn.Hardswish(inplace=True), drop=nn.Dropout(p=0.5))
    theirs = nn.BatchNorm2d(3)
    x, r = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    torch.manual_seed(1)
    out = ours(x, r)
    torch.manual_seed(1)
    expected = F.hardswish(F.dropout(theirs(x), 0.5) + r)
    torch.testing.assert_close(out, expected)


def test_checkpoint_keys_are_torch_batchnorms():
    ours, theirs = bnn.BatchNormAct2d(5, act="relu"), nn.BatchNorm2d(5)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())  # and back, strictly
    assert "act" in repr(ours) and "ReLU" in repr(ours)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"act: expected one of .*got 'swish'"):
        bnn.BatchNormAct2d(4, act="swish")
    module = bnn.BatchNormAct2d(4)
    with pytest.raises(ValueError, match=r"residual: expected input's shape \(2, 4, 3, 3\).*got \(2, 4, 3, 1\)"):  # fmt: skip
        module(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 1))
    with pytest.raises(ValueError, match="input: expected 4D input"):
        module(torch.randn(2, 4, 3))
