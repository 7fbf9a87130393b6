"""The lab's statistics: bootstrap intervals, effect sizes, equivalence and margin decisions.

Every verdict rests on these few functions:

- :func:`bootstrap` — percentile interval of any statistic of per-cell means, resampling
  seeds (and, when given, test examples) with replacement. Cells share the resampled seeds
  and examples, so arms trained from the same seeds and scored on the same examples are
  compared paired (a two-level bootstrap over seeds × examples).
- :func:`hedges_g` — standardized effect size, bias-corrected Cohen's d.
- :func:`welch_tost` — two one-sided Welch t-tests: "the means differ by less than m".
- :func:`decide` — the decision rule of a difference with a margin, from its interval:
  better (lower end above +m), worse (upper end below −m), equivalent (inside ±m) or
  undecided (anything else).
- :func:`sensitivity` — does a decision flip at neighbouring margins or thresholds?
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float = CONFIDENCE

    def format(self, spec: str = ".3g", scale: float = 1.0, unit: str = "") -> str:
        """'91.2 [90.1, 92.5]%' (values multiplied by ``scale``, e.g. 100 for percent)."""
        e, lo, hi = (format(v * scale, spec) for v in (self.estimate, self.low, self.high))
        return f"{e} [{lo}, {hi}]{unit}"

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def bootstrap(
    cells: Sequence | np.ndarray,
    combine: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``combine(per-cell means)``.

    ``cells`` has shape (K, S) — K cells, S seeds — or (K, S, N) with N test examples per
    seed. Each resample draws S seeds and (if given) N examples with replacement, the same
    draw for every cell, and takes each cell's mean over them: a (B, K) array that
    ``combine`` maps to (B,) (default: the first cell's mean). With S = 1 only examples are
    resampled; with N absent and S = 1 the interval is the point.
    """
    values = np.asarray(cells, dtype=np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim not in (2, 3):
        raise ValueError(f"cells: expected shape (K, S) or (K, S, N), got {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence}")
    combine = combine or (lambda means: means[:, 0])
    rng = np.random.default_rng(seed)
    num_seeds = values.shape[1]
    seed_weights = rng.multinomial(num_seeds, np.full(num_seeds, 1 / num_seeds), resamples)
    seed_weights = seed_weights / num_seeds  # (B, S)
    if values.ndim == 2:
        means = np.einsum("bs,ks->bk", seed_weights, values)
        full = values.mean(axis=1)
    else:
        num_examples = values.shape[2]
        example_weights = rng.multinomial(
            num_examples, np.full(num_examples, 1 / num_examples), resamples
        ) / num_examples  # fmt: skip
        per_seed = np.einsum("ksn,bn->bks", values, example_weights)  # (B, K, S)
        means = np.einsum("bks,bs->bk", per_seed, seed_weights)
        full = values.mean(axis=(1, 2))
    estimate = float(np.asarray(combine(full[None]))[0])
    samples = np.asarray(combine(means), dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return Interval(estimate, float("nan"), float("nan"), confidence)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), confidence)


def mean_ci(values: Sequence[float] | np.ndarray, **options) -> Interval:
    """Interval of the mean of per-seed values (shape (S,)) or of (S, N) per-example values."""
    return bootstrap(np.asarray(values, dtype=np.float64)[None], **options)


def difference_ci(a: Sequence | np.ndarray, b: Sequence | np.ndarray, **options) -> Interval:
    """Interval of mean(a) − mean(b); a and b are (S,) or (S, N), paired by seed and example."""
    cells = np.stack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    return bootstrap(cells, lambda m: m[:, 0] - m[:, 1], **options)


