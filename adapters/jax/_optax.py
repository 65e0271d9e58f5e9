"""The Eq. 5 penalty over a parameter pytree: a loss term and an optax transform.

Two ways to use the paper's penalty in training, both over the *kernels* of a
pytree (selected by ``mask`` and given their neuron axis by ``neuron_axis``):

* :func:`penalty` returns the value, to add to a task loss before ``jax.grad``;
* :func:`add_similarity_gradient` adds ``strength * dEq5/dW`` to the updates,
  like optax's ``add_decayed_weights`` does for weight decay, so it sits in an
  ``optax.chain`` before the learning-rate scaling.

Selection. ``neuron_axis`` is an int applied to every selected leaf, or a
mapping ``{leaf name: axis}`` such as :func:`find_kernels` returns (then the
mapping's names are the selection), or a callable ``params -> either``.
``mask`` (a pytree of bools shaped like the params, or a callable returning one)
narrows the selection further; with an int ``neuron_axis`` and no mask every
leaf with at least two dimensions is selected.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import simcore
from simcore.extend import Objective, as_objective, check_choice, warn_deprecated

from ._loss import growth_objective
from ._trees import leaf_name

__all__ = ["SimilarityGradientState", "add_similarity_gradient", "penalty"]


def __getattr__(name: str) -> Any:
    if name == "REFS":  # the reference choice is called anchor everywhere now
        warn_deprecated("simcore.adapters.jax._optax.REFS", "simcore.ANCHORS")
        return simcore.ANCHORS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _pytree_objective(objective, neuron_axis_given, lam, **options) -> Objective:
    """The :class:`simcore.Objective` of a pytree function (``lam`` defaults to 0 here).

    The per-leaf axes come from the selection (``neuron_axis=`` of the pytree function),
    so an ``objective`` must leave its own ``neuron_axis`` at 0.
    """
    if objective is None and lam is None:
        lam = 0.0
    objective = as_objective(objective, lam=lam, **options)
    if objective.neuron_axis != 0:
        raise ValueError(
            f"the objective's neuron_axis is {objective.neuron_axis!r}, but a pytree function "
            f"takes the axes from its own neuron_axis= (here {neuron_axis_given!r}); leave the "
            f"objective's at 0"
        )
    return objective


def _is_equinox(tree: Any) -> bool:
    try:
        import equinox as eqx
    except ImportError:
        return False
    return isinstance(tree, eqx.Module)


def _default_axis(params: Any) -> int:
    """Neurons' axis when none is given: 0 in an Equinox module (``(out, in)``, OIHW), -1 in
    Flax trees and plain mappings (``(in, out)``, HWIO)."""
    return 0 if _is_equinox(params) else -1


def _selected(params: Any, mask: Any, neuron_axis: Any) -> list[tuple[int, str, int]]:
    """``[(leaf index, leaf name, neuron axis)]`` of the penalised leaves, in flattening order."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if neuron_axis is None:
        neuron_axis = _default_axis(params)
    if callable(neuron_axis):
        neuron_axis = neuron_axis(params)
    if mask is not None:
        if callable(mask):
            mask = mask(params)
        try:
            # jaxlib's PyTreeDef has no stubs; flatten_up_to has no tree_util function
            mask_leaves = treedef.flatten_up_to(mask)  # type: ignore[attr-defined]
        except (ValueError, TypeError) as error:
            raise ValueError(f"mask must have the structure of params: {error}") from None
    else:
        mask_leaves = [None] * len(flat)
    by_name = isinstance(neuron_axis, Mapping)
    if not by_name and (isinstance(neuron_axis, bool) or not isinstance(neuron_axis, int)):
        raise TypeError(
            "neuron_axis must be an int, a mapping {leaf name: axis} or a callable returning one, "
            f"got {type(neuron_axis).__name__}"
        )
    chosen = []
    for index, ((path, leaf), masked) in enumerate(zip(flat, mask_leaves, strict=True)):
        name = leaf_name(path)
        if masked is not None and not isinstance(masked, (bool, jnp.bool_)):
            raise TypeError(
                f"mask leaf for {name!r} must be a Python bool, got {type(masked).__name__}"
            )
        if masked is False:
            continue
        if by_name:
            if name in neuron_axis:
                chosen.append((index, name, neuron_axis[name]))
            elif masked:
                raise ValueError(f"mask selects {name!r} but neuron_axis names no axis for it")
        elif masked or (masked is None and getattr(leaf, "ndim", 0) >= 2):
            chosen.append((index, name, neuron_axis))
    if by_name:
        known = {leaf_name(path) for path, _ in flat}
        missing = sorted(set(neuron_axis) - known)
        if missing:
            raise ValueError(f"neuron_axis names leaves that params does not have: {missing}")
    if not chosen:
        raise ValueError(
            "no parameter is selected for the similarity penalty (check mask and neuron_axis)"
        )
    return chosen


