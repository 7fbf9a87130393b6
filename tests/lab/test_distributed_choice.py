"""Backend and device chosen together for data-parallel training; no GPU, no ports needed."""

import re

import pytest
import torch
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.lab import distributed
from bnlab.lab.distributed import DistributedConfig, choose_backend_and_device, launch

CPU = torch.device("cpu")


def test_auto_is_gloo_on_the_cpu_without_cuda():
    assert choose_backend_and_device(local_rank=1, local_world=2, cuda_devices=0) == ("gloo", CPU)


def test_auto_is_nccl_with_one_gpu_per_rank_at_local_rank():
    choice = choose_backend_and_device(local_rank=1, local_world=2, cuda_devices=2)
    assert choice == ("nccl", torch.device("cuda", 1))


def test_auto_with_fewer_gpus_than_ranks_stays_on_the_cpu_with_gloo():
    # the reported failure: nccl chosen because CUDA exists while the model stays on the CPU
    assert choose_backend_and_device(local_rank=0, local_world=2, cuda_devices=1) == ("gloo", CPU)


def test_a_named_backend_implies_its_device_and_the_reverse():
    assert choose_backend_and_device("gloo", cuda_devices=4) == ("gloo", CPU)
    assert choose_backend_and_device(device="cpu", cuda_devices=4) == ("gloo", CPU)
    assert choose_backend_and_device("nccl", cuda_devices=1) == ("nccl", torch.device("cuda", 0))
    assert choose_backend_and_device(device="cuda", cuda_devices=1)[0] == "nccl"


@pytest.mark.parametrize(
    ("backend", "device", "cuda_devices", "message"),
    [
        ("nccl", "cpu", 2, "backend: nccl reduces CUDA tensors, got device 'cpu'"),
        ("gloo", "cuda", 2, "backend: gloo is used here for CPU tensors, got device 'cuda'"),
        ("nccl", "auto", 0, "device: expected CUDA for backend 'nccl', but CUDA is not available"),
        ("auto", "cuda", 0, "device: expected CUDA for backend 'nccl', but CUDA is not available"),
        ("auto", "cuda", 1, "device: one GPU per rank needs 2 GPUs on this machine, found 1"),
        ("mpi", "auto", 0, "backend: expected one of auto, gloo, nccl, got 'mpi'"),
        ("auto", "tpu", 0, "device: expected one of auto, cpu, cuda, got 'tpu'"),
    ],
)
def test_contradictions_are_refused_with_the_argument_named(backend, device, cuda_devices, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        choose_backend_and_device(
            backend, device, local_rank=1, local_world=2, cuda_devices=cuda_devices
        )


def test_each_rank_initializes_the_chosen_backend(monkeypatch):
    """run_rank reads LOCAL_RANK/LOCAL_WORLD_SIZE and passes the choice to the process group."""
    seen = {}

    class Stop(Exception):
        pass

    def init_process_group(backend, **kwargs):
        seen.update(backend=backend, **kwargs)
        raise Stop

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "cuda_devices", lambda: 1)  # a GPU, but not one per rank
    monkeypatch.setattr(distributed.dist, "init_process_group", init_process_group)
    with pytest.raises(Stop):
        distributed.run_rank(DistributedConfig(steps=1, init_method="file:///nonexistent/store"))
    assert seen["backend"] == "gloo" and seen["rank"] == 1 and seen["world_size"] == 2
    assert seen["init_method"] == "file:///nonexistent/store"


def test_launch_refuses_before_starting_any_process(monkeypatch):
    monkeypatch.setattr(distributed, "cuda_devices", lambda: 1)
    with pytest.raises(ValueError, match="one GPU per rank needs 2 GPUs on this machine, found 1"):
        launch(DistributedConfig(device="cuda"), nproc=2)


def test_cli_train_names_the_contradiction():
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "--backend", "nccl", "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2
    assert "backend: nccl reduces CUDA tensors" in " ".join(result.output.split())
