"""One training loop for every experiment.

SGD (momentum, weight decay) or Adam; a budget in steps or epochs; seeded shuffling;
a progress bar; evaluation every ``eval_every`` steps; early stopping on validation loss
with patience (restoring the best weights); optional probes called at each evaluation.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from bnlab.lab.data import Dataset

Probe = Callable[[nn.Module, int], dict[str, float | list[float]]]


@dataclass
class TrainConfig:
    """How to train: optimizer, budget, evaluation cadence, early stopping, seed."""

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    steps: int | None = None
    epochs: int | None = None
    eval_every: int = 50
    patience: int | None = None  # evaluations without improvement before stopping
    seed: int = 0
    record_grad_norms: bool = False  # per-parameter gradient L2 norms at each evaluation
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer: expected 'sgd' or 'adam', got {self.optimizer!r}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"steps, epochs: give exactly one, got steps={self.steps}, epochs={self.epochs}"
            )
        for name in ("lr", "batch_size", "eval_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience: expected None or >= 1, got {self.patience}")


@dataclass
class History:
    """What happened: per-step training loss, per-evaluation metrics and probe values."""

    step_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    probes: dict[str, list] = field(default_factory=dict)
    best_step: int = 0
    stopped_early: bool = False
    diverged: bool = False

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that the same command gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (code that uses the legacy global generator)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (restores the mode)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    model.train(was_training)
    return loss_sum / len(y), correct / len(y)


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each parameter's current gradient, by parameter name."""
    return {
        name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None
    }


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )


def train(
    model: nn.Module, data: Dataset, config: TrainConfig, probes: dict[str, Probe] | None = None
) -> History:
    """Train ``model`` on ``data`` as ``config`` says; returns the :class:`History`.

    Divergence (a non-finite loss) ends training and sets ``history.diverged``.
    """
    seed_everything(config.seed)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
    batches_per_epoch = max(1, len(y_train) // config.batch_size)
    total = config.steps if config.steps is not None else config.epochs * batches_per_epoch
    optimizer = _optimizer(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    history, best = History(), (math.inf, None)
    evals_since_best, window = 0, []
    order = torch.randperm(len(y_train), generator=generator)
    model.train()
    bar = tqdm(range(1, total + 1), desc=config.desc, disable=not config.progress, leave=False)
    for step in bar:
        position = (step - 1) % batches_per_epoch
        if position == 0 and step > 1:
            order = torch.randperm(len(y_train), generator=generator)
        index = order[position * config.batch_size : (position + 1) * config.batch_size]
        logits = model(x_train[index])
        loss = nn.functional.cross_entropy(logits, y_train[index])
        if not torch.isfinite(loss):
            history.diverged = True
            history.step_loss.append(float("nan"))
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.record_grad_norms and not (step % config.eval_every and step != total):
            history.probes.setdefault("grad_norm", []).append(gradient_norms(model))
        optimizer.step()
        history.step_loss.append(loss.item())
        window.append((loss.item(), (logits.argmax(1) == y_train[index]).float().mean().item()))
        if step % config.eval_every and step != total:
            continue
        val_loss, val_acc = evaluate(model, x_val, y_val)
        history.eval_steps.append(step)
        history.train_loss.append(float(np.mean([w[0] for w in window])))
        history.train_acc.append(float(np.mean([w[1] for w in window])))
        history.val_loss.append(val_loss)
        history.val_acc.append(val_acc)
        window = []
        for name, probe in (probes or {}).items():
            history.probes.setdefault(name, []).append(probe(model, step))
        bar.set_postfix(val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}")
        if val_loss < best[0]:
            best, evals_since_best = (val_loss, copy.deepcopy(model.state_dict())), 0
            history.best_step = step
        else:
            evals_since_best += 1
            if config.patience is not None and evals_since_best >= config.patience:
                history.stopped_early = True
                break
    bar.close()
    if config.patience is not None and best[1] is not None:
        model.load_state_dict(best[1])  # early stopping restores the best weights
    return history


@torch.no_grad()
def correct(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> list[int]:
    """Per-example 0/1 correctness of ``model`` in eval mode (for bootstrap over examples)."""
    was_training = model.training
    model.eval()
    hits = [
        (model(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]).int()
        for s in range(0, len(y), batch_size)
    ]
    model.train(was_training)
    return torch.cat(hits).tolist()


def steps_to_reach(eval_steps, values, target: float) -> float:
    """The first evaluation step whose value reaches ``target`` (inf if never)."""
    for step, value in zip(eval_steps, values, strict=True):
        if value >= target:
            return float(step)
    return float("inf")
