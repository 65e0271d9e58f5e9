"""Write grown layers into a PyTorch model and its optimizer, atomically.

:func:`apply_growth` writes one grown flow back into the modules: parameters,
BatchNorm buffers, ``in/out_channels``, ``in/out_features``, ``groups`` and
``num_features`` change together, devices, dtypes and ``requires_grad`` are
kept, and the optimizer's parameter references and state follow
(:mod:`.optim`). It computes everything first and then swaps; if anything
raises during the swap, every change already made is undone, so the model and
the optimizer are exactly as before. :func:`apply_growths` and
:class:`GrowthTransaction` do the same for several flows as one change.

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

from simcore.growth import ChannelMap
from simcore.growth.chain import shifted_offset
from simcore.growth.growers import check_real_range

from .discovery import discover_flows, find_flow
from .flows import GrowthError, TorchConsumer, TorchDepthwise, TorchFlow, TorchNorm, unwrap
from .optim import (
    as_channel_maps,
    check_growable_optimizer,
    check_optimizer_mode,
    plan_optimizer_growth,
)
from .permutations import plain_row_sources, stream_layout

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


class _Swap:
    """One reversible change: set ``container[key] = new``; the old value is recorded up front.

    ``undo()`` is safe whether or not ``apply()`` ran (or was interrupted), and idempotent:
    it puts back what the container held when the swap was planned.
    """

    __slots__ = ("container", "key", "new", "old", "had_key")

    def __init__(self, container, key, new):
        self.container, self.key, self.new = container, key, new
        self.had_key = key in container
        self.old = container[key] if self.had_key else None

    def apply(self):
        self.container[self.key] = self.new

    def undo(self):
        if self.had_key:
            self.container[self.key] = self.old
        else:
            self.container.pop(self.key, None)


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
    their device and dtype and keep ``requires_grad``.

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
    apply_growths(model, [(flow, channel_map)], new_params, optimizer, optimizer_mode, lr)


def apply_growths(
    model: nn.Module,
    growths: Sequence[tuple[TorchFlow, ChannelMaps]],
    new_params: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_mode: str = "carry",
    lr: float | None = None,
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
    transaction = GrowthTransaction(model, optimizer, optimizer_mode, lr)
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
        self._applied: list[list[_Swap]] = []
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
            swaps = _routed_swaps(self.model, flow, values, channel_map, self.optimizer,
                                  self.optimizer_mode, self.lr, row_sources)
        else:
            swaps = _growth_swaps(self.model, flow, new_params, channel_map, self.optimizer,
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


def _growth_swaps(model, flow, new_params, channel_map, optimizer, optimizer_mode, lr=None,
                  positions=None):
    """Every change a growth makes, computed up front as reversible swaps (nothing applied)."""
    core_flow = flow.channel_flow(model)
    modules = dict(model.named_modules())
    named = tuple(dict.fromkeys(core_flow.names()))  # a member reading its group: once
    for name in named:
        if name not in new_params:
            raise ValueError(
                f"new_params has no entry {name!r} named by the flow of {flow.producer!r}"
            )
    # Validates every grown entry's size along its channel axis against the others.
    subset = {name: torch.as_tensor(new_params[name]).detach() for name in named}
    new_channels = core_flow.channels(subset)
    grown_axes: dict[str, set[int]] = {}
    for e in core_flow.entries(subset):
        grown_axes.setdefault(e.name, set()).add(e.axis)
    maps = () if channel_map is None else as_channel_maps(channel_map)
    if maps and len(maps[-1].sources) != new_channels:
        raise ValueError(
            f"channel_map has {len(maps[-1].sources)} channels but new_params has {new_channels}"
        )

    # ---- compute phase: build every new object; nothing in the model changes here.
    swaps: list[Any] = []
    replaced: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (old, new) parameter
    written = {}
    for name in named:
        module_name, _, attr = name.rpartition(".")
        module = modules[module_name]
        old = getattr(module, attr)
        value = subset[name]
        _check_rank(name, old, value)
        if positions is not None and name in positions:
            value = _at_positions(name, value, positions[name])
        value = _leading_part(name, value, old, grown_axes[name])
        written[name] = _tensor_swap(swaps, replaced, name, module, attr, value)
    swaps.extend(_size_swaps(flow, modules, written))
    if optimizer is not None:
        swaps.extend(_optimizer_swaps(optimizer, replaced, core_flow, maps, optimizer_mode, lr))
    return swaps


def _tensor_swap(swaps, replaced, name, module, attr, value):
    """Plan ``module.attr = value`` (a new Parameter for a parameter); returns the tensor."""
    old = getattr(module, attr)
    value = _own_contiguous(value.to(device=old.device, dtype=old.dtype), old)
    if attr in module._parameters:
        new = nn.Parameter(value, requires_grad=old.requires_grad)
        swaps.append(_Swap(module._parameters, attr, new))
        replaced[name] = (old, new)
    else:
        swaps.append(_Swap(module._buffers, attr, value))
    return value


def _routed_swaps(model, flow, values, channel_map, optimizer, optimizer_mode, lr, row_sources):
    """A routed stream's growth (:mod:`.permutations`) as reversible swaps (nothing applied).

    ``values``: the grown arrays (the core's appended layout), updated in place with this
    flow's physical layout, so routed flows sharing a module (one's consumer is another's
    producer) each move their own axis of it in turn. Entries it lacks come from the model.
    ``row_sources``: the rows grown so far per module, updated with this flow's producers.
    """
    layout = stream_layout(model, flow, channel_map)
    modules = dict(model.named_modules())
    physical = layout.grown(model, values, row_sources)
    row_sources.update(layout.row_sources())
    swaps: list[Any] = []
    replaced: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, value in physical.items():
        module_name, _, attr = name.rpartition(".")
        _check_rank(name, getattr(modules[module_name], attr), value)
        _tensor_swap(swaps, replaced, name, modules[module_name], attr, value)
    for module_name, attr, size in layout.sizes(model):
        if getattr(modules[module_name], attr) != size:
            swaps.append(_Swap(modules[module_name].__dict__, attr, size))
    if optimizer is not None and replaced:
        swaps.append(layout.optimizer_growth(model, optimizer, replaced, optimizer_mode, lr))
    return swaps


def _own_contiguous(value: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``value`` as a contiguous tensor owning all of its storage, copied only if it is not.

    Contiguous like a freshly built layer: the core's arrays may carry permuted strides, and
    a checkpoint-rebuilt model must run the very same kernels. A view (a leading part, a
    permutation) is copied so it does not keep a larger array alive; an array the core just
    made is used as it is, which keeps a growth from holding every grown layer twice.
    """
    owns_storage = (
        value.is_contiguous() and value.storage_offset() == 0
        and value.untyped_storage().nbytes() == value.numel() * value.element_size()
        and value.untyped_storage().data_ptr() != old.untyped_storage().data_ptr()
    )
    return value if owns_storage else value.clone(memory_format=torch.contiguous_format)


