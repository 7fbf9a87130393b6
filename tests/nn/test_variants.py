"""Ghost BatchNorm and Batch Renormalization."""

import pytest
import torch
import torch.nn.functional as tf

from bnlab import nn as bnn


def _chunks_reference(x, sizes):
    parts, start = [], 0
    for size in sizes:
        parts.append(tf.batch_norm(x[start : start + size], None, None, training=True))
        start += size
    return torch.cat(parts)


@pytest.mark.parametrize(
    ("shape", "virtual", "sizes"),
    [
        ((12, 3, 2, 2), 4, [4, 4, 4]),
        ((10, 3, 2, 2), 4, [4, 4, 2]),
        ((9, 3), 4, [4, 5]),
        ((3, 3), 8, [3]),
    ],
)
def test_ghost_bn_normalizes_each_virtual_batch(shape, virtual, sizes):
    cls = bnn.GhostBatchNorm2d if len(shape) == 4 else bnn.GhostBatchNorm1d
    x = torch.randn(shape, dtype=torch.float64) * 3 + 5
    ghost = cls(3, virtual, momentum=0.5, dtype=torch.float64)
    out = ghost(x)
    torch.testing.assert_close(out, _chunks_reference(x, sizes))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    dims = [0, *range(2, x.dim())]
    means = torch.stack([x[s : s + k].mean(dims) for s, k in zip(starts, sizes, strict=True)]).mean(
        0
    )
    variances = torch.stack(
        [x[s : s + k].var(dims) for s, k in zip(starts, sizes, strict=True)]
    ).mean(0)
    torch.testing.assert_close(ghost.running_mean, 0.5 * means)
    torch.testing.assert_close(ghost.running_var, 0.5 + 0.5 * variances)


def test_ghost_bn_gradients_and_eval():
    x = torch.randn(10, 2, 3, dtype=torch.float64, requires_grad=True)
    ghost = bnn.GhostBatchNorm1d(2, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: ghost(v), (x,))
    ghost.eval()
    plain = bnn.BatchNorm1d(2, dtype=torch.float64).eval()
    plain.load_state_dict(ghost.state_dict())
    torch.testing.assert_close(ghost(x), plain(x))
    assert "virtual_batch_size=4" in repr(ghost)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_ghost_bn_rejects_bad_virtual_batch_size(bad):
    with pytest.raises(ValueError, match="virtual_batch_size: expected a positive integer"):
        bnn.GhostBatchNorm2d(3, bad)


def test_batch_renorm_is_batch_norm_during_warmup():
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1
    renorm = bnn.BatchRenorm2d(3, warmup_steps=10, dtype=torch.float64)
    assert renorm.limits() == (1.0, 0.0)
    torch.testing.assert_close(renorm(x), tf.batch_norm(x, None, None, training=True))


def test_batch_renorm_corrects_with_stopped_gradients():
    torch.manual_seed(0)
    renorm = bnn.BatchRenorm1d(3, momentum=0.1, warmup_steps=0, r_max=2.0, d_max=0.5, r_max_step=1, d_max_step=1, dtype=torch.float64)  # fmt: skip
    with torch.no_grad():
        renorm.running_mean.copy_(torch.tensor([0.0, 5.0, -1.0]))
        renorm.running_var.copy_(torch.tensor([1.0, 0.01, 100.0]))
    mean_before, sigma = renorm.running_mean.clone(), torch.sqrt(renorm.running_var + renorm.eps)
    x = (torch.randn(16, 3, dtype=torch.float64) * 3 + 1).requires_grad_()
    out = renorm(x)
    assert renorm.limits() == (2.0, 0.5)
    mu, std = x.mean(0), torch.sqrt(x.var(0, correction=0) + renorm.eps)
    r = (std / sigma).clamp(0.5, 2.0).detach()
    d = ((mu - mean_before) / sigma).clamp(-0.5, 0.5).detach()
    want = (x - mu) / std * r + d
    torch.testing.assert_close(out, want)
    assert (r != 1).any() and (d.abs() == 0.5).any(), "the clips are active in this example"
    grad = torch.randn(16, 3, dtype=torch.float64)
    got = torch.autograd.grad(out, x, grad)[0]
    torch.testing.assert_close(got, torch.autograd.grad(want, x, grad)[0])
    new_sigma = sigma + 0.1 * (std.detach() - sigma)
    torch.testing.assert_close(renorm.running_var, new_sigma**2 - renorm.eps)
    torch.testing.assert_close(renorm.running_mean, mean_before + 0.1 * (mu.detach() - mean_before))


