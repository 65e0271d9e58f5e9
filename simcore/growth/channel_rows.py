"""One row per channel: the view of a flow's entries that all growth maths works on.

A :class:`~simcore.growth.flow.FlowEntry` says where one layer's channels sit in an array (the
axis, a concatenation's block, the spatial positions of a flattened consumer, channels-first or
channels-last). :func:`channel_rows` turns the array into an ``(n, r)`` matrix with one row per
channel, and :func:`write_channel_rows` puts a grown matrix back in the array's own layout. The
widening operators (:mod:`simcore.growth.widen`), the optimizer state
(:mod:`simcore.growth.optim_state`), the chain of growths of one concatenation
(:mod:`simcore.growth.chain`) and Firefly's scales read and write arrays only through this view;
it is layout, not growth, so it lives on its own.
"""

from __future__ import annotations

from typing import Any

from .._arrays import from_rows, to_rows
from .flow import FlowEntry

__all__ = ["channel_rows", "from_channel_rows", "write_channel_rows"]

def channel_rows(xp: Any, a: Any, entry: FlowEntry) -> Any:
    """View an entry as an ``(n, r)`` matrix with one row per channel of the producer.

    Consumers with ``spatial > 1`` put all columns of one channel into its row (``spatial``
    blocks of the remaining axes, in flatten order).
    """
    rows = to_rows(xp, a, entry.axis)  # (n * spatial, rest)
    s = entry.spatial
    if entry.offset is not None:  # the flow's block of a concatenation
        rows = rows[entry.offset * s:(entry.offset + entry.channels) * s, ...]
    if s == 1:
        return rows
    n, rest = rows.shape[0] // s, rows.shape[1]
    if entry.channels_last:
        rows = xp.permute_dims(xp.reshape(rows, (s, n, rest)), (1, 0, 2))
    return xp.reshape(rows, (n, s * rest))


def from_channel_rows(xp: Any, rows: Any, old_shape: tuple[int, ...], entry: FlowEntry) -> Any:
    """Inverse of :func:`channel_rows` for a grown row count ``m = rows.shape[0]``.

    Only the flow's own channels: an entry with an ``offset`` (a concatenation) is put back
    together with its other channels by :func:`write_channel_rows`.
    """
    m, s = int(rows.shape[0]), entry.spatial
    shape = list(old_shape)
    shape[entry.axis] = m * s
    if s > 1:
        rest = int(rows.shape[1]) // s
        rows = xp.reshape(rows, (m, s, rest))
        if entry.channels_last:
            rows = xp.permute_dims(rows, (1, 0, 2))
        rows = xp.reshape(rows, (m * s, rest))
    return from_rows(xp, rows, shape, entry.axis)


def write_channel_rows(xp: Any, a: Any, entry: FlowEntry, rows: Any) -> Any:
    """``a`` with the flow's channel rows replaced by ``rows`` (any count): a new array.

    The inverse of :func:`channel_rows` on the whole entry: with an ``offset`` the channels of
    the concatenation's other inputs are kept before and after the new block.
    """
    grown = from_channel_rows(xp, rows, tuple(a.shape), entry)
    if entry.offset is None:
        return grown
    s, axis = entry.spatial, entry.axis
    full = to_rows(xp, a, axis)
    start, stop = entry.offset * s, (entry.offset + entry.channels) * s
    spliced = xp.concat([full[:start, ...], to_rows(xp, grown, axis), full[stop:, ...]], axis=0)
    shape = list(a.shape)
    shape[axis] = int(spliced.shape[0])
    return from_rows(xp, spliced, shape, axis)
