"""On a CUDA machine: where the time of one BN call goes, kernel by kernel (torch.profiler).

For the bench's four shapes, bnlab (``bnlab.functional.batch_norm``) and torch, train
forward+backward and eval forward: every GPU kernel's mean device time per call, their sum
(the GPU time a step pays once the host keeps up) and the host time per call. Tells kernel
time apart from host time, which the event timings of ``bnlab.bench.cuda`` mix.
    usage: PYTHONPATH=src python scripts/gpu_profile.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from bnlab.bench.cuda import SHAPES, _layout, bnlab_batch_norm

CALLS = 10


def _step(fn, x, dy, train, backward):
    C = x.shape[1]
    w = torch.ones(C, device="cuda", requires_grad=backward)
    b = torch.zeros(C, device="cuda", requires_grad=backward)
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    xi = x.detach().clone().requires_grad_(backward)

    def step():
        if backward:
            xi.grad = w.grad = b.grad = None
            fn(xi, rm, rv, w, b, train, 0.1, 1e-5).backward(dy)
        else:
            with torch.no_grad():
                fn(xi, rm, rv, w, b, train, 0.1, 1e-5)

    return step


def _profile(step) -> tuple[list[tuple[str, float]], float, float]:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(CALLS):
        step()
    host = (time.perf_counter() - t) / CALLS * 1e3
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev = getattr(e, "self_device_time_total", None)
        if dev is None:
            dev = e.self_cuda_time_total
        if dev > 0:
            rows.append((e.key[:70], dev / CALLS / 1e3))
    rows.sort(key=lambda r: -r[1])
    return rows, sum(r[1] for r in rows), host


def main() -> None:
    ours, entry = bnlab_batch_norm()
    print(torch.__version__, torch.cuda.get_device_name(), "bnlab =", entry)
    for case, (dims, dtype, layout) in SHAPES.items():
        x = _layout(torch.randn(dims, device="cuda", dtype=dtype), layout)
        dy = _layout(torch.randn(dims, device="cuda", dtype=dtype), layout)
        for mode, train, backward in (("train-fwd+bwd", True, True), ("eval-fwd", False, False)):
            for name, fn in (("bnlab", ours), ("torch", F.batch_norm)):
                rows, gpu, host = _profile(_step(fn, x, dy, train, backward))
                print(f"\n{case} {mode} {name}: GPU {gpu:.3f} ms/call, host {host:.3f} ms/call")
                for key, ms in rows[:6]:
                    print(f"    {ms:8.4f} ms  {key}")


if __name__ == "__main__":
    main()
