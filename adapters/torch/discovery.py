"""Find where each layer's channels flow by tracing a PyTorch model with ``torch.fx``.

:func:`discover_flows` traces a model and, for every growable ``Conv2d``/``Linear``
*producer*, follows its output channels through the channel-wise layers after it
(BatchNorm, activations as modules or calls, pooling, dropout, a depthwise ``Conv2d`` with its
BatchNorm, flatten) to every *consumer* that reads them (``Conv2d``, ``Linear``, flatten ->
``Linear`` where a channel owns ``H*W`` consecutive columns); the result is one
:class:`~.flows.TorchFlow` per producer.

Residual adds and concatenations are followed too (docs/design.md, 'Residual streams and
concatenations'). Producers whose outputs meet in an ``add`` (directly, through BatchNorm and
activations, or along the identity path from one add to the next) form one *residual group*:
one flow whose ``members`` grow together. A producer whose output enters a ``torch.cat``
along channels grows with its consumers' columns at its offset in the concatenation.
Channel shuffles (ShuffleNetV2) are found by :mod:`.streams`: one routed flow per region.

A producer whose channels reach the network output or any operation this module does not
understand is *not growable*: asking to grow it raises :class:`~simcore.growth.GrowthError`
naming the layer, the operation and the module whose ``forward`` holds it (never a graph node
name); :func:`survey_flows` lists every such layer with its reason. Where tracing fails
(data-dependent control flow), describe the flow by hand with :class:`~.flows.TorchFlow`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .channel_walk import (
    DEPTHWISE_REASON,
    OUTPUT_REASON,
    Walk,
    follow,
    node_shape,
    owner_of,
    reaches_output,
    trace_model,
)
from .flow_check import check_flows
from .flows import (
    GrowthError,
    TorchConsumer,
    TorchDepthwise,
    TorchFlow,
    TorchMember,
    TorchNorm,
    describe_module,
    is_depthwise_conv,
    is_producer,
    tie_reason,
    unwrap,
)
from .groups import residual_groups
from .products import (
    is_gate,
)
from .streams import routed_streams

__all__ = ["FlowSurvey", "check_flows", "discover_flows", "find_flow", "survey_flows"]

def _analyse(model, example_input):
    """Walk every producer's channels: returns (ordered flows, {blocked name: reason})."""
    graph_module = trace_model(model, example_input)
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    walks, blocked = {}, {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if isinstance(module, nn.Conv2d) and not is_producer(module):
            if not is_depthwise_conv(module):
                blocked[node.target] = f"it is a grouped convolution (groups={module.groups})"
            else:
                blocked[node.target] = DEPTHWISE_REASON
            continue
        if not is_producer(module):
            continue
        if calls[node.target] > 1:
            times = calls[node.target]
            blocked[node.target] = f"the module is called {times} times (shared weights)"
            continue
        walk = Walk()
        ndim = 2 if isinstance(module, nn.Linear) else 4
        last = isinstance(module, nn.Linear) and len(node_shape(node) or ()) == 4  # channels-last
        follow(node, walk, modules, calls, segment=-1, ndim=4 if last else ndim, spatial=None,
                pooled=False, last=last)
        walk.blocked = walk.blocked or walk.pending
        if walk.blocked is None and not walk.consumers:
            walk.blocked = "its output is not read by any layer"
        if walk.blocked is not None:
            if reaches_output(node, modules):
                walk.blocked = OUTPUT_REASON
            elif walk.needs_input is not None:
                raise ValueError(walk.needs_input)
        walks[node.target] = walk
    flows: list[TorchFlow] = []
    for flow in routed_streams(model, graph_module, walks, example_input, OUTPUT_REASON):
        reason = tie_reason(model, flow.module_names)
        for name in flow.producers:
            del walks[name]
            if reason is not None:
                blocked[name] = reason
        if reason is None:
            flows.append(flow)
    for names, walk_group, reason in residual_groups(walks, graph_module, owner_of):
        if reason is None:
            flow = _flow_of(names, walk_group)
            reason = tie_reason(model, flow.module_names)
        if reason is not None:
            for name in names:
                blocked[name] = reason if len(names) == 1 else (
                    f"{reason} (it grows with its residual group {', '.join(map(repr, names))})")
            continue
        flows.append(flow)
    return flows, blocked


def _flow_of(names, walks):
    """The TorchFlow of a group of producers (one name: a plain flow), first in forward order."""
    first = walks[0]
    consumers, norms = {}, {}
    for walk in walks:
        consumers.update(walk.consumers)
        norms.update(walk.downstream_norms)
    return TorchFlow(
        producer=names[0],
        consumers=tuple(TorchConsumer(m, s, o) for m, (s, o) in consumers.items()),
        norm=first.norms.get(-1),
        depthwise=tuple({conv: TorchDepthwise(conv, walk.norms.get(k))  # a stream's: once
                         for walk in walks[::-1] for k, conv in enumerate(walk.depthwise)
                         }.values())[::-1],
        activation=first.activation,
        activation_kind=first.activation_kind,
        activation_node=first.activation_node if len(walks) > 1 or first.activation_merged
        else None,
        activation_paths=tuple(first.paths) if len(walks) == 1 and (
            first.activation_merged or len(first.paths) > 1) else (),
        members=tuple(TorchMember(name, w.norms.get(-1), w.activation, w.activation_kind,
                                  w.activation_node, gate=is_gate(w))
                      for name, w in zip(names[1:], walks[1:], strict=True)),
        downstream_norms=tuple(TorchNorm(m, o) for m, o in norms.items()),
    )



def discover_flows(
    model: nn.Module, example_input: Any = None, *, layers: Iterable[str] | None = None
) -> list[TorchFlow]:
    """Find the channel flow of every growable producer of ``model`` with ``torch.fx``.

    ``example_input`` (a tensor or a tuple of tensors) is needed when a flatten
    feeds a Linear, to learn how many columns (``H*W``) each channel owns; shapes
    are propagated with BatchNorm in eval mode and the model's mode restored.
    With ``layers`` only those producers are returned, in that order, and a
    layer that cannot be grown raises :class:`GrowthError` naming the reason.
    The network's final classifier is a consumer only, never a producer. A residual group
    is one flow, named by its first producer; asking for any member gives the group's flow.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ...                     nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    >>> [(f.producer, f.norm, f.consumers) for f in discover_flows(net, torch.zeros(1, 3, 8, 8))]
    [('0', '1', (TorchConsumer(module='4', spatial=64, offset=None),))]
    """
    model = unwrap(model) if isinstance(model, nn.Module) else model
    flows, blocked = _analyse(model, example_input)
    if layers is None:
        return flows
    if isinstance(layers, str):
        layers = [layers]
    by_name = {name: f for f in flows for name in f.producers}  # a member: its group's flow
    known = dict(model.named_modules())
    picked = []
    for name in layers:
        if name in by_name:
            if by_name[name] not in picked:
                picked.append(by_name[name])
        elif name in blocked:
            raise GrowthError(f"cannot grow {name!r}: {blocked[name]}")
        elif name in known:
            raise GrowthError(
                f"cannot grow {name!r}: it is a {describe_module(known[name])}, not a Conv2d or "
                "Linear that the forward pass calls"
            )
        else:
            raise GrowthError(f"cannot grow {name!r}: the model has no module of that name")
    return picked


@dataclass(frozen=True)
class FlowSurvey:
    """A model's growable flows and, per other Conv2d/Linear it calls, why it cannot grow.

    ``skipped`` leaves out what never grows on its own by design: the network's output
    layer and depthwise convs (they grow with their producer).
    """

    flows: tuple[TorchFlow, ...]
    skipped: dict[str, str]


def survey_flows(model: nn.Module, example_input: Any = None) -> FlowSurvey:
    """Every growable flow of ``model`` (as :func:`discover_flows`) and the layers skipped, why.

    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.head(torch.relu(self.b(torch.relu(self.a(x))) + x))
    >>> survey = survey_flows(Block())
    >>> [(flow.producer, [c.module for c in flow.consumers]) for flow in survey.flows]
    [('a', ['b'])]
    >>> survey.skipped
    {'b': "its output is added to the network's input in the model's forward"}
    """
    model = unwrap(model) if isinstance(model, nn.Module) else model
    flows, blocked = _analyse(model, example_input)
    quiet = (DEPTHWISE_REASON, OUTPUT_REASON)  # not skips: grown with a producer / never grown
    skipped = {name: why for name, why in blocked.items() if why not in quiet}
    return FlowSurvey(tuple(flows), skipped)


def find_flow(model: nn.Module, layer: str, example_input: Any = None) -> TorchFlow:
    """The flow of one producer, or :class:`GrowthError` saying why it cannot be grown."""
    return discover_flows(model, example_input, layers=[layer])[0]
