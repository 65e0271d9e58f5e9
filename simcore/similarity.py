"""Eq. 1-2 of Sakai & Hotta: the cosine-similarity map between neurons and its mean |cosine|.

A *neuron* is one slice of a weight array along ``neuron_axis`` (0 for PyTorch's
OIHW and ``(out, in)`` layouts, -1 for Flax/Keras HWIO), flattened to a row
``w_i`` of length ``d``. With ``u_i = w_i / ||w_i||`` and ``C = U U^T``::

    mu = 1 / (m (m - 1)) * sum_{i != j} |C_ij|

over the ``m`` *active* rows. Conventions every backend shares (autodiff
frameworks disagree on them, so the gradient here is analytic, never inherited):

* ``sign(0) = 0``: orthonormal rows give an exactly zero gradient.
* A row whose norm is at most ``zero_tol`` times the largest row norm has no
  direction (growth creates such rows): it is left out of the pairs and out of
  ``m`` and gets a zero gradient. Fewer than two active rows give a loss of 0.
* float16/bfloat16 inputs are computed in float32 and the results cast back.
* NaN or Inf anywhere in ``w`` gives a NaN loss and gradient; values are never
  inspected (that would cost a device sync and break ``jax.jit``).

The gradient (checked against finite differences in the tests) is, with
``r_i = ||w_i||``, ``S_ij = sign(C_ij)`` off the diagonal and between active
rows, ``N = m (m - 1)`` and ``G = (2 / N) S U``::

    dmu/dw_i = (G_i - (G_i . u_i) u_i) / r_i

one GEMM on top of the forward Gram matrix. ``block_size`` runs both in row
blocks of ``b`` rows against all rows, so no ``n x n`` matrix is ever formed
(memory ``O(b n)``).
"""

from __future__ import annotations

from typing import Any

from ._arrays import (
    check_block_size,
    check_weight,
    check_zero_tol,
    compute_dtype,
    device_of,
    from_rows,
    normalize_axis,
    to_rows,
)

__all__ = [
    "DEFAULT_ZERO_TOL",
    "similarity_loss",
    "similarity_loss_and_grad",
    "similarity_map",
]

#: Rows with ``||w_i|| <= DEFAULT_ZERO_TOL * max_k ||w_k||`` count as zero rows
#: (float32's machine epsilon, for every dtype, so all backends agree).
DEFAULT_ZERO_TOL = 1.1920928955078125e-07


class _Rows:
    """A weight array seen as unit rows, with what the loss and gradient need."""

    def __init__(self, w: Any, neuron_axis: Any, zero_tol: Any, name: str = "w"):
        xp = check_weight(w, name)
        self.xp = xp
        self.axis = normalize_axis(neuron_axis, w.ndim)
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        tol = check_zero_tol(zero_tol)
        tol = DEFAULT_ZERO_TOL if tol is None else tol

        rows = to_rows(xp, w, self.axis)
        work = compute_dtype(xp, w.dtype)
        if work != w.dtype:
            rows = xp.astype(rows, work)
        norms = xp.sqrt(xp.vecdot(rows, rows))
        active = norms > tol * xp.max(norms)
        self.active = xp.astype(active, work)
        self.safe_norms = xp.where(active, norms, xp.ones_like(norms))
        self.unit = rows * (self.active / self.safe_norms)[:, None]
        n_active = xp.sum(self.active)
        self.pair_count = n_active * (n_active - 1)
        self.n = int(rows.shape[0])

    def out(self, x: Any) -> Any:
        """Cast a result back to the caller's dtype."""
        return x if x.dtype == self.dtype else self.xp.astype(x, self.dtype)

    def grad_from(self, g: Any, scale: Any) -> Any:
        """``scale * g`` (``g = dmu/du`` up to ``scale``) projected onto each row's
        tangent space and divided by the row's norm: ``(g - (g . u) u) * scale / r``."""
        xp, u = self.xp, self.unit
        per_row = scale / self.safe_norms
        grad_rows = g * per_row[:, None] - u * (xp.vecdot(g, u) * per_row)[:, None]
        return self.out(from_rows(xp, grad_rows, self.shape, self.axis))

    def blocks(self, block_size: int | None):
        """Yield ``(start, stop, off_diagonal)`` for row blocks against all rows.

        ``off_diagonal`` is a boolean ``(stop - start, n)`` mask, False where the
        global row index equals the column index.
        """
        xp, n = self.xp, self.n
        device = device_of(self.unit)
        size = n if block_size is None else min(block_size, n)
        columns = xp.arange(n, device=device)
        for start in range(0, n, size):
            stop = min(start + size, n)
            rows = xp.arange(start, stop, device=device)
            yield start, stop, rows[:, None] != columns[None, :]


