"""Residual groups: which producers of a traced model must grow together, and why not.

:mod:`.discovery` walks each producer's channels forward and notes every residual ``add`` they
reach (and through which of its arguments). Producers that reach a common add are summed
channel by channel, so they form one group (union-find over the adds): the stem and the second
conv of every identity block of a stage are one group, and a projection shortcut conv starts a
new one with its block's second conv. A group can grow only if every tensor argument of each
of its adds carries a member's channels; an argument that no growable producer of the group
feeds (the network input, a shared or grouped conv) keeps the whole group fixed, with that
reason. A squeeze-excitation product ``x * gate(x)`` joins producers the same way
(:mod:`.products`). A channel count read with ``x.size()`` must size only reshapes of the
group's own channels (:mod:`.shape_ops`). See docs/design.md, 'Residual streams and
concatenations'.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch.fx

from .shape_ops import shape_reason

__all__ = ["residual_groups"]


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]


def residual_groups(walks: Mapping[str, Any], graph_module: torch.fx.GraphModule,
                    owner: Callable[[torch.fx.Node], str]
                    ) -> Iterator[tuple[list[str], list[Any], str | None]]:
    """``(producer names, their walks, reason it cannot grow or None)`` per group.

    ``owner(node)`` names the module whose ``forward`` holds an add, for the reasons.
    ``walks`` maps each walked producer to its walk (``.adds``: add node name -> names of the
    argument nodes reached; ``.blocked``; ``.consumers``; ``.downstream_norms``); groups come
    in the order of their first producer, members in forward order.
    """
    order = {name: i for i, name in enumerate(walks)}
    parent = {name: name for name in walks}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    first_at: dict[str, str] = {}  # add node -> the first producer that reached it
    for name, walk in walks.items():
        for add in walk.adds:
            first = first_at.setdefault(add, name)
            a, b = find(first), find(name)
            if a != b:
                parent[max(a, b, key=order.__getitem__)] = min(a, b, key=order.__getitem__)
    groups: dict[str, list[str]] = {}
    for name in walks:
        groups.setdefault(find(name), []).append(name)
    nodes = {n.name: n for n in graph_module.graph.nodes}
    for names in groups.values():
        members = [walks[n] for n in names]
        yield names, members, _reason(names, members, nodes, owner)


def _reason(names: list[str], walks: list[Any], nodes: Mapping[str, torch.fx.Node],
            owner: Callable[[torch.fx.Node], str]) -> str | None:
    for name, walk in zip(names, walks, strict=True):
        if walk.blocked is not None:
            return walk.blocked if len(names) == 1 else f"{name!r}: {walk.blocked}"
    reached: dict[str, set[str]] = {}
    for walk in walks:
        for add, args in walk.adds.items():
            reached.setdefault(add, set()).update(args)
    for add, args in reached.items():
        missing = [a for a in _tensor_args(nodes[add]) if a.name not in args]
        if missing:
            what = ("the network's input" if missing[0].op == "placeholder"
                    else "channels that no growable layer of its residual group produces")
            how = "multiplied by" if any(add in w.products for w in walks) else "added to"
            return f"its output is {how} {what} in {owner(nodes[add])}"
    reason = shape_reason(walks, nodes)
    if reason is not None:
        return reason
    if len(walks) > 1:
        seen: dict[str, tuple] = {}
        for walk in walks:
            for module, where in (*walk.consumers.items(), *walk.downstream_norms.items()):
                if seen.setdefault(module, where) != where:
                    return f"{module!r} reads the residual stream at two different positions"
    return None
