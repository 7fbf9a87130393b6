"""The batch-norm operation as a Python ``autograd.Function``.

The C++ autograd node behind ``torch.ops.bnlab.batch_norm`` serves eager mode,
torch.compile, torch.export and jit.trace. ``torch.func`` transforms (grad, vjp, jacrev,
vmap, jvp, jacfwd) and forward-mode AD need a Python Function with ``setup_context``, a
batching rule and a ``jvp``: this one. It runs
either the kernel operators or, where there are none, the composite torch implementation.
"""

from __future__ import annotations

import torch

from bnlab.kernels import composite
from bnlab.kernels.composite import RELU


class Operators:
    """The compiled kernels, with :mod:`~bnlab.kernels.composite`'s call signature."""

    @staticmethod
    def forward(*args):
        return torch.ops.bnlab.batch_norm_forward(*args)

    @staticmethod
    def backward(*args):
        return torch.ops.bnlab.batch_norm_backward(*args)


_NO_GRADS = (
    None,
) * 9  # running stats, training, momentum, eps, activation, nonfinite, report, impl


class BatchNormFunction(torch.autograd.Function):
    """``(out, bad)`` of bnlab's batch norm, with ``impl`` = :class:`Operators` or
    :mod:`~bnlab.kernels.composite`. The backward takes the composite's differentiable
    formula when a graph is being built (double backward, nested transforms)."""

    @staticmethod
    def forward(input, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation, nonfinite, report, impl):  # fmt: skip
        out, shift, mean_d, invstd, bad = impl.forward(
            input, weight, bias, residual, running_mean, running_var, training, momentum,
            eps, activation, nonfinite, report,
        )  # fmt: skip
        return out, bad, shift, mean_d, invstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, residual, *_, training, _, eps, activation, _, _, impl = inputs
        out, bad, shift, mean_d, invstd = output
        ctx.mark_non_differentiable(bad, shift, mean_d, invstd)
        ctx.save_for_backward(input, weight, out if activation == RELU else None, shift, mean_d, invstd)  # fmt: skip
        ctx.save_for_forward(input, weight, out, shift, mean_d, invstd)
        ctx.training, ctx.eps, ctx.activation, ctx.impl = training, eps, activation, impl
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
        ctx.has_residual = residual is not None

    @staticmethod
    def backward(ctx, grad_out, *_):
        input, weight, output, shift, mean_d, invstd = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.param_dtypes
        needs = ctx.needs_input_grad
        mask = [needs[0], weight_dtype is not None and needs[1], bias_dtype is not None and needs[2],
                ctx.has_residual and needs[3]]  # fmt: skip
        args = (grad_out, input, weight, output, shift, mean_d, invstd, ctx.training, ctx.activation, mask)  # fmt: skip
        if torch.is_grad_enabled():
            grads = composite.backward(*args, eps=ctx.eps)
        else:
            grads = ctx.impl.backward(*args)
        grad_input, grad_weight, grad_bias, grad_residual = grads
        return (
            grad_input if mask[0] else None,
            grad_weight.to(weight_dtype) if mask[1] else None,
            grad_bias.to(bias_dtype) if mask[2] else None,
            grad_residual if mask[3] else None,
            *_NO_GRADS,
        )

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, residual_t, *_):
        """Forward mode (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad): the
        output's tangent; the other results are not differentiable."""
        input, weight, out, shift, mean_d, invstd = ctx.saved_tensors
        tangent = composite.forward_tangent(input, weight, out, shift, mean_d, invstd, ctx.training,
                                            ctx.activation, input_t, weight_t, bias_t, residual_t, ctx.eps)  # fmt: skip
        return tangent, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, residual, running_mean, running_var, training, momentum, eps, activation, nonfinite, report, impl):  # fmt: skip
        """Batching rule: the vmapped dim joins the channels, ``(N, B, C, …) → (N, B·C, …)``,
        so each vmapped sample is normalized with its own statistics (or running ones)."""
        size = info.batch_size
        dims = dict(
            zip(("input", "weight", "bias", "residual", "rm", "rv"), in_dims[:6], strict=True)
        )
        if training and any(t is not None and dims[k] is None for k, t in (("rm", running_mean), ("rv", running_var))):  # fmt: skip
            raise RuntimeError(
                "Batch norm got a batched tensor as input while the running_mean or running_var, "
                "which will be updated in place, were not batched. Use track_running_stats=False "
                "(or eval mode) under vmap, as with torch's BatchNorm."
            )

        def fold_input(t, dim):
            if t is None:
                return None
            t = (
                t.unsqueeze(1).expand(t.shape[0], size, *t.shape[1:])
                if dim is None
                else t.movedim(dim, 1)
            )
            return t.reshape(t.shape[0], size * t.shape[2], *t.shape[3:])

        def fold_vector(t, dim):
            if t is None:
                return None
            return t.repeat(size) if dim is None else t.movedim(dim, 0).reshape(-1)

        running = [fold_vector(t, dims[k]) for k, t in (("rm", running_mean), ("rv", running_var))]
        out, bad, shift, mean_d, invstd = BatchNormFunction.apply(
            fold_input(input, dims["input"]), fold_vector(weight, dims["weight"]),
            fold_vector(bias, dims["bias"]), fold_input(residual, dims["residual"]), *running,
            training, momentum, eps, activation, nonfinite, report, impl,
        )  # fmt: skip
        for original, folded, key in ((running_mean, running[0], "rm"), (running_var, running[1], "rv")):  # fmt: skip
            if training and original is not None and dims[key] is not None:
                original.movedim(dims[key], 0).copy_(folded.view(size, -1))  # running updates
        unfolded = out.reshape(out.shape[0], size, -1, *out.shape[2:])
        vectors = [t.view(size, -1) for t in (bad, shift, mean_d, invstd)]
        return (unfolded, *vectors), (1, 0, 0, 0, 0)
