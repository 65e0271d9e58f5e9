"""The changes one grown flow makes to a PyTorch model, planned up front as reversible swaps.

The surgery (:mod:`.surgery`) is two phases: compute every new object first, then swap them in
and undo every swap if anything raises. This module is the first phase: :func:`growth_swaps`
(a plain flow) and :func:`routed_swaps` (a routed stream, :mod:`.permutations`) turn the
core's grown arrays into :class:`Swap` objects -- new parameters and buffers on the model's
devices and dtypes, the size attributes (``in/out_channels``, ``in/out_features``, ``groups``,
``num_features``) read off the arrays, and the optimizer's part (:mod:`.optim`) -- checking
ranks, dtypes and finiteness on the way. Nothing in the model changes here; committing the
swaps atomically, and the transaction over several flows, is :mod:`.surgery`'s job, which is
the only module that calls this one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .optim import as_channel_maps, plan_optimizer_growth
from .permutations import stream_layout

__all__ = ["Swap", "growth_swaps", "routed_swaps"]


class Swap:
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


def growth_swaps(model, flow, new_params, channel_map, optimizer, optimizer_mode, lr=None,
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
        swaps.append(Swap(module._parameters, attr, new))
        replaced[name] = (old, new)
    else:
        swaps.append(Swap(module._buffers, attr, value))
    return value


def routed_swaps(model, flow, values, channel_map, optimizer, optimizer_mode, lr, row_sources,
                 seed=0):
    """A routed stream's growth (:mod:`.permutations`) as reversible swaps (nothing applied).

    ``values``: the grown arrays (the core's appended layout), updated in place with this
    flow's physical layout, so routed flows sharing a module (one's consumer is another's
    producer) each move their own axis of it in turn. Entries it lacks come from the model.
    ``row_sources``: the rows grown so far per module, updated with this flow's producers.
    ``seed`` draws the depthwise filters of fresh channels.
    """
    layout = stream_layout(model, flow, channel_map, seed)
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
            swaps.append(Swap(modules[module_name].__dict__, attr, size))
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
            swaps.append(Swap(module.__dict__, attr, value))

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
