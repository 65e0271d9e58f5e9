"""Squeeze-excitation products ``x * gate(x)`` in a traced model: which side a walk enters by.

A squeeze-excitation block (MobileNetV3, EfficientNet) multiplies a tensor ``x`` by a gate
computed from ``x`` itself (``pool -> fc1 -> act -> fc2 -> sigmoid``). The product keeps the
channel layout of ``x``, so :mod:`.discovery` follows it like a residual add: the producer of
``x`` and the gate's ``fc2`` join one group (:mod:`.groups`), grown by the same channels, and
the consumers of the product read the group. ``fc2`` is the group's *gate* member: a split
copies it exactly (:class:`simcore.growth.flow.Member`), so the product stays linear in the
split channels of ``x`` (docs/design.md, 'Squeeze-excitation gates').

Only products where one argument is computed from the other are followed; a product of two
unrelated tensors (a GLU-style gate of two branches) is refused as before.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

__all__ = ["GATE", "INPUT", "PRODUCT_FUNCTIONS", "PRODUCT_METHODS", "broadcasts_over_space",
           "is_gate", "product_role"]

#: The side of ``x * gate(x)`` a walk reaches: the gated tensor, or the gate computed from it.
INPUT, GATE = "input", "gate"
PRODUCT_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
PRODUCT_METHODS = {"mul", "mul_"}


def _depends_on(later: torch.fx.Node, earlier: torch.fx.Node) -> bool:
    stack, seen = [later], set()
    while stack:
        node = stack.pop()
        if node is earlier:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False


def product_role(node: torch.fx.Node, product: torch.fx.Node) -> str | None:
    """:data:`INPUT` or :data:`GATE` when ``product`` is ``x * gate(x)`` and ``node`` one side.

    None when the product is anything else: a constant or a parameter factor (one tensor
    argument), ``x * x``, or two tensors neither of which is computed from the other.
    """
    args = [a for a in (*product.args, *product.kwargs.values())]
    tensors = [a for a in args if isinstance(a, torch.fx.Node)]
    if len(args) != 2 or len(tensors) != 2 or tensors[0] is tensors[1]:
        return None
    if any(t.op == "get_attr" for t in tensors):
        return None
    other = tensors[1] if tensors[0] is node else tensors[0]
    if _depends_on(other, node):
        return INPUT
    if _depends_on(node, other):
        return GATE
    return None


def broadcasts_over_space(before: tuple | None, after: tuple | None) -> bool:
    """Whether a side of shape ``before`` reaches the product's ``after`` channel by channel.

    Equal shapes, or a gate ``(N, C, 1, 1)`` spread over ``(N, C, H, W)``; unknown shapes (no
    example input) are accepted, as for an add.
    """
    if before is None or after is None:
        return True
    if before == after:
        return True
    return (len(before) == len(after) and before[:2] == after[:2]
            and all(b == 1 for b in before[2:]))


def is_gate(walk) -> bool:
    """Whether a walked producer joins its group only as the gate of ``x * gate(x)``.

    ``walk.products`` maps each product node the walk reached to the sides it reached it by;
    ``walk.joins`` the adds and products it reached first, before passing any other. A producer
    that joins by an add, or by a product as its gated input, is an ordinary member; what the
    gated product reaches afterwards (SE-ResNet's residual add) is the group's stream.
    """
    return bool(walk.joins) and all(walk.products.get(j) == {GATE} for j in walk.joins)
