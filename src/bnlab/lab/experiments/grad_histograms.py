"""Gradients at initialization, with and without BN, as a regime map: plain vs residual MLPs
× depth × initializer. Two papers describe two different regimes:

- Bjorck et al. (2018), residual networks: without BN the gradients of a middle layer are
  orders of magnitude larger (and heavy-tailed) than with BN.
- Yang et al. (2019), plain (non-residual) networks: *with* BN the gradients explode going
  back through the layers, by about π/(π−1) ≈ 1.47 per ReLU layer.

Each (architecture, depth, init) cell gets its own verdict. Weights are drawn identically in
both arms (same seed), so the ratios are paired by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnlab.lab import stats
from bnlab.lab.experiments.base import (
    ARMS,
    Context,
    ExperimentConfig,
    Finding,
    Verdict,
    define,
    figure,
    load_data,
    norm_of,
    seeds,
)
from bnlab.lab.models import mlp, residual_mlp

THRESHOLD = 1.0  # decades: "orders of magnitude" is read as more than 10×
GROWTH = 1.05  # "explodes": the gradient grows by more than 5% per layer towards the input


@dataclass
class GradHistogramsConfig(ExperimentConfig):
    archs: tuple[str, ...] = ("plain", "residual")
    depths: tuple[int, ...] = (10, 30, 60)  # hidden layers (plain) or residual blocks
    inits: tuple[str, ...] = ("he_normal", "default")
    width: int = 128
    batch: int = 128
    bins: int = 60


def kurtosis(values: np.ndarray) -> float:
    """Excess kurtosis: 0 for a Gaussian, large for heavy tails."""
    centred = values - values.mean()
    return float(np.mean(centred**4) / max(np.mean(centred**2) ** 2, 1e-300) - 3.0)


def _model(arch: str, arm: str, depth: int, init: str, data, config) -> nn.Module:
    norm, impl = norm_of(arm, config.impl)
    features = int(np.prod(data.input_shape))
    if arch == "plain":
        return mlp(features, [config.width] * depth, data.num_classes, norm=norm, init=init, impl=impl)  # fmt: skip
    return residual_mlp(features, config.width, depth, data.num_classes, norm=norm, init=init, impl=impl)  # fmt: skip


def _gradients(model: nn.Module, x, y) -> list[torch.Tensor]:
    """Weight gradients of every Linear layer, input to output, after one backward pass."""
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    return [m.weight.grad.double().flatten() for m in model.modules() if isinstance(m, nn.Linear)]


def _measure(grads: list[torch.Tensor], bins: int) -> dict:
    norms = [float(g.norm()) for g in grads]
    middle = grads[len(grads) // 2].numpy()
    finite = middle[np.isfinite(middle)]
    limit = float(np.abs(finite).max()) if finite.size else 1.0
    counts, edges = np.histogram(finite / max(limit, 1e-300), bins=bins, range=(-1, 1))
    return {"mid_norm": float(np.linalg.norm(finite)), "kurtosis": kurtosis(finite),
            "first_norm": norms[0], "last_hidden_norm": norms[-2], "layer_norms": norms,
            "histogram": counts.tolist(), "edges": (edges * limit).tolist()}  # fmt: skip


def run(config: GradHistogramsConfig, ctx: Context) -> dict:
    data = load_data(config, ctx)
    x = torch.from_numpy(data.x_train[: config.batch])
    y = torch.from_numpy(data.y_train[: config.batch])
    cells = []
    for arch in config.archs:
        for depth in config.depths:
            for init in config.inits:
                cell = {"arch": arch, "depth": depth, "init": init, "arms": {a: [] for a in ARMS}}
                for seed in seeds(config.seed, config.num_seeds):
                    for arm in ARMS:
                        torch.manual_seed(seed)
                        model = _model(arch, arm, depth, init, data, config)
                        cell["arms"][arm].append(_measure(_gradients(model, x, y), config.bins))
                ratio = np.median([b["mid_norm"] / max(n["mid_norm"], 1e-300) for b, n in zip(*cell["arms"].values(), strict=True)])  # fmt: skip
                ctx.log(f"{arch:8} depth {depth:3} {init:9}: mid-layer gradient no-BN/BN {ratio:.3g}×")  # fmt: skip
                cells.append(cell)
    return {"cells": cells}


def _log_ratio(numerator, denominator) -> np.ndarray:
    return np.log10(np.maximum(numerator, 1e-300)) - np.log10(np.maximum(denominator, 1e-300))


def _decide(interval: stats.Interval, threshold: float) -> bool | None:
    if interval.low > threshold:
        return True
    if interval.high < threshold:
        return False
    return None


def _cell_finding(cell: dict) -> Finding:
    base, bn = cell["arms"]["baseline"], cell["arms"]["bn"]
    where = f"{cell['arch']} depth {cell['depth']}, {cell['init']} init"
    kurt = (np.median([r["kurtosis"] for r in base]), np.median([r["kurtosis"] for r in bn]))
    tails = f"; mid-layer excess kurtosis no-BN {kurt[0]:.2f}, BN {kurt[1]:.2f}"
    if cell["arch"] == "residual":
        values = _log_ratio([r["mid_norm"] for r in base], [r["mid_norm"] for r in bn])
        interval = stats.mean_ci(values)
        threshold, neighbours, unit = THRESHOLD, (0.5, 2.0), "decades"
        context = cell["init"] != "he_normal"  # Bjorck et al.'s ResNets are He-initialized
        claim = f"{where}: without BN the mid-layer gradient is > 10× larger (Bjorck et al.)"
        result = f"log10(no-BN / BN mid-layer gradient norm) = {interval.format('.2f')} ({10**interval.estimate:.3g}×)"  # fmt: skip
        rule = "supported if the interval's lower end exceeds 1 decade (10×), refuted if its upper end is below"  # fmt: skip
    else:
        layers = len(bn[0]["layer_norms"]) - 2  # hidden-layer gaps between first and last
        values = _log_ratio([r["first_norm"] for r in bn], [r["last_hidden_norm"] for r in bn]) / max(layers, 1)  # fmt: skip
        interval = stats.mean_ci(values)
        threshold, neighbours, unit = np.log10(GROWTH), (np.log10(1.02), np.log10(1.1)), ""
        context = False
        claim = f"{where}: with BN the gradient grows geometrically towards the input (Yang et al.)"  # fmt: skip
        factor = stats.Interval(*(10**v for v in (interval.estimate, interval.low, interval.high)))
        total = 10 ** (interval.estimate * layers)
        result = f"growth per layer (first vs last hidden layer, with BN) {factor.format('.3f')}×, {total:.3g}× in all"  # fmt: skip
        rule = f"supported if the per-layer growth interval lies above {GROWTH:g}× (Yang et al. predict ≈ 1.47 for ReLU), refuted if below"  # fmt: skip
    result += f" over {len(values)} seeds" + tails
    describe = (lambda t: f"{t:g} {unit}") if unit else (lambda t: f"{10**t:.2f}× per layer")
    line = stats.sensitivity(lambda t: _decide(interval, t), threshold, neighbours, describe)
    return Finding(claim, _decide(interval, threshold), result, rule, line, context)


def verdict(metrics: dict) -> Verdict:
    findings = [_cell_finding(cell) for cell in metrics["cells"]]
    residual = [c for c in metrics["cells"] if c["arch"] == "residual"]
    if residual:
        residual = [c for c in residual if c["init"] == "he_normal"] or residual
        base = [np.log10(max(r["kurtosis"] + 3, 1e-9)) for c in residual for r in c["arms"]["baseline"]]  # fmt: skip
        bn = [np.log10(max(r["kurtosis"] + 3, 1e-9)) for c in residual for r in c["arms"]["bn"]]
        interval = stats.difference_ci(base, bn)
        findings.append(Finding(
            "residual nets, he_normal init: without BN the mid-layer gradients are heavier-tailed (Bjorck et al.)",
            {"better": True, "worse": False}.get(stats.decide(interval, 0.0)),
            f"log10(kurtosis + 3), no-BN − BN = {interval.format('.2f')} over the residual cells' seeds",
            "supported if the interval lies above 0, refuted if below", "",
        ))  # fmt: skip
    return Verdict.of(findings)


def plot(metrics: dict) -> dict:
    cells = metrics["cells"]
    archs = sorted({c["arch"] for c in cells})
    fig, axes = figure(len(archs), 1, (6 * len(archs), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        for init, marker in zip(sorted({c["init"] for c in cells}), "os", strict=False):
            chosen = [c for c in cells if c["arch"] == arch and c["init"] == init]
            depths = [c["depth"] for c in chosen]
            for arm, color in zip(ARMS, ("tab:gray", "tab:blue"), strict=True):
                values = np.array([[r["mid_norm"] for r in c["arms"][arm]] for c in chosen])
                ax.errorbar(depths, np.median(values, 1), yerr=[np.median(values, 1) - values.min(1), values.max(1) - np.median(values, 1)],
                            marker=marker, color=color, capsize=3, label=f"{'no BN' if arm == 'baseline' else 'BN'}, {init}")  # fmt: skip
        ax.set(xlabel="depth (hidden layers / residual blocks)", ylabel="mid-layer weight-gradient norm", yscale="log", title=f"{arch} MLP at initialization")  # fmt: skip
        ax.legend(fontsize=7)
    caption = ("Norm of the gradient of the middle layer's weights after one backward pass at "
               "initialization (markers: median over seeds; bars: min–max over seeds), without BN "
               "(grey) and with BN (blue), for each depth and initializer.")  # fmt: skip
    hist, hist_axes = figure(2, 1, (11, 4))
    deepest = max((c for c in cells if c["arch"] == archs[-1]), key=lambda c: c["depth"])
    for ax, arm in zip(hist_axes, ARMS, strict=True):
        run = deepest["arms"][arm][0]
        edges = np.array(run["edges"])
        ax.bar((edges[:-1] + edges[1:]) / 2, np.array(run["histogram"]) + 0.5, width=np.diff(edges), log=True)  # fmt: skip
        ax.set(title=f"{'without' if arm == 'baseline' else 'with'} BN: kurtosis {run['kurtosis']:.1f}",
               xlabel="gradient entry of the middle layer", ylabel="count + 0.5 (log)")  # fmt: skip
    hist_caption = (f"Histogram of the middle layer's weight-gradient entries, {deepest['arch']} MLP of depth "
                    f"{deepest['depth']}, {deepest['init']} init, first seed; counts shifted by 0.5 for the log axis.")  # fmt: skip
    return {"grad_regimes": (fig, caption), "grad_histograms": (hist, hist_caption)}


EXPERIMENT = define(
    "grad-histograms", GradHistogramsConfig, run, verdict, plot,
    claim="At initialization, residual networks without BN have middle-layer gradients orders of "
    "magnitude larger (and heavier-tailed) than with BN, while plain deep networks with BN have "
    "gradients that explode towards the input.",
    source="Bjorck et al. 2018, 'Understanding Batch Normalization' (residual regime); Yang et al. "
    "2019, 'A Mean Field Theory of Batch Normalization' (plain regime)",
    setup="MLPs of width {width} on one batch of {batch} training examples, plain (depth = hidden "
    "layers) or residual (depth = blocks of two linear layers, post-activation), depths {depths}, "
    "inits {inits}, with and without BN (bias only without BN), {num_seeds} seeds; one "
    "forward/backward pass, no training. Weights drawn identically in both arms.",
    quick={"num_seeds": 3, "depths": (10, 30)},
    full_runtime="measured 0.2 CPU-minutes on one thread (1 min wall on the shared, loaded 2-core machine)",
)  # fmt: skip
