"""The checks every model goes through: torch's BN against bnlab's (via ``convert``) from
identical weights, through each door a user opens (training, eval, compile, export, trace,
script, torch.func, folding, checkpoints).

The oracle is always the same model with torch's own BatchNorm, run eagerly.
``BNLAB_TEST_DEVICE=cuda`` runs the checks on a GPU.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab import nn as bnn
from bnlab.nn.batchnorm import _BatchNorm

DEVICE = torch.device(os.environ.get("BNLAB_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda":  # TF32 convolutions would round away the float32 agreement checked
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
TORCH_BN = nn.modules.batchnorm._BatchNorm


def close(actual: Tensor, expected: Tensor, what: str, rtol: float = 1e-4, scale_atol: float = 1e-5) -> None:  # fmt: skip
    """float32 agreement: relative, plus an absolute slack of ``scale_atol`` × max|expected|."""
    atol = scale_atol * max(float(expected.detach().abs().max()), 1.0) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")  # fmt: skip


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN weights and running statistics, so that every term is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TORCH_BN):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    return model


def pair(make, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(torch model, the same model converted to bnlab's BN), identical weights, on DEVICE."""
    torch.manual_seed(seed)
    reference = randomize_batchnorm(make(), seed).to(DEVICE)
    ours = bnn.convert(copy.deepcopy(reference))
    left = [name for name, m in ours.named_modules() if isinstance(m, TORCH_BN)]
    assert not left, f"convert left torch BN layers: {left}"
    assert any(isinstance(m, _BatchNorm) for m in ours.modules())
    return reference, ours


def batch(shape=(2, 3, 32, 32), classes: int = 5, seed: int = 1) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    target = torch.randint(0, classes, (shape[0],), generator=generator)
    return x.to(DEVICE), target.to(DEVICE)


def running_stats(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def float64_copy(model: nn.Module) -> nn.Module:
    """The float64 truth: ``model`` with torch's BN, every parameter and buffer in float64."""
    return copy.deepcopy(model).double()


def agree(actual: Tensor, expected: Tensor, truth: Tensor, what: str, rtol: float = 1e-4, scale_atol: float = 1e-5, factor: float = 3.0) -> None:  # fmt: skip
    """``actual`` (bnlab, float32) agrees with ``expected`` (torch's BN, float32) within float32
    tolerance, or else is at most ``factor`` times as far from the float64 ``truth`` as
    ``expected`` is (RMS errors, as torch's own accuracy checks compare against float64).

    Deep models (DenseNet-121, EfficientNet) amplify float32 rounding past any fixed
    tolerance; the question asked is then whether bnlab is as accurate as torch, not whether
    both round alike."""
    try:
        close(actual, expected, what, rtol=rtol, scale_atol=scale_atol)
        return
    except AssertionError as difference:
        truth = truth.double()
        scale = max(float(truth.abs().max()), 1.0) if truth.numel() else 1.0
        ours = float((actual.double() - truth).square().mean().sqrt())
        torchs = float((expected.double() - truth).square().mean().sqrt())
        if ours > factor * torchs + 1e-7 * scale:
            raise AssertionError(
                f"{what}: bnlab's RMS error against float64 {ours:.3g} exceeds {factor}x "
                f"torch's {torchs:.3g}; {difference}"
            ) from None


def check_training_steps(reference: nn.Module, ours: nn.Module, x: Tensor, target: Tensor, steps: int = 3, run=None) -> nn.Module:  # fmt: skip
    """``steps`` SGD steps (momentum, weight decay): losses, gradients, running stats agree
    (:func:`agree`: with torch's float32 BN, or as close as it to a float64 run).

    ``run(model, x)`` computes the output of ``ours`` (default: a call), e.g. a compiled model.
    Returns the float64 truth after the same steps.
    """
    run = run or (lambda model, inp: model(inp))
    truth = float64_copy(reference)
    models = (reference, ours, truth)
    inputs = (x, x, x.double())
    calls = (None, run, None)
    for model in models:
        model.train()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4) for m in models]  # fmt: skip
    for step in range(steps):
        losses = []
        for model, optimizer, call, inp in zip(models, optimizers, calls, inputs, strict=True):
            optimizer.zero_grad()
            torch.manual_seed(1000 + step)  # the same dropout / stochastic-depth masks in all
            out = model(inp) if call is None else call(model, inp)
            loss = F.cross_entropy(out, target)
            loss.backward()
            losses.append(loss.detach())
        agree(losses[1], losses[0], losses[2], f"step {step} loss")
        named = [list(m.named_parameters()) for m in models]
        try:
            for (name, p_ref), (_, p_ours) in zip(named[0], named[1], strict=True):
                close(p_ours.grad, p_ref.grad, f"step {step} grad of {name}", rtol=1e-3, scale_atol=1e-4)  # fmt: skip
        except AssertionError:
            # Past float32 tolerance (a deep model amplifying rounding): one verdict on all
            # gradients together, since the ratio of two rounding errors is noisy per tensor.
            flat = [torch.cat([p.grad.flatten().double() for _, p in params]) for params in named]  # fmt: skip
            agree(flat[1], flat[0], flat[2], f"step {step} gradients (all parameters)", rtol=1e-3, scale_atol=1e-4)  # fmt: skip
        ref_stats, our_stats, true_stats = (running_stats(m) for m in models)
        assert ref_stats.keys() == our_stats.keys()
        for key, value in ref_stats.items():
            agree(our_stats[key], value, true_stats[key], f"step {step} {key}")
        for optimizer in optimizers:
            optimizer.step()
    return truth


