"""On a CUDA machine: the statistics/sums kernel's time over tile sizes, CTAs per SM, channels
per tile and warps, for the bench's four shapes (forward statistics and backward sums), then
the whole training forward+backward on the kernels with the default plan and with each
shape's best sums configuration (``triton.testing.do_bench``, medians, L2 flushed between
calls). Prints one line per configuration and a summary; the plan's defaults are in
``bnlab.kernels.cuda.plan``.     usage: PYTHONPATH=src python scripts/gpu_sweep.py
"""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench

from bnlab.bench.cuda import SHAPES, _layout
from bnlab.kernels.cuda import ops, plan


def _sums_time(x, g, geo, config, backward):
    p = plan._make_plan(geo, x.device, x.element_size(), x.numel(), sums=config)
    C = x.shape[1]
    shift, mean_d, invstd, out1 = (torch.zeros(C, device="cuda") for _ in range(4))
    invstd += 1
    out2 = torch.empty(C, dtype=torch.uint8 if not backward else torch.float32, device="cuda")
    part = torch.empty(2 * p.sums.chunks * C, device="cuda")

    def run():
        ops._sums(p, x, g if backward else None, None, shift, mean_d, invstd, out1, out2, part,
                  1e-5, backward, False)  # fmt: skip

    return do_bench(run, warmup=5, rep=20, return_mode="median"), p.sums


def _train_time(x, g, sums=None):
    C = x.shape[1]
    w, b = torch.ones(C, device="cuda"), torch.zeros(C, device="cuda")
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    default = ops.make_plan

    def planned(geo, t):
        return plan._make_plan(geo, t.device, t.element_size(), t.numel(), sums=sums)

    def run():
        _, shift, mean_d, invstd, _ = ops.forward(x, w, b, None, rm, rv, True, 0.1, 1e-5, 0, 0)
        ops.backward(g, x, w, None, shift, mean_d, invstd, True, 0, [True, True, True, False])

    ops.make_plan = planned if sums else default
    try:
        return do_bench(run, warmup=5, rep=40, return_mode="median")
    finally:
        ops.make_plan = default


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    # torch's own CUDA kernels with an inf at x[0, c, 0, 0] (the interpreter test's oracle)
    for layout in ("contiguous", "channels_last"):
        x = _layout(torch.randn(4, 3, 5, 5, device="cuda"), layout)
        x[0, 1, 0, 0] = float("inf")
        bn = torch.nn.BatchNorm2d(3).cuda()
        bn(x)
        print(f"torch CUDA {layout}: running_mean[1] with inf at x[0,1,0,0] = "
              f"{bn.running_mean[1].item()}", flush=True)  # fmt: skip
    summary = []
    for case, (dims, dtype, layout) in SHAPES.items():
        x = _layout(torch.randn(dims, device="cuda", dtype=dtype), layout)
        g = _layout(torch.randn(dims, device="cuda", dtype=dtype), layout)
        x, geo = plan.geometry(x)
        channels = (64, 128) if geo.rows else (0,)
        best = {}
        for backward in (False, True):
            results = []
            for tile, ctas, block_c, warps in itertools.product(
                (4096, 8192, 16384), (2, 4, 8), channels, (4, 8)
            ):
                config = (tile, ctas, block_c, warps)
                ms, p = _sums_time(x, g, geo, config, backward)
                results.append((ms, config, p))
                print(f"{case} {'bwd' if backward else 'fwd'} {config} {p}: {ms:.4f} ms", flush=True)  # fmt: skip
            default_ms, default_p = _sums_time(x, g, geo, None, backward)
            results.sort(key=lambda r: r[0])
            best[backward] = results[0]
            line = (f"{case} sums {'bwd' if backward else 'fwd'}: default {default_ms:.4f} ms "
                    f"{default_p}; best {results[0][0]:.4f} ms {results[0][1]}")  # fmt: skip
            print(line, flush=True)
            summary.append(line)
        for backward in (False, True):
            config = best[backward][1]
            base = _train_time(x, g)
            tuned = _train_time(x, g, config)
            line = (f"{case} train fwd+bwd (ops, GPU): default plan {base:.4f} ms, sums "
                    f"{config} {tuned:.4f} ms")  # fmt: skip
            print(line, flush=True)
            summary.append(line)
    print("\nSUMMARY")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
