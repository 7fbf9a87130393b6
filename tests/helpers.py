"""Shared helpers for the test suite."""

import torch


def scaled_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|): a relative error robust to values near zero."""
    got, want = got.detach().double(), want.detach().double()
    if want.numel() == 0:
        return 0.0
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def use_path(monkeypatch, path: str) -> None:
    """Run bnlab.functional on its fused kernels ("fused") or its level-2 torch path ("torch")."""
    from bnlab import kernels

    fused = path == "fused"
    module = kernels.load() if fused else None
    monkeypatch.setattr(kernels, "_ENABLED", fused)
    monkeypatch.setattr(kernels, "EAGER", module.eager if module is not None else None)
