"""The similarity loss from the Gram matrix of the raw weights, for functional backends.

simcore/_gram.py computes Eq. 2 and its gradient from ``G = W W^T`` of the raw rows for
libraries with mutable arrays, deciding on the host whether ``G`` is exact. Under ``jax.jit``
nothing can be read on the host, so :class:`RawRows` gives that decision as an array
(:attr:`RawRows.safe`) for the caller to branch on (``jax.lax.cond``), and the maths per tile
as functions of arrays. Same formulas (``r_i = sqrt(G_ii)``, ``a_i = sum_{j != i} |C_ij|``)::

    g_i = (2 / m) (P_i / r_i - a_i w_i / r_i^2),      P_i = sum_{j != i} sign(G_ij) w_j / r_j

so no pass over the ``n x d`` weights is needed besides the two products and one at the end;
the pre-scaled path (:class:`simcore.similarity.UnitRows`) makes four or five.
"""

from __future__ import annotations

from typing import Any

from ._arrays import from_rows
from .similarity import _cast, _checked_rows

__all__ = ["RawRows"]


class RawRows:
    """``w`` seen as its raw ``(n, d)`` rows, with the factors of the raw-Gram loss.

    ``rows`` (the compute dtype), ``inv_norms`` (``1 / r_i`` on active rows, 0 on the
    others), ``safe`` (a 0-d boolean array: the raw Gram matrix gives the loss to the
    pre-scaled path's precision) and ``n``. Active rows and ``zero_tol`` mean what they mean
    for :class:`~simcore.similarity.UnitRows`. ``safe`` is false when a squared norm could
    overflow (the largest over a quarter of the dtype's range, or not finite), or when a row
    whose activity depends on it has ``G_ii`` so small that underflowed products could move
    its cosines (``G_ii < d * tiny / eps`` while the zero-row threshold is below that bound:
    weights near the subnormal range, or ``zero_tol=0`` with a zero row). Public in
    :mod:`simcore.extend`.
    """

    def __init__(self, w: Any, neuron_axis: Any, zero_tol: Any, name: str = "w"):
        xp, self.axis, tol, rows = _checked_rows(w, neuron_axis, zero_tol, name)
        self.xp, self.rows = xp, rows
        self.shape, self.dtype = tuple(w.shape), w.dtype
        self.n = int(rows.shape[0])
        info = xp.finfo(rows.dtype)
        squares = xp.sum(rows * rows, axis=1)
        largest = xp.max(squares)
        reliable = max(int(rows.shape[1]), 1) * float(info.smallest_normal) / float(info.eps)
        threshold = (tol * tol) * largest
        active = squares > threshold
        self.safe = (largest <= float(info.max) / 4) & (
            (threshold >= reliable) | ~xp.any(squares < reliable))
        one = xp.ones_like(squares)
        self.inv_norms = xp.where(active, one / xp.sqrt(xp.where(active, squares, one)),
                                  xp.zeros_like(squares))
        count = xp.sum(xp.astype(active, rows.dtype))
        self.pair_count = count * (count - 1)

    def mean_scale(self) -> Any:
        """``1 / (m (m - 1))``, and 1 when fewer than two rows are active (the loss is 0)."""
        return 1.0 / self.xp.maximum(self.pair_count, self.xp.ones_like(self.pair_count))

    def pair_terms(self, gram: Any, inv_a: Any, inv_b: Any, off_diagonal: Any = None
                   ) -> tuple[Any, Any]:
        """``(|C_ab|, S_ab)`` from a tile ``G_ab`` of the raw Gram matrix.

        ``S = sign(C)``, 0 on pairs with an inactive row and, where ``off_diagonal`` (1 off
        the diagonal, 0 on it) is given, on the diagonal: a neuron is not paired with itself.
        """
        cosines = gram * inv_a[:, None] * inv_b[None, :]
        signs = self.xp.sign(cosines)
        if off_diagonal is not None:
            signs = signs * off_diagonal
        return signs * cosines, signs

    def out(self, x: Any) -> Any:
        """Cast a result back to the caller's dtype."""
        return _cast(self.xp, x, self.dtype)

    def grad_from(self, products: Any, sums: Any, scale: Any) -> Any:
        """``dmu/dw`` in ``w``'s layout from ``P`` (``products``, the sum over pairs of
        ``S_ij w_j / r_j``) and ``a`` (``sums``); ``scale`` is ``2 / (m (m - 1))``."""
        inv = self.inv_norms
        g = (products * inv[:, None] - self.rows * (sums * inv * inv)[:, None]) * scale
        return self.out(from_rows(self.xp, g, self.shape, self.axis))
