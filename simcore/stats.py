"""The paper's Fig. 6 statistic: how the cosines between a layer's neurons are spread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._arrays import check_block_size, check_int, device_of
from .similarity import UnitRows

__all__ = ["SimilarityStats", "similarity_stats"]


@dataclass(frozen=True)
class SimilarityStats:
    """Distribution of the cosines ``C_ij``, ``i < j``, between a layer's non-zero neurons.

    Every field is an array of the input's namespace and device; for float16 and
    bfloat16 inputs the float fields are float32, computed from float32 cosines.
    ``counts[k]`` counts cosines in ``[edges[k], edges[k+1])`` (the last bin is
    closed at 1); ``share_within_half`` is the share of pairs with
    ``|C_ij| <= 0.5``, the paper's reading of Fig. 6; ``mean_abs`` equals
    :func:`simcore.similarity_loss`. With fewer than two non-zero neurons there
    are no pairs and every statistic is 0.
    """

    counts: Any
    edges: Any
    share_within_half: Any
    mean_abs: Any
    max_abs: Any
    pairs: Any


def similarity_stats(
    w: Any,
    *,
    neuron_axis: int = 0,
    bins: int = 20,
    zero_tol: float | None = None,
    block_size: int | None = None,
) -> SimilarityStats:
    """Histogram and summary of the off-diagonal cosines of ``w`` (Fig. 6 of the paper).

    The cosines are formed in square tiles of ``block_size`` rows (default
    :data:`simcore.similarity.DEFAULT_TILE`), upper triangle only, like
    :func:`simcore.similarity_loss`: no ``n x n`` array, ``O(block_size^2)`` extra memory
    beyond the unit rows. Counts are summed in integers, so they stay exact past float32's
    ``2**24``; the float statistics of different tilings agree to a few ulp.

    >>> import numpy as np, simcore
    >>> stats = simcore.similarity_stats(np.eye(4), bins=4)
    >>> stats.counts.tolist(), float(stats.share_within_half)  # all six cosines are 0
    ([0, 0, 6, 0], 1.0)
    """
    bins = check_int(bins, "bins", minimum=1)
    block_size = check_block_size(block_size)
    # The unit rows in the compute dtype: half inputs are binned from float32 cosines.
    rows = UnitRows(w, neuron_axis, zero_tol)
    xp, u, active = rows.xp, rows.unit, rows.active
    work = u.dtype
    device = device_of(u)
    integers = xp.__array_namespace_info__().default_dtypes(device=device)["integral"]
    is_active = active > 0
    edges = xp.linspace(-1.0, 1.0, bins + 1, dtype=work, device=device)
    inner_edges = [edges[k] for k in range(1, bins)]

    def count(mask):
        return xp.sum(xp.astype(mask, integers))

    zero_count = xp.zeros((), dtype=integers, device=device)
    pairs, within = zero_count, zero_count
    below = [zero_count] * len(inner_edges)  # pairs with a cosine below each inner edge
    sum_abs = xp.zeros((), dtype=work, device=device)
    max_abs = sum_abs
    for a, (start, stop) in enumerate(rows.tiles(block_size)):
        for b_start, b_stop in rows.tiles(block_size)[a:]:
            cosines = xp.clip(u[start:stop, :] @ u[b_start:b_stop, :].T, -1.0, 1.0)
            pair_mask = is_active[start:stop, None] & is_active[None, b_start:b_stop]
            if b_start == start:  # a diagonal tile: each pair once, no neuron with itself
                index = xp.arange(stop - start, device=device)
                pair_mask = pair_mask & (index[:, None] < index[None, :])
            magnitudes = xp.abs(cosines) * xp.astype(pair_mask, work)
            pairs = pairs + count(pair_mask)
            within = within + count(pair_mask & (magnitudes <= 0.5))
            below = [c + count(pair_mask & (cosines < edge))
                     for c, edge in zip(below, inner_edges, strict=True)]
            sum_abs = sum_abs + xp.sum(magnitudes)
            max_abs = xp.maximum(max_abs, xp.max(magnitudes))
    cumulative = xp.stack([zero_count, *below, pairs])
    counts = cumulative[1:] - cumulative[:-1]
    denominator = xp.astype(xp.maximum(pairs, xp.ones_like(pairs)), work)
    return SimilarityStats(
        counts=counts,
        edges=edges,
        share_within_half=xp.astype(within, work) / denominator,
        mean_abs=sum_abs / denominator,
        max_abs=max_abs,
        pairs=pairs,
    )
