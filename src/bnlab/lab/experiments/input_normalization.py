"""Gradient descent on a two-parameter least-squares problem with raw, standardized and whitened
inputs: the loss contours, the trajectories (the zig-zag), the steps to converge and the
condition number of the Hessian that decides them.

Standardizing rescales and centres each feature but keeps their correlation ρ: the Hessian
of standardized inputs is [[1, ρ], [ρ, 1]] with condition number (1 + ρ)/(1 − ρ) (≈ 39 at
ρ = 0.95), so the zig-zag remains. Only whitening (decorrelation) makes it 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.lab import stats
from bnlab.lab.experiments.base import (
    Context,
    ExperimentConfig,
    Finding,
    Verdict,
    define,
    figure,
    seeds,
)

VARIANTS = ("raw", "standardized", "whitened")


@dataclass
class InputNormalizationConfig(ExperimentConfig):
    samples: int = 500
    max_steps: int = 20000
    tolerance: float = 1e-8  # converged: loss - optimum below this, relative to the optimum
    record_every: int = 1


def make_problem(seed: int, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated features on different scales with an offset: x1 ~ 5 + 3 z, x2 ~ x1/3 + noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=samples)
    x = np.stack([5 + 3 * z, 0.3 * z + 0.1 * rng.normal(size=samples) + 1.0], axis=1)
    y = x @ np.array([1.5, -2.0]) + 0.1 * rng.normal(size=samples)
    return x, y


def transform(x: np.ndarray, variant: str) -> np.ndarray:
    """The inputs as ``variant`` says: raw, standardized (per feature) or ZCA-whitened."""
    if variant in ("raw", "broken"):
        return x
    centred = x - x.mean(0)
    if variant == "standardized":
        return centred / centred.std(0)
    values, vectors = np.linalg.eigh(np.cov(centred, rowvar=False, bias=True))
    return centred @ vectors @ np.diag(values**-0.5) @ vectors.T  # ZCA


def descend(x: np.ndarray, y: np.ndarray, config: InputNormalizationConfig) -> dict:
    """Gradient descent on ½·mean((x w − y)²) from w = 0 with the best fixed step for a
    quadratic, 2/(λ_max + λ_min): it overshoots along the steep direction (the zig-zag)
    whenever the curvatures differ."""
    centred = np.abs(x.mean(0)).max() < 1e-9  # no intercept: centred inputs need a centred y
    target = y - y.mean() if centred else y
    hessian = x.T @ x / len(y)
    eigenvalues = np.linalg.eigvalsh(hessian)
    optimum_w = np.linalg.solve(hessian, x.T @ target / len(y))
    optimum = 0.5 * np.mean((x @ optimum_w - target) ** 2)
    lr, w = 2.0 / (eigenvalues.max() + eigenvalues.min()), np.zeros(2)
    path, steps = [w.copy()], config.max_steps
    for step in range(1, config.max_steps + 1):
        w = w - lr * (x.T @ (x @ w - target) / len(y))
        if step % config.record_every == 0 and len(path) < 2000:
            path.append(w.copy())
        if 0.5 * np.mean((x @ w - target) ** 2) - optimum <= config.tolerance * max(optimum, 1e-12):
            steps = step
            break
    return {"steps": steps, "condition": float(eigenvalues.max() / eigenvalues.min()),
            "path": np.array(path).tolist(), "optimum_w": optimum_w.tolist(), "hessian": hessian.tolist()}  # fmt: skip


def run(config: InputNormalizationConfig, ctx: Context) -> dict:
    metrics: dict = {"variants": {v: [] for v in VARIANTS}, "max_steps": config.max_steps}
    for seed in seeds(config.seed, config.num_seeds):
        x, y = make_problem(seed, config.samples)
        for variant in VARIANTS:
            # impl='identity' is the deliberately broken variant: normalization does nothing
            applied = "broken" if config.impl == "identity" else variant
            result = descend(transform(x, applied), y, config)
            metrics["variants"][variant].append(result)
            ctx.log(f"seed {seed} {variant:12}: condition number {result['condition']:.3g}, {result['steps']} steps")  # fmt: skip
    return metrics


def _interval(metrics: dict, variant: str, key: str, log: bool = True) -> stats.Interval:
    values = np.array([r[key] for r in metrics["variants"][variant]], dtype=float)
    interval = stats.mean_ci(np.log10(values) if log else values)
    return stats.Interval(*(10**v for v in (interval.estimate, interval.low, interval.high))) if log else interval  # fmt: skip


def verdict(metrics: dict) -> Verdict:
    steps = {v: _interval(metrics, v, "steps") for v in VARIANTS}
    cond = {v: _interval(metrics, v, "condition") for v in VARIANTS}
    raw = np.log10([r["steps"] for r in metrics["variants"]["raw"]])
    ratio_log = stats.mean_ci(raw - np.log10([r["steps"] for r in metrics["variants"]["standardized"]]))  # fmt: skip
    ratio = stats.Interval(*(10**v for v in (ratio_log.estimate, ratio_log.low, ratio_log.high)))
    capped = " (raw hit the step limit)" if max(r["steps"] for r in metrics["variants"]["raw"]) >= metrics["max_steps"] else ""  # fmt: skip

    def above(interval, threshold):
        return True if interval.low > threshold else False if interval.high < threshold else None

    def below(interval, threshold):
        return True if interval.high < threshold else False if interval.low > threshold else None

    def numbers(v):
        return f"{v}: {steps[v].format('.0f')} steps, condition number {cond[v].format('.3g')}"

    findings = [
        Finding("standardized inputs converge ≥ 10× faster than raw ones", above(ratio, 10),
                f"raw / standardized steps {ratio.format('.3g')}×{capped}; {numbers('raw')}; {numbers('standardized')}",
                "geometric mean over seeds; supported if the interval's lower end exceeds 10×, refuted if its upper end is below",
                stats.sensitivity(lambda t: above(ratio, t), 10, (3, 30), lambda t: f"{t:g}×")),
        Finding("standardizing removes the zig-zag (condition number below 2)", below(cond["standardized"], 2),
                f"{numbers('standardized')} — standardizing keeps the features' correlation",
                "supported if the condition number's interval lies below 2, refuted if above",
                stats.sensitivity(lambda t: below(cond["standardized"], t), 2, (1.5, 5), lambda t: f"{t:g}")),
        Finding("whitening removes the zig-zag (condition number below 2)", below(cond["whitened"], 2),
                numbers("whitened"), "supported if the condition number's interval lies below 2, refuted if above",
                stats.sensitivity(lambda t: below(cond["whitened"], t), 2, (1.5, 5), lambda t: f"{t:g}")),
    ]  # fmt: skip
    return Verdict.of(
        findings, "Standardizing is what BN does per feature; it does not decorrelate."
    )


def plot(metrics: dict) -> dict:
    fig, axes = figure(3, 1, (15, 4.5))
    for ax, variant in zip(axes, VARIANTS, strict=True):
        run = metrics["variants"][variant][0]
        path, optimum = np.array(run["path"]), np.array(run["optimum_w"])
        hessian = np.array(run["hessian"])
        span = np.full(
            2, np.abs(path - optimum).max() * 1.2 + 1e-3
        )  # equal axes: circles look round
        g1, g2 = np.meshgrid(np.linspace(optimum[0] - span[0], optimum[0] + span[0], 120),
                             np.linspace(optimum[1] - span[1], optimum[1] + span[1], 120))  # fmt: skip
        d = np.stack([g1 - optimum[0], g2 - optimum[1]], -1)
        excess = 0.5 * np.einsum("...i,ij,...j->...", d, hessian, d)  # loss above the optimum
        ax.contour(g1, g2, np.log10(excess + 1e-12), levels=20, cmap="viridis")
        ax.plot(
            path[:30, 0], path[:30, 1], "r.-", markersize=3, linewidth=0.8
        )  # the first 30 steps
        ax.plot(*optimum, "k*", markersize=10)
        ax.set_aspect("equal")
        ax.set(title=f"{variant}: {run['steps']} steps (condition {run['condition']:.3g})", xlabel="w1", ylabel="w2")  # fmt: skip
    caption = ("Loss contours (log of the excess loss, first seed) and the first 30 gradient-descent "
               "steps (red) from w = 0 with step 2/(λmax + λmin); the star is the optimum. Equal axes: "
               "round contours mean condition number 1.")  # fmt: skip
    return {"trajectories": (fig, caption)}


EXPERIMENT = define(
    "input-normalization", InputNormalizationConfig, run, verdict, plot,
    claim="Standardizing the inputs makes gradient descent converge far faster than on raw "
    "inputs, and (with whitening) removes its zig-zag.",
    source="LeCun et al. 1998, 'Efficient BackProp' §4.3; Ioffe & Szegedy 2015 §2 (whitening vs per-feature normalization)",
    setup="Least squares with two features x1 = 5 + 3z, x2 = 1 + 0.3z + 0.1ε ({samples} samples, "
    "{num_seeds} seeds); full-batch gradient descent from w = 0 with the optimal fixed step "
    "2/(λmax + λmin) until the excess loss is below {tolerance:g} of the optimum (at most {max_steps} steps).",
    quick={"num_seeds": 3},
    full_runtime="measured 0.6 CPU-minutes on one thread (2 min wall on the shared, loaded 2-core machine)",
)  # fmt: skip
