"""Inference tooling: fold BatchNorm into the preceding conv/linear, freeze it, recalibrate
its population statistics (precise BN), export the result to ONNX.

At inference BN is the per-channel affine map ``y = scale * x + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``,
so after ``z = W x + b`` it folds into ``W' = scale * W`` and ``b' = scale * b + shift``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.functional import batch_norm
from bnlab.nn.classes import (
    batchnorm_class,
    batchnorm_dims,
    input_ranks,
    is_batchnorm,
    is_plain_batchnorm,
)

FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: folded (bn -> into) pairs and BNs left, with reasons."""

    method: str = ""
    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm layer(s) ({self.method})"]
        lines += [f"  {bn} -> {into}" for bn, into in self.folded]
        lines += [f"  kept {bn}: {reason}" for bn, reason in self.kept]
        return "\n".join(lines)


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


def _call_counts(model: nn.Module) -> dict[int, int]:
    """How many places in the module tree hold each module (shared modules count > 1)."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    return counts


def _pairs_from_fx(model: nn.Module, report: FoldReport) -> list[tuple[str, str]]:
    """(layer, bn) module names that fx shows as directly connected with no other consumer."""
    import torch.fx

    class Tracer(torch.fx.Tracer):  # bnlab's BN layers are leaves, like torch's
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return is_batchnorm(module) or super().is_leaf_module(module, qualified_name)

    graph = Tracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm(modules[node.target]):
            continue
        bn_name, source = node.target, node.args[0] if node.args else None
        if calls[bn_name] > 1:
            report.kept.append((bn_name, f"shared: called {calls[bn_name]} times"))
        elif not isinstance(source, torch.fx.Node) or source.op != "call_module":
            what = getattr(source, "target", source)
            report.kept.append((bn_name, f"its input is {getattr(what, '__name__', what)}, not a module"))  # fmt: skip
        elif len(source.users) > 1:
            report.kept.append((bn_name, f"{source.target}'s output feeds {len(source.users)} consumers"))  # fmt: skip
        elif calls[source.target] > 1:
            report.kept.append((bn_name, f"{source.target} is called {calls[source.target]} times"))  # fmt: skip
        else:
            pairs.append((source.target, bn_name))
    return pairs


def _pairs_from_sequentials(model: nn.Module, report: FoldReport) -> list[tuple[str, str]]:
    """(layer, bn) names of consecutive children of ``nn.Sequential`` containers."""
    pairs, seen = [], set()
    for name, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for index, (child_name, child) in enumerate(children):
            if not is_batchnorm(child):
                continue
            full = f"{name}.{child_name}" if name else child_name
            seen.add(full)
            if index == 0:
                report.kept.append((full, "first in its nn.Sequential: its input is unknown"))
                continue
            prev_name, _ = children[index - 1]
            pairs.append((f"{name}.{prev_name}" if name else prev_name, full))
    for name, module in model.named_modules():
        if is_batchnorm(module) and name not in seen:
            report.kept.append((name, "not traceable by torch.fx and not inside an nn.Sequential"))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable BatchNorm folded into the
    Conv1d/2d/3d or Linear before it (groups, dilation, stride and bias or not all work).

    Connections come from ``torch.fx`` when the model traces, else from consecutive children
    of ``nn.Sequential`` containers. BNs that cannot be folded stay; the returned model's
    ``fold_report`` (a :class:`FoldReport`) says which and why. ``model`` is not changed.
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
    try:
        pairs = _pairs_from_fx(folded, report)
        report.method = "torch.fx"
    except Exception as error:  # fx cannot trace data-dependent control flow and the like
        report.kept.clear()
        pairs = _pairs_from_sequentials(folded, report)
        report.method = f"nn.Sequential walk (fx: {type(error).__name__})"
    counts = _call_counts(folded)
    for layer_name, bn_name in pairs:
        layer, bn = folded.get_submodule(layer_name), folded.get_submodule(bn_name)
        reason = _unfoldable_reason(layer, bn)
        if reason is None and (counts[id(layer)] > 1 or counts[id(bn)] > 1):
            reason = "the layer or the BN is shared by several places in the model"
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
        _set_submodule(folded, bn_name, nn.Identity())
        report.folded.append((bn_name, layer_name))
    folded.fold_report = report
    return folded


class _FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers: no updates, no
    parameter gradients. ``state_dict`` keys match BatchNorm's."""

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
    def from_batchnorm(cls, bn: nn.Module) -> _FrozenBatchNorm:
        if bn.running_mean is None:
            raise ValueError(f"{type(bn).__name__}: track_running_stats=False has no statistics to freeze")  # fmt: skip
        frozen = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(frozen, name).copy_(getattr(bn, name))
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen.to(bn.running_mean.device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in self._expected_dims:
            raise ValueError(f"input: expected {' or '.join(f'{d}D' for d in self._expected_dims)} input, got {input.dim()}D")  # fmt: skip
        return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)  # fmt: skip

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    _expected_dims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    _expected_dims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    _expected_dims = (5,)