def test_batch_renorm_schedule():
    renorm = bnn.BatchRenorm2d(2)
    for step, expected in ((0, (1.0, 0.0)), (5000, (1.0, 0.0)), (15000, (1 + 2 * 10000 / 35000, 5 * 10000 / 20000)), (40000, (3.0, 5.0)), (99999, (3.0, 5.0))):  # fmt: skip
        renorm.num_batches_tracked.fill_(step)
        assert renorm.limits() == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"r_max": 0.5}, "r_max: expected a number >= 1"), ({"d_max": -1.0}, "d_max: expected a number >= 0"),
     ({"momentum": None}, "momentum: Batch Renorm needs"), ({"warmup_steps": 50000}, "warmup_steps: expected")],
)  # fmt: skip
def test_batch_renorm_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bnn.BatchRenorm2d(3, **kwargs)


VARIANTS = {
    "ghost": lambda **kw: bnn.GhostBatchNorm2d(2, virtual_batch_size=2, **kw),
    "renorm": lambda **kw: bnn.BatchRenorm2d(2, warmup_steps=0, r_max_step=1, d_max_step=1, **kw),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_do_not_count_refused_batches(variant):
    """As for BatchNorm: a batch refused by nonfinite='raise' or by the one-value check leaves
    num_batches_tracked (and Batch Renorm's schedule) where it was."""
    layer = VARIANTS[variant](nonfinite="raise")
    x = torch.randn(4, 2, 3, 3)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"channel\(s\) \[0\]"):
        layer(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 2, 1, 1))
    assert int(layer.num_batches_tracked) == 0
    torch.testing.assert_close(layer.running_mean, torch.zeros(2))
    torch.testing.assert_close(layer.running_var, torch.ones(2))
    layer(torch.randn(4, 2, 3, 3))
    assert int(layer.num_batches_tracked) == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_pass_an_empty_batch_as_torch_batchnorm_does(variant):
    layer, torch_bn = VARIANTS[variant](), torch.nn.BatchNorm2d(2)
    x = torch.randn(0, 2, 3, 3, requires_grad=True)
    out = layer(x)
    want = torch_bn(x)
    assert out.shape == want.shape == (0, 2, 3, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert int(layer.num_batches_tracked) == int(torch_bn.num_batches_tracked)
    torch.testing.assert_close(layer.running_mean, torch_bn.running_mean)
    torch.testing.assert_close(layer.running_var, torch_bn.running_var)


@pytest.mark.parametrize("variant", ["ghost", "renorm"])
def test_variants_compile_once_for_every_step(variant):
    """Batch Renorm's schedule is computed from num_batches_tracked as a tensor: compiled code
    does not specialize on the step (it recompiled at every step when the step was read as an
    int). Compiled and eager steps agree."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    make = {"ghost": lambda: bnn.GhostBatchNorm2d(2, virtual_batch_size=2),
            "renorm": lambda: bnn.BatchRenorm2d(2, warmup_steps=1, r_max_step=5, d_max_step=5)}[variant]  # fmt: skip
    eager, compiled_layer = make(), make()
    compiled = torch.compile(compiled_layer, backend=backend)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 2, 3, 3, generator=gen) * 2 + 1 for _ in range(7)]
    for step, x in enumerate(batches):
        torch.testing.assert_close(compiled(x), eager(x))
        if step == 0:
            first = len(graphs)
    assert len(graphs) == first, f"recompiled: {first} graphs after one step, {len(graphs)} after seven"  # fmt: skip
    if variant == "renorm":
        assert eager.limits() == compiled_layer.limits() == (3.0, 5.0)
    torch.testing.assert_close(compiled_layer.running_var, eager.running_var)
    assert int(compiled_layer.num_batches_tracked) == int(eager.num_batches_tracked) == 7


@pytest.mark.parametrize(("layer", "shape"), [(lambda: bnn.GhostBatchNorm1d(3, virtual_batch_size=1), (8, 3)), (lambda: bnn.GhostBatchNorm2d(3, virtual_batch_size=1), (8, 3, 1, 1))])  # fmt: skip
def test_ghost_bn_refuses_virtual_batches_of_one_value(layer, shape):
    """One value per channel per virtual batch would normalize everything to 0 and drive the
    running variance to 0: refused, naming virtual_batch_size, and not counted."""
    ghost = layer()
    with pytest.raises(ValueError, match="virtual_batch_size: expected virtual batches of more than 1 value per channel"):  # fmt: skip
        ghost(torch.randn(shape))
    assert int(ghost.num_batches_tracked) == 0
    torch.testing.assert_close(ghost.running_var, torch.ones(3))
