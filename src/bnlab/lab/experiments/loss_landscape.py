"""Santurkar et al. (2018), scaled down: along the gradient direction during training, how much
the loss varies, how much the gradient changes (predictiveness) and the effective
β-smoothness, for a network without BN, with BN, and with BN followed by non-stationary noise
("noisy BN": internal covariate shift put back on purpose)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnlab.inference import is_batchnorm
from bnlab.lab.data import load_dataset
from bnlab.lab.experiments.base import (
    Context,
    Experiment,
    ExperimentConfig,
    Verdict,
    register,
    seeds,
)
from bnlab.lab.models import mlp, set_bn_momentum
from bnlab.lab.train import TrainConfig, train

ARMS = ("baseline", "bn", "noisy-bn")


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
    model = mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes,
                norm="none" if arm == "baseline" else "bn", impl=config.impl)  # fmt: skip
    if arm != "noisy-bn":
        return model
    layers = []
    for module in model:
        layers.append(module)
        if is_batchnorm(module):
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
    data = load_dataset(config.data, config.data_dir)
    gen = torch.Generator().manual_seed(config.seed)
    index = torch.randperm(len(data.y_train), generator=gen)[: config.probe_batch]
    x_probe, y_probe = torch.from_numpy(data.x_train)[index], torch.from_numpy(data.y_train)[index]
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
                **{k: [s[k] for s in samples] for k in ("loss_range", "grad_change", "beta")},
            })  # fmt: skip
            final = history.val_acc[-1] if history.val_acc else float("nan")
            ctx.log(f"{arm} seed {seed}: final val acc {final:.3f}, median β {np.nanmedian(runs[-1]['beta']) if samples else float('nan'):.3g}")  # fmt: skip
        metrics["arms"][arm] = runs
    return metrics


def _median(metrics: dict, arm: str, key: str) -> float:
    values = [v for run in metrics["arms"][arm] for v in run[key][1:] if v is not None and np.isfinite(v)]  # fmt: skip
    return float(np.median(values)) if values else float("nan")


def verdict(metrics: dict) -> Verdict:
    rows = {arm: {k: _median(metrics, arm, k) for k in ("loss_range", "grad_change", "beta")} for arm in ARMS}  # fmt: skip
    final = {arm: float(np.median([r["val_acc"][-1] for r in metrics["arms"][arm] if r["val_acc"]])) for arm in ARMS}  # fmt: skip
    smoother = rows["bn"]["loss_range"] < rows["baseline"]["loss_range"] and rows["bn"]["beta"] < rows["baseline"]["beta"]  # fmt: skip
    noisy_ok = final["noisy-bn"] >= final["bn"] - 0.02
    summary = (
        "Along the gradient (medians over training and seeds), loss range / gradient change / β: "
        + "; ".join(f"{arm} {r['loss_range']:.3g} / {r['grad_change']:.3g} / {r['beta']:.3g}" for arm, r in rows.items())
        + ". Final val accuracy: " + ", ".join(f"{arm} {a:.1%}" for arm, a in final.items())
        + ". Supported needs BN's loss range and β below the baseline's, and noisy BN within 2 points of BN."
    )  # fmt: skip
    return Verdict(bool(smoother and noisy_ok), summary)


def plot(metrics: dict) -> dict:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    keys = (("loss_range", "loss variation along the gradient"), ("grad_change", "gradient predictiveness (ℓ2 change)"), ("beta", "effective β-smoothness"), ("val_acc", "validation accuracy"))  # fmt: skip
    for ax, (key, title) in zip(axes, keys, strict=True):
        for arm, color in zip(ARMS, ("tab:gray", "tab:blue", "tab:orange"), strict=True):
            for i, run in enumerate(metrics["arms"][arm]):
                ax.plot(run["eval_steps"][: len(run[key])], run[key], color=color, alpha=0.8, label=arm if i == 0 else None)  # fmt: skip
        ax.set(title=title, xlabel="training step", yscale="log" if key != "val_acc" else "linear")
        ax.legend()
    return {"loss_landscape": fig}


EXPERIMENT = register(
    Experiment(
        name="loss-landscape",
        claim="BN makes the loss landscape smoother (less loss variation and a smaller effective β "
        "along the gradient), and noisy BN still trains well, so reduced internal covariate shift is "
        "not what matters (Santurkar et al. 2018).",
        config_cls=LossLandscapeConfig,
        run=run,
        verdict=verdict,
        plot=plot,
        quick={"num_seeds": 1, "steps": 400, "probe_every": 50},
        full_runtime="about 1 minute on 2 cores (3 arms × 3 seeds × 1,200 steps, 24 probes each)",
    )
)
