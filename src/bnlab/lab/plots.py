"""Draw a finished run's figures from its saved metrics: PNG files and their captions."""

from __future__ import annotations

import json
from pathlib import Path

from bnlab.files import atomic_save_figure, atomic_write_text
from bnlab.lab.runs import get_experiment, load_run


def render_plots(run_dir: str | Path) -> list[Path]:
    """Write ``<key>.png`` for each figure of the run and ``captions.json`` beside them."""
    run_dir = Path(run_dir)
    config, saved = load_run(run_dir)
    if saved is None:
        raise FileNotFoundError(f"{run_dir}: unfinished run (no metrics.json), nothing to plot")
    figures = get_experiment(config["experiment"]).plot(saved["metrics"])
    paths, captions = [], {}
    for key, (figure, caption) in figures.items():
        paths.append(atomic_save_figure(run_dir / f"{key}.png", figure))
        captions[key] = caption
    atomic_write_text(run_dir / "captions.json", json.dumps(captions, indent=1) + "\n")
    return paths


def captions(run_dir: str | Path) -> dict[str, str]:
    """The captions of a run's figures (empty if the run predates captions)."""
    path = Path(run_dir) / "captions.json"
    return json.loads(path.read_text()) if path.is_file() else {}
