"""The kernels behind the operator schemas of TEAM.md, called through torch's dispatcher.

``bnlab::`` ops are defined by the C++ extension; here the same schemas are defined in a test
namespace and the Triton implementations registered for the CPU key (interpreter) or the CUDA
key (GPU), so the argument conversions of the dispatcher are exercised end to end.
"""

import torch

import bnlab.kernels.cuda as cuda
from helpers import scaled_error

NS = "bnlab_cudatest"
_lib = torch.library.Library(NS, "DEF")
_lib.define(
    "batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, "
    "Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum, "
    "float eps, int activation, int nonfinite, bool report) "
    "-> (Tensor out, Tensor shift, Tensor mean_d, Tensor invstd, Tensor bad)"
)
_lib.define(
    "batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? output, "
    "Tensor shift, Tensor mean_d, Tensor invstd, bool training, int activation, "
    "bool[4] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
    "Tensor grad_residual)"
)


def test_registered_kernels_run_through_the_dispatcher(device):
    key = "CUDA" if device == "cuda" else "CPU"
    assert cuda.register(NS, key) and cuda.register(NS, key) and cuda.registered(NS, key)
    op = getattr(torch.ops, NS)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64).to(device)
    res = torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64).to(device)
    dy = torch.randn(5, 4, 3, 2, generator=gen, dtype=torch.float64).to(device)
    w = torch.rand(4, generator=gen, dtype=torch.float64).to(device) + 0.5
    b = torch.randn(4, generator=gen, dtype=torch.float64).to(device)
    rm, rv = torch.zeros(4, dtype=torch.float64, device=device), torch.ones(4, dtype=torch.float64, device=device)  # fmt: skip
    out, shift, mean_d, invstd, bad = op.batch_norm_forward(x, w, b, res, rm, rv, True, 0.1, 1e-5, 1, 1, False)  # fmt: skip
    xr = x.detach().requires_grad_()
    wr, br, rr = (t.detach().requires_grad_() for t in (w, b, res))
    rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
    want = torch.relu(torch.nn.functional.batch_norm(xr, rm2, rv2, wr, br, True, 0.1, 1e-5) + rr)
    want.backward(dy)
    assert scaled_error(out, want) <= 1e-10 and not bad.any()
    assert scaled_error(rm, rm2) <= 1e-12 and scaled_error(rv, rv2) <= 1e-12
    grads = op.batch_norm_backward(dy, x, w, out, shift, mean_d, invstd, True, 1, [True, True, True, True])  # fmt: skip
    for got, ref in zip(grads, (xr.grad, wr.grad, br.grad, rr.grad), strict=True):
        assert scaled_error(got, ref) <= 1e-9
