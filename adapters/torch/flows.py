"""How a PyTorch layer's channels flow: the flow description and the module predicates.

A :class:`TorchFlow` names, by module path, one growable *producer* (``nn.Linear`` or a plain
``nn.Conv2d``) and every module its output channels pass through or reach: its BatchNorm,
depthwise convs with their BatchNorms, and the *consumers* that read the channels (a Linear after
a flatten reads ``spatial`` consecutive columns per channel). :meth:`TorchFlow.channel_flow`
turns it into the core's :class:`simcore.growth.flow.ChannelFlow` over ``state_dict`` names,
which is what the framework-neutral growth operators take. Flows are found by
:mod:`.discovery` or written by hand::

    TorchFlow("conv1", norm="bn1", consumers=("conv2",))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simcore.growth import GrowthError, is_growable_depthwise
from simcore.growth.flow import BatchNorm, ChannelFlow, Consumer, Depthwise, Member

from .activations import module_activation

__all__ = [
    "BATCH_NORM",
    "GrowthError",
    "TorchConsumer",
    "TorchDepthwise",
    "TorchFlow",
    "TorchMember",
    "TorchNorm",
    "TorchPath",
    "describe_module",
    "is_depthwise_conv",
    "is_producer",
    "layer_weight",
    "tie_reason",
    "tied_parameters",
    "unwrap",
]

BATCH_NORM = nn.modules.batchnorm._BatchNorm


def layer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The ``weight`` tensor of ``model``'s submodule ``name`` (a conv or linear layer).

    ``get_submodule(name).weight`` with the check that it is a tensor: a module attribute can
    be anything, and a layer without a weight would fail later with a less clear message.
    """
    weight = getattr(model.get_submodule(name), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"module {name!r} has no weight tensor, got {type(weight).__name__}")
    return weight


@dataclass(frozen=True)
class TorchDepthwise:
    """A depthwise ``Conv2d`` (``groups == in == out``) the channels pass through, with its BN."""

    conv: str
    norm: str | None = None


def _check_offset(offset):
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)
                               or offset < 0):
        raise ValueError(f"offset must be a non-negative int or None, got {offset!r}")


@dataclass(frozen=True)
class TorchConsumer:
    """A module reading the producer's channels; ``spatial`` columns per channel after a flatten.

    ``offset``: the consumer reads a concatenation, in which the producer's channels start at
    input channel ``offset`` (None: it reads exactly the producer's channels).
    """

    module: str
    spatial: int = 1
    offset: int | None = None

    def __post_init__(self):
        if not isinstance(self.module, str):
            raise TypeError(f"module must be a module name (str), got {type(self.module).__name__}")
        if isinstance(self.spatial, bool) or not isinstance(self.spatial, int) or self.spatial < 1:
            raise ValueError(f"spatial must be a positive int, got {self.spatial!r}")
        _check_offset(self.offset)


@dataclass(frozen=True)
class TorchMember:
    """Another producer of a residual group: its output (after ``norm``) is added to the flow's.

    ``activation``/``activation_kind`` as for :class:`TorchFlow` (the activation its channels
    reach, after the add); ``activation_node`` the name of that activation's node in the
    ``torch.fx`` trace of the model (SSD reads the group's pre-activations there).
    ``gate``: its output multiplies the group's channels (a squeeze-excitation's ``fc2``,
    :class:`simcore.growth.flow.Member`): a split copies it exactly and SSD scores it 0.
    """

    producer: str
    norm: str | None = None
    activation: str | None = None
    activation_kind: str | None = None
    activation_node: str | None = None
    gate: bool = False


@dataclass(frozen=True)
class TorchPath:
    """One activation the producer's channels reach, for SSD (:mod:`.paths`).

    ``node``: the activation's node in the ``torch.fx`` trace, ``kind`` its name for
    ``sigma''``; the producer's channels are its input channels ``[offset, offset + n)`` (None:
    exactly ``n``). ``norm`` is the BatchNorm on the way (its channels from ``norm_offset``),
    ``pools`` the average poolings passed (node names, in order); ``blocked`` says why the
    capture cannot follow this path (SSD then refuses the layer with that reason).
    """

    node: str
    kind: str | None = None
    offset: int | None = None
    norm: str | None = None
    norm_offset: int | None = None
    pools: tuple[str, ...] = ()
    blocked: str | None = None


