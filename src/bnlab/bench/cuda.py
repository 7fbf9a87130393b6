"""The CUDA benchmark: bnlab's Triton kernels against torch eager and ``torch.compile``.

Same table as the CPU bench: for each case, bnlab, torch eager and (optionally)
``torch.compile`` are timed alternately in one process with CUDA events (medians), next to
a floor = the HBM traffic the operation cannot avoid, timed as device copies of the same
bytes (a copy = one read + one write pass, so a pass = copy time / 2):

    eval-fwd        2 passes (read x, write out)
    train-fwd       3 (read x for the statistics, read x + write out)
    train-fwd+bwd   7 (the issue's count: + read x, dy for the sums, + read x, dy, write dx - 1)
    relu fwd+bwd    8 (+ read out for the ReLU mask)
    add-relu        10 (+ read residual, write grad_residual)

The fused variants are compared with torch's BN followed by the separate ops
(``relu(bn(x))``, ``relu(bn(x) + residual)``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SHAPES = {  # name: (dims, dtype, layout) — the four shapes of issue #13
    "resnet-56x56 fp32": ((64, 64, 56, 56), torch.float32, "contiguous"),
    "resnet-56x56 bf16 cl": ((256, 256, 56, 56), torch.bfloat16, "channels_last"),
    "resnet-7x7 bf16 cl": ((256, 2048, 7, 7), torch.bfloat16, "channels_last"),
    "1d bf16": ((8192, 4096), torch.bfloat16, "contiguous"),
}
MODES = ("train-fwd+bwd", "train-fwd", "eval-fwd")
FUSED = {"relu": ("resnet-56x56 fp32", "resnet-56x56 bf16 cl"),
         "add-relu": ("resnet-56x56 fp32", "resnet-56x56 bf16 cl")}  # fmt: skip
DEVICE = "cuda"  # "cpu" only for the dry run under TRITON_INTERPRET=1
ENTRY: tuple | None = None  # (batch_norm, description), chosen once per run
PASSES = {"eval-fwd": 2, "train-fwd": 3, "train-fwd+bwd": 7, "relu": 8, "add-relu": 10}


@dataclass
class CudaRow:
    case: str
    dims: tuple[int, ...]
    dtype: str
    layout: str
    mode: str
    bnlab_ms: float
    torch_ms: float
    compile_ms: float | None
    floor_ms: float

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.torch_ms / self.bnlab_ms,
                "bnlab_over_floor": self.bnlab_ms / self.floor_ms}  # fmt: skip


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _runs_triton(fn: Callable) -> bool:
    """Whether ``fn`` (a batch_norm) reaches the Triton kernels for a CUDA tensor with
    residual and ReLU (counts ``ops.forward`` calls)."""
    from bnlab.kernels.cuda import ops

    x = torch.randn(4, 3, 2, 2, device=DEVICE)
    before = ops.CALLS["forward"]
    try:
        fn(x, None, None, None, None, True, 0.1, 1e-5, residual=x, activation="relu")
    except (TypeError, ValueError, RuntimeError):
        return False
    return ops.CALLS["forward"] > before


def bnlab_batch_norm() -> tuple[Callable, str]:
    """The entry users get: ``bnlab.functional.batch_norm`` if it runs the Triton kernels on
    CUDA (the ``bnlab::`` operators with the kernels at the CUDA key), else the kernels' own
    autograd wrapper (named in the table)."""
    from bnlab import functional, kernels
    from bnlab.kernels import cuda
    from bnlab.kernels.cuda.autograd import batch_norm

    kernels.load()  # the C++ extension defines the operators the CUDA kernels register at
    if cuda.register() and _runs_triton(functional.batch_norm):
        return functional.batch_norm, "bnlab.functional.batch_norm (bnlab:: ops, Triton at the CUDA key)"  # fmt: skip
    return batch_norm, "bnlab.kernels.cuda.autograd.batch_norm (functional does not reach the Triton kernels yet)"  # fmt: skip


def _candidates(dims, dtype, layout, mode, compile_: bool):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = _layout(torch.randn(dims, device=DEVICE, dtype=dtype, generator=gen), layout)
    dy = _layout(torch.randn(dims, device=DEVICE, dtype=dtype, generator=gen), layout)
    res = _layout(torch.randn(dims, device=DEVICE, dtype=dtype, generator=gen), layout) if mode == "add-relu" else None  # fmt: skip
    C = dims[1]
    ours, _ = ENTRY or bnlab_batch_norm()
    train = mode != "eval-fwd"
    backward = mode not in ("train-fwd", "eval-fwd")
    act = "relu" if mode in ("relu", "add-relu") else None

    def make(fn):
        w = torch.ones(C, device=DEVICE, requires_grad=backward)
        b = torch.zeros(C, device=DEVICE, requires_grad=backward)
        rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
        xi = x.detach().clone().requires_grad_(backward)
        ri = None if res is None else res.detach().clone().requires_grad_(backward)

        def step():
            if backward:
                xi.grad = w.grad = b.grad = None
                if ri is not None:
                    ri.grad = None
                fn(xi, rm, rv, w, b, train, ri).backward(dy)
            else:
                with torch.no_grad():
                    fn(xi, rm, rv, w, b, train, ri)

        return step

    def bnlab_fn(xi, rm, rv, w, b, train, ri):
        return ours(xi, rm, rv, w, b, train, 0.1, 1e-5, residual=ri, activation=act)

    def torch_fn(xi, rm, rv, w, b, train, ri):
        y = F.batch_norm(xi, rm, rv, w, b, train, 0.1, 1e-5)
        if ri is not None:
            y = y + ri
        return torch.relu(y) if act else y

    out = {"bnlab": make(bnlab_fn), "torch": make(torch_fn)}
    if compile_:
        out["compile"] = make(torch.compile(torch_fn))
    return x, out


class _HostEvent:
    """A stand-in for ``torch.cuda.Event`` on the CPU (the interpreter dry run in the tests)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return 1e3 * (end.t - self.t)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn):
    if DEVICE == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    else:
        start, end = _HostEvent(), _HostEvent()
    start.record()
    fn()
    end.record()
    return start, end


