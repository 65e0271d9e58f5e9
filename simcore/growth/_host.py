"""Host-side inputs of the growth maths: index lists, score vectors and random generators.

Growth decisions (which neurons, how many) are Python-level facts that size the new arrays, so
they live on the host: indices and scores from any Array-API library are copied to NumPy here
(a device sync, once per growth), and random numbers come from a ``numpy.random.Generator`` and
are moved to the target library and device afterwards.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import array_api_compat
import numpy as np

from .._arrays import check_int


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Copy an array of any Array-API library (or a nested sequence) to a NumPy array."""
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        return np.asarray(x)
    if not array_api_compat.is_array_api_obj(x):
        raise TypeError(f"{name} must be an array or a sequence, got {type(x).__name__}")
    module = type(x).__module__
    if hasattr(x, "get") and module.startswith("cupy"):
        return np.asarray(x.get())  # CuPy refuses implicit host copies
    if module.startswith("torch"):
        x = x.detach().cpu()  # DLPack refuses tensors that require grad or live on a GPU
    try:
        return np.from_dlpack(x)
    except Exception:  # noqa: BLE001 - libraries without a CPU DLPack export
        return np.asarray(x)


def as_index(value: Any, name: str) -> int:
    """A Python int from an int-like value (not bool, not float)."""
    return check_int(value, name)


def as_indices(values: Any, upper: int, name: str) -> tuple[int, ...]:
    """A tuple of ints in ``[0, upper)`` from a sequence or 1-d integer array."""
    arr = to_numpy(values, name) if not isinstance(values, (list, tuple)) else None
    if arr is not None:
        if arr.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
        items = [int(v) for v in arr]
    else:
        items = [as_index(v, f"{name}[{i}]") for i, v in enumerate(values)]
    for i, v in enumerate(items):
        if not 0 <= v < upper:
            raise ValueError(f"{name}[{i}]={v} is out of range for {upper} channels")
    return tuple(items)


def as_generator(rng: Any) -> np.random.Generator:
    """``numpy.random.Generator`` from a Generator (used as is) or an int seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, (bool, np.bool_)):
        if int(rng) < 0:
            raise ValueError(f"rng seed must be non-negative, got {int(rng)}")
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}"
    )


def symmetric_uniform(gen: np.random.Generator, scale: float, shape: tuple[int, ...]) -> np.ndarray:
    """``U(-scale, scale)`` draws; the same numbers as ``gen.uniform(-scale, scale, shape)``.

    NumPy refuses a range ``high - low`` that overflows (``OverflowError``): past half the
    largest float the unit interval's draws are scaled instead (the same distribution).
    """
    if math.isfinite(2.0 * scale):
        return gen.uniform(-scale, scale, shape)
    return scale * gen.uniform(-1.0, 1.0, shape)
