"""Each experiment in a tiny configuration; verdict logic; runner files; report; CLI."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.lab.experiments import (
    REGISTRY,
    batch_size,
    convergence,
    grad_histograms,
    init_sweep,
    initializers,
    input_normalization,
    loss_landscape,
    lr_sweep,
    mnist_cnn,
    momentum,
    placement,
    train_eval_gap,
    whitening_cost,
)
from bnlab.lab.report import build_report
from bnlab.lab.runner import latest_runs, load_run, run_experiment

TINY = {
    "convergence": {
        "data": "spirals",
        "hidden": (8, 8, 8),
        "steps": 40,
        "eval_every": 10,
        "num_seeds": 1,
        "probe_examples": 50,
    },
    "init-sweep": {
        "data": "spirals",
        "hidden": (8, 8, 8, 8, 8),
        "num_scales": 3,
        "steps": 20,
        "num_seeds": 2,
        "max_train": 200,
    },
    "mnist-cnn": {"channels": (4,), "hidden": 8, "epochs": 2, "num_seeds": 1, "max_train": 200},
    "train-eval-gap": {"hidden": (16,), "steps": 30, "num_seeds": 2, "recalibration_batches": 3},
    "initializers": {"width": 16, "batch": 64, "num_seeds": 2},
    "input-normalization": {"samples": 100, "max_steps": 300, "num_seeds": 2},
    "whitening-cost": {"widths": (8, 16), "batch": 32, "repeats": 1, "num_seeds": 2},
    "grad-histograms": {"depth": 6, "width": 16, "batch": 32, "num_seeds": 2},
    "momentum": {
        "momenta": (0.1, 0.9),
        "batch_sizes": (4, 16),
        "hidden": (8,),
        "examples": 64,
        "num_seeds": 2,
    },
    "lr-sweep": {"learning_rates": (0.01, 1.0), "hidden": (8,), "steps": 10, "num_seeds": 2},
    "placement": {"channels": (4,), "steps": 10, "num_seeds": 2},
    "loss-landscape": {
        "hidden": (8, 8),
        "steps": 20,
        "probe_every": 10,
        "probe_batch": 32,
        "step_sizes": (0.5, 1.0),
        "num_seeds": 2,
    },
    "batch-size": {
        "batch_sizes": (2, 16),
        "norms": ("bn", "renorm", "gn"),
        "channels": (4,),
        "epochs": 1,
        "num_seeds": 1,
        "max_train": 64,
    },
}


def test_every_registered_experiment_has_a_tiny_config():
    assert set(TINY) == set(REGISTRY)
    for experiment in REGISTRY.values():
        assert experiment.claim and experiment.full_runtime
        assert experiment.make_config(quick=True) != experiment.make_config(quick=False)


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_runs_and_writes_everything(tmp_path, name):
    run_dir = run_experiment(name, root=tmp_path, progress=False, echo=None, **TINY[name])
    for file in ("config.json", "metrics.json", "log.txt"):
        assert (run_dir / file).is_file()
    assert list(run_dir.glob("*.png")), "plots are drawn"
    assert not list(run_dir.glob(".*.tmp")), "no temporary files left"
    config, saved = load_run(run_dir)
    assert config["experiment"] == name and config["mode"] == "quick"
    assert saved["verdict"]["summary"] and saved["verdict"]["supported"] in (True, False, None)
    assert "verdict:" in (run_dir / "log.txt").read_text()
    metrics = saved["metrics"]
    if "arms" in metrics and name not in ("placement", "loss-landscape"):
        assert set(metrics["arms"]) == {"baseline", "bn"}
    if name == "convergence":
        run = metrics["arms"]["bn"][0]
        assert run["eval_steps"] == [10, 20, 30, 40]
        assert np.array(run["unit0_percentiles"]).shape == (4, 3)
    if name == "init-sweep":
        assert len(metrics["scales"]) == 3
        assert np.array(metrics["arms"]["bn"]["train_acc"]).shape == (2, 3)
    if name == "mnist-cnn":
        assert len(metrics["arms"]["bn"][0]["val_loss"]) == 2
    if name == "initializers":
        assert len(metrics["after"]["he_normal"]["std"]) == 2
        assert abs(metrics["after"]["he_normal"]["std"][0] - 1) < 0.05
    if name == "input-normalization":
        assert len(metrics["variants"]["whitened"]) == 2
    if name == "whitening-cost":
        assert np.array(metrics["whiten_s"]).shape == (2, 2)
    if name == "grad-histograms":
        assert len(metrics["arms"]["bn"][0]["histogram"]) == 60
    if name == "momentum":
        assert np.array(metrics["gap"]).shape == (2, 2, 2)
    if name == "lr-sweep":
        assert np.array(metrics["arms"]["bn"]["val_acc"]).shape == (2, 2)
    if name == "placement":
        assert set(metrics["arms"]) == {"before", "after", "before+dropout", "after+dropout"}
    if name == "loss-landscape":
        assert set(metrics["arms"]) == {"baseline", "bn", "noisy-bn"}
        assert len(metrics["arms"]["noisy-bn"][1]["beta"]) == 2
    if name == "batch-size":
        assert np.array(metrics["accuracy"]["gn"]).shape == (1, 2)
    if name == "train-eval-gap":
        assert [r["seed"] for r in metrics["runs"]] == [0, 1]
        assert all(0 <= r["eval_acc_after"] <= 1 for r in metrics["runs"])


def test_same_command_twice_gives_same_numbers(tmp_path):
    a = run_experiment(
        "convergence", root=tmp_path / "a", progress=False, echo=None, **TINY["convergence"]
    )
    b = run_experiment(
        "convergence", root=tmp_path / "b", progress=False, echo=None, **TINY["convergence"]
    )
    assert (
        json.loads((a / "metrics.json").read_text())["metrics"]
        == json.loads((b / "metrics.json").read_text())["metrics"]
    )


def _convergence_metrics(base_acc, bn_acc, base_drift, bn_drift):
    steps = list(range(10, 10 * len(base_acc) + 1, 10))
    run = lambda acc, drift: {"eval_steps": steps, "val_acc": acc, "drift": drift}  # noqa: E731
    return {"arms": {"baseline": [run(base_acc, base_drift)], "bn": [run(bn_acc, bn_drift)]}}


def test_convergence_verdict():
    faster = _convergence_metrics(
        [0.2, 0.4, 0.6, 0.7, 0.7, 0.7], [0.6, 0.8, 0.9, 0.9, 0.9, 0.9], 5.0, 1.0
    )
    verdict = convergence.verdict(faster)
    assert verdict.supported and "in 2.0× fewer steps" in verdict.summary
    drifting = _convergence_metrics(
        [0.2, 0.4, 0.6, 0.7, 0.7, 0.7], [0.6, 0.8, 0.9, 0.9, 0.9, 0.9], 1.0, 5.0
    )
    assert convergence.verdict(drifting).supported is False
    slower = _convergence_metrics([0.7] * 6, [0.1, 0.2, 0.3, 0.5, 0.7, 0.7], 5.0, 1.0)
    verdict = convergence.verdict(slower)
    assert verdict.supported is False and "not faster" in verdict.summary


def test_init_sweep_verdict():
    scales = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    wide = {
        "scales": scales,
        "arms": {
            "baseline": {"train_acc": [[0.1, 0.1, 0.1, 0.9, 0.8]]},
            "bn": {"train_acc": [[0.9] * 5]},
        },
    }
    verdict = init_sweep.verdict(wide)
    assert verdict.supported and "BN 5 (1e-04–1e+00), baseline 2 (1e-01–1e+00)" in verdict.summary
    narrow = {
        "scales": scales,
        "arms": {
            "baseline": {"train_acc": [[0.9, 0.9, 0.9, 0.9, 0.8]]},
            "bn": {"train_acc": [[0.9] * 5]},
        },
    }
    assert init_sweep.verdict(narrow).supported is False


def test_mnist_cnn_verdict():
    run = lambda loss, acc: {"epochs": [1, 2, 3, 4], "val_loss": loss, "test_acc": acc}  # noqa: E731
    metrics = {
        "arms": {
            "baseline": [run([1.0, 0.5, 0.3, 0.2], 0.95)],
            "bn": [run([0.3, 0.2, 0.1, 0.1], 0.97)],
        }
    }
    verdict = mnist_cnn.verdict(metrics)
    assert verdict.supported and "2.0× fewer epochs" in verdict.summary
    metrics["arms"]["bn"][0]["test_acc"] = 0.90
    assert mnist_cnn.verdict(metrics).supported is False


def test_train_eval_gap_verdict():
    def run(train, before, after):
        return {"train_mode_acc": train, "eval_acc_before": before, "eval_acc_after": after}

    recovered = {"batch_size": 4, "bn_momentum": 0.9, "runs": [run(0.95, 0.85, 0.95)]}
    verdict = train_eval_gap.verdict(recovered)
    assert (
        verdict.supported and "10.0% below" in verdict.summary and "0.0% after" in verdict.summary
    )
    no_gap = {"batch_size": 64, "bn_momentum": 0.1, "runs": [run(0.95, 0.95, 0.95)]}
    assert train_eval_gap.verdict(no_gap).supported is False
    not_recovered = {"batch_size": 4, "bn_momentum": 0.9, "runs": [run(0.95, 0.85, 0.88)]}
    assert train_eval_gap.verdict(not_recovered).supported is False


def test_batch_size_verdict():
    sizes = [2, 4, 16, 32, 128]
    wu_he = {"batch_sizes": sizes, "accuracy": {
        "bn": [[0.60, 0.85, 0.93, 0.93, 0.80]], "gn": [[0.90, 0.90, 0.91, 0.91, 0.70]],
        "renorm": [[0.80, 0.88, 0.93, 0.93, 0.75]]}}  # fmt: skip
    verdict = batch_size.verdict(wu_he)
    assert verdict.supported and "BN loses 33.0%" in verdict.summary
    flat_bn = {"batch_sizes": sizes, "accuracy": {**wu_he["accuracy"], "bn": [[0.93] * 5]}}
    assert batch_size.verdict(flat_bn).supported is False
    assert (
        batch_size.verdict({"batch_sizes": sizes, "accuracy": {"bn": [[0.9] * 5]}}).supported
        is None
    )


def test_science_verdicts():
    flat = {"before": {"a": {"std": [100.0]}, "b": {"std": [1.0]}, "zeros": {"std": [0.0]}},
            "after": {"a": {"std": [1.0]}, "b": {"std": [0.999]}, "zeros": {"std": [0.0]}}}  # fmt: skip
    assert initializers.verdict(flat).supported
    flat["after"]["a"]["std"] = [3.0]
    assert initializers.verdict(flat).supported is False
    runs = {"raw": [{"steps": 5000}], "standardized": [{"steps": 100}], "whitened": [{"steps": 1}]}
    assert input_normalization.verdict({"variants": runs, "max_steps": 20000}).supported
    runs["standardized"] = [{"steps": 4000}]
    assert input_normalization.verdict({"variants": runs, "max_steps": 20000}).supported is False
    cost = {"widths": [10, 100], "batch": 8, "standardize_s": [[1.0], [10.0]], "whiten_s": [[1.0], [1000.0]],
            "standardize_offdiag": [[0.5], [0.5]], "whiten_offdiag": [[0.0], [0.0]]}  # fmt: skip
    verdict = whitening_cost.verdict(cost)
    assert verdict.supported and "d^1.00" in verdict.summary and "d^3.00" in verdict.summary
    grads = {"depth": 50, "arms": {"baseline": [{"norm": 1e3, "kurtosis": 20.0}], "bn": [{"norm": 1.0, "kurtosis": 0.5}]}}  # fmt: skip
    assert grad_histograms.verdict(grads).supported
    grads["arms"]["baseline"][0]["norm"] = 2.0
    assert grad_histograms.verdict(grads).supported is False


def test_training_science_verdicts():
    gap = {"momenta": [0.1, 0.9], "batch_sizes": [4, 64], "gap": [[[0.0, 0.0], [0.10, 0.01]]]}
    assert (
        momentum.verdict(gap).supported and "10.0% at momentum 0.9" in momentum.verdict(gap).summary
    )
    gap["gap"] = [[[0.0, 0.0], [0.01, 0.0]]]
    assert momentum.verdict(gap).supported is False
    sweep = {"learning_rates": [0.01, 0.1, 1.0], "arms": {
        "baseline": {"val_acc": [[0.9, 0.95, 0.0]]}, "bn": {"val_acc": [[0.9, 0.95, 0.97]]}}}  # fmt: skip
    verdict = lr_sweep.verdict(sweep)
    assert verdict.supported and "does not: 1" in verdict.summary
    sweep["arms"]["bn"]["val_acc"] = [[0.97, 0.95, 0.9]]
    assert lr_sweep.verdict(sweep).supported is False
    close = {"arms": {"before": [0.95, 0.96, 0.97], "after": [0.96, 0.955, 0.95], "before+dropout": [0.9], "after+dropout": [0.9]}}  # fmt: skip
    assert placement.verdict(close).supported
    far = {"arms": {**close["arms"], "after": [0.80, 0.81, 0.80]}}
    verdict = placement.verdict(far)
    assert verdict.supported is False and "Before the activation wins by 16.0%" in verdict.summary


def test_loss_landscape_verdict():
    def run(loss_range, beta, acc):
        return {
            "loss_range": [9.0, loss_range],
            "grad_change": [9.0, 1.0],
            "beta": [9.0, beta],
            "val_acc": [acc],
        }

    smooth = {"arms": {"baseline": [run(2.0, 10.0, 0.95)], "bn": [run(0.1, 2.0, 0.98)], "noisy-bn": [run(0.2, 3.0, 0.975)]}}  # fmt: skip
    assert loss_landscape.verdict(smooth).supported
    smooth["arms"]["noisy-bn"] = [run(0.2, 3.0, 0.90)]
    assert loss_landscape.verdict(smooth).supported is False


def test_noisy_shift_is_off_in_eval():
    layer = loss_landscape.NoisyShift(0.5)
    x = torch.randn(4, 3)
    assert torch.equal(layer.eval()(x), x) and not torch.equal(layer.train()(x), x)


def test_interrupt_keeps_config_and_log_but_writes_no_metrics(tmp_path, monkeypatch):
    def interrupted(config, ctx):
        ctx.log("working")
        raise KeyboardInterrupt

    monkeypatch.setitem(
        REGISTRY, "convergence", dataclasses.replace(REGISTRY["convergence"], run=interrupted)
    )
    with pytest.raises(KeyboardInterrupt):
        run_experiment("convergence", root=tmp_path, progress=False, echo=None)
    (run_dir,) = (tmp_path / "convergence").iterdir()
    assert (run_dir / "config.json").is_file() and not (run_dir / "metrics.json").exists()
    assert "interrupted" in (run_dir / "log.txt").read_text()
    assert latest_runs(tmp_path) == []


def test_report_rebuilds_from_metrics_without_retraining(tmp_path):
    run_dir = run_experiment(
        "init-sweep", root=tmp_path, progress=False, echo=None, **TINY["init-sweep"]
    )
    for png in run_dir.glob("*.png"):
        png.unlink()
    report = build_report([run_dir], tmp_path / "report.html")
    page = report.read_text()
    assert "data:image/png;base64," in page and "init-sweep" in page
    assert any(label in page for label in ("supported", "inconclusive"))
    assert list(run_dir.glob("*.png")), "plots redrawn from saved metrics"
    with pytest.raises(ValueError, match="expected at least one run directory"):
        build_report([], tmp_path / "r.html")
    with pytest.raises(FileNotFoundError, match="not a bnlab run directory"):
        build_report([tmp_path], tmp_path / "r.html")


def test_cli_list_run_and_report(tmp_path):
    runner = CliRunner()
    listing = runner.invoke(app, ["list"])
    assert listing.exit_code == 0 and "init-sweep" in listing.output
    result = runner.invoke(
        app, ["run", "mnist-cnn", "--out", str(tmp_path), "--no-progress", "--data", "digits"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").is_file() and "verdict:" in result.output
    rebuilt = runner.invoke(
        app, ["report", "--out", str(tmp_path), "-o", str(tmp_path / "again.html")]
    )
    assert rebuilt.exit_code == 0 and (tmp_path / "again.html").is_file()
    bad = runner.invoke(app, ["run", "nope", "--out", str(tmp_path)])
    assert bad.exit_code != 0 and "unknown experiment" in bad.output
    missing = runner.invoke(
        app,
        [
            "run",
            "mnist-cnn",
            "--out",
            str(tmp_path),
            "--data",
            "mnist",
            "--data-dir",
            str(tmp_path / "none"),
        ],
    )
    # rich wraps at the console width: compare with the line breaks taken out
    assert missing.exit_code == 2 and "data_dir is not a directory" in " ".join(missing.output.split())  # fmt: skip
