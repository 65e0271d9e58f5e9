"""Model surgery for PyTorch: find where a layer's channels flow, and widen it atomically.

:func:`discover_flows` traces a model with ``torch.fx`` and, for every growable
``Conv2d``/``Linear`` *producer*, follows its output channels through the
channel-wise layers after it (BatchNorm, activations, pooling, dropout, a
depthwise ``Conv2d`` with its BatchNorm, flatten) to every *consumer* that reads
them (``Conv2d``, ``Linear``, flatten -> ``Linear`` where a channel owns ``H*W``
consecutive columns). The result, a :class:`TorchFlow`, names modules; its
:meth:`TorchFlow.channel_flow` turns it into the core's
:class:`simcore.growth.flow.ChannelFlow` over ``state_dict`` names, which is what
the framework-neutral growth operators take.

A producer whose channels reach a residual add, a concatenation, the network
output or any operation this module does not understand is *not growable*:
asking to grow it raises :class:`GrowthError` naming the layer and the node.
Where tracing fails (data-dependent control flow), describe the flow by hand::

    TorchFlow("conv1", norm="bn1", consumers=("conv2",))

:func:`apply_growth` writes grown arrays back into the modules: parameters,
BatchNorm buffers, ``in/out_channels``, ``in/out_features``, ``groups`` and
``num_features`` change together, devices, dtypes and ``requires_grad`` are
kept, and the optimizer's parameter references and state follow. It computes
everything first and then swaps; if anything raises during the swap, every
change already made is undone, so the model and the optimizer are exactly as
before.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from simcore._arrays import check_choice
from simcore.growth.flow import BatchNorm, ChannelFlow, Consumer, Depthwise
from simcore.growth.optim_state import MODES

from .optim import _maps, plan_optimizer_growth

__all__ = [
    "GrowthError",
    "TorchConsumer",
    "TorchDepthwise",
    "TorchFlow",
    "apply_growth",
    "discover_flows",
    "find_flow",
    "unwrap",
]


_BN = nn.modules.batchnorm._BatchNorm


class GrowthError(ValueError):
    """A layer cannot be grown (its channels reach an operation growth cannot follow)."""


@dataclass(frozen=True)
class TorchDepthwise:
    """A depthwise ``Conv2d`` (``groups == in == out``) the channels pass through, with its BN."""

    conv: str
    norm: str | None = None


@dataclass(frozen=True)
class TorchConsumer:
    """A module reading the producer's channels; ``spatial`` columns per channel after a flatten."""

    module: str
    spatial: int = 1

    def __post_init__(self):
        if not isinstance(self.module, str):
            raise TypeError(f"module must be a module name (str), got {type(self.module).__name__}")
        if isinstance(self.spatial, bool) or not isinstance(self.spatial, int) or self.spatial < 1:
            raise ValueError(f"spatial must be a positive int, got {self.spatial!r}")


_ACTIVATION_MODULES = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu",
    nn.SiLU: "swish",
    nn.GELU: "gelu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
    nn.Identity: "identity",
    nn.LeakyReLU: None,
    nn.ELU: None,
    nn.Softplus: None,
    nn.Hardswish: None,
    nn.Mish: None,
}


