"""What an experiment is: a claim, a config dataclass, a run function returning metrics,
a verdict computed from those metrics, and plots drawn from them (never during the run)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

REGISTRY: dict[str, Experiment] = {}


@dataclass
class ExperimentConfig:
    """Fields every experiment's config has: data source, seeds, BatchNorm implementation."""

    data: str = "digits"
    data_dir: str | None = None
    seed: int = 0
    num_seeds: int = 3
    impl: str = "bnlab"


@dataclass(frozen=True)
class Verdict:
    """Whether the measured numbers support the claim (``None``: not measurable here)."""

    supported: bool | None
    summary: str

    @property
    def label(self) -> str:
        return {True: "supported", False: "not supported", None: "inconclusive"}[self.supported]


@dataclass
class Context:
    """What a running experiment may use: a logger and whether to show progress bars."""

    progress: bool = True
    lines: list[str] = field(default_factory=list)
    echo: Callable[[str], None] | None = print

    def log(self, message: str) -> None:
        self.lines.append(message)
        if self.echo is not None:
            self.echo(message)


@dataclass(frozen=True)
class Experiment:
    """A registered experiment. ``quick`` overrides the config for a CPU-minutes run."""

    name: str
    claim: str
    config_cls: type
    run: Callable[[Any, Context], dict]
    verdict: Callable[[dict], Verdict]
    plot: Callable[[dict], dict[str, Any]]
    quick: dict[str, Any]
    full_runtime: str

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


def register(experiment: Experiment) -> Experiment:
    if experiment.name in REGISTRY:
        raise ValueError(f"experiment {experiment.name!r} is registered twice")
    REGISTRY[experiment.name] = experiment
    return experiment


def seeds(base: int, count: int) -> list[int]:
    return list(range(base, base + count))


def speedup_phrase(ratio: float, unit: str) -> str:
    """'in 3.2× fewer steps', 'in 1.5× more steps', or 'never' for a ratio of 0."""
    if ratio == 0:
        return "never (within the budget)"
    if ratio >= 1:
        return f"in {ratio:.1f}× fewer {unit}"
    return f"in {1 / ratio:.1f}× more {unit}"
