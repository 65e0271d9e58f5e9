"""The per-producer channel walk of :mod:`.discovery` over a ``torch.fx`` graph.

From one producer node, :func:`follow` follows the output channels through the
channel-wise operations it understands (BatchNorm, activations, pooling, dropout, depthwise
convs, flatten, adds, concatenations, squeeze-excitation products with the reshapes and size
reads of their gates (:mod:`.shape_ops`), channels-last permutes) and records in a
:class:`Walk` the consumers that read them, the activation(s) they reach, or why the walk
stopped. :mod:`.discovery` turns walks into flows.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from .activations import ACTIVATION_TYPES, call_activation, module_activation
from .flows import (
    BATCH_NORM,
    describe_module,
    is_depthwise_conv,
)
from .layouts import CHANNELS_LAST_PASS, layer_norm_reason, layer_scale, permuted_layout
from .paths import (
    LINEAR_POOL_FUNCTIONS,
    LINEAR_POOL_MODULES,
    START,
    activation_path,
    after_norm,
    after_pooling,
    after_unfollowable,
)
from .products import (
    PRODUCT_FUNCTIONS,
    PRODUCT_METHODS,
    broadcasts_over_space,
    product_role,
)
from .shape_ops import is_reshape, is_shape_read, read_uses, reshape_step
from .tracing import node_shape, target_name, trace_model

__all__ = [
    "DEPTHWISE_REASON",
    "OUTPUT_REASON",
    "Walk",
    "follow",
    "node_shape",
    "owner_of",
    "reaches_output",
    "trace_model",
    "walk_users",
]


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
DEPTHWISE_REASON = "it is a depthwise convolution (it grows with its producer)"
OUTPUT_REASON = "it is the network's output layer (a classifier is a consumer only)"


@dataclass
class Walk:
    """What one producer's channels reach, gathered while walking the graph."""

    norms: dict = field(default_factory=dict)  # segment (-1 producer, k depthwise k) -> BN name
    depthwise: list = field(default_factory=list)
    consumers: dict = field(default_factory=dict)  # module name -> (spatial, offset)
    downstream_norms: dict = field(default_factory=dict)  # BN after an add or a cat -> offset
    adds: dict = field(default_factory=dict)  # add (or product) node -> the arguments reached
    products: dict = field(default_factory=dict)  # x * gate(x) node -> sides reached (.products)
    joins: set = field(default_factory=set)  # adds and products reached before any other one
    paths: list = field(default_factory=list)  # every activation reached, for SSD (.paths)
    pending: str | None = None  # a refusal that holds only if nothing else refuses (.layouts)
    seen: set = field(default_factory=set)  # (node, offset, merged) already walked
    activation: str | None = None
    activation_kind: str | None = None
    activation_seen: bool = False
    activation_node: str | None = None  # the fx node of the activation (SSD of groups)
    activation_merged: bool = False  # the activation comes after an add, a cat or a pooling
    resized: bool = False  # a pooling came before the activation
    blocked: str | None = None
    needs_input: str | None = None
    shape_uses: dict = field(default_factory=dict)  # reshape fed a channel count -> where read
    shape_sources: dict = field(default_factory=dict)  # tensor whose count is read -> by what


def reaches_output(node, modules):
    """Whether the graph output depends on ``node`` through no other Conv2d/Linear."""
    return walk_users(node.users, modules, through_depthwise=False)[2]


def walk_users(start, modules, *, through_depthwise):
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


def owner_of(node):
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
        walk.blocked = f"its output feeds {why} in {owner_of(user)}"


def _merge_reason(node, user, label):
    """Why a merge refuses growth, naming a parameter operand."""
    others = [a for a in user.all_input_nodes if a is not node]
    parameters = [a.target for a in others if a.op == "get_attr"]
    if parameters:
        return f"{label} with the parameter {parameters[0]!r}"
    return label


def follow(node, walk, modules, calls, *, segment, ndim, spatial, pooled, offset=None,
            merged=False, route=START, last=False):
    """Depth-first walk over the users of ``node`` while they are channel-wise.

    ``offset``: where the producer's channels start after the concatenations passed (None:
    none passed); ``merged``: an add or a concatenation was passed (a BatchNorm after it reads
    the stream, not the producer alone); ``route``: the norm and poolings passed before an
    activation (:mod:`.paths`; None once one was passed); ``last``: the channels are on the
    last axis (:mod:`.layouts`).
    """
    key = (node.name, offset, segment, spatial)
    if key in walk.seen:  # paths that meet again (an add reached twice) are walked once
        return
    walk.seen.add(key)
    for user in list(node.users):
        if walk.blocked is not None:
            return
        _visit(node, user, walk, modules, calls, segment, ndim, spatial, pooled, offset, merged,
               route, last)


