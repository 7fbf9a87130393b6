"""Data-parallel training of a lab model on ``torch.distributed``: DistributedDataParallel with
SyncBatchNorm; backend and device chosen together (gloo with CPU tensors, nccl with one GPU
per rank).

Every step draws one global batch from a seeded permutation, exactly as the single-process
run does, and gives each rank an equal contiguous share; SyncBatchNorm normalizes over the
whole global batch and DDP averages the gradients of the per-rank mean losses, so with the
same global batch and seed the loss curve matches the single-process run (up to the order
of floating-point sums).

Launch with ``bnlab train --nproc N`` (processes on this machine) or with ``torchrun``::

    torchrun --nproc-per-node 2 -m bnlab.lab.distributed --steps 200
    # several machines: the same command on each, with --nnodes, --node-rank and a
    # rendezvous endpoint: torchrun --nnodes 2 --node-rank 0 --rdzv-backend c10d \\
    #   --rdzv-endpoint HOST:29500 --nproc-per-node 8 -m bnlab.lab.distributed ...

Backend and device (``--backend``, ``--device``; see :func:`choose_backend_and_device`): by
default nccl on ``cuda:LOCAL_RANK`` when this machine has a GPU for every local rank, else gloo
on the CPU; naming one picks the other; a contradiction (nccl with CPU tensors, gloo with CUDA
tensors, more local ranks than GPUs) is refused before any process starts.

Collectives time out after ``timeout`` seconds, so a rank that dies ends the others with
an error instead of a hang; ``bnlab train`` then reports which rank failed and why.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bnlab.files import atomic_write_json
from bnlab.lab.data import load_dataset
from bnlab.lab.models import mlp
from bnlab.nn import convert_sync_batchnorm


@dataclass
class DistributedConfig:
    data: str = "digits"
    hidden: tuple[int, ...] = (64, 64)
    global_batch: int = 64
    steps: int = 200
    lr: float = 0.05
    seed: int = 0
    dtype: str = "float32"
    timeout: float = 300.0  # bounds a hang; a failing rank stops the others at once
    backend: str = "auto"  # auto, gloo or nccl
    device: str = "auto"  # auto, cpu or cuda (cuda:LOCAL_RANK: one GPU per rank)
    init_method: str | None = None  # rendezvous, e.g. file:///tmp/store (default env://)
    out: str | None = None  # rank 0 writes the loss curve here (JSON)
    fail_rank: int = -1  # for tests: this rank raises at fail_step
    fail_step: int = -1


BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")


def choose_backend_and_device(
    backend: str = "auto",
    device: str = "auto",
    *,
    local_rank: int = 0,
    local_world: int = 1,
    cuda_devices: int = 0,
) -> tuple[str, torch.device]:
    """The process-group backend and this rank's device, chosen together.

    gloo reduces CPU tensors, nccl CUDA tensors with one GPU per rank (``cuda:LOCAL_RANK``).
    ``auto`` device: CUDA when there is a GPU for each of the ``local_world`` ranks on this
    machine, else the CPU; ``auto`` backend: the one for the device (a named backend implies
    its device). ``cuda_devices`` is how many GPUs this process sees (0 without CUDA), passed
    in so that the choice is a pure function. Raises ``ValueError`` on a contradiction.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if not 0 <= local_rank < local_world:
        raise ValueError(f"local_rank: expected 0 <= local_rank < local_world = {local_world}, got {local_rank}")  # fmt: skip
    if device == "auto":
        implied = {"nccl": "cuda", "gloo": "cpu"}.get(backend)
        device = implied or ("cuda" if cuda_devices >= local_world else "cpu")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device != "cuda":
        raise ValueError("backend: nccl reduces CUDA tensors, got device 'cpu' (use gloo for CPU tensors)")  # fmt: skip
    if backend == "gloo" and device != "cpu":
        raise ValueError("backend: gloo is used here for CPU tensors, got device 'cuda' (use nccl: one GPU per rank)")  # fmt: skip
    if device == "cpu":
        return backend, torch.device("cpu")
    if cuda_devices == 0:
        raise ValueError(f"device: expected CUDA for backend {backend!r}, but CUDA is not available (use --device cpu)")  # fmt: skip
    if local_rank >= cuda_devices:
        raise ValueError(f"device: one GPU per rank needs {local_world} GPUs on this machine, found {cuda_devices} (use fewer processes or --device cpu)")  # fmt: skip
    return backend, torch.device("cuda", local_rank)


