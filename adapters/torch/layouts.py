"""Channels moved to the last axis (ConvNeXt): what :mod:`.discovery` may follow there, and why not.

ConvNeXt computes its blocks channels-last: ``x.permute(0, 2, 3, 1)``, a ``LayerNorm`` over the
channels, ``nn.Linear`` layers on the last axis, a per-channel layer scale ``gamma * x``, and
``permute(0, 3, 1, 2)`` back. The walk follows a permute that moves the channel axis last (and
back); on the last axis a ``Linear`` reads the channels, activations and dropout act channel by
channel, and adds keep the layout. A ``LayerNorm`` over the channels is refused, naming it: it
normalises every channel by statistics of all of them, so a new channel changes every channel's
output whatever its outgoing weights (no growth keeps the function). A layer scale is a
parameter outside any layer, which growth does not widen: it is refused only if nothing else on
the walk is (:func:`layer_scale`), so that a LayerNorm further on is the reason given.
"""

from __future__ import annotations

import torch
import torch.fx

__all__ = ["CHANNELS_LAST_PASS", "layer_norm_reason", "layer_scale", "permuted_layout"]

_LAST = (0, 2, 3, 1)
_FIRST = (0, 3, 1, 2)

#: ``call_method``/``call_function`` targets that read channels-last tensors channel by channel
#: (a LayerNorm call is let through to be refused with its reason).
CHANNELS_LAST_PASS = {"contiguous", "clone", torch.nn.functional.layer_norm}


def _dims(user: torch.fx.Node) -> tuple | None:
    if user.target in ("permute", torch.permute):
        dims = user.args[1:] if user.op == "call_method" else user.args[1:2]
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return tuple(dims) if all(isinstance(d, int) for d in dims) else None
    return None


def permuted_layout(user: torch.fx.Node, ndim: int, last: bool) -> bool | None:
    """The layout after permute ``user``: True channels-last, False channels-first, or None.

    None: a permute (or transpose, movedim) that puts the channels anywhere else.
    """
    dims = _dims(user)
    if ndim != 4 or dims is None:
        return None
    if not last and dims == _LAST:
        return True
    if last and dims == _FIRST:
        return False
    return None


def layer_norm_reason(where: str, size: tuple, channels_last: bool) -> str:
    """Why a LayerNorm over ``size`` (the trailing axes) stops the walk; ``where`` names it.

    ``channels_last``: the channels are the last axis (moved there, or features after a
    pooling), so any LayerNorm covers them; channels-first, only one over ``(C, H, W)`` does.
    """
    if channels_last or len(size) >= 3:
        return (f"its output feeds {where}, which normalises over the channels: a new channel "
                "changes every channel's output")
    return f"its output feeds {where} over the trailing axes {tuple(size)}, not the channels"


def layer_scale(node: torch.fx.Node, user: torch.fx.Node, last: bool) -> str | None:
    """The parameter's name when ``user`` is ``gamma * x`` with a per-channel ``gamma``.

    Per channel: one axis on a channels-last tensor, ``(C, 1, 1)`` on a channels-first one.
    """
    others = [a for a in (*user.args, *user.kwargs.values()) if a is not node]
    if len(others) != 1 or not isinstance(others[0], torch.fx.Node):
        return None
    other = others[0]
    if other.op != "get_attr":
        return None
    meta = other.meta.get("tensor_meta")
    shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    if shape is None or (len(shape) == 1 and last) or (len(shape) == 3 and shape[1:] == (1, 1)):
        return str(other.target)
    return None
