"""Small models written the way torchvision and timm write them, with torch's BatchNorm.

Each block is the library's code pattern at a few channels: in-place ReLU/SiLU on BN outputs,
``out += identity``, squeeze-excitation, concatenation before BN, and timm's BN+act subclass.
bnlab's BN gets in only through :func:`bnlab.nn.convert`, as it would in a user's model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, 1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet layout: stem, one block per stage (the second strided), head."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], width: int = 8, classes: int = 5) -> None:  # fmt: skip
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, 1)
        self.layer2 = self._make_layer(block, 2 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2 * width * block.expansion, classes)

    def _make_layer(self, block, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layer = block(self.inplanes, planes, stride, downsample)
        self.inplanes = planes * block.expansion
        return nn.Sequential(layer)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvNormActivation(nn.Sequential):
    """torchvision.ops.misc.Conv2dNormActivation: conv, BN, optional activation."""

    def __init__(self, inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1, activation: Callable[..., nn.Module] | None = nn.ReLU) -> None:  # fmt: skip
        layers: list[nn.Module] = [
            nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.misc.SqueezeExcitation: scale = σ(fc2(act(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, squeeze: int, activation=nn.ReLU, scale_activation=nn.Sigmoid) -> None:  # fmt: skip
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    """torchvision MobileNetV3 InvertedResidual (Hardswish, SE with Hardsigmoid)."""

    def __init__(self, channels: int, expanded: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            ConvNormActivation(channels, expanded, 1, activation=nn.Hardswish),
            ConvNormActivation(expanded, expanded, 3, groups=expanded, activation=nn.Hardswish),
            SqueezeExcitation(expanded, max(expanded // 4, 8), scale_activation=nn.Hardsigmoid),
            ConvNormActivation(expanded, channels, 1, activation=None),
        )

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        result += input
        return result


class MBConv(nn.Module):
    """torchvision EfficientNet MBConv (SiLU in place, SE with SiLU; stochastic depth off)."""

    def __init__(self, channels: int, expanded: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            ConvNormActivation(channels, expanded, 1, activation=nn.SiLU),
            ConvNormActivation(expanded, expanded, 3, groups=expanded, activation=nn.SiLU),
            SqueezeExcitation(expanded, max(channels // 4, 1), activation=nn.SiLU),
            ConvNormActivation(expanded, channels, 1, activation=None),
        )

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        result += input
        return result


class DenseLayer(nn.Module):
    """torchvision.models.densenet._DenseLayer: BN-ReLU-conv1x1-BN-ReLU-conv3x3 on the
    concatenation of all previous features."""

    def __init__(self, inp: int, growth: int, bn_size: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(inp)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inp, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        concated = torch.cat(inputs, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    """torchvision.models.densenet._DenseBlock."""

    def __init__(self, layers: int, inp: int, growth: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(inp + i * growth, growth))

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: torch BN subclass, then drop, then act."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True, track_running_stats: bool = True, apply_act: bool = True, act_layer=nn.ReLU, inplace: bool = True, drop_layer=None) -> None:  # fmt: skip
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class DepthwiseSeparable(nn.Module):
    """timm's efficientnet DepthwiseSeparableConv with BatchNormAct2d layers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = BatchNormAct2d(channels, act_layer=nn.SiLU)
        self.conv_pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = BatchNormAct2d(channels, apply_act=False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return x + shortcut


class Net(nn.Module):
    """Stem (conv, BN, activation), the blocks, global pooling, a linear head."""

    def __init__(self, stem: nn.Module, blocks: nn.Module, features: int, classes: int = 5) -> None:  # fmt: skip
        super().__init__()
        self.stem, self.blocks = stem, blocks
        self.head = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mobilenet_v3_block() -> nn.Module:
    return Net(ConvNormActivation(3, 8, stride=2, activation=nn.Hardswish), InvertedResidual(8, 16), 8)  # fmt: skip


def efficientnet_mbconv() -> nn.Module:
    return Net(ConvNormActivation(3, 8, stride=2, activation=nn.SiLU), MBConv(8, 24), 8)


def densenet_block() -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False))
    blocks = nn.Sequential(DenseBlock(2, 8, 4), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    return Net(stem, blocks, 16)


def timm_bn_act() -> nn.Module:
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), BatchNormAct2d(8, act_layer=nn.SiLU))  # fmt: skip
    return Net(stem, DepthwiseSeparable(8), 8)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet_basic": lambda: ResNet(BasicBlock),
    "resnet_bottleneck": lambda: ResNet(Bottleneck, width=4),
    "mobilenet_v3_block": mobilenet_v3_block,
    "efficientnet_mbconv": efficientnet_mbconv,
    "densenet_block": densenet_block,
    "timm_bn_act": timm_bn_act,
}
