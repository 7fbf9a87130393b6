"""The kernels compile for sm_90 (H100/H200) on a machine without a GPU, with vectorized
loads in the streaming loops: what the interpreter cannot show (compiled-mode language
support, codegen). A subprocess, because this directory runs Triton in interpreter mode."""

import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90_with_vector_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[3] / "src"), env.get("PYTHONPATH", "")])  # fmt: skip
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of Triton <= 3.9, stated
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("aot_check.py"))],
                          capture_output=True, text=True, env=env, timeout=1800)  # fmt: skip  # bounds a hang only
    assert done.returncode == 0, done.stderr[-3000:]
    vector_loads = dict(line.split() for line in done.stdout.splitlines())
    assert set(vector_loads) == {"sums_planes_fwd", "sums_rows_bwd_relu", "forward_rows_add_relu_raise", "backward_planes_relu"}  # fmt: skip
    assert all(int(n) > 0 for n in vector_loads.values()), vector_loads
