"""Private helpers of the oracle: neuron rows, norms, the active mask, sign.

Layout contract: a neuron is one slice along ``neuron_axis``.  Its incoming weights are
flattened to one row by moving ``neuron_axis`` to axis 0 and reshaping to ``(n, d)`` in C
order.  Gradients go back through the inverse of exactly that mapping.
"""

from __future__ import annotations

import math
import operator

import numpy as np

# Relative threshold for "this row has a direction": float32 machine epsilon, always, for the
# reference, whatever the input dtype.
DEFAULT_ZERO_TOL = float(np.finfo(np.float32).eps)


def as_float64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def check_axis(ndim: int, neuron_axis) -> int:
    """Return neuron_axis normalised to [0, ndim); ValueError if out of range."""
    if isinstance(neuron_axis, (bool, np.bool_)):
        raise ValueError(f"neuron_axis must be an int, got {neuron_axis!r}")
    try:
        axis = operator.index(neuron_axis)
    except TypeError:
        raise ValueError(f"neuron_axis must be an int, got {neuron_axis!r}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(f"neuron_axis={axis} is out of range for an array with ndim={ndim}")
    return axis % ndim


def to_rows(w, neuron_axis):
    """Float64 ``(n, d)`` rows of w, plus what is needed to map a row gradient back."""
    w = as_float64(w)
    if w.ndim < 2:
        raise ValueError(f"weights must have ndim >= 2 (got ndim={w.ndim}, shape {w.shape})")
    axis = check_axis(w.ndim, neuron_axis)
    moved = np.moveaxis(w, axis, 0)
    rows = np.ascontiguousarray(moved).reshape(moved.shape[0], -1)
    return rows, (axis, moved.shape)


def from_rows(grad_rows: np.ndarray, layout) -> np.ndarray:
    """Inverse of ``to_rows``: ``(n, d)`` gradient back to the original shape and layout."""
    axis, moved_shape = layout
    return np.ascontiguousarray(np.moveaxis(grad_rows.reshape(moved_shape), 0, axis))


def norm(v: np.ndarray) -> float:
    """Euclidean norm of a 1-D float64 vector, scaled so that it neither under- nor overflows."""
    if v.size == 0:
        return 0.0
    s = float(np.max(np.abs(v)))
    if s == 0.0 or not math.isfinite(s):
        return s
    x = v / s
    return s * math.sqrt(float(np.dot(x, x)))


def resolve_zero_tol(zero_tol) -> float:
    if zero_tol is None:
        return DEFAULT_ZERO_TOL
    tol = float(zero_tol)
    if not tol >= 0.0:  # also rejects nan
        raise ValueError(f"zero_tol must be a number >= 0 or None, got {zero_tol!r}")
    return tol


def active_rows(rows: np.ndarray, zero_tol):
    """Row norms and the list of active row indices (r_i > zero_tol * max_k r_k, strict)."""
    tol = resolve_zero_tol(zero_tol)
    n = rows.shape[0]
    r = [norm(rows[i]) for i in range(n)]
    r_max = max(r) if n else 0.0
    threshold = tol * r_max
    active = [i for i in range(n) if r[i] > threshold]
    return r, active


def sign(x: float) -> float:
    """sign with sign(0) = 0 (minimum-norm subgradient of |x|)."""
    if x > 0.0:
        return 1.0
    if x < 0.0:
        return -1.0
    return 0.0
