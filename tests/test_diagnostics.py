"""Activation/gradient recording and the BatchNorm health check."""

import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.diagnostics import bn_health, format_health, record


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), bnn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3)
    )


def test_record_sees_activations_and_gradients_then_removes_its_hooks():
    model = _model()
    x = torch.randn(32, 6) * 3
    with record(model) as stats:
        model(x).pow(2).sum().backward()
        model(x)
    assert set(stats) == {"0", "1", "3", "4"}
    bn = stats["1"]
    assert len(bn.activation_mean) == 2 and abs(bn.activation_mean[0]) < 1e-5
    assert bn.activation_std[0] == pytest.approx(1.0, abs=0.05)
    assert len(bn.activation_percentiles[0]) == 5
    assert len(bn.gradient_norm) == 1
    hidden = model[:2](x)  # the gradient the hook saw: d loss / d (output of BN "1")
    hidden.retain_grad()
    model[2:](hidden).pow(2).sum().backward()
    assert bn.gradient_norm[0] == pytest.approx(hidden.grad.norm().item(), rel=1e-6)
    counts, edges = bn.gradient_histograms[0]
    assert sum(counts) == 32 * 8 and len(edges) == len(counts) + 1
    assert all(not m._forward_hooks for m in model.modules()), "no hooks left behind"


def test_bn_health_flags_discrepancy_dead_and_nonfinite_channels():
    model = _model().train()
    for _ in range(30):
        model(torch.randn(64, 6))
    healthy = bn_health(model, [torch.randn(64, 6) for _ in range(3)])
    assert [h.name for h in healthy] == ["1", "4"] and all(h.ok for h in healthy)
    shifted = bn_health(model, [torch.randn(64, 6) * 10 + 5 for _ in range(3)])
    assert not shifted[0].ok and (shifted[0].mean_shift > 1 or shifted[0].var_ratio > 4)
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[0].bias[2] = 1.0
        model[1].running_var[5] = float("nan")
    sick = bn_health(model, [torch.randn(64, 6)])
    assert sick[0].dead_channels == 1 and sick[0].nonfinite_running == 1 and not sick[0].ok
    table = format_health(sick)
    assert "CHECK" in table and "mean shift" in table
    assert model.training, "the mode is restored"


def test_bn_health_works_on_torch_models_and_rejects_bad_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert len(bn_health(model, [torch.randn(2, 3, 8, 8)])) == 1
    with pytest.raises(ValueError, match="expected BatchNorm layers with running statistics"):
        bn_health(nn.Linear(2, 2), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="batches: expected at least one batch"):
        bn_health(model, [])


def _conv_net(momentum):
    layers = []
    for cin in (3, 8, 8):
        layers += [nn.Conv2d(cin, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU()]  # fmt: skip
    return nn.Sequential(*layers)


def _batches(count, seed, scale=3.0, offset=2.0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=generator) * scale + offset for _ in range(count)]


def test_bn_health_tells_unconverged_statistics_from_a_mismatch():
    torch.manual_seed(0)
    model = _conv_net(momentum=0.1).train()
    with torch.no_grad():
        for batch in _batches(5, seed=1):  # 5 steps on the data checked below: matched data
            model(batch)
    report = bn_health(model, _batches(3, seed=2))
    flagged = [h for h in report if not h.ok]
    assert flagged, "5 batches at momentum 0.1 leave 59% of the initial statistics"
    assert all(h.cause == "unconverged" for h in flagged), [(h.name, h.cause, h.reason) for h in flagged]  # fmt: skip
    assert "5 batch(es) tracked at momentum 0.1 leave 59%" in flagged[0].reason
    assert abs(report[0].initial_weight - 0.9**5) < 1e-12 and report[0].batches_tracked == 5
    assert "UNCONVERGED" in format_health(report) and "MISMATCH" not in format_health(report)


@pytest.mark.parametrize("momentum", [None, 0.5])  # converged: (1 - 0.5)^10 < 0.1 %
def test_bn_health_names_a_real_train_eval_mismatch(momentum):
    torch.manual_seed(0)
    model = _conv_net(momentum=momentum).train()
    with torch.no_grad():
        for batch in _batches(10, seed=1):
            model(batch)
    matched = bn_health(model, _batches(3, seed=2))
    assert all(h.ok and h.cause == "" for h in matched)
    shifted = bn_health(model, _batches(3, seed=2, scale=3.0, offset=12.0))
    assert not shifted[0].ok and shifted[0].cause == "mismatch"
    assert "train/eval mismatch" in shifted[0].reason
    assert "MISMATCH" in format_health(shifted)
