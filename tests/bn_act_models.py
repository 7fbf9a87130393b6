"""BN subclasses written the way timm writes them (timm is not installed here)."""

import torch
import torch.nn.functional as F
from torch import nn

from bnlab import nn as bnn


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d, abridged: torch's BN forward pasted in, then
    ``drop`` and ``act`` inside ``forward``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 apply_act=True, act_layer=nn.ReLU, inplace=True, drop_layer=None, device=None, dtype=None):  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)  # fmt: skip
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act else nn.Identity()

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps,
        )  # fmt: skip
        x = self.drop(x)
        x = self.act(x)
        return x


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """Does more than BN + its children: doubles the output (must not be folded)."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.SiLU()
        self.drop = nn.Identity()

    def forward(self, x):
        return 2 * self.act(super().forward(x))


class ConvBnAct(nn.Module):
    """conv -> BN+act -> conv -> BN+act (drop inside) -> pool -> head, EfficientNet-style."""

    def __init__(self, bn_act=BatchNormAct2d, drop=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = bn_act(8, act_layer=nn.SiLU)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = bn_act(8, act_layer=nn.Hardswish, drop_layer=(lambda: nn.Dropout(drop)) if drop else None)  # fmt: skip
        self.conv3 = nn.Conv2d(8, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x)))))).mean((2, 3))


class FusedResidual(nn.Module):
    """A ResNet basic block on bnlab's fused BatchNormAct2d with its residual input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = bnn.BatchNormAct2d(4, act="relu")
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = bnn.BatchNormAct2d(4, act="relu")

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)


def trained(model: nn.Module, example: torch.Tensor, steps: int = 4) -> nn.Module:
    """Non-trivial running statistics and affine parameters, deterministically."""
    generator = torch.Generator().manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(example * 3 + 1)
        for module in model.modules():
            if getattr(module, "running_var", None) is not None and module.weight is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) * 1.5 + 0.5)  # fmt: skip
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 2 - 1)
    return model.eval()
