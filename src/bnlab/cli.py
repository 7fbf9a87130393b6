"""The ``bnlab`` command line."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(width=max(Console().width, 110))


# Option checks, run while the command line is parsed: a bad value ends the command with
# "Invalid value for '--option': expected ..., got ..." and exit status 2, before any work.
def _at_least(minimum: int, what: str):
    def check(value: int | None) -> int | None:
        if value is not None and value < minimum:
            raise typer.BadParameter(f"expected {what}, got {value}")
        return value

    return check


_positive = _at_least(1, "a positive integer")
_non_negative = _at_least(0, "an integer >= 0")


def _number(positive: bool):
    def check(value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):  # fmt: skip
            raise typer.BadParameter(f"expected a {'positive' if positive else 'non-negative'} finite number, got {value}")  # fmt: skip
        return value

    return check


def _one_of(choices: Callable[[], tuple[str, ...]] | tuple[str, ...]):
    def check(value: str | None) -> str | None:
        names = choices() if callable(choices) else choices
        if value is not None and value not in names:
            raise typer.BadParameter(f"expected one of {', '.join(names)}, got {value!r}")
        return value

    return check


def _datasets() -> tuple[str, ...]:
    from bnlab.lab.data import EMBEDDED, REAL

    return EMBEDDED + REAL


def _embedded() -> tuple[str, ...]:
    from bnlab.lab.data import EMBEDDED

    return EMBEDDED


def _directory_or_new(value: str | Path | None):
    """A directory to write into: existing, or not there yet (then it is created)."""
    if value is not None and Path(value).exists() and not Path(value).is_dir():
        raise typer.BadParameter(f"expected a directory, got the file {str(value)!r}")
    problem = None if value is None else _cannot_create(Path(value))
    if problem is not None:
        raise typer.BadParameter(f"expected a directory that exists or can be created, got {str(value)!r} ({problem})")  # fmt: skip
    return value


def _cannot_create(path: Path) -> str | None:
    """Why ``path`` (a folder, existing or not) cannot be written into; None if it can.
    Probed by creating and removing a temporary folder in its nearest existing ancestor, so
    nothing is left behind (permission bits alone say nothing for root or on /proc)."""
    import tempfile

    ancestor = path.expanduser().absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{str(ancestor)!r} is a file"
    try:
        Path(tempfile.mkdtemp(prefix=".bnlab-probe-", dir=ancestor)).rmdir()
    except OSError as error:
        return f"cannot create a folder in {str(ancestor)!r}: {error.strerror}"
    return None


def _new_file(value: Path | None) -> Path | None:
    """A file to write: not a directory, in a folder that exists or can be created."""
    if value is None:
        return value
    if Path(value).expanduser().is_dir():
        raise typer.BadParameter(f"expected a file path, got the directory {str(value)!r}")
    problem = _cannot_create(Path(value).expanduser().parent)
    if problem is not None:
        raise typer.BadParameter(f"expected a file path in a folder that exists or can be created, got {str(value)!r} ({problem})")  # fmt: skip
    return value


def _existing_directory(value: str | None) -> str | None:
    if value is not None and not Path(value).expanduser().is_dir():
        raise typer.BadParameter(f"expected an existing directory, got {value!r}")
    return value


def _sizes(value: str) -> dict[str, tuple[int, int]]:
    """``b8-64,b32-112`` as {"b8-64": (8, 64), ...}; an impossible size is a usage error."""
    parsed = {}
    for size in (s.strip() for s in value.split(",") if s.strip()):
        match = re.fullmatch(r"b(\d+)-(\d+)", size)
        if match is None:
            raise typer.BadParameter(f"expected b<batch>-<side> such as b8-64, got {size!r}")
        batch, side = int(match[1]), int(match[2])
        if batch < 1 or side < 1:
            raise typer.BadParameter(f"expected a positive batch and side, got {size!r}")
        if batch * math.ceil(side / 32) ** 2 < 2:  # ResNet's last stage is 32× downsampled
            raise typer.BadParameter(f"expected batch × ⌈side/32⌉² >= 2 (a training step's BatchNorm needs more than one value per channel at the last stage), got {size!r}")  # fmt: skip
        parsed[size] = (batch, side)
    if not parsed:
        raise typer.BadParameter(f"expected at least one size such as b8-64, got {value!r}")
    return parsed


def _check_sizes(value: str) -> str:
    _sizes(value)
    return value


def _networks(value: str) -> list[str]:
    from bnlab.bench.models import NETWORKS

    chosen = [n.strip() for n in value.split(",") if n.strip()]
    if not chosen or any(n not in NETWORKS for n in chosen):
        raise typer.BadParameter(f"expected names from {', '.join(NETWORKS)}, comma-separated, got {value!r}")  # fmt: skip
    return chosen


def _check_networks(value: str) -> str:
    _networks(value)
    return value


def _shape(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        dims = [int(s) for s in value.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise typer.BadParameter(f"expected positive integers separated by commas, such as 1,3,224,224, got {value!r}")  # fmt: skip
    return value


@app.callback()
def main() -> None:
    """bnlab: Batch Normalization from the textbook to production layers, and a lab."""


@app.command()
def check(
    seed: int = typer.Option(0, callback=_non_negative, help="Seed of the random inputs (>= 0)."),
) -> None:
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
    seed: int = typer.Option(
        0, callback=_non_negative, help="Base seed (>= 0); multi-seed runs use seed, seed+1, ..."
    ),
    data: str = typer.Option(
        None,
        callback=_one_of(_datasets),
        help="Dataset: digits, mnist1d, spirals, mnist, cifar10 (the last two need --data-dir).",
    ),
    data_dir: str = typer.Option(
        None,
        callback=_existing_directory,
        help="Directory with the real MNIST/CIFAR-10 files (only with --data mnist or cifar10).",
    ),
    impl: str = typer.Option(
        "bnlab",
        callback=_one_of(("bnlab", "torch")),
        help="BatchNorm implementation: bnlab or torch.",
    ),
    out: str = typer.Option(
        "runs", callback=_directory_or_new, help="Root directory of the runs and the report."
    ),
    progress: bool = typer.Option(
        None,
        "--progress/--no-progress",
        help="Show progress bars (default: when stderr is a terminal).",
    ),
) -> None:
    """Run experiments into OUT/<experiment>/<timestamp>/ and write OUT/report.html."""
    import sys

    progress = sys.stderr.isatty() if progress is None else progress
    from bnlab.lab.data import REAL
    from bnlab.lab.experiments import REGISTRY
    from bnlab.lab.experiments.base import ConfigError
    from bnlab.lab.report import build_report
    from bnlab.lab.runner import latest_runs, run_experiment

    selected = names or sorted(REGISTRY)
    unknown = [n for n in selected if n not in REGISTRY]
    if unknown:
        raise typer.BadParameter(f"unknown experiment(s) {unknown}; expected names from {sorted(REGISTRY)}", param_hint="NAMES")  # fmt: skip
    if data in REAL and data_dir is None:
        raise typer.BadParameter(f"expected the directory of your {data} files with --data {data}, got none", param_hint="'--data-dir'")  # fmt: skip
    if data not in REAL and data_dir is not None:  # the embedded datasets read no files
        raise typer.BadParameter(f"expected --data-dir only with --data {' or --data '.join(REAL)} (the other datasets are built in), got {data_dir!r} with {'no --data' if data is None else f'--data {data}'}", param_hint="'--data-dir'")  # fmt: skip
    overrides = {"seed": seed, "impl": impl}
    if data is not None:
        overrides["data"] = data
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    for name in selected:  # the data must fit every experiment, its files be there: before any run
        try:
            REGISTRY[name].make_config(quick=not full, **overrides).check()
        except ConfigError as error:
            message = f"for experiment {name}, {error.message}" if error.field == "data" else error.message  # fmt: skip
            raise typer.BadParameter(message, param_hint=f"'{error.option}'") from None
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
    if not dirs:
        raise typer.BadParameter(f"expected finished runs (bnlab run writes them) under {out!r}, found none", param_hint="'--out'")  # fmt: skip
    try:
        path = build_report(dirs, output or Path(out) / "report.html")
    except (ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    console.print(f"report: {path.resolve()}")


@app.command()
def bench(
    out: Path = typer.Option(Path("runs/bench"), help="Directory for bench.json and bench.png."),
    repeats: int = typer.Option(
        15, callback=_positive, help="Minimum timed repetitions per case (median reported)."
    ),
    compile: bool = typer.Option(False, "--compile", help="Also time torch.compile'd BatchNorm."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Small and medium shapes only; real models: resnet18 at batch 8, 64² only.",
    ),
    epoch: bool = typer.Option(True, help="Also time one training epoch of the lab's CNN."),
    tuned: bool = typer.Option(True, help="Also run everything under the tuned glibc allocator."),
    kernels: bool = typer.Option(True, help="Time the BN layers alone (the shapes table)."),
    models: bool = typer.Option(
        True,
        help="Time training steps and eval of ResNet-shaped networks: torch BN, bnlab BN, BN as identity.",
    ),
    networks: str = typer.Option(
        "resnet18,resnet50",
        callback=_check_networks,
        help="Real-model networks, comma-separated: resnet18, resnet50.",
    ),
    sizes: str = typer.Option(
        "b8-64,b32-112",
        callback=_check_sizes,
        help="Real-model batch/image sizes: b<batch>-<side>, comma-separated.",
    ),
    model_rounds: int = typer.Option(
        10,
        callback=_positive,
        help="Real models: alternating timed rounds after warm-up (at least 10 for a reportable figure).",
    ),
    model_seconds: float = typer.Option(
        0.0,
        callback=_number(positive=False),
        help="Real models: keep alternating rounds (beyond --model-rounds) until a case has been timed this long; cheap cases get more rounds and tighter intervals.",
    ),
    model_warmup: int = typer.Option(
        2, callback=_non_negative, help="Real models: untimed warm-up calls per arm (>= 0)."
    ),
    model_width: int = typer.Option(
        64,
        callback=_positive,
        hidden=True,
        help="Real models: stage width (64 = torchvision's; smaller for smoke tests).",
    ),
    threads: int = typer.Option(
        0, callback=_non_negative, help="torch threads (0: torch's default)."
    ),
    device: str = typer.Option(
        "cpu",
        callback=_one_of(("cpu", "cuda")),
        help="cpu, or cuda: the Triton kernels' table (bench/cuda.py).",
    ),
) -> None:
    """bnlab vs torch BatchNorm on CPU: BN layers (with the bandwidth floor) and real models."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            console.print("[red]error:[/red] device: expected a CUDA device for --device cuda, torch sees none")  # fmt: skip
            raise typer.Exit(2)
        from bnlab.bench.cuda import run_cli

        run_cli(out, repeats, compile, console.print)
        return

    from bnlab.allocator import is_tuned
    from bnlab.bench.report import disturbed, models_table, render

    if threads > 0:
        torch.set_num_threads(threads)
    result: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": []}
    if kernels:
        from bnlab.bench.kernels import SHAPES, run_benchmarks

        shapes = {k: v for k, v in SHAPES.items() if k in ("small", "medium")} if quick else SHAPES
        result = run_benchmarks(shapes, repeats=repeats, compile=compile, progress=console.print)
        compiled = result["kernel_compile_seconds"]
        console.print(
            f"kernels: first-call compile {compiled:.0f} s (cached on disk since), this process loaded them in {result['kernel_load_seconds']:.2f} s"
            if compiled is not None
            else "kernels: not available, bnlab ran its level-2 torch path"
        )
    result["allocator"] = "tuned" if is_tuned() else "default"
    if epoch:
        from bnlab.lab.endtoend import compare_epochs

        result["epoch"] = compare_epochs(repeats=1 if quick else 3, images=256 if quick else 2048)
        console.print(f"one CNN epoch: bnlab {result['epoch']['bnlab']:.2f} s, torch {result['epoch']['torch']:.2f} s ({result['epoch']['speedup']:.2f}×)")  # fmt: skip
    if models:
        result["models"] = _bench_models(networks, sizes, quick, model_rounds, model_warmup, model_width, model_seconds)  # fmt: skip
    if tuned and not is_tuned():
        result["tuned"] = _bench_tuned(out)
    if result["rows"]:
        console.print(render(result, out))
        below = disturbed(result)
        if below:
            console.print(f"[yellow]warning: {len(below)} case(s) timed below the bandwidth floor ({'; '.join(below[:4])}): the machine was busy while timing; rerun on an idle machine before trusting these figures[/yellow]")  # fmt: skip
    else:
        from bnlab.files import atomic_write_json

        atomic_write_json(out / "bench.json", result)
    if "models" in result:
        console.print(models_table(result["models"]))
    console.print(f"written: {out / 'bench.json'}" + (f", {out / 'bench.png'}" if result["rows"] else ""))  # fmt: skip


