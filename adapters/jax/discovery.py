"""Find every layer's channel flow in the computation of a JAX model (``jax.make_jaxpr``).

The model's apply function is traced with its variables flattened into named leaves (names as
:func:`~simcore.adapters.jax.named_leaves` gives them), so every jaxpr input is a known leaf. A
*producer* is a ``conv_general_dilated`` or ``dot_general`` whose kernel is a leaf and whose other
operand is data; its output channels are then followed step by step:

* per-channel parameters combined with them (a bias added right after the producer; a
  BatchNorm's mean subtracted, ``scale``/``rsqrt(var)`` multiplied, shift added -- roles are read
  from how each leaf enters the computation, so Flax linen, nnx and Equinox BatchNorms all work);
* activations, pooling (``reduce_window`` not spanning channels), reductions over other axes,
  reshapes that keep the channel axis, dropout in eval mode;
* a depthwise convolution (``feature_group_count`` equal to the channel count, one filter per
  channel): it grows with the producer (:class:`~simcore.growth.Depthwise`);
* a flatten: channel-major (NCHW, Equinox) or channels-last (NHWC, Flax), with its spatial factor;
* consumers: a convolution reading them on its input-feature axis, a dense layer reading them
  on its contracted axis (after a flatten, ``spatial`` columns per channel).

* a residual add: two producers whose channels are added channel by channel (a ResNet
  block's last conv and the stream it adds to, a projection shortcut) are one *residual group*,
  grown by the same channels: one flow whose first producer is the flow's and the others its
  :class:`~simcore.growth.Member`\\ s (:mod:`._residual`); the consumers of the sum are the
  group's.

A producer is *not growable* when its channels meet another layer's other than in such an add
(a multiplication, an add that does not line the channels up, an add with a refused layer's
channels or with the network's input), are concatenated, reach the network's output (the
classifier), are reduced over, reshaped together with other axes, enter control flow or any
operation not listed above, or when its kernel is used twice: :func:`discover_flows` leaves it
out, and asking for it by name raises :class:`~simcore.growth.GrowthError` naming the layer (its
module path) and the reason. A residual group with one refused member is refused as a whole,
naming that member.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from simcore import growth
from simcore.growth import GrowthError

from ._program import Program
from ._residual import ResidualGroup, residual_groups
from ._walk import Analysis, Walk, layer_of

__all__ = ["FlowCapture", "JaxFlow", "analyse", "layer_of"]


@dataclass(frozen=True)
class FlowCapture:
    """Where SSD reads one flow in a :class:`~._program.Program` (variable ids, step indices)."""

    step: int
    data: Any
    kind: str
    kernel_axes: tuple[int, ...]
    out_axis: int
    activation: str | None
    z: int | None
    z_axis: int
    h_step: int | None
    multipliers: tuple[tuple[int, Any, str, int], ...]
    problem: str | None


@dataclass(frozen=True)
class JaxFlow:
    """A growable layer: its module path, its :class:`~simcore.growth.ChannelFlow` over leaf
    names, and (for SSD) where its statistics live in the traced program -- for a residual
    group, its first producer's, then each member's (``members``)."""

    name: str
    flow: growth.ChannelFlow
    capture: FlowCapture
    members: tuple[FlowCapture, ...] = ()

    @property
    def layers(self) -> tuple[str, ...]:
        """The module paths of its producers: its own, then its residual group's members'."""
        return (self.name, *(layer_of(m.weight) for m in self.flow.members))


def _roles(analysis: Analysis, walk: Walk, segment: int):
    """``(bias, BatchNorm | None)`` names of one segment, from how each leaf entered."""
    bias = None
    roles: dict[str, int] = {}
    scaled = False
    names = analysis.names

    def assign(role: str, leaf: int) -> None:
        if roles.get(role, leaf) != leaf:
            raise GrowthError(
                f"cannot grow {layer_of(names[walk.leaf])!r}: two per-channel parameters "
                f"({names[roles[role]]!r} and {names[leaf]!r}) act as its {role}; one "
                "normalisation per layer is supported"
            )
        roles[role] = leaf

    for op, per in walk.events.get(segment, []):
        if not per:
            continue
        if op in ("add", "add_any", "sub") and len(per) == 1:
            leaf, flag = next(iter(per.items()))
            if op == "sub" and not flag:
                assign("mean", leaf)
                scaled = True
            elif not flag and not scaled and bias is None and "shift" not in roles:
                bias = leaf
            elif not flag:
                assign("shift", leaf)
            else:
                assign("var", leaf)
        elif op in ("mul", "div"):
            scaled = True
            for leaf, flag in per.items():
                assign("var" if flag else "scale", leaf)
        else:
            raise GrowthError(
                f"cannot grow {layer_of(names[walk.leaf])!r}: per-channel parameters "
                f"{sorted(names[leaf] for leaf in per)} enter its channels through '{op}'"
            )
    norm = None
    if roles:
        vectors: dict[str, Any] = {role: names[leaf] for role, leaf in roles.items()}
        norm = growth.BatchNorm(**vectors)
    return (None if bias is None else names[bias]), norm


def _capture(walk: Walk) -> FlowCapture:
    activation = walk.activation
    return FlowCapture(
        step=walk.step, data=walk.data, kind=walk.kind, kernel_axes=walk.kernel_axes,
        out_axis=walk.out_axis,
        activation=None if activation is None else activation[0],
        z=None if activation is None else activation[1], z_axis=walk.z_axis,
        h_step=None if activation is None else activation[3],
        multipliers=tuple(walk.multipliers),
        problem=walk.problem if activation is not None or walk.problem else
        "no activation was found after it",
    )


def _flow(analysis: Analysis, group: ResidualGroup) -> growth.ChannelFlow:
    """The group's flow (raises GrowthError when a member's per-channel roles are unclear)."""
    names = analysis.names
    own, *others = group.walks
    bias, norm = _roles(analysis, own, -1)
    depthwise = []
    for walk in group.walks:
        for k, (leaf, axis) in enumerate(walk.depthwise):
            dw_bias, dw_norm = _roles(analysis, walk, k)
            depthwise.append(growth.Depthwise(names[leaf], channel_axis=axis, bias=dw_bias,
                                              norm=dw_norm))
    members = []
    for walk in others:
        member_bias, member_norm = _roles(analysis, walk, -1)
        members.append(growth.flow.Member(names[walk.leaf], out_axis=walk.out_axis,
                                     bias=member_bias, norm=member_norm))
    consumers = tuple(
        growth.Consumer(names[leaf], in_axis=axis, spatial=spatial,
                        channels_last=channels_last and spatial > 1)
        for leaf, (axis, spatial, channels_last) in group.consumers.items()
    )
    return growth.ChannelFlow(names[own.leaf], out_axis=own.out_axis, consumers=consumers,
                              bias=bias, norm=norm, depthwise=tuple(depthwise),
                              members=tuple(members))


def analyse(program: Program, names: Sequence[str], shapes: Sequence[tuple[int, ...]]
            ) -> tuple[list[JaxFlow], dict[str, str], dict[str, int]]:
    """Every producer's flow (a residual group's: its first producer's), in forward order,
    ``{layer: reason}`` of the refused ones (every member of a refused group) and
    ``{layer: width}`` of the refused ones.

    ``names``/``shapes`` describe the program's first ``len(names)`` inputs (the model's
    leaves); the remaining inputs are data.
    """
    analysis = Analysis(program, names, shapes)
    analysis.run()
    flows, blocked, widths = [], {}, {}
    for group in residual_groups(analysis):
        layers = [layer_of(names[walk.leaf]) for walk in group.walks]
        reason = group.blocked
        if reason is None:
            try:
                flow = _flow(analysis, group)
            except GrowthError as error:
                message = str(error).removeprefix("cannot grow ")  # "'layer': why"
                reason = message if len(layers) > 1 else message.split(": ", 1)[-1]
        if reason is not None:
            blocked.update(dict.fromkeys(layers, reason))
            widths.update({layer: walk.n for layer, walk in zip(layers, group.walks, strict=True)})
            continue
        own, *others = group.walks
        flows.append(JaxFlow(layers[0], flow, _capture(own),
                             tuple(_capture(walk) for walk in others)))
    return flows, blocked, widths
