"""The paper's Fig. 6 statistic: how the cosines between a layer's neurons are spread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat

from ._arrays import check_int, compute_dtype, device_of
from .similarity import similarity_map

__all__ = ["SimilarityStats", "similarity_stats"]


@dataclass(frozen=True)
class SimilarityStats:
    """Distribution of the cosines ``C_ij``, ``i < j``, between a layer's non-zero neurons.

    Every field is an array of the input's namespace and device.
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
    cosines = similarity_map(w, neuron_axis=neuron_axis, zero_tol=zero_tol)
    xp = array_api_compat.array_namespace(cosines)
    device = device_of(cosines)
    work = compute_dtype(xp, cosines.dtype)
    integers = xp.__array_namespace_info__().default_dtypes(device=device)["integral"]
    cosines = xp.clip(xp.astype(cosines, work), -1.0, 1.0)
    n = cosines.shape[0]
    # similarity_map puts 1 on the diagonal of non-zero rows and 0 on that of zero rows.
    active = xp.sum(cosines * xp.eye(n, dtype=work, device=device), axis=1)
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
