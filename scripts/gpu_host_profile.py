"""On a CUDA machine: where the host time of one ``bnlab.functional.batch_norm`` call goes
(cProfile of Python, torch.profiler's CPU-side ops and CUDA runtime calls), for a training
forward+backward and an eval forward on a tiny and a 64x64x56x56 tensor; torch alongside.
    usage: PYTHONPATH=src python scripts/gpu_host_profile.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from gpu_profile import _step  # (scripts/: the folder of this script)
from torch.profiler import ProfilerActivity, profile

from bnlab.bench.cuda import bnlab_batch_norm

STEPS = 20


def main() -> None:
    ours, entry = bnlab_batch_norm()
    print(torch.__version__, torch.cuda.get_device_name(), "bnlab =", entry, flush=True)
    for dims in ((8, 16, 4, 4), (64, 64, 56, 56)):
        for train in (True, False):
            for name, fn in (("bnlab", ours), ("torch", F.batch_norm)):
                x, dy = torch.randn(dims, device="cuda"), torch.randn(dims, device="cuda")
                step = _step(fn, x, dy, train, train)
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(STEPS):
                    step()
                host = (time.perf_counter() - t) / STEPS * 1e6
                torch.cuda.synchronize()
                print(f"\n=== {dims} {'train fwd+bwd' if train else 'eval'} {name}: host {host:.0f} us/call")  # fmt: skip
                if name == "torch":
                    continue
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(STEPS):
                        step()
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
                print(table, flush=True)
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(STEPS):
                    step()
                pr.disable()
                torch.cuda.synchronize()
                out = io.StringIO()
                pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(14)
                print(out.getvalue()[-3500:], flush=True)


if __name__ == "__main__":
    main()
