"""Precise BN: recompute every BatchNorm's population statistics from training batches.

The estimator of Ioffe & Szegedy (Alg. 2): ``E[x]`` = mean of the batch means and
``Var[x]`` = mean of the unbiased batch variances ``m/(m-1) · var_B`` (``m`` values per channel
in a batch). Statistics are taken by hooks on each BN's input, so they do not depend on the
BN's own update rule (Batch Renorm's, or one that refuses ``momentum=None``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from bnlab.nn.classes import is_batchnorm


class _Accumulator:
    """Running sums of per-channel batch means and unbiased variances, in float64."""

    def __init__(self) -> None:
        self.batches, self.means, self.variances = 0, 0.0, 0.0

    def __call__(self, _module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # (C, values)
        count = x.shape[1]
        if count < 2:
            raise ValueError(f"batches: expected more than 1 value per channel in a batch, got {count}")  # fmt: skip
        var, mean = torch.var_mean(x, dim=1, correction=1)
        self.batches += 1
        self.means = self.means + mean
        self.variances = self.variances + var


def recalibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    progress: bool = True,
) -> nn.Module:
    """Replace every BatchNorm's running statistics by population estimates from ``batches``.

    BN layers normalize the batches as in training (their own statistics) while everything
    else, their own ``act``/``drop`` children included, runs in eval mode (dropout off).
    Weights, modes, momenta and ``num_batches_tracked`` (Batch Renorm's schedule) are left as
    they were; on any error the old statistics come back. ``batches`` yields input tensors or
    tuples whose first element is the input.
    """
    from tqdm.auto import tqdm

    bns = [m for m in model.modules() if is_batchnorm(m) and m.running_mean is not None]
    if not bns:
        raise ValueError("model: expected BatchNorm layers with running statistics, found none")
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches: expected a positive integer or None, got {num_batches}")
    modes = {m: m.training for m in model.modules()}
    saved = {bn: {k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in bns}
    sums = {bn: _Accumulator() for bn in bns}
    handles = [bn.register_forward_pre_hook(sums[bn]) for bn in bns]
    seen = 0
    try:
        model.eval()
        for bn in bns:
            bn.training = True  # the BN only, not the modules inside it
        bar = tqdm(batches, total=num_batches, desc="recalibrate BN", disable=not progress, leave=False)  # fmt: skip
        with torch.no_grad():
            for batch in bar:
                if num_batches is not None and seen >= num_batches:
                    break
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                seen += 1
        if seen == 0:
            raise ValueError("batches: expected at least one batch, the iterator was empty")
        with torch.no_grad():
            for bn, entry in sums.items():
                for name, value in saved[bn].items():  # undo what the BN's own update did
                    getattr(bn, name).copy_(value)
                if entry.batches == 0:  # not called by the model: nothing to estimate from
                    continue
                bn.running_mean.copy_(entry.means / entry.batches)
                bn.running_var.copy_(entry.variances / entry.batches)
    except BaseException:  # nothing half-done: the old statistics come back
        with torch.no_grad():
            for bn, buffers in saved.items():
                for name, value in buffers.items():
                    getattr(bn, name).copy_(value)
        raise
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return model