def _note_activation(walk, segment, name, kind, node=None, merged=False):
    if segment == -1 and not walk.activation_seen:
        walk.activation_seen = True
        walk.activation, walk.activation_kind = name, kind
        walk.activation_node = None if node is None else node.name
        walk.activation_merged = merged or walk.resized


def _note_reshaping(walk, segment, node, user):
    """A pooling before the producer's activation: its pre-activation is not the layer's own."""
    if segment == -1 and not walk.activation_seen and node_shape(node) != node_shape(user):
        walk.resized = True


def _path_to(walk, go, user, kind):
    """Record the route's path ending at activation ``user``; later ones are not the layer's."""
    path = activation_path(go["route"], user, kind, go["offset"])
    if path is not None:
        walk.paths.append(path)
    return {**go, "route": None}


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
        shapes = [node_shape(t) if isinstance(t, torch.fx.Node) else None for t in before]
        if any(shape is None or len(shape) < 2 for shape in shapes):
            walk.needs_input = (
                f"example_input is needed: {user.name!r} concatenates channels whose counts are "
                "unknown (pass an input batch, e.g. torch.zeros(1, 3, 32, 32))"
            )
            return _block(walk, user, "a concatenation of unknown channel counts")
        if go["spatial"] is not None:
            return _block(walk, user, "a concatenation after a flatten")
        offset = (go["offset"] or 0) + sum(shape[1] for shape in shapes if shape is not None)
        return follow(user, walk, modules, calls, **{**go, "offset": offset, "merged": True})
    tensors = [a for a in (*user.args, *user.kwargs.values()) if isinstance(a, torch.fx.Node)]
    if "alpha" in user.kwargs or any(t.op == "get_attr" for t in tensors):
        return _block(walk, user, "an add of a parameter or with alpha")
    before, after = node_shape(node), node_shape(user)
    if before is not None and after is not None and before != after:
        return _block(walk, user, f"an add that broadcasts {before} to {after}")
    if len(tensors) > 1:  # a sum of tensors (an add of a constant is channel-wise)
        if go["offset"] is not None or go["spatial"] is not None:
            return _block(walk, user, "a residual add after a concatenation or a flatten")
        walk.adds.setdefault(user.name, set()).add(node.name)
        if not go["merged"]:
            walk.joins.add(user.name)
    return follow(user, walk, modules, calls, **{**go, "merged": len(tensors) > 1 or go["merged"]})


def _product(node, user, walk, modules, calls, go, role):
    """A squeeze-excitation ``x * gate(x)``: joins the group like an add (:mod:`.products`)."""
    if go["offset"] is not None or go["spatial"] is not None:
        return _block(walk, user, "a squeeze-excitation product after a concatenation or a flatten")
    if not broadcasts_over_space(node_shape(node), node_shape(user)):
        return _block(walk, user,
                      f"a product that broadcasts {node_shape(node)} to {node_shape(user)}")
    walk.adds.setdefault(user.name, set()).add(node.name)
    walk.products.setdefault(user.name, set()).add(role)
    if not go["merged"]:
        walk.joins.add(user.name)
    return follow(user, walk, modules, calls, **{**go, "merged": True})


def _reads_channels_last(user, modules):
    """Whether ``user`` may read channels on the last axis (:mod:`.layouts`)."""
    if user.op == "call_module":
        return isinstance(modules[user.target], (nn.Linear, nn.LayerNorm, *_PASS_MODULES)) and (
            not isinstance(modules[user.target], (nn.MaxPool2d, nn.AvgPool2d,
                                                  nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)))
    target = user.target
    return (target in _ADD_FUNCTIONS | PRODUCT_FUNCTIONS | _AXIS_MOVES | CHANNELS_LAST_PASS
            or target in _ADD_METHODS | PRODUCT_METHODS
            or call_activation(target, user.args, user.kwargs) is not None)


