"""bnlab.functional.batch_norm: torch semantics, analytic gradients, precision, bad input."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.functional import batch_norm
from bnlab.reference import spatial_batchnorm_backward, spatial_batchnorm_forward
from helpers import scaled_error, use_path


@pytest.fixture(autouse=True, params=["fused", "torch"])
def path(request, monkeypatch):
    """Every test runs on both implementations behind bnlab.functional."""
    use_path(monkeypatch, request.param)
    return request.param


def _args(shape=(6, 3, 4, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 1
    w = torch.randn(c, generator=g, dtype=dtype)
    b = torch.randn(c, generator=g, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 7), (3, 2, 4, 5), (2, 2, 3, 2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(shape, training):
    x, w, b = (t.requires_grad_() for t in _args(shape))
    running_mean = torch.randn(shape[1], dtype=torch.float64)
    running_var = torch.rand(shape[1], dtype=torch.float64) + 0.5

    def fn(x_, w_, b_):
        return batch_norm(x_, running_mean.clone(), running_var.clone(), w_, b_, training)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_gradgradcheck_without_affine():
    x = _args((4, 3, 5))[0].requires_grad_()
    assert torch.autograd.gradgradcheck(lambda v: batch_norm(v, None, None, training=True), (x,))


def test_backward_is_analytic_not_elementary_autograd(path):
    """One autograd node for the whole operation, at small and large (pooled) sizes."""
    expected = "BatchNormNode" if path == "fused" else "BatchNormFunctionBackward"
    for shape in ((6, 3, 4, 5), (64, 16, 32, 32)):  # 3 KB and 4 MB
        x = torch.randn(shape, requires_grad=True)
        out = batch_norm(x, None, None, training=True)
        assert expected in out.grad_fn.name()


def test_matches_numpy_reference():
    x, w, b = _args((5, 3, 4, 4))
    dout = torch.randn_like(x)
    out_ref, cache = spatial_batchnorm_forward(x.numpy(), w.numpy(), b.numpy(), {"mode": "train"})
    dx_ref, dw_ref, db_ref = spatial_batchnorm_backward(dout.numpy(), cache)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    out = batch_norm(x, None, None, w, b, training=True)
    out.backward(dout)
    np.testing.assert_allclose(out.detach().numpy(), out_ref, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, atol=1e-12)
    np.testing.assert_allclose(w.grad.numpy(), dw_ref, atol=1e-12)
    np.testing.assert_allclose(b.grad.numpy(), db_ref, atol=1e-12)


def test_running_stats_update_with_unbiased_variance():
    x, w, b = _args((8, 3, 2, 2))
    running_mean, running_var = (
        torch.zeros(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
    )
    batch_norm(x, running_mean, running_var, w, b, training=True, momentum=0.25)
    dims = (0, 2, 3)
    torch.testing.assert_close(running_mean, 0.25 * x.mean(dims))
    torch.testing.assert_close(running_var, 0.75 + 0.25 * x.var(dims, correction=1))


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_offset_does_not_cancel(offset):
    """bnlab stays within 1e-4 of float64; torch's fp32 path is recorded for comparison."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, 16, 16, generator=g) + offset
    truth = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    ours = (batch_norm(x, None, None, training=True).double() - truth).abs().max().item()
    theirs = torch.nn.functional.batch_norm(x, None, None, training=True).double() - truth
    theirs = theirs.abs().max().item()
    assert ours <= 1e-4
    # torch's own float32 path loses digits to cancellation (about 3e-2 at 1e6, 6e-4 at 1e4).
    assert theirs > (1e-2 if offset == 1e6 else 1e-4), f"torch errs {theirs:.2e} at {offset:g}"
    running_mean = torch.zeros(8)
    running_var = torch.ones(8)
    batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    torch.testing.assert_close(running_var.double(), x.double().var((0, 2, 3)), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_float32_statistics(dtype):
    x, w, b = _args((8, 4, 5, 5), dtype=torch.float32)
    x = x.to(dtype).requires_grad_()
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    w32, b32 = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = batch_norm(x, running_mean, running_var, w32, b32, training=True)
    assert out.dtype == dtype and running_mean.dtype == torch.float32
    truth = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True)
    assert scaled_error(out, truth) < (2e-2 if dtype == torch.bfloat16 else 3e-3)
    out.sum().backward()
    assert x.grad.dtype == dtype and w32.grad.dtype == torch.float32
    torch.testing.assert_close(running_mean.double(), 0.1 * x.detach().double().mean((0, 2, 3)))


