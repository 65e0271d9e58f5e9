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
* Any finite ``w`` gives the right result: norms are taken of rows divided by their
  largest magnitude, so none overflows or underflows (a row's norm itself is never
  formed). A row that is huge next to the others keeps its direction and makes them
  relatively zero; ``zero_tol=0`` counts every non-zero row (docs/design.md,
  'The similarity loss (Eq. 1-2)').
* Autodiff *through* these functions (``similarity_loss(w).backward()``, ``jax.grad``)
  gives zero and inactive rows a zero gradient too: every square root and division
  sees 1 there, never 0.

The gradient (checked against finite differences in the tests) is, with
``r_i = ||w_i||``, ``S_ij = sign(C_ij)`` off the diagonal and between active
rows, ``N = m (m - 1)`` and ``G = (2 / N) S U``::

    dmu/dw_i = (G_i - (G_i . u_i) u_i) / r_i

one GEMM on top of the forward Gram matrix, of which only the upper triangle
is formed: half a GEMM, a blocked SYRK. Two paths compute it:

* NumPy arrays, and torch tensors that autograd does not track, run in place
  (simcore/_tiles.py): strips of ``b`` rows of the upper triangle, products written
  into work buffers reused between calls, and the loss read off the gradient's
  row sums (``G_i . u_i = sum_{j != i} |C_ij|``). ``b = block_size``, or chosen
  from ``n`` and ``d`` (the strip stays under 16 MiB); extra memory is the unit
  rows and one ``b x n`` strip beyond the ``n x d`` gradient.
* every other array (JAX, CuPy, array-api-strict, the value-only functions)
  runs functionally, in ``b x b`` tiles of the upper triangle (``b = block_size``,
  default :data:`DEFAULT_TILE`), ``O(b^2)`` extra memory.

Different tilings and paths sum in different orders: results agree to a few ulp,
not bit for bit.
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
from ._gram import raw_gram_value_and_grad
from ._numpy_kernel import NumpyKernel  # noqa: F401 - registers NumPy's in-place kernel
from ._tiles import RowOps, in_place_kernel, strip_products
from ._types import Array, GramFunction

__all__ = [
    "DEFAULT_TILE",
    "UnitRows",
    "DEFAULT_ZERO_TOL",
    "similarity_loss",
    "similarity_loss_and_grad",
    "similarity_map",
]

#: Tile size when no ``block_size`` is given: the Gram matrix is built in tiles
#: of at most this many rows (one tile below it), so even the default path holds
#: no ``n x n`` matrix for large ``n``.
DEFAULT_TILE = 1024

#: Rows with ``||w_i|| <= DEFAULT_ZERO_TOL * max_k ||w_k||`` count as zero rows
#: (float32's machine epsilon, for every dtype, so all backends agree).
DEFAULT_ZERO_TOL = 1.1920928955078125e-07


