"""Export: torch's BatchNorm classes for exporters and TorchScript, ONNX export and a run of
the exported file in onnxruntime."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from bnlab.files import atomic_write_bytes
from bnlab.inference.fold import fold_batchnorm
from bnlab.inference.freeze import FrozenBatchNormAct, _FrozenBatchNorm
from bnlab.inference.tail import AfterBatchNorm, split_batchnorm
from bnlab.inference.tree import set_submodule
from bnlab.nn.classes import (
    batchnorm_class,
    batchnorm_dims,
    dims_for_rank,
    input_ranks,
    is_batchnorm,
    is_plain_batchnorm,
)

_RANKS_TO_DIMS = {(2, 3): 1, (4,): 2, (5,): 3}
_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class BatchNormThen(nn.Module):
    """torch's BatchNorm, then what a BN+activation module applied after BN:
    ``after(bn(input), residual)`` (the export form of a BN+act module)."""

    def __init__(self, bn: nn.Module, after: AfterBatchNorm) -> None:
        super().__init__()
        self.bn, self.after = bn, after

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.after(self.bn(input), residual)


def _split(module: nn.Module) -> tuple[bool, AfterBatchNorm | None]:
    """``(replace, after)``: whether ``module`` becomes torch's BN, and what follows its BN.

    bnlab's plain BN layers and frozen BNs are replaced; bnlab's BN+activation modules and
    frozen ones too, as :class:`BatchNormThen`; torch's layers and any subclass that does more
    than BN + ``drop`` + ``act`` stay as they are."""
    if isinstance(module, FrozenBatchNormAct):
        return True, AfterBatchNorm(module.drop, module.act)
    if isinstance(module, _FrozenBatchNorm):
        return type(module).forward is _FrozenBatchNorm.forward, None
    if not is_batchnorm(module) or isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False, None
    if is_plain_batchnorm(module):
        return True, None
    if module.running_mean is None:
        return False, None
    after, reason = split_batchnorm(module)
    return reason is None, after


def _dims(module: nn.Module) -> int | None:
    if isinstance(module, _FrozenBatchNorm):  # frozen forms carry their ranks per instance
        return _RANKS_TO_DIMS.get(tuple(module._expected_dims))
    return batchnorm_dims(module)


def to_torch_batchnorm(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """A copy in which bnlab's BatchNorm and frozen BN layers are torch's BatchNormNd of the
    same dims (same state), so that exporters and TorchScript, which know torch's layers, can
    handle the model; a BN+activation module becomes :class:`BatchNormThen`. Layers that take
    any rank (SyncBatchNorm) get the dims of the input they see on ``example``; without it
    they are a ``ValueError``."""
    target = copy.deepcopy(model)
    replace = [(name, m, *_split(m)) for name, m in target.named_modules()]
    ranks = None
    for name, module, replaced, after in replace:
        if not replaced:
            continue
        dims = _dims(module)
        if dims is None:
            if example is None:
                raise ValueError(
                    f"example: {name or 'model'} ({type(module).__name__}) takes any input rank; "
                    "expected an example input to tell its dims, got None"
                )
            ranks = input_ranks(model, example) if ranks is None else ranks
            dims = dims_for_rank(ranks[name])
        affine = getattr(module, "affine", True)
        tracked = module.running_mean is not None
        momentum = getattr(module, "momentum", 0.1)
        replacement = batchnorm_class(dims, "torch")(module.num_features, module.eps, momentum, affine, tracked)  # fmt: skip
        state = module.state_dict()
        replacement.load_state_dict({key: state[key] for key in _BN_KEYS if key in state})
        replacement.train(module.training)
        if after is not None:
            replacement = BatchNormThen(replacement, after).train(module.training)
        if name:
            set_submodule(target, name, replacement)
        else:
            target = replacement
    return target


def export_onnx(model: nn.Module, example: torch.Tensor, path, fold: bool = True) -> Path:
    """Fold (optionally), then export ``model`` to ONNX at ``path`` (written atomically);
    the batch dimension is dynamic. Needs the ``onnx`` package (``pip install bnlab[onnx]``)."""
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example: expected an input Tensor, got {type(example).__name__}")
    has_bn = any(is_batchnorm(m) for m in model.modules())
    prepared = fold_batchnorm(model) if fold and has_bn else copy.deepcopy(model).eval()
    prepared = to_torch_batchnorm(prepared, example).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
        torch.onnx.export(
            prepared, (example,), buffer, dynamo=False, input_names=["input"],
            output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )  # fmt: skip
    return atomic_write_bytes(Path(path), buffer.getvalue())


def run_onnx(path, example: torch.Tensor) -> torch.Tensor:
    """Run an exported model in onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: example.detach().numpy()})[0])
