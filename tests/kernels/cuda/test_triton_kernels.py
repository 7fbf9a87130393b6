"""The Triton kernels against bnlab.reference (float64 NumPy) and torch (float64).

Under the interpreter (CPU tensors, tiny shapes; tiles of 8 x 8 / 32 elements, so odd sizes
span several tiles, chunks and channel blocks) or on a GPU (BNLAB_TRITON_DEVICE=cuda).
"""

import numpy as np
import pytest
import torch

from bnlab import reference
from bnlab.kernels.cuda import ops
from bnlab.kernels.cuda.autograd import batch_norm
from helpers import scaled_error

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _rows(t: torch.Tensor) -> np.ndarray:
    """(N, C, *) -> (M, C) float64 rows for the reference."""
    t = t.detach().double()
    return t.movedim(1, -1).reshape(-1, t.shape[1]).numpy()


def _unrows(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    shape = (like.shape[0], *like.shape[2:], like.shape[1])
    return torch.from_numpy(np.ascontiguousarray(a)).reshape(shape).movedim(-1, 1)


def _cpu(t):
    return None if t is None else t.cpu()


def _oracle(x, w, b, res, dy, relu, training, rm=None, rv=None, eps=1e-5):
    """out, dx, dw, db from bnlab.reference; ReLU and residual composed around it."""
    C = x.shape[1]
    gamma = np.ones(C) if w is None else w.detach().double().numpy()
    beta = np.zeros(C) if b is None else b.detach().double().numpy()
    param = {"mode": "train" if training else "test", "eps": eps}
    if not training:
        param.update(running_mean=rm.double().numpy().copy(), running_var=rv.double().numpy().copy())  # fmt: skip
    out, cache = reference.batchnorm_forward(_rows(x), gamma, beta, param)
    if res is not None:
        out = out + _rows(res)
    if relu:
        out = np.maximum(out, 0)
    g = _rows(dy) * (out > 0) if relu else _rows(dy)
    dx, dw, db = reference.batchnorm_backward_alt(g, cache)
    return _unrows(out, x), _unrows(dx, x), torch.from_numpy(dw), torch.from_numpy(db), _unrows(g, x)  # fmt: skip


CASES = [  # shape, layout, dtype, variant, affine
    ((37, 5), "contiguous", torch.float32, "plain", True),
    ((37, 5), "contiguous", torch.bfloat16, "relu", True),
    ((9, 11), "contiguous", torch.float64, "add_relu", True),
    ((3, 4, 11), "contiguous", torch.float32, "add_relu", False),
    ((3, 4, 11), "contiguous", torch.float16, "plain", True),
    ((5, 7, 3, 3), "contiguous", torch.float32, "relu", True),
    ((5, 7, 3, 3), "channels_last", torch.float32, "add_relu", True),
    ((5, 7, 3, 3), "channels_last", torch.bfloat16, "plain", True),
    ((5, 7, 3, 3), "contiguous", torch.bfloat16, "add", True),
    ((3, 9, 5, 7), "channels_last", torch.float16, "relu", False),
    ((4, 3, 1, 1), "contiguous", torch.float32, "plain", True),
    ((2, 3, 2, 3, 5), "contiguous", torch.float32, "add_relu", True),
    ((2, 3, 2, 3, 5), "channels_last", torch.float64, "relu", True),
    ((2, 3, 2, 3, 5), "channels_last", torch.bfloat16, "add", True),
    ((3, 19, 2, 3), "channels_last", torch.float32, "plain", True),
]


def _inputs(shape, layout, dtype, variant, affine, device, seed=0, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = _layout((torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype), layout)  # fmt: skip
    res = _layout(torch.randn(shape, generator=gen).to(dtype), layout) if "add" in variant else None
    dy = _layout(torch.randn(shape, generator=gen).to(dtype), layout)
    w = torch.rand(C, generator=gen) + 0.5 if affine else None
    b = torch.randn(C, generator=gen) if affine else None
    if dtype == torch.float64 and affine:
        w, b = w.double(), b.double()
    return [t.to(device) if t is not None else None for t in (x, res, dy, w, b)]


@pytest.mark.parametrize(("shape", "layout", "dtype", "variant", "affine"), CASES)
def test_training_forward_backward_match_reference(shape, layout, dtype, variant, affine, device):  # fmt: skip
    x, res, dy, w, b = _inputs(shape, layout, dtype, variant, affine, device)
    relu = "relu" in variant
    want_out, want_dx, want_dw, want_db, want_g = _oracle(*(_cpu(t) for t in (x, w, b, res, dy)), relu, True)  # fmt: skip
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, res)]  # fmt: skip
    xl, wl, bl, rl = leaves
    rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
    out = batch_norm(xl, rm, rv, wl, bl, True, 0.1, 1e-5, residual=rl, activation="relu" if relu else None)  # fmt: skip
    out.backward(dy)
    torch_out = torch.nn.functional.batch_norm(x.double(), None, None, None if w is None else w.double(), None if b is None else b.double(), True)  # fmt: skip
    assert out.dtype == x.dtype and out.stride() == torch_out.stride() == x.stride()
    assert scaled_error(out.cpu(), want_out) <= TOL[dtype]
    assert scaled_error(xl.grad.cpu(), want_dx) <= GRAD_TOL[dtype]
    assert xl.grad.stride() == x.stride()
    if affine:
        assert scaled_error(wl.grad.cpu(), want_dw) <= GRAD_TOL[dtype] * 10
        assert scaled_error(bl.grad.cpu(), want_db) <= GRAD_TOL[dtype] * 10
    if rl is not None:
        assert scaled_error(rl.grad.cpu(), want_g) <= TOL[dtype]


