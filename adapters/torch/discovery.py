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

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .activations import ACTIVATION_TYPES, call_activation, module_activation
from .flows import (
    BATCH_NORM,
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
from .streams import routed_streams

__all__ = ["FlowSurvey", "check_flows", "discover_flows", "find_flow", "survey_flows"]

_PASS_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    *ACTIVATION_TYPES,
)
_F = torch.nn.functional
_PASS_FUNCTIONS = {
    _F.dropout,
    _F.dropout2d,
    _F.max_pool2d,
    _F.avg_pool2d,
    _F.adaptive_avg_pool2d,
    _F.adaptive_max_pool2d,
    torch.max_pool2d,
}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
_MERGE_LABELS = {
    operator.sub: "a subtraction",
    torch.sub: "a subtraction",
    operator.mul: "a multiplication",
    operator.imul: "a multiplication",
    torch.mul: "a multiplication",
    torch.stack: "a stack",
}
_MERGE_METHODS = {"mul": "a multiplication", "mul_": "a multiplication"}
_AXIS_MOVES = {"permute", "transpose", "movedim", torch.permute, torch.transpose, torch.movedim}


# Layers that never grow on their own by design: not reported as skipped.
_DEPTHWISE = "it is a depthwise convolution (it grows with its producer)"
_OUTPUT = "it is the network's output layer (a classifier is a consumer only)"


@dataclass
class _Walk:
    """What one producer's channels reach, gathered while walking the graph."""

    norms: dict = field(default_factory=dict)  # segment (-1 producer, k depthwise k) -> BN name
    depthwise: list = field(default_factory=list)
    consumers: dict = field(default_factory=dict)  # module name -> (spatial, offset)
    downstream_norms: dict = field(default_factory=dict)  # BN after an add or a cat -> offset
    adds: dict = field(default_factory=dict)  # add node -> the argument nodes reached
    seen: set = field(default_factory=set)  # (node, offset, merged) already walked
    activation: str | None = None
    activation_kind: str | None = None
    activation_seen: bool = False
    activation_node: str | None = None  # the fx node of the activation (SSD of groups)
    activation_merged: bool = False  # the activation comes after an add, a cat or a pooling
    resized: bool = False  # a pooling came before the activation
    blocked: str | None = None
    needs_input: str | None = None


def _trace(model, example_input):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; all mean "describe the flow by hand"
        raise GrowthError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "describe its flows by hand with TorchFlow(producer, norm=..., consumers=...)"
        ) from exc
    if example_input is not None:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # shape propagation must not touch BatchNorm running stats
        try:
            with torch.no_grad():
                ShapeProp(graph_module).propagate(*inputs)
        finally:
            for m, mode in modes:  # each module's own mode, not model.train(...) for all
                m.training = mode
    return graph_module


def _shape(node):
    meta = node.meta.get("tensor_meta")
    return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)


def _analyse(model, example_input):
    """Walk every producer's channels: returns (ordered flows, {blocked name: reason})."""
    graph_module = _trace(model, example_input)
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
                blocked[node.target] = _DEPTHWISE
            continue
        if not is_producer(module):
            continue
        if calls[node.target] > 1:
            times = calls[node.target]
            blocked[node.target] = f"the module is called {times} times (shared weights)"
            continue
        walk = _Walk()
        ndim = 2 if isinstance(module, nn.Linear) else 4
        _follow(node, walk, modules, calls, segment=-1, ndim=ndim, spatial=None, pooled=False)
        if walk.blocked is None and not walk.consumers:
            walk.blocked = "its output is not read by any layer"
        if walk.blocked is not None:
            if _reaches_output(node, modules):
                walk.blocked = _OUTPUT
            elif walk.needs_input is not None:
                raise ValueError(walk.needs_input)
        walks[node.target] = walk
    flows: list[TorchFlow] = []
    for flow in routed_streams(model, graph_module, walks, example_input, _OUTPUT):
        reason = tie_reason(model, flow.module_names)
        for name in flow.producers:
            del walks[name]
            if reason is not None:
                blocked[name] = reason
        if reason is None:
            flows.append(flow)
    for names, walk_group, reason in residual_groups(walks, graph_module, _owner):
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
        depthwise=tuple(
            TorchDepthwise(conv, first.norms.get(k)) for k, conv in enumerate(first.depthwise)
        ),
        activation=first.activation,
        activation_kind=first.activation_kind,
        activation_node=first.activation_node if len(walks) > 1 or first.activation_merged
        else None,
        members=tuple(TorchMember(name, w.norms.get(-1), w.activation, w.activation_kind,
                                  w.activation_node)
                      for name, w in zip(names[1:], walks[1:], strict=True)),
        downstream_norms=tuple(TorchNorm(m, o) for m, o in norms.items()),
    )


