"""The NumPy reference: forward semantics, both backwards vs numerical gradients, helpers."""

import numpy as np
import pytest
import torch

from bnlab.reference import (
    batchnorm_backward,
    batchnorm_backward_alt,
    batchnorm_forward,
    fold_to_affine,
    numerical_gradient,
    population_statistics,
    relative_error,
    spatial_batchnorm_backward,
    spatial_batchnorm_forward,
)

RNG = np.random.default_rng(231)


def _data(n=7, d=5):
    x = RNG.normal(3.0, 2.0, size=(n, d))
    return x, RNG.normal(size=d), RNG.normal(size=d), RNG.normal(size=(n, d))


def test_train_forward_normalizes_with_biased_batch_variance():
    x, _, _, _ = _data()
    out, _ = batchnorm_forward(x, np.ones(5), np.zeros(5), {"mode": "train", "eps": 0.0 + 1e-12})
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=0), 1.0, rtol=1e-9)


def test_gamma_beta_scale_and_shift():
    x, gamma, beta, _ = _data()
    out, _ = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    np.testing.assert_allclose(out.mean(axis=0), beta, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=0), np.abs(gamma), rtol=1e-4)


def test_running_stats_keep_momentum_fraction_of_old_value():
    x, gamma, beta, _ = _data()
    bn_param = {"mode": "train", "momentum": 0.9}
    batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], 0.1 * x.mean(axis=0))
    np.testing.assert_allclose(bn_param["running_var"], 0.9 + 0.1 * x.var(axis=0))
    running_mean = bn_param["running_mean"]
    batchnorm_forward(x, gamma, beta, bn_param)
    assert bn_param["running_mean"] is running_mean, "updated in place"
    np.testing.assert_allclose(running_mean, 0.19 * x.mean(axis=0))


def test_test_mode_uses_running_stats_and_leaves_them():
    x, gamma, beta, _ = _data()
    mean, var = RNG.normal(size=5), RNG.uniform(0.5, 2.0, size=5)
    bn_param = {"mode": "test", "running_mean": mean.copy(), "running_var": var.copy()}
    out, _ = batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(out, gamma * (x - mean) / np.sqrt(var + 1e-5) + beta)
    np.testing.assert_array_equal(bn_param["running_mean"], mean)


def test_matches_torch_train_forward():
    x, gamma, beta, _ = _data()
    out, _ = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    want = torch.nn.functional.batch_norm(
        torch.from_numpy(x), None, None, torch.from_numpy(gamma), torch.from_numpy(beta), True
    )
    np.testing.assert_allclose(out, want.numpy(), atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("backward", [batchnorm_backward, batchnorm_backward_alt])
def test_backward_matches_numerical_gradient(mode, backward):
    x, gamma, beta, dout = _data()
    params = {"mode": mode, "running_mean": RNG.normal(size=5), "running_var": np.full(5, 2.0)}

    def forward(x_, g_, b_):
        return batchnorm_forward(x_, g_, b_, dict(params, mode=mode))[0]

    _, cache = batchnorm_forward(x, gamma, beta, dict(params))
    dx, dgamma, dbeta = backward(dout, cache)
    assert relative_error(dx, numerical_gradient(lambda v: forward(v, gamma, beta), x, dout)) < 1e-7
    num_dgamma = numerical_gradient(lambda v: forward(x, v, beta), gamma, dout)
    assert relative_error(dgamma, num_dgamma) < 1e-7
    assert (
        relative_error(dbeta, numerical_gradient(lambda v: forward(x, gamma, v), beta, dout)) < 1e-7
    )


def test_staged_and_compact_backward_agree():
    x, gamma, beta, dout = _data(n=32, d=9)
    _, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    for a, b in zip(
        batchnorm_backward(dout, cache), batchnorm_backward_alt(dout, cache), strict=True
    ):
        assert relative_error(a, b) < 1e-12


def test_spatial_forward_uses_per_channel_stats_over_n_h_w():
    x = RNG.normal(5.0, 3.0, size=(4, 3, 5, 6))
    out, _ = spatial_batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
    assert out.shape == x.shape
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=(0, 2, 3)), 1.0, rtol=1e-5)
    want = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True)
    np.testing.assert_allclose(out, want.numpy(), atol=1e-12)


