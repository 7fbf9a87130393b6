"""torch's memory layout for batch norm results, for the Python paths (composite, fake,
Triton); the C++ kernels follow the same rule (``result_strides`` in cpu/forward.cpp).

torch 2.6-2.14 on the CPU (its Normalization.cpp): where the input — and, for the input
gradient, the incoming gradient too, in the same suggested memory format — is dense in some
format, the result is contiguous if the input is, else channels_last(_3d); otherwise it is in
the input's suggested format. Dense strides either way. Where this differs from the input's
own strides only in dimensions of size 1 the memory is the same, but torch's operators read
such strides differently: a 1x1 stride-2 convolution over a 1-channel input with strides
(784, 1, 28, 1) corrupted the heap in torch 2.13 (oneDNN), so bnlab's results carry torch's
strides, not the input's.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _suggested(t: Tensor) -> torch.memory_format:
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(t)


def _dense_in_a_format(t: Tensor) -> bool:
    return (
        t.is_contiguous()
        or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    )


def result_format(input: Tensor, grad_out: Tensor | None = None) -> torch.memory_format:
    """The memory format of the forward's output (``grad_out`` None) or of the input gradient
    for ``grad_out``."""
    suggested = _suggested(input)
    dense = _dense_in_a_format(input) and (
        grad_out is None or (_dense_in_a_format(grad_out) and _suggested(grad_out) == suggested)
    )
    if not dense:
        return suggested
    if input.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last_3d if input.dim() == 5 else torch.channels_last


def format_strides(shape, format: torch.memory_format) -> tuple[int, ...]:
    """The dense strides of ``format`` for ``shape``, as torch computes them (sizes of 0 count
    as 1)."""
    sizes = [max(n, 1) for n in shape]
    order = list(range(len(sizes) - 1, -1, -1))  # innermost first
    if format in (torch.channels_last, torch.channels_last_3d):
        order = [1, *range(len(sizes) - 1, 1, -1), 0]
    strides, step = [0] * len(sizes), 1
    for d in order:
        strides[d] = step
        step *= sizes[d]
    return tuple(strides)


def result_strides(input: Tensor, grad_out: Tensor | None = None) -> tuple[int, ...]:
    """The dense strides of :func:`result_format` for input's shape."""
    return format_strides(input.shape, result_format(input, grad_out))


def composite_strides(input: Tensor, grad_out: Tensor | None = None) -> tuple[int, ...] | None:
    """:func:`result_strides` for the composite's torch ops; None under a torch.func transform,
    whose tensors' strides are not the result's (and vmap can neither query channels_last
    contiguity nor copy into a new tensor): the result is then left as computed."""
    if torch._C._are_functorch_transforms_active():
        return None
    return result_strides(input, grad_out)


def in_result_layout(t: Tensor, strides: tuple[int, ...] | None) -> Tensor:
    """``t`` with ``strides``: ``t`` itself if it has them (or ``strides`` is None), else a
    copy."""
    if strides is None or t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def empty_for_kernel(x: Tensor, strides: tuple[int, ...]) -> Tensor:
    """An uninitialized tensor like ``x`` for a kernel that writes in x's layout: with
    ``strides`` where every element keeps its offset (they differ in size-1 dimensions only),
    else with x's strides (then :func:`in_result_layout` copies)."""
    same = all(n == 1 or a == b for n, a, b in zip(x.shape, x.stride(), strides, strict=True))
    return torch.empty_strided(x.shape, strides if same else x.stride(), dtype=x.dtype, device=x.device)  # fmt: skip
