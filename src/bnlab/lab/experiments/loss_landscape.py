"""Santurkar et al. (2018), scaled down: along the gradient direction during training, how much
the loss varies, how much the gradient changes (predictiveness) and the effective
β-smoothness, for a network without BN, with BN, and with BN followed by non-stationary noise
("noisy BN": internal covariate shift put back on purpose).

BN trains far faster, so comparing at equal steps compares a network near its optimum with
one far from it. Smoothness is therefore compared at matched training loss: at each of a few
loss levels that every run reaches, the probe taken when the run's training loss first fell
to that level. Every probe is kept (including the first)."""

from __future__ import annotations

import copy
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
    norm_of,
    seeds,
)
from bnlab.lab.models import mlp, set_bn_momentum
from bnlab.lab.train import TrainConfig, correct, train
from bnlab.nn import is_batchnorm

ARMS = ("baseline", "bn", "noisy-bn")
SMOOTHER = 1.25  # "smoother": β and loss range at least 1.25× smaller at matched loss
ACCURACY_MARGIN = 0.02  # "trains as well": test accuracy within ±2 points
LEVELS = 3  # matched training-loss levels


class NoisyShift(nn.Module):
    """Adds non-stationary noise after a BN in training: every step a fresh per-channel scale
    in [1 - level/2, 1 + level] and shift in [-level, level], so the next layer's input
    distribution keeps moving."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        scale = 1 + self.level * (1.5 * torch.rand(shape) - 0.5)
        shift = self.level * (2 * torch.rand(shape) - 1)
        return x * scale + shift


@dataclass
class LossLandscapeConfig(ExperimentConfig):
    hidden: tuple[int, ...] = (100, 100, 100, 100)
    lr: float = 0.1
    steps: int = 1200
    probe_every: int = 100
    probe_batch: int = 256
    step_sizes: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0)  # multiples of lr
    noise: float = 0.5


def _model(arm: str, data, config: LossLandscapeConfig) -> nn.Module:
    norm, impl = norm_of("baseline" if arm == "baseline" else "bn", config.impl)
    model = mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes, norm=norm, impl=impl)  # fmt: skip
    if arm != "noisy-bn":
        return model
    layers = []
    for module in model:
        layers.append(module)
        if is_batchnorm(module) or (
            config.impl == "identity" and isinstance(module, nn.Linear) and module is not model[-1]
        ):
            layers.append(NoisyShift(config.noise))
    return nn.Sequential(*layers)


def _loss_and_grad(model: nn.Module, x, y) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def probe_landscape(model: nn.Module, x, y, step_sizes) -> dict:
    """Loss range, gradient change and effective β along −gradient, on a copy of ``model``.

    The noise of noisy BN is drawn with the same seed for every step size, inside a forked RNG
    so that probing does not change the training run's random numbers.
    """
    with torch.random.fork_rng():
        probe = copy.deepcopy(model).train()
        set_bn_momentum(probe, 0.0)  # keep the copy's running statistics still
        torch.manual_seed(0)
        loss0, grad0 = _loss_and_grad(probe, x, y)
        params = [p.detach().clone() for p in probe.parameters()]
        losses, changes, betas = [loss0], [], []
        for eta in step_sizes:
            with torch.no_grad():
                offset = 0
                for p, p0 in zip(probe.parameters(), params, strict=True):
                    n = p.numel()
                    p.copy_(p0 - eta * grad0[offset : offset + n].view_as(p))
                    offset += n
            torch.manual_seed(0)
            loss, grad = _loss_and_grad(probe, x, y)
            losses.append(loss)
            change = (grad - grad0).norm().item()
            changes.append(change)
            betas.append(change / max(eta * grad0.norm().item(), 1e-12))
    finite = [v for v in losses if np.isfinite(v)]
    return {"loss_range": float(max(finite) - min(finite)) if finite else float("nan"),
            "grad_change": float(max(changes)), "beta": float(max(betas))}  # fmt: skip


def run(config: LossLandscapeConfig, ctx: Context) -> dict:
    data = load_data(config, ctx)
    gen = torch.Generator().manual_seed(config.seed)
    index = torch.randperm(len(data.y_train), generator=gen)[: config.probe_batch]
    x_probe, y_probe = torch.from_numpy(data.x_train)[index], torch.from_numpy(data.y_train)[index]
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    etas = [config.lr * s for s in config.step_sizes]
    metrics: dict = {"arms": {}, "step_sizes": etas}
    for arm in ARMS:
        runs = []
        for seed in seeds(config.seed, config.num_seeds):
            torch.manual_seed(seed)
            model = _model(arm, data, config)
            probe = {"landscape": lambda m, _step: probe_landscape(m, x_probe, y_probe, etas)}
            history = train(model, data, TrainConfig(lr=config.lr, momentum=0.0, steps=config.steps,
                            eval_every=config.probe_every, seed=seed, progress=False), probe)  # fmt: skip
            samples = history.probes.get("landscape", [])
            runs.append({
                "eval_steps": history.eval_steps, "val_acc": history.val_acc, "train_loss": history.train_loss,
                "test_correct": correct(model, x_test, y_test),
                **{k: [s[k] for s in samples] for k in ("loss_range", "grad_change", "beta")},
            })  # fmt: skip
            ctx.log(f"{arm} seed {seed}: test acc {np.mean(runs[-1]['test_correct']):.3f}, final train loss {history.train_loss[-1]:.3f}")  # fmt: skip
        metrics["arms"][arm] = runs
    return metrics


def loss_levels(metrics: dict, count: int = LEVELS) -> list[float]:
    """``count`` training-loss levels every run reaches: evenly spaced from 85% of the
    highest first-probe loss down to the highest of the runs' lowest losses."""
    runs = [r for arm in metrics["arms"].values() for r in arm]
    top = 0.85 * max(r["train_loss"][0] for r in runs)
    bottom = max(min(r["train_loss"]) for r in runs)
    if not bottom < top:
        return [bottom]
    return np.linspace(top, bottom, count + 1)[1:].tolist()


