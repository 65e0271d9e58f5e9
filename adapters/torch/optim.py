"""Optimizer state across a growth: carry momentum and Adam moments into the grown parameters.

Growth replaces a layer's parameters by new, larger ``nn.Parameter`` objects. A
``torch.optim`` optimizer keys its state by parameter object and lists the
parameters in ``param_groups``, so both must follow. :func:`grow_optimizer`
does that in place on the same optimizer object, so LR schedulers (which hold
the optimizer, never the parameters) keep going with their ``last_epoch``:

* ``mode="carry"`` (default; see docs/design.md, 'Growth'): every per-parameter state
  tensor (SGD ``momentum_buffer``; Adam/AdamW ``exp_avg``, ``exp_avg_sq`` and,
  with ``amsgrad``, ``max_exp_avg_sq``; any other state shaped like its
  parameter) is grown by :func:`simcore.growth.map_optimizer_state`, the core's
  single implementation: old channels keep their state, copies take their
  parent's, fresh channels get zeros. Scalars such as Adam's ``step`` are kept.
  The state is re-keyed to the new parameter objects, which take the old ones'
  positions in ``param_groups``.
* ``mode="fresh"``: the optimizer is rebuilt as Firefly, SSD and GroMo do after
  each growth: the parameters are replaced the same way and ALL state is
  dropped -- every parameter's, grown or not (every parameter starts afresh,
  exactly like a new optimizer), in ``apply_growth`` and ``Grower.grow`` alike.
  It is named apart from the core's ``map_optimizer_state(mode="zero")``, which
  only zeros the state of the flow's own entries and keeps everything else.
  ``"reset"`` is the deprecated spelling of ``"fresh"`` (one release).
* ``lr=`` (either mode) sets every group's learning rate, e.g. ``lr=0.1`` as
  those implementations do after a growth.

Atomic: :func:`plan_optimizer_growth` computes everything (the core's maths,
shape checks) without touching the optimizer and returns an
:class:`OptimizerGrowth` whose ``apply()`` records the optimizer's param lists, learning
rates and state before it only assigns entries, and whose ``undo()`` puts that record back
(idempotent, a no-op before ``apply()``), so a failure or an interrupt at any point leaves
the optimizer exactly as before (``tests/test_torch_atomic_growth.py``);
a caller growing several things at once can plan them all, then apply, and undo in reverse.

>>> import numpy as np, torch
>>> from torch import nn
>>> from simcore.growth import ChannelFlow, Consumer, replicate_neurons
>>> from simcore.adapters.torch import grow_optimizer
>>> net = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Linear(3, 1, bias=False))
>>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
>>> net(torch.ones(4, 2)).sum().backward(); opt.step()
>>> flow = ChannelFlow("0.weight", consumers=(Consumer("1.weight"),))
>>> grown, cmap = replicate_neurons(dict(net.state_dict()), flow, [0])
>>> old = {name: (p, nn.Parameter(grown[name])) for name, p in net.named_parameters()}
>>> change = grow_optimizer(opt, old, flow, cmap)
>>> [tuple(p.shape) for p in opt.param_groups[0]["params"]]
[(4, 2), (1, 4)]
>>> opt.state[old["0.weight"][1]]["momentum_buffer"].shape
torch.Size([4, 2])
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from simcore.extend import check_choice, renamed_choice
from simcore.growth import ChannelFlow, ChannelMap, GrowthError, map_optimizer_state
from simcore.growth.growers import check_real_range

__all__ = [
    "MODES",
    "OptimizerGrowth",
    "as_channel_maps",
    "check_growable_optimizer",
    "grow_optimizer",
    "plan_optimizer_growth",
]

#: What happens to the optimizer's state in a growth: ``"carry"`` it into the grown
#: parameters, or start ``"fresh"`` (all state dropped). See the module docstring.
MODES = ("carry", "fresh")
#: Deprecated spellings of :data:`MODES` (one release): ``"reset"`` is now ``"fresh"``.
RENAMED_MODES = {"reset": "fresh"}


def check_optimizer_mode(mode: str, name: str = "optimizer_mode") -> str:
    """``mode`` as one of :data:`MODES` (a deprecated spelling warns and is renamed)."""
    return check_choice(renamed_choice(mode, RENAMED_MODES, name, stacklevel=5), MODES, name)


@dataclass(frozen=True)
class _OptimizerBefore:
    """What an optimizer holds before a change: enough to put it back exactly.

    The state mapping object and its items (in order), each param group's parameter list
    and learning rate. Restoring reassigns all of it, so it is idempotent and cannot fail.
    """

    state: Any
    state_items: tuple[tuple[Any, Any], ...]
    params: tuple[tuple[torch.Tensor, ...], ...]
    lrs: tuple[Any, ...]

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> _OptimizerBefore:
        return cls(
            state=optimizer.state,
            state_items=tuple(optimizer.state.items()),
            params=tuple(tuple(group["params"]) for group in optimizer.param_groups),
            lrs=tuple(group["lr"] for group in optimizer.param_groups),
        )

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        for group, params, lr in zip(optimizer.param_groups, self.params, self.lrs, strict=True):
            group["params"][:] = params  # the same list object (LBFGS keeps a reference)
            group["lr"] = lr
        optimizer.state = self.state
        optimizer.state.clear()
        optimizer.state.update(self.state_items)


@dataclass
class OptimizerGrowth:
    """A planned change to an optimizer: ``apply()`` makes it, ``undo()`` reverts it.

    ``apply()`` records what the optimizer holds (one assignment) before it changes anything;
    ``undo()`` puts that record back. ``undo()`` is safe at any time: before ``apply()`` (or
    after an ``apply()`` interrupted before its record) it does nothing, after a partial
    ``apply()`` it restores everything, and calling it again changes nothing. Several planned
    changes to one optimizer are undone in the reverse order of their ``apply()``.
    """

    optimizer: torch.optim.Optimizer = field(repr=False)
    positions: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(repr=False)
    old_state: dict[torch.Tensor, dict[str, Any]] = field(repr=False)
    new_state: dict[torch.Tensor, dict[str, Any]] = field(repr=False)
    reset: bool
    lr: float | None
    _before: _OptimizerBefore | None = field(default=None, repr=False)

    def apply(self) -> None:
        opt = self.optimizer
        self._before = _OptimizerBefore.of(opt)  # complete before the first change
        for g, i, _, new in self.positions:
            opt.param_groups[g]["params"][i] = new
        if self.reset:
            # A rebuilt optimizer: every parameter starts without state (a new object, in
            # torch's own form: undo() puts the saved one back).
            opt.state = defaultdict(dict)
        else:
            for old in self.old_state:
                opt.state.pop(old, None)
            opt.state.update(self.new_state)
        if self.lr is not None:
            for group in opt.param_groups:
                group["lr"] = self.lr

    def undo(self) -> None:
        if self._before is not None:
            self._before.restore(self.optimizer)


def check_growable_optimizer(optimizer: Any) -> None:
    """Refuse an optimizer a growth cannot follow, before any work (``GrowthError``).

    ``torch.optim.LBFGS`` keeps its history as flat vectors over all parameters and caches
    their total size, so after any growth (carry or fresh) its next ``step()`` fails.
    """
    if isinstance(optimizer, torch.optim.LBFGS):
        raise GrowthError(
            "cannot grow with a torch.optim.LBFGS optimizer: its history ('d', 'old_dirs', ...) "
            "is one flat vector over all parameters and cannot follow a growth; grow without "
            "the optimizer (optimizer=None), then rebuild LBFGS over model.parameters()"
        )


def as_channel_maps(channel_map: Any) -> tuple[ChannelMap, ...]:
    """One ChannelMap, or several applied in order (Firefly: split, then add)."""
    if isinstance(channel_map, ChannelMap):
        return (channel_map,)
    if isinstance(channel_map, Sequence) and not isinstance(channel_map, str):
        maps = tuple(channel_map)
        if maps and all(isinstance(m, ChannelMap) for m in maps):
            return maps
    raise TypeError(
        f"channel_map must be a ChannelMap or a non-empty sequence of them, "
        f"got {type(channel_map).__name__}"
    )


def _check_replaced(replaced: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(replaced, Mapping):
        raise TypeError(
            "replaced must map parameter names to (old, new) tensors, "
            f"got {type(replaced).__name__}"
        )
    out = {}
    for name, pair in replaced.items():
        if not (isinstance(pair, Sequence) and len(pair) == 2):
            raise TypeError(f"replaced[{name!r}] must be an (old, new) pair of tensors")
        old, new = pair
        for label, t in (("old", old), ("new", new)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(
                    f"replaced[{name!r}] {label} must be a torch.Tensor, got {type(t).__name__}"
                )
        if old is new:
            raise ValueError(f"replaced[{name!r}] gives the same tensor as old and new")
        if old.ndim != new.ndim:
            raise ValueError(
                f"replaced[{name!r}]: new has {new.ndim} dims, old has {old.ndim}"
            )
        out[name] = (old, new)
    return out


def _like_parameter(value: torch.Tensor, new: torch.Tensor, label: str) -> torch.Tensor:
    """``value`` as a dense tensor laid out like the parameter ``new`` (what fused steps expect)."""
    if tuple(value.shape) != tuple(new.shape):
        raise ValueError(
            f"{label} has shape {tuple(value.shape)} after growth but the new parameter has "
            f"{tuple(new.shape)}: the channel map does not match the grown parameter"
        )
    if value.stride() == new.stride() and value.device == new.device and (
            value.storage_offset() == 0
            and value.untyped_storage().nbytes() == value.numel() * value.element_size()):
        return value  # already laid out like the parameter and owning its storage: no copy
    out = torch.empty_like(new, dtype=value.dtype)
    out.copy_(value)
    return out


def _check_carryable(optimizer, name, parameter, state):
    """Refuse state a growth cannot carry: per-channel state must be shaped like its parameter.

    Adafactor's factored second moments (``row_var``/``col_var``) are not, nor is any state
    summarising the parameter along other axes; scalars (``step``) are kept as they are.
    """
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape != parameter.shape:
            raise ValueError(
                f"{type(optimizer).__name__} state {key!r} of {name!r} has shape "
                f"{tuple(value.shape)}, not the parameter's {tuple(parameter.shape)}: a growth "
                "carries only per-element state shaped like its parameter (SGD momentum, Adam "
                "moments). Grow with optimizer_mode='fresh' (drops every parameter's state, as "
                "a rebuilt optimizer would) or rebuild the optimizer after growing"
            )


def plan_optimizer_growth(
    optimizer: torch.optim.Optimizer,
    replaced: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    flow: ChannelFlow,
    channel_map: ChannelMap | Sequence[ChannelMap],
    *,
    mode: str = "carry",
    lr: float | None = None,
) -> OptimizerGrowth:
    """Compute :func:`grow_optimizer`'s change without making it; see the module docstring.

    ``replaced`` maps the flow's parameter names (``state_dict`` names, as the
    core's ``flow`` uses them) to ``(old parameter, new parameter)``. Old
    parameters the optimizer does not hold (frozen layers) are skipped.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    mode = check_optimizer_mode(mode, "mode")
    check_growable_optimizer(optimizer)
    if not isinstance(flow, ChannelFlow):
        raise TypeError(f"flow must be a simcore.growth.ChannelFlow, got {type(flow).__name__}")
    maps = as_channel_maps(channel_map)
    if lr is not None:
        lr = check_real_range(lr, "lr", low=0.0, low_open=True)
    pairs = _check_replaced(replaced)
    flow_names = set(flow.names())
    for name in pairs:
        if name not in flow_names:
            raise ValueError(f"replaced names {name!r}, which the flow of {flow.producer!r} lacks")

    held = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            held[p] = (g, i)
    positions, old_state, carried = [], {}, {}
    for name, (old, new) in pairs.items():
        if new in held:
            raise ValueError(f"the new parameter for {name!r} is already in the optimizer")
        if old not in held:
            continue
        positions.append((*held[old], old, new))
        if old in optimizer.state:
            old_state[old] = optimizer.state[old]
            carried[name] = old_state[old]
            if mode == "carry":
                _check_carryable(optimizer, name, old, old_state[old])

    new_state = {}
    if mode == "carry" and carried:
        # Only tensors with a grown axis go to the core; scalars (a 0-d ``step``
        # tensor, flags) stay exactly as they are, never copied or converted.
        arrays = {name: {k: v for k, v in state.items()
                         if isinstance(v, torch.Tensor) and v.ndim >= 1}
                  for name, state in carried.items()}
        for cmap in maps:
            arrays = map_optimizer_state(arrays, flow, cmap, mode="carry")
        for name, state in carried.items():
            new = pairs[name][1]
            grown = {k: _like_parameter(v, new, f"optimizer state {k!r} of {name!r}")
                     for k, v in arrays[name].items()}
            new_state[new] = {k: grown.get(k, v) for k, v in state.items()}
    return OptimizerGrowth(optimizer, positions, old_state, new_state, mode == "fresh", lr)


def grow_optimizer(
    optimizer: torch.optim.Optimizer,
    replaced: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    flow: ChannelFlow,
    channel_map: ChannelMap | Sequence[ChannelMap],
    *,
    mode: str = "carry",
    lr: float | None = None,
) -> OptimizerGrowth:
    """Point ``optimizer`` at grown parameters and carry (or reset) its state, atomically.

    Plans with :func:`plan_optimizer_growth` (on error nothing has changed),
    then applies; returns the applied :class:`OptimizerGrowth` (``undo()``
    reverts it, e.g. when a later step of a larger growth fails).
    """
    change = plan_optimizer_growth(optimizer, replaced, flow, channel_map, mode=mode, lr=lr)
    change.apply()
    return change
