"""Growth under DistributedDataParallel: the same decision on every rank, then a fresh wrapper.

DDP registers gradient hooks on the parameters it was built with and checks
their shapes across ranks once, at construction. Growth replaces parameters by
larger ones, so the old wrapper must be dropped and the grown module wrapped
again. The growers (:mod:`.growers`) already make every rank take the same
decision: each growth's random seed comes from rank 0, and scores (SSD: the
splitting statistics; Firefly: gate gradients and candidate updates) are
averaged over ranks before the global selection. :func:`regrow_ddp` then wraps
the grown module with the old wrapper's settings; DDP's construction checks
that every rank holds the same shapes and broadcasts rank 0's values, so any
floating-point drift between ranks is removed as well.

Typical loop (every rank)::

    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ...
    if schedule.should_grow(epoch):
        report = grower.grow(model, batches, loss_fn, optimizer)  # grows model.module
        model = regrow_ddp(model)
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["regrow_ddp"]

# Settings a DDP wrapper stores under the same name as its constructor argument.
_CARRIED = (
    "device_ids",
    "output_device",
    "dim",
    "broadcast_buffers",
    "process_group",
    "find_unused_parameters",
    "gradient_as_bucket_view",
    "static_graph",
)


def regrow_ddp(ddp_model: DistributedDataParallel, **overrides: Any) -> DistributedDataParallel:
    """Wrap ``ddp_model.module`` (just grown) in a new DDP with the same settings.

    ``overrides`` are passed to :class:`~torch.nn.parallel.DistributedDataParallel`
    instead of the carried values (``device_ids``, ``output_device``, ``dim``,
    ``broadcast_buffers``, ``process_group``, ``find_unused_parameters``,
    ``gradient_as_bucket_view``, ``static_graph``). Raises ``TypeError`` for a
    model that is not a DDP wrapper. Optimizers need no change: growth already
    pointed them at the new parameters, which the new wrapper shares.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"ddp_model must be a DistributedDataParallel wrapper, got {type(ddp_model).__name__}"
        )
    module: nn.Module = ddp_model.module
    kwargs = {}
    for name in _CARRIED:
        if hasattr(ddp_model, name):
            kwargs[name] = getattr(ddp_model, name)
    if kwargs.get("process_group") is None:
        kwargs.pop("process_group", None)
    kwargs.update(overrides)
    return DistributedDataParallel(module, **kwargs)
