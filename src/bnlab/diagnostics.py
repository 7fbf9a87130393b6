"""Diagnostics for any torch model: per-layer activation and gradient statistics, and a health
check of every BatchNorm layer.

Recording installs hooks only inside ``with record(model) as stats:``; outside it the model
runs exactly as before (no hooks, no cost).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from bnlab.nn.classes import is_batchnorm

PERCENTILES = (1, 15, 50, 85, 99)
UNCONVERGED_WEIGHT = 0.05  # running statistics holding more of their initial 0 / 1 are unconverged


@dataclass
class LayerStats:
    """What :func:`record` saw at one layer: one entry per forward / backward call."""

    activation_mean: list[float] = field(default_factory=list)
    activation_std: list[float] = field(default_factory=list)
    activation_percentiles: list[list[float]] = field(default_factory=list)
    gradient_norm: list[float] = field(default_factory=list)
    gradient_histograms: list[tuple[list[int], list[float]]] = field(default_factory=list)


def _percentiles(values: torch.Tensor, percentiles=PERCENTILES) -> list[float]:
    flat = values.detach().double().flatten()
    if flat.numel() > 100_000:  # a fixed subsample keeps large layers cheap
        flat = flat[torch.linspace(0, flat.numel() - 1, 100_000).long()]
    return torch.quantile(flat, torch.tensor(percentiles, dtype=torch.float64) / 100).tolist()


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers worth watching: BatchNorms, convolutions and linear layers."""
    watched = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {n: m for n, m in model.named_modules() if n and (is_batchnorm(m) or isinstance(m, watched))}  # fmt: skip


@contextlib.contextmanager
def record(
    model: nn.Module, layers: dict[str, nn.Module] | None = None, bins: int = 50
) -> Iterator[dict[str, LayerStats]]:
    """Record the output activations and output gradients of ``layers`` (default:
    :func:`default_layers`) while the block runs; the hooks are removed on exit."""
    layers = default_layers(model) if layers is None else layers
    stats = {name: LayerStats() for name in layers}
    handles = []

    def forward_hook(name):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            entry, values = stats[name], output.detach().float()
            entry.activation_mean.append(values.mean().item())
            entry.activation_std.append(values.std().item() if values.numel() > 1 else 0.0)
            entry.activation_percentiles.append(_percentiles(values))
            if output.requires_grad:
                output.register_hook(gradient_hook(name))

        return hook

    def gradient_hook(name):
        def hook(grad):
            grad = grad.detach().double()
            stats[name].gradient_norm.append(grad.norm().item())
            low, high = grad.min().item(), grad.max().item()
            if math.isfinite(low) and math.isfinite(high):
                counts = torch.histc(grad.float(), bins=bins, min=low, max=high if high > low else low + 1)  # fmt: skip
                edges = torch.linspace(low, high if high > low else low + 1, bins + 1)
                stats[name].gradient_histograms.append((counts.long().tolist(), edges.tolist()))

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_hook(forward_hook(name)))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class BNHealth:
    """One BatchNorm layer's condition on some batches, and, when it is flagged, the cause.

    ``cause`` is ``""`` (ok), ``"unconverged"`` (the running statistics, or those of layers
    before it, still hold much of their initial 0 / 1: few batches tracked at this momentum),
    ``"mismatch"`` (a real train/eval mismatch: the running statistics do not describe these
    batches), or ``"broken"`` (dead, exploding or non-finite channels); ``reason`` says why.
    """

    name: str
    channels: int
    mean_shift: float  # max over channels of |batch mean - running mean| / running std
    var_ratio: float  # max over channels of batch var / running var, or its inverse if larger
    dead_channels: int  # channels whose batch variance is ~0 (constant input)
    exploding_channels: int  # channels whose running or batch variance exceeds 1e6
    nonfinite_running: int  # channels whose running statistics are NaN or Inf
    batches_tracked: int | None = None  # num_batches_tracked
    initial_weight: float = 0.0  # share of the running statistics still the initial 0 / 1
    train_mean_shift: float = 0.0  # as mean_shift, against training-mode batch statistics
    train_var_ratio: float = 1.0  # as var_ratio, against training-mode batch statistics
    cause: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return (self.nonfinite_running == 0 and self.dead_channels == 0 and self.exploding_channels == 0
                and self.mean_shift < 1.0 and self.var_ratio < 4.0)  # fmt: skip


