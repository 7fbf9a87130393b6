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
    monkeypatch.setattr(
        kernels, "MODULE_EAGER", module.module_eager if module is not None else None
    )


def sync_reference(sizes: list[int], seed: int):
    """What SyncBatchNorm on ranks holding ``sizes`` samples must equal (the data of
    ``distributed_workers.sync_bn_worker``): torch BN on the concatenated batch, float64.
    Returns (input with its gradient, output, the BatchNorm2d after the step)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = (torch.randn(total, 3, 4, 5, generator=g, dtype=torch.float64) * 2 + 1e3).requires_grad_()
    dy = torch.randn(total, 3, 4, 5, generator=g, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, momentum=0.3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    out = bn(x)
    out.backward(dy)
    return x, out, bn
