"""Each experiment in a tiny configuration; verdict logic; runner files; report; CLI."""

import dataclasses
import html
import json
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.lab import data
from bnlab.lab.experiments import (
    REGISTRY,
    init_sweep,
    loss_landscape,
    mnist_cnn,
    train_eval_gap,
    whitening_cost,
)
from bnlab.lab.report import QUICK_RULE, TIMING_RULE, build_report
from bnlab.lab.runner import latest_runs, load_run, run_experiment

TINY = {
    "convergence": {"data": "spirals", "hidden": (8, 8, 8), "steps": 40, "eval_every": 10,
                    "num_seeds": 2, "probe_examples": 50, "lr_grid": (0.1, 1.0), "tuning_steps": 10},
    "init-sweep": {"data": "spirals", "hidden": (8, 8, 8, 8, 8), "num_scales": 3, "steps": 20,
                   "num_seeds": 2, "max_train": 200},
    "mnist-cnn": {"data": "digits", "channels": (4,), "hidden": 8, "epochs": 2, "num_seeds": 1, "max_train": 200, "lr_grid": (0.05,), "tuning_epochs": 1},
    "train-eval-gap": {"hidden": (16,), "steps": 30, "num_seeds": 2, "recalibration_batches": 3},
    "initializers": {"data": "spirals", "hidden": (8, 8), "steps": 40, "eval_every": 10, "num_seeds": 2},
    "input-normalization": {"samples": 100, "max_steps": 300, "num_seeds": 2},
    "whitening-cost": {"widths": (8, 16), "batch": 32, "repeats": 1, "num_seeds": 2},
    "grad-histograms": {"depths": (6,), "width": 16, "batch": 32, "num_seeds": 2},
    "momentum": {"data": "spirals", "momenta": (0.1, 0.9), "batch_sizes": (4, 16), "hidden": (8,),
                 "examples": 64, "num_seeds": 2},
    "lr-sweep": {"data": "spirals", "learning_rates": (0.01, 1.0), "hidden": (8,), "steps": 10, "num_seeds": 2},
    "placement": {"channels": (4,), "steps": 10, "num_seeds": 2, "lr_grid": (0.1,), "tuning_steps": 5},
    "loss-landscape": {"data": "spirals", "hidden": (8, 8), "steps": 20, "probe_every": 10,
                       "probe_batch": 32, "step_sizes": (0.5, 1.0), "num_seeds": 2},
    "mnist1d-sanity": {"steps": 20, "num_seeds": 2},
    "batch-size": {"batch_sizes": (2, 16), "norms": ("bn", "renorm", "gn"), "channels": (4,),
                   "epochs": 1, "num_seeds": 1, "max_train": 64},
}  # fmt: skip


def test_every_registered_experiment_has_a_tiny_config():
    assert set(TINY) == set(REGISTRY)
    for experiment in REGISTRY.values():
        assert experiment.claim and experiment.full_runtime
        assert experiment.make_config(quick=True) != experiment.make_config(quick=False)


