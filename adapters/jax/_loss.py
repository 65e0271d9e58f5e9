"""The core's analytic value and gradient as ``jax.custom_vjp`` functions.

Why a wrapper and not plain ``jax.grad`` of :func:`simcore.similarity_loss`:

* The library fixes its own conventions (``sign(0) = 0``, zero rows get a zero
  gradient); autodiff frameworks disagree on them. A loss written with
  ``jnp.abs`` gets slope +1 at ``|0|`` from JAX, so orthonormal rows (every
  cosine 0, the loss at its minimum) would get a non-zero gradient. The core
  happens to write ``|C|`` as ``sign(C) * C``, whose JAX derivative is
  ``sign(C)``, so plain autodiff of the *core* gets that one right by accident
  of implementation, not by contract; the wrapper makes it the contract.
* Zero rows (growth creates them: fresh neurons with zero fan-in) are a real
  failure of plain autodiff: the derivative of ``sqrt`` at 0 is infinite and the
  "masked" row's gradient comes back NaN. The analytic gradient gives 0.
* Cost: autodiff through ``U U^T`` runs about two GEMMs more than the analytic
  backward, which is one GEMM on top of the forward Gram matrix.

The backward pass returns ``cotangent * (core gradient)``; the forward pass of
``jax.grad`` forms the Gram matrix once for value and gradient. Everything traces
under ``jit`` and batches under ``vmap``.

Compile time: the core's tile loop is a Python loop, which ``jit`` unrolls (at
n = 20000, 210 tiles took 87 s and 3.6 GB to compile). Here the rows are padded with
zero rows to whole tiles and the tiles run in two ``lax.scan`` loops (diagonal tiles,
then the upper off-diagonal pairs), so the traced program is the same size for every
``n``. The tiles come from the raw weights where their Gram matrix is exact
(:class:`simcore.extend.RawRows`: no pass over the weights besides the products and one at
the end), else from the pre-scaled unit rows (:class:`simcore.extend.UnitRows`), chosen by
``lax.cond`` on an array, since nothing can be read on the host under ``jit``; zero padding
rows have no sign and add nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import simcore
from simcore.extend import (
    Objective,
    RawRows,
    UnitRows,
    as_objective,
    check_block_size,
    check_int,
    check_zero_tol,
)

#: Tile rows when no ``block_size`` is given (the core's default).
_DEFAULT_TILE = simcore.similarity.DEFAULT_TILE

__all__ = ["growth_objective", "similarity_loss"]


def _scanned_products(u, tile, with_grad):
    """``(sum_{i != j} |C_ij|, S U or None)`` for unit rows ``u``, tile by tile in ``lax.scan``.

    ``S = sign(C)`` with a zero diagonal. Only tiles ``(a, b)`` with ``a <= b`` are
    formed; the pairs are data (index arrays), not code, so the program does not grow
    with the tile count.
    """
    n, d = u.shape
    count = -(-n // tile)
    tiles = jnp.pad(u, ((0, count * tile - n), (0, 0))).reshape(count, tile, d)
    off_diagonal = 1.0 - jnp.eye(tile, dtype=u.dtype)
    grads = jnp.zeros_like(tiles) if with_grad else None

    def diagonal(carry, a):
        total, grads = carry
        u_a = tiles[a]
        cosines = u_a @ u_a.T
        signs = jnp.sign(cosines) * off_diagonal
        total = total + jnp.sum(signs * cosines)
        if with_grad:
            grads = grads.at[a].add(signs @ u_a)
        return (total, grads), None

    def pair(carry, ab):
        total, grads = carry
        u_a, u_b = tiles[ab[0]], tiles[ab[1]]
        cosines = u_a @ u_b.T
        signs = jnp.sign(cosines)
        total = total + 2.0 * jnp.sum(signs * cosines)
        if with_grad:
            grads = grads.at[ab[0]].add(signs @ u_b).at[ab[1]].add(signs.T @ u_a)
        return (total, grads), None

    carry = (jnp.zeros((), u.dtype), grads)
    carry, _ = jax.lax.scan(diagonal, carry, jnp.arange(count))
    upper = _upper_pairs(count)
    if len(upper):
        carry, _ = jax.lax.scan(pair, carry, jnp.asarray(upper))
    total, grads = carry
    if grads is None:
        return total, None
    return total, grads.reshape(count * tile, d)[:n]


def _raw_scanned_products(raw, tile, with_grad):
    """``(a, P or None)`` of :class:`~simcore.extend.RawRows` ``raw``, tile by tile in
    ``lax.scan``: ``a_i = sum_{j != i} |C_ij|`` and ``P_i = sum_{j != i} S_ij w_j / r_j``.

    The tiles of the raw Gram matrix, upper ones only, as in :func:`_scanned_products`;
    padding rows have ``1 / r = 0`` and so no pairs.
    """
    w, inv = raw.rows, raw.inv_norms
    n, d = w.shape
    count = -(-n // tile)
    tiles = jnp.pad(w, ((0, count * tile - n), (0, 0))).reshape(count, tile, d)
    inv_tiles = jnp.pad(inv, (0, count * tile - n)).reshape(count, tile)
    off_diagonal = 1.0 - jnp.eye(tile, dtype=w.dtype)
    products = jnp.zeros_like(tiles) if with_grad else None

    def diagonal(carry, a):
        sums, products = carry
        w_a, inv_a = tiles[a], inv_tiles[a]
        absolute, signs = raw.pair_terms(w_a @ w_a.T, inv_a, inv_a, off_diagonal)
        sums = sums.at[a].add(jnp.sum(absolute, axis=1))
        if with_grad:
            products = products.at[a].add((signs * inv_a[None, :]) @ w_a)
        return (sums, products), None

    def pair(carry, ab):
        sums, products = carry
        w_a, w_b, inv_a, inv_b = tiles[ab[0]], tiles[ab[1]], inv_tiles[ab[0]], inv_tiles[ab[1]]
        absolute, signs = raw.pair_terms(w_a @ w_b.T, inv_a, inv_b)
        sums = sums.at[ab[0]].add(jnp.sum(absolute, axis=1)).at[ab[1]].add(
            jnp.sum(absolute, axis=0))
        if with_grad:
            products = products.at[ab[0]].add((signs * inv_b[None, :]) @ w_b).at[ab[1]].add(
                (signs * inv_a[:, None]).T @ w_a)
        return (sums, products), None

    carry = (jnp.zeros((count, tile), w.dtype), products)
    carry, _ = jax.lax.scan(diagonal, carry, jnp.arange(count))
    upper = _upper_pairs(count)
    if len(upper):
        carry, _ = jax.lax.scan(pair, carry, jnp.asarray(upper))
    sums, products = carry
    sums = sums.reshape(count * tile)[:n]
    return sums, None if products is None else products.reshape(count * tile, d)[:n]


def _upper_pairs(count):
    return np.array([(a, b) for a in range(count) for b in range(a + 1, count)],
                    dtype=np.int32).reshape(-1, 2)


def _tile_rows(block_size, n):
    return min(_DEFAULT_TILE if block_size is None else block_size, n)


def _from_raw_gram(raw, block_size, with_grad):
    """Eq. 2 (and its gradient) of :class:`~simcore.extend.RawRows` ``raw`` from the raw Gram
    matrix: the products and one ``n x d`` pass at the end (exact only where ``raw.safe``)."""
    sums, products = _raw_scanned_products(raw, _tile_rows(block_size, raw.n), with_grad)
    scale = raw.mean_scale()
    loss = raw.out(jnp.sum(sums) * scale)
    return loss, None if products is None else raw.grad_from(products, sums, 2.0 * scale)


def _from_unit_rows(w, neuron_axis, block_size, zero_tol, with_grad):
    """Eq. 2 (and its gradient) from the pre-scaled unit rows: exact for any finite ``w``."""
    rows = UnitRows(w, neuron_axis, zero_tol)
    total, products = _scanned_products(rows.unit, _tile_rows(block_size, rows.n), with_grad)
    scale = rows.mean_scale()
    loss = rows.out(total * scale)
    if not with_grad:
        return loss, None
    return loss, rows.grad_from(products, 2.0 * scale)


# Jitted with the options static: ``lax.scan`` caches its trace by the identity of its body,
# and the bodies are closures made anew on every call, so an eager call used to trace and
# compile the whole loop again each time (65 ms per value+grad of a 64 x 27 layer). Under an
# outer ``jit`` this is one more nested call, inlined by XLA.
@functools.partial(jax.jit, static_argnames=("neuron_axis", "block_size", "zero_tol",
                                             "with_grad"))
def _scanned(w, neuron_axis, block_size, zero_tol, with_grad):
    """Eq. 2 (and its gradient) with the core's conventions, the tiles in ``lax.scan``.

    From the raw Gram matrix where that is exact (every ordinary layer), else from the
    pre-scaled unit rows: both are compiled, ``lax.cond`` runs one (under ``vmap`` with a
    batched decision, both).
    """
    block_size = check_block_size(block_size)
    raw = RawRows(w, neuron_axis, zero_tol)
    return jax.lax.cond(raw.safe, lambda: _from_raw_gram(raw, block_size, with_grad),
                        lambda: _from_unit_rows(w, neuron_axis, block_size, zero_tol,
                                                with_grad))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _similarity_loss(w, neuron_axis, block_size, zero_tol):
    return _scanned(w, neuron_axis, block_size, zero_tol, with_grad=False)[0]


def _similarity_fwd(w, neuron_axis, block_size, zero_tol):
    return _scanned(w, neuron_axis, block_size, zero_tol, with_grad=True)


def _similarity_bwd(neuron_axis, block_size, zero_tol, grad, cotangent):
    return (cotangent.astype(grad.dtype) * grad,)


_similarity_loss.defvjp(_similarity_fwd, _similarity_bwd)


def _check_jax_array(x: Any, name: str) -> None:
    if not isinstance(x, jax.Array):
        raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")


def similarity_loss(
    w: jax.Array,
    *,
    neuron_axis: int = 0,
    block_size: int | None = None,
    zero_tol: float | None = None,
) -> jax.Array:
    """Eq. 2 of Sakai & Hotta for one JAX weight, differentiable with the library's gradient.

    Same arguments and value as :func:`simcore.similarity_loss`; ``jax.grad``
    gives :func:`simcore.similarity_loss_and_grad`'s analytic gradient
    (``sign(0) = 0``, zero rows get 0). Flax kernels keep their neurons on the
    last axis: pass ``neuron_axis=-1`` for them.

    >>> import jax, jax.numpy as jnp
    >>> from simcore.adapters.jax import similarity_loss
    >>> w = jnp.eye(3)
    >>> float(similarity_loss(w)), float(jnp.abs(jax.grad(similarity_loss)(w)).max())
    (0.0, 0.0)
    """
    _check_jax_array(w, "w")
    # Checked here, as the core would, because they become static (hashed) arguments below.
    return _similarity_loss(w, check_int(neuron_axis, "neuron_axis"),
                            check_block_size(block_size), check_zero_tol(zero_tol))


# -- Eq. 5 over several layers --------------------------------------------------------------


# ``objective`` (a frozen, hashable simcore.Objective) is static: it selects the
# function, it is not differentiated.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _objective(weights, refs, objective):
    return simcore.growth_objective(weights, refs, objective=objective)


def _objective_fwd(weights, refs, objective):
    value, grads = simcore.growth_objective_and_grad(weights, refs, objective=objective)
    return value, (grads, refs)


def _objective_bwd(objective, residuals, cotangent):
    grads, refs = residuals
    weight_cts = [cotangent.astype(g.dtype) * g for g in grads]
    # The references are snapshots (the weights right after growth, or of the
    # previous step): Eq. 5 is minimised in the current weights only.
    ref_cts = None if refs is None else [jnp.zeros_like(r) for r in refs]
    return weight_cts, ref_cts


_objective.defvjp(_objective_fwd, _objective_bwd)


def growth_objective(
    weights: Sequence[jax.Array],
    refs: Sequence[jax.Array] | None = None,
    *,
    objective: Objective | None = None,
    lam: float | None = None,
    form: str | None = None,
    statistic: str | None = None,
    neuron_axis: int | Sequence[int] | None = None,
    block_size: int | None = None,
    zero_tol: float | None = None,
    similarity: bool | None = None,
) -> jax.Array:
    """Eq. 5 summed over layers, differentiable in ``weights`` with the core's gradient.

    Same arguments and value as :func:`simcore.growth_objective` (one
    :class:`simcore.Objective` as ``objective=``, or its keywords; ``lam`` defaults to 0
    here); the objective is a static argument of the custom VJP;
    ``similarity=False`` leaves the Eq. 2 term out (``lam`` times Eq. 4 alone,
    the paper's Table 3 ablation) and needs ``refs``. The gradient
    with respect to ``refs`` is defined to be zero: the references are
    snapshots taken after growth (or at the previous step), held fixed while
    Eq. 5 is minimised, exactly as :func:`simcore.growth_objective_and_grad`
    treats them.

    >>> import jax, jax.numpy as jnp
    >>> from simcore.adapters.jax import growth_objective
    >>> ws = [jnp.eye(3), jnp.ones((2, 2))]
    >>> round(float(growth_objective(ws, ws, lam=0.5)), 4)
    1.0
    """
    if isinstance(weights, jax.Array) or not isinstance(weights, Sequence):
        raise TypeError(
            f"weights must be a sequence of jax.Array (one per layer), got {type(weights).__name__}"
        )
    weights = list(weights)
    for i, w in enumerate(weights):
        _check_jax_array(w, f"weights[{i}]")
    if refs is not None:
        if isinstance(refs, jax.Array) or not isinstance(refs, Sequence):
            raise TypeError(
                f"refs must be a sequence of jax.Array or None, got {type(refs).__name__}"
            )
        refs = list(refs)
        for i, r in enumerate(refs):
            _check_jax_array(r, f"refs[{i}]")
    if objective is None and lam is None:
        lam = 0.0
    objective = as_objective(objective, lam=lam, form=form, statistic=statistic,
                             neuron_axis=neuron_axis, block_size=block_size,
                             zero_tol=zero_tol, similarity=similarity)
    return _objective(weights, refs, objective)
