"""``assert_close``: compare a backend's result with a NumPy expectation, metadata first.

In the spirit of SciPy's ``xp_assert_close``: a result of the wrong library,
dtype, shape or device is wrong even when its numbers happen to match, so those
are checked before any value is looked at.

Values pass when, element by element, ``|actual - expected| <= atol + rtol * |expected|``
(NaN matches NaN, an infinity matches the same infinity). The defaults per dtype
are in :data:`TOLERANCES`. The default ``atol`` is ``rtol`` times the largest
``|expected|`` entry (but at least the table's floor): the rounding error of an
entry built from sums of products scales with the whole array's magnitude, not
with the entry itself, so a purely element-relative test would fail on entries
that happen to be near zero.

>>> import numpy as np
>>> from simcore.testing import assert_close, get_backend
>>> numpy_backend = get_backend("numpy")
>>> assert_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0000001]),
...              backend=numpy_backend, dtype="float32")
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._backends import Backend

__all__ = ["TOLERANCES", "Tolerance", "assert_close", "max_error", "tolerance_for"]


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """``rtol`` and the smallest ``atol`` used for one dtype."""

    rtol: float
    atol_floor: float


#: Default tolerances per result dtype, for results computed from inputs of that
#: dtype and compared with the float64 reference *evaluated on the same
#: (already rounded) inputs*:
#:
#: ========= ======= ========== ==============================================
#: dtype     rtol    atol floor why
#: ========= ======= ========== ==============================================
#: float64   1e-10   1e-14      ~5e5 ulp: different summation orders only
#: float32   1e-5    1e-7       ~84 ulp (eps 1.2e-7): sums of up to ~100 terms
#: float16   2e-3    1e-4       ~2 ulp (eps 9.8e-4): the core computes in
#:                              float32 and rounds once on output
#: bfloat16  1e-2    1e-4       ~2.5 ulp (eps 3.9e-3): as float16
#: ========= ======= ========== ==============================================
#:
#: Integer and boolean results are compared exactly.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-10, atol_floor=1e-14),
    "float32": Tolerance(rtol=1e-5, atol_floor=1e-7),
    "float16": Tolerance(rtol=2e-3, atol_floor=1e-4),
    "bfloat16": Tolerance(rtol=1e-2, atol_floor=1e-4),
}


def tolerance_for(
    expected: Any, dtype: str, *, rtol: float | None = None, atol: float | None = None
) -> tuple[float, float]:
    """The ``(rtol, atol)`` :func:`assert_close` uses for ``expected`` in ``dtype``."""
    expected = np.asarray(expected, dtype=np.float64)
    table = TOLERANCES.get(dtype)
    if table is None:  # integers, booleans: exact
        return (0.0 if rtol is None else rtol), (0.0 if atol is None else atol)
    rtol = table.rtol if rtol is None else rtol
    if atol is None:
        finite = np.abs(expected[np.isfinite(expected)])
        scale = float(finite.max()) if finite.size else 0.0
        atol = max(table.atol_floor, rtol * scale)
    return rtol, atol


def max_error(actual: np.ndarray, expected: Any) -> float:
    """Largest ``|actual - expected|`` over entries where both are finite (NaN-aware)."""
    actual, expected = np.broadcast_arrays(
        np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    )
    both = np.isfinite(actual) & np.isfinite(expected)
    if not both.any():
        return 0.0
    return float(np.max(np.abs(actual[both] - expected[both])))


def _fail(message: str, err_msg: str) -> None:
    raise AssertionError(f"{message}\n{err_msg}" if err_msg else message)


def assert_close(
    actual: Any,
    expected: Any,
    *,
    backend: Backend,
    dtype: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    err_msg: str = "",
) -> None:
    """Assert ``actual`` (a ``backend`` array) matches ``expected`` (NumPy), metadata first.

    Checks, in order: ``array_namespace(actual) is backend.xp``; the dtype is
    ``dtype`` (a name; default: ``expected``'s NumPy dtype name); the shape is
    ``expected``'s; the device is ``backend.device``; then the values (see the
    module docstring and :data:`TOLERANCES`).
    """
    import array_api_compat

    expected = np.asarray(expected)
    try:
        namespace = array_api_compat.array_namespace(actual)
    except TypeError:
        _fail(f"expected a {backend.name} array, got {type(actual).__name__}", err_msg)
    if namespace is not backend.xp:
        _fail(
            f"namespace mismatch: result is a {namespace.__name__} array, "
            f"backend {backend.name!r} uses {backend.xp.__name__}",
            err_msg,
        )
    dtype = expected.dtype.name if dtype is None else dtype
    if actual.dtype != backend.dtype(dtype):
        _fail(f"dtype mismatch: got {actual.dtype}, expected {dtype}", err_msg)
    if tuple(actual.shape) != expected.shape:
        _fail(f"shape mismatch: got {tuple(actual.shape)}, expected {expected.shape}", err_msg)
    device = array_api_compat.device(actual)
    if device != backend.device:
        _fail(f"device mismatch: got {device}, expected {backend.device}", err_msg)

    got = backend.to_numpy(actual).astype(np.float64)
    want = expected.astype(np.float64)
    rtol, atol = tolerance_for(want, dtype, rtol=rtol, atol=atol)
    nan_mismatch = np.isnan(got) != np.isnan(want)
    with np.errstate(invalid="ignore"):
        inf_mismatch = (np.isinf(got) | np.isinf(want)) & (got != want) & ~np.isnan(want)
        finite = np.isfinite(got) & np.isfinite(want)
        bad_values = finite & ~(np.abs(got - want) <= atol + rtol * np.abs(want))
    bad = nan_mismatch | inf_mismatch | bad_values
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        _fail(
            f"{int(bad.sum())} of {bad.size} values differ beyond rtol={rtol:.3g}, atol={atol:.3g} "
            f"(max abs error {max_error(got, want):.3g}); first at {index}: "
            f"got {got[index]!r}, expected {want[index]!r}",
            err_msg,
        )