def _bench_models(networks: str, sizes: str, quick: bool, rounds: int, warmup: int, width: int, seconds: float = 0.0) -> dict:  # fmt: skip
    """The real-model section (the options were checked while parsing)."""
    from bnlab.bench.models import run_models

    chosen, parsed = _networks(networks), _sizes(sizes)
    if quick:
        chosen, parsed = chosen[:1], dict(list(parsed.items())[:1])
    if rounds < 10:
        console.print(f"[yellow]real models: {rounds} rounds (fewer than 10): not a reportable figure[/yellow]")  # fmt: skip
    console.print("[bold]real models: torch BN vs bnlab BN (converted) vs BN as identity[/bold]")
    return run_models(chosen, parsed, rounds=rounds, warmup=warmup, width=width, min_seconds=seconds, progress=console.print)  # fmt: skip


def _bench_tuned(out: Path) -> dict:
    """The same benchmark (same options) in a child process under the tuned allocator."""
    import json
    import subprocess
    import sys

    from bnlab.allocator import tuned_environ

    child_out = out / "tuned"
    argv = [sys.executable, "-m", "bnlab", *_child_arguments(sys.argv[1:]), "--no-tuned", "--out", str(child_out)]  # fmt: skip
    console.print("[bold]again with the tuned glibc allocator (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)[/bold]")  # fmt: skip
    subprocess.run(argv, env=tuned_environ(), check=True)
    return json.loads((child_out / "bench.json").read_text())