def _record_loads(monkeypatch) -> list[str]:
    """The datasets a run loads, by whatever path: the loaders load_dataset dispatches to."""
    loaded = []
    for dataset in (*data.EMBEDDED, *data.REAL):
        original = getattr(data, f"_{dataset}")

        def spy(*args, _name=dataset, _original=original):
            loaded.append(_name)
            return _original(*args)

        monkeypatch.setattr(data, f"_{dataset}", spy)
    return loaded


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_runs_and_writes_everything(tmp_path, monkeypatch, name):
    loaded = _record_loads(monkeypatch)
    run_dir = run_experiment(name, root=tmp_path, progress=False, echo=None, **TINY[name])
    for file in ("config.json", "metrics.json", "log.txt"):
        assert (run_dir / file).is_file()
    assert list(run_dir.glob("*.png")), "plots are drawn"
    assert not list(run_dir.glob(".*.tmp")), "no temporary files left"
    config, saved = load_run(run_dir)
    assert config["experiment"] == name and config["mode"] == "quick"
    assert saved["verdict"]["summary"] and saved["verdict"]["supported"] in (True, False, None)
    assert "verdict:" in (run_dir / "log.txt").read_text()
    assert saved["verdict"]["label"] in ("supported", "not supported", "inconclusive in quick mode")
    assert json.loads((run_dir / "captions.json").read_text()), "every figure has a caption"
    # the recorded data names exactly what the run loaded ([] only for generated data)
    assert sorted({entry.split(":")[0] for entry in saved["data"]}) == sorted(set(loaded))
    metrics = saved["metrics"]
    if name == "convergence":
        run = metrics["arms"]["bn"][0]
        assert run["eval_steps"] == [10, 20, 30, 40]
        assert np.array(run["unit0_percentiles"]).shape == (4, 3)
        assert set(metrics["tuning"]) == {"baseline", "bn"}
    if name == "init-sweep":
        assert np.array(metrics["arms"]["bn"]["train_acc"]).shape == (2, 3)
    if name == "initializers":
        assert len(metrics["arms"]["bn"]["he_normal"]) == 2
    if name == "input-normalization":
        assert len(metrics["variants"]["whitened"]) == 2
    if name == "whitening-cost":
        assert np.array(metrics["whiten_s"]).shape == (2, 2)
    if name == "grad-histograms":
        assert len(metrics["cells"]) == 4  # 2 archs x 1 depth x 2 inits
        assert len(metrics["cells"][0]["arms"]["bn"][0]["histogram"]) == 60
    if name == "momentum":
        assert np.array(metrics["gap"]).shape[:3] == (2, 2, 2)
    if name == "lr-sweep":
        assert np.array(metrics["arms"]["bn"]["test_correct"]).shape[:2] == (2, 2)
    if name == "placement":
        assert set(metrics["arms"]) == {"before", "after", "before+dropout", "after+dropout"}
    if name == "loss-landscape":
        assert set(metrics["arms"]) == {"baseline", "bn", "noisy-bn"}
        assert len(metrics["arms"]["noisy-bn"][1]["beta"]) == 2, "the first probe is kept"
    if name == "batch-size":
        assert np.array(metrics["accuracy"]["gn"]).shape[:2] == (1, 2)
    if name == "train-eval-gap":
        assert [r["seed"] for r in metrics["runs"]] == [0, 1]


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


def test_whitening_cost_verdict():
    cost = {"widths": [10, 100], "batch": 8, "standardize_s": [[1.0], [10.0]], "whiten_s": [[1.0], [1000.0]],
            "standardize_offdiag": [[0.5], [0.5]], "whiten_offdiag": [[0.0], [0.0]]}  # fmt: skip
    verdict = whitening_cost.verdict(cost)
    assert verdict.supported and "d^1.00" in verdict.summary and "d^3.00" in verdict.summary


def test_whitening_times_are_cpu_times_so_waiting_does_not_count(monkeypatch):
    # a wait stands for another program holding the CPU: wall-clock time would count it
    monkeypatch.setattr(whitening_cost, "zca_whiten", lambda x: time.sleep(0.02))
    standardize_s, whiten_s = whitening_cost.cpu_seconds(torch.zeros(8, 4), repeats=3)
    assert whiten_s < 0.005 and standardize_s < 0.005