@dataclass(frozen=True)
class TorchFlow:
    """One growable producer module and every module its output channels flow through.

    Names are module paths as in ``model.named_modules()``. ``activation`` is the
    activation module right after the producer (and its ``norm``), used by SSD
    to read pre-activations and backprop signals; ``activation_kind`` its kind
    ("relu", "swish", "tanh", "sigmoid", "gelu", "identity") for the second
    derivative, inferred from the module type when not given.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    >>> flow = TorchFlow("0", norm="1", activation="2", consumers=("3",))
    >>> flow.channel_flow(net).consumers[0].weight
    '3.weight'
    >>> flow.channels(net)
    4
    """

    producer: str
    consumers: tuple[TorchConsumer, ...] = ()
    norm: str | None = None
    depthwise: tuple[TorchDepthwise, ...] = ()
    activation: str | None = None
    activation_kind: str | None = None

    def __post_init__(self):
        if not isinstance(self.producer, str):
            raise TypeError(f"producer must be a module name (str), got {type(self.producer)}")
        consumers = tuple(
            c if isinstance(c, TorchConsumer) else TorchConsumer(c) for c in self.consumers
        )
        depthwise = tuple(
            d if isinstance(d, TorchDepthwise) else TorchDepthwise(d) for d in self.depthwise
        )
        object.__setattr__(self, "consumers", consumers)
        object.__setattr__(self, "depthwise", depthwise)

    @property
    def module_names(self) -> tuple[str, ...]:
        """Every module whose parameters, buffers or sizes a growth of this flow changes."""
        names = [self.producer]
        if self.norm is not None:
            names.append(self.norm)
        for d in self.depthwise:
            names.append(d.conv)
            if d.norm is not None:
                names.append(d.norm)
        names.extend(c.module for c in self.consumers)
        return tuple(names)

    def check(self, model: nn.Module) -> None:
        """Raise GrowthError if a named module is missing or of a kind growth cannot change."""
        modules = dict(model.named_modules())

        def get(name, what):
            if name not in modules:
                raise GrowthError(f"flow of {self.producer!r}: {what} {name!r} is not a module")
            return modules[name]

        producer = get(self.producer, "producer")
        if not _is_producer(producer):
            raise GrowthError(
                f"cannot grow {self.producer!r}: a producer must be nn.Linear or an nn.Conv2d "
                f"with groups=1, got {_describe(producer)}"
            )
        if self.norm is not None and not isinstance(get(self.norm, "norm"), _BN):
            raise GrowthError(f"flow of {self.producer!r}: norm {self.norm!r} is not a BatchNorm")
        for d in self.depthwise:
            if not _is_depthwise(get(d.conv, "depthwise conv")):
                raise GrowthError(
                    f"flow of {self.producer!r}: {d.conv!r} is not a depthwise Conv2d "
                    f"(groups == in_channels == out_channels)"
                )
            if d.norm is not None and not isinstance(get(d.norm, "norm"), _BN):
                raise GrowthError(f"flow of {self.producer!r}: norm {d.norm!r} is not a BatchNorm")
        for c in self.consumers:
            m = get(c.module, "consumer")
            if not (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)):
                raise GrowthError(
                    f"flow of {self.producer!r}: consumer {c.module!r} must be nn.Linear or an "
                    f"nn.Conv2d with groups=1, got {_describe(m)}"
                )
            if isinstance(m, nn.Conv2d) and c.spatial != 1:
                raise GrowthError(
                    f"flow of {self.producer!r}: conv consumer {c.module!r} has spatial != 1"
                )

    def channel_flow(self, model: nn.Module) -> ChannelFlow:
        """The core's ChannelFlow over ``model.state_dict()`` names (checks the modules first)."""
        self.check(model)
        modules = dict(model.named_modules())
        producer = modules[self.producer]
        return ChannelFlow(
            producer=f"{self.producer}.weight",
            out_axis=0,
            consumers=tuple(
                Consumer(weight=f"{c.module}.weight", in_axis=1, spatial=c.spatial)
                for c in self.consumers
            ),
            bias=f"{self.producer}.bias" if producer.bias is not None else None,
            norm=_batch_norm(self.norm, modules),
            depthwise=tuple(
                Depthwise(
                    weight=f"{d.conv}.weight",
                    channel_axis=0,
                    bias=f"{d.conv}.bias" if modules[d.conv].bias is not None else None,
                    norm=_batch_norm(d.norm, modules),
                )
                for d in self.depthwise
            ),
        )

    def channels(self, model: nn.Module) -> int:
        """The producer's current output channel count (validated across the whole flow)."""
        return self.channel_flow(model).channels(dict(model.state_dict()))

    def kind_of_activation(self, model: nn.Module) -> str | None:
        """``activation_kind`` if given, else inferred from the activation module's type."""
        if self.activation_kind is not None:
            return self.activation_kind
        if self.activation is None:
            return None
        return _ACTIVATION_MODULES.get(type(dict(model.named_modules())[self.activation]))


def _batch_norm(name, modules):
    if name is None:
        return None
    bn = modules[name]
    return BatchNorm(
        scale=f"{name}.weight" if bn.weight is not None else None,
        shift=f"{name}.bias" if bn.bias is not None else None,
        mean=f"{name}.running_mean" if bn.running_mean is not None else None,
        var=f"{name}.running_var" if bn.running_var is not None else None,
    )


def _describe(module):
    if isinstance(module, nn.Conv2d):
        return f"Conv2d(groups={module.groups})"
    return type(module).__name__


def _is_depthwise(module):
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
    )


