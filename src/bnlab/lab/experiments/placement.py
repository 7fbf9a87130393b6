"""Where BN goes: before or after the activation, with and without dropout after BN."""

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
from bnlab.lab.models import cnn
from bnlab.lab.train import TrainConfig, evaluate, train

ARMS = {
    "before": ("before", 0.0), "after": ("after", 0.0),
    "before+dropout": ("before", 0.2), "after+dropout": ("after", 0.2),
}  # fmt: skip


@dataclass
class PlacementConfig(ExperimentConfig):
    channels: tuple[int, ...] = (16, 32)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 0.05


def run(config: PlacementConfig, ctx: Context) -> dict:
    data = load_dataset(config.data, config.data_dir)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    metrics: dict = {"arms": {}}
    for arm, (placement, dropout) in ARMS.items():
        accuracy = []
        for seed in seeds(config.seed, config.num_seeds):
            torch.manual_seed(seed)
            model = cnn(data.input_shape, data.num_classes, channels=config.channels, norm="bn",
                        placement=placement, dropout=dropout, impl=config.impl)  # fmt: skip
            train(model, data, TrainConfig(lr=config.lr, batch_size=config.batch_size, steps=config.steps, eval_every=config.steps, seed=seed, progress=False))  # fmt: skip
            accuracy.append(evaluate(model, x_test, y_test)[1])
        metrics["arms"][arm] = accuracy
        ctx.log(f"{arm:15}: test accuracy " + ", ".join(f"{a:.3f}" for a in accuracy))
    return metrics


def verdict(metrics: dict) -> Verdict:
    acc = {arm: np.array(values) for arm, values in metrics["arms"].items()}
    ranked = sorted(acc, key=lambda arm: -np.median(acc[arm]))
    before, after = np.median(acc["before"]), np.median(acc["after"])
    spread = max(float(np.ptp(acc["before"])), float(np.ptp(acc["after"])))
    margin = abs(before - after)
    summary = (
        f"Test accuracy (median over {len(acc['before'])} seed(s)): "
        + ", ".join(f"{arm} {np.median(acc[arm]):.1%}" for arm in ranked)
        + f". {'Before' if before >= after else 'After'} the activation wins by {margin:.1%} "
        f"(seed spread up to {spread:.1%}). Supported needs the placements to differ by less "
        "than the seed spread (or 0.5 points)."
    )
    return Verdict(bool(margin <= max(spread, 0.005)), summary)


def plot(metrics: dict) -> dict:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(metrics["arms"])
    values = [np.array(metrics["arms"][n]) for n in names]
    ax.bar(range(len(names)), [np.median(v) for v in values], color="tab:blue", alpha=0.6)
    for i, v in enumerate(values):
        ax.plot([i] * len(v), v, "k.")
    low = min(v.min() for v in values)
    ax.set(ylim=(max(0.0, low - 0.05), 1.0), ylabel="test accuracy", title="BN placement")
    ax.set_xticks(range(len(names)), names)
    return {"placement": fig}


EXPERIMENT = register(
    Experiment(
        name="placement",
        claim="Whether BN goes before or after the activation makes little difference (less "
        "than the spread over seeds); dropout after BN is reported alongside.",
        config_cls=PlacementConfig,
        run=run,
        verdict=verdict,
        plot=plot,
        quick={"num_seeds": 1, "steps": 400, "channels": (8, 16)},
        full_runtime="about 2 minutes on 2 cores (4 arms × 3 seeds × 1,500 steps)",
    )
)
