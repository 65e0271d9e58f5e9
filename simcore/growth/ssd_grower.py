"""SSD growth (Liu, Wang, Wu 2019): split the neurons whose splitting matrix is most negative.

The host captures each layer's statistics (:meth:`GrowthHost.splitting_statistics`); the
splitting matrices, their smallest eigenpairs (or the Rayleigh descent of the fast mode) and the
split itself are the core's :mod:`simcore.growth.ssd`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_compat

from .._arrays import check_choice, check_int, device_of, namespace_of
from .growers import Grower, PerLayerState, check_real_range
from .protocol import GrowthHost, SplittingStatistics
from .ssd import (
    hvp_from_statistics,
    min_eigenpairs,
    rayleigh_min_direction,
    splitting_matrices,
    ssd_split,
)

__all__ = ["SSDGrower", "SSDState"]


@dataclass(frozen=True, eq=False)
class SSDState(PerLayerState[Any]):
    """Per layer, the ``(n, d)`` unit directions of every neuron's smallest eigenvalue.

    A residual group has a tuple of them, one per producer (its own, then its members').
    """


class SSDGrower(Grower[SSDState]):
    """Splitting steepest descent: split neurons along ``lambda_min(S_i)``.

    ``mode="exact"`` forms every splitting matrix and takes ``linalg.eigh``;
    ``mode="fast"`` (energy-aware splitting) never forms them and minimises
    the Rayleigh quotient from Hessian-vector products. The ``budget`` neurons
    with the most negative ``lambda_min`` over all layers split into
    ``theta +/- eps v`` with halved outgoing weights (function kept to O(eps^2)).
    ``only_negative=True`` splits only where ``lambda_min < 0`` (SSD's theory;
    the reference code does not check). Splitting matrices (exact) and
    Hessian-vector products (fast) are averaged over replicas.
    """

    method = "ssd"

    def __init__(self, mode: str = "exact", *, eps: float = 0.01, seed: int | None = 0,
                 only_negative: bool = False, rayleigh_steps: int = 200):
        super().__init__(seed=seed, only_negative=only_negative)
        self.mode = check_choice(mode, ("exact", "fast"), "mode")
        self.eps = check_real_range(eps, "eps", low=0.0, low_open=True)
        self.rayleigh_steps = check_int(rayleigh_steps, "rayleigh_steps", minimum=1)

    def score(self, host, layers, batches, loss_fn, rng):
        statistics = host.splitting_statistics(batches, loss_fn)
        scores, directions = [], []
        for stats in statistics:
            lam, v = self._layer_split(host, stats, rng)
            if stats.members:  # a residual group: one unit (docs/design.md)
                member_v = [v]
                for member in stats.members:
                    lam_m, v_m = self._layer_split(host, member, rng)
                    lam = lam + lam_m
                    member_v.append(v_m)
                v = tuple(member_v)
            scores.append(lam)
            directions.append(v)
        return scores, SSDState(tuple(directions))

    def _layer_split(self, host: GrowthHost, stats: SplittingStatistics, rng):
        kind, bn_scale, nb = stats.activation, stats.bn_scale, len(stats.batches)
        if self.mode == "exact":
            s = sum(splitting_matrices(x, g, z, activation=kind, bn_scale=bn_scale)
                    for x, g, z in stats.batches) / nb
            s = host.mean_over_replicas(s)
            xp = namespace_of(s, "splitting matrices")
            # float32 LAPACK eigh fails to converge on these low-rank, tiny-scaled matrices
            # (seen on torch CPU for VGG16 seeds); float64 is robust and n x d x d is small.
            lam, v = min_eigenpairs(xp.astype(s, xp.float64))
            return lam, xp.astype(v, s.dtype)
        hvps = [hvp_from_statistics(x, g, z, activation=kind, bn_scale=bn_scale)
                for x, g, z in stats.batches]

        def hvp(v):
            return host.mean_over_replicas(sum(h(v) for h in hvps) / nb)

        return rayleigh_min_direction(hvp, hvps[0].n, hvps[0].d, rng=rng, like=hvps[0].like,
                                      steps=self.rayleigh_steps)

    def widen(self, params, core_flow, index, picks, state, rng):
        producer = params[core_flow.producer]
        xp = namespace_of(producer, core_flow.producer)
        blocks = state[index] if isinstance(state[index], tuple) else (state[index],)
        v_min = tuple(array_api_compat.to_device(xp.astype(v, producer.dtype), device_of(producer))
                      for v in blocks)
        return ssd_split(params, core_flow, picks, v_min if len(v_min) > 1 else v_min[0],
                         eps=self.eps)
