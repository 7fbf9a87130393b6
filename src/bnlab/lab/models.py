"""Small MLPs and CNNs with a ``norm=`` switch, for the lab's experiments.

A layer followed directly by BN has no bias (BN's shift replaces it). ``impl='torch'``
builds torch's BatchNorm instead of bnlab's, for comparison.

Fair arms: every builder draws its weights from one generator and its biases from another,
both seeded from torch's global generator before anything else, so the weights of a network
are the same with or without biases (with or without BN) for the same ``torch.manual_seed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.nn import batchnorm_class

NORMS = ("none", "bn", "ghost", "renorm", "gn", "ln")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}
INITS = ("default", "normal", "zeros", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform")
PLACEMENTS = ("before", "after")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def make_norm(
    norm: str, num_features: int, spatial_dims: int, impl: str = "bnlab", **options
) -> nn.Module:
    """A normalization layer for ``spatial_dims`` = 0 (vectors), 1 or 2.

    'bn' BatchNorm (bnlab's, or torch's with ``impl='torch'``), 'ghost' Ghost BN
    (``virtual_batch_size`` option, default 8), 'renorm' Batch Renorm (its schedule options),
    'gn' GroupNorm (``groups`` option, default 8, reduced to divide the channels), 'ln'
    LayerNorm over (C, *) as GroupNorm with one group, 'none' nothing.
    """
    _check_choice("norm", norm, NORMS)
    _check_choice("impl", impl, ("bnlab", "torch"))
    one_d = spatial_dims < 2
    if norm == "none":
        return nn.Identity()
    if norm == "bn":
        return batchnorm_class(1 if one_d else 2, impl)(num_features)
    if norm == "ghost":
        cls = bnn.GhostBatchNorm1d if one_d else bnn.GhostBatchNorm2d
        return cls(num_features, options.get("virtual_batch_size", 8))
    if norm == "renorm":
        return (bnn.BatchRenorm1d if one_d else bnn.BatchRenorm2d)(num_features, **options)
    groups = math.gcd(num_features, options.get("groups", 8)) if norm == "gn" else 1
    return nn.GroupNorm(groups, num_features)


def set_bn_momentum(model: nn.Module, momentum: float | None) -> nn.Module:
    """Set ``momentum`` (torch's convention) on every BatchNorm-like layer of ``model``."""
    from bnlab.nn import is_batchnorm

    for module in model.modules():
        if is_batchnorm(module):
            module.momentum = momentum
    return model


def init_weights(
    model: nn.Module,
    init: str,
    scale: float = 1.0,
    generators: tuple[torch.Generator, torch.Generator] | None = None,
) -> nn.Module:
    """Draw every Linear/Conv weight (and bias) of ``model`` in module order.

    'default' is torch's own rule (weights and biases U(±1/√fan_in)); the others set biases
    to zero; ``normal`` uses std = ``scale``. ``generators`` = (weights, biases); by default
    both are seeded from the global generator, so weights never depend on whether biases exist.
    """
    _check_choice("init", init, INITS)
    if generators is None:
        generators = fair_generators()
    weights_gen, bias_gen = generators
    for module in model.modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        weight = module.weight
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        fan_out *= weight[0, 0].numel()
        with torch.no_grad():
            if init == "default":
                bound = 1.0 / math.sqrt(fan_in)
                weight.uniform_(-bound, bound, generator=weights_gen)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=bias_gen)
                continue
            if init == "normal":
                weight.normal_(0.0, scale, generator=weights_gen)
            elif init == "zeros":
                weight.zero_()
            elif init.startswith("glorot"):
                _fill(weight, init, scale * math.sqrt(2.0 / (fan_in + fan_out)), weights_gen)
            else:
                _fill(weight, init, scale * math.sqrt(2.0 / fan_in), weights_gen)
            if module.bias is not None:
                module.bias.zero_()
    return model


def fair_generators() -> tuple[torch.Generator, torch.Generator]:
    """Two generators (weights, biases) seeded by two draws of torch's global generator."""
    weight_seed, bias_seed = torch.randint(0, 2**62, (2,)).tolist()
    return torch.Generator().manual_seed(weight_seed), torch.Generator().manual_seed(bias_seed)


def _fill(weight: torch.Tensor, init: str, std: float, generator: torch.Generator) -> None:
    if init.endswith("normal"):
        weight.normal_(0.0, std, generator=generator)
    else:  # a uniform distribution with the same standard deviation
        bound = math.sqrt(3.0) * std
        weight.uniform_(-bound, bound, generator=generator)


@dataclass(frozen=True)
class BlockSpec:
    """What follows each conv/linear layer: normalization, activation, their order, dropout."""

    norm: str = "none"
    activation: str = "relu"
    placement: str = "before"
    dropout: float = 0.0
    impl: str = "bnlab"
    norm_options: dict | None = None

    def __post_init__(self) -> None:
        _check_choice("norm", self.norm, NORMS)
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        _check_choice("placement", self.placement, PLACEMENTS)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout}")

    @property
    def layer_bias(self) -> bool:
        """A layer directly followed by a normalization needs no bias of its own."""
        return self.norm == "none" or self.placement == "after"

    def block(self, layer: nn.Module, width: int, spatial_dims: int) -> list[nn.Module]:
        """layer -> [norm] -> act -> [norm] -> [dropout], as ``placement`` says."""
        norm = make_norm(self.norm, width, spatial_dims, self.impl, **(self.norm_options or {}))
        act = ACTIVATIONS[self.activation]()
        modules = [layer, *([norm, act] if self.placement == "before" else [act, norm])]
        if self.dropout > 0:
            modules.append(nn.Dropout(self.dropout))
        return [m for m in modules if not isinstance(m, nn.Identity)]


