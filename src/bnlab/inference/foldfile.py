"""``bnlab fold``: fold the BatchNorms of a saved model file and save the result.

Full models saved with ``torch.save(model)`` are folded by :func:`bnlab.inference.fold_batchnorm`;
TorchScript files by ``torch.jit.freeze``, which folds conv–BN pairs in the script graph.

Loading is safe by default: TorchScript through ``torch.jit.load``, pickles through
``torch.load(weights_only=True)`` with an allow-list of torch's and bnlab's module classes, so
a file cannot run code while it loads. A model of user-defined classes needs full unpickling,
which runs whatever code the file holds: only with ``trust_file=True`` (``--trust-file``).
"""

from __future__ import annotations

import inspect
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from bnlab import inference
from bnlab import nn as bnn
from bnlab.files import atomic_write_bytes
from bnlab.inference.fold import fold_batchnorm
from bnlab.inference.timing import time_inference
from bnlab.nn.classes import is_batchnorm


def allowed_classes() -> list[type]:
    """The module classes a safe load may rebuild: everything ``torch.nn``, ``bnlab.nn`` and
    ``bnlab.inference`` export (their constructors are not called; their state is set)."""
    found = {}
    for namespace in (nn, bnn, inference):
        for name in dir(namespace):
            value = getattr(namespace, name)
            if inspect.isclass(value) and issubclass(value, nn.Module):
                found[value] = None
    return list(found)


def _unpickle(path: Path, trust_file: bool):
    if trust_file:  # the user said so: full unpickling runs the file's code
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(allowed_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        needs = found.group(1) if found else "a global outside the allow-list"
        raise ValueError(
            f"{path}: refused to unpickle: it needs {needs}, which is not among torch's and "
            "bnlab's module classes, and unpickling it could run any code the file holds. "
            "Pass --trust-file (trust_file=True) only for a file you trust, or save the model "
            "as TorchScript (torch.jit.save(torch.jit.trace(model, example), path))"
        ) from None


def load_model(path: Path, trust_file: bool = False) -> nn.Module | torch.jit.ScriptModule:
    """A full model from ``torch.save`` or a TorchScript file; clear errors for anything else.

    Pickles load with ``weights_only=True`` and :func:`allowed_classes`; ``trust_file=True``
    allows full unpickling, which lets the file run any code on this machine.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (expected a model saved with torch.save or torch.jit.save)")  # fmt: skip
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("/code/__torch__.py") or "/code/" in name for name in archive.namelist()):  # fmt: skip
                from bnlab import kernels

                kernels.load()  # a traced bnlab model calls the bnlab:: operators
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return torch.jit.load(str(path), map_location="cpu")
    try:
        loaded = _unpickle(path, trust_file)
    except ValueError:
        raise
    except (
        ModuleNotFoundError,
        AttributeError,
    ) as error:  # the pickle names a class not found here
        raise ValueError(
            f"{path}: the model's class cannot be imported here ({type(error).__name__}: {error}); "
            "run where the module defining it is importable (e.g. PYTHONPATH=<its folder>)"
        ) from error
    except Exception as error:
        raise ValueError(f"{path}: not a PyTorch model file ({type(error).__name__}: {error})") from error  # fmt: skip
    if isinstance(loaded, dict):
        raise ValueError(
            f"{path}: holds a dict (a state_dict?), not a model; save the whole model with "
            "torch.save(model) or torch.jit.save(torch.jit.trace(model, example))"
        )
    if not isinstance(loaded, nn.Module):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}, not a torch.nn.Module")
    return loaded


def example_input(model: nn.Module, shape: tuple[int, ...] | None) -> torch.Tensor:
    """An input for timing: ``shape`` if given, else guessed from the first conv/linear layer."""
    if shape is not None:
        return torch.randn(shape)
    for module in model.modules():
        if isinstance(module, nn.Conv1d):
            return torch.randn(8, module.in_channels, 64)
        if isinstance(module, nn.Conv2d):
            return torch.randn(8, module.in_channels, 32, 32)
        if isinstance(module, nn.Conv3d):
            return torch.randn(8, module.in_channels, 8, 16, 16)
        if isinstance(module, nn.Linear):
            return torch.randn(8, module.in_features)
    raise ValueError(
        "input_shape: cannot guess an input for this model; pass --input-shape N,C,..."
    )


def _script_batchnorm_count(module: torch.jit.ScriptModule) -> int:
    graph = module.inlined_graph if hasattr(module, "inlined_graph") else module.graph
    return sum(1 for node in graph.nodes() if node.kind() == "aten::batch_norm")


def fold_file(
    source: Path,
    target: Path,
    input_shape: tuple[int, ...] | None = None,
    trust_file: bool = False,
) -> dict:
    """Fold ``source`` into ``target``; returns what was folded and the measured speed-up.
    ``trust_file``: see :func:`load_model`."""
    model = load_model(source, trust_file)
    if isinstance(model, torch.jit.ScriptModule):
        model = model.eval()
        before = _script_batchnorm_count(model)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            folded = torch.jit.freeze(model)
            torch.jit.save(folded, buffer)
        after = _script_batchnorm_count(folded)
        summary = f"TorchScript: {before} batch_norm op(s) before, {after} after torch.jit.freeze"
        x = example_input(model, input_shape) if input_shape else None
        if x is None:
            raise ValueError(
                "input_shape: TorchScript models need --input-shape N,C,... for timing"
            )
    else:
        folded = fold_batchnorm(model.eval())
        summary = str(folded.fold_report)
        if any(is_batchnorm(m) for m in folded.modules()) and not folded.fold_report.folded:
            summary += "\n(nothing was foldable)"
        buffer = io.BytesIO()
        torch.save(folded, buffer)
        x = example_input(model, input_shape)
    atomic_write_bytes(target, buffer.getvalue())
    original_ms, folded_ms = time_inference(model, x), time_inference(folded, x)
    return {"summary": summary, "input_shape": tuple(x.shape), "original_ms": original_ms,
            "folded_ms": folded_ms, "speedup": original_ms / folded_ms}  # fmt: skip