def _reaches_output(node, modules):
    """Whether the graph output depends on ``node`` through no other Conv2d/Linear."""
    return _walk_users(node.users, modules, through_depthwise=False)[2]


def _walk_users(start, modules, *, through_depthwise):
    """Follow data dependence from the nodes ``start`` up to the Conv2d/Linear that read it.

    Returns ``(passed, readers, reaches_output)``: the modules on the way, the Conv2d/Linear
    modules reached (a depthwise conv is on the way with ``through_depthwise``), and whether
    the graph's output is reached through no reader. Every operation counts, understood or not.
    """
    stack, seen = list(start), set()
    passed, readers, reaches_output = set(), set(), False
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "output":
            reaches_output = True
            continue
        if node.op == "call_module":
            module = modules[node.target]
            layer = isinstance(module, (nn.Conv2d, nn.Linear))
            if layer and not (through_depthwise and is_depthwise_conv(module)):
                readers.add(node.target)
                continue
            passed.add(node.target)
        stack.extend(node.users)
    return passed, readers, reaches_output


def _owner(node):
    """The module whose ``forward`` made ``node`` (torch.fx's ``nn_module_stack``), quoted."""
    stack = node.meta.get("nn_module_stack") or {}
    return f"{next(reversed(stack))!r}" if stack else "the model's forward"


def _block(walk, user, why):
    """Refuse the walk at ``user``, naming modules (never torch.fx's node names)."""
    if walk.blocked is not None:
        return
    if user.op == "call_module":
        walk.blocked = f"its output feeds {user.target!r} ({why})"
    else:
        walk.blocked = f"its output feeds {why} in {_owner(user)}"


def _depends_on(later, earlier):
    stack, seen = [later], set()
    while stack:
        node = stack.pop()
        if node is earlier:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False


def _merge_reason(node, user, label):
    """Why a merge refuses growth, naming a squeeze-excitation gate or a parameter operand."""
    others = [a for a in user.all_input_nodes if a is not node]
    if "multiplication" in label:
        if any(_depends_on(a, node) for a in others):
            return "a squeeze-excitation channel gate x * gate(x)"
        if any(_depends_on(node, a) for a in others):
            return "the channel gate of a squeeze-excitation x * gate(x)"
    parameters = [a.target for a in others if a.op == "get_attr"]
    if parameters:
        return f"{label} with the parameter {parameters[0]!r}"
    return label


def _follow(node, walk, modules, calls, *, segment, ndim, spatial, pooled, offset=None,
            merged=False):
    """Depth-first walk over the users of ``node`` while they are channel-wise.

    ``offset``: where the producer's channels start after the concatenations passed (None:
    none passed); ``merged``: an add or a concatenation was passed (a BatchNorm after it reads
    the stream, not the producer alone).
    """
    key = (node.name, offset, segment, spatial)
    if key in walk.seen:  # paths that meet again (an add reached twice) are walked once
        return
    walk.seen.add(key)
    for user in list(node.users):
        if walk.blocked is not None:
            return
        _visit(node, user, walk, modules, calls, segment, ndim, spatial, pooled, offset, merged)


