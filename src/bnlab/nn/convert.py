"""Swap torch's BatchNorm layers for bnlab's in any model, and back.

``convert(model)`` replaces, anywhere in ``model``:

- ``torch.nn.BatchNorm1d/2d/3d`` (exactly these classes) by bnlab's ``BatchNorm1d/2d/3d``,
- ``torch.nn.SyncBatchNorm`` by bnlab's :class:`~bnlab.nn.SyncBatchNorm`,
- a BN+activation subclass in timm's pattern (a subclass of torch's ``BatchNorm1d/2d/3d``
  whose ``forward`` is ``act(drop(bn(x)))``, with children ``act`` and ``drop``, like timm's
  ``BatchNormAct2d``) by bnlab's ``BatchNormAct1d/2d/3d`` with the same ``act`` and ``drop``.

Parameters and buffers are moved, not copied: the new module holds the very same tensors,
so device, dtype, ``requires_grad``, optimizer references and ``state_dict`` keys stay as they
were, and so does the train/eval mode. Any other subclass of torch's BN has its own
behaviour and is left as it is (a ``UserWarning`` names it).

``revert(model)`` is the way back to torch's tools (``torch.fx`` fusion, torch's
``convert_sync_batchnorm``, code that checks ``isinstance(m, nn.BatchNorm2d)``): bnlab's
BatchNorm1d/2d/3d become torch's, SyncBatchNorm torch's SyncBatchNorm, and a BN+activation
module converted from a user's class becomes that class's instance again. bnlab's modules are
deliberately not subclasses of torch's: fx fusion checks the exact type, and torch's
``convert_sync_batchnorm`` would turn a BN+activation subclass into a plain SyncBatchNorm.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from bnlab.compat import TORCH_BN_HAS_BIAS
from bnlab.nn.batchnorm import _BatchNorm
from bnlab.nn.classes import batchnorm_class, batchnorm_dims
from bnlab.nn.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from bnlab.nn.sync import SyncBatchNorm

__all__ = ["convert", "convert_sync_batchnorm", "revert", "revert_sync_batchnorm"]

_BNLAB_ACT = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
_ORIGINAL = "_bnlab_original"  # a converted BN+act module's original instance (not a child)


def _exactly(module: nn.Module | type, implementation: str) -> bool:
    """Whether ``module`` is exactly BatchNorm1d/2d/3d of ``implementation`` (no subclass)."""
    cls = module if isinstance(module, type) else type(module)
    dims = batchnorm_dims(cls)
    return dims is not None and cls is batchnorm_class(dims, implementation)


def _is_bn_act(module: nn.Module) -> bool:
    """A subclass of torch's BatchNorm1d/2d/3d in timm's BN+act pattern (``act``, ``drop``)."""
    dims = batchnorm_dims(module)
    return (
        dims is not None
        and isinstance(module, batchnorm_class(dims, "torch"))
        and not _exactly(module, "torch")
        and isinstance(getattr(module, "act", None), nn.Module)
        and isinstance(getattr(module, "drop", None), nn.Module)
    )


def _factory(module: nn.Module) -> dict:
    tensors = [t for t in (module.weight, module.running_mean) if t is not None]
    if not tensors:
        return {}
    return {"device": tensors[0].device, "dtype": tensors[0].dtype}


def _move_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` the very tensors and the mode of ``source`` (same BN hyper-parameters)."""
    for name in ("weight", "bias"):
        if getattr(target, name, None) is not None:
            setattr(target, name, getattr(source, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(target, name, None) is not None:
            setattr(target, name, getattr(source, name))
    return target.train(source.training)


def _hyper(module: nn.Module) -> tuple:
    return (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)  # fmt: skip


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None or not module.affine


def _to_bnlab(module: nn.Module, nonfinite: str) -> nn.Module | None:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    kwargs = {**_factory(module), "bias": _has_bias(module), "nonfinite": nonfinite}
    if _exactly(module, "torch"):
        cls = batchnorm_class(batchnorm_dims(module), "bnlab")
        return _move_state(module, cls(*_hyper(module), **kwargs))
    if type(module) is nn.SyncBatchNorm:
        sync = SyncBatchNorm(*_hyper(module), module.process_group, **kwargs)
        sync._reverts_to = nn.SyncBatchNorm
        return _move_state(module, sync)
    if _is_bn_act(module):
        cls = _BNLAB_ACT[batchnorm_dims(module)]
        fused = cls(*_hyper(module), act=module.act, drop=module.drop, **kwargs)
        fused.__dict__[_ORIGINAL] = module
        return _move_state(module, fused)
    return None


def convert(model: nn.Module, *, nonfinite: str = "skip", example=None) -> nn.Module:
    """Replace torch's BN layers in ``model`` by bnlab's (in place); return the model.

    ``nonfinite`` is the policy of the new modules (see :func:`bnlab.functional.batch_norm`).
    The root itself is replaced too, so use the returned module. With ``example`` (an input
    tensor or a tuple of inputs), BN → ReLU and BN → add → ReLU are then fused into
    BatchNormAct modules by :func:`bnlab.nn.fusion.fuse_activations` (``torch.fx``), and the
    result is a ``GraphModule`` with the same ``state_dict`` keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    left: list[str] = []
    converted = _convert(model, nonfinite, "", left)
    if left:
        warnings.warn(
            "convert: left as they are (subclasses of torch's BatchNorm with their own forward, "
            f"not in the BN+act pattern): {', '.join(left)}",
            UserWarning,
            stacklevel=2,
        )
    if example is None:
        return converted
    from bnlab.nn.fusion import fuse_activations

    return fuse_activations(converted, *(example if isinstance(example, (tuple, list)) else (example,)))  # fmt: skip


def _convert(module: nn.Module, nonfinite: str, name: str, left: list[str]) -> nn.Module:
    replacement = _to_bnlab(module, nonfinite)
    if replacement is not None:
        return replacement
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        left.append(f"{name or '<root>'} ({type(module).__name__})")
        return module
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        module.add_module(child_name, _convert(child, nonfinite, full, left))
    return module


def _torch_kwargs(module: nn.Module) -> dict:
    # Older torch BN constructors have no ``bias=``: pass it only when it is not the default.
    return {**_factory(module), **({} if _has_bias(module) else {"bias": False})}


def _to_torch(module: nn.Module) -> nn.Module | None:
    constructed = _exactly(module, "bnlab") or type(module) is SyncBatchNorm
    if constructed and not (TORCH_BN_HAS_BIAS or _has_bias(module)):
        return None  # this torch's BN has no ``bias=False``: no counterpart, left with a warning
    if _exactly(module, "bnlab"):
        cls = batchnorm_class(batchnorm_dims(module), "torch")
        return _move_state(module, cls(*_hyper(module), **_torch_kwargs(module)))
    if type(module) is SyncBatchNorm:
        cls = getattr(module, "_reverts_to", nn.SyncBatchNorm)
        if _exactly(cls, "bnlab"):
            cls = batchnorm_class(batchnorm_dims(cls), "torch")
        args = (*_hyper(module), module.process_group) if cls is nn.SyncBatchNorm else _hyper(module)  # fmt: skip
        return _move_state(module, cls(*args, **_torch_kwargs(module)))
    if type(module) in _BNLAB_ACT.values() and _ORIGINAL in module.__dict__:
        original = module.__dict__[_ORIGINAL]
        original.act, original.drop = module.act, module.drop
        original.eps, original.momentum = module.eps, module.momentum
        return _move_state(module, original)
    return None


def revert(model: nn.Module) -> nn.Module:
    """Replace bnlab's BN layers in ``model`` by torch's (in place); return the model.

    A model fused by ``convert(model, example=...)`` gets its BN, add and ReLU back as
    separate graph nodes first. bnlab modules without a torch counterpart (Ghost BN, Batch
    Renorm, a BN+act module made directly rather than converted) are left as they are, with a
    ``UserWarning``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.fx.GraphModule):  # from convert(model, example=...): unfuse first
        from bnlab.nn.fusion import unfuse_activations

        unfuse_activations(model)
    left: list[str] = []
    reverted = _revert(model, "", left)
    if left:
        warnings.warn(
            f"revert: no torch counterpart, left as bnlab modules: {', '.join(left)}",
            UserWarning,
            stacklevel=2,
        )
    return reverted


def _revert(module: nn.Module, name: str, left: list[str]) -> nn.Module:
    replacement = _to_torch(module)
    if replacement is not None:
        return replacement
    if isinstance(module, _BatchNorm):
        left.append(f"{name or '<root>'} ({type(module).__name__})")
        return module
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}" if name else child_name
        module.add_module(child_name, _revert(child, full, left))
    return module


