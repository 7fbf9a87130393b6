"""fuse_activations / convert(example=...): BN → (add →) ReLU become BatchNormAct modules."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import nn as bnn
from models.checks import batch, check_training_steps, close, randomize_batchnorm
from models.zoo import MODELS


def _fused(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is bnn.BatchNormAct2d]


def test_resnet_blocks_fuse_and_train_like_torch():
    torch.manual_seed(0)
    reference = randomize_batchnorm(MODELS["resnet_basic"]())
    x, target = batch()
    fused = bnn.convert(copy.deepcopy(reference), example=x)
    # stem bn1+relu; per block bn1+relu and bn2+add+relu; the downsample BN stays plain
    assert sorted(_fused(fused)) == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2"]  # fmt: skip
    assert type(fused.get_submodule("layer2.0.downsample.1")) is bnn.BatchNorm2d
    assert list(fused.state_dict()) == list(reference.state_dict())
    assert torch.equal(fused.get_submodule("layer1.0.bn2").weight, reference.layer1[0].bn2.weight)
    check_training_steps(reference, fused, x, target)
    reference.eval(), fused.eval()
    with torch.no_grad():
        close(fused(x), reference(x), "fused eval output")


class Patterns(nn.Module):
    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(bnn.BatchNorm2d(3) for _ in range(6))
        self.scale = nn.Parameter(torch.ones(3, 1, 1))

    def forward(self, x):
        a = F.relu(self.bns[0](x))  # fused
        b = torch.add(x, self.bns[1](x)).relu_()  # fused, residual first
        c = self.bns[2](x)
        c = torch.relu(c) + c  # two uses: not fused
        d = torch.relu(self.bns[3](x) + self.scale)  # broadcast add: not fused
        e = torch.sigmoid(self.bns[4](x) + x)  # not a ReLU: not fused
        f = self.bns[5](x).relu()  # fused
        return a + b + c + d + e + f


def test_which_patterns_fuse():
    torch.manual_seed(0)
    model = Patterns()
    x = torch.randn(4, 3, 5, 5)
    fused = bnn.fuse_activations(model, x)
    assert sorted(_fused(fused)) == ["bns.0", "bns.1", "bns.5"]
    assert all(type(m) is bnn.BatchNorm2d for m in model.bns), "the model itself is unchanged"
    for training in (True, False):
        model.train(training), fused.train(training)
        close(fused(x), model(x), f"fused output (training={training})")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = bnn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(x) if x.sum() > 0 else x


def test_errors_name_the_argument():
    with pytest.raises(
        ValueError, match=r"model: torch.fx cannot trace Untraceable .*convert alone"
    ):
        bnn.fuse_activations(Untraceable(), torch.randn(2, 3, 2, 2))
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module, got int"):
        bnn.fuse_activations(3)


def test_an_example_the_model_cannot_take_is_refused_naming_it(capfd):
    model = bnn.convert(MODELS["resnet_basic"]()).train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"example: the model fails on the example input\(s\) of shape \(2, 5, 16, 16\)"):  # fmt: skip
        bnn.convert(model, example=torch.randn(2, 5, 16, 16))
    assert "Traceback" not in capfd.readouterr().err  # one error, not torch's ShapeProp dump
    assert model.training
    for key, value in before.items():  # the model itself untouched
        assert torch.equal(model.state_dict()[key], value)


def test_revert_unfuses_a_fused_model_for_torch_tools():
    """revert(convert(model, example=x)): torch's BN, the add and the ReLU back in the graph;
    same output, same checkpoint keys; jit.script and torch's SyncBatchNorm conversion work."""
    torch.manual_seed(0)
    reference = randomize_batchnorm(MODELS["resnet_basic"]()).eval()
    x, _ = batch()
    fused = bnn.convert(copy.deepcopy(reference), example=x)
    assert _fused(fused)
    reverted = bnn.revert(fused)
    kinds = {type(m).__module__.split(".")[0] for m in reverted.modules() if "BatchNorm" in type(m).__name__}  # fmt: skip
    assert kinds == {"torch"}, kinds
    assert list(reverted.state_dict()) == list(reference.state_dict())
    with torch.no_grad():
        close(reverted(x), reference(x), "reverted output")
        close(torch.jit.script(reverted)(x), reference(x), "scripted reverted output")
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(reverted)
    assert all(type(m) is torch.nn.SyncBatchNorm for m in synced.modules() if "BatchNorm" in type(m).__name__)  # fmt: skip
