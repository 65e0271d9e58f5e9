"""Oracle for the global growth selection used by SSD and Firefly: a plain sort.

Every candidate of every layer is a tuple ``(score, layer, index)``; Python's ``sorted`` orders
them by score, then layer, then index (ties go to the earlier layer and the lower index), and
the first ``k`` are kept (only those with ``score < 0`` when ``only_negative``). Firefly ranks a
layer's split candidates (indices ``0 .. n-1``) and new-neuron candidates (``n .. n+K-1``)
together. Also here: the reference code's own rule ``score <= sorted[k]``, kept only to show
that it picks more than ``k`` neurons.
"""

from __future__ import annotations

import numpy as np

__all__ = ["select_lowest", "firefly_select", "threshold_rule_of_reference_code"]


def select_lowest(scores, k: int, *, only_negative: bool = False) -> list[np.ndarray]:
    """Per layer, the sorted indices among the ``k`` lowest scores over all layers."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pool = []
    for layer, values in enumerate(scores):
        for index, score in enumerate(np.asarray(values, dtype=np.float64).ravel()):
            if only_negative and not score < 0:
                continue
            pool.append((float(score), layer, index))
    chosen = sorted(pool)[:k]
    return [np.asarray(sorted(i for _, owner, i in chosen if owner == layer), dtype=np.int64)
            for layer in range(len(scores))]


def firefly_select(split_scores, new_scores, k: int, *, only_negative: bool = False):
    """Per layer ``(split parents, new-candidate indices)`` among the ``k`` lowest scores."""
    combined, sizes = [], []
    for s, a in zip(split_scores, new_scores, strict=True):
        s = np.zeros(0) if s is None else np.asarray(s, dtype=np.float64)
        combined.append(np.concatenate([s, np.asarray(a, dtype=np.float64)]))
        sizes.append(s.size)
    picks = select_lowest(combined, k, only_negative=only_negative)
    return [(p[p < n], p[p >= n] - n) for p, n in zip(picks, sizes, strict=True)]


def threshold_rule_of_reference_code(scores, k: int) -> list[np.ndarray]:
    """The authors' rule: threshold ``sorted(all)[k]``, keep every score ``<=`` it (k+1 or more)."""
    flat = np.sort(np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores]))
    threshold = flat[k]
    return [np.nonzero(np.asarray(s, dtype=np.float64) <= threshold)[0] for s in scores]
