"""Fair arms: every arm's learning rate tuned with the same budget on the validation split.

Each arm tries the same grid with the same number of steps on a tuning seed that no
evaluated run uses (``seed + TUNING_OFFSET``), and keeps the learning rate with the best
final validation accuracy (ties: the smaller rate). The evaluated seeds then train with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from bnlab.lab.data import Dataset
from bnlab.lab.train import TrainConfig, train

TUNING_OFFSET = 1000


def tune_lr(
    build: Callable[[], nn.Module],
    data: Dataset,
    grid: Sequence[float],
    config: TrainConfig,
    seed: int,
) -> tuple[float, dict[float, float]]:
    """``(best lr, {lr: final val accuracy})`` of ``build()`` trained as ``config`` says with
    each rate of ``grid`` (0 for a diverged run), on seed ``seed + TUNING_OFFSET``."""
    if not grid:
        raise ValueError("grid: expected at least one learning rate, got none")
    scores: dict[float, float] = {}
    for lr in grid:
        torch.manual_seed(seed + TUNING_OFFSET)
        history = train(build(), data, dataclasses.replace(config, lr=lr, seed=seed + TUNING_OFFSET, progress=False))  # fmt: skip
        scores[lr] = 0.0 if history.diverged or not history.val_acc else history.val_acc[-1]
    best = max(sorted(grid), key=lambda lr: scores[lr])
    return best, scores
