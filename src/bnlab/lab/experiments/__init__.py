"""Experiments, registered by name on import."""

from bnlab.lab.experiments import (  # noqa: F401  (registers)
    batch_size,
    convergence,
    init_sweep,
    mnist_cnn,
    train_eval_gap,
)
from bnlab.lab.experiments.base import REGISTRY, Context, Experiment, Verdict

__all__ = ["REGISTRY", "Context", "Experiment", "Verdict"]
