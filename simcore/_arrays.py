"""Argument checks and layout helpers shared by every core function.

Everything here looks only at types, shapes and dtypes, never at values, so the
functions that use it keep no value-dependent Python control flow and trace
under ``jax.jit``. Errors name the offending argument.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import array_api_compat
import numpy as np

from ._types import Array, Namespace


def namespace_of(x: Array, name: str) -> Namespace:
    """Return the array-API namespace of ``x``, or raise ``TypeError`` naming ``name``."""
    if not array_api_compat.is_array_api_obj(x) or isinstance(x, (bool, int, float, complex)):
        raise TypeError(
            f"{name} must be an array (NumPy, PyTorch, JAX, CuPy, ...), got {type(x).__name__}"
        )
    return array_api_compat.array_namespace(x)


def is_half(xp: Namespace, dtype: Any) -> bool:
    return xp.finfo(dtype).bits < 32


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """Dtype the maths runs in: float16/bfloat16 inputs are promoted to float32."""
    return xp.float32 if is_half(xp, dtype) else dtype


def check_floating(xp: Namespace, x: Array, name: str) -> None:
    """``x`` must have a real floating dtype."""
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")


def check_weight(x: Array, name: str = "w") -> Namespace:
    """Validate one weight array (a layer's kernel) and return its namespace."""
    xp = namespace_of(x, name)
    check_floating(xp, x, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (neurons x fan-in), got shape {tuple(x.shape)}"
        )
    if any(int(s) == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return xp


def normalize_axis(axis: Any, ndim: int, name: str = "neuron_axis") -> int:
    """Return ``axis`` as a non-negative int, or raise naming ``name``."""
    axis = check_int(axis, name)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimensions")
    return axis % ndim


def device_of(x: Array) -> Any:
    """The device of ``x``; ``None`` where it cannot be read (a JAX tracer under jit)."""
    try:
        return array_api_compat.device(x)
    except Exception:  # noqa: BLE001 - tracers and exotic arrays have no readable device
        return None


def check_partner(w: Array, other: Array, name: str, other_name: str) -> None:
    """``other`` must come from the same library, live on the same device, and match in shape."""
    xp = array_api_compat.array_namespace(w)
    xp_other = namespace_of(other, other_name)
    if xp_other is not xp:
        raise TypeError(
            f"{other_name} comes from a different array library than {name} "
            f"({type(other).__module__}.{type(other).__name__} vs "
            f"{type(w).__module__}.{type(w).__name__})"
        )
    check_floating(xp, other, other_name)
    if tuple(other.shape) != tuple(w.shape):
        raise ValueError(
            f"{other_name} must have the shape of {name}: {tuple(other.shape)} != {tuple(w.shape)}"
        )
    dev, dev_other = device_of(w), device_of(other)
    if dev is not None and dev_other is not None and dev != dev_other:
        raise ValueError(f"{other_name} is on {dev_other} but {name} is on {dev}")


def to_rows(xp: Namespace, w: Array, axis: int) -> Array:
    """View ``w`` as an ``(n, d)`` matrix with one row per neuron (neuron axis moved first)."""
    if axis != 0:
        order = (axis, *(i for i in range(w.ndim) if i != axis))
        w = xp.permute_dims(w, order)
    return xp.reshape(w, (w.shape[0], -1))


def from_rows(xp: Namespace, rows: Array, shape: Sequence[int], axis: int) -> Array:
    """Inverse of :func:`to_rows`: give ``rows`` the layout of an array of ``shape``."""
    shape = tuple(int(s) for s in shape)
    if axis == 0 and tuple(rows.shape) == shape:
        return rows
    moved = (shape[axis], *(s for i, s in enumerate(shape) if i != axis))
    out = xp.reshape(rows, moved)
    if axis != 0:
        inverse = [0] * len(shape)
        order = (axis, *(i for i in range(len(shape)) if i != axis))
        for position, source in enumerate(order):
            inverse[source] = position
        out = xp.permute_dims(out, tuple(inverse))
    return out


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int (bools and floats refused), at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(value: Any, name: str, *, minimum: float = 0.0) -> float:
    """``value`` as a finite Python float, at least ``minimum`` (bools refused)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be finite and >= {minimum:g}, got {value}")
    return value


def check_block_size(block_size: Any) -> int | None:
    """A positive int tile size, or ``None`` (the default tile)."""
    if block_size is None:
        return None
    try:
        return check_int(block_size, "block_size", minimum=1)
    except (TypeError, ValueError) as error:
        message = f"block_size must be a positive int or None, got {block_size!r}"
        raise type(error)(message) from None


def check_choice(value: Any, allowed: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``allowed``, else a ``ValueError`` listing them."""
    if value not in allowed:
        expected = ", ".join(map(repr, allowed))
        raise ValueError(f"unknown {name} {value!r}; expected one of {expected}")
    return value


def check_zero_tol(zero_tol: Any) -> float | None:
    """A relative zero-row tolerance in ``[0, 1)``, or ``None`` (the default)."""
    if zero_tol is None:
        return None
    if isinstance(zero_tol, bool) or not isinstance(zero_tol, numbers.Real):
        raise TypeError(f"zero_tol must be a float or None, got {type(zero_tol).__name__}")
    zero_tol = float(zero_tol)
    if not 0.0 <= zero_tol < 1.0:
        raise ValueError(f"zero_tol must lie in [0, 1), got {zero_tol}")
    return zero_tol