@dataclass(frozen=True)
class TorchNorm:
    """A BatchNorm reading the channels after an add or a concatenation (at ``offset``)."""

    module: str
    offset: int | None = None

    def __post_init__(self):
        _check_offset(self.offset)


@dataclass(frozen=True)
class TorchFlow:
    """One growable producer module and every module its output channels flow through.

    Names are module paths as in ``model.named_modules()``. ``activation`` is the
    activation module right after the producer (and its ``norm``), used by SSD
    to read pre-activations and backprop signals, or None; ``activation_kind`` its name in
    :mod:`simcore.growth.activations` ("relu", "swish", "leaky_relu(negative_slope=0.2)", ...)
    for the second derivative, inferred from the module when not given. An activation that
    is a function call (``F.relu`` in ``forward``) has ``activation=None`` and its kind set.

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
    members: tuple[TorchMember, ...] = ()
    #: The activation's node in the ``torch.fx`` trace when the channels reach it only after an
    #: add, a concatenation or a pooling (a residual group's stream; a concatenated layer).
    activation_node: str | None = None
    downstream_norms: tuple[TorchNorm, ...] = ()
    #: A routed stream (:mod:`.streams`): its channels reach ``routing.consumers`` through a
    #: channel shuffle, placed by :mod:`.permutations`; ``consumers`` is then empty.
    routing: Any = None
    #: Every activation the channels reach, when there are several or the first comes after a
    #: concatenation or a pooling (SSD sums their terms, :mod:`.path_capture`); else empty.
    activation_paths: tuple[TorchPath, ...] = ()

    def __post_init__(self):
        if not isinstance(self.producer, str):
            raise TypeError(f"producer must be a module name (str), got {type(self.producer)}")
        consumers = tuple(
            c if isinstance(c, TorchConsumer) else TorchConsumer(c) for c in self.consumers
        )
        depthwise = tuple(
            d if isinstance(d, TorchDepthwise) else TorchDepthwise(d) for d in self.depthwise
        )
        members = tuple(m if isinstance(m, TorchMember) else TorchMember(m) for m in self.members)
        norms = tuple(n if isinstance(n, TorchNorm) else TorchNorm(n)
                      for n in self.downstream_norms)
        object.__setattr__(self, "consumers", consumers)
        object.__setattr__(self, "depthwise", depthwise)
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "downstream_norms", norms)

    @property
    def producers(self) -> tuple[str, ...]:
        """The producer and the other members of its residual group, in forward order."""
        return (self.producer, *(m.producer for m in self.members))

    @property
    def module_names(self) -> tuple[str, ...]:
        """Every module whose parameters, buffers or sizes a growth of this flow changes."""
        names = [self.producer]
        if self.norm is not None:
            names.append(self.norm)
        for m in self.members:
            names.append(m.producer)
            if m.norm is not None:
                names.append(m.norm)
        for d in self.depthwise:
            names.append(d.conv)
            if d.norm is not None:
                names.append(d.norm)
        names.extend(n.module for n in self.downstream_norms)
        names.extend(c.module for c in self.consumers)
        if self.routing is not None:
            names.extend(self.routing.modules)
        return tuple(names)

    def check(self, model: nn.Module) -> None:
        """Raise GrowthError if a named module is missing or of a kind growth cannot change.

        Also refused: a named module holding a parameter tied to another module (the same
        ``Parameter`` object in both, e.g. ``b.weight = a.weight`` or an embedding shared
        with a classifier head). Growth replaces parameters by new ones, so it would grow one
        module's copy and silently untie the other.
        """
        modules = dict(model.named_modules())

        def get(name, what):
            if name not in modules:
                raise GrowthError(f"flow of {self.producer!r}: {what} {name!r} is not a module")
            return modules[name]

        for name in self.producers:
            producer = get(name, "producer")
            if not is_producer(producer):
                raise GrowthError(
                    f"cannot grow {name!r}: a producer must be nn.Linear or an nn.Conv2d "
                    f"with groups=1, got {describe_module(producer)}"
                )
        norms = (self.norm, *(d.norm for d in self.depthwise), *(m.norm for m in self.members),
                 *(n.module for n in self.downstream_norms))
        for norm in norms:
            if norm is not None and not isinstance(get(norm, "norm"), BATCH_NORM):
                raise GrowthError(f"flow of {self.producer!r}: norm {norm!r} is not a BatchNorm")
        for d in self.depthwise:
            if not is_depthwise_conv(get(d.conv, "depthwise conv")):
                raise GrowthError(
                    f"flow of {self.producer!r}: {d.conv!r} is not a depthwise Conv2d "
                    f"(groups == in_channels == out_channels)"
                )
        for c in self.consumers:
            m = get(c.module, "consumer")
            if not (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)):
                raise GrowthError(
                    f"flow of {self.producer!r}: consumer {c.module!r} must be nn.Linear or an "
                    f"nn.Conv2d with groups=1, got {describe_module(m)}"
                )
            if isinstance(m, nn.Conv2d) and c.spatial != 1:
                raise GrowthError(
                    f"flow of {self.producer!r}: conv consumer {c.module!r} has spatial != 1"
                )
        for n in self.downstream_norms:
            if not isinstance(get(n.module, "norm"), BATCH_NORM):
                raise GrowthError(
                    f"flow of {self.producer!r}: norm {n.module!r} is not a BatchNorm")
        reason = tie_reason(model, self.module_names)
        if reason is not None:
            raise GrowthError(f"cannot grow {self.producer!r}: {reason}")

    def channel_flow(self, model: nn.Module) -> ChannelFlow:
        """The core's ChannelFlow over ``model.state_dict()`` names (checks the modules first)."""
        self.check(model)
        modules = dict(model.named_modules())
        producer = modules[self.producer]
        return ChannelFlow(
            producer=f"{self.producer}.weight",
            out_axis=0,
            consumers=tuple(
                Consumer(weight=f"{c.module}.weight", in_axis=1, spatial=c.spatial,
                         offset=c.offset)
                for c in self.consumers
            ),
            members=tuple(
                Member(weight=f"{m.producer}.weight", out_axis=0,
                       bias=f"{m.producer}.bias" if modules[m.producer].bias is not None else None,
                       norm=_batch_norm(m.norm, modules), gate=m.gate)
                for m in self.members
            ),
            downstream_norms=tuple(_batch_norm(n.module, modules, n.offset)
                                   for n in self.downstream_norms),
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
        """``activation_kind`` if given, else inferred from the activation module."""
        if self.activation_kind is not None:
            return self.activation_kind
        if self.activation is None:
            return None
        return module_activation(model.get_submodule(self.activation))


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter held under more than one name: ``{name: [every name of it]}``.

    Names are ``named_parameters`` names (``module.attr``), every occurrence included, so a
    tie between ``a.weight`` and ``b.weight`` lists both under each of them.
    """
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    return {name: names for names in names_of.values() if len(names) > 1 for name in names}


def tie_reason(model: nn.Module, module_names) -> str | None:
    """Why growing ``module_names`` would untie a parameter, or None if none is tied."""
    tied = tied_parameters(model)
    for module_name in module_names:
        prefix = f"{module_name}." if module_name else ""
        for name, names in tied.items():
            if name.startswith(prefix) and "." not in name[len(prefix):]:
                others = [n for n in names if n != name]
                modules = ", ".join(repr(n.rpartition(".")[0]) for n in others)
                return (
                    f"{name!r} of module {module_name!r} is tied to {', '.join(map(repr, others))}"
                    f" of module {modules} (the same Parameter); growth would untie them. "
                    "Untie them first (e.g. b.weight = nn.Parameter(a.weight.detach().clone())) "
                    "or leave this layer out"
                )
    return None


def _batch_norm(name, modules, offset=None):
    if name is None:
        return None
    bn = modules[name]
    return BatchNorm(
        scale=f"{name}.weight" if bn.weight is not None else None,
        shift=f"{name}.bias" if bn.bias is not None else None,
        mean=f"{name}.running_mean" if bn.running_mean is not None else None,
        var=f"{name}.running_var" if bn.running_var is not None else None,
        offset=offset,
    )


def describe_module(module):
    if isinstance(module, nn.Conv2d):
        return f"Conv2d(groups={module.groups})"
    return type(module).__name__


def is_depthwise_conv(module):
    """A Conv2d that growth widens with its producer (the core's stricter depthwise rule)."""
    return isinstance(module, nn.Conv2d) and is_growable_depthwise(
        module.in_channels, module.out_channels, module.groups)


def is_producer(module):
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d and module.groups == 1
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (names stay unprefixed)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
