"""Shape reads and shape-only reshapes in a traced model: which ones keep the channel axis.

Squeeze-excitation blocks are rarely written as plainly as ``x * sigmoid(fc2(...))`` on
``(N, C, 1, 1)`` convs. The SENet form reads ``b, c, _, _ = x.size()``, runs its gate through
``nn.Linear`` layers on ``(N, C)`` and brings it back with ``y.view(b, c, 1, 1).expand_as(x)``;
timm-like code writes ``gate[:, :, None, None]`` or ``gate.unsqueeze(-1).unsqueeze(-1)``. The
channel walk (:mod:`.channel_walk`) follows these, with two halves checked on both sides:

* a *reshape* of walked channels (:func:`reshape_step`): ``view``/``reshape`` that only adds or
  removes singleton axes after the channel axis (``(N, C)`` <-> ``(N, C, 1, 1)``, or
  ``(N, C, 1)``), ``unsqueeze`` after the channels, indexing with full slices on ``N`` and ``C``
  and ``None`` after them, and ``expand``/``expand_as`` of such a gate over space. The size
  given for the channel axis must be ``-1`` or a channel count read from a tensor (never a
  literal: a grown layer would be read with the old count, or the batch silently refolded);
* a *shape read* of walked channels (:func:`read_uses`): ``x.size()``, ``x.size(1)``,
  ``x.shape``, the ``x`` of ``g.expand_as(x)``. Reading the batch or spatial sizes is harmless
  (growth changes neither); the channel count may only feed the channel axis of reshapes.

The model's forward runs eagerly after growth, so such a read returns the new count. That is
right only if the read tensor and the reshaped one grow together: :func:`shape_reason` checks,
per residual group, that every reshape fed a channel count is walked by a member and that every
tensor whose count a walked reshape reads carries the group's channels (docs/design.md,
'Squeeze-excitation gates').
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from .tracing import node_shape, target_name

__all__ = ["ReshapeStep", "is_reshape", "is_shape_read", "read_uses", "reshape_step",
           "shape_reason"]

_SIZED_METHODS = {"view", "reshape", "expand"}  # reshapes given their sizes as arguments
_RESHAPE_METHODS = {*_SIZED_METHODS, "expand_as", "unsqueeze"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.unsqueeze, operator.getitem}


@dataclass(frozen=True)
class ReshapeStep:
    """What a walk does at a reshape: follow with ``ndim`` axes, flatten, or refuse.

    ``sources``: the tensors whose channel count the reshape reads (they must carry the same
    channels, :func:`shape_reason`); ``unknown``: the shapes are unknown (an example input is
    needed to check the reshape).
    """

    ndim: int | None = None
    flatten: bool = False
    refusal: str | None = None
    unknown: bool = False
    sources: tuple[torch.fx.Node, ...] = ()


def is_reshape(node: torch.fx.Node) -> bool:
    """Whether ``node`` is an operation :func:`reshape_step` judges (it may or may not pass)."""
    return ((node.op == "call_method" and node.target in _RESHAPE_METHODS)
            or (node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS))


def is_shape_read(tensor: torch.fx.Node, user: torch.fx.Node) -> bool:
    """Whether ``user`` reads the shape of ``tensor`` (``size``, ``.shape``, ``expand_as(x)``)."""
    if user.op == "call_method" and user.target == "expand_as":
        return user.args[1:2] == (tensor,) and user.args[0] is not tensor
    read = _read_of(user)
    return read is not None and read[0] is tensor


def _read_of(node: Any) -> tuple[torch.fx.Node, int | slice | None] | None:
    """``(tensor, dim)`` when ``node`` reads a size of ``tensor`` (dim None: the whole shape)."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    tensor = node.args[0]
    if node.op == "call_method" and node.target == "size" and isinstance(tensor, torch.fx.Node):
        dims = (*node.args[1:], *node.kwargs.values())
        if not dims:
            return tensor, None
        return (tensor, dims[0]) if len(dims) == 1 and isinstance(dims[0], int) else None
    if (node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)
            and isinstance(tensor, torch.fx.Node)):
        return tensor, None
    if node.op == "call_function" and node.target is operator.getitem:
        whole = _read_of(node.args[0])
        index = node.args[1]
        if whole is not None and whole[1] is None and isinstance(index, (int, slice)):
            return whole[0], index
    return None


def _rank(tensor: torch.fx.Node) -> int | None:
    shape = node_shape(tensor)
    return None if shape is None else len(shape)


def _reads_channels(dim: int | slice | None, rank: int | None) -> bool:
    """Whether reading ``dim`` of a channels-first tensor of ``rank`` axes reads the count."""
    if dim is None:
        return True
    if isinstance(dim, slice):
        return rank is None or 1 in range(rank)[dim]
    return dim == 1 or (dim < 0 and (rank is None or dim == 1 - rank))


