"""Data-parallel training of a lab model on ``torch.distributed``: DistributedDataParallel with
SyncBatchNorm, gloo on CPU (nccl when every rank has a GPU).

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

Collectives time out after ``timeout`` seconds, so a rank that dies ends the others with
an error instead of a hang; ``bnlab train`` then reports which rank failed and why.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
from dataclasses import asdict, dataclass
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
    timeout: float = 60.0
    out: str | None = None  # rank 0 writes the loss curve here (JSON)
    fail_rank: int = -1  # for tests: this rank raises at fail_step
    fail_step: int = -1


def train_steps(config: DistributedConfig, rank: int = 0, world: int = 1) -> list[float]:
    """Train; returns the global mean loss of every step (the same on every rank)."""
    if config.global_batch % world:
        raise ValueError(f"global_batch: expected a multiple of the {world} ranks, got {config.global_batch}")  # fmt: skip
    dtype = getattr(torch, config.dtype)
    data = load_dataset(config.data)
    x_all = torch.from_numpy(data.x_train).to(dtype)
    y_all = torch.from_numpy(data.y_train)
    torch.manual_seed(config.seed)
    model = mlp(int(np.prod(data.input_shape)), config.hidden, data.num_classes, norm="bn").to(dtype)  # fmt: skip
    if world > 1:
        model = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(config.seed)
    per_epoch = len(y_all) // config.global_batch
    share = config.global_batch // world
    losses, order = [], torch.randperm(len(y_all), generator=generator)
    for step in range(config.steps):
        if step and step % per_epoch == 0:
            order = torch.randperm(len(y_all), generator=generator)
        start = (step % per_epoch) * config.global_batch + rank * share
        index = order[start : start + share]
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


def run_rank(config: DistributedConfig) -> list[float]:
    """One rank under torchrun-style environment variables (RANK, WORLD_SIZE, MASTER_*)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        losses = train_steps(config)
    else:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=config.timeout)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        try:
            losses = train_steps(config, rank, world)
        finally:
            dist.destroy_process_group()
    if rank == 0 and config.out:
        atomic_write_json(Path(config.out), {"config": asdict(config), "world_size": world, "loss": losses})  # fmt: skip
    return losses


def _spawned(rank: int, world: int, port: int, config: DistributedConfig) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    run_rank(config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: DistributedConfig, nproc: int) -> None:
    """Run ``nproc`` ranks on this machine; a failing rank ends them all with its error."""
    if nproc < 1:
        raise ValueError(f"nproc: expected a positive integer, got {nproc}")
    if nproc == 1:
        run_rank(config)
        return
    import torch.multiprocessing as mp

    mp.start_processes(_spawned, args=(nproc, free_port(), config), nprocs=nproc, start_method="spawn")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun -m bnlab.lab.distributed``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DistributedConfig()
    for name in ("data", "global_batch", "steps", "lr", "seed", "dtype", "timeout", "out"):
        value = getattr(defaults, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value) if value is not None else str, default=value)  # fmt: skip
    args = parser.parse_args(argv)
    losses = run_rank(DistributedConfig(**vars(args)))
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"final loss {losses[-1]:.4f} after {len(losses)} steps")


if __name__ == "__main__":
    main()
