"""Where a layer's channels flow: the framework-neutral description every growth operator reads.

A network's parameters are a flat ``Mapping[str, array]`` (a torch ``state_dict``, a flattened
Flax pytree keyed ``"a/b/c"``, ...). A :class:`ChannelFlow` names the entries that belong to one
growable *producer* layer: its weight and bias, the BatchNorm after it, depthwise convolutions
that act channel by channel on its output (MobileNet), and every *consumer* layer that reads its
channels. Growing the producer by ``k`` channels grows all of them together, consistently.

Axis conventions (negative values count from the end):

=========================  ===========  ===========  ============================
layer                      torch        flax         field
=========================  ===========  ===========  ============================
producer conv / dense      0 (OIHW)     -1 (HWIO)    ``ChannelFlow.out_axis``
consumer conv              1 (OIHW)     -2 (HWIO)    ``Consumer.in_axis``
consumer dense             1 (out, in)  0 (in, out)  ``Consumer.in_axis``
depthwise conv             0 (C1HW)     -1 (HW1C)    ``Depthwise.channel_axis``
=========================  ===========  ===========  ============================

A flatten -> dense consumer reads ``spatial = H*W`` columns per channel: channel ``c`` owns the
consecutive columns ``[c*spatial, (c+1)*spatial)`` after a channel-major (NCHW) flatten, or the
interleaved columns ``c, c + C, c + 2C, ...`` after a channels-last (NHWC) flatten
(``Consumer(channels_last=True)``).

Functions and nets with activation functions, pooling and other parameter-free channel-wise
layers between the producer and its consumers need no description: they commute with channel
duplication and selection.

Example:

>>> import numpy as np
>>> params = {"fc1.weight": np.ones((4, 3)), "fc1.bias": np.zeros(4), "fc2.weight": np.ones((2, 4))}
>>> flow = ChannelFlow("fc1.weight", bias="fc1.bias", consumers=(Consumer("fc2.weight"),))
>>> flow.channels(params)
4
>>> [(e.name, e.role, e.axis) for e in flow.entries(params)]
[('fc1.weight', 'producer', 0), ('fc1.bias', 'bias', 0), ('fc2.weight', 'consumer', 1)]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from .._arrays import check_int, namespace_of, normalize_axis

__all__ = [
    "BatchNorm", "ChannelFlow", "Consumer", "Depthwise", "FlowEntry", "Member", "ROLES",
    "is_depthwise", "DEPTHWISE",
    "is_growable_depthwise",
]

#: Roles of the entries of a flow. ``producer`` rows are the neurons' incoming weights;
#: ``consumer`` columns are their outgoing weights; every other role is a per-channel entry that
#: a copied channel duplicates and a fresh channel initialises (bias/shift/mean 0, scale/var 1,
#: depthwise filters random and non-zero).
ROLES = ("producer", "bias", "scale", "shift", "mean", "var", "depthwise", "consumer")


def _check_name(value: Any, field: str, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        kind = "a non-empty str or None" if optional else "a non-empty str"
        raise TypeError(f"{field} must be {kind}, got {value!r}")


def _check_int(value: Any, field: str) -> int:
    return check_int(value, field)


def _check_offset(value: Any, field: str) -> None:
    if value is not None and check_int(value, field, minimum=0) < 0:
        raise ValueError(f"{field} must be >= 0 or None, got {value}")


#: How a penalty treats depthwise layers, in every adapter: leave them out (the default),
#: include them, or take only them.
DEPTHWISE = ("exclude", "include", "only")


def is_depthwise(in_channels: int, groups: int) -> bool:
    """Whether a grouped conv is depthwise: every group reads exactly one input channel.

    One definition for every adapter: such a layer's neurons have ``d = kh*kw`` incoming
    weights (Eq. 2 can barely separate them), and growing the layer before it duplicates
    its filters instead of halving them. ``out_channels`` may be any multiple of
    ``in_channels`` (a depth multiplier).

    >>> is_depthwise(32, 32), is_depthwise(32, 1), is_depthwise(32, 8), is_depthwise(1, 1)
    (True, False, False, False)
    """
    in_channels, groups = check_int(in_channels, "in_channels"), check_int(groups, "groups")
    return groups > 1 and in_channels == groups


def is_growable_depthwise(in_channels: int, out_channels: int, groups: int) -> bool:
    """:func:`is_depthwise` with a depth multiplier of 1 (``out_channels == in_channels``).

    The stricter rule of growth: a depthwise conv is widened with its producer (one filter
    per channel, :class:`Depthwise` in a :class:`ChannelFlow`) only when each channel has
    exactly one filter; a depth multiplier above 1 is not growable. For the penalty and the
    statistics use :func:`is_depthwise`.

    >>> is_growable_depthwise(32, 32, 32), is_growable_depthwise(32, 64, 32)
    (True, False)
    """
    out_channels = check_int(out_channels, "out_channels")
    return is_depthwise(in_channels, groups) and out_channels == in_channels


@dataclass(frozen=True)
class BatchNorm:
    """Names of a BatchNorm's per-channel vectors in ``params``; any may be ``None``.

    ``scale``/``shift`` are gamma/beta, ``mean``/``var`` the running statistics. Copies of a
    channel copy all four; fresh channels get ``1, 0, 0, 1`` (an identity-like normalisation).
    ``offset`` is for a norm in :attr:`ChannelFlow.downstream_norms` that reads a concatenation:
    the flow's channels are its entries ``[offset, offset + n)`` (None: all of them).
    """

    scale: str | None = None
    shift: str | None = None
    mean: str | None = None
    var: str | None = None
    offset: int | None = None

    def __post_init__(self) -> None:
        for field in ("scale", "shift", "mean", "var"):
            _check_name(getattr(self, field), f"BatchNorm.{field}", optional=True)
        _check_offset(self.offset, "BatchNorm.offset")

    def names(self) -> tuple[tuple[str, str], ...]:
        """``(role, name)`` of every vector the norm names, in role order."""
        return tuple((role, getattr(self, role)) for role in ("scale", "shift", "mean", "var")
                     if getattr(self, role) is not None)


@dataclass(frozen=True)
class Depthwise:
    """A channel-wise convolution after the producer (MobileNet's depthwise conv).

    ``channel_axis`` is 0 for torch's ``(C, 1, kh, kw)`` and -1 for Flax's ``(kh, kw, 1, C)``.
    When a channel is copied its filter, bias and BatchNorm are DUPLICATED (never halved: the
    halving happens in the consumer); fresh channels get random non-zero filters. The number of
    groups of the convolution must follow the channel count: the torch adapter sets
    ``groups = in_channels = out_channels`` from the grown arrays' shapes.
    """

    weight: str
    channel_axis: int = 0
    bias: str | None = None
    norm: BatchNorm | None = None

    def __post_init__(self) -> None:
        _check_name(self.weight, "Depthwise.weight", optional=False)
        _check_int(self.channel_axis, "Depthwise.channel_axis")
        _check_name(self.bias, "Depthwise.bias", optional=True)
        if self.norm is not None and not isinstance(self.norm, BatchNorm):
            raise TypeError(
                f"Depthwise.norm must be a BatchNorm or None, got {type(self.norm).__name__}"
            )


@dataclass(frozen=True)
class Consumer:
    """A layer that reads the producer's channels along ``in_axis`` of its weight.

    ``spatial`` is the number of columns one channel owns (``H*W`` for flatten -> dense, else 1);
    ``channels_last`` says the flatten was NHWC (columns of channel ``c``: ``c, c+C, ...``)
    instead of NCHW (columns ``c*spatial ... (c+1)*spatial - 1``). ``offset`` is for a
    consumer reading a concatenation (``torch.cat`` along channels): the flow's channels are
    its input channels ``[offset, offset + n)``, the other inputs of the concatenation the rest;
    new channels are inserted at ``offset + n``. None (the default): the consumer reads
    exactly the flow's ``n`` channels.
    """

    weight: str
    in_axis: int = 1
    spatial: int = 1
    channels_last: bool = False
    offset: int | None = None

    def __post_init__(self) -> None:
        _check_name(self.weight, "Consumer.weight", optional=False)
        _check_int(self.in_axis, "Consumer.in_axis")
        spatial = _check_int(self.spatial, "Consumer.spatial")
        if spatial < 1:
            raise ValueError(f"Consumer.spatial must be >= 1, got {spatial} (for {self.weight!r})")
        if not isinstance(self.channels_last, bool):
            raise TypeError(
                f"Consumer.channels_last must be a bool, got {type(self.channels_last).__name__}"
            )
        _check_offset(self.offset, "Consumer.offset")
        if self.offset is not None and self.channels_last:
            raise ValueError(
                f"Consumer {self.weight!r}: an offset into a channels-last flatten interleaves "
                "the concatenated channels; only channel-major (NCHW) consumers take an offset"
            )


@dataclass(frozen=True)
class Member:
    """Another producer whose output is ADDED to the flow's producer's (a residual group).

    Every member of a group grows by the same new channels, with the same channel map: channel
    ``c`` of each member is summed into channel ``c`` of the stream, so a copy of ``c`` is
    copied in every member (split directions and fresh rows are each member's own), and the
    consumers of the sum read it once. ``norm`` is the member's own BatchNorm before the add.

    ``gate=True``: the member's output *multiplies* the group's channels instead of being added
    to them (the ``fc2`` of a squeeze-excitation ``x * gate(x)``). A split copies its rows
    exactly (no direction), so both copies of a channel are scaled by the parent's gate and the
    product stays linear in the split producer's channels (docs/design.md, 'Squeeze-excitation
    gates'); fresh channels get fresh rows like any member.
    """

    weight: str
    out_axis: int = 0
    bias: str | None = None
    norm: BatchNorm | None = None
    gate: bool = False

    def __post_init__(self) -> None:
        _check_name(self.weight, "Member.weight", optional=False)
        _check_int(self.out_axis, "Member.out_axis")
        _check_name(self.bias, "Member.bias", optional=True)
        _check_norm(self.norm, "Member.norm")
        if not isinstance(self.gate, bool):
            raise TypeError(f"Member.gate must be a bool, got {type(self.gate).__name__}")


def _check_norm(norm: Any, field: str, offset_allowed: bool = False) -> None:
    if norm is not None and not isinstance(norm, BatchNorm):
        raise TypeError(f"{field} must be a BatchNorm or None, got {type(norm).__name__}")
    if norm is not None and norm.offset is not None and not offset_allowed:
        raise ValueError(f"{field} sits right after a producer: it takes no offset")


@dataclass(frozen=True)
class FlowEntry:
    """One parameter a growth touches: its name, role (see :data:`ROLES`) and grown axis.

    ``axis`` is non-negative. The entry's size along ``axis`` is ``channels * spatial``, or,
    with an ``offset`` (a concatenation), at least ``(offset + channels) * spatial``, the
    flow's channels being ``[offset, offset + channels)``. ``member`` says which producer of a
    residual group a producer row (or its bias and norm) belongs to: 0 for the flow's own
    producer, ``i`` for ``members[i - 1]``.
    """

    name: str
    role: str
    axis: int
    spatial: int = 1
    channels_last: bool = False
    offset: int | None = None
    channels: int = dataclass_field(default=0, compare=False)  # set by ChannelFlow.entries
    member: int = 0


@dataclass(frozen=True)
class ChannelFlow:
    """One growable producer and everything its channels flow through.

    ``producer`` is the weight whose ``out_axis`` indexes the neurons; ``bias`` and ``norm`` sit
    right after it; ``depthwise`` lists channel-wise convolutions after it (each with its own bias
    and BatchNorm); ``consumers`` read the channels. All names refer to entries of ``params``.

    A residual stream is one flow with ``members``: the other producers whose outputs are added
    to the producer's (:class:`Member`); they all grow by the same channels. A member may also
    be one of the ``consumers`` (it reads the stream it adds to through channel-wise layers,
    a MobileNet block without expansion): every operator grows its rows, then its columns.
    ``downstream_norms`` are BatchNorms that read the channels after an add or a
    concatenation (pre-activation ResNets, DenseNet), with an ``offset`` after a concatenation.
    """

    producer: str
    out_axis: int = 0
    consumers: tuple[Consumer, ...] = ()
    bias: str | None = None
    norm: BatchNorm | None = None
    depthwise: tuple[Depthwise, ...] = ()
    members: tuple[Member, ...] = ()
    downstream_norms: tuple[BatchNorm, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.producer, "ChannelFlow.producer", optional=False)
        _check_int(self.out_axis, "ChannelFlow.out_axis")
        _check_name(self.bias, "ChannelFlow.bias", optional=True)
        _check_norm(self.norm, "ChannelFlow.norm")
        # Lists are accepted for convenience and frozen into tuples (the dataclass stays hashable).
        for field, kind in (("consumers", Consumer), ("depthwise", Depthwise),
                            ("members", Member), ("downstream_norms", BatchNorm)):
            value = getattr(self, field)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise TypeError(f"ChannelFlow.{field} must be a sequence of {kind.__name__}")
            value = tuple(value)
            for item in value:
                if not isinstance(item, kind):
                    raise TypeError(
                        f"ChannelFlow.{field} must hold {kind.__name__} objects, "
                        f"got {type(item).__name__}"
                    )
            object.__setattr__(self, field, value)
        for i, dw in enumerate(self.depthwise):
            _check_norm(dw.norm, f"ChannelFlow.depthwise[{i}].norm")
        # A producer of the group may also read it (a projection fed by the stream it adds
        # to, through channel-wise layers): its rows and its columns grow, rows first.
        named = self._named()
        reading = {e.name for e in named if e.role == "consumer"} & set(self.producers)
        names = [e.name for e in named if not (e.role == "consumer" and e.name in reading)]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"ChannelFlow names {duplicates[0]!r} more than once")

    @property
    def producers(self) -> tuple[str, ...]:
        """The weight of every producer: the flow's own, then its members' (one per group row)."""
        return (self.producer, *(m.weight for m in self.members))

    def _named(self) -> list[FlowEntry]:
        """Every entry with its declared axis (not yet normalised) and ``channels`` 0."""
        out = [FlowEntry(self.producer, "producer", self.out_axis)]

        def vectors(bias: str | None, norm: BatchNorm | None, member: int = 0) -> None:
            if bias is not None:
                out.append(FlowEntry(bias, "bias", 0, member=member))
            if norm is not None:
                for role, name in norm.names():
                    out.append(FlowEntry(name, role, 0, offset=norm.offset, member=member))

        vectors(self.bias, self.norm)
        for index, m in enumerate(self.members, start=1):
            out.append(FlowEntry(m.weight, "producer", m.out_axis, member=index))
            vectors(m.bias, m.norm, index)
        for dw in self.depthwise:
            out.append(FlowEntry(dw.weight, "depthwise", dw.channel_axis))
            vectors(dw.bias, dw.norm)
        for norm in self.downstream_norms:
            vectors(None, norm)
        for c in self.consumers:
            out.append(FlowEntry(c.weight, "consumer", c.in_axis, c.spatial, c.channels_last,
                                 c.offset))
        return out

    def names(self) -> tuple[str, ...]:
        """Every parameter name this flow touches, producer first."""
        return tuple(e.name for e in self._named())

    def entries(self, params: Mapping[str, Any]) -> tuple[FlowEntry, ...]:
        """Validate the flow against ``params`` and return its entries with normalised axes.

        Raises ``ValueError`` naming the entry when a name is missing from ``params``, an axis is
        out of range, or an entry's size along its axis disagrees with the producer's channel
        count (times ``spatial`` for consumers); ``TypeError`` for non-arrays, non-floating
        arrays or arrays from different libraries.
        """
        if not isinstance(params, Mapping):
            raise TypeError(
                f"params must be a Mapping of name -> array, got {type(params).__name__}"
            )
        named = self._named()
        xp = None
        for e in named:
            name, role = e.name, e.role
            if name not in params:
                raise ValueError(f"{role} entry {name!r} of the flow is missing from params")
            xp_entry = namespace_of(params[name], f"params[{name!r}]")
            if not xp_entry.isdtype(params[name].dtype, "real floating"):
                raise TypeError(
                    f"params[{name!r}] must have a real floating dtype, got {params[name].dtype}"
                )
            if xp is None:
                xp = xp_entry
            elif xp_entry is not xp:
                raise TypeError(
                    f"params[{name!r}] comes from a different array library than "
                    f"params[{self.producer!r}]"
                )

        producer = params[self.producer]
        if producer.ndim < 2:
            raise ValueError(
                f"producer {self.producer!r} must have at least 2 dimensions, "
                f"got shape {tuple(producer.shape)}"
            )
        out_axis = normalize_axis(
            self.out_axis, producer.ndim, f"out_axis of producer {self.producer!r}"
        )
        n = int(producer.shape[out_axis])

        entries = []
        for e in named:
            name, role, spatial, offset = e.name, e.role, e.spatial, e.offset
            shape = tuple(int(s) for s in params[name].shape)
            if role not in ("producer", "depthwise", "consumer"):  # a per-channel vector
                if len(shape) != 1 or (shape[0] != n if offset is None else shape[0] < offset + n):
                    where = "" if offset is None else f" from offset {offset}"
                    raise ValueError(
                        f"{role} entry {name!r} must have shape ({n},){where} to match the {n} "
                        f"channels of producer {self.producer!r}, got {shape}"
                    )
                entries.append(FlowEntry(name, role, 0, offset=offset, channels=n,
                                         member=e.member))
                continue
            if len(shape) < 2:
                raise ValueError(
                    f"{role} entry {name!r} must have at least 2 dimensions, got shape {shape}"
                )
            label = {"producer": "out_axis", "depthwise": "channel_axis", "consumer": "in_axis"}[
                role
            ]
            axis = normalize_axis(e.axis, len(shape), f"{label} of {role} {name!r}")
            size = shape[axis]
            if size != n * spatial if offset is None else size < (offset + n) * spatial:
                detail = f"{n} channels" if spatial == 1 else f"{n} channels x spatial {spatial}"
                if offset is not None:
                    detail += f" from offset {offset}"
                raise ValueError(
                    f"{role} entry {name!r} has size {size} along axis {axis} ({label}) but "
                    f"producer {self.producer!r} has {detail} = {n * spatial}"
                )
            entries.append(FlowEntry(name, role, axis, spatial, e.channels_last, offset, n,
                                     e.member))
        return tuple(entries)

    def channels(self, params: Mapping[str, Any]) -> int:
        """The producer's channel count, after validating every entry (see :meth:`entries`)."""
        entries = self.entries(params)
        return int(params[self.producer].shape[entries[0].axis])
