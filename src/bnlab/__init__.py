"""bnlab: Batch Normalization from the textbook derivation to production PyTorch layers."""

__version__ = "0.1.0"
