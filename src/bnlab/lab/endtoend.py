"""End-to-end cost of BatchNorm in training: one epoch of the lab's CNN, bnlab vs torch."""

from __future__ import annotations

import statistics
import time

import torch

from bnlab.lab.models import cnn


def epoch_seconds(impl: str, *, images: int = 2048, batch_size: int = 128, channels=(32, 64), seed: int = 0) -> float:  # fmt: skip
    """Seconds for one SGD epoch of a CNN with BN on random 3×32×32 images (CIFAR-sized)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (images,), generator=generator)
    torch.manual_seed(seed)
    model = cnn((3, 32, 32), 10, channels=channels, hidden=128, norm="bn", impl=impl)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    started = time.perf_counter()
    for start in range(0, images, batch_size):
        loss = torch.nn.functional.cross_entropy(model(x[start : start + batch_size]), y[start : start + batch_size])  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def compare_epochs(repeats: int = 3, **kwargs) -> dict:
    """Median epoch time for each implementation, alternating them."""
    times: dict[str, list[float]] = {"bnlab": [], "torch": []}
    for impl in times:  # warm-up
        epoch_seconds(impl, **{**kwargs, "images": kwargs.get("batch_size", 128) * 2})
    for _ in range(repeats):
        for impl in times:
            times[impl].append(epoch_seconds(impl, **kwargs))
    result = {impl: statistics.median(values) for impl, values in times.items()}
    result["speedup"] = result["torch"] / result["bnlab"]
    return result