def test_channels_last_layout_is_preserved():
    x, w, b = _args((4, 3, 5, 5), dtype=torch.float32)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    out = batch_norm(x, None, None, w, b, training=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.backward(torch.ones_like(out))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch_gives_empty_output_and_keeps_statistics():
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    out = batch_norm(torch.randn(0, 3, 4), running_mean, running_var, training=True)
    assert out.shape == (0, 3, 4)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


def test_nonfinite_input_propagates_but_never_reaches_running_stats():
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    x[3, 2] = float("inf")
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.warns(
        RuntimeWarning, match=r"non-finite batch statistics in channel\(s\) \[1, 2\]"
    ):
        out = batch_norm(x, running_mean, running_var, training=True)
    assert torch.isnan(out[:, 1]).all(), "NaN propagates into its channel as in torch"
    assert torch.isfinite(out[:, 0]).all()
    assert torch.isfinite(running_mean).all() and torch.isfinite(running_var).all()
    assert running_mean[0] != 0 and running_mean[1] == 0 and running_var[2] == 1


def test_finite_input_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm(torch.randn(8, 3), torch.zeros(3), torch.ones(3), training=True)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6),
    c=st.integers(1, 4),
    length=st.integers(1, 5),
    loc=st.floats(-1e3, 1e3),
    scale=st.floats(1e-2, 1e2),
    seed=st.integers(0, 2**16),
)
def test_property_normalized_output_has_zero_mean_unit_variance(n, c, length, loc, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g, dtype=torch.float64) * scale + loc
    var = x.var((0, 2), correction=0)
    eps = 1e-5
    out = batch_norm(x, None, None, training=True, eps=eps)
    torch.testing.assert_close(
        out.mean((0, 2)), torch.zeros(c, dtype=torch.float64), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        out.var((0, 2), correction=0), var / (var + eps), atol=1e-9, rtol=1e-9
    )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6), c=st.integers(1, 4), loc=st.floats(-1e3, 1e3), seed=st.integers(0, 2**16)
)
def test_property_gamma_beta_recover_the_input(n, c, loc, seed):
    """With gamma = sqrt(var + eps) and beta = mean, BN is the identity (not gamma = var)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 3, generator=g, dtype=torch.float64) * 3 + loc
    eps = 1e-5
    var, mean = torch.var_mean(x, (0, 2), correction=0)
    out = batch_norm(x, None, None, torch.sqrt(var + eps), mean, training=True, eps=eps)
    torch.testing.assert_close(out, x, atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input": torch.randn(4)}, ValueError, r"input: expected a 2-d to 5-d tensor \(N, C, \*\), got 1-d"),
        ({"input": torch.randn(2, 3, 1, 1, 1, 1)}, ValueError, "input: expected a 2-d to 5-d tensor"),
        ({"input": torch.ones(4, 3, dtype=torch.int64)}, TypeError, "input: expected float16, bfloat16, float32 or float64, got torch.int64"),
        ({"input": torch.ones(4, 3, dtype=torch.bool)}, TypeError, "got torch.bool"),
        ({"input": torch.randn(1, 3)}, ValueError, r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\)"),
        ({"running_mean": torch.zeros(4)}, ValueError, r"running_mean: expected shape \(3,\) to match input's 3 channels .* got shape \(4,\)"),
        ({"running_var": torch.ones(3, 1)}, ValueError, r"running_var: expected shape \(3,\)"),
        ({"running_var": torch.ones(3, device="meta")}, ValueError, "running_var: expected device cpu like input, got meta"),
        ({"weight": torch.ones(2)}, ValueError, r"weight: expected shape \(3,\)"),
        ({"eps": 0.0}, ValueError, "eps: expected a positive finite number, got 0.0"),
        ({"eps": -1e-5}, ValueError, "eps: expected a positive finite number"),
        ({"eps": float("inf")}, ValueError, "eps: expected a positive finite number, got inf"),
        ({"running_var": None}, ValueError, "running_mean, running_var: expected both or neither, got only running_mean"),
        ({"running_mean": None}, ValueError, "running_mean, running_var: expected both or neither, got only running_var"),
        ({"momentum": 1.5}, ValueError, r"momentum: expected a number in \[0, 1\], got 1.5"),
        ({"momentum": -0.1}, ValueError, "momentum: expected a number in"),
        ({"training": False, "running_mean": None}, ValueError, "running_mean, running_var: expected tensors in evaluation mode"),
    ],
)  # fmt: skip
def test_bad_input_is_named(kwargs, error, match):
    args = {
        "input": torch.randn(4, 3),
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
        "training": True,
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        batch_norm(**args)


def _poisoned():
    x = torch.randn(8, 3, 4)
    x[1, 2, 0] = float("nan")
    return x


def test_nonfinite_raise_keeps_running_stats_and_names_channels():
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    with pytest.raises(
        FloatingPointError, match=r"channel\(s\) \[2\]; running statistics left unchanged"
    ):
        batch_norm(_poisoned(), running_mean, running_var, training=True, nonfinite="raise")
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_var, torch.ones(3))


def test_nonfinite_propagate_writes_like_torch():
    ours = (torch.zeros(3), torch.ones(3))
    theirs = (torch.zeros(3), torch.ones(3))
    x = _poisoned()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_norm(x, *ours, training=True, nonfinite="propagate")
    torch.nn.functional.batch_norm(x, *theirs, training=True)
    torch.testing.assert_close(ours[0], theirs[0], equal_nan=True)
    assert torch.isnan(ours[0][2]) and torch.isnan(ours[1][2])


def test_nonfinite_policy_on_modules_and_bad_value():
    from bnlab import nn as bnn

    bn = bnn.BatchNorm1d(3, nonfinite="raise")
    assert "nonfinite='raise'" in repr(bn)
    with pytest.raises(FloatingPointError):
        bn(_poisoned())
    assert torch.isfinite(bn.running_mean).all()
    with pytest.raises(
        ValueError,
        match=r"nonfinite: expected one of \('skip', 'raise', 'propagate'\), got 'ignore'",
    ):
        bnn.BatchNorm1d(3, nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite: expected one of"):
        batch_norm(torch.randn(4, 3), None, None, training=True, nonfinite="x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bias_without_weight_gets_a_gradient_of_its_dtype(dtype):
    x = torch.randn(6, 3, 4, dtype=dtype, requires_grad=True)
    bias = torch.randn(3, dtype=dtype, requires_grad=True)
    batch_norm(x, None, None, None, bias, training=True).pow(2).sum().backward()
    assert bias.grad.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(
        bias.grad,
        2 * batch_norm(x.detach(), None, None, None, bias.detach(), training=True).sum((0, 2)),
    )
