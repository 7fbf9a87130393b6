"""Run the Triton kernels under Triton's CPU interpreter, or on a GPU when asked.

``BNLAB_TRITON_DEVICE=cuda`` (scripts/gpu_check.sh) runs this directory on the GPU, compiled.
Otherwise ``TRITON_INTERPRET=1`` is set here, at collection, before anything imports Triton
(Triton reads it when a kernel is defined); only Triton reads it, and no other test uses
Triton, so the rest of the suite is unaffected.
"""

import os
import sys
from pathlib import Path

import pytest

from bnlab.kernels.cuda import MIN_TRITON, triton_version

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


def pytest_collection_modifyitems(config, items):
    """With a Triton older than the kernels need (the one torch 2.6 ships), skip this folder,
    saying so: bnlab does not use the kernels there either (``available()`` is False)."""
    version = triton_version()
    if version is None or version >= MIN_TRITON:
        return
    want, have = ".".join(map(str, MIN_TRITON)), ".".join(map(str, version))
    skip = pytest.mark.skip(reason=f"Triton {have} here; bnlab's CUDA kernels need Triton >= {want}")  # fmt: skip
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(skip)
