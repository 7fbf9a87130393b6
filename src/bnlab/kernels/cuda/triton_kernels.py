"""The Triton kernels: two per direction, each a streaming pass over the tensor.

The tensor is seen as M = N*S "rows" of C channels. ROWS layout (channels_last, (N, C)
input): element (r, c) at ``r*C + c``, tiles of [BLOCK_R rows, BLOCK_C channels]. Planes
(NCHW): element (n, c, s) at ``(n*C + c)*S + s``, tiles of [BLOCK_R planes, BLOCK_W
positions] of one channel (``sblocks`` tiles per plane row). A CTA owns a block of channels
and a chunk of consecutive tiles.

* ``sums_kernel``: per-chunk partial sums, written to a workspace; the last CTA of each
  channel block (an atomic ticket) reduces the partials in float64 and finalizes, so the
  statistics cost no extra launch. Forward: Σd, Σd² of d = x - shift (shift = x[0, c, 0]),
  giving mean_d, the biased variance, invstd, the unbiased variance and ``bad``.
  Backward: Σg, Σg·(x - shift - mean_d), giving grad_bias and grad_weight = invstd·Σg·d.
* ``forward_apply_kernel``: ``out = act((x - shift)·scale + K [+ residual])`` with
  ``scale = invstd·w``, ``K = b - mean_d·scale`` (x - shift first: exact at large offsets);
  in eval it also derives shift/invstd from the running statistics. Its program (0, 0) writes
  the running statistics in training, applying the ``nonfinite`` policy on the device.
* ``backward_apply_kernel``: ``g = grad_out·[out > 0]`` (ReLU), ``grad_residual = g``,
  ``dx = w·invstd·(g - Σg/M - x̂·Σg·x̂/M)`` (training) or ``w·invstd·g`` (eval).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(t, c, M, C, S, sblocks, ROWS: tl.constexpr, WIDE: tl.constexpr,
          BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):  # fmt: skip
    """Offsets and mask of tile ``t``: rows [BLOCK_R rows, BLOCK_W = BLOCK_C channels] or
    planes [BLOCK_R planes n, BLOCK_W positions s] of the single channel c (shape [1])."""
    if ROWS:
        r = t * BLOCK_R + tl.arange(0, BLOCK_R)
        m = (r < M)[:, None] & (c < C)[None, :]
        if WIDE:
            r = r.to(tl.int64)
        off = r[:, None] * C + c[None, :]
    else:
        n = (t // sblocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        s = (t % sblocks) * BLOCK_W + tl.arange(0, BLOCK_W)
        m = (n < M // S)[:, None] & (s < S)[None, :]
        if WIDE:
            n = n.to(tl.int64)
        off = (n[:, None] * C + c[None, :]) * S + s[None, :]
    return off, m


@triton.jit
def _reduce(acc, ROWS: tl.constexpr):
    """Per-channel sums of a tile accumulator: [BLOCK_C] (rows) or [1] (planes)."""
    if ROWS:
        out = tl.sum(acc, axis=0)
    else:
        out = tl.sum(tl.sum(acc, axis=1)[:, None], axis=0)
    return out


@triton.jit
def _nonfinite(v):
    # inf·0 and NaN·0 are NaN, and NaN != 0. (Not v - v: with FP fusion, a product minus
    # itself becomes an fma that returns the product's rounding error, not 0.)
    return (v * 0.0) != 0.0


@triton.jit(do_not_specialize=["M"])
def sums_kernel(
    x_ptr, g_ptr, y_ptr,
    shift_ptr, mean_d_ptr, invstd_ptr,
    out1_ptr, out2_ptr,
    part_ptr, counter_ptr,
    M, C, S, sblocks, tiles_per_chunk, num_chunks, eps_hi, eps_lo,
    BACKWARD: tl.constexpr, RELU: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    FIN_K: tl.constexpr,
):  # fmt: skip
    """Forward: writes shift, mean_d, invstd, out1 = unbiased var, out2 = bad.
    Backward: reads shift, mean_d, invstd; writes out1 = Σg (grad_bias), out2 = Σg·x̂."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if BACKWARD:
        shift = tl.load(shift_ptr + c, mask=cmask, other=0).to(ACC)
        mean_d = tl.load(mean_d_ptr + c, mask=cmask, other=0).to(ACC)
    else:
        if ROWS:
            first = c  # x[0, c, 0, ...]
        else:
            first = c * S
        shift = tl.load(x_ptr + first, mask=cmask, other=0).to(ACC)
        shift = tl.where(tl.abs(shift) < float("inf"), shift, 0)  # 0 where inf or NaN (see CPU)
    acc1 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    acc2 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    for i in range(0, tiles_per_chunk):
        off, m = _tile(pid_k * tiles_per_chunk + i, c, M, C, S, sblocks, ROWS, WIDE, BLOCK_R, BLOCK_W)  # fmt: skip
        d = tl.load(x_ptr + off, mask=m, other=0).to(ACC) - shift[None, :]
        d = tl.where(m, d, 0)
        if BACKWARD:
            d = tl.where(m, d - mean_d[None, :], 0)  # (x - shift) - mean_d: exact order
            g = tl.load(g_ptr + off, mask=m, other=0).to(ACC)
            if RELU:
                y = tl.load(y_ptr + off, mask=m, other=0).to(ACC)
                g = tl.where(y > 0, g, 0)
            acc1 += g
            acc2 += g * d
        else:
            acc1 += d
            acc2 += d * d
    tl.store(part_ptr + pid_k * C + c, _reduce(acc1, ROWS), mask=cmask)
    tl.store(part_ptr + (num_chunks + pid_k) * C + c, _reduce(acc2, ROWS), mask=cmask)
    tl.debug_barrier()  # every thread's partials are written before the ticket is taken
    ticket = tl.atomic_add(counter_ptr + pid_c, 1, sem="acq_rel")
    if ticket == num_chunks - 1:  # the last CTA of this channel block finalizes
        t1 = tl.zeros([FIN_K, BLOCK_C], dtype=tl.float64)
        t2 = tl.zeros([FIN_K, BLOCK_C], dtype=tl.float64)
        for k0 in range(0, num_chunks, FIN_K):
            k = k0 + tl.arange(0, FIN_K)
            km = (k < num_chunks)[:, None] & cmask[None, :]
            p = part_ptr + k[:, None] * C + c[None, :]
            t1 += tl.load(p, mask=km, other=0, cache_modifier=".cg").to(tl.float64)
            t2 += tl.load(p + num_chunks * C, mask=km, other=0, cache_modifier=".cg").to(tl.float64)  # fmt: skip
        s1 = tl.sum(t1, axis=0)
        s2 = tl.sum(t2, axis=0)
        n = tl.cast(M, tl.float64)
        if BACKWARD:
            invstd = tl.load(invstd_ptr + c, mask=cmask, other=0).to(tl.float64)
            tl.store(out1_ptr + c, s1.to(ACC), mask=cmask)
            tl.store(out2_ptr + c, (s2 * invstd).to(ACC), mask=cmask)
        else:
            mean_d = s1 / n
            var = s2 / n - mean_d * mean_d
            var = tl.where(var < 0, 0.0, var)  # rounding only; NaN stays NaN
            eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
            invstd = 1.0 / tl.sqrt(var + eps)
            unbiased = var * (n / tl.maximum(n - 1.0, 1.0))
            mean = shift.to(tl.float64) + mean_d
            bad = tl.where(_nonfinite(mean) | _nonfinite(unbiased), 1, 0).to(tl.uint8)
            tl.store(shift_ptr + c, shift, mask=cmask)
            tl.store(mean_d_ptr + c, mean_d.to(ACC), mask=cmask)
            tl.store(invstd_ptr + c, invstd.to(ACC), mask=cmask)
            tl.store(out1_ptr + c, unbiased.to(ACC), mask=cmask)
            tl.store(out2_ptr + c, bad, mask=cmask)
        tl.store(counter_ptr + pid_c, 0)  # the ticket counter is ready for the next call


