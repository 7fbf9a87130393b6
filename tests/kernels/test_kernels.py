"""The bnlab:: operators' CPU kernels against the float64 NumPy reference.

Truth comes from ``bnlab.reference`` (NumPy, float64) on the same data, never from bnlab's
kernels or its torch code: outputs, gradients (input, weight, bias, residual) and running
statistics, over shapes, layouts, dtypes, the fused ReLU and residual add, and threads.
"""

import random

import numpy as np
import pytest
import torch

from bnlab import kernels
from bnlab import nn as bnn
from bnlab.reference import batchnorm_backward_alt, batchnorm_forward

# Max error against float64, relative to max(1, |truth|).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
MOMENTUM, EPS = 0.3, 1e-3


@pytest.fixture(autouse=True)
def _built():
    assert kernels.load() is not None, "the C++ extension must build on this machine"


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _rows(t: torch.Tensor) -> np.ndarray:
    """(N, C, *) -> (N·L, C) float64: one feature column per channel."""
    a = t.detach().double().numpy()
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def _unrows(rows: np.ndarray, like: torch.Tensor) -> np.ndarray:
    shape = (like.shape[0], *like.shape[2:], like.shape[1])
    return np.moveaxis(rows.reshape(shape), -1, 1)


def reference(x, w, b, rm, rv, training, dy, residual=None, relu=False):
    """Float64 truth from bnlab.reference: (out, dx, dw, db, dresidual, running_mean, running_var)."""
    rows = _rows(x)
    channels = rows.shape[1]
    gamma = np.ones(channels) if w is None else w.double().numpy()
    beta = np.zeros(channels) if b is None else b.double().numpy()
    param = {"mode": "train" if training else "test", "eps": EPS, "momentum": 1 - MOMENTUM,
             "running_mean": rm.double().numpy().copy(), "running_var": rv.double().numpy().copy()}  # fmt: skip
    out, cache = batchnorm_forward(rows, gamma, beta, param)
    if residual is not None:
        out = out + _rows(residual)
    if relu:
        out = np.maximum(out, 0)
    g = _rows(dy) * (out > 0) if relu else _rows(dy)
    dx, dw, db = batchnorm_backward_alt(g, cache)
    # torch's running variance takes the unbiased batch variance (the reference's the biased)
    run_mean, run_var = rm.double().numpy(), rv.double().numpy()
    if training:
        run_mean = (1 - MOMENTUM) * run_mean + MOMENTUM * rows.mean(0)
        run_var = (1 - MOMENTUM) * run_var + MOMENTUM * rows.var(0, ddof=1)
    return (_unrows(out, x), _unrows(dx, x), dw, db, _unrows(g, x), run_mean, run_var)


def _cases(count=48, seed=7):
    rng = random.Random(seed)
    shapes = [(3, 1), (5, 7), (2, 3, 1), (3, 5, 17), (1, 3, 2, 2), (7, 1, 9, 11), (3, 13, 7, 5),
              (2, 3, 2, 3, 5), (9, 33, 15, 17), (33, 64, 30), (4097, 3), (2, 4, 6, 7, 9), (1, 2, 257, 263)]  # fmt: skip
    out = []
    for _ in range(count):
        shape = rng.choice(shapes)
        layout = rng.choice(["contiguous", "channels_last"] if len(shape) >= 4 else ["contiguous"])
        out.append((shape, layout, rng.choice(list(TOLERANCE)), rng.choice([True, False]),
                    rng.random() < 0.5, rng.random() < 0.3, rng.random() < 0.3))  # fmt: skip
    return out


