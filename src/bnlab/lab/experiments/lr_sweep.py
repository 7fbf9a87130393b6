"""Learning rates over four decades on a fine grid, with and without BN, for a deep MLP: the
largest stable learning rate (the largest rate within ε of the arm's own best accuracy) and
the best one, each with a bootstrap interval over seeds and test examples; training loss as
well as accuracy, and whether a failing run diverged (non-finite loss) or stalled."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
from bnlab.lab.models import mlp
from bnlab.lab.train import TrainConfig, correct, train

EPSILON = 0.05  # "stable": final test accuracy within 5 points of the arm's best
TRAINS = 0.10  # "trains": final test accuracy more than 10 points above chance
STALLED = 2.0  # final training loss above this (chance is ln 10 ≈ 2.30): fails to train


@dataclass
class LrSweepConfig(ExperimentConfig):
    learning_rates: tuple[float, ...] = tuple(np.logspace(-3, 1, 17).round(6).tolist())
    hidden: tuple[int, ...] = (100,) * 6
    batch_size: int = 64
    steps: int = 1000


def run(config: LrSweepConfig, ctx: Context) -> dict:
    data = load_data(config, ctx)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    metrics: dict = {"learning_rates": list(config.learning_rates), "chance": 1 / data.num_classes, "arms": {}}  # fmt: skip
    for arm in ARMS:
        norm, impl = norm_of(arm, config.impl)
        table = {"test_correct": [], "train_loss": [], "diverged": []}  # [seed][lr]
        for seed in seeds(config.seed, config.num_seeds):
            rows = {key: [] for key in table}
            for lr in config.learning_rates:
                torch.manual_seed(seed)
                model = mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes, norm=norm, impl=impl)  # fmt: skip
                history = train(model, data, TrainConfig(lr=lr, batch_size=config.batch_size, steps=config.steps, eval_every=config.steps, seed=seed, progress=False))  # fmt: skip
                rows["diverged"].append(history.diverged)
                losses = [v for v in history.step_loss[-50:] if np.isfinite(v)]
                rows["train_loss"].append(float(np.mean(losses)) if losses and not history.diverged else float("nan"))  # fmt: skip
                rows["test_correct"].append([0] * len(y_test) if history.diverged else correct(model, x_test, y_test))  # fmt: skip
            for key in table:
                table[key].append(rows[key])
            accuracy = [np.mean(c) for c in rows["test_correct"]]
            ctx.log(f"{arm} seed {seed}: " + ", ".join(f"{lr:g}:{'div' if d else f'{a:.2f}'}" for lr, a, d in zip(config.learning_rates, accuracy, rows["diverged"], strict=True)))  # fmt: skip
        metrics["arms"][arm] = table
    return metrics


def _largest(mask: np.ndarray, log_lrs: np.ndarray) -> np.ndarray:
    """log10 of the largest rate where ``mask`` (B, lrs) holds; −inf where it never does."""
    return np.array([log_lrs[np.flatnonzero(row).max()] if row.any() else -np.inf for row in mask])


def _edges(means: np.ndarray, log_lrs: np.ndarray, epsilon: float, chance: float):
    """(largest training lr, largest stable lr, best lr), log10, for curves ``means`` (B, lrs)."""
    best = means.max(axis=1, keepdims=True)
    trains = _largest(means > chance + TRAINS, log_lrs)
    return trains, _largest(means >= best - epsilon, log_lrs), log_lrs[means.argmax(axis=1)]


def _cells(metrics: dict) -> np.ndarray:
    """(2 × lrs, seeds, examples): baseline's curves then BN's, per-example correctness."""
    arrays = [np.array(metrics["arms"][arm]["test_correct"], dtype=np.float64) for arm in ARMS]
    return np.concatenate([a.transpose(1, 0, 2) for a in arrays])


def _measure(metrics: dict, epsilon: float) -> dict[str, stats.Interval]:
    log_lrs = np.log10(metrics["learning_rates"])
    count, chance = len(log_lrs), metrics.get("chance", 0.1)
    cells = _cells(metrics)

    def pick(index: int, arm: int | None):
        def combine(means):
            if arm is not None:
                return _edges(means[:, arm * count : (arm + 1) * count], log_lrs, epsilon, chance)[index]  # fmt: skip
            base = _edges(means[:, :count], log_lrs, epsilon, chance)[index]
            with np.errstate(invalid="ignore"):
                return _edges(means[:, count:], log_lrs, epsilon, chance)[index] - base

        return combine

    return {f"{what}_{who}": stats.bootstrap(cells, pick(index, arm), resamples=1000)
            for index, what in enumerate(("trains", "stable", "best"))
            for who, arm in (("baseline", 0), ("bn", 1), ("diff", None))}  # fmt: skip


def _failures(metrics: dict) -> str:
    """Where the baseline fails: diverged (non-finite loss) or stalled (loss near chance)."""
    lrs = metrics["learning_rates"]
    table = metrics["arms"]["baseline"]
    diverged = np.mean(np.array(table["diverged"], dtype=float), axis=0) > 0.5
    loss = np.array(table["train_loss"], dtype=float)
    with np.errstate(invalid="ignore"):
        loss = np.array([np.median(col[np.isfinite(col)]) if np.isfinite(col).any() else np.inf for col in loss.T])  # fmt: skip
    stalled = ~diverged & (loss > STALLED)
    parts = []
    if diverged.any():
        parts.append("diverges at " + ", ".join(f"{lr:g}" for lr, d in zip(lrs, diverged, strict=True) if d))  # fmt: skip
    if stalled.any():
        parts.append("fails to train (stalls, loss > 2.0) at " + ", ".join(f"{lr:g}" for lr, s in zip(lrs, stalled, strict=True) if s))  # fmt: skip
    return "the baseline " + ("; ".join(parts) if parts else "trains at every rate of the grid")


def verdict(metrics: dict) -> Verdict:
    lrs = np.log10(metrics["learning_rates"])
    step = float(np.median(np.diff(lrs)))
    measured = _measure(metrics, EPSILON)

    def lr(interval):
        return "10^" + interval.format(".2f")

    def decide(interval):
        return stats.exceeds(interval, step / 2)  # at least one grid step apart

    findings = []
    claims = (
        ("trains", "BN trains at learning rates where the baseline fails", "largest training"),
        ("stable", "BN's largest stable learning rate is higher", "largest stable"),
        ("best", "BN's best learning rate is higher", "best"),
    )
    for what, claim, name in claims:
        diff = measured[f"{what}_diff"]
        result = (f"{name} lr: BN {lr(measured[f'{what}_bn'])}, baseline "
                  f"{lr(measured[f'{what}_baseline'])}; BN − baseline {diff.format('+.2f')} decades")  # fmt: skip
        rule = f"supported if the interval of the difference lies above one grid step ({step:.2f} decades), refuted if below"  # fmt: skip
        if what == "trains":
            result += f" (trains: test accuracy more than {TRAINS * 100:g} points above chance); {_failures(metrics)}"  # fmt: skip
            line = stats.sensitivity(lambda t, d=diff: stats.exceeds(d, t), step / 2, (0.0, step * 1.5), lambda t: f"{t:.2f} decades")  # fmt: skip
        elif what == "stable":
            result += f" (stable: within {EPSILON * 100:g} points of the arm's best)"
            line = stats.sensitivity(lambda e: decide(_measure(metrics, e)["stable_diff"]), EPSILON, (0.02, 0.1), lambda e: f"ε = {e * 100:g} points")  # fmt: skip
        else:
            line = stats.sensitivity(lambda t, d=diff: stats.exceeds(d, t), step / 2, (0.0, step * 1.5), lambda t: f"{t:.2f} decades")  # fmt: skip
        findings.append(Finding(claim, decide(diff), result, rule, line))
    return Verdict.of(findings, "Intervals: bootstrap over seeds and test examples.")


def plot(metrics: dict) -> dict:
    fig, axes = figure(2, 1, (12, 4))
    lrs = metrics["learning_rates"]
    for arm, color in zip(ARMS, ("tab:gray", "tab:blue"), strict=True):
        table = metrics["arms"][arm]
        accuracy = np.array(table["test_correct"], dtype=float).mean(axis=2)  # (seeds, lrs)
        axes[0].semilogx(lrs, accuracy.mean(0), "o-", color=color, label=arm)
        axes[0].fill_between(lrs, accuracy.min(0), accuracy.max(0), color=color, alpha=0.2)
        loss = np.array(table["train_loss"], dtype=float)
        median = [np.median(col[np.isfinite(col)]) if np.isfinite(col).any() else np.nan for col in loss.T]  # fmt: skip
        axes[1].semilogx(lrs, median, "o-", color=color, label=arm)
    axes[0].set(xlabel="learning rate (SGD, momentum 0.9)", ylabel="test accuracy (0 = diverged)", title="accuracy")  # fmt: skip
    axes[1].set(xlabel="learning rate", ylabel="final training loss (missing = diverged)", yscale="log", title="training loss")  # fmt: skip
    axes[1].axhline(np.log(10), color="k", linestyle=":", label="chance (ln 10)")
    for ax in axes:
        ax.legend()
    caption = ("Left: final test accuracy against the learning rate (line: mean over seeds; band: min–max "
               "over seeds). Right: mean training loss of the last 50 steps (median over seeds); the dotted "
               "line is chance level, so a curve near it is a run that failed to train without diverging.")  # fmt: skip
    return {"lr_sweep": (fig, caption)}


EXPERIMENT = define(
    "lr-sweep", LrSweepConfig, run, verdict, plot,
    claim="BN trains at learning rates where the baseline fails, and its best learning rate is higher.",
    source="Ioffe & Szegedy 2015 §3.3 ('Batch Normalization enables higher learning rates'); Bjorck et al. 2018",
    setup="MLP {hidden} ReLU with and without BN; SGD momentum 0.9, batch {batch_size}, {steps} steps at each "
    "of {learning_rates} (4 per decade in full mode); {num_seeds} seeds; test accuracy and the final "
    "training loss per rate.",
    quick={"num_seeds": 2, "steps": 200, "learning_rates": tuple(np.logspace(-3, 1, 9).round(6).tolist())},
    full_runtime="measured 3.6 CPU-minutes on one thread (11 min wall on the shared, loaded 2-core machine)",
)  # fmt: skip
