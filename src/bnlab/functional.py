"""Level 2: ``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature and semantics.

Training normalizes with the batch mean and biased variance and updates the running
statistics in place (``running = (1 - momentum) * running + momentum * batch``, with the
*unbiased* variance); evaluation uses the running statistics.

Numerics: statistics are computed on data shifted by one sample per channel,
``d = x - x[0, c, 0, ...]``. For data with a large common offset the subtraction is exact
(Sterbenz), so mean and variance are computed on O(spread) numbers and never cancel
catastrophically. Half and bfloat16 inputs are computed in float32.

Where it runs (one operation, several doors):
- ``torch.ops.bnlab.batch_norm``: the C++ kernels behind a C++ autograd node (eager mode,
  torch.compile, torch.export, jit.trace), on CPU tensors of any layout;
- :class:`bnlab.kernels.function.BatchNormFunction` over the same kernels while a
  ``torch.func`` transform is active (grad, vjp, jacrev, vmap);
- the same Function over :mod:`bnlab.kernels.composite` (torch ops) where the kernels are
  switched off or cannot be built;
- torch's native ``batch_norm`` for devices without bnlab kernels and for empty batches.

Non-finite batch statistics (NaN/Inf in the input) propagate into the output exactly as in
torch; what they do to the running statistics is the ``nonfinite`` policy, applied inside the
operator in every mode. In eager mode the affected channels are named by a ``RuntimeWarning``
('skip') or a ``FloatingPointError`` ('raise'); on CUDA the 'skip' warning is deferred until
the channel mask's copy to the host has landed (no device sync;
``bnlab.kernels.cuda.flush_reports()`` forces it). Inside compiled, traced or ``torch.func``
code nothing can read the mask in Python, so the operator reports itself: a C++ warning
(forwarded to Python's ``warnings`` as a ``UserWarning`` where torch's handler is installed,
otherwise logged to stderr) or a ``RuntimeError`` for 'raise'.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from bnlab import kernels
from bnlab.kernels import composite
from bnlab.kernels.composite import (
    batch_stats,
    compute_dtype,
    grad_input_from_means,
    per_channel,
    reduce_dims,
)
from bnlab.kernels.function import BatchNormFunction, Operators

__all__ = ["apply_batch_norm", "batch_norm", "batch_stats", "check_residual", "compute_dtype", "grad_input_from_means", "per_channel", "reduce_dims"]  # fmt: skip

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NONFINITE_POLICIES = ("skip", "raise", "propagate")
_POLICY_CODES = {"propagate": composite.PROPAGATE, "skip": composite.SKIP, "raise": composite.RAISE}
_ACTIVATION_CODES = {
    None: composite.IDENTITY,
    "identity": composite.IDENTITY,
    "relu": composite.RELU,
}


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
    channels, device = input.shape[1], input.device
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):  # fmt: skip
        if t is None or torch.jit.is_tracing():  # traced shapes are values; the operator checks
            continue
        if not isinstance(t, Tensor) or t.shape != (channels,) or t.device != device or t.dtype not in _FLOAT_DTYPES:  # fmt: skip
            _check_channel_vector(name, t, input)  # raises, naming what is wrong
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            "running_mean, running_var: expected tensors in evaluation mode (training=False), "
            "got None"
        )
    if (running_mean is None) != (running_var is None):
        given = "running_var" if running_mean is None else "running_mean"
        raise ValueError(f"running_mean, running_var: expected both or neither, got only {given}")
    if not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps: expected a positive finite number, got {eps!r}")
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
    if training and not torch.jit.is_tracing() and input.numel() > 0 and input.numel() // input.shape[1] == 1:  # fmt: skip
        raise ValueError(
            "input: Expected more than 1 value per channel when training, "
            f"got input size {input.shape}"
        )


def _check_fusion_args(input: Tensor, residual: Tensor | None, activation, nonfinite) -> None:
    if residual is None and activation is None and nonfinite == "skip":
        return  # the common case
    if nonfinite not in _POLICY_CODES:
        raise ValueError(f"nonfinite: expected one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if activation not in _ACTIVATION_CODES:
        raise ValueError(f"activation: expected None, 'identity' or 'relu', got {activation!r}")
    if residual is not None:
        check_residual(input, residual)


def check_residual(input: Tensor, residual: Tensor) -> None:
    """Raise unless ``residual`` is a tensor of ``input``'s shape, dtype and device."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual: expected a Tensor or None, got {type(residual).__name__}")
    if torch.jit.is_tracing():  # traced shapes are values; the operator checks
        return
    if residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device:  # fmt: skip
        raise ValueError(
            f"residual: expected input's shape {tuple(input.shape)}, dtype {input.dtype} and "
            f"device {input.device}, got {tuple(residual.shape)}, {residual.dtype}, {residual.device}"
        )


