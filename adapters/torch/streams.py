"""Routed streams: producers whose channels are split, concatenated and shuffled before use.

ShuffleNetV2 splits its stream in halves (``x.chunk(2, dim=1)``), concatenates one half with a
branch's output and shuffles the channels (``x.unflatten(1, (2, -1)).transpose(1, 2)
.flatten(1, 2)``, or torchvision's ``view``/``transpose``/``contiguous``/``view``). Which
layer reads a channel then depends on its *position*, so appending new channels at the end of
each producer would move old channels onto other paths. See docs/design.md, 'Routed streams'.

:func:`routed_streams` finds, in a ``torch.fx`` trace, each *region*: the producers whose
outputs meet in such channel-moving operations (one group: every producer of a region grows by
the same number of channels, so the halves stay equal), the Conv2d *consumers* that read the
region's channels, and the BatchNorms and depthwise convs inside it (indexed by channel, so
they move with the channels). :func:`trace_slots` then says where every channel goes at any
width, by running the traced model with the region's producers emitting their channel numbers
and every channel-wise module passing them through: the data-moving operations run as they
are, whatever their spelling. :mod:`.permutations` uses it to place old and new channels.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .activations import ACTIVATION_TYPES, call_activation
from .flows import BATCH_NORM, GrowthError, TorchFlow, TorchMember, is_depthwise_conv, is_producer

__all__ = ["SlotMap", "StreamRouting", "routed_streams", "slot_tracer", "trace_slots"]

_PASS_TYPES = (nn.Dropout, nn.Dropout2d, nn.Identity, *ACTIVATION_TYPES)
#: Operations that move channels without computing on them (run as they are on channel ids).
_MOVE_METHODS = {"chunk", "split", "unflatten", "view", "reshape", "transpose", "flatten",
                 "contiguous", "clone", "permute", "movedim"}
_MOVE_FUNCTIONS = {operator.getitem, torch.chunk, torch.split, torch.transpose, torch.flatten,
                   torch.reshape, torch.permute, torch.movedim, torch.unflatten}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
_SPLITS = {"chunk", "split", "unflatten", torch.chunk, torch.split, torch.unflatten}


@dataclass(frozen=True)
class StreamRouting:
    """The modules of one routed region (names), what :func:`trace_slots` needs to run it.

    ``producers``: the region's producers in forward order (the flow's producer, then its
    members); ``consumers``: the Conv2d layers reading its channels; ``indexed``: BatchNorms
    and depthwise convs inside the region (after a channel-moving operation), whose entries
    follow the channels; ``passed``: every other module the channels pass (activations);
    ``input_shape``: the shape of the example input the trace runs on (batch 1).
    """

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    indexed: tuple[str, ...]
    passed: tuple[str, ...]
    input_shape: tuple[int, ...]

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules besides the producers (and their own norms) that a growth changes."""
        return (*self.consumers, *self.indexed)


@dataclass(frozen=True)
class SlotMap:
    """Where each channel of a routed region goes at one width of its producers.

    ``reads[module]``: per input channel of the module (a consumer's column, an indexed
    module's channel), the ``(producer index, channel)`` it holds. ``paths[p][c]``: the
    modules channel ``c`` of producer ``p`` reaches (its path's signature).
    """

    reads: dict[str, tuple[tuple[int, int], ...]]
    paths: tuple[tuple[frozenset[str], ...], ...]

    def position(self, module: str) -> dict[tuple[int, int], int]:
        """``{(producer, channel): input channel}`` of ``module``."""
        return {slot: i for i, slot in enumerate(self.reads[module])}