@pytest.mark.parametrize(("shape", "layout", "dtype", "training", "affine", "relu", "residual"), _cases())  # fmt: skip
def test_operator_matches_reference(shape, layout, dtype, training, affine, relu, residual):
    g = torch.Generator().manual_seed(sum(shape))
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = _layout((torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype), layout)
    c = shape[1]
    w = (torch.rand(c, generator=g, dtype=param_dtype) + 0.5) if affine else None
    b = torch.randn(c, generator=g, dtype=param_dtype) if affine else None
    rm = torch.randn(c, generator=g, dtype=param_dtype)
    rv = torch.rand(c, generator=g, dtype=param_dtype) + 0.5
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if training and x.numel() // c == 1:
        return  # one value per channel: refused in training (tested with the functional API)
    truth = reference(x, w, b, rm, rv, training, dy, r, relu)

    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    run_mean, run_var = rm.clone(), rv.clone()
    out, _ = torch.ops.bnlab.batch_norm(leaves[0], leaves[1], leaves[2], leaves[3], run_mean, run_var,
                                        training, MOMENTUM, EPS, int(relu), 1, False)  # fmt: skip
    out.backward(dy)
    got = [out, leaves[0].grad, *(t.grad for t in leaves[1:3] if t is not None)]
    want = [truth[0], truth[1], *([truth[2], truth[3]] if affine else [])]
    if residual:
        got.append(leaves[3].grad)
        want.append(truth[4])
    tol = TOLERANCE[dtype]
    for name, value, expected in zip(("out", "dx", "dw", "db", "dres"), got, want, strict=False):
        expected = torch.as_tensor(np.ascontiguousarray(expected))
        scale = max(1.0, expected.abs().max().item())
        assert (value.double() - expected).abs().max().item() / scale <= tol, name
    torch.testing.assert_close(run_mean.double(), torch.as_tensor(truth[5]), rtol=tol * 10, atol=tol * 10)  # fmt: skip
    torch.testing.assert_close(run_var.double(), torch.as_tensor(truth[6]), rtol=tol * 10, atol=tol * 10)  # fmt: skip
    assert out.dtype == dtype and (out.stride(), leaves[0].grad.stride()) == torchs_strides(x)


@pytest.mark.parametrize(("shape", "layout", "dtype", "relu", "residual"), [c[:3] + c[5:] for c in _cases(seed=11)])  # fmt: skip
@pytest.mark.parametrize("params", ["like-input", "float64", "strided"])
def test_inference_path_matches_reference(shape, layout, dtype, relu, residual, params):
    """The eager call that autograd does not record (eval under no_grad: the coefficients read
    straight from the parameters), against the float64 reference; parameters of the compute
    dtype, of another dtype, and non-contiguous."""
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = _layout((torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype), layout)
    c = shape[1]
    vectors = [torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64),
               torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5]  # fmt: skip
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if params == "float64":
        w, b, rm, rv = vectors
    elif params == "strided":
        w, b, rm, rv = (torch.stack([v, v], 1).to(compute)[:, 0] for v in vectors)
        assert w.stride() == (2,)
    else:
        w, b, rm, rv = (v.to(compute) for v in vectors)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if residual else None
    truth = reference(x, w, b, rm, rv, False, torch.zeros(shape, dtype=dtype), r, relu)[0]
    with torch.no_grad():
        out, bad = kernels.EAGER(x, w, b, r, rm, rv, False, MOMENTUM, EPS, int(relu), 1)
    assert bad is None and out.dtype == dtype and out.stride() == torchs_strides(x)[0]
    expected = torch.as_tensor(np.ascontiguousarray(truth))
    assert (out.double() - expected).abs().max().item() / max(1.0, expected.abs().max().item()) <= TOLERANCE[dtype]  # fmt: skip


SHORT_PLANES = [(5, 6, 2, 2), (4, 3, 7), (3, 4, 1, 5), (6, 5, 4, 4), (3, 2, 33), (2, 3, 1, 1, 6), (80, 3, 7, 7)]  # fmt: skip


@pytest.mark.parametrize("shape", SHORT_PLANES)
@pytest.mark.parametrize(("dtype", "training"), [(torch.float32, True), (torch.float64, True), (torch.bfloat16, False)])  # fmt: skip
def test_short_planes_match_reference(shape, dtype, training):
    """NCHW planes shorter than the kernels' lanes (ResNet's 2x2, 4x4 stages: passed as rows of
    C*H*W values, or planar with a short vector tail), with ReLU and residual; 80x3x7x7: a
    channel of 3,920 values, flushed to double within the channel."""
    test_operator_matches_reference(shape, "contiguous", dtype, training, True, True, True)
    test_operator_matches_reference(shape, "contiguous", dtype, training, False, False, False)


# Around the rule for running a planar tensor channel by channel (passes.h: by_channel): groups
# of G = ceil(512 / plane) adjacent channels, at least 8 groups, at most 2 MiB of one group's
# values read and written. (4, 8, 512): 8 groups of one channel; one channel less: two passes;
# (4, 512, 8): 8 groups of 64 channels of 8-value planes; (4, 64, 8): one group, two passes;
# (3, 85, 7, 7): 8 groups of 11 channels, the last of 8; (3, 32, 12, 12) and (2, 24, 4, 6, 8):
# groups of 4 and 3 channels, 4-D and 5-D; (64, 8, 2048) float32: channel by channel except the
# ReLU backward writing the residual's gradient (5 values per element: 2.5 MiB a channel).
# Rows layout split into channel blocks: one chunk of 8 long rows (2 blocks); 4 chunks x 4
# uneven blocks of 1000-1001 channels; channels_last with blocks.
COLUMN_BLOCKS = [((8, 8192), "contiguous"), ((300, 4001), "contiguous"), ((16, 256, 9, 9), "channels_last")]  # fmt: skip


