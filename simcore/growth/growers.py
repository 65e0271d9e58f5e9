"""Growers: one growth of a network, from scores to widened layers, for any framework.

Every grower runs the same steps in :meth:`Grower.grow`: ask the host
(:class:`~simcore.growth.protocol.GrowthHost`) for the growable layers, work out the budget
(``ratio`` of the neuron count, or of the parameter count), draw this growth's seed (the first
replica's under data parallelism), score every candidate neuron of every layer, average the
scores over replicas, pick the lowest globally (:func:`~simcore.growth.select_lowest`), plan the
grown arrays with the core's widening operators (downstream layers first) and let the host write
them and carry the optimizer state in one transaction. Subclasses supply the scores and the
widening: :class:`RandomGrower` here, :class:`~simcore.growth.ssd_grower.SSDGrower` and
:class:`~simcore.growth.firefly_grower.FireflyGrower` in their own modules.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, overload

import array_api_compat
import numpy as np

from .._arrays import check_choice
from ._host import to_numpy
from .budget import UNITS, growth_budget, select_lowest
from .chain import GrowthChain
from .channel_map import ChannelMap
from .flow import ChannelFlow
from .protocol import Array, Batch, GrowableLayer, GrowthError, GrowthHost, LossFn
from .widen import INCOMING, OUTGOING, add_neurons

__all__ = [
    "Grower",
    "GrowthReport",
    "PerLayerState",
    "RandomGrower",
    "RandomState",
    "as_batches",
    "check_loss",
    "check_real_range",
    "neuron_cost",
]

StateT = TypeVar("StateT")
LayerT = TypeVar("LayerT")


def check_real_range(value: Any, name: str, *, low: float | None = None,
                     high: float | None = None, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high)`` (``(low, high)`` with ``low_open``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value >= high
    if not math.isfinite(value) or too_low or too_high:
        bounds = ("(" if low_open else "[") + f"{low if low is not None else '-inf'}, " + (
            f"{high})" if high is not None else "inf)")
        raise ValueError(f"{name} must be finite and in {bounds}, got {value}")
    return value


def as_batches(data_batches: Iterable[Batch] | None, required: bool) -> list[Batch]:
    """``data_batches`` as a list of ``(inputs, targets)`` pairs (non-empty if ``required``)."""
    if data_batches is None:
        if required:
            raise TypeError("data_batches is required: an iterable of (inputs, targets) pairs")
        return []
    batches = list(data_batches)
    for i, batch in enumerate(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"data_batches[{i}] must be an (inputs, targets) pair")
    if required and not batches:
        raise ValueError("data_batches is empty: scoring needs at least one batch")
    return batches


def check_loss(loss: Any, *, finite: bool = True, name: str = "loss_fn(outputs, targets)") -> Any:
    """``loss`` if it is a 0-d array (and finite, unless ``finite=False``), else raise.

    ``finite=False`` looks at the type and shape only, so it can run inside a traced function.
    """
    if not array_api_compat.is_array_api_obj(loss) or loss.ndim != 0:
        raise TypeError(f"{name} must return a 0-d tensor, got {type(loss).__name__}")
    if finite and not bool(array_api_compat.array_namespace(loss).isfinite(loss)):
        raise ValueError(f"{name} is not finite ({float(loss)}): cannot score growth")
    return loss


def _per_channel(array: Array, axis: int) -> int:
    shape = tuple(int(s) for s in array.shape)
    return math.prod(shape) // shape[axis]


def neuron_cost(flow: ChannelFlow, state: Mapping[str, Array]) -> int:
    """Parameters one more channel of ``flow`` costs (incoming row, norms, depthwise, consumers).

    Norm statistics are buffers, not parameters: only a norm's scale and shift count. A
    residual group's channel costs a row in every member; stand-in consumers
    (:class:`~.flow.Consumer`'s ``stand_in``) are not parameters and cost nothing.
    """
    cost = _per_channel(state[flow.producer], flow.out_axis) + (flow.bias is not None)
    for m in flow.members:
        cost += _per_channel(state[m.weight], m.out_axis) + (m.bias is not None)
    norms = [flow.norm, *(d.norm for d in flow.depthwise), *(m.norm for m in flow.members),
             *flow.downstream_norms]
    cost += sum((n.scale is not None) + (n.shift is not None) for n in norms if n is not None)
    for d in flow.depthwise:
        cost += _per_channel(state[d.weight], d.channel_axis) + (d.bias is not None)
    for c in flow.consumers:
        if c.stand_in:
            continue
        cost += _per_channel(state[c.weight], c.in_axis) * c.spatial
    return cost


@dataclass(frozen=True)
class GrowthReport:
    """What one growth did: per-layer widths and additions, the budget and parameter counts.

    ``scores`` holds, per producer, the float64 scores the selection saw (lowest wins; averaged
    over replicas): Random uniform draws, SSD ``lambda_min`` per neuron, Firefly gate gradients
    of the split candidates (one per neuron) followed by those of the new-neuron candidates.
    ``params_before``/``params_after`` count every parameter of the model. ``skipped`` names
    each layer the adapter found but could not grow, with why (one reason per layer), and
    ``skipped_widths`` its width; both are empty where the adapter was told which layers to
    grow. :attr:`growable_share` is the share of neurons in growable layers.
    """

    method: str
    budget: int
    widths_before: dict[str, int]
    widths_after: dict[str, int]
    params_before: int
    params_after: int
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    skipped: dict[str, str] = field(default_factory=dict)
    skipped_widths: dict[str, int] = field(default_factory=dict)

    @property
    def growable_share(self) -> float:
        """Neurons of the growable layers over those of every layer found (0 if none was)."""
        growable = sum(self.widths_before.values())
        found = growable + sum(self.skipped_widths.values())
        return growable / found if found else 0.0

    @property
    def added(self) -> dict[str, int]:
        """Neurons added per producer layer (0 for layers that did not grow)."""
        return {k: self.widths_after[k] - self.widths_before[k] for k in self.widths_before}

    @property
    def total_added(self) -> int:
        return sum(self.added.values())

    @property
    def grown_layers(self) -> list[str]:
        """Names of the producers that grew (what the similarity phase acts on)."""
        return [k for k, v in self.added.items() if v > 0]


@dataclass(frozen=True, eq=False)  # arrays inside: compare by identity
class PerLayerState(Sequence[LayerT]):
    """A method's state made of one value per layer (``state[i]`` is layer ``i``'s)."""

    layers: tuple[LayerT, ...]

    @overload
    def __getitem__(self, index: int) -> LayerT: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[LayerT, ...]: ...

    def __getitem__(self, index: int | slice) -> LayerT | tuple[LayerT, ...]:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)


class Grower(Generic[StateT]):
    """Base of the growers: budget, global selection, planning, report.

    Subclasses implement :meth:`score` (per-layer scores, lowest wins, and the method's state,
    a frozen dataclass ``StateT`` the widening needs) and :meth:`widen` (the core operator for
    one layer), or override :meth:`select`/:meth:`plan` where one layer at a time does not fit.
    ``seed`` seeds a ``numpy.random.Generator``; each growth draws a fresh seed from it.
    """

    method: ClassVar[str] = "base"
    needs_data: ClassVar[bool] = True

    def __init__(self, *, seed: int | None = 0, only_negative: bool = False):
        self.rng = np.random.default_rng(seed)
        if not isinstance(only_negative, (bool, np.bool_)):
            raise TypeError(f"only_negative must be a bool, got {type(only_negative).__name__}")
        self.only_negative = bool(only_negative)

    # subclass API ----------------------------------------------------------
    def score(self, host: GrowthHost, layers: Sequence[GrowableLayer], batches: list[Batch],
              loss_fn: LossFn | None, rng: np.random.Generator) -> tuple[list[Array], StateT]:
        """Per-layer scores (1-d, lowest wins) and the state :meth:`plan` needs."""
        raise NotImplementedError

    def widen(self, params: dict[str, Array], core_flow: ChannelFlow, index: int,
              picks: np.ndarray, state: StateT,
              rng: np.random.Generator) -> tuple[dict[str, Array], ChannelMap]:
        """Grow layer ``index`` by its ``picks``: ``(new params, channel map)``."""
        raise NotImplementedError

    def most_new_neurons(self, widths: Sequence[int],
                         caps: Sequence[int | None] | None) -> int:
        """The most neurons one growth can add: one candidate per existing neuron, under caps."""
        caps = [None] * len(widths) if caps is None else caps
        return sum(w if c is None else min(w, int(c)) for w, c in zip(widths, caps, strict=True))

    def select(self, scores: list[np.ndarray], budget: int, caps: Sequence[int | None] | None,
               state: StateT) -> list[Any]:
        """Global lowest-``budget`` picks per layer (indices into each layer's scores)."""
        return select_lowest(scores, budget, caps=caps, only_negative=self.only_negative)

    def plan(self, params: Mapping[str, Array], core_flows: Sequence[ChannelFlow],
             picks: Sequence[Any], state: StateT,
             rng: np.random.Generator) -> tuple[dict[str, Array], list[Any]]:
        """The grown params of every flow (one dict) and a channel map per flow (None: no growth).

        ``picks`` is what :meth:`select` returned. Default: :meth:`widen` on each flow with
        picks, last flow first, chained on one dict (a layer's incoming rows, and any
        direction over them, keep their size until every layer after it has grown).
        """
        maps: list[Any] = [None] * len(core_flows)
        chain = GrowthChain(params)  # residual groups: a producer's inputs may grow first
        for index in reversed(range(len(core_flows))):
            chosen = np.asarray(picks[index], dtype=np.int64)
            if chosen.size:
                def widen(p: dict[str, Array], flow: ChannelFlow, i: int = index,
                          c: np.ndarray = chosen) -> Any:
                    return self.widen(p, flow, i, c, state, rng)

                maps[index] = chain.grow(core_flows[index], widen)
        return chain.params, maps

    # shared driver -----------------------------------------------------------
    def check_request(self, data_batches: Iterable[Batch] | None, loss_fn: LossFn | None, *,
                      ratio: float, unit: str) -> list[Batch]:
        """Refuse bad :meth:`grow` arguments before any work; returns the batches as a list."""
        check_choice(unit, UNITS, "unit")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"ratio must be a float, got {type(ratio).__name__}")
        if not 0.0 < ratio < float("inf"):
            raise ValueError(f"ratio must be positive and finite, got {ratio}")
        if self.needs_data and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable as loss_fn(outputs, targets), got {loss_fn!r}"
            )
        return as_batches(data_batches, self.needs_data)

    def grow(self, host: GrowthHost, data_batches: Iterable[Batch] | None,
             loss_fn: LossFn | None, *, ratio: float = 0.35, unit: str = "neurons",
             caps: Sequence[int | None] | None = None) -> GrowthReport:
        """Grow the host's model once; returns a :class:`GrowthReport`.

        ``data_batches``: an iterable of ``(inputs, targets)``; ``loss_fn(outputs, targets)`` a
        batch-mean loss (neither is needed by :class:`RandomGrower`). ``ratio`` of the neuron
        count (``unit="neurons"``) or of the parameter count (``unit="parameters"``) is added;
        ``caps`` bounds the picks per layer. A failed growth leaves the model as it was.
        """
        batches = self.check_request(data_batches, loss_fn, ratio=ratio, unit=unit)
        layers = tuple(host.layers())
        if not layers:
            raise GrowthError("the model has no growable layer")
        names = [layer.name for layer in layers]
        flows = [layer.flow for layer in layers]
        state = host.read_state()
        widths = [f.channels(state) for f in flows]
        params_before = host.parameter_count()
        budget = self._budget(widths, params_before, float(ratio), unit,
                              [neuron_cost(f, state) for f in flows])
        if caps is not None and len(caps) != len(flows):
            raise ValueError(f"caps must have one entry per layer ({len(flows)}), got {len(caps)}")
        most = self.most_new_neurons(widths, caps)
        if budget > most:  # refused before scoring, with the reason (not select's clamp=)
            hint = f" (at most {most / sum(widths):.3g})" if unit == "neurons" else ""
            raise ValueError(
                f"ratio={ratio} asks for {budget} new neurons, but one {type(self).__name__} "
                f"growth adds at most {most} here ({self._candidates_phrase()}"
                f"{', under the caps' if caps is not None else ''}); use a smaller ratio{hint} "
                "or grow several times"
            )
        rng = np.random.default_rng(host.shared_seed(int(self.rng.integers(0, 2**62))))

        raw_scores, method_state = self.score(host, layers, batches, loss_fn, rng)
        scores = [host.mean_over_replicas(np.asarray(to_numpy(s, "scores"), dtype=np.float64))
                  for s in raw_scores]
        picks = self.select(scores, budget, caps, method_state)
        new_state, maps = self.plan(host.read_state(), flows, picks, method_state, rng)
        host.apply(new_state, maps)
        grown = host.read_state()
        return GrowthReport(
            method=self.method,
            budget=int(budget),
            widths_before=dict(zip(names, widths, strict=True)),
            widths_after={n: f.channels(grown) for n, f in zip(names, flows, strict=True)},
            params_before=params_before,
            params_after=host.parameter_count(),
            scores=dict(zip(names, scores, strict=True)),
        )

    def _candidates_phrase(self) -> str:
        return "each existing neuron is one candidate"

    @staticmethod
    def _budget(widths: list[int], params: int, ratio: float, unit: str,
                neuron_params: list[int]) -> int:
        """Neurons to add this growth: ``ratio`` of the neuron count, or of the parameter count."""
        if unit == "neurons":
            return growth_budget(sum(widths), ratio, unit="neurons")
        # "parameters": at the width-weighted mean cost of one more neuron over the layers.
        per_neuron = sum(w * c for w, c in zip(widths, neuron_params, strict=True)) / sum(widths)
        return growth_budget(sum(widths), ratio, unit="parameters",
                             params_per_neuron=per_neuron, total_params=params)


