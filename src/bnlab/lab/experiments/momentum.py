"""The train/eval discrepancy as a function of BN momentum and batch size: how far eval mode
(running statistics) falls below train mode (batch statistics of large evaluation batches)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnlab.lab.data import load_dataset
from bnlab.lab.experiments.base import (
    Context,
    Experiment,
    ExperimentConfig,
    Verdict,
    register,
    seeds,
)
from bnlab.lab.experiments.train_eval_gap import batch_statistics_accuracy
from bnlab.lab.models import mlp, set_bn_momentum
from bnlab.lab.train import TrainConfig, evaluate, train


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


def run(config: MomentumConfig, ctx: Context) -> dict:
    data = load_dataset(config.data, config.data_dir)
    x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
    gaps = []  # [seed][momentum][batch]
    for seed in seeds(config.seed, config.num_seeds):
        grid = []
        for momentum in config.momenta:
            row = []
            for batch in config.batch_sizes:
                torch.manual_seed(seed)
                model = mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes, norm="bn", impl=config.impl)  # fmt: skip
                set_bn_momentum(model, momentum)
                steps = max(1, config.examples // batch)
                train(model, data, TrainConfig(lr=config.lr, batch_size=batch, steps=steps, eval_every=steps, seed=seed, progress=False))  # fmt: skip
                train_mode = batch_statistics_accuracy(model, x_val, y_val, 256)
                row.append(train_mode - evaluate(model, x_val, y_val)[1])
            grid.append(row)
            ctx.log(f"seed {seed} momentum {momentum}: gap " + ", ".join(f"b{b} {g:+.3f}" for b, g in zip(config.batch_sizes, row, strict=True)))  # fmt: skip
        gaps.append(grid)
    return {"momenta": list(config.momenta), "batch_sizes": list(config.batch_sizes), "gap": gaps}


def verdict(metrics: dict) -> Verdict:
    gap = np.median(np.array(metrics["gap"]), axis=0)  # (momentum, batch)
    worst, best = float(gap[-1, 0]), float(gap[0, -1])
    spread = float(np.ptp(np.array(metrics["gap"])[:, -1, 0])) if len(metrics["gap"]) > 1 else 0.0
    summary = (
        f"Train-mode minus eval accuracy (median over seeds): {worst:.1%} at momentum "
        f"{metrics['momenta'][-1]} and batch {metrics['batch_sizes'][0]}, {best:.1%} at momentum "
        f"{metrics['momenta'][0]} and batch {metrics['batch_sizes'][-1]}"
        + (f" (seed spread of the former {spread:.1%})" if spread else "")
        + ". Supported needs the first to exceed the second by at least 2 points."
    )
    return Verdict(bool(worst >= best + 0.02), summary)


def plot(metrics: dict) -> dict:
    import matplotlib.pyplot as plt

    gap = np.median(np.array(metrics["gap"]), axis=0) * 100
    fig, ax = plt.subplots(figsize=(6, 4))
    image = ax.imshow(gap, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(metrics["batch_sizes"])), metrics["batch_sizes"])
    ax.set_yticks(range(len(metrics["momenta"])), metrics["momenta"])
    for (i, j), value in np.ndenumerate(gap):
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="tab:blue")
    ax.set(xlabel="batch size", ylabel="BN momentum (weight of the newest batch)", title="train-mode − eval accuracy (points)")  # fmt: skip
    fig.colorbar(image)
    return {"momentum": fig}


EXPERIMENT = register(
    Experiment(
        name="momentum",
        claim="The train/eval discrepancy grows with BN momentum (the weight of the newest batch) "
        "and with smaller batches.",
        config_cls=MomentumConfig,
        run=run,
        verdict=verdict,
        plot=plot,
        quick={"num_seeds": 1, "momenta": (0.1, 0.9), "batch_sizes": (4, 64), "examples": 4000},
        full_runtime="about 1 minute on 2 cores (4 momenta × 3 batch sizes × 3 seeds)",
    )
)
