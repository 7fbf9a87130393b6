"""On a CUDA machine: bnlab's batch norm through its public doors, against float64 torch.

``bnlab.functional.batch_norm`` / ``bnlab.nn`` on CUDA tensors reach the Triton kernels
through the ``bnlab::`` operators (the C++ autograd node dispatches to the CUDA key). Checks
outputs and gradients (plain, ReLU, residual+ReLU, eval), both layouts, fp32 and bf16, the
non-finite guard, torch.compile (zero graph breaks, aot_eager numerics), and a ResNet-style
block's training steps against torch's BatchNorm. Prints one line per check and a summary;
exits non-zero if any check fails.   usage: PYTHONPATH=src python scripts/gpu_operator_check.py
"""

from __future__ import annotations

import sys
import traceback
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from bnlab import functional, kernels
from bnlab import nn as bnn

RESULTS: list[tuple[str, bool, str]] = []


def check(name):
    def wrap(fn):
        try:
            detail = fn() or ""
            RESULTS.append((name, True, detail))
        except Exception as error:  # report every check, then fail at the end
            RESULTS.append((name, False, f"{type(error).__name__}: {error}"))
            traceback.print_exc()
        print(("PASS" if RESULTS[-1][1] else "FAIL"), name, RESULTS[-1][2], flush=True)
        return fn

    return wrap


def err(a, b):
    return float((a.double() - b.double()).abs().max() / max(1.0, float(b.double().abs().max())))


FRESH = """
import torch
from bnlab import functional
from bnlab.kernels.cuda import ops
x = torch.randn(8, 4, 5, 5, device="cuda", requires_grad=True)
functional.batch_norm(x, None, None, training=True).sum().backward()
print(ops.CALLS["forward"], ops.CALLS["backward"])
"""


@check("a fresh process's first functional call on CUDA runs the Triton kernels")
def _fresh_process():
    import subprocess

    done = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    forward, backward = (int(v) for v in done.stdout.split()[-2:])
    assert forward == 1 and backward == 1, f"Triton calls: forward {forward}, backward {backward}"
    return f"forward {forward}, backward {backward} Triton calls"


@check("kernels registered for cuda")
def _registered():
    assert kernels.load() is not None
    assert "cuda" in kernels.DEVICES, kernels.DEVICES
    return f"devices {sorted(kernels.DEVICES)}"


def _case(shape, dtype, layout, training, act, residual):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(shape, device="cuda", generator=g) * 2 + 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.rand(c, device="cuda", generator=g) + 0.5
    b = torch.randn(c, device="cuda", generator=g)
    r = torch.randn(shape, device="cuda", generator=g).to(dtype) if residual else None
    dy = torch.randn(shape, device="cuda", generator=g).to(dtype)
    rm, rv = torch.randn(c, device="cuda", generator=g), torch.rand(c, device="cuda", generator=g) + 0.5  # fmt: skip
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    out = functional.batch_norm(leaves[0], rm.clone(), rv.clone(), leaves[1], leaves[2], training,
                                residual=leaves[3], activation=act)  # fmt: skip
    out.backward(dy)
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    want = F.batch_norm(ref[0], rm.double(), rv.double(), ref[1], ref[2], training)
    if residual:
        want = want + ref[3]
    if act == "relu":
        want = torch.relu(want)
    want.backward(dy.double())
    pairs = [(out, want), (leaves[0].grad, ref[0].grad), (leaves[1].grad, ref[1].grad), (leaves[2].grad, ref[2].grad)]  # fmt: skip
    if residual:
        pairs.append((leaves[3].grad, ref[3].grad))
    worst = max(err(a, b) for a, b in pairs)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert worst <= tol, f"max scaled error {worst:.2e} > {tol}"
    assert "BatchNormNode" in out.grad_fn.name(), out.grad_fn.name()
    return f"max scaled error {worst:.1e}"


for shape in ((32, 64, 28, 28), (4096, 256)):
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",):
            for training, act, residual in ((True, None, False), (True, "relu", True), (False, None, False)):  # fmt: skip
                name = f"functional {shape} {str(dtype)[6:]} {layout} train={training} act={act} residual={residual}"  # fmt: skip
                check(name)(partial(_case, shape, dtype, layout, training, act, residual))


@check("precision at offsets 1e4 and 1e6 (fp32, through functional)")
def _precision():
    lines = []
    for offset in (1e4, 1e6):
        x = torch.randn(64, 64, 56, 56, device="cuda") + offset
        want = F.batch_norm(x.double(), None, None, training=True)
        ours, theirs = functional.batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True)  # fmt: skip
        lines.append(
            f"offset {offset:g}: bnlab {err(ours, want):.1e}, torch {err(theirs, want):.1e}"
        )
        assert err(ours, want) <= 1e-4
    return "; ".join(lines)


@check("nonfinite skip/raise on cuda")
def _nonfinite():
    x = torch.randn(16, 4, 8, device="cuda")
    x[3, 2, 1] = float("nan")
    bn = bnn.BatchNorm1d(4).cuda()
    bn(x)
    torch.cuda.synchronize()
    assert torch.isfinite(bn.running_mean).all() and bn.running_mean[2] == 0
    strict = bnn.BatchNorm1d(4, nonfinite="raise").cuda()
    try:
        strict(x)
    except FloatingPointError:
        pass
    else:
        raise AssertionError("nonfinite='raise' did not raise")
    assert (strict.running_mean == 0).all()


class Block(nn.Module):
    def __init__(self, norm, c=32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def _blocks():
    torch.manual_seed(0)
    ours, theirs = Block(bnn.BatchNorm2d).cuda(), Block(nn.BatchNorm2d).cuda()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@check("resnet block: 3 SGD steps match torch")
def _training():
    ours, theirs = _blocks()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for step in range(3):
        x = torch.randn(8, 32, 16, 16, device="cuda", generator=torch.Generator(device="cuda").manual_seed(step))  # fmt: skip
        losses = []
        for m, o in zip((ours, theirs), opts, strict=True):
            o.zero_grad()
            loss = m(x).pow(2).mean()
            loss.backward()
            o.step()
            losses.append(float(loss))
        assert abs(losses[0] - losses[1]) <= 1e-4 * max(1, abs(losses[1])), losses
    return f"losses {losses}"


@check("torch.compile: zero graph breaks, aot_eager matches torch")
def _compile():
    ours, theirs = _blocks()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(ours)(torch.randn(2, 32, 8, 8, device="cuda"))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 32, 8, 8, device="cuda")
    assert err(compiled(x), theirs(x)) <= 1e-4
    return f"graphs {explanation.graph_count}"


failed = [name for name, ok, _ in RESULTS if not ok]
print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
