"""What a framework provides so that the core growers can grow its models.

The growers of :mod:`simcore.growth.growers` (Random, SSD, Firefly) hold the algorithms: budget,
scoring, global selection, planning with the widening operators. Everything that needs the
framework itself -- running the model, autodiff, writing parameters, optimizer state, collectives
-- goes through one object implementing :class:`GrowthHost`. A host wraps one model (and its
optimizer) for one growth; the PyTorch adapter's is ``simcore.adapters.torch.host.TorchGrowthHost``.

Arrays passed across the protocol are the framework's own (any Array-API library); the core's
operators act on them directly. Only scores and picks are NumPy (host-side decisions).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, runtime_checkable

from .._types import Array
from .channel_map import ChannelMap
from .flow import ChannelFlow

__all__ = [
    "Array",
    "Batch",
    "GrowableLayer",
    "GrowthError",
    "GrowthHost",
    "LossFn",
    "SplittingStatistics",
]

#: One ``(inputs, targets)`` pair of a data batch, in whatever form the model takes.
Batch: TypeAlias = tuple[Any, Any]
#: ``loss_fn(outputs, targets)``: a 0-d, batch-mean loss.
LossFn: TypeAlias = Callable[[Any, Any], Array]


class GrowthError(ValueError):
    """A layer cannot be grown (its channels reach an operation growth cannot follow)."""


@dataclass(frozen=True)
class GrowableLayer:
    """One growable producer: a name for reports and the channel flow over state names."""

    name: str
    flow: ChannelFlow

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__}")
        if not isinstance(self.flow, ChannelFlow):
            raise TypeError(f"flow must be a ChannelFlow, got {type(self.flow).__name__}")


@dataclass(frozen=True)
class SplittingStatistics:
    """What SSD needs of one layer, gathered over the scoring batches.

    ``activation``: the name of the activation after the producer (and its norm), as known to
    :func:`simcore.growth.second_derivative`. ``bn_scale``: the norm's per-channel coefficient
    (:func:`simcore.growth.bn_coefficient`), or None without a norm. ``batches``: per batch,
    ``(patches (B, P, d), backprop (B, P, n), preactivations (B, P, n))`` as
    :func:`simcore.growth.splitting_matrices` takes them. ``members``: the same for each
    member of a residual group (``ChannelFlow.members``), in order; the pre-activations are
    the stream's, after the add.
    """

    activation: str
    bn_scale: Array | None
    batches: tuple[tuple[Array, Array, Array], ...]
    members: tuple[SplittingStatistics, ...] = ()


@runtime_checkable
class GrowthHost(Protocol):
    """One model (with its optimizer) of some framework, as the core growers see it.

    A host is made for one growth. Its methods are called in this order: :meth:`layers`,
    :meth:`read_state`, :meth:`parameter_count`, :meth:`shared_seed`, the scoring methods the
    grower needs, :meth:`mean_over_replicas`, then :meth:`apply` once.
    """

    def layers(self) -> Sequence[GrowableLayer]:
        """The layers this growth may grow, producers in forward order."""
        ...

    def read_state(self) -> dict[str, Array]:
        """Every named parameter and buffer the flows name, as arrays detached from autodiff."""
        ...

    def parameter_count(self) -> int:
        """The number of trainable parameters of the whole model (what a report counts)."""
        ...

    def splitting_statistics(
        self, batches: Sequence[Batch], loss_fn: LossFn
    ) -> list[SplittingStatistics]:
        """Run the model on ``batches`` in scoring mode and capture SSD's inputs, per layer.

        Scoring mode: normalisation uses its running statistics and nothing in the model (its
        modes, statistics, gradients) is left changed.
        """
        ...

    def forward_with(
        self, widened_state: Mapping[str, Array], channel_maps: Sequence[ChannelMap | None]
    ) -> Callable[[Mapping[str, Array], Any], Any]:
        """A pure forward pass ``f(state, inputs)`` of a widened copy of the model.

        The copy has the structure of ``widened_state`` (the model's state grown by
        ``channel_maps``, one per layer, None for a layer that does not grow); ``f`` runs it in
        scoring mode with the arrays of ``state`` (same names and shapes), so that gradients
        reach them. The model itself is not changed.
        """
        ...

    def value_and_grad(
        self, fn: Callable[[list[Array]], Array], variables: Sequence[Array]
    ) -> tuple[Array, list[Array]]:
        """``fn(variables)`` (a 0-d array) and its gradient with respect to each variable.

        A variable that ``fn`` does not use gets a zero gradient.
        """
        ...

    def mean_over_replicas(self, x: Array) -> Array:
        """The mean of ``x`` over the data-parallel replicas; ``x`` itself without any.

        ``x`` is a framework array or a NumPy array (scores); the result is of the same kind.
        Every replica calls it the same number of times in the same order.
        """
        ...

    def shared_seed(self, seed: int) -> int:
        """The first replica's ``seed`` on every replica (``seed`` itself without replicas)."""
        ...

    def apply(
        self, new_state: Mapping[str, Array], channel_maps: Sequence[ChannelMap | None]
    ) -> None:
        """Write the grown layers into the model and carry the optimizer state, atomically.

        ``channel_maps[i]`` is the layer's map (or the maps applied in order, as Firefly's
        split-then-add pair), None for a layer that does not grow. ``new_state`` holds every
        grown layer's final arrays. If anything fails, the model and the optimizer are left
        exactly as they were.
        """
        ...
