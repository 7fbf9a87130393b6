"""Kernel launches: ``fn[grid](**kwargs, num_warps=...)`` through Triton's own JIT path.

A cached direct launcher (skipping Triton's argument binder) was tried on the H200 and
removed: with constexpr block sizes keyed too coarsely it reused a kernel compiled for other
tile sizes (wrong results), and Triton 3.6 already specializes arguments natively, so the
binder is not where the host time goes (see README "CUDA": the Python around the launches is).
"""

from __future__ import annotations


def launch(fn, grid: tuple[int, int], num_warps: int, **kwargs) -> None:
    """``fn[grid](**kwargs, num_warps=num_warps)``."""
    fn[grid](**kwargs, num_warps=num_warps)