def _is_producer(module):
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d and module.groups == 1
    )


# --------------------------------------------------------------------------- discovery

_PASS_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    *_ACTIVATION_MODULES,
)
_F = torch.nn.functional
_ACTIVATION_FUNCTIONS = {
    _F.relu: "relu",
    torch.relu: "relu",
    _F.relu6: "relu",
    _F.silu: "swish",
    _F.gelu: "gelu",
    torch.tanh: "tanh",
    _F.tanh: "tanh",
    torch.sigmoid: "sigmoid",
    _F.sigmoid: "sigmoid",
    _F.leaky_relu: None,
    _F.elu: None,
    _F.hardswish: None,
    _F.softplus: None,
    _F.mish: None,
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_PASS_FUNCTIONS = {
    _F.dropout,
    _F.dropout2d,
    _F.max_pool2d,
    _F.avg_pool2d,
    _F.adaptive_avg_pool2d,
    _F.adaptive_max_pool2d,
    torch.max_pool2d,
}
_MERGE_LABELS = {
    operator.add: "residual add",
    operator.iadd: "residual add",
    torch.add: "residual add",
    operator.sub: "subtraction",
    torch.sub: "subtraction",
    operator.mul: "multiplication",
    torch.mul: "multiplication",
    torch.cat: "concatenation",
    torch.concat: "concatenation",
    torch.stack: "stack",
}
_MERGE_METHODS = {"add": "residual add", "add_": "residual add", "mul": "multiplication"}


@dataclass
class _Walk:
    """What one producer's channels reach, gathered while walking the graph."""

    norms: dict = field(default_factory=dict)  # segment (-1 producer, k depthwise k) -> BN name
    depthwise: list = field(default_factory=list)
    consumers: dict = field(default_factory=dict)  # module name -> spatial
    activation: str | None = None
    activation_kind: str | None = None
    activation_seen: bool = False
    blocked: str | None = None
    needs_input: str | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (names stay unprefixed)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


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
    calls = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    flows, blocked = [], {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if isinstance(module, nn.Conv2d) and not _is_producer(module):
            if not _is_depthwise(module):
                blocked[node.target] = f"it is a grouped convolution (groups={module.groups})"
            else:
                blocked[node.target] = "it is a depthwise convolution (it grows with its producer)"
            continue
        if not _is_producer(module):
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
                walk.blocked = "it is the network's output layer (a classifier is a consumer only)"
            elif walk.needs_input is not None:
                raise ValueError(walk.needs_input)
            blocked[node.target] = walk.blocked
            continue
        flows.append(
            TorchFlow(
                producer=node.target,
                consumers=tuple(TorchConsumer(m, s) for m, s in walk.consumers.items()),
                norm=walk.norms.get(-1),
                depthwise=tuple(
                    TorchDepthwise(conv, walk.norms.get(k)) for k, conv in enumerate(walk.depthwise)
                ),
                activation=walk.activation,
                activation_kind=walk.activation_kind,
            )
        )
    return flows, blocked


def _reaches_output(node, modules):
    """Whether the graph output depends on ``node`` through no other Conv2d/Linear."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output":
            return True
        if user.op == "call_module" and isinstance(modules[user.target], (nn.Conv2d, nn.Linear)):
            continue
        stack.extend(user.users)
    return False


def _block(walk, user, why):
    if walk.blocked is None:
        walk.blocked = f"its output feeds {user.name!r} ({why})"


def _follow(node, walk, modules, calls, *, segment, ndim, spatial, pooled):
    """Depth-first walk over the users of ``node`` while they are channel-wise."""
    for user in list(node.users):
        if walk.blocked is not None:
            return
        _visit(node, user, walk, modules, calls, segment, ndim, spatial, pooled)


def _note_activation(walk, segment, name, kind):
    if segment == -1 and not walk.activation_seen:
        walk.activation_seen = True
        walk.activation, walk.activation_kind = name, kind


def _visit(node, user, walk, modules, calls, segment, ndim, spatial, pooled):
    go = dict(segment=segment, ndim=ndim, spatial=spatial, pooled=pooled)
    flat = spatial is not None
    if user.op == "output":
        walk.blocked = "it is the network's output layer (a classifier is a consumer only)"
        return
    if user.op == "call_module":
        module = modules[user.target]
        stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if calls[user.target] > 1 and stateful:
            # A parameter-free module (one ReLU used everywhere) may be shared; a stateful one
            # would be grown twice.
            return _block(walk, user, f"module {user.target!r} is called more than once")
        if isinstance(module, _BN):
            if flat:
                return _block(walk, user, "BatchNorm after a flatten")
            if segment in walk.norms and walk.norms[segment] != user.target:
                return _block(walk, user, "a second BatchNorm on the same channels")
            walk.norms[segment] = user.target
            return _follow(user, walk, modules, calls, **go)
        if isinstance(module, tuple(_ACTIVATION_MODULES)):
            _note_activation(walk, segment, user.target, _ACTIVATION_MODULES[type(module)])
            return _follow(user, walk, modules, calls, **go)
        if isinstance(module, _PASS_MODULES):
            pool_one = isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and (
                module.output_size in (1, (1, 1))
            )
            return _follow(user, walk, modules, calls, **{**go, "pooled": pooled or pool_one})
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                return _block(walk, user, "a flatten that does not start at dim 1")
            return _flatten(node, user, walk, modules, calls, go)
        if _is_depthwise(module):
            if flat or ndim != 4:
                return _block(walk, user, "depthwise conv after a flatten")
            walk.depthwise.append(user.target)
            _note_activation(walk, segment, None, None)  # a later activation is not the producer's
            new = len(walk.depthwise) - 1
            return _follow(user, walk, modules, calls, **{**go, "segment": new})
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            if flat or ndim != 4:
                return _block(walk, user, "a conv reading flattened channels")
            walk.consumers[user.target] = 1
            return None
        if isinstance(module, nn.Linear):
            if ndim != 2 and not flat:
                return _block(walk, user, "a Linear applied to a 4-d tensor reads W, not channels")
            walk.consumers[user.target] = spatial or 1
            return None
        return _block(walk, user, f"unsupported module {_describe(module)}")
    if user.op in ("call_function", "call_method"):
        target = user.target
        if user.op == "call_function" and target in _MERGE_LABELS:
            return _block(walk, user, _MERGE_LABELS[target])
        if user.op == "call_method" and target in _MERGE_METHODS:
            return _block(walk, user, _MERGE_METHODS[target])
        if user.args and user.args[0] is not node:
            return _block(walk, user, f"{_target_name(user)} reads it as a non-input argument")
        if user.op == "call_function" and target in _ACTIVATION_FUNCTIONS:
            _note_activation(walk, segment, None, _ACTIVATION_FUNCTIONS[target])
            return _follow(user, walk, modules, calls, **go)
        if user.op == "call_method" and target in _ACTIVATION_METHODS:
            _note_activation(walk, segment, None, _ACTIVATION_METHODS[target])
            return _follow(user, walk, modules, calls, **go)
        if user.op == "call_function" and target in _PASS_FUNCTIONS:
            size = user.args[1] if len(user.args) > 1 else user.kwargs.get("output_size")
            pool_one = target in (_F.adaptive_avg_pool2d, _F.adaptive_max_pool2d) and size in (
                1,
                (1, 1),
            )
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
                    f"example_input is needed: {user.name!r} ({target}) may flatten channels; "
                    "pass an input batch, e.g. torch.zeros(1, 3, 32, 32), to check it"
                )
                return _block(walk, user, f"{target} whose shapes are unknown")
            if len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]):
                return _flatten(node, user, walk, modules, calls, go)
            return _block(walk, user, f"{target} to {after}, not a flatten from dim 1")
        return _block(walk, user, f"unsupported operation {_target_name(user)}")
    return _block(walk, user, f"unsupported node kind {user.op}")


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
            f"example_input is needed: {user.name!r} flattens channels whose H*W is unknown "
            "(pass an input batch, e.g. torch.zeros(1, 3, 32, 32))"
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
    The network's final classifier is a consumer only, never a producer.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ...                     nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    >>> [(f.producer, f.norm, f.consumers) for f in discover_flows(net, torch.zeros(1, 3, 8, 8))]
    [('0', '1', (TorchConsumer(module='4', spatial=64),))]
    """
    model = unwrap(model) if isinstance(model, nn.Module) else model
    flows, blocked = _analyse(model, example_input)
    if layers is None:
        return flows
    if isinstance(layers, str):
        layers = [layers]
    by_name = {f.producer: f for f in flows}
    known = dict(model.named_modules())
    picked = []
    for name in layers:
        if name in by_name:
            picked.append(by_name[name])
        elif name in blocked:
            raise GrowthError(f"cannot grow {name!r}: {blocked[name]}")
        elif name in known:
            raise GrowthError(
                f"cannot grow {name!r}: it is a {_describe(known[name])}, not a Conv2d or Linear "
                "that the forward pass calls"
            )
        else:
            raise GrowthError(f"cannot grow {name!r}: the model has no module of that name")
    return picked


def find_flow(model: nn.Module, layer: str, example_input: Any = None) -> TorchFlow:
    """The flow of one producer, or :class:`GrowthError` saying why it cannot be grown."""
    return discover_flows(model, example_input, layers=[layer])[0]


# --------------------------------------------------------------------------- applying


class _Swap:
    """One reversible change: set ``container[key] = new`` and remember the old value."""

    __slots__ = ("container", "key", "new", "old", "had_key")

    def __init__(self, container, key, new):
        self.container, self.key, self.new = container, key, new
        self.had_key = key in container
        self.old = container[key] if self.had_key else None

    def apply(self):
        self.container[self.key] = self.new

    def undo(self):
        if self.had_key:
            self.container[self.key] = self.old
        else:
            del self.container[self.key]


def _commit(swaps):
    """Apply ``swaps`` in order; if one raises, undo the applied ones in reverse and re-raise."""
    done = []
    try:
        for swap in swaps:
            swap.apply()
            done.append(swap)
    except BaseException:
        _undo(done)
        raise


def _undo(swaps):
    for swap in reversed(swaps):
        swap.undo()


_SIZE_ATTRS = {
    "producer": {nn.Conv2d: ("out_channels",), nn.Linear: ("out_features",)},
    "consumer": {nn.Conv2d: ("in_channels",), nn.Linear: ("in_features",)},
}


def apply_growth(
    model: nn.Module,
    flow: TorchFlow,
    new_params: Mapping[str, torch.Tensor],
    channel_map: Any,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_mode: str = "carry",
    lr: float | None = None,
) -> None:
    """Write a grown flow into ``model`` (and ``optimizer``) in place, atomically.

    ``new_params`` maps ``state_dict`` names to the grown arrays, as returned by
    the core operators (``simcore.growth.add_neurons`` and friends, called on
    ``dict(model.state_dict())`` and ``flow.channel_flow(model)``); entries the
    flow does not name are ignored. ``channel_map`` is the operator's
    :class:`~simcore.growth.widen.ChannelMap` (or a sequence of them applied in
    order). The optimizer is pointed at the new parameters
    (:mod:`simcore.adapters.torch.optim`): ``optimizer_mode="carry"`` grows the
    grown parameters' state with the channel map (new channels start at zero);
    ``optimizer_mode="reset"`` drops ALL of the optimizer's state, every
    parameter's, as a rebuilt optimizer would (the reference implementations'
    behaviour; unlike the core's ``map_optimizer_state(mode="reset")``, which
    zeros only the flow's entries). ``lr``, if given, sets every param group's
    learning rate (the reference resets it after a growth). Parameters stay on
    their device and dtype and keep ``requires_grad``.

    >>> import numpy as np, torch
    >>> from torch import nn
    >>> from simcore.growth import add_neurons
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> flow = discover_flows(net)[0]
    >>> grown, cmap = add_neurons(dict(net.state_dict()), flow.channel_flow(net), 2,
    ...                           rng=np.random.default_rng(0))
    >>> apply_growth(net, flow, grown, cmap)
    >>> net[0]
    Linear(in_features=3, out_features=6, bias=True)
    >>> net[2]
    Linear(in_features=6, out_features=2, bias=True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    if not isinstance(flow, TorchFlow):
        raise TypeError(f"flow must be a TorchFlow, got {type(flow).__name__}")
    if not isinstance(new_params, Mapping):
        raise TypeError(f"new_params must be a mapping of state_dict names, got {type(new_params)}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    check_choice(optimizer_mode, MODES, "optimizer_mode")
    if lr is not None and optimizer is None:
        raise ValueError("lr is given but there is no optimizer to set it on")
    _commit(_growth_swaps(model, flow, new_params, channel_map, optimizer, optimizer_mode, lr))


def _growth_swaps(model, flow, new_params, channel_map, optimizer, optimizer_mode, lr=None):
    """Every change a growth makes, computed up front as reversible swaps (nothing applied)."""
    core_flow = flow.channel_flow(model)
    modules = dict(model.named_modules())
    named = core_flow.names()
    for name in named:
        if name not in new_params:
            raise ValueError(
                f"new_params has no entry {name!r} named by the flow of {flow.producer!r}"
            )
    # Validates every grown entry's size along its channel axis against the others.
    subset = {name: torch.as_tensor(new_params[name]).detach() for name in named}
    new_channels = core_flow.channels(subset)
    grown_axis = {e.name: e.axis for e in core_flow.entries(subset)}
    maps = () if channel_map is None else _maps(channel_map)
    if maps and len(maps[-1].sources) != new_channels:
        raise ValueError(
            f"channel_map has {len(maps[-1].sources)} channels but new_params has {new_channels}"
        )

    # ---- compute phase: build every new object; nothing in the model changes here.
    swaps, replaced = [], {}  # replaced: state_dict name -> (old parameter, new parameter)
    for name in named:
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        old = getattr(module, attr)
        value = subset[name]
        _check_rank(name, old, value)
        value = _leading_part(name, value, old, grown_axis[name])
        # Contiguous like a freshly built layer: the core's arrays may carry permuted
        # strides, and a checkpoint-rebuilt model must run the very same kernels.
        value = value.to(device=old.device, dtype=old.dtype).clone(
            memory_format=torch.contiguous_format
        )
        if attr in module._parameters:
            new = nn.Parameter(value, requires_grad=old.requires_grad)
            swaps.append(_Swap(module._parameters, attr, new))
            replaced[name] = (old, new)
        else:
            swaps.append(_Swap(module._buffers, attr, value))
    swaps.extend(_size_swaps(flow, modules, new_channels))
    if optimizer is not None:
        swaps.extend(_optimizer_swaps(optimizer, replaced, core_flow, maps, optimizer_mode, lr))
    return swaps


def _leading_part(name, value, old, axis):
    """``value`` cut to ``old``'s size on every axis but the flow's own ``axis``.

    A growth of several layers passes one dict holding every layer's final arrays; a consumer
    that is also the producer of another flow is then wider on the other flow's axis than the
    model yet is. Channel maps keep old channels first, so the leading part is what the model
    has now; that other flow's own application writes the full array.
    """
    for dim in range(value.ndim):
        if dim == axis or value.shape[dim] == old.shape[dim]:
            continue
        if value.shape[dim] < old.shape[dim]:
            raise ValueError(
                f"new_params[{name!r}] has shape {tuple(value.shape)}; the model's is "
                f"{tuple(old.shape)}: only axis {axis} may change for this flow"
            )
        value = value.narrow(dim, 0, old.shape[dim])
    return value


def _check_rank(name, old, value):
    if value.ndim != old.ndim:
        raise ValueError(f"new_params[{name!r}] has {value.ndim} dims, the model's has {old.ndim}")
    if not (value.is_floating_point() or value.is_complex()) and old.is_floating_point():
        raise TypeError(f"new_params[{name!r}] has dtype {value.dtype}, expected floating point")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"new_params[{name!r}] holds NaN or inf")


def _size_swaps(flow, modules, channels):
    swaps = []

    def set_attr(module, attr, value):
        if getattr(module, attr) != value:
            swaps.append(_Swap(module.__dict__, attr, value))

    producer = modules[flow.producer]
    out_attr = "out_features" if isinstance(producer, nn.Linear) else "out_channels"
    set_attr(producer, out_attr, channels)
    for name in [flow.norm, *(d.norm for d in flow.depthwise)]:
        if name is not None:
            set_attr(modules[name], "num_features", channels)
    for d in flow.depthwise:
        conv = modules[d.conv]
        for attr in ("in_channels", "out_channels", "groups"):
            set_attr(conv, attr, channels)
    for c in flow.consumers:
        consumer = modules[c.module]
        if isinstance(consumer, nn.Linear):
            set_attr(consumer, "in_features", channels * c.spatial)
        else:
            set_attr(consumer, "in_channels", channels)
    return swaps


def _optimizer_swaps(optimizer, replaced, core_flow, maps, mode, lr):
    """The optimizer's part of a growth, planned by optim.py (applied and undone as a swap)."""
    if not replaced:
        return []
    if not maps:
        raise ValueError("channel_map is required to carry the optimizer state of grown parameters")
    return [plan_optimizer_growth(optimizer, replaced, core_flow, maps, mode=mode, lr=lr)]