def _value_and_grad(w, neuron_axis, block_size, zero_tol, with_grad, gram=None):
    """The loss (and gradient); ``gram(u) -> u @ u.T`` lets an adapter supply its own
    kernel for the whole Gram matrix (CuPy's SYRK), used when there are no blocks."""
    block_size = check_block_size(block_size)
    rows = _Rows(w, neuron_axis, zero_tol)
    xp, u = rows.xp, rows.unit
    zero = xp.zeros((), dtype=u.dtype, device=device_of(u))
    total = zero
    grad_blocks = []
    for start, stop, off_diagonal in rows.blocks(block_size):
        whole = start == 0 and stop == rows.n
        cosines = gram(u) if gram is not None and whole else u[start:stop, :] @ u.T
        signs = xp.where(off_diagonal, xp.sign(cosines), zero)
        total = total + xp.sum(xp.vecdot(signs, cosines))
        if with_grad:
            grad_blocks.append(signs @ u)
    scale = 1.0 / xp.maximum(rows.pair_count, xp.ones_like(rows.pair_count))
    loss = rows.out(total * scale)
    if not with_grad:
        return loss, None
    g = grad_blocks[0] if len(grad_blocks) == 1 else xp.concat(grad_blocks, axis=0)
    return loss, rows.grad_from(g, 2.0 * scale)


def similarity_map(w: Any, *, neuron_axis: int = 0, zero_tol: float | None = None) -> Any:
    """Eq. 1: the ``n x n`` cosine-similarity map between the neurons of ``w``.

    Rows and columns of zero rows (see the module docstring) are 0, their
    diagonal entry included; the diagonal of every other row is exactly 1.

    >>> import numpy as np, simcore
    >>> simcore.similarity_map(np.array([[1.0, 0.0], [1.0, 1.0]])).round(4)
    array([[1.    , 0.7071],
           [0.7071, 1.    ]])
    """
    rows = _Rows(w, neuron_axis, zero_tol)
    xp, u = rows.xp, rows.unit
    cosines = u @ u.T
    eye = xp.eye(rows.n, dtype=u.dtype, device=device_of(u))
    return rows.out(cosines * (1.0 - eye) + eye * rows.active[None, :])


def similarity_loss(
    w: Any,
    *,
    neuron_axis: int = 0,
    block_size: int | None = None,
    zero_tol: float | None = None,
) -> Any:
    """Eq. 2: the mean absolute cosine similarity between distinct neurons, in ``[0, 1]``.

    Returns a 0-d array of ``w``'s namespace, dtype and device. The value is
    built from ordinary array operations, so autodiff frameworks can trace it;
    for the library's own gradient conventions use
    :func:`similarity_loss_and_grad` or an adapter.

    >>> import numpy as np, simcore
    >>> float(simcore.similarity_loss(np.eye(3)))
    0.0
    >>> round(float(simcore.similarity_loss(np.ones((4, 5)))), 12)
    1.0
    """
    return _value_and_grad(w, neuron_axis, block_size, zero_tol, with_grad=False)[0]


def similarity_loss_and_grad(
    w: Any,
    *,
    neuron_axis: int = 0,
    block_size: int | None = None,
    zero_tol: float | None = None,
) -> tuple[Any, Any]:
    """Eq. 2 and its analytic gradient ``(mu, dmu/dw)``, the gradient in ``w``'s layout.

    ``block_size=b`` never forms an ``n x n`` matrix: rows are processed ``b``
    at a time against all rows, in ``O(b n)`` extra memory.
    """
    return _value_and_grad(w, neuron_axis, block_size, zero_tol, with_grad=True)
