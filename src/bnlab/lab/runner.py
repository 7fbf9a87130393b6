"""Run an experiment into ``runs/<experiment>/<timestamp>/``: config.json, metrics.json,
log.txt, PNG figures and their captions, every file written atomically.

A run is finished when its ``metrics.json`` exists. Ctrl-C ends the run with its config and
log on disk (the log says it was interrupted) and no metrics: nothing is half-written.
The runtime excludes the one-off compilation of bnlab's kernels (done before the clock starts).
Experiments run on one torch thread by default: their tensors are small, and on a shared
machine a second thread mostly waits (and one thread makes the numbers reproducible).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch

import bnlab
from bnlab.files import atomic_write_json, atomic_write_text
from bnlab.lab.experiments import Context
from bnlab.lab.plots import render_plots
from bnlab.lab.runs import get_experiment, latest_runs, load_run

__all__ = ["get_experiment", "latest_runs", "load_run", "new_run_dir", "run_experiment"]


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


def warm_up_kernels() -> float:
    """Seconds spent loading (or compiling) bnlab's kernels, by one tiny forward/backward."""
    from bnlab import nn as bnn

    started = time.perf_counter()
    with torch.random.fork_rng():
        for layer, shape in ((bnn.BatchNorm1d(2), (4, 2)), (bnn.BatchNorm2d(2), (4, 2, 3, 3))):
            layer(torch.randn(shape, requires_grad=True)).sum().backward()
    return time.perf_counter() - started


def run_experiment(
    name: str,
    *,
    quick: bool = True,
    root: str | Path = "runs",
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    threads: int | None = 1,
    **overrides,
) -> Path:
    """Run one experiment and save everything; returns the run directory.

    ``threads``: torch intra-op threads during the run (restored after); None leaves them.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(name, quick, root, progress, echo, overrides)
    finally:
        torch.set_num_threads(previous)


def _run(name, quick, root, progress, echo, overrides) -> Path:
    experiment = get_experiment(name)
    config = experiment.make_config(quick=quick, **overrides)
    config.check()  # a bad data name or implementation leaves no run directory behind
    mode = "quick" if quick else "full"
    run_dir = new_run_dir(root, name)
    atomic_write_json(
        run_dir / "config.json",
        {
            "experiment": name,
            "mode": mode,
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
    ctx.log(f"{name} ({mode}) -> {run_dir}")
    warm_up = warm_up_kernels() if config.impl == "bnlab" else 0.0
    started = time.perf_counter()
    try:
        metrics = experiment.run(config, ctx)
    except KeyboardInterrupt:
        ctx.log("interrupted: no metrics written")
        atomic_write_text(run_dir / "log.txt", "\n".join(ctx.lines) + "\n")
        raise
    seconds = time.perf_counter() - started
    verdict = experiment.verdict(metrics).in_mode(mode)
    ctx.log(f"claim: {experiment.claim}")
    ctx.log(f"verdict: {verdict.label_in(mode)}: {verdict.summary}")
    ctx.log(f"runtime: {seconds:.1f} s (kernel loading before it: {warm_up:.1f} s)")
    atomic_write_json(
        run_dir / "metrics.json",
        {
            "metrics": metrics,
            "data": ctx.datasets,
            "verdict": {
                "supported": verdict.supported,
                "label": verdict.label_in(mode),
                "summary": verdict.summary,
                "findings": [f.as_dict() for f in verdict.findings],
            },
            "runtime_seconds": seconds,
            "kernel_warm_up_seconds": warm_up,
        },
    )
    render_plots(run_dir)
    atomic_write_text(run_dir / "log.txt", "\n".join(ctx.lines) + "\n")
    return run_dir
