"""Eq. 5 of Sakai & Hotta over several layers, and the post-growth phase that minimises it.

``growth_objective = sum_l [ mu_sim(W_l) + lam * weight_sum_penalty(W_l, R_l) ]``.

The paper minimises Eq. 5 for ``N`` iterations after each growth (its best
``N``: Random 20, SSD 10, Firefly 15) but does not say whether those are
weight-only steps on Eq. 5 or training steps with Eq. 5 added to the task loss,
nor whether ``W_prev`` is the previous step or the post-growth snapshot. Both
readings are supported: :func:`decorrelate` performs the weight-only steps
(``anchor="snapshot"`` or ``"previous"``), and the adapters add
:func:`growth_objective` to a task loss or interleave :func:`decorrelate` steps
with training steps.

The phase's step (``step=``, one of :data:`STEPS`):

* ``"relative"`` (the default): each term is scaled by the metric in which its
  step does not depend on the weights' scale. Row ``i`` of a layer with ``n``
  neurons and mean squared row norm ``rho^2`` moves by
  ``-lr * (n / 2) * (r_i^2 * dEq2/dw_i + rho^2 * lam * dEq4/dw_i)``.
  Eq. 2 is invariant to each row's scale, so its plain gradient shrinks as
  ``1/r_i``: a fixed ``lr`` would move small-norm layers a lot and large-norm
  layers not at all. Times ``r_i^2`` the step is equivariant to the scale
  (``W -> cW`` and ``W_ref -> cW_ref`` give a step ``c`` times as large: the same
  *relative* change), and ``n / 2`` turns the gradient of a mean over
  ``n (n - 1)`` pairs into the gradient of each row's own mean ``|cos|`` to the
  others: one step turns a row by at most ``lr`` times its norm, less as it
  decorrelates. Eq. 4 depends on the layer's overall scale only, so its
  gradient is scaled by the layer's ``rho^2``: with the default squared-log RMS
  form each step then shrinks or grows every row by the same factor, removing a
  fraction ``lr * lam`` of the log scale drift (it must be below 2, or the
  steps overshoot and diverge; below 1 they never overshoot).
* ``"absolute"``: plain gradient descent, ``W_l <- W_l - lr * dEq5/dW_l``, whose
  effect depends on the layers' weight scale and width (kept for comparison
  and reproduction).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._arrays import (
    check_block_size,
    check_choice,
    check_int,
    check_real,
    check_zero_tol,
    compute_dtype,
    from_rows,
    namespace_of,
    normalize_axis,
    to_rows,
)
from ._types import Array
from .similarity import _value_and_grad as _similarity
from .weight_sum import FORMS, STATISTICS
from .weight_sum import _value_and_grad as _weight_sum

__all__ = [
    "ANCHORS",
    "STEPS",
    "Objective",
    "decorrelate",
    "growth_objective",
    "growth_objective_and_grad",
    "relative_update",
]

#: Which weights Eq. 4 measures against (the *anchor*): the post-growth ``"snapshot"`` or the
#: ``"previous"`` step's weights. One name in the core and every adapter.
ANCHORS = ("snapshot", "previous")
#: How a step of the post-growth phase is sized (see the module docstring).
STEPS = ("relative", "absolute")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Objective:
    """The options of Eq. 5, validated once: ``sum_l [mu(W_l) + lam * Eq4(W_l, R_l)]``.

    ``lam`` weighs Eq. 4 (finite, >= 0; 0 keeps Eq. 2 alone); ``form`` and ``statistic``
    choose Eq. 4's reading (:data:`FORMS`, :data:`STATISTICS`); ``neuron_axis`` is one int
    for every layer or a tuple with one per layer; ``block_size`` and ``zero_tol`` are
    those of :func:`simcore.similarity_loss`; ``similarity=False`` leaves Eq. 2 out (the
    paper's Table 3 ablation). Frozen and hashable, so it can be a ``jax.jit`` static
    argument; :meth:`replace` returns a validated copy. Every function of the core and the
    adapters that computes Eq. 5 takes it as ``objective=`` (see docs/design.md,
    'The post-growth phase (Eq. 5)').

    >>> import numpy as np, simcore
    >>> objective = simcore.Objective(lam=0.5)
    >>> layers = [np.eye(3), np.ones((2, 2))]
    >>> round(float(simcore.growth_objective(layers, layers, objective=objective)), 12)
    1.0
    >>> objective.replace(form="literal") == simcore.Objective(lam=0.5, form="literal")
    True
    """

    lam: float
    form: str = "squared_log"
    statistic: str = "rms"
    neuron_axis: int | tuple[int, ...] = 0
    block_size: int | None = None
    zero_tol: float | None = None
    similarity: bool = True

    def __post_init__(self) -> None:
        assign = object.__setattr__  # frozen: the validated values replace the given ones
        assign(self, "lam", _check_lam_value(self.lam))
        check_choice(self.form, FORMS, "form")
        check_choice(self.statistic, STATISTICS, "statistic")
        assign(self, "neuron_axis", _check_axes(self.neuron_axis))
        assign(self, "block_size", check_block_size(self.block_size))
        assign(self, "zero_tol", check_zero_tol(self.zero_tol))
        assign(self, "similarity", _check_flag(self.similarity, "similarity"))

    @property
    def needs_refs(self) -> bool:
        """Whether Eq. 4 is part of the value, so that reference weights must be given."""
        return self.lam != 0.0 or not self.similarity

    def replace(self, **changes: Any) -> Objective:
        """A copy with ``changes`` applied, validated like a new one."""
        return dataclasses.replace(self, **changes)


def _check_lam_value(lam: Any) -> float:
    """``lam`` as a finite float >= 0: a string, a bool, NaN or Inf is refused, naming it."""
    return check_real(lam, "lam")


def _check_flag(value: Any, name: str) -> bool:
    """``value`` as a Python bool; anything else (``"no"``, 0, None) is a ``TypeError``,
    because ``bool("no")`` would silently be true."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_lr(lr: Any) -> float:
    """A step size: a finite real number > 0 (strings, bools, NaN and Inf refused)."""
    if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a real number, got {type(lr).__name__}")
    lr = float(lr)
    if not (lr > 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr must be > 0 and finite, got {lr}")
    return lr


def _check_axes(neuron_axis: Any) -> int | tuple[int, ...]:
    if isinstance(neuron_axis, Sequence) and not isinstance(neuron_axis, str):
        return tuple(check_int(a, f"neuron_axis[{i}]") for i, a in enumerate(neuron_axis))
    return check_int(neuron_axis, "neuron_axis")


def as_objective(objective: Objective | None = None, **options: Any) -> Objective:
    """``objective``, or an :class:`Objective` built from keyword ``options``; not both.

    An option whose value is ``None`` counts as not given (every option's own default is
    ``None`` or has a non-``None`` default in :class:`Objective`). For adapters that keep
    the keyword arguments next to ``objective=``.

    >>> from simcore.extend import Objective, as_objective
    >>> as_objective(lam=0.1, form=None) == Objective(lam=0.1)
    True
    """
    given = {name: value for name, value in options.items() if value is not None}
    if objective is None:
        if "lam" not in given:
            raise TypeError("the Eq. 5 options need lam (or pass objective=Objective(lam=...))")
        return Objective(**given)
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a simcore.Objective, got {type(objective).__name__}")
    if given:
        raise TypeError(
            f"pass the Eq. 5 options either as objective= or as keywords, not both "
            f"(got objective and {', '.join(sorted(given))})"
        )
    return objective


def _layers(weights, refs, neuron_axis):
    if _is_single_array(weights):
        raise TypeError(
            "weights must be a sequence of arrays (one per grown layer), got a single array; "
            "wrap it in a list: [w]"
        )
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one layer")
    if refs is not None:
        if _is_single_array(refs):
            raise TypeError("refs must be a sequence of arrays or None, got a single array")
        refs = list(refs)
        if len(refs) != len(weights):
            raise ValueError(f"refs has {len(refs)} layers but weights has {len(weights)}")
    if isinstance(neuron_axis, Sequence) and not isinstance(neuron_axis, str):
        axes = list(neuron_axis)
        if len(axes) != len(weights):
            raise ValueError(f"neuron_axis has {len(axes)} entries but weights has {len(weights)}")
    else:
        axes = [neuron_axis] * len(weights)
    xp = namespace_of(weights[0], "weights[0]")
    for i, w in enumerate(weights[1:], start=1):
        if namespace_of(w, f"weights[{i}]") is not xp:
            raise TypeError(f"weights[{i}] comes from a different array library than weights[0]")
    return weights, refs, axes


def _is_single_array(x):
    try:
        namespace_of(x, "x")
    except TypeError:
        return False
    return True


def _check_refs_given(objective, refs):
    if objective.lam != 0.0 and refs is None:
        raise ValueError("lam is non-zero but refs is None: pass the reference weights for Eq. 4")
    if not objective.similarity and refs is None:
        raise ValueError("similarity=False leaves only Eq. 4, which needs refs")


def growth_objective(
    weights: Sequence[Array],
    refs: Sequence[Array] | None,
    *,
    objective: Objective | None = None,
    lam: float | None = None,
    form: str | None = None,
    statistic: str | None = None,
    neuron_axis: int | Sequence[int] | None = None,
    block_size: int | None = None,
    zero_tol: float | None = None,
    similarity: bool | None = None,
) -> Array:
    """Eq. 5 summed over layers; ``refs=None`` (with ``lam=0``) keeps only the Eq. 2 term.

    The options come as one :class:`Objective` (``objective=``) or as its keywords
    (``lam`` required; an omitted keyword takes :class:`Objective`'s default), not both.
    ``neuron_axis`` is one int for every layer or one per layer.
    ``similarity=False`` leaves the Eq. 2 term out (``lam`` times Eq. 4 alone: the
    paper's Table 3 ablation); it needs ``refs``.

    >>> import numpy as np, simcore
    >>> layers = [np.eye(3), np.ones((2, 2))]
    >>> round(float(simcore.growth_objective(layers, layers, lam=0.5)), 12)
    1.0
    """
    objective = as_objective(objective, lam=lam, form=form, statistic=statistic,
                             neuron_axis=neuron_axis, block_size=block_size,
                             zero_tol=zero_tol, similarity=similarity)
    return _objective(weights, refs, objective, with_grad=False)[0]


def growth_objective_and_grad(
    weights: Sequence[Array],
    refs: Sequence[Array] | None,
    *,
    objective: Objective | None = None,
    lam: float | None = None,
    form: str | None = None,
    statistic: str | None = None,
    neuron_axis: int | Sequence[int] | None = None,
    block_size: int | None = None,
    zero_tol: float | None = None,
    similarity: bool | None = None,
) -> tuple[Array, list[Array]]:
    """Eq. 5 and its gradient: ``(value, [d value / d W_l for each layer])``.

    Options as in :func:`growth_objective`.
    """
    objective = as_objective(objective, lam=lam, form=form, statistic=statistic,
                             neuron_axis=neuron_axis, block_size=block_size,
                             zero_tol=zero_tol, similarity=similarity)
    return _objective(weights, refs, objective, with_grad=True)


def _objective(weights, refs, objective, with_grad):
    total, parts = _objective_parts(weights, refs, objective, with_grad)
    return total, [_plus(sim, weight_sum) for sim, weight_sum in parts]


def _objective_parts(weights, refs, objective, with_grad):
    """Eq. 5 and, per layer, ``(Eq. 2 gradient, lam * Eq. 4 gradient)`` (``None`` if absent)."""
    weights, refs, axes = _layers(weights, refs, objective.neuron_axis)
    _check_refs_given(objective, refs)
    lam = objective.lam
    total, parts = None, []
    for i, (w, axis) in enumerate(zip(weights, axes, strict=True)):
        value = sim_grad = weight_sum_grad = None
        if objective.similarity:
            value, sim_grad = _similarity(w, axis, objective.block_size, objective.zero_tol,
                                          with_grad)
        if refs is not None:
            p_value, p_grad = _weight_sum(w, refs[i], objective.form, objective.statistic,
                                          with_grad)
            value = _plus(value, lam * p_value)
            weight_sum_grad = lam * p_grad if with_grad else None
        total = _plus(total, value)
        parts.append((sim_grad, weight_sum_grad))
    return total, parts


def _plus(a, b):
    """``a + b`` where ``None`` stands for an absent term."""
    if a is None:
        return b
    return a if b is None else a + b


def decorrelate(
    weights: Sequence[Array],
    refs: Sequence[Array] | None = None,
    *,
    steps: int,
    lr: float,
    objective: Objective | None = None,
    lam: float | None = None,
    anchor: str = "snapshot",
    form: str | None = None,
    statistic: str | None = None,
    neuron_axis: int | Sequence[int] | None = None,
    block_size: int | None = None,
    zero_tol: float | None = None,
    similarity: bool | None = None,
    step: str = "relative",
) -> list[Array]:
    """The post-growth phase as weight-only gradient descent on Eq. 5; returns new arrays.

    For backends without autodiff (NumPy, CuPy) or when the weight-only reading
    of the paper is wanted. The Eq. 5 options come as ``objective=`` or as keywords
    (see :func:`growth_objective`). ``refs`` defaults to ``weights`` themselves (the
    post-growth snapshot). ``anchor="snapshot"`` measures Eq. 4 against ``refs``
    at every step; ``anchor="previous"`` against the previous step's weights
    (``refs`` then only seeds the first step). ``similarity=False`` descends on
    Eq. 4 alone (the ablation). ``step="relative"`` (default) sizes each step
    relative to the rows' norms, so its effect does not depend on the weights'
    scale (:func:`relative_update`); ``step="absolute"`` is plain gradient
    descent with step ``lr``. Nothing is mutated.

    >>> import numpy as np, simcore
    >>> w = np.array([[1.0, 0.1], [1.0, -0.1], [0.2, 1.0]])
    >>> [new] = simcore.decorrelate([w], steps=20, lr=0.2, lam=0.1)
    >>> float(simcore.similarity_loss(new)) < float(simcore.similarity_loss(w))
    True
    >>> [big] = simcore.decorrelate([1000 * w], steps=20, lr=0.2, lam=0.1)
    >>> bool(np.allclose(big, 1000 * new))  # the same relative change at any scale
    True
    """
    objective = as_objective(objective, lam=lam, form=form, statistic=statistic,
                             neuron_axis=neuron_axis, block_size=block_size,
                             zero_tol=zero_tol, similarity=similarity)
    steps = check_int(steps, "steps", minimum=0)
    lr = _check_lr(lr)
    check_choice(anchor, ANCHORS, "anchor")
    check_choice(step, STEPS, "step")
    if step == "relative" and not lr * objective.lam < 2.0:
        raise ValueError(
            f"lr * lam = {lr * objective.lam:g}: with relative steps each step removes a "
            f"fraction lr * lam of the scale drift, so lr * lam >= 2 overshoots and diverges; "
            f"lower lr or lam (below 1 never overshoots)"
        )
    weights, refs, axes = _layers(weights, refs, objective.neuron_axis)
    objective = objective.replace(neuron_axis=tuple(axes))
    current = list(weights)
    anchors = list(weights) if refs is None else refs
    for _ in range(steps):
        _, parts = _objective_parts(current, anchors, objective, with_grad=True)
        if anchor == "previous":
            anchors = current
        sim_grads, weight_sum_grads = zip(*parts, strict=True)
        if step == "relative":
            current = relative_update(current, sim_grads, weight_sum_grads, lr=lr,
                                      neuron_axis=axes)
        else:
            current = [w - lr * _plus(g, h) for w, g, h in zip(current, sim_grads,
                                                               weight_sum_grads, strict=True)]
    return current


def relative_update(
    weights: Sequence[Array],
    similarity_grads: Sequence[Array | None],
    weight_sum_grads: Sequence[Array | None] | None = None,
    *,
    lr: float,
    neuron_axis: int | Sequence[int] = 0,
) -> list[Array]:
    """One scale-free step of Eq. 5: row ``i`` moves by ``-lr (n/2) (r_i^2 g_i + rho^2 h_i)``.

    ``similarity_grads`` are the layers' Eq. 2 gradients ``g`` and
    ``weight_sum_grads`` their ``lam``-weighted Eq. 4 gradients ``h`` (an entry
    or the whole list may be ``None``: no such term); ``r_i`` is row ``i``'s
    norm, ``rho^2`` the layer's mean squared row norm and ``n`` its neuron
    count. The step is ``c`` times as large for weights ``c`` times as large;
    see the module docstring. Returns new arrays in the weights' dtypes.

    >>> import numpy as np, simcore
    >>> w = np.array([[3.0, 0.0], [0.0, 1.0]])
    >>> g = np.array([[0.0, 1.0], [1.0, 0.0]])
    >>> simcore.relative_update([w], [g], lr=0.1)[0]  # rows move by 0.1 * ||w_i||^2 * g_i
    array([[ 3. , -0.9],
           [-0.1,  1. ]])
    >>> simcore.relative_update([w], [None], [w], lr=0.1)[0]  # rho^2 = 5: every row * 0.5
    array([[1.5, 0. ],
           [0. , 0.5]])
    """
    lr = _check_lr(lr)
    weights, _, axes = _layers(weights, None, neuron_axis)
    similarity_grads = _grad_list(similarity_grads, weights, "similarity_grads")
    weight_sum_grads = _grad_list(weight_sum_grads, weights, "weight_sum_grads")
    updated = []
    for i, (w, axis) in enumerate(zip(weights, axes, strict=True)):
        xp = namespace_of(w, f"weights[{i}]")
        axis = normalize_axis(axis, w.ndim)
        work = compute_dtype(xp, w.dtype)  # half precision would overflow the squared norms
        rows = xp.astype(to_rows(xp, w, axis), work)
        # r_i^2 and rho^2 are kept as (scale, scaled square) factors, and each product is
        # formed in the order that keeps it near the step's own size (r_i g_i is O(1)):
        # no square of a weight is formed, so any finite layer gives a finite step.
        row_scale = xp.max(xp.abs(rows), axis=1, keepdims=True)
        one = xp.ones_like(row_scale)
        scaled = rows / xp.where(row_scale > 0, row_scale, one)
        scaled_squares = xp.sum(scaled * scaled, axis=1, keepdims=True)
        scale = lr * rows.shape[0] / 2.0
        step = None
        g, h = similarity_grads[i], weight_sum_grads[i]
        if g is not None:
            g = xp.astype(to_rows(xp, g, axis), work)
            step = ((g * row_scale) * scaled_squares) * row_scale
        if h is not None:
            h = xp.astype(to_rows(xp, h, axis), work)
            layer_scale = xp.max(row_scale)
            relative = row_scale / xp.where(layer_scale > 0, layer_scale, xp.ones_like(layer_scale))
            rho_scaled_squared = xp.mean(relative * relative * scaled_squares)
            step = _plus(step, ((h * layer_scale) * rho_scaled_squared) * layer_scale)
        moved = rows if step is None else rows - scale * step
        updated.append(xp.astype(from_rows(xp, moved, w.shape, axis), w.dtype))
    return updated


def _grad_list(grads, weights, name):
    if grads is None:
        return [None] * len(weights)
    if _is_single_array(grads):
        raise TypeError(f"{name} must be a sequence of arrays (or None), one per layer")
    grads = list(grads)
    if len(grads) != len(weights):
        raise ValueError(f"{name} has {len(grads)} layers but weights has {len(weights)}")
    for i, (g, w) in enumerate(zip(grads, weights, strict=True)):
        if g is not None and tuple(g.shape) != tuple(w.shape):
            raise ValueError(f"{name}[{i}] has shape {tuple(g.shape)}, weights[{i}] "
                             f"{tuple(w.shape)}")
    return grads
