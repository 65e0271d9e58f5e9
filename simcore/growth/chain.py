"""Grow several flows one after another on one params dict, whatever their order.

A growth plan widens flows last to first, so that a producer's rows (and any split direction or
new incoming row sized on its fan-in) grow before the flows upstream add input columns to
them. Residual groups break that order: a block's second conv is a member of the stream's group
and reads the block's first conv, whose own input is the stream: each must grow before the
other. :class:`GrowthChain` lifts the requirement. When a flow is widened after input columns
were already added to one of its producers, the producer's ORIGINAL array is handed to the
widening (so every row argument matches its fan-in), and the column growths logged meanwhile
are replayed on the grown rows: copies take their parent's column (divided by the parent's
multiplicity, as the consumer side of a split or replicate does), and fresh columns take, for
each row, the value the earlier growth gave the row's parent (zero for a fresh row: links
between two new neurons start at zero, as in :mod:`simcore.growth.firefly`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .._arrays import device_of, namespace_of
from .channel_map import ChannelMap
from .channel_rows import channel_rows, from_channel_rows, write_channel_rows
from .flow import ChannelFlow, FlowEntry

__all__ = ["GrowthChain"]

Maps = ChannelMap | Sequence[ChannelMap]


def _as_maps(maps: Maps) -> tuple[ChannelMap, ...]:
    return (maps,) if isinstance(maps, ChannelMap) else tuple(maps)


def _regrow_rows(xp: Any, block: Any, entry: FlowEntry, like_shape: tuple[int, ...],
                 row_axis: int, sources: Sequence[int]) -> Any:
    """Channel rows ``block`` of ``entry`` in an array whose ``row_axis`` grew by ``sources``."""
    entry = replace(entry, offset=None)  # ``block`` holds only the channels it regrows
    full = from_channel_rows(xp, block, like_shape, entry)
    index = np.asarray([max(s, 0) for s in sources], dtype=np.int64)
    keep = np.asarray([1.0 if s >= 0 else 0.0 for s in sources])
    shape = [1] * full.ndim
    shape[row_axis] = len(sources)
    full = xp.take(full, xp.asarray(index, device=device_of(full)), axis=row_axis)
    full = full * xp.asarray(np.reshape(keep, shape), dtype=full.dtype, device=device_of(full))
    return channel_rows(xp, full, entry)


def _replay(xp: Any, grown: Any, entry: FlowEntry, maps: tuple[ChannelMap, ...], after: Any,
            row_axis: int, row_sources: Sequence[int]) -> Any:
    """The column growth ``maps`` of ``entry`` (result ``after``) redone on rows grown later."""
    for cmap in maps:
        step = replace(entry, channels=cmap.old_channels)
        rows = channel_rows(xp, grown, step)
        sources = np.asarray(cmap.sources, dtype=np.int64)
        parents = np.maximum(sources, 0)
        counts = cmap.multiplicity()[parents].astype(np.float64)
        taken = xp.take(rows, xp.asarray(parents, device=device_of(rows)), axis=0)
        taken = taken / xp.asarray(counts[:, None], dtype=rows.dtype, device=device_of(rows))
        if cmap.fresh:
            fresh = np.asarray(cmap.fresh, dtype=np.int64)
            done = replace(entry, channels=cmap.new_channels)
            values = xp.take(channel_rows(xp, after, done),
                             xp.asarray(fresh, device=device_of(rows)), axis=0)
            values = _regrow_rows(xp, values, done, tuple(after.shape), row_axis, row_sources)
            mask = np.zeros((len(sources), 1), dtype=bool)
            mask[fresh] = True
            slot = np.zeros(len(sources), dtype=np.int64)
            slot[fresh] = np.arange(fresh.size)
            spread = xp.take(values, xp.asarray(slot, device=device_of(rows)), axis=0)
            taken = xp.where(xp.asarray(mask, device=device_of(rows)), spread, taken)
        grown = write_channel_rows(xp, grown, step, taken)
    return grown


def shifted_offset(offset: int, grown: Sequence[tuple[int, int]]) -> int:
    """Where a concatenation block at ``offset`` starts once the blocks ``grown`` have grown.

    ``grown`` holds ``(offset, added)`` of the other inputs of the concatenation grown so far,
    offsets in the original layout (blocks do not overlap): those before ``offset`` push it.
    """
    return offset + sum(added for other, added in grown if other < offset)


def _shift(items: tuple[Any, ...], grown: Mapping[str, list[tuple[int, int]]],
           name: Callable[[Any], str | None]) -> tuple[Any, ...]:
    return tuple(
        replace(item, offset=shifted_offset(item.offset, grown.get(name(item) or "", [])))
        if item.offset is not None else item for item in items)


class GrowthChain:
    """Flows widened one by one on one dict (:meth:`grow`); :attr:`params` holds the result.

    Concatenation offsets are taken in the original layout and shifted by the growth of the
    inputs before them grown earlier in the chain (:func:`shifted_offset`).
    """

    def __init__(self, params: Mapping[str, Any]):
        self.original = dict(params)
        self.params = dict(params)
        # consumer name -> [(entry, maps, array after that growth)], in order
        self._columns: dict[str, list[tuple[FlowEntry, tuple[ChannelMap, ...], Any]]] = {}
        self._blocks: dict[str, list[tuple[int, int]]] = {}  # name -> [(offset, added)]

    def grow(self, flow: ChannelFlow,
             widen: Callable[[dict[str, Any], ChannelFlow], tuple[dict[str, Any], Maps]]
             ) -> Maps:
        """Widen ``flow`` with ``widen(params, flow) -> (new params, map or maps)``.

        ``widen`` gets the flow with its concatenation offsets shifted to the current layout.
        Returns the maps.
        """
        static = flow
        flow = replace(
            flow,
            consumers=_shift(flow.consumers, self._blocks, lambda c: c.weight),
            downstream_norms=_shift(flow.downstream_norms, self._blocks,
                                    lambda n: n.scale or n.mean or n.shift or n.var),
        )
        work = dict(self.params)
        replay = [name for name in flow.producers if self._columns.get(name)]
        for name in replay:
            work[name] = self.original[name]
        new, maps = widen(work, flow)
        chain = _as_maps(maps)
        if chain:
            added = len(chain[-1].sources) - chain[0].old_channels
            for entry in static._named():
                if entry.offset is not None:
                    self._blocks.setdefault(entry.name, []).append((entry.offset, added))
        entries = flow.entries(new) if chain else ()
        if chain:
            row_sources = chain[0].sources
            for later in chain[1:]:
                row_sources = tuple(row_sources[s] if s >= 0 else -1 for s in later.sources)
            for entry in entries:
                if entry.role == "producer" and entry.name in replay:
                    xp = namespace_of(new[entry.name], entry.name)
                    grown = new[entry.name]
                    for column, column_maps, after in self._columns.pop(entry.name):
                        grown = _replay(xp, grown, column, column_maps, after, entry.axis,
                                        row_sources)
                    new[entry.name] = grown
            for entry in entries:
                if entry.role == "consumer":
                    declared = replace(entry, channels=chain[0].old_channels)
                    self._columns.setdefault(entry.name, []).append(
                        (declared, chain, new[entry.name]))
        self.params = new
        return maps
