"""The fused C++ kernels against a float64 reference, over shapes, layouts, dtypes, threads."""

import random

import numpy as np
import pytest
import torch

from bnlab import kernels
from bnlab.functional import batch_norm

# Max error against float64, relative to max(1, |truth|): output / gradients.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    monkeypatch.setattr(kernels, "_ENABLED", True)
    assert kernels.load() is not None, "the C++ extension must build on this machine"


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _cases(count=40, seed=7):
    rng = random.Random(seed)
    shapes = [(3, 1), (5, 7), (2, 3, 1), (3, 5, 17), (1, 3, 2, 2), (7, 1, 9, 11), (3, 13, 7, 5),
              (2, 3, 2, 3, 5), (9, 33, 15, 17), (33, 64, 30), (4097, 3), (2, 4, 6, 7, 9), (1, 2, 257, 263)]  # fmt: skip
    out = []
    for _ in range(count):
        shape = rng.choice(shapes)
        layout = rng.choice(["contiguous", "channels_last"] if len(shape) >= 4 else ["contiguous"])
        out.append(
            (
                shape,
                layout,
                rng.choice(list(TOLERANCE)),
                rng.choice([True, False]),
                rng.random() < 0.5,
            )
        )
    return out


@pytest.mark.parametrize(("shape", "layout", "dtype", "training", "affine"), _cases())
def test_kernel_matches_float64(shape, layout, dtype, training, affine):
    g = torch.Generator().manual_seed(sum(shape))
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = _layout((torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype), layout)
    assert kernels.supports(x)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=param_dtype) + 0.5) if affine else None
    b = torch.randn(c, generator=g, dtype=param_dtype) if affine else None
    rm, rv = torch.randn(c, generator=g, dtype=param_dtype), torch.rand(c, generator=g, dtype=param_dtype) + 0.5  # fmt: skip
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    tol = TOLERANCE[dtype]

    def run(inp, weight, bias, mean, var):
        inp = inp.detach().requires_grad_()
        params = [p.detach().requires_grad_() if p is not None else None for p in (weight, bias)]
        out = batch_norm(inp, mean, var, params[0], params[1], training, 0.3, 1e-3)
        out.backward(dy.to(out.dtype))
        return out, inp.grad, *(p.grad for p in params if p is not None)

    ours = run(x, w, b, rm_ours := rm.clone(), rv_ours := rv.clone())
    d = lambda t: None if t is None else t.double()  # noqa: E731
    truth = run(x.double(), d(w), d(b), rm_truth := rm.double(), rv_truth := rv.double())
    if training:
        assert kernels.usable(x)
    for got, want in zip(ours, truth, strict=True):
        scale = max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() / scale <= tol
    assert torch.allclose(rm_ours.double(), rm_truth, rtol=0, atol=tol * 10)
    assert torch.allclose(rv_ours.double(), rv_truth, rtol=tol * 10, atol=tol * 10)
    assert ours[0].dtype == dtype and ours[1].stride() == x.stride()


def test_results_do_not_depend_on_thread_count():
    x = torch.randn(16, 8, 33, 31) + 100
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = batch_norm(x, None, None, training=True)
        torch.set_num_threads(2)
        two = batch_norm(x, None, None, training=True)
    finally:
        torch.set_num_threads(before)
    assert (one - two).abs().max().item() < 1e-5


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_offset_precision_on_kernels(offset):
    x = torch.randn(32, 4, 40, 40, generator=torch.Generator().manual_seed(0)) + offset
    for layout in ("contiguous", "channels_last"):
        xl = _layout(x, layout)
        truth = torch.nn.functional.batch_norm(xl.double(), None, None, training=True)
        assert (batch_norm(xl, None, None, training=True).double() - truth).abs().max() <= 1e-4


def test_unsupported_layouts_fall_back_correctly():
    x = torch.randn(4, 3, 10, 10)[:, :, ::2]  # strided: not a kernel layout
    assert not kernels.supports(x)
    truth = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    assert (batch_norm(x, None, None, training=True).double() - truth).abs().max() < 1e-5
    assert not kernels.supports(torch.randn(4, 3, dtype=torch.float64).to(torch.int32))


def test_gradient_with_a_foreign_layout_is_converted():
    x = torch.randn(4, 3, 6, 6).to(memory_format=torch.channels_last).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    dy = torch.randn(4, 3, 6, 6)  # contiguous, unlike x
    batch_norm(x, None, None, training=True).backward(dy)
    torch.nn.functional.batch_norm(x64, None, None, training=True).backward(dy.double())
    assert (x.grad.double() - x64.grad).abs().max() < 1e-5


def test_failed_build_falls_back_to_level_two(monkeypatch):
    monkeypatch.setitem(kernels._state, "module", None)
    monkeypatch.setitem(kernels._state, "error", RuntimeError("no compiler"))
    x = torch.randn(8, 3, requires_grad=True)
    out = batch_norm(x, None, None, training=True)
    assert type(out.grad_fn).__name__ == "_BatchNormFunctionBackward"


def test_build_is_cached_and_timed():
    assert kernels.compile_seconds() is None or kernels.compile_seconds() > 0
    assert kernels.build_key() == kernels.build_key()
    assert (kernels.cache_dir() / "build.json").exists() or kernels.compile_seconds() is None


def test_buffer_pool_reuses_idle_buffers_and_respects_its_budget():
    pool = kernels.BufferPool(max_idle_bytes=3 << 20)
    first = pool.take(2 << 20)
    address = first.ctypes.data
    del first
    assert pool.idle_bytes == 2 << 20
    second = pool.take(2 << 20)
    assert second.ctypes.data == address, "an idle buffer of the same size is reused"
    third = pool.take(2 << 20)
    assert third.ctypes.data != address, "a buffer in use is never handed out twice"
    del second, third
    assert pool.idle_bytes <= 3 << 20, "idle buffers beyond the budget are dropped"
    disabled = kernels.BufferPool(max_idle_bytes=0)
    buffer = disabled.take(1 << 20)
    del buffer
    assert disabled.idle_bytes == 0


def test_pooled_outputs_are_independent_tensors():
    x = torch.randn(64, 16, 32, 32)  # 4 MB: pooled
    a = batch_norm(x, None, None, training=True)
    b = batch_norm(x * 2, None, None, training=True)
    assert a.data_ptr() != b.data_ptr()
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)  # BN is scale-invariant


def test_pooled_gradient_is_kept_by_autograd_not_copied():
    x = torch.randn(64, 16, 32, 32, requires_grad=True)  # 4 MB: pooled
    out = batch_norm(x, None, None, training=True)
    assert not out._is_view()
    out.backward(torch.ones_like(out))
    pointer = x.grad.data_ptr()
    x.grad = None
    del out
    assert any(b.ctypes.data == pointer for b in kernels.POOL._idle), (
        "the grad was the pool's buffer"
    )
