"""Residual groups in the jaxpr walk (:mod:`._walk`): producers whose channels meet in an add.

Two tagged values added channel by channel (``add``/``add_any``, the same shape, the channels on
the same axis) carry two producers' channels summed into one stream, so those producers must
grow by the same channels: the walk joins them into one group (union-find over the walks) and
goes on with the sum, tagged as the group's. A producer still on its affine chain when it
reaches the add (a block's last conv and its BatchNorm) has not met its activation yet: the
first activation after the add is its own, with the sum as its pre-activation (SSD reads it
there), so a merged tag keeps the list of such *pending* members. At the end every group is
one flow, its first producer (forward order) the flow's producer and the others
:class:`~simcore.growth.Member`\\ s; a group is refused as a whole, naming the member and the
reason, when any member is refused. See docs/design.md, 'Residual streams and concatenations'.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._walk import Analysis, Walk, _Tag

__all__ = ["Groups", "ResidualGroup", "merge_add", "pending_of", "residual_groups"]

#: The primitives that sum two producers' channels into one stream.
ADDS = ("add", "add_any")


class Groups:
    """Union-find over walk ids; the representative of a group is its earliest walk."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, pid: int) -> int:
        parent = self.parent
        while parent.get(pid, pid) != pid:
            parent[pid] = parent.get(parent[pid], parent[pid])
            pid = parent[pid]
        return pid

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        root, other = min(a, b), max(a, b)
        if root != other:
            self.parent[other] = root
        return root


def pending_of(tag: _Tag) -> tuple[int, ...]:
    """Walk ids whose activation is still ahead of this value (empty once it is passed)."""
    if not tag.pre:
        return ()
    return tag.pending if tag.merged else (tag.pid,)


def merge_add(analysis: Analysis, step: Any, tags: list[_Tag]) -> _Tag | None:
    """The tag of ``a + b`` where both carry channels; None (with both blocked) if they cannot
    form one stream."""
    from ._walk import _Tag

    first, second = tags
    shapes = [tuple(analysis.program.shape(ref)) for ref in step.ins]
    out_shape = tuple(analysis.program.shapes[step.outs[0]])
    same_group = analysis.groups.find(first.pid) == analysis.groups.find(second.pid)
    reason = None
    if shapes[0] != shapes[1] or shapes[0] != out_shape or first.axis != second.axis \
            or first.spatial != 1 or second.spatial != 1:
        reason = ("its channels meet themselves along another axis in a residual add"
                  if same_group else "its channels meet another layer's in a residual add "
                                     "that does not line them up channel by channel")
    elif first.segment != -1 or second.segment != -1:
        reason = "its channels reach a residual add after a depthwise convolution"
    if reason is not None:
        for tag in tags:
            analysis.block(tag.pid, reason)
        return None
    root = analysis.groups.union(first.pid, second.pid)
    pending = tuple(sorted(set(pending_of(first)) | set(pending_of(second))))
    return _Tag(root, first.axis, pre=bool(pending), pending=pending, merged=True)


@dataclass
class ResidualGroup:
    """The walks of one group in forward order, why it cannot grow (or None), and the union of
    its members' consumers ``{leaf: (in_axis, spatial, channels_last)}``."""

    walks: list[Walk]
    blocked: str | None
    consumers: dict[int, tuple[int, int, bool]]


def residual_groups(analysis: Analysis) -> Iterator[ResidualGroup]:
    """Every group (a lone producer is a group of one), in the order of its first producer."""
    by_root: dict[int, list[Walk]] = {}
    for walk in sorted(analysis.walks.values(), key=lambda w: w.step):
        by_root.setdefault(analysis.groups.find(walk.pid), []).append(walk)
    for walks in by_root.values():
        reason = None
        for walk in walks:
            if walk.blocked is not None:
                reason = walk.blocked if len(walks) == 1 else \
                    f"{analysis.name(walk.pid)!r}: {walk.blocked}"
                break
        consumers: dict[int, tuple[int, int, bool]] = {}
        for walk in walks:
            for leaf, where in walk.consumers.items():
                if consumers.setdefault(leaf, where) != where and reason is None:
                    reason = (f"{analysis.names[leaf]!r} reads its residual stream at two "
                              "different positions")
        if reason is None and not consumers:
            reason = "its output is not read by any layer"
        yield ResidualGroup(walks, reason, consumers)
