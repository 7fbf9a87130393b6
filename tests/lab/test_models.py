"""Model builders: the norm switch, bias rule, placement, initializers, bad arguments."""

import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.lab.models import cnn, init_weights, mlp


def test_mlp_with_bn_uses_bnlab_layers_and_no_bias_before_bn():
    model = mlp(10, (8, 8), 3, norm="bn", activation="sigmoid")
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in linears] == [True, True, False]
    assert sum(isinstance(m, bnn.BatchNorm1d) for m in model) == 2
    kinds = [type(m).__name__ for m in model]
    assert kinds[1:4] == ["Linear", "BatchNorm1d", "Sigmoid"]
    assert model(torch.randn(5, 10)).shape == (5, 3)


def test_torch_impl_and_placement_after_activation_with_dropout():
    model = mlp(4, (6,), 2, norm="bn", placement="after", dropout=0.3, impl="torch")
    kinds = [type(m) for m in model]
    assert kinds[1:5] == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout]
    assert model[1].bias is not None, "BN does not follow the Linear directly: keep its bias"


@pytest.mark.parametrize(
    ("shape", "bn_cls"),
    [((1, 8, 8), bnn.BatchNorm2d), ((1, 40), bnn.BatchNorm1d), ((3, 32, 32), bnn.BatchNorm2d)],
)
def test_cnn_shapes(shape, bn_cls):
    model = cnn(shape, 10, channels=(4, 8), hidden=16, norm="bn", dropout=0.1)
    assert any(isinstance(m, bn_cls) for m in model)
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    convs = [m for m in model if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert all(c.bias is None for c in convs)


@pytest.mark.parametrize(
    ("init", "std"),
    [
        ("normal", 0.01),
        ("he_normal", (2 / 400) ** 0.5),
        ("he_uniform", (2 / 400) ** 0.5),
        ("glorot_normal", (2 / 600) ** 0.5),
        ("glorot_uniform", (2 / 600) ** 0.5),
    ],
)
def test_initializers_give_their_standard_deviation(init, std):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(400, 200))
    init_weights(layer, init, scale=0.01 if init == "normal" else 1.0)
    assert layer[0].weight.std().item() == pytest.approx(std, rel=0.03)
    assert torch.count_nonzero(layer[0].bias) == 0


def test_zeros_init():
    model = mlp(4, (3,), 2, init="zeros")
    assert all(torch.count_nonzero(m.weight) == 0 for m in model if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"norm": "wn"},
            r"norm: expected one of \('none', 'bn', 'ghost', 'renorm', 'gn', 'ln'\), got 'wn'",
        ),
        ({"activation": "swish"}, "activation: expected one of"),
        ({"placement": "middle"}, "placement: expected one of"),
        ({"init": "orthogonal"}, "init: expected one of"),
        ({"dropout": 1.0}, r"dropout: expected a probability in \[0, 1\)"),
        ({"impl": "jax", "norm": "bn"}, "impl: expected one of"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlp(4, (3,), 2, **kwargs)


def test_cnn_rejects_flat_input():
    with pytest.raises(
        ValueError, match=r"input_shape: expected \(C, L\) or \(C, H, W\), got \(2,\)"
    ):
        cnn((2,), 3)


@pytest.mark.parametrize(
    ("norm", "kind"),
    [
        ("ghost", bnn.GhostBatchNorm2d),
        ("renorm", bnn.BatchRenorm2d),
        ("gn", nn.GroupNorm),
        ("ln", nn.GroupNorm),
    ],
)
def test_other_norms(norm, kind):
    model = cnn((1, 8, 8), 10, channels=(12,), hidden=6, norm=norm, norm_options={"warmup_steps": 0} if norm == "renorm" else None)  # fmt: skip
    layer = next(m for m in model if isinstance(m, kind))
    if norm == "gn":
        assert layer.num_groups == 4  # gcd(12, 8)
    if norm == "ln":
        assert layer.num_groups == 1
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)


def test_weights_are_drawn_identically_with_or_without_biases():
    torch.manual_seed(3)
    plain = mlp(10, (8, 8, 8), 3, norm="none")
    torch.manual_seed(3)
    with_bn = mlp(10, (8, 8, 8), 3, norm="bn")
    weights = [[m.weight for m in model if isinstance(m, nn.Linear)] for model in (plain, with_bn)]
    assert plain[1].bias is not None and with_bn[1].bias is None
    for a, b in zip(*weights, strict=True):
        assert torch.equal(a, b), "a bias must not shift the weights' random stream"
    torch.manual_seed(3)
    conv_plain = cnn((1, 12), 3, channels=(4, 8), hidden=8, norm="none")
    torch.manual_seed(3)
    conv_bn = cnn((1, 12), 3, channels=(4, 8), hidden=8, norm="bn")
    conv_weights = [[p for p in m.parameters() if p.dim() > 1] for m in (conv_plain, conv_bn)]
    for a, b in zip(*conv_weights, strict=True):
        assert torch.equal(a, b)


def test_default_init_follows_torch_rule():
    torch.manual_seed(0)
    layer = mlp(400, (), 200)[1]
    bound = 1 / 400**0.5
    weight, bias = layer.weight.detach(), layer.bias.detach()
    assert weight.abs().max() <= bound and weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.03)  # fmt: skip
    assert bias.abs().max() <= bound and bias.abs().max() > bound / 2


def test_residual_mlp_and_resnet():
    from bnlab.lab.models import residual_mlp, resnet

    model = residual_mlp(10, 16, 3, 4, norm="bn")
    assert model(torch.randn(5, 10)).shape == (5, 4)
    assert sum(isinstance(m, bnn.BatchNorm1d) for m in model.modules()) == 1 + 2 * 3
    net = resnet((3, 16, 16), 10, widths=(4, 8))
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert any(isinstance(m, bnn.BatchNorm2d) for m in net.modules())
    with pytest.raises(ValueError, match="input_shape"):
        resnet((3, 16), 10)
