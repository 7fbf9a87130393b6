"""Which BatchNorm follows which layer: the (layer, bn) pairs that folding may merge.

From ``torch.fx`` when the model traces (BN layers are leaves), else from consecutive children
of ``nn.Sequential`` containers. Only tracing itself may fail and fall back; a failure in the
analysis of a traced graph is a bug and propagates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx
from torch import nn

from bnlab.nn.classes import is_batchnorm


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did: folded (bn -> into) pairs and BNs left, with reasons.

    ``fx_error`` says why ``torch.fx`` was not used (empty when it was); ``after`` names, per
    folded BN+activation module, what replaced it (what its ``forward`` did after BN).
    """

    method: str = ""
    folded: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    fx_error: str = ""
    after: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm layer(s) ({self.method})"]
        for bn, into in self.folded:
            kept = f" (kept after BN: {self.after[bn]})" if bn in self.after else ""
            lines.append(f"  {bn} -> {into}{kept}")
        lines += [f"  kept {bn}: {reason}" for bn, reason in self.kept]
        return "\n".join(lines)


class _Tracer(torch.fx.Tracer):
    """bnlab's BN layers (and BN subclasses) are leaves, like torch's."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return is_batchnorm(module) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> torch.fx.Graph:
    """The fx graph of ``model``, BN layers as leaves; raises whatever tracing raises."""
    return _Tracer().trace(model)


def pairs_from_graph(model: nn.Module, graph: torch.fx.Graph, report: FoldReport) -> list[tuple[str, str]]:  # fmt: skip
    """(layer, bn) module names that the graph shows as directly connected, the layer's output
    having no other consumer; BNs that cannot be paired go to ``report.kept`` with a reason."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm(modules[node.target]):
            continue
        bn_name, source = node.target, node.args[0] if node.args else None
        if calls[bn_name] > 1:
            report.kept.append((bn_name, f"shared: called {calls[bn_name]} times"))
        elif not isinstance(source, torch.fx.Node) or source.op != "call_module":
            what = getattr(source, "target", source)
            report.kept.append((bn_name, f"its input is {getattr(what, '__name__', what)}, not a module"))  # fmt: skip
        elif len(source.users) > 1:
            report.kept.append((bn_name, f"{source.target}'s output feeds {len(source.users)} consumers"))  # fmt: skip
        elif calls[source.target] > 1:
            report.kept.append((bn_name, f"{source.target} is called {calls[source.target]} times"))  # fmt: skip
        else:
            pairs.append((source.target, bn_name))
    return pairs


def pairs_from_sequentials(model: nn.Module, report: FoldReport) -> list[tuple[str, str]]:
    """(layer, bn) names of consecutive children of ``nn.Sequential`` containers."""
    pairs, seen = [], set()
    for name, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for index, (child_name, child) in enumerate(children):
            if not is_batchnorm(child):
                continue
            full = f"{name}.{child_name}" if name else child_name
            seen.add(full)
            if index == 0:
                report.kept.append((full, "first in its nn.Sequential: its input is unknown"))
                continue
            prev_name, _ = children[index - 1]
            pairs.append((f"{name}.{prev_name}" if name else prev_name, full))
    for name, module in model.named_modules():
        if is_batchnorm(module) and name not in seen:
            report.kept.append((name, "not traceable by torch.fx and not inside an nn.Sequential"))
    return pairs


def find_pairs(model: nn.Module, report: FoldReport) -> list[tuple[str, str]]:
    """The (layer, bn) pairs of ``model``; ``report.method`` and ``report.fx_error`` say how."""
    try:
        graph = trace(model)
    except Exception as error:  # tracing runs the model's code on proxies: its failure only
        first_line = (str(error).strip().splitlines() or [""])[0]
        report.fx_error = f"{type(error).__name__}: {first_line}"
        report.method = f"nn.Sequential walk; torch.fx could not trace the model ({report.fx_error})"  # fmt: skip
        return pairs_from_sequentials(model, report)
    report.method = "torch.fx"
    return pairs_from_graph(model, graph, report)
