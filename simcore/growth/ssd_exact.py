"""SSD's exact mode without forming every splitting matrix: Lanczos on Hessian-vector products.

Forming the ``n`` splitting matrices of a layer costs ``~2 n M d^2`` flops for ``M`` (sample,
position) rows and solving them ``~4/3 n d^3`` more (:func:`~simcore.growth.ssd.splitting_matrices`,
:func:`~simcore.growth.eigen.min_eigenpairs`). The lowest eigenpair alone needs far less: Lanczos
with full reorthogonalisation, run for all neurons at once from the products
``V -> [S_i v_i]_i`` (:func:`~simcore.growth.ssd.hvp_from_statistics`, two ``(M, d) x (d, n)``
GEMMs, ``4 M d n`` flops), reaches a residual ``||S_i v - lambda v||`` of a few float32 ulps of
``||S_i||`` in 13-24 steps on the trained quick-preset VGG16 (d = 150-414: docs/design.md), about
``100 M d n`` flops instead of ``2 M d^2 n``. Every neuron's result is checked by one more product
(the residual of the returned pair); a neuron whose check fails, or that needs more than
``max_steps`` steps, is solved the direct way, so the result is the lowest eigenpair to the
solver's precision either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .._arrays import check_floating, check_int, compute_dtype, device_of, namespace_of
from ._host import as_generator, to_numpy
from .eigen import _blas_controller, _canonical_sign, _unit_rows, min_eigenpairs

__all__ = ["LANCZOS_MIN_DIM", "exact_min_eigenpairs", "lanczos_min_eigenpairs"]

#: Below this fan-in, forming the matrices is about as cheap as the Lanczos steps and exact
#: mode solves them directly.
LANCZOS_MIN_DIM = 96
#: Residual tolerance in units of the dtype's machine epsilon, relative to ``||S_i||``; LAPACK's
#: ``eigh`` itself is accurate to a few of them (measured: 2-4 in float32).
TOLERANCE_EPS = 16


def default_max_steps(d: int) -> int:
    """Lanczos steps before a neuron falls back to the direct solve: ``d / 8`` (at least 32).

    ``d / 8`` steps cost ``M d^2 / 2`` flops, a quarter of forming ``S_i``: the most a neuron that
    falls back wastes. Trained networks' matrices need 13-24 steps at d = 150-414; isotropic
    random rows (no dominant directions) need about d and fall back.
    """
    return min(d, max(32, d // 8))


def lanczos_min_eigenpairs(
    hvp: Callable[[Any], Any],
    n: int,
    d: int,
    *,
    rng: np.random.Generator | int | None = None,
    like: Any = None,
    tol: float | None = None,
    max_steps: int | None = None,
) -> tuple[Any, Any, np.ndarray]:
    """The lowest eigenpair of each ``S_i`` from ``hvp(V) = [S_i v_i]_i`` (Lanczos, all at once).

    Returns ``(lambda (n,), v (n, d), converged)``: Rayleigh quotients, unit vectors signed like
    :func:`~simcore.growth.eigen.min_eigenpairs`, and a NumPy bool array saying which pairs passed
    the check ``||S_i v - lambda v|| <= 2 tol ||S_i||`` (``||S_i||`` estimated by the largest Ritz
    value). ``tol`` defaults to ``16 * eps`` of the dtype; each neuron stops when its Lanczos
    residual estimate reaches ``tol`` or after ``max_steps`` steps (default
    :func:`default_max_steps`). Starts are ``rng.standard_normal((n, d))`` placed like ``like``
    (default ``hvp.like``). Each basis vector is reorthogonalised twice against all earlier ones
    (float32 Lanczos without it finds spurious copies of converged eigenvalues).

    >>> import numpy as np
    >>> s = np.asarray([[[2.0, 1.0], [1.0, -1.0]]])
    >>> lam, v, ok = lanczos_min_eigenpairs(lambda v: (s @ v[:, :, None])[:, :, 0], 1, 2,
    ...                                     rng=0, like=s)
    >>> round(float(lam[0]), 6), bool(ok[0])                 # (1 - sqrt(13)) / 2
    (-1.302776, True)
    """
    if not callable(hvp):
        raise TypeError(f"hvp must be callable as hvp(V) -> S V, got {type(hvp).__name__}")
    n = check_int(n, "n", minimum=1)
    d = check_int(d, "d", minimum=1)
    steps = default_max_steps(d) if max_steps is None else check_int(max_steps, "max_steps",
                                                                     minimum=1)
    steps = min(steps, d)  # d orthogonal vectors span everything
    like = getattr(hvp, "like", None) if like is None else like
    if like is None:
        raise TypeError("pass like= (an array giving the namespace, dtype and device)")
    if rng is None:
        raise TypeError("rng (a numpy.random.Generator or an int seed) is required")
    xp = namespace_of(like, "like")
    check_floating(xp, like, "like")
    dtype = compute_dtype(xp, like.dtype)
    tol = TOLERANCE_EPS * float(xp.finfo(dtype).eps) if tol is None else float(tol)
    if not tol > 0.0:
        raise ValueError(f"tol must be > 0, got {tol}")

    def product(u: Any) -> Any:
        su = hvp(u)
        if tuple(su.shape) != (n, d):
            raise ValueError(f"hvp must return shape ({n}, {d}), got {tuple(su.shape)}")
        return xp.astype(su, dtype)

    device = device_of(like)
    start = as_generator(rng).standard_normal((n, d))
    q = _unit_rows(xp, xp.asarray(start, dtype=dtype, device=device))
    basis = _Basis(xp, n, d, dtype, device)
    basis.append(q)
    alpha, beta = np.zeros((n, steps)), np.zeros((n, steps))
    # Per neuron, frozen when it converges: Krylov size, lowest Ritz value and its coefficients
    # (a broken-down neuron's later basis vectors are zero and would add spurious Ritz values).
    size = np.zeros(n, dtype=np.int64)
    failed = np.zeros(n, dtype=bool)
    norm = np.zeros(n)
    coefficients = np.zeros((n, steps))
    previous = xp.zeros_like(q)
    for k in range(1, steps + 1):
        w = product(q)
        a = xp.sum(q * w, axis=1)
        b_previous = xp.asarray(beta[:, k - 2] if k > 1 else np.zeros(n), dtype=dtype,
                                device=device)
        w = w - a[:, None] * q - b_previous[:, None] * previous
        w = basis.orthogonalise(basis.orthogonalise(w))
        b = xp.sqrt(xp.sum(w * w, axis=1))
        alpha[:, k - 1] = to_numpy(a, "alpha")
        beta[:, k - 1] = to_numpy(b, "beta")
        # A non-finite product stops its neuron: the direct solve then sees the same input.
        broken = (size == 0) & ~(np.isfinite(alpha[:, k - 1]) & np.isfinite(beta[:, k - 1]))
        failed |= broken
        size[broken] = k
        open_ = np.flatnonzero(size == 0)
        if open_.size == 0:
            break
        ritz, vectors = _eigh_small(_tridiagonal(alpha[open_, :k], beta[open_, :k - 1]))
        scale = np.abs(ritz).max(axis=1)
        residual = np.abs(beta[open_, k - 1] * vectors[:, -1, 0])
        done = (residual <= tol * scale) | (k == steps)
        hit = open_[done]
        size[hit] = k
        norm[hit] = scale[done]
        coefficients[hit, :k] = vectors[done, :, 0]
        if done.all():
            break
        previous = q
        q = w / xp.where(b > 0, b, xp.ones_like(b))[:, None]
        basis.append(q)
    v = _unit_rows(xp, basis.combine(coefficients))
    sv = product(v)
    lam = xp.sum(v * sv, axis=1)
    r = sv - lam[:, None] * v
    checked = to_numpy(xp.sqrt(xp.sum(r * r, axis=1)), "residual")
    converged = ~failed & (checked <= 2.0 * tol * np.maximum(norm, np.abs(to_numpy(lam, "lambda"))))
    return lam, _canonical_sign(xp, v), converged


class _Basis:
    """Lanczos vectors of all neurons in blocks of shape ``(n, BLOCK, d)``, zero past the last.

    A step reads only the blocks in use, and every block has one shape: JAX compiles each
    operation once, not once per step. A slot is set with a one-hot mask, not by assignment
    (JAX arrays take none).
    """

    BLOCK = 16

    def __init__(self, xp: Any, n: int, d: int, dtype: Any, device: Any):
        self.xp, self.n, self.d, self.dtype, self.device = xp, n, d, dtype, device
        self.blocks: list[Any] = []
        self.count = 0
        self.slots = xp.arange(self.BLOCK, device=device)

    def append(self, q: Any) -> None:
        xp = self.xp
        slot = self.count % self.BLOCK
        if slot == 0:
            self.blocks.append(xp.zeros((self.n, self.BLOCK, self.d), dtype=self.dtype,
                                        device=self.device))
        self.blocks[-1] = xp.where((self.slots == slot)[None, :, None], q[:, None, :],
                                   self.blocks[-1])
        self.count += 1

    def orthogonalise(self, w: Any) -> Any:
        """One classical Gram-Schmidt pass of each ``w[i]`` against neuron ``i``'s vectors."""
        xp = self.xp
        overlaps = [xp.matmul(block, w[:, :, None]) for block in self.blocks]  # (n, BLOCK, 1)
        for block, overlap in zip(self.blocks, overlaps, strict=True):
            w = w - xp.matmul(xp.permute_dims(overlap, (0, 2, 1)), block)[:, 0, :]
        return w

    def combine(self, coefficients: np.ndarray) -> Any:
        """``sum_j coefficients[i, j] * vector_j`` for each neuron ``i`` (``(n, >= count)``)."""
        xp = self.xp
        width = len(self.blocks) * self.BLOCK
        c = np.zeros((self.n, width))
        used = min(width, coefficients.shape[1])
        c[:, :used] = coefficients[:, :used]
        total = None
        for j, block in enumerate(self.blocks):
            part = xp.asarray(c[:, None, j * self.BLOCK:(j + 1) * self.BLOCK], dtype=self.dtype,
                              device=self.device)
            term = xp.matmul(part, block)[:, 0, :]
            total = term if total is None else total + term
        return total


