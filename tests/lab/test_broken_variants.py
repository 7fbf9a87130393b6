"""A verdict must be able to fail: each redesigned experiment, run tiny with BN (or input
normalization) and again with it replaced by the identity (``impl='identity'``), gives a
supported sub-claim that the broken variant no longer supports. (placement and batch-size
are covered by their verdict rules on hand-made metrics in test_verdicts.py: a tiny training
run cannot settle an equivalence or a small-batch effect quickly.)"""

import pytest
import torch

from bnlab.lab.experiments import REGISTRY, Context

# (experiment, tiny config, index of the finding that must flip; None = the whole verdict)
CASES = [
    (
        "grad-histograms",
        {
            "data": "spirals",
            "archs": ("plain",),
            "depths": (10,),
            "inits": ("he_normal",),
            "width": 32,
            "batch": 64,
            "num_seeds": 3,
        },
        0,
    ),
    ("input-normalization", {"samples": 200, "num_seeds": 3}, 0),
    (
        "initializers",
        {"data": "spirals", "hidden": (16, 16), "steps": 100, "eval_every": 20, "num_seeds": 2},
        0,
    ),
    (
        "lr-sweep",
        {
            "data": "spirals",
            "learning_rates": (0.01, 0.1, 1.0, 10.0),
            "hidden": (32,) * 4,
            "steps": 100,
            "num_seeds": 2,
        },
        0,
    ),
    (
        "momentum",
        {
            "data": "spirals",
            "momenta": (0.1, 0.9),
            "batch_sizes": (2, 64),
            "hidden": (16,),
            "examples": 1000,
            "num_seeds": 2,
        },
        0,
    ),
    (
        "convergence",
        {
            "data": "spirals",
            "hidden": (16, 16, 16),
            "steps": 300,
            "eval_every": 20,
            "num_seeds": 3,
            "probe_examples": 100,
            "lr_grid": (0.1, 1.0),
            "tuning_steps": 100,
        },
        0,
    ),
    (
        "loss-landscape",
        {
            "data": "spirals",
            "hidden": (16, 16, 16),
            "steps": 200,
            "probe_every": 20,
            "probe_batch": 128,
            "num_seeds": 2,
        },
        2,
    ),
]


def _supported(name: str, config: dict, index: int | None, impl: str):
    experiment = REGISTRY[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner does: the same numbers on every machine
    try:
        config = experiment.make_config(quick=True, impl=impl, **config)
        metrics = experiment.run(config, Context(progress=False, echo=None))
    finally:
        torch.set_num_threads(threads)
    verdict = experiment.verdict(metrics)
    return verdict.supported if index is None else verdict.findings[index].supported


@pytest.mark.parametrize(("name", "config", "index"), CASES, ids=[c[0] for c in CASES])
def test_broken_variant_flips_the_verdict(name, config, index):
    assert _supported(name, config, index, "bnlab") is True
    assert _supported(name, config, index, "identity") is not True
