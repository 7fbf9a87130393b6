"""How long one inference pass takes (for ``bnlab fold``'s before/after figure)."""

from __future__ import annotations

import statistics
from time import perf_counter

import torch
from torch import nn


def time_inference(model: nn.Module, example: torch.Tensor, repeats: int = 30) -> float:
    """Median milliseconds of one eval-mode forward pass (no grad), after 3 warm-up passes."""
    model = model.eval()
    times = []
    with torch.no_grad():
        for i in range(repeats + 3):
            started = perf_counter()
            model(example)
            if i >= 3:
                times.append(perf_counter() - started)
    return 1e3 * statistics.median(times)
