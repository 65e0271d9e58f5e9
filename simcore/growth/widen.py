"""Widening operators: add, replicate (Net2Net) and split (SSD/Firefly) neurons of one layer.

Each operator takes the flat ``params`` mapping and a :class:`~simcore.growth.flow.ChannelFlow`
and returns ``(new_params, channel_map)``: a NEW dict in which the flow's entries are new arrays
of the same library, dtype and device, grown along their channel axis, and every other entry is
passed through by identity. Nothing is mutated. The old channels keep their indices; the new
ones are appended, and a :class:`~simcore.growth.channel_map.ChannelMap` records where each came
from. The operators read and write arrays through the one-row-per-channel view of
:mod:`simcore.growth.channel_rows`.

Function preservation (see docs/design.md, 'Growth'), with ``h`` the producer's output and ``a`` the
consumer's column block of a channel:

=============================  ================  =======================  =================
operator                       new incoming      consumer columns         network function
=============================  ================  =======================  =================
``add_neurons`` outgoing zero  random            zero                     exactly kept
``add_neurons`` outgoing small random / given    ``U(-s, s)``             changes by O(s)
``replicate_neurons``          parent's copy     parent's / replicas      exactly kept
``split_neurons``              ``theta +- eps d`` halved, copy other half kept to O(eps^2)
=============================  ================  =======================  =================

Per-channel entries between producer and consumers (producer bias, BatchNorm vectors and running
statistics, depthwise filters with their bias and BatchNorm) are *duplicated* for copies, never
halved: halving happens only in the consumers. Fresh channels get bias 0, BatchNorm
``gamma 1, beta 0, mean 0, var 1`` and random, non-zero depthwise filters (He-normal over the
filter's ``kh*kw`` taps). A grown depthwise convolution has as many groups as channels: the
adapters set ``groups = in_channels = out_channels`` from the grown arrays' shapes.

Random numbers come from a ``numpy.random.Generator`` (or an int seed), drawn in float64 in this
order -- producer rows, depthwise filters (flow order), consumer columns (consumer order, only
for ``outgoing="small"``) -- and converted to each entry's dtype and device, so a seed gives the
same network on every backend.

Example (Net2Net on a two-layer MLP keeps the function exactly):

>>> import numpy as np
>>> from simcore.growth.flow import ChannelFlow, Consumer
>>> rng = np.random.default_rng(0)
>>> params = {"w1": rng.normal(size=(3, 2)), "w2": rng.normal(size=(1, 3))}
>>> flow = ChannelFlow("w1", consumers=(Consumer("w2"),))
>>> grown, cmap = replicate_neurons(params, flow, [2, 2])
>>> cmap.sources, grown["w1"].shape, grown["w2"].shape
((0, 1, 2, 2, 2), (5, 2), (1, 5))
>>> x = rng.normal(size=(2, 4))
>>> f = lambda p: p["w2"] @ np.tanh(p["w1"] @ x)
>>> bool(np.allclose(f(grown), f(params)))
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._arrays import check_choice, check_real, compute_dtype, device_of, namespace_of
from ._host import as_generator, as_index, as_indices, symmetric_uniform
from .channel_map import ChannelMap
from .channel_rows import channel_rows, write_channel_rows
from .flow import ChannelFlow, FlowEntry

__all__ = [
    "add_neurons",
    "producer_rows_argument",
    "replicate_neurons",
    "split_neurons",
]

INCOMING = ("he", "match_norm")
OUTGOING = ("zero", "small")

# Values a fresh channel gets in each per-channel role.
_FRESH_CONSTANT = {"bias": 0.0, "shift": 0.0, "mean": 0.0, "scale": 1.0, "var": 1.0}


# --- growing channel rows ----------------------------------------------------------------------


def _host_array(xp: Any, values: np.ndarray, like: Any) -> Any:
    return xp.asarray(values, dtype=like.dtype, device=device_of(like))


def _take(xp: Any, rows: Any, sources: Sequence[int], like: Any) -> Any:
    index = xp.asarray(np.asarray(sources, dtype=np.int64), device=device_of(like))
    return xp.take(rows, index, axis=0)


def _grow_by_map(xp: Any, a: Any, entry: FlowEntry, cmap: ChannelMap, *, divide: bool) -> Any:
    """Every new channel copies its source; consumers divide by the source's multiplicity."""
    rows = channel_rows(xp, a, entry)
    grown = _take(xp, rows, cmap.sources, a)
    if divide:
        counts = cmap.multiplicity()[np.asarray(cmap.sources, dtype=np.int64)]
        grown = grown / _host_array(xp, counts[:, None].astype(np.float64), a)
    return write_channel_rows(xp, a, entry, grown)


