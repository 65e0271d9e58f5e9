"""Scales of Firefly's candidates: drawn relative to the layer, written so the function is kept.

The reference code draws every candidate with absolute per-weight scales (``delta ~ U(-0.1,
0.1)``, new incoming ``N(0, 0.1^2)``, new outgoing ``U(-0.01, 0.01)``) and writes the trained
candidates into the network as they are. That was tuned at a width of 16 (fan-in 144); at fan-in
4608 a ``U(-0.1, 0.1)`` split direction has norm 3.9 against 0.58 for a default-initialised row,
and a new neuron's outgoing weights are as large as an existing neuron's, so one growth changes
the network's predictions. Two separate fixes, one per step:

* **Drawing** (:func:`relative_amplitudes`, used by
  :func:`~simcore.growth.firefly_candidates` with ``scales="relative"``): a split direction's
  expected norm is ``split_scale`` times its parent row's norm, a new incoming row's is
  ``incoming_std`` times the layer's RMS row norm, a new outgoing column's is
  ``outgoing_scale`` times the RMS norm of the consumers' existing columns. The scores are
  computed from these candidates exactly as before (gate gradients at ``g = 1``).
* **Writing** (:func:`function_keeping_candidates`): a chosen split is written with
  ``|delta_i| <= split_eps * |theta_i|`` (same direction), so the function moves by
  ``O(split_eps^2)`` like SSD's ``theta +/- eps v``; a chosen new neuron's outgoing columns are
  shrunk until its contribution, estimated as (output scale) x (outgoing norm), is at most
  ``new_eps`` times the RMS contribution of the layer's existing neurons, so the function moves
  by ``O(new_eps)`` per new neuron. A neuron's output scale is its row norm times the gain of the
  BatchNorm after it (``|gamma| / sqrt(var + 1e-5)``, 1 for a fresh channel) and, through
  depthwise convs, the depthwise filter's norm times that conv's BatchNorm gain: a data-free
  estimate of how large its activation is per unit of input. Shrinking keeps each candidate's
  direction, so the sign of its score (descent or not) is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._arrays import device_of, namespace_of
from ._host import to_numpy
from .channel_rows import channel_rows
from .flow import BatchNorm, ChannelFlow

__all__ = ["SCALES", "function_keeping_candidates", "relative_amplitudes"]

#: How candidates are drawn: ``"relative"`` to the layer's own weights (default) or with the
#: reference code's ``"absolute"`` per-weight scales.
SCALES = ("relative", "absolute")

#: BatchNorm's default ``eps`` (torch, Flax): the gain of a channel is ``|gamma| / sqrt(var+eps)``.
_BN_EPS = 1e-5


def _row_norms(xp: Any, rows: Any) -> np.ndarray:
    """Euclidean norm of each row, on the host in float64."""
    norms = xp.linalg.vector_norm(rows, axis=1)
    return np.asarray(to_numpy(norms, "row norms"), dtype=np.float64)


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(values**2))) if values.size else 0.0


def _vector(params: Mapping[str, Any], name: str | None, n: int, default: float) -> np.ndarray:
    if name is None:
        return np.full(n, default)
    return np.asarray(to_numpy(params[name], name), dtype=np.float64).reshape(-1)


def _norm_gain(params: Mapping[str, Any], norm: BatchNorm | None, n: int) -> np.ndarray:
    """``|gamma| / sqrt(var + eps)`` per channel (1 without a BatchNorm)."""
    if norm is None:
        return np.ones(n)
    gamma = np.abs(_vector(params, norm.scale, n, 1.0))
    var = np.maximum(_vector(params, norm.var, n, 1.0), 0.0)
    return gamma / np.sqrt(var + _BN_EPS)


def _entries_by_name(params: Mapping[str, Any], flow: ChannelFlow) -> dict[str, Any]:
    return {e.name: e for e in flow.entries(params)}


def relative_amplitudes(params: Mapping[str, Any], flow: ChannelFlow) -> dict[str, Any]:
    """Norms a relative draw scales by: ``{"rows": (n,), "row_rms": float, "column_rms": tuple}``.

    ``rows``: each producer row's norm (a zero row gets the layer's RMS, an all-zero layer 1);
    ``column_rms``: per consumer, the RMS norm of its existing channel columns (1 if all zero).
    """
    entries = _entries_by_name(params, flow)
    w = params[flow.producer]
    xp = namespace_of(w, f"params[{flow.producer!r}]")
    rows = _row_norms(xp, channel_rows(xp, w, entries[flow.producer]))
    row_rms = _rms(rows) or 1.0
    rows = np.where(rows > 0, rows, row_rms)
    columns = []
    for c in flow.consumers:
        a = params[c.weight]
        columns.append(_rms(_row_norms(xp, channel_rows(xp, a, entries[c.weight]))) or 1.0)
    return {"rows": rows, "row_rms": row_rms, "column_rms": tuple(columns)}


def _output_scales(params: Mapping[str, Any], flow: ChannelFlow, rows: np.ndarray,
                   fresh_filters: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Output scale per channel: row norm, times BatchNorm gains and depthwise filter norms.

    Without ``fresh_filters``: the flow's existing channels, with their own BatchNorms and
    depthwise filters. With them: fresh channels (every BatchNorm gain 1) whose depthwise
    filters have these norms, one array per depthwise conv of the flow.
    """
    n = rows.size
    if fresh_filters is not None:
        return rows * np.prod(np.asarray(fresh_filters).reshape(-1, n), axis=0)
    scale = rows * _norm_gain(params, flow.norm, n)
    entries = _entries_by_name(params, flow)
    for d in flow.depthwise:
        w = params[d.weight]
        xp = namespace_of(w, d.weight)
        filters = _row_norms(xp, channel_rows(xp, w, entries[d.weight]))
        scale = scale * filters * _norm_gain(params, d.norm, n)
    return scale


