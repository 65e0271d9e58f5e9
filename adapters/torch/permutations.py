"""Place the channels of a grown routed stream so every old channel keeps its path.

The core grows a routed stream (:mod:`.streams`) as a group: every producer gets the same new
channels, appended (its own BatchNorm with it), and nothing else. Where the channels go after the
shuffle is decided here, per producer, from the paths :func:`~.streams.trace_slots` gives at
the old and the new width (docs/design.md, 'Routed streams'):

- each old channel takes a slot of the new layout with the same path (the same consumers and
  indexed modules), so it reaches the same layers; the consumers' columns and the indexed
  modules' entries follow it;
- a split's copy takes another slot of its parent's path, and both get half the parent's
  columns (the function kept to O(eps^2), as everywhere);
- fresh channels take the remaining slots with zero columns (the function kept exactly), or
  the columns the core gave them in the stand-in arrays of :mod:`.stream_outgoing` (Firefly's
  new neurons, shrunk to ``new_eps``), fresh depthwise filters (He-normal) and identity
  BatchNorms on their path;
- if the slots left over are more than the fresh channels, copies without a slot on their
  parent's path fill them as new channels: zero columns, and the parent's row back to the mean
  of the two (its own, unperturbed);
- when the new width has fewer slots of some path than old channels on it (the paths of a
  deep shuffle move unevenly with the width), the growth keeps fewer new channels: the largest
  count that fits; the copies left out give their parent its row back, as above.

:class:`StreamLayout` holds these decisions for one growth; :meth:`StreamLayout.physical` turns
the core's arrays (appended layout) into the model's, differentiably (Firefly scores through
it), and :meth:`StreamLayout.optimizer_growth` moves the optimizer's state the same way.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .flows import GrowthError, TorchFlow
from .optim import OptimizerGrowth, as_channel_maps
from .stream_outgoing import stand_in_name
from .streams import SlotMap, slot_tracer

__all__ = ["StreamLayout", "composed_sources", "physical_state", "plain_row_sources",
           "stream_layout"]

_FRESH_NORM = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def composed_sources(channel_map: Any) -> tuple[int, ...]:
    """The old channel each final channel copies (-1: fresh), through maps applied in order."""
    maps = as_channel_maps(channel_map)
    sources = list(maps[0].sources)
    for cmap in maps[1:]:
        sources = [sources[s] if s >= 0 else -1 for s in cmap.sources]
    return tuple(sources)


@dataclass(frozen=True)
class _Placement:
    """One producer's new layout: per new slot, which channel of the core's rows fills it."""

    logical: np.ndarray  # index into the core's rows (appended layout)
    source: np.ndarray  # the old channel it copies, -1 fresh
    partner: np.ndarray  # the copy whose row is averaged back into a parent's, or -1
    outgoing: np.ndarray  # factor on the parent's consumer columns (0: none)
    fresh_path: np.ndarray  # its indexed entries start fresh


def _fits(old: SlotMap, new: SlotMap) -> bool:
    for before, after in zip(old.paths, new.paths, strict=True):
        room = Counter(after)
        if any(room[path] < count for path, count in Counter(before).items()):
            return False
    return True


def _place(old_paths, new_paths, sources: Sequence[int], width: int) -> _Placement:
    """One producer's placement (see the module docstring); ``width`` slots are filled."""
    n = len(old_paths)
    free: dict[frozenset, list[int]] = {}
    for slot, path in enumerate(new_paths):
        free.setdefault(path, []).append(slot)
    slot_of = {r: free[old_paths[r]].pop(0) for r in range(n)}
    placed: dict[int, list[int]] = {}  # parent -> its copies on its path
    for c in range(n, len(sources)):
        room = free.get(old_paths[sources[c]]) if sources[c] >= 0 else None
        if room:
            slot_of[c] = room.pop(0)
            placed.setdefault(sources[c], []).append(c)
    fresh = [c for c in range(n, len(sources)) if sources[c] < 0]
    left_out = [c for c in range(n, len(sources)) if sources[c] >= 0 and c not in slot_of]
    split = {sources[c] for c in range(n, len(sources)) if sources[c] >= 0}
    rest = sorted(s for slots in free.values() for s in slots)
    for slot, c in zip(rest, fresh + left_out, strict=False):
        slot_of[c] = slot  # fresh channels first; copies here become new channels
    logical = np.full(width, -1, dtype=np.int64)
    for c, slot in slot_of.items():
        logical[slot] = c
    source = np.array([c if c < n else sources[c] for c in logical.tolist()], dtype=np.int64)
    partner = np.full(width, -1, dtype=np.int64)
    outgoing = np.zeros(width)
    for slot, c in enumerate(logical.tolist()):
        parent = c if c < n else sources[c]
        if c < n and c in split and c not in placed:  # its copy left: its own row back
            partner[slot] = next(k for k in range(n, len(sources)) if sources[k] == c)
        if c < n or c in placed.get(parent, ()):  # on the path: the columns shared out
            outgoing[slot] = 1.0 / (1 + len(placed.get(parent, ())))
    return _Placement(logical, source, partner, outgoing, fresh_path=outgoing == 0)


