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


def test_torchrun_entry_help_describes_the_command_and_every_option():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "bnlab.lab.distributed", "--help"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "DistributedDataParallel with SyncBatchNorm, one process per rank" in text
    assert "gloo with CPU tensors, nccl with one GPU per rank" in text
    actions = [a for a in distributed.parser()._actions if a.option_strings != ["-h", "--help"]]
    assert {a.dest for a in actions} == {"data", "global_batch", "steps", "lr", "seed", "dtype", "timeout", "out", "backend", "device", "init_method"}  # fmt: skip
    for action in actions:
        assert action.help and len(action.help) > 20, action.dest
        assert action.option_strings[0] in result.stdout


@pytest.mark.parametrize(
    ("argv", "world", "message"),
    [
        (["--steps", "0"], 1, "argument --steps: expected a positive integer, got 0"),
        (["--steps", "x"], 1, "argument --steps: expected a positive integer, got 'x'"),
        (["--global-batch", "1"], 1, "argument --global-batch: expected an integer >= 2"),
        (["--lr", "-1"], 1, "argument --lr: expected a positive finite number, got '-1'"),
        (["--timeout", "0"], 1, "argument --timeout: expected a positive finite number, got '0'"),
        (["--seed", "-1"], 1, "argument --seed: expected an integer >= 0, got -1"),
        (["--dtype", "float16"], 1, "argument --dtype: invalid choice: 'float16'"),
        (["--data", "mnist"], 1, "argument --data: invalid choice: 'mnist'"),
        (["--device", "tpu"], 1, "argument --device: invalid choice: 'tpu'"),
        (["--global-batch", "32"], 3, "argument --global-batch: expected a multiple of the 3 ranks, got 32"),
        (["--global-batch", "5000"], 1, "argument --global-batch: expected at most the"),
        (["--backend", "nccl", "--device", "cpu"], 1, "backend: nccl reduces CUDA tensors"),
    ],
)  # fmt: skip
def test_torchrun_entry_refuses_bad_values_with_the_option_named(monkeypatch, capsys, argv, world, message):  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(distributed, "run_rank", lambda config: pytest.fail("it ran"))
    with pytest.raises(SystemExit) as exit:
        distributed.main(argv)
    assert exit.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_validate_names_the_field():
    with pytest.raises(distributed.ConfigError, match="steps: expected a positive integer, got 0") as error:  # fmt: skip
        distributed.validate(DistributedConfig(steps=0))
    assert error.value.option == "--steps"
    with pytest.raises(ValueError, match="lr: expected a positive finite number, got -1"):
        launch(DistributedConfig(lr=-1), nproc=1)
