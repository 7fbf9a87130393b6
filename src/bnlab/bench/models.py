"""Real-model benchmark: a training step and an eval forward of ResNet-shaped networks with
torch's BN, with bnlab's (the same model through :func:`bnlab.nn.convert`), with bnlab's and
BN → (add →) ReLU fused (``convert(model, example=x)``), and with BN replaced by identity
(the ceiling: no normalization at all).

All arms of a case are built from identical weights and timed in one process, alternating
round by round (:func:`bnlab.bench.timing.alternate`). Reported per case: medians, the
speed-ups ``torch / bnlab`` and ``torch / bnlab-fused`` with paired bootstrap intervals, and BN's cost inside the step,
``cost = arm − identity``, with ``bnlab cost / torch cost`` and its interval.

    training step  SGD (momentum 0.9, weight decay): zero_grad, forward, cross-entropy,
                   backward, step; learning rate 0, so that every round does the same work
                   on the same weights (the optimizer's arithmetic still runs) and the BN-free
                   ceiling cannot diverge
    eval           forward of the eval-mode model under ``torch.no_grad()``
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnlab import nn as bnn
from bnlab.allocator import is_tuned
from bnlab.bench.resnets import resnet
from bnlab.bench.timing import alternate, bootstrap_interval, cost_ratio, median_ratio

SIZES = {"b8-64": (8, 64), "b32-112": (32, 112)}  # name: (batch, image side)
NETWORKS = ("resnet18", "resnet50")
MODES = ("train", "eval")
ARMS = ("torch", "bnlab", "bnlab-fused", "identity")


def _without_batchnorm(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _without_batchnorm(child)
    return model


def arms(network: str, example: torch.Tensor, width: int = 64, seed: int = 0) -> dict[str, nn.Module]:  # fmt: skip
    """The arms of ``network`` (:data:`ARMS`), all with the same weights; ``example`` is an
    input for the fusion pass."""
    torch.manual_seed(seed)
    reference = resnet(network, width)
    return {
        "torch": reference,
        "bnlab": bnn.convert(copy.deepcopy(reference)),
        "bnlab-fused": bnn.convert(copy.deepcopy(reference), example=example),
        "identity": _without_batchnorm(copy.deepcopy(reference)),
    }


def step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, mode: str) -> Callable[[], float]:  # fmt: skip
    """A callable running one training step (or eval forward) of ``model``; returns the loss."""
    if mode == "eval":
        model.eval()

        def forward() -> float:
            with torch.no_grad():
                return float(F.cross_entropy(model(x), target))

        return forward
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=1e-4)

    def train_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return train_step


def bench_case(network: str, size: str, mode: str, *, rounds: int = 10, warmup: int = 2, width: int = 64, sizes: dict = SIZES, resamples: int = 2000, min_seconds: float = 0.0) -> dict:  # fmt: skip
    """Time one (network, batch and image size, mode) for every arm; a JSON-ready row."""
    batch, side = sizes[size]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, side, side, generator=generator)
    target = torch.randint(0, 1000, (batch,), generator=generator)
    models = arms(network, x, width)
    calls = {name: step(model, x, target, mode) for name, model in models.items()}
    first = {name: fn() for name, fn in calls.items()}  # also checks that every arm runs
    times = alternate(calls, rounds, warmup, min_seconds)
    t, b, fused, i = (np.asarray(times[a]) for a in ARMS)
    row = {
        "network": network, "size": size, "batch": batch, "side": side, "mode": mode,
        "rounds": len(times["torch"]), "warmup": warmup, "width": width,
        **{f"{a}_ms": float(np.median(times[a])) for a in ARMS},
        "times_ms": times,
        "first_loss": first,
        "finite": {a: bool(np.isfinite(v) and np.isfinite(calls[a]())) for a, v in first.items()},
        "speedup": median_ratio(t, b),
        "speedup_ci": bootstrap_interval(median_ratio, t, b, resamples=resamples),
        "fused_speedup": median_ratio(t, fused),
        "fused_speedup_ci": bootstrap_interval(median_ratio, t, fused, resamples=resamples),
        "identity_speedup": median_ratio(t, i),
    }  # fmt: skip
    if np.median(t) > np.median(i):  # BN's cost is measurable: compare bnlab's to torch's
        row["cost_ratio"] = cost_ratio(b, t, i)
        row["cost_ratio_ci"] = bootstrap_interval(cost_ratio, b, t, i, resamples=resamples)
        row["fused_cost_ratio"] = cost_ratio(fused, t, i)
        row["fused_cost_ratio_ci"] = bootstrap_interval(cost_ratio, fused, t, i, resamples=resamples)  # fmt: skip
    else:
        row["cost_ratio"] = row["cost_ratio_ci"] = None
        row["fused_cost_ratio"] = row["fused_cost_ratio_ci"] = None
    row["torch_bn_cost_ms"] = row["torch_ms"] - row["identity_ms"]
    row["bnlab_bn_cost_ms"] = row["bnlab_ms"] - row["identity_ms"]
    row["bnlab-fused_bn_cost_ms"] = row["bnlab-fused_ms"] - row["identity_ms"]
    return row


def run_models(networks=NETWORKS, sizes: dict = SIZES, modes=MODES, *, rounds: int = 10, warmup: int = 2, width: int = 64, resamples: int = 2000, min_seconds: float = 0.0, progress: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Every (network, size, mode); rows and the environment (threads, allocator, torch)."""
    rows = []
    for network in networks:
        for size in sizes:
            for mode in modes:
                row = bench_case(network, size, mode, rounds=rounds, warmup=warmup, width=width, sizes=sizes, resamples=resamples, min_seconds=min_seconds)  # fmt: skip
                rows.append(row)
                if progress is not None:
                    progress(_line(row))
    return {
        "rows": rows,
        "threads": torch.get_num_threads(),
        "allocator": "tuned" if is_tuned() else "default",
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "rounds": rounds,
        "min_seconds": min_seconds,
        "warmup": warmup,
    }


def _line(row: dict) -> str:
    low, high = row["speedup_ci"]
    return (
        f"{row['network']} {row['size']} {row['mode']}: torch {row['torch_ms']:.1f} ms, bnlab "
        f"{row['bnlab_ms']:.1f} ms ({row['speedup']:.3f}× [{low:.3f}, {high:.3f}]), fused "
        f"{row['bnlab-fused_ms']:.1f} ms ({row['fused_speedup']:.3f}×), BN as identity "
        f"{row['identity_ms']:.1f} ms"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
