"""Training, eval, checkpoints and torch.func on model code written like torchvision/timm."""

import pytest

from models.checks import (
    batch,
    check_eval,
    check_functional,
    check_state_dict,
    check_training_steps,
    pair,
)
from models.zoo import MODELS


@pytest.mark.parametrize("name", MODELS)
def test_three_sgd_steps_match_torch(name):
    reference, ours = pair(MODELS[name])
    check_training_steps(reference, ours, *batch())


@pytest.mark.parametrize("name", MODELS)
def test_eval_output_matches_torch_with_and_without_no_grad(name):
    reference, ours = pair(MODELS[name])
    check_eval(reference, ours, batch()[0])


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_loads_both_ways(name):
    reference, ours = pair(MODELS[name])
    check_state_dict(reference, ours, batch()[0])


@pytest.mark.parametrize("name", MODELS)
def test_functional_call_and_func_grad(name):
    reference, ours = pair(MODELS[name])
    check_functional(reference, ours, *batch())