class UnitRows:
    """A weight array seen as the unit rows of Eq. 1, with what the loss and gradient need.

    ``UnitRows(w, neuron_axis, zero_tol)`` validates ``w`` and holds ``unit`` (``(n, d)``
    unit rows in the compute dtype, zero rows 0), ``active`` (1 or 0 per row) and
    ``pair_count`` (``m (m - 1)``); :meth:`mean_scale` is Eq. 2's ``1 / (m (m - 1))``,
    :meth:`grad_from` turns ``dmu/du`` into ``dmu/dw`` in ``w``'s layout and :meth:`out`
    casts a result to ``w``'s dtype. Adapters that build the Gram products their own way
    (the JAX adapter's ``lax.scan``) start from here (public in :mod:`simcore.extend`).
    """

    def __init__(self, w: Any, neuron_axis: Any, zero_tol: Any, name: str = "w",
                 in_place: bool = False):
        xp, self.axis, tol, rows = _checked_rows(w, neuron_axis, zero_tol, name)
        self.xp = xp
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        kernel = in_place_kernel(xp, rows) if in_place else None
        #: The in-place kernel the gradient runs on (``None``: the functional path).
        self.kernel = kernel
        self.ops = kernel if kernel is not None else RowOps(xp)
        self.unit, self.active, self.row_scale, self.scaled_norms = _unit_rows(
            self.ops, rows, tol)
        n_active = xp.sum(self.active)
        self.pair_count = n_active * (n_active - 1)
        self.n = int(rows.shape[0])

    def mean_scale(self) -> Any:
        """``1 / (m (m - 1))``, and 1 when fewer than two rows are active (the loss is 0)."""
        count = self.pair_count
        return 1.0 / self.xp.maximum(count, self.xp.ones_like(count))

    def out(self, x: Any) -> Any:
        """Cast a result back to the caller's dtype."""
        return _cast(self.xp, x, self.dtype)

    def grad_from(self, g: Any, scale: Any, dots: Any = None) -> Any:
        """``scale * g`` (``g = dmu/du`` up to ``scale``) projected onto each row's
        tangent space and divided by the row's norm: ``(g - (g . u) u) * scale / r``.

        ``r_i`` is never formed: it is ``row_scale_i * scaled_norm_i``, and dividing by
        the two factors one after the other keeps the gradient finite wherever it is
        representable (``r_i`` itself may overflow or underflow; see :func:`_unit_rows`).
        ``dots`` is ``(g_i . u_i)`` where the caller has it already.
        """
        ops, u = self.ops, self.unit
        dots = ops.row_dots(g, u) if dots is None else dots
        tangent = ops.subtract_scaled_rows(g, u, dots)
        per_row = (scale / self.scaled_norms) / self.row_scale
        return self.out(from_rows(self.xp, ops.scale_rows(tangent, per_row), self.shape,
                                  self.axis))

    def tiles(self, block_size: int | None) -> list[tuple[int, int]]:
        """Row ranges ``(start, stop)`` of the square tiles the Gram matrix is built from."""
        size = min(DEFAULT_TILE if block_size is None else block_size, self.n)
        return [(start, min(start + size, self.n)) for start in range(0, self.n, size)]


def _checked_rows(w, neuron_axis, zero_tol, name="w"):
    """``(xp, axis, tol, rows)``: ``w`` validated and seen as ``(n, d)`` rows in the compute
    dtype, the neuron axis made non-negative and ``zero_tol`` defaulted."""
    xp = check_weight(w, name)
    axis = normalize_axis(neuron_axis, w.ndim)
    tol = check_zero_tol(zero_tol)
    rows = to_rows(xp, w, axis)
    work = compute_dtype(xp, w.dtype)
    if work != w.dtype:
        rows = xp.astype(rows, work)
    return xp, axis, DEFAULT_ZERO_TOL if tol is None else tol, rows


def _unit_rows(ops, rows, zero_tol):
    """``(unit, active, row_scale, scaled_norms)`` of ``(n, d)`` rows, for any finite rows.

    Each row is divided by its largest magnitude before its squares are summed, so no
    norm overflows or underflows: ``r_i = row_scale_i * scaled_norm_i`` with
    ``scaled_norm_i`` in ``[1, sqrt(d)]``, and the unit rows come from the scaled rows.
    A row is active when ``r_i > zero_tol * max_k r_k`` (see the module docstring);
    the ratios are compared after dividing by the layer's largest magnitude, so neither
    side is ever formed at its own (possibly unrepresentable) size.

    Autodiff-safe: every square root and division sees 1, not 0, on zero and inactive
    rows (``where(active, x, 1)`` *before* the operation), so traced gradients are 0
    there, never 0/0; and nothing here reads values on the host.
    """
    xp = ops.xp
    row_scale = ops.max_abs_rows(rows)
    nonzero = row_scale > 0
    one = xp.ones_like(row_scale)
    row_scale = xp.where(nonzero, row_scale, one)
    scaled = ops.divide_rows(rows, row_scale)
    squares = ops.row_dots(scaled, scaled)  # in [1, d] for non-zero rows, 0 for zero rows
    scaled_norms = xp.sqrt(xp.where(nonzero, squares, one))
    # r_i / max_k |w_kl|; the largest is >= 1 whenever any row is non-zero.
    layer_scale = xp.max(row_scale * xp.astype(nonzero, row_scale.dtype))
    layer_scale = xp.where(layer_scale > 0, layer_scale, xp.ones_like(layer_scale))
    relative_norms = (row_scale / layer_scale) * scaled_norms * xp.astype(nonzero, rows.dtype)
    active = xp.astype(relative_norms > zero_tol * xp.max(relative_norms), rows.dtype)
    scaled_norms = xp.where(active > 0, scaled_norms, one)
    return ops.scale_rows(scaled, active / scaled_norms), active, row_scale, scaled_norms


