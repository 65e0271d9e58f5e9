"""Oracle for the paper's Fig. 6 statistic: the distribution of a layer's pairwise cosines.

Pairs are the unordered pairs i < j of active neurons (same active rule as Eq. 2).  The histogram
has ``bins`` equal-width bins on [-1, 1] with edges ``np.linspace(-1, 1, bins + 1)``; each bin is
half-open [lo, hi) except the last, which is closed [lo, 1].  Cosines are clipped into [-1, 1]
before binning (only the binning; the other statistics use the raw cosines).  Bin membership is
decided by explicit comparison with the edges, written from that definition.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from ._rows import active_rows, to_rows


def _pair_cosines(w, neuron_axis, zero_tol):
    rows, _ = to_rows(w, neuron_axis)
    r, active = active_rows(rows, zero_tol)
    unit = {i: rows[i] / r[i] for i in active}
    cosines = []
    for a, i in enumerate(active):
        for j in active[a + 1:]:
            cosines.append(float(np.dot(unit[i], unit[j])))
    return cosines


def _bin_index(c: float, edges: np.ndarray) -> int:
    bins = len(edges) - 1
    for k in range(bins):
        lo = edges[k]
        hi = edges[k + 1]
        if k < bins - 1:
            if lo <= c < hi:
                return k
        elif lo <= c <= hi:
            return k
    raise AssertionError(f"cosine {c!r} fell outside [-1, 1] after clipping")


def similarity_stats(w, *, neuron_axis=0, bins=20, zero_tol=None) -> dict:
    """Fig. 6 statistics of one layer.

    Returns a dict with
      "counts"            int64 array (bins,), histogram of C_ij over pairs i < j, both active
      "edges"             float64 array (bins + 1,) = np.linspace(-1, 1, bins + 1)
      "share_within_half" fraction of pairs with -0.5 <= C_ij <= 0.5 (0.0 when no pairs)
      "mean_abs"          mean |C_ij| over the pairs (= similarity_loss; 0.0 when no pairs)
      "max_abs"           max |C_ij| over the pairs (0.0 when no pairs)
      "pairs"             number of pairs, int
    """
    if isinstance(bins, (bool, np.bool_)):
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    try:
        bins = operator.index(bins)
    except TypeError:
        raise ValueError(f"bins must be a positive int, got {bins!r}") from None
    if bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")

    cosines = _pair_cosines(w, neuron_axis, zero_tol)
    edges = np.linspace(-1.0, 1.0, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    for c in cosines:
        clipped = min(max(c, -1.0), 1.0)
        counts[_bin_index(clipped, edges)] += 1

    pairs = len(cosines)
    if pairs == 0:
        share = 0.0
        mean_abs = 0.0
        max_abs = 0.0
    else:
        share = sum(1 for c in cosines if -0.5 <= c <= 0.5) / pairs
        mean_abs = math.fsum(abs(c) for c in cosines) / pairs
        max_abs = max(abs(c) for c in cosines)
    return {
        "counts": counts,
        "edges": edges,
        "share_within_half": float(share),
        "mean_abs": float(mean_abs),
        "max_abs": float(max_abs),
        "pairs": int(pairs),
    }
