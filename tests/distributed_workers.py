"""Worker functions for the multi-process tests (importable by spawned processes).

The ranks meet through a ``FileStore`` in the test's own tmp dir, never a TCP port: a port
found free by one process can be taken by another before rank 0 binds it (any test suite
running beside this one), and then the ranks fail or join a foreign group. Collectives get
a generous timeout: a rank that really fails ends the others through
``torch.multiprocessing`` at once, so the timeout only bounds a genuine hang and must not
fire because a loaded machine is slow.
"""

import contextlib
import datetime

import torch
import torch.distributed as dist

from bnlab.lab.distributed import drain_before_destroy

TIMEOUT = datetime.timedelta(minutes=10)


@contextlib.contextmanager
def _group(rank: int, world: int, out_dir: str):
    """A gloo process group whose rendezvous is a file in ``out_dir``, for the block."""
    init = f"file://{out_dir}/rendezvous"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        yield
        drain_before_destroy()  # torch < 2.8 can deadlock in destroy otherwise
    finally:
        dist.destroy_process_group()


def sync_bn_worker(rank: int, world: int, sizes: list[int], seed: int, out_dir: str, passes: str = "torch") -> None:  # fmt: skip
    """Run SyncBatchNorm on this rank's slice of a seeded global batch; save what it saw.

    ``passes="triton"``: the per-rank passes on bnlab's Triton kernels, interpreted on the CPU
    (as SyncBatchNorm uses them for CUDA tensors)."""
    from bnlab.nn import SyncBatchNorm, sync

    if passes == "triton":
        from bnlab.kernels.cuda import ops

        sync._passes = lambda input: ops

    with _group(rank, world, out_dir):
        g = torch.Generator().manual_seed(seed)
        total = sum(sizes)
        x = torch.randn(total, 3, 4, 5, generator=g, dtype=torch.float64) * 2 + 1e3
        dy = torch.randn(total, 3, 4, 5, generator=g, dtype=torch.float64)
        start = sum(sizes[:rank])
        local = x[start : start + sizes[rank]].clone().requires_grad_()
        bn = SyncBatchNorm(3, momentum=0.3, dtype=torch.float64)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        out = bn(local)
        out.backward(dy[start : start + sizes[rank]])
        torch.save({"out": out.detach(), "grad": local.grad, "weight_grad": bn.weight.grad,
                    "bias_grad": bn.bias.grad, "running_mean": bn.running_mean,
                    "running_var": bn.running_var, "count": bn.num_batches_tracked,
                    "passes": getattr(sync._passes(local), "__name__", "torch ops")}, f"{out_dir}/rank{rank}.pt")  # fmt: skip


def sync_bn_expect_error(rank: int, world: int, out_dir: str) -> None:
    """Batches SyncBatchNorm refuses must fail on every rank, not hang, and not be counted:
    a global batch of one value per channel, and a NaN (on rank 0 only) under 'raise'."""
    from bnlab.nn import SyncBatchNorm

    with _group(rank, world, out_dir):
        bn = SyncBatchNorm(2, nonfinite="raise")
        messages = []
        nan = torch.tensor([[float("nan"), 0.0]]) if rank == 0 else torch.zeros(0, 2)
        for local in (torch.randn(1 if rank == 0 else 0, 2), torch.cat([torch.randn(3, 2), nan])):
            try:
                bn(local)
                messages.append("no error")
            except (ValueError, FloatingPointError) as error:
                messages.append(f"{type(error).__name__}: {error}")
        messages.append(f"counted {int(bn.num_batches_tracked)}")
        with open(f"{out_dir}/rank{rank}.txt", "w") as handle:
            handle.write("\n".join(messages))


def sync_bn_foreign_group(rank: int, world: int, out_dir: str) -> None:
    """Rank 1 uses a process group that does not contain it: a clear error, not a silent BN."""
    from bnlab.nn import SyncBatchNorm

    with _group(rank, world, out_dir):
        group = dist.new_group([0])
        message = "no error"
        if rank == 1:
            try:
                SyncBatchNorm(2, process_group=group)(torch.randn(4, 2))
            except ValueError as error:
                message = str(error)
        with open(f"{out_dir}/rank{rank}.txt", "w") as handle:
            handle.write(message)
