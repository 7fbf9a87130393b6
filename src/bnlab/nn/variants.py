"""Small-batch variants of BatchNorm: Ghost BN and Batch Renormalization.

Both keep BatchNorm's parameters, buffers and ``state_dict`` keys, and evaluate with the
running statistics exactly as BatchNorm does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab.nn.batchnorm import _BatchNorm


def _affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        x_hat = x_hat * F.per_channel(weight, x_hat)
    if bias is not None:
        x_hat = x_hat + F.per_channel(bias, x_hat)
    return x_hat


class _GhostBatchNorm(_BatchNorm):
    """Batch norm over virtual batches of ``virtual_batch_size`` samples (Hoffer et al. 2017).

    In training the batch is cut into virtual batches, each normalized with its own
    statistics, all at once (no Python loop over chunks); a remainder of fewer samples forms
    a last, shorter virtual batch (merged into the previous one if it would hold one value
    per channel). The running statistics move once per call, towards the average of the
    virtual batches' means and unbiased variances.
    """

    def __init__(self, num_features: int, virtual_batch_size: int, *args, **kwargs) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:  # fmt: skip
            raise ValueError(f"virtual_batch_size: expected a positive integer, got {virtual_batch_size!r}")  # fmt: skip
        super().__init__(num_features, *args, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.shape[0] == 0:  # (an empty batch: as BatchNorm)
            return super().forward(input)
        self._check_input(input)
        self._check_settings()
        momentum = self._averaging_factor()
        n, size = input.shape[0], self.virtual_batch_size
        per_sample = input[0].numel() // input.shape[1]  # (n >= 1: an empty batch left above)
        if n * per_sample < 2:
            raise ValueError(f"input: Expected more than 1 value per channel when training, got input size {input.shape}")  # fmt: skip
        if min(size, n) * per_sample < 2:  # every virtual batch would hold one value per channel
            raise ValueError(
                f"virtual_batch_size: expected virtual batches of more than 1 value per channel, got "
                f"{size} sample(s) of {per_sample} position(s) each (input size {tuple(input.shape)})"
            )
        full, rest = divmod(n, size)
        if rest and rest * per_sample < 2 and full:
            full -= 1  # a last virtual batch of one value per channel joins the previous one
        cut = full * size
        chunks = [input[:cut].reshape(full, size, *input.shape[1:])] if cut else []
        if cut < n:
            chunks.append(input[cut:].unsqueeze(0))
        results = [self._normalize_groups(chunk) for chunk in chunks]  # the equal ones, the last
        if self.track_running_stats:
            means = torch.cat([mean for _, mean, _ in results])
            variances = torch.cat([var for _, _, var in results])
            F.update_running_stats(
                self.running_mean, self.running_var, means.detach().mean(0),
                variances.detach().mean(0), 0, momentum, self.nonfinite, correction=False,
            )  # fmt: skip
        x_hat = torch.cat([out.reshape(-1, *input.shape[1:]) for out, _, _ in results])
        self._count_batch()  # once accepted: a batch refused above is not counted
        return _affine(x_hat, self.weight, self.bias).to(input.dtype)

    def _normalize_groups(self, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normalize each group (dim 0) by its own statistics over its samples and positions.

        Returns the normalized groups, and each group's mean and unbiased variance (G, C).
        """
        acc = torch.float64 if groups.dtype == torch.float64 else torch.float32
        x = groups.to(acc)
        dims = [1, *range(3, x.dim())]
        first = x[(slice(None), 0, slice(None)) + (0,) * (x.dim() - 3)].detach()
        shift = first.view(first.shape[0], 1, -1, *([1] * (x.dim() - 3)))
        var, mean_d = torch.var_mean(x - shift, dims, correction=0, keepdim=True)
        x_hat = (x - shift - mean_d) * torch.rsqrt(var + self.eps)
        count = x[0].numel() // x.shape[2]
        unbiased = var.flatten(1) * (count / max(count - 1, 1))
        return x_hat, (shift + mean_d).flatten(1), unbiased


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input."""

    _expected_dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input."""

    _expected_dims = (4,)


