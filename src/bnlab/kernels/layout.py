"""torch's memory layout for batch norm results, for the Python paths (composite, fake,
Triton); the C++ kernels follow the same rule (``result_strides`` in cpu/forward.cpp).

torch 2.6-2.14 on the CPU: the forward's output is contiguous where the input is, else in the
input's suggested memory format; the input gradient is in the suggested format; dense. Where
this differs from the input's own strides only in dimensions of size 1 the memory is the
same, but torch's operators read such strides differently: a 1x1 stride-2 convolution over a
1-channel input with strides (784, 1, 28, 1) corrupted the heap in torch 2.13, so bnlab's
results carry torch's strides, not the input's.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _suggested_format(input: Tensor) -> torch.memory_format:
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(input)


def result_format(input: Tensor, gradient: bool) -> torch.memory_format:
    """The memory format of a result of ``input``'s batch norm: the input gradient
    (``gradient``) or the forward's output."""
    if not gradient and input.is_contiguous():
        return torch.contiguous_format
    return _suggested_format(input)


def result_strides(input: Tensor, gradient: bool) -> tuple[int, ...]:
    """The dense strides of that format for input's shape."""
    return torch.empty(input.shape, device="meta", memory_format=result_format(input, gradient)).stride()  # fmt: skip


def in_result_layout(t: Tensor, input: Tensor, gradient: bool) -> Tensor:
    """``t`` (input's shape) with those strides: ``t`` itself if it has them, else a copy."""
    strides = result_strides(input, gradient)
    if t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def empty_for_kernel(x: Tensor, strides: tuple[int, ...]) -> Tensor:
    """An uninitialized tensor like ``x`` for a kernel that writes in x's layout: with
    ``strides`` where every element keeps its offset (they differ in size-1 dimensions only),
    else with x's strides (then :func:`in_result_layout` copies)."""
    same = all(n == 1 or a == b for n, a, b in zip(x.shape, x.stride(), strides, strict=True))
    return torch.empty_strided(x.shape, strides if same else x.stride(), dtype=x.dtype, device=x.device)  # fmt: skip
