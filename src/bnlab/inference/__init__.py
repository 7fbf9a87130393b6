"""Inference tooling, one file per role: fold BatchNorm into the layer before it (``fold``,
with the connections from ``pairs``), freeze it (``freeze``), recalibrate its population
statistics (``recalibrate``), export the result (``export``); ``tail`` splits BN+activation
modules into BN and what follows; ``foldfile`` is the ``bnlab fold`` command's file handling.
"""

from bnlab.inference.export import export_onnx, run_onnx, to_torch_batchnorm
from bnlab.inference.fold import FOLDABLE_INTO, fold_batchnorm, fold_parameters
from bnlab.inference.freeze import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct,
    freeze_batchnorm,
)
from bnlab.inference.pairs import FoldReport
from bnlab.inference.recalibrate import recalibrate
from bnlab.inference.tail import AfterBatchNorm, split_batchnorm
from bnlab.inference.timing import time_inference
from bnlab.nn.classes import is_batchnorm

__all__ = [
    "FOLDABLE_INTO",
    "AfterBatchNorm",
    "FoldReport",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct",
    "export_onnx",
    "fold_batchnorm",
    "fold_parameters",
    "freeze_batchnorm",
    "is_batchnorm",
    "recalibrate",
    "run_onnx",
    "split_batchnorm",
    "time_inference",
    "to_torch_batchnorm",
]
