"""The seeds' MNIST CNN: conv–BN–ReLU blocks with dropout after BN, SGD with weight decay
and early stopping; train/val loss curves with and without BN. MNIST-1D by default; real
MNIST or CIFAR-10 when the user gives ``--data mnist|cifar10 --data-dir DIR`` (on CIFAR-10
the network is a small ResNet: ``arch='auto'``). Each arm's learning rate is tuned with the
same budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnlab.lab import stats
from bnlab.lab.experiments.base import (
    CNN_INPUTS,
    ConfigError,
    Context,
    ExperimentConfig,
    Finding,
    Verdict,
    define,
    figure,
    load_data,
    norm_of,
    seeds,
    speedup_phrase,
)
from bnlab.lab.models import cnn, resnet
from bnlab.lab.train import TrainConfig, correct, evaluate, steps_to_reach, train
from bnlab.lab.tuning import tune_lr

SPEEDUP = 1.25  # "fewer epochs": at least 1.25× fewer
NON_INFERIOR = 0.01  # "at least as accurate": no more than 1 point lower

ARMS = ("baseline", "bn")


@dataclass
class MnistCnnConfig(ExperimentConfig):
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 64
    dropout: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    epochs: int = 40
    patience: int = 5
    max_train: int | None = None
    arch: str = "auto"  # 'cnn', 'resnet', or 'auto' (a small ResNet on CIFAR-10, else the CNN)
    lr_grid: tuple[float, ...] = (0.005, 0.02, 0.05)
    tuning_epochs: int = 5

    def input_ranks(self) -> tuple[tuple[int, ...], str]:
        return ((3,), "(C, H, W) images (arch 'resnet')") if self.arch == "resnet" else CNN_INPUTS

    def check(self) -> None:
        super().check()
        if self.arch not in ("auto", "cnn", "resnet"):
            raise ConfigError("arch", f"expected 'auto', 'cnn' or 'resnet', got {self.arch!r}")


def architecture(config: MnistCnnConfig, data) -> str:
    """'resnet' or 'cnn': ``config.arch``, where 'auto' means a small ResNet on CIFAR-10."""
    if config.arch not in ("auto", "cnn", "resnet"):
        raise ValueError(f"arch: expected 'auto', 'cnn' or 'resnet', got {config.arch!r}")
    if config.arch != "auto":
        return config.arch
    return "resnet" if data.name == "cifar10" else "cnn"


def _model(arm: str, data, config: MnistCnnConfig):
    norm, impl = norm_of(arm, config.impl)
    if architecture(config, data) == "resnet":
        return resnet(data.input_shape, data.num_classes, norm=norm, impl=impl)
    return cnn(data.input_shape, data.num_classes, channels=config.channels, hidden=config.hidden, norm=norm, dropout=config.dropout, impl=impl)  # fmt: skip


def run(config: MnistCnnConfig, ctx: Context) -> dict:
    data = load_data(config, ctx, max_train=config.max_train)
    steps_per_epoch = max(1, len(data.y_train) // config.batch_size)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    metrics: dict = {"dataset": data.name, "arch": architecture(config, data), "steps_per_epoch": steps_per_epoch, "arms": {}, "tuned_lr": {}}  # fmt: skip
    tuning = TrainConfig(momentum=config.momentum, weight_decay=config.weight_decay, batch_size=config.batch_size, epochs=config.tuning_epochs, eval_every=steps_per_epoch)  # fmt: skip
    for arm in ARMS:
        lr, _ = tune_lr(lambda arm=arm: _model(arm, data, config), data, config.lr_grid, tuning, config.seed)  # fmt: skip
        metrics["tuned_lr"][arm] = lr
        ctx.log(f"{arm}: tuned lr {lr:g}")
        runs = []
        for seed in seeds(config.seed, config.num_seeds):
            torch.manual_seed(seed)
            model = _model(arm, data, config)
            train_config = TrainConfig(
                lr=lr,
                momentum=config.momentum,
                weight_decay=config.weight_decay,
                batch_size=config.batch_size,
                epochs=config.epochs,
                eval_every=steps_per_epoch,
                patience=config.patience,
                seed=seed,
                progress=ctx.progress,
                desc=f"{arm} seed {seed}",
            )
            history = train(model, data, train_config)
            test_loss, test_acc = evaluate(model, x_test, y_test)  # best weights restored
            epochs = [s / steps_per_epoch for s in history.eval_steps]
            runs.append(
                {
                    "seed": seed,
                    "epochs": epochs,
                    "train_loss": history.train_loss,
                    "val_loss": history.val_loss,
                    "val_acc": history.val_acc,
                    "best_epoch": history.best_step / steps_per_epoch,
                    "stopped_early": history.stopped_early,
                    "test_loss": test_loss,
                    "test_acc": test_acc,
                    "test_correct": correct(model, x_test, y_test),
                }
            )
            ctx.log(
                f"{arm} seed {seed}: best val loss {min(history.val_loss):.3f} at epoch "
                f"{runs[-1]['best_epoch']:.0f}, test acc {test_acc:.3f}"
                f"{' (stopped early)' if history.stopped_early else ''}"
            )
        metrics["arms"][arm] = runs
    return metrics


def verdict(metrics: dict) -> Verdict:
    ratios = []
    for base, bn in zip(metrics["arms"]["baseline"], metrics["arms"]["bn"], strict=True):
        target = -min(base["val_loss"])  # "reaching" a loss = climbing to its negative
        base_epochs = steps_to_reach(base["epochs"], [-v for v in base["val_loss"]], target)
        bn_epochs = steps_to_reach(bn["epochs"], [-v for v in bn["val_loss"]], target)
        if not np.isfinite(bn_epochs):  # never reached: censored at twice the run's length
            bn_epochs = 2.0 * max(bn["epochs"])
        ratios.append(base_epochs / bn_epochs)
    log_ratio = stats.mean_ci(np.log10(ratios))
    speedup = stats.Interval(*(10**v for v in (log_ratio.estimate, log_ratio.low, log_ratio.high)))
    have_examples = all("test_correct" in r for runs in metrics["arms"].values() for r in runs)
    cells = {arm: [r["test_correct"] if have_examples else [r["test_acc"]] for r in runs] for arm, runs in metrics["arms"].items()}  # fmt: skip
    accuracy = stats.difference_ci(cells["bn"], cells["baseline"])
    lrs = metrics.get("tuned_lr", {})
    tuned = f"; tuned lr baseline {lrs['baseline']:g}, BN {lrs['bn']:g}" if lrs else ""
    findings = [
        Finding("with BN the CNN reaches the baseline's best validation loss in fewer epochs", stats.exceeds(speedup, SPEEDUP) if len(ratios) > 1 else bool(ratios[0] > 1.0),
                f"BN reaches it {speedup_phrase(float(np.median(ratios)), 'epochs')} (median; a seed that never reaches it counts twice its run's length; per-seed "
                f"{', '.join(f'{r:.1f}×' for r in ratios)}; geometric mean {speedup.format('.2f')}×{tuned})",
                f"supported if the interval over seeds lies above {SPEEDUP}× (one seed: above 1×), refuted if below",
                stats.sensitivity(lambda t: stats.exceeds(speedup, t), SPEEDUP, (1.0, 1.5), lambda t: f"{t:g}×")),
        Finding("its test accuracy is at least as high", stats.exceeds(accuracy, -NON_INFERIOR),
                f"test accuracy BN {np.mean([np.mean(c) for c in cells['bn']]):.1%} vs baseline {np.mean([np.mean(c) for c in cells['baseline']]):.1%}; "
                f"BN − baseline {accuracy.format('+.1f', 100, ' points')} (bootstrap over seeds and test examples)",
                f"non-inferiority: supported if the interval lies above −{NON_INFERIOR * 100:g} point, refuted if below",
                stats.sensitivity(lambda t: stats.exceeds(accuracy, t), -NON_INFERIOR, (0.0, -0.02), lambda t: f"{t * 100:g} points")),
    ]  # fmt: skip
    return Verdict.of(findings)


def plot(metrics: dict) -> dict:
    fig, axes = figure(2, 1, (11, 4))
    for arm, color in zip(ARMS, ("tab:gray", "tab:blue"), strict=True):
        for i, r in enumerate(metrics["arms"][arm]):
            label = arm if i == 0 else None
            axes[0].plot(r["epochs"], r["train_loss"], "--", color=color, alpha=0.7)
            axes[0].plot(r["epochs"], r["val_loss"], color=color, label=label)
            axes[1].plot(r["epochs"], r["val_acc"], color=color, label=label)
    axes[0].set(
        xlabel="epoch",
        ylabel="loss (dashed: train)",
        title=f"CNN on {metrics['dataset']}",
        yscale="log",
    )
    axes[1].set(xlabel="epoch", ylabel="validation accuracy")
    for ax in axes:
        ax.legend()
    return {
        "loss_curves": (
            fig,
            "Left: training (dashed) and validation (solid) loss per epoch, one line per seed. Right: validation accuracy per epoch.",
        )
    }


EXPERIMENT = define(
    name="mnist-cnn",
    claim="With BN, the CNN (dropout after BN, SGD with weight decay, early stopping) reaches "
    "the baseline's best validation loss in fewer epochs, with test accuracy at least as high.",
    config_cls=MnistCnnConfig,
    run=run,
    verdict=verdict,
    plot=plot,
    quick={"epochs": 12, "num_seeds": 2, "lr_grid": (0.02, 0.05), "tuning_epochs": 3},
    full_runtime="measured 1.2 CPU-minutes on one thread (7 min wall on the shared, loaded 2-core machine)",
    source="the seeds' MNIST recipe (conv-BN-ReLU, dropout after BN, SGD with weight decay, early stopping); "
    "Ioffe & Szegedy 2015 for 'fewer epochs'",
    setup="CNN with channels {channels} and a hidden layer of {hidden} (arch {arch}: a small ResNet on CIFAR-10), "
    "dropout {dropout}, SGD momentum {momentum}, weight decay {weight_decay}, batch {batch_size}, at most "
    "{epochs} epochs with early stopping (patience {patience}); each arm's learning rate picked from {lr_grid} "
    "after {tuning_epochs} epochs on a separate tuning seed; {num_seeds} seeds; data {data}.",
)