class _Moments:
    """Per-channel count, sum and sum of squares of a BN's input, in float64."""

    def __init__(self) -> None:
        self.count, self.total, self.squares = 0, 0.0, 0.0

    def add(self, input: torch.Tensor) -> None:
        x = input.detach().double().transpose(0, 1).flatten(1)  # (C, values)
        self.count += x.shape[1]
        self.total = self.total + x.sum(1)
        self.squares = self.squares + (x * x).sum(1)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean**2).clamp_min(0)


def _discrepancy(mean, var, running_mean, running_var) -> tuple[float, float]:
    """(max |mean - running_mean| / running std, max variance ratio either way), finite channels."""
    finite = torch.isfinite(running_mean) & torch.isfinite(running_var)
    if not finite.any():
        return math.inf, math.inf
    safe_var = running_var[finite].clamp_min(1e-12)
    shift = (mean[finite] - running_mean[finite]).abs() / safe_var.sqrt()
    ratio = torch.maximum(var[finite] / safe_var, safe_var / var[finite].clamp_min(1e-12))
    return float(shift.max()), float(ratio.max())


def _initial_weight(bn: nn.Module) -> tuple[int | None, float]:
    """``(n, w0)``: batches tracked and the weight the initial 0 / 1 still has in the running
    statistics, ``(1 - momentum)^n`` (0 after one batch with ``momentum=None``, the average)."""
    tracked = getattr(bn, "num_batches_tracked", None)
    if tracked is None:
        return None, 0.0
    n = int(tracked)
    momentum = getattr(bn, "momentum", 0.1)
    if momentum is None:
        return n, 1.0 if n == 0 else 0.0
    return n, (1.0 - float(momentum)) ** n


def _flagged(shift: float, ratio: float) -> bool:
    return not (shift < 1.0 and ratio < 4.0)


def _diagnose(entry: BNHealth, bn: nn.Module, train: tuple, upstream: list[str]) -> None:
    """Set ``cause`` and ``reason`` of a layer (``train``: training-mode mean and variance)."""
    running_mean, running_var = bn.running_mean.double(), bn.running_var.double()
    entry.train_mean_shift, entry.train_var_ratio = _discrepancy(*train, running_mean, running_var)
    n, w0 = entry.batches_tracked, entry.initial_weight
    if entry.nonfinite_running or entry.dead_channels or entry.exploding_channels:
        entry.cause, entry.reason = "broken", "dead, exploding or non-finite channels"
        return
    if entry.ok:
        return
    momentum = getattr(bn, "momentum", None)
    if n == 0:
        entry.cause, entry.reason = "unconverged", "no batch tracked: the running statistics are the initial mean 0, variance 1"  # fmt: skip
        return
    if w0 >= UNCONVERGED_WEIGHT:
        corrected = (running_mean / (1 - w0), ((running_var - w0) / (1 - w0)).clamp_min(1e-12))
        shift, ratio = _discrepancy(*train, *corrected)
        explained = (
            "corrected for that, they match training-mode batch statistics"
            if not _flagged(shift, ratio)
            else f"even corrected for that they differ from training-mode batch statistics "
            f"(mean shift {shift:.3g}, variance ratio {ratio:.3g}): the weights moved while "
            "they were tracked, or the data differ; recalibrate, then check again"
        )
        entry.cause = "unconverged"
        entry.reason = (
            f"running statistics not converged: {n} batch(es) tracked at momentum {momentum} "
            f"leave {w0:.0%} of the initial mean 0 / variance 1 in them; {explained}"
        )
        return
    if _flagged(entry.train_mean_shift, entry.train_var_ratio):
        entry.cause = "mismatch"
        entry.reason = (
            "train/eval mismatch: the running statistics do not describe these batches even "
            f"in training mode (mean shift {entry.train_mean_shift:.3g}, variance ratio "
            f"{entry.train_var_ratio:.3g}): other data, or statistics that drifted"
        )
        return
    if upstream:
        entry.cause = "unconverged"
        entry.reason = (
            "its running statistics match training-mode batches; its eval-mode input differs "
            f"because layers before it have unconverged statistics ({', '.join(upstream[:3])}"
            f"{', ...' if len(upstream) > 3 else ''})"
        )
    else:
        entry.cause = "mismatch"
        entry.reason = (
            "its running statistics match training-mode batches, but its eval-mode input "
            "differs: a train/eval mismatch in the layers before it"
        )