@pytest.mark.parametrize(("shape", "layout"), COLUMN_BLOCKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_channel_blocks_of_rows_match_reference(shape, layout, dtype, relu):
    """The rows layout's sums split into channel blocks (few long rows spread over threads)."""
    test_operator_matches_reference(shape, layout, dtype, True, True, relu, relu)


BY_CHANNEL = [(4, 8, 512), (4, 7, 512), (4, 512, 8), (4, 64, 8), (3, 85, 7, 7), (3, 32, 12, 12), (2, 24, 4, 6, 8), (64, 8, 2048)]  # fmt: skip


@pytest.mark.parametrize("shape", BY_CHANNEL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("relu", "residual"), [(False, False), (True, False), (True, True), (False, True)])  # fmt: skip
def test_channel_by_channel_matches_reference(shape, dtype, relu, residual):
    """Training forward and backward on either side of the channel-by-channel rule."""
    test_operator_matches_reference(shape, "contiguous", dtype, True, True, relu, residual)


@pytest.mark.parametrize(("shape", "layout"), [((16, 8, 33, 31), "contiguous"), ((32, 7, 28, 28), "contiguous"), ((8, 3, 56, 56), "contiguous"), ((32, 7, 500), "contiguous"), ((32, 64, 28, 28), "channels_last"), ((256, 1024), "contiguous"), ((5, 6, 2, 2), "contiguous"), ((8, 8192), "contiguous"), ((300, 4001), "contiguous")])  # fmt: skip
def test_results_do_not_depend_on_thread_count(shape, layout):
    """Training forward and backward bitwise equal on 1, 2 and 3 threads: channel groups, two
    passes over few channels (a channel's sums split between chunks), rows (channels_last,
    (N, C)), short planes as rows. (A new user's finding: the chunks followed the thread
    count, and with them the rounding.)"""
    g = torch.Generator().manual_seed(3)
    x = _layout(torch.randn(shape, generator=g) * 3 + 1, layout)
    dy = _layout(torch.randn(shape, generator=g), layout)
    c = shape[1]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            leaves = [x.detach().clone().requires_grad_(), torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)]  # fmt: skip
            rm, rv = torch.zeros(c), torch.ones(c)
            out, _ = torch.ops.bnlab.batch_norm(*leaves, None, rm, rv, True, 0.1, 1e-5, 0, 1, False)  # fmt: skip
            out.backward(dy)
            results.append([out, *(t.grad for t in leaves), rm, rv])
    finally:
        torch.set_num_threads(before)
    names = ("out", "dx", "dw", "db", "running_mean", "running_var")
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize(("layout", "channels"), [("contiguous", 4), ("contiguous", 8), ("channels_last", 4)])  # fmt: skip
def test_large_offset_precision(offset, layout, channels):
    """Two passes (4 channels), channel by channel (8), rows (channels_last)."""
    x = _layout(torch.randn(32, channels, 40, 40, generator=torch.Generator().manual_seed(0)) + offset, layout)  # fmt: skip
    out = torch.ops.bnlab.batch_norm(x, None, None, None, None, None, True, 0.1, EPS, 0, 1, False)[0]  # fmt: skip
    rows = _rows(x)
    truth = _unrows((rows - rows.mean(0)) / np.sqrt(rows.var(0) + EPS), x)
    assert np.abs(out.double().numpy() - truth).max() <= 1e-4


@pytest.mark.parametrize("shape", [(256, 2, 4096), (64, 8, 4096)])
def test_long_channels_keep_float64_precision(shape):
    """Channels of 2 million values (two passes) and of 262,144 (channel by channel): the
    kernels' partial sums are flushed to double every few thousand values, so the batch
    variance stays exact to float32 rounding (3e-8 and 4e-8 here; summing each lane in float
    over the whole channel gives 3e-6 and 2e-6)."""
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 0.01 + 3.0
    running_mean, running_var = torch.zeros(shape[1]), torch.ones(shape[1])
    torch.ops.bnlab.batch_norm_forward(x64.float(), None, None, None, running_mean, running_var, True, 1.0, EPS, 0, 1, False)  # fmt: skip
    x = x64.float().double()
    var = x.var((0, 2), unbiased=True)
    assert ((running_var.double() - var).abs() / var).max() < 3e-7
    assert ((running_mean.double() - x.mean((0, 2))).abs()).max() < 1e-6