def _size_use(value: torch.fx.Node, user: torch.fx.Node) -> str | None:
    """Why ``user`` may not take the channel count (or a shape holding it) ``value``, or None."""
    sized = (user.op == "call_method" and user.target in _SIZED_METHODS) or (
        user.op == "call_function" and user.target is torch.reshape)
    if sized and user.args[0] is not value:
        return None
    return (f"a size() query whose channel count feeds {target_name(user)} (a channel count is "
            "followed only into the sizes of a reshape of the same channels)")


def _count_uses(value: torch.fx.Node) -> tuple[set[torch.fx.Node], str | None]:
    """The reshapes taking the channel count ``value`` as a size, or why another use refuses."""
    for user in value.users:
        reason = _size_use(value, user)
        if reason is not None:
            return set(), reason
    return set(value.users), None


def read_uses(tensor: torch.fx.Node, read: torch.fx.Node, offset: int | None,
              spatial: int | None) -> tuple[set[torch.fx.Node], str | None]:
    """The reshapes that ``read`` (a shape read of ``tensor``) feeds its channel count to.

    ``offset``/``spatial``: where the walk's channels sit in ``tensor`` (:mod:`.channel_walk`).
    Returns ``(reshapes, None)``, or ``(set(), reason)`` when the count reaches anything else
    (arithmetic, a new tensor's size, a slice of the shape that keeps the channel axis) or is
    not the walk's own (after a concatenation or a flatten).
    """
    if read.op == "call_method" and read.target == "expand_as":
        dim: int | slice | None = None  # g.expand_as(x): x's sizes, the count included
    else:
        found = _read_of(read)
        assert found is not None, "read_uses needs a shape read (is_shape_read)"
        dim = found[1]
    rank = _rank(tensor)
    if not _reads_channels(dim, rank):
        return set(), None
    if offset is not None or spatial not in (None, 1):
        return set(), ("a size() query that reads the channel count after a concatenation or "
                       "a flatten")
    if read.target == "expand_as":
        return {read}, None
    if dim is not None:  # x.size(1): the count itself
        return _count_uses(read)
    uses: set[torch.fx.Node] = set()
    for user in read.users:  # x.size() or x.shape: its items, or the whole shape as sizes
        item = _read_of(user)
        if item is None or item[0] is not tensor:
            reason = _size_use(read, user)
            more = {user}
        elif not _reads_channels(item[1], rank):
            continue
        elif isinstance(item[1], slice):
            return set(), "a slice of size() that holds the channel count"
        else:
            more, reason = _count_uses(user)
        if reason is not None:
            return set(), reason
        uses |= more
    return uses, None


def _whole_shape(value: Any) -> torch.fx.Node | None:
    """The tensor whose whole shape ``value`` is (``x.size()``, ``x.shape``), or None."""
    read = _read_of(value)
    return read[0] if read is not None and read[1] is None else None


def _sizes(user: torch.fx.Node) -> list[Any] | torch.fx.Node | None:
    """The sizes given to view/reshape/expand: entries, one node (a whole shape), or None."""
    given: Any
    if user.op == "call_function":  # torch.reshape(x, shape)
        given = user.args[1] if len(user.args) > 1 else user.kwargs.get("shape")
    else:
        rest = tuple(user.args[1:]) or tuple(user.kwargs[k] for k in ("size", "shape")
                                             if k in user.kwargs)
        single = len(rest) == 1 and (isinstance(rest[0], (tuple, list))
                                     or _whole_shape(rest[0]) is not None)
        given = rest[0] if single else rest
    if isinstance(given, torch.fx.Node):
        return given if _whole_shape(given) is not None else [given]
    return list(given) if isinstance(given, (tuple, list)) else None


def _channel_size(user: torch.fx.Node) -> tuple[tuple[torch.fx.Node, ...], str | None]:
    """The tensors whose channel count a view/reshape/expand reads, or why it is refused."""
    sizes = _sizes(user)
    if isinstance(sizes, torch.fx.Node):  # y.view(x.size()): every size of x
        whole = _whole_shape(sizes)
        return ((whole,) if whole is not None else ()), None
    if sizes is None or len(sizes) < 2:
        return (), f"a {user.target} whose sizes are not listed"
    for axis, size in enumerate(sizes):
        read = _read_of(size)
        counts = read is not None and _reads_channels(read[1], _rank(read[0]))
        if read is not None and counts and axis != 1:
            return (), f"a {user.target} that puts a channel count on axis {axis}"
        if read is not None and counts:
            return (read[0],), None
        if axis == 1 and size != -1:
            return (), (f"a {user.target} to the literal channel count {size!r}, which a grown "
                        "layer does not match (read it from x.size(1), or give -1)")
    return (), None


