"""Experiments, registered by name on import."""

from bnlab.lab.experiments import convergence, init_sweep, mnist_cnn  # noqa: F401  (registers)
from bnlab.lab.experiments.base import REGISTRY, Context, Experiment, Verdict

__all__ = ["REGISTRY", "Context", "Experiment", "Verdict"]
