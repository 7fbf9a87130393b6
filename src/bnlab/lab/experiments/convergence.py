"""Ioffe & Szegedy (2015), Figure 1, scaled down: an MLP of 3×100 sigmoid units, with and
without BN; validation accuracy against steps, and the 15th/50th/85th percentiles of the
inputs of the last hidden layer's sigmoids over training."""

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
    speedup_phrase,
)
from bnlab.lab.models import mlp
from bnlab.lab.probes import PERCENTILES, input_percentiles
from bnlab.lab.train import TrainConfig, train

ARMS = ("baseline", "bn")


@dataclass
class ConvergenceConfig(ExperimentConfig):
    data: str = "mnist1d"
    hidden: tuple[int, ...] = (100, 100, 100)
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 60
    steps: int = 6000
    eval_every: int = 100
    probe_examples: int = 500


def _drift(percentiles: np.ndarray) -> float:
    """Path length of the percentile trajectories, in units of each unit's final spread.

    ``percentiles`` has shape (evaluations, 3, units); averaged over units and percentiles.
    """
    spread = np.maximum(percentiles[-1, -1] - percentiles[-1, 0], 1e-6)
    path = np.abs(np.diff(percentiles, axis=0)).sum(axis=0)
    return float((path / spread).mean())


def steps_to_reach(eval_steps, accuracy, target: float) -> float:
    """The first evaluation step whose accuracy reaches ``target`` (inf if never)."""
    for step, acc in zip(eval_steps, accuracy, strict=True):
        if acc >= target:
            return float(step)
    return float("inf")


def run(config: ConvergenceConfig, ctx: Context) -> dict:
    data = load_dataset(config.data, config.data_dir)
    ctx.log(data.describe())
    probe_x = torch.from_numpy(data.x_val[: config.probe_examples])
    metrics: dict = {"percentiles": list(PERCENTILES), "arms": {}}
    for arm in ARMS:
        runs = []
        for seed in seeds(config.seed, config.num_seeds):
            torch.manual_seed(seed)
            model = mlp(
                int(np.prod(data.input_shape)),
                config.hidden,
                data.num_classes,
                norm="none" if arm == "baseline" else "bn",
                activation="sigmoid",
                impl=config.impl,
            )
            last_sigmoid = [m for m in model if isinstance(m, torch.nn.Sigmoid)][-1]
            train_config = TrainConfig(
                lr=config.lr,
                momentum=config.momentum,
                batch_size=config.batch_size,
                steps=config.steps,
                eval_every=config.eval_every,
                seed=seed,
                progress=ctx.progress,
                desc=f"{arm} seed {seed}",
            )
            probe = input_percentiles(last_sigmoid, model, probe_x)
            history = train(model, data, train_config, {"sigmoid_input": probe})
            trajectory = np.array(history.probes["sigmoid_input"])  # (evals, 3, units)
            runs.append(
                {
                    "seed": seed,
                    "eval_steps": history.eval_steps,
                    "val_acc": history.val_acc,
                    "val_loss": history.val_loss,
                    "unit0_percentiles": trajectory[:, :, 0].tolist(),
                    "drift": _drift(trajectory),
                }
            )
            ctx.log(
                f"{arm} seed {seed}: final val acc {history.val_acc[-1]:.3f}, drift {runs[-1]['drift']:.2f}"
            )
        metrics["arms"][arm] = runs
    return metrics


def _final(run_metrics: dict, last: int = 3) -> float:
    return float(np.mean(run_metrics["val_acc"][-last:]))


def verdict(metrics: dict) -> Verdict:
    base_runs, bn_runs = metrics["arms"]["baseline"], metrics["arms"]["bn"]
    ratios, drifts = [], []
    for base, bn in zip(base_runs, bn_runs, strict=True):
        target = _final(base)
        base_steps = steps_to_reach(base["eval_steps"], base["val_acc"], target)
        bn_steps = steps_to_reach(bn["eval_steps"], bn["val_acc"], target)
        ratios.append(base_steps / bn_steps)
        drifts.append((base["drift"], bn["drift"]))
    ratio = float(np.median(ratios))
    drift_base = float(np.median([d[0] for d in drifts]))
    drift_bn = float(np.median([d[1] for d in drifts]))
    faster, stabler = ratio > 1.0, drift_bn < drift_base
    target = np.mean([_final(b) for b in base_runs])
    summary = (
        f"BN reaches the baseline's final val accuracy ({target:.1%}) {speedup_phrase(ratio, 'steps')} "
        f"(median of {len(ratios)} seed(s), per-seed {', '.join(f'{r:.1f}×' for r in ratios)}); "
        f"drift of the last layer's sigmoid-input percentiles: baseline {drift_base:.2f}, "
        f"BN {drift_bn:.2f} (path length / final 15–85 spread)."
    )
    if not faster:
        summary += " BN was not faster here."
    if not stabler:
        summary += " BN's input distribution did not drift less here."
    return Verdict(faster and stabler, summary)


def plot(metrics: dict) -> dict:
    import matplotlib.pyplot as plt

    fig_acc, ax = plt.subplots(figsize=(6, 4))
    for arm, color in zip(ARMS, ("tab:gray", "tab:blue"), strict=True):
        for i, r in enumerate(metrics["arms"][arm]):
            ax.plot(
                r["eval_steps"], r["val_acc"], color=color, alpha=0.8, label=arm if i == 0 else None
            )
    ax.set(xlabel="training step", ylabel="validation accuracy", title="(a) Convergence")
    ax.legend()
    fig_pct, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, arm in zip(axes, ARMS, strict=True):
        r = metrics["arms"][arm][0]
        values = np.array(r["unit0_percentiles"])
        for k, pct in enumerate(metrics["percentiles"]):
            ax.plot(r["eval_steps"], values[:, k], label=f"{pct}th")
        ax.set(xlabel="training step", title=f"{arm}: sigmoid input of one last-layer unit")
        ax.legend()
    axes[0].set_ylabel("sigmoid input")
    return {"convergence": fig_acc, "sigmoid_input": fig_pct}


EXPERIMENT = register(
    Experiment(
        name="convergence",
        claim="BN reaches the baseline's final accuracy in fewer steps, and the distribution "
        "of its sigmoid inputs stays stable while the baseline's drifts (Ioffe & Szegedy 2015, Fig. 1).",
        config_cls=ConvergenceConfig,
        run=run,
        verdict=verdict,
        plot=plot,
        quick={"steps": 1500, "num_seeds": 1, "eval_every": 50},
        full_runtime="about 1.5 minutes on 2 cores (3 seeds × 2 arms × 6,000 steps)",
    )
)
