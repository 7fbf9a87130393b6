"""torch.compile on model code written like torchvision/timm: no graph breaks, same numbers.

Graph breaks are counted by ``torch._dynamo.explain``; numerics use the cheap "aot_eager"
backend (dynamo + AOT autograd, no code generation); inductor itself runs on one model.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.checks import batch, check_compiled, graph_breaks, pair
from models.zoo import MODELS


@pytest.mark.parametrize("name", MODELS)
def test_no_graph_breaks(name):
    _, ours = pair(MODELS[name])
    graph_breaks(ours, batch()[0])


@pytest.mark.parametrize("name", MODELS)
def test_compiled_aot_eager_trains_and_evaluates_like_torch(name):
    reference, ours = pair(MODELS[name])
    check_compiled(reference, ours, *batch(), backend="aot_eager")


def test_inductor_resnet_block():
    reference, ours = pair(MODELS["resnet_basic"])
    check_compiled(reference, ours, *batch(), backend="inductor")


FRESH = """
import sys, torch
sys.path.insert(0, {tests!r})
from models.checks import batch, pair
from models.zoo import MODELS
_, ours = pair(MODELS["resnet_basic"])
explanation = torch._dynamo.explain(ours)(batch()[0])
print(explanation.graph_break_count, [str(r.reason)[:200] for r in explanation.break_reasons])
"""


def test_no_graph_breaks_when_compile_is_the_first_call_in_a_process():
    """A user's first bnlab call may be under torch.compile (kernels not loaded yet)."""
    tests = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", FRESH.format(tests=tests)], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "0", done.stdout
