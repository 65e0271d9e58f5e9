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

import numpy as np

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
    The ``n``-vectors live on the host as NumPy views of the kernel's memory (the path runs
    only where that is free): a NumPy operation on them costs a fraction of a torch one,
    and this path's fixed cost counts at small ``n``.
    """
    n = int(w.shape[0])
    height = max(1, min(height, n))
    size = height * n
    buffers = kernel.scratch("gram", (2 * size,), w)
    if height == n:
        result = _one_strip(kernel, w, zero_tol, kernel.reshape(buffers[:size], (n, n)),
                            kernel.reshape(buffers[size:], (n, n)))
    else:
        result = _strips(kernel, w, zero_tol, height, buffers[:size], buffers[size:])
    if result is None:
        return None
    absolute_sums, mean_scale, g = result  # a_i, 1/m, dmu/dW
    loss = np.asarray(absolute_sums.sum() * mean_scale, dtype=absolute_sums.dtype)
    return kernel.from_host(loss, w), g


def _one_strip(kernel, w, zero_tol, gram, weights):
    """The whole ``G`` at once (``n <= height``): its diagonal gives the norms, and ``a`` is
    complete before the one product, so the diagonal term sits on ``M``'s diagonal."""
    with kernel.overflow_allowed():  # checked right after, from the diagonal
        kernel.gram_strip(w, w, gram)
    factors = _row_factors(kernel, w, kernel.host(kernel.diagonal(gram)), zero_tol)
    if factors is None:
        return None
    inv_norms, row_factors, mean_scale = factors
    sums = _pair_weights(kernel, gram, weights, kernel.from_host(inv_norms, w),
                         kernel.from_host(row_factors, w))
    absolute_sums = inv_norms * kernel.host(sums)
    kernel.set_diagonal_(weights, kernel.from_host(-(row_factors * inv_norms) * absolute_sums,
                                                   w))
    g = kernel.empty(tuple(w.shape), w)
    kernel.matmul(weights, w, g)
    return absolute_sums, mean_scale, g


def _strips(kernel, w, zero_tol, height, strip, signs):
    """Strips of ``height`` rows, last to first; the diagonal term is one pass at the end."""
    n, d = int(w.shape[0]), int(w.shape[1])
    factors = _row_factors(kernel, w, kernel.host(kernel.row_dots(w, w)), zero_tol)
    if factors is None:
        return None
    inv_norms, row_factors, mean_scale = factors
    inv_on_kernel = kernel.from_host(inv_norms, w)
    row_factors_on_kernel = kernel.from_host(row_factors, w)
    sums = np.zeros_like(inv_norms)  # r_i a_i, summed strip by strip
    g = kernel.empty((n, d), w)
    for start in reversed(range(0, n, height)):
        stop = min(start + height, n)
        rows, width = stop - start, n - start
        w_a = w[start:stop]
        gram = kernel.reshape(strip[: rows * width], (rows, width))
        weights = kernel.reshape(signs[: rows * width], (rows, width))
        kernel.gram_strip(w_a, w[start:], gram)
        inv_columns = inv_on_kernel[start:]
        sums[start:stop] += kernel.host(_pair_weights(
            kernel, gram, weights, inv_columns, row_factors_on_kernel[start:stop]))
        if width > rows:  # the strip's pairs with the rows below it, by symmetry
            sums[stop:] += kernel.host(kernel.vecmat(inv_columns[:rows], gram[:, rows:]))
        kernel.matmul(weights, w[start:], g[start:stop])
        if width > rows:
            kernel.add_matmul(g[stop:], weights[:, rows:].T, w_a)
    absolute_sums = inv_norms * sums
    kernel.subtract_scaled_rows(g, w, kernel.from_host(
        (row_factors * inv_norms) * absolute_sums, w))
    return absolute_sums, mean_scale, g


def _pair_weights(kernel, gram, weights, inv_columns, row_factors):
    """``weights = M`` off the diagonal from the strip ``gram = G`` (left holding ``|G|``,
    0 on the diagonal: a neuron is not paired with itself); returns ``sum_j |G_ij| / r_j``
    over the strip's columns, one per row."""
    kernel.zero_diagonal_(gram[:, : int(gram.shape[0])])
    kernel.sign_into(gram, weights)
    kernel.abs_(gram)
    sums = kernel.matvec(gram, inv_columns)
    kernel.scale_rows(weights, row_factors)
    kernel.scale_columns_(weights, inv_columns)
    return sums


def _row_factors(kernel, w, squares, zero_tol):
    """``(1/r_i and (2/m)/r_i on active rows, 0 elsewhere; 1/m)``, or ``None`` where ``G`` is
    unsafe.

    ``squares`` holds the ``G_ii`` (NumPy). A row is active when ``r_i > zero_tol * max_k
    r_k``, i.e. ``G_ii > zero_tol^2 max G``. ``G`` is trusted when its largest diagonal entry
    is at most a quarter of the dtype's largest number (no entry, sum or product of ``G``
    overflows; Inf and NaN fail the test too) and every row whose activity depends on it has
    ``G_ii >= d * tiny / eps``: the products that underflow (at most ``d`` per entry, each
    off by at most ``tiny``) then cost each cosine at most ``eps`` relative. Rows below that
    bound are allowed only where they are inactive either way: under a threshold itself
    above the bound, or exactly zero.
    """
    info = np.finfo(squares.dtype)
    largest = float(squares.max())
    if not largest <= float(info.max) / 4:
        return None
    reliable = max(int(w.shape[1]), 1) * float(info.smallest_normal) / float(info.eps)
    threshold = zero_tol * zero_tol * largest
    active = squares > threshold
    if threshold < reliable:
        doubtful = squares < reliable
        if doubtful.any() and not kernel.rows_are_zero(w, doubtful):
            return None
    # Inactive rows see 1 (not 0) under the power, then get 0.
    inv_norms = squares + ~active
    inv_norms **= -0.5
    inv_norms *= active
    count = int(np.count_nonzero(active))
    pairs = count * (count - 1)
    return inv_norms, inv_norms * (2.0 / pairs if pairs else 0.0), 1.0 / max(pairs, 1)
