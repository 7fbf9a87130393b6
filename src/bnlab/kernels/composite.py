"""The bnlab batch-norm operation written in differentiable torch ops.

Same arguments and results as the ``bnlab::batch_norm_forward`` / ``batch_norm_backward``
operators (``cpu/ops.cpp``). It serves three roles:
- the fallback where the C++ extension cannot be built or is switched off;
- the backward's graph when one is needed (``create_graph=True``, double backward): the
  training statistics are recomputed from the input inside the graph, so second derivatives
  are exact. Registered as ``bnlab::batch_norm_backward_graph`` for the C++ autograd node;
- the readable statement of what the kernels compute.

Statistics are taken on data shifted by one sample per channel, ``d = x − x[0, c, 0…]``: for
data with a large common offset the subtraction is exact, so mean and variance never cancel.

Where the formulas live: the NumPy reference (``bnlab/reference``, the float64 oracle for
tests), this module (torch ops: fallback and double backward), the C++ kernels
(``cpu/forward.cpp``, ``cpu/backward.cpp``: fused passes for speed) and the Triton kernels
(``cuda/``: the same passes on the GPU). Each is tested against the reference.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from bnlab.kernels.layout import composite_strides, in_result_layout

IDENTITY, RELU = 0, 1
PROPAGATE, SKIP, RAISE = 0, 1, 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 input, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_dims(input: Tensor) -> list[int]:
    """Every dim but the channel dim 1."""
    return [0, *range(2, input.dim())]


def per_channel(t: Tensor, input: Tensor) -> Tensor:
    """View a (C,) tensor so that it broadcasts against ``input`` along dim 1."""
    return t.view(1, -1, *([1] * (input.dim() - 2)))


def shift_of(xa: Tensor) -> Tensor:
    """One sample per channel, ``x[0, c, 0, ...]``: the shift that makes the sums exact; 0
    where that sample is not finite (an inf shift would make the sums NaN, torch's mean inf)."""
    sample = xa[(0, slice(None)) + (0,) * (xa.dim() - 2)]
    return torch.where(torch.isfinite(sample), sample, torch.zeros_like(sample))


def batch_stats(xa: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(shift, mean − shift, biased variance)`` of ``xa``, free of cancellation."""
    shift = shift_of(xa)
    d, dims = xa - per_channel(shift, xa), reduce_dims(xa)
    # mean and variance apart: torch.var_mean's mean is NaN where a channel holds an inf (its
    # running update), torch's BN mean is inf, as d.mean() gives
    return shift, d.mean(dims), d.var(dims, correction=0)


def grad_input_from_means(dy: Tensor, x_hat: Tensor, mean_dy: Tensor, mean_dy_xhat: Tensor, gain: Tensor) -> Tensor:  # fmt: skip
    """``dx = gain · (dy − mean(dy) − x̂ · mean(dy·x̂))``, the means over the (global) batch."""
    return (dy - per_channel(mean_dy, dy) - x_hat * per_channel(mean_dy_xhat, dy)) * per_channel(gain, dy)  # fmt: skip


def report_nonfinite(bad: Tensor, nonfinite: int, in_operator: bool = False) -> None:
    """Name the channels of ``bad`` whose batch statistics are not finite: a RuntimeWarning
    (SKIP) or a FloatingPointError (RAISE) after an eager call; with ``in_operator`` the
    UserWarning / RuntimeError the C++ operator raises inside compiled code (same messages)."""
    channels = bad.nonzero().flatten().tolist()
    listed = f"[{', '.join(map(str, channels[:10]))}{', ...' if len(channels) > 10 else ''}]"
    if nonfinite == RAISE:
        raise (RuntimeError if in_operator else FloatingPointError)(
            f"batch_norm: non-finite batch statistics in channel(s) {listed}; running "
            "statistics left unchanged (nonfinite='raise')"
        )
    warnings.warn(
        f"batch_norm: non-finite batch statistics in channel(s) {listed}; their running "
        "statistics were not updated",
        UserWarning if in_operator else RuntimeWarning,
        stacklevel=4,
    )


def update_running(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                   unbiased_var: Tensor, momentum: float, nonfinite: int) -> Tensor:  # fmt: skip
    """``running = (1 − momentum)·running + momentum·batch`` in place, guarded.

    Returns the (C,) mask of channels whose batch statistics are not finite. ``nonfinite``:
    PROPAGATE writes them (as torch does), SKIP leaves those channels unchanged, RAISE leaves
    every channel unchanged if any is bad (the caller raises).
    """
    bad = ~(torch.isfinite(mean) & torch.isfinite(unbiased_var))
    with torch.no_grad():
        if nonfinite == PROPAGATE:
            keep = None
        elif nonfinite == SKIP:
            keep = bad
        else:
            keep = bad.any().expand_as(bad)
        for running, batch in ((running_mean, mean), (running_var, unbiased_var)):
            if running is None:
                continue
            new = running * (1.0 - momentum) + batch.to(running.dtype) * momentum
            running.copy_(new if keep is None else torch.where(keep, running, new))
    return bad


def forward(input, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation, nonfinite, report=False):  # fmt: skip
    """``(out, shift, mean_d, invstd, bad)`` as ``bnlab::batch_norm_forward`` computes them.

    ``out = act((x − shift − mean_d)·invstd·weight + bias + residual)``; with ``report`` the
    non-finite channels are reported here, as the operator does.
    """
    acc = compute_dtype(input.dtype)
    xa = input.to(acc)
    if training:
        shift, mean_d, var = batch_stats(xa)
        invstd = torch.rsqrt(var + eps)
        count = input.numel() // input.shape[1]
        unbiased = var.detach() * (count / max(count - 1, 1))
        bad = update_running(running_mean, running_var, (shift + mean_d).detach(), unbiased,
                             momentum, nonfinite)  # fmt: skip
        if report and nonfinite != PROPAGATE and bool(bad.any()):
            report_nonfinite(bad, nonfinite, in_operator=True)
    else:
        shift = running_mean.to(acc, copy=True)  # later in-place updates must not leak
        mean_d = torch.zeros_like(shift)
        invstd = torch.rsqrt(running_var.to(acc) + eps)
        bad = torch.zeros(shift.shape, dtype=torch.bool, device=shift.device)
    scale = invstd if weight is None else invstd * weight.to(acc)
    out = (xa - per_channel(shift, xa) - per_channel(mean_d, xa)) * per_channel(scale, xa)
    if bias is not None:
        out = out + per_channel(bias.to(acc), xa)
    if residual is not None:
        out = out + residual.to(acc)
    if activation == RELU:
        out = torch.relu(out)
    return (
        in_result_layout(out.to(input.dtype), composite_strides(input)),
        shift,
        mean_d,
        invstd,
        bad,
    )


def _normalized(xa: Tensor, shift: Tensor, mean_d: Tensor, invstd: Tensor, eps: float | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(x̂, invstd)``: ``x̂ = (x − shift − mean_d)·invstd`` with the given statistics, or, with
    ``eps``, with the batch statistics recomputed from ``xa`` (in the graph, so that a
    derivative of what is built on x̂ sees them move with x)."""
    if eps is not None:
        var, mean_d = torch.var_mean(xa - per_channel(shift, xa), reduce_dims(xa), correction=0)
        invstd = torch.rsqrt(var + eps)
    return (xa - per_channel(shift, xa) - per_channel(mean_d, xa)) * per_channel(invstd, xa), invstd


def backward(grad_out, input, weight, output, shift, mean_d, invstd, training, activation, output_mask, eps=None):  # fmt: skip
    """``(grad_input, grad_weight, grad_bias, grad_residual)`` in differentiable torch ops.

    ``g = grad_out·[output > 0]`` past a ReLU; ``grad_weight = Σ g·x̂``, ``grad_bias = Σ g``,
    ``grad_input = w·invstd·(g − mean(g) − x̂·mean(g·x̂))`` in training and ``w·invstd·g`` in
    evaluation. With ``eps`` given (the graph of the backward), training statistics are
    recomputed from the input, so the result is differentiable in the input as well.
    Results not asked for in ``output_mask`` are empty tensors.
    """
    acc = compute_dtype(input.dtype)
    xa = input.to(acc)
    dims = reduce_dims(xa)
    x_hat, invstd = _normalized(xa, shift, mean_d, invstd, eps if training else None)
    g = grad_out.to(acc)
    if activation == RELU:
        g = g * (output > 0)
    sum_g = g.sum(dims)
    sum_g_xhat = (g * x_hat).sum(dims)
    none = xa.new_empty((0,))
    strides = composite_strides(input, grad_out)  # torch's, for grad_input and grad_residual
    grad_input = none
    if output_mask[0]:
        gain = invstd if weight is None else invstd * weight.to(acc)
        if training:
            count = input.numel() // input.shape[1]
            grad_input = grad_input_from_means(g, x_hat, sum_g / count, sum_g_xhat / count, gain)
        else:
            grad_input = g * per_channel(gain, xa)
        grad_input = in_result_layout(grad_input.to(input.dtype), strides)
    return (
        grad_input,
        sum_g_xhat if output_mask[1] else none,
        sum_g if output_mask[2] else none,
        in_result_layout(g.to(input.dtype), strides) if output_mask[3] else none,
    )


def forward_tangent(input, weight, output, shift, mean_d, invstd, training, activation,
                    input_t, weight_t, bias_t, residual_t, eps) -> Tensor:  # fmt: skip
    """The output's forward-mode derivative (jvp) for tangents of input, weight, bias and
    residual (None: zero), from the forward's results:
    ``ẋ̂ = invstd·(ẋ − mean(ẋ) − x̂·mean(x̂·ẋ))`` in training (the batch statistics move with
    x), ``invstd·ẋ`` in evaluation; ``ẏ = (ẋ̂·w + x̂·ẇ + ḃ + ṙ)·[output > 0 past a ReLU]``.
    In training the statistics are recomputed from the input (with ``eps``), so that a
    derivative of this tangent (nested forward mode) sees them move with x too."""
    acc = compute_dtype(input.dtype)
    xa = input.to(acc)
    x_hat, invstd = _normalized(xa, shift, mean_d, invstd, eps if training else None)
    tangent = torch.zeros_like(x_hat)
    if input_t is not None:
        dx = input_t.to(acc)
        if training:
            dims = reduce_dims(xa)
            dx = dx - dx.mean(dims, keepdim=True) - x_hat * (x_hat * dx).mean(dims, keepdim=True)
        gain = invstd if weight is None else invstd * weight.to(acc)
        tangent = dx * per_channel(gain, xa)
    if weight_t is not None:
        tangent = tangent + x_hat * per_channel(weight_t.to(acc), xa)
    if bias_t is not None:
        tangent = tangent + per_channel(bias_t.to(acc), xa)
    if residual_t is not None:
        tangent = tangent + residual_t.to(acc)
    if activation == RELU:
        tangent = tangent * (output > 0)
    return in_result_layout(tangent.to(output.dtype), composite_strides(input))


def backward_graph(grad_out, input, weight, output, shift, mean_d, invstd, training, eps, activation, output_mask):  # fmt: skip
    """The ``bnlab::batch_norm_backward_graph`` operator: :func:`backward` with the statistics'
    own dependence on the input in the graph."""
    return backward(grad_out, input, weight, output, shift, mean_d, invstd, training,
                    activation, output_mask, eps=eps)  # fmt: skip


_registered = False


def register() -> None:
    """Implement ``bnlab::batch_norm_backward_graph`` with :func:`backward_graph` (once)."""
    global _registered
    if not _registered:
        torch.library.impl("bnlab::batch_norm_backward_graph", "CompositeImplicitAutograd")(
            backward_graph
        )
        _registered = True
