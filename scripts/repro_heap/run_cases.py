"""Repro of a heap corruption a new user's model-parity run hit (README: "Results carry
torch's strides"; found 2026-11-26, cause found and fixed the session after).

The user's harness (common.py, test_models.py: torch BN vs bnlab convert() vs fused convert,
3 SGD steps, float64 and float32) died in cases 58-62 of its 2-D grid with glibc's
"corrupted size vs. prev_size" / "corrupted double-linked list" or a segfault: 7 runs of 12
with MALLOC_PERTURB_=165. Case 60 (3 x 1 x 28 x 28, channels_last, float32) alone: bnlab's
BN outputs had the input's strides (784, 1, 28, 1) where torch's have (784, 784, 28, 1) (the
same memory); the next 1x1 stride-2 convolution's weight gradient (oneDNN, NHWC source with
1 < 16 input channels) then wrote past its workspace: min_conv.py shows it with torch alone.
Since bnlab's results carry torch's strides: 0 crashes in 8 runs.

    for i in 1 2 3 4 5 6; do MALLOC_PERTURB_=165 PYTHONPATH=src:scripts/repro_heap \\
        python scripts/repro_heap/run_cases.py 58 62 2>&1 | grep -E "corrupt|^done|Fatal"; done
"""

import faulthandler
import sys

import torch

import test_models as T
from common import Net2d

faulthandler.enable()
start, stop = int(sys.argv[1]), int(sys.argv[2])
for n, (N, C, P, cl) in enumerate(T.grid2d()):
    if start <= n <= stop:
        bott = (n % 4 == 1) and C <= 256
        tag = f"2d N{N} C{C} {P}x{P}" + (" CL" if cl else "") + (" +bottleneck" if bott else "")
        print(n, tag, flush=True)
        T.run_case(tag, lambda: Net2d(3, C, bottleneck=bott), (N, 3, P, P), memfmt=torch.channels_last if cl else None)
print("done")
