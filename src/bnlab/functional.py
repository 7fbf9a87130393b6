"""Level 2: ``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature and semantics.

Training normalizes with the batch mean and biased variance and updates the running
statistics in place (``running = (1 - momentum) * running + momentum * batch``, with the
*unbiased* variance); evaluation uses the running statistics.

Numerics: statistics are computed on data shifted by one sample per channel,
``d = x - x[0, c, 0, ...]``. For data with a large common offset the subtraction is exact
(Sterbenz), so mean and variance are computed on O(spread) numbers and never cancel
catastrophically. Half and bfloat16 inputs are computed in float32.

Non-finite batch statistics (NaN/Inf in the input) propagate into the output exactly as
in torch, but they are never written into the running statistics: the affected channels
keep their previous running values and a ``RuntimeWarning`` says so.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from bnlab import kernels

__all__ = ["batch_norm"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def per_channel(t: Tensor, input: Tensor) -> Tensor:
    """View a (C,) tensor so that it broadcasts against ``input`` along dim 1."""
    return t.view(1, -1, *([1] * (input.dim() - 2)))


def _check_channel_vector(name: str, t: Tensor | None, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor or None, got {type(t).__name__}")
    channels = input.shape[1]
    if t.shape != (channels,):
        raise ValueError(
            f"{name}: expected shape ({channels},) to match input's {channels} channels "
            f"(input shape {tuple(input.shape)}), got shape {tuple(t.shape)}"
        )
    if t.device != input.device:
        raise ValueError(f"{name}: expected device {input.device} like input, got {t.device}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point dtype, got {t.dtype}")


def check_batch_norm_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> None:
    """Validate ``batch_norm``'s arguments; raise naming the argument, expected and given."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
    if not 2 <= input.dim() <= 5:
        raise ValueError(
            f"input: expected a 2-d to 5-d tensor (N, C, *), got {input.dim()}-d "
            f"of shape {tuple(input.shape)}"
        )
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input: expected float16, bfloat16, float32 or float64, got {input.dtype}")
    for name, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        _check_channel_vector(name, t, input)
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            "running_mean, running_var: expected tensors in evaluation mode (training=False), "
            "got None"
        )
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
    if training and input.numel() > 0 and input.numel() // input.shape[1] == 1:
        raise ValueError(
            "input: Expected more than 1 value per channel when training, "
            f"got input size {input.shape}"
        )


def _shift(xa: Tensor) -> Tensor:
    """One sample per channel, ``x[0, c, 0, ...]``: the shift that makes the sums exact."""
    return xa[(0, slice(None)) + (0,) * (xa.dim() - 2)].clone()