def check_eval(reference: nn.Module, ours: nn.Module, x: Tensor) -> None:
    """Eval output under no_grad, and with autograd on (outputs and input gradients)."""
    reference.eval(), ours.eval()
    with torch.no_grad():
        close(ours(x), reference(x), "eval output (no_grad)")
    grads = []
    for model in (reference, ours):
        inp = x.detach().clone().requires_grad_(True)
        out = model(inp)
        out.square().sum().backward()
        grads.append((out.detach(), inp.grad))
    close(grads[1][0], grads[0][0], "eval output (grad enabled)")
    close(grads[1][1], grads[0][1], "eval input gradient", rtol=1e-3, scale_atol=1e-4)


def check_state_dict(reference: nn.Module, ours: nn.Module, x: Tensor) -> None:
    """Same keys; torch's checkpoint loads strictly into bnlab's model and back (via bytes)."""
    assert list(reference.state_dict()) == list(ours.state_dict())
    for source, target in ((reference, ours), (ours, reference)):
        with torch.no_grad():  # make the source differ from the target first
            for module in source.modules():
                if isinstance(module, (TORCH_BN, _BatchNorm)):
                    module.running_mean.add_(0.25)
        buffer = io.BytesIO()
        torch.save(source.state_dict(), buffer)
        buffer.seek(0)
        target.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        for key, value in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)
    check_eval(reference, ours, x)


def check_functional(reference: nn.Module, ours: nn.Module, x: Tensor, target: Tensor) -> None:
    """``torch.func.functional_call`` and ``torch.func.grad`` in training mode."""
    reference.train(), ours.train()
    results = []
    for model in (reference, ours):
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        buffers = {k: v.clone() for k, v in model.named_buffers()}

        def loss(p, b, model=model):  # buffers are an argument: their updates are allowed
            return F.cross_entropy(torch.func.functional_call(model, {**p, **b}, (x,)), target)

        value = loss(params, {k: v.clone() for k, v in buffers.items()})
        grads = torch.func.grad(loss)(params, buffers)
        results.append((value, grads, buffers))
    close(results[1][0], results[0][0], "functional_call loss")
    for name, g in results[0][1].items():
        close(results[1][1][name], g, f"torch.func.grad of {name}", rtol=1e-3, scale_atol=1e-4)
    for name, b in results[0][2].items():
        close(results[1][2][name], b, f"buffer {name} after functional_call")