def _value_and_grad(w, neuron_axis, block_size, zero_tol, with_grad, gram=None):
    """The loss (and gradient), tile by tile over the upper triangle of ``C = U U^T``.

    Only tiles ``C_ab`` with ``a <= b`` are formed (``C_ba = C_ab^T``), so the
    forward costs half a GEMM on every backend (a blocked SYRK) and the backward
    one GEMM (``G_a += S_ab U_b``, ``G_b += S_ab^T U_a``); extra memory is
    ``O(tile^2)`` beyond the ``n x d`` gradient. ``gram(u_a) -> u_a @ u_a.T`` lets
    an adapter supply its own kernel for the symmetric diagonal tiles (CuPy's SYRK).
    """
    block_size = check_block_size(block_size)
    if with_grad and gram is None:
        result = _raw_gram_path(w, neuron_axis, block_size, zero_tol)
        if result is not None:
            return result
    rows = UnitRows(w, neuron_axis, zero_tol, in_place=with_grad and gram is None)
    if rows.kernel is not None:
        return _in_place_value_and_grad(rows, block_size)
    xp, u = rows.xp, rows.unit
    device = device_of(u)
    zero = xp.zeros((), dtype=u.dtype, device=device)
    tiles = rows.tiles(block_size)
    total = zero
    grads = [None] * len(tiles)
    for a, (start, stop) in enumerate(tiles):
        u_a = u[start:stop, :]
        cosines = gram(u_a) if gram is not None else u_a @ u_a.T
        index = xp.arange(stop - start, device=device)
        # A neuron is not paired with itself: the tile's own diagonal is left out.
        signs = xp.where(index[:, None] != index[None, :], xp.sign(cosines), zero)
        total = total + xp.sum(xp.vecdot(signs, cosines))
        if with_grad:
            grads[a] = _plus(grads[a], signs @ u_a)
        for b in range(a + 1, len(tiles)):
            u_b = u[tiles[b][0] : tiles[b][1], :]
            cosines = u_a @ u_b.T
            signs = xp.sign(cosines)
            total = total + 2.0 * xp.sum(xp.vecdot(signs, cosines))
            if with_grad:
                grads[a] = _plus(grads[a], signs @ u_b)
                grads[b] = _plus(grads[b], signs.T @ u_a)
    scale = rows.mean_scale()
    loss = rows.out(total * scale)
    if not with_grad:
        return loss, None
    g = grads[0] if len(grads) == 1 else xp.concat(grads, axis=0)
    return loss, rows.grad_from(g, 2.0 * scale)


