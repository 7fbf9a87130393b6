"""``batch_norm`` straight on the Triton kernels, with autograd (for tests and the bench,
and for torch builds where the ``bnlab::`` operators are not registered).

Same signature as ``bnlab.functional.batch_norm``; non-finite statistics are reported
through :mod:`.report` (deferred warning for 'skip', immediate error for 'raise').
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.kernels.cuda import ops

POLICIES = {"propagate": 0, "skip": 1, "raise": 2}


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, training,
                momentum, eps, relu, policy):  # fmt: skip
        out, shift, mean_d, invstd, _ = ops.forward(
            input, weight, bias, residual, running_mean, running_var, training, momentum, eps,
            int(relu), policy, True,
        )  # fmt: skip
        ctx.save_for_backward(input, weight, out if relu else None, shift, mean_d, invstd)
        ctx.training, ctx.relu = training, relu
        ctx.has_bias, ctx.has_res = bias is not None, residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, out, shift, mean_d, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1] and weight is not None, need[2] and ctx.has_bias,
                need[3] and ctx.has_res]  # fmt: skip
        dx, dw, db, dres = ops.backward(
            grad_out, input, weight, out, shift, mean_d, invstd, ctx.training, int(ctx.relu), mask
        )
        pick = [t if m else None for t, m in zip((dx, dw, db, dres), mask, strict=True)]
        if pick[1] is not None:
            pick[1] = pick[1].to(weight.dtype)
        return (*pick, None, None, None, None, None, None, None)


def batch_norm(
    input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
    weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
    momentum: float = 0.1, eps: float = 1e-5, *, nonfinite: str = "skip",
    residual: Tensor | None = None, activation: str | None = None,
) -> Tensor:  # fmt: skip
    """``act(batch_norm(input) [+ residual])`` on the Triton kernels (activation None/'relu')."""
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    if nonfinite not in POLICIES:
        raise ValueError(f"nonfinite: expected one of {tuple(POLICIES)}, got {nonfinite!r}")
    return _Function.apply(input, weight, bias, residual, running_mean, running_var, training,
                           momentum, eps, activation == "relu", POLICIES[nonfinite])  # fmt: skip
