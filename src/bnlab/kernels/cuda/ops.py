"""``forward`` / ``backward``: the ``bnlab::batch_norm_forward`` / ``_backward`` semantics on
the Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

Training forward = 2 launches (statistics with a fused finalization, then normalize + the
running-statistics update), eval forward = 1, backward = 2 (1 in eval). No host sync: the
``nonfinite`` policy is applied on the device; see :mod:`.report` for how ``bad`` is reported.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from bnlab.kernels.cuda import report
from bnlab.kernels.cuda.launch import launch
from bnlab.kernels.cuda.plan import Pass, Plan, geometry, make_plan, to_layout
from bnlab.kernels.cuda.triton_kernels import (
    backward_apply_kernel,
    forward_apply_kernel,
    sums_kernel,
)
from bnlab.kernels.layout import empty_for_kernel, in_result_layout, result_strides

_COUNTERS: dict = {}
CALLS = {"forward": 0, "backward": 0}  # how often the kernels ran (the bench checks its entry)


def _acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=64)
def _split(value: float) -> tuple[float, float]:
    """value as hi + lo float32s (Triton passes float scalars as float32): ~48 exact bits."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def _counter(device: torch.device, size: int) -> Tensor:
    """Zeroed int32 tickets, one per channel block; the finalizing CTA resets its own to 0, so
    the buffer is reused (one per device and stream: launches on one stream are ordered)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < size:
        buf = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _grid(plan: Plan, p: Pass) -> dict:
    """The tile arguments of a pass (rows layout: a tile is [block_r rows, block_c channels])."""
    return dict(M=plan.M, C=plan.C, S=plan.S, sblocks=plan.sblocks, tiles_per_chunk=p.tiles_per_chunk,
                ROWS=plan.rows, WIDE=plan.wide, BLOCK_R=p.block_r,
                BLOCK_W=p.block_c if plan.rows else plan.block_w, BLOCK_C=p.block_c)  # fmt: skip


def _sums(plan: Plan, x, g, y, shift, mean_d, invstd, out1, out2, part, eps, backward, relu):
    eps_hi, eps_lo = _split(eps)
    launch(
        sums_kernel, (plan.sums.chunks, plan.sums.cblocks), plan.sums.warps,
        x_ptr=x, g_ptr=g if g is not None else x, y_ptr=y if y is not None else x,
        shift_ptr=shift, mean_d_ptr=mean_d, invstd_ptr=invstd, out1_ptr=out1, out2_ptr=out2,
        part_ptr=part, counter_ptr=_counter(x.device, plan.sums.cblocks), **_grid(plan, plan.sums),
        num_chunks=plan.sums.chunks, eps_hi=eps_hi, eps_lo=eps_lo, BACKWARD=backward, RELU=relu,
        ACC=_acc(x.dtype), FIN_K=plan.fin_k,
    )  # fmt: skip


def _forward_apply(plan: Plan, x, res, out, shift, mean_d, invstd, weight, bias, running_mean, running_var, var, bad8, training, momentum, eps, activation, nonfinite, update=True):  # fmt: skip
    """The normalization pass (+ the running-statistics update in training, if ``update``)."""
    mom_hi, mom_lo = _split(momentum)
    eps_hi, eps_lo = _split(eps)
    dummy = shift
    launch(
        forward_apply_kernel, (plan.apply.chunks, plan.apply.cblocks), plan.apply.warps,
        x_ptr=x, res_ptr=res if res is not None else x, out_ptr=out, shift_ptr=shift,
        mean_d_ptr=mean_d, invstd_ptr=invstd, w_ptr=weight if weight is not None else dummy,
        b_ptr=bias if bias is not None else dummy,
        rm_ptr=running_mean if running_mean is not None else dummy,
        rv_ptr=running_var if running_var is not None else dummy, var_ptr=var, bad_ptr=bad8,
        **_grid(plan, plan.apply), mom_hi=mom_hi, mom_lo=mom_lo, eps_hi=eps_hi, eps_lo=eps_lo, TRAINING=training, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_RES=res is not None, RELU=activation == 1, POLICY=int(nonfinite),
        HAS_RM=running_mean is not None, HAS_RV=running_var is not None,
        UPDATE=update and training and (running_mean is not None or running_var is not None),
        ACC=_acc(x.dtype), UPD_BLOCK=plan.upd_block,
    )  # fmt: skip


def _backward_apply(plan: Plan, g, x, y, dx, dres, shift, mean_d, invstd, weight, sum_g, sum_gx, training, relu):  # fmt: skip
    """dx and/or grad_residual (None: not wanted) from the per-channel sums."""
    launch(
        backward_apply_kernel, (plan.apply.chunks, plan.apply.cblocks), plan.apply.warps,
        g_ptr=g, x_ptr=x, y_ptr=y if y is not None else x, dx_ptr=dx if dx is not None else x,
        dres_ptr=dres if dres is not None else x, shift_ptr=shift, mean_d_ptr=mean_d,
        invstd_ptr=invstd, w_ptr=weight if weight is not None else invstd,
        sum_g_ptr=sum_g if sum_g is not None else invstd, sum_gx_ptr=sum_gx if sum_gx is not None else invstd,
        **_grid(plan, plan.apply), TRAINING=training, HAS_W=weight is not None, RELU=relu,
        WANT_DX=dx is not None, WANT_DRES=dres is not None, ACC=_acc(x.dtype),
    )  # fmt: skip


def forward(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, training: bool, momentum: float,
    eps: float, activation: int, nonfinite: int, report_: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(out, shift, mean_d, invstd, bad)``; ``out = act((x - shift - mean_d)·invstd·w + b
    [+ residual])`` in input's dtype and memory format; running statistics updated in place."""
    CALLS["forward"] += 1
    x, geo = geometry(input)
    acc = compute_dtype(x.dtype)
    C = x.shape[1]
    dev = x.device
    shift = torch.empty(C, dtype=acc, device=dev)
    mean_d = torch.empty(C, dtype=acc, device=dev)
    invstd = torch.empty(C, dtype=acc, device=dev)
    bad8 = torch.empty(C, dtype=torch.uint8, device=dev)  # kernels write 0/1 bytes: no i1 pointers
    bad = bad8.view(torch.bool)
    strides = result_strides(input)
    out = empty_for_kernel(x, strides)
    if x.numel() == 0:
        shift.zero_(), mean_d.zero_(), invstd.zero_(), bad.zero_()
        return out, shift, mean_d, invstd, bad
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean, running_var: expected tensors in eval mode, got None")
    res = to_layout(residual, x) if residual is not None else None
    plan = make_plan(geo, x)
    var = bad8  # (eval: unused)
    if training:  # one workspace: the chunks' partial sums, then the unbiased variance
        work = torch.empty((2 * plan.sums.chunks + 1) * C, dtype=acc, device=dev)
        part, var = work[: 2 * plan.sums.chunks * C], work[2 * plan.sums.chunks * C :]
        _sums(plan, x, None, None, shift, mean_d, invstd, var, bad8, part, eps, False, False)
    _forward_apply(plan, x, res, out, shift, mean_d, invstd, weight, bias, running_mean, running_var,
                   var, bad8, training, momentum, eps, activation, nonfinite)  # fmt: skip
    if report_ and training and nonfinite in (1, 2):
        report.report(bad, int(nonfinite))
    return in_result_layout(out, strides), shift, mean_d, invstd, bad


