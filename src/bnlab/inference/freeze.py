"""Freeze BatchNorm: fixed statistics and affine parameters, all buffers (no updates, no
parameter gradients), ``state_dict`` keys as BatchNorm's. A BN+activation module freezes into
:class:`FrozenBatchNormAct`, which keeps its ``drop`` and ``act``."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from bnlab.functional import batch_norm
from bnlab.inference.tail import split_batchnorm
from bnlab.inference.tree import set_submodule
from bnlab.nn.classes import batchnorm_dims, is_batchnorm

_RANKS = {1: (2, 3), 2: (4,), 3: (5,), None: (2, 3, 4, 5)}


class _FrozenBatchNorm(nn.Module):
    """``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``, all fixed.

    Shape: (N, C, *) of the ranks in ``_expected_dims``; output like input.
    """

    _expected_dims: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **kwargs) -> _FrozenBatchNorm:
        """A frozen copy of ``bn``'s statistics and affine parameters, on its device."""
        if bn.running_mean is None:
            raise ValueError(f"{type(bn).__name__}: track_running_stats=False has no statistics to freeze")  # fmt: skip
        frozen = cls(bn.num_features, bn.eps, **kwargs)
        with torch.no_grad():
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(frozen, name).copy_(getattr(bn, name))
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen.to(bn.running_mean.device)

    def _normalize(self, input: Tensor) -> Tensor:
        if input.dim() not in self._expected_dims:
            raise ValueError(f"input: expected {' or '.join(f'{d}D' for d in self._expected_dims)} input, got {input.dim()}D")  # fmt: skip
        return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)  # fmt: skip

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    _expected_dims = _RANKS[1]


class FrozenBatchNorm2d(_FrozenBatchNorm):
    _expected_dims = _RANKS[2]


class FrozenBatchNorm3d(_FrozenBatchNorm):
    _expected_dims = _RANKS[3]


class FrozenBatchNorm(_FrozenBatchNorm):
    """Frozen form of a BN that takes any rank (a SyncBatchNorm): (N, C, *) of rank 2 to 5."""

    _expected_dims = _RANKS[None]


class FrozenBatchNormAct(_FrozenBatchNorm):
    """A frozen BN+activation module: ``act(drop(frozen_bn(x)) + residual)``; ``drop`` and
    ``act`` are the source's children (timm's and bnlab's ``state_dict`` layout)."""

    def __init__(self, num_features: int, eps: float = 1e-5, *, dims: int | None = 2, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__(num_features, eps)
        self._expected_dims = _RANKS[dims]
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        out = self.drop(self._normalize(input))
        if residual is not None:
            out = out + residual
        return self.act(out)


_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d, None: FrozenBatchNorm}


def _frozen_class(bn: nn.Module) -> type[_FrozenBatchNorm]:
    """The frozen class with ``bn``'s dims (see :func:`bnlab.nn.batchnorm_dims`)."""
    return _FROZEN[batchnorm_dims(bn)]


def frozen(bn: nn.Module) -> tuple[nn.Module | None, str | None]:
    """``(frozen form of bn, None)``, or ``(None, reason)`` for a subclass that cannot be split."""
    if bn.running_mean is None:
        raise ValueError(f"{type(bn).__name__}: track_running_stats=False has no statistics to freeze")  # fmt: skip
    after, reason = split_batchnorm(bn)
    if reason is not None:
        return None, reason
    if after is None:
        return _frozen_class(bn).from_batchnorm(bn), None
    return FrozenBatchNormAct.from_batchnorm(bn, dims=batchnorm_dims(bn), drop=after.drop, act=after.act), None  # fmt: skip


def freeze_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every BatchNorm by a frozen one (``state_dict`` compatible), in place or on a
    copy. A BN subclass whose ``forward`` does more than BN + ``drop`` + ``act`` is left as it
    is, with a ``UserWarning`` that names it and says why."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    names = [name for name, m in target.named_modules() if is_batchnorm(m)]
    if not names:
        raise ValueError("model: expected at least one BatchNorm layer to freeze, found none")
    left = []
    for name in names:
        bn = target.get_submodule(name)
        replacement, reason = frozen(bn)
        if reason is not None:
            left.append(f"{name or '<root>'}: {reason}")
        elif not name:
            return replacement
        else:
            set_submodule(target, name, replacement)
    if left:
        warnings.warn(f"freeze_batchnorm: left unfrozen: {'; '.join(left)}", UserWarning, stacklevel=2)  # fmt: skip
    return target
