"""Fake (meta) implementations of the bnlab operators: output shapes, dtypes and strides
without computing anything, for torch.compile, torch.export and FakeTensor tracing."""

from __future__ import annotations

import torch

from bnlab.kernels.layout import result_strides

_registered = False


def _compute_dtype(input: torch.Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


def _vectors(input: torch.Tensor, count: int) -> list[torch.Tensor]:
    channels = input.shape[1]
    return [input.new_empty((channels,), dtype=_compute_dtype(input)) for _ in range(count)]


def _result(input: torch.Tensor, grad_out: torch.Tensor | None = None) -> torch.Tensor:
    """The output (or, given grad_out, input gradient) of input's shape and dtype with torch's
    strides."""
    return input.new_empty_strided(input.shape, result_strides(input, grad_out))


def forward(input, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation, nonfinite, report):  # fmt: skip
    shift, mean_d, invstd = _vectors(input, 3)
    bad = input.new_empty((input.shape[1],), dtype=torch.bool)
    return _result(input), shift, mean_d, invstd, bad


def backward(grad_out, input, weight, output, shift, mean_d, invstd, training, activation, output_mask):  # fmt: skip
    none = input.new_empty((0,), dtype=_compute_dtype(input))
    grad_weight, grad_bias = _vectors(input, 2)
    return (
        _result(input, grad_out) if output_mask[0] else none,
        grad_weight if output_mask[1] else none,
        grad_bias if output_mask[2] else none,
        _result(input, grad_out) if output_mask[3] else none,
    )


def batch_norm(input, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation, nonfinite, report):  # fmt: skip
    return _result(input), input.new_empty((input.shape[1],), dtype=torch.bool)


def register() -> None:
    """Register the fake implementations (once; the operators must exist)."""
    global _registered
    if _registered:
        return
    torch.library.register_fake("bnlab::batch_norm_forward")(forward)
    torch.library.register_fake("bnlab::batch_norm_backward")(backward)
    torch.library.register_fake("bnlab::batch_norm")(batch_norm)
    _registered = True
