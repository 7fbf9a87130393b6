"""Run the Triton kernels under Triton's CPU interpreter, or on a GPU when asked.

``BNLAB_TRITON_DEVICE=cuda`` (scripts/gpu_check.sh) runs this directory on the GPU, compiled.
Otherwise ``TRITON_INTERPRET=1`` is set here, at collection, before anything imports Triton
(Triton reads it when a kernel is defined); only Triton reads it, and no other test uses
Triton, so the rest of the suite is unaffected.
"""

import os
import sys

import pytest

DEVICE = os.environ.get("BNLAB_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "tests/kernels/cuda: Triton was imported before TRITON_INTERPRET=1 could be set; "
            "run these tests in a fresh process"
        )
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> str:
    return DEVICE
