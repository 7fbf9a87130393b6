"""The train/eval discrepancy as a function of BN momentum and batch size: how far eval mode
(running statistics) falls below train mode (batch statistics of large evaluation batches).
The claim is a trend along each factor, so each factor gets its own test: the least-squares
slope of the gap against log10(momentum) (averaged over batch sizes) and against log2(batch)
(averaged over momenta), with bootstrap intervals over seeds and validation examples."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnlab.lab import stats
from bnlab.lab.experiments.base import (
    Context,
    ExperimentConfig,
    Finding,
    Verdict,
    define,
    figure,
    load_data,
    seeds,
)
from bnlab.lab.experiments.train_eval_gap import batch_statistics_correct
from bnlab.lab.models import mlp, set_bn_momentum
from bnlab.lab.train import TrainConfig, correct, train

SLOPE = 0.005  # a trend: at least 0.5 point of gap per decade of momentum or halving of the batch
CONVERGED = 0.01  # at most 1% of the running averages' weight left on their initial values


@dataclass
class MomentumConfig(ExperimentConfig):
    momenta: tuple[float, ...] = (
        0.01,
        0.1,
        0.5,
        0.9,
    )  # torch's convention: weight of the newest batch
    batch_sizes: tuple[int, ...] = (4, 16, 64)
    hidden: tuple[int, ...] = (128, 128)
    examples: int = 12000  # training examples seen, the same for every batch size
    lr: float = 0.02


def steps_for(momentum: float, batch: int, examples: int) -> int:
    """``examples / batch`` steps, but at least enough for the running averages to converge:
    (1 − momentum)^steps ≤ 1%, else low momentum would leave a gap of its own (stale averages)."""
    converge = int(np.ceil(np.log(CONVERGED) / np.log(1 - momentum))) if momentum < 1 else 1
    return max(1, examples // batch, converge)


def run(config: MomentumConfig, ctx: Context) -> dict:
    data = load_data(config, ctx)
    x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
    norm = "none" if config.impl == "identity" else "bn"
    impl = "bnlab" if config.impl == "identity" else config.impl
    gaps = []  # [seed][momentum][batch][example]: train-mode minus eval correctness
    for seed in seeds(config.seed, config.num_seeds):
        grid = []
        for momentum in config.momenta:
            row = []
            for batch in config.batch_sizes:
                torch.manual_seed(seed)
                model = mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes, norm=norm, impl=impl)  # fmt: skip
                set_bn_momentum(model, momentum)
                steps = steps_for(momentum, batch, config.examples)
                train(model, data, TrainConfig(lr=config.lr, batch_size=batch, steps=steps, eval_every=steps, seed=seed, progress=False))  # fmt: skip
                train_mode = np.array(batch_statistics_correct(model, x_val, y_val, 256))
                row.append((train_mode - np.array(correct(model, x_val, y_val))).tolist())
            grid.append(row)
            ctx.log(f"seed {seed} momentum {momentum}: gap " + ", ".join(f"b{b} {np.mean(g):+.3f}" for b, g in zip(config.batch_sizes, row, strict=True)))  # fmt: skip
        gaps.append(grid)
    return {"momenta": list(config.momenta), "batch_sizes": list(config.batch_sizes), "gap": gaps}


def _trend(metrics: dict, axis: str) -> stats.Interval:
    """Slope of the mean gap along ``axis`` ('momentum' per decade, 'batch' per halving)."""
    gap = np.array(metrics["gap"], dtype=np.float64)  # (S, M, B, N)
    if axis == "momentum":
        cells, levels = gap.mean(axis=2).transpose(1, 0, 2), np.log10(metrics["momenta"])
    else:
        cells, levels = gap.mean(axis=1).transpose(1, 0, 2), -np.log2(metrics["batch_sizes"])
    weights = stats.slope_weights(levels)
    return stats.bootstrap(cells, lambda means: means @ weights, resamples=1000)


def verdict(metrics: dict) -> Verdict:
    gap = np.array(metrics["gap"], dtype=np.float64).mean(axis=(0, 3))  # (M, B)
    corner = (f"gap {gap[-1, 0]:.1%} at momentum {metrics['momenta'][-1]} and batch {metrics['batch_sizes'][0]}, "
              f"{gap[0, -1]:.1%} at momentum {metrics['momenta'][0]} and batch {metrics['batch_sizes'][-1]}")  # fmt: skip
    findings = []
    for axis, claim, unit in (("momentum", "the gap grows with BN momentum", "per decade of momentum"),
                              ("batch", "the gap grows as the batch shrinks", "per halving of the batch")):  # fmt: skip
        interval = _trend(metrics, axis)
        findings.append(Finding(
            claim, stats.exceeds(interval, SLOPE),
            f"slope {interval.format('+.2f', 100, ' points')} {unit} (least squares over the levels, averaged over "
            f"the other factor); {corner}",
            f"supported if the interval of the slope lies above {SLOPE * 100:g} point {unit}, refuted if below",
            stats.sensitivity(lambda t, i=interval: stats.exceeds(i, t), SLOPE, (0.0, 0.01), lambda t: f"{t * 100:g} points"),
        ))  # fmt: skip
    return Verdict.of(findings, "Intervals: bootstrap over seeds and validation examples.")


def plot(metrics: dict) -> dict:
    gap = np.array(metrics["gap"], dtype=np.float64).mean(axis=(0, 3)) * 100
    fig, ax = figure(figsize=(6, 4))
    image = ax.imshow(gap, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(metrics["batch_sizes"])), metrics["batch_sizes"])
    ax.set_yticks(range(len(metrics["momenta"])), metrics["momenta"])
    for (i, j), value in np.ndenumerate(gap):
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="tab:blue")
    ax.set(xlabel="batch size", ylabel="BN momentum (weight of the newest batch)", title="train-mode − eval accuracy (points)")  # fmt: skip
    fig.colorbar(image, ax=ax)
    caption = ("Validation accuracy in train mode (batch statistics, batches of 256) minus eval mode "
               "(running statistics), in points, mean over seeds, for each BN momentum and training batch size.")  # fmt: skip
    return {"momentum": (fig, caption)}


EXPERIMENT = define(
    "momentum", MomentumConfig, run, verdict, plot,
    claim="The train/eval discrepancy grows with BN momentum (the weight of the newest batch) and "
    "with smaller batches.",
    source="Ioffe 2017 ('Batch Renormalization'); Wu & Johnson 2021 ('Rethinking Batch in BatchNorm' §3)",
    setup="MLP {hidden} ReLU with BN, momenta {momenta} × batch sizes {batch_sizes}, {examples} training "
    "examples seen in each cell, or more where the running averages need more steps to converge "
    "((1 − momentum)^steps ≤ 1%) (SGD lr {lr}, momentum 0.9), {num_seeds} seeds; the gap is measured on "
    "the validation split.",
    quick={"num_seeds": 2, "momenta": (0.1, 0.9), "batch_sizes": (4, 64), "examples": 4000},
    full_runtime="measured 1.2 CPU-minutes on one thread (6 min wall on the shared, loaded 2-core machine)",
)  # fmt: skip
