"""Fold BatchNorm into the Conv1d/2d/3d or Linear layer before it.

At inference BN is the per-channel affine map ``y = scale * x + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``,
so after ``z = W x + b`` it folds into ``W' = scale * W`` and ``b' = scale * b + shift``.
A BN subclass that applies more after BN (an activation, a drop: timm's ``BatchNormAct2d``,
bnlab's ``BatchNormAct2d``) folds its BN part and is replaced by what follows
(:mod:`bnlab.inference.tail`); any other subclass is left, with the reason.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from bnlab.inference.pairs import FoldReport, find_pairs
from bnlab.inference.tail import describe, split_batchnorm
from bnlab.inference.tree import call_counts, set_submodule
from bnlab.nn.classes import is_batchnorm

FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_parameters(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The folded ``(weight, bias)`` of ``layer`` followed by eval-mode ``bn``, in float64 math."""
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias.double() * scale + shift
    return weight.to(layer.weight.dtype), bias.to(layer.weight.dtype)


def _unfoldable_reason(layer: nn.Module, bn: nn.Module) -> str | None:
    if not isinstance(layer, FOLDABLE_INTO):
        return f"follows {type(layer).__name__}, not a convolution or linear layer"
    if bn.running_mean is None or bn.running_var is None:
        return "track_running_stats=False: it normalizes with batch statistics even in eval"
    out_features = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out_features != bn.num_features:
        return f"{type(layer).__name__} has {out_features} outputs, BN {bn.num_features} features"
    return None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable BatchNorm folded into the
    Conv1d/2d/3d or Linear before it (groups, dilation, stride and bias or not all work).

    Connections come from ``torch.fx`` when the model traces, else from consecutive children
    of ``nn.Sequential`` containers. BNs that cannot be folded stay; the returned model's
    ``fold_report`` (a :class:`FoldReport`) says which and why, and why fx was not used.
    ``model`` is not changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not any(is_batchnorm(m) for m in model.modules()):
        raise ValueError("model: expected at least one BatchNorm layer to fold, found none")
    if model.training:
        warnings.warn(
            "fold_batchnorm: model is in training mode; the folded copy is in eval mode and "
            "uses the running statistics",
            UserWarning,
            stacklevel=2,
        )
    folded = copy.deepcopy(model).eval()
    report = FoldReport()
    pairs = find_pairs(folded, report)
    counts = call_counts(folded)
    for layer_name, bn_name in pairs:
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        reason = _unfoldable_reason(layer, bn)
        if reason is None and (counts[id(layer)] > 1 or counts[id(bn)] > 1):
            reason = "the layer or the BN is shared by several places in the model"
        after = None
        if reason is None:
            after, reason = split_batchnorm(bn)
        if reason is not None:
            report.kept.append((bn_name, reason))
            continue
        weight, bias = fold_parameters(layer, bn)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if layer.bias is None:
                layer.bias = nn.Parameter(bias)
            else:
                layer.bias.copy_(bias)
        set_submodule(folded, bn_name, nn.Identity() if after is None else after)
        if after is not None:
            report.after[bn_name] = describe(after)
        report.folded.append((bn_name, layer_name))
    folded.fold_report = report
    return folded
