"""fold_batchnorm, freeze_batchnorm, recalibrate on the test models; bad input."""

import pytest
import torch
from torch import nn

from bnlab import nn as bnn
from bnlab.inference import (
    FrozenBatchNorm2d,
    fold_batchnorm,
    freeze_batchnorm,
    is_batchnorm,
    recalibrate,
)
from bnlab.reference import population_statistics
from inference_models import SmallResNet, Tricky, Untraceable, mlp, trained

CASES = {
    "resnet": (SmallResNet, (4, 3, 16, 16)),
    "mlp": (mlp, (6, 10)),
    "untraceable": (Untraceable, (4, 2, 7)),
}


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_folded_model_matches_and_has_no_foldable_bn(name):
    make, shape = CASES[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    model = trained(make(), x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    with torch.no_grad():
        assert _relative(folded(x), model(x)) < 1e-5
    report = folded.fold_report
    remaining = [n for n, m in folded.named_modules() if is_batchnorm(m)]
    assert sorted(remaining) == sorted(bn for bn, _ in report.kept), "every BN left is explained"
    assert report.folded, "something was folded"
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value), "the original model is unchanged"
    assert not folded.training


def test_resnet_report_names_the_bn_after_an_activation():
    x = torch.randn(2, 3, 16, 16)
    folded = fold_batchnorm(trained(SmallResNet(), x))
    report = folded.fold_report
    assert report.method == "torch.fx"
    assert len(report.folded) == 5  # stem + 2 blocks × 2
    assert [bn for bn, _ in report.kept] == ["after_relu"]
    assert "not a module" in report.kept[0][1] or "not a convolution" in report.kept[0][1]
    assert "folded 5 BatchNorm layer(s)" in str(report)


def test_untraceable_model_falls_back_to_sequential_walk():
    x = torch.randn(4, 2, 7)
    folded = fold_batchnorm(trained(Untraceable(), x))
    assert folded.fold_report.method.startswith("nn.Sequential walk")
    assert len(folded.fold_report.folded) == 2


def test_tricky_model_keeps_what_cannot_be_folded():
    x = torch.randn(2, 3, 5, 5)
    model = trained(Tricky(), x)
    folded = fold_batchnorm(model)
    reasons = dict(folded.fold_report.kept)
    assert set(reasons) == {"input_bn", "shared", "bn_c"}
    assert "not a module" in reasons["input_bn"]
    assert "called 2 times" in reasons["shared"]
    assert "feeds 2 consumers" in reasons["bn_c"]
    with torch.no_grad():
        assert _relative(folded(x), model(x)) < 1e-5


def test_fold_warns_for_training_mode_and_rejects_models_without_bn():
    with pytest.warns(UserWarning, match="training mode"):
        fold_batchnorm(mlp().train())
    with pytest.raises(ValueError, match="expected at least one BatchNorm layer to fold"):
        fold_batchnorm(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module"):
        fold_batchnorm("model.pt")


def test_untracked_bn_is_not_folded():
    model = nn.Sequential(nn.Linear(4, 4), bnn.BatchNorm1d(4, track_running_stats=False)).eval()
    folded = fold_batchnorm(model)
    assert "track_running_stats=False" in folded.fold_report.kept[0][1]


def test_freeze_is_state_dict_compatible_and_fixed():
    x = torch.randn(4, 3, 16, 16)
    model = trained(SmallResNet(), x)
    frozen = freeze_batchnorm(model)
    assert isinstance(frozen.stem[1], FrozenBatchNorm2d) and isinstance(
        model.stem[1], nn.BatchNorm2d
    )
    assert list(frozen.state_dict()) == list(model.state_dict())
    frozen.train()
    stats = frozen.stem[1].running_mean.clone()
    out = frozen(x)
    assert torch.equal(frozen.stem[1].running_mean, stats), "no statistics update in training mode"
    with torch.no_grad():
        assert _relative(out, model(x)) < 1e-6
    assert not any(
        p.requires_grad for n, p in frozen.named_parameters() if "bn" in n or "after_relu" in n
    )
    assert all(not isinstance(b, torch.nn.Parameter) for b in frozen.stem[1].buffers())
    model.load_state_dict(frozen.state_dict())  # and back
    x.requires_grad_()
    frozen(x).sum().backward()
    x_eval = x.detach().clone().requires_grad_()
    model(x_eval).sum().backward()  # the eval-mode model: the same affine maps
    assert _relative(x.grad, x_eval.grad) < 1e-5
    in_place = freeze_batchnorm(model, inplace=True)
    assert in_place is model and isinstance(model.stem[1], FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="expected at least one BatchNorm layer to freeze"):
        freeze_batchnorm(nn.Linear(2, 2))


def test_recalibrate_uses_the_population_estimator():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), bnn.BatchNorm1d(4, momentum=0.9), nn.Dropout(0.5)
    ).train()
    batches = [torch.randn(8, 3) * (i + 1) for i in range(6)]
    for batch in batches:  # high momentum: running stats track only the last batches
        model(batch)
    model.eval()
    recalibrate(model, batches, progress=False)
    with torch.no_grad():
        z = [model[0](b) for b in batches]
    means = torch.stack([t.mean(0) for t in z]).numpy()
    variances = torch.stack([t.var(0, correction=0) for t in z]).numpy()
    want_mean, want_var = population_statistics(means, variances, batch_size=8)
    torch.testing.assert_close(
        model[1].running_mean.double(), torch.from_numpy(want_mean), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        model[1].running_var.double(), torch.from_numpy(want_var), rtol=1e-5, atol=1e-6
    )
    assert not model.training and not model[2].training and model[1].momentum == 0.9
    weights = model[0].weight.clone()
    recalibrate(model, ((b, None) for b in batches), num_batches=2, progress=False)
    assert torch.equal(model[0].weight, weights)


