"""Level 3: ``BatchNorm1d/2d/3d``, drop-in replacements for torch's modules.

Same constructor, parameters, buffers and ``state_dict`` keys as ``torch.nn.BatchNorm*d``
(a torch checkpoint loads into bnlab's and back); ``momentum`` is the weight of the new
batch statistic, and ``momentum=None`` means a cumulative average over
``num_batches_tracked``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab import kernels
from bnlab.compat import TORCH_BN_HAS_BIAS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _NormBase(nn.Module):
    """Parameters, buffers, resets and checkpoint compatibility shared by bnlab's norms.

    ``nonfinite`` ('skip', 'raise' or 'propagate') is what a batch with NaN/Inf statistics
    does to the running statistics; see :func:`bnlab.functional.batch_norm`.
    """

    _version = 2
    __constants__: ClassVar[list[str]] = [
        "track_running_stats",
        "momentum",
        "eps",
        "num_features",
        "affine",
    ]
    _expected_dims: tuple[int, ...] = ()
    _dims_mask = 0  # bit d set for each rank d in _expected_dims (for the C++ entry)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._dims_mask = sum(1 << d for d in cls._expected_dims)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        nonfinite: str = "skip",
    ) -> None:
        _check_hyperparameters(num_features, eps, momentum, nonfinite)
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise TypeError(f"dtype: expected a floating-point dtype ({', '.join(map(str, _FLOAT_DTYPES))}) or None, got {dtype}")  # fmt: skip
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.nonfinite = nonfinite
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()
        if kernels.enabled():
            kernels.load()  # now, not on a first call that torch.compile may be tracing

    def reset_running_stats(self) -> None:
        """Running mean to 0, running variance to 1, ``num_batches_tracked`` to 0."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics, and weight to 1 and bias to 0."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        # as the installed torch prints it: ``bias=`` only where torch's BN has the option
        # (bnlab's bias=False is shown either way)
        shown = TORCH_BN_HAS_BIAS or (self.affine and self.bias is None)
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, "
            + (f"bias={self.bias is not None}, " if shown else "")
            + f"track_running_stats={self.track_running_stats}"
            + ("" if self.nonfinite == "skip" else f", nonfinite={self.nonfinite!r}")
        )

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__}: torch.jit.script is not supported (bnlab's forward validates "
            "and dispatches in Python). Use torch.jit.trace or torch.export.export (both record "
            "bnlab's operator), torch.compile, or bnlab.nn.revert(model) to script the model "
            "with torch's BatchNorm."
        )

    def _check_settings(self) -> None:
        """Raise, naming it, if eps, momentum or nonfinite was set to a bad value after
        construction (they are plain attributes, as in torch)."""
        _check_hyperparameters(self.num_features, self.eps, self.momentum, self.nonfinite)

    def _check_input(self, input: Tensor, residual: Tensor | None = None) -> None:
        """Raise, naming what is wrong, unless ``input`` (and ``residual``) fit this module
        (rank, dtype, device, channels). One cheap test first."""
        state = self.weight if self.weight is not None else self.running_mean
        if (
            isinstance(input, Tensor)
            and input.dim() in self._expected_dims
            and input.dtype in _FLOAT_DTYPES
            and (state is None or (input.is_cpu and state.is_cpu) or state.device == input.device)
            and (torch.jit.is_tracing() or input.shape[1] == self.num_features)  # trace: op checks
        ):
            if residual is not None:
                F.check_residual(input, residual)
            return
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
        if input.dim() not in self._expected_dims:
            expected = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(
                f"input: expected {expected} input (got {input.dim()}D input "
                f"of shape {tuple(input.shape)})"
            )
        if input.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"input: expected float16, bfloat16, float32 or float64, got {input.dtype}")  # fmt: skip
        if state is not None and state.device != input.device:
            raise ValueError(f"input: expected device {state.device} like the module's state, got {input.device}")  # fmt: skip
        raise ValueError(
            f"input: expected {self.num_features} channels (num_features) at dim 1, "
            f"got {input.shape[1]} (input shape {tuple(input.shape)})"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        # Checkpoints older than version 2 have no num_batches_tracked: start it at 0.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )


def _check_hyperparameters(num_features: int, eps: float, momentum: float | None, nonfinite: str) -> None:  # fmt: skip
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features: expected a positive integer, got {num_features!r}")
    if not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps: expected a positive finite number, got {eps!r}")
    if nonfinite not in F.NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: expected one of {F.NONFINITE_POLICIES}, got {nonfinite!r}")
    if momentum is not None and (
        not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"momentum: expected None or a number in [0, 1], got {momentum!r}")


class _BatchNorm(_NormBase):
    """Batch normalization over dim 1 with torch's training/eval semantics."""

    def _averaging_factor(self) -> float:
        """The weight of this batch in the running statistics: momentum, or for the cumulative
        average (momentum=None) 1 / (batches counted + 1), this batch being the next counted."""
        if not (self.training and self.track_running_stats):
            return 0.0 if self.momentum is None else self.momentum
        if self.momentum is None:
            return 1.0 / (float(self.num_batches_tracked) + 1.0)
        return self.momentum

    def _count_batch(self) -> None:
        """Counts a training batch in ``num_batches_tracked`` (where running stats are kept)."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input)

    def _normalize(self, input: Tensor, residual: Tensor | None = None, activation: str | None = None) -> Tensor:  # fmt: skip
        """``act(bn(input) + residual)`` with this module's state and torch's train/eval rules."""
        eager = kernels.MODULE_EAGER
        if eager is not None and not F._traced_or_transformed():
            # The common case, eager on the CPU: the rules below, the input checks and the
            # kernel in one C++ call (inside a model every Python line runs with cold caches).
            params, buffers = self._parameters, self._buffers
            policy = F._POLICY_CODES.get(self.nonfinite, -1)  # (-1: C++ sends it back here)
            try:
                out, bad = eager(input, params["weight"], params["bias"], residual,
                                 buffers["running_mean"], buffers["running_var"],
                                 buffers["num_batches_tracked"], self.training,
                                 self.track_running_stats, self.momentum, self.eps,
                                 F._ACTIVATION_CODES[activation], policy, self._dims_mask,
                                 self.num_features)  # fmt: skip
            except (KeyError, TypeError):  # state replaced (a parametrization), or a non-tensor
                out = None
            if out is not None:
                if bad is not None:
                    F._report(bad, policy)
                return out
        return self._normalize_general(input, residual, activation)

    def _normalize_general(self, input: Tensor, residual: Tensor | None, activation: str | None) -> Tensor:  # fmt: skip
        """:meth:`_normalize` in Python: compiled, traced or transformed calls, other devices,
        and the inputs that the C++ entry sends back (whose errors are raised here)."""
        self._check_input(input, residual)
        self._check_settings()
        for name in ("running_mean", "running_var", "weight", "bias"):  # (replaced by hand)
            value = getattr(self, name)
            if value is not None and value.dtype not in F._FLOAT_DTYPES:
                F._check_channel_vector(name, value, input)  # raises, naming it
        momentum = self._averaging_factor()
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        if use_batch_stats and not torch.jit.is_tracing() and input.numel() == input.shape[1] > 0:
            raise ValueError(
                "input: Expected more than 1 value per channel when training, "
                f"got input size {input.shape}"
            )
        if not torch.compiler.is_compiling() and self.training and self.num_batches_tracked is not None and F._functorch_active():  # fmt: skip
            # torch.func refuses to mutate a buffer the function captured: let it refuse here,
            # before the operator updates the running statistics (torch's module counts first)
            self.num_batches_tracked.add_(0)
        out = F.apply_batch_norm(  # the module's own state needs no re-validation
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            self.nonfinite,
            residual,
            activation,
        )
        # Counted once accepted: a batch refused by nonfinite='raise' raises above and is not
        # (also in compiled code, where an except clause here would not run).
        self._count_batch()
        return out


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input, per channel C."""

    _expected_dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input, per channel C."""

    _expected_dims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input, per channel C."""

    _expected_dims = (5,)