def _owner(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return f"{next(reversed(stack))!r}" if stack else "the model's forward"


def _is_move(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _MOVE_METHODS
    return node.op == "call_function" and (node.target in _MOVE_FUNCTIONS
                                           or node.target in _CAT_FUNCTIONS)


def _splits_channels(node: torch.fx.Node) -> bool:
    """A split of the channels into parts or groups: what makes a region routed (a permute or
    a flatten alone does not)."""
    if node.target in _SPLITS:
        return True
    if node.target in ("view", "reshape", torch.reshape):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return len(shape) >= 5
    return False


def _module(node: torch.fx.Node, modules: dict[str, nn.Module]) -> nn.Module:
    return modules[str(node.target)]


def _channel_wise(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = _module(node, modules)
        return isinstance(module, (*_PASS_TYPES, BATCH_NORM)) or is_depthwise_conv(module)
    if node.op in ("call_function", "call_method") and node.args:
        return call_activation(node.target, node.args, node.kwargs) is not None
    return False


def _is_size(node: torch.fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("size", "dim")) or (
        node.op == "call_function" and node.target is getattr and node.args[1:2] == ("shape",))


class _Refused(Exception):
    pass


def _source_producer(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node:
    """The producer call a concatenated tensor comes from, through channel-wise layers."""
    start = node
    while True:
        if node.op == "call_module" and is_producer(_module(node, modules)):
            return node
        first = node.args[0] if node.args else None
        if _channel_wise(node, modules) and isinstance(first, torch.fx.Node) and not (
                node.op == "call_module" and is_depthwise_conv(_module(node, modules))):
            node = first
            continue
        raise _Refused(f"a channel shuffle in {_owner(start)} takes channels that no growable "
                       "layer produces")


def _region(seed: torch.fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]):
    """The routed region grown from ``seed``: (producer nodes, consumers, indexed, passed).

    Returns None if the seed's channels reach no channel-moving operation (not a routed
    stream: the discovery's own reason stands); raises :class:`_Refused` with the reason when
    one is reached but the region cannot be grown.
    """
    producers = [seed]
    consumers: set[str] = set()
    indexed: set[str] = set()
    passed: set[str] = set()
    region: set[torch.fx.Node] = set()
    stack, moved, problems = [seed], False, []
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in region or _is_size(user):
                continue
            try:
                if _take(user, node, modules, calls, producers, stack, consumers, indexed,
                         passed, region):
                    moved = moved or _splits_channels(user)
                    region.add(user)
                    stack.append(user)
            except _Refused as problem:
                problems.append(problem)
    if not moved:
        return None
    if problems:
        raise problems[0]
    return producers, consumers, indexed, passed


def _take(user, node, modules, calls, producers, stack, consumers, indexed, passed, region):
    """Whether ``user`` of a region node carries the region's channels on (else it reads them).

    Raises :class:`_Refused` for a user that can neither carry nor read them.
    """
    if user.op == "output":
        raise _Refused("its channels reach the network's output through a channel shuffle")
    if user.op == "call_module" and calls[user.target] > 1:
        raise _Refused(f"{user.target!r} is called more than once")
    if user.op == "call_module" and not _channel_wise(user, modules):
        module = modules[user.target]
        if isinstance(module, nn.Conv2d) and is_producer(module):
            consumers.add(user.target)
            return False
        raise _Refused(f"its shuffled channels feed {user.target!r} ({type(module).__name__}), "
                       "not a Conv2d")
    if _channel_wise(user, modules):
        if user.op == "call_module":
            module = modules[user.target]
            if isinstance(module, BATCH_NORM) or is_depthwise_conv(module):
                indexed.add(user.target)
            else:
                passed.add(user.target)
        return True
    if not _is_move(user):
        what = user.target if isinstance(user.target, str) else getattr(
            user.target, "__name__", user.op)
        raise _Refused(f"its shuffled channels feed an operation ({what}) that does not only "
                       f"move channels in {_owner(user)}")
    if user.op == "call_function" and user.target in _CAT_FUNCTIONS:
        tensors = user.args[0] if user.args else user.kwargs.get("tensors")
        for t in tensors if isinstance(tensors, (list, tuple)) else ():
            if isinstance(t, torch.fx.Node) and t not in region and t is not node:
                source = _source_producer(t, modules)
                if source not in producers:
                    producers.append(source)
                    stack.append(source)
    return True


def routed_streams(model: nn.Module, graph_module: torch.fx.GraphModule, walks: dict[str, Any],
                   example_input: Any, final: str) -> list[TorchFlow]:
    """A TorchFlow per routed region of ``graph_module`` (a trace of ``model``).

    ``walks`` are the discovery's walks of every producer (name -> walk with ``blocked``,
    ``norms``, ``activation``, ``activation_kind``, ``activation_node``, ``depthwise``,
    ``adds``); the candidates are those it could not grow alone, but not for the reason
    ``final`` (the network's output layer). A candidate whose channels reach a channel shuffle
    that cannot grow gets that reason as its ``blocked``, in place.
    """
    modules = dict(graph_module.named_modules())
    calls: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    nodes = {n.target: n for n in graph_module.graph.nodes if n.op == "call_module"}
    order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
    candidates = {name: w for name, w in walks.items()
                  if w.blocked is not None and w.blocked != final}
    flows: list[TorchFlow] = []
    done: set[str] = set()
    for name in candidates:
        if name in done or name not in nodes:
            continue
        names = [name]
        try:
            found = _region(nodes[name], modules, calls)
            if found is None:
                continue
            producers, consumers, indexed, passed = found
            names = [p.target for p in sorted(producers, key=order.__getitem__)]
            flows.append(_routed_flow(model, names, candidates, consumers, indexed, passed,
                                      example_input))
        except _Refused as refusal:
            for refused in names:  # every producer of the region, with the region's reason
                if refused in walks:
                    walks[refused].blocked = str(refusal)
        done.update(names)
    return flows


def _routed_flow(model, names, walks, consumers, indexed, passed, example_input):
    for name in names:
        walk = walks.get(name)
        if walk is None:
            raise _Refused(f"{name!r}, a producer of its shuffled stream, cannot grow")
        if walk.depthwise or walk.adds:
            raise _Refused("a depthwise conv or a residual add lies between a producer of a "
                           "shuffled stream and the shuffle")
    if not all(isinstance(model.get_submodule(n), nn.Conv2d) for n in names):
        raise _Refused("a Linear layer feeds a channel shuffle")
    own = {walks[n].norms.get(-1) for n in names}  # grown with their producer's rows
    passed = set(passed) | (set(indexed) & own)
    indexed = set(indexed) - own
    widths = {int(model.get_submodule(n).out_channels) for n in names}
    if len(widths) != 1:
        raise _Refused(f"the producers of its shuffled stream differ in width {sorted(widths)}")
    if not isinstance(example_input, torch.Tensor):
        raise _Refused("example_input (one tensor) is needed to trace where shuffled channels go")
    routing = StreamRouting(tuple(names), tuple(sorted(consumers)), tuple(sorted(indexed)),
                            tuple(sorted(passed)), (1, *example_input.shape[1:]))
    width = widths.pop()
    tracer = slot_tracer(model, routing)
    try:  # the region must carry channel ids as it is, and at a larger (even) width too
        tracer.slots(width)
        tracer.slots(width + 2)
    except GrowthError as error:
        raise _Refused(f"its shuffled channels cannot be followed: {error}") from error

    def member(name):
        w = walks[name]
        return TorchMember(name, w.norms.get(-1), w.activation, w.activation_kind,
                           w.activation_node)

    first = walks[names[0]]
    return TorchFlow(producer=names[0], norm=first.norms.get(-1), activation=first.activation,
                     activation_kind=first.activation_kind, activation_node=first.activation_node,
                     members=tuple(member(n) for n in names[1:]), routing=routing)


class _SlotTracer(torch.fx.Interpreter):
    """Runs the nodes between a region's producers and its modules on channel ids.

    The producers emit their channel numbers (float64, from 1, one producer after the other);
    channel-wise modules and activation calls pass them; every other node the region's modules
    depend on runs as it is (the channel-moving operations and the sizes they read); the rest
    of the model is not run.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, routing: StreamRouting):
        super().__init__(graph_module)
        self.routing = routing
        producers = set(routing.producers)
        readers = set(routing.consumers) | set(routing.indexed)
        stack = [n for n in graph_module.graph.nodes
                 if n.op == "call_module" and n.target in readers]
        self.needed: set[torch.fx.Node] = set()
        while stack:
            node = stack.pop()
            if node in self.needed:
                continue
            self.needed.add(node)
            if not (node.op == "call_module" and node.target in producers):
                stack.extend(node.all_input_nodes)
        self.through = set(routing.indexed) | set(routing.passed)
        self.width = 0
        self.inputs: dict[str, torch.Tensor] = {}
        self.spatial: dict[torch.fx.Node, tuple[int, ...]] = {}  # H, W of each module's output
        modes = [(m, m.training) for m in graph_module.modules()]
        graph_module.eval()  # shape propagation must not touch BatchNorm running stats
        device = next(graph_module.parameters(), torch.zeros(())).device  # meta for Firefly
        try:
            with torch.no_grad():
                ShapeProp(graph_module).propagate(torch.zeros(routing.input_shape, device=device))
        finally:
            for m, mode in modes:
                m.training = mode
        for node in self.needed:
            shape = getattr(node.meta.get("tensor_meta"), "shape", None)
            if node.op == "call_module" and shape is not None and len(shape) == 4:
                self.spatial[node] = tuple(shape[2:])

    def _sized(self, n: torch.fx.Node, ids: torch.Tensor) -> torch.Tensor:
        """Channel ids spread over the module's real output size (a strided depthwise conv
        or a pooling halves it), so operations reading sizes see the model's own."""
        if n not in self.spatial or ids.ndim != 4:
            return ids
        return ids[:, :, :1, :1].expand(1, ids.shape[1], *self.spatial[n])

    def run_node(self, n: torch.fx.Node) -> Any:
        if n not in self.needed:
            return None
        if n.op == "call_module" and n.target in self.routing.producers:
            base = self.routing.producers.index(n.target) * self.width
            ids = torch.arange(self.width, dtype=torch.float64) + base + 1
            return self._sized(n, ids.reshape(1, -1, 1, 1))
        first = n.args[0] if n.args else None
        if n.op == "call_module" and isinstance(first, torch.fx.Node) and (
                n.target in self.through or n.target in self.routing.consumers):
            self.inputs[str(n.target)] = value = self.env[first]
            return self._sized(n, value)
        if n.op in ("call_function", "call_method") and isinstance(first, torch.fx.Node) and (
                call_activation(n.target, n.args, n.kwargs) is not None):
            return self.env[first]  # an activation call passes the ids
        return super().run_node(n)

    def slots(self, width: int) -> SlotMap:
        """Where each channel goes when every producer has ``width`` channels."""
        self.width, self.inputs = width, {}
        try:
            with torch.no_grad():
                self.run(*(torch.zeros(self.routing.input_shape)
                           for n in self.graph.nodes if n.op == "placeholder"))
        except (RuntimeError, ValueError, TypeError, IndexError) as error:  # a fixed shape, ...
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise GrowthError(f"the operations between {self.routing.producers[0]!r} and its "
                              f"readers fail at {width} channels per producer ({first})"
                              ) from error
        return _slot_map(self.routing, width, self.inputs)


def trace_slots(model: nn.Module, routing: StreamRouting, width: int) -> SlotMap:
    """Where every channel of ``routing``'s producers goes when each has ``width`` channels.

    Raises :class:`GrowthError` if the region does not carry the ids to its modules intact
    (a module reads a channel twice, a value that is not one channel, or a wrong count).
    For several widths of one model, trace once: ``slot_tracer(model, routing).slots(w)``.
    """
    return slot_tracer(model, routing).slots(width)


def slot_tracer(model: nn.Module, routing: StreamRouting) -> _SlotTracer:
    """A tracer of ``routing``'s region in ``model`` (see :func:`trace_slots`)."""
    return _SlotTracer(torch.fx.symbolic_trace(model), routing)


def _slot_map(routing: StreamRouting, width: int, inputs: dict[str, torch.Tensor]) -> SlotMap:
    count = len(routing.producers) * width
    reads: dict[str, tuple[tuple[int, int], ...]] = {}
    reached: list[list[set[str]]] = [[set() for _ in range(width)] for _ in routing.producers]
    for module in (*routing.consumers, *routing.indexed):
        value = inputs.get(module)
        if value is None or value.ndim != 4 or value.dtype != torch.float64 or len(value) != 1:
            raise GrowthError(f"{module!r} does not read the shuffled channels as a 4-d tensor")
        flat = value[0].reshape(value.shape[1], -1)
        ids = flat[:, 0]
        if not bool((flat == ids[:, None]).all()) or not bool((ids == ids.round()).all()) or (
                bool((ids < 1).any()) or bool((ids > count).any())):
            raise GrowthError(f"{module!r} reads values that are not single shuffled channels")
        slots = tuple(divmod(int(i) - 1, width) for i in ids.tolist())
        if len(set(slots)) != len(slots):
            raise GrowthError(f"{module!r} reads a shuffled channel twice")
        reads[module] = slots
        for p, c in slots:
            reached[p][c].add(module)
    for p, name in enumerate(routing.producers):
        for c in range(width):
            if not reached[p][c] & set(routing.consumers):
                raise GrowthError(f"channel {c} of {name!r} reaches no layer after the shuffle")
    paths = tuple(tuple(frozenset(s) for s in per) for per in reached)
    return SlotMap(reads, paths)
