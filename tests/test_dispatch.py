"""One parity grid over every path behind ``bnlab.functional.batch_norm``.

Paths (see the functional module's docstring): ``operator`` (the C++ autograd node),
``function`` (the Python autograd.Function over the kernels, taken under torch.func
transforms; forced here), ``composite`` (torch ops: kernels switched off or unbuilt) and
``native`` (torch's kernel: other devices, empty batches). Each runs bnlab.nn modules against
torch.nn modules from identical weights — outputs, input/weight/bias gradients, running
statistics and ``num_batches_tracked`` over train/eval steps — at small sizes and above the
1 MB pool threshold, both layouts, float32 and bfloat16, affine on/off, track_running_stats
on/off; the float32 results are also held to the float64 NumPy reference.
"""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import helpers
from bnlab import functional, kernels
from bnlab import nn as bnn
from bnlab.reference import batchnorm_backward_alt, batchnorm_forward

PATHS = ("operator", "function", "composite")


@pytest.fixture
def path(request, monkeypatch):
    name = request.param
    helpers.use_path(monkeypatch, "torch" if name == "composite" else "fused")
    assert name == "composite" or kernels.load() is not None
    if name == "function":  # as if a torch.func transform were active
        monkeypatch.setattr(functional, "_traced_or_transformed", lambda: True)
        monkeypatch.setattr(functional, "_transforms_active", lambda: True)
        monkeypatch.setattr(functional, "_functorch_active", lambda: True)
    return name


def _grad_fn_name(path: str) -> str:
    return "BatchNormNode" if path == "operator" else "BatchNormFunctionBackward"


SMALL = (6, 5, 4, 4)
LARGE = (32, 40, 16, 16)  # 1.3 MB in float32: pooled outputs
GRID = list(itertools.product(("contiguous", "channels_last"), (torch.float32, torch.bfloat16), (True, False), (True, False)))  # fmt: skip


def _run(module, x, dy, steps=("train", "train", "eval")):
    """Alternating train/eval steps; returns everything a user can observe."""
    seen = []
    for i, mode in enumerate(steps):
        module.train(mode == "train")
        xi = (x * (1 + i)).detach().requires_grad_()
        out = module(xi)
        out.backward(dy)
        seen += [out, xi.grad]
        for p in (module.weight, module.bias):
            if p is not None:
                seen.append(p.grad.clone())
                p.grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(module, name) is not None:
                seen.append(getattr(module, name).clone())
    return seen, out.grad_fn


