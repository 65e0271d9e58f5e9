"""Firefly neural architecture descent (Wu, Liu, Stone, Liu 2020): candidates, scores, growth.

Firefly grows a network by trying many small changes at once and keeping the best:

1. **Candidates** (:func:`firefly_candidates`): for every growable layer, a split
   direction ``delta_i`` for every existing neuron (``theta_i -> theta_i +/- delta_i``,
   outgoing halved) and ``K`` new neurons with incoming rows and outgoing columns.
   Reference initialisation (``sp/conv.py`` of the authors' code): ``delta ~ U(-0.1, 0.1)``,
   ``K = 70``, new incoming ``~ N(0, 0.1^2)`` (std 0.1), new outgoing
   ``~ U(-0.01, 0.01)``.
2. **Training** (adapters): the candidate variables are trained for one pass over
   the data with everything else frozen (reference: RMSprop lr 1e-3, momentum 0.1,
   alpha 0.9; L2 penalty 1e-2 on ``delta`` and 1e-4 on new incoming rows; BatchNorm in
   eval mode), then each candidate gets a gate ``g`` (its perturbation times ``g``)
   and its score is ``dL/dg`` at ``g = 1``, averaged over batches.
3. **Selection** (:func:`firefly_select`): the most negative scores over all layers,
   exactly ``k`` of them (the reference's ``score <= sorted[k]`` keeps ``k + 1`` or
   more), optionally in groups (the reference uses two for MobileNet) and caps.
4. **Growth** (:func:`firefly_apply`): chosen splits through
   :func:`~simcore.growth.split_neurons` (``eps = 1``: the trained ``delta`` already
   carries its scale), chosen new neurons through :func:`~simcore.growth.add_neurons`
   with their trained incoming rows and outgoing columns. Channel order per layer:
   old channels, split copies, new neurons (the reference's order).

Layouts: candidates are stored as *channel rows* like the widening operators'
``incoming``/``outgoing``/``directions`` arguments: producer rows in ``to_rows`` order
(neuron axis first, the rest flattened), consumer columns as ``(K, columns per channel)``
(:func:`simcore.growth.channel_rows.channel_rows` of the consumer). :func:`candidate_weights`
gives them in the weights' own layouts for a gated forward pass.

Known bugs of the reference code we do not copy: the classifier is not a growable
flow there and new neurons feeding it end with zero outgoing weights (their trained
columns are dropped); new depthwise channels get zero filters (silent neurons: we use
the random non-zero filters of ``add_neurons``); and its "random" growth method is
NASH-style random splitting, not the random new neurons the paper's "Random" means.
Also unlike the reference, connections between two *new* neurons of consecutive
layers start at zero (the reference trains them as part of the consumer's candidate
columns; here a candidate column only covers the consumer's existing rows).

Closed-form gate gradients, for adapters that want no autodiff, are in
:mod:`simcore.growth.firefly_scores` (:func:`split_gate_scores`,
:func:`new_neuron_gate_scores`; re-exported here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._arrays import (
    check_choice,
    check_real,
    device_of,
    from_rows,
    namespace_of,
    to_rows,
)
from ._host import as_generator, as_index, symmetric_uniform, to_numpy
from .budget import select_lowest
from .chain import GrowthChain, _regrow_rows
from .channel_map import ChannelMap
from .channel_rows import channel_rows, from_channel_rows
from .firefly_scales import SCALES, _rms, _row_norms, relative_amplitudes
from .firefly_scores import new_neuron_gate_scores, split_gate_scores
from .flow import ChannelFlow
from .widen import _check_params, _grow_by_map, _host_array, add_neurons, split_neurons

__all__ = [
    "FireflyCandidates",
    "FireflySelection",
    "candidate_weights",
    "firefly_apply",
    "firefly_candidates",
    "firefly_select",
    "new_neuron_gate_scores",
    "split_gate_scores",
]

#: The reference code's number of new-neuron candidates per layer.
DEFAULT_NEW_PER_LAYER = 70
#: Default ``(split_scale, incoming_std, outgoing_scale)`` of each way of drawing candidates
#: (:func:`firefly_candidates`); ``"absolute"`` holds the reference code's values.
_DEFAULT_SCALES = {"relative": (0.1, 1.0, 0.1), "absolute": (0.1, 0.1, 0.01)}


@dataclass(frozen=True)
class FireflyCandidates:
    """One layer's candidates, in channel-row layout (module docstring).

    ``split_directions``: ``(n, fan_in)``, ``delta_i`` for each existing neuron, or None
    (no split candidates). ``new_incoming``: ``(K, fan_in)``. ``new_outgoing``: one
    ``(K, columns per channel)`` array per consumer of the flow, in flow order.
    ``new_depthwise``: one ``(K, kh*kw)`` array of non-zero filters per depthwise conv of
    the flow, so a new neuron is scored and applied with the very same filter.
    ``member_split`` / ``member_incoming``: the same as ``split_directions`` /
    ``new_incoming`` for each member of a residual group (``ChannelFlow.members``), in
    order; one gate scales a candidate in every member (the group is one unit).
    Replace trained values with ``dataclasses.replace``.
    """

    split_directions: Any
    new_incoming: Any
    new_outgoing: tuple[Any, ...]
    new_depthwise: tuple[Any, ...] = ()
    member_split: tuple[Any, ...] = ()
    member_incoming: tuple[Any, ...] = ()

    @property
    def all_split(self) -> tuple[Any, ...] | None:
        """The split directions of every producer (the flow's own first), or None."""
        if self.split_directions is None:
            return None
        return (self.split_directions, *self.member_split)

    @property
    def all_incoming(self) -> tuple[Any, ...]:
        """The new neurons' incoming rows of every producer (the flow's own first)."""
        return (self.new_incoming, *self.member_incoming)

    @property
    def new_count(self) -> int:
        """``K``, the number of new-neuron candidates."""
        return int(self.new_incoming.shape[0])


@dataclass(frozen=True)
class FireflySelection:
    """Chosen candidates of one layer: split ``parents`` and indices of ``new`` candidates."""

    split: np.ndarray
    new: np.ndarray

    @property
    def count(self) -> int:
        """Neurons this selection adds to the layer."""
        return int(self.split.size + self.new.size)


def _check_flows(flows: Any) -> tuple[ChannelFlow, ...]:
    if isinstance(flows, ChannelFlow) or not isinstance(flows, Sequence):
        raise TypeError("flows must be a sequence of ChannelFlow")
    for i, f in enumerate(flows):
        if not isinstance(f, ChannelFlow):
            raise TypeError(f"flows[{i}] must be a ChannelFlow, got {type(f).__name__}")
    return tuple(flows)


def firefly_candidates(
    params: Mapping[str, Any],
    flows: Sequence[ChannelFlow],
    *,
    rng: Any,
    new_per_layer: int = DEFAULT_NEW_PER_LAYER,
    split: bool = True,
    split_scale: float | None = None,
    incoming_std: float | None = None,
    outgoing_scale: float | None = None,
    scales: str = "relative",
) -> list[FireflyCandidates]:
    """Draw the candidates for every flow (one :class:`FireflyCandidates` each).

    With ``scales="relative"`` (default; :mod:`simcore.growth.firefly_scales`) each split
    direction ``delta_i ~ U(-a_i, a_i)`` has expected norm ``split_scale`` (default 0.1) times
    its parent row's norm, each new incoming row ``~ N(0, s^2)`` has expected norm
    ``incoming_std`` (default 1) times the layer's RMS row norm, and each new outgoing column
    ``~ U(-b, b)`` has expected norm ``outgoing_scale`` (default 0.1) times the RMS norm of the
    consumer's existing columns, so candidates are as small next to the layer at any fan-in.
    With ``scales="absolute"`` they are the reference code's per-weight scales:
    ``delta ~ U(-split_scale, split_scale)`` (default 0.1), new incoming
    ``~ N(0, incoming_std^2)`` (0.1), new outgoing ``~ U(-outgoing_scale, outgoing_scale)``
    (0.01). New depthwise filters ``~ N(0, 2/(kh*kw))`` (the reference leaves them zero:
    silent neurons); ``split=False`` leaves out the split directions. ``rng``: a
    ``numpy.random.Generator`` or an int seed; values are drawn in float64 in the
    order flows, then split / incoming / outgoing per consumer / depthwise filters,
    and converted to each weight's dtype and device, so a seed gives the same
    candidates on every backend.

    >>> import numpy as np
    >>> from simcore.growth import ChannelFlow, Consumer
    >>> params = {"w1": np.ones((4, 3)), "w2": np.ones((2, 4))}
    >>> [c] = firefly_candidates(params, [ChannelFlow("w1", consumers=(Consumer("w2"),))],
    ...                          rng=0, new_per_layer=5)
    >>> c.split_directions.shape, c.new_incoming.shape, c.new_outgoing[0].shape
    ((4, 3), (5, 3), (5, 2))
    """
    _check_params(params)
    flows = _check_flows(flows)
    gen = as_generator(rng)
    k = as_index(new_per_layer, "new_per_layer")
    if k < 0:
        raise ValueError(f"new_per_layer must be >= 0, got {k}")
    scales = check_choice(scales, SCALES, "scales")
    defaults = _DEFAULT_SCALES[scales]
    split_scale = check_real(defaults[0] if split_scale is None else split_scale, "split_scale")
    incoming_std = check_real(defaults[1] if incoming_std is None else incoming_std,
                              "incoming_std")
    outgoing_scale = check_real(defaults[2] if outgoing_scale is None else outgoing_scale,
                                "outgoing_scale")
    out = []
    for flow in flows:
        entries = flow.entries(params)
        w = params[flow.producer]
        xp = namespace_of(w, f"params[{flow.producer!r}]")
        rows = channel_rows(xp, w, entries[0])
        n, fan_in = (int(s) for s in rows.shape)
        consumers = [e for e in entries if e.role == "consumer"]
        if scales == "relative":
            norms = relative_amplitudes(params, flow)
            # U(-a, a) has RMS a / sqrt(3): a row of d draws has expected squared norm d a^2 / 3.
            split_amplitude = split_scale * norms["rows"][:, None] * math.sqrt(3.0 / fan_in)
            incoming_sd = incoming_std * norms["row_rms"] / math.sqrt(fan_in)
            column_rms = norms["column_rms"]
        else:
            split_amplitude = None
            incoming_sd = incoming_std
            column_rms = (None,) * len(consumers)

        directions = None
        if split:
            deltas = (gen.uniform(-1.0, 1.0, (n, fan_in)) * split_amplitude
                      if scales == "relative" else symmetric_uniform(gen, split_scale, (n, fan_in)))
            directions = _host_array(xp, deltas, w)
            del deltas
        incoming = _host_array(xp, gen.standard_normal((k, fan_in)) * incoming_sd, w)
        outgoing, depthwise = [], []
        for entry, rms in zip(consumers, column_rms, strict=True):
            a = params[entry.name]
            width = int(channel_rows(xp, a, entry).shape[1])
            if rms is None:
                cols = symmetric_uniform(gen, outgoing_scale, (k, width))
            else:
                cols = gen.uniform(-1.0, 1.0, (k, width)) * (outgoing_scale * rms
                                                             * math.sqrt(3.0 / width))
            outgoing.append(_host_array(xp, cols, a))
        for entry in entries:
            if entry.role == "depthwise":
                a = params[entry.name]
                width = int(channel_rows(xp, a, entry).shape[1])
                filters = gen.standard_normal((k, width)) * math.sqrt(2.0 / width)
                depthwise.append(_host_array(xp, filters, a))
        member_split, member_incoming = [], []
        for entry in entries:  # a residual group's other producers, after everything else
            if entry.role == "producer" and entry.member > 0:
                a = params[entry.name]
                width = int(channel_rows(xp, a, entry).shape[1])
                if scales == "relative":  # scaled to the member's own rows, as above
                    member_rows = _row_norms(xp, channel_rows(xp, a, entry))
                    member_rms = _rms(member_rows) or 1.0
                    member_rows = np.where(member_rows > 0, member_rows, member_rms)
                    if split:
                        member_split.append(_host_array(xp, gen.uniform(-1.0, 1.0, (n, width))
                                                        * split_scale * member_rows[:, None]
                                                        * math.sqrt(3.0 / width), a))
                    sd = incoming_std * member_rms / math.sqrt(width)
                else:
                    if split:
                        member_split.append(
                            _host_array(xp, symmetric_uniform(gen, split_scale, (n, width)), a))
                    sd = incoming_std
                member_incoming.append(_host_array(xp, gen.standard_normal((k, width)) * sd, a))
        out.append(FireflyCandidates(directions, incoming, tuple(outgoing), tuple(depthwise),
                                     tuple(member_split), tuple(member_incoming)))
    return out


def candidate_weights(
    params: Mapping[str, Any], flow: ChannelFlow, candidates: FireflyCandidates
) -> dict[str, Any]:
    """The candidates in the weights' own layouts, for a gated forward pass.

    Returns ``{"split": like the producer (or None), "incoming": like the producer
    with K neurons, "outgoing": tuple, one per consumer, like the consumer with K
    channels}``.
    """
    entries = flow.entries(params)
    producer = entries[0]
    w = params[flow.producer]
    xp = namespace_of(w, f"params[{flow.producer!r}]")
    shape = tuple(int(s) for s in w.shape)
    split = None
    if candidates.split_directions is not None:
        split = from_rows(xp, candidates.split_directions, shape, producer.axis)
    k_shape = list(shape)
    k_shape[producer.axis] = candidates.new_count
    incoming = from_rows(xp, candidates.new_incoming, k_shape, producer.axis)
    consumers = [e for e in entries if e.role == "consumer"]
    outgoing = tuple(
        from_channel_rows(xp, cols, tuple(params[e.name].shape), e)
        for e, cols in zip(consumers, candidates.new_outgoing, strict=True)
    )
    return {"split": split, "incoming": incoming, "outgoing": outgoing}


def firefly_select(
    split_scores: Sequence[Any],
    new_scores: Sequence[Any],
    k: int,
    *,
    caps: Sequence[int | None] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    only_negative: bool = False,
    clamp: bool = False,
) -> list[FireflySelection]:
    """Keep the ``k`` most negative gate gradients over all layers and both candidate kinds.

    ``split_scores[l]`` is ``(n_l,)`` (None or empty: no split candidates in layer ``l``),
    ``new_scores[l]`` is ``(K_l,)``. Per layer the two are ranked together, so
    ``caps``/``groups``/``clamp`` (as in :func:`simcore.growth.select_lowest`) count
    both kinds.
    Exactly ``k`` picks (fewer only when ``only_negative`` leaves fewer, or caps do with
    ``clamp=True``; otherwise a budget the caps cannot hold is a ``ValueError``), ties
    broken deterministically by :func:`~simcore.growth.select_lowest`.

    >>> import numpy as np
    >>> sel = firefly_select([np.asarray([-1.0, 0.5])], [np.asarray([-3.0, 0.0, -0.5])], 2)
    >>> sel[0].split.tolist(), sel[0].new.tolist()
    ([0], [0])
    """
    if isinstance(split_scores, (str, bytes)) or not isinstance(split_scores, Sequence):
        raise TypeError("split_scores must be a sequence with one score array per layer")
    if isinstance(new_scores, (str, bytes)) or not isinstance(new_scores, Sequence):
        raise TypeError("new_scores must be a sequence with one score array per layer")
    if len(split_scores) != len(new_scores):
        raise ValueError(
            f"split_scores and new_scores must cover the same layers, got {len(split_scores)} "
            f"and {len(new_scores)}"
        )
    combined, split_sizes = [], []
    for layer, (s, a) in enumerate(zip(split_scores, new_scores, strict=True)):
        parts = []
        for values, name in ((s, "split_scores"), (a, "new_scores")):
            if values is None:
                parts.append(np.zeros(0))
                continue
            arr = np.asarray(to_numpy(values, f"{name}[{layer}]"), dtype=np.float64)
            if arr.ndim != 1:
                raise ValueError(f"{name}[{layer}] must be one-dimensional, got shape {arr.shape}")
            if np.isnan(arr).any():
                raise ValueError(f"{name}[{layer}] contains NaN")
            parts.append(arr)
        split_sizes.append(parts[0].size)
        combined.append(np.concatenate(parts))
    picks = select_lowest(combined, k, caps=caps, groups=groups, only_negative=only_negative,
                          clamp=clamp)
    out = []
    for chosen, n_split in zip(picks, split_sizes, strict=True):
        chosen = np.sort(np.asarray(chosen, dtype=np.int64))
        out.append(FireflySelection(chosen[chosen < n_split], chosen[chosen >= n_split] - n_split))
    return out


def _compose(first: ChannelMap, second: ChannelMap) -> tuple[int, ...]:
    """Sources of ``second`` applied after ``first``, in terms of the original channels."""
    return tuple(first.sources[s] if s >= 0 else -1 for s in second.sources)


def _split_columns(xp: Any, rows: Any, consumer: Any, shape: tuple[int, ...], row_axis: int,
                   split_map: ChannelMap) -> Any:
    """New incoming ``rows`` of a member that reads its own group, after the group's splits.

    Each row's weights on a split channel are halved between the channel and its copy, as
    the split does to the member's existing rows (:func:`~.widen.split_neurons`). ``shape``
    is the member's weight's and ``row_axis`` its output axis (0 in torch's layout, -1 in
    Flax's): the rows are put in that layout to grow the consumer's axis.
    """
    per_row = list(shape)
    per_row[row_axis] = int(rows.shape[0])
    grown = _grow_by_map(xp, from_rows(xp, rows, per_row, row_axis), consumer, split_map,
                         divide=True)
    return to_rows(xp, grown, row_axis)


def firefly_apply(
    params: Mapping[str, Any],
    flows: Sequence[ChannelFlow],
    candidates: Sequence[FireflyCandidates],
    selection: Sequence[FireflySelection],
) -> tuple[dict[str, Any], list[tuple[ChannelMap, ChannelMap]]]:
    """Grow every flow by its selected candidates; returns ``(new params, maps)``.

    ``flows`` must be listed producers first (forward order); they are grown last to
    first, like the reference, so a layer's new rows are grown before the earlier
    layer adds its columns to them. Per flow: splits (``theta +/- delta`` with the
    candidate's trained ``delta``, outgoing halved, ``eps = 1``) then new neurons
    (the candidates' incoming rows, outgoing columns and depthwise filters; bias 0,
    BatchNorm 1/0/0/1). ``maps[l]`` is the pair
    ``(split map, add map)`` to apply in that order (e.g. with
    ``map_optimizer_state``). Splits change the function by ``O(|delta|^2)``, new
    neurons by ``O(outgoing scale)``.
    """
    _check_params(params)
    flows = _check_flows(flows)
    for label, seq, kind in (("candidates", candidates, FireflyCandidates),
                             ("selection", selection, FireflySelection)):
        if not isinstance(seq, Sequence) or len(seq) != len(flows):
            raise ValueError(f"{label} must hold one {kind.__name__} per flow ({len(flows)})")
        for i, item in enumerate(seq):
            if not isinstance(item, kind):
                raise TypeError(
                    f"{label}[{i}] must be a {kind.__name__}, got {type(item).__name__}"
                )
    original = {f.producer: f.entries(params) for f in flows}
    original_shapes = {name: tuple(int(s) for s in a.shape) for name, a in params.items()
                       if hasattr(a, "shape")}
    grown_rows: dict[str, tuple[int, tuple[int, ...]]] = {}  # producer -> (axis, sources)
    chain = GrowthChain(params)  # residual groups: a producer's inputs may grow first
    maps_by_flow: dict[int, tuple[ChannelMap, ChannelMap]] = {}
    for index in reversed(range(len(flows))):
        flow, cand, sel = flows[index], candidates[index], selection[index]
        entries = original[flow.producer]
        split_parents = np.asarray(sel.split, dtype=np.int64)
        new_index = np.asarray(sel.new, dtype=np.int64)
        if split_parents.size and cand.split_directions is None:
            raise ValueError(f"selection[{index}] picks splits but candidates[{index}] has none")
        if new_index.size and (new_index.min() < 0 or new_index.max() >= cand.new_count):
            raise ValueError(f"selection[{index}].new must lie in [0, {cand.new_count}), "
                             f"got {new_index.tolist()}")
        if np.unique(new_index).size != new_index.size:
            raise ValueError(f"selection[{index}].new repeats a candidate: {new_index.tolist()}")

        def widen(out: dict[str, Any], flow: ChannelFlow, cand: FireflyCandidates = cand,
                  entries: Any = entries, split_parents: np.ndarray = split_parents,
                  new_index: np.ndarray = new_index, index: int = index) -> Any:
            if tuple(out[flow.producer].shape) != original_shapes[flow.producer]:
                raise ValueError(
                    f"producer {flow.producer!r} changed shape before its own growth: list "
                    "flows producers first (forward order); firefly_apply grows them last to first"
                )
            w = out[flow.producer]
            xp = namespace_of(w, f"params[{flow.producer!r}]")
            if split_parents.size:
                chosen = xp.asarray(split_parents, device=device_of(w))
                directions = [xp.take(d, chosen, axis=0) for d in cand.all_split or ()]
            else:
                directions = [xp.zeros((0, int(channel_rows(xp, out[e.name], e).shape[1])),
                                       dtype=w.dtype, device=device_of(w))
                              for e in entries if e.role == "producer"]
            out, split_map = split_neurons(out, flow, split_parents.tolist(), directions, eps=1.0)
            picked = xp.asarray(new_index, device=device_of(w))
            incoming = [xp.take(rows, picked, axis=0) for rows in cand.all_incoming]
            # A member that also reads the group (ChannelFlow docstring) has the split copies'
            # columns by now: its new rows and its outgoing columns follow the split.
            reading = {e.name: e for e in entries if e.role == "consumer"}
            reading = {n: e for n, e in reading.items() if n in flow.producers}
            producers = [e for e in entries if e.role == "producer"]
            row_axes = {e.name: e.axis for e in producers}
            if reading and split_parents.size:
                incoming = [_split_columns(xp, rows, reading[e.name], original_shapes[e.name],
                                           e.axis, split_map) if e.name in reading else rows
                            for e, rows in zip(producers, incoming, strict=True)]
            outgoing = []
            consumers = [e for e in entries if e.role == "consumer"]
            if len(cand.new_outgoing) != len(consumers):
                raise ValueError(f"candidates[{index}] has {len(cand.new_outgoing)} outgoing "
                                 f"blocks but flow {flow.producer!r} has {len(consumers)} "
                                 "consumers")
            for entry, cols in zip(consumers, cand.new_outgoing, strict=True):
                cols = xp.take(cols, picked, axis=0)
                # The consumer read the old channels and split copies through split_map; a
                # consumer that is itself a producer grown earlier in this loop has more rows.
                if entry.name in grown_rows and new_index.size:
                    row_axis, sources = grown_rows[entry.name]
                    cols = _regrow_rows(xp, cols, entry, original_shapes[entry.name], row_axis,
                                        sources)
                elif entry.name in reading and split_parents.size:
                    cols = _regrow_rows(xp, cols, entry, original_shapes[entry.name],
                                        row_axes[entry.name], split_map.sources)
                outgoing.append(cols)
            if len(cand.new_depthwise) != len(flow.depthwise):
                raise ValueError(
                    f"candidates[{index}] has {len(cand.new_depthwise)} depthwise blocks but "
                    f"flow {flow.producer!r} has {len(flow.depthwise)} depthwise convs"
                )
            depthwise = [xp.take(filters, picked, axis=0) for filters in cand.new_depthwise]
            out, add_map = add_neurons(out, flow, int(new_index.size), incoming=incoming,
                                       outgoing=outgoing, depthwise=depthwise)
            return out, (split_map, add_map)

        pair = chain.grow(flow, widen)
        assert not isinstance(pair, ChannelMap)  # widen returns the (split, add) pair
        split_map, add_map = pair
        maps_by_flow[index] = (split_map, add_map)
        for entry in entries:
            if entry.role == "producer":
                grown_rows[entry.name] = (entry.axis, _compose(split_map, add_map))
    out = chain.params
    return out, [maps_by_flow[index] for index in range(len(flows))]