def bn_health(
    model: nn.Module, batches: Iterable, num_batches: int | None = None
) -> list[BNHealth]:
    """Compare every BatchNorm's running statistics with the statistics of ``batches`` (the
    train/eval discrepancy), flag dead, exploding and non-finite channels, and say why a layer
    is flagged: running statistics that have not converged yet (few batches tracked at a high
    momentum), or a real train/eval mismatch.

    Each batch runs twice under ``no_grad``: in eval mode (what the running statistics meet),
    and with the BN layers alone in training mode (what the running statistics estimate:
    each BN's input when every BN normalizes by batch statistics). Nothing in the model
    changes. Works on any torch model with torch's or bnlab's BatchNorm layers.
    """
    bns = {name: m for name, m in model.named_modules() if is_batchnorm(m) and m.running_mean is not None}  # fmt: skip
    if not bns:
        raise ValueError("model: expected BatchNorm layers with running statistics, found none")
    moments = {"eval": {n: _Moments() for n in bns}, "train": {n: _Moments() for n in bns}}
    order: list[str] = []  # the call order in eval mode
    phase = ["eval"]

    def hook(name):
        def capture(_module, inputs):
            if phase[0] == "eval" and name not in order:
                order.append(name)
            moments[phase[0]][name].add(inputs[0])

        return capture

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in bns.items()]
    modes = {m: m.training for m in model.modules()}
    saved = {bn: {k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in bns.values()}
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                phase[0] = "eval"
                model(x)
                phase[0] = "train"
                for bn in bns.values():
                    bn.training = True  # the BN only: its own act/drop stay in eval mode
                model(x)
                for bn, buffers in saved.items():  # undo the training-mode updates
                    bn.training = False
                    for key, value in buffers.items():
                        getattr(bn, key).copy_(value)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for bn, buffers in saved.items():
                for key, value in buffers.items():
                    getattr(bn, key).copy_(value)
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise ValueError("batches: expected at least one batch, the iterator was empty")
    report, unconverged = [], []
    for name in order + [n for n in bns if n not in order]:
        bn = bns[name]
        if moments["eval"][name].count == 0:
            continue  # not called by the model
        mean, var = moments["eval"][name].mean_var()
        running_mean, running_var = bn.running_mean.double(), bn.running_var.double()
        finite = torch.isfinite(running_mean) & torch.isfinite(running_var)
        shift, ratio = _discrepancy(mean, var, running_mean, running_var)
        n, w0 = _initial_weight(bn)
        entry = BNHealth(
            name, bn.num_features, shift, ratio, int((var < 1e-10).sum()),
            int(((var > 1e6) | (running_var > 1e6)).sum()), int((~finite).sum()), n, w0,
        )  # fmt: skip
        _diagnose(entry, bn, moments["train"][name].mean_var(), list(unconverged))
        if entry.cause == "unconverged":
            unconverged.append(name)
        report.append(entry)
    return report


def format_health(report: list[BNHealth]) -> str:
    """The report as a plain-text table, then one line per flagged layer saying why."""
    header = f"{'layer':30} {'C':>5} {'mean shift':>10} {'var ratio':>10} {'dead':>5} {'explode':>7} {'nonfinite':>9}  status"  # fmt: skip
    lines = [header, "-" * len(header)]
    for h in report:
        status = "ok" if h.ok else (h.cause.upper() if h.cause in ("unconverged", "mismatch") else "CHECK")  # fmt: skip
        lines.append(f"{h.name[:30]:30} {h.channels:5d} {h.mean_shift:10.3f} {h.var_ratio:10.3f} {h.dead_channels:5d} {h.exploding_channels:7d} {h.nonfinite_running:9d}  {status}")  # fmt: skip
    causes = [h for h in report if not h.ok and h.reason]
    if causes:
        lines.append("")
        lines += [f"{h.name}: {h.reason}" for h in causes]
    return "\n".join(lines)