def test_spatial_backward_matches_numerical_gradient():
    x = RNG.normal(size=(3, 2, 4, 3))
    gamma, beta, dout = RNG.normal(size=2), RNG.normal(size=2), RNG.normal(size=x.shape)
    _, cache = spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, _ = spatial_batchnorm_backward(dout, cache)

    def forward(v):
        return spatial_batchnorm_forward(v, gamma, beta, {"mode": "train"})[0]

    assert relative_error(dx, numerical_gradient(forward, x, dout)) < 1e-7
    num_dgamma = numerical_gradient(
        lambda g: spatial_batchnorm_forward(x, g, beta, {"mode": "train"})[0], gamma, dout
    )
    assert relative_error(dgamma, num_dgamma) < 1e-7


def test_population_statistics_is_unbiased_estimator():
    batches = RNG.normal(2.0, 3.0, size=(400, 8, 3))  # 400 batches of m=8, 3 features
    mean, var = population_statistics(batches.mean(axis=1), batches.var(axis=1), batch_size=8)
    np.testing.assert_allclose(mean, batches.reshape(-1, 3).mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(var, 8 / 7 * batches.var(axis=1).mean(axis=0))
    np.testing.assert_allclose(var, 9.0, rtol=0.1)


def test_fold_to_affine_equals_test_mode_forward():
    x, gamma, beta, _ = _data()
    mean, var = RNG.normal(size=5), RNG.uniform(0.5, 2.0, size=5)
    scale, shift = fold_to_affine(gamma, beta, mean, var, 1e-3)
    bn_param = {"mode": "test", "running_mean": mean, "running_var": var, "eps": 1e-3}
    np.testing.assert_allclose(x * scale + shift, batchnorm_forward(x, gamma, beta, bn_param)[0])


@pytest.mark.parametrize(
    ("bn_param", "match"),
    [
        ({}, "missing required key 'mode'"),
        ({"mode": "eval"}, r"bn_param\['mode'\]: expected 'train' or 'test', got 'eval'"),
        ({"mode": "train", "eps": 0.0}, r"bn_param\['eps'\]: expected a positive number"),
        ({"mode": "train", "momentum": 1.5}, r"bn_param\['momentum'\]: expected a value in \[0, 1\]"),
        ({"mode": "train", "running_mean": np.zeros(4)}, r"bn_param\['running_mean'\]: expected shape \(5,\)"),
    ],
)  # fmt: skip
def test_bad_bn_param_is_named(bn_param, match):
    x, gamma, beta, _ = _data()
    with pytest.raises(ValueError, match=match):
        batchnorm_forward(x, gamma, beta, bn_param)


def test_bad_arrays_are_named():
    x, gamma, beta, _ = _data()
    with pytest.raises(ValueError, match=r"x: expected a 2-d array of shape \(N, D\), got shape"):
        batchnorm_forward(x[None], gamma, beta, {"mode": "train"})
    with pytest.raises(TypeError, match="x: expected a floating-point array, got dtype int64"):
        batchnorm_forward(x.astype(np.int64), gamma, beta, {"mode": "train"})
    with pytest.raises(ValueError, match=r"gamma: expected shape \(5,\)"):
        batchnorm_forward(x, gamma[:3], beta, {"mode": "train"})
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        batchnorm_forward(x[:1], gamma, beta, {"mode": "train"})
    with pytest.raises(ValueError, match=r"x: expected a 4-d array of shape \(N, C, H, W\)"):
        spatial_batchnorm_forward(x, gamma, beta, {"mode": "train"})
    with pytest.raises(
        TypeError, match=r"x: expected a NumPy array, got torch.Tensor .*t.numpy\(\)"
    ):
        batchnorm_forward(torch.from_numpy(x), gamma, beta, {"mode": "train"})
    with pytest.raises(TypeError, match="gamma: expected a NumPy array, got torch"):
        batchnorm_forward(x, torch.from_numpy(gamma), beta, {"mode": "train"})
    out, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    with pytest.raises(TypeError, match="dout: expected a NumPy array, got torch"):
        batchnorm_backward(torch.from_numpy(out), cache)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 2"):
        population_statistics(np.zeros((2, 3)), np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        fold_to_affine(gamma, beta, gamma, beta, eps=-1.0)
