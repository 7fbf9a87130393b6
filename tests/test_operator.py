"""bnlab's batch norm through every door torch users take, checked against torch's BatchNorm.

In-place ops on outputs, eval with grad enabled, torch.compile (zero graph breaks, training
and eval), torch.export, jit.trace (the operator is recorded, new inputs give right answers),
jit.script (a clear error), torch.func (grad, vmap, functional_call, jvp, jacfwd, hessian),
forward-mode AD, save/load, and the
non-finite guard inside compiled code. Truth: torch's own BatchNorm from identical weights.
"""

import io
import warnings

import pytest
import torch
from torch import nn

from bnlab import kernels
from bnlab import nn as bnn


@pytest.fixture(autouse=True)
def _kernels():
    assert kernels.load() is not None, "the C++ extension must build on this machine"


def _pair(cls_bnlab=bnn.BatchNorm2d, cls_torch=nn.BatchNorm2d, channels=6, **kwargs):
    torch.manual_seed(0)
    ours, theirs = cls_bnlab(channels, **kwargs), cls_torch(channels, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


class Block(nn.Module):
    """A ResNet basic block written the way torchvision writes it."""

    def __init__(self, norm, channels=6):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _blocks():
    torch.manual_seed(1)
    ours = Block(bnn.BatchNorm2d)
    theirs = Block(nn.BatchNorm2d)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _input(shape=(4, 6, 5, 5), seed=2):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(8, 6, 8, 8), (64, 6, 32, 32)])  # under and over 1 MB
def test_inplace_ops_on_outputs_train_like_torch(shape):
    ours, theirs = _pair()
    x = _input(shape)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out += 1.0  # as `out += identity` does
        out.relu_()  # as ReLU(inplace=True) does
        (out * xi).sum().backward()
        results.append((out, xi.grad, module.weight.grad, module.bias.grad, module.running_var))
    for got, want in zip(*results, strict=True):
        _close(got, want, 1e-4)


def test_eval_with_grad_enabled_and_inplace_relu():
    """Eval with autograd on (saliency maps, adversarial inputs, frozen-BN fine-tuning): the
    output, and the gradients of the input, weight and bias, as torch's."""
    ours, theirs = _pair()
    ours.eval(), theirs.eval()
    x = _input()
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [torch.relu_(m(xi)) for m, xi in zip((ours, theirs), inputs, strict=True)]
    _close(*outs)
    for out in outs:
        out.square().sum().backward()
    _close(inputs[0].grad, inputs[1].grad)
    _close(ours.weight.grad, theirs.weight.grad)
    _close(ours.bias.grad, theirs.bias.grad)


def test_resnet_block_training_steps_match_torch():
    ours, theirs = _blocks()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ours, theirs)]
    for step in range(3):
        x = _input((4, 6, 8, 8), seed=step)
        losses = []
        for model, opt in zip((ours, theirs), optimizers, strict=True):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            losses.append(loss)
        _close(*losses)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):  # fmt: skip
        _close(a.float(), b.float(), 1e-4), name


