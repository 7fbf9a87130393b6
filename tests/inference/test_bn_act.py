"""fold/freeze/recalibrate on BN subclasses whose forward does more than BN (timm's
BatchNormAct2d, bnlab's fused BatchNormAct2d): BN plus what follows, never BN alone."""

import pytest
import torch
from torch import nn

from bn_act_models import BatchNormAct2d, ConvBnAct, FusedResidual, ScaledBatchNorm2d, trained
from bnlab import nn as bnn
from bnlab.inference import FrozenBatchNormAct, fold_batchnorm, freeze_batchnorm, recalibrate
from bnlab.reference import population_statistics


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _input(*shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_fold_keeps_the_activation_of_a_timm_style_bn_act():
    x = _input(4, 3, 8, 8)
    model = trained(ConvBnAct(), x)
    folded = fold_batchnorm(model)
    with torch.no_grad():
        assert _relative(folded(x), model(x)) < 1e-5
    report = folded.fold_report
    assert sorted(bn for bn, _ in report.folded) == ["bn1", "bn2", "bn3"]
    assert report.after == {"bn1": "SiLU(·)", "bn2": "Hardswish(·)"}
    assert "bn1 -> conv1 (kept after BN: SiLU(·))" in str(report)
    assert isinstance(folded.bn1.act, nn.SiLU) and not bnn.is_batchnorm(folded.bn1)


def test_fold_leaves_a_subclass_that_does_more_with_the_reason():
    x = _input(4, 3, 8, 8)
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4)), x)
    folded = fold_batchnorm(model)
    assert folded.fold_report.folded == []
    (name, reason), = folded.fold_report.kept  # fmt: skip
    assert name == "1" and "does more than BN" in reason and "ScaledBatchNorm2d" in reason
    with torch.no_grad():
        assert _relative(folded(x), model(x)) < 1e-6


def test_fold_bnlab_fused_bn_act_with_a_residual():
    x = _input(2, 4, 6, 6)
    model = trained(FusedResidual(), x)
    folded = fold_batchnorm(model)
    assert folded.fold_report.method == "torch.fx"
    assert sorted(bn for bn, _ in folded.fold_report.folded) == ["bn1", "bn2"]
    with torch.no_grad():
        assert _relative(folded(x), model(x)) < 1e-5


def test_freeze_keeps_act_and_drop_and_the_state_dict_keys():
    x = _input(4, 3, 8, 8)
    model = trained(ConvBnAct(drop=0.5), x)
    frozen = freeze_batchnorm(model)
    assert isinstance(frozen.bn1, FrozenBatchNormAct) and isinstance(frozen.bn1.act, nn.SiLU)
    assert isinstance(frozen.bn2.drop, nn.Dropout)
    assert list(frozen.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert _relative(frozen.eval()(x), model(x)) < 1e-6
    with pytest.warns(UserWarning, match=r"left unfrozen: 1: its forward \(ScaledBatchNorm2d\)"):
        freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4)))


