"""The lowest eigenpair of each of many symmetric matrices: SSD's solvers.

:func:`min_eigenpairs` solves formed matrices (LAPACK's ``syevr`` through SciPy where it can,
else ``eigh``); :func:`rayleigh_min_direction` minimises the Rayleigh quotient from matrix-free
products (SSD's fast mode); :mod:`.ssd_exact` runs Lanczos on the same products. Each returned
vector is signed so its largest-magnitude entry is positive, so results agree across backends.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

from .._arrays import (
    check_floating,
    check_int,
    compute_dtype,
    device_of,
    namespace_of,
)
from ._host import as_generator, to_numpy

__all__ = ["min_eigenpairs", "rayleigh_min_direction"]


def _canonical_sign(xp: Any, v: Any) -> Any:
    """Flip each row so that its entry of largest magnitude (first on ties) is positive."""
    d = v.shape[-1]
    pivot_index = xp.argmax(xp.abs(v), axis=-1)
    columns = xp.arange(d, device=device_of(v))
    hit = columns[None, :] == xp.astype(pivot_index, columns.dtype)[:, None]
    pivot = xp.sum(xp.where(hit, v, xp.zeros_like(v)), axis=-1)
    return xp.where(pivot[:, None] < 0, -v, v)


def min_eigenpairs(s: Any) -> tuple[Any, Any]:
    """``(lambda_min (n,), v_min (n, d))`` of symmetric matrices ``s`` of shape ``(n, d, d)``.

    Uses ``linalg.eigh`` (ascending eigenvalues) in ``s``'s dtype on each matrix scaled to a
    largest entry of 1: LAPACK's float32 ``eigh`` fails to converge on the low-rank, tiny-scaled
    (1e-8) splitting matrices of trained networks, and a scale changes no eigenvector. Where it
    still fails, the matrices are solved in float64 (twice the time of float32 on a CPU).
    Each unit eigenvector is signed so that its largest-magnitude entry is positive, so results
    are deterministic across backends (up to genuinely repeated eigenvalues, whose eigenvectors
    are not unique).

    >>> import numpy as np
    >>> lam, v = min_eigenpairs(np.asarray([[[2.0, 0.0], [0.0, -1.0]]]))
    >>> lam.tolist(), v.tolist()
    ([-1.0], [[0.0, 1.0]])
    """
    xp = namespace_of(s, "s")
    check_floating(xp, s, "s")
    if s.ndim != 3 or s.shape[1] != s.shape[2] or int(s.shape[1]) == 0:
        raise ValueError(f"s must have shape (n, d, d) with d > 0, got {tuple(s.shape)}")
    work = compute_dtype(xp, s.dtype)
    s = xp.astype(s, work)
    scale = xp.max(xp.abs(xp.reshape(s, (s.shape[0], -1))), axis=1)
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    scaled = s / scale[:, None, None]
    lowest = _lowest_on_cpu(scaled)
    if lowest is not None:
        vals, vecs = (xp.asarray(a, dtype=work, device=device_of(s)) for a in lowest)
        return vals * scale, _canonical_sign(xp, vecs)
    try:
        vals, vecs = xp.linalg.eigh(scaled)
    except (ValueError, RuntimeError):  # NumPy's LinAlgError / torch's _LinAlgError
        if work == xp.float64:
            raise
        vals, vecs = (xp.astype(a, work) for a in xp.linalg.eigh(xp.astype(scaled, xp.float64)))
    return vals[:, 0] * scale, _canonical_sign(xp, vecs[:, :, 0])


@functools.cache
def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries (found once: a scan takes ~10 ms), or
    None without SciPy and threadpoolctl."""
    try:
        import scipy.linalg  # noqa: F401
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _lowest_on_cpu(s: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The lowest eigenpair of each matrix from LAPACK's ``syevr`` (SciPy), or None.

    ``syevr`` computes one eigenpair after the tridiagonal reduction instead of all of them:
    3-5x faster than a full ``eigh`` at d = 250-450 (float32 on one core). Used for NumPy and
    CPU torch arrays when SciPy and threadpoolctl are installed (both come with
    scikit-learn); threadpoolctl holds SciPy's BLAS to one thread, since a training loop
    usually owns the cores (two BLAS pools competing for them made it 20x slower). Where
    ``syevr`` fails in float32, it runs in float64.
    """
    if not (array_api_compat.is_numpy_array(s)
            or (array_api_compat.is_torch_array(s) and s.device.type == "cpu")):
        return None
    controller = _blas_controller()
    if controller is None:
        return None
    import scipy.linalg

    host = to_numpy(s, "s")
    vals = np.empty(host.shape[0], dtype=host.dtype)
    vecs = np.empty(host.shape[:2], dtype=host.dtype)
    with controller.limit(limits=1, user_api="blas"):
        for i, matrix in enumerate(host):
            try:
                val, vec = scipy.linalg.eigh(matrix, subset_by_index=[0, 0], driver="evr",
                                             check_finite=False)
            except np.linalg.LinAlgError:
                val, vec = scipy.linalg.eigh(matrix.astype(np.float64), subset_by_index=[0, 0],
                                             driver="evr", check_finite=False)
            vals[i], vecs[i] = val[0], vec[:, 0]
    return vals, vecs


def _check_count(value: Any, name: str, minimum: int) -> int:
    return check_int(value, name, minimum=minimum)


def _unit_rows(xp: Any, v: Any) -> Any:
    norms = xp.sqrt(xp.sum(v * v, axis=1))
    return v / xp.where(norms > 0, norms, xp.ones_like(norms))[:, None]


def rayleigh_min_direction(
    hvp: Callable[[Any], Any],
    n: int,
    d: int,
    *,
    rng: np.random.Generator | int | None = None,
    like: Any = None,
    init: Any = None,
    steps: int = 200,
    lr: float = 0.5,
    power_steps: int = 30,
) -> tuple[Any, Any]:
    """Minimise ``v_i^T S_i v_i / v_i^T v_i`` for all ``n`` neurons from ``hvp(V) = [S_i v_i]``.

    Returns ``(lambda (n,), v (n, d))``: the Rayleigh quotients reached and the unit
    directions, signed like :func:`min_eigenpairs`.

    Each step is Riemannian gradient descent on the unit sphere,
    ``v <- normalise(v - (lr / rho_i) (S_i v - q_i v))`` with ``q_i`` the current
    quotient and ``rho_i`` a power-iteration estimate (``power_steps`` products) of
    ``||S_i||``. With ``lr <= 0.5`` a step is a shifted power iteration whose
    dominant eigenvalue belongs to ``lambda_min`` even if ``rho_i`` is under-estimated
    by up to 2x, so it converges to the minimum eigenvector whenever the start has
    a component along it; the error shrinks by about ``1 - lr * gap_i / rho_i`` per
    step (``gap_i``: the distance from ``lambda_min`` to the next eigenvalue). The
    reference code runs RMSprop (lr 1e-3) on the same gradient for 10 epochs; this
    step size needs no tuning to the scale of ``S``.

    Start: ``init`` (an ``(n, d)`` array), or ``rng.uniform(-0.1, 0.1, (n, d))``
    (the reference code's initialisation; ``rng`` a Generator or an int seed) placed
    like ``like`` (default: ``hvp.like`` when ``hvp`` has one, as the result of
    :func:`hvp_from_statistics` does).

    >>> import numpy as np
    >>> s = np.asarray([[[2.0, 0.0], [0.0, -1.0]]])
    >>> lam, v = rayleigh_min_direction(lambda v: (s @ v[:, :, None])[:, :, 0], 1, 2,
    ...                                 rng=np.random.default_rng(0), like=s)
    >>> round(float(lam[0]), 6), np.round(np.abs(v), 6).tolist()
    (-1.0, [[0.0, 1.0]])
    """
    if not callable(hvp):
        raise TypeError(f"hvp must be callable as hvp(V) -> S V, got {type(hvp).__name__}")
    n = _check_count(n, "n", 1)
    d = _check_count(d, "d", 1)
    steps = _check_count(steps, "steps", 0)
    power_steps = _check_count(power_steps, "power_steps", 1)
    lr = float(lr)
    if not 0.0 < lr <= 1.0:
        raise ValueError(f"lr must lie in (0, 1] (0.5 or less is safe), got {lr}")
    if init is not None:
        xp = namespace_of(init, "init")
        check_floating(xp, init, "init")
        if tuple(init.shape) != (n, d):
            raise ValueError(f"init must have shape ({n}, {d}), got {tuple(init.shape)}")
        v = xp.astype(init, compute_dtype(xp, init.dtype))
    else:
        like = getattr(hvp, "like", None) if like is None else like
        if like is None:
            raise TypeError("pass like= (an array giving the namespace, dtype and device) or init=")
        if rng is None:
            raise TypeError("rng (a numpy.random.Generator or an int seed) is required "
                            "without init=")
        rng = as_generator(rng)
        xp = namespace_of(like, "like")
        check_floating(xp, like, "like")
        start = rng.uniform(-0.1, 0.1, size=(n, d))
        v = xp.asarray(start, dtype=compute_dtype(xp, like.dtype), device=device_of(like))

    def product(u: Any) -> Any:
        su = hvp(u)
        if tuple(su.shape) != (n, d):
            raise ValueError(f"hvp must return shape ({n}, {d}), got {tuple(su.shape)}")
        return xp.astype(su, u.dtype)

    v = _unit_rows(xp, v)
    probe = v
    # power_steps >= 1 (checked above): the first step is taken outside the loop so that rho
    # always holds an estimate
    sp = product(probe)
    rho = xp.sqrt(xp.sum(sp * sp, axis=1))
    for _ in range(power_steps - 1):
        probe = _unit_rows(xp, sp)
        sp = product(probe)
        rho = xp.sqrt(xp.sum(sp * sp, axis=1))
    probe = _unit_rows(xp, sp)
    # Neurons with S_i = 0 (rho 0) have zero gradient; any finite step size is fine there.
    step = lr / xp.where(rho > 0, rho, xp.ones_like(rho))
    for _ in range(steps):
        sv = product(v)
        q = xp.sum(v * sv, axis=1)
        v = _unit_rows(xp, v - step[:, None] * (sv - q[:, None] * v))
    v = _canonical_sign(xp, v)
    return xp.sum(v * product(v), axis=1), v