def graph_breaks(model: nn.Module, x: Tensor) -> None:
    """``torch._dynamo.explain`` finds one graph and no break, in training and in eval.

    One eager call comes first (as in a session that ran the model before compiling it); a
    process whose first bnlab call is compiled is tested on its own in test_compile.py.
    """
    with torch.no_grad():
        copy.deepcopy(model).eval()(x)
    for training in (True, False):
        torch._dynamo.reset()
        probe = copy.deepcopy(model).train(training)
        explanation = torch._dynamo.explain(probe)(x)
        reasons = [str(r.reason)[:300] for r in explanation.break_reasons]
        mode = "train" if training else "eval"
        assert explanation.graph_break_count == 0, f"{mode}: {explanation.graph_break_count} graph breaks: {reasons}"  # fmt: skip
        assert explanation.graph_count == 1, f"{mode}: {explanation.graph_count} graphs"


def check_compiled(reference: nn.Module, ours: nn.Module, x: Tensor, target: Tensor, backend: str) -> None:  # fmt: skip
    """A compiled bnlab model trains (two steps) and evaluates like eager torch BN."""
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    truth = check_training_steps(reference, ours, x, target, steps=2, run=lambda _, inp: compiled(inp))  # fmt: skip
    reference.eval(), ours.eval(), truth.eval()
    with (
        torch.no_grad()
    ):  # (two steps from random weights can leave outputs of 1e27: the truth decides)
        agree(compiled(x), reference(x), truth(x.double()), f"compiled ({backend}) eval output")


def check_export(reference: nn.Module, ours: nn.Module, x: Tensor) -> None:
    """``torch.export.export`` in eval (output) and training (output and running stats)."""
    for training in (False, True):
        ref, mine = copy.deepcopy(reference).train(training), copy.deepcopy(ours).train(training)
        program = torch.export.export(mine, (x,))
        exported = program.module()
        mode = "train" if training else "eval"
        torch.manual_seed(0)
        got = exported(x)
        torch.manual_seed(0)  # the same dropout masks in both
        close(got, ref(x), f"exported ({mode}) output")
        if training:
            expected = running_stats(ref)
            got = {k: v for k, v in exported.state_dict().items() if k in expected}
            assert got.keys() == expected.keys(), f"exported buffers {sorted(got)}"
            for key, value in expected.items():
                close(got[key], value, f"exported (train) {key}")


def check_trace(reference: nn.Module, ours: nn.Module, x: Tensor) -> None:
    """``torch.jit.trace`` (eval) replays correctly on a new input, or raises."""
    reference.eval(), ours.eval()
    other = torch.randn_like(x)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(ours, x)
    except Exception as error:  # a loud refusal is acceptable; it must say something
        assert str(error).strip(), f"jit.trace raised {type(error).__name__} without a message"
        return
    with torch.no_grad():
        close(traced(other), reference(other), "jit.trace replay on a new input")


def check_script(reference: nn.Module, ours: nn.Module, x: Tensor) -> None:
    """``torch.jit.script`` works, or its error names an alternative."""
    reference.eval(), ours.eval()
    torch.jit.script(copy.deepcopy(reference))  # the model code itself is scriptable
    try:
        scripted = torch.jit.script(ours)
    except Exception as error:
        message = str(error)
        alternatives = ("torch.jit.trace", "torch.export", "torch.compile", "revert")
        assert any(a in message for a in alternatives), f"jit.script error names no alternative: {message[:800]}"  # fmt: skip
        return
    with torch.no_grad():
        close(scripted(x), reference(x), "jit.script output")


def check_fold(reference: nn.Module, ours: nn.Module, x: Tensor) -> None:
    """``fold_batchnorm``: same eval output; every BN folded or kept with a reason."""
    from bnlab.inference import fold_batchnorm

    reference.eval(), ours.eval()
    folded = fold_batchnorm(ours)
    with torch.no_grad():
        close(folded(x), reference(x), "folded output")
    report = folded.fold_report
    accounted = {bn for bn, _ in report.folded} | {bn for bn, _ in report.kept}
    names = {name for name, m in ours.named_modules() if isinstance(m, _BatchNorm)}
    assert names <= accounted, f"BN layers neither folded nor reported: {names - accounted}"
    assert all(reason for _, reason in report.kept)
