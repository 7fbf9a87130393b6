"""The experiment template: a claim with its source, a config dataclass, a run function
returning metrics, a verdict computed from them (one finding per sub-claim) and captioned
figures drawn from them (never during the run).

An experiment module is::

    @dataclass
    class MyConfig(ExperimentConfig): ...           # full mode's values are the defaults

    def run(config, ctx) -> dict: ...               # data = load_data(config, ctx)
    def verdict(metrics) -> Verdict: ...            # Verdict.of([Finding(...), ...])
    def plot(metrics) -> dict: ...                  # {"key": (figure, "caption")}

    EXPERIMENT = define("name", MyConfig, run, verdict, plot, claim=..., source=...,
                        setup=..., quick={...}, full_runtime=...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.lab.errors import ConfigError
from bnlab.lab.stats import label as verdict_label

REGISTRY: dict[str, Experiment] = {}
ARMS = ("baseline", "bn")
IMPLS = ("bnlab", "torch", "identity")


@dataclass
class ExperimentConfig:
    """Fields every experiment's config has: data source, seeds, BatchNorm implementation.

    ``impl='identity'`` replaces every BatchNorm by the identity: a deliberately broken
    variant that the tests use to show a verdict can flip.
    """

    data: str = "mnist1d"
    data_dir: str | None = None
    seed: int = 0
    num_seeds: int = 5
    impl: str = "bnlab"

    def input_ranks(self) -> tuple[tuple[int, ...], str] | None:
        """The ranks of input shape the experiment's models take (2: (C, L), 3: (C, H, W)),
        and them in words; None where any input works (the models flatten it)."""
        return None

    def check(self) -> None:
        """Refuse a data source, implementation or seed count the run cannot use (a
        :class:`ConfigError` naming the field); the runner calls it before it writes anything.
        A dataset must fit the experiment's models, and a real one's files must be there."""
        from bnlab.lab.data import EMBEDDED, INPUT_SHAPES, REAL, files_problem

        if self.data not in EMBEDDED + REAL:
            raise ConfigError("data", f"expected one of {', '.join(EMBEDDED + REAL)}, got {self.data!r}")  # fmt: skip
        needs = self.input_ranks()
        if needs is not None and len(INPUT_SHAPES[self.data]) not in needs[0]:
            fitting = [name for name, shape in INPUT_SHAPES.items() if len(shape) in needs[0]]
            raise ConfigError("data", f"expected one of {', '.join(fitting)} (its models take {needs[1]}), got {self.data!r} (inputs of shape {INPUT_SHAPES[self.data]})")  # fmt: skip
        if self.data in REAL:
            if self.data_dir is None or not Path(self.data_dir).expanduser().is_dir():
                raise ConfigError("data_dir", f"dataset {self.data!r} is read from your files: expected a directory, got {self.data_dir!r}")  # fmt: skip
            problem = files_problem(self.data, self.data_dir)
            if problem is not None:
                raise ConfigError("data_dir", problem)
        if self.impl not in IMPLS:
            raise ConfigError("impl", f"expected one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.seed < 0:
            raise ConfigError("seed", f"expected an integer >= 0, got {self.seed}")
        if self.num_seeds < 1:
            raise ConfigError("num_seeds", f"expected a positive integer, got {self.num_seeds}")


CNN_INPUTS = ((2, 3), "(C, L) signals or (C, H, W) images")  # what lab.models.cnn takes


@dataclass(frozen=True)
class Finding:
    """One sub-claim: whether it holds, the numbers (with intervals), and the rule used."""

    claim: str
    supported: bool | None
    result: str
    rule: str
    sensitivity: str = ""
    context: bool = False  # reported beside the claim, outside the regime it is about

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Verdict:
    """Whether the measured numbers support the claim (``None``: undecided here)."""

    supported: bool | None
    summary: str
    findings: tuple[Finding, ...] = ()
    note: str = ""

    @classmethod
    def of(cls, findings: Sequence[Finding], note: str = "") -> Verdict:
        """All sub-claims supported → supported; any refuted → not supported; else undecided."""
        values = [f.supported for f in findings if not f.context]
        if values and all(v is True for v in values):
            supported: bool | None = True
        elif any(v is False for v in values):
            supported = False
        else:
            supported = None
        parts = [f"{f.claim}: {'context' if f.context else verdict_label(f.supported)} — {f.result}" for f in findings]  # fmt: skip
        summary = " ".join(p if p.endswith(".") else p + "." for p in parts)
        return cls(
            supported, (summary + (" " + note if note else "")).strip(), tuple(findings), note
        )

    @property
    def label(self) -> str:
        return verdict_label(self.supported)

    def in_mode(self, mode: str) -> Verdict:
        """The verdict as ``mode`` may state it. Quick mode decides a sub-claim only where the
        decision is robust (the same at the neighbouring thresholds of its sensitivity line);
        otherwise the sub-claim is left undecided there."""
        if mode != "quick" or not self.findings:
            return self
        findings = [
            dataclasses.replace(f, supported=None) if f.sensitivity.startswith("sensitive") else f
            for f in self.findings
        ]
        return Verdict.of(findings, self.note) if findings != list(self.findings) else self

    def label_in(self, mode: str) -> str:
        """The label, saying 'inconclusive in quick mode' where quick mode cannot decide."""
        verdict = self.in_mode(mode)
        return "inconclusive in quick mode" if mode == "quick" and verdict.supported is None else verdict.label  # fmt: skip


@dataclass
class Context:
    """What a running experiment may use: a logger, progress bars, the data it used."""

    progress: bool = True
    lines: list[str] = field(default_factory=list)
    echo: Callable[[str], None] | None = print
    datasets: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        self.lines.append(message)
        if self.echo is not None:
            self.echo(message)


@dataclass(frozen=True)
class Experiment:
    """A registered experiment. ``quick`` overrides the config for a CPU-minutes run;
    ``setup`` is a paragraph formatted with the config's fields; ``timed``: its sub-claims
    are decided from measured times, which vary between runs (every other number is seeded)."""

    name: str
    claim: str
    config_cls: type
    run: Callable[[Any, Context], dict]
    verdict: Callable[[dict], Verdict]
    plot: Callable[[dict], dict[str, Any]]
    quick: dict[str, Any]
    full_runtime: str
    source: str = ""
    setup: str = ""
    timed: bool = False

    def make_config(self, quick: bool = True, **overrides: Any):
        """The config for quick or full mode, with ``overrides`` (unknown keys are an error)."""
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown config field(s) {unknown}; known: {sorted(fields)}"
            )
        values = {**(self.quick if quick else {}), **overrides}
        return self.config_cls(**values)

    def describe_setup(self, config: dict) -> str:
        """The setup paragraph for a saved config (a dict of its fields)."""
        try:
            return self.setup.format(**config)
        except (KeyError, IndexError, ValueError):
            return self.setup


def register(experiment: Experiment) -> Experiment:
    if experiment.name in REGISTRY:
        raise ValueError(f"experiment {experiment.name!r} is registered twice")
    REGISTRY[experiment.name] = experiment
    return experiment


def define(name: str, config_cls: type, run, verdict, plot, **fields: Any) -> Experiment:
    """Build and register an :class:`Experiment` (the last line of every experiment module)."""
    return register(Experiment(name=name, config_cls=config_cls, run=run, verdict=verdict, plot=plot, **fields))  # fmt: skip


def seeds(base: int, count: int) -> list[int]:
    return list(range(base, base + count))


def norm_of(arm: str, impl: str) -> tuple[str, str]:
    """(norm, impl) for an arm: 'baseline' has none; ``impl='identity'`` breaks BN on purpose."""
    if arm == "baseline" or impl == "identity":
        return "none", "bnlab"
    return "bn", impl


def load_data(config: ExperimentConfig, ctx: Context, **options: Any):
    """The config's dataset, logged and recorded in the run's metrics."""
    from bnlab.lab.data import load_dataset

    data = load_dataset(config.data, config.data_dir, **options)
    description = data.describe()
    if description not in ctx.datasets:
        ctx.datasets.append(description)
        ctx.log(description)
    return data


def figure(ncols: int = 1, nrows: int = 1, figsize: tuple[float, float] = (6, 4), **options: Any):
    """``(figure, axes)`` drawn by the Agg canvas directly: no pyplot, no global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **options)
    return fig, axes


def speedup_phrase(ratio: float, unit: str) -> str:
    """'in 3.2× fewer steps', 'in 1.5× more steps', or 'never' for a ratio of 0."""
    if ratio == 0:
        return "never (within the budget)"
    if ratio >= 1:
        return f"in {ratio:.1f}× fewer {unit}"
    return f"in {1 / ratio:.1f}× more {unit}"