def test_recalibrate_bad_input_keeps_statistics():
    model = mlp().eval()
    before = model[1].running_mean.clone()
    with pytest.raises(
        ValueError, match="batches: expected at least one batch, the iterator was empty"
    ):
        recalibrate(model, iter([]), progress=False)
    assert torch.equal(model[1].running_mean, before)
    with pytest.raises(ValueError, match="expected BatchNorm layers with running statistics"):
        recalibrate(nn.Linear(2, 2), [torch.randn(2, 2)], progress=False)
    with pytest.raises(ValueError, match="num_batches: expected a positive integer"):
        recalibrate(model, [torch.randn(2, 10)], num_batches=0, progress=False)


def test_export_onnx_runs_in_onnxruntime(tmp_path):
    from bnlab.inference import export_onnx, run_onnx

    x = torch.randn(4, 3, 16, 16)
    model = trained(SmallResNet(), x)
    path = export_onnx(model, x, tmp_path / "model.onnx")
    bigger = torch.randn(7, 3, 16, 16)  # the batch dimension is dynamic
    with torch.no_grad():
        assert _relative(run_onnx(path, bigger), model(bigger)) < 1e-5
    frozen = freeze_batchnorm(trained(mlp(), torch.randn(6, 10)))
    path = export_onnx(frozen, torch.randn(2, 10), tmp_path / "mlp.onnx", fold=False)
    five = torch.randn(5, 10)
    with torch.no_grad():
        assert _relative(run_onnx(path, five), frozen(five)) < 1e-5
    with pytest.raises(TypeError, match="example: expected an input Tensor"):
        export_onnx(model, [1, 2], tmp_path / "x.onnx")


def test_time_inference_is_the_median_after_warm_up(monkeypatch):
    import bnlab.inference.timing as timing

    warm_up = [0.0, 1.0, 2.0]  # a warm-up pass reads the clock once (its start)
    timed = [(10.0, 0.004), (20.0, 0.001), (30.0, 0.003), (40.0, 0.002), (50.0, 0.005)]
    stamps = iter(warm_up + [t for start, d in timed for t in (start, start + d)])

    def fake_clock():
        return next(stamps)

    monkeypatch.setattr(timing, "perf_counter", fake_clock)
    calls = []
    model = nn.Linear(2, 2).train()
    model.register_forward_hook(lambda module, _i, _o: calls.append(module.training))
    assert timing.time_inference(model, torch.randn(1, 2), repeats=5) == pytest.approx(3.0)
    assert calls == [False] * 8, "eval mode, 3 warm-up + 5 timed passes"


