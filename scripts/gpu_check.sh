#!/usr/bin/env bash
# One call on a GPU machine: the CUDA parity suite (compiled Triton, no interpreter), the
# precision at large offsets, a kernel profile, the bench table and, if present, tests/models.
# Results go to $OUT (default ./gpu_out): env.txt, operator.txt, profile.txt, parity.txt, bench.md,
# bench.json, models.txt, summary.txt. No network, no pip: PYTHONPATH=src.
# About 6 minutes; more than 8 files land in $OUT (the device tool returns 8: tar them).
#   usage: OUT=/some/dir scripts/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests
PY=${PYTHON:-python}
START=$(date +%s)
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
note "env: $(tail -1 "$OUT/env.txt")"

# 1. The public doors on CUDA (builds the C++ extension first: it defines the operators).
timeout "${OPERATOR_S:-110}" $PY scripts/gpu_operator_check.py > "$OUT/operator.txt" 2>&1
note "operator: rc=$? $(tail -1 "$OUT/operator.txt") ($(( $(date +%s) - START )) s)"
grep -E "^(PASS|FAIL)" "$OUT/operator.txt" >> "$OUT/summary.txt"

# 2. The kernel parity suite compiled on the device (about 40 s of compiles).
BNLAB_TRITON_DEVICE=cuda timeout "${PARITY_S:-90}" $PY -m pytest -q -p no:cacheprovider \
    tests/kernels/cuda -rfE --durations=5 > "$OUT/parity.txt" 2>&1
note "parity: rc=$? $(tail -1 "$OUT/parity.txt") ($(( $(date +%s) - START )) s)"

# 3. Kernel time against host time, per call (torch.profiler).
timeout "${PROFILE_S:-45}" $PY scripts/gpu_profile.py > "$OUT/profile.txt" 2>&1
note "profile: rc=$? ($(( $(date +%s) - START )) s)"

timeout 30 $PY - > "$OUT/overhead.txt" 2>&1 <<'PY'
import time, torch
import torch.nn.functional as F
from bnlab.functional import batch_norm
x = torch.randn(8, 16, 4, 4, device="cuda", requires_grad=True)
dy = torch.randn_like(x)
for name, fn in (("bnlab", lambda: batch_norm(x, None, None, training=True)), ("torch", lambda: F.batch_norm(x, None, None, training=True))):
    for _ in range(20):
        fn().backward(dy)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        fn().backward(dy)
    host = (time.perf_counter() - t) / 200 * 1e6
    torch.cuda.synchronize()
    print(f"host time per train fwd+bwd call on a tiny tensor: {name} {host:.0f} us")
PY
cat "$OUT/overhead.txt" >> "$OUT/summary.txt"

timeout "${BENCH_S:-60}" $PY -m bnlab.bench.cuda --repeats 20 --out "$OUT/bench.json" \
    > "$OUT/bench.md" 2> "$OUT/bench.log"
note "bench: rc=$? ($(( $(date +%s) - START )) s)"
cat "$OUT/bench.md" >> "$OUT/summary.txt"

# 4. The CPU operator tests on this machine's torch (a version check; compiles are slow there).
timeout "${CORE_S:-60}" $PY -m pytest -q -p no:cacheprovider -x tests/test_operator.py \
    tests/test_dispatch.py > "$OUT/core.txt" 2>&1
note "core tests on this torch: rc=$? $(tail -1 "$OUT/core.txt") ($(( $(date +%s) - START )) s)"

if [ "${MODELS_S:-0}" != 0 ] && [ -d tests/models ]; then
    timeout "${MODELS_S:-70}" $PY -m pytest tests/models -q -p no:cacheprovider -rfE \
        > "$OUT/models.txt" 2>&1
    note "models: rc=$? $(tail -1 "$OUT/models.txt") ($(( $(date +%s) - START )) s)"
else
    note "models: skipped (MODELS_S=seconds runs tests/models)"
fi