def _eigh_small(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``numpy.linalg.eigh`` of small matrices with NumPy's BLAS held to one thread (where
    threadpoolctl is installed): with its threads waking on cores busy with torch's, a 35 x 35
    matrix took 25-35 ms instead of 0.1 ms."""
    controller = _blas_controller()
    if controller is None:
        return np.linalg.eigh(t)
    with controller.limit(limits=1, user_api="blas"):
        return np.linalg.eigh(t)


def _tridiagonal(alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``(m, k, k)`` symmetric tridiagonal matrices from diagonals ``(m, k)`` and ``(m, k-1)``."""
    m, k = alpha.shape
    t = np.zeros((m, k, k))
    i = np.arange(k)
    t[:, i, i] = alpha
    t[:, i[:-1], i[1:]] = beta
    t[:, i[1:], i[:-1]] = beta
    return t


def exact_min_eigenpairs(
    hvp: Callable[[Any], Any],
    n: int,
    d: int,
    form: Callable[[np.ndarray], Any],
    *,
    rng: np.random.Generator | int,
    like: Any = None,
    tol: float | None = None,
    max_steps: int | None = None,
) -> tuple[Any, Any]:
    """``(lambda_min (n,), v_min (n, d))`` of every splitting matrix, Lanczos first.

    ``form(index)`` returns the ``(len(index), d, d)`` splitting matrices of the neurons
    ``index`` (a sorted NumPy int array): all of them when ``d < LANCZOS_MIN_DIM``, else only
    those :func:`lanczos_min_eigenpairs` left unconverged, which
    :func:`~simcore.growth.eigen.min_eigenpairs` then solves. Same result as
    ``min_eigenpairs(form(arange(n)))`` to the solver's precision.
    """
    if d < LANCZOS_MIN_DIM:
        return min_eigenpairs(form(np.arange(n)))
    lam, v, converged = lanczos_min_eigenpairs(hvp, n, d, rng=rng, like=like, tol=tol,
                                               max_steps=max_steps)
    if converged.all():
        return lam, v
    xp = namespace_of(lam, "lambda")
    redo = np.flatnonzero(~converged)
    lam_direct, v_direct = min_eigenpairs(form(redo))
    # Neuron i's result is entry i of the Lanczos results or n + j of the direct ones.
    where = np.arange(n)
    where[redo] = n + np.arange(redo.size)
    index = xp.asarray(where, device=device_of(lam))
    return (xp.take(xp.concat([lam, xp.astype(lam_direct, lam.dtype)]), index, axis=0),
            xp.take(xp.concat([v, xp.astype(v_direct, v.dtype)], axis=0), index, axis=0))
