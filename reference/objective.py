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


def relative_update(weights, grads, *, lr, neuron_axis=0):
    """One relative (scale-free) phase step, neuron by neuron, in float64.

    Neuron ``i`` of a layer with ``n`` neurons moves by
    ``-lr * (n / 2) * ||w_i||^2 * g_i``: its squared norm times its own gradient.
    """
    weights = [np.asarray(w, dtype=np.float64) for w in weights]
    axes = _per_layer_axes(neuron_axis, len(weights))
    updated = []
    for w, g, axis in zip(weights, grads, axes, strict=True):
        w_moved = np.moveaxis(w, axis, 0)
        g_moved = np.moveaxis(np.asarray(g, dtype=np.float64), axis, 0)
        n = w_moved.shape[0]
        new = np.empty_like(w_moved)
        for i in range(n):
            squared_norm = math.fsum(float(v) ** 2 for v in w_moved[i].ravel())
            new[i] = w_moved[i] - lr * (n / 2.0) * squared_norm * g_moved[i]
        updated.append(np.moveaxis(new, 0, axis))
    return updated