def _raw_gram_path(w, neuron_axis, block_size, zero_tol):
    """The loss and gradient from the raw Gram matrix (simcore/_gram.py), or ``None``: no
    in-place kernel with cheap host reads runs ``w``, or its squared norms over- or
    underflow (the caller then takes the pre-scaled path)."""
    xp, axis, tol, rows = _checked_rows(w, neuron_axis, zero_tol)
    kernel = in_place_kernel(xp, rows)
    if kernel is None or not kernel.cheap_host_reads(rows):
        return None
    n, d = int(rows.shape[0]), int(rows.shape[1])
    if d == 1:
        # One weight per neuron: its direction cannot turn, the gradient is exactly 0, and
        # the pre-scaled path's projection (u_i = +-1) gives that 0 rather than rounding.
        return None
    height = block_size or kernel.strip_height(n, d, xp.finfo(rows.dtype).bits // 8)
    result = raw_gram_value_and_grad(kernel, rows, tol, height)
    if result is None:
        return None
    loss, g = result
    grad = from_rows(xp, g, w.shape, axis)
    return _cast(xp, loss, w.dtype), _cast(xp, grad, w.dtype)


def _cast(xp, x, dtype):
    return x if x.dtype == dtype else xp.astype(x, dtype)


def _in_place_value_and_grad(rows, block_size):
    """The loss and gradient through an in-place kernel (simcore/_tiles.py).

    ``G = S U`` comes from :func:`strip_products`; the loss needs no pass of its own:
    ``G_i . u_i = sum_j S_ij C_ij = sum_{j != i} |C_ij|``, the row sums of Eq. 2, which
    the tangent projection needs anyway.
    """
    xp, kernel, u = rows.xp, rows.kernel, rows.unit
    n, d = int(u.shape[0]), int(u.shape[1])
    height = block_size or kernel.strip_height(n, d, xp.finfo(u.dtype).bits // 8)
    g = strip_products(kernel, u, height)
    dots = kernel.row_dots(g, u)
    scale = rows.mean_scale()
    loss = rows.out(xp.sum(dots) * scale)
    return loss, rows.grad_from(g, 2.0 * scale, dots)


def _plus(a, b):
    return b if a is None else a + b


def similarity_map(w: Array, *, neuron_axis: int = 0, zero_tol: float | None = None) -> Array:
    """Eq. 1: the ``n x n`` cosine-similarity map between the neurons of ``w``.

    Rows and columns of zero rows (see the module docstring) are 0, their
    diagonal entry included; the diagonal of every other row is exactly 1.

    >>> import numpy as np, simcore
    >>> simcore.similarity_map(np.array([[1.0, 0.0], [1.0, 1.0]])).round(4)
    array([[1.    , 0.7071],
           [0.7071, 1.    ]])
    """
    rows, cosines = _cosines(w, neuron_axis, zero_tol)
    return rows.out(cosines)


def _cosines(w, neuron_axis, zero_tol):
    """``(rows, C)`` with ``C`` in the compute dtype (float32 for half inputs): exactly
    1 on the diagonal of non-zero rows, 0 in every row and column of a zero row."""
    rows = UnitRows(w, neuron_axis, zero_tol)
    xp, u = rows.xp, rows.unit
    eye = xp.eye(rows.n, dtype=u.dtype, device=device_of(u))
    return rows, (u @ u.T) * (1.0 - eye) + eye * rows.active[None, :]


def similarity_loss(
    w: Array,
    *,
    neuron_axis: int = 0,
    block_size: int | None = None,
    zero_tol: float | None = None,
) -> Array:
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
    w: Array,
    *,
    neuron_axis: int = 0,
    block_size: int | None = None,
    zero_tol: float | None = None,
    gram: GramFunction | None = None,
) -> tuple[Array, Array]:
    """Eq. 2 and its analytic gradient ``(mu, dmu/dw)``, the gradient in ``w``'s layout.

    The Gram matrix is built ``b = block_size`` rows at a time (see the module
    docstring): no ``n x n`` matrix beyond one ``b x n`` strip (NumPy, torch) or
    ``b x b`` tile (other libraries) besides the unit rows and the gradient itself.

    ``gram`` is the extension hook for a backend's own kernel: ``gram(u_a)`` must return
    ``u_a @ u_a.T`` for a 2-D tile ``u_a`` of unit rows (in the compute dtype) and is used
    for the symmetric diagonal tiles only (the whole matrix when ``n <= b``); ``None`` uses
    ``u_a @ u_a.T``. The CuPy adapter passes cuBLAS SYRK here.

    >>> import numpy as np, simcore
    >>> w = np.array([[1.0, 0.0], [1.0, 1.0]])
    >>> loss, _ = simcore.similarity_loss_and_grad(w, gram=lambda u: u @ u.T)
    >>> round(float(loss), 4)
    0.7071
    """
    if gram is not None and not callable(gram):
        raise TypeError(f"gram must be a callable u -> u @ u.T or None, got {type(gram).__name__}")
    return _value_and_grad(w, neuron_axis, block_size, zero_tol, with_grad=True, gram=gram)
