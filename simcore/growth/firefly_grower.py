"""Firefly growth (Wu, Liu, Stone, Liu 2020): score many candidate neurons at once, keep the best.

The candidates, their selection and their application are the core's :mod:`simcore.growth.firefly`;
this module trains and scores them through the host's widened forward pass and autodiff
(:meth:`GrowthHost.forward_with`, :meth:`GrowthHost.value_and_grad`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .._arrays import check_choice, check_int, device_of, namespace_of
from .firefly import (
    FireflyCandidates,
    FireflySelection,
    firefly_apply,
    firefly_candidates,
    firefly_select,
)
from .firefly_scales import SCALES, function_keeping_candidates
from .growers import Grower, PerLayerState, check_loss, check_real_range
from .protocol import Array, Batch, GrowthHost

__all__ = ["FireflyGrower", "FireflyState"]

#: Largest written split, relative to the parent row's norm (:mod:`.firefly_scales`).
DEFAULT_SPLIT_EPS = 0.01
#: Largest written new neuron's contribution, relative to the layer's RMS one.
DEFAULT_NEW_EPS = 0.01

#: RMSprop's ``eps`` (PyTorch's default, which the reference code uses).
_RMSPROP_EPS = 1e-8


@dataclass(frozen=True, eq=False)
class FireflyState(PerLayerState[FireflyCandidates]):
    """Per layer, the (trained) candidates that were scored."""


def _split_count(c: FireflyCandidates) -> int:
    return int(c.split_directions.shape[0]) if c.split_directions is not None else 0


def _ones(like: Array, n: int) -> Array:
    xp = namespace_of(like, "candidates")
    return xp.ones(n, dtype=like.dtype, device=device_of(like))


class FireflyGrower(Grower[FireflyState]):
    """Firefly neural architecture descent.

    Candidates per layer (:func:`simcore.growth.firefly_candidates`): a split
    direction ``delta_i`` for every neuron (``theta_i +/- delta_i``, outgoing
    halved) and ``new_per_layer`` new neurons (incoming rows, small outgoing
    columns), drawn relative to the layer's weights (``scales="relative"``; the
    reference's absolute per-weight scales with ``scales="absolute"``;
    ``split_scale``, ``incoming_std``, ``outgoing_scale`` as there). All
    candidates of all layers are put into a widened copy of the model
    (:meth:`GrowthHost.forward_with`); with ``train_candidates`` they are first
    trained for one pass over the batches (reference: RMSprop lr 1e-3, momentum
    0.1, alpha 0.9, L2 1e-2 on ``delta``, 1e-4 on new incoming rows; gradients
    averaged over replicas). Each candidate's perturbation is scaled by a gate
    ``g``; its score is ``dL/dg`` at ``g = 1``, averaged over batches (and
    replicas). The ``budget`` most negative scores over all layers and both kinds
    are applied (:func:`simcore.growth.firefly_apply`), shrunk first so the
    growth keeps the function (:mod:`simcore.growth.firefly_scales`): a written
    split has ``|delta_i| <= split_eps |theta_i|`` (the function moves by
    ``O(split_eps^2)``, like SSD's ``eps``), a new neuron contributes at most
    ``new_eps`` times the layer's RMS neuron (``O(new_eps)`` each). ``None``
    writes that kind as trained, as the reference does (which changes the
    predictions at real widths).
    """

    method = "firefly"

    def __init__(self, *, new_per_layer: int = 70, split: bool = True,
                 split_scale: float | None = None, incoming_std: float | None = None,
                 outgoing_scale: float | None = None, scales: str = "relative",
                 split_eps: float | None = DEFAULT_SPLIT_EPS,
                 new_eps: float | None = DEFAULT_NEW_EPS,
                 train_candidates: bool = True, lr: float = 1e-3, momentum: float = 0.1,
                 alpha: float = 0.9, l2_split: float = 1e-2, l2_incoming: float = 1e-4,
                 seed: int | None = 0, only_negative: bool = False):
        super().__init__(seed=seed, only_negative=only_negative)
        self.new_per_layer = check_int(new_per_layer, "new_per_layer", minimum=0)
        self.split = bool(split)
        if self.new_per_layer == 0 and not self.split:
            raise ValueError("new_per_layer=0 with split=False leaves no candidate to grow; "
                             "allow splits (split=True) or new neurons (new_per_layer >= 1)")
        self.scales = check_choice(scales, SCALES, "scales")
        self.split_scale, self.incoming_std, self.outgoing_scale = (
            None if value is None else check_real_range(value, name, low=0.0, low_open=True)
            for value, name in ((split_scale, "split_scale"), (incoming_std, "incoming_std"),
                                (outgoing_scale, "outgoing_scale")))
        self.split_eps, self.new_eps = (
            None if value is None else check_real_range(value, name, low=0.0)
            for value, name in ((split_eps, "split_eps"), (new_eps, "new_eps")))
        self.train_candidates = bool(train_candidates)
        self.lr = check_real_range(lr, "lr", low=0.0, low_open=True)
        self.momentum = check_real_range(momentum, "momentum", low=0.0, high=1.0)
        self.alpha = check_real_range(alpha, "alpha", low=0.0, high=1.0)
        self.l2_split = check_real_range(l2_split, "l2_split", low=0.0)
        self.l2_incoming = check_real_range(l2_incoming, "l2_incoming", low=0.0)

    def most_new_neurons(self, widths, caps):
        """Split candidates (one per neuron, with ``split``) plus ``new_per_layer``, under caps."""
        caps = [None] * len(widths) if caps is None else caps
        per_layer = [(w if self.split else 0) + self.new_per_layer for w in widths]
        return sum(n if c is None else min(n, int(c)) for n, c in zip(per_layer, caps, strict=True))

    def _candidates_phrase(self):
        split = "a split of each neuron and " if self.split else ""
        return f"Firefly candidates: {split}new_per_layer={self.new_per_layer} per layer"

    def select(self, scores, budget, caps, state):
        """:func:`simcore.growth.firefly_select` over each layer's split and new candidates.

        ``scores[l]`` is the split candidates' scores followed by the new ones' (the report's
        layout); the candidates in ``state`` say where the split part ends.
        """
        split_scores, new_scores = [], []
        for s, c in zip(scores, state, strict=True):
            n_split = _split_count(c)
            split_scores.append(s[:n_split])
            new_scores.append(s[n_split:])
        try:
            return firefly_select(split_scores, new_scores, budget, caps=caps,
                                  only_negative=self.only_negative)
        except ValueError as error:
            if "exceeds" not in str(error):
                raise
            raise ValueError(f"Firefly candidates too few: {error}; raise new_per_layer or "
                             "lower ratio") from error

    def plan(self, params, core_flows, picks, state, rng):
        """``picks``: one :class:`~simcore.growth.FireflySelection` per layer (from select)."""
        written = function_keeping_candidates(params, core_flows, state, split_eps=self.split_eps,
                                              new_eps=self.new_eps)
        new_params, pairs = firefly_apply(params, core_flows, written, picks)
        maps = [pair if sel.count else None for pair, sel in zip(pairs, picks, strict=True)]
        return new_params, maps

    def score(self, host, layers, batches, loss_fn, rng):
        state = host.read_state()
        flows = [layer.flow for layer in layers]
        candidates = firefly_candidates(
            state, flows, rng=rng, new_per_layer=self.new_per_layer, split=self.split,
            split_scale=self.split_scale, incoming_std=self.incoming_std,
            outgoing_scale=self.outgoing_scale, scales=self.scales,
        )
        everything = [FireflySelection(np.arange(_split_count(c)), np.arange(c.new_count))
                      for c in candidates]
        widened, maps = firefly_apply(state, flows, candidates, everything)
        forward = host.forward_with(widened, maps)
        del widened  # only its shapes were needed: the largest array of the whole growth

        def loss_with(live: Sequence[FireflyCandidates], batch: Batch) -> Array:
            grown, _ = firefly_apply(state, flows, live, everything)
            inputs, targets = batch
            return check_loss(loss_fn(forward(grown, inputs), targets), finite=False)

        if self.train_candidates:
            candidates = self._train(host, candidates, loss_with, batches)
        sums: list[Array | None] = [None] * len(candidates)
        for batch in batches:
            gates = [(_ones(c.new_incoming, _split_count(c)) if _split_count(c) else None,
                      _ones(c.new_incoming, c.new_count)) for c in candidates]
            flat = [g for pair in gates for g in pair if g is not None]

            def gated_loss(values, batch=batch, gates=gates):
                values = iter(values)
                live = []
                for c, (split_gate, _) in zip(candidates, gates, strict=True):
                    gs = None if split_gate is None else next(values)
                    gn = next(values)
                    # One gate per candidate, in every member of a residual group.
                    live.append(dataclasses.replace(
                        c,
                        split_directions=None if gs is None else gs[:, None] * c.split_directions,
                        member_split=() if gs is None else tuple(gs[:, None] * d
                                                                 for d in c.member_split),
                        new_outgoing=tuple(gn[:, None] * a for a in c.new_outgoing),
                    ))
                return loss_with(live, batch)

            loss, grads = host.value_and_grad(gated_loss, flat)
            check_loss(loss)
            grads = iter(grads)
            for index, (split_gate, _) in enumerate(gates):
                xp = namespace_of(candidates[index].new_incoming, "candidates")
                parts = [next(grads)] if split_gate is not None else []
                layer = xp.concat([*parts, next(grads)])
                previous = sums[index]
                sums[index] = layer if previous is None else previous + layer
        means = [s / len(batches) for s in sums if s is not None]
        if len(means) != len(sums):  # as_batches refused an empty list: every layer has a sum
            raise ValueError("Firefly scoring needs at least one batch")
        return means, FireflyState(tuple(candidates))

    def _train(self, host: GrowthHost, candidates: list[FireflyCandidates],
               loss_with: Callable[[Sequence[FireflyCandidates], Batch], Array],
               batches: list[Batch]) -> list[FireflyCandidates]:
        """One pass of RMSprop over the candidate variables, everything else frozen."""
        variables, decays = [], []
        for c in candidates:
            if c.split_directions is not None:
                variables.append(c.split_directions)
                decays.append(self.l2_split)
            variables.append(c.new_incoming)
            decays.append(self.l2_incoming)
            variables.extend(c.new_outgoing)
            decays.extend([0.0] * len(c.new_outgoing))
            variables.extend((*c.member_split, *c.member_incoming))
            decays.extend([self.l2_split] * len(c.member_split)
                          + [self.l2_incoming] * len(c.member_incoming))

        def rebuild(values) -> list[FireflyCandidates]:
            values = iter(values)
            return [dataclasses.replace(
                c,
                split_directions=None if c.split_directions is None else next(values),
                new_incoming=next(values),
                new_outgoing=tuple(next(values) for _ in c.new_outgoing),
                member_split=tuple(next(values) for _ in c.member_split),
                member_incoming=tuple(next(values) for _ in c.member_incoming),
            ) for c in candidates]

        square = [v * 0 for v in variables]
        velocity = [v * 0 for v in variables]
        for batch in batches:
            def batch_loss(values: Sequence[Array], batch: Batch = batch) -> Array:
                return loss_with(rebuild(values), batch)

            loss, grads = host.value_and_grad(batch_loss, variables)
            check_loss(loss)
            updated = []
            for i, (p, g, decay) in enumerate(zip(variables, grads, decays, strict=True)):
                g = host.mean_over_replicas(g)
                if decay:
                    g = g + decay * p
                square[i] = square[i] * self.alpha + (1 - self.alpha) * (g * g)
                xp = namespace_of(p, "candidates")
                velocity[i] = velocity[i] * self.momentum + g / (xp.sqrt(square[i]) + _RMSPROP_EPS)
                updated.append(p - self.lr * velocity[i])
            variables = updated
        return rebuild(variables)