def mlp(
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    *,
    init: str = "default",
    init_scale: float = 1.0,
    **block,
) -> nn.Sequential:
    """Flatten -> [Linear -> norm/act/dropout] per hidden width -> Linear to logits.

    ``block`` holds :class:`BlockSpec`'s fields: norm, activation, placement, dropout, impl,
    norm_options.
    """
    spec = BlockSpec(**block)
    generators = fair_generators()  # drawn first: the same stream with or without biases
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for out in hidden:
        layers += spec.block(nn.Linear(width, out, bias=spec.layer_bias), out, 0)
        width = out
    layers.append(nn.Linear(width, num_classes))
    return init_weights(nn.Sequential(*layers), init, init_scale, generators)


def cnn(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: Sequence[int] = (16, 32),
    hidden: int = 64,
    init: str = "default",
    init_scale: float = 1.0,
    **block,
) -> nn.Sequential:
    """[conv3 -> norm/act/dropout -> maxpool2] per channel width -> MLP head.

    ``input_shape`` is (C, L) for 1-d signals or (C, H, W) for images; ``block`` as in
    :func:`mlp`.
    """
    spec = BlockSpec(**block)
    generators = fair_generators()
    spatial_dims = len(input_shape) - 1
    if spatial_dims not in (1, 2):
        raise ValueError(f"input_shape: expected (C, L) or (C, H, W), got {tuple(input_shape)}")
    conv_cls, pool_cls = (nn.Conv1d, nn.MaxPool1d) if spatial_dims == 1 else (nn.Conv2d, nn.MaxPool2d)  # fmt: skip
    layers: list[nn.Module] = []
    width, size = input_shape[0], list(input_shape[1:])
    for out in channels:
        conv = conv_cls(width, out, kernel_size=3, padding=1, bias=spec.layer_bias)
        layers += spec.block(conv, out, spatial_dims)
        if min(size) >= 2:
            layers.append(pool_cls(2))
            size = [s // 2 for s in size]
        width = out
    layers.append(nn.Flatten())
    features = width * math.prod(size)
    layers += spec.block(nn.Linear(features, hidden, bias=spec.layer_bias), hidden, 0)
    layers.append(nn.Linear(hidden, num_classes))
    return init_weights(nn.Sequential(*layers), init, init_scale, generators)


class ResidualBlock(nn.Module):
    """relu(x + norm₂(W₂ relu(norm₁(W₁ x)))): the post-activation ResNet block, for vectors
    (``spatial_dims=0``, Linear) or images (2, 3×3 convolutions)."""

    def __init__(self, width: int, norm: str, impl: str, spatial_dims: int = 0) -> None:
        super().__init__()
        bias = norm == "none"
        if spatial_dims == 0:
            self.layer1, self.layer2 = (nn.Linear(width, width, bias=bias) for _ in range(2))
        else:
            self.layer1, self.layer2 = (
                nn.Conv2d(width, width, 3, padding=1, bias=bias) for _ in range(2)
            )
        self.norm1 = make_norm(norm, width, spatial_dims, impl)
        self.norm2 = make_norm(norm, width, spatial_dims, impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm2(self.layer2(torch.relu(self.norm1(self.layer1(x)))))
        return torch.relu(x + branch)


def residual_mlp(
    in_features: int,
    width: int,
    blocks: int,
    num_classes: int,
    *,
    norm: str = "none",
    init: str = "default",
    impl: str = "bnlab",
) -> nn.Sequential:
    """Flatten -> Linear stem (+ norm, ReLU) -> ``blocks`` residual blocks -> Linear to logits."""
    generators = fair_generators()
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(in_features, width, bias=norm == "none")]
    layers += [make_norm(norm, width, 0, impl), nn.ReLU()]
    layers += [ResidualBlock(width, norm, impl) for _ in range(blocks)]
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
    return init_weights(model, init, 1.0, generators)


def resnet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    widths: Sequence[int] = (16, 32, 64),
    norm: str = "bn",
    init: str = "default",
    impl: str = "bnlab",
) -> nn.Sequential:
    """A small ResNet for images (C, H, W): conv stem, one residual block per width with a
    stride-2 conv between widths, global average pooling, a linear head."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape: expected (C, H, W), got {tuple(input_shape)}")
    generators = fair_generators()
    bias = norm == "none"
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=bias)]
    layers += [make_norm(norm, widths[0], 2, impl), nn.ReLU()]
    for index, width in enumerate(widths):
        if index > 0:
            layers += [nn.Conv2d(widths[index - 1], width, 3, stride=2, padding=1, bias=bias)]
            layers += [make_norm(norm, width, 2, impl), nn.ReLU()]
        layers.append(ResidualBlock(width, norm, impl, spatial_dims=2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    model = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
    return init_weights(model, init, 1.0, generators)