def _leading_part(name, value, old, axes):
    """``value`` cut to ``old``'s size on every axis but the flow's own ``axes``.

    A growth of several layers passes one dict holding every layer's final arrays; a consumer
    that is also the producer of another flow is then wider on the other flow's axis than the
    model yet is. Channel maps keep old channels first, so the leading part is what the model
    has now; that other flow's own application writes the full array.
    """
    for dim in range(value.ndim):
        if dim in axes or value.shape[dim] == old.shape[dim]:
            continue
        if value.shape[dim] < old.shape[dim]:
            raise ValueError(
                f"new_params[{name!r}] has shape {tuple(value.shape)}; the model's is "
                f"{tuple(old.shape)}: only axis {sorted(axes)[0]} may change for this flow"
            )
        value = value.narrow(dim, 0, old.shape[dim])
    return value


def _at_positions(name, value, positions):
    """``value`` restricted, along each axis in ``positions``, to those positions."""
    for axis, index in positions.items():
        if len(index) and int(index[-1]) >= value.shape[axis]:
            raise ValueError(f"new_params[{name!r}] has {value.shape[axis]} entries along axis "
                             f"{axis}, fewer than the growths of its flows add up to")
        if len(index) != value.shape[axis]:
            value = value.index_select(axis, torch.as_tensor(index, device=value.device))
    return value


def _check_rank(name, old, value):
    if value.ndim != old.ndim:
        raise ValueError(f"new_params[{name!r}] has {value.ndim} dims, the model's has {old.ndim}")
    if not (value.is_floating_point() or value.is_complex()) and old.is_floating_point():
        raise TypeError(f"new_params[{name!r}] has dtype {value.dtype}, expected floating point")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"new_params[{name!r}] holds NaN or inf")


def _size_swaps(flow, modules, values):
    """The size attributes of every module the flow touches, read off the arrays written.

    From the arrays, not the flow's channel count: a consumer of a concatenation reads more
    channels than the flow has, and a residual group has several producers.
    """
    swaps = []

    def set_attr(module, attr, value):
        if getattr(module, attr) != value:
            swaps.append(_Swap(module.__dict__, attr, value))

    def size(module_name, axis):
        return int(values[f"{module_name}.weight"].shape[axis])

    for name in flow.producers:
        producer = modules[name]
        out_attr = "out_features" if isinstance(producer, nn.Linear) else "out_channels"
        set_attr(producer, out_attr, size(name, 0))
    norms = [flow.norm, *(d.norm for d in flow.depthwise), *(m.norm for m in flow.members),
             *(n.module for n in flow.downstream_norms)]
    for name in norms:
        if name is not None:
            bn = modules[name]
            vector = next(values[f"{name}.{attr}"] for attr in
                          ("weight", "running_mean", "bias", "running_var")
                          if f"{name}.{attr}" in values)
            set_attr(bn, "num_features", int(vector.shape[0]))
    for d in flow.depthwise:
        conv = modules[d.conv]
        for attr in ("in_channels", "out_channels", "groups"):
            set_attr(conv, attr, size(d.conv, 0))
    for c in flow.consumers:
        consumer = modules[c.module]
        attr = "in_features" if isinstance(consumer, nn.Linear) else "in_channels"
        set_attr(consumer, attr, size(c.module, 1))
    return swaps


def _optimizer_swaps(optimizer, replaced, core_flow, maps, mode, lr):
    """The optimizer's part of a growth, planned by optim.py (applied and undone as a swap)."""
    if not replaced:
        return []
    if not maps:
        raise ValueError("channel_map is required to carry the optimizer state of grown parameters")
    return [plan_optimizer_growth(optimizer, replaced, core_flow, maps, mode=mode, lr=lr)]
