"""Test models for the inference tools: traceable, residual, untraceable, and tricky ones."""

import torch
from torch import nn

from bnlab import nn as bnn


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, bn=bnn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, bias=False)
        self.bn1 = bn(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)  # depthwise, bias
        self.bn2 = bn(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """Stem (strided conv + torch BN), two residual blocks, a BN after an activation, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.blocks = nn.Sequential(ResidualBlock(8), ResidualBlock(8, nn.BatchNorm2d))
        self.after_relu = bnn.BatchNorm2d(8)  # follows a ReLU: cannot be folded
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.after_relu(torch.relu(self.blocks(self.stem(x))))
        return self.head(x.mean((2, 3)))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 16), bnn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3),
    )  # fmt: skip


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), bnn.BatchNorm1d(6), nn.ReLU())
        self.more = nn.Sequential(nn.Conv3d(6, 4, 1), nn.BatchNorm3d(4))

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:
            y = y * 2
        return self.more(y[..., None, None]).flatten(1)


class Tricky(nn.Module):
    """A shared BN, a conv feeding two consumers, and a BN on the raw input."""

    def __init__(self) -> None:
        super().__init__()
        self.input_bn = bnn.BatchNorm2d(3)
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.conv_b = nn.Conv2d(3, 4, 1)
        self.shared = bnn.BatchNorm2d(4)
        self.conv_c = nn.Conv2d(4, 4, 1)
        self.bn_c = bnn.BatchNorm2d(4)

    def forward(self, x):
        x = self.input_bn(x)
        a, b = self.shared(self.conv_a(x)), self.shared(self.conv_b(x))
        c = self.conv_c(a + b)
        return self.bn_c(c) + c  # conv_c's output feeds two consumers


def trained(model: nn.Module, example: torch.Tensor, steps: int = 5) -> nn.Module:
    """Give the BNs non-trivial statistics and affine parameters."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(example * 3 + 1)
        for module in model.modules():
            if hasattr(module, "running_var") and getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 2.0)
                module.bias.uniform_(-1.0, 1.0)
    return model.eval()
