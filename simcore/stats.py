"""The paper's Fig. 6 statistic: how the cosines between a layer's neurons are spread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._arrays import check_int, device_of
from .similarity import _cosines

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
    w: Any, *, neuron_axis: int = 0, bins: int = 20, zero_tol: float | None = None
) -> SimilarityStats:
    """Histogram and summary of the off-diagonal cosines of ``w`` (Fig. 6 of the paper).

    >>> import numpy as np, simcore
    >>> stats = simcore.similarity_stats(np.eye(4), bins=4)
    >>> stats.counts.tolist(), float(stats.share_within_half)  # all six cosines are 0
    ([0, 0, 6, 0], 1.0)
    """
    bins = check_int(bins, "bins", minimum=1)
    # The cosines in the compute dtype: half inputs are binned from float32 values.
    rows, cosines = _cosines(w, neuron_axis, zero_tol)
    xp, active, work = rows.xp, rows.active, cosines.dtype
    device = device_of(cosines)
    integers = xp.__array_namespace_info__().default_dtypes(device=device)["integral"]
    cosines = xp.clip(cosines, -1.0, 1.0)
    n = rows.n
    index = xp.arange(n, device=device)
    upper = xp.astype(index[:, None] < index[None, :], work)
    pair_mask = upper * active[:, None] * active[None, :]
    pairs = xp.sum(pair_mask)
    edges = xp.linspace(-1.0, 1.0, bins + 1, dtype=work, device=device)
    below = [xp.sum(pair_mask * xp.astype(cosines < edges[k], work)) for k in range(1, bins)]
    cumulative = xp.stack([xp.zeros_like(pairs), *below, pairs])
    counts = xp.astype(cumulative[1:] - cumulative[:-1], integers)
    magnitudes = xp.abs(cosines) * pair_mask
    denominator = xp.maximum(pairs, xp.ones_like(pairs))
    within = xp.sum(pair_mask * xp.astype(xp.abs(cosines) <= 0.5, work))
    return SimilarityStats(
        counts=counts,
        edges=edges,
        share_within_half=within / denominator,
        mean_abs=xp.sum(magnitudes) / denominator,
        max_abs=xp.max(magnitudes),
        pairs=xp.astype(pairs, integers),
    )
