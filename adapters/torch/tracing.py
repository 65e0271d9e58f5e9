"""Tracing a PyTorch model with ``torch.fx`` and reading the shapes its nodes carry.

:func:`trace_model` traces a model and, given an example input, propagates shapes through the
graph (BatchNorm in eval mode, every module's own mode restored after); :func:`node_shape`
reads a node's propagated shape and :func:`target_name` names its operation for messages.
:mod:`.channel_walk` and :mod:`.shape_ops` decide from these shapes which operations keep the
channel axis.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .flows import GrowthError

__all__ = ["node_shape", "target_name", "trace_model"]


def trace_model(model, example_input):
    """``model``'s fx graph module, shapes propagated when ``example_input`` is given.

    A model fx cannot trace (data-dependent control flow) raises ``GrowthError`` saying how to
    describe its flows by hand.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; all mean "describe the flow by hand"
        raise GrowthError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); "
            "describe its flows by hand with TorchFlow(producer, norm=..., consumers=...)"
        ) from exc
    if example_input is not None:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # shape propagation must not touch BatchNorm running stats
        try:
            with torch.no_grad():
                ShapeProp(graph_module).propagate(*inputs)
        finally:
            for m, mode in modes:  # each module's own mode, not model.train(...) for all
                m.training = mode
    return graph_module


def node_shape(node):
    """The shape propagated to ``node`` as a tuple, or None (no example input, not a tensor)."""
    meta = node.meta.get("tensor_meta")
    return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)


def target_name(node):
    """The operation of a ``call_function``/``call_method`` node, quoted: ``'view'``."""
    target = node.target
    return repr(target if isinstance(target, str) else getattr(target, "__name__", str(target)))
