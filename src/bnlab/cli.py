"""The ``bnlab`` command line."""

from __future__ import annotations

from pathlib import Path

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


@app.command("list")
def list_experiments() -> None:
    """List the registered experiments and the claims they test."""
    from bnlab.lab.experiments import REGISTRY

    table = Table(title="bnlab experiments")
    for column in ("name", "claim", "full mode"):
        table.add_column(column)
    for name, experiment in sorted(REGISTRY.items()):
        table.add_row(name, experiment.claim, experiment.full_runtime)
    console.print(table)


@app.command()
def run(
    names: list[str] = typer.Argument(None, help="Experiments to run (default: all, quick)."),
    full: bool = typer.Option(False, "--full", help="Full mode (see `bnlab list` for runtimes)."),
    seed: int = typer.Option(0, help="Base seed; multi-seed runs use seed, seed+1, ..."),
    data: str = typer.Option(None, help="Dataset: digits, mnist1d, spirals, mnist, cifar10."),
    data_dir: str = typer.Option(None, help="Directory with the real MNIST/CIFAR-10 files."),
    impl: str = typer.Option("bnlab", help="BatchNorm implementation: bnlab or torch."),
    out: str = typer.Option("runs", help="Root directory of the runs and the report."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run experiments into OUT/<experiment>/<timestamp>/ and write OUT/report.html."""
    from bnlab.lab.experiments import REGISTRY
    from bnlab.lab.report import build_report
    from bnlab.lab.runner import latest_runs, run_experiment

    selected = names or sorted(REGISTRY)
    unknown = [n for n in selected if n not in REGISTRY]
    if unknown:
        raise typer.BadParameter(f"unknown experiment(s) {unknown}; known: {sorted(REGISTRY)}")
    overrides = {"seed": seed, "impl": impl}
    if data is not None:
        overrides["data"] = data
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        for name in selected:
            run_experiment(name, quick=not full, root=out, progress=progress, echo=console.print, **overrides)  # fmt: skip
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: finished runs are kept[/yellow]")
        _write_report(build_report, latest_runs(out), out)
        raise typer.Exit(130) from None
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    _write_report(build_report, latest_runs(out), out)


def _write_report(build_report, run_dirs, out: str) -> None:
    if not run_dirs:
        console.print("no finished runs; no report written")
        return
    path = build_report(run_dirs, Path(out) / "report.html")
    console.print(f"report: {path.resolve()}")


@app.command()
def report(
    run_dirs: list[Path] = typer.Argument(None, help="Run directories (default: newest of each)."),
    out: str = typer.Option("runs", help="Root of the runs, and where report.html goes."),
    output: Path = typer.Option(
        None, "-o", "--output", help="Report path (default OUT/report.html)."
    ),
) -> None:
    """Rebuild the HTML report from saved metrics, without retraining."""
    from bnlab.lab.report import build_report
    from bnlab.lab.runner import latest_runs

    dirs = run_dirs or latest_runs(out)
    try:
        path = build_report(dirs, output or Path(out) / "report.html")
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    console.print(f"report: {path.resolve()}")


@app.command()
def bench(
    out: Path = typer.Option(Path("runs/bench"), help="Directory for bench.json and bench.png."),
    repeats: int = typer.Option(15, help="Minimum timed repetitions per case (median reported)."),
    compile: bool = typer.Option(False, "--compile", help="Also time torch.compile'd BatchNorm."),
    quick: bool = typer.Option(False, "--quick", help="Small and medium shapes only."),
    epoch: bool = typer.Option(True, help="Also time one training epoch of the lab's CNN."),
    tuned: bool = typer.Option(True, help="Also run everything under the tuned glibc allocator."),
) -> None:
    """bnlab vs torch BatchNorm on CPU: times, speed-ups and the bandwidth floor."""
    from bnlab.allocator import is_tuned
    from bnlab.bench import SHAPES, run_benchmarks
    from bnlab.benchreport import render

    shapes = {k: v for k, v in SHAPES.items() if k in ("small", "medium")} if quick else SHAPES
    result = run_benchmarks(shapes, repeats=repeats, compile=compile, progress=console.print)
    result["allocator"] = "tuned" if is_tuned() else "default"
    compiled = result["kernel_compile_seconds"]
    console.print(
        f"kernels: first-call compile {compiled:.0f} s (cached on disk since), this process loaded them in {result['kernel_load_seconds']:.2f} s"
        if compiled is not None
        else "kernels: not available, bnlab ran its level-2 torch path"
    )
    if epoch:
        from bnlab.lab.endtoend import compare_epochs

        result["epoch"] = compare_epochs(repeats=1 if quick else 3, images=256 if quick else 2048)
        console.print(f"one CNN epoch: bnlab {result['epoch']['bnlab']:.2f} s, torch {result['epoch']['torch']:.2f} s ({result['epoch']['speedup']:.2f}×)")  # fmt: skip
    if tuned and not is_tuned():
        result["tuned"] = _bench_tuned(out, repeats, compile, quick, epoch)
    console.print(render(result, out))
    if "tuned" in result:
        from bnlab.benchreport import table

        console.print(table(result["tuned"]))
    console.print(f"written: {out / 'bench.json'}, {out / 'bench.png'}")


def _bench_tuned(out: Path, repeats: int, compile: bool, quick: bool, epoch: bool) -> dict:
    """The same benchmark in a child process started with the tuned allocator."""
    import json
    import subprocess
    import sys

    from bnlab.allocator import tuned_environ

    child_out = out / "tuned"
    argv = [sys.executable, "-m", "bnlab", "bench", "--no-tuned", "--out", str(child_out), "--repeats", str(repeats)]  # fmt: skip
    argv += ["--compile"] * compile + ["--quick"] * quick + ([] if epoch else ["--no-epoch"])
    console.print("[bold]again with the tuned glibc allocator (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)[/bold]")  # fmt: skip
    subprocess.run(argv, env=tuned_environ(), check=True)
    return json.loads((child_out / "bench.json").read_text())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def tuned(ctx: typer.Context) -> None:
    """Run a command under the tuned glibc allocator: bnlab tuned -- python train.py"""
    from bnlab.allocator import exec_tuned

    try:
        exec_tuned(ctx.args)
    except (ValueError, OSError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None


@app.command()
def fold(
    model_file: Path = typer.Argument(
        ..., help="A model saved with torch.save(model) or TorchScript."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the folded model."),
    input_shape: str = typer.Option(None, help="Input shape for timing, e.g. 1,3,224,224."),
) -> None:
    """Fold BatchNorm into the preceding conv/linear layers of a saved model."""
    from bnlab.foldfile import fold_file

    try:
        shape = tuple(int(s) for s in input_shape.split(",")) if input_shape else None
        result = fold_file(model_file, output, shape)
    except (ValueError, FileNotFoundError, TypeError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    console.print(result["summary"])
    console.print(
        f"inference on {result['input_shape']}: {result['original_ms']:.3f} ms -> "
        f"{result['folded_ms']:.3f} ms ({result['speedup']:.2f}×); written {output}"
    )


@app.command("train")
def train_command(
    nproc: int = typer.Option(1, help="Processes (ranks) on this machine: DDP + SyncBatchNorm."),
    steps: int = typer.Option(200, help="Training steps."),
    global_batch: int = typer.Option(64, help="Global batch size, split evenly over the ranks."),
    lr: float = typer.Option(0.05, help="SGD learning rate."),
    seed: int = typer.Option(0, help="Seed of initialization and data order."),
    data: str = typer.Option("digits", help="Embedded dataset: digits, mnist1d, spirals."),
    dtype: str = typer.Option("float32", help="float32 or float64."),
    out: Path = typer.Option(
        Path("runs/train/loss.json"), help="Where rank 0 writes the loss curve."
    ),
) -> None:
    """Train a lab MLP with BatchNorm, on one process or data-parallel over several."""
    import json

    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from bnlab.lab.distributed import DistributedConfig, launch

    config = DistributedConfig(data=data, global_batch=global_batch, steps=steps, lr=lr, seed=seed, dtype=dtype, out=str(out))  # fmt: skip
    try:
        launch(config, nproc)
    except (ProcessRaisedException, ProcessExitedException) as error:
        console.print(f"[red]error: a rank failed, all ranks stopped:[/red] {str(error).strip().splitlines()[-1]}")  # fmt: skip
        raise typer.Exit(1) from None
    except ValueError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    losses = json.loads(out.read_text())["loss"]
    console.print(f"{nproc} rank(s): loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps; written {out}")  # fmt: skip