@pytest.mark.parametrize("nonfinite", [0, 1, 2])
@pytest.mark.parametrize(("shape", "bad_channels"), [((8, 4, 3), [2]), ((8, 64, 128), [2, 33, 34])])
def test_nonfinite_policies_inside_the_operator(nonfinite, shape, bad_channels):
    """Small planes (two passes) and planes of 128 values over 64 channels (channel by
    channel, on several threads): the bad channels found, the running statistics as the
    policy says."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for i, c in enumerate(bad_channels):
        x[1, c, i] = (float("inf"), float("nan"))[i % 2]
    channels = shape[1]
    good = [c for c in range(channels) if c not in bad_channels]
    rm, rv = torch.zeros(channels), torch.ones(channels)
    out, _, _, _, bad = torch.ops.bnlab.batch_norm_forward(x, None, None, None, rm, rv, True, 0.5, EPS, 0, nonfinite, False)  # fmt: skip
    assert bad.nonzero().flatten().tolist() == bad_channels
    assert torch.isnan(out[:, bad_channels]).all() and torch.isfinite(out[:, good]).all()
    rows = _rows(x)
    updated = 0.5 * rows.mean(0)
    if nonfinite == 0:  # propagate: every channel written, like torch
        assert not torch.isfinite(rm[bad_channels]).any() and np.allclose(rm[good], updated[good])
    elif nonfinite == 1:  # skip: the bad channels keep their values
        assert (rm[bad_channels] == 0).all() and (rv[bad_channels] == 1).all()
        assert np.allclose(rm[good], updated[good], atol=1e-6)
    else:  # raise: nothing written at all
        assert (rm == 0).all() and (rv == 1).all()


def test_operator_reports_when_asked():
    x = torch.randn(8, 3)
    x[0, 1] = float("nan")
    rm = torch.zeros(3)
    torch.ops.bnlab.batch_norm_forward(x, None, None, None, rm, torch.ones(3), True, 0.1, EPS, 0, 1, True)  # fmt: skip
    assert rm[1] == 0  # skipped (the warning goes to torch's C++ warning handler)
    with pytest.raises(RuntimeError, match=r"\[1\].*nonfinite='raise'"):
        torch.ops.bnlab.batch_norm_forward(x, None, None, None, torch.zeros(3), torch.ones(3), True, 0.1, EPS, 0, 2, True)  # fmt: skip


def torchs_strides(x, grad=None):
    """The strides of torch's batch norm output and input gradient (for ``grad``, default:
    ones in the output's layout) for ``x`` (the oracle: bnlab's results carry them, README
    "Results carry torch's strides")."""
    xt = x.detach().float().requires_grad_()
    out = torch.nn.functional.batch_norm(xt, None, None, training=True)
    (dx,) = torch.autograd.grad(out, xt, torch.ones_like(out) if grad is None else grad.float())
    return out.stride(), dx.stride()


def test_unusual_strides_are_handled():
    base = torch.randn(4, 3, 10, 10)
    for x in (base[:, :, ::2], base.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)):
        out = torch.ops.bnlab.batch_norm(x, None, None, None, None, None, True, 0.1, EPS, 0, 1, False)[0]  # fmt: skip
        rows = _rows(x)
        truth = _unrows((rows - rows.mean(0)) / np.sqrt(rows.var(0) + EPS), x)
        assert np.abs(out.double().numpy() - truth).max() < 1e-5
        assert out.stride() == torchs_strides(x)[0]  # (the fake implementation's: see below)


@pytest.mark.parametrize(
    "x",
    [torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last),
     torch.empty_strided((3, 1, 6, 6), (36, 1, 6, 1)).normal_(),
     torch.empty_strided((4, 8, 1, 1), (8, 1, 8, 8)).normal_(),
     torch.randn(4, 3, 10, 10)[:, :, ::2],
     torch.randn(2, 7, 8).transpose(1, 2)],
    ids=["channels_last", "1 channel", "1x1 planes", "sliced", "transposed"],
)  # fmt: skip
def test_fake_implementation_matches_real_outputs(x):
    """Shapes, dtypes and strides of the fake (meta) implementations equal the kernels' (what
    torch.compile and export plan with), forward and backward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    C = x.shape[1]
    args = (None, None, x, torch.zeros(C), torch.ones(C), True, 0.1, EPS, 1, 1, False)
    real = torch.ops.bnlab.batch_norm_forward(x, *args)
    back = (torch.ones_like(x), x, None, real[0], *real[1:4], True, 1, [True, True, True, True])
    real_back = torch.ops.bnlab.batch_norm_backward(*back)
    with FakeTensorMode() as mode:
        fake_of = lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
        fake = torch.ops.bnlab.batch_norm_forward(fake_of(x), *map(fake_of, args))
        fake_back = torch.ops.bnlab.batch_norm_backward(*map(fake_of, back))
    for r, f in zip((*real, *real_back), (*fake, *fake_back), strict=True):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride())
    assert real[0].stride() == torchs_strides(x)[0]
    assert real_back[0].stride() == torchs_strides(x, back[0])[1]


