"""Learning rates over four decades, with and without BN: where each network trains."""

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
from bnlab.lab.models import mlp
from bnlab.lab.train import TrainConfig, train

ARMS = ("baseline", "bn")
TRAINS = 0.5  # "trains": final validation accuracy of at least 50% (chance is 10%)


@dataclass
class LrSweepConfig(ExperimentConfig):
    learning_rates: tuple[float, ...] = tuple(np.logspace(-3, 1, 9).round(6).tolist())
    hidden: tuple[int, ...] = (100, 100, 100)
    batch_size: int = 64
    steps: int = 600


def run(config: LrSweepConfig, ctx: Context) -> dict:
    data = load_dataset(config.data, config.data_dir)
    metrics: dict = {"learning_rates": list(config.learning_rates), "arms": {}}
    for arm in ARMS:
        accuracy, diverged = [], []
        for seed in seeds(config.seed, config.num_seeds):
            row_acc, row_div = [], []
            for lr in config.learning_rates:
                torch.manual_seed(seed)
                model = mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes,
                            norm="none" if arm == "baseline" else "bn", impl=config.impl)  # fmt: skip
                history = train(model, data, TrainConfig(lr=lr, batch_size=config.batch_size, steps=config.steps, eval_every=config.steps, seed=seed, progress=False))  # fmt: skip
                row_div.append(history.diverged)
                row_acc.append(
                    0.0 if history.diverged or not history.val_acc else history.val_acc[-1]
                )
            accuracy.append(row_acc)
            diverged.append(row_div)
            ctx.log(f"{arm} seed {seed}: " + ", ".join(f"{lr:g}:{'div' if d else f'{a:.2f}'}" for lr, a, d in zip(config.learning_rates, row_acc, row_div, strict=True)))  # fmt: skip
        metrics["arms"][arm] = {"val_acc": accuracy, "diverged": diverged}
    return metrics


def verdict(metrics: dict) -> Verdict:
    lrs = np.array(metrics["learning_rates"])
    acc = {arm: np.median(np.array(v["val_acc"]), axis=0) for arm, v in metrics["arms"].items()}
    only_bn = lrs[(acc["bn"] >= TRAINS) & (acc["baseline"] < TRAINS)]
    best = {arm: float(lrs[int(np.argmax(a))]) for arm, a in acc.items()}
    summary = (
        f"Learning rates (of {len(lrs)}, {lrs[0]:g} to {lrs[-1]:g}) where BN trains to ≥ "
        f"{TRAINS:.0%} and the baseline does not: {', '.join(f'{v:g}' for v in only_bn) or 'none'}. "
        f"Best learning rate: BN {best['bn']:g} ({acc['bn'].max():.1%}), baseline {best['baseline']:g} "
        f"({acc['baseline'].max():.1%}); medians over seeds."
    )
    return Verdict(bool(only_bn.size > 0 and best["bn"] > best["baseline"]), summary)


def plot(metrics: dict) -> dict:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    lrs = metrics["learning_rates"]
    for arm, color in zip(ARMS, ("tab:gray", "tab:blue"), strict=True):
        values = np.array(metrics["arms"][arm]["val_acc"])
        ax.semilogx(lrs, np.median(values, axis=0), "o-", color=color, label=arm)
        if len(values) > 1:
            ax.fill_between(lrs, values.min(0), values.max(0), color=color, alpha=0.2)
    ax.set(xlabel="learning rate (SGD, momentum 0.9)", ylabel="validation accuracy (0 = diverged)", title="Learning-rate sweep")  # fmt: skip
    ax.legend()
    return {"lr_sweep": fig}


EXPERIMENT = register(
    Experiment(
        name="lr-sweep",
        claim="BN trains at learning rates where the baseline diverges, and its best learning "
        "rate is higher.",
        config_cls=LrSweepConfig,
        run=run,
        verdict=verdict,
        plot=plot,
        quick={"num_seeds": 1, "steps": 200},
        full_runtime="about 1 minute on 2 cores (9 learning rates × 2 arms × 3 seeds)",
    )
)
