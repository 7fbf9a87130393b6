"""Which BatchNorm class is which: the class for (dims, implementation), whether a module is a
BatchNorm, how many spatial dims it normalizes over, and whether its ``forward`` is plain BN.

``dims`` is the ``N`` of ``BatchNormNd``: 1 for (N, C) or (N, C, L) input, 2 for (N, C, H, W),
3 for (N, C, D, H, W). ``None`` means "any rank": ``SyncBatchNorm`` (torch's and bnlab's)
accepts 2-D to 5-D input and a module does not remember what it saw. Its dims are then those
of the class it was converted from when :func:`bnlab.nn.convert_sync_batchnorm` recorded it,
else unknown (``None``); a caller that needs a fixed class asks :func:`input_ranks` with an
example input, or is told the dims.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _NormBase
from bnlab.nn.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from bnlab.nn.variants import (
    BatchRenorm1d,
    BatchRenorm2d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
)

IMPLEMENTATIONS = ("bnlab", "torch")
_TORCH_BASE = nn.modules.batchnorm._BatchNorm
_CLASSES = {
    "bnlab": {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d},
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
}
# Plain BN classes whose dims are fixed, found along a module's MRO (subclasses inherit them).
_PLAIN_DIMS: dict[type, int] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.LazyBatchNorm1d: 1,
    nn.LazyBatchNorm2d: 2,
    nn.LazyBatchNorm3d: 3,
    BatchNorm1d: 1,
    BatchNorm2d: 2,
    BatchNorm3d: 3,
    GhostBatchNorm1d: 1,
    GhostBatchNorm2d: 2,
    BatchRenorm1d: 1,
    BatchRenorm2d: 2,
}
_DIMS = {**_PLAIN_DIMS, BatchNormAct1d: 1, BatchNormAct2d: 2, BatchNormAct3d: 3}
_RANKS_TO_DIMS = {(2, 3): 1, (4,): 2, (5,): 3}


def _sync_classes() -> tuple[type, ...]:
    from bnlab.nn.sync import SyncBatchNorm  # sync.py uses this module: imported late

    return (SyncBatchNorm, nn.SyncBatchNorm)  # in the order of IMPLEMENTATIONS


def batchnorm_class(dims: int | None, implementation: str = "bnlab") -> type[nn.Module]:
    """The BatchNorm class of ``implementation`` ('bnlab' or 'torch') for ``dims`` 1, 2 or 3;
    ``dims=None`` gives that implementation's SyncBatchNorm (any input rank)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")  # fmt: skip
    if dims is None:
        return _sync_classes()[IMPLEMENTATIONS.index(implementation)]
    if dims not in (1, 2, 3):
        raise ValueError(f"dims: expected 1, 2, 3 or None, got {dims!r}")
    return _CLASSES[implementation][dims]


def is_batchnorm(module: nn.Module) -> bool:
    """True for torch's and bnlab's BatchNorm layers of every kind (1d/2d/3d, Sync, Ghost,
    Renorm, fused BN + activation) and their subclasses, e.g. timm's ``BatchNormAct2d``."""
    return isinstance(module, (_TORCH_BASE, _NormBase))


def dims_for_rank(rank: int) -> int:
    """The ``dims`` of the BatchNorm class that takes input of this rank (2 and 3 -> 1)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 2 <= rank <= 5:
        raise ValueError(f"rank: expected an input rank from 2 to 5, got {rank!r}")
    return 1 if rank <= 3 else rank - 2


def batchnorm_dims(module: nn.Module | type) -> int | None:
    """1, 2 or 3 for a BatchNorm module or class; ``None`` when it takes any rank.

    Known classes and their subclasses by the MRO; a SyncBatchNorm by the class
    ``convert_sync_batchnorm`` recorded in ``_reverts_to``; any other class by its declared
    input ranks (``_expected_dims``: (2, 3) -> 1, (4,) -> 2, (5,) -> 3, else ``None``).
    """
    cls = module if isinstance(module, type) else type(module)
    origin = getattr(module, "_reverts_to", None)
    if origin is not None and issubclass(cls, _sync_classes()):
        return batchnorm_dims(origin)
    for base in cls.__mro__:
        if base in _DIMS:
            return _DIMS[base]
    ranks = getattr(cls, "_expected_dims", None)
    return _RANKS_TO_DIMS.get(tuple(ranks)) if ranks is not None else None


def input_ranks(model: nn.Module, *example) -> dict[str, int]:
    """The input rank each BatchNorm of ``model`` sees on ``example`` (one eval-mode forward
    pass under ``no_grad``; the model's modes are restored). Names as in ``named_modules``."""
    ranks: dict[str, int] = {}
    bns = {name: m for name, m in model.named_modules() if is_batchnorm(m)}

    def hook(name):
        def record(_module, inputs):
            rank = inputs[0].dim()
            if ranks.setdefault(name, rank) != rank:
                raise ValueError(f"{name or 'model'}: called with inputs of rank {ranks[name]} and {rank}")  # fmt: skip

        return record

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in bns.items()]
    try:
        model.eval()
        with torch.no_grad():
            model(*example)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return ranks


def _plain_forwards() -> set:
    """The ``forward`` functions known to compute BatchNorm and nothing more (in eval mode)."""
    classes = (
        *_PLAIN_DIMS,
        *_sync_classes(),
    )  # BatchNormNd, Ghost, Renorm, Sync: torch's and bnlab's
    return {cls.forward for cls in classes}


def is_plain_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` is a BatchNorm whose ``forward`` is one of torch's or bnlab's own
    (plain BN); False for subclasses that override ``forward`` to do more (an activation, a
    drop, a residual add, ...), whose output is not the BN's affine map alone."""
    return is_batchnorm(module) and type(module).forward in _plain_forwards()


__all__ = [
    "IMPLEMENTATIONS",
    "batchnorm_class",
    "batchnorm_dims",
    "dims_for_rank",
    "input_ranks",
    "is_batchnorm",
    "is_plain_batchnorm",
]