def _note_activation(walk, segment, name, kind, node=None, merged=False):
    if segment == -1 and not walk.activation_seen:
        walk.activation_seen = True
        walk.activation, walk.activation_kind = name, kind
        walk.activation_node = None if node is None else node.name
        walk.activation_merged = merged or walk.resized


def _note_reshaping(walk, segment, node, user):
    """A pooling before the producer's activation: its pre-activation is not the layer's own."""
    if segment == -1 and not walk.activation_seen and _shape(node) != _shape(user):
        walk.resized = True


def _consumer(walk, user, spatial, offset):
    where = (spatial, offset)
    if walk.consumers.setdefault(user.target, where) != where:
        return _block(walk, user, "it reads the channels at two different positions")
    return None


def _merge(node, user, walk, modules, calls, go):
    """A residual add or a concatenation: follow the sum (or the concatenation) onwards."""
    target = user.target
    if user.op == "call_function" and target in _CAT_FUNCTIONS:
        tensors = user.args[0] if user.args else user.kwargs.get("tensors")
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
        ndim = go["ndim"] if go["spatial"] is None else 2
        if not isinstance(tensors, (list, tuple)) or dim not in (1, 1 - ndim):
            return _block(walk, user, f"a concatenation along dim {dim}, not the channels")
        if [t is node for t in tensors].count(True) != 1:
            return _block(walk, user, "a concatenation that takes the channels twice")
        before = tensors[:[t is node for t in tensors].index(True)]
        shapes = [_shape(t) if isinstance(t, torch.fx.Node) else None for t in before]
        if any(shape is None or len(shape) < 2 for shape in shapes):
            walk.needs_input = (
                f"example_input is needed: {user.name!r} concatenates channels whose counts are "
                "unknown (pass an input batch, e.g. torch.zeros(1, 3, 32, 32))"
            )
            return _block(walk, user, "a concatenation of unknown channel counts")
        if go["spatial"] is not None:
            return _block(walk, user, "a concatenation after a flatten")
        offset = (go["offset"] or 0) + sum(shape[1] for shape in shapes if shape is not None)
        return _follow(user, walk, modules, calls, **{**go, "offset": offset, "merged": True})
    tensors = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, torch.fx.Node)]
    if "alpha" in user.kwargs or any(t.op == "get_attr" for t in tensors):
        return _block(walk, user, "an add of a parameter or with alpha")
    before, after = _shape(node), _shape(user)
    if before is not None and after is not None and before != after:
        return _block(walk, user, f"an add that broadcasts {before} to {after}")
    if len(tensors) > 1:  # a sum of tensors (an add of a constant is channel-wise)
        if go["offset"] is not None or go["spatial"] is not None:
            return _block(walk, user, "a residual add after a concatenation or a flatten")
        walk.adds.setdefault(user.name, set()).add(node.name)
    return _follow(user, walk, modules, calls, **{**go, "merged": len(tensors) > 1 or go["merged"]})


