"""Put fused BN + ReLU (+ residual add) modules where a model applies BN, then ReLU.

``fuse_activations(model, example)`` traces ``model`` with ``torch.fx`` (BN layers as leaves)
and rewrites two patterns on bnlab's BatchNorm1d/2d/3d:

    relu(bn(x))              ->  BatchNormAct(act="relu")(x)
    relu(bn(x) + residual)   ->  BatchNormAct(act="relu")(x, residual)   (either add order)

when each intermediate result has no other use and, on ``example``, the residual has the BN
output's shape and dtype (no broadcasting). The ReLU may be a module (in place or not),
``torch.relu``/``F.relu`` or ``.relu()``; the add ``+``, ``+=``, ``torch.add`` or ``.add()``.
The fused module takes over the BN's parameters and buffers under the BN's name, so the
``state_dict`` keys are unchanged. The result is a ``torch.fx.GraphModule`` computing the
same function; the model is not changed.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from bnlab.nn.classes import batchnorm_class, batchnorm_dims, is_batchnorm
from bnlab.nn.fused import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

__all__ = ["fuse_activations", "unfuse_activations"]

_FUSED = {1: BatchNormAct1d, 2: BatchNormAct2d, 3: BatchNormAct3d}
_RELU_FUNCTIONS = (torch.relu, torch.relu_, F.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class _LeafTracer(torch.fx.Tracer):
    """Every BatchNorm (torch's or bnlab's) stays one ``call_module`` node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return is_batchnorm(module) or super().is_leaf_module(module, qualified_name)


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _residual_of_add(node: torch.fx.Node, bn: torch.fx.Node) -> torch.fx.Node | None:
    """The other operand when ``node`` is ``bn + other`` (or ``other + bn``), else None."""
    plain = not node.kwargs and len(node.args) == 2
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ("add", "add_")
    )
    if not (is_add and plain):
        return None
    other = node.args[1] if node.args[0] is bn else node.args[0]
    if not isinstance(other, torch.fx.Node) or other is bn:
        return None
    same = other.meta.get("tensor_meta"), bn.meta.get("tensor_meta")
    if same[0] is None or same[1] is None:
        return None
    return other if (same[0].shape, same[0].dtype) == (same[1].shape, same[1].dtype) else None


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _rebuilt(bn: nn.Module, cls: type, **kwargs) -> nn.Module:
    """``cls`` with ``bn``'s hyper-parameters, its very tensors and its mode."""
    tensors = [t for t in (bn.weight, bn.running_mean) if t is not None]
    factory = {"device": tensors[0].device, "dtype": tensors[0].dtype} if tensors else {}
    module = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bias=bn.bias is not None or not bn.affine, nonfinite=bn.nonfinite, **factory, **kwargs)  # fmt: skip
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        if getattr(module, name, None) is not None:
            setattr(module, name, getattr(bn, name))
    return module.train(bn.training)


def _fused_module(bn: nn.Module) -> nn.Module:
    fused = _rebuilt(bn, _FUSED[batchnorm_dims(bn)], act="relu")
    fused._made_by_fusion = True  # what unfuse_activations undoes
    return fused


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def fuse_activations(model: nn.Module, *example: torch.Tensor) -> torch.fx.GraphModule:
    """A GraphModule of ``model`` with bnlab BN → (add →) ReLU fused into BatchNormAct modules.

    ``example``: inputs for one eval-mode forward pass (no statistics change) that gives the
    shapes of residual operands. Raises ``ValueError`` if ``torch.fx`` cannot trace the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    root = copy.deepcopy(model)
    try:
        graph = _LeafTracer().trace(root)
    except Exception as error:
        raise ValueError(
            f"model: torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: "
            f"{str(error)[:200]}); use bnlab.nn.convert alone, or BatchNormAct modules by hand"
        ) from error
    for node in graph.nodes:  # postponed annotations ("Tensor") would reach the code as names
        if isinstance(node.type, str):  # torch.jit.script cannot resolve: leave them out
            node.type = None
    traced = torch.fx.GraphModule(root, graph)
    modes = {m: m.training for m in traced.modules()}
    try:
        with torch.no_grad():
            traced.eval()(*example)  # a plain call first: a clear error, no ShapeProp dump
            ShapeProp(traced).propagate(*example)
    except Exception as error:
        shapes = ", ".join(str(tuple(e.shape)) if isinstance(e, torch.Tensor) else type(e).__name__ for e in example)  # fmt: skip
        raise ValueError(
            f"example: the model fails on the example input(s) of shape {shapes} "
            f"({type(error).__name__}: {str(error)[:300]})"
        ) from error
    finally:
        for module, training in modes.items():
            module.training = training
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not _plain_bnlab(modules[node.target]):
            continue
        user = _only_user(node)
        if user is None or len(node.args) != 1:
            continue
        residual, add = None, None
        if not _is_relu(user, modules):
            residual = _residual_of_add(user, node)
            relu = _only_user(user) if residual is not None else None
            if relu is None or not _is_relu(relu, modules):
                continue
            add, user = user, relu
        _set_submodule(traced, node.target, _fused_module(modules[node.target]))
        with traced.graph.inserting_before(user):
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            fused = traced.graph.call_module(node.target, args)
        fused.meta = dict(user.meta)  # its output is the ReLU's: same shape, for later adds
        user.replace_all_uses_with(fused)
        for dead in (user, add, node):
            if dead is not None:
                traced.graph.erase_node(dead)
    traced.graph.lint()
    traced.recompile()
    return traced


def _plain_bnlab(module: nn.Module) -> bool:
    dims = batchnorm_dims(module)
    return dims is not None and type(module) is batchnorm_class(dims, "bnlab")


def unfuse_activations(traced: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Undo :func:`fuse_activations` in place: each BatchNormAct it made becomes bnlab's plain
    BN again, followed by ``+ residual`` and ``torch.relu`` in the graph (same tensors, same
    checkpoint keys), so that :func:`bnlab.nn.revert` can hand torch's BN back."""
    modules = dict(traced.named_modules())
    changed = False
    for node in list(traced.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if not getattr(module, "_made_by_fusion", False):
            continue
        _set_submodule(traced, node.target, _rebuilt(module, batchnorm_class(batchnorm_dims(module), "bnlab")))  # fmt: skip
        with traced.graph.inserting_after(node):
            last = bn = traced.graph.call_module(node.target, (node.args[0],))
        if len(node.args) == 2:
            with traced.graph.inserting_after(bn):
                last = traced.graph.call_function(operator.add, (bn, node.args[1]))
        with traced.graph.inserting_after(last):
            relu = traced.graph.call_function(torch.relu, (last,))
        node.replace_all_uses_with(relu)
        traced.graph.erase_node(node)
        changed = True
    if changed:
        traced.graph.lint()
        traced.recompile()
    return traced
