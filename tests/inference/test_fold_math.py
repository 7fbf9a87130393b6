"""Fold math at realistic statistics: tiny running variances (≈1e-4, comparable to eps), a
float64 oracle (bnlab.reference.fold_to_affine in NumPy) and a tolerance that a fold without
eps (a 5 % error in scale) always fails. Each case seeds its own generator."""

import numpy as np
import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.inference import fold_batchnorm
from bnlab.reference import fold_to_affine


def _bn(cls, channels, generator, dtype):
    bn = cls(channels, eps=1e-5, dtype=dtype).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) * 1.5e-4 + 0.5e-4)  # fmt: skip
        bn.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64) * 1e-2)  # fmt: skip
        bn.weight.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    return bn


def _oracle(layer_output: torch.Tensor, bn) -> torch.Tensor:
    scale, shift = fold_to_affine(*(t.detach().double().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)), eps=bn.eps)  # fmt: skip
    view = (1, -1) + (1,) * (layer_output.dim() - 2)
    y = layer_output.detach().double().numpy() * scale.reshape(view) + shift.reshape(view)
    return torch.from_numpy(np.ascontiguousarray(y))


CASES = [
    (seed, dtype, bn_cls, kind)
    for seed in range(3)
    for dtype in (torch.float64, torch.float32)
    for bn_cls in (nn.BatchNorm2d, bnn.BatchNorm2d)
    for kind in ("conv", "linear")
]


@pytest.mark.parametrize(("seed", "dtype", "bn_cls", "kind"), CASES)
def test_fold_matches_the_float64_oracle_at_tiny_variances(seed, dtype, bn_cls, kind):
    generator = torch.Generator().manual_seed(1000 + seed)
    channels = 6
    if kind == "conv":
        layer = nn.Conv2d(3, channels, 3, padding=1, bias=seed % 2 == 0, dtype=dtype)
        bn = _bn(bn_cls, channels, generator, dtype)
        x = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64).to(dtype)
    else:
        layer = nn.Linear(5, channels, bias=seed % 2 == 0, dtype=dtype)
        bn = _bn(bnn.BatchNorm1d if bn_cls is bnn.BatchNorm2d else nn.BatchNorm1d, channels, generator, dtype)  # fmt: skip
        x = torch.randn(8, 5, generator=generator, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():  # a small layer output, of the order of the running std
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 1e-2)
        model = nn.Sequential(layer, bn).eval()
        want = _oracle(layer(x), bn)
        folded = fold_batchnorm(model)
        got = folded(x).double()
    assert len(folded.fold_report.folded) == 1
    # Without eps the scale is off by sqrt(var / (var + eps)) - 1, at least 3 % here: far
    # above these tolerances (float64: 1e-9; float32: 1e-4 of the output's range).
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error < tolerance, error
