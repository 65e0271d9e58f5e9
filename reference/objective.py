"""Oracle for the paper's Eq. 5 summed over layers:

    sum_l  similarity_loss(W_l)  +  lam * weight_sum_penalty(W_l, ref_l)

``weights`` is a sequence of arrays.  ``refs`` is a sequence of the same length, or None for no
weight-sum term at all (then ``lam`` is unused); a single entry of ``refs`` may also be None to
leave that layer's weight-sum term out.  ``neuron_axis`` is one int for every layer or a sequence
of ints, one per layer.  The weight-sum term does not depend on ``neuron_axis``.
"""

from __future__ import annotations

import math

import numpy as np

from .similarity import similarity_loss_and_grad
from .weight_sum import FORMS, STATISTICS, weight_sum_penalty_and_grad


def _per_layer_axes(neuron_axis, n_layers: int):
    if isinstance(neuron_axis, (list, tuple, np.ndarray)):
        axes = list(neuron_axis)
        if len(axes) != n_layers:
            raise ValueError(f"neuron_axis has {len(axes)} entries for {n_layers} layers")
        return axes
    return [neuron_axis] * n_layers


def _objective(weights, refs, lam, form, statistic, neuron_axis, zero_tol):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    weights = list(weights)
    n_layers = len(weights)
    if refs is not None:
        refs = list(refs)
        if len(refs) != n_layers:
            raise ValueError(f"refs has {len(refs)} entries for {n_layers} layers")
    axes = _per_layer_axes(neuron_axis, n_layers)
    lam = float(lam)
    terms = []
    grads = []
    for layer in range(n_layers):
        sim, g = similarity_loss_and_grad(
            weights[layer], neuron_axis=axes[layer], zero_tol=zero_tol
        )
        terms.append(sim)
        ref = None if refs is None else refs[layer]
        if ref is not None:
            pen, g_pen = weight_sum_penalty_and_grad(
                weights[layer], ref, form=form, statistic=statistic
            )
            terms.append(lam * pen)
            with np.errstate(all="ignore"):
                g = g + lam * g_pen
        grads.append(g)
    # math.fsum refuses inf - inf (it raises); a plain sum gives nan there, like the maths.
    finite = all(math.isfinite(t) for t in terms)
    total = math.fsum(terms) if finite else float(sum(terms))
    return total, grads


def growth_objective(weights, refs, *, lam, form="squared_log", statistic="rms",
                     neuron_axis=0, zero_tol=None) -> float:
    """Eq. 5 summed over layers, as a Python float."""
    total, _ = _objective(weights, refs, lam, form, statistic, neuron_axis, zero_tol)
    return total


def growth_objective_and_grad(weights, refs, *, lam, form="squared_log", statistic="rms",
                              neuron_axis=0, zero_tol=None):
    """(Eq. 5 summed over layers, [d/dW_l for each layer]), each gradient in W_l's shape."""
    return _objective(weights, refs, lam, form, statistic, neuron_axis, zero_tol)


def relative_update(weights, similarity_grads, weight_sum_grads=None, *, lr, neuron_axis=0):
    """One relative (scale-free) phase step, neuron by neuron, in float64.

    Neuron ``i`` of a layer with ``n`` neurons moves by
    ``-lr * (n / 2) * (||w_i||^2 * g_i + rho^2 * h_i)``, with ``g`` the similarity
    gradient, ``h`` the (lambda-weighted) weight-sum gradient and ``rho^2`` the
    mean of the layer's squared neuron norms.  ``None`` stands for a missing term.
    """
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    axes = _per_layer_axes(neuron_axis, len(weights))
    if weight_sum_grads is None:
        weight_sum_grads = [None] * len(weights)
    updated = []
    for w, g, h, axis in zip(weights, similarity_grads, weight_sum_grads, axes, strict=True):
        w_moved = np.moveaxis(w, axis, 0)
        n = w_moved.shape[0]
        squared = [math.fsum(float(v) ** 2 for v in w_moved[i].ravel()) for i in range(n)]
        mean_squared = math.fsum(squared) / n
        g_moved = None if g is None else np.moveaxis(np.asarray(g, dtype=np.float64), axis, 0)
        h_moved = None if h is None else np.moveaxis(np.asarray(h, dtype=np.float64), axis, 0)
        new = w_moved.copy()
        for i in range(n):
            if g_moved is not None:
                new[i] -= lr * (n / 2.0) * squared[i] * g_moved[i]
            if h_moved is not None:
                new[i] -= lr * (n / 2.0) * mean_squared * h_moved[i]
        updated.append(np.moveaxis(new, 0, axis))
    return updated
