"""Run an experiment into ``runs/<experiment>/<timestamp>/``: config.json, metrics.json,
log.txt and PNG plots, every file written atomically.

A run is finished when its ``metrics.json`` exists. Ctrl-C ends the run with its config and
log on disk (the log says it was interrupted) and no metrics: nothing is half-written.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch

import bnlab
from bnlab.files import atomic_write_json, atomic_write_text
from bnlab.lab.experiments import REGISTRY, Context


def get_experiment(name: str):
    if name not in REGISTRY:
        raise ValueError(f"experiment: expected one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def new_run_dir(root: str | Path, name: str) -> Path:
    """A fresh ``root/name/<YYYYmmdd-HHMMSS>[-k]`` directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / name
    base.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        path = base / (stamp if k == 0 else f"{stamp}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"{base}: could not create a fresh run directory")


def run_experiment(
    name: str,
    *,
    quick: bool = True,
    root: str | Path = "runs",
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    **overrides,
) -> Path:
    """Run one experiment and save everything; returns the run directory."""
    from bnlab.lab.report import render_plots

    experiment = get_experiment(name)
    config = experiment.make_config(quick=quick, **overrides)
    run_dir = new_run_dir(root, name)
    atomic_write_json(
        run_dir / "config.json",
        {
            "experiment": name,
            "mode": "quick" if quick else "full",
            "config": dataclasses.asdict(config),
            "claim": experiment.claim,
            "versions": {
                "bnlab": bnlab.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        },
    )
    ctx = Context(progress=progress, echo=echo)
    ctx.log(f"{name} ({'quick' if quick else 'full'}) -> {run_dir}")
    started = time.perf_counter()
    try:
        metrics = experiment.run(config, ctx)
    except KeyboardInterrupt:
        ctx.log("interrupted: no metrics written")
        atomic_write_text(run_dir / "log.txt", "\n".join(ctx.lines) + "\n")
        raise
    seconds = time.perf_counter() - started
    verdict = experiment.verdict(metrics)
    ctx.log(f"claim: {experiment.claim}")
    ctx.log(f"verdict: {verdict.label}: {verdict.summary}")
    ctx.log(f"runtime: {seconds:.1f} s")
    atomic_write_json(
        run_dir / "metrics.json",
        {
            "metrics": metrics,
            "verdict": {"supported": verdict.supported, "summary": verdict.summary},
            "runtime_seconds": seconds,
        },
    )
    render_plots(run_dir)
    atomic_write_text(run_dir / "log.txt", "\n".join(ctx.lines) + "\n")
    return run_dir


def load_run(run_dir: str | Path) -> tuple[dict, dict | None]:
    """``(config, metrics)`` of a run directory; ``metrics`` is None for an unfinished run."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a bnlab run directory (no config.json)")
    config = json.loads(config_path.read_text())
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    return config, metrics


def latest_runs(root: str | Path = "runs") -> list[Path]:
    """The newest finished run of every experiment under ``root``."""
    found = []
    for experiment_dir in sorted(Path(root).glob("*/")):
        finished = sorted(p.parent for p in experiment_dir.glob("*/metrics.json"))
        if finished:
            found.append(finished[-1])
    return found
