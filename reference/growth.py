"""Oracle for the widening operators: add, replicate (Net2Net) and split (SSD/Firefly).

Written independently of ``simcore.growth`` (it imports nothing from the core): NumPy float64,
one channel at a time, building every grown array element by element from per-channel blocks.

The flow argument is read by attribute only (duck typing), so any object with the fields of
``simcore.growth.ChannelFlow`` works: ``producer``, ``out_axis``, ``bias``, ``norm`` (with
``scale``, ``shift``, ``mean``, ``var``), ``depthwise`` (each with ``weight``, ``channel_axis``,
``bias``, ``norm``) and ``consumers`` (each with ``weight``, ``in_axis``, ``spatial`` and
optionally ``channels_last``).

A *channel block* is everything one channel owns in one entry: for a producer, a depthwise
filter or a per-channel vector, the slice at index ``c`` of the channel axis; for a consumer
with ``spatial`` columns per channel, the stack (``spatial`` first) of the slices at its columns
``c*spatial + s`` (NCHW flatten) or ``s*C + c`` (NHWC flatten, ``channels_last``).

Rules (see docs/design.md, 'Growth'): copies duplicate every block except consumer blocks, which are
divided by the number of channels carrying the parent (replicate) or halved (split); a split
parent's incoming block becomes ``theta + eps*delta`` and its copy's ``theta - eps*delta``;
fresh channels get the given producer/depthwise/consumer blocks, bias 0 and BatchNorm
``scale 1, shift 0, mean 0, var 1``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "add_neurons",
    "assemble_channels",
    "channel_block",
    "flow_entries",
    "replicate_neurons",
    "split_neurons",
]

_FRESH = {"bias": 0.0, "shift": 0.0, "mean": 0.0, "scale": 1.0, "var": 1.0}


def flow_entries(flow: Any) -> list[tuple[str, str, int, int, bool]]:
    """``(name, role, axis, spatial, channels_last)`` for every entry the flow names."""
    entries = [(flow.producer, "producer", flow.out_axis, 1, False)]

    def per_channel(bias: Any, norm: Any) -> None:
        if bias is not None:
            entries.append((bias, "bias", 0, 1, False))
        if norm is not None:
            for role in ("scale", "shift", "mean", "var"):
                if getattr(norm, role) is not None:
                    entries.append((getattr(norm, role), role, 0, 1, False))

    per_channel(flow.bias, flow.norm)
    for dw in flow.depthwise:
        entries.append((dw.weight, "depthwise", dw.channel_axis, 1, False))
        per_channel(dw.bias, dw.norm)
    for consumer in flow.consumers:
        channels_last = bool(getattr(consumer, "channels_last", False))
        entries.append(
            (consumer.weight, "consumer", consumer.in_axis, consumer.spatial, channels_last)
        )
    return entries


def _column(c: int, s: int, channels: int, spatial: int, channels_last: bool) -> int:
    return s * channels + c if channels_last else c * spatial + s


def channel_block(
    a: Any, axis: int, c: int, spatial: int = 1, channels_last: bool = False
) -> np.ndarray:
    """The block of channel ``c`` of ``a`` (see the module docstring)."""
    a = np.asarray(a, dtype=np.float64)
    axis = axis % a.ndim
    channels = a.shape[axis] // spatial
    if spatial == 1:
        return np.take(a, c, axis=axis)
    return np.stack(
        [
            np.take(a, _column(c, s, channels, spatial, channels_last), axis=axis)
            for s in range(spatial)
        ]
    )


def assemble_channels(
    blocks: list[np.ndarray],
    like_shape: tuple[int, ...],
    axis: int,
    spatial: int = 1,
    channels_last: bool = False,
) -> np.ndarray:
    """Build an array of ``like_shape`` but ``len(blocks) * spatial`` long on ``axis``."""
    axis = axis % len(like_shape)
    channels = len(blocks)
    shape = list(like_shape)
    shape[axis] = channels * spatial
    out = np.zeros(shape, dtype=np.float64)
    for c, block in enumerate(blocks):
        for s in range(spatial):
            index: list[slice | int] = [slice(None)] * len(shape)
            index[axis] = _column(c, s, channels, spatial, channels_last)
            out[tuple(index)] = block if spatial == 1 else block[s]
    return out


def _channels(params: Any, flow: Any) -> int:
    w = np.asarray(params[flow.producer])
    return w.shape[flow.out_axis % w.ndim]


def _grow(params: Any, flow: Any, sources: list[int], new_block: Any) -> dict[str, np.ndarray]:
    """Rebuild every entry of the flow from ``new_block(name, role, block_of, j, source)``."""
    out = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    for name, role, axis, spatial, channels_last in flow_entries(flow):
        a = out[name]

        def block_of(
            c: int,
            a: np.ndarray = a,
            axis: int = axis,
            spatial: int = spatial,
            channels_last: bool = channels_last,
        ) -> np.ndarray:
            return channel_block(a, axis, c, spatial, channels_last)

        blocks = [new_block(name, role, block_of, j, src) for j, src in enumerate(sources)]
        out[name] = assemble_channels(blocks, a.shape, axis, spatial, channels_last)
    return out


def replicate_neurons(params: Any, flow: Any, parents: list[int]) -> dict[str, np.ndarray]:
    """Net2Net: channel ``n + i`` copies ``parents[i]``; consumer blocks / replica count."""
    n = _channels(params, flow)
    sources = list(range(n)) + [int(p) for p in parents]
    carriers = {c: sources.count(c) for c in range(n)}

    def new_block(name: str, role: str, block_of: Any, j: int, src: int) -> np.ndarray:
        block = block_of(src)
        return block / carriers[src] if role == "consumer" else block

    return _grow(params, flow, sources, new_block)


def split_neurons(
    params: Any, flow: Any, parents: list[int], directions: Any, eps: float
) -> dict[str, np.ndarray]:
    """Parent ``p_i`` -> ``theta + eps*delta_i``, copy ``theta - eps*delta_i``; consumer halved."""
    n = _channels(params, flow)
    parents = [int(p) for p in parents]
    sources = list(range(n)) + parents
    directions = np.asarray(directions, dtype=np.float64)
    sign_and_direction = {}
    for i, p in enumerate(parents):
        sign_and_direction[p] = (1.0, i)
        sign_and_direction[n + i] = (-1.0, i)

    def new_block(name: str, role: str, block_of: Any, j: int, src: int) -> np.ndarray:
        block = block_of(src)
        if role == "consumer":
            return block / 2.0 if src in parents else block
        if role == "producer" and j in sign_and_direction:
            sign, i = sign_and_direction[j]
            return block + sign * eps * directions[i].reshape(block.shape)
        return block

    return _grow(params, flow, sources, new_block)


def add_neurons(
    params: Any, flow: Any, fresh_blocks: dict[str, list[np.ndarray]]
) -> dict[str, np.ndarray]:
    """Append ``k`` fresh channels whose producer, depthwise and consumer blocks are given.

    ``fresh_blocks[name]`` lists the ``k`` blocks (see :func:`channel_block`) of the fresh
    channels for the producer, every depthwise filter and every consumer; biases and BatchNorm
    vectors of fresh channels are set here (0, and 1/0/0/1).
    """
    n = _channels(params, flow)
    counts = {len(v) for v in fresh_blocks.values()}
    if len(counts) != 1:
        raise ValueError("every entry of fresh_blocks must list the same number of channels")
    k = counts.pop()
    sources = list(range(n)) + [-1] * k

    def new_block(name: str, role: str, block_of: Any, j: int, src: int) -> np.ndarray:
        if src >= 0:
            return block_of(src)
        if role in _FRESH:
            return np.float64(_FRESH[role])
        return np.asarray(fresh_blocks[name][j - n], dtype=np.float64)

    return _grow(params, flow, sources, new_block)
