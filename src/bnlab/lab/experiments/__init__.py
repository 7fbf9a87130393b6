"""Experiments, registered by name on import."""

from bnlab.lab.experiments import (  # noqa: F401  (registers)
    batch_size,
    convergence,
    grad_histograms,
    init_sweep,
    initializers,
    input_normalization,
    loss_landscape,
    lr_sweep,
    mnist1d_sanity,
    mnist_cnn,
    momentum,
    placement,
    train_eval_gap,
    whitening_cost,
)
from bnlab.lab.experiments.base import REGISTRY, Context, Experiment, Verdict

__all__ = ["REGISTRY", "Context", "Experiment", "Verdict"]