def _visit(node, user, walk, modules, calls, segment, ndim, spatial, pooled, offset, merged,
           route, last):
    go = dict(segment=segment, ndim=ndim, spatial=spatial, pooled=pooled, offset=offset,
              merged=merged, route=route, last=last)
    flat = spatial is not None
    if user.op == "output":
        walk.blocked = OUTPUT_REASON
        return
    if last and not _reads_channels_last(user, modules):
        return _block(walk, user, f"{_label(user, modules)} on channels moved to the last axis")
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
            go["route"] = after_norm(route, user.target, offset if merged else None)
            if merged:  # it normalises the stream or the concatenation, not the producer alone
                if walk.downstream_norms.setdefault(user.target, offset) != offset:
                    return _block(walk, user, "a BatchNorm reading the channels twice")
                return follow(user, walk, modules, calls, **go)
            if segment in walk.norms and walk.norms[segment] != user.target:
                return _block(walk, user, "a second BatchNorm on the same channels")
            walk.norms[segment] = user.target
            return follow(user, walk, modules, calls, **go)
        if isinstance(module, nn.LayerNorm):
            walk.blocked = walk.blocked or layer_norm_reason(
                f"the LayerNorm {user.target!r}", module.normalized_shape, last or ndim == 2)
            return None
        if isinstance(module, ACTIVATION_TYPES):
            _note_activation(walk, segment, user.target, module_activation(module), user, merged)
            return follow(user, walk, modules, calls,
                           **_path_to(walk, go, user, module_activation(module)))
        if isinstance(module, _PASS_MODULES):
            pool_one = isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and (
                module.output_size in (1, (1, 1))
            )
            _note_reshaping(walk, segment, node, user)
            go["route"] = after_pooling(route, node, user, isinstance(module, LINEAR_POOL_MODULES),
                                        node_shape)
            return follow(user, walk, modules, calls, **{**go, "pooled": pooled or pool_one})
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                return _block(walk, user, "a flatten that does not start at dim 1")
            return _flatten(node, user, walk, modules, calls, go)
        if is_depthwise_conv(module):
            if offset is not None:  # after an add it filters the group's stream, channel-wise
                return _block(walk, user, "a depthwise conv after a concatenation")
            if flat or ndim != 4:
                return _block(walk, user, "depthwise conv after a flatten")
            walk.depthwise.append(user.target)
            _note_activation(walk, segment, None, None)  # a later activation is not the producer's
            new = len(walk.depthwise) - 1
            return follow(user, walk, modules, calls, **{**go, "segment": new, "route": None})
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            if flat or ndim != 4:
                return _block(walk, user, "a conv reading flattened channels")
            return _consumer(walk, user, 1, offset)
        if isinstance(module, nn.Linear):
            if ndim != 2 and not flat and not last:
                return _block(walk, user, "a Linear applied to a 4-d tensor reads W, not channels")
            return _consumer(walk, user, spatial or 1, offset)
        return _block(walk, user, f"unsupported module {describe_module(module)}")
    if user.op in ("call_function", "call_method"):
        target = user.target
        if (user.op == "call_function" and target in _ADD_FUNCTIONS | _CAT_FUNCTIONS) or (
                user.op == "call_method" and target in _ADD_METHODS):
            return _merge(node, user, walk, modules, calls, go)
        if (user.op == "call_function" and target in PRODUCT_FUNCTIONS) or (
                user.op == "call_method" and target in PRODUCT_METHODS):
            role = product_role(node, user)
            if role is not None:
                return _product(node, user, walk, modules, calls, go, role)
            scale = layer_scale(node, user, last)
            if scale is not None:  # refused only if nothing further on is (.layouts)
                walk.pending = walk.pending or (
                    f"its output feeds a layer scale in {owner_of(user)}: a multiplication with "
                    f"the parameter {scale!r}, which growth does not widen")
                return follow(user, walk, modules, calls, **go)
        if user.op == "call_function" and target in _MERGE_LABELS:
            return _block(walk, user, _merge_reason(node, user, _MERGE_LABELS[target]))
        if user.op == "call_method" and target in _MERGE_METHODS:
            return _block(walk, user, _merge_reason(node, user, _MERGE_METHODS[target]))
        if target is _F.layer_norm:
            size = user.args[1] if len(user.args) > 1 else user.kwargs.get("normalized_shape")
            walk.blocked = walk.blocked or layer_norm_reason(
                f"a LayerNorm in {owner_of(user)}", tuple(size), last or ndim == 2)
            return None
        if target in _AXIS_MOVES:
            layout = permuted_layout(user, ndim, last)
            if layout is None or flat:
                return _block(walk, user, f"a {target_name(user)} that moves the channel axis")
            return follow(user, walk, modules, calls, **{
                **go, "last": layout, "route": after_unfollowable(route, user, "a permute")})
        if is_shape_read(node, user):  # x.size(), x.shape, g.expand_as(x) (.shape_ops)
            uses, reason = read_uses(node, user, go["offset"], spatial)
            if reason is not None:
                return _block(walk, user, reason)
            walk.shape_uses.update(dict.fromkeys((use.name for use in uses), owner_of(user)))
            return None
        if user.args and user.args[0] is not node:
            return _block(walk, user,
                          f"an operation ({target_name(user)}) reading it as a non-input argument")
        kind = call_activation(target, user.args, user.kwargs)
        if kind is not None:  # F.relu, torch.relu, x.relu_(), ...: as its module form
            _note_activation(walk, segment, None, kind, user, merged)
            return follow(user, walk, modules, calls, **_path_to(walk, go, user, kind))
        if user.op == "call_function" and target in _PASS_FUNCTIONS:
            size = user.args[1] if len(user.args) > 1 else user.kwargs.get("output_size")
            pool_one = target in (_F.adaptive_avg_pool2d, _F.adaptive_max_pool2d) and size in (
                1,
                (1, 1),
            )
            _note_reshaping(walk, segment, node, user)
            go["route"] = after_pooling(route, node, user, target in LINEAR_POOL_FUNCTIONS,
                                        node_shape)
            return follow(user, walk, modules, calls, **{**go, "pooled": pooled or pool_one})
        if user.op == "call_method" and target in ("contiguous", "clone"):
            return follow(user, walk, modules, calls, **go)
        if (user.op == "call_method" and target == "mean") or target is torch.mean:
            dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
            dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
            if ndim == 4 and not flat and set(dims) in ({2, 3}, {-1, -2}):
                keep = user.kwargs.get("keepdim", False) or (len(user.args) > 2 and user.args[2])
                go["route"] = after_pooling(route, node, user, True, node_shape)
                return follow(
                    user, walk, modules, calls, **{**go, "ndim": 4 if keep else 2, "pooled": True}
                )
            return _block(walk, user, "a mean over the channel axis")
        if target in (torch.flatten, "flatten"):
            start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
            end = user.args[2] if len(user.args) > 2 else user.kwargs.get("end_dim", -1)
            if start != 1 or end != -1:
                return _block(walk, user, "a flatten that does not start at dim 1")
            return _flatten(node, user, walk, modules, calls, go)
        if is_reshape(user):  # view, reshape, unsqueeze, expand, [:, :, None] (.shape_ops)
            step = reshape_step(node, user, node_shape(node), node_shape(user), offset, spatial)
            if step.unknown:
                walk.needs_input = (
                    f"example_input is needed: a {target_name(user)} in {owner_of(user)} may "
                    "move channels; pass an input batch, e.g. torch.zeros(1, 3, 32, 32)")
            if step.refusal is not None:
                return _block(walk, user, step.refusal)
            where = f"{target_name(user)} in {owner_of(user)}"
            walk.shape_sources.update(dict.fromkeys((s.name for s in step.sources), where))
            if step.flatten:
                return _flatten(node, user, walk, modules, calls, go)
            _note_reshaping(walk, segment, node, user)
            return follow(user, walk, modules, calls, **{
                **go, "ndim": step.ndim, "spatial": None,
                "route": after_unfollowable(route, user, "a reshape")})
        return _block(walk, user, f"an unsupported operation {target_name(user)}")
    return _block(walk, user, f"an unsupported {user.op} node")


def _flatten(node, user, walk, modules, calls, go):
    if go["spatial"] is not None or go["ndim"] == 2:
        return follow(user, walk, modules, calls, **go)  # already flat: a no-op for channels
    go = {**go, "route": after_unfollowable(go["route"], user, "a flatten")}
    shape = node_shape(node)
    if shape is not None:
        spatial = math.prod(shape[2:])
    elif go["pooled"]:
        spatial = 1
    else:
        walk.needs_input = (
            f"example_input is needed: a flatten in {owner_of(user)} flattens channels whose H*W "
            "is unknown (pass an input batch, e.g. torch.zeros(1, 3, 32, 32))"
        )
        return _block(walk, user, "a flatten of unknown H*W")
    return follow(user, walk, modules, calls, **{**go, "spatial": spatial, "ndim": 2})


def _label(user, modules):
    if user.op == "call_module":
        return f"{describe_module(modules[user.target])} {user.target!r}"
    return f"{target_name(user)} in {owner_of(user)}"
