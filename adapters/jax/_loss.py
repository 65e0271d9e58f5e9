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
``jax.grad`` calls :func:`simcore.similarity_loss_and_grad` once, so value and
gradient share one Gram matrix. Everything traces under ``jit`` and batches
under ``vmap``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

import simcore
from simcore.extend import Objective, as_objective

__all__ = ["growth_objective", "similarity_loss"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _similarity_loss(w, neuron_axis, block_size, zero_tol):
    return simcore.similarity_loss(
        w, neuron_axis=neuron_axis, block_size=block_size, zero_tol=zero_tol
    )


def _similarity_fwd(w, neuron_axis, block_size, zero_tol):
    return simcore.similarity_loss_and_grad(
        w, neuron_axis=neuron_axis, block_size=block_size, zero_tol=zero_tol
    )


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
    return _similarity_loss(w, neuron_axis, block_size, zero_tol)


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