def report_nonfinite(finite: Tensor, policy: str) -> None:
    """Warn ('skip') or raise ('raise') naming the channels whose batch statistics are not
    finite (``finite``, a (C,) mask); in both cases their running statistics were left unchanged."""
    composite.report_nonfinite(~finite, _POLICY_CODES[policy])


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
    (``var`` is the biased one of ``count`` values, or already unbiased if not ``correction``),
    guarded and reported by the ``nonfinite`` policy."""
    unbiased = var * (count / (count - 1)) if correction else var
    bad = composite.update_running(running_mean, running_var, mean, unbiased, momentum, _POLICY_CODES[nonfinite])  # fmt: skip
    if nonfinite != "propagate" and bool(bad.any()):
        report_nonfinite(~bad, nonfinite)


def _torch_native(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, activation):  # fmt: skip
    out = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)  # fmt: skip
    if residual is not None:
        out = out + residual
    return torch.relu(out) if _ACTIVATION_CODES[activation] == composite.RELU else out


def _needs_graph(input: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None) -> bool:  # fmt: skip
    """Whether autograd must record this call (written out: it runs before every call)."""
    return torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    )


def _report(bad: Tensor, policy: int) -> None:
    """Name non-finite channels after an eager call (RuntimeWarning / FloatingPointError); on
    CUDA without stalling the device for 'skip' (deferred until the mask reaches the host)."""
    if bad.device.type == "cuda":
        from bnlab.kernels.cuda import report

        report.report(bad, policy)
    elif bool(bad.any()):
        composite.report_nonfinite(bad, policy)


def _forward_ad_active() -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad.dual_level``) is on."""
    return _forward_ad._current_level >= 0


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, ...) is running this call."""
    return torch._C._are_functorch_transforms_active()


def _transforms_active() -> bool:
    """Whether a torch.func transform or forward-mode AD is running this call: the Python
    Function serves it."""
    return _functorch_active() or _forward_ad_active()


def _traced_or_transformed() -> bool:
    """Whether this call is compiled, traced, under a torch.func transform or in forward-mode
    AD: not the eager fast path (cheap predicates: it runs before every call)."""
    return (
        torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or _transforms_active()
    )


def _graph_mode() -> bool:
    """Whether this call is being compiled or traced: then nothing may read results in
    Python, so the operator reports non-finite channels itself."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


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
    residual: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Batch normalization, a drop-in for ``torch.nn.functional.batch_norm``.

    ``y = act((x - E[x]) / sqrt(Var[x] + eps) * weight + bias + residual)`` per channel (dim 1),
    with batch statistics in training and running statistics otherwise. ``momentum`` is the
    weight of the *new* batch statistic (torch's convention). ``residual`` (input's shape) and
    ``activation`` (None or 'relu') fuse the add and the ReLU of a residual block.

    ``nonfinite`` guards the running statistics against a batch with NaN/Inf statistics:
    'skip' (default) keeps the affected channels' running values and warns, 'raise' keeps
    them all and raises ``FloatingPointError``, 'propagate' writes them as torch does. The
    output propagates NaN/Inf in every case, as torch's does.

    Shape: input and residual (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); the other
    tensors (C,).
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    _check_fusion_args(input, residual, activation, nonfinite)
    return apply_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                            nonfinite, residual, activation)  # fmt: skip


def apply_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, training: bool, momentum: float,
                     eps: float, nonfinite: str = "skip", residual: Tensor | None = None,
                     activation: str | None = None) -> Tensor:  # fmt: skip
    """:func:`batch_norm` without its argument checks, for callers that hold validated state
    (bnlab's modules check their input; the operators still check sizes)."""
    policy = _POLICY_CODES[nonfinite]
    if input.is_cpu and kernels.EAGER is not None and not _traced_or_transformed() and input.numel():  # fmt: skip
        # The common case, in one crossing into C++ (it decides whether autograd records).
        out, bad = kernels.EAGER(input, weight, bias, residual, running_mean, running_var,
                                 bool(training), float(momentum), float(eps),
                                 _ACTIVATION_CODES[activation], policy)  # fmt: skip
        if bad is not None:
            _report(bad, policy)
        return out
    graph = _graph_mode()
    empty = not torch.jit.is_tracing() and input.numel() == 0  # (a traced numel is a tensor)
    if empty or not kernels.supports(input):
        # Other devices use torch's native kernel; an empty batch leaves the statistics alone.
        return _torch_native(input, running_mean, running_var, weight, bias, training, momentum, eps, residual, activation)  # fmt: skip
    transformed = not graph and _functorch_active()
    dual = not (graph or transformed) and _forward_ad_active()  # eager forward-mode AD
    # Compiled, traced or transformed code cannot read `bad` in Python: the operator reports.
    args = (input, weight, bias, residual, running_mean, running_var, bool(training),
            float(momentum), float(eps), _ACTIVATION_CODES[activation], policy, graph or transformed)  # fmt: skip
    if not kernels.ready():
        out, bad = BatchNormFunction.apply(*args, composite)[:2]
    elif graph:
        return kernels.OPS.batch_norm(*args)[0]  # one node for compile, export and trace
    elif transformed:
        return BatchNormFunction.apply(*args, Operators)[0]
    elif dual:  # the Python Function (it has the jvp); `bad` is read here, as in eager code
        out, bad = BatchNormFunction.apply(*args, Operators)[:2]
    elif not training and not _needs_graph(input, weight, bias, residual):  # the forward alone
        return kernels.OPS.batch_norm_forward(*args)[0]
    else:  # other devices with bnlab kernels (CUDA): the same autograd operator
        out, bad = kernels.OPS.batch_norm(*args)
    if training and policy != composite.PROPAGATE and not (graph or transformed):
        _report(bad, policy)
    return out