def _visit(node, user, walk, modules, calls, segment, ndim, spatial, pooled, offset, merged):
    go = dict(segment=segment, ndim=ndim, spatial=spatial, pooled=pooled, offset=offset,
              merged=merged)
    flat = spatial is not None
    if user.op == "output":
        walk.blocked = _OUTPUT
        return
    if user.op == "call_module":
        module = modules[user.target]
        stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if calls[user.target] > 1 and stateful:
            # A parameter-free module (one ReLU used everywhere) may be shared; a stateful one
            # would be grown twice.
            return _block(walk, user, f"module {user.target!r} is called more than once")
        if isinstance(module, BATCH_NORM):
            if flat:
                return _block(walk, user, "BatchNorm after a flatten")
            if merged:  # it normalises the stream or the concatenation, not the producer alone
                if walk.downstream_norms.setdefault(user.target, offset) != offset:
                    return _block(walk, user, "a BatchNorm reading the channels twice")
                return _follow(user, walk, modules, calls, **go)
            if segment in walk.norms and walk.norms[segment] != user.target:
                return _block(walk, user, "a second BatchNorm on the same channels")
            walk.norms[segment] = user.target
            return _follow(user, walk, modules, calls, **go)
        if isinstance(module, ACTIVATION_TYPES):
            _note_activation(walk, segment, user.target, module_activation(module), user, merged)
            return _follow(user, walk, modules, calls, **go)
        if isinstance(module, _PASS_MODULES):
            pool_one = isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and (
                module.output_size in (1, (1, 1))
            )
            _note_reshaping(walk, segment, node, user)
            return _follow(user, walk, modules, calls, **{**go, "pooled": pooled or pool_one})
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                return _block(walk, user, "a flatten that does not start at dim 1")
            return _flatten(node, user, walk, modules, calls, go)
        if is_depthwise_conv(module):
            if merged:
                return _block(walk, user, "a depthwise conv after an add or a concatenation")
            if flat or ndim != 4:
                return _block(walk, user, "depthwise conv after a flatten")
            walk.depthwise.append(user.target)
            _note_activation(walk, segment, None, None)  # a later activation is not the producer's
            new = len(walk.depthwise) - 1
            return _follow(user, walk, modules, calls, **{**go, "segment": new})
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            if flat or ndim != 4:
                return _block(walk, user, "a conv reading flattened channels")
            return _consumer(walk, user, 1, offset)
        if isinstance(module, nn.Linear):
            if ndim != 2 and not flat:
                return _block(walk, user, "a Linear applied to a 4-d tensor reads W, not channels")
            return _consumer(walk, user, spatial or 1, offset)
        return _block(walk, user, f"unsupported module {describe_module(module)}")
    if user.op in ("call_function", "call_method"):
        target = user.target
        if (user.op == "call_function" and target in _ADD_FUNCTIONS | _CAT_FUNCTIONS) or (
                user.op == "call_method" and target in _ADD_METHODS):
            return _merge(node, user, walk, modules, calls, go)
        if user.op == "call_function" and target in _MERGE_LABELS:
            return _block(walk, user, _merge_reason(node, user, _MERGE_LABELS[target]))
        if user.op == "call_method" and target in _MERGE_METHODS:
            return _block(walk, user, _merge_reason(node, user, _MERGE_METHODS[target]))
        if target in _AXIS_MOVES:
            return _block(walk, user, f"a {_target_name(user)} that moves the channel axis")
        if user.args and user.args[0] is not node:
            return _block(walk, user,
                          f"an operation ({_target_name(user)}) reading it as a non-input argument")
        kind = call_activation(target, user.args, user.kwargs)
        if kind is not None:  # F.relu, torch.relu, x.relu_(), ...: as its module form
            _note_activation(walk, segment, None, kind, user, merged)
            return _follow(user, walk, modules, calls, **go)
        if user.op == "call_function" and target in _PASS_FUNCTIONS:
            size = user.args[1] if len(user.args) > 1 else user.kwargs.get("output_size")
            pool_one = target in (_F.adaptive_avg_pool2d, _F.adaptive_max_pool2d) and size in (
                1,
                (1, 1),
            )
            _note_reshaping(walk, segment, node, user)
            return _follow(user, walk, modules, calls, **{**go, "pooled": pooled or pool_one})
        if user.op == "call_method" and target in ("contiguous", "clone"):
            return _follow(user, walk, modules, calls, **go)
        if target == "size" and user.op == "call_method":
            dims = user.args[1:] or tuple(user.kwargs.values())
            if dims in ((0,),):
                return None  # the batch size does not depend on the channel count
            return _block(walk, user, "a size() query that reads the channel count")
        if (user.op == "call_method" and target == "mean") or target is torch.mean:
            dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
            dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
            if ndim == 4 and not flat and set(dims) in ({2, 3}, {-1, -2}):
                keep = user.kwargs.get("keepdim", False) or (len(user.args) > 2 and user.args[2])
                return _follow(
                    user, walk, modules, calls, **{**go, "ndim": 4 if keep else 2, "pooled": True}
                )
            return _block(walk, user, "a mean over the channel axis")
        if target in (torch.flatten, "flatten"):
            start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
            end = user.args[2] if len(user.args) > 2 else user.kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                return _block(walk, user, "a flatten that does not start at dim 1")
            return _flatten(node, user, walk, modules, calls, go)
        if target in ("view", "reshape") or target is torch.reshape:
            before, after = _shape(node), _shape(user)
            if before is None or after is None:
                walk.needs_input = (
                    f"example_input is needed: a {target} in {_owner(user)} may flatten "
                    "channels; pass an input batch, e.g. torch.zeros(1, 3, 32, 32), to check it"
                )
                return _block(walk, user, f"a {target} whose shapes are unknown")
            if len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
                return _flatten(node, user, walk, modules, calls, go)
            return _block(walk, user, f"a {target} to {after}, not a flatten from dim 1")
        return _block(walk, user, f"an unsupported operation {_target_name(user)}")
    return _block(walk, user, f"an unsupported {user.op} node")


