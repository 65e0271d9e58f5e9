"""Oracle for the paper's Eq. 4 (weight-sum term) and its well-posed variants, with gradients.

The penalty compares a layer's current weights ``w`` with a reference ``w_ref`` (a constant: the
gradient is taken w.r.t. ``w`` only).  It does not depend on the neuron layout.

form="literal"      Eq. 4 exactly: ``log(|sum(w) / sum(w_ref)|)`` (natural log).
                    d/dw = 1 / sum(w) for every entry.  Unbounded below; +-inf or nan when a
                    sum is 0 (that is the maths; numpy warnings are silenced).
form="squared_log"  ``(log q(w) - log q(w_ref))^2``
form="abs_log"      ``|log q(w) - log q(w_ref)|``, d/dw = sign(l) * dlog q/dw, sign(0) = 0.

``statistic`` (the positive q, for the two well-posed forms):
"rms"       q = sqrt(mean(w^2)),  dlog q/dw = w / (size * q^2)
"mean_abs"  q = mean(|w|),        dlog q/dw = sign(w) / (size * q), sign(0) = 0

q is floored at ``tiny = np.finfo(np.float64).tiny`` so an all-zero array gives a large finite
value; while the raw q(w) is below the floor the gradient is 0.  Sums use math.fsum and the RMS
is computed with a max-|w| scaling, so neither under- nor overflows spoil the oracle.
``log q(w) - log q(w_ref)`` equals ``log(q(w)/q(w_ref))`` and is exactly 0 when q(w) == q(w_ref).
"""

from __future__ import annotations

import math

import numpy as np

from ._rows import as_float64, sign

FORMS = ("literal", "squared_log", "abs_log")
STATISTICS = ("rms", "mean_abs")

_TINY = float(np.finfo(np.float64).tiny)


def _check_args(w, w_ref, form, statistic):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    w = as_float64(w)
    w_ref = as_float64(w_ref)
    if w.shape != w_ref.shape:
        raise ValueError(f"w and w_ref must have the same shape, got {w.shape} and {w_ref.shape}")
    if w.size == 0:
        raise ValueError("w must not be empty")
    return w, w_ref


def _raw_statistic(w: np.ndarray, statistic: str) -> float:
    flat = w.reshape(-1)
    size = flat.size
    if statistic == "rms":
        s = float(np.max(np.abs(flat)))
        if s == 0.0 or not math.isfinite(s):
            return s
        scaled = flat / s
        return s * math.sqrt(math.fsum((scaled * scaled).tolist()) / size)
    # mean_abs
    return math.fsum(np.abs(flat).tolist()) / size


def _dlogq_dw(w: np.ndarray, q: float, statistic: str) -> np.ndarray:
    """d log q / d w (not floored: only called when q is at or above the floor)."""
    size = w.size
    if statistic == "rms":
        # d q/dw = w / (size q), so d log q / dw = w / (size q^2); divide in two steps.
        return (w / q) / (q * size)
    return np.sign(w) / (size * q)  # np.sign(0) == 0


def _penalty(w, w_ref, form, statistic, want_grad):
    w, w_ref = _check_args(w, w_ref, form, statistic)
    if form == "literal":
        s_cur = math.fsum(w.reshape(-1).tolist())
        s_ref = math.fsum(w_ref.reshape(-1).tolist())
        with np.errstate(all="ignore"):
            value = float(np.log(np.abs(np.float64(s_cur) / np.float64(s_ref))))
            grad = np.full(w.shape, np.float64(1.0) / np.float64(s_cur)) if want_grad else None
        return value, grad

    q_raw = _raw_statistic(w, statistic)
    q = max(q_raw, _TINY)
    q_ref = max(_raw_statistic(w_ref, statistic), _TINY)
    log_ratio = math.log(q) - math.log(q_ref)
    if form == "squared_log":
        value = log_ratio * log_ratio
        outer = 2.0 * log_ratio
    else:  # abs_log
        value = abs(log_ratio)
        outer = sign(log_ratio)
    if not want_grad:
        return value, None
    if q_raw < _TINY or outer == 0.0:
        return value, np.zeros(w.shape, dtype=np.float64)
    return value, outer * _dlogq_dw(w, q, statistic)


def weight_sum_penalty(w, w_ref, *, form="squared_log", statistic="rms") -> float:
    """Eq. 4 (form="literal") or a well-posed variant; returns a Python float."""
    value, _ = _penalty(w, w_ref, form, statistic, want_grad=False)
    return value


def weight_sum_penalty_and_grad(w, w_ref, *, form="squared_log", statistic="rms"):
    """(penalty, d penalty / d w) with the gradient in w's shape, float64; w_ref is constant."""
    return _penalty(w, w_ref, form, statistic, want_grad=True)