@pytest.mark.parametrize(("layout", "dtype", "relu"), [("contiguous", torch.float32, False), ("channels_last", torch.bfloat16, True), ("contiguous", torch.float64, True)])  # fmt: skip
def test_eval_forward_backward_match_reference(layout, dtype, relu, device):
    shape = (3, 6, 5, 3)
    x, _, dy, w, b = _inputs(shape, layout, dtype, "plain", True, device, seed=1)
    gen = torch.Generator().manual_seed(2)
    rm = torch.randn(6, generator=gen, dtype=torch.float64).to(device)
    rv = (torch.rand(6, generator=gen, dtype=torch.float64) + 0.5).to(device)
    want_out, want_dx, want_dw, want_db, _ = _oracle(x.cpu(), w.cpu(), b.cpu(), None, dy.cpu(), relu, False, rm.cpu(), rv.cpu())  # fmt: skip
    xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm0, rv0 = rm.clone(), rv.clone()
    out = batch_norm(xl, rm, rv, wl, bl, False, activation="relu" if relu else None)
    out.backward(dy)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    assert out.dtype == dtype and out.stride() == x.stride()
    assert scaled_error(out.cpu(), want_out) <= TOL[dtype]
    assert scaled_error(xl.grad.cpu(), want_dx) <= GRAD_TOL[dtype]
    assert scaled_error(wl.grad.cpu(), want_dw) <= GRAD_TOL[dtype] * 10
    assert scaled_error(bl.grad.cpu(), want_db) <= GRAD_TOL[dtype] * 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_running_statistics_match_torch(dtype, device):
    """Unbiased variance, torch's momentum convention, repeated calls (ticket counters reset)."""
    shape = (6, 5, 4, 3)
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5
    ours = [rm.to(device, torch.float32 if dtype != torch.float64 else dtype), rv.to(device, torch.float32 if dtype != torch.float64 else dtype)]  # fmt: skip
    theirs = [rm.clone(), rv.clone()]
    for seed in range(3):
        x, *_ = _inputs(shape, "contiguous", dtype, "plain", False, device, seed=seed)
        ops.forward(x, None, None, None, *ours, True, 0.3, 1e-5, 0, 1, False)
        torch.nn.functional.batch_norm(x.cpu().double(), *theirs, None, None, True, 0.3, 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert scaled_error(ours[0].cpu(), theirs[0]) <= tol
    assert scaled_error(ours[1].cpu(), theirs[1]) <= tol


def _with_nan(device, shape=(4, 5, 3, 3), channel=2):
    x, *_ = _inputs(shape, "contiguous", torch.float32, "plain", False, device, seed=3)
    x[1, channel, 1, 1] = float("nan")
    return x


def test_nonfinite_propagate_writes_like_torch(device):
    x = _with_nan(device)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    out, _, _, _, bad = ops.forward(x, None, None, None, rm, rv, True, 0.1, 1e-5, 0, 0, True)
    assert bad.cpu().tolist() == [False, False, True, False, False]
    assert rm[2].isnan() and rv[2].isnan() and rm[[0, 1, 3, 4]].isfinite().all()
    assert out[:, 2].isnan().all() and out[:, [0, 1, 3, 4]].isfinite().all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_inf_at_the_shift_sample_gives_torchs_running_mean(device, layout):
    """+inf at x[0, c, 0, 0], the sample the sums are shifted by: the running mean becomes inf
    as torch's CPU kernel gives (not inf - inf = NaN), the variance NaN as torch's. (The oracle
    is torch on the CPU: on an H200, torch 2.11's channels_last CUDA kernel gave a NaN running
    mean here, its Welford update computing inf - inf.)"""
    x, *_ = _inputs((4, 3, 5, 5), layout, torch.float32, "plain", False, device, seed=4)
    x[0, 1, 0, 0] = float("inf")
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    ops.forward(x, None, None, None, rm, rv, True, 0.1, 1e-5, 0, 0, True)
    theirs = torch.nn.BatchNorm2d(3)
    theirs(x.cpu())
    torch.testing.assert_close(rm.cpu(), theirs.running_mean, equal_nan=True)
    torch.testing.assert_close(rv.cpu(), theirs.running_var, equal_nan=True)
    assert rm[1].item() == float("inf")


def test_nonfinite_skip_keeps_bad_channels_and_warns(device):
    x = _with_nan(device)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[2\]"):
        batch_norm(x, rm, rv, None, None, True, nonfinite="skip")
        ops.report.flush()  # on a GPU the warning is deferred until the copy lands
    assert rm[2] == 0 and rv[2] == 1
    _, want_m, want_v = _torch_running(x, [0, 1, 3, 4])
    assert scaled_error(rm[[0, 1, 3, 4]].cpu(), want_m) <= 1e-6
    assert scaled_error(rv[[0, 1, 3, 4]].cpu(), want_v) <= 1e-6


def _torch_running(x, channels):
    m, v = torch.zeros(len(channels), dtype=torch.float64), torch.ones(len(channels), dtype=torch.float64)  # fmt: skip
    torch.nn.functional.batch_norm(x[:, channels].cpu().double(), m, v, training=True)
    return None, m, v


def test_nonfinite_raise_changes_nothing(device):
    x = _with_nan(device)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    with pytest.raises(FloatingPointError, match=r"channel\(s\) \[2\]"):
        batch_norm(x, rm, rv, None, None, True, nonfinite="raise")
    assert torch.equal(rm.cpu(), torch.zeros(5)) and torch.equal(rv.cpu(), torch.ones(5))
    # report=False (eager callers report from `bad`): the same guard, no exception
    _, _, _, _, bad = ops.forward(x, None, None, None, rm, rv, True, 0.1, 1e-5, 0, 2, False)
    assert bad.cpu().tolist() == [False, False, True, False, False]
    assert torch.equal(rm.cpu(), torch.zeros(5)) and torch.equal(rv.cpu(), torch.ones(5))


@pytest.mark.parametrize(("offset", "layout"), [(1e4, "contiguous"), (1e6, "channels_last")])
def test_float32_exact_at_large_offsets(offset, layout, device):
    shape = (64, 4, 8, 8) if device == "cuda" else (6, 3, 5, 4)
    x, _, dy, w, b = _inputs(shape, layout, torch.float32, "plain", True, device, seed=4, offset=offset)  # fmt: skip
    want_out, want_dx, *_ = _oracle(x.cpu(), w.cpu(), b.cpu(), None, dy.cpu(), False, True)
    xl = x.detach().clone().requires_grad_()
    out = batch_norm(xl, None, None, w, b, True)
    out.backward(dy)
    assert scaled_error(out.cpu(), want_out) <= 1e-4
    assert scaled_error(xl.grad.cpu(), want_dx) <= 1e-4


def test_output_mask_and_noncontiguous_input(device):
    base = torch.randn(4, 6, 5, dtype=torch.float64).to(device)
    x = base.transpose(0, 2).contiguous().transpose(0, 2)  # neither contiguous nor channels_last
    dy = torch.randn(4, 6, 5, dtype=torch.float64).to(device)
    w = torch.rand(6, dtype=torch.float64).to(device) + 0.5
    out, shift, mean_d, invstd, _ = ops.forward(x, w, None, None, None, None, True, 0.1, 1e-5, 0, 1, False)  # fmt: skip
    want_out, want_dx, want_dw, want_db, _ = _oracle(x.cpu(), w.cpu(), None, None, dy.cpu(), False, True)  # fmt: skip
    assert scaled_error(out.cpu(), want_out) <= 1e-10
    assert torch.equal(shift.cpu(), x[0, :, 0].cpu())
    dx, dw, db, dres = ops.backward(dy, x, w, None, shift, mean_d, invstd, True, 0, [False, True, False, False])  # fmt: skip
    assert dx.numel() == db.numel() == dres.numel() == 0
    assert scaled_error(dw.cpu(), want_dw) <= 1e-9
    dx, dw, db, dres = ops.backward(dy, x, w, None, shift, mean_d, invstd, True, 0, [True, False, True, False])  # fmt: skip
    assert dw.numel() == 0 and scaled_error(dx.cpu(), want_dx) <= 1e-9
    assert scaled_error(db.cpu(), want_db) <= 1e-9


def test_register_is_idempotent_and_needs_the_operators():
    import bnlab.kernels.cuda as cuda

    first = cuda.register()
    assert cuda.register() == first
    try:
        torch.ops.bnlab.batch_norm_forward
        defined = True
    except (AttributeError, RuntimeError):
        defined = False
    assert first == defined


def test_repeated_calls_agree_with_reference(device):
    """Later launches of a configuration (the ticket counters reset by the finalizing CTAs,
    Triton's kernel cache) compute what the first did, for new data in the same shapes."""
    for seed in range(3):
        x, res, dy, w, b = _inputs((4, 6, 3, 5), "channels_last", torch.float32, "add_relu", True, device, seed=10 + seed)  # fmt: skip
        want_out, want_dx, want_dw, _, _ = _oracle(x.cpu(), w.cpu(), b.cpu(), res.cpu(), dy.cpu(), True, True)  # fmt: skip
        xl, wl = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        out = batch_norm(xl, None, None, wl, b, True, residual=res, activation="relu")
        out.backward(dy)
        assert scaled_error(out.cpu(), want_out) <= 2e-5
        assert scaled_error(xl.grad.cpu(), want_dx) <= 1e-4
        assert scaled_error(wl.grad.cpu(), want_dw) <= 1e-3


def test_int64_offsets_path(device, monkeypatch):
    """Tensors of 2**31 elements and more take int64 offsets; forced here on a small one."""
    from bnlab.kernels.cuda import plan

    monkeypatch.setattr(plan, "WIDE_ELEMENTS", 0)
    plan._make_plan.cache_clear()
    try:
        for layout in ("contiguous", "channels_last"):
            x, res, dy, w, b = _inputs((3, 5, 3, 4), layout, torch.float32, "add_relu", True, device, seed=21)  # fmt: skip
            assert plan.make_plan(plan.geometry(x)[1], x).wide
            want_out, want_dx, *_ = _oracle(x.cpu(), w.cpu(), b.cpu(), res.cpu(), dy.cpu(), True, True)  # fmt: skip
            xl = x.detach().clone().requires_grad_()
            out = batch_norm(xl, None, None, w, b, True, residual=res, activation="relu")
            out.backward(dy)
            assert scaled_error(out.cpu(), want_out) <= 2e-5
            assert scaled_error(xl.grad.cpu(), want_dx) <= 1e-4
    finally:
        plan._make_plan.cache_clear()


def test_empty_batch_leaves_running_statistics(device):
    x = torch.empty(0, 3, 2, 2, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    out, shift, mean_d, invstd, bad = ops.forward(x, None, None, None, rm, rv, True, 0.1, 1e-5, 0, 1, True)  # fmt: skip
    assert out.shape == x.shape and shift.shape == mean_d.shape == invstd.shape == bad.shape == (3,)
    assert torch.equal(rm.cpu(), torch.zeros(3)) and torch.equal(rv.cpu(), torch.ones(3))
    dx, dw, db, _ = ops.backward(x, x, None, None, shift, mean_d, invstd, True, 0, [True, True, True, False])  # fmt: skip
    assert dx.shape == x.shape and torch.equal(dw.cpu(), torch.zeros(3)) and torch.equal(db.cpu(), torch.zeros(3))  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "strides"),
    [
        ((3, 1, 6, 6), (36, 1, 6, 1)),
        ((4, 8, 1, 1), (8, 1, 8, 8)),
        ((2, 1, 3, 4, 5), (60, 1, 20, 5, 1)),
        ((2, 7, 8), (56, 1, 7)),
        ((2, 8, 5, 5), (200, 1, 40, 8)),
    ],
)
def test_results_have_torchs_strides(device, shape, strides):
    """Output, dx and grad_residual with the strides torch's batch norm gives them (CPU torch
    as the oracle), not the input's: where these differ only in size-1 dimensions, torch's
    later operators may read them differently (README: "Results carry torch's strides")."""
    g = torch.Generator().manual_seed(5)
    x = torch.empty_strided(shape, strides).copy_(torch.randn(shape, generator=g))
    xt = x.detach().requires_grad_()
    want = torch.nn.functional.batch_norm(xt, None, None, training=True)
    (want_dx,) = torch.autograd.grad(want, xt, torch.ones_like(want))
    xd = x.to(device)
    out, shift, mean_d, invstd, _ = ops.forward(xd, None, None, xd, None, None, True, 0.1, 1e-5, 1, 0)  # fmt: skip
    dx, _, _, dres = ops.backward(torch.ones_like(out), xd, None, out, shift, mean_d, invstd, True, 1, [True, False, False, True])  # fmt: skip
    assert out.stride() == want.stride()
    assert dx.stride() == dres.stride() == want_dx.stride()