def _population(model, batches, layer):
    """Ioffe & Szegedy's estimator of ``layer``'s input, from ``model`` in eval mode with
    every BN normalizing by batch statistics (torch's functional BN: an independent oracle)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    batch_stats = {m: (m.running_mean, m.running_var) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}  # fmt: skip
    try:
        for bn in batch_stats:  # torch's BN then normalizes by batch statistics in eval
            bn.running_mean = bn.running_var = None
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        handle.remove()
        for bn, (mean, var) in batch_stats.items():
            bn.running_mean, bn.running_var = mean, var
    rows = [s.transpose(0, 1).flatten(1).double() for s in seen]
    means = torch.stack([r.mean(1) for r in rows]).numpy()
    variances = torch.stack([r.var(1, correction=0) for r in rows]).numpy()
    return population_statistics(means, variances, batch_size=rows[0].shape[1])


def test_recalibrate_keeps_the_drop_inside_a_bn_act_off():
    batches = [_input(4, 3, 6, 6, seed=i) * 2 + 1 for i in range(5)]
    model = trained(ConvBnAct(drop=0.9), batches[0])
    recalibrate(model, batches, progress=False)
    assert not model.training and not model.bn2.drop.training
    want_mean, want_var = _population(model, batches, model.bn3)
    torch.testing.assert_close(model.bn3.running_mean.double(), torch.from_numpy(want_mean), rtol=1e-5, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(model.bn3.running_var.double(), torch.from_numpy(want_var), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_recalibrate_batch_renorm_keeps_momentum_and_schedule():
    model = nn.Sequential(nn.Linear(3, 4), bnn.BatchRenorm1d(4, warmup_steps=2, r_max_step=4, d_max_step=4))  # fmt: skip
    batches = [_input(8, 3, seed=i) * (i + 1) for i in range(6)]
    for batch in batches:
        model.train()(batch)
    model.eval()
    steps = int(model[1].num_batches_tracked)
    recalibrate(model, batches, progress=False)
    with torch.no_grad():
        z = [model[0](b) for b in batches]
    means = torch.stack([t.mean(0) for t in z]).double().numpy()
    variances = torch.stack([t.var(0, correction=0) for t in z]).double().numpy()
    want_mean, want_var = population_statistics(means, variances, batch_size=8)
    torch.testing.assert_close(model[1].running_mean.double(), torch.from_numpy(want_mean), rtol=1e-5, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(model[1].running_var.double(), torch.from_numpy(want_var), rtol=1e-5, atol=1e-6)  # fmt: skip
    assert model[1].momentum == 0.01 and int(model[1].num_batches_tracked) == steps


def test_bn_act_subclass_is_written_like_timm():  # the test double itself behaves as BN + act
    x = _input(4, 3, 5, 5)
    bn = trained(BatchNormAct2d(3, act_layer=nn.SiLU), x)
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(bn.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bn(x), nn.functional.silu(plain(x)))


def test_freeze_and_recalibrate_bnlab_fused_bn_act_with_a_residual():
    x = _input(2, 4, 6, 6)
    model = trained(FusedResidual(), x)
    frozen = freeze_batchnorm(model)
    assert isinstance(frozen.bn2, FrozenBatchNormAct) and isinstance(frozen.bn2.act, nn.ReLU)
    with torch.no_grad():
        assert _relative(frozen(x), model(x)) < 1e-6
    batches = [_input(2, 4, 6, 6, seed=i) * 2 + 1 for i in range(4)]
    recalibrate(model, batches, progress=False)
    with torch.no_grad():
        z = [model.conv1(b) for b in batches]
    rows = [t.transpose(0, 1).flatten(1).double() for t in z]
    means = torch.stack([r.mean(1) for r in rows]).numpy()
    variances = torch.stack([r.var(1, correction=0) for r in rows]).numpy()
    want_mean, want_var = population_statistics(means, variances, batch_size=rows[0].shape[1])
    torch.testing.assert_close(model.bn1.running_mean.double(), torch.from_numpy(want_mean), rtol=1e-5, atol=1e-6)  # fmt: skip
    torch.testing.assert_close(model.bn1.running_var.double(), torch.from_numpy(want_var), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_export_without_folding_keeps_bn_act_modules(tmp_path):
    from bnlab.inference import export_onnx, run_onnx, to_torch_batchnorm

    x = _input(4, 3, 8, 8)
    frozen = freeze_batchnorm(trained(ConvBnAct(), x))
    torched = to_torch_batchnorm(frozen)
    assert type(torched.bn1.bn) is nn.BatchNorm2d and isinstance(torched.bn1.after.act, nn.SiLU)
    path = export_onnx(frozen, x, tmp_path / "frozen.onnx", fold=False)
    with torch.no_grad():
        assert _relative(run_onnx(path, x), frozen(x)) < 1e-5
    residual_input = _input(2, 4, 6, 6)
    fused = trained(FusedResidual(), residual_input)
    path = export_onnx(fused, residual_input, tmp_path / "fused.onnx", fold=False)
    with torch.no_grad():
        assert _relative(run_onnx(path, residual_input), fused(residual_input)) < 1e-5