@triton.jit
def _update_running(
    rm_ptr, rv_ptr, shift_ptr, mean_d_ptr, var_ptr, bad_ptr, C, mom_hi, mom_lo,
    POLICY: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """running = (1 - momentum)·running + momentum·batch for all C channels, by one program.
    POLICY 0 writes every channel, 1 skips bad ones, 2 writes nothing if any is bad."""
    momentum = tl.cast(mom_hi, tl.float64) + tl.cast(mom_lo, tl.float64)
    any_bad = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    if POLICY == 2:
        for c0 in range(0, C, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            b = (tl.load(bad_ptr + c, mask=c < C, other=0) != 0).to(tl.int32)
            any_bad += tl.sum(b, axis=0)
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < C
        if POLICY == 1:
            m = m & (tl.load(bad_ptr + c, mask=m, other=1) == 0)
        if POLICY == 2:
            m = m & ((c * 0 + any_bad) == 0)
        if HAS_RM:
            mean = tl.load(shift_ptr + c, mask=m, other=0).to(tl.float64)
            mean += tl.load(mean_d_ptr + c, mask=m, other=0).to(tl.float64)
            old = tl.load(rm_ptr + c, mask=m, other=0).to(tl.float64)
            new = old * (1.0 - momentum) + mean * momentum
            tl.store(rm_ptr + c, new.to(rm_ptr.dtype.element_ty), mask=m)
        if HAS_RV:
            var = tl.load(var_ptr + c, mask=m, other=0).to(tl.float64)
            old = tl.load(rv_ptr + c, mask=m, other=0).to(tl.float64)
            new = old * (1.0 - momentum) + var * momentum
            tl.store(rv_ptr + c, new.to(rv_ptr.dtype.element_ty), mask=m)


@triton.jit
def forward_apply_kernel(
    x_ptr, res_ptr, out_ptr,
    shift_ptr, mean_d_ptr, invstd_ptr, w_ptr, b_ptr,
    rm_ptr, rv_ptr, var_ptr, bad_ptr,
    M, C, S, sblocks, tiles_per_chunk, mom_hi, mom_lo, eps_hi, eps_lo,
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, POLICY: tl.constexpr, HAS_RM: tl.constexpr, HAS_RV: tl.constexpr,
    UPDATE: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, UPD_BLOCK: tl.constexpr,
):  # fmt: skip
    """out = act((x - shift)·scale + K [+ residual]); eval also writes shift/mean_d/invstd/bad;
    training (program (0, 0)) updates the running statistics."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if TRAINING:
        shift = tl.load(shift_ptr + c, mask=cmask, other=0).to(ACC)
        mean_d = tl.load(mean_d_ptr + c, mask=cmask, other=0).to(ACC)
        invstd = tl.load(invstd_ptr + c, mask=cmask, other=0).to(ACC)
    else:
        shift = tl.load(rm_ptr + c, mask=cmask, other=0).to(ACC)
        rv = tl.load(rv_ptr + c, mask=cmask, other=1).to(tl.float64)
        eps = tl.cast(eps_hi, tl.float64) + tl.cast(eps_lo, tl.float64)
        invstd = (1.0 / tl.sqrt(rv + eps)).to(ACC)
        mean_d = tl.zeros([BLOCK_C], dtype=ACC)
        if pid_k == 0:
            tl.store(shift_ptr + c, shift, mask=cmask)
            tl.store(mean_d_ptr + c, mean_d, mask=cmask)
            tl.store(invstd_ptr + c, invstd, mask=cmask)
            tl.store(bad_ptr + c, tl.zeros([BLOCK_C], dtype=tl.uint8), mask=cmask)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=0).to(ACC)
    K = -mean_d * scale
    if HAS_B:
        K += tl.load(b_ptr + c, mask=cmask, other=0).to(ACC)
    for i in range(0, tiles_per_chunk):
        off, m = _tile(pid_k * tiles_per_chunk + i, c, M, C, S, sblocks, ROWS, WIDE, BLOCK_R, BLOCK_W)  # fmt: skip
        x = tl.load(x_ptr + off, mask=m, other=0).to(ACC)
        y = (x - shift[None, :]) * scale[None, :] + K[None, :]
        if HAS_RES:
            y += tl.load(res_ptr + off, mask=m, other=0).to(ACC)
        if RELU:
            y = tl.where(y < 0, 0.0, y)  # NaN propagates, as in torch.relu
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)
    if UPDATE:  # training with running statistics
        if (pid_k == 0) & (pid_c == 0):
            _update_running(rm_ptr, rv_ptr, shift_ptr, mean_d_ptr, var_ptr, bad_ptr, C, mom_hi, mom_lo,
                            POLICY, HAS_RM, HAS_RV, UPD_BLOCK)  # fmt: skip


@triton.jit
def backward_apply_kernel(
    g_ptr, x_ptr, y_ptr, dx_ptr, dres_ptr,
    shift_ptr, mean_d_ptr, invstd_ptr, w_ptr, sum_g_ptr, sum_gx_ptr,
    M, C, S, sblocks, tiles_per_chunk,
    TRAINING: tl.constexpr, HAS_W: tl.constexpr, RELU: tl.constexpr, WANT_DX: tl.constexpr,
    WANT_DRES: tl.constexpr, ROWS: tl.constexpr, WIDE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad_residual = g; dx = w·invstd·(g - Σg/M - x̂·Σg·x̂/M) (training) or w·invstd·g."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    invstd = tl.load(invstd_ptr + c, mask=cmask, other=0).to(ACC)
    gain = invstd
    if HAS_W:
        gain = gain * tl.load(w_ptr + c, mask=cmask, other=0).to(ACC)
    if TRAINING:
        shift = tl.load(shift_ptr + c, mask=cmask, other=0).to(ACC)
        mean_d = tl.load(mean_d_ptr + c, mask=cmask, other=0).to(ACC)
        mean_g = tl.load(sum_g_ptr + c, mask=cmask, other=0).to(ACC) / M
        # x̂·mean(g·x̂) = ((x - shift) - mean_d)·invstd·mean(g·x̂), x - shift exact
        slope = tl.load(sum_gx_ptr + c, mask=cmask, other=0).to(ACC) / M * invstd
    for i in range(0, tiles_per_chunk):
        off, m = _tile(pid_k * tiles_per_chunk + i, c, M, C, S, sblocks, ROWS, WIDE, BLOCK_R, BLOCK_W)  # fmt: skip
        g = tl.load(g_ptr + off, mask=m, other=0).to(ACC)
        if RELU:
            y = tl.load(y_ptr + off, mask=m, other=0).to(ACC)
            g = tl.where(y > 0, g, 0.0)
        if WANT_DRES:
            tl.store(dres_ptr + off, g.to(dres_ptr.dtype.element_ty), mask=m)
        if WANT_DX:
            if TRAINING:
                x = tl.load(x_ptr + off, mask=m, other=0).to(ACC)
                xc = (x - shift[None, :]) - mean_d[None, :]
                dx = (g - mean_g[None, :] - xc * slope[None, :]) * gain[None, :]
            else:
                dx = g * gain[None, :]
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)