def floor_ms(x: torch.Tensor, passes: int, repeats: int) -> float:
    """``passes`` tensor-sized passes at device-copy speed (a copy = 2 passes)."""
    out = torch.empty_like(x)
    for _ in range(3):
        out.copy_(x)
    events = [_timed(lambda: out.copy_(x)) for _ in range(repeats)]
    _sync()
    return statistics.median(s.elapsed_time(e) for s, e in events) * passes / 2


def bench_case(case: str, dims, dtype, layout, mode, *, repeats=50, warmup=5, compile_=False) -> CudaRow:  # fmt: skip
    x, candidates = _candidates(dims, dtype, layout, mode, compile_)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync()
    events: dict[str, list] = {k: [] for k in candidates}
    for _ in range(repeats):  # alternating: slow drifts hit every candidate alike
        for key, fn in candidates.items():
            events[key].append(_timed(fn))
    _sync()
    ms = {k: statistics.median(s.elapsed_time(e) for s, e in v) for k, v in events.items()}
    return CudaRow(case, tuple(dims), str(dtype).removeprefix("torch."), layout, mode,
                   ms["bnlab"], ms["torch"], ms.get("compile"), floor_ms(x, PASSES[mode], repeats))  # fmt: skip


def cases(shapes=None, fused=None, modes=MODES) -> list[tuple[str, tuple, torch.dtype, str, str]]:
    shapes, fused = shapes or SHAPES, FUSED if fused is None else fused
    out = [(name, *spec, mode) for name, spec in shapes.items() for mode in modes]
    out += [(name, *shapes[name], variant) for variant, names in fused.items() for name in names]
    return out


def run_benchmarks(*, repeats: int = 50, warmup: int = 5, compile_: bool = False,
                   compile_budget_s: float = 100.0, progress: Callable[[str], None] | None = None,
                   shapes=None, fused=None, modes=MODES) -> dict:  # fmt: skip
    """Every case (bnlab, torch; torch.compile for as long as ``compile_budget_s`` lasts)."""
    import triton

    global ENTRY
    ENTRY = bnlab_batch_norm()
    entry = ENTRY[1]
    rows = []
    started = time.perf_counter()
    for case, dims, dtype, layout, mode in cases(shapes, fused, modes):
        # torch.compile (tens of seconds per shape) only for the forward+backward rows, while
        # the budget lasts; the other rows show "-"
        use_compile = (compile_ and mode not in ("train-fwd", "eval-fwd")
                       and time.perf_counter() - started < compile_budget_s)  # fmt: skip
        row = bench_case(case, dims, dtype, layout, mode, repeats=repeats, warmup=warmup, compile_=use_compile)  # fmt: skip
        rows.append(row.as_dict())
        if progress is not None:
            comp = f"{row.compile_ms:.3f}" if row.compile_ms is not None else "-"
            progress(f"{case} {mode}: bnlab {row.bnlab_ms:.3f} ms, torch {row.torch_ms:.3f} ms "
                     f"({row.torch_ms / row.bnlab_ms:.2f}x), compile {comp}, floor {row.floor_ms:.3f} ms")  # fmt: skip
    return {
        "rows": rows,
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "entry": entry,
        "repeats": repeats,
    }


def format_table(result: dict) -> str:
    """A Markdown table of :func:`run_benchmarks`' rows."""
    lines = [f"{result['device']}, torch {result['torch']}, Triton {result['triton']}; bnlab = {result['entry']}",
             "", "| case | mode | bnlab ms | torch ms | compile ms | floor ms | torch/bnlab | bnlab/floor |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        comp = f"{r['compile_ms']:.3f}" if r["compile_ms"] is not None else "-"
        lines.append(f"| {r['case']} | {r['mode']} | {r['bnlab_ms']:.3f} | {r['torch_ms']:.3f} | {comp} | "
                     f"{r['floor_ms']:.3f} | {r['speedup']:.2f}x | {r['bnlab_over_floor']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def run_cli(out_dir, repeats: int, compile_: bool, echo: Callable[[str], None]) -> dict:
    """``bnlab bench --device cuda``: run, print the table, write ``bench_cuda.json``."""
    from pathlib import Path

    from bnlab.files import atomic_write_json

    if not torch.cuda.is_available():
        raise RuntimeError("bench --device cuda: expected a CUDA device, torch sees none")
    result = run_benchmarks(repeats=max(repeats, 20), compile_=compile_, progress=echo)
    echo(format_table(result))
    atomic_write_json(Path(out_dir) / "bench_cuda.json", result)
    return result


def main() -> None:
    """``python -m bnlab.bench.cuda [--compile] [--out FILE.json]``: print the table."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run_benchmarks(repeats=args.repeats, compile_=args.compile,
                            progress=lambda s: print(s, file=sys.stderr, flush=True))  # fmt: skip
    print(format_table(result))
    if args.out:
        from bnlab.files import atomic_write_json

        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
