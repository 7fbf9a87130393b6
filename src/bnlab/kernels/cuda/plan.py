"""Layout and launch geometry for the Triton kernels (no Triton import here).

A tensor (N, C, *spatial) is M = N*S rows of C channels, S = prod(spatial):
* rows   (channels innermost, element (r, c) at r*C + c): (N, C) input, channels_last,
  channels_last_3d, and anything with S == 1;
* planes (NCHW, element (r, c) at (r//S)*C*S + c*S + r%S): contiguous 3-d to 5-d input.
Any other strides are copied to contiguous first (torch's output is contiguous then too).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bnlab.kernels.cuda import interpreted

FIN_K = 64  # partials reduced per finalize step
WIDE_ELEMENTS = 2**31 - 2**24  # from this many elements on, offsets are computed in int64
UPD_BLOCK = 1024  # channels per step of the running-statistics update


@dataclass(frozen=True)
class Geometry:
    rows: bool
    M: int
    C: int
    S: int


@dataclass(frozen=True)
class Pass:
    """One kernel's tiles and grid: (chunks, cblocks) CTAs, each ``tiles_per_chunk`` tiles of
    [block_r rows or planes, block_w positions or block_c channels]."""

    block_r: int
    block_c: int  # channels per tile (rows layout; 1 for planes)
    cblocks: int
    tiles_per_chunk: int
    chunks: int
    warps: int


@dataclass(frozen=True)
class Plan:
    rows: bool
    M: int
    C: int
    S: int
    wide: bool  # offsets need int64
    block_w: int  # channels (rows: = block_c of each pass) or plane positions per tile
    sblocks: int  # tiles across one plane (planes layout; 1 for rows)
    sums: Pass  # statistics / backward sums kernel
    apply: Pass  # elementwise kernels
    fin_k: int = FIN_K
    upd_block: int = UPD_BLOCK


def _channels_last(x: Tensor) -> bool:
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def geometry(x: Tensor) -> tuple[Tensor, Geometry]:
    """``x`` (copied to contiguous if neither contiguous nor channels_last) and its geometry."""
    if not (x.is_cuda or interpreted()):
        raise ValueError(
            f"input: expected a CUDA tensor for bnlab's Triton kernels, got one on {x.device} "
            "(CPU tensors run them only under TRITON_INTERPRET=1; bnlab.functional picks the "
            "kernels for each device itself)"
        )
    shape = x.shape
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:]) if len(shape) > 2 else 1
    if not x.is_contiguous():
        if _channels_last(x):
            return x, Geometry(True, N * S, C, S)
        x = x.contiguous()
    return x, Geometry(S == 1, N * S, C, S)


def to_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with ``like``'s strides (copying if needed); checks the shape."""
    if t.shape != like.shape:
        raise ValueError(
            f"expected a tensor of input's shape {tuple(like.shape)}, got {tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"expected a tensor on {like.device} like input, got {t.device}")
    if t.stride() == like.stride():
        return t
    if like.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


#: Each pass's (tile bytes, CTAs per SM, channels per tile (rows layout; 0: 64 or 128 by C),
#: warps (0: by tile size)). Rows-layout sums from a sweep on an H200 (scripts/gpu_sweep.py):
#: 64 channels x 128 bf16 rows, 2 CTAs per SM, 8 warps took the statistics pass of the
#: 256x256x56x56 bf16 channels_last tensor from 0.212 to 0.138 ms (backward sums 0.265 to
#: 0.206), of 256x2048x7x7 from 0.061 to 0.037 and of 8192x4096 from 0.070 to 0.042.
SUMS_ROWS = (16384, 2, 64, 8)
SUMS_PLANES = (16384, 4, 0, 0)
APPLY = (16384, 8, 0, 0)


def make_plan(geo: Geometry, x: Tensor) -> Plan:
    """Tile sizes and grid for ``x`` (cached per geometry, dtype and device)."""
    return _make_plan(geo, x.device, x.element_size(), x.numel())


@functools.lru_cache(maxsize=256)
def _make_plan(geo: Geometry, device: torch.device, element_size: int, numel: int, *,
               sums: tuple[int, int, int, int] | None = None,
               apply: tuple[int, int, int, int] | None = None) -> Plan:  # fmt: skip
    """Tile sizes and grid; ``sums``/``apply`` = (tile bytes, CTAs per SM, channels per tile
    (rows layout; 0: by C), warps (0: by tile size)) override the defaults (the GPU sweep)."""
    small = device.type != "cuda"  # interpreter: tiny tiles, many of them
    block_w = (8 if small else _plane_block(geo.S)) if not geo.rows else 0
    sblocks = 1 if geo.rows else math.ceil(geo.S / block_w)
    sms = 0 if small else _sm_count(device)

    def make_pass(tile_bytes: int, ctas_per_sm: int, block_c: int, warps: int, interpreter_chunks: int) -> Pass:  # fmt: skip
        if geo.rows:
            if small:
                block_c = 8
            elif not block_c:
                block_c = 64 if geo.C <= 64 else 128
            block_c = min(_pow2(geo.C), block_c)
            block_r = max(1, (64 if small else tile_bytes // element_size) // block_c)
            block_r = min(block_r, _pow2(geo.M))
            tiles = math.ceil(geo.M / block_r)
            width = block_c
        else:
            block_c = 1
            block_r = max(1, (32 if small else tile_bytes // element_size) // block_w)
            block_r = min(block_r, _pow2(geo.M // geo.S))
            tiles = math.ceil(geo.M // geo.S / block_r) * sblocks
            width = block_w
        cblocks = math.ceil(geo.C / block_c)
        if small:  # the interpreter: 2-3 chunks, so tests exercise the multi-CTA finalize
            chunks = min(tiles, interpreter_chunks)
        else:
            chunks = max(1, min(tiles, (ctas_per_sm * sms) // cblocks))
        per = math.ceil(tiles / chunks)
        if small or not warps:
            warps = 4 if small or block_r * width <= 2048 else 8
        return Pass(block_r, block_c, cblocks, per, math.ceil(tiles / per), warps)

    sums_pass = make_pass(*(sums or (SUMS_ROWS if geo.rows else SUMS_PLANES)), 3)
    apply_pass = make_pass(*(apply or APPLY), 2)
    if geo.rows:
        block_w = sums_pass.block_c  # (unused by the rows layout's kernels)
    return Plan(geo.rows, geo.M, geo.C, geo.S, numel >= WIDE_ELEMENTS, block_w, sblocks,
                sums_pass, apply_pass)  # fmt: skip


def _plane_block(S: int) -> int:
    """Positions per tile along a plane: the largest of 256..32 wasting < 4% of a row of tiles
    (56x56 = 3136: 64 exact; 28x28: 32 (2%)), else the power of two covering S (7x7: 64)."""
    for block in (256, 128, 64, 32):
        if math.ceil(S / block) * block <= 1.04 * S:
            return block
    return min(_pow2(S), 256)
