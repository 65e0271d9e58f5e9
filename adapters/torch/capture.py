"""What SSD needs of a PyTorch model, captured with forward hooks while it scores a batch.

For every flow: the producer's input unfolded into the rows its weight multiplies
(``(B, P, d)``), the pre-activation after the producer and its BatchNorm (``(B, P, n)``), and
the loss's gradient with respect to the activation's output (``(B, P, n)``), from
``torch.autograd.grad``, so no ``.grad`` is left on the parameters. An activation module's
output is taken by a forward hook; an activation called as a function (``F.relu(z)``,
``z.relu_()``) by a ``TorchFunctionMode`` that watches for that call on the pre-activation
tensor (the same tensor object the producer's or norm's hook saw), active only while scoring.
:func:`scoring_mode` puts BatchNorm on its running statistics while scoring and restores every
module's own mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from simcore.growth import GrowthError, SplittingStatistics, bn_coefficient
from simcore.growth.growers import check_loss

from .activations import call_activation, is_known_activation, tensor_method_name
from .flows import BATCH_NORM, TorchFlow
from .paths import path_refusal

__all__ = ["scoring_mode", "splitting_statistics", "ssd_refusal"]


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for scoring (BatchNorm uses running stats); each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The producer's input as ``(B, P, d)`` rows ordered like its weight rows."""
    if isinstance(module, nn.Linear):  # (batch, ..., features): every position a row
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if not isinstance(module, nn.Conv2d):
        raise GrowthError(f"SSD captures Linear and Conv2d producers, got {type(module).__name__}")
    padding: int | tuple[int, ...]
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        if isinstance(module.padding, str) and module.padding == "valid":
            padding = 0
        else:
            raise GrowthError(
                f"SSD unfolds patches with zero padding; {module} uses padding "
                f"{module.padding!r} / padding_mode {module.padding_mode!r}"
            )
    else:
        padding = module.padding
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding,
                    stride=module.stride)
    return cols.transpose(1, 2)


