"""Repro of an open heap-corruption bug (see the README's "Known problem").

A new user's model-parity harness (common.py, test_models.py: torch BN vs bnlab convert()
vs fused convert, 3 SGD steps, float64 and float32) dies in cases 58-62 of its 2-D grid with
glibc's "corrupted size vs. prev_size" / "corrupted double-linked list" or a segfault, in
about one run of three with MALLOC_PERTURB_=165, rarely without. Found 2026-11-26:
  - also at the commit before that session's kernel changes (a0eb654);
  - also with BNLAB_KERNELS=0 (2 of 6 runs; bnlab's extension is then not loaded at all:
    torch.ops.bnlab is absent, so the corrupting write is in torch's operators as bnlab's
    Python/composite path calls them);
  - not with the bnlab arms replaced by copies of the torch model (6 of 6 runs clean);
  - not with only the plain or only the fused bnlab arm (6 + 6 runs clean, so not excluded);
  - an AddressSanitizer build of the C++ kernels (LD_PRELOAD=libasan) saw nothing in 3 runs.

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
