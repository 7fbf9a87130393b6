"""A sanity row for the data: the published MNIST-1D baselines, retrained here on the
canonical split, beside the published test accuracies (Greydanus 2020: MLP 68%, CNN 94%).
If these do not match, the other experiments' MNIST-1D numbers do not compare with the
literature."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

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
from bnlab.lab.models import init_weights
from bnlab.lab.train import TrainConfig, correct, train

PUBLISHED = {"mlp": 0.68, "cnn": 0.94}
PUBLISHED_STEPS = 6000  # the published training budget (Adam, batch 100)
MARGIN = 0.04  # "matches": within ±4 points of the published accuracy


def published_mlp() -> nn.Sequential:
    """The paper's MLP: 40 → 100 → 100 → 10 with ReLU."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))  # fmt: skip
    return init_weights(model, "default")


def published_cnn() -> nn.Sequential:
    """The paper's CNN: three stride-2 convolutions of 25 channels (kernels 5, 3, 3), ReLU,
    then a linear layer from 25 × 5 features."""
    model = nn.Sequential(
        nn.Conv1d(1, 25, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(25, 25, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(125, 10),
    )  # fmt: skip
    return init_weights(model, "default")


@dataclass
class Mnist1dSanityConfig(ExperimentConfig):
    steps: int = 6000
    lr: float = 1e-2
    batch_size: int = 100


def run(config: Mnist1dSanityConfig, ctx: Context) -> dict:
    if config.data != "mnist1d":
        ctx.log(f"data {config.data!r} ignored: the sanity row is about MNIST-1D")
    data = load_data(dataclasses.replace(config, data="mnist1d", data_dir=None), ctx)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    metrics: dict = {"models": {}, "steps": config.steps}
    for name, build in (("mlp", published_mlp), ("cnn", published_cnn)):
        runs = []
        for seed in seeds(config.seed, config.num_seeds):
            torch.manual_seed(seed)
            model = build()
            train(model, data, TrainConfig(optimizer="adam", lr=config.lr, batch_size=config.batch_size, steps=config.steps, eval_every=config.steps, seed=seed, progress=False))  # fmt: skip
            runs.append(correct(model, x_test, y_test))
        metrics["models"][name] = runs
        ctx.log(f"{name}: test accuracy " + ", ".join(f"{np.mean(r):.3f}" for r in runs))
    return metrics


def verdict(metrics: dict) -> Verdict:
    findings = []
    for name, runs in metrics["models"].items():
        published = PUBLISHED[name]
        interval = stats.mean_ci(runs, confidence=0.90)
        shifted = stats.Interval(interval.estimate - published, interval.low - published, interval.high - published)  # fmt: skip
        findings.append(Finding(
            f"the {name.upper()} baseline matches the published {published:.0%} (±{MARGIN * 100:g} points)",
            stats.equivalent(shifted, MARGIN) if metrics.get("steps", PUBLISHED_STEPS) >= PUBLISHED_STEPS else None,
            f"test accuracy {stats.mean_ci(runs).format('.1f', 100, '%')} (95%) over {len(runs)} seeds and the 1,000 "
            f"canonical test examples; published {published:.0%}",
            f"supported if the 90% interval lies inside published ±{MARGIN * 100:g} points, refuted if wholly outside",
            stats.sensitivity(lambda m, s=shifted: stats.equivalent(s, m), MARGIN, (0.02, 0.06), lambda m: f"±{m * 100:g} points"),
        ))  # fmt: skip
    short = metrics.get("steps", PUBLISHED_STEPS) < PUBLISHED_STEPS
    return Verdict.of(findings, f"Trained {metrics['steps']} steps, fewer than the published {PUBLISHED_STEPS}: not comparable." if short else "")  # fmt: skip


def plot(metrics: dict) -> dict:
    fig, ax = figure(figsize=(5, 4))
    names = list(metrics["models"])
    intervals = [stats.mean_ci(metrics["models"][n]) for n in names]
    ax.errorbar(range(len(names)), [i.estimate for i in intervals], yerr=[[i.estimate - i.low for i in intervals], [i.high - i.estimate for i in intervals]], fmt="o", capsize=4, label="measured here")  # fmt: skip
    ax.plot(
        range(len(names)), [PUBLISHED[n] for n in names], "r*", markersize=12, label="published"
    )
    ax.set_xticks(range(len(names)), [n.upper() for n in names])
    ax.set(ylabel="test accuracy", ylim=(0.5, 1.0), title="MNIST-1D baselines")
    ax.legend()
    caption = ("Test accuracy of the published MNIST-1D MLP and CNN retrained on the canonical split (mean "
               "with a 95% bootstrap interval over seeds and test examples) beside the published numbers (stars).")  # fmt: skip
    return {"mnist1d_sanity": (fig, caption)}


EXPERIMENT = define(
    "mnist1d-sanity", Mnist1dSanityConfig, run, verdict, plot,
    claim="The MNIST-1D data used here reproduces the published baselines (MLP 68%, CNN 94% test accuracy).",
    source="Greydanus 2020, 'Scaling down deep learning' (MNIST-1D), Table/Figure of baselines",
    setup="The published MLP (40-100-100-10 ReLU) and CNN (3 stride-2 convs of 25 channels, linear head), "
    "Adam lr {lr}, batch {batch_size}, {steps} steps, on the canonical split (4,000 train of which 500 "
    "held out for validation, 1,000 test), inputs standardized with training statistics; {num_seeds} seeds.",
    quick={"num_seeds": 2, "steps": 1500},
    full_runtime="measured 1.8 CPU-minutes on one thread (10 min wall on the shared, loaded 2-core machine)",
)  # fmt: skip