def at_levels(run: dict, key: str, levels: list[float]) -> list[float]:
    """``key`` of the probe taken when the run's training loss first fell to each level."""
    values = []
    for level in levels:
        index = next(i for i, loss in enumerate(run["train_loss"]) if loss <= level + 1e-12)
        values.append(run[key][index])
    return values


def _log_smoothness(metrics: dict, arm: str, key: str, levels: list[float]) -> np.ndarray:
    """Per seed: mean over levels of log10 ``key`` at matched loss."""
    return np.array([np.mean(np.log10(np.maximum(at_levels(r, key, levels), 1e-12))) for r in metrics["arms"][arm]])  # fmt: skip


def _ratio(metrics: dict, first: str, second: str, key: str, levels) -> stats.Interval:
    interval = stats.difference_ci(_log_smoothness(metrics, first, key, levels), _log_smoothness(metrics, second, key, levels))  # fmt: skip
    return stats.Interval(*(10**v for v in (interval.estimate, interval.low, interval.high)))


def verdict(metrics: dict) -> Verdict:
    levels = loss_levels(metrics)
    shown = ", ".join(f"{v:.2f}" for v in levels)
    findings = []
    for key, name in (
        ("beta", "effective β-smoothness"),
        ("loss_range", "loss variation along the gradient"),
    ):
        ratio = _ratio(metrics, "baseline", "bn", key, levels)
        findings.append(Finding(
            f"at matched training loss, BN has a smaller {name}", stats.exceeds(ratio, SMOOTHER),
            f"baseline / BN {ratio.format('.3g')}× (geometric mean over the loss levels {shown} and seeds)",
            f"supported if the interval lies above {SMOOTHER}×, refuted if below",
            stats.sensitivity(lambda t, r=ratio: stats.exceeds(r, t), SMOOTHER, (1.0, 2.0), lambda t: f"{t:g}×"),
        ))  # fmt: skip
    accuracy = stats.difference_ci(
        [r["test_correct"] for r in metrics["arms"]["noisy-bn"]], [r["test_correct"] for r in metrics["arms"]["bn"]], confidence=0.90
    )  # fmt: skip
    findings.append(Finding(
        "noisy BN (covariate shift put back) trains as well as BN", stats.equivalent(accuracy, ACCURACY_MARGIN),
        f"test accuracy noisy BN − BN {accuracy.format('+.1f', 100, ' points')} (90% interval over seeds and test examples)",
        f"equivalent (supported) if the 90% interval lies inside ±{ACCURACY_MARGIN * 100:g} points, refuted if wholly outside",
        stats.sensitivity(lambda m: stats.equivalent(accuracy, m), ACCURACY_MARGIN, (0.01, 0.05), lambda m: f"±{m * 100:g} points"),
    ))  # fmt: skip
    noisy = _ratio(metrics, "noisy-bn", "bn", "beta", levels)
    findings.append(Finding(
        "noisy BN is as smooth as BN", stats.equivalent(stats.Interval(*(np.log10(v) for v in (noisy.estimate, noisy.low, noisy.high))), np.log10(SMOOTHER)),
        f"β at matched loss, noisy BN / BN {noisy.format('.3g')}× (read beside the accuracy row above)",
        f"context: within a factor {SMOOTHER} counts as equally smooth", "", context=True,
    ))  # fmt: skip
    accuracies = {
        arm: np.mean([np.mean(r["test_correct"]) for r in runs])
        for arm, runs in metrics["arms"].items()
    }
    note = "Test accuracy: " + ", ".join(f"{arm} {a:.1%}" for arm, a in accuracies.items()) + "."
    return Verdict.of(findings, note)


