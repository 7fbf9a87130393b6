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
import functools
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bnlab.files import atomic_write_json
from bnlab.lab.data import EMBEDDED, load_dataset
from bnlab.lab.errors import ConfigError
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
DTYPES = ("float32", "float64")
DATASETS = EMBEDDED  # the embedded datasets (no --data-dir here)


@functools.cache
def _train_examples(name: str) -> int:
    """The size of an embedded dataset's training split (loaded once per process)."""
    return len(load_dataset(name).y_train)


def validate(config: DistributedConfig, world: int = 1, examples: int | None = None) -> None:
    """Refuse a config that cannot train on ``world`` ranks, before any process starts.

    Raises :class:`ConfigError` naming the field: a name outside its choices, a count that is
    not positive, a learning rate or timeout that is not a positive finite number, a global
    batch under 2 (BatchNorm needs more than one value per channel), not a multiple of the
    ranks, or larger than the training split (``examples``; if not given, the dataset is
    loaded to count them, once per process).
    """
    for field, choices in (("data", DATASETS), ("dtype", DTYPES), ("backend", BACKENDS), ("device", DEVICES)):  # fmt: skip
        value = getattr(config, field)
        if value not in choices:
            raise ConfigError(field, f"expected one of {', '.join(choices)}, got {value!r}")
    for field, minimum, what in (("steps", 1, "a positive integer"), ("global_batch", 2, "an integer >= 2 (BatchNorm needs more than one value per channel)"), ("seed", 0, "an integer >= 0")):  # fmt: skip
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(field, f"expected {what}, got {value!r}")
    for field in ("lr", "timeout"):
        value = getattr(config, field)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(field, f"expected a positive finite number, got {value!r}")
    if config.global_batch % world:
        raise ConfigError("global_batch", f"expected a multiple of the {world} ranks, got {config.global_batch}")  # fmt: skip
    examples = _train_examples(config.data) if examples is None else examples
    if config.global_batch > examples:
        raise ConfigError("global_batch", f"expected at most the {examples} training examples of {config.data}, got {config.global_batch}")  # fmt: skip


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
    data = load_dataset(config.data) if config.data in DATASETS else None
    validate(config, world, None if data is None else len(data.y_train))
    dtype = getattr(torch, config.dtype)
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


def _environment() -> tuple[int, int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them (one process
    without them)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return rank, world, int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world))  # fmt: skip


def run_rank(config: DistributedConfig) -> list[float]:
    """One rank under torchrun-style environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_*)."""
    rank, world, local_rank, local_world = _environment()
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
    validate(config, nproc)
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


def _positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _batch(text: str) -> int:
    return _integer(text, 2, "an integer >= 2 (BatchNorm needs more than one value per channel)")


def _non_negative_int(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    """The options of ``torchrun ... -m bnlab.lab.distributed`` (those of ``bnlab train``
    but ``--nproc``: torchrun starts the processes)."""
    described = argparse.ArgumentParser(
        prog="torchrun [TORCHRUN OPTIONS] -m bnlab.lab.distributed",
        description="Data-parallel training of a lab MLP with BatchNorm on torch.distributed: "
        "DistributedDataParallel with SyncBatchNorm, one process per rank, each rank training "
        "on an equal share of every global batch; rank 0 prints the final loss and writes "
        "the loss curve to --out. The backend and device are chosen together: gloo with CPU "
        "tensors, nccl with one GPU per rank (cuda:LOCAL_RANK).",
        epilog="Example: torchrun --standalone --nproc-per-node 2 -m bnlab.lab.distributed "
        "--steps 200. On one machine, `bnlab train --nproc N` starts the processes itself.",
    )
    defaults = DistributedConfig()
    add = described.add_argument
    add("--data", choices=DATASETS, default=defaults.data, help=f"embedded dataset (default {defaults.data})")  # fmt: skip
    add("--global-batch", type=_batch, default=defaults.global_batch, metavar="N", help=f"global batch size, split evenly over the ranks: at least 2, a multiple of the number of ranks, at most the training examples (default {defaults.global_batch})")  # fmt: skip
    add("--steps", type=_positive_int, default=defaults.steps, metavar="N", help=f"training steps, a positive integer (default {defaults.steps})")  # fmt: skip
    add("--lr", type=_positive_number, default=defaults.lr, metavar="LR", help=f"SGD learning rate (momentum 0.9), a positive number (default {defaults.lr})")  # fmt: skip
    add("--seed", type=_non_negative_int, default=defaults.seed, metavar="N", help=f"seed of initialization and data order, an integer >= 0 (default {defaults.seed})")  # fmt: skip
    add("--dtype", choices=DTYPES, default=defaults.dtype, help=f"floating-point type of the model and data (default {defaults.dtype})")  # fmt: skip
    add("--timeout", type=_positive_number, default=defaults.timeout, metavar="SECONDS", help=f"collectives time out after this many seconds, so that a rank that dies stops the others (default {defaults.timeout:g})")  # fmt: skip
    add("--out", default=defaults.out, metavar="PATH", help="where rank 0 writes the loss curve (JSON); default: not written")  # fmt: skip
    add("--backend", choices=BACKENDS, default=defaults.backend, help="process-group backend: auto (the one for the device), gloo (CPU tensors) or nccl (CUDA tensors, one GPU per rank)")  # fmt: skip
    add("--device", choices=DEVICES, default=defaults.device, help="auto (CUDA if this machine has a GPU for every local rank, else the CPU), cpu or cuda")  # fmt: skip
    add("--init-method", default=defaults.init_method, metavar="URL", help="rendezvous URL such as file:///tmp/store or tcp://HOST:PORT (default env://, as torchrun sets it)")  # fmt: skip
    return described


def main(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun -m bnlab.lab.distributed``."""
    options = parser()
    config = DistributedConfig(**vars(options.parse_args(argv)))
    rank, world, local_rank, local_world = _environment()
    try:  # refuse what cannot work with the option's name, before the process group starts
        validate(config, world)
        choose_backend_and_device(config.backend, config.device, local_rank=local_rank, local_world=local_world, cuda_devices=cuda_devices())  # fmt: skip
    except ConfigError as error:
        options.error(f"argument {error.option}: {error.message}")
    except ValueError as error:
        options.error(str(error))
    losses = run_rank(config)
    if rank == 0:
        print(f"final loss {losses[-1]:.4f} after {len(losses)} steps")


if __name__ == "__main__":
    main()