def _flatten(node, user, walk, modules, calls, go):
    if go["spatial"] is not None or go["ndim"] == 2:
        return _follow(user, walk, modules, calls, **go)  # already flat: a no-op for channels
    shape = _shape(node)
    if shape is not None:
        spatial = math.prod(shape[2:])
    elif go["pooled"]:
        spatial = 1
    else:
        walk.needs_input = (
            f"example_input is needed: a flatten in {_owner(user)} flattens channels whose H*W "
            "is unknown (pass an input batch, e.g. torch.zeros(1, 3, 32, 32))"
        )
        return _block(walk, user, "a flatten of unknown H*W")
    return _follow(user, walk, modules, calls, **{**go, "spatial": spatial, "ndim": 2})


def _target_name(node):
    target = node.target
    return repr(target if isinstance(target, str) else getattr(target, "__name__", str(target)))


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
    >>> survey_flows(Block())
    FlowSurvey(flows=(TorchFlow(producer='a', consumers=(TorchConsumer(module='b', spatial=1, \
offset=None),), norm=None, depthwise=(), activation=None, activation_kind='relu', members=(), \
activation_node=None, downstream_norms=()),), \
skipped={'b': "its output is added to the network's input in the model's forward"})
    """
    model = unwrap(model) if isinstance(model, nn.Module) else model
    flows, blocked = _analyse(model, example_input)
    skipped = {name: why for name, why in blocked.items() if why not in (_DEPTHWISE, _OUTPUT)}
    return FlowSurvey(tuple(flows), skipped)


def _readers(graph_module, producer):
    """``(passed, readers, reaches_output)`` of every call of ``producer`` (:func:`_walk_users`)."""
    modules = dict(graph_module.named_modules())
    calls = [node for node in graph_module.graph.nodes
             if node.op == "call_module" and node.target == producer]
    return _walk_users([user for node in calls for user in node.users], modules,
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
        graph_module = _trace(model, None)
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
        readers -= set(flow.producers)
        where = f"flow of {flow.producer!r}"
        if reaches_output:
            raise GrowthError(
                f"{where}: its channels reach the network's output in the traced graph; "
                "growing it would change the output's shape"
            )
        routing = flow.routing
        named = {c.module for c in flow.consumers} | set(routing.consumers if routing else ())
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


def find_flow(model: nn.Module, layer: str, example_input: Any = None) -> TorchFlow:
    """The flow of one producer, or :class:`GrowthError` saying why it cannot be grown."""
    return discover_flows(model, example_input, layers=[layer])[0]