class _BatchRenorm(_BatchNorm):
    """Batch Renormalization (Ioffe 2017): ``x̂ = (x − μ_B)/σ_B · r + d`` with
    ``r = clip(σ_B/σ, 1/r_max, r_max)`` and ``d = clip((μ_B − μ)/σ, −d_max, d_max)`` treated
    as constants in the backward pass, ``σ = sqrt(running_var + eps)``.

    The schedule is the paper's by default: plain BN (r_max = 1, d_max = 0) for
    ``warmup_steps`` batches, then r_max rises linearly to ``r_max`` by ``r_max_step`` and
    d_max to ``d_max`` by ``d_max_step``. The running σ moves as the paper says,
    ``σ ← σ + momentum·(σ_B − σ)``, and is stored as ``running_var = σ² − eps``.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.01, affine: bool = True,
        *, r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000,
        r_max_step: int = 40000, d_max_step: int = 25000, device=None, dtype=None,
        nonfinite: str = "skip",
    ) -> None:  # fmt: skip
        if not r_max >= 1:
            raise ValueError(f"r_max: expected a number >= 1, got {r_max}")
        if not d_max >= 0:
            raise ValueError(f"d_max: expected a number >= 0, got {d_max}")
        if momentum is None:
            raise ValueError("momentum: Batch Renorm needs a number in [0, 1], got None")
        if not 0 <= warmup_steps <= min(r_max_step, d_max_step):
            raise ValueError(f"warmup_steps: expected 0 <= warmup_steps <= r_max_step and d_max_step, got {warmup_steps}")  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, nonfinite=nonfinite)  # fmt: skip
        self.r_max, self.d_max = r_max, d_max
        self.warmup_steps, self.r_max_step, self.d_max_step = warmup_steps, r_max_step, d_max_step

    def limits(self) -> tuple[float, float]:
        """The current ``(r_max, d_max)`` of the schedule, at step ``num_batches_tracked``."""
        r_max, d_max = self._limits(self.num_batches_tracked)
        return float(r_max), float(d_max)

    def _limits(self, step: Tensor) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` at ``step`` (a tensor, so compiled code neither reads it on the
        host nor recompiles as it grows): 1 and 0 up to ``warmup_steps``, then rising
        linearly to ``r_max`` at ``r_max_step`` and ``d_max`` at ``d_max_step``."""
        step = step.to(torch.float64)

        def ramp(final_step: int) -> Tensor:
            return ((step - self.warmup_steps) / max(1, final_step - self.warmup_steps)).clamp(0.0, 1.0)  # fmt: skip

        return 1.0 + (self.r_max - 1.0) * ramp(self.r_max_step), self.d_max * ramp(self.d_max_step)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"  # fmt: skip

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or input.shape[0] == 0:  # (an empty batch: as BatchNorm)
            return super().forward(input)
        self._check_input(input)
        self._check_settings()
        if input.numel() // input.shape[1] < 2:
            raise ValueError(f"input: Expected more than 1 value per channel when training, got input size {input.shape}")  # fmt: skip
        r_max, d_max = self._limits(self.num_batches_tracked + 1)  # this batch's step
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        x = input.to(acc)
        shift, mean_d, var = F.batch_stats(x)
        mean, std = shift + mean_d, torch.sqrt(var + self.eps)
        sigma = torch.sqrt(self.running_var.to(acc) + self.eps)
        r_max, d_max = r_max.to(acc), d_max.to(acc)
        r = torch.clamp(std.detach() / sigma, 1.0 / r_max, r_max)
        d = torch.clamp((mean.detach() - self.running_mean.to(acc)) / sigma, -d_max, d_max)
        x_hat = (x - F.per_channel(mean, x)) * F.per_channel(r / std, x) + F.per_channel(d, x)
        self._update(mean.detach(), std.detach(), sigma)
        self._count_batch()  # the step, once accepted: a batch refused above is not counted
        return _affine(x_hat, self.weight, self.bias).to(input.dtype)

    @torch.no_grad()
    def _update(self, mean: Tensor, std: Tensor, sigma: Tensor) -> None:
        finite = torch.isfinite(mean) & torch.isfinite(std)
        if not bool(finite.all()) and self.nonfinite != "propagate":
            F.report_nonfinite(finite, self.nonfinite)
        else:
            finite = torch.ones_like(finite)
        new_mean = self.running_mean + self.momentum * (mean.to(self.running_mean.dtype) - self.running_mean)  # fmt: skip
        new_sigma = sigma + self.momentum * (std - sigma)
        self.running_mean.copy_(torch.where(finite, new_mean, self.running_mean))
        new_var = (new_sigma**2 - self.eps).to(self.running_var.dtype)
        self.running_var.copy_(torch.where(finite, new_var, self.running_var))


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over (N, C) or (N, C, L) input."""

    _expected_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over (N, C, H, W) input."""

    _expected_dims = (4,)