def _outgoing_norms(xp: Any, blocks: Sequence[Any]) -> np.ndarray:
    """Norm of each channel's outgoing weights over every consumer (rows of ``blocks``)."""
    squares = sum(_row_norms(xp, b) ** 2 for b in blocks)
    return np.sqrt(np.asarray(squares, dtype=np.float64))


def _scaled_rows(xp: Any, rows: Any, factors: np.ndarray) -> Any:
    if np.all(factors == 1.0):
        return rows
    f = xp.asarray(factors[:, None], dtype=rows.dtype, device=device_of(rows))
    return rows * f


def function_keeping_candidates(
    params: Mapping[str, Any],
    flows: Sequence[ChannelFlow],
    candidates: Sequence[Any],
    *,
    split_eps: float | None,
    new_eps: float | None,
) -> list[Any]:
    """The candidates shrunk for writing so the growth keeps the function (module docstring).

    Split directions to ``|delta_i| <= split_eps * |theta_i|``; new neurons' outgoing columns
    to a contribution of at most ``new_eps`` times the layer's RMS one. ``None`` leaves that
    kind as trained (the reference's behaviour). Directions are kept; the incoming rows and
    depthwise filters of new neurons are not changed.
    """
    out = []
    for flow, cand in zip(flows, candidates, strict=True):
        entries = _entries_by_name(params, flow)
        w = params[flow.producer]
        xp = namespace_of(w, f"params[{flow.producer!r}]")
        theta = _row_norms(xp, channel_rows(xp, w, entries[flow.producer]))
        split = cand.split_directions
        if split_eps is not None and split is not None:
            delta = _row_norms(xp, split)
            with np.errstate(divide="ignore", invalid="ignore"):
                factors = np.where(delta > split_eps * theta, split_eps * theta / delta, 1.0)
            split = _scaled_rows(xp, split, factors)
        outgoing = cand.new_outgoing
        if new_eps is not None and cand.new_count and outgoing:
            existing_columns = [channel_rows(xp, params[c.weight], entries[c.weight])
                                for c in flow.consumers]
            existing = _output_scales(params, flow, theta, None) * _outgoing_norms(
                xp, existing_columns)
            filters = [_row_norms(xp, f) for f in cand.new_depthwise]
            fresh = _output_scales(params, flow, _row_norms(xp, cand.new_incoming), filters)
            contribution = fresh * _outgoing_norms(xp, outgoing)
            limit = new_eps * _rms(existing)
            with np.errstate(divide="ignore", invalid="ignore"):
                factors = np.where(contribution > limit, limit / contribution, 1.0)
            outgoing = tuple(_scaled_rows(xp, block, factors) for block in outgoing)
        out.append(dataclasses.replace(cand, split_directions=split, new_outgoing=outgoing))
    return out
