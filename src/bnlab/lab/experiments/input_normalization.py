"""Gradient descent on a two-parameter least-squares problem with raw, standardized and whitened
inputs: the loss contours, the trajectories (the zig-zag) and the steps to converge."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnlab.lab.experiments.base import (
    Context,
    Experiment,
    ExperimentConfig,
    Verdict,
    register,
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
    if variant == "raw":
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
            result = descend(transform(x, variant), y, config)
            metrics["variants"][variant].append(result)
            ctx.log(f"seed {seed} {variant:12}: condition number {result['condition']:.3g}, {result['steps']} steps")  # fmt: skip
    return metrics


def verdict(metrics: dict) -> Verdict:
    steps = {v: float(np.median([r["steps"] for r in runs])) for v, runs in metrics["variants"].items()}  # fmt: skip
    capped = " (hit the step limit)" if steps["raw"] >= metrics["max_steps"] else ""
    summary = (
        f"Steps to converge (median over seeds): raw {steps['raw']:.0f}{capped}, standardized "
        f"{steps['standardized']:.0f}, whitened {steps['whitened']:.0f}. Supported needs "
        "standardized inputs to converge at least 10× faster than raw, and whitened ones no slower."
    )
    supported = steps["raw"] >= 10 * steps["standardized"] and steps["whitened"] <= steps["standardized"]  # fmt: skip
    return Verdict(bool(supported), summary)


def plot(metrics: dict) -> dict:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
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
    return {"trajectories": fig}


EXPERIMENT = register(
    Experiment(
        name="input-normalization",
        claim="Standardizing (and whitening) the inputs removes gradient descent's zig-zag: it "
        "converges in far fewer steps than on raw inputs.",
        config_cls=InputNormalizationConfig,
        run=run,
        verdict=verdict,
        plot=plot,
        quick={"num_seeds": 1},
        full_runtime="a few seconds (3 seeds × 3 input variants)",
    )
)
