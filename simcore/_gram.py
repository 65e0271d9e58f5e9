"""The similarity loss's value and gradient from the Gram matrix of the raw weights.

The unit rows are never formed. With ``G = W W^T``, ``r_i = sqrt(G_ii)``,
``C_ij = G_ij / (r_i r_j)``, ``m = k (k - 1)`` over the ``k`` active rows and
``a_i = sum_{j != i} |C_ij|`` (pairs of active rows only)::

    mu = sum_i a_i / m,        dmu/dW = M W,
    M_ij = (2 / m) sign(G_ij) / (r_i r_j)   (i != j),     M_ii = -(2 / m) a_i / r_i^2

(the tangent projection ``(g_i - (g_i . u_i) u_i) / r_i`` of simcore/similarity.py,
written out: docs/design.md, 'The similarity loss'). So the forward is half a GEMM
(SYRK) on ``W`` itself and the backward one GEMM ``M W``; everything in between works on
``n x n`` strips and ``n``-vectors, with no pass over the ``n x d`` weights.

The raw Gram matrix is exact only where the squared norms are representable with full
relative precision: :func:`raw_gram_value_and_grad` reads ``G_ii`` on the host (cheap for
NumPy and CPU tensors) and returns ``None`` when a row's square overflows, or underflows
near the subnormal range while its row may count, so that the caller takes the
pre-scaled path instead (simcore/similarity.py).
"""

from __future__ import annotations

from typing import Any

from ._tiles import InPlaceKernel

__all__ = ["raw_gram_value_and_grad"]


def raw_gram_value_and_grad(kernel: InPlaceKernel, w: Any, zero_tol: float,
                            height: int) -> tuple[Any, Any] | None:
    """``(mu, dmu/dW)`` of the ``(n, d)`` rows ``w``, or ``None`` where the raw Gram is unsafe.

    Strips of ``height`` rows of the upper triangle, run last to first as in
    :func:`simcore._tiles.strip_products`: strip ``a`` is ``G[a, a:]``, turned into
    ``M[a, a:]`` (a second buffer) after its ``|G|`` has been summed into ``a``;
    ``g_a = M[a, a:] W[a:]`` and ``g[below] += M[a, below]^T W_a``. ``a_i`` is complete
    only after every strip, so with several strips the diagonal term ``-(2/m) a_i w_i /
    r_i^2`` is one pass over ``g`` at the end; with one strip it sits on ``M``'s diagonal.
    Vectors use only the operators and methods NumPy and torch share (``x.max()``,
    ``x ** -0.5``): the array-API wrappers cost more than these ``n``-vectors.
    """
    n, d = int(w.shape[0]), int(w.shape[1])
    height = max(1, min(height, n))
    single = height == n
    strip = kernel.scratch("strip", (height * n,), w)
    signs = kernel.scratch("signs", (height * n,), w)
    if single:
        gram = kernel.reshape(strip[: n * n], (n, n))
        with kernel.overflow_allowed():  # checked right after, from the diagonal
            kernel.gram_strip(w, w, gram)
        squares = kernel.diagonal(gram)
    else:
        squares = kernel.row_dots(w, w)
    factors = _row_factors(kernel, w, squares, zero_tol, d)
    if factors is None:
        return None
    inv_norms, pair_scale, mean_scale = factors
    row_factors = inv_norms * pair_scale  # (2 / m) / r_i
    sums = kernel.empty((n,), w)  # r_i a_i, summed strip by strip
    sums[...] = 0
    g = kernel.empty((n, d), w)
    for start in reversed(range(0, n, height)):
        stop = min(start + height, n)
        rows, width = stop - start, n - start
        w_a = w[start:stop]
        gram = kernel.reshape(strip[: rows * width], (rows, width))
        m_strip = kernel.reshape(signs[: rows * width], (rows, width))
        if not single:
            kernel.gram_strip(w_a, w[start:], gram)
        # A neuron is not paired with itself.
        kernel.zero_diagonal_(gram[:, :rows])
        kernel.sign_into(gram, m_strip)
        kernel.abs_(gram)
        sums[start:stop] += kernel.matvec(gram, inv_norms[start:])
        if width > rows:
            sums[stop:] += kernel.vecmat(inv_norms[start:stop], gram[:, rows:])
        kernel.scale_rows(m_strip, row_factors[start:stop])
        kernel.scale_columns_(m_strip, inv_norms[start:])
        if single:
            kernel.set_diagonal_(m_strip, -(row_factors * inv_norms) * (inv_norms * sums))
        kernel.matmul(m_strip, w[start:], g[start:stop])
        if width > rows:
            kernel.add_matmul(g[stop:], m_strip[:, rows:].T, w_a)
    absolute_sums = inv_norms * sums  # a_i
    if not single:
        kernel.subtract_scaled_rows(g, w, (row_factors * inv_norms) * absolute_sums)
    return absolute_sums.sum() * mean_scale, g


def _row_factors(kernel, w, squares, zero_tol, d):
    """``(1/r_i on active rows and 0 elsewhere, 2/m, 1/m)``, or ``None`` where ``G`` is unsafe.

    A row is active when ``r_i > zero_tol * max_k r_k``, i.e. ``G_ii > zero_tol^2 max G``.
    ``G`` is trusted when its largest diagonal entry is at most a quarter of the dtype's
    largest number (no entry, sum or product of ``G`` overflows; Inf and NaN fail the test
    too) and every row whose activity depends on it has ``G_ii >= d * tiny / eps``: the
    products that underflow (at most ``d`` per entry, each off by at most ``tiny``) then cost
    each cosine at most ``eps`` relative. Rows below that bound are allowed only where they
    are inactive either way: under a threshold itself above the bound, or exactly zero.
    """
    info = kernel.xp.finfo(w.dtype)
    largest = float(squares.max())
    if not largest <= float(info.max) / 4:
        return None
    reliable = max(d, 1) * float(info.smallest_normal) / float(info.eps)
    threshold = zero_tol * zero_tol * largest
    active = squares > threshold
    if threshold < reliable:
        doubtful = squares < reliable
        if bool(doubtful.any()) and not kernel.rows_are_zero(w, doubtful):
            return None
    # Inactive rows see 1 (not 0) under the power, then get 0.
    inv_norms = (squares + ~active) ** -0.5 * active
    count = int(active.sum())
    pairs = count * (count - 1)
    return inv_norms, (2.0 / pairs if pairs else 0.0), 1.0 / max(pairs, 1)
