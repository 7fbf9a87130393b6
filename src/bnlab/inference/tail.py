"""BN plus what follows: split a BatchNorm subclass whose ``forward`` does more than BN.

timm's ``BatchNormAct2d`` and bnlab's :class:`bnlab.nn.BatchNormAct2d` compute
``act(drop(bn(x)) [+ residual])`` in one module. Folding or freezing such a module must keep
``act`` and ``drop``: :func:`split_batchnorm` returns a module :class:`AfterBatchNorm` that
applies them, and checks on a probe input that ``module(x) == after(bn_eval(x))``, where
``bn_eval`` is torch's eval-mode ``batch_norm`` with the module's statistics. A subclass that
does anything else fails the check and is left as it is, with the reason.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from bnlab.nn.classes import batchnorm_dims, is_plain_batchnorm

_PROBE_SHAPES = {1: (4,), 2: (2, 3, 3), 3: (2, 2, 2, 2), None: (2, 3, 3)}  # (N, *spatial)


class AfterBatchNorm(nn.Module):
    """What a BN+activation module applies after BN: ``act(drop(input) + residual)``.

    Keeps the source's ``drop`` and ``act`` children (same names, same ``state_dict`` keys).
    """

    def __init__(self, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        out = self.drop(input)
        if residual is not None:
            out = out + residual
        return self.act(out)


def _takes_residual(module: nn.Module) -> bool:
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return len(parameters) > 1 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def describe(after: nn.Module) -> str:
    """A short text of what an :class:`AfterBatchNorm` applies, e.g. ``SiLU(Dropout(·))``."""
    text = "·"
    for name in ("drop", "act"):
        part = getattr(after, name)
        if not isinstance(part, nn.Identity):
            text = f"{type(part).__name__}({text})"
    return text


def _probe(bn: nn.Module, seed: int) -> Tensor:
    """An input of ``bn``'s rank spread like its running statistics (deterministic)."""
    n, *spatial = _PROBE_SHAPES[batchnorm_dims(bn)]
    dtype, device = bn.running_mean.dtype, bn.running_mean.device
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, bn.num_features, *spatial, generator=generator, dtype=torch.float64)
    view = (1, -1) + (1,) * len(spatial)
    std = (bn.running_var.double() + bn.eps).sqrt().cpu()
    return (bn.running_mean.double().cpu().view(view) + std.view(view) * z).to(device, dtype)


def split_batchnorm(bn: nn.Module, seed: int = 0) -> tuple[nn.Module | None, str | None]:
    """``(after, None)`` when ``bn`` in eval mode is BN followed by ``after`` (``None`` for a
    plain BN), or ``(None, reason)`` when its ``forward`` does something else.

    Needs running statistics (callers refuse BNs without them first).
    """
    if is_plain_batchnorm(bn):
        return None, None
    after = AfterBatchNorm(getattr(bn, "drop", None), getattr(bn, "act", None))
    residual_too = _takes_residual(bn)
    modes = {m: m.training for m in bn.modules()}
    x = _probe(bn, seed)
    residual = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(x)
    try:
        bn.eval()
        with torch.no_grad():
            plain = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)  # fmt: skip
            cases = [(bn(x), after(plain))]
            if residual_too:
                cases.append((bn(x, residual), after(plain, residual)))
    except Exception as error:  # the probe runs the subclass's own code: report, don't crash
        return None, f"its forward ({type(bn).__name__}) failed on a probe input: {type(error).__name__}: {error}"  # fmt: skip
    finally:
        for module, training in modes.items():
            module.training = training
    tolerance = max(1e-4, 16 * torch.finfo(x.dtype).eps)
    for got, expected in cases:
        if not isinstance(got, Tensor) or got.shape != expected.shape:
            return None, f"its forward ({type(bn).__name__}) does more than BN: its output is not BN's shape"  # fmt: skip
        scale = 1.0 + float(expected.abs().max())
        error = float((got.double() - expected.double()).abs().max())
        if not error <= tolerance * scale:
            return None, (
                f"its forward ({type(bn).__name__}) does more than BN followed by its "
                f"'drop' and 'act' children (probe differs by {error:.3g}); left as it is"
            )
    return after, None