def batch_stats(xa: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(shift, mean - shift, biased var)`` of ``xa``, free of cancellation."""
    shift = _shift(xa)
    var, mean_d = torch.var_mean(xa - per_channel(shift, xa), reduce_dims(xa), correction=0)
    return shift, mean_d, var


def grad_input_from_means(dy: Tensor, x_hat: Tensor, mean_dy: Tensor, mean_dy_xhat: Tensor, gain: Tensor) -> Tensor:  # fmt: skip
    """``dx = gain · (dy − mean(dy) − x̂ · mean(dy·x̂))``, the means over the (global) batch."""
    return (dy - per_channel(mean_dy, dy) - x_hat * per_channel(mean_dy_xhat, dy)) * per_channel(gain, dy)  # fmt: skip


NONFINITE_POLICIES = ("skip", "raise", "propagate")
_NO_GRADS = (None,) * 6  # running_mean, running_var, training, momentum, eps, nonfinite


def report_nonfinite(finite: Tensor, policy: str) -> None:
    """Warn ('skip') or raise ('raise') naming the channels whose batch statistics are not
    finite; in both cases their running statistics have been left unchanged."""
    bad = (~finite).nonzero().flatten().tolist()
    channels = f"{bad[:10]}{'...' if len(bad) > 10 else ''}"
    if policy == "raise":
        raise FloatingPointError(
            f"batch_norm: non-finite batch statistics in channel(s) {channels}; running "
            "statistics left unchanged (nonfinite='raise')"
        )
    warnings.warn(
        f"batch_norm: non-finite batch statistics in channel(s) {channels}; their running "
        "statistics were not updated",
        RuntimeWarning,
        stacklevel=4,
    )


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
    nonfinite: str = "skip",
    correction: bool = True,
) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` with the unbiased variance
    (``var`` is the biased one of ``count`` values, or already unbiased if not ``correction``).

    Channels whose batch statistics are not finite keep their running values, with a warning
    (``nonfinite='skip'``) or an error ('raise'); 'propagate' writes them, as torch does.
    """
    unbiased = var * (count / (count - 1)) if correction else var
    finite = torch.isfinite(mean) & torch.isfinite(unbiased)
    all_finite = nonfinite == "propagate" or bool(finite.all())
    if not all_finite:
        report_nonfinite(finite, nonfinite)
    for running, batch in ((running_mean, mean), (running_var, unbiased)):
        if running is None:
            continue
        new = running * (1.0 - momentum) + batch.to(running.dtype) * momentum
        running.copy_(new if all_finite else torch.where(finite, new, running))


class _BatchNormFunction(torch.autograd.Function):
    """Batch norm with an analytic backward.

    The backward is written in differentiable torch ops; under ``create_graph`` it recomputes
    the batch statistics from the input so that double backward is exact.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, nonfinite):  # fmt: skip
        acc = _compute_dtype(input.dtype)
        xa = input.to(acc)
        if training:
            shift, mean_d, var = batch_stats(xa)
            invstd = torch.rsqrt(var + eps)
            count = input.numel() // input.shape[1]
            update_running_stats(running_mean, running_var, shift + mean_d, var, count, momentum, nonfinite)  # fmt: skip
        else:
            shift = running_mean.to(acc, copy=True)  # later in-place updates must not leak
            mean_d = torch.zeros_like(shift)
            invstd = torch.rsqrt(running_var.to(acc) + eps)
        scale = invstd if weight is None else invstd * weight.to(acc)
        out = xa - per_channel(shift, xa)
        if training:
            out.sub_(per_channel(mean_d, xa))
        out.mul_(per_channel(scale, xa))
        if bias is not None:
            out.add_(per_channel(bias.to(acc), xa))
        ctx.save_for_backward(input, weight, shift, mean_d, invstd)
        ctx.training, ctx.eps = training, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, shift, mean_d, invstd = ctx.saved_tensors
        acc = _compute_dtype(input.dtype)
        xa = input.to(acc)
        if ctx.training and torch.is_grad_enabled():
            # Double backward: statistics must be functions of the input in the graph.
            var, mean_d = torch.var_mean(xa - per_channel(shift, xa), reduce_dims(xa), correction=0)
            invstd = torch.rsqrt(var + ctx.eps)
        dims = reduce_dims(xa)
        dy = grad_out.to(acc)
        x_hat = (xa - per_channel(shift, xa) - per_channel(mean_d, xa)) * per_channel(invstd, xa)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * x_hat).sum(dims)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            gain = invstd if weight is None else invstd * weight.to(acc)
            if ctx.training:
                count = input.numel() // input.shape[1]
                grad_input = grad_input_from_means(dy, x_hat, sum_dy / count, sum_dy_xhat / count, gain)  # fmt: skip
            else:
                grad_input = dy * per_channel(gain, xa)
            grad_input = grad_input.to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, *_NO_GRADS


class _RunningGuard:
    """Applies the ``nonfinite`` policy around a kernel that updated the running statistics
    of finite channels only (``bad`` = how many were not finite)."""

    def __init__(self, running_mean, running_var, nonfinite: str) -> None:
        self.policy = nonfinite
        self.running = [t for t in (running_mean, running_var) if t is not None]
        self.before = [t.clone() for t in self.running] if nonfinite == "raise" else []

    def check(self, bad: int, mean_d: Tensor, invstd: Tensor) -> None:
        if not bad or self.policy == "propagate" or not self.running:
            return
        for t, old in zip(self.running, self.before, strict=False):  # 'raise' keeps every channel
            t.copy_(old)
        report_nonfinite(torch.isfinite(mean_d) & torch.isfinite(invstd), self.policy)


def _fused_forward(input, weight, bias, running_mean, running_var, training, momentum, eps, nonfinite, save):  # fmt: skip
    """One fused forward: ``(out, shift, mean_d, invstd)`` (the last three only if ``save``)."""
    ops = kernels.load()
    out = kernels.empty_like(input)
    if training:
        guard = _RunningGuard(running_mean, running_var, nonfinite)
        shift, mean_d, invstd, bad = ops.forward_train(
            input, weight, bias, running_mean, running_var, momentum, eps, out,
            nonfinite != "propagate",
        )  # fmt: skip
        guard.check(bad, mean_d, invstd)
        return out, shift, mean_d, invstd
    shift, invstd = ops.forward_eval(input, weight, bias, running_mean, running_var, eps, out, save)
    return out, shift, (torch.zeros_like(shift) if save else None), invstd


def _fused_autograd(input, weight, bias, running_mean, running_var, training, momentum, eps, nonfinite):  # fmt: skip
    """The fused kernels behind a C++ autograd node (same semantics as the Function below)."""
    guard = _RunningGuard(running_mean, running_var, nonfinite if training else "propagate")
    out, stats, bad = kernels.load().fused_autograd(
        input, weight, bias, running_mean, running_var, training, momentum, eps,
        nonfinite != "propagate",
    )  # fmt: skip
    guard.check(bad, stats[0], stats[1])
    return out


class _FusedBatchNormFunction(torch.autograd.Function):
    """The same operation on bnlab's fused C++ kernels (two passes forward, two backward).

    Double backward (``create_graph=True``) takes :class:`_BatchNormFunction`'s
    differentiable backward, which reads the same saved tensors.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, nonfinite):  # fmt: skip
        out, shift, mean_d, invstd = _fused_forward(
            input, weight, bias, running_mean, running_var, training, momentum, eps, nonfinite, True
        )
        ctx.save_for_backward(input, weight, shift, mean_d, invstd)
        ctx.training, ctx.eps = training, eps
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            return _BatchNormFunction.backward(ctx, grad_out)
        input, weight, shift, mean_d, invstd = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_weight = need_weight and weight is not None
        need_bias = need_bias and ctx.bias_dtype is not None
        grad_input = kernels.empty_like(input) if need_input else None
        sums_dtype = weight.dtype if need_weight else (ctx.bias_dtype if need_bias else None)
        sum_dy, sum_dy_xhat = kernels.load().backward(
            kernels.same_layout(grad_out, input), input, weight, shift, mean_d, invstd,
            ctx.training, sums_dtype, grad_input,
        )  # fmt: skip
        grad_weight = sum_dy_xhat if need_weight else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, *_NO_GRADS