@dataclass(frozen=True)
class RandomState:
    """Random growth carries nothing from scoring to widening: its draws are the scores."""


class RandomGrower(Grower[RandomState]):
    """The paper's "Random" growth: add randomly initialised neurons (Dota 2 / Net2Net style).

    Which layers grow is random too: every existing neuron gets a uniform random
    score and the ``budget`` lowest win, so a layer grows in expectation in
    proportion to its width. New neurons get He-initialised incoming weights
    and, with ``outgoing="zero"`` (default), zero outgoing weights: the network
    function is kept exactly. ``outgoing="small"`` draws ``U(-scale, scale)``.
    """

    method = "random"
    needs_data = False

    def __init__(self, *, seed: int | None = 0, incoming: str = "he", outgoing: str = "zero",
                 outgoing_scale: float = 0.01):
        super().__init__(seed=seed)
        self.incoming = check_choice(incoming, INCOMING, "incoming")
        self.outgoing = check_choice(outgoing, OUTGOING, "outgoing")
        self.outgoing_scale = check_real_range(outgoing_scale, "outgoing_scale", low=0.0)

    def score(self, host, layers, batches, loss_fn, rng):
        state = host.read_state()
        return [rng.random(layer.flow.channels(state)) for layer in layers], RandomState()

    def widen(self, params, core_flow, index, picks, state, rng):
        return add_neurons(params, core_flow, int(picks.size), rng=rng, incoming=self.incoming,
                           outgoing=self.outgoing, outgoing_scale=self.outgoing_scale)
