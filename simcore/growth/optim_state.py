"""Optimizer state after a widening: grow momentum and Adam moments like their parameters.

``state`` is a ``Mapping[parameter name -> Mapping[str, value]]``, e.g. a torch optimizer's
per-parameter state re-keyed by name (``{"conv1.weight": {"momentum_buffer": m}}``) or
``{"fc.weight": {"exp_avg": m, "exp_avg_sq": v, "step": 10}}``. Only the entries of the flow
are rewritten; the rest pass through by identity, and nothing is mutated. Parameter names do
not change with growth (the params dict keeps its keys); adapters that key state by parameter
object re-key it to the new object.

``mode="carry"`` (the default; see docs/design.md, 'Growth') maps every per-parameter array
along the grown axis of its parameter -- the producer's ``out_axis``, each consumer's
``in_axis`` (all ``spatial`` columns of a channel), bias, BatchNorm and depthwise
vectors/filters -- exactly as :class:`~simcore.growth.channel_map.ChannelMap` says: old
channels keep their state, a copy (replicate or split) takes its parent's state, a fresh channel
gets zeros.
Scalars (``step``) and 0-d arrays are kept.

What a copy's state is, and why (replicate and split alike): every moment is COPIED, unscaled,
from the parent -- also for consumer columns, whose *parameters* are divided among the copies.
Moments are statistics of the gradient, not of the parameter. Right after the growth the copy
computes the parent's activation (exactly for replicate, to O(eps) for split), so the gradient
of each consumer column of a copy equals the parent column's gradient before growth: the
parent's momentum, Adam ``m`` and ``v`` are the best available estimates for every copy,
whereas dividing them like the parameter would pretend the copy's gradients are smaller (and
would be wrong for ``v`` anyway, which scales quadratically). The producer rows of copies
receive a backprop signal divided by the replica count (their consumer columns are); carrying
the parent's moments there keeps the copies moving together like the parent did, so the first
steps after growth continue the parent's trajectory. Adam's update ``m / sqrt(v)`` is invariant
to a common rescaling of the gradient, so it is unaffected by either choice.

``mode="zero"`` (formerly ``"reset"``) returns the state of a freshly initialised optimizer
for the flow's parameters only: every per-parameter array becomes zeros of the grown shape,
and numeric scalars and 0-d arrays (``step``) become 0 (zero moments with step 0 is exactly a
new Adam/SGD-momentum state); every other parameter's state is kept. The torch adapter's
``optimizer_mode="fresh"``, which drops the whole optimizer's state as Firefly, SSD and GroMo
do after each growth, is the other behaviour, and has the other name. Other values (``None``,
strings, bools) are kept.

>>> import numpy as np
>>> from simcore.growth.flow import ChannelFlow, Consumer
>>> from simcore.growth.channel_map import ChannelMap
>>> flow = ChannelFlow("w1", consumers=(Consumer("w2"),))
>>> state = {"w1": {"momentum": np.array([[1.0], [2.0]]), "step": 3},
...          "w2": {"momentum": np.array([[5.0, 6.0]])}}
>>> new = map_optimizer_state(state, flow, ChannelMap((0, 1, 1), "replicate"))
>>> new["w1"]["momentum"].ravel().tolist(), new["w1"]["step"], new["w2"]["momentum"].tolist()
([1.0, 2.0, 2.0], 3, [[5.0, 6.0, 6.0]])
>>> fresh = map_optimizer_state(state, flow, ChannelMap((0, 1, -1), "add"))
>>> fresh["w2"]["momentum"].tolist()
[[5.0, 6.0, 0.0]]
>>> zeroed = map_optimizer_state(state, flow, ChannelMap((0, 1, -1), "add"), mode="zero")
>>> zeroed["w1"]["momentum"].ravel().tolist(), zeroed["w1"]["step"]
([0.0, 0.0, 0.0], 0)
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import array_api_compat
import numpy as np

from .._arrays import check_choice, device_of, normalize_axis
from .._deprecation import renamed_choice
from .channel_map import ChannelMap
from .channel_rows import channel_rows, write_channel_rows
from .flow import ChannelFlow, FlowEntry

__all__ = ["MODES", "map_optimizer_state"]

#: ``"carry"`` the state along, or ``"zero"`` the flow's state (see the module docstring).
MODES = ("carry", "zero")
#: Deprecated spellings of :data:`MODES` (one release): ``"reset"`` is now ``"zero"``.
RENAMED_MODES = {"reset": "zero"}


def _grow_state(value: Any, entry: FlowEntry, cmap: ChannelMap, mode: str, label: str) -> Any:
    xp = array_api_compat.array_namespace(value)
    axis = normalize_axis(entry.axis, value.ndim, f"grown axis of {label}")
    expected = cmap.old_channels * entry.spatial
    size = int(value.shape[axis])
    if size != expected if entry.offset is None else size < expected + entry.offset * entry.spatial:
        at = "" if entry.offset is None else f" from offset {entry.offset}"
        raise ValueError(
            f"{label} has size {size} along axis {axis}, expected "
            f"{expected} ({cmap.old_channels} channels x spatial {entry.spatial}{at})"
        )
    entry = FlowEntry(entry.name, entry.role, axis, entry.spatial, entry.channels_last,
                      entry.offset, cmap.old_channels)
    rows = channel_rows(xp, value, entry)
    if mode == "zero":
        grown = xp.zeros(
            (cmap.new_channels, int(rows.shape[1])), dtype=value.dtype, device=device_of(value)
        )
    else:
        sources = np.asarray(cmap.sources, dtype=np.int64)
        index = xp.asarray(np.maximum(sources, 0), device=device_of(value))
        grown = xp.take(rows, index, axis=0)
        if cmap.fresh:
            keep = xp.asarray((sources >= 0)[:, None], device=device_of(value))
            # A 0-d zero broadcasts: no second array of the grown size.
            grown = xp.where(keep, grown, xp.zeros((), dtype=grown.dtype, device=device_of(value)))
    return write_channel_rows(xp, value, entry, grown)


def _scalar(value: Any, mode: str, label: str) -> Any:
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        return value
    if array_api_compat.is_array_api_obj(value) and not isinstance(value, numbers.Number):
        # 0-d array (a step counter); non-scalars were handled by the caller
        return (
            array_api_compat.array_namespace(value).zeros_like(value) if mode == "zero" else value
        )
    if isinstance(value, numbers.Number):
        # every concrete Number (int, float, Fraction, NumPy scalars) is built from 0; the
        # abstract base declares no constructor
        return type(value)(0) if mode == "zero" else value  # type: ignore[call-arg]
    raise TypeError(f"{label} must be an array, a number or None, got {type(value).__name__}")


def map_optimizer_state(
    state: Mapping[str, Mapping[str, Any]],
    flow: ChannelFlow,
    channel_map: ChannelMap,
    *,
    mode: str = "carry",
) -> dict[str, Any]:
    """Grow the optimizer state of the flow's parameters as ``channel_map`` grew the parameters.

    See the module docstring for what ``"carry"`` and ``"zero"`` do (``"reset"`` is the
    deprecated spelling of ``"zero"``). Raises ``ValueError``
    naming ``state[name][key]`` when an array does not have the old channel count along its
    parameter's grown axis.
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a Mapping of parameter name -> Mapping, got {type(state).__name__}"
        )
    if not isinstance(flow, ChannelFlow):
        raise TypeError(f"flow must be a ChannelFlow, got {type(flow).__name__}")
    if not isinstance(channel_map, ChannelMap):
        raise TypeError(f"channel_map must be a ChannelMap, got {type(channel_map).__name__}")
    mode = check_choice(renamed_choice(mode, RENAMED_MODES, "mode"), MODES, "mode")

    out = dict(state)
    for declared in flow._named():
        name = declared.name
        if name not in state:
            continue
        per_param = out[name]  # a producer that also reads its group: rows, then columns
        if not isinstance(per_param, Mapping):
            raise TypeError(
                f"state[{name!r}] must be a Mapping of str -> value, got {type(per_param).__name__}"
            )
        entry = declared
        new = {}
        for key, value in per_param.items():
            label = f"state[{name!r}][{key!r}]"
            if array_api_compat.is_array_api_obj(value) and getattr(value, "ndim", 0) >= 1:
                new[key] = _grow_state(value, entry, channel_map, mode, label)
            else:
                new[key] = _scalar(value, mode, label)
        out[name] = new
    return out