def _explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@pytest.mark.parametrize("training", [True, False])
def test_compile_has_no_graph_breaks(training):
    ours, _ = _blocks()
    ours.train(training)
    explanation = _explain(ours, _input((2, 6, 5, 5)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_matches_torch_eager():
    ours, theirs = _blocks()
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = _input((4, 6, 6, 6), seed=step)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [compiled(xs[0]), theirs(xs[1])]
        for out in outs:
            out.sum().backward()
        _close(*outs)
        _close(xs[0].grad, xs[1].grad, 1e-4)
    _close(ours.bn1.weight.grad, theirs.bn1.weight.grad, 1e-4)
    _close(ours.bn2.running_mean, theirs.bn2.running_mean)
    _close(ours.bn2.running_var, theirs.bn2.running_var)
    assert int(ours.bn1.num_batches_tracked) == int(theirs.bn1.num_batches_tracked) == 2


def test_inductor_compiles_eval_model():
    ours, theirs = _blocks()
    ours.eval(), theirs.eval()
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True)  # inductor
    x = _input((2, 6, 5, 5))
    _close(compiled(x), theirs(x))


@pytest.mark.parametrize("training", [False, True])
def test_export_runs_and_matches(training):
    ours, theirs = _blocks()
    ours.train(training), theirs.train(training)
    x = _input((2, 6, 5, 5))
    exported = torch.export.export(ours, (x,))
    assert any("bnlab" in str(node.target) for node in exported.graph.nodes)
    x2 = _input((2, 6, 5, 5), seed=9)
    _close(exported.module()(x2), theirs(x2))


def test_jit_trace_records_the_operator_and_generalizes():
    ours, theirs = _blocks()
    ours.eval(), theirs.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(ours, _input((2, 6, 5, 5)))
    assert "bnlab::batch_norm" in str(traced.inlined_graph)
    x2 = _input((3, 6, 7, 7), seed=5) * 4 + 3  # another batch, shape and scale
    _close(traced(x2), theirs(x2))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    _close(torch.jit.load(buffer)(x2), theirs(x2))


def test_jit_script_names_the_alternatives():
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*torch\.export"):
        torch.jit.script(bnn.BatchNorm2d(4))


def test_func_grad_matches_torch():
    ours, theirs = _pair(track_running_stats=False)
    x = _input()

    def loss(module):
        return lambda inp: module(inp).pow(3).sum()

    _close(torch.func.grad(loss(ours))(x), torch.func.grad(loss(theirs))(x))


def test_functional_call_uses_the_given_parameters():
    ours, theirs = _pair()
    params = {"weight": torch.full((6,), 2.0), "bias": torch.full((6,), -1.0)}
    x = _input()
    _close(torch.func.functional_call(ours, params, (x,)), torch.func.functional_call(theirs, params, (x,)))  # fmt: skip


@pytest.mark.parametrize("mode", ["eval", "no_running_stats"])
def test_vmap_matches_torch(mode):
    ours, theirs = _pair(track_running_stats=mode != "no_running_stats")
    if mode == "eval":
        with torch.no_grad():
            ours.running_mean.uniform_(-1, 1), ours.running_var.uniform_(0.5, 2)
        theirs.load_state_dict(ours.state_dict())
        ours.eval(), theirs.eval()
    x = _input((3, 4, 6, 5, 5))
    _close(torch.func.vmap(ours)(x), torch.func.vmap(theirs)(x))


def test_vmap_refuses_unbatched_running_stats_in_training_like_torch():
    ours, theirs = _pair()
    x = _input((3, 4, 6, 5, 5))
    for module in (ours, theirs):
        with pytest.raises(RuntimeError, match="running_mean or running_var"):
            torch.func.vmap(module)(x)


def _eval_pair(**kwargs):
    ours, theirs = _pair(**kwargs)
    with torch.no_grad():
        ours.running_mean.uniform_(-1, 1), ours.running_var.uniform_(0.5, 2)
    theirs.load_state_dict(ours.state_dict())
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_mode_matches_torch(mode):
    """torch.func.jvp, jacfwd, hessian (forward over reverse) and functional_call's parameter
    tangents, through a module (training without running statistics: torch.func refuses
    their in-place update, for torch's BatchNorm too)."""
    ours, theirs = _pair(track_running_stats=False) if mode == "train" else _eval_pair()
    x, v = _input(), _input(seed=3)
    for (out_a, tan_a), (out_b, tan_b) in [(torch.func.jvp(m, (x,), (v,)) for m in (ours, theirs))]:  # fmt: skip
        _close(out_a, out_b), _close(tan_a, tan_b)
    small = x[:2, :, :3, :3]
    _close(torch.func.jacfwd(ours)(small), torch.func.jacfwd(theirs)(small))
    _close(*(torch.func.hessian(lambda inp, m=m: m(inp).pow(3).sum())(small[:, :, :2, :2].contiguous()) for m in (ours, theirs)))  # fmt: skip
    params = {"weight": torch.full((6,), 2.0), "bias": torch.full((6,), -1.0)}
    tangents = {"weight": torch.linspace(-1, 1, 6), "bias": torch.linspace(0, 1, 6)}
    _close(*(torch.func.jvp(lambda p, m=m: torch.func.functional_call(m, p, (x,)), (params,), (tangents,))[1] for m in (ours, theirs)))  # fmt: skip


def test_forward_ad_dual_tensors_match_torch():
    """torch.autograd.forward_ad in eager code, through a torchvision-style block in training
    (running statistics updated as usual) and channels_last input."""
    import torch.autograd.forward_ad as fwAD

    ours, theirs = _blocks()
    x = _input((4, 6, 5, 5)).contiguous(memory_format=torch.channels_last)
    v = _input((4, 6, 5, 5), seed=4)
    results = []
    for model in (ours, theirs):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(model(fwAD.make_dual(x, v)))
        results.append((out.primal, out.tangent, model.bn1.running_var.clone()))
    for a, b in zip(*results, strict=True):
        _close(a, b)


def test_save_and_load_with_torch_checkpoints():
    ours, theirs = _blocks()
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    theirs.load_state_dict(torch.load(buffer, weights_only=True))
    ours.eval(), theirs.eval()
    x = _input()
    _close(ours(x), theirs(x))


def test_nonfinite_guard_inside_compiled_code():
    bn = bnn.BatchNorm1d(3)
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    torch._dynamo.reset()
    compiled = torch.compile(bn, backend="aot_eager", fullgraph=True)
    compiled(x)  # the operator warns itself here (torch's C++ warning handler)
    assert torch.isfinite(bn.running_mean).all() and bn.running_mean[1] == 0
    strict = bnn.BatchNorm1d(3, nonfinite="raise")
    torch._dynamo.reset()
    compiled = torch.compile(strict, backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match=r"channel\(s\) \[1\].*nonfinite='raise'"):
        compiled(x)
    assert (strict.running_mean == 0).all() and (strict.running_var == 1).all()


def test_traced_model_loads_in_a_fresh_process_after_loading_the_operators(tmp_path):
    import subprocess
    import sys

    ours, theirs = _blocks()
    ours.eval(), theirs.eval()
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(ours, _input((2, 6, 5, 5))), str(path))
    x = _input((3, 6, 4, 4), seed=4)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        "from bnlab import kernels\n"
        "kernels.load()  # registers the bnlab:: operators a traced model calls\n"
        f"model = torch.jit.load({str(path)!r})\n"
        f"torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    _close(torch.load(tmp_path / "y.pt"), theirs(x))