@dataclass(frozen=True)
class StreamLayout:
    """Where every channel of one routed flow goes in one growth (see the module docstring)."""

    flow: TorchFlow
    old_width: int
    width: int
    placements: tuple[_Placement, ...]
    old: SlotMap
    new: SlotMap
    seed: int = 0  # of the fresh depthwise filters (with the module's name)

    # -- the modules and their entries --------------------------------------------------
    def _row_modules(self) -> list[tuple[int, str]]:
        """(producer index, module) of every producer and its own norm."""
        units = [(self.flow.producer, self.flow.norm),
                 *((m.producer, m.norm) for m in self.flow.members)]
        return [(i, name) for i, unit in enumerate(units) for name in unit if name is not None]

    def _reads(self, module: str):
        """Per input channel of ``module``: (placement, slot, old position or -1)."""
        position = self.old.position(module)
        out = []
        for p, slot in self.new.reads[module]:
            placement = self.placements[p]
            source = int(placement.source[slot])
            out.append((placement, slot, position.get((p, source), -1) if source >= 0 else -1))
        return out

    def entries(self, model: nn.Module) -> list[tuple[str, str, int]]:
        """``(state_dict name, kind, axis)`` of every tensor the growth changes."""
        out = []
        for _, name in self._row_modules():
            for attr, _ in _tensors(model.get_submodule(name)):
                out.append((f"{name}.{attr}", "row", 0))
        for name in self.flow.routing.consumers:
            out.append((f"{name}.weight", "consumer", 1))
        for name in self.flow.routing.indexed:
            for attr, _ in _tensors(model.get_submodule(name)):
                out.append((f"{name}.{attr}", "indexed", 0))
        return out

    def sizes(self, model: nn.Module) -> list[tuple[str, str, int]]:
        """``(module, attribute, value)`` of every size attribute the growth sets."""
        out = []
        for _, name in self._row_modules():
            module = model.get_submodule(name)
            attr = "num_features" if hasattr(module, "num_features") else "out_channels"
            out.append((name, attr, self.width))
        for name in self.flow.routing.consumers:
            out.append((name, "in_channels", len(self.new.reads[name])))
        for name in self.flow.routing.indexed:
            size = len(self.new.reads[name])
            module = model.get_submodule(name)
            attrs = (("num_features",) if hasattr(module, "num_features")
                     else ("in_channels", "out_channels", "groups"))
            out.extend((name, attr, size) for attr in attrs)
        return out

    # -- values ------------------------------------------------------------------------
    def physical(self, model: nn.Module, values: Mapping[str, torch.Tensor],
                 row_sources: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        """The model's tensors from ``values``: the core's rows for producers and their norms
        (appended layout), the current tensors for consumers and indexed modules, and the
        stand-ins (:mod:`.stream_outgoing`) for the new channels' columns where ``values``
        holds them. ``row_sources``: per consumer whose rows grew already in ``values``, the
        old row each row copies (-1 fresh), from :meth:`row_sources` or
        :func:`~simcore.adapters.torch.permutations.composed_sources`."""
        out = {}
        units = self._units()
        for name, kind, axis in self.entries(model):
            module, _, attr = name.rpartition(".")
            value = values[name]
            if kind == "row":
                placement = self.placements[units[module]]
                out[name] = _rows(value, placement)
            elif kind == "consumer":
                reads = self._reads(module)
                index = [max(old, 0) for _, _, old in reads]
                factor = [pl.outgoing[slot] if old >= 0 else 0.0 for pl, slot, old in reads]
                out[name] = self._fresh_columns(
                    module, _scaled(value.index_select(axis, _long(index, value)), factor, axis),
                    values, row_sources or {})
            else:
                reads = self._reads(module)
                index = [max(old, 0) for _, _, old in reads]
                fresh = [bool(pl.fresh_path[slot]) or old < 0 for pl, slot, old in reads]
                out[name] = _with_fresh(value.index_select(0, _long(index, value)), fresh,
                                        attr, module, self.seed)
        return out

    def _fresh_columns(self, module: str, value: torch.Tensor, values: Mapping[str, Any],
                       row_sources: Mapping[str, np.ndarray]) -> torch.Tensor:
        """``value`` (a consumer's columns, fresh ones zero) with each fresh channel's column
        taken from the stand-in of its producer, where ``values`` holds one."""
        by_producer: dict[int, tuple[list[int], list[int]]] = {}
        for i, (p, slot) in enumerate(self.new.reads[module]):
            placement = self.placements[p]
            if placement.source[slot] < 0:
                positions, logical = by_producer.setdefault(p, ([], []))
                positions.append(i)
                logical.append(int(placement.logical[slot]))
        for p, (positions, logical) in by_producer.items():
            stand_in = values.get(stand_in_name(module, self.flow.routing.producers[p]))
            if stand_in is None:
                continue
            columns = stand_in.index_select(1, _long(logical, value)).to(value.dtype)
            if columns.shape[0] != value.shape[0]:  # the consumer's own rows grew meanwhile
                sources = row_sources.get(module)
                if sources is None or len(sources) != value.shape[0]:
                    raise GrowthError(f"the rows of {module!r} grew, but not by a known map")
                columns = _scaled(columns.index_select(0, _long(np.maximum(sources, 0), value)),
                                  (np.asarray(sources) >= 0).astype(float), 0)
            value = value.index_copy(1, _long(positions, value), columns)
        return value

    def row_sources(self) -> dict[str, np.ndarray]:
        """Per producer of the flow, the old channel each of its final rows copies (-1 fresh),
        for the stand-in columns of a routed flow that reads it (:meth:`physical`)."""
        producers = (self.flow.producer, *(m.producer for m in self.flow.members))
        return {name: placement.source for name, placement in zip(producers, self.placements,
                                                                  strict=True)}

    def grown(self, model: nn.Module, values: dict[str, Any],
              row_sources: Mapping[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
        """:meth:`physical` of ``values`` (the grown arrays; entries it lacks are read from
        ``model``), written back into ``values`` so the next routed flow moves its own axis."""
        for name, kind, _ in self.entries(model):
            if kind == "row" and name not in values:
                raise ValueError(f"new_params has no entry {name!r} named by the flow of "
                                 f"{self.flow.producer!r}")
            module, _, attr = name.rpartition(".")
            value = values[name] if name in values else getattr(model.get_submodule(module), attr)
            values[name] = torch.as_tensor(value).detach()
        physical = self.physical(model, values, row_sources)
        values.update(physical)
        return physical

    def _units(self) -> dict[str, int]:
        return {name: i for i, name in self._row_modules()}

    def state(self, model: nn.Module, name: str, kind: str, value: torch.Tensor) -> torch.Tensor:
        """An optimizer state tensor of ``name`` moved as its parameter: copies take their
        parent's state, fresh channels zeros (docs/design.md, 'Growth')."""
        module = name.rpartition(".")[0]
        if kind == "row":
            placement = self.placements[self._units()[module]]
            index, keep = placement.source, placement.source >= 0
            axis = 0
        else:
            reads = self._reads(module)
            index = np.array([max(old, 0) for _, _, old in reads])
            keep = np.array([old >= 0 and (kind != "consumer" or pl.outgoing[slot] > 0)
                             and not (kind == "indexed" and pl.fresh_path[slot])
                             for pl, slot, old in reads])
            axis = 1 if kind == "consumer" else 0
        moved = value.index_select(axis, _long(np.maximum(index, 0), value))
        return _scaled(moved, keep.astype(float), axis)

    def optimizer_growth(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                         replaced: Mapping[str, tuple[torch.Tensor, torch.Tensor]], mode: str,
                         lr: float | None) -> OptimizerGrowth:
        """The optimizer's part: parameters re-pointed, state moved like the parameters."""
        kinds = {name: kind for name, kind, _ in self.entries(model)}
        held = {p: (g, i) for g, group in enumerate(optimizer.param_groups)
                for i, p in enumerate(group["params"])}
        positions, old_state, new_state = [], {}, {}
        for name, (old, new) in replaced.items():
            if old not in held:
                continue
            positions.append((*held[old], old, new))
            if old in optimizer.state:
                old_state[old] = optimizer.state[old]
                new_state[new] = {
                    k: (self.state(model, name, kinds[name], v).contiguous()
                        if isinstance(v, torch.Tensor) and v.ndim >= 1 else v)
                    for k, v in optimizer.state[old].items()}
        return OptimizerGrowth(optimizer, positions, old_state,
                               new_state if mode == "carry" else {}, mode == "fresh", lr)


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's per-channel parameters and buffers (not BatchNorm's batch counter)."""
    return [(attr, t) for attr, t in (*module.named_parameters(recurse=False),
                                      *module.named_buffers(recurse=False))
            if t is not None and t.ndim >= 1]


def _long(index: Any, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(index, dtype=np.int64), device=like.device)


def _scaled(value: torch.Tensor, factor: Sequence[float] | np.ndarray, axis: int) -> torch.Tensor:
    shape = [1] * value.ndim
    shape[axis] = -1
    scale = torch.as_tensor(np.asarray(factor, dtype=np.float64), dtype=value.dtype,
                            device=value.device).reshape(shape)
    return value * scale


def _rows(value: torch.Tensor, placement: _Placement) -> torch.Tensor:
    rows = value.index_select(0, _long(placement.logical, value))
    if (placement.partner >= 0).any():  # a parent whose copy left: the mean of the two rows
        partner = np.where(placement.partner >= 0, placement.partner, placement.logical)
        rows = (rows + value.index_select(0, _long(partner, value))) / 2
    return rows


def _with_fresh(value: torch.Tensor, fresh: Sequence[bool], attr: str, module: str, seed: int
                ) -> torch.Tensor:
    if not any(fresh):
        return value
    mask = torch.as_tensor(fresh, device=value.device).reshape(-1, *[1] * (value.ndim - 1))
    if value.ndim > 1:  # a depthwise filter: He-normal over its taps, never zero
        taps = math.prod(value.shape[1:])
        # The growth's seed and the module (zlib: str hashes change between processes), so
        # modules differ and the same growth draws the same filters every time it is asked.
        entropy = np.random.SeedSequence([seed, zlib.crc32(module.encode())])
        generator = torch.Generator().manual_seed(int(entropy.generate_state(1)[0]))
        init = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        init = (init * math.sqrt(2.0 / taps)).to(dtype=value.dtype, device=value.device)
    else:
        fill = _FRESH_NORM.get(attr, 0.0)
        init = torch.full_like(value, fill)
    return torch.where(mask, init, value)


def stream_layout(model: nn.Module, flow: TorchFlow, channel_map: Any,
                  seed: int = 0) -> StreamLayout:
    """Plan where ``flow``'s channels go when the core grew it by ``channel_map``; ``seed``
    (a non-negative int) draws the depthwise filters of its fresh channels."""
    sources = composed_sources(channel_map)
    producer = model.get_submodule(flow.producer)
    if not isinstance(producer, nn.Conv2d):
        raise TypeError(f"a routed stream's producer must be a Conv2d, got {type(producer)}")
    old_width = producer.out_channels
    tracer = slot_tracer(model, flow.routing)
    old = tracer.slots(old_width)
    added = len(sources) - old_width
    for kept in range(added, -1, -1):  # the most new channels whose paths fit
        try:
            new = tracer.slots(old_width + kept) if kept else old
        except GrowthError:  # the region does not run at this width (e.g. an odd split)
            continue
        if _fits(old, new):
            break
    width = old_width + kept
    placements = tuple(_place(before, after, sources, width)
                       for before, after in zip(old.paths, new.paths, strict=True))
    return StreamLayout(flow, old_width, width, placements, old, new, seed)


def plain_row_sources(flow: TorchFlow, channel_map: Any) -> dict[str, np.ndarray]:
    """Per producer of a flow that is not routed, the old row each grown row copies (-1 fresh),
    in the core's layout (the model's)."""
    sources = np.asarray(composed_sources(channel_map), dtype=np.int64)
    return dict.fromkeys(flow.producers, sources)


def physical_state(model: nn.Module, growths: Sequence[tuple[TorchFlow, Any]], seed: int = 0):
    """A function mapping the core's grown state to the model's layout for routed ``growths``.

    For Firefly's widened forward pass (the state changes at every call, the layout not):
    each routed flow's layout is planned once from ``model`` as it is before the growth.
    Routed flows are laid out last to first, as :func:`~.surgery.apply_growths` writes them,
    so a consumer's rows are in the model's order when its stand-in columns are placed. The
    stand-in arrays are left out of the result. ``seed`` as in :func:`stream_layout`.
    """
    plain: dict[str, np.ndarray] = {}
    for flow, cmap in growths:
        if flow.routing is None:
            plain.update(plain_row_sources(flow, cmap))
    layouts = [stream_layout(model, flow, cmap, seed) for flow, cmap in reversed(growths)
               if flow.routing is not None]
    stand_ins = {stand_in_name(module, producer) for layout in layouts
                 for module in layout.flow.routing.consumers
                 for producer in layout.flow.routing.producers}

    def physical(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values, row_sources = dict(state), dict(plain)
        for layout in layouts:
            values.update(layout.physical(model, values, row_sources))
            row_sources.update(layout.row_sources())
        return {name: value for name, value in values.items() if name not in stand_ins}

    return physical