class FrozenBatchNorm(_FrozenBatchNorm):
    """Frozen form of a BN that takes any rank (a SyncBatchNorm): (N, C, *) of rank 2 to 5."""

    _expected_dims = (2, 3, 4, 5)


_FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d, None: FrozenBatchNorm}


def _frozen_class(bn: nn.Module) -> type[_FrozenBatchNorm]:
    """The frozen class with ``bn``'s dims (see :func:`bnlab.nn.batchnorm_dims`)."""
    return _FROZEN[batchnorm_dims(bn)]


def freeze_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every BatchNorm by a frozen one (``state_dict`` compatible), in place or on a copy."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    names = [name for name, m in target.named_modules() if is_batchnorm(m)]
    if not names:
        raise ValueError("model: expected at least one BatchNorm layer to freeze, found none")
    if is_batchnorm(target):
        return _frozen_class(target).from_batchnorm(target)
    for name in names:
        bn = target.get_submodule(name)
        _set_submodule(target, name, _frozen_class(bn).from_batchnorm(bn))
    return target


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Precise BN: recompute every BatchNorm's population statistics from training batches.

    With the estimator of Ioffe & Szegedy (Alg. 2): ``E[x]`` = mean of the batch means and
    ``Var[x] = m/(m-1) ×`` mean of the (biased) batch variances, ``m`` values per channel per
    batch. BNs see the batches in training mode (everything else in eval mode, so dropout is
    off); weights are untouched; every module's mode and momentum is restored afterwards.
    ``batches`` yields input tensors or tuples whose first element is the input.
    """
    from tqdm.auto import tqdm

    bns = [m for m in model.modules() if is_batchnorm(m) and m.running_mean is not None]
    if not bns:
        raise ValueError("model: expected BatchNorm layers with running statistics, found none")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches: expected a positive integer or None, got {num_batches}")
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in bns}
    saved = {bn: (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns}  # fmt: skip
    seen = 0
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches seen
            bn.train()
        bar = tqdm(batches, total=num_batches, desc="recalibrate BN", disable=not progress, leave=False)  # fmt: skip
        with torch.no_grad():
            for batch in bar:
                if num_batches is not None and seen >= num_batches:
                    break
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                seen += 1
        if seen == 0:
            raise ValueError("batches: expected at least one batch, the iterator was empty")
    except BaseException:  # nothing half-done: the old statistics come back
        with torch.no_grad():
            for bn, (mean, var, count) in saved.items():
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        raise
    finally:
        for module, training in modes.items():
            module.training = training
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    return model


def to_torch_batchnorm(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """A copy in which bnlab's BatchNorm and frozen BN layers are torch's BatchNormNd of the
    same dims (same state), so that exporters and TorchScript, which know torch's layers, can
    handle the model. Layers that take any rank (SyncBatchNorm) get the dims of the input they
    see on ``example``; without it they are a ``ValueError``."""
    target = copy.deepcopy(model)
    replace = [
        (name, m) for name, m in target.named_modules()
        if isinstance(m, _FrozenBatchNorm) or (is_plain_batchnorm(m) and not isinstance(m, nn.modules.batchnorm._BatchNorm))
    ]  # fmt: skip
    ranks = None
    for name, module in replace:
        dims = batchnorm_dims(module)
        if dims is None:
            if example is None:
                raise ValueError(
                    f"example: {name or 'model'} ({type(module).__name__}) takes any input rank; "
                    "expected an example input to tell its dims, got None"
                )
            ranks = input_ranks(model, example) if ranks is None else ranks
            dims = bnn.dims_for_rank(ranks[name])
        affine = getattr(module, "affine", True)
        tracked = module.running_mean is not None
        momentum = getattr(module, "momentum", 0.1)
        replacement = batchnorm_class(dims, "torch")(module.num_features, module.eps, momentum, affine, tracked)  # fmt: skip
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        if name:
            _set_submodule(target, name, replacement)
        else:
            target = replacement
    return target


def export_onnx(model: nn.Module, example: torch.Tensor, path, fold: bool = True):
    """Fold (optionally), then export ``model`` to ONNX at ``path`` (written atomically);
    the batch dimension is dynamic. Needs the ``onnx`` package (``pip install bnlab[onnx]``)."""
    import io
    from pathlib import Path

    from bnlab.files import atomic_write_bytes

    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example: expected an input Tensor, got {type(example).__name__}")
    has_bn = any(is_batchnorm(m) for m in model.modules())
    prepared = fold_batchnorm(model) if fold and has_bn else copy.deepcopy(model).eval()
    prepared = to_torch_batchnorm(prepared, example).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
        torch.onnx.export(
            prepared, (example,), buffer, dynamo=False, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )  # fmt: skip
    return atomic_write_bytes(Path(path), buffer.getvalue())


def run_onnx(path, example: torch.Tensor) -> torch.Tensor:
    """Run an exported model in onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: example.detach().numpy()})[0])


def time_inference(model: nn.Module, example: torch.Tensor, repeats: int = 30) -> float:
    """Median milliseconds of one eval-mode forward pass (no grad), after warm-up."""
    import statistics
    import time

    model = model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            started = time.perf_counter()
            model(example)
            if i >= 3:
                times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)