def test_pooled_outputs_are_ordinary_tensors():
    x = torch.randn(64, 16, 32, 32)  # 4 MB: from the pool
    out = torch.ops.bnlab.batch_norm(x, None, None, None, None, None, True, 0.1, EPS, 0, 1, False)[0]  # fmt: skip
    out.resize_(2, 3)  # torch outputs accept resize_; so must these
    assert out.shape == (2, 3)
    out.resize_(128, 16, 32, 32)  # growing goes through the same allocator
    out.fill_(1.0)
    assert out.sum().item() == out.numel()


def test_pool_reuses_memory_across_training_steps_and_caps_idle_bytes():
    x = torch.randn(64, 16, 32, 32, requires_grad=True)
    for _ in range(2):  # warm-up: the pool fills
        torch.ops.bnlab.batch_norm(x, None, None, None, None, None, True, 0.1, EPS, 0, 1, False)[0].sum().backward()  # fmt: skip
    before = kernels.pool_stats()
    for _ in range(3):
        torch.ops.bnlab.batch_norm(x, None, None, None, None, None, True, 0.1, EPS, 0, 1, False)[0].sum().backward()  # fmt: skip
    after = kernels.pool_stats()
    assert after["misses"] == before["misses"], "steady-state steps allocate nothing new"
    assert after["hits"] >= before["hits"] + 3
    assert after["idle_bytes"] <= after["max_idle_bytes"]
    kernels.release_pool()
    assert kernels.pool_stats()["idle_bytes"] == 0


def test_inference_outputs_use_the_pool_only_above_glibcs_mapping_size():
    """Outputs of calls autograd does not record live briefly: below 32 MiB they come from
    torch's allocator (glibc reuses that memory at once), above it from the pool."""

    def calls() -> int:
        stats = kernels.pool_stats()
        return stats["hits"] + stats["misses"]

    module = bnn.BatchNorm2d(16).eval()
    before = calls()
    with torch.no_grad():
        module(torch.randn(64, 16, 32, 32))  # 4 MiB
    assert calls() == before
    with torch.no_grad():
        module(torch.randn(4, 16, 384, 384))  # 36 MiB
    assert calls() == before + 1
    module(torch.randn(64, 16, 32, 32, requires_grad=True))  # recorded: a training-step output
    assert calls() == before + 2


def test_failed_build_falls_back_to_the_composite_implementation(monkeypatch):
    from bnlab.functional import batch_norm

    monkeypatch.setitem(kernels._state, "module", None)
    monkeypatch.setitem(kernels._state, "error", RuntimeError("no compiler"))
    monkeypatch.setattr(kernels, "EAGER", None)  # as load() leaves them after a failed build
    monkeypatch.setattr(kernels, "MODULE_EAGER", None)
    monkeypatch.setattr(kernels, "OPS", None)
    x = torch.randn(8, 3, requires_grad=True)
    out = batch_norm(x, None, None, training=True)
    assert type(out.grad_fn).__name__ == "BatchNormFunctionBackward"


def test_build_cache_key_follows_the_sources(tmp_path, monkeypatch):
    from bnlab.kernels import build

    key = build.build_key()
    assert len(key) == 16
    copy = tmp_path / "cpu"
    copy.mkdir()
    for name in (*build.SOURCES, *build.HEADERS):
        (copy / name).write_bytes((build.SOURCE_DIR / name).read_bytes())
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    assert build.build_key() == key
    (copy / "passes.h").write_text((copy / "passes.h").read_text() + "\n// changed\n")
    assert build.build_key() != key, "a changed header must trigger a rebuild"
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path / "cache"))
    assert str(build.cache_dir()).startswith(str(tmp_path / "cache"))
