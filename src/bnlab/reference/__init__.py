"""Level 1: Batch Normalization in NumPy, the readable float64 oracle."""

from bnlab.reference.batchnorm import (
    batchnorm_backward,
    batchnorm_backward_alt,
    batchnorm_forward,
    fold_to_affine,
    population_statistics,
    spatial_batchnorm_backward,
    spatial_batchnorm_forward,
)
from bnlab.reference.gradcheck import numerical_gradient, relative_error

__all__ = [
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "batchnorm_forward",
    "fold_to_affine",
    "numerical_gradient",
    "population_statistics",
    "relative_error",
    "spatial_batchnorm_backward",
    "spatial_batchnorm_forward",
]
