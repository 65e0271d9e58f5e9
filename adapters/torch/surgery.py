"""Write grown layers into a PyTorch model and its optimizer, atomically.

:func:`apply_growth` writes one grown flow back into the modules: parameters,
BatchNorm buffers, ``in/out_channels``, ``in/out_features``, ``groups`` and
``num_features`` change together, devices, dtypes and ``requires_grad`` are
kept, and the optimizer's parameter references and state follow
(:mod:`.optim`). It computes everything first and then swaps; if anything
raises during the swap, every change already made is undone, so the model and
the optimizer are exactly as before. :func:`apply_growths` and
:class:`GrowthTransaction` do the same for several flows as one change.

This module is the commit phase and the transaction: the order flows are written in, the
positions of a shared dict each one writes, applying swaps and undoing them. The changes
themselves, computed before anything is applied, are planned in :mod:`.surgery_swaps`.

Flow description (:mod:`.flows`) and discovery (:mod:`.discovery`) live in their own modules;
their public names are importable from here too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import nn

from simcore.extend import check_int
from simcore.growth import ChannelMap
from simcore.growth.chain import shifted_offset
from simcore.growth.growers import check_real_range

from .discovery import discover_flows, find_flow
from .flows import GrowthError, TorchConsumer, TorchDepthwise, TorchFlow, TorchNorm, unwrap
from .optim import as_channel_maps, check_growable_optimizer, check_optimizer_mode
from .permutations import plain_row_sources
from .surgery_swaps import Swap, growth_swaps, routed_swaps

__all__ = [
    "GrowthError",
    "GrowthTransaction",
    "TorchConsumer",
    "TorchDepthwise",
    "TorchFlow",
    "apply_growth",
    "apply_growths",
    "discover_flows",
    "find_flow",
    "unwrap",
]

#: One channel map, or several applied in order (Firefly: split, then add); None: no map.
ChannelMaps: TypeAlias = ChannelMap | Sequence[ChannelMap] | None


def _commit(swaps):
    """Apply ``swaps`` in order; on any exception (an interrupt too) undo them all and re-raise.

    Every swap is undone, not only those known to be done: an interrupt can land between a
    swap's ``apply()`` and any bookkeeping after it, and undoing a swap not yet applied is a
    no-op.
    """
    try:
        for swap in swaps:
            swap.apply()
    except BaseException:
        _undo(swaps)
        raise


def _undo(swaps):
    """Undo ``swaps`` newest first (each undo is idempotent and cannot fail)."""
    for swap in reversed(swaps):
        swap.undo()


def apply_growth(
    model: nn.Module,
    flow: TorchFlow,
    new_params: Mapping[str, torch.Tensor],
    channel_map: ChannelMaps,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_mode: str = "carry",
    lr: float | None = None,
    *,
    seed: int = 0,
) -> None:
    """Write a grown flow into ``model`` (and ``optimizer``) in place, atomically.

    ``new_params`` maps ``state_dict`` names to the grown arrays, as returned by
    the core operators (``simcore.growth.add_neurons`` and friends, called on
    ``dict(model.state_dict())`` and ``flow.channel_flow(model)``); entries the
    flow does not name are ignored. ``channel_map`` is the operator's
    :class:`~simcore.growth.channel_map.ChannelMap` (or a sequence of them applied in
    order). The optimizer is pointed at the new parameters
    (:mod:`simcore.adapters.torch.optim`): ``optimizer_mode="carry"`` grows the
    grown parameters' state with the channel map (new channels start at zero);
    ``optimizer_mode="fresh"`` (deprecated spelling ``"reset"``) drops ALL of the
    optimizer's state, every parameter's, as a rebuilt optimizer would (the reference
    implementations' behaviour; unlike the core's ``map_optimizer_state(mode="zero")``,
    which zeros only the flow's entries). ``lr``, if given, sets every param group's
    learning rate (the reference resets it after a growth). Parameters stay on
    their device and dtype and keep ``requires_grad``. ``seed`` (an int >= 0) draws the
    depthwise filters of fresh channels in a routed stream (the only values the core does not
    give; the growers pass their own growth's seed).

    >>> import numpy as np, torch
    >>> from torch import nn
    >>> from simcore.growth import add_neurons
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> flow = discover_flows(net)[0]
    >>> grown, cmap = add_neurons(dict(net.state_dict()), flow.channel_flow(net), 2,
    ...                           rng=np.random.default_rng(0))
    >>> apply_growth(net, flow, grown, cmap)
    >>> net[0]
    Linear(in_features=3, out_features=6, bias=True)
    >>> net[2]
    Linear(in_features=6, out_features=2, bias=True)
    """
    apply_growths(model, [(flow, channel_map)], new_params, optimizer, optimizer_mode, lr,
                  seed=seed)


def apply_growths(
    model: nn.Module,
    growths: Sequence[tuple[TorchFlow, ChannelMaps]],
    new_params: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_mode: str = "carry",
    lr: float | None = None,
    *,
    seed: int = 0,
) -> None:
    """Write several grown flows into ``model`` (and ``optimizer``) as one atomic change.

    ``growths`` holds ``(flow, channel_map)`` pairs, applied in that order; ``new_params`` holds
    every grown flow's final arrays (one dict, as a multi-layer plan returns it: a consumer that
    is also another flow's producer is written in its part for each flow). List downstream
    flows first, as the core growers plan them. Everything else is as in :func:`apply_growth`;
    if any flow fails, every flow applied before it is undone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for flow, _ in growths:
        _check_growth(flow, new_params)
    transaction = GrowthTransaction(model, optimizer, optimizer_mode, lr, seed=seed)
    # Routed streams last: they permute rows other flows write in the core's order.
    growths = _shifted(sorted(growths, key=lambda g: g[0].routing is not None))
    positions = _written_positions(unwrap(model), growths)
    # Not a ``with`` block: its normal exit calls __exit__ outside the block's handler, so an
    # interrupt landing there would escape with the growth made.
    try:
        for (flow, channel_map), written in zip(growths, positions, strict=True):
            transaction.apply(flow, new_params, channel_map, positions=written)
    except BaseException:
        transaction.rollback()
        raise


def _shifted(growths):
    """The growths with concatenation offsets shifted by the inputs written before them.

    Offsets are found in the model's layout; a flow written after another input of the same
    concatenation that sits before it finds its block moved by what that input added.
    """
    blocks: dict[str, list[tuple[int, int]]] = {}
    out = []
    for flow, channel_map in growths:
        if channel_map is None or not isinstance(flow, TorchFlow):
            out.append((flow, channel_map))
            continue
        maps = as_channel_maps(channel_map)
        added = len(maps[-1].sources) - maps[0].old_channels

        def shift(items):
            return tuple(
                dataclasses.replace(i, offset=shifted_offset(i.offset, blocks.get(i.module, [])))
                if i.offset is not None else i for i in items)

        out.append((dataclasses.replace(flow, consumers=shift(flow.consumers),
                                        downstream_norms=shift(flow.downstream_norms)),
                    channel_map))
        items: list[TorchConsumer | TorchNorm] = [*flow.consumers, *flow.downstream_norms]
        for item in items:
            if item.offset is not None:
                blocks.setdefault(item.module, []).append((item.offset, added))
    return out


def _written_positions(model, growths):
    """Per growth, ``{name: {axis: positions}}``: which entries of each final array it writes.

    One dict holds every flow's final arrays, and each flow is written in turn, so a flow
    writes only the positions that exist once it is applied: the model's own and those added
    by itself and by the flows written before it. New channels sit at the end of a flow's
    block (after the old channels, or at ``offset + n`` in a concatenation), so tracking, per
    array and axis, which growth added each position gives them, whatever order the flows
    reading one concatenation are written in.
    """
    modules = dict(model.named_modules())
    labels: dict[tuple[str, int], np.ndarray] = {}
    touched: list[list[tuple[str, int]]] = []
    for step, (flow, channel_map) in enumerate(growths):
        touched.append([])
        if channel_map is None:
            continue
        maps = as_channel_maps(channel_map)
        old_n, added = maps[0].old_channels, len(maps[-1].sources) - maps[0].old_channels
        for entry in flow.channel_flow(model)._named():
            module_name, _, attr = entry.name.rpartition(".")
            size = getattr(modules[module_name], attr).shape
            axis = entry.axis % len(size)
            key = (entry.name, axis)
            current = labels.setdefault(key, np.full(size[axis], -1, dtype=np.int64))
            at = ((entry.offset or 0) + old_n) * entry.spatial
            labels[key] = np.concatenate(
                [current[:at], np.full(added * entry.spatial, step, dtype=np.int64), current[at:]])
            touched[step].append(key)
    written: list[dict[str, dict[int, np.ndarray]]] = []
    for step, keys in enumerate(touched):
        positions: dict[str, dict[int, np.ndarray]] = {}
        for name, _ in keys:
            for (other, axis), label in labels.items():
                if other == name:
                    positions.setdefault(name, {})[axis] = np.flatnonzero(label <= step)
        written.append(positions)
    return written


class GrowthTransaction:
    """Growths of one model written one flow at a time, undone together if any fails.

    Each :meth:`apply` writes one flow atomically (as :func:`apply_growth`); leaving the
    ``with`` block by an exception, or calling :meth:`rollback`, undoes every flow applied so
    far, newest first, so the model and the optimizer are exactly as before the first. This
    holds for any ``BaseException`` (``KeyboardInterrupt`` included) raised at any line of the
    transaction's own code (``tests/test_torch_atomic_growth.py``); :meth:`rollback` cannot
    fail and may be called again. An interrupt in the caller's code right after the ``with``
    block's last line is the caller's: the growth is then complete.

    >>> from torch import nn
    >>> from simcore.growth import add_neurons
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> flow = discover_flows(net)[0]
    >>> grown, cmap = add_neurons(dict(net.state_dict()), flow.channel_flow(net), 2, rng=0)
    >>> with GrowthTransaction(net) as transaction:
    ...     transaction.apply(flow, grown, cmap)
    ...     transaction.rollback()
    >>> net[0].out_features
    4
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        optimizer_mode: str = "carry",
        lr: float | None = None,
        *,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        optimizer_mode = check_optimizer_mode(optimizer_mode)
        check_growable_optimizer(optimizer)
        if lr is not None:
            if optimizer is None:
                raise ValueError("lr is given but there is no optimizer to set it on")
            lr = check_real_range(lr, "lr", low=0.0, low_open=True)
        self.model = unwrap(model)
        self.optimizer, self.optimizer_mode, self.lr = optimizer, optimizer_mode, lr
        self.seed = check_int(seed, "seed", minimum=0)
        self._applied: list[list[Swap]] = []
        # Per grown dict: the routed flows' working copy, and the rows grown so far per module
        # (the old row each row copies), which a routed flow's stand-in columns follow.
        self._routed: list[tuple[Mapping[str, Any], dict[str, Any], dict[str, Any]]] = []

    def apply(self, flow: TorchFlow, new_params: Mapping[str, torch.Tensor],
              channel_map: ChannelMaps, *,
              positions: Mapping[str, Mapping[int, Any]] | None = None) -> None:
        """Write one grown flow (see :func:`apply_growth`); on failure nothing of it stays.

        ``positions``: per array and axis, the positions of ``new_params``' arrays this flow
        writes, when ``new_params`` holds the growth of several flows
        (:func:`apply_growths` works them out); without it, the leading part of every axis
        but the flow's own.
        """
        _check_growth(flow, new_params)
        working = next((w for w in self._routed if w[0] is new_params), None)
        if working is None:  # the routed flows of one growth share a working copy
            working = (new_params, dict(new_params), {})
            self._routed.append(working)
        _, values, row_sources = working
        if flow.routing is not None:
            swaps = routed_swaps(self.model, flow, values, channel_map, self.optimizer,
                                  self.optimizer_mode, self.lr, row_sources, self.seed)
        else:
            swaps = growth_swaps(self.model, flow, new_params, channel_map, self.optimizer,
                                  self.optimizer_mode, self.lr, positions)
            if channel_map is not None:
                row_sources.update(plain_row_sources(flow, channel_map))
        # Recorded before the first change, so a rollback sees it wherever an interrupt lands.
        self._applied.append(swaps)
        _commit(swaps)

    def rollback(self) -> None:
        """Undo every flow applied so far, newest first (idempotent; cannot fail)."""
        while self._applied:
            _undo(self._applied[-1])
            self._applied.pop()

    def __enter__(self) -> GrowthTransaction:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:  # None: the exception propagates
        # No line after the ``try``: an interrupt there would escape the handler.
        try:
            if exc_type is not None:
                self.rollback()
        except BaseException:  # an interrupt inside __exit__ itself: nothing may stay
            self.rollback()
            raise


def _check_growth(flow: Any, new_params: Any) -> None:
    if not isinstance(flow, TorchFlow):
        raise TypeError(f"flow must be a TorchFlow, got {type(flow).__name__}")
    if not isinstance(new_params, Mapping):
        raise TypeError(f"new_params must be a mapping of state_dict names, got {type(new_params)}")
