"""Eq. 4 of Sakai & Hotta: a penalty on the change of a layer's weights after growth.

The paper writes ``log(|sum W_cur / sum W_prev|)``. Read literally that term

* is unbounded below: minimising it drives ``sum W_cur`` to 0;
* has the same gradient ``1 / sum W_cur`` for every entry, a common shift that
  *raises* the pairwise cosines Eq. 2 is lowering;
* is ill-conditioned at initialisation, where ``sum W`` of a zero-mean layer
  sits near 0 and changes sign.

``form="literal"`` reproduces it exactly, for reproduction studies. The default,
``form="squared_log"`` with ``statistic="rms"``, is ``(log q(W) / q(W_ref))^2``
with ``q`` the root-mean-square weight. It is what the paper's prose asks for
("avoid sudden increases or decreases in weights") and is well posed: >= 0, 0
when the layer is unchanged, symmetric in the two arrays, smooth, finite for any
input (``q`` is floored at the dtype's smallest normal number). And its gradient
``2 log(q/q_ref) W / (size q^2)`` points along each row, orthogonal to the
similarity gradient, so the two terms of Eq. 5 never fight: it rescales the
layer and leaves every cosine untouched. ``form="abs_log"`` is
``|log q / q_ref|`` (a kink at 0, ``sign(0) = 0``); ``statistic="mean_abs"``
uses ``mean |W|``.
"""

from __future__ import annotations

import math
from typing import Any

from ._arrays import check_choice, check_partner, check_weight, compute_dtype

__all__ = ["FORMS", "STATISTICS", "weight_sum_penalty", "weight_sum_penalty_and_grad"]

FORMS = ("squared_log", "abs_log", "literal")
STATISTICS = ("rms", "mean_abs")


def _statistic(xp, x, statistic, tiny):
    """``(q floored at tiny, raw q > tiny)`` for the chosen positive statistic.

    ``q`` is computed from ``x / max|x|``, so no square or sum overflows or underflows
    for any finite ``x`` (``q <= max|x|`` is then representable too). Autodiff-safe: an
    all-zero ``x`` takes the square root of 1, not 0, and its ``q`` is a constant 0.
    """
    scale = xp.max(xp.abs(x))
    nonzero = scale > 0
    one = xp.ones_like(scale)
    scale = xp.where(nonzero, scale, one)
    scaled = x / scale
    if statistic == "rms":
        # The mean square of the scaled entries lies in [1 / size, 1] when x != 0.
        scaled_q = xp.sqrt(xp.where(nonzero, xp.mean(scaled * scaled), one))
    else:
        scaled_q = xp.mean(xp.abs(scaled))
    raw = xp.where(nonzero, scale * scaled_q, xp.zeros_like(scale))
    return xp.maximum(raw, tiny), raw > tiny


def _power_of_two(xp, exponent):
    """``2 ** exponent`` for an integer-valued float array (exact: a power of two)."""
    return xp.pow(xp.full_like(exponent, 2.0), exponent)


def _scaled_sum(xp, x):
    """``(m, k)`` with ``sum(x) = m * 2**k``: the sum of ``x / 2**k``, ``2**k`` near ``max|x|``.

    Dividing by a power of two is exact, so ``m`` is the plain sum's own rounding, shifted,
    and ``|m| <= size``: no overflow or underflow for any finite ``x``. An all-zero ``x``
    gives ``(0, 0)``. ``k`` is piecewise constant in ``x`` (zero derivative, never NaN).
    """
    top = xp.max(xp.abs(x))
    nonzero = top > 0
    safe_top = xp.where(nonzero, top, xp.ones_like(top))
    k = xp.where(nonzero, xp.floor(xp.log2(safe_top)), xp.zeros_like(top))
    return xp.sum(x / _power_of_two(xp, k)), k


def _times_power_of_two(xp, x, exponent):
    """``x * 2**exponent`` in two halves, so that neither power alone overflows."""
    half = xp.floor(exponent / 2)
    return (x * _power_of_two(xp, half)) * _power_of_two(xp, exponent - half)