def backward(
    grad_out: Tensor, input: Tensor, weight: Tensor | None, output: Tensor | None,
    shift: Tensor, mean_d: Tensor, invstd: Tensor, training: bool, activation: int,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(grad_input, grad_weight, grad_bias, grad_residual)``; those not in ``output_mask``
    are empty. ``g = grad_out·[output > 0]`` for ReLU; grad_weight = Σg·x̂, grad_bias = Σg."""
    CALLS["backward"] += 1
    want_dx, want_dw, want_db, want_dres = (bool(v) for v in output_mask)
    relu = activation == 1
    if relu and output is None:
        raise ValueError("output: expected the forward's output for activation=1 (ReLU), got None")
    x, geo = geometry(input)
    g = to_layout(grad_out, x)
    y = to_layout(output, x) if relu else None
    acc = compute_dtype(x.dtype)
    C, dev = x.shape[1], x.device
    empty = torch.empty(0, dtype=acc, device=dev)
    need_sums = want_dw or want_db or (want_dx and training)
    make = torch.zeros if x.numel() == 0 else torch.empty  # an empty batch sums to zero
    sum_g = make(C, dtype=acc, device=dev) if need_sums else empty
    sum_gx = make(C, dtype=acc, device=dev) if need_sums else empty
    strides = result_strides(input, grad_out)
    dx = empty_for_kernel(x, strides) if want_dx else torch.empty(0, dtype=x.dtype, device=dev)
    dres = empty_for_kernel(x, strides) if want_dres else torch.empty(0, dtype=x.dtype, device=dev)
    if x.numel() > 0:
        plan = make_plan(geo, x)
        if need_sums:
            part = torch.empty(2 * plan.sums.chunks * C, dtype=acc, device=dev)
            _sums(plan, x, g, y, shift, mean_d, invstd, sum_g, sum_gx, part, 1.0, True, relu)
        if want_dx or want_dres:
            _backward_apply(plan, g, x, y, dx if want_dx else None, dres if want_dres else None,
                            shift, mean_d, invstd, weight, sum_g if need_sums else None,
                            sum_gx if need_sums else None, training, relu)  # fmt: skip
    return (
        in_result_layout(dx, strides) if want_dx else dx,
        sum_gx if want_dw else empty,
        sum_g if want_db else empty,
        in_result_layout(dres, strides) if want_dres else dres,
    )


# SyncBatchNorm's per-rank passes (bnlab.nn.sync): the same kernels, with the statistics
# merged across ranks between them.


def moments(input: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """This rank's ``(shift, mean_d, M2, count)`` per channel from the statistics kernel:
    ``mean_d = mean(x - shift)``, ``M2 = Σ(x - shift - mean_d)²`` (compute dtype)."""
    x, geo = geometry(input)
    acc, C, dev = compute_dtype(x.dtype), x.shape[1], x.device
    count = x.numel() // C if C else 0
    shift, mean_d, invstd, var = (torch.zeros(C, dtype=acc, device=dev) for _ in range(4))
    if count == 0:
        return shift, mean_d, var, 0
    bad8 = torch.empty(C, dtype=torch.uint8, device=dev)
    plan = make_plan(geo, x)
    part = torch.empty(2 * plan.sums.chunks * C, dtype=acc, device=dev)
    _sums(plan, x, None, None, shift, mean_d, invstd, var, bad8, part, 1.0, False, False)
    m2 = var * (count - 1) if count > 1 else torch.zeros_like(var)  # var: the unbiased one
    return shift, mean_d, m2, count


def normalize(input: Tensor, shift: Tensor, mean_d: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:  # fmt: skip
    """``(x - shift - mean_d)·invstd·w + b`` with given statistics, input's dtype and layout."""
    x, geo = geometry(input)
    out = torch.empty_like(x)
    if x.numel():
        _forward_apply(make_plan(geo, x), x, None, out, shift, mean_d, invstd, weight, bias,
                       None, None, shift, shift, True, 0.0, 1.0, 0, 0, update=False)  # fmt: skip
    return out


def grad_sums(grad_out: Tensor, input: Tensor, shift: Tensor, mean_d: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
    """This rank's ``(Σg, Σg·x̂)`` per channel (compute dtype)."""
    x, geo = geometry(input)
    acc, C, dev = compute_dtype(x.dtype), x.shape[1], x.device
    sum_g, sum_gx = torch.zeros(C, dtype=acc, device=dev), torch.zeros(C, dtype=acc, device=dev)
    if x.numel():
        plan = make_plan(geo, x)
        part = torch.empty(2 * plan.sums.chunks * C, dtype=acc, device=dev)
        _sums(plan, x, to_layout(grad_out, x), None, shift, mean_d, invstd, sum_g, sum_gx, part, 1.0, True, False)  # fmt: skip
    return sum_g, sum_gx


def grad_input(grad_out: Tensor, input: Tensor, weight: Tensor | None, shift: Tensor, mean_d: Tensor, invstd: Tensor, sum_g: Tensor, sum_gx: Tensor, count: int) -> Tensor:  # fmt: skip
    """``dx = w·invstd·(g - Σg/count - x̂·Σg·x̂/count)``, the sums over ``count`` values of every
    rank (the kernel divides by this rank's count: the sums are rescaled to it)."""
    x, geo = geometry(input)
    dx = torch.empty_like(x)
    if x.numel():
        plan = make_plan(geo, x)
        scale = plan.M / count
        _backward_apply(plan, to_layout(grad_out, x), x, None, dx, None, shift, mean_d, invstd,
                        weight, sum_g * scale, sum_gx * scale, True, False)  # fmt: skip
    return dx
