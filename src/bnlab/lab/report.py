"""Plots and the HTML report, rebuilt from saved metrics without retraining.

Verdicts are recomputed from ``metrics.json`` with the experiment's current verdict logic.
"""

from __future__ import annotations

import base64
import html
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bnlab.files import atomic_save_figure, atomic_write_text
from bnlab.lab.runner import get_experiment, load_run


def render_plots(run_dir: str | Path) -> list[Path]:
    """Draw a finished run's plots from its metrics.json into PNG files beside it."""
    run_dir = Path(run_dir)
    config, saved = load_run(run_dir)
    if saved is None:
        raise FileNotFoundError(f"{run_dir}: unfinished run (no metrics.json), nothing to plot")
    figures = get_experiment(config["experiment"]).plot(saved["metrics"])
    paths = []
    for key, figure in figures.items():
        paths.append(atomic_save_figure(run_dir / f"{key}.png", figure))
        plt.close(figure)
    return paths


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; width: 100%; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 6px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
.supported { color: #176f2c; font-weight: bold; }
.not-supported { color: #a31515; font-weight: bold; }
.inconclusive { color: #8a6d00; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
code { background: #f6f6f6; padding: 0 3px; }
"""


def _section(run_dir: Path, config: dict, saved: dict) -> tuple[str, str]:
    """The claims-table row and the detail section of one run."""
    experiment = get_experiment(config["experiment"])
    verdict = experiment.verdict(saved["metrics"])
    css = verdict.label.replace(" ", "-")
    name = html.escape(experiment.name)
    row = (
        f"<tr><td><a href='#{name}'>{name}</a></td><td>{html.escape(experiment.claim)}</td>"
        f"<td class='{css}'>{verdict.label}</td><td>{html.escape(verdict.summary)}</td></tr>"
    )
    images = []
    for png in sorted(run_dir.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        images.append(f"<img alt='{html.escape(png.stem)}' src='data:image/png;base64,{data}'>")
    settings = ", ".join(f"{k}={v}" for k, v in config["config"].items())
    section = (
        f"<h2 id='{name}'>{name}</h2><p><b>Claim.</b> {html.escape(experiment.claim)}</p>"
        f"<p><b>Verdict:</b> <span class='{css}'>{verdict.label}</span>. "
        f"{html.escape(verdict.summary)}</p>"
        f"<p><small>Run <code>{html.escape(str(run_dir))}</code>, {config['mode']} mode, "
        f"{saved.get('runtime_seconds', 0):.0f} s. Full mode: {html.escape(experiment.full_runtime)}. "
        f"Config: {html.escape(settings)}</small></p>" + "".join(images)
    )
    return row, section


def build_report(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """Write one self-contained HTML page (plots inline) for the given run directories."""
    if not run_dirs:
        raise ValueError("run_dirs: expected at least one run directory, got none")
    rows, sections, skipped = [], [], []
    for run_dir in map(Path, run_dirs):
        config, saved = load_run(run_dir)
        if saved is None:
            skipped.append(str(run_dir))
            continue
        if not any(run_dir.glob("*.png")):
            render_plots(run_dir)
        row, section = _section(run_dir, config, saved)
        rows.append(row)
        sections.append(section)
    if not rows:
        raise ValueError(f"run_dirs: no finished run (with metrics.json) among {skipped}")
    note = f"<p>Unfinished runs left out: {html.escape(', '.join(skipped))}</p>" if skipped else ""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>bnlab report</title>"
        f"<style>{_STYLE}</style></head><body><h1>bnlab report</h1>"
        f"<p>Built {datetime.now():%Y-%m-%d %H:%M} from saved metrics. Each verdict is computed "
        "from the numbers of its run.</p>"
        "<table><tr><th>experiment</th><th>claim</th><th>verdict</th><th>numbers</th></tr>"
        + "".join(rows)
        + "</table>"
        + note
        + "".join(sections)
        + "</body></html>"
    )
    return atomic_write_text(out_path, page)