def _positions(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``(B, n, H, W)`` or ``(B, n)`` -> ``(B, P, n)``; a Linear's ``(B, ..., n)`` likewise."""
    if channels_last:
        return t.reshape(t.shape[0], -1, t.shape[-1])
    return t.flatten(2).transpose(1, 2) if t.ndim > 2 else t[:, None, :]


class _Capture:
    """Forward hooks recording, per flow, the producer input, pre-activation and activation."""

    def __init__(self, model: nn.Module, flows: Sequence[TorchFlow]):
        modules = dict(model.named_modules())
        self.handles: list[Any] = []
        self.records: list[dict[str, torch.Tensor]] = [{} for _ in flows]
        self.called: list[dict[str, torch.Tensor]] = []  # records of function-call activations
        for record, flow in zip(self.records, flows, strict=True):
            producer = modules[flow.producer]
            pre = modules[flow.norm] if flow.norm is not None else producer
            self._hook(producer, record, "input", lambda m, i, o: i[0].detach())
            # A copy: an in-place activation overwrites the pre-activation tensor itself.
            self._hook(pre, record, "z", lambda m, i, o: o.detach().clone())
            self._hook(pre, record, "z_tensor", lambda m, i, o: o)
            if flow.activation is not None:
                # An activation module may be shared by several layers: keep only the call
                # that reads this flow's pre-activation.
                self._hook(modules[flow.activation], record, "h", _differentiable,
                           when=lambda i, record=record: i[0] is record.get("z_tensor"),
                           replace=True)
            elif flow.activation_kind not in (None, "identity"):
                self.called.append(record)  # F.relu(z) in forward: _ActivationCalls records it
            else:
                self._hook(pre, record, "h", _differentiable, replace=True)

    def _hook(self, module, record, key, get, when=None, replace=False):
        def hook(m, inputs, output):
            if when is None or when(inputs):
                record[key] = get(m, inputs, output)
                if replace:
                    return record[key]  # the forward goes on from the recorded tensor
            return None

        self.handles.append(module.register_forward_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _ActivationCalls(TorchFunctionMode):
    """Records (and continues the forward from) an activation function called on a watched
    pre-activation, as the module hook does for an activation module."""

    def __init__(self, records: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.records = records

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor):
            return output
        watching = [r for r in self.records if args[0] is r.get("z_tensor")]
        if watching and call_activation(tensor_method_name(func) or func, args, kwargs):
            for record in watching:
                record["h"] = _differentiable(None, args, output)
            return watching[0]["h"]
        return output


def _differentiable(module, inputs, output):
    """The activation output as a node of the autograd graph, also where nothing before it is.

    With every parameter up to this layer frozen (and an input without ``requires_grad``) the
    output is no graph node and the loss's gradient with respect to it could not be taken; a
    detached leaf with the same values makes it one (values and the forward are unchanged).
    """
    if output.requires_grad or not torch.is_grad_enabled():
        return output
    return output.detach().requires_grad_(True)


def ssd_refusal(model: nn.Module, flow: TorchFlow) -> str | None:
    """Why SSD cannot score ``flow``'s layer (no second derivative of its activation), or None."""
    if flow.activation_paths and not flow.members:
        return path_refusal(flow)  # several activations, or one after a pooling: paths.py
    if flow.activation_node is not None and not flow.members:
        return ("its channels reach their activation only after a concatenation or a pooling: "
                "SSD reads a layer's own pre-activation; grow it with Random or Firefly")
    kind = flow.kind_of_activation(model)
    if flow.activation is not None and kind is None:
        act = model.get_submodule(flow.activation)
        return (f"its activation {flow.activation!r} is a {type(act).__name__}, not an "
                "activation SSD knows (pass TorchFlow(activation_kind=...))")
    if kind is not None and not is_known_activation(kind):
        where = repr(flow.activation) if flow.activation is not None else "a function call"
        return (f"no second derivative is known for its activation {kind!r} ({where}); "
                "register one with simcore.growth.register_activation, or grow it with "
                "Random or Firefly")
    return None


def _activation_kinds(model: nn.Module, flows: Sequence[TorchFlow]) -> list[str]:
    """Each flow's activation name for ``sigma''``, or GrowthError if SSD cannot know it."""
    for f in flows:
        why = ssd_refusal(model, f)
        if why is not None:
            raise GrowthError(f"SSD cannot score {f.producer!r}: {why}")
    return [f.kind_of_activation(model) or "identity" for f in flows]


def _bn_scale(flow: TorchFlow, modules: dict[str, nn.Module]) -> torch.Tensor | None:
    if flow.norm is None:
        return None
    bn = modules[flow.norm]
    if not isinstance(bn, BATCH_NORM):  # TorchFlow checked it; a model changed since would not be
        raise GrowthError(f"norm {flow.norm!r} of {flow.producer!r} is not a BatchNorm")
    if bn.running_var is None:
        raise GrowthError(
            f"SSD cannot score {flow.producer!r}: its norm {flow.norm!r} keeps no running "
            "statistics (track_running_stats=False), so the BN coefficient "
            "weight / sqrt(running_var + eps) is undefined"
        )
    var = bn.running_var.detach()
    scale = bn.weight.detach() if bn.weight is not None else torch.ones_like(var)
    return bn_coefficient(scale, var, eps=bn.eps)


def splitting_statistics(
    model: nn.Module,
    flows: Sequence[TorchFlow],
    batches: Sequence[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
) -> list[SplittingStatistics]:
    """Run ``model`` on every batch in :func:`scoring_mode` and capture SSD's inputs per flow.

    A producer whose activation has no known second derivative raises
    :class:`~simcore.growth.GrowthError` before any batch runs; function-call activations
    (``F.relu`` in ``forward``) are captured like modules.
    """
    modules = dict(model.named_modules())
    kinds = _activation_kinds(model, flows)
    captured: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in flows]
    with scoring_mode(model):
        for inputs, targets in batches:
            capture = _Capture(model, flows)
            try:
                if capture.called:
                    with _ActivationCalls(capture.called):
                        outputs = model(inputs)
                else:
                    outputs = model(inputs)
                loss = check_loss(loss_fn(outputs, targets))
            finally:
                capture.remove()
            missing = [f.producer for f, r in zip(flows, capture.records, strict=True)
                       if "h" not in r]
            if missing:
                raise GrowthError(
                    f"SSD saw no activation output for {missing[0]!r}: its activation "
                    "did not read its pre-activation (give the flow by hand)"
                )
            hs = [r["h"] for r in capture.records]
            grads = torch.autograd.grad(loss, hs, allow_unused=True)
            for i, (f, record, g) in enumerate(zip(flows, capture.records, grads, strict=True)):
                if g is None:
                    g = torch.zeros_like(record["h"])
                if g.shape != record["z"].shape:
                    raise GrowthError(
                        f"SSD cannot score {f.producer!r}: the activation output "
                        f"{tuple(g.shape)} and pre-activation {tuple(record['z'].shape)} "
                        "differ in shape"
                    )
                producer = modules[f.producer]
                last = isinstance(producer, nn.Linear)
                captured[i].append((_patches(producer, record["input"]),
                                    _positions(g.detach(), last), _positions(record["z"], last)))
    return [
        SplittingStatistics(activation=kind, bn_scale=_bn_scale(f, modules), batches=tuple(c))
        for f, kind, c in zip(flows, kinds, captured, strict=True)
    ]
