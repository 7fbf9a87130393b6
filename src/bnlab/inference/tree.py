"""Small helpers on a model's module tree: replace a submodule by name, count shared modules."""

from __future__ import annotations

from torch import nn


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``name`` inside ``model`` (``name`` must not be empty)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def call_counts(model: nn.Module) -> dict[int, int]:
    """How many places in the module tree hold each module (shared modules count > 1)."""
    counts: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        counts[id(module)] = counts.get(id(module), 0) + 1
    return counts
