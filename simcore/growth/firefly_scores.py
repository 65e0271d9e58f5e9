"""Closed-form Firefly gate gradients (Wu, Liu, Stone, Liu 2020), for adapters without autodiff.

Firefly scores a candidate by the gradient ``dL/dg`` of its gate at ``g = 1``
(:mod:`simcore.growth.firefly`, step 2). With autodiff an adapter takes it from
a gated forward pass; these give it from captured statistics instead:
:func:`split_gate_scores` gives ``delta_i^T S_i delta_i`` (the SSD splitting matrix),
which is the gate gradient to leading order in ``delta``;
:func:`new_neuron_gate_scores` gives the exact single-candidate gate gradient of a
new neuron whose consumer is dense or pointwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._arrays import check_choice, check_floating, compute_dtype, namespace_of
from .activations import resolve_first_derivative
from .ssd import REDUCTIONS, _as_bpd, hvp_from_statistics

__all__ = ["new_neuron_gate_scores", "split_gate_scores"]


def split_gate_scores(
    patches: Any,
    backprop: Any,
    preactivations: Any,
    directions: Any,
    *,
    activation: str | Callable[[Any, Any], Any] = "relu",
    bn_scale: Any = None,
    reduction: str = "sum",
) -> Any:
    """``delta_i^T S_i delta_i`` per neuron: the split candidates' gate gradient to leading order.

    With the split ``theta_i +/- g delta_i`` and halved outgoing weights the neuron's
    output is ``(sigma(z + g t) + sigma(z - g t)) / 2`` (``t = c delta . x``), whose
    ``g``-derivative at ``g = 1`` is ``t^2 sigma''(z) + O(t^4)``; so ``dL/dg`` at ``g = 1``
    is ``delta^T S delta + O(|delta|^4)`` with ``S`` the SSD splitting matrix
    (:func:`~simcore.growth.splitting_matrices`, same arguments). ``directions``:
    ``(n, d)`` rows. Never forms ``S``.

    >>> import numpy as np
    >>> x = np.asarray([[[1.0, 2.0]]])
    >>> split_gate_scores(x, np.ones((1, 1, 1)), np.zeros((1, 1, 1)), np.asarray([[0.0, 1.0]]),
    ...                   activation="softplus").tolist()
    [1.0]
    """
    hvp = hvp_from_statistics(patches, backprop, preactivations, activation=activation,
                              bn_scale=bn_scale, reduction=reduction)
    xp = namespace_of(directions, "directions")
    check_floating(xp, directions, "directions")
    if tuple(directions.shape) != (hvp.n, hvp.d):
        raise ValueError(f"directions must have shape ({hvp.n}, {hvp.d}), "
                         f"got {tuple(directions.shape)}")
    delta = xp.astype(directions, hvp.like.dtype)
    return xp.sum(delta * hvp(delta), axis=1)


def new_neuron_gate_scores(
    patches: Any,
    incoming: Any,
    outgoing: Any,
    consumer_backprop: Any,
    *,
    activation: str | Callable[[Any, Any], Any] = "relu",
    bn_scale: Any = None,
    reduction: str = "sum",
) -> Any:
    """Gate gradients ``dL/dg`` at ``g = 1`` of new neurons read by a dense or pointwise consumer.

    New neuron ``j`` computes ``h_j = sigma(g c_j u_j . x)`` (fresh BatchNorm: shift and
    mean 0, so ``c_j`` is its coefficient, 1 without BN; bias 0) and adds ``a_oj h_j`` to
    the consumer's pre-activation ``y_o`` at the same position. So::

        dL/dg_j = sum_{b,p} (sum_o dL/dy_{b,p,o} a_oj) sigma'(c_j u_j.x) c_j u_j.x

    (for ReLU, ``sigma'(z) z = sigma(z)``, so this is ``a_j . dL/da_j``: the outgoing
    weights dotted with their gradient). Exact when ``consumer_backprop`` is taken with
    the candidates in the network (the gated forward pass); from the unperturbed
    network it is off by ``O(outgoing scale)``. Layers with pooling, a depthwise conv or
    a spatial kernel between the new neuron and its consumer need autodiff instead.

    Args:
        patches: ``(B, P, d)`` (or ``(B, d)``) inputs of the producer.
        incoming: ``(K, d)`` candidate incoming rows ``u``.
        outgoing: ``(K, m)`` candidate outgoing weights ``a`` (row ``j``: what the
            consumer's ``m`` outputs read from new neuron ``j``).
        consumer_backprop: ``(B, P, m)`` ``dL/dy`` at the consumer's pre-activation.
        activation: a registered name or ``fn(xp, z) = sigma'(z)``.
        bn_scale: ``(K,)`` coefficients ``c_j`` or None.
        reduction: ``"sum"`` or ``"mean"`` over the batch, as in SSD.

    >>> import numpy as np
    >>> x = np.asarray([[[1.0, 1.0]]])
    >>> new_neuron_gate_scores(x, np.asarray([[1.0, 1.0]]), np.asarray([[3.0]]),
    ...                        np.asarray([[[-1.0]]]), activation="identity").tolist()
    [-6.0]
    """
    xp = namespace_of(patches, "patches")
    for other, name in ((incoming, "incoming"), (outgoing, "outgoing"),
                        (consumer_backprop, "consumer_backprop")):
        if namespace_of(other, name) is not xp:
            raise TypeError(f"{name} comes from a different array library than patches")
    for a, name in ((patches, "patches"), (incoming, "incoming"), (outgoing, "outgoing"),
                    (consumer_backprop, "consumer_backprop")):
        check_floating(xp, a, name)
    check_choice(reduction, REDUCTIONS, "reduction")
    d1 = resolve_first_derivative(activation)
    x = _as_bpd(xp, patches, "patches")
    g = _as_bpd(xp, consumer_backprop, "consumer_backprop")
    batch, positions, d = (int(s) for s in x.shape)
    if tuple(g.shape[:2]) != (batch, positions):
        raise ValueError("patches (B, P, d) and consumer_backprop (B, P, m) must agree in B and P, "
                         f"got {tuple(patches.shape)} and {tuple(consumer_backprop.shape)}")
    m = int(g.shape[2])
    if incoming.ndim != 2 or int(incoming.shape[1]) != d:
        raise ValueError(f"incoming must have shape (K, {d}), got {tuple(incoming.shape)}")
    k = int(incoming.shape[0])
    if tuple(outgoing.shape) != (k, m):
        raise ValueError(f"outgoing must have shape ({k}, {m}) (K new neurons x consumer "
                         f"outputs), got {tuple(outgoing.shape)}")
    work = compute_dtype(xp, xp.result_type(x.dtype, incoming.dtype, g.dtype, outgoing.dtype))
    xm = xp.reshape(xp.astype(x, work), (batch * positions, d))
    gm = xp.reshape(xp.astype(g, work), (batch * positions, m))
    pre = xp.matmul(xm, xp.permute_dims(xp.astype(incoming, work), (1, 0)))      # (M, K): u.x
    if bn_scale is not None:
        if namespace_of(bn_scale, "bn_scale") is not xp:
            raise TypeError("bn_scale comes from a different array library than patches")
        if tuple(bn_scale.shape) != (k,):
            raise ValueError(f"bn_scale must have shape ({k},), got {tuple(bn_scale.shape)}")
        pre = pre * xp.astype(bn_scale, work)
    upstream = xp.matmul(gm, xp.permute_dims(xp.astype(outgoing, work), (1, 0)))  # (M, K)
    scores = xp.sum(upstream * d1(xp, pre) * pre, axis=0)
    return scores / batch if reduction == "mean" else scores

