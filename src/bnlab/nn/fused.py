"""BatchNorm followed by an activation, with an optional residual input, in one module.

``BatchNormAct2d(C, act="relu")(x, residual)`` computes ``act(drop(bn(x)) + residual)``,
the pattern closing every ResNet block (``relu(bn2(conv2(h)) + identity)``). The module has
torch's BatchNorm parameters, buffers and ``state_dict`` keys (the activation and the
optional ``drop`` module are children without state, as in timm's ``BatchNormAct2d``), so
checkpoints of torch BN, timm's BN+act and bnlab's load into each other.

With ``act="relu"`` (or an ``nn.ReLU``) and no ``drop``, the add and the ReLU run inside
bnlab's BN operator: one pass over the output, and a backward that
masks ``dy`` with ``out > 0`` (``∂L/∂residual = dy · [out > 0]``). Any other activation
module runs after the kernel, as a separate op.
"""

from __future__ import annotations

from torch import Tensor, nn

from bnlab.nn.batchnorm import _BatchNorm

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "activation_module"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "gelu": nn.GELU,
}


def activation_module(act: str | nn.Module | None) -> nn.Module:
    """An activation module from a name in :data:`ACTIVATIONS`, a module, or None (identity)."""
    if act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    if isinstance(act, str) and act.lower() in ACTIVATIONS:
        return ACTIVATIONS[act.lower()]()
    raise ValueError(f"act: expected one of {sorted(ACTIVATIONS)}, an nn.Module or None, got {act!r}")  # fmt: skip


class _BatchNormAct(_BatchNorm):
    """BN, then ``drop``, then ``+ residual``, then ``act``; torch BN's checkpoint keys.

    Shape: ``input`` and ``residual`` (N, C, *), the same shape; output like ``input``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        act: str | nn.Module | None = "relu",
        drop: nn.Module | None = None,
        bias: bool = True,
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, nonfinite=nonfinite)  # fmt: skip
        self.drop = drop if drop is not None else nn.Identity()
        self.act = activation_module(act)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if type(self.drop) is nn.Identity:  # the add (and a ReLU) in the kernel
            relu = type(self.act) is nn.ReLU
            out = self._normalize(input, residual, "relu" if relu else None)
            return out if relu else self.act(out)
        self._check_input(input, residual)
        out = self.drop(self._normalize(input))
        if residual is not None:
            out = out + residual
        return self.act(out)


class BatchNormAct1d(_BatchNormAct):
    """BN + activation over (N, C) or (N, C, L) input."""

    _expected_dims = (2, 3)


class BatchNormAct2d(_BatchNormAct):
    """BN + activation over (N, C, H, W) input."""

    _expected_dims = (4,)


class BatchNormAct3d(_BatchNormAct):
    """BN + activation over (N, C, D, H, W) input."""

    _expected_dims = (5,)
