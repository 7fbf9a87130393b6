"""Bjorck et al. (2018), scaled down: the gradients of a midpoint layer of a deep network at
initialization, with and without BN."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnlab.lab.data import load_dataset
from bnlab.lab.experiments.base import (
    Context,
    Experiment,
    ExperimentConfig,
    Verdict,
    register,
    seeds,
)
from bnlab.lab.models import mlp

ARMS = ("baseline", "bn")


@dataclass
class GradHistogramsConfig(ExperimentConfig):
    depth: int = 60  # hidden layers
    width: int = 128
    batch: int = 128
    init: str = "he_normal"
    bins: int = 60


def kurtosis(values: np.ndarray) -> float:
    """Excess kurtosis: 0 for a Gaussian, large for heavy tails."""
    centred = values - values.mean()
    return float(np.mean(centred**4) / max(np.mean(centred**2) ** 2, 1e-300) - 3.0)


def run(config: GradHistogramsConfig, ctx: Context) -> dict:
    data = load_dataset(config.data, config.data_dir)
    x, y = torch.from_numpy(data.x_train[: config.batch]), torch.from_numpy(data.y_train[: config.batch])  # fmt: skip
    metrics: dict = {"depth": config.depth, "arms": {}}
    for arm in ARMS:
        runs = []
        for seed in seeds(config.seed, config.num_seeds):
            torch.manual_seed(seed)
            model = mlp(int(np.prod(data.input_shape)), [config.width] * config.depth, data.num_classes,
                        norm="none" if arm == "baseline" else "bn", init=config.init, impl=config.impl)  # fmt: skip
            linears = [m for m in model if isinstance(m, nn.Linear)]
            middle = linears[len(linears) // 2]
            model.train()
            nn.functional.cross_entropy(model(x), y).backward()
            grad = middle.weight.grad.double().flatten().numpy()
            finite = grad[np.isfinite(grad)]
            limit = float(np.abs(finite).max()) if finite.size else 1.0
            counts, edges = np.histogram(
                finite / max(limit, 1e-300), bins=config.bins, range=(-1, 1)
            )
            runs.append({"seed": seed, "norm": float(np.linalg.norm(finite)), "max_abs": limit,
                         "std": float(finite.std()), "kurtosis": kurtosis(finite),
                         "histogram": counts.tolist(), "edges": (edges * limit).tolist(),
                         "finite": bool(finite.size == grad.size)})  # fmt: skip
            ctx.log(f"{arm} seed {seed}: mid-layer gradient norm {runs[-1]['norm']:.3g}, kurtosis {runs[-1]['kurtosis']:.2f}")  # fmt: skip
        metrics["arms"][arm] = runs
    return metrics


def verdict(metrics: dict) -> Verdict:
    med = {arm: {k: float(np.median([r[k] for r in runs])) for k in ("norm", "kurtosis")} for arm, runs in metrics["arms"].items()}  # fmt: skip
    ratio = med["baseline"]["norm"] / max(med["bn"]["norm"], 1e-300)
    summary = (
        f"Mid-layer gradient of a {metrics['depth']}-layer net at initialization: norm without BN "
        f"{med['baseline']['norm']:.3g} vs with BN {med['bn']['norm']:.3g} ({ratio:.3g}×); excess "
        f"kurtosis {med['baseline']['kurtosis']:.2f} vs {med['bn']['kurtosis']:.2f}. Supported needs "
        "the gradient without BN to be at least 100× larger and heavier-tailed."
    )
    return Verdict(
        bool(ratio >= 100 and med["baseline"]["kurtosis"] > med["bn"]["kurtosis"]), summary
    )


def plot(metrics: dict) -> dict:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, arm in zip(axes, ARMS, strict=True):
        run = metrics["arms"][arm][0]
        edges = np.array(run["edges"])
        ax.bar((edges[:-1] + edges[1:]) / 2, np.array(run["histogram"]) + 0.5, width=np.diff(edges), log=True)  # fmt: skip
        ax.set(title=f"{'without' if arm == 'baseline' else 'with'} BN: norm {run['norm']:.3g}, kurtosis {run['kurtosis']:.1f}",
               xlabel="gradient of a midpoint weight", ylabel="count")  # fmt: skip
    return {"grad_histograms": fig}


EXPERIMENT = register(
    Experiment(
        name="grad-histograms",
        claim="At initialization, without BN the gradients of a deep network's middle layer are "
        "heavy-tailed and orders of magnitude larger than with BN (Bjorck et al. 2018).",
        config_cls=GradHistogramsConfig,
        run=run,
        verdict=verdict,
        plot=plot,
        quick={"num_seeds": 1},
        full_runtime="a few seconds (2 arms × 3 seeds, one backward pass each)",
    )
)
