"""``bnlab bench`` output: terminal tables, ``bench.json`` and a PNG bar chart."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from bnlab.files import atomic_save_figure, atomic_write_json


def table(result: dict, title: str = "bnlab bench") -> Table:
    allocator = result.get("allocator", "default")
    view = Table(title=f"{title} ({result['threads']} threads, torch {result['torch']}, {allocator} allocator)")  # fmt: skip
    columns = ("shape", "layout", "mode", "bnlab ms", "torch ms", "speed-up", "floor ms", "bnlab / floor")  # fmt: skip
    if any(row["compile_ms"] is not None for row in result["rows"]):
        columns = (*columns[:5], "compile ms", *columns[5:])
    for column in columns:
        view.add_column(
            column, justify="left" if column in ("shape", "layout", "mode") else "right"
        )
    for row in result["rows"]:
        cells = [f"{row['shape']} {'×'.join(map(str, row['dims']))}", row["layout"], row["mode"],
                 f"{row['bnlab_ms']:.3f}", f"{row['torch_ms']:.3f}"]  # fmt: skip
        if "compile ms" in columns:
            cells.append(f"{row['compile_ms']:.3f}")
        cells += [f"{row['speedup']:.2f}×", f"{row['floor_ms']:.3f}", f"{row['bnlab_over_floor']:.2f}×"]  # fmt: skip
        view.add_row(*cells)
    return view


def chart(result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['shape']}\n{r['layout'][:7]}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(rows)), 4.5))
    positions = range(len(rows))
    ax.bar([p - 0.2 for p in positions], [r["speedup"] for r in rows], width=0.4, label="speed-up vs torch")  # fmt: skip
    ax.bar([p + 0.2 for p in positions], [r["floor_ms"] / r["bnlab_ms"] for r in rows], width=0.4, label="fraction of bandwidth floor reached")  # fmt: skip
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(positions), labels, fontsize=6)
    ax.set_title("bnlab BatchNorm on CPU")
    ax.legend()
    return fig


def disturbed(result: dict) -> list[str]:
    """Rows timed faster than their bandwidth floor (bnlab's or torch's): impossible on a
    quiet machine, so the timing was disturbed (other load, frequency changes)."""
    return [
        f"{row['shape']} {row['layout']} {row['mode']}"
        for row in result["rows"]
        if min(row["bnlab_ms"], row["torch_ms"]) < row["floor_ms"]
    ]


def render(result: dict, out: Path) -> Table:
    """Write bench.json and bench.png into ``out``; return the table to print."""
    import matplotlib.pyplot as plt

    out = Path(out)
    atomic_write_json(out / "bench.json", result)
    figure = chart(result)
    atomic_save_figure(out / "bench.png", figure)
    plt.close(figure)
    return table(result)


def markdown(result: dict) -> str:
    """The table as Markdown (for the README)."""
    lines = ["| shape | layout | mode | bnlab ms | torch ms | speed-up | floor ms | bnlab / floor |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} {'×'.join(map(str, r['dims']))} | {r['layout']} | {r['mode']} | {r['bnlab_ms']:.3f} "
            f"| {r['torch_ms']:.3f} | {r['speedup']:.2f}× | {r['floor_ms']:.3f} | {r['bnlab_over_floor']:.2f}× |"
        )
    return "\n".join(lines)


MODEL_COLUMNS = ("network", "batch, image", "mode", "torch ms", "bnlab ms", "fused ms", "BN=identity ms", "bnlab speed-up [95% CI]", "fused speed-up [95% CI]", "BN cost / torch's: bnlab, fused")  # fmt: skip


def _interval(value: float | None, interval, digits: int = 3, suffix: str = "×") -> str:
    if value is None:
        return "n/a"
    low, high = interval
    return f"{value:.{digits}f}{suffix} [{low:.{digits}f}, {high:.{digits}f}]"


def _model_cells(row: dict) -> list[str]:
    if row["cost_ratio"] is None:
        cost = "n/a (torch BN costs nothing measurable)"
    else:
        cost = f"{_interval(row['cost_ratio'], row['cost_ratio_ci'], 2, '')}; {_interval(row['fused_cost_ratio'], row['fused_cost_ratio_ci'], 2, '')}"  # fmt: skip
    return [
        row["network"], f"{row['batch']}, {row['side']}²", row["mode"],
        f"{row['torch_ms']:.1f}", f"{row['bnlab_ms']:.1f}", f"{row['bnlab-fused_ms']:.1f}",
        f"{row['identity_ms']:.1f}", _interval(row["speedup"], row["speedup_ci"]),
        _interval(row["fused_speedup"], row["fused_speedup_ci"]), cost,
    ]  # fmt: skip


def _model_title(result: dict) -> str:
    return (
        f"real models: {result['threads']} threads, {result['allocator']} allocator, torch "
        f"{result['torch']}, {result['cpu']}; medians of at least {result['rounds']} alternating rounds"
        + (f" (and {result['min_seconds']:g} s)" if result.get("min_seconds") else "")
        + f" per case after {result['warmup']} warm-up"
    )


def models_table(result: dict) -> Table:
    """The real-model section (:func:`bnlab.bench.models.run_models`) as a terminal table."""
    view = Table(title=_model_title(result))
    for column in MODEL_COLUMNS:
        view.add_column(column, justify="left" if column in ("network", "mode") else "right")
    for row in result["rows"]:
        view.add_row(*_model_cells(row))
    return view


def models_markdown(result: dict) -> str:
    """The real-model section as Markdown (for the README), its conditions first."""
    lines = [_model_title(result) + ".", "", "| " + " | ".join(MODEL_COLUMNS) + " |", "|---" * len(MODEL_COLUMNS) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(_model_cells(row)) + " |" for row in result["rows"]]
    return "\n".join(lines)
