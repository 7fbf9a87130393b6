"""SyncBatchNorm's per-rank passes on the Triton kernels (``bnlab.kernels.cuda.ops``: moments,
normalize, grad_sums, grad_input) against torch BN on the whole batch (float64), and the
SyncBatchNorm module running on them across gloo ranks (CPU tensors, Triton's interpreter).
"""

import pytest
import torch
import torch.multiprocessing as mp

from bnlab.kernels.cuda import ops
from distributed_workers import sync_bn_worker
from helpers import sync_reference

CASES = [  # shape, layout, dtype, tolerance
    ((37, 5), "contiguous", torch.float64, 1e-10),
    ((6, 3, 5, 7), "contiguous", torch.float32, 2e-5),
    ((6, 3, 5, 7), "channels_last", torch.bfloat16, 3e-2),
    ((4, 9, 3, 2, 3), "channels_last", torch.float32, 2e-5),
]


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


@pytest.mark.parametrize(("shape", "layout", "dtype", "tol"), CASES)
def test_one_rank_of_passes_is_batch_norm(device, shape, layout, dtype, tol):
    """With one rank the four passes make BN's forward and backward, at a 1e3 offset."""
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1e3
    dy64 = torch.randn(shape, generator=g, dtype=torch.float64)
    C = shape[1]
    w64, b64 = torch.rand(C, generator=g, dtype=torch.float64) + 0.5, torch.randn(C, generator=g, dtype=torch.float64)  # fmt: skip
    x = _layout(x64.to(dtype), layout).to(device)
    dy = _layout(dy64.to(dtype), layout).to(device)
    w, b = w64.float().to(device), b64.float().to(device)

    shift, mean_d, m2, count = ops.moments(x)
    assert count == x.numel() // C
    xq = x.double().cpu().requires_grad_()  # the oracle sees the same rounded input
    mean = xq.detach().mean(dim=[d for d in range(x.dim()) if d != 1])
    torch.testing.assert_close((shift + mean_d).double().cpu(), mean, rtol=0, atol=tol * 1e3)
    var = m2.double().cpu() / count
    ref_var = xq.detach().var(dim=[d for d in range(x.dim()) if d != 1], unbiased=False)
    torch.testing.assert_close(var, ref_var, rtol=tol * 10, atol=tol)

    invstd = torch.rsqrt(var.to(device).to(shift.dtype) + 1e-5)
    out = ops.normalize(x, shift, mean_d, invstd, w, b)
    assert out.dtype == x.dtype and out.stride() == x.stride()
    sum_g, sum_gx = ops.grad_sums(dy, x, shift, mean_d, invstd)
    dx = ops.grad_input(dy, x, w, shift, mean_d, invstd, sum_g, sum_gx, count)

    ref = torch.nn.functional.batch_norm(xq, None, None, w.double().cpu(), b.double().cpu(), True, 0.0, 1e-5)  # fmt: skip
    ref.backward(dy.double().cpu())
    scale = ref.detach().abs().max()
    assert (out.double().cpu() - ref.detach()).abs().max() / scale <= tol * 10
    assert (dx.double().cpu() - xq.grad).abs().max() / xq.grad.abs().max() <= tol * 50


def test_empty_rank_contributes_nothing(device):
    x = torch.empty(0, 3, 4, device=device)
    shift, mean_d, m2, count = ops.moments(x)
    assert count == 0 and not m2.any()
    sum_g, sum_gx = ops.grad_sums(x, x, shift, mean_d, torch.ones(3, device=device))
    assert not sum_g.any() and not sum_gx.any()


def test_sync_batchnorm_on_the_triton_passes(tmp_path, device):
    """Uneven ranks (one empty) with the Triton passes equal BN on the concatenated batch."""
    if device != "cpu":
        pytest.skip("the multi-rank run uses gloo with CPU tensors (the interpreter)")
    sizes, seed = [5, 3, 0], 11
    mp.start_processes(sync_bn_worker, args=(len(sizes), sizes, seed, str(tmp_path), "triton"), nprocs=len(sizes), start_method="spawn")  # fmt: skip
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(len(sizes))]
    assert all(r["passes"] == "bnlab.kernels.cuda.ops" for r in results)
    x, out, bn = sync_reference(sizes, seed)
    tol = 1e-9
    assert (torch.cat([r["out"] for r in results]) - out).abs().max() <= tol
    assert (torch.cat([r["grad"] for r in results]) - x.grad).abs().max() <= tol
    assert (sum(r["weight_grad"] for r in results) - bn.weight.grad).abs().max() <= tol
    for r in results:
        assert (r["running_mean"] - bn.running_mean).abs().max() <= tol
        assert (r["running_var"] - bn.running_var).abs().max() <= tol
