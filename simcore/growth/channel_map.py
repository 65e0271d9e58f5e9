"""How a grown layer's channels relate to the old ones: :class:`ChannelMap`.

Every widening operator (:mod:`simcore.growth.widen`) returns one next to the grown arrays, and
everything that follows a growth reads it instead of the operator's arguments: the optimizer
state (:mod:`simcore.growth.optim_state`), the chain of several growths of one concatenation
(:mod:`simcore.growth.chain`), the growers and the adapters' surgery. It is a plain record of
source indices with no array code, so it lives apart from the operators that make it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._arrays import check_choice
from ._host import as_index

__all__ = ["ChannelMap"]

KINDS = ("add", "replicate", "split")

@dataclass(frozen=True)
class ChannelMap:
    """How the grown layer's channels relate to the old ones.

    ``sources[j]`` is the old channel that new channel ``j`` copies (itself for the leading
    ``old_channels`` entries, which are ``0, 1, ..., n-1`` in order) or ``-1`` for a fresh
    neuron; ``kind`` is ``"add"``, ``"replicate"`` or ``"split"``.

    >>> cmap = ChannelMap((0, 1, 2, 1), "split")
    >>> cmap.old_channels, cmap.new_channels, cmap.copies, cmap.fresh
    (3, 4, ((3, 1),), ())
    >>> cmap.multiplicity().tolist()
    [1, 2, 1]
    """

    sources: tuple[int, ...]
    kind: str

    def __post_init__(self) -> None:
        check_choice(self.kind, KINDS, "ChannelMap.kind")
        sources = tuple(as_index(s, f"ChannelMap.sources[{i}]") for i, s in enumerate(self.sources))
        object.__setattr__(self, "sources", sources)
        n = self.old_channels
        for j, s in enumerate(sources[n:], start=n):
            if not -1 <= s < n:
                raise ValueError(
                    f"ChannelMap.sources[{j}]={s} must be -1 or an old channel in [0, {n})"
                )
            if (s == -1) != (self.kind == "add"):
                what = "fresh (-1)" if self.kind == "add" else "copies of old channels"
                raise ValueError(
                    f"new channels of a {self.kind!r} map must be {what}; sources[{j}]={s}"
                )
        parents = [s for s in sources[n:]]
        if self.kind == "split" and len(set(parents)) != len(parents):
            raise ValueError("a 'split' map must split each parent at most once")

    @property
    def old_channels(self) -> int:
        """Number of channels before growth (the leading run ``0, 1, ..., n-1`` of ``sources``)."""
        n = 0
        while n < len(self.sources) and self.sources[n] == n:
            n += 1
        return n

    @property
    def new_channels(self) -> int:
        """Number of channels after growth."""
        return len(self.sources)

    @property
    def fresh(self) -> tuple[int, ...]:
        """New indices of the fresh (randomly initialised) channels."""
        return tuple(j for j, s in enumerate(self.sources) if s == -1)

    @property
    def copies(self) -> tuple[tuple[int, int], ...]:
        """``(new index, parent)`` for every appended copy of an old channel."""
        n = self.old_channels
        return tuple((j, s) for j, s in enumerate(self.sources) if j >= n and s >= 0)

    def multiplicity(self) -> np.ndarray:
        """Per old channel, how many channels of the grown layer carry it (1 + its copies)."""
        counts = np.ones(self.old_channels, dtype=np.int64)
        for _, parent in self.copies:
            counts[parent] += 1
        return counts
