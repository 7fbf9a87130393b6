"""Probes: functions called at each evaluation that measure something inside a model."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PERCENTILES = (15, 50, 85)


def input_percentiles(
    module: nn.Module, model: nn.Module, x: torch.Tensor, percentiles=PERCENTILES
):
    """A probe: per-unit percentiles of the *input* of ``module`` over the examples ``x``.

    Runs ``model`` in eval mode on ``x``; returns a (len(percentiles), units) nested list.
    """
    captured = {}

    def hook(_module, inputs, _output):
        captured["input"] = inputs[0].detach().flatten(1)

    def probe(_model: nn.Module, _step: int) -> list[list[float]]:
        handle = module.register_forward_hook(hook)
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            handle.remove()
            model.train(was_training)
        values = captured["input"].double().numpy()
        return np.percentile(values, percentiles, axis=0).tolist()

    return probe