def _append_rows(xp: Any, a: Any, entry: FlowEntry, extra: Any) -> Any:
    rows = channel_rows(xp, a, entry)
    return write_channel_rows(xp, a, entry, xp.concat([rows, extra], axis=0))


# --- argument checks ---------------------------------------------------------------------------


def _check_params(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a Mapping of name -> array, got {type(params).__name__}")


def _check_flow(flow: Any) -> None:
    if not isinstance(flow, ChannelFlow):
        raise TypeError(f"flow must be a ChannelFlow, got {type(flow).__name__}")


def _rows_argument(value: Any, count: int, width: int, name: str, like: Any,
                   entry: FlowEntry | None = None) -> Any:
    """A user-given block of ``count`` rows, as ``(count, width)``.

    Accepted shapes: ``(count, width)``, or, for a producer or depthwise ``entry``,
    ``(count, *per-channel shape)`` with the per-channel shape of ``like`` (its shape
    without the channel axis). Any other shape of the right size would be reshaped in
    the wrong order (an OIHW block for an HWIO kernel), so it is refused.
    """
    xp = namespace_of(value, name)
    if xp is not namespace_of(like, "params"):
        raise TypeError(f"{name} comes from a different array library than params")
    if not xp.isdtype(value.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {value.dtype}")
    shape = tuple(int(s) for s in value.shape)
    accepted: list[tuple[int, ...]] = [(count, width)]
    if entry is not None and entry.role in ("producer", "depthwise"):
        per_channel = tuple(int(s) for i, s in enumerate(like.shape) if i != entry.axis)
        accepted.append((count, *per_channel))
    if shape not in accepted:
        raise ValueError(
            f"{name} must have shape {' or '.join(map(str, accepted))}, got {shape}"
        )
    value = xp.reshape(value, (count, width))
    if value.dtype != like.dtype:
        value = xp.astype(value, like.dtype)
    return value


def producer_rows_argument(value: Any, params: Mapping[str, Any], entries: Sequence[FlowEntry],
                           count: int, name: str) -> list[Any]:
    """One ``(count, fan_in)`` block per producer of a flow (its own, then its members').

    ``value`` is an array when the flow has one producer, or a sequence with one array per
    producer (a residual group: each member has its own fan-in).
    """
    producers = [e for e in entries if e.role == "producer"]
    if isinstance(value, (list, tuple)):
        values = list(value)
    elif len(producers) == 1:
        values = [value]
    else:
        raise TypeError(f"{name} must be a sequence with one array per producer of the group "
                        f"({len(producers)}), got {type(value).__name__}")
    if len(values) != len(producers):
        raise ValueError(f"{name} must hold one array per producer of the flow "
                         f"({len(producers)}), got {len(values)}")
    out = []
    for i, (entry, v) in enumerate(zip(producers, values, strict=True)):
        a = params[entry.name]
        width = math.prod(int(d) for d in a.shape) // int(a.shape[entry.axis])
        label = name if len(producers) == 1 else f"{name}[{i}]"
        out.append(_rows_argument(v, count, width, label, a, entry))
    return out


# --- operators ---------------------------------------------------------------------------------


def add_neurons(
    params: Mapping[str, Any],
    flow: ChannelFlow,
    count: int,
    *,
    rng: Any = None,
    incoming: Any = "he",
    outgoing: Any = "zero",
    outgoing_scale: float = 0.01,
    depthwise: Any = "he",
) -> tuple[dict[str, Any], ChannelMap]:
    """Append ``count`` fresh neurons to the flow's producer.

    ``incoming``: ``"he"`` draws rows from ``N(0, 2/fan_in)`` (Kaiming normal, ``fan_in`` the
    row length, e.g. ``C_in*kh*kw``); ``"match_norm"`` draws random directions scaled to the mean
    norm of the existing rows (zero rows if every existing row is zero: use ``"he"`` there);
    an array of shape ``(count, fan_in)`` or ``(count, *per-neuron shape)`` (the producer's
    shape without ``out_axis``) gives the rows (Firefly's trained candidates).
    A residual group (a flow with ``members``) takes one such array per producer, in a
    sequence (:func:`producer_rows_argument`).
    ``outgoing``: ``"zero"`` keeps the function exactly (Dota 2 surgery); ``"small"`` draws
    ``U(-outgoing_scale, outgoing_scale)`` (Firefly-style, the function moves by O(scale)); a
    sequence with one array per consumer, each ``(count, columns per channel)``, gives the
    columns. ``rng`` (a ``numpy.random.Generator`` or an int seed) is required whenever
    something is drawn. Fresh channels get producer bias 0, BatchNorm 1/0/0/1 and non-zero
    depthwise filters: ``depthwise="he"`` draws them like ``incoming="he"``; a sequence with one
    ``(count, kh*kw)`` array per :class:`Depthwise` of the flow gives them (Firefly's candidates).

    >>> import numpy as np
    >>> from simcore.growth.flow import ChannelFlow, Consumer
    >>> params = {"w1": np.ones((2, 3)), "w2": np.ones((4, 2))}
    >>> flow = ChannelFlow("w1", consumers=(Consumer("w2"),))
    >>> grown, cmap = add_neurons(params, flow, 3, rng=0)
    >>> cmap.sources, grown["w1"].shape, float(np.abs(grown["w2"][:, 2:]).sum())
    ((0, 1, -1, -1, -1), (5, 3), 0.0)
    """
    _check_params(params)
    _check_flow(flow)
    entries = flow.entries(params)
    n = int(params[flow.producer].shape[entries[0].axis])
    count = as_index(count, "count")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    incoming_given = not isinstance(incoming, str)
    if not incoming_given:
        check_choice(incoming, INCOMING, "incoming")
    outgoing_given = not isinstance(outgoing, str)
    if outgoing_given:
        if isinstance(outgoing, Mapping) or not isinstance(outgoing, Sequence):
            raise TypeError(
                "outgoing must be 'zero', 'small' or a sequence of one array per consumer"
            )
        if len(outgoing) != len(flow.consumers):
            raise ValueError(
                f"outgoing must hold one array per consumer ({len(flow.consumers)}), "
                f"got {len(outgoing)}"
            )
    else:
        check_choice(outgoing, OUTGOING, "outgoing")
    depthwise_given = not isinstance(depthwise, str)
    if depthwise_given:
        if isinstance(depthwise, Mapping) or not isinstance(depthwise, Sequence):
            raise TypeError("depthwise must be 'he' or a sequence of one array per Depthwise")
        if len(depthwise) != len(flow.depthwise):
            raise ValueError(
                f"depthwise must hold one array per Depthwise of the flow ({len(flow.depthwise)}),"
                f" got {len(depthwise)}"
            )
    else:
        check_choice(depthwise, ("he",), "depthwise")
    scale = check_real(outgoing_scale, "outgoing_scale")
    needs_rng = ((not incoming_given) or (bool(flow.depthwise) and not depthwise_given)
                 or outgoing == "small")
    if needs_rng and count > 0:
        if rng is None:
            raise ValueError(
                "rng (a numpy.random.Generator or an int seed) is required to draw new neurons"
            )
        gen = as_generator(rng)
    elif rng is not None:
        as_generator(rng)  # still reject a wrong type

    cmap = ChannelMap(tuple(range(n)) + (-1,) * count, "add")
    out = dict(params)
    if incoming_given:
        incoming_rows = producer_rows_argument(incoming, params, entries, count, "incoming")
    if count == 0:
        return out, cmap

    xp = namespace_of(params[flow.producer], f"params[{flow.producer!r}]")
    consumer_index = depthwise_index = 0
    for entry in entries:
        a = out[entry.name]  # a member that also reads the group: its rows grew already
        rows = channel_rows(xp, a, entry)
        width = int(rows.shape[1])
        if entry.role == "producer":
            if incoming_given:
                extra = incoming_rows[entry.member]
            elif incoming == "he":
                extra = _host_array(
                    xp, gen.standard_normal((count, width)) * math.sqrt(2.0 / width), a
                )
            else:
                direction = gen.standard_normal((count, width))
                direction /= np.linalg.norm(direction, axis=1, keepdims=True)
                work = xp.astype(rows, compute_dtype(xp, a.dtype))  # half precision: norms in fp32
                mean_norm = xp.mean(xp.sqrt(xp.sum(work * work, axis=1)))
                extra = xp.astype(_host_array(xp, direction, work) * mean_norm, a.dtype)
        elif entry.role == "depthwise":
            if depthwise_given:
                extra = _rows_argument(depthwise[depthwise_index], count, width,
                                       f"depthwise[{depthwise_index}]", a, entry)
            else:
                extra = _host_array(
                    xp, gen.standard_normal((count, width)) * math.sqrt(2.0 / width), a
                )
            depthwise_index += 1
        elif entry.role == "consumer":
            if outgoing_given:
                given = int(channel_rows(xp, params[entry.name], entry).shape[1])
                extra = _rows_argument(
                    outgoing[consumer_index], count, given, f"outgoing[{consumer_index}]", a
                )
                if given < width:  # the member's new rows read the new channels with 0
                    extra = xp.concat([extra, xp.zeros((count, width - given), dtype=a.dtype,
                                                       device=device_of(a))], axis=1)
            elif outgoing == "small":
                extra = _host_array(xp, symmetric_uniform(gen, scale, (count, width)), a)
            else:
                extra = xp.zeros((count, width), dtype=a.dtype, device=device_of(a))
            consumer_index += 1
        else:
            extra = xp.full(
                (count, 1), _FRESH_CONSTANT[entry.role], dtype=a.dtype, device=device_of(a)
            )
        out[entry.name] = _append_rows(xp, a, entry, extra)
    return out, cmap


def replicate_neurons(
    params: Mapping[str, Any], flow: ChannelFlow, parents: Any
) -> tuple[dict[str, Any], ChannelMap]:
    """Net2Net widening: append an exact copy of every neuron in ``parents``.

    ``parents`` may repeat a neuron: a neuron carried by ``c`` channels (itself and its copies)
    has each of their consumer columns divided by ``c``, so the network function is exactly kept.
    Incoming rows, bias, BatchNorm and depthwise entries are copied unchanged.

    >>> import numpy as np
    >>> from simcore.growth.flow import ChannelFlow, Consumer
    >>> params = {"w1": np.eye(2), "w2": np.array([[3.0, 6.0]])}
    >>> flow = ChannelFlow("w1", consumers=(Consumer("w2"),))
    >>> grown, _ = replicate_neurons(params, flow, [1, 1])
    >>> grown["w2"].tolist()
    [[3.0, 2.0, 2.0, 2.0]]
    """
    _check_params(params)
    _check_flow(flow)
    entries = flow.entries(params)
    n = int(params[flow.producer].shape[entries[0].axis])
    parents = as_indices(parents, n, "parents")
    cmap = ChannelMap(tuple(range(n)) + parents, "replicate")
    out = dict(params)
    if not parents:
        return out, cmap
    xp = namespace_of(params[flow.producer], f"params[{flow.producer!r}]")
    for entry in entries:  # from ``out``: a member that also reads the group grows twice
        out[entry.name] = _grow_by_map(
            xp, out[entry.name], entry, cmap, divide=entry.role == "consumer"
        )
    return out, cmap


def split_neurons(
    params: Mapping[str, Any],
    flow: ChannelFlow,
    parents: Any,
    directions: Any,
    *,
    eps: float = 0.01,
) -> tuple[dict[str, Any], ChannelMap]:
    """Split each parent in two: ``theta + eps*delta`` in place, ``theta - eps*delta`` appended.

    ``parents`` must be distinct; ``directions`` (an array of the params' library) has shape
    ``(len(parents), fan_in)`` or ``(len(parents), *per-neuron shape)`` (the producer's shape
    without ``out_axis``), row ``i`` the direction ``delta`` of ``parents[i]`` (SSD: the
    eigenvector of the smallest eigenvalue of the splitting matrix; Firefly: the trained
    ``delta``); a residual group (a flow with ``members``) takes a sequence with one such
    array per producer and splits channel ``i`` in every member (a gate member,
    ``Member(gate=True)``, is copied exactly: its direction is not used). The consumer columns
    of a parent are halved and the copy gets the other half;
    bias, BatchNorm and depthwise entries are duplicated. The function is kept to O(eps^2)
    (exactly at ``eps=0``), since ``(f(h + e) + f(h - e)) / 2 = f(h) + O(e^2)``. Like the
    loss, the operators never inspect values (they trace under ``jax.jit``): NaN or Inf in
    ``directions`` makes the split rows NaN or Inf.

    >>> import numpy as np
    >>> from simcore.growth.flow import ChannelFlow, Consumer
    >>> params = {"w1": np.array([[1.0, 0.0], [0.0, 1.0]]), "w2": np.array([[4.0, 8.0]])}
    >>> flow = ChannelFlow("w1", consumers=(Consumer("w2"),))
    >>> grown, cmap = split_neurons(params, flow, [0], np.array([[0.0, 1.0]]), eps=0.5)
    >>> grown["w1"].tolist(), grown["w2"].tolist()
    ([[1.0, 0.5], [0.0, 1.0], [1.0, -0.5]], [[2.0, 8.0, 2.0]])
    """
    _check_params(params)
    _check_flow(flow)
    entries = flow.entries(params)
    producer = params[flow.producer]
    n = int(producer.shape[entries[0].axis])
    parents = as_indices(parents, n, "parents")
    seen: set[int] = set()
    for i, p in enumerate(parents):
        if p in seen:
            raise ValueError(
                f"parents must be distinct for split_neurons; parents[{i}]={p} repeats"
            )
        seen.add(p)
    eps = check_real(eps, "eps")
    xp = namespace_of(producer, f"params[{flow.producer!r}]")
    directions = producer_rows_argument(directions, params, entries, len(parents), "directions")
    cmap = ChannelMap(tuple(range(n)) + parents, "split")
    out = dict(params)
    if not parents:
        return out, cmap

    # Row j of the perturbation is +delta_i for parent i, -delta_i for its copy, 0 elsewhere:
    # gathered from [0; directions] so that unperturbed rows stay bit-exact. One per producer:
    # a residual group splits channel i in every member, each along its own direction.
    slot = np.zeros(n + len(parents), dtype=np.int64)
    sign = np.zeros(n + len(parents), dtype=np.float64)
    for i, p in enumerate(parents):
        slot[p], slot[n + i] = i + 1, i + 1
        sign[p], sign[n + i] = 1.0, -1.0
    perturbation = []
    for block in directions:
        padded = xp.concat([xp.zeros((1, int(block.shape[1])), dtype=block.dtype,
                                     device=device_of(block)), block])
        perturbation.append(_take(xp, padded, slot.tolist(), block)
                            * _host_array(xp, eps * sign[:, None], block))

    gates = {index for index, m in enumerate(flow.members, start=1) if m.gate}
    for entry in entries:
        a = out[entry.name]  # a member that also reads the group: its rows split already
        if entry.role == "producer":
            rows = _take(xp, channel_rows(xp, a, entry), cmap.sources, a)
            if entry.member not in gates:  # a gate is copied exactly (Member.gate)
                rows = rows + perturbation[entry.member]
            out[entry.name] = write_channel_rows(xp, a, entry, rows)
        else:
            out[entry.name] = _grow_by_map(xp, a, entry, cmap, divide=entry.role == "consumer")
    return out, cmap