def _needs_graph(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    nonfinite: str = "skip",
) -> Tensor:
    """Batch normalization, a drop-in for ``torch.nn.functional.batch_norm``.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias`` per channel (dim 1), with batch
    statistics in training and running statistics otherwise. ``momentum`` is the weight of
    the *new* batch statistic (torch's convention).

    ``nonfinite`` guards the running statistics against a batch with NaN/Inf statistics:
    'skip' (default) keeps the affected channels' running values and warns, 'raise' keeps
    them and raises ``FloatingPointError``, 'propagate' writes them as torch does. The
    output propagates NaN/Inf in every case, as torch's does.

    Shape: input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); the other tensors (C,).
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if input.device.type != "cpu" or input.numel() == 0:
        # Other devices use torch's native kernel; an empty batch leaves the statistics alone.
        return torch.nn.functional.batch_norm(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    args = (input, weight, bias, running_mean, running_var, training, momentum, eps, nonfinite)
    if not kernels.usable(input):
        return _BatchNormFunction.apply(*args)
    if _needs_graph(input, weight, bias):
        if input.numel() * input.element_size() < kernels.HUGE_ALLOCATION_BYTES:
            return _fused_autograd(*args)  # small: a C++ autograd node, no Python backward
        return _FusedBatchNormFunction.apply(*args)
    return _fused_forward(*args, save=False)[0]  # no autograd graph: skip the Function
