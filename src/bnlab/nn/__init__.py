"""Level 3: modules users put in models."""

from bnlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.nn.classes import (
    batchnorm_class,
    batchnorm_dims,
    dims_for_rank,
    input_ranks,
    is_batchnorm,
    is_plain_batchnorm,
)
from bnlab.nn.convert import convert, convert_sync_batchnorm, revert, revert_sync_batchnorm
from bnlab.nn.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from bnlab.nn.fusion import fuse_activations
from bnlab.nn.sync import SyncBatchNorm
from bnlab.nn.variants import BatchRenorm1d, BatchRenorm2d, GhostBatchNorm1d, GhostBatchNorm2d

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "SyncBatchNorm",
    "batchnorm_class",
    "batchnorm_dims",
    "convert",
    "convert_sync_batchnorm",
    "dims_for_rank",
    "fuse_activations",
    "input_ranks",
    "is_batchnorm",
    "is_plain_batchnorm",
    "revert",
    "revert_sync_batchnorm",
]
