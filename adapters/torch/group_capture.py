"""SSD's statistics for residual groups, read at the nodes of the model's ``torch.fx`` trace.

A member of a residual group reaches its activation only after the add: its pre-activation
``z`` is the stream's (the sum), which no module's forward hook sees. So the traced graph is
run with a :class:`torch.fx.Interpreter` that records, at the activation node the discovery
named (``TorchMember.activation_node``), the node's input (``z``) and its output (``h``, made
a node of the autograd graph), while forward hooks on the producers record their inputs, as
in :mod:`.capture`. A member without an activation after the add (an inverted residual's
linear projection) gets ``identity``: its splitting matrices are zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from simcore.growth import GrowthError, SplittingStatistics
from simcore.growth.growers import check_loss

from .activations import is_known_activation, module_activation
from .capture import _bn_scale, _differentiable, _patches, _positions, scoring_mode
from .flows import TorchFlow, TorchMember

__all__ = ["group_splitting_statistics", "recorded_pass"]


def _units(flow: TorchFlow) -> list[TorchMember]:
    """The producers of a group as members (its own first); a gate as one without activation.

    A squeeze-excitation gate (``TorchMember.gate``) is copied exactly by a split, so it has no
    direction to score: its splitting matrices are taken as zero (docs/design.md).
    """
    own = TorchMember(flow.producer, flow.norm, flow.activation, flow.activation_kind,
                      flow.activation_node)
    return [own, *(TorchMember(m.producer, m.norm, gate=True) if m.gate else m
                   for m in flow.members)]


def _kind(unit: TorchMember, modules: dict[str, nn.Module]) -> str:
    if unit.activation_node is None:
        return "identity"
    kind = unit.activation_kind
    if kind is None and unit.activation is not None:
        kind = module_activation(modules[unit.activation])
    if kind is None or not is_known_activation(kind):
        raise GrowthError(f"SSD cannot score {unit.producer!r}: no second derivative is known "
                          f"for the activation ({kind}) its residual stream reaches")
    return kind


class _Recorder(torch.fx.Interpreter):
    """Runs the trace, recording the input and output of the named activation nodes."""

    def __init__(self, graph_module: torch.fx.GraphModule, nodes: set[str]):
        super().__init__(graph_module)
        self.nodes = nodes
        self.z: dict[str, torch.Tensor] = {}
        self.h: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.nodes:
            first = n.args[0]
            value = self.env[first] if isinstance(first, torch.fx.Node) else None
            if not isinstance(value, torch.Tensor):
                raise GrowthError(f"SSD cannot read the pre-activation of node {n.name!r}")
            self.z[n.name] = value.detach().clone()  # before an in-place activation runs
            out = _differentiable(None, None, super().run_node(n))
            self.h[n.name] = out
            return out
        return super().run_node(n)


def recorded_pass(graph_module: torch.fx.GraphModule, nodes: set[str],
                  producers: Sequence[nn.Module], inputs: Any, targets: Any,
                  loss_fn: Callable[[Any, Any], torch.Tensor]
                  ) -> tuple[dict[nn.Module, tuple[torch.Tensor, tuple[int, ...]]], _Recorder,
                             dict[str, torch.Tensor | None]]:
    """Run the trace on one batch, in the caller's scoring mode.

    Returns each producer's ``(input, output shape)``, the recorder (``z`` and ``h`` at
    ``nodes``) and the loss's gradient with respect to each recorded ``h``.
    """
    recorder = _Recorder(graph_module, nodes)
    seen: dict[nn.Module, tuple[torch.Tensor, tuple[int, ...]]] = {}
    handles = [p.register_forward_hook(
        lambda m, i, o: seen.__setitem__(m, (i[0].detach(), tuple(o.shape))))
        for p in set(producers)]
    try:
        loss = check_loss(loss_fn(recorder.run(inputs), targets))
    finally:
        for h in handles:
            h.remove()
    names = sorted(recorder.h)
    grads: dict[str, torch.Tensor | None] = dict(zip(names, torch.autograd.grad(
        loss, [recorder.h[n] for n in names], allow_unused=True), strict=True)) if names else {}
    return seen, recorder, grads


def group_splitting_statistics(
    model: nn.Module,
    flows: Sequence[TorchFlow],
    batches: Sequence[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> list[SplittingStatistics]:
    """SSD's inputs for each group flow: the group's own statistics with ``members`` filled."""
    modules = dict(model.named_modules())
    units = [_units(f) for f in flows]
    kinds = [[_kind(u, modules) for u in group] for group in units]
    graph_module = torch.fx.symbolic_trace(model)
    nodes = {u.activation_node for group in units for u in group if u.activation_node}
    known = {n.name for n in graph_module.graph.nodes}
    for name in sorted(nodes - known):
        raise GrowthError(f"SSD cannot find the activation node {name!r} in the model's trace")
    captured: list[list[list[tuple]]] = [[[] for _ in group] for group in units]
    with scoring_mode(model):
        for inputs, targets in batches:
            seen, recorder, grads = recorded_pass(
                graph_module, nodes, [modules[u.producer] for group in units for u in group],
                inputs, targets, loss_fn)
            for g_index, group in enumerate(units):
                for u_index, unit in enumerate(group):
                    x = _patches(modules[unit.producer], seen[modules[unit.producer]][0])
                    node = unit.activation_node
                    if node is None:  # no activation: sigma'' = 0, any z of the right shape
                        out = model.get_submodule(unit.producer)(
                            seen[modules[unit.producer]][0]).detach()
                        z = g = out
                    else:
                        z = recorder.z[node]
                        g = grads[node] if grads[node] is not None else torch.zeros_like(z)
                    flat = isinstance(modules[unit.producer], nn.Linear)  # (B, ..., n)
                    captured[g_index][u_index].append(
                        (x, _positions(g.detach(), flat), _positions(z, flat)))
    out = []
    for group, group_kinds, stats in zip(units, kinds, captured, strict=True):
        per_unit = [SplittingStatistics(activation=kind, bn_scale=_bn_scale(
                        TorchFlow(u.producer, norm=u.norm), modules), batches=tuple(c))
                    for u, kind, c in zip(group, group_kinds, stats, strict=True)]
        out.append(SplittingStatistics(per_unit[0].activation, per_unit[0].bn_scale,
                                       per_unit[0].batches, members=tuple(per_unit[1:])))
    return out