def penalty(
    params: Any,
    *,
    mask: Any = None,
    neuron_axis: Any = None,
    refs: Any = None,
    objective: Objective | None = None,
    lam: float | None = None,
    form: str | None = None,
    statistic: str | None = None,
    block_size: int | None = None,
    zero_tol: float | None = None,
    similarity: bool | None = None,
) -> jax.Array:
    """Eq. 5 over the selected kernels of ``params``, with the core's gradient under ``jax.grad``.

    ``refs`` is a pytree like ``params`` (only its selected leaves are read)
    holding the snapshot Eq. 4 compares with; it gets no gradient. The Eq. 5 options
    come as one :class:`simcore.Objective` (``objective=``, its ``neuron_axis`` left at
    0: the axes come from ``neuron_axis=`` here) or as its keywords (``lam`` defaults
    to 0).
    ``similarity=False`` leaves Eq. 2 out (``lam`` times Eq. 4 alone, the
    paper's Table 3 ablation); it needs ``refs``. ``neuron_axis=None`` (default) takes the
    layout from the tree: 0 for an Equinox module (``(out, in)`` and OIHW weights), -1 for
    Flax trees and plain mappings (``(in, out)`` and HWIO kernels).

    >>> import jax, jax.numpy as jnp
    >>> from simcore.adapters.jax import penalty
    >>> params = {"dense": {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}}
    >>> float(penalty(params))
    0.0
    """
    objective = _pytree_objective(objective, neuron_axis, lam, form=form, statistic=statistic,
                                  block_size=block_size, zero_tol=zero_tol,
                                  similarity=similarity)
    chosen = _selected(params, mask, neuron_axis)
    leaves = jax.tree_util.tree_leaves(params)
    weights = [leaves[i] for i, _, _ in chosen]
    ref_leaves = None
    if refs is not None:
        structure = jax.tree_util.tree_structure(params)
        all_refs = structure.flatten_up_to(refs)  # type: ignore[attr-defined]  # no PyTreeDef stubs
        ref_leaves = [all_refs[i] for i, _, _ in chosen]
    axes = tuple(axis for _, _, axis in chosen)
    return growth_objective(weights, ref_leaves, objective=objective.replace(neuron_axis=axes))


class SimilarityGradientState(NamedTuple):
    """State of :func:`add_similarity_gradient`.

    ``count``: steps taken (the schedule's argument). ``refs``: the Eq. 4
    reference of every selected kernel, ``{leaf name: array}`` (empty when
    ``lam == 0`` and the similarity term is on).
    """

    # shadows tuple.count, as optax's own states (ScaleByAdamState.count) do
    count: jax.Array  # type: ignore[assignment]
    refs: dict[str, jax.Array]