def _modules(dtype, affine, track, layout):
    torch.manual_seed(0)
    ours = bnn.BatchNorm2d(SMALL[1], affine=affine, track_running_stats=track)
    theirs = nn.BatchNorm2d(SMALL[1], affine=affine, track_running_stats=track)
    if affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _data(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy


def _compare(got, want, dtype):
    tol = 2e-5 if dtype == torch.float32 else 5e-2
    for a, b in zip(got, want, strict=True):
        scale = max(1.0, b.double().abs().max().item())
        assert (a.double() - b.double()).abs().max().item() / scale <= tol


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize(("layout", "dtype", "affine", "track"), GRID)
def test_small_grid_matches_torch(path, layout, dtype, affine, track):
    ours, theirs = _modules(dtype, affine, track, layout)
    x, dy = _data(SMALL, dtype, layout)
    got, grad_fn = _run(ours, x, dy)
    want, _ = _run(theirs, x, dy)
    _compare(got, want, dtype)
    assert _grad_fn_name(path) in grad_fn.name()


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_matches_torch_and_reference(path, layout):
    ours, theirs = _modules(torch.float32, True, True, layout)
    ours = bnn.BatchNorm2d(LARGE[1])
    theirs = nn.BatchNorm2d(LARGE[1])
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    x, dy = _data(LARGE, torch.float32, layout)
    got, grad_fn = _run(ours, x, dy, steps=("train", "eval"))
    want, _ = _run(theirs, x, dy, steps=("train", "eval"))
    _compare(got, want, torch.float32)
    assert _grad_fn_name(path) in grad_fn.name()
    # The first (training) step against the float64 NumPy reference.
    rows = np.moveaxis(x.double().numpy(), 1, -1).reshape(-1, LARGE[1])
    w, b = theirs.weight.detach().double().numpy(), theirs.bias.detach().double().numpy()
    out, cache = batchnorm_forward(rows, w, b, {"mode": "train", "eps": 1e-5})
    dyr = np.moveaxis(dy.double().numpy(), 1, -1).reshape(-1, LARGE[1])
    dx, dw, db = batchnorm_backward_alt(dyr, cache)
    shape = (LARGE[0], *LARGE[2:], LARGE[1])
    for value, truth in ((got[0], np.moveaxis(out.reshape(shape), -1, 1)),
                         (got[1], np.moveaxis(dx.reshape(shape), -1, 1)), (got[2], dw), (got[3], db)):  # fmt: skip
        scale = max(1.0, np.abs(truth).max())
        assert np.abs(value.detach().double().numpy() - truth).max() / scale <= 2e-5


def test_native_path_for_empty_batches_keeps_statistics():
    ours, theirs = bnn.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    assert ours(x).shape == theirs(x).shape == (0, 3, 4, 4)
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1


def test_native_path_for_devices_without_kernels(monkeypatch):
    """A device without bnlab kernels takes torch's kernel with bnlab's checks (simulated on
    the CPU by removing it from the kernel devices)."""
    monkeypatch.setattr(kernels, "DEVICES", set())
    monkeypatch.setattr(kernels, "EAGER", None)  # (the CPU fast paths)
    monkeypatch.setattr(kernels, "MODULE_EAGER", None)
    x = torch.randn(4, 3, 5, requires_grad=True)
    out = functional.batch_norm(x, None, None, training=True)
    assert "NativeBatchNorm" in out.grad_fn.name()
    with pytest.raises(ValueError, match="weight"):
        functional.batch_norm(x, None, None, torch.ones(4), training=True)


def test_a_first_cuda_input_loads_the_kernels(monkeypatch):
    """A process whose first bnlab call is ``functional.batch_norm`` on a CUDA tensor loads the
    extension (which registers the CUDA kernels) instead of taking torch's kernel for good (a
    GPU run's finding: only modules and CPU calls loaded it). Simulated without a GPU: a
    CUDA-typed input stand-in and a load() that registers the "cuda" device."""
    from types import SimpleNamespace

    loads = []

    def load():
        loads.append(1)
        kernels.DEVICES.add("cuda")

    monkeypatch.setattr(kernels, "DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "_state", {"module": None, "error": None, "load_seconds": None})
    monkeypatch.setattr(kernels, "load", load)
    cuda_input = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert kernels.supports(cuda_input) and loads == [1]
    assert kernels.supports(cuda_input) and loads == [1]  # once
    monkeypatch.setattr(kernels, "DEVICES", {"cpu"})
    monkeypatch.setattr(kernels, "_state", {"module": None, "error": OSError("no compiler")})
    assert not kernels.supports(cuda_input) and loads == [1]  # a failed build is not retried


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["first", "later"])
def test_propagate_matches_torch_with_nonfinite_values(path, layout, value, where):
    """nonfinite='propagate' leaves what torch leaves, also when the non-finite value is the
    sample the statistics are shifted by (x[0, c, 0, 0]; a new user's finding: inf there gave
    a NaN running mean where torch's is inf)."""
    ours, theirs = bnn.BatchNorm2d(3, nonfinite="propagate"), nn.BatchNorm2d(3)
    x, _ = _data((4, 3, 5, 5), torch.float32, layout)
    x = x.clone()
    x[(0, 1, 0, 0) if where == "first" else (2, 1, 3, 1)] = value
    got, want = ours(x), theirs(x)
    for a, b in ((got, want), (ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):  # fmt: skip
        torch.testing.assert_close(a, b, equal_nan=True, rtol=2e-5, atol=2e-5)


def _stride_inputs():
    """Inputs whose layouts torch's batch norm treats in its own ways (size-1 dimensions,
    ambiguous formats, non-dense strides)."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(shape, generator=g)

    def strided(shape, strides):
        return torch.empty_strided(shape, strides).copy_(r(*shape))

    cl, cl3 = torch.channels_last, torch.channels_last_3d
    return {
        "1 channel, channels_last strides": strided((3, 1, 28, 28), (784, 1, 28, 1)),
        "1x1 planes, channels_last": r(4, 8, 1, 1).contiguous(memory_format=cl),
        "1x1 planes, strides (C, 1, C, C)": strided((4, 8, 1, 1), (8, 1, 8, 8)),
        "batch of 1, channels_last": r(1, 8, 5, 5).contiguous(memory_format=cl),
        "channels_last": r(2, 8, 5, 5).contiguous(memory_format=cl),
        "sliced channels_last": r(2, 8, 5, 10).contiguous(memory_format=cl)[..., ::2],
        "permuted": r(2, 5, 5, 8).permute(0, 3, 1, 2),
        "width 1, channels_last": r(2, 8, 5, 1).contiguous(memory_format=cl),
        "3-d, 1 channel, channels_last_3d": r(2, 1, 3, 4, 5).contiguous(memory_format=cl3),
        "3-d channels_last_3d": r(2, 3, 3, 4, 5).contiguous(memory_format=cl3),
        "(N, C, L) transposed": r(2, 7, 8).transpose(1, 2),
        "(N, 1, L)": r(4, 1, 6),
    }


STRIDE_INPUTS = _stride_inputs()


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("name", list(STRIDE_INPUTS))
@pytest.mark.parametrize("training", [True, False])
def test_results_have_torchs_strides(path, name, training):
    """Output and input gradient with the strides torch's batch norm gives them, not the
    input's (a user's model-parity run: a 1-channel channels_last BN output with strides
    (784, 1, 28, 1), equal in memory to torch's (784, 784, 28, 1), made torch's next 1x1
    stride-2 convolution corrupt the heap; torch's own layers never hand it such strides)."""
    x0 = STRIDE_INPUTS[name]
    C = x0.shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    x = x0.detach().requires_grad_()
    xt = x0.detach().requires_grad_()
    want = torch.nn.functional.batch_norm(xt, rm.clone(), rv.clone(), training=training)
    # incoming gradients laid out as torch's output, as the input, and contiguous: torch's
    # input gradient depends on it (a new user's finding)
    grads = (torch.ones_like(want), torch.ones_like(x0), torch.ones(x0.shape))
    want_grads = [torch.autograd.grad(want, xt, g, retain_graph=True)[0].stride() for g in grads]
    for kwargs in ({}, {"activation": "relu"}, {"residual": torch.zeros_like(x0), "activation": "relu"}):  # fmt: skip
        got = functional.batch_norm(x, rm.clone(), rv.clone(), training=training, **kwargs)
        assert got.stride() == want.stride(), (kwargs, got.stride(), want.stride())
        for g, want_grad in zip(grads, want_grads, strict=True):
            (got_grad,) = torch.autograd.grad(got, x, g, retain_graph=True)
            assert got_grad.stride() == want_grad, (kwargs, g.stride(), got_grad.stride(), want_grad)  # fmt: skip
    if x0.dim() == 4:
        module = bnn.BatchNorm2d(C).train(training)
        got = module(x)
        assert got.stride() == want.stride()
        for g, want_grad in zip(grads, want_grads, strict=True):
            (got_grad,) = torch.autograd.grad(got, x, g, retain_graph=True)
            assert got_grad.stride() == want_grad


@pytest.mark.parametrize("shape", [(3, 1, 6, 6), (4, 8, 1, 1), (0, 8, 5, 5), (2, 0, 3, 3), (2, 1, 3, 4, 5), (0, 3, 1, 4, 5), (2, 7, 8), (6, 5), (0, 5)])  # fmt: skip
def test_result_strides_are_torchs_dense_strides(shape):
    """The Python paths' strides for a result (computed from the sizes, no tensor made) equal
    the dense strides torch gives that memory format, empty dimensions included."""
    from bnlab.kernels import layout

    formats = {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(len(shape), [])
    for memory_format in (torch.contiguous_format, *formats):
        x = torch.empty(shape, memory_format=memory_format)
        for grad in (None, x, torch.empty(shape)):
            fmt = layout.result_format(x, grad)
            want = torch.empty(shape, device="meta", memory_format=fmt).stride()
            assert layout.result_strides(x, grad) == want


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_input_gradient_exact_where_torchs_is_not(path):
    """A channels_last-dense input whose size-1 dimension makes its suggested format
    contiguous, with a contiguous incoming gradient: torch 2.6-2.14's CPU dx is off by ~3.8
    (README); bnlab's equals float64 torch on contiguous copies."""
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 1, 3, generator=g0).permute(0, 3, 2, 1).requires_grad_()
    w, b, g = torch.randn(3, generator=g0), torch.randn(3, generator=g0), torch.randn(2, 3, 1, 5, generator=g0)  # fmt: skip
    (got,) = torch.autograd.grad(functional.batch_norm(x, None, None, w, b, True), x, g)
    xc = x.detach().double().contiguous().requires_grad_()
    truth = torch.nn.functional.batch_norm(xc, None, None, w.double(), b.double(), True)
    (want,) = torch.autograd.grad(truth, xc, g.double().contiguous())
    assert (got.double() - want).abs().max().item() < 1e-5
