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

A producer is *not growable* when its channels meet another layer's (residual add,
multiplication), are concatenated, reach the network's output (the classifier), are reduced over,
reshaped together with other axes, enter control flow or any operation not listed above, or when
its kernel is used twice: :func:`discover_flows` leaves it out, and asking for it by name raises
:class:`~simcore.growth.GrowthError` naming the layer (its module path) and the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from simcore import growth
from simcore.growth import GrowthError

from ._program import Program
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
    names, and (for SSD) where its statistics live in the traced program."""

    name: str
    flow: growth.ChannelFlow
    capture: FlowCapture


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


def analyse(program: Program, names: Sequence[str],
            shapes: Sequence[tuple[int, ...]]) -> tuple[list[JaxFlow], dict[str, str]]:
    """Every producer's flow, in forward order, and ``{layer: reason}`` of the refused ones.

    ``names``/``shapes`` describe the program's first ``len(names)`` inputs (the model's
    leaves); the remaining inputs are data.
    """
    analysis = Analysis(program, names, shapes)
    analysis.run()
    flows, blocked = [], {}
    for walk in sorted(analysis.walks.values(), key=lambda w: w.step):
        name = layer_of(names[walk.leaf])
        if walk.blocked is None:
            try:
                bias, norm = _roles(analysis, walk, -1)
                depthwise = []
                for k, (leaf, axis) in enumerate(walk.depthwise):
                    dw_bias, dw_norm = _roles(analysis, walk, k)
                    depthwise.append(growth.Depthwise(names[leaf], channel_axis=axis,
                                                      bias=dw_bias, norm=dw_norm))
            except GrowthError as error:
                walk.blocked = str(error).split(": ", 1)[-1]
        if walk.blocked is not None:
            blocked[name] = walk.blocked
            continue
        consumers = tuple(
            growth.Consumer(names[leaf], in_axis=axis, spatial=spatial,
                            channels_last=channels_last and spatial > 1)
            for leaf, (axis, spatial, channels_last) in walk.consumers.items()
        )
        flow = growth.ChannelFlow(names[walk.leaf], out_axis=walk.out_axis, consumers=consumers,
                                  bias=bias, norm=norm, depthwise=tuple(depthwise))
        activation = walk.activation
        capture = FlowCapture(
            step=walk.step, data=walk.data, kind=walk.kind, kernel_axes=walk.kernel_axes,
            out_axis=walk.out_axis,
            activation=None if activation is None else activation[0],
            z=None if activation is None else activation[1], z_axis=walk.z_axis,
            h_step=None if activation is None else activation[3],
            multipliers=tuple(walk.multipliers),
            problem=walk.problem if activation is not None or walk.problem else
            "no activation was found after it",
        )
        flows.append(JaxFlow(name, flow, capture))
    return flows, blocked