# Exactly these classes become SyncBatchNorm: a subclass with its own forward (Ghost BN, Batch
# Renorm, BN+act, a user's) would lose its behaviour as a SyncBatchNorm, so it is left as it is.
def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (bnlab's or torch's) and torch's SyncBatchNorm by
    bnlab's :class:`SyncBatchNorm`, keeping parameters, buffers, mode (and a torch
    SyncBatchNorm's process group unless ``process_group`` is given);
    :func:`revert_sync_batchnorm` restores the original classes. Subclasses with their own
    behaviour (Ghost BN, Batch Renorm, ...) are left."""
    torch_sync = type(module) is nn.SyncBatchNorm
    if _exactly(module, "torch") or _exactly(module, "bnlab") or torch_sync:
        nonfinite = getattr(module, "nonfinite", "skip")
        group = module.process_group if torch_sync and process_group is None else process_group
        sync = SyncBatchNorm(*_hyper(module), group, **_factory(module), bias=_has_bias(module), nonfinite=nonfinite)  # fmt: skip
        sync._reverts_to = type(module)
        return _move_state(module, sync)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module


def revert_sync_batchnorm(module: nn.Module, dims: int | None = None) -> nn.Module:
    """Turn every bnlab :class:`SyncBatchNorm` back into the class it was converted from; one
    made directly (no record) becomes bnlab's BatchNorm of ``dims`` (1, 2 or 3). A
    SyncBatchNorm takes any input rank and does not remember the rank it saw, so without a
    record and without ``dims`` that is a ``ValueError`` (see :func:`bnlab.nn.input_ranks`)."""
    if isinstance(module, SyncBatchNorm):
        cls = getattr(module, "_reverts_to", None)
        if cls is None:
            if dims is None:
                raise ValueError(
                    "dims: this SyncBatchNorm was not made by convert_sync_batchnorm, so the "
                    "rank of its input is unknown; expected dims=1, 2 or 3, got None"
                )
            cls = batchnorm_class(dims)
        if issubclass(cls, _BatchNorm):
            kwargs = {"bias": _has_bias(module), "nonfinite": module.nonfinite}
        else:
            kwargs = _torch_kwargs(module)
        kwargs.update(_factory(module))
        args = (*_hyper(module), module.process_group) if cls is nn.SyncBatchNorm else _hyper(module)  # fmt: skip
        return _move_state(module, cls(*args, **kwargs))
    for name, child in module.named_children():
        module.add_module(name, revert_sync_batchnorm(child, dims))
    return module
