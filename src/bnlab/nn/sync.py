"""SyncBatchNorm over ``torch.distributed``: batch statistics of the global batch.

Each rank sends ``(count, mean, M2)`` per channel (``M2`` = sum of squared deviations from
the local mean); the merge is Chan's parallel formula in float64, weighted by the counts, so
ranks may hold different batch sizes, zero included. The backward all-reduces ``Σdy`` and
``Σdy·x̂`` so that input gradients equal those of BN on the concatenated batch; weight and
bias gradients are the local sums (DistributedDataParallel averages them like any other
parameter's). Works with any backend (gloo on CPU, nccl on GPU); without an initialized
process group, with one rank, or in eval mode it is an ordinary :class:`BatchNorm`.

Each rank's passes (its shifted moments, the normalization, the gradient sums and the input
gradient) run on bnlab's Triton kernels for CUDA tensors, on torch ops otherwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bnlab import functional as F
from bnlab import kernels
from bnlab.nn.batchnorm import _BatchNorm


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _TorchPasses:
    """The per-rank passes in torch ops (any device), in the compute dtype."""

    @staticmethod
    def moments(input: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """``(shift, mean_d, M2, count)`` of this rank's batch per channel; ``M2`` = sum of
        squared deviations from the local mean."""
        xa = input.to(F.compute_dtype(input.dtype))
        channels = xa.shape[1]
        count = xa.numel() // channels if xa.numel() else 0
        if count == 0:
            zeros = torch.zeros(channels, dtype=xa.dtype, device=xa.device)
            return zeros, zeros, zeros, 0
        shift, mean_d, var = F.batch_stats(xa)
        return shift, mean_d, var * count, count

    @staticmethod
    def _x_hat(xa: Tensor, shift: Tensor, mean_d: Tensor, scale: Tensor) -> Tensor:
        """``(x - shift - mean_d)·scale`` per channel: x̂ for ``scale = invstd``."""
        return (xa - F.per_channel(shift, xa) - F.per_channel(mean_d, xa)) * F.per_channel(scale, xa)  # fmt: skip

    @staticmethod
    def normalize(input, shift, mean_d, invstd, weight, bias) -> Tensor:
        xa = input.to(shift.dtype)
        scale = invstd if weight is None else invstd * weight.to(shift.dtype)
        out = _TorchPasses._x_hat(xa, shift, mean_d, scale)  # x̂·w
        if bias is not None:
            out = out + F.per_channel(bias.to(shift.dtype), xa)
        return out.to(input.dtype)

    @staticmethod
    def grad_sums(grad_out, input, shift, mean_d, invstd) -> tuple[Tensor, Tensor]:
        if not grad_out.numel():
            return torch.zeros_like(shift), torch.zeros_like(shift)
        dy = grad_out.to(shift.dtype)
        x_hat = _TorchPasses._x_hat(input.to(shift.dtype), shift, mean_d, invstd)
        dims = F.reduce_dims(dy)
        return dy.sum(dims), (dy * x_hat).sum(dims)

    @staticmethod
    def grad_input(grad_out, input, weight, shift, mean_d, invstd, sum_g, sum_gx, count) -> Tensor:
        dy = grad_out.to(shift.dtype)
        x_hat = _TorchPasses._x_hat(input.to(shift.dtype), shift, mean_d, invstd)
        gain = invstd if weight is None else invstd * weight.to(shift.dtype)
        return F.grad_input_from_means(dy, x_hat, sum_g / count, sum_gx / count, gain).to(input.dtype)  # fmt: skip


def _passes(input: Tensor):
    """The implementation of the per-rank passes for ``input``: bnlab's Triton kernels where
    they serve its device (CUDA), else torch ops (same interface: :class:`_TorchPasses`)."""
    if input.device.type != "cpu" and input.device.type in kernels.DEVICES:
        from bnlab.kernels.cuda import ops

        return ops
    return _TorchPasses


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group, nonfinite):  # fmt: skip
        passes = _passes(input)
        shift, mean_d, m2, count = passes.moments(input)
        local = torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=input.device),
                           (shift.double() + mean_d.double()), m2.double()])  # fmt: skip
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        table = torch.stack(gathered)
        channels = input.shape[1]
        counts, means, m2s = table[:, :1], table[:, 1 : 1 + channels], table[:, 1 + channels :]
        total = int(counts.sum().item())
        if total <= 1:
            raise ValueError(
                "input: Expected more than 1 value per channel when training, got "
                f"{total} in the global batch (local input size {tuple(input.shape)})"
            )
        mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - mean) ** 2).sum(0) / total  # Chan's merge, biased
        F.update_running_stats(running_mean, running_var, mean, var, total, momentum, nonfinite)
        acc = shift.dtype
        # Relative to this rank's shift the centring stays exact for large common offsets.
        mean_d = (mean - shift.double()).to(acc)
        invstd = torch.rsqrt(var + eps).to(acc)
        out = passes.normalize(input, shift, mean_d, invstd, weight, bias)
        ctx.save_for_backward(input, weight, shift, mean_d, invstd)
        ctx.total, ctx.group, ctx.passes = total, group, passes
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, weight, shift, mean_d, invstd = ctx.saved_tensors
        passes, channels = ctx.passes, input.shape[1]
        local_dy, local_dy_xhat = passes.grad_sums(grad_out, input, shift, mean_d, invstd)
        sums = torch.cat([local_dy, local_dy_xhat]).double()
        dist.all_reduce(sums, group=ctx.group)
        acc = shift.dtype
        grad_input = passes.grad_input(grad_out, input, weight, shift, mean_d, invstd,
                                       sums[:channels].to(acc), sums[channels:].to(acc), ctx.total)  # fmt: skip
        grad_weight = local_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_bias = local_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span every rank of ``process_group``.

    Same constructor as ``torch.nn.SyncBatchNorm`` (plus bnlab's ``nonfinite``); accepts
    (N, C, *) input of rank 2 to 5.
    """

    _expected_dims = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, nonfinite=nonfinite)  # fmt: skip
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        group = self.process_group
        if self.training and group is not None and dist.is_initialized() and dist.get_rank(group) < 0:  # fmt: skip
            raise ValueError(
                f"process_group: this rank ({dist.get_rank()}) is not a member of the process "
                "group given to SyncBatchNorm"
            )
        if not self.training or not _distributed(group):
            return super().forward(input)
        self._check_input(input)
        self._check_settings()
        momentum = self._averaging_factor()
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)  # fmt: skip
        out = _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            *running,
            momentum,
            self.eps,
            self.process_group,
            self.nonfinite,
        )
        self._count_batch()  # once accepted: a batch refused by 'raise' is not counted
        return out


__all__ = ["SyncBatchNorm"]