def plot(metrics: dict) -> dict:
    levels = loss_levels(metrics)
    fig, axes = figure(4, 1, (18, 4))
    keys = (("loss_range", "loss variation along the gradient"), ("grad_change", "gradient predictiveness (ℓ2 change)"), ("beta", "effective β-smoothness"))  # fmt: skip
    colors = dict(zip(ARMS, ("tab:gray", "tab:blue", "tab:orange"), strict=True))
    for ax, (key, title) in zip(axes, keys, strict=False):
        for arm in ARMS:
            for i, run in enumerate(metrics["arms"][arm]):
                ax.plot(run["train_loss"][: len(run[key])], run[key], color=colors[arm], alpha=0.7, label=arm if i == 0 else None)  # fmt: skip
        for level in levels:
            ax.axvline(level, color="k", linestyle=":", linewidth=0.8)
        ax.set(title=title, xlabel="training loss at the probe (decreasing →)", yscale="log")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
    for arm in ARMS:
        for i, run in enumerate(metrics["arms"][arm]):
            axes[3].plot(run["eval_steps"], run["val_acc"], color=colors[arm], alpha=0.7, label=arm if i == 0 else None)  # fmt: skip
    axes[3].set(title="validation accuracy", xlabel="training step")
    axes[3].legend(fontsize=8)
    caption = ("First three panels: landscape probes along the negative gradient against the training loss at "
               "which they were taken (every probe kept, one line per seed; dotted lines: the matched loss "
               "levels the verdict compares at). Last panel: validation accuracy against steps.")  # fmt: skip
    return {"loss_landscape": (fig, caption)}


EXPERIMENT = define(
    "loss-landscape", LossLandscapeConfig, run, verdict, plot,
    claim="BN makes the loss landscape smoother (smaller effective β and loss variation along the "
    "gradient, compared at matched training loss), and noisy BN still trains as well, so reduced "
    "internal covariate shift is not what matters.",
    source="Santurkar et al. 2018, 'How Does Batch Normalization Help Optimization?' (Figs. 2, 4)",
    setup="MLP {hidden} ReLU on {data}: no BN, BN, and BN followed by per-step random scale/shift noise "
    "(level {noise}); plain SGD lr {lr} (the same for all arms, so the probe step sizes match), {steps} "
    "steps; every {probe_every} steps a probe on a fixed batch of {probe_batch} moves along −gradient by "
    "{step_sizes} × lr; {num_seeds} seeds.",
    quick={"num_seeds": 2, "steps": 400, "probe_every": 50},
    full_runtime="measured 0.7 CPU-minutes on one thread (3 min wall on the shared, loaded 2-core machine)",
)  # fmt: skip