def _literal(xp, cur, ref, with_grad):
    """Eq. 4 read literally, ``log|sum cur / sum ref|``, and ``d/d cur = 1 / sum cur``.

    Both sums are taken scaled (:func:`_scaled_sum`), so the value is right for every finite
    input even where a sum itself overflows or underflows; with sums in range it is the plain
    formula to its last rounding. A zero sum gives the maths' ``+-inf`` (NaN for 0/0).
    """
    m_cur, k_cur = _scaled_sum(xp, cur)
    m_ref, k_ref = _scaled_sum(xp, ref)
    one = xp.ones_like(m_cur)
    shift = k_cur - k_ref
    mantissas = xp.abs(m_cur / m_ref)
    live = (mantissas > 0) & xp.isfinite(mantissas)
    safe = xp.where(live, mantissas, one)
    # Where the whole ratio is a normal number, one log of it (exact to its last rounding);
    # elsewhere the value is far from 0, and the sum of two logs loses nothing that matters.
    finfo = xp.finfo(m_cur.dtype)
    exponent = shift + xp.floor(xp.log2(safe))
    in_range = live & (exponent < math.log2(finfo.max) - 1) & (
        exponent > math.log2(finfo.smallest_normal) + 1)
    ratio = _times_power_of_two(xp, safe, xp.where(in_range, shift, xp.zeros_like(shift)))
    split = xp.log(safe) + shift * math.log(2.0)
    value = xp.where(in_range, xp.log(ratio), split)
    value = xp.where(live, value, xp.log(mantissas))  # 0, inf or NaN: the maths' answer
    if not with_grad:
        return value, None
    inverse = _times_power_of_two(xp, one / m_cur, -k_cur)
    return value, xp.ones_like(cur) * inverse


def _value_and_grad(w, w_ref, form, statistic, with_grad):
    xp = check_weight(w, "w")
    check_partner(w, w_ref, "w", "w_ref")
    check_choice(form, FORMS, "form")
    check_choice(statistic, STATISTICS, "statistic")
    work = compute_dtype(xp, w.dtype)
    cur = xp.astype(w, work) if work != w.dtype else w
    ref = xp.astype(w_ref, work) if work != w_ref.dtype else w_ref

    def out(x):
        return x if x.dtype == w.dtype else xp.astype(x, w.dtype)

    if form == "literal":
        value, grad = _literal(xp, cur, ref, with_grad)
        return out(value), (out(grad) if with_grad else None)

    tiny = xp.finfo(work).smallest_normal
    q, q_live = _statistic(xp, cur, statistic, tiny)
    q_ref, _ = _statistic(xp, ref, statistic, tiny)
    log_ratio = xp.log(q) - xp.log(q_ref)
    if form == "squared_log":
        value, dvalue_dlogq = log_ratio * log_ratio, 2.0 * log_ratio
    else:
        value, dvalue_dlogq = xp.abs(log_ratio), xp.sign(log_ratio)
    if not with_grad:
        return out(value), None
    # A statistic at its floor (an all-zero layer) has no gradient; dividing by the
    # floor itself would overflow to inf and turn 0 * inf into NaN.
    q_safe = xp.where(q_live, q, xp.ones_like(q))
    dvalue_dq = xp.where(q_live, dvalue_dlogq / q_safe, xp.zeros_like(q))
    size = float(math.prod(cur.shape))
    if statistic == "rms":
        dq_dw = (cur / q_safe) / size  # size * q could overflow; cur / q cannot
    else:
        dq_dw = xp.sign(cur) / size
    return out(value), out(dq_dw * dvalue_dq)


def weight_sum_penalty(
    w: Any, w_ref: Any, *, form: str = "squared_log", statistic: str = "rms"
) -> Any:
    """Eq. 4 for one layer: how far ``w`` has moved from ``w_ref`` in overall size.

    ``w_ref`` is the snapshot the change is measured against (the weights right
    after growth, or those of the previous step); it must match ``w`` in
    library, device and shape. See the module docstring for the forms.

    >>> import numpy as np, simcore
    >>> w = np.ones((2, 3))
    >>> float(simcore.weight_sum_penalty(w, w))
    0.0
    >>> round(float(simcore.weight_sum_penalty(2 * w, w)), 4)  # (log 2)^2
    0.4805
    >>> round(float(simcore.weight_sum_penalty(2 * w, w, form="literal")), 4)  # log 2
    0.6931
    """
    return _value_and_grad(w, w_ref, form, statistic, with_grad=False)[0]


def weight_sum_penalty_and_grad(
    w: Any, w_ref: Any, *, form: str = "squared_log", statistic: str = "rms"
) -> tuple[Any, Any]:
    """Eq. 4 and its gradient with respect to ``w`` (``w_ref`` is held constant)."""
    return _value_and_grad(w, w_ref, form, statistic, with_grad=True)