def _child_arguments(arguments: list[str]) -> list[str]:
    """This command's arguments without ``--out``/``--tuned`` (the child gets its own)."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--out":
            skip = True
        elif not argument.startswith("--out=") and argument not in ("--tuned", "--no-tuned"):
            kept.append(argument)
    return kept if kept and kept[0] == "bench" else ["bench", *kept]


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
    input_shape: str = typer.Option(
        None, callback=_shape, help="Input shape for timing, e.g. 1,3,224,224."
    ),
    trust_file: bool = typer.Option(
        False,
        "--trust-file",
        help="Unpickle the file fully (torch.load weights_only=False). RISK: a pickle can run "
        "any code on this machine while it loads; only for files you trust. Without it, only "
        "TorchScript and models of torch/bnlab module classes load.",
    ),
) -> None:
    """Fold BatchNorm into the preceding conv/linear layers of a saved model."""
    from bnlab.inference.foldfile import fold_file

    try:
        shape = tuple(int(s) for s in input_shape.split(",")) if input_shape else None
        result = fold_file(model_file, output, shape, trust_file)
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
    nproc: int = typer.Option(
        1, callback=_positive, help="Processes (ranks) on this machine: DDP + SyncBatchNorm."
    ),
    steps: int = typer.Option(200, callback=_positive, help="Training steps."),
    global_batch: int = typer.Option(
        64,
        callback=_at_least(2, "an integer >= 2 (BatchNorm needs more than one value per channel)"),
        help="Global batch size (>= 2, a multiple of --nproc), split evenly over the ranks.",
    ),
    lr: float = typer.Option(0.05, callback=_number(positive=True), help="SGD learning rate."),
    seed: int = typer.Option(
        0, callback=_non_negative, help="Seed of initialization and data order (>= 0)."
    ),
    data: str = typer.Option(
        "digits",
        callback=_one_of(_embedded),
        help="Embedded dataset: digits, mnist1d, spirals.",
    ),
    dtype: str = typer.Option(
        "float32", callback=_one_of(("float32", "float64")), help="float32 or float64."
    ),
    out: Path = typer.Option(
        Path("runs/train/loss.json"), callback=_new_file, help="Where rank 0 writes the loss curve."
    ),
    backend: str = typer.Option(
        "auto",
        callback=_one_of(("auto", "gloo", "nccl")),
        help="auto, gloo (CPU tensors) or nccl (CUDA, one GPU per rank).",
    ),
    device: str = typer.Option(
        "auto",
        callback=_one_of(("auto", "cpu", "cuda")),
        help="auto (CUDA if there is a GPU per rank, else CPU), cpu or cuda.",
    ),
) -> None:
    """Train a lab MLP with BatchNorm, on one process or data-parallel over several."""
    import json

    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    from bnlab.lab.distributed import ConfigError, DistributedConfig, launch, validate

    config = DistributedConfig(data=data, global_batch=global_batch, steps=steps, lr=lr, seed=seed, dtype=dtype, out=str(out), backend=backend, device=device)  # fmt: skip
    try:  # what depends on several options or on the data (a multiple of --nproc, ...)
        validate(config, nproc)
    except ConfigError as error:
        raise typer.BadParameter(error.message, param_hint=f"'{error.option}'") from None
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
