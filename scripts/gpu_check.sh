#!/usr/bin/env bash
# One call on a GPU machine: the CUDA parity suite (compiled Triton, no interpreter), the
# precision at large offsets, the bench table and, if present, tests/models.
# Results go to $OUT (default ./gpu_out): env.txt, parity.txt, precision.txt, bench.md,
# bench.json, models.txt, summary.txt. No network, no pip: PYTHONPATH=src.
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

BNLAB_TRITON_DEVICE=cuda timeout "${PARITY_S:-120}" $PY -m pytest -q -p no:cacheprovider \
    tests/kernels/cuda -rfE --durations=5 > "$OUT/parity.txt" 2>&1
note "parity: rc=$? $(tail -1 "$OUT/parity.txt") ($(( $(date +%s) - START )) s)"

timeout 45 $PY - > "$OUT/precision.txt" 2>&1 <<'PY'
import torch
import torch.nn.functional as F
from bnlab.kernels.cuda.autograd import batch_norm
torch.manual_seed(0)
print("| offset | torch fp32 max error vs float64 | bnlab fp32 max error vs float64 | bnlab dx error |")
print("|---|---|---|---|")
for offset in (0.0, 1e4, 1e6):
    x = (torch.randn(64, 64, 56, 56, device="cuda") + offset).requires_grad_()
    dy = torch.randn_like(x)
    x64 = x.detach().double().requires_grad_()
    want = F.batch_norm(x64, None, None, training=True)
    want.backward(dy.double())
    theirs = F.batch_norm(x.detach(), None, None, training=True)
    ours = batch_norm(x, None, None, None, None, True)
    ours.backward(dy)
    err = lambda a, b: float((a.double() - b).abs().max())
    print(f"| {offset:g} | {err(theirs, want):.2e} | {err(ours, want):.2e} | {err(x.grad, x64.grad):.2e} |")
PY
note "precision: rc=$? ($(( $(date +%s) - START )) s)"

timeout 45 $PY - > "$OUT/overhead.txt" 2>&1 <<'PY'
import time, torch
import torch.nn.functional as F
from bnlab.kernels.cuda.autograd import batch_norm
x = torch.randn(8, 16, 4, 4, device="cuda", requires_grad=True)
dy = torch.randn_like(x)
for name, fn in (("bnlab", lambda: batch_norm(x, None, None, None, None, True)), ("torch", lambda: F.batch_norm(x, None, None, training=True))):
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
cat "$OUT/precision.txt" >> "$OUT/summary.txt"

timeout "${BENCH_S:-170}" $PY -m bnlab.bench.cuda --compile --out "$OUT/bench.json" \
    > "$OUT/bench.md" 2> "$OUT/bench.log"
note "bench: rc=$? ($(( $(date +%s) - START )) s)"
cat "$OUT/bench.md" >> "$OUT/summary.txt"

if [ -d tests/models ]; then
    timeout "${MODELS_S:-60}" $PY -m pytest tests/models -q -p no:cacheprovider -rfE \
        > "$OUT/models.txt" 2>&1
    note "models: rc=$? $(tail -1 "$OUT/models.txt") ($(( $(date +%s) - START )) s)"
else
    note "models: tests/models absent"
fi
