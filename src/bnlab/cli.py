"""The ``bnlab`` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=max(Console().width, 110))


@app.callback()
def main() -> None:
    """bnlab: Batch Normalization from the textbook to production layers, and a lab."""


@app.command()
def check(seed: int = typer.Option(0, help="Seed of the random inputs.")) -> None:
    """Every implementation level vs a float64 truth and vs torch; exit 1 on any excess."""
    from bnlab.check import run_checks

    rows = run_checks(seed)
    table = Table(title="bnlab check: max error (absolute; gradients scaled by max |truth|)")
    for column in ("level", "case", "vs float64 truth", "vs torch", "tolerance", "ok"):
        table.add_column(column, justify="left" if column in ("level", "case") else "right")
    for row in rows:
        vs_torch = "-" if row.vs_torch is None else f"{row.vs_torch:.2e}"
        status = "info" if row.informational else ("yes" if row.ok else "[red]NO[/red]")
        table.add_row(row.level, row.case, f"{row.vs_truth:.2e}", vs_torch, f"{row.tolerance:.0e}", status)  # fmt: skip
    console.print(table)
    failed = [row for row in rows if not row.ok]
    if failed:
        console.print(f"[red]{len(failed)} check(s) exceeded their tolerance[/red]")
        raise typer.Exit(1)
    console.print(f"all {len(rows)} checks within tolerance")
