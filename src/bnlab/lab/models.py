"""Small MLPs and CNNs with a ``norm=`` switch, for the lab's experiments.

A layer followed directly by BN has no bias (BN's shift replaces it). ``impl='torch'``
builds torch's BatchNorm instead of bnlab's, for comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from bnlab import nn as bnn

NORMS = ("none", "bn")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}
INITS = ("default", "normal", "zeros", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform")
PLACEMENTS = ("before", "after")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def make_norm(norm: str, num_features: int, spatial_dims: int, impl: str = "bnlab") -> nn.Module:
    """A normalization layer for ``spatial_dims`` = 0 (vectors), 1 or 2."""
    _check_choice("norm", norm, NORMS)
    _check_choice("impl", impl, ("bnlab", "torch"))
    if norm == "none":
        return nn.Identity()
    source = bnn if impl == "bnlab" else nn
    cls = {0: source.BatchNorm1d, 1: source.BatchNorm1d, 2: source.BatchNorm2d}[spatial_dims]
    return cls(num_features)


def init_weights(model: nn.Module, init: str, scale: float = 1.0) -> nn.Module:
    """Initialize every Linear/Conv weight; biases to zero. ``normal`` uses std = ``scale``."""
    _check_choice("init", init, INITS)
    if init == "default":
        return model
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        weight = module.weight
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        fan_out *= weight[0, 0].numel()
        with torch.no_grad():
            if init == "normal":
                weight.normal_(0.0, scale)
            elif init == "zeros":
                weight.zero_()
            elif init.startswith("glorot"):
                std = scale * math.sqrt(2.0 / (fan_in + fan_out))
                _fill(weight, init, std)
            else:
                _fill(weight, init, scale * math.sqrt(2.0 / fan_in))
            if module.bias is not None:
                module.bias.zero_()
    return model


def _fill(weight: torch.Tensor, init: str, std: float) -> None:
    if init.endswith("normal"):
        weight.normal_(0.0, std)
    else:  # a uniform distribution with the same standard deviation
        bound = math.sqrt(3.0) * std
        weight.uniform_(-bound, bound)


def _block(
    layer, width, spatial_dims, norm, activation, placement, dropout, impl
) -> list[nn.Module]:
    """layer -> [BN] -> act -> [BN] -> [dropout], as ``placement`` says."""
    modules = [layer]
    bn = make_norm(norm, width, spatial_dims, impl)
    act = ACTIVATIONS[activation]()
    modules += [bn, act] if placement == "before" else [act, bn]
    if dropout > 0:
        modules.append(nn.Dropout(dropout))
    return [m for m in modules if not isinstance(m, nn.Identity)]


def _check_common(norm, activation, placement, dropout) -> None:
    _check_choice("norm", norm, NORMS)
    _check_choice("activation", activation, tuple(ACTIVATIONS))
    _check_choice("placement", placement, PLACEMENTS)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")


def mlp(
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    *,
    norm: str = "none",
    activation: str = "relu",
    init: str = "default",
    init_scale: float = 1.0,
    placement: str = "before",
    dropout: float = 0.0,
    impl: str = "bnlab",
) -> nn.Sequential:
    """Flatten -> [Linear -> norm/act/dropout] per hidden width -> Linear to logits."""
    _check_common(norm, activation, placement, dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for out in hidden:
        bias = norm == "none" or placement == "after"
        linear = nn.Linear(width, out, bias=bias)
        layers += _block(linear, out, 0, norm, activation, placement, dropout, impl)
        width = out
    layers.append(nn.Linear(width, num_classes))
    return init_weights(nn.Sequential(*layers), init, init_scale)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
    norm: str = "none",
    activation: str = "relu",
    init: str = "default",
    init_scale: float = 1.0,
    placement: str = "before",
    dropout: float = 0.0,
    impl: str = "bnlab",
) -> nn.Sequential:
    """[conv3 -> norm/act/dropout -> maxpool2] per channel width -> MLP head.

    ``input_shape`` is (C, L) for 1-d signals or (C, H, W) for images.
    """
    _check_common(norm, activation, placement, dropout)
    spatial_dims = len(input_shape) - 1
    if spatial_dims not in (1, 2):
        raise ValueError(f"input_shape: expected (C, L) or (C, H, W), got {tuple(input_shape)}")
    conv_cls, pool_cls = (
        (nn.Conv1d, nn.MaxPool1d) if spatial_dims == 1 else (nn.Conv2d, nn.MaxPool2d)
    )
    layers: list[nn.Module] = []
    width, size = input_shape[0], list(input_shape[1:])
    for out in channels:
        bias = norm == "none" or placement == "after"
        conv = conv_cls(width, out, kernel_size=3, padding=1, bias=bias)
        layers += _block(conv, out, spatial_dims, norm, activation, placement, dropout, impl)
        if min(size) >= 2:
            layers.append(pool_cls(2))
            size = [s // 2 for s in size]
        width = out
    layers.append(nn.Flatten())
    features = width * math.prod(size)
    bias = norm == "none" or placement == "after"
    layers += _block(
        nn.Linear(features, hidden, bias=bias),
        hidden,
        0,
        norm,
        activation,
        placement,
        dropout,
        impl,
    )
    layers.append(nn.Linear(hidden, num_classes))
    return init_weights(nn.Sequential(*layers), init, init_scale)