def cuda_devices() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_steps(
    config: DistributedConfig, rank: int = 0, world: int = 1, device: torch.device | None = None
) -> list[float]:
    """Train on ``device`` (default CPU); returns the global mean loss of every step (the same
    on every rank)."""
    if config.global_batch % world:
        raise ValueError(f"global_batch: expected a multiple of the {world} ranks, got {config.global_batch}")  # fmt: skip
    dtype = getattr(torch, config.dtype)
    data = load_dataset(config.data)
    device = torch.device("cpu") if device is None else device
    x_all = torch.from_numpy(data.x_train).to(device, dtype)
    y_all = torch.from_numpy(data.y_train).to(device)
    torch.manual_seed(config.seed)
    model = mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes, norm="bn").to(device, dtype)  # fmt: skip
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(model), device_ids=ids)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(config.seed)
    per_epoch = len(y_all) // config.global_batch
    share = config.global_batch // world
    losses, order = [], torch.randperm(len(y_all), generator=generator)
    for step in range(config.steps):
        if step and step % per_epoch == 0:
            order = torch.randperm(len(y_all), generator=generator)
        start = (step % per_epoch) * config.global_batch + rank * share
        index = order[start : start + share].to(device)
        if rank == config.fail_rank and step == config.fail_step:
            raise RuntimeError(f"rank {rank} failed on purpose at step {step}")
        loss = nn.functional.cross_entropy(model(x_all[index]), y_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mean_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(mean_loss.item())
    return losses


def drain_before_destroy() -> None:
    """A barrier before ``destroy_process_group`` on the success path.

    torch before 2.8 destroys a gloo group while holding the GIL and joins its worker threads;
    a worker still freeing a finished collective whose tensors were last held by Python needs
    the GIL, and both wait forever (pytorch/pytorch#154976; seen here with torch 2.6 under
    load). The barrier waits with the GIL released, so the workers finish first.
    """
    dist.barrier()


def run_rank(config: DistributedConfig) -> list[float]:
    """One rank under torchrun-style environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_*)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend, device = choose_backend_and_device(
        config.backend, config.device, local_rank=local_rank, local_world=local_world,
        cuda_devices=cuda_devices(),
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        losses = train_steps(config, device=device)
    else:
        timeout = datetime.timedelta(seconds=config.timeout)
        init = {"init_method": config.init_method} if config.init_method else {}
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **init)
        try:
            losses = train_steps(config, rank, world, device)
            drain_before_destroy()
        finally:
            dist.destroy_process_group()
    if rank == 0 and config.out:
        atomic_write_json(Path(config.out), {"config": asdict(config), "world_size": world, "loss": losses})  # fmt: skip
    return losses


def _spawned(rank: int, world: int, config: DistributedConfig) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world)})  # fmt: skip
    torch.set_num_threads(1)
    run_rank(config)


def launch(config: DistributedConfig, nproc: int) -> None:
    """Run ``nproc`` ranks on this machine; a failing rank ends them all with its error.

    Unless ``config.init_method`` says otherwise, the ranks meet through a file in a fresh
    temporary directory, not a TCP port: a port found free can be taken by another program
    before rank 0 binds it (then the ranks fail, or join a stranger's group)."""
    if nproc < 1:
        raise ValueError(f"nproc: expected a positive integer, got {nproc}")
    # refuse a contradiction here, with its message, rather than in every rank
    choose_backend_and_device(config.backend, config.device, local_rank=nproc - 1, local_world=nproc, cuda_devices=cuda_devices())  # fmt: skip
    if nproc == 1:
        run_rank(config)
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bnlab-rendezvous-") as folder:
        if config.init_method is None:
            config = replace(config, init_method=f"file://{folder}/store")
        mp.start_processes(_spawned, args=(nproc, config), nprocs=nproc, start_method="spawn")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun -m bnlab.lab.distributed``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DistributedConfig()
    for name in ("data", "global_batch", "steps", "lr", "seed", "dtype", "timeout", "out", "backend", "device", "init_method"):  # fmt: skip
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value) if value is not None else str, default=value)  # fmt: skip
    args = parser.parse_args(argv)
    losses = run_rank(DistributedConfig(**vars(args)))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"final loss {losses[-1]:.4f} after {len(losses)} steps")


if __name__ == "__main__":
    main()