@pytest.mark.parametrize("training", [True, False])
def test_fused_forward_mode_matches_torch(training):
    """jvp of act(bn(x) + residual) in every tangent: input, weight, bias, residual."""
    from bnlab import functional

    gen = torch.Generator().manual_seed(5)
    x, r, *tangents = (torch.randn(4, 6, 3, 3, generator=gen, dtype=torch.float64) for _ in range(4))  # fmt: skip
    w, b, tw, tb = (torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(4))
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.full((6,), 2.0, dtype=torch.float64)

    def ours(x, w, b, r):
        return functional.batch_norm(x, None if training else rm, None if training else rv, w, b, training, residual=r, activation="relu")  # fmt: skip

    def theirs(x, w, b, r):
        return torch.relu(nn.functional.batch_norm(x, None if training else rm, None if training else rv, w, b, training) + r)  # fmt: skip

    primals, directions = (x, w, b, r), (tangents[0], tw, tb, tangents[1])
    for a, b_ in zip(torch.func.jvp(ours, primals, directions), torch.func.jvp(theirs, primals, directions), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reverse_transforms_on_channels_last_match_torch(mode):
    """jacrev, hessian and vmap(grad) of channels_last input (the composite backward used to
    copy its result into torch's strides, which vmap cannot do)."""
    ours, theirs = _pair(track_running_stats=False, dtype=torch.float64) if mode == "train" else _eval_pair(dtype=torch.float64)  # fmt: skip
    x = _input((3, 6, 2, 2)).double().contiguous(memory_format=torch.channels_last)
    _close(torch.func.jacrev(ours)(x), torch.func.jacrev(theirs)(x))
    _close(*(torch.func.hessian(lambda inp, m=m: m(inp).pow(3).sum())(x) for m in (ours, theirs)))
    if mode == "eval":
        batched = x.unsqueeze(1)
        _close(*(torch.func.vmap(torch.func.grad(lambda inp, m=m: m(inp).pow(3).sum()))(batched) for m in (ours, theirs)))  # fmt: skip


def test_second_derivatives_in_training_are_exact():
    """Reverse over reverse, forward over reverse (hessian) and reverse over forward, against
    the Hessian of batch norm written in plain torch ops (the statistics' own dependence on x
    included). (Forward over forward is not exact, for torch's BatchNorm either: README.)"""
    gen = torch.Generator().manual_seed(7)
    x, w = (torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    ours = bnn.BatchNorm2d(3, track_running_stats=False, dtype=torch.float64)

    def plain(inp):
        mean = inp.mean((0, 2, 3), keepdim=True)
        var = inp.var((0, 2, 3), keepdim=True, correction=0)
        return (((inp - mean) / torch.sqrt(var + ours.eps)) ** 2 * w).sum()

    def loss(inp):
        return (ours(inp) ** 2 * w).sum()

    truth = torch.func.jacrev(torch.func.jacrev(plain))(x)
    for second in (torch.func.jacrev(torch.func.jacrev(loss)), torch.func.hessian(loss), torch.func.jacrev(torch.func.jacfwd(loss))):  # fmt: skip
        torch.testing.assert_close(second(x), truth, rtol=1e-10, atol=1e-10)


def test_a_refused_transform_leaves_the_running_statistics_alone():
    """torch.func refuses a training step that updates captured buffers in place; like
    torch's module, bnlab's must refuse before the operator has moved the statistics."""
    ours, theirs = _pair()
    x = _input() + 5
    for module in (ours, theirs):
        with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
            torch.func.jvp(module, (x,), (torch.ones_like(x),))
        torch.testing.assert_close(module.running_mean, torch.zeros(6))
        assert int(module.num_batches_tracked) == 0


def test_forward_ad_reports_nonfinite_statistics_as_eager_code_does():
    import torch.autograd.forward_ad as fwAD

    x = _input()
    x[0, 1, 0, 0] = float("nan")
    for policy, error in (("raise", FloatingPointError), ("skip", None)):
        bn = bnn.BatchNorm2d(6, nonfinite=policy)
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.ones_like(x))
            if error:
                with pytest.raises(error, match=r"channel\(s\) \[1\]"):
                    bn(dual)
                assert int(bn.num_batches_tracked) == 0
            else:
                with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\]"):
                    bn(dual)
