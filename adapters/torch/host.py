"""The PyTorch side of the core growers: a ``torch.nn.Module`` as a :class:`GrowthHost`.

:class:`TorchGrowthHost` wraps one model, its flows and its optimizer for one growth. The core
growers (:mod:`simcore.growth.growers`) call it to read the state, capture SSD's statistics
(:mod:`.capture`), run a widened copy for Firefly (``torch.func.functional_call``), take
gradients (``torch.autograd.grad``), average over DDP ranks (:mod:`.distributed`) and write the
growth with the optimizer state in one transaction (:func:`.surgery.apply_growths`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from simcore.growth import ChannelMap, GrowableLayer, SplittingStatistics

from .capture import splitting_statistics
from .distributed import GrowthCollectives, mean_over_ranks
from .distributed import shared_seed as seed_of_rank_0
from .flows import TorchFlow
from .group_capture import group_splitting_statistics
from .path_capture import path_splitting_statistics
from .permutations import physical_state
from .stream_outgoing import StandIns, stand_ins
from .surgery import apply_growths

__all__ = ["TorchGrowthHost", "parameter_count"]


def parameter_count(model: nn.Module) -> int:
    """The number of elements of every parameter of ``model``."""
    return sum(p.numel() for p in model.parameters())


class TorchGrowthHost:
    """One PyTorch model (not a DDP wrapper: pass ``.module``) growing along ``flows``.

    ``optimizer`` (optional) follows the grown parameters with ``optimizer_mode`` and ``lr``
    as in :func:`~simcore.adapters.torch.surgery.apply_growth`. ``collectives``: the growth's
    :class:`~simcore.adapters.torch.distributed.GrowthCollectives` (entered), which average
    over DDP ranks with a short timeout; without them the default process group is used.
    """

    def __init__(self, model: nn.Module, flows: Sequence[TorchFlow],
                 optimizer: torch.optim.Optimizer | None = None, *,
                 optimizer_mode: str = "carry", lr: float | None = None,
                 collectives: GrowthCollectives | None = None):
        self.model = model
        self.flows = list(flows)
        self.optimizer, self.optimizer_mode, self.lr = optimizer, optimizer_mode, lr
        self.collectives = collectives
        # What the scoring averages over ranks, for a timeout's message: the core averages
        # the scoring's tensors, then the final scores as NumPy arrays.
        self._scoring = "the scoring's values"
        self._stand_in_cache: dict[str, StandIns] | None = None
        # The growth's seed (shared_seed), for the only values drawn here: the depthwise
        # filters of fresh channels in routed streams.
        self._seed = 0

    def layers(self) -> list[GrowableLayer]:
        layers = []
        for f in self.flows:
            flow = f.channel_flow(self.model)
            if f.routing is not None:  # its new channels' columns (stream_outgoing.py)
                flow = dataclasses.replace(
                    flow, consumers=(*flow.consumers, *self._stand_ins()[f.producer].consumers()))
            layers.append(GrowableLayer(f.producer, flow))
        return layers

    def read_state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach() for k, v in self.model.state_dict().items()}
        for flow_stand_ins in self._stand_ins().values():
            state.update(flow_stand_ins.arrays)
        return state

    def _stand_ins(self) -> dict[str, StandIns]:
        """The routed flows' stand-in consumer arrays for the model as it is (until apply)."""
        if self._stand_in_cache is None:
            routed = [f for f in self.flows if f.routing is not None]
            traced = torch.fx.symbolic_trace(self.model) if routed else None
            self._stand_in_cache = {f.producer: stand_ins(self.model, f, traced) for f in routed}
        return self._stand_in_cache

    def parameter_count(self) -> int:
        return parameter_count(self.model)

    def splitting_statistics(self, batches, loss_fn) -> list[SplittingStatistics]:
        self._scoring = "SSD's splitting statistics"
        groups = [f for f in self.flows if f.members]
        routed = [f for f in self.flows if f.activation_paths and not f.members]
        plain = [f for f in self.flows if not f.members and not f.activation_paths]
        by_flow = dict(zip(plain, splitting_statistics(self.model, plain, batches, loss_fn)
                           if plain else [], strict=True))
        if groups:  # residual groups: read at the trace's nodes (group_capture.py)
            by_flow.update(zip(groups, group_splitting_statistics(self.model, groups, batches,
                                                                  loss_fn), strict=True))
        if routed:  # several activations, or one after a pooling (path_capture.py)
            by_flow.update(zip(routed, path_splitting_statistics(self.model, routed, batches,
                                                                 loss_fn), strict=True))
        return [by_flow[f] for f in self.flows]

    def forward_with(
        self, widened_state: Mapping[str, torch.Tensor], channel_maps: Sequence[Any]
    ) -> Callable[[Mapping[str, torch.Tensor], Any], Any]:
        self._scoring = "Firefly's candidate gradients"
        # A copy with the widened structure: only its modules' shapes are used, the arrays
        # come from the caller at every call. Its parameters and buffers live on the meta
        # device (shapes, no storage), so the copy costs no memory whatever the model's size;
        # tensors outside the state_dict (non-persistent buffers) are shared, not copied.
        in_state = {id(t) for t in self.model.state_dict(keep_vars=True).values()}
        memo: dict[int, Any] = {}
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) not in in_state:
                memo[id(t)] = t
            elif isinstance(t, nn.Parameter):
                memo[id(t)] = nn.Parameter(t.detach().to("meta"), requires_grad=False)
            else:
                memo[id(t)] = t.detach().to("meta")
        shadow = copy.deepcopy(self.model, memo)
        growths = [(flow, cmap) for flow, cmap in zip(self.flows, channel_maps, strict=True)
                   if cmap is not None]
        apply_growths(shadow, growths[::-1], widened_state, seed=self._seed)
        shadow.eval()
        for p in shadow.parameters():
            p.requires_grad_(False)

        # routed streams: the model's order
        physical = physical_state(self.model, growths, self._seed)

        def forward(state: Mapping[str, torch.Tensor], inputs: Any) -> Any:
            return torch.func.functional_call(shadow, physical(state), (inputs,))

        return forward

    def value_and_grad(self, fn, variables):
        leaves = [v.detach().requires_grad_(True) for v in variables]
        value = fn(leaves)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        return value.detach(), [torch.zeros_like(leaf) if g is None else g.detach()
                                for leaf, g in zip(leaves, grads, strict=True)]

    def mean_over_replicas(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        if self.collectives is None:
            return mean_over_ranks(x)
        what = "the scores" if isinstance(x, np.ndarray) else self._scoring
        return self.collectives.mean(x, f"averaging {what} over ranks")

    def shared_seed(self, seed: int) -> int:
        if self.collectives is None:
            self._seed = seed_of_rank_0(seed)
        else:
            self._seed = self.collectives.shared_seed(seed)
        return self._seed

    def apply(self, new_state: Mapping[str, torch.Tensor],
              channel_maps: Sequence[ChannelMap | Sequence[ChannelMap] | None]) -> None:
        # Downstream flows first, as they were planned.
        growths = [(flow, cmap) for flow, cmap in zip(self.flows, channel_maps, strict=True)
                   if cmap is not None]
        # The grown entries laid out as the parameters will be, one at a time in the caller's
        # own dict (the plan is not used after this): the surgery then takes these arrays as
        # they are instead of holding a contiguous copy of every grown layer next to the plan's.
        if isinstance(new_state, dict):
            grown = {name for flow, _ in growths for name in flow.channel_flow(self.model).names()}
            for name in grown & new_state.keys():
                value = new_state[name]
                if isinstance(value, torch.Tensor) and not value.is_contiguous():
                    new_state[name] = value.contiguous()
        self._stand_in_cache = None  # the model changes (or a failure left it as it was)
        apply_growths(self.model, growths[::-1], new_state, self.optimizer,
                      self.optimizer_mode, self.lr, seed=self._seed)
