"""Batch Normalization in NumPy: the textbook forward and backward passes.

This is bnlab's oracle: readable, float64-exact, and dependent on NumPy alone.

Convention warning: in ``bn_param``, ``momentum`` is the fraction of the *old*
running value that is kept (default 0.9)::

    running_mean = momentum * running_mean + (1 - momentum) * batch_mean

This is the opposite of PyTorch, whose ``momentum`` (default 0.1) is the weight
of the *new* batch statistic. ``bnlab.nn`` follows PyTorch's convention.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_MODES = ("train", "test")


def _check_bn_param(bn_param: dict[str, Any]) -> tuple[str, float, float]:
    if not isinstance(bn_param, dict):
        raise TypeError(f"bn_param: expected a dict, got {type(bn_param).__name__}")
    if "mode" not in bn_param:
        raise ValueError("bn_param: missing required key 'mode' (expected 'train' or 'test')")
    mode = bn_param["mode"]
    if mode not in _MODES:
        raise ValueError(f"bn_param['mode']: expected 'train' or 'test', got {mode!r}")
    eps = float(bn_param.get("eps", 1e-5))
    if not eps > 0:
        raise ValueError(f"bn_param['eps']: expected a positive number, got {eps}")
    momentum = float(bn_param.get("momentum", 0.9))
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bn_param['momentum']: expected a value in [0, 1], got {momentum}")
    return mode, eps, momentum


def _check_arrays(**arrays) -> None:
    """Raise, naming it, for a torch tensor among the arguments: the reference takes NumPy
    arrays (a tensor's dtype is not one NumPy understands)."""
    for name, value in arrays.items():
        if type(value).__module__.startswith("torch"):
            raise TypeError(
                f"{name}: expected a NumPy array, got {type(value).__module__}.{type(value).__name__} "
                "(the NumPy reference takes arrays: pass t.numpy(); for tensors use "
                "bnlab.functional.batch_norm)"
            )


def _check_inputs(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> int:
    _check_arrays(x=x, gamma=gamma, beta=beta)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x: expected a 2-d array of shape (N, D), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x: expected a floating-point array, got dtype {x.dtype}")
    num_features = x.shape[1]
    for name, value in (("gamma", gamma), ("beta", beta)):
        if np.shape(value) != (num_features,):
            raise ValueError(
                f"{name}: expected shape ({num_features},) to match x of shape {x.shape}, "
                f"got shape {np.shape(value)}"
            )
    return num_features


def _running_buffer(bn_param: dict[str, Any], key: str, fill: float, n: int, dtype) -> np.ndarray:
    if key not in bn_param:
        bn_param[key] = np.full(n, fill, dtype=dtype)
    value = bn_param[key]
    if np.shape(value) != (n,):
        raise ValueError(f"bn_param[{key!r}]: expected shape ({n},), got shape {np.shape(value)}")
    return value


def batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict[str, Any]
) -> tuple[np.ndarray, tuple]:
    """Batch-normalize ``x`` feature-wise, then scale by ``gamma`` and shift by ``beta``.

    Train mode: ``x_hat = (x - mu_B) / sqrt(var_B + eps)`` with the batch mean and
    *biased* variance, ``out = gamma * x_hat + beta``; the running statistics in
    ``bn_param`` are updated in place (``momentum`` keeps the old value, see the module
    docstring). Test mode uses ``running_mean`` / ``running_var`` instead.

    Shape: x (N, D), gamma and beta (D,), out (N, D).
    Returns ``(out, cache)``; ``cache`` feeds the backward functions.
    """
    mode, eps, momentum = _check_bn_param(bn_param)
    num_features = _check_inputs(x, gamma, beta)
    running_mean = _running_buffer(bn_param, "running_mean", 0.0, num_features, x.dtype)
    running_var = _running_buffer(bn_param, "running_var", 1.0, num_features, x.dtype)

    if mode == "train":
        if x.shape[0] < 2:
            raise ValueError(
                f"x: expected more than 1 value per feature in train mode, got shape {x.shape}"
            )
        # The computation graph, one node per line; the staged backward walks it in reverse.
        mu = x.mean(axis=0)
        xmu = x - mu
        sq = xmu**2
        var = sq.mean(axis=0)
        sqrtvar = np.sqrt(var + eps)
        ivar = 1.0 / sqrtvar
        x_hat = xmu * ivar
        out = gamma * x_hat + beta
        running_mean *= momentum
        running_mean += (1.0 - momentum) * mu
        running_var *= momentum
        running_var += (1.0 - momentum) * var
        cache = ("train", x_hat, xmu, ivar, sqrtvar, var, eps, gamma)
    else:
        ivar = 1.0 / np.sqrt(running_var + eps)
        x_hat = (x - running_mean) * ivar
        out = gamma * x_hat + beta
        cache = ("test", x_hat, None, ivar, None, None, eps, gamma)
    return out, cache


def batchnorm_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, ...]:
    """Backward pass staged through the forward graph, node by node in reverse.

    Returns ``(dx, dgamma, dbeta)``, each with the shape of its forward counterpart.
    """
    _check_arrays(dout=dout)
    mode, x_hat, xmu, ivar, sqrtvar, var, eps, gamma = cache
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    dx_hat = dout * gamma
    if mode == "test":
        return dx_hat * ivar, dgamma, dbeta
    n = dout.shape[0]
    # x_hat = xmu * ivar
    dxmu = dx_hat * ivar
    divar = (dx_hat * xmu).sum(axis=0)
    # ivar = 1 / sqrtvar ; sqrtvar = sqrt(var + eps)
    dsqrtvar = -divar / sqrtvar**2
    dvar = 0.5 * dsqrtvar / np.sqrt(var + eps)
    # var = mean(sq) ; sq = xmu**2
    dsq = np.broadcast_to(dvar / n, dout.shape)
    dxmu = dxmu + 2.0 * xmu * dsq
    # xmu = x - mu ; mu = mean(x)
    dmu = -dxmu.sum(axis=0)
    dx = dxmu + dmu / n
    return dx, dgamma, dbeta