def test_cli_fold_full_model_torchscript_and_bad_files(tmp_path):
    from typer.testing import CliRunner

    from bnlab.cli import app
    from bnlab.inference import to_torch_batchnorm

    runner = CliRunner()
    x = torch.randn(4, 3, 16, 16)
    model = trained(SmallResNet(), x)
    torch.save(model, tmp_path / "model.pt")
    result = runner.invoke(
        app,
        ["fold", str(tmp_path / "model.pt"), "-o", str(tmp_path / "folded.pt"), "--trust-file"],
    )
    assert result.exit_code == 0, result.output
    assert "folded 5 BatchNorm layer(s)" in result.output and "kept after_relu" in result.output
    folded = torch.load(tmp_path / "folded.pt", weights_only=False)
    with torch.no_grad():
        assert _relative(folded(x), model(x)) < 1e-5

    scripted = torch.jit.script(to_torch_batchnorm(trained(mlp(), torch.randn(6, 10))))
    scripted.save(str(tmp_path / "script.pt"))
    result = runner.invoke(app, ["fold", str(tmp_path / "script.pt"), "-o", str(tmp_path / "s.pt"), "--input-shape", "4,10"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 batch_norm op(s) before, 0 after" in result.output

    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "notes.txt").write_text("hello")
    for name, message in (("weights.pt", "holds a dict (a state_dict?)"), ("notes.txt", "not a PyTorch model file"), ("none.pt", "file not found")):  # fmt: skip
        result = runner.invoke(app, ["fold", str(tmp_path / name), "-o", str(tmp_path / "out.pt")])
        # rich wraps at the console width: compare with the line breaks taken out
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_freeze_picks_the_frozen_class_by_dims_not_by_name():
    x = torch.randn(4, 3, 5, 5)
    model = trained(nn.Sequential(nn.Conv2d(3, 4, 1), bnn.SyncBatchNorm(4)), x)
    frozen = freeze_batchnorm(model)
    with torch.no_grad():  # a SyncBatchNorm takes any rank: so does its frozen form
        assert _relative(frozen(x), model(x)) < 1e-6
    converted = bnn.convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4), bnn.BatchNorm1d(4)))
    assert type(freeze_batchnorm(converted)[1]).__name__ == "FrozenBatchNorm1d"
    assert type(freeze_batchnorm(bnn.GhostBatchNorm2d(4, 2))).__name__ == "FrozenBatchNorm2d"


def test_to_torch_batchnorm_keeps_the_dims():
    from bnlab.inference import to_torch_batchnorm

    x = torch.randn(6, 3)
    model = trained(nn.Sequential(nn.Linear(3, 4), bnn.GhostBatchNorm1d(4, 2), bnn.SyncBatchNorm(4)), x)  # fmt: skip
    with pytest.raises(ValueError, match="example: 2 \\(SyncBatchNorm\\) takes any input rank"):
        to_torch_batchnorm(model)
    torched = to_torch_batchnorm(model, x)
    assert type(torched[1]) is nn.BatchNorm1d and type(torched[2]) is nn.BatchNorm1d
    with torch.no_grad():
        assert _relative(torched(x), model(x)) < 1e-6


def test_a_bug_in_pair_discovery_is_not_hidden_by_the_sequential_fallback(monkeypatch):
    import bnlab.inference.pairs as pairs

    def broken(*_args):
        raise RuntimeError("a bug in the analysis of the traced graph")

    monkeypatch.setattr(pairs, "pairs_from_graph", broken)
    with pytest.raises(RuntimeError, match="a bug in the analysis"):
        fold_batchnorm(trained(mlp(), torch.randn(6, 10)))


def test_the_report_says_why_fx_was_not_used():
    folded = fold_batchnorm(trained(Untraceable(), torch.randn(4, 2, 7)))
    report = folded.fold_report
    assert report.fx_error.startswith("TraceError: symbolically traced variables cannot be used as inputs to control flow")  # fmt: skip
    assert "torch.fx could not trace the model (TraceError" in str(report)
    assert fold_batchnorm(trained(mlp(), torch.randn(6, 10))).fold_report.fx_error == ""


def test_trusted_file_whose_class_is_not_importable_says_so(tmp_path, monkeypatch):
    import importlib
    import sys

    from bnlab.inference.foldfile import load_model

    (tmp_path / "usermodel.py").write_text(
        "import torch\nclass Net(torch.nn.Sequential):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    net = importlib.import_module("usermodel").Net(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
    )
    torch.save(net, tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "usermodel")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    with pytest.raises(
        ValueError, match=r"class cannot be imported here \(ModuleNotFoundError.*PYTHONPATH"
    ):
        load_model(tmp_path / "net.pt", trust_file=True)
