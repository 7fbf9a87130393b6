"""SyncBatchNorm over ``torch.distributed``: batch statistics of the global batch.

Each rank sends ``(count, mean, M2)`` per channel (``M2`` = sum of squared deviations from
the local mean); the merge is Chan's parallel formula in float64, weighted by the counts, so
ranks may hold different batch sizes, zero included. The backward all-reduces ``Σdy`` and
``Σdy·x̂`` so that input gradients equal those of BN on the concatenated batch; weight and
bias gradients are the local sums (DistributedDataParallel averages them like any other
parameter's). Works with any backend (gloo on CPU, nccl on GPU); without an initialized
process group, with one rank, or in eval mode it is an ordinary :class:`BatchNorm`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bnlab import functional as F
from bnlab.nn.batchnorm import _BatchNorm


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _local_moments(xa: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(shift, mean - shift, M2, count)`` of this rank's batch, per channel."""
    channels = xa.shape[1]
    count = xa.numel() // channels if xa.numel() else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=xa.dtype, device=xa.device)
        return zeros, zeros, zeros, 0
    shift, mean_d, var = F.batch_stats(xa)
    return shift, mean_d, var * count, count


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group, nonfinite):  # fmt: skip
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        xa = input.to(acc)
        shift, mean_d, m2, count = _local_moments(xa)
        local = torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=xa.device),
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
        invstd = torch.rsqrt(var + eps)
        # Relative to this rank's shift the centring stays exact for large common offsets.
        mean_d = (mean - shift.double()).to(acc)
        invstd = invstd.to(acc)
        scale = invstd if weight is None else invstd * weight.to(acc)
        out = (xa - F.per_channel(shift, xa) - F.per_channel(mean_d, xa)) * F.per_channel(scale, xa)  # fmt: skip
        if bias is not None:
            out = out + F.per_channel(bias.to(acc), xa)
        ctx.save_for_backward(input, weight, shift, mean_d, invstd)
        ctx.total, ctx.group = total, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(input.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, weight, shift, mean_d, invstd = ctx.saved_tensors
        acc = shift.dtype
        xa, dy = input.to(acc), grad_out.to(acc)
        dims = F.reduce_dims(xa)
        x_hat = (xa - F.per_channel(shift, xa) - F.per_channel(mean_d, xa)) * F.per_channel(invstd, xa)  # fmt: skip
        local_dy = dy.sum(dims) if dy.numel() else torch.zeros_like(shift)
        local_dy_xhat = (dy * x_hat).sum(dims) if dy.numel() else torch.zeros_like(shift)
        sums = torch.cat([local_dy, local_dy_xhat]).double()
        dist.all_reduce(sums, group=ctx.group)
        channels = input.shape[1]
        mean_dy = (sums[:channels] / ctx.total).to(acc)
        mean_dy_xhat = (sums[channels:] / ctx.total).to(acc)
        gain = invstd if weight is None else invstd * weight.to(acc)
        grad_input = F.grad_input_from_means(dy, x_hat, mean_dy, mean_dy_xhat, gain)
        grad_weight = local_dy_xhat.to(weight.dtype) if weight is not None else None
        grad_bias = local_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return (
            grad_input.to(input.dtype),
            grad_weight,
            grad_bias,
            None,
            None,
            None,
            None,
            None,
            None,
        )


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
        momentum = self._averaging_factor()
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)  # fmt: skip
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            *running,
            momentum,
            self.eps,
            self.process_group,
            self.nonfinite,
        )


__all__ = ["SyncBatchNorm"]
