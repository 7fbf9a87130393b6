"""Timing in one process: alternating candidates, medians, bootstrap intervals on ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def alternate(candidates: dict[str, Callable[[], object]], rounds: int, warmup: int, min_seconds: float = 0.0) -> dict[str, list[float]]:  # fmt: skip
    """Milliseconds per call of each candidate, ``rounds`` rounds after ``warmup`` calls each,
    and more rounds until the timed rounds have taken ``min_seconds`` (cheap cases then get
    more rounds, so tighter intervals; the number of rounds is the length of each list).

    Each round calls every candidate once, in an order rotated from round to round, so a slow
    drift of the machine or a position effect hits all candidates alike.
    """
    if rounds < 1:
        raise ValueError(f"rounds: expected at least 1, got {rounds}")
    if not min_seconds >= 0:
        raise ValueError(f"min_seconds: expected a number >= 0, got {min_seconds!r}")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    began = time.perf_counter()
    index = 0
    while index < rounds or time.perf_counter() - began < min_seconds:
        shift = index % len(names)
        index += 1
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            candidates[name]()
            times[name].append(1e3 * (time.perf_counter() - started))
    return times


def bootstrap_interval(statistic: Callable[..., float], *samples: list[float], resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of ``statistic(*samples)``, resampling whole rounds.

    ``samples`` are per-round times of several candidates (same length): one resample draws
    round indices with replacement and takes them from every candidate (a paired bootstrap).
    """
    rounds = len(samples[0])
    if any(len(s) != rounds for s in samples) or rounds == 0:
        raise ValueError(f"samples: expected equally long non-empty lists, got lengths {[len(s) for s in samples]}")  # fmt: skip
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, rounds, size=(resamples, rounds))
    values = np.array([statistic(*(a[d] for a in arrays)) for d in draws])
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def median_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    """median(numerator) / median(denominator)."""
    return float(np.median(numerator) / np.median(denominator))


def cost_ratio(ours: np.ndarray, theirs: np.ndarray, ceiling: np.ndarray) -> float:
    """(median(ours) − median(ceiling)) / (median(theirs) − median(ceiling))."""
    base = np.median(ceiling)
    return float((np.median(ours) - base) / (np.median(theirs) - base))
