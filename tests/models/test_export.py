"""torch.export, torch.jit.trace and torch.jit.script on model code written like torchvision/timm."""

import pytest

from models.checks import batch, check_export, check_script, check_trace, pair
from models.zoo import MODELS


@pytest.mark.parametrize("name", MODELS)
def test_export(name):
    reference, ours = pair(MODELS[name])
    check_export(reference, ours, batch()[0])


@pytest.mark.parametrize("name", MODELS)
def test_jit_trace_is_correct_or_loud(name):
    reference, ours = pair(MODELS[name])
    check_trace(reference, ours, batch()[0])


@pytest.mark.parametrize("name", MODELS)
def test_jit_script_works_or_names_the_alternative(name):
    reference, ours = pair(MODELS[name])
    check_script(reference, ours, batch()[0])