def batchnorm_backward_alt(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, ...]:
    """Backward pass in closed form.

    ``dx = gamma / sigma * (dout - mean(dout) - x_hat * mean(dout * x_hat))``,
    with ``sigma = sqrt(var_B + eps)`` and means over the batch.
    """
    _check_arrays(dout=dout)
    mode, x_hat, _, ivar, _, _, _, gamma = cache
    dbeta = dout.sum(axis=0)
    dgamma = (dout * x_hat).sum(axis=0)
    if mode == "test":
        return dout * gamma * ivar, dgamma, dbeta
    n = dout.shape[0]
    dx = gamma * ivar * (dout - dbeta / n - x_hat * dgamma / n)
    return dx, dgamma, dbeta


def _to_rows(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N*H*W, C): each channel becomes one feature column."""
    n, c, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(n * h * w, c)


def _from_rows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, c, h, w = shape
    return rows.reshape(n, h, w, c).transpose(0, 3, 1, 2)


def _check_nchw(name: str, x: np.ndarray) -> None:
    _check_arrays(**{name: x})
    if np.ndim(x) != 4:
        raise ValueError(f"{name}: expected a 4-d array of shape (N, C, H, W), got {np.shape(x)}")


def spatial_batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict[str, Any]
) -> tuple[np.ndarray, tuple]:
    """Batch normalization for images: statistics per channel over N, H and W.

    Shape: x (N, C, H, W), gamma and beta (C,), out (N, C, H, W).
    """
    _check_nchw("x", x)
    out, cache = batchnorm_forward(_to_rows(x), gamma, beta, bn_param)
    return _from_rows(out, x.shape), (x.shape, cache)


def spatial_batchnorm_backward(dout: np.ndarray, cache: tuple) -> tuple[np.ndarray, ...]:
    """Backward of :func:`spatial_batchnorm_forward`; returns ``(dx, dgamma, dbeta)``."""
    _check_nchw("dout", dout)
    shape, row_cache = cache
    dx, dgamma, dbeta = batchnorm_backward_alt(_to_rows(dout), row_cache)
    return _from_rows(dx, shape), dgamma, dbeta


def population_statistics(
    batch_means: np.ndarray, batch_vars: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Population statistics for inference from per-batch statistics.

    ``E[x] = E_B[mu_B]`` and ``Var[x] = m / (m - 1) * E_B[sigma_B^2]`` where ``m`` is the
    batch size and ``sigma_B^2`` the biased batch variance (Ioffe & Szegedy, 2015, Alg. 2).

    Shape: batch_means and batch_vars (B, D) for B batches; returns two (D,) arrays.
    """
    batch_means = np.asarray(batch_means, dtype=np.float64)
    batch_vars = np.asarray(batch_vars, dtype=np.float64)
    if batch_means.ndim != 2 or batch_means.shape != batch_vars.shape:
        raise ValueError(
            "batch_means, batch_vars: expected two arrays of the same shape (B, D), "
            f"got {batch_means.shape} and {batch_vars.shape}"
        )
    if batch_means.shape[0] == 0:
        raise ValueError("batch_means: expected at least one batch, got 0")
    if int(batch_size) < 2:
        raise ValueError(f"batch_size: expected an integer >= 2, got {batch_size}")
    m = int(batch_size)
    return batch_means.mean(axis=0), m / (m - 1) * batch_vars.mean(axis=0)


def fold_to_affine(
    gamma: np.ndarray,
    beta: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray]:
    """Inference-time batch norm as one affine map ``y = scale * x + shift``.

    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - scale * running_mean``.
    """
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps}")
    shapes = {np.shape(a) for a in (gamma, beta, running_mean, running_var)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(
            "gamma, beta, running_mean, running_var: expected four 1-d arrays of one shape (D,),"
            f" got shapes {[np.shape(a) for a in (gamma, beta, running_mean, running_var)]}"
        )
    scale = np.asarray(gamma) / np.sqrt(np.asarray(running_var) + eps)
    return scale, np.asarray(beta) - scale * np.asarray(running_mean)
