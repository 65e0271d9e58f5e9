"""SSD's statistics of a layer that reaches several activations, or one only after a pooling.

A DenseNet layer's output is concatenated, and every later layer applies its own BatchNorm and
ReLU to it; a transition conv reaches the next block's activations after an average pooling.
Its splitting matrix sums one term per activation path ``p`` (:mod:`.paths`)::

    S_i = sum_p sum_{b,q} dL/dh_p * sigma''(z_p) * c_{p,i}^2 * x_p x_p^T

The traced graph is run with the recorder of :mod:`.group_capture` at every path's activation
node (its input ``z``, its output ``h`` made a node of the autograd graph); the producer's
input is unfolded into patches and pooled as the path pools the producer's output (an average
pooling is linear, so ``pool(theta . x) = theta . pool(x)``). Path ``p``'s BatchNorm
coefficient is folded into its backprop (``g c_p^2``), so every path is one
``(patches, backprop, preactivations)`` entry of :class:`~simcore.growth.SplittingStatistics`
with ``bn_scale=None``. The grower averages its entries as batches: with ``k`` paths each
backprop is multiplied by ``k``, so the average over the ``batches x k`` entries is the
average over batches of the sum over paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from simcore.growth import GrowthError, SplittingStatistics

from .capture import _bn_scale, _patches, _positions, scoring_mode
from .flows import TorchFlow, TorchPath
from .group_capture import recorded_pass
from .paths import path_refusal

__all__ = ["path_splitting_statistics"]


def _pooled(patches: torch.Tensor, size: tuple[int, ...], pools: Sequence[torch.fx.Node],
            modules: dict[str, nn.Module]) -> torch.Tensor:
    """The ``(B, P, d)`` patches pooled as the path pools the producer's ``(B, n, *size)``."""
    if not pools:
        return patches
    t = patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *size)
    for node in pools:
        rest = (*node.args[1:], *node.kwargs.values())
        if any(isinstance(a, torch.fx.Node) for a in rest):
            raise GrowthError(f"SSD cannot pool the patches as node {node.name!r} does: its "
                              "arguments are computed in the forward")
        target = node.target
        if node.op == "call_module":
            t = modules[str(target)](t)
        elif node.op == "call_method":
            t = getattr(t, str(target))(*node.args[1:], **node.kwargs)
        elif callable(target):
            t = target(t, *node.args[1:], **node.kwargs)
    return _positions(t, False)


def _coefficient(flow: TorchFlow, path: TorchPath, n: int,
                 modules: dict[str, nn.Module]) -> torch.Tensor | None:
    """Path ``path``'s BatchNorm coefficient of the flow's ``n`` channels, or None."""
    full = _bn_scale(TorchFlow(flow.producer, norm=path.norm), modules)
    start = path.norm_offset or 0
    return None if full is None else full[start:start + n]


def path_splitting_statistics(
    model: nn.Module,
    flows: Sequence[TorchFlow],
    batches: Sequence[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> list[SplittingStatistics]:
    """SSD's inputs for each flow with ``activation_paths``: one entry per batch and path."""
    for flow in flows:
        why = path_refusal(flow)
        if why is not None:
            raise GrowthError(f"SSD cannot score {flow.producer!r}: {why}")
    modules = dict(model.named_modules())
    graph_module = torch.fx.symbolic_trace(model)
    by_name = {n.name: n for n in graph_module.graph.nodes}
    wanted = {p.node for f in flows for p in f.activation_paths}
    wanted |= {pool for f in flows for p in f.activation_paths for pool in p.pools}
    for name in sorted(wanted - by_name.keys()):
        raise GrowthError(f"SSD cannot find node {name!r} in the model's trace")
    nodes = {p.node for f in flows for p in f.activation_paths}
    entries: list[list[tuple]] = [[] for _ in flows]
    with scoring_mode(model):
        for inputs, targets in batches:
            seen, recorder, grads = recorded_pass(
                graph_module, nodes, [modules[f.producer] for f in flows], inputs, targets,
                loss_fn)
            for out, flow in zip(entries, flows, strict=True):
                producer = modules[flow.producer]
                x, shape = seen[producer]
                patches, size = _patches(producer, x), shape[2:]
                n = int(producer.weight.shape[0])
                flat = isinstance(producer, nn.Linear)
                k = len(flow.activation_paths)
                for path in flow.activation_paths:
                    start, axis = path.offset or 0, -1 if flat else 1  # a Linear's: last
                    z = recorder.z[path.node].narrow(axis, start, n)
                    g = grads[path.node]
                    g = torch.zeros_like(z) if g is None else g.narrow(axis, start, n).detach()
                    c = _coefficient(flow, path, n, modules)
                    if c is not None:
                        along = [1] * g.ndim
                        along[axis] = n
                        g = g * (c * c).reshape(along)
                    out.append((_pooled(patches, size, [by_name[p] for p in path.pools],
                                        modules),
                                _positions(g * k, flat), _positions(z, flat)))
    return [SplittingStatistics(activation=str(flow.activation_paths[0].kind), bn_scale=None,
                                batches=tuple(e)) for flow, e in zip(flows, entries, strict=True)]
