"""Run directories on disk: finding the experiment of a run, loading its files, the newest runs.

A run directory ``runs/<experiment>/<timestamp>/`` holds ``config.json`` (written first),
``metrics.json`` (written last: a run is finished when it exists), ``log.txt``, PNG figures
and ``captions.json``.
"""

from __future__ import annotations

import json
from pathlib import Path


def get_experiment(name: str):
    """The registered experiment called ``name``."""
    from bnlab.lab.experiments import REGISTRY

    if name not in REGISTRY:
        raise ValueError(f"experiment: expected one of {sorted(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


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


def latest_runs(root: str | Path = "runs", mode: str | None = None) -> list[Path]:
    """The newest finished run of every experiment under ``root`` (of ``mode`` if given)."""
    found = []
    for experiment_dir in sorted(Path(root).glob("*/")):
        finished = sorted(p.parent for p in experiment_dir.glob("*/metrics.json"))
        if mode is not None:
            finished = [p for p in finished if load_run(p)[0].get("mode") == mode]
        if finished:
            found.append(finished[-1])
    return found