def ratio_ci(a: Sequence | np.ndarray, b: Sequence | np.ndarray, **options) -> Interval:
    """Interval of mean(a) / mean(b), paired by seed."""
    cells = np.stack([np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)])
    with np.errstate(divide="ignore", invalid="ignore"):
        return bootstrap(cells, lambda m: m[:, 0] / m[:, 1], **options)


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Hedges' g = J · (mean a − mean b) / s_pooled, J = 1 − 3 / (4 (n_a + n_b) − 9).

    NaN when either group has fewer than 2 values or both have zero spread.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2:
        return float("nan")
    pooled = ((n_a - 1) * a.var(ddof=1) + (n_b - 1) * b.var(ddof=1)) / (n_a + n_b - 2)
    if pooled <= 0:
        return float("nan")
    correction = 1 - 3 / (4 * (n_a + n_b) - 9)
    return float(correction * (a.mean() - b.mean()) / np.sqrt(pooled))


def welch_tost(a: Sequence[float], b: Sequence[float], margin: float) -> float:
    """p-value of two one-sided Welch t-tests of |mean a − mean b| < ``margin``.

    p = max(P(T ≥ t₁), P(T ≤ t₂)) with t₁ = (d + m)/se, t₂ = (d − m)/se, d = ā − b̄,
    se² = s_a²/n_a + s_b²/n_b and Welch–Satterthwaite degrees of freedom. Small p supports
    equivalence. NaN with fewer than 2 values per group.
    """
    if margin <= 0:
        raise ValueError(f"margin: expected a positive number, got {margin}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    diff = a.mean() - b.mean()
    if se == 0:
        return 0.0 if abs(diff) < margin else 1.0
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p_lower = scipy_stats.t.sf((diff + margin) / se, dof)
    p_upper = scipy_stats.t.cdf((diff - margin) / se, dof)
    return float(max(p_lower, p_upper))


def decide(interval: Interval, margin: float = 0.0) -> str:
    """'better', 'worse', 'equivalent' or 'undecided' for a difference and its interval.

    better: low > margin; worse: high < −margin; equivalent: −margin < low and high < margin
    (with a 90% interval this is the TOST rule at 5%); undecided otherwise.
    """
    if not (np.isfinite(interval.low) and np.isfinite(interval.high)):
        return "undecided"
    if interval.low > margin:
        return "better"
    if interval.high < -margin:
        return "worse"
    if margin > 0 and -margin < interval.low and interval.high < margin:
        return "equivalent"
    return "undecided"


def sensitivity(
    rule: Callable[[float], bool | None],
    threshold: float,
    neighbours: Sequence[float],
    describe: Callable[[float], str] = lambda value: f"{value:g}",
) -> str:
    """One line: the verdict of ``rule`` at ``threshold`` and whether it flips at neighbours."""
    base = rule(threshold)
    flips = [value for value in neighbours if rule(value) != base]
    shown = ", ".join(describe(v) for v in neighbours)
    if not flips:
        return f"robust: the same verdict at thresholds {shown}"
    changed = ", ".join(f"{describe(v)} → {label(rule(v))}" for v in flips)
    return f"sensitive: flips at {changed}"


def label(supported: bool | None) -> str:
    return {True: "supported", False: "not supported", None: "inconclusive"}[supported]


def slope_weights(levels: Sequence[float]) -> np.ndarray:
    """Weights c with c · y = least-squares slope of y on ``levels`` (for trend intervals)."""
    x = np.asarray(levels, dtype=np.float64)
    centred = x - x.mean()
    return centred / np.sum(centred**2)


def exceeds(interval: Interval, threshold: float) -> bool | None:
    """A "more than ``threshold``" claim: True if the interval lies above, False if below."""
    if not (np.isfinite(interval.low) and np.isfinite(interval.high)):
        return None
    if interval.low > threshold:
        return True
    if interval.high < threshold:
        return False
    return None


def equivalent(interval: Interval, margin: float) -> bool | None:
    """A "no difference" claim with margin m: True if the interval lies inside (−m, m), False
    if it lies wholly outside (above m or below −m), None otherwise."""
    if not (np.isfinite(interval.low) and np.isfinite(interval.high)):
        return None
    if -margin < interval.low and interval.high < margin:
        return True
    if interval.low > margin or interval.high < -margin:
        return False
    return None
