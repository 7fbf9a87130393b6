"""The output distribution of a dense layer under different initializers, before and after BN:
with BN the distribution no longer depends on the initializer's scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.lab.data import load_dataset
from bnlab.lab.experiments.base import (
    Context,
    Experiment,
    ExperimentConfig,
    Verdict,
    register,
    seeds,
)
from bnlab.lab.models import init_weights

INITS = {
    "normal(1)": ("normal", 1.0), "normal(0.01)": ("normal", 0.01), "zeros": ("zeros", 1.0),
    "glorot_normal": ("glorot_normal", 1.0), "glorot_uniform": ("glorot_uniform", 1.0),
    "he_normal": ("he_normal", 1.0), "he_uniform": ("he_uniform", 1.0),
}  # fmt: skip
BINS = np.linspace(-4, 4, 41)


@dataclass
class InitializersConfig(ExperimentConfig):
    width: int = 256
    batch: int = 512


def run(config: InitializersConfig, ctx: Context) -> dict:
    data = load_dataset(config.data, config.data_dir)
    x = torch.from_numpy(data.x_train[: config.batch]).flatten(1)
    metrics: dict = {"inits": list(INITS), "bins": BINS.tolist(), "before": {}, "after": {}}
    for label, (init, scale) in INITS.items():
        stds = {"before": [], "after": []}
        hists = {"before": None, "after": None}
        for seed in seeds(config.seed, config.num_seeds):
            torch.manual_seed(seed)
            layer = init_weights(nn.Sequential(nn.Linear(x.shape[1], config.width)), init, scale)
            bn = bnn.BatchNorm1d(config.width)
            with torch.no_grad():
                before = layer(x)
                after = bn(before)
            for key, values in (("before", before), ("after", after)):
                stds[key].append(float(values.std()))
                if hists[key] is None:  # the histogram of the first seed, standardized bins
                    scaled = values / max(float(values.std()), 1e-12) if key == "before" else values
                    hists[key] = np.histogram(scaled.numpy().ravel(), BINS)[0].tolist()
        for key in ("before", "after"):
            metrics[key][label] = {"std": stds[key], "histogram": hists[key]}
        ctx.log(f"{label:15} std before BN {np.median(stds['before']):.3g}, after {np.median(stds['after']):.3g}")  # fmt: skip
    return metrics


def _spread(metrics: dict, key: str) -> float:
    """max/min over the non-degenerate initializers of the output standard deviation."""
    stds = [np.median(v["std"]) for name, v in metrics[key].items() if name != "zeros"]
    return float(max(stds) / max(min(stds), 1e-12))


def verdict(metrics: dict) -> Verdict:
    before, after = _spread(metrics, "before"), _spread(metrics, "after")
    zero_after = float(np.median(metrics["after"]["zeros"]["std"]))
    summary = (
        f"Output std across initializers (zeros excluded) varies by a factor {before:.3g} before BN "
        f"and {after:.3g} after BN. Zero initialization gives identical units and a constant output "
        f"that BN cannot rescue (std after BN {zero_after:.2g})."
    )
    return Verdict(bool(before > 2 and after < 1.1), summary)


def plot(metrics: dict) -> dict:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    centers = (np.array(metrics["bins"][:-1]) + np.array(metrics["bins"][1:])) / 2
    for ax, key, title in zip(axes, ("before", "after"), ("before BN (each scaled by its std)", "after BN"), strict=True):  # fmt: skip
        for name in metrics["inits"]:
            entry = metrics[key][name]
            label = f"{name} (std {np.median(entry['std']):.2g})"
            ax.plot(centers, entry["histogram"], label=label)
        ax.set(title=title, xlabel="output value")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("count")
    return {"initializers": fig}


EXPERIMENT = register(
    Experiment(
        name="initializers",
        claim="BN makes a layer's output distribution independent of the initializer's scale.",
        config_cls=InitializersConfig,
        run=run,
        verdict=verdict,
        plot=plot,
        quick={"num_seeds": 1},
        full_runtime="a few seconds (7 initializers × 3 seeds, no training)",
    )
)
