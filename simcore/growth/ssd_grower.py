"""SSD growth (Liu, Wang, Wu 2019): split the neurons whose splitting matrix is most negative.

The host captures each layer's statistics (:meth:`GrowthHost.splitting_statistics`); the
splitting matrices, their smallest eigenpairs (Lanczos, :mod:`simcore.growth.ssd_exact`, or the
Rayleigh descent of the fast mode) and the split itself are the core's :mod:`simcore.growth.ssd`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

from .._arrays import check_choice, check_int, compute_dtype, device_of, namespace_of
from .growers import Grower, PerLayerState, check_real_range
from .protocol import GrowthError, GrowthHost, SplittingStatistics
from .ssd import (
    hvp_from_statistics,
    rayleigh_min_direction,
    splitting_matrices,
    ssd_split,
    subsample_rows,
)
from .ssd_exact import exact_min_eigenpairs

__all__ = ["EXACT_MAX_BYTES", "ROWS_PER_DIM", "SSDGrower", "SSDState", "exact_bytes"]

#: Default cap on the rows (sample x position) a layer is scored on, per fan-in dimension.
ROWS_PER_DIM = 16
#: Default memory exact mode may use for one layer's splitting matrices (2 GiB).
EXACT_MAX_BYTES = 2 * 2**30
#: Default steps of the fast mode. On the quick preset's trained VGG16 the growth picks of
#: 5 + 30 products agree with exact mode's on 93% of the neurons (30 + 200: 95%, at 7.7x the
#: cost); two scoring batches of exact mode agree on 53-64% (docs/design.md).
RAYLEIGH_STEPS = 30
POWER_STEPS = 5


def exact_bytes(n: int, d: int, itemsize: int) -> int:
    """Peak bytes exact mode needs for one layer of ``n`` neurons of fan-in ``d``.

    Three ``(n, d, d)`` arrays of ``itemsize`` bytes (the dtype the maths runs in): ``S``, its
    scaled copy for ``eigh`` and the eigenvectors ``eigh`` returns. That is the worst case, where
    Lanczos leaves every neuron to the direct solve (:mod:`simcore.growth.ssd_exact`); Lanczos
    itself keeps ``(n, max_steps, d)``.

    >>> exact_bytes(512, 4608, 4) / 1e9                      # a 512-channel 3x3 conv, float32
    130.459631616
    """
    return 3 * n * d * d * itemsize


@dataclass(frozen=True, eq=False)
class SSDState(PerLayerState[Any]):
    """Per layer, the ``(n, d)`` unit directions of every neuron's smallest eigenvalue.

    A residual group has a tuple of them, one per producer (its own, then its members').
    """


class SSDGrower(Grower[SSDState]):
    """Splitting steepest descent: split neurons along ``lambda_min(S_i)``.

    ``mode="exact"`` takes each splitting matrix's lowest eigenpair to the solver's precision
    (Lanczos on Hessian-vector products from fan-in 96 on, forming and solving the matrices of
    the neurons it leaves unconverged and of smaller layers: :mod:`simcore.growth.ssd_exact`);
    ``mode="fast"`` (energy-aware splitting) never forms a matrix and minimises
    the Rayleigh quotient from Hessian-vector products (``power_steps`` to estimate
    ``||S_i||``, then ``rayleigh_steps`` descent steps). The ``budget`` neurons
    with the most negative ``lambda_min`` over all layers split into
    ``theta +/- eps v`` with halved outgoing weights (function kept to O(eps^2)).
    ``only_negative=True`` splits only where ``lambda_min < 0`` (SSD's theory;
    the reference code does not check). Hessian-vector products and the splitting
    matrices formed are averaged over replicas (every replica takes the same Lanczos steps).

    ``rows_per_dim``: a layer with fan-in ``d`` is scored on at most ``rows_per_dim * d``
    (sample, position) rows per batch, drawn at random and reweighted
    (:func:`~simcore.growth.ssd.subsample_rows`; ``None`` keeps every row). A conv layer's
    batch holds ``B * H * W`` rows, thousands per fan-in dimension in early layers: the
    estimate of ``S`` barely changes (the batch it is drawn from changes it far more), its
    cost falls to ``O(rows_per_dim * n * d^3)``. ``exact_max_bytes``: exact mode refuses, before
    forming anything, a layer whose matrices would need more memory (``GrowthError`` with the
    estimate; use ``mode="fast"``, which needs ``O(rows * (n + d))``).
    """

    method = "ssd"

    def __init__(self, mode: str = "exact", *, eps: float = 0.01, seed: int | None = 0,
                 only_negative: bool = False, rayleigh_steps: int = RAYLEIGH_STEPS,
                 power_steps: int = POWER_STEPS, rows_per_dim: int | None = ROWS_PER_DIM,
                 exact_max_bytes: int = EXACT_MAX_BYTES):
        super().__init__(seed=seed, only_negative=only_negative)
        self.mode = check_choice(mode, ("exact", "fast"), "mode")
        self.eps = check_real_range(eps, "eps", low=0.0, low_open=True)
        self.rayleigh_steps = check_int(rayleigh_steps, "rayleigh_steps", minimum=1)
        self.power_steps = check_int(power_steps, "power_steps", minimum=1)
        self.rows_per_dim = (None if rows_per_dim is None
                             else check_int(rows_per_dim, "rows_per_dim", minimum=1))
        self.exact_max_bytes = check_int(exact_max_bytes, "exact_max_bytes", minimum=1)

    def score(self, host, layers, batches, loss_fn, rng):
        statistics = host.splitting_statistics(batches, loss_fn)
        if self.mode == "exact":
            for layer, stats in zip(layers, statistics, strict=True):
                for part in (stats, *stats.members):  # a residual group: every member's S
                    self._check_exact_memory(layer.name, part)
        # rows are drawn from their own stream, so both modes score on the same rows
        rows_rng = np.random.default_rng(int(rng.integers(0, 2**62)))
        scores, directions = [], []
        for stats in statistics:
            lam, v = self._layer_split(host, stats, rng, rows_rng)
            if stats.members:  # a residual group: one unit (docs/design.md)
                member_v = [v]
                for member in stats.members:
                    lam_m, v_m = self._layer_split(host, member, rng, rows_rng)
                    lam = lam + lam_m
                    member_v.append(v_m)
                v = tuple(member_v)
            scores.append(lam)
            directions.append(v)
        return scores, SSDState(tuple(directions))

    def _check_exact_memory(self, name: str, stats: SplittingStatistics) -> None:
        x, g, _ = stats.batches[0]
        n, d = int(g.shape[-1]), int(x.shape[-1])
        rows = sum(math.prod(int(s) for s in b[0].shape[:-1]) for b in stats.batches)
        if self.rows_per_dim is not None:
            rows = min(rows, self.rows_per_dim * d * len(stats.batches))
        xp = namespace_of(x, "patches")
        need = exact_bytes(n, d, xp.finfo(compute_dtype(xp, x.dtype)).bits // 8)
        if need > self.exact_max_bytes:
            flops = 2.0 * n * d * d * rows + 9.0 * n * d**3
            raise GrowthError(
                f"SSD exact on {name!r} may form {n} splitting matrices of {d} x {d} (all of "
                "them where Lanczos converges on none): about "
                f"{need / 2**30:.1f} GiB (limit exact_max_bytes={self.exact_max_bytes / 2**30:.1f}"
                f" GiB) and {flops / 1e9:.0f} GFLOP; use mode=\"fast\" (O(rows * (n + d)) "
                "memory) or raise exact_max_bytes"
            )

    def _layer_split(self, host: GrowthHost, stats: SplittingStatistics, rng, rows_rng):
        kind, bn_scale, nb = stats.activation, stats.bn_scale, len(stats.batches)
        batches = stats.batches
        if self.rows_per_dim is not None:
            limit = self.rows_per_dim * int(batches[0][0].shape[-1])
            batches = tuple(subsample_rows(x, g, z, limit, rows_rng) for x, g, z in batches)
        hvps = [hvp_from_statistics(x, g, z, activation=kind, bn_scale=bn_scale)
                for x, g, z in batches]

        def hvp(v):
            return host.mean_over_replicas(sum(h(v) for h in hvps) / nb)

        n, d, like = hvps[0].n, hvps[0].d, hvps[0].like
        if self.mode == "exact":
            def form(index):
                """The splitting matrices of the neurons ``index`` only."""
                xp = namespace_of(like, "patches")
                keep = xp.asarray(index, device=device_of(like))
                scale = None if bn_scale is None else xp.take(bn_scale, keep, axis=0)
                s = sum(splitting_matrices(x, xp.take(g, keep, axis=g.ndim - 1),
                                           xp.take(z, keep, axis=z.ndim - 1),
                                           activation=kind, bn_scale=scale)
                        for x, g, z in batches) / nb
                return host.mean_over_replicas(s)

            return exact_min_eigenpairs(hvp, n, d, form, rng=rng, like=like)
        return rayleigh_min_direction(hvp, n, d, rng=rng, like=like,
                                      steps=self.rayleigh_steps, power_steps=self.power_steps)

    def widen(self, params, core_flow, index, picks, state, rng):
        producer = params[core_flow.producer]
        xp = namespace_of(producer, core_flow.producer)
        blocks = state[index] if isinstance(state[index], tuple) else (state[index],)
        v_min = tuple(array_api_compat.to_device(xp.astype(v, producer.dtype), device_of(producer))
                      for v in blocks)
        return ssd_split(params, core_flow, picks, v_min if len(v_min) > 1 else v_min[0],
                         eps=self.eps)
