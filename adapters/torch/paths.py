"""Every activation a producer's channels reach, for SSD: the routes :mod:`.discovery` walks.

SSD's splitting matrix reads a neuron's pre-activation ``z = c (theta . x) + b``. A layer whose
output is concatenated (DenseNet) reaches *several* activations, each behind its own BatchNorm
(every later layer normalises the concatenation itself), and a DenseNet transition conv reaches
them only after an average pooling. The splitting matrix is then the sum over those paths:

    S_i = sum_p sum_{b,q} dL/dh_p * sigma''(z_p) * c_{p,i}^2 * x_p x_p^T

with ``c_{p,i}`` path ``p``'s BatchNorm coefficient of channel ``i`` and ``x_p`` the producer's
input patches pooled exactly as its output is on the way to that activation (an average
pooling is linear: it commutes with the producer's rows). While discovery walks a producer's
channels it carries a :class:`Route` (the norm and poolings passed since the producer) and, at
the first activation of every route, records a :class:`~.flows.TorchPath`; what the capture
cannot follow (a max pooling, a flatten before the activation) is recorded as the path's
``blocked`` reason, which SSD's refusal names. See docs/design.md, 'SSD through
concatenations and poolings'.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx
from torch import nn

from .activations import is_known_activation
from .flows import TorchFlow, TorchPath

__all__ = ["LINEAR_POOL_FUNCTIONS", "LINEAR_POOL_MODULES", "Route", "START", "activation_path",
           "after_norm", "after_pooling", "after_unfollowable", "path_refusal"]

#: Poolings that are linear in their input (their effect on the patches is the same operation).
LINEAR_POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_F = torch.nn.functional
LINEAR_POOL_FUNCTIONS = {_F.avg_pool2d, _F.adaptive_avg_pool2d, torch.mean, "mean"}


@dataclass(frozen=True)
class Route:
    """What lies between the producer and the point a walk has reached, before any activation.

    ``pools``: the fx nodes of the average poolings passed, in order; ``norm``/``norm_offset``
    the BatchNorm passed (its channels ``[norm_offset, norm_offset + n)``; None: its own); a
    route that passed something the capture cannot follow carries the reason in ``blocked``.
    """

    pools: tuple[str, ...] = ()
    norm: str | None = None
    norm_offset: int | None = None
    blocked: str | None = None


#: The route at the producer's output.
START = Route()


def after_norm(route: Route | None, name: str, offset: int | None) -> Route | None:
    """The route past BatchNorm ``name`` (None: an activation was passed already)."""
    if route is None or route.blocked is not None:
        return route
    if route.norm is not None:
        return replace(route, blocked=f"a second BatchNorm ({name!r})")
    return replace(route, norm=name, norm_offset=offset)


def after_pooling(route: Route | None, node: torch.fx.Node, user: torch.fx.Node,
                  linear: bool, shape_of) -> Route | None:
    """The route past a pass-through ``user`` (pooling, dropout): poolings are recorded."""
    if route is None or route.blocked is not None or shape_of(node) == shape_of(user):
        return route
    if not linear:
        return replace(route, blocked=f"a pooling that is not an average ({_where(user)})")
    return replace(route, pools=(*route.pools, user.name))


def after_unfollowable(route: Route | None, user: torch.fx.Node, what: str) -> Route | None:
    """The route past something the capture cannot apply to patches (a flatten, a view)."""
    if route is None or route.blocked is not None:
        return route
    return replace(route, blocked=f"{what} ({_where(user)})")


def activation_path(route: Route | None, user: torch.fx.Node, kind: str | None,
                    offset: int | None) -> TorchPath | None:
    """The path ending at activation ``user`` (None when the route had its activation)."""
    if route is None:
        return None
    return TorchPath(node=user.name, kind=kind, offset=offset, norm=route.norm,
                     norm_offset=route.norm_offset, pools=route.pools, blocked=route.blocked)


def _where(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return repr(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return f"in {next(reversed(stack))!r}" if stack else "in the model's forward"


def path_refusal(flow: TorchFlow) -> str | None:
    """Why SSD cannot sum ``flow``'s activation paths, or None."""
    for path in flow.activation_paths:
        if path.blocked is not None:
            return (f"its channels reach an activation after {path.blocked}: SSD follows "
                    "concatenations and average poolings only; grow it with Random or Firefly")
    kinds = sorted({str(p.kind) for p in flow.activation_paths})
    if len(kinds) > 1:
        return (f"its channels reach activations of different kinds ({', '.join(kinds)}); "
                "grow it with Random or Firefly")
    if not is_known_activation(kinds[0]):
        return (f"no second derivative is known for its activation {kinds[0]!r}; register one "
                "with simcore.growth.register_activation, or grow it with Random or Firefly")
    return None