def add_similarity_gradient(
    strength: float | Callable[[jax.Array], jax.Array],
    *,
    mask: Any = None,
    neuron_axis: Any = None,
    objective: Objective | None = None,
    lam: float | None = None,
    anchor: str = "snapshot",
    form: str | None = None,
    statistic: str | None = None,
    block_size: int | None = None,
    zero_tol: float | None = None,
    similarity: bool | None = None,
    refs: str | None = None,
) -> optax.GradientTransformation:
    """Add ``strength * dEq5/dW`` to the updates of the selected kernels.

    ``strength`` is a float or an optax schedule of the step count. The Eq. 5 options
    come as ``objective=`` or as keywords, as in :func:`penalty`. ``lam`` weighs Eq. 4
    against the reference weights, chosen by ``anchor`` (one of
    :data:`simcore.ANCHORS`, the same word as :func:`simcore.decorrelate` and the torch
    adapter): ``"snapshot"`` keeps the params given to ``init`` (call ``init`` right after
    growth: the paper's post-growth snapshot), ``"previous"`` compares with the previous
    step's params. ``refs="snapshot"|"previous"`` is the deprecated spelling of ``anchor``.
    ``similarity=False`` adds only ``strength * lam * dEq4/dW``
    (the paper's Table 3 ablation). Place it before the learning rate, as with weight decay::

        optax.chain(add_similarity_gradient(0.1, neuron_axis=find_kernels(params)),
                    optax.sgd(0.1, momentum=0.9))

    ``update`` needs ``params``. Other leaves pass through untouched.

    >>> import jax.numpy as jnp, optax
    >>> from simcore.adapters.jax import add_similarity_gradient
    >>> params = {"kernel": jnp.array([[1.0, 1.0], [1.0, 0.0]])}
    >>> tx = add_similarity_gradient(1.0)
    >>> updates, _ = tx.update({"kernel": jnp.zeros((2, 2))}, tx.init(params), params)
    >>> bool(jnp.any(updates["kernel"] != 0))
    True
    """
    if refs is not None:
        warn_deprecated("add_similarity_gradient(refs=...)", "anchor=")
        anchor = refs
    check_choice(anchor, simcore.ANCHORS, "anchor")
    if not callable(strength):
        strength = float(strength)
    objective = _pytree_objective(objective, neuron_axis, lam, form=form, statistic=statistic,
                                  block_size=block_size, zero_tol=zero_tol,
                                  similarity=similarity)
    # Eq. 4 needs its reference weights when it is weighed in, and always
    # without Eq. 2 (the core then rejects refs=None).
    keeps_refs = objective.needs_refs

    def snapshot(params):
        if not keeps_refs:
            return {}
        leaves = jax.tree_util.tree_leaves(params)
        return {name: leaves[i] for i, name, _ in _selected(params, mask, neuron_axis)}

    def init_fn(params):
        return SimilarityGradientState(count=jnp.zeros((), jnp.int32), refs=snapshot(params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "add_similarity_gradient needs params: call update(updates, state, params)"
            )
        chosen = _selected(params, mask, neuron_axis)
        leaves = jax.tree_util.tree_leaves(params)
        weights = [leaves[i] for i, _, _ in chosen]
        ref_list = [state.refs[name] for _, name, _ in chosen] if keeps_refs else None
        axes = tuple(a for _, _, a in chosen)
        _, grads = simcore.growth_objective_and_grad(
            weights, ref_list, objective=objective.replace(neuron_axis=axes)
        )
        scale = strength(state.count) if callable(strength) else strength
        update_leaves, treedef = jax.tree_util.tree_flatten(updates)
        if len(update_leaves) != len(leaves):
            if _is_equinox(params):
                raise ValueError(
                    "updates and params must have the same tree structure: params is an "
                    "unfiltered Equinox module (functions and other non-array leaves); pass "
                    "eqx.filter(model, eqx.is_array) to init and update, as the gradients are")
            raise ValueError("updates and params must have the same tree structure")
        update_leaves = list(update_leaves)
        for (i, _, _), grad in zip(chosen, grads, strict=True):
            update_leaves[i] = update_leaves[i] + (scale * grad).astype(update_leaves[i].dtype)
        new_refs = snapshot(params) if anchor == "previous" else state.refs
        count = optax.safe_increment(state.count)
        updates = jax.tree_util.tree_unflatten(treedef, update_leaves)
        return updates, SimilarityGradientState(count, new_refs)

    return optax.GradientTransformation(init_fn, update_fn)
