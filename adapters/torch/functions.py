"""The similarity loss (Eq. 2) and the growth objective (Eq. 5) as PyTorch autograd functions.

The core computes each value together with its analytic gradient in one pass
(one extra GEMM on top of the Gram matrix); the autograd functions here save
that gradient in ``forward`` and scale it in ``backward``. So PyTorch gets the
library's conventions (``sign(0) = 0``, zero rows get zero gradient, fp32
reductions for half inputs) rather than its own autograd's, and is faster than
autograd through the formula (see ``benchmarks/bench_torch_step.py``).

Autocast: the functions switch autocast off inside and hand the core the
weights in their own dtype, so an fp32 parameter is reduced in fp32 even under
``torch.autocast``; a float16/bfloat16 parameter is computed in fp32 by the core
and its loss and gradient are returned in the parameter's dtype.

``torch.compile``: the core's array-API code is not traced (it runs eagerly,
behind a graph break, inside the compiled step); values and gradients agree
with eager execution (tested).

First order only: the saved gradient carries no autograd history, so the
backward passes are first-order only (a stricter ``once_differentiable``) and
a second-order use (``create_graph=True`` then another backward, Hessian-vector products,
``torch.autograd.functional.hessian``) raises instead of silently treating the
penalty's Hessian as zero. Without a gradient to compute (under
``torch.no_grad``/``torch.inference_mode``, or no input requiring one) only the
core's value path runs and a plain tensor comes back.

>>> import torch
>>> from simcore.adapters.torch import similarity_loss
>>> w = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
>>> loss = similarity_loss(w)
>>> round(loss.item(), 4)
0.7071
>>> loss.backward()
>>> w.grad.shape
torch.Size([2, 2])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

import simcore
from simcore.extend import (
    Objective,
    as_objective,
)

__all__ = [
    "GrowthObjectiveFunction",
    "SimilarityLossFunction",
    "growth_objective",
    "similarity_loss",
]


def _check_tensor(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _eager(fn: Callable) -> Callable:
    """Run ``fn`` outside dynamo's tracing and with autocast switched off.

    The core is plain array-API code with Python-level validation; tracing it
    buys nothing (it is a handful of GEMMs) and autocast would run its
    reductions in half precision.
    """

    def run(*args, **kwargs):
        active = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if not active:  # the usual case: entering the contexts would cost more than the loss
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as stack:
            for device_type in active:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return _disable_dynamo(run)


# torch.compiler.disable, except that dynamo (an import as long as torch's own) is imported at
# the first call rather than with this module: a process that never calls the loss never pays
# it. Dynamo knows the wrapper and graph-breaks at it as at disable. Private to torch (which uses
# it on its own functions), hence the fallback.
_disable_dynamo = getattr(torch, "_disable_dynamo", torch.compiler.disable)


_AUTOCAST_DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

_SECOND_ORDER_MESSAGE = (
    "the similarity penalty is first-order only: its gradient is the core's analytic one, "
    "saved without autograd history, so it cannot be differentiated again "
    "(create_graph=True followed by another backward, Hessian-vector products, hessian())"
)


class _SecondOrderError(torch.autograd.Function):
    """``apply(grad, w)`` is ``grad`` with a graph edge to ``w`` whose backward raises."""

    @staticmethod
    def forward(ctx, grad, w):
        return grad.clone()

    @staticmethod
    def backward(ctx, grad_output):
        raise RuntimeError(_SECOND_ORDER_MESSAGE)


def _first_order_only(grads: Sequence[Any], inputs: Sequence[Any]) -> tuple:
    """``grads`` for a backward pass, made to raise if they are ever differentiated.

    ``torch.autograd.function.once_differentiable`` is not enough: it guards only
    when a ``grad_output`` requires grad, and its error node hangs off a fresh
    leaf, so ``autograd.grad(first_grad, w)`` never reaches it and the saved
    gradient (which has no history) silently gives the penalty a zero Hessian.
    Under ``create_graph=True`` (grad mode on inside backward) each gradient
    here instead gets an edge to its own input ``w`` through a node that raises.
    """
    if not torch.is_grad_enabled():
        return tuple(grads)
    return tuple(
        g if g is None else _SecondOrderError.apply(g, w) for g, w in zip(grads, inputs,
                                                                          strict=True)
    )


def _is_cpu_one(grad_output: torch.Tensor) -> bool:
    """Whether ``grad_output`` is a CPU scalar equal to 1 (read without a device sync)."""
    return (grad_output.device.type == "cpu" and grad_output.numel() == 1
            and not grad_output.requires_grad and grad_output.item() == 1)


@_eager
def _core_similarity(w, neuron_axis, block_size, zero_tol, with_grad):
    if with_grad:
        return simcore.similarity_loss_and_grad(
            w, neuron_axis=neuron_axis, block_size=block_size, zero_tol=zero_tol
        )
    value = simcore.similarity_loss(
        w, neuron_axis=neuron_axis, block_size=block_size, zero_tol=zero_tol
    )
    return value, None


@_eager
def _core_objective(weights, refs, objective, with_grad):
    if with_grad:
        return simcore.growth_objective_and_grad(weights, refs, objective=objective)
    return simcore.growth_objective(weights, refs, objective=objective), None


class SimilarityLossFunction(torch.autograd.Function):
    """Eq. 2 with the core's analytic gradient: ``apply(w, neuron_axis, block_size, zero_tol)``.

    ``forward`` computes the value and ``dmu/dw`` once (the gradient only when
    ``w`` needs one) and keeps the gradient; ``backward`` returns
    ``grad_output * dmu/dw`` in ``w``'s dtype. First order only:
    differentiating that gradient again raises.
    Prefer :func:`similarity_loss`.

    The first backward scales the kept gradient in place and hands that very tensor to
    autograd, which keeps it as ``w.grad`` without a copy (an ``n x d`` allocation and pass
    fewer per step: on the CPU the fresh pages of a new gradient cost as much as a pass).
    A second backward through a retained graph (``retain_graph=True``, ``gradcheck``)
    recomputes the gradient from ``w``, saved for it with autograd's version check.
    """

    @staticmethod
    def forward(ctx, w, neuron_axis, block_size, zero_tol):
        detached = w.detach()
        value, grad = _core_similarity(
            detached, neuron_axis, block_size, zero_tol, ctx.needs_input_grad[0]
        )
        if grad is not None:
            ctx.grad = grad
            ctx.arguments = (neuron_axis, block_size, zero_tol)
            ctx.save_for_backward(w)
            # Also for the edge that makes a second-order use raise (no copy, no version check).
            ctx.inputs = (w,)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward through a retained graph
            (w,) = ctx.saved_tensors
            grad = _core_similarity(w.detach(), *ctx.arguments, True)[1]
        if not _is_cpu_one(grad_output):  # loss.backward() seeds 1: no pass over the weights
            with torch.no_grad():
                grad.mul_(grad_output)
        return (*_first_order_only([grad], ctx.inputs), None, None, None)


def similarity_loss(
    w: torch.Tensor,
    *,
    neuron_axis: int = 0,
    block_size: int | None = None,
    zero_tol: float | None = None,
) -> torch.Tensor:
    """Eq. 2, the mean |cosine| between the neurons of ``w``, with the core's gradient.

    Same arguments as :func:`simcore.similarity_loss`; returns a 0-d tensor of
    ``w``'s dtype and device. Differentiable once (a second-order gradient
    raises); with no gradient to compute (``torch.no_grad``, or ``w`` not
    requiring one) only the core's value path runs.
    """
    _check_tensor(w, "w")
    if not (torch.is_grad_enabled() and w.requires_grad):
        value, _ = _core_similarity(w.detach(), neuron_axis, block_size, zero_tol, False)
        return value
    return SimilarityLossFunction.apply(w, neuron_axis, block_size, zero_tol)


class GrowthObjectiveFunction(torch.autograd.Function):
    """Eq. 5 over layers with the core's gradient: ``apply(objective, count, *weights, *refs)``.

    ``objective`` is a :class:`simcore.Objective`; refs get no gradient. First order
    only: differentiating the gradients again raises.
    Prefer :func:`growth_objective`.
    """

    @staticmethod
    def forward(ctx, objective, count, *tensors):
        weights = [t.detach() for t in tensors[:count]]
        refs = [t.detach() for t in tensors[count:]] or None
        with_grad = any(ctx.needs_input_grad[2 : 2 + count])
        value, grads = _core_objective(weights, refs, objective, with_grad)
        ctx.count, ctx.ref_count = count, len(tensors) - count
        if grads is not None:
            ctx.save_for_backward(*grads)
        # Only for the edges that make a second-order use raise (no copy, no version check).
        ctx.inputs = tensors[:count]
        return value

    @staticmethod
    def backward(ctx, grad_output):
        with torch.no_grad():
            grads = [(grad_output * g).to(g.dtype) for g in ctx.saved_tensors]
        # Nothing was saved when only refs required a gradient: every input gets None.
        weight_grads = _first_order_only(grads, ctx.inputs) if grads else (None,) * ctx.count
        return (None, None, *weight_grads, *([None] * ctx.ref_count))


def growth_objective(
    weights: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor] | None,
    *,
    objective: Objective | None = None,
    lam: float | None = None,
    form: str | None = None,
    statistic: str | None = None,
    neuron_axis: int | Sequence[int] | None = None,
    block_size: int | None = None,
    zero_tol: float | None = None,
    similarity: bool | None = None,
) -> torch.Tensor:
    """Eq. 5 summed over layers, differentiable in ``weights`` (``refs`` get no gradient).

    Same arguments as :func:`simcore.growth_objective`: one :class:`simcore.Objective`
    (``objective=``) or its keywords (``lam`` required); ``similarity=False``
    leaves Eq. 2 out (``lam`` times Eq. 4 alone, the paper's Table 3 ablation).
    Differentiable once (a second-order gradient raises); with no gradient to
    compute (``torch.no_grad``, or no tensor requiring one) only the core's
    value path runs.

    >>> import torch
    >>> from simcore.adapters.torch import growth_objective
    >>> w = torch.eye(3, requires_grad=True)
    >>> value = growth_objective([w], [2 * torch.eye(3)], lam=1.0)
    >>> round(value.item(), 4)  # (log 1/2)^2: the similarity term is 0
    0.4805
    >>> value.backward(); w.grad.shape
    torch.Size([3, 3])
    """
    if isinstance(weights, torch.Tensor):
        raise TypeError("weights must be a sequence of tensors (one per layer), got a tensor")
    weights = [_check_tensor(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if not weights:
        raise ValueError("weights must hold at least one layer")
    if refs is None:
        refs = []
    elif isinstance(refs, torch.Tensor):
        raise TypeError("refs must be a sequence of tensors or None, got a tensor")
    refs = [_check_tensor(r, f"refs[{i}]") for i, r in enumerate(refs)]
    if refs and len(refs) != len(weights):
        raise ValueError(f"refs has {len(refs)} layers but weights has {len(weights)}")
    objective = as_objective(objective, lam=lam, form=form, statistic=statistic,
                             neuron_axis=neuron_axis, block_size=block_size,
                             zero_tol=zero_tol, similarity=similarity)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (*weights, *refs))):
        value, _ = _core_objective([w.detach() for w in weights],
                                   [r.detach() for r in refs] or None, objective, False)
        return value
    return GrowthObjectiveFunction.apply(objective, len(weights), *weights, *refs)
