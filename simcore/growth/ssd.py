"""Splitting steepest descent (SSD; Liu, Wang, Wu 2019) and its fast Rayleigh-quotient variant.

Splitting neuron ``i`` (incoming weights ``theta_i``) into two copies
``theta_i +/- eps v`` whose outgoing weights are halved changes the loss by
``eps^2 / 2 * v^T S_i v + O(eps^3)``, with the *splitting matrix*::

    S_i = sum_{b, p} dL/dh_{b,p,i} * sigma''(z_{b,p,i}) * c_i^2 * x_{b,p} x_{b,p}^T     (d x d)

where ``x_{b,p}`` is the unfolded input patch of sample ``b`` at spatial position
``p`` (``d = C_in*kh*kw``; dense layers have one position), ``z`` the
pre-activation (after BatchNorm when BN follows), ``h = sigma(z)`` the activation,
and ``c_i = gamma_i / sqrt(running_var_i + eps)`` the BatchNorm coefficient (BN in
eval mode, so ``dz/dtheta_i = c_i x``; ``c_i = 1`` without BN). The best split
direction is the eigenvector of ``lambda_min(S_i)``; splitting helps only where
``lambda_min < 0``.

How the expectation is taken (as in the reference code, ``sp/conv.py``'s exact
split of the Firefly/splitting repositories): the per-neuron auxiliary term
``sigma''(z) (c x)^T S (c x)`` is added to every output position, the batch loss
is the *mean* cross-entropy, and ``S`` is read off as its gradient. So positions
are **summed** (a conv neuron's weights are shared by all positions, its Hessian
is the sum over positions) and samples are **averaged** through the mean-reduced
loss. Here ``backprop`` is exactly what autodiff returns for your loss: pass the
gradient of the batch-*mean* loss with ``reduction="sum"`` (the default; then
``S`` is the per-sample mean), or per-sample loss gradients with
``reduction="mean"`` (divides by ``B``). The reference code additionally divides
an accumulation over ``n_batches`` by ``n_batches / 10`` (a constant factor that
changes no eigenvector and no ranking); average over batches yourself.

ReLU's ``sigma''`` is 0: the ``"relu"`` entry of :mod:`.activations` uses the
softplus (beta = 3) surrogate of the reference code.

Layout: the last axis of ``patches`` must be ordered like the producer's weight
rows (``to_rows``: neuron axis first, the remaining axes flattened in order).
PyTorch's ``F.unfold`` gives ``(C_in, kh, kw)`` order, which matches OIHW weights.

The fast variant (energy-aware splitting, Wang et al. 2019) never forms ``S``:
:func:`hvp_from_statistics` gives ``V -> [S_i v_i]_i`` in ``O(B P (n + d))``
memory, and :func:`rayleigh_min_direction` minimises ``v^T S v / v^T v`` for all
neurons at once from any such product.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._arrays import (
    check_choice,
    check_floating,
    check_int,
    compute_dtype,
    device_of,
    namespace_of,
)
from ._host import as_generator, as_indices
from .activations import resolve_second_derivative
from .budget import select_lowest
from .eigen import min_eigenpairs, rayleigh_min_direction
from .flow import ChannelFlow
from .widen import split_neurons

__all__ = [
    "SplittingHVP",
    "bn_coefficient",
    "hvp_from_statistics",
    "min_eigenpairs",
    "rayleigh_min_direction",
    "select_splits",
    "splitting_matrices",
    "ssd_split",
    "subsample_rows",
]

REDUCTIONS = ("sum", "mean")


def bn_coefficient(scale: Any, running_var: Any, *, eps: float = 1e-5) -> Any:
    """BatchNorm's eval-mode slope ``gamma / sqrt(running_var + eps)`` per channel.

    ``eps`` defaults to PyTorch's 1e-5 (the reference code's value; Flax uses 1e-5 too).

    >>> import numpy as np
    >>> bn_coefficient(np.asarray([2.0]), np.asarray([3.0]), eps=1.0).tolist()
    [1.0]
    """
    xp = namespace_of(scale, "scale")
    namespace_of(running_var, "running_var")
    check_floating(xp, scale, "scale")
    check_floating(xp, running_var, "running_var")
    if scale.ndim != 1 or tuple(running_var.shape) != tuple(scale.shape):
        raise ValueError(
            "scale and running_var must be 1-D of the same length, got "
            f"{tuple(scale.shape)} and {tuple(running_var.shape)}"
        )
    eps = float(eps)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return scale / xp.sqrt(running_var + eps)


def _as_bpd(xp: Any, x: Any, name: str) -> Any:
    """(B, P, k) view of a (B, k) or (B, P, k) array."""
    if x.ndim == 2:
        return xp.reshape(x, (x.shape[0], 1, x.shape[1]))
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, P, k) or (B, k), got {tuple(x.shape)}")
    return x


class _Statistics:
    """Validated inputs flattened to ``X (M, d)`` and per-sample weights ``W (M, n)``."""

    def __init__(self, patches, backprop, preactivations, activation, bn_scale, reduction):
        xp = namespace_of(patches, "patches")
        for other, name in ((backprop, "backprop"), (preactivations, "preactivations")):
            if namespace_of(other, name) is not xp:
                raise TypeError(f"{name} comes from a different array library than patches")
        for x, name in ((patches, "patches"), (backprop, "backprop"),
                        (preactivations, "preactivations")):
            check_floating(xp, x, name)
        check_choice(reduction, REDUCTIONS, "reduction")
        d2 = resolve_second_derivative(activation)
        x = _as_bpd(xp, patches, "patches")
        g = _as_bpd(xp, backprop, "backprop")
        z = _as_bpd(xp, preactivations, "preactivations")
        if tuple(g.shape) != tuple(z.shape):
            raise ValueError(
                "backprop and preactivations must have the same shape (B, P, n), got "
                f"{tuple(backprop.shape)} and {tuple(preactivations.shape)}"
            )
        if tuple(x.shape[:2]) != tuple(g.shape[:2]):
            raise ValueError(
                "patches (B, P, d) and backprop (B, P, n) must agree in B and P, got "
                f"{tuple(patches.shape)} and {tuple(backprop.shape)}"
            )
        if any(int(s) == 0 for s in (*x.shape, g.shape[2])):
            raise ValueError(f"empty statistics: patches {tuple(patches.shape)}, "
                             f"backprop {tuple(backprop.shape)}")
        batch, positions, d = (int(s) for s in x.shape)
        n = int(g.shape[2])
        work = compute_dtype(xp, xp.result_type(x.dtype, g.dtype, z.dtype))
        x, g, z = (xp.astype(a, work) for a in (x, g, z))

        weights = g * d2(xp, z)
        if bn_scale is not None:
            if namespace_of(bn_scale, "bn_scale") is not xp:
                raise TypeError("bn_scale comes from a different array library than patches")
            check_floating(xp, bn_scale, "bn_scale")
            if tuple(bn_scale.shape) != (n,):
                raise ValueError(f"bn_scale must have shape ({n},) (one coefficient per neuron), "
                                 f"got {tuple(bn_scale.shape)}")
            c = xp.astype(bn_scale, work)
            weights = weights * (c * c)
        if reduction == "mean":
            weights = weights / batch
        self.xp = xp
        self.n, self.d = n, d
        self.dtype = work
        self.x = xp.reshape(x, (batch * positions, d))
        self.w = xp.reshape(weights, (batch * positions, n))


#: Largest temporary (in elements) that :func:`splitting_matrices` builds at once.
_MAX_TEMPORARY = 2**25


def splitting_matrices(
    patches: Any,
    backprop: Any,
    preactivations: Any,
    *,
    activation: str | Callable[[Any, Any], Any] = "relu",
    bn_scale: Any = None,
    reduction: str = "sum",
) -> Any:
    """The SSD splitting matrices ``S`` of one layer, shape ``(n, d, d)``, each symmetric.

    Args:
        patches: ``(B, P, d)`` unfolded inputs at ``P`` positions (dense: ``(B, d)`` or P = 1).
        backprop: ``(B, P, n)``, ``dL/dh`` with ``h = sigma(z)`` the layer's activation output.
        preactivations: ``(B, P, n)``, ``z`` (after BatchNorm when BN follows).
        activation: a registered name (see :mod:`.activations`) or ``fn(xp, z) = sigma''(z)``.
        bn_scale: ``(n,)`` BatchNorm coefficients (:func:`bn_coefficient`), or None.
        reduction: ``"sum"`` over samples (``backprop`` of a batch-mean loss) or ``"mean"``.

    Positions are always summed (module docstring). float16/bfloat16 inputs give
    float32 matrices (the eigen-solvers need them).

    >>> import numpy as np
    >>> x = np.asarray([[[1.0, 2.0]]])                       # B = P = 1, d = 2
    >>> S = splitting_matrices(x, np.ones((1, 1, 1)), np.zeros((1, 1, 1)), activation="softplus")
    >>> S[0].tolist()                                        # 0.25 * x x^T
    [[0.25, 0.5], [0.5, 1.0]]
    """
    st = _Statistics(patches, backprop, preactivations, activation, bn_scale, reduction)
    xp, x, w, n, d = st.xp, st.x, st.w, st.n, st.d
    if n <= d:
        # One weighted copy of the rows per neuron and GEMMs on it: the temporary is the size of
        # the rows themselves, and each GEMM runs at full speed (a batched GEMM over (n, m, d)
        # weighted copies was 1.2-2x slower on a CPU).
        return xp.stack([_symmetric_gram(xp, x, x * w[:, i:i + 1]) for i in range(n)])
    rows = int(x.shape[0])
    # Many neurons on few inputs: (m, d*d) outer products against (m, n) weights, the rows
    # (samples x positions) in chunks so that the temporary stays below _MAX_TEMPORARY
    # elements (a conv batch has M = B*H*W rows, 131072 at 128 x 32 x 32).
    chunk = max(1, _MAX_TEMPORARY // (d * d))
    s = None
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)  # the standard allows no slice past the end
        xc, wc = x[start:stop, :], w[start:stop, :]
        outer = xp.reshape(xc[:, :, None] * xc[:, None, :], (xc.shape[0], d * d))
        part = xp.reshape(xp.matmul(xp.permute_dims(wc, (1, 0)), outer), (n, d, d))
        s = part if s is None else s + part
    # Exactly symmetric whatever the GEMM's rounding.
    return 0.5 * (s + xp.permute_dims(s, (0, 2, 1)))


#: Column blocks of at least this many columns: smaller GEMMs lose more speed than they save.
_MIN_BLOCK = 128


def _symmetric_gram(xp: Any, x: Any, xw: Any) -> Any:
    """``x^T xw`` for ``xw = x * w`` (so the result is symmetric), from its upper block triangle.

    With ``k`` column blocks the GEMMs cost ``(k + 1) / (2k)`` of the full product; two blocks
    (75%) from ``d = 2 * _MIN_BLOCK`` on were 10-18% faster on a CPU at d = 300-600, three were
    no faster than two (smaller GEMMs, more copies).
    """
    d = int(x.shape[1])
    k = max(1, min(2, d // _MIN_BLOCK))
    if k == 1:
        s = xp.matmul(xp.permute_dims(x, (1, 0)), xw)
        return 0.5 * (s + xp.permute_dims(s, (1, 0)))
    edges = [d * j // k for j in range(k + 1)]
    blocks: dict[tuple[int, int], Any] = {}
    for a in range(k):
        xa = xp.permute_dims(x[:, edges[a]:edges[a + 1]], (1, 0))
        for b in range(a, k):
            blocks[a, b] = xp.matmul(xa, xw[:, edges[b]:edges[b + 1]])
    # Diagonal blocks symmetrised as the whole matrix would be; below them, the transposes.
    rows = []
    for a in range(k):
        row = [xp.permute_dims(blocks[b, a], (1, 0)) if b < a else blocks[a, b]
               for b in range(k)]
        row[a] = 0.5 * (row[a] + xp.permute_dims(row[a], (1, 0)))
        rows.append(xp.concat(row, axis=1))
    return xp.concat(rows, axis=0)


class SplittingHVP:
    """``V (n, d) -> [S_i v_i]_i`` for one layer's statistics, never forming ``S``.

    Costs two ``(M, d) x (d, n)`` GEMMs per call (``M = B P``) and ``O(M (n + d))``
    memory. Attributes: ``n``, ``d``, ``like`` (an array with the namespace, dtype
    and device the products use). Build it with :func:`hvp_from_statistics`.
    """

    def __init__(self, stats: _Statistics):
        self._xp = stats.xp
        self._x = stats.x
        self._w = stats.w
        self.n, self.d = stats.n, stats.d
        self.like = stats.x

    def __call__(self, v: Any) -> Any:
        xp = self._xp
        if namespace_of(v, "v") is not xp:
            raise TypeError("v comes from a different array library than the statistics")
        if tuple(v.shape) != (self.n, self.d):
            raise ValueError(f"v must have shape ({self.n}, {self.d}), got {tuple(v.shape)}")
        v = xp.astype(v, self._x.dtype)
        projections = xp.matmul(self._x, xp.permute_dims(v, (1, 0)))      # (M, n): x . v_i
        return xp.matmul(xp.permute_dims(self._w * projections, (1, 0)), self._x)


def hvp_from_statistics(
    patches: Any,
    backprop: Any,
    preactivations: Any,
    *,
    activation: str | Callable[[Any, Any], Any] = "relu",
    bn_scale: Any = None,
    reduction: str = "sum",
) -> SplittingHVP:
    """The product ``V -> [S_i v_i]_i`` with ``S`` of :func:`splitting_matrices`, unformed.

    Same arguments and conventions as :func:`splitting_matrices`.

    >>> import numpy as np
    >>> x = np.asarray([[[1.0, 2.0]]])
    >>> hvp = hvp_from_statistics(x, np.ones((1, 1, 1)), np.zeros((1, 1, 1)), activation="softplus")
    >>> hvp(np.asarray([[1.0, 0.0]])).tolist()
    [[0.25, 0.5]]
    """
    return SplittingHVP(_Statistics(patches, backprop, preactivations, activation, bn_scale,
                                    reduction))


def subsample_rows(
    patches: Any,
    backprop: Any,
    preactivations: Any,
    max_rows: int,
    rng: np.random.Generator | int,
) -> tuple[Any, Any, Any]:
    """At most ``max_rows`` of the ``B * P`` (sample, position) rows, for an unbiased ``S``.

    ``S`` sums ``w x x^T`` over every row (positions summed, samples summed with
    ``reduction="sum"``); rows drawn uniformly without replacement, with ``backprop``
    multiplied by ``B * P / max_rows``, give the same ``S`` in expectation at a fraction of
    the cost. Returns ``(patches, backprop, preactivations)`` of shape ``(rows, 1, k)``, for
    :func:`splitting_matrices` and :func:`hvp_from_statistics` with the default
    ``reduction="sum"``; with ``B * P <= max_rows`` every row is kept and nothing is scaled.

    >>> import numpy as np
    >>> x, g, z = np.ones((4, 5, 3)), np.ones((4, 5, 2)), np.zeros((4, 5, 2))
    >>> xs, gs, zs = subsample_rows(x, g, z, 8, rng=0)
    >>> xs.shape, gs.shape, float(gs[0, 0, 0])                # 20 rows -> 8, weights x 20 / 8
    ((8, 1, 3), (8, 1, 2), 2.5)
    """
    max_rows = check_int(max_rows, "max_rows", minimum=1)
    xp = namespace_of(patches, "patches")
    x, g, z = (_as_bpd(xp, a, name) for a, name in ((patches, "patches"),
                                                     (backprop, "backprop"),
                                                     (preactivations, "preactivations")))
    rows = int(x.shape[0]) * int(x.shape[1])
    x, g, z = (xp.reshape(a, (rows, 1, a.shape[2])) for a in (x, g, z))
    if rows <= max_rows:
        return x, g, z
    keep = np.sort(as_generator(rng).choice(rows, size=max_rows, replace=False))
    index = xp.asarray(keep, device=device_of(x))
    x, g, z = (xp.take(a, index, axis=0) for a in (x, g, z))
    return x, g * (rows / max_rows), z


def select_splits(
    lambda_min: Sequence[Any],
    k: int,
    *,
    only_negative: bool = False,
    caps: Sequence[int | None] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    clamp: bool = False,
) -> list[np.ndarray]:
    """Which neurons to split: the ``k`` lowest ``lambda_min`` over all layers.

    ``lambda_min`` holds one ``(n_l,)`` array per layer; returns one sorted NumPy int
    array of parent indices per layer, ``k`` picks in all (fewer when
    ``only_negative`` leaves fewer, or caps do with ``clamp=True``; without it, a
    budget the caps cannot hold is a ``ValueError``). ``only_negative=True`` keeps SSD's
    theory (a split lowers the loss only where ``lambda_min < 0``); the reference
    code never checks it, hence the default. Exactly ``k`` picks with deterministic
    ties (the reference's ``lambda <= sorted[k]`` picks ``k + 1`` or more).
    Built on :func:`simcore.growth.select_lowest` (``caps``/``groups``/``clamp`` as there).

    >>> import numpy as np
    >>> [p.tolist() for p in select_splits([np.asarray([0.5, -2.0]), np.asarray([-1.0])], 2)]
    [[1], [0]]
    """
    return select_lowest(lambda_min, k, caps=caps, groups=groups, only_negative=only_negative,
                         clamp=clamp)


def ssd_split(
    params: Mapping[str, Any],
    flow: Any,
    parents: Any,
    v_min: Any,
    *,
    eps: float = 0.01,
) -> tuple[dict[str, Any], Any]:
    """Split ``parents`` of ``flow``'s producer along their minimum eigenvectors.

    ``v_min`` is the ``(n, d)`` output of :func:`min_eigenpairs` or
    :func:`rayleigh_min_direction` for the producer (rows in ``to_rows`` layout);
    the rows of ``parents`` are used (a residual group: a sequence with one such array per
    producer, each split along its own). Parent ``i`` becomes ``theta_i + eps v_i``, its
    copy (appended) ``theta_i - eps v_i``, consumer columns halved
    (:func:`simcore.growth.split_neurons`): the function is preserved to
    ``O(eps^2)``. Returns ``(new params, ChannelMap)``.
    """
    return split_neurons(params, flow, parents, _parent_rows(v_min, parents, flow, params),
                         eps=eps)


def _parent_rows(v_min: Any, parents: Any, flow: Any, params: Mapping[str, Any]) -> Any:
    if isinstance(v_min, (list, tuple)):  # a residual group: one block per producer
        return [_parent_rows(v, parents, flow, params) for v in v_min]
    if not isinstance(flow, ChannelFlow):
        raise TypeError(f"flow must be a ChannelFlow, got {type(flow).__name__}")
    xp = namespace_of(v_min, "v_min")
    check_floating(xp, v_min, "v_min")
    n = flow.channels(params)
    if v_min.ndim != 2 or int(v_min.shape[0]) != n:
        raise ValueError(f"v_min must have shape ({n}, d) (one row per neuron of "
                         f"{flow.producer!r}), got {tuple(v_min.shape)}")
    index = np.asarray(as_indices(parents, n, "parents"), dtype=np.int64)
    return xp.take(v_min, xp.asarray(index, device=device_of(v_min)), axis=0)
