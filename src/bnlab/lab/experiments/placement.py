"""Where BN goes: before or after the activation, with and without dropout after BN. A "no
difference" claim, so it is tested for equivalence with a stated margin: the 90% interval of
the accuracy difference (bootstrap over seeds and test examples; the TOST rule at 5%) must lie
inside ±margin. Each arm's learning rate is tuned with the same budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnlab.lab import stats
from bnlab.lab.experiments.base import (
    CNN_INPUTS,
    Context,
    ExperimentConfig,
    Finding,
    Verdict,
    define,
    figure,
    load_data,
    seeds,
)
from bnlab.lab.models import cnn
from bnlab.lab.train import TrainConfig, correct, train
from bnlab.lab.tuning import tune_lr

ARMS = {
    "before": ("before", 0.0), "after": ("after", 0.0),
    "before+dropout": ("before", 0.2), "after+dropout": ("after", 0.2),
}  # fmt: skip
MARGIN = 0.01  # "no difference": within ±1 point of test accuracy


@dataclass
class PlacementConfig(ExperimentConfig):
    channels: tuple[int, ...] = (16, 32)
    steps: int = 1500
    batch_size: int = 64
    lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1)
    tuning_steps: int = 750

    def input_ranks(self) -> tuple[tuple[int, ...], str]:
        return CNN_INPUTS


def _model(arm: str, data, config: PlacementConfig):
    placement, dropout = ARMS[arm]
    norm = "none" if config.impl == "identity" else "bn"
    impl = "bnlab" if config.impl == "identity" else config.impl
    return cnn(data.input_shape, data.num_classes, channels=config.channels, norm=norm, placement=placement, dropout=dropout, impl=impl)  # fmt: skip


def run(config: PlacementConfig, ctx: Context) -> dict:
    data = load_data(config, ctx)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    tuning = TrainConfig(batch_size=config.batch_size, steps=config.tuning_steps, eval_every=config.tuning_steps)  # fmt: skip
    metrics: dict = {"arms": {}, "tuned_lr": {}}
    for arm in ARMS:
        lr, _ = tune_lr(lambda arm=arm: _model(arm, data, config), data, config.lr_grid, tuning, config.seed)  # fmt: skip
        metrics["tuned_lr"][arm] = lr
        runs = []
        for seed in seeds(config.seed, config.num_seeds):
            torch.manual_seed(seed)
            model = _model(arm, data, config)
            train(model, data, TrainConfig(lr=lr, batch_size=config.batch_size, steps=config.steps, eval_every=config.steps, seed=seed, progress=False))  # fmt: skip
            runs.append(correct(model, x_test, y_test))
        metrics["arms"][arm] = runs
        ctx.log(f"{arm:15} (lr {lr:g}): test accuracy " + ", ".join(f"{np.mean(r):.3f}" for r in runs))  # fmt: skip
    return metrics


def _equivalence(metrics: dict, a: str, b: str, margin: float, context: bool = False) -> Finding:
    first, second = metrics["arms"][a], metrics["arms"][b]
    interval = stats.difference_ci(first, second, confidence=0.90)
    accuracy = [[np.mean(r) for r in metrics["arms"][arm]] for arm in (a, b)]
    p_value = stats.welch_tost(*accuracy, margin)
    g = stats.hedges_g(*accuracy)
    result = (f"test accuracy {a} {stats.mean_ci(first).format('.1f', 100, '%')}, {b} "
              f"{stats.mean_ci(second).format('.1f', 100, '%')}; difference {interval.format('+.2f', 100, ' points')} "
              f"(90% interval); Welch TOST p = {p_value:.3g} over seeds; Hedges' g {g:.2f}")  # fmt: skip
    rule = (f"equivalent (supported) if the 90% interval of the difference (bootstrap over seeds and test "
            f"examples) lies inside ±{margin * 100:g} point; refuted if it lies wholly outside")  # fmt: skip
    line = stats.sensitivity(lambda m: stats.equivalent(interval, m), margin, (0.005, 0.02), lambda m: f"±{m * 100:g} points")  # fmt: skip
    return Finding(f"{a} and {b} the activation give the same accuracy (±{margin * 100:g} point)" if not context
                   else f"dropout after BN ({a} vs {b}): same accuracy (±{margin * 100:g} point)",
                   stats.equivalent(interval, margin), result, rule, line, context)  # fmt: skip


def verdict(metrics: dict) -> Verdict:
    findings = [_equivalence(metrics, "before", "after", MARGIN)]
    for placement in ("before", "after"):
        if f"{placement}+dropout" in metrics["arms"]:
            findings.append(_equivalence(metrics, f"{placement}+dropout", placement, MARGIN, context=True))  # fmt: skip
    lrs = metrics.get("tuned_lr", {})
    note = ("Tuned learning rates: " + ", ".join(f"{arm} {lr:g}" for arm, lr in lrs.items()) + ".") if lrs else ""  # fmt: skip
    return Verdict.of(findings, note)


def plot(metrics: dict) -> dict:
    fig, ax = figure(figsize=(7, 4))
    names = list(metrics["arms"])
    accuracy = [np.array([np.mean(r) for r in metrics["arms"][n]]) for n in names]
    intervals = [stats.mean_ci(metrics["arms"][n]) for n in names]
    ax.bar(range(len(names)), [i.estimate for i in intervals], color="tab:blue", alpha=0.5,
           yerr=[[i.estimate - i.low for i in intervals], [i.high - i.estimate for i in intervals]], capsize=4)  # fmt: skip
    for i, values in enumerate(accuracy):
        ax.plot([i] * len(values), values, "k.")
    low = min(v.min() for v in accuracy)
    ax.set(ylim=(max(0.0, low - 0.05), min(1.0, max(v.max() for v in accuracy) + 0.03)), ylabel="test accuracy", title="BN placement")  # fmt: skip
    ax.set_xticks(range(len(names)), names)
    caption = ("Test accuracy per arm: bars are the mean with a 95% bootstrap interval over seeds and test "
               "examples; dots are seeds. Each arm trained at its own tuned learning rate.")  # fmt: skip
    return {"placement": (fig, caption)}


EXPERIMENT = define(
    "placement", PlacementConfig, run, verdict, plot,
    claim="Whether BN goes before or after the activation makes no difference to accuracy "
    "(within ±1 point); dropout after BN is reported alongside.",
    source="Ioffe & Szegedy 2015 §3.2 put BN before the nonlinearity; practitioners often put it after "
    "(e.g. the Keras and fast.ai discussions); Li et al. 2019 on dropout with BN",
    setup="CNN with channels {channels} (conv3 → BN/ReLU in either order → max-pool) on {data}; SGD "
    "momentum 0.9, batch {batch_size}, {steps} steps; each arm's learning rate picked from {lr_grid} "
    "after {tuning_steps} steps on a separate tuning seed; {num_seeds} evaluated seeds.",
    quick={"num_seeds": 2, "steps": 400, "channels": (8, 16), "lr_grid": (0.03, 0.1), "tuning_steps": 200},
    full_runtime="measured 2.8 CPU-minutes on one thread (12 min wall on the shared, loaded 2-core machine)",
)  # fmt: skip
