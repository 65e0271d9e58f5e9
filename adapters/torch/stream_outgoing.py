"""Outgoing weights of a routed stream's new channels: stand-in consumer arrays for the core.

The core grows a routed stream's producers only; where the channels go after the shuffle, and
which consumer columns they get, is decided afterwards (:mod:`.permutations`). A new channel
therefore had no outgoing weights in the core: Firefly's gates on new-neuron candidates scaled
nothing and scored 0. Here every producer ``p`` of a region and every consumer ``m`` that its
channels can reach (at some width: the paths move with it) get a *stand-in* array
``"m.weight@p"``: ``m``'s weight with one column per channel of ``p``, the column ``m`` reads
that channel with (zero where ``m`` does not read it at this width). The core grows stand-ins as
consumers (:class:`simcore.growth.Consumer` with ``stand_in=True``): Random writes zero
columns, Firefly draws, trains, scores and shrinks its new neurons' columns there as for any
consumer (a split's halving is not used: the placement shares old columns itself). The
placement gives a fresh channel in a free slot of ``p`` the stand-in's column of every consumer
on that slot's path (docs/design.md, 'Routed streams').
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from simcore.growth import Consumer

from .flows import TorchFlow
from .streams import slot_tracer

__all__ = ["StandIns", "stand_in_name", "stand_ins"]


def stand_in_name(consumer: str, producer: str) -> str:
    """The stand-in array of ``consumer``'s columns for ``producer``'s channels."""
    return f"{consumer}.weight@{producer}"


@dataclass(frozen=True)
class StandIns:
    """One routed flow's stand-in arrays (name -> tensor), in a fixed order."""

    arrays: Mapping[str, torch.Tensor]

    def consumers(self) -> tuple[Consumer, ...]:
        """The core consumers naming the stand-ins."""
        return tuple(Consumer(name, in_axis=1, stand_in=True) for name in self.arrays)


def stand_ins(model: nn.Module, flow: TorchFlow,
              graph_module: torch.fx.GraphModule | None = None) -> StandIns:
    """The stand-in arrays of routed ``flow`` in ``model`` as it is now (``graph_module``: a
    ``torch.fx.symbolic_trace`` of ``model`` to share between flows)."""
    routing = flow.routing
    if routing is None:
        raise ValueError(f"the flow of {flow.producer!r} is not a routed stream")
    tracer = slot_tracer(model, routing, graph_module)
    producer = model.get_submodule(flow.producer)
    if not isinstance(producer, nn.Conv2d):
        raise TypeError(f"a routed stream's producer must be a Conv2d, got {type(producer)}")
    width = producer.out_channels
    reads = tracer.slots(width).reads
    arrays: dict[str, torch.Tensor] = {}
    for consumer, producers in sorted(tracer.reaching().items()):
        conv = model.get_submodule(consumer)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"a routed stream's consumer must be a Conv2d, got {type(conv)}")
        weight = conv.weight.detach()
        for p in producers:
            at = [(i, c) for i, (q, c) in enumerate(reads[consumer]) if q == p]
            columns = weight.new_zeros((weight.shape[0], width, *weight.shape[2:]))
            if at:
                read, channel = (torch.as_tensor(v, device=weight.device) for v in zip(*at,
                                                                                     strict=True))
                columns[:, channel] = weight[:, read]
            arrays[stand_in_name(consumer, routing.producers[p])] = columns
    return StandIns(arrays)
