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
    """One BatchNorm layer's condition on some batches."""

    name: str
    channels: int
    mean_shift: float  # max over channels of |batch mean - running mean| / running std
    var_ratio: float  # max over channels of batch var / running var, or its inverse if larger
    dead_channels: int  # channels whose batch variance is ~0 (constant input)
    exploding_channels: int  # channels whose running or batch variance exceeds 1e6
    nonfinite_running: int  # channels whose running statistics are NaN or Inf

    @property
    def ok(self) -> bool:
        return (self.nonfinite_running == 0 and self.dead_channels == 0 and self.exploding_channels == 0
                and self.mean_shift < 1.0 and self.var_ratio < 4.0)  # fmt: skip


def bn_health(
    model: nn.Module, batches: Iterable, num_batches: int | None = None
) -> list[BNHealth]:
    """Compare every BatchNorm's running statistics with the statistics of ``batches`` (the
    train/eval discrepancy) and flag dead, exploding and non-finite channels.

    The model runs in eval mode under ``no_grad``; nothing in it changes. Works on any torch
    model with torch's or bnlab's BatchNorm layers.
    """
    bns = {name: m for name, m in model.named_modules() if is_batchnorm(m) and m.running_mean is not None}  # fmt: skip
    if not bns:
        raise ValueError("model: expected BatchNorm layers with running statistics, found none")
    sums = {name: [0.0, 0.0, 0.0] for name in bns}  # count, per-channel sum, sum of squares

    def hook(name):
        def capture(module, inputs, _output):
            x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # (C, values)
            entry = sums[name]
            entry[0] += x.shape[1]
            entry[1] = entry[1] + x.sum(1)
            entry[2] = entry[2] + (x * x).sum(1)

        return capture

    handles = [m.register_forward_hook(hook(name)) for name, m in bns.items()]
    was_training, seen = model.training, 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("batches: expected at least one batch, the iterator was empty")
    report = []
    for name, bn in bns.items():
        count, total, squares = sums[name]
        mean = total / count
        var = (squares / count - mean**2).clamp_min(0)
        running_mean, running_var = bn.running_mean.double(), bn.running_var.double()
        finite = torch.isfinite(running_mean) & torch.isfinite(running_var)
        safe_var = torch.where(finite, running_var, torch.ones_like(running_var)).clamp_min(1e-12)
        shift = (mean - torch.where(finite, running_mean, mean)).abs() / safe_var.sqrt()
        ratio = torch.maximum(var / safe_var, safe_var / var.clamp_min(1e-12))
        report.append(BNHealth(
            name, bn.num_features, float(shift.max()), float(ratio[finite].max()) if finite.any() else math.inf,
            int((var < 1e-10).sum()), int(((var > 1e6) | (running_var > 1e6)).sum()), int((~finite).sum()),
        ))  # fmt: skip
    return report


def format_health(report: list[BNHealth]) -> str:
    """The report as a plain-text table."""
    header = f"{'layer':30} {'C':>5} {'mean shift':>10} {'var ratio':>10} {'dead':>5} {'explode':>7} {'nonfinite':>9}  status"  # fmt: skip
    lines = [header, "-" * len(header)]
    for h in report:
        lines.append(f"{h.name[:30]:30} {h.channels:5d} {h.mean_shift:10.3f} {h.var_ratio:10.3f} {h.dead_channels:5d} {h.exploding_channels:7d} {h.nonfinite_running:9d}  {'ok' if h.ok else 'CHECK'}")  # fmt: skip
    return "\n".join(lines)
