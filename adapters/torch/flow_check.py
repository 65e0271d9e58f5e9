"""Check hand-written :class:`~.flows.TorchFlow` objects against the model's traced graph."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .channel_walk import trace_model, walk_users
from .flows import (
    BATCH_NORM,
    GrowthError,
    TorchFlow,
    is_depthwise_conv,
    unwrap,
)

__all__ = ["check_flows"]


def _readers(graph_module, producer):
    """``(passed, readers, reaches_output)`` of every call of ``producer`` (:func:`walk_users`)."""
    modules = dict(graph_module.named_modules())
    calls = [node for node in graph_module.graph.nodes
             if node.op == "call_module" and node.target == producer]
    return walk_users([user for node in calls for user in node.users], modules,
                       through_depthwise=True)


def check_flows(model: nn.Module, flows: Iterable[TorchFlow]) -> None:
    """Refuse hand-written ``flows`` that contradict ``model``'s traced graph.

    Each flow's modules must exist and be growable (:meth:`TorchFlow.check`, tied parameters
    included). Where ``torch.fx`` can trace the model, every module a flow names as a
    consumer must read the producer's channels (be the first Conv2d/Linear on some path from
    the producer's output), every such reader must be named, named norms and depthwise convs
    must lie on those paths, and the channels must not reach the network's output: otherwise
    the growth would report success and the next forward would fail, so
    :class:`GrowthError` says which module is wrong. A model ``torch.fx`` cannot trace is
    checked by the first point only. A producer the forward never calls is not checked.
    """
    model = unwrap(model) if isinstance(model, nn.Module) else model
    flows = list(flows)
    for flow in flows:
        if not isinstance(flow, TorchFlow):
            raise TypeError(f"flows must hold TorchFlow objects, got {type(flow).__name__}")
        flow.check(model)
    try:
        graph_module = trace_model(model, None)
    except GrowthError:
        return  # untraceable: the hand-written flow is all there is to go by
    called = {n.target for n in graph_module.graph.nodes if n.op == "call_module"}
    for flow in flows:
        if flow.producer not in called:
            continue
        passed: set[str] = set()
        readers: set[str] = set()
        reaches_output = False
        for producer in flow.producers:  # a residual group: what any member's channels reach
            more = _readers(graph_module, producer)
            passed, readers, reaches_output = passed | more[0], readers | more[1], (
                reaches_output or more[2])
        routing = flow.routing
        named = {c.module for c in flow.consumers} | set(routing.consumers if routing else ())
        readers -= set(flow.producers) - named  # a member may read its own group
        where = f"flow of {flow.producer!r}"
        if reaches_output:
            raise GrowthError(
                f"{where}: its channels reach the network's output in the traced graph; "
                "growing it would change the output's shape"
            )
        for name in sorted(named - readers):
            raise GrowthError(
                f"{where}: {name!r} does not read the channels of {flow.producer!r} in the "
                f"traced graph (its readers are {sorted(readers)}); the next forward would fail"
            )
        for name in sorted(readers - named):
            raise GrowthError(
                f"{where}: {name!r} reads the channels of {flow.producer!r} in the traced "
                "graph but is not named as a consumer; the next forward would fail"
            )
        through: list[str | None] = [
            flow.norm, *(d.conv for d in flow.depthwise), *(d.norm for d in flow.depthwise),
            *(m.norm for m in flow.members), *(n.module for n in flow.downstream_norms),
            *(routing.indexed if routing else ())]
        for step in through:
            if step is not None and step not in passed:
                raise GrowthError(
                    f"{where}: {step!r} is not on the path from {flow.producer!r} to its "
                    "consumers in the traced graph; the next forward would fail"
                )
        modules = dict(graph_module.named_modules())
        grown = set(through)
        for name in sorted(passed - grown):
            if isinstance(modules[name], BATCH_NORM) or is_depthwise_conv(modules[name]):
                raise GrowthError(
                    f"{where}: {name!r} takes the channels of {flow.producer!r} in the traced "
                    "graph but is not named (norm= or depthwise=); the next forward would fail"
                )

