"""BN layers alone: bnlab's BatchNorm against torch's, side by side in one process.

For each shape, layout and mode, bnlab, torch native and (optionally) ``torch.compile`` are
timed alternately in the same process with the same allocator: medians of repeated runs
after warm-up. The bandwidth floor is measured in the same process too: the time to stream
the tensor-sized reads and writes no implementation can avoid (every input read once, every
output written once), as sums and copies over preallocated buffers (a read pass =
``x.sum()``, a read+write pass = ``out.copy_(x)``):

    eval forward      1 read+write (x -> out)
    training forward  1 read+write (x -> out; the statistics' read is a second one, unless
                      the data is still in cache, as in bnlab's channel-by-channel passes)
    forward+backward  the forward, + 1 read + 1 read+write (dy and x -> dx)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from bnlab import kernels
from bnlab import nn as bnn
from bnlab.bench.timing import median_ms

SHAPES = {
    "small": (32, 16, 8, 8),
    "medium": (32, 64, 28, 28),
    "large": (64, 64, 56, 56),
    "1d": (4096, 1024),
}
MODES = ("train-fwd", "train-fwd+bwd", "eval-fwd")
FLOOR_PASSES = {"eval-fwd": (0, 1), "train-fwd": (0, 1), "train-fwd+bwd": (1, 2)}  # (reads, copies)


@dataclass
class BenchRow:
    shape: str
    dims: tuple[int, ...]
    layout: str
    mode: str
    bnlab_ms: float
    torch_ms: float
    compile_ms: float | None
    floor_ms: float

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.bnlab_ms

    @property
    def of_floor(self) -> float:
        """bnlab's time as a multiple of the bandwidth floor."""
        return self.bnlab_ms / self.floor_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup, "bnlab_over_floor": self.of_floor}


def _modules(channels: int, dims: int):
    cls = {2: (bnn.BatchNorm1d, torch.nn.BatchNorm1d), 3: (bnn.BatchNorm1d, torch.nn.BatchNorm1d),
           4: (bnn.BatchNorm2d, torch.nn.BatchNorm2d), 5: (bnn.BatchNorm3d, torch.nn.BatchNorm3d)}[dims]  # fmt: skip
    return cls[0](channels), cls[1](channels)


def _step(module, x: torch.Tensor, dy: torch.Tensor, mode: str) -> Callable[[], object]:
    module.train(mode != "eval-fwd")

    def forward():
        with torch.no_grad():
            return module(x)

    def forward_backward():
        x.grad = None
        module(x).backward(dy)

    return forward_backward if mode == "train-fwd+bwd" else forward


def bandwidth_floor_ms(x: torch.Tensor, mode: str, repeats: int, warmup: int) -> float:
    out = torch.empty_like(x)
    out.copy_(x)  # touch the buffer once: the floor excludes page faults
    read = median_ms(lambda: x.sum(), repeats, warmup)
    copy = median_ms(lambda: out.copy_(x), repeats, warmup)
    reads, copies = FLOOR_PASSES[mode]
    return reads * read + copies * copy


def bench_case(
    name: str, dims: tuple[int, ...], layout: str, mode: str, *, repeats: int = 15, warmup: int = 3,
    compile: bool = False, dtype: torch.dtype = torch.float32,
) -> BenchRow:  # fmt: skip
    """Time one (shape, layout, mode): bnlab, torch (and torch.compile), and the floor."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(dims, generator=generator, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if len(dims) == 4 else torch.channels_last_3d)
    dy = torch.randn(dims, generator=generator, dtype=dtype)
    dy = dy.contiguous(
        memory_format=torch.channels_last
        if layout == "channels_last" and len(dims) == 4
        else torch.channels_last_3d
        if layout == "channels_last"
        else torch.contiguous_format
    )

    def own_input():  # each candidate frees only its own gradients inside its timed region
        return x.detach().clone().requires_grad_(mode == "train-fwd+bwd")

    ours, theirs = (m.to(dtype) for m in _modules(dims[1], len(dims)))
    candidates = {"bnlab": _step(ours, own_input(), dy, mode), "torch": _step(theirs, own_input(), dy, mode)}  # fmt: skip
    if compile:
        compiled = torch.compile(_modules(dims[1], len(dims))[1].to(dtype))
        candidates["compile"] = _step(compiled, own_input(), dy, mode)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for fn in candidates.values():  # warm-up: JIT loads, compiles, first-touch allocations
        for _ in range(warmup):
            fn()
    # Fast cases get more repetitions (about 0.3 s per candidate, at most 400): their medians
    # are otherwise at the mercy of a noisy machine.
    estimate = median_ms(candidates["torch"], 3, 0) / 1e3
    repeats = max(repeats, min(400, int(0.3 / max(estimate, 1e-6))))
    for _ in range(repeats):  # interleaved, so slow drifts of the machine hit all alike
        for key, fn in candidates.items():
            times[key].append(median_ms(fn, 1, 0))
    floor = bandwidth_floor_ms(x.detach(), mode, repeats, warmup)
    return BenchRow(
        name, tuple(dims), layout, mode, statistics.median(times["bnlab"]),
        statistics.median(times["torch"]),
        statistics.median(times["compile"]) if compile else None, floor,
    )  # fmt: skip


def cases(shapes: dict[str, tuple[int, ...]] = SHAPES) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, dims, layout) for every shape, plus channels_last for the 4-d/5-d ones."""
    out = []
    for name, dims in shapes.items():
        out.append((name, dims, "contiguous"))
        if len(dims) in (4, 5):
            out.append((name, dims, "channels_last"))
    return out


def run_benchmarks(
    shapes: dict[str, tuple[int, ...]] = SHAPES, modes=MODES, *, repeats: int = 15,
    warmup: int = 3, compile: bool = False, progress: Callable[[str], None] | None = None,
) -> dict:  # fmt: skip
    """All cases; returns a JSON-ready dict with the rows and the environment."""
    started = time.perf_counter()
    kernels.load()
    load_seconds = time.perf_counter() - started
    rows = []
    for name, dims, layout in cases(shapes):
        for mode in modes:
            row = bench_case(name, dims, layout, mode, repeats=repeats, warmup=warmup, compile=compile)  # fmt: skip
            rows.append(row.as_dict())
            if progress is not None:
                progress(f"{name} {layout} {mode}: bnlab {row.bnlab_ms:.3f} ms, torch {row.torch_ms:.3f} ms ({row.speedup:.2f}x), floor {row.floor_ms:.3f} ms")  # fmt: skip
    return {
        "rows": rows,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernels": kernels.load() is not None,
        "kernel_compile_seconds": kernels.compile_seconds(),
        "kernel_load_seconds": load_seconds,
        "repeats": repeats,
    }
