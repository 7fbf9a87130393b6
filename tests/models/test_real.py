"""The same checks on torchvision's and timm's own models, where they import cleanly.

Skipped with the reason where they do not: here the torchvision wheel is built for CUDA torch
and does not import against the CPU torch; ``make test-compat`` and the GPU check run them.
"""

import importlib

import pytest

from models import checks

CHECKS = {
    "training": lambda r, o, x, t: checks.check_training_steps(r, o, x, t),
    "eval": lambda r, o, x, t: checks.check_eval(r, o, x),
    "state_dict": lambda r, o, x, t: checks.check_state_dict(r, o, x),
    "graph_breaks": lambda r, o, x, t: checks.graph_breaks(o, x),
    "aot_eager": lambda r, o, x, t: checks.check_compiled(r, o, x, t, "aot_eager"),
    "export": lambda r, o, x, t: checks.check_export(r, o, x),
    "trace": lambda r, o, x, t: checks.check_trace(r, o, x),
    "fold": lambda r, o, x, t: checks.check_fold(r, o, x),
}
MODELS = {
    "torchvision": ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121"],
    "timm": ["resnet18", "efficientnet_b0", "mobilenetv3_small_050"],
}


def _library(name: str):
    try:
        return importlib.import_module(name)
    except Exception as error:  # not installed, or built for another torch
        pytest.skip(f"{name} does not import here: {type(error).__name__}: {str(error)[:200]}")


def _make(library: str, model: str):
    lib = _library(library)
    if library == "timm":
        return lambda: lib.create_model(model, pretrained=False, num_classes=5)
    factory = getattr(lib.models, model)
    return lambda: factory(weights=None, num_classes=5)


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize(("library", "model"), [(lib, m) for lib, ms in MODELS.items() for m in ms])  # fmt: skip
def test_real_model(library, model, check):
    reference, ours = checks.pair(_make(library, model))
    x, target = checks.batch((2, 3, 64, 64))
    CHECKS[check](reference, ours, x, target)