def _index_text(index: Any) -> str:
    """``index`` as written in Python: ``[:, :8, None]``."""
    def item(i: Any) -> str:
        if isinstance(i, slice):
            text = f"{'' if i.start is None else i.start}:{'' if i.stop is None else i.stop}"
            return text if i.step is None else f"{text}:{i.step}"
        return "..." if i is Ellipsis else repr(i)
    return f"[{', '.join(map(item, index if isinstance(index, tuple) else (index,)))}]"


def _index_keeps_channels(index: Any, rank: int) -> bool:
    """``[:, :, None, None]`` or ``[..., None]`` on ``(N, C)``: only new axes after C."""
    index = index if isinstance(index, tuple) else (index,)
    full = slice(None)
    if index and index[0] is Ellipsis and rank == 2:
        return all(i is None for i in index[1:])
    return index[:2] == (full, full) and all(i is None for i in index[2:])


def _singleton_tail(before: tuple, after: tuple) -> bool:
    """Same batch and channels, and every other axis before and after has size one."""
    return (len(before) >= 2 and len(after) >= 2 and before[:2] == after[:2]
            and all(d == 1 for d in (*before[2:], *after[2:])))


def reshape_step(node: torch.fx.Node, user: torch.fx.Node, before: tuple | None,
                 after: tuple | None, offset: int | None, spatial: int | None) -> ReshapeStep:
    """How a walk at ``node`` (shape ``before``) passes the reshape ``user`` (shape ``after``).

    ``offset``/``spatial`` as for :func:`read_uses`: only a flatten (its rule as before) passes
    after a concatenation or a flatten of more than one column per channel.
    """
    what = target_name(user).strip("'") if user.target is not operator.getitem else "indexing"
    if before is None or after is None:
        return ReshapeStep(unknown=True, refusal=f"a {what} whose shapes are unknown")
    flatten = (user.target in _SIZED_METHODS - {"expand"} or user.target is torch.reshape) and (
        len(after) == 2 and after[0] == before[0] and after[1] == math.prod(before[1:]))
    if flatten:  # the flatten's own rule (any sizes that give (N, C*H*W)), as before
        sources, refusal = _channel_size(user)
        return ReshapeStep(flatten=True, sources=sources if refusal is None else ())
    if offset is not None or spatial not in (None, 1):
        return ReshapeStep(refusal=f"a {what} after a concatenation or a flatten")
    if user.target is operator.getitem:
        if not _index_keeps_channels(user.args[1], len(before)) or not _singleton_tail(
                before, after):
            return ReshapeStep(refusal=(f"indexing {_index_text(user.args[1])} that selects or "
                                        "moves channels"))
        return ReshapeStep(ndim=len(after))
    if user.target in ("unsqueeze", torch.unsqueeze):
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        dim = dim + len(before) + 1 if isinstance(dim, int) and dim < 0 else dim
        if not isinstance(dim, int) or dim < 2 or not _singleton_tail(before, after):
            return ReshapeStep(refusal=(f"an unsqueeze at dim {dim} of {before}, not a singleton "
                                        "axis after the channels"))
        return ReshapeStep(ndim=len(after))
    if user.target in ("expand", "expand_as"):
        if not (len(before) == len(after) and before[:2] == after[:2]
                and all(d == 1 for d in before[2:])):
            return ReshapeStep(refusal=f"an {what} of {before} to {after} across the channels")
        if user.target == "expand_as":
            like = user.args[1]
            sources = (like,) if isinstance(like, torch.fx.Node) else ()
            return ReshapeStep(ndim=len(after), sources=sources)
        sources, refusal = _channel_size(user)
        return ReshapeStep(ndim=len(after), refusal=refusal, sources=sources)
    if not _singleton_tail(before, after):
        return ReshapeStep(refusal=(f"a {what} to {after}, neither a flatten from dim 1 nor "
                                    "singleton axes added or removed after the channels"))
    sources, refusal = _channel_size(user)
    return ReshapeStep(ndim=len(after), refusal=refusal, sources=sources)


def shape_reason(walks: Sequence[Any], nodes: Mapping[str, torch.fx.Node]) -> str | None:
    """Why a group's shape reads could go wrong after growth, or None (module docstring).

    ``walks`` are the group's: ``.seen`` the ``(node, offset, segment, spatial)`` keys walked,
    ``.shape_uses`` the reshapes fed a channel count read on the walk (node name -> where),
    ``.shape_sources`` the tensors whose count a walked reshape reads (node name -> where).
    """
    walked = {key[0] for walk in walks for key in walk.seen}
    plain = {key[0] for walk in walks for key in walk.seen
             if key[1] is None and key[3] in (None, 1)}
    for walk in walks:
        for use, where in walk.shape_uses.items():
            if use not in walked:
                return (f"its channel count, read in {where}, sizes a {target_name(nodes[use])} of "
                        "channels that no layer of its residual group produces")
        for source, where in walk.shape_sources.items():
            if source not in plain:
                return (f"its output feeds a {where} that reads its channel count from a tensor "
                        "whose channels its residual group does not produce")
    return None
