"""``bnlab check``: every implementation level against a float64 truth and against torch.

The float64 truth is the NumPy reference (level 1) run on the same values in float64.
Each row reports the max absolute error of one output against that truth and against
torch's own implementation at the same dtype, with the tolerance it must meet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnlab import functional, nn
from bnlab.reference import (
    batchnorm_backward,
    batchnorm_backward_alt,
    batchnorm_forward,
    numerical_gradient,
    relative_error,
    spatial_batchnorm_backward,
    spatial_batchnorm_forward,
)

# Max absolute error allowed against the float64 truth, per compute dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}


@dataclass
class CheckRow:
    """One line of the table: an output of one level compared to truth and to torch."""

    level: str
    case: str
    vs_truth: float
    vs_torch: float | None
    tolerance: float
    informational: bool = False  # shown for comparison, never fails the check

    @property
    def ok(self) -> bool:
        if self.informational:
            return True
        torch_ok = self.vs_torch is None or self.vs_torch <= self.tolerance
        return self.vs_truth <= self.tolerance and torch_ok


def _max_abs(a, b) -> float:
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _truth(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dout: np.ndarray):
    """Float64 reference forward and backward for NCHW or (N, D) input."""
    bn_param = {"mode": "train"}
    if x.ndim == 4:
        out, cache = spatial_batchnorm_forward(x, gamma, beta, bn_param)
        return (out, *spatial_batchnorm_backward(dout, cache))
    out, cache = batchnorm_forward(x, gamma, beta, bn_param)
    return (out, *batchnorm_backward_alt(dout, cache))


def _check_reference(rng: np.random.Generator) -> list[CheckRow]:
    x = rng.normal(2.0, 3.0, size=(6, 4))
    gamma, beta, dout = rng.normal(size=4), rng.normal(size=4), rng.normal(size=(6, 4))
    out, cache = batchnorm_forward(x, gamma, beta, {"mode": "train"})
    staged = batchnorm_backward(dout, cache)
    compact = batchnorm_backward_alt(dout, cache)

    def forward(v):
        return batchnorm_forward(v, gamma, beta, {"mode": "train"})[0]

    numeric = numerical_gradient(forward, x.copy(), dout)
    tol = 1e-7
    torch_out = torch.nn.functional.batch_norm(
        torch.from_numpy(x), None, None, torch.from_numpy(gamma), torch.from_numpy(beta), True
    )
    return [
        CheckRow("reference", "forward (N, D)", 0.0, _max_abs(out, torch_out), 1e-10),
        CheckRow("reference", "staged vs compact dx (rel)", relative_error(*staged[:1], *compact[:1]), None, tol),
        CheckRow("reference", "compact dx vs numerical (rel)", relative_error(compact[0], numeric), None, tol),
    ]  # fmt: skip


def _check_torch_levels(rng: np.random.Generator, dtype: torch.dtype, offset: float):
    shape = (16, 8, 6, 6)
    x64 = rng.normal(offset, 1.0, size=shape)
    x = torch.from_numpy(x64).to(dtype)
    x64 = x.double().numpy()  # the truth sees exactly the values the tested dtype holds
    gamma, beta = rng.normal(size=8), rng.normal(size=8)
    dout64 = rng.normal(size=shape)
    truth = _truth(x64, gamma, beta, dout64)
    rows = []
    for level in ("functional", "nn.BatchNorm2d"):
        out, grads = _run_level(level, x, gamma, beta, dout64, torch_impl=False)
        ref_out, ref_grads = _run_level(level, x, gamma, beta, dout64, torch_impl=True)
        name = f"{str(dtype).removeprefix('torch.')}, offset {offset:g}"
        tol = TOLERANCE[dtype]
        rows.append(CheckRow(level, f"{name}: out", _max_abs(out, truth[0]), None, tol))
        if offset == 0:
            rows[-1].vs_torch = _max_abs(out, ref_out)
        else:  # torch's own error at this offset, for comparison
            rows.append(CheckRow(f"torch {level}", f"{name}: out", _max_abs(ref_out, truth[0]), None, tol, True))  # fmt: skip
        grad_tol = tol * 10
        for what, got, want, ref in zip(
            ("dx", "dw", "db"), grads, truth[1:], ref_grads, strict=True
        ):
            scale = max(1.0, float(np.max(np.abs(want))))
            vs_torch = _max_abs(got, ref) / scale if offset == 0 else None
            rows.append(CheckRow(level, f"{name}: {what} (scaled)", _max_abs(got, want) / scale, vs_torch, grad_tol))  # fmt: skip
    return rows


def _run_level(level, x, gamma, beta, dout64, torch_impl: bool):
    dtype = x.dtype
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xg = x.clone().requires_grad_(True)
    if level == "functional":
        w = torch.tensor(gamma, dtype=param_dtype, requires_grad=True)
        b = torch.tensor(beta, dtype=param_dtype, requires_grad=True)
        fn = torch.nn.functional.batch_norm if torch_impl else functional.batch_norm
        out = fn(xg, None, None, w, b, True)
    else:
        module = (torch.nn.BatchNorm2d if torch_impl else nn.BatchNorm2d)(x.shape[1])
        module = module.to(param_dtype)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(gamma))
            module.bias.copy_(torch.from_numpy(beta))
        w, b = module.weight, module.bias
        out = module(xg)
    out.backward(torch.from_numpy(dout64).to(dtype))
    return out, (xg.grad, w.grad, b.grad)


def run_checks(seed: int = 0) -> list[CheckRow]:
    """All rows: the NumPy reference, then functional and nn at each dtype and offset."""
    rng = np.random.default_rng(seed)
    rows = _check_reference(rng)
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        rows += _check_torch_levels(rng, dtype, 0.0)
    for offset in (1e4, 1e6):
        rows += _check_torch_levels(rng, torch.float32, offset)
    return rows