def test_report_states_the_quick_mode_rule_and_which_verdicts_rest_on_timings(tmp_path):
    run_dir = run_experiment("whitening-cost", root=tmp_path, progress=False, echo=None, **TINY["whitening-cost"])  # fmt: skip
    saved = json.loads((run_dir / "metrics.json").read_text())
    # whitening 16-17× the cost at the largest width: above 10× (the rule), below 32× (its
    # neighbouring threshold), so sensitive, and quick mode leaves it undecided
    saved["metrics"] = {"widths": [10, 100], "batch": 8, "standardize_s": [[1.0, 1.0], [10.0, 10.0]], "whiten_s": [[1.0, 1.0], [160.0, 170.0]],
                        "standardize_offdiag": [[0.5, 0.5], [0.5, 0.5]], "whiten_offdiag": [[0.0, 0.0], [0.0, 0.0]]}  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(saved))
    page = build_report([run_dir], tmp_path / "report.html").read_text()
    head, section = page.split("<h2 id='whitening-cost'>")
    assert html.escape(QUICK_RULE) in head and html.escape(TIMING_RULE) in head
    assert "Timing-based here: whitening-cost." in head
    verdict = section[section.index("<b>Verdict:</b>") : section.index("<table>")]
    assert html.escape(QUICK_RULE) in verdict and "Timing-based: decided from measured CPU times" in verdict  # fmt: skip
    row = section[section.index("whitening costs ≥ 10× more") :].split("</tr>")[0]
    assert "inconclusive in quick mode" in row
    assert "(the rule gives supported at the stated threshold; sensitive, so undecided in quick mode)" in row  # fmt: skip
    robust = section[section.index("grows faster with the width") :].split("</tr>")[0]
    assert "undecided in quick mode" not in robust and "class='supported'" in robust


def test_runner_checks_the_config_before_creating_anything(tmp_path):
    for bad, message in (({"data": "nosuch"}, "data: expected one of digits"), ({"impl": "nosuch"}, "impl: expected one of bnlab, torch, identity, got 'nosuch'"),
                         ({"data": "mnist"}, "data_dir: dataset 'mnist' is read from your files"), ({"num_seeds": 0}, "num_seeds: expected a positive integer, got 0")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            run_experiment("init-sweep", root=tmp_path, progress=False, echo=None, **bad)
    assert list(tmp_path.iterdir()) == []


def test_runner_refuses_data_the_models_cannot_take_or_missing_files(tmp_path):
    from bnlab.lab.experiments.base import ConfigError

    cases = (("mnist-cnn", {"data": "spirals"}, "data: expected one of digits, mnist1d, mnist, cifar10 (its models take (C, L) signals or (C, H, W) images), got 'spirals' (inputs of shape (2,))"),
             ("placement", {"data": "spirals"}, "data: expected one of digits, mnist1d, mnist, cifar10"),
             ("batch-size", {"data": "spirals"}, "data: expected one of digits, mnist1d, mnist, cifar10"),
             ("mnist-cnn", {"data": "mnist1d", "arch": "resnet"}, "data: expected one of digits, mnist, cifar10 (its models take (C, H, W) images (arch 'resnet')), got 'mnist1d'"),
             ("mnist-cnn", {"arch": "vgg"}, "arch: expected 'auto', 'cnn' or 'resnet', got 'vgg'"),
             ("mnist-cnn", {"data": "mnist", "data_dir": str(tmp_path)}, "data_dir: expected the 4 MNIST IDX files"))  # fmt: skip
    for name, bad, message in cases:
        with pytest.raises(ConfigError) as caught:
            run_experiment(name, root=tmp_path / "runs", progress=False, echo=None, **bad)
        assert str(caught.value).startswith(message)
    assert list(tmp_path.iterdir()) == []
    for name in ("convergence", "lr-sweep"):  # MLPs flatten any input: spirals is fine
        REGISTRY[name].make_config(data="spirals").check()


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
    assert "<b>Data.</b> spirals: " in page, "the data it trained on, not 'synthetic'"
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
        app, ["run", "input-normalization", "--out", str(tmp_path), "--no-progress"]
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
    assert missing.exit_code == 2 and "'--data-dir': expected an existing directory" in " ".join(missing.output.split())  # fmt: skip
    assert not (tmp_path / "mnist-cnn").exists(), "refused before a run directory is made"


def test_lab_imports_change_no_global_state():
    import subprocess
    import sys

    code = (
        "import matplotlib, os\n"
        "before = matplotlib.rcParams._get_backend_or_none()\n"
        "umask = os.umask(0o22); os.umask(umask)\n"
        "import bnlab.lab.report, bnlab.lab.runner, bnlab.lab.data, bnlab.lab.experiments\n"
        "after = matplotlib.rcParams._get_backend_or_none()\n"
        "assert before == after, (before, after)\n"
        "assert 'matplotlib.pyplot' not in __import__('sys').modules\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
