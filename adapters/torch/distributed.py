"""Growth under DistributedDataParallel: the same decision on every rank, then a fresh wrapper.

The collectives a growth needs (:func:`mean_over_ranks`, :func:`shared_seed`) are no-ops
without an initialised process group of more than one rank.

DDP registers gradient hooks on the parameters it was built with and checks
their shapes across ranks once, at construction. Growth replaces parameters by
larger ones, so the old wrapper must be dropped and the grown module wrapped
again. The growers (:mod:`.growers`) already make every rank take the same
decision: each growth's random seed comes from rank 0 (:func:`shared_seed`), and
scores (SSD: the splitting statistics; Firefly: gate gradients and candidate
updates) are averaged over ranks (:func:`mean_over_ranks`) before the global
selection; every rank must pass the same number of batches (checked first with one cheap
``all_gather``, :func:`check_same_on_ranks`, so ranks that disagree all get a
:class:`~simcore.growth.GrowthError` instead of waiting for the collectives' timeout).
:func:`regrow_ddp` then wraps
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

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from simcore.growth import GrowthError

__all__ = ["check_same_on_ranks", "is_distributed", "mean_over_ranks", "regrow_ddp",
           "shared_seed"]


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` must run: NCCL only takes CUDA tensors, gloo takes CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return t.device if t.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return t.device


def mean_over_ranks(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Mean of ``x`` (a tensor, or a NumPy array) over all ranks; ``x`` without a process group.

    Every rank must call it the same number of times in the same order (same flows, same
    number of batches), as with any collective.
    """
    if not is_distributed():
        return x
    if isinstance(x, np.ndarray):
        return _tensor_mean_over_ranks(torch.tensor(x)).numpy()
    return _tensor_mean_over_ranks(x)


def _tensor_mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    out = x.detach().to(_collective_device(x), copy=True)
    torch.distributed.all_reduce(out)
    return (out / torch.distributed.get_world_size()).to(x.device)


def shared_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank (``seed`` itself without a process group)."""
    if not is_distributed():
        return seed
    box = torch.tensor([seed], dtype=torch.int64)
    box = box.to(_collective_device(box))
    torch.distributed.broadcast(box, src=0)
    return int(box.item())

def check_same_on_ranks(**counts: int) -> None:
    """Raise :class:`~simcore.growth.GrowthError` on every rank if a count differs between ranks.

    One ``all_gather`` of a few integers, made before the growth's expensive collectives:
    ranks that disagree (e.g. on the number of scoring batches, which sets how many
    collectives each makes) would otherwise wait on each other until the process group's
    timeout and abort. Every rank sees the same gathered table, so every rank raises the
    same error. Every rank must pass the same names. Nothing happens without a process group.
    """
    if not is_distributed():
        return
    names = sorted(counts)
    mine = torch.tensor([int(counts[name]) for name in names], dtype=torch.int64)
    mine = mine.to(_collective_device(mine))
    gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    table = torch.stack(gathered).cpu().tolist()
    for column, name in enumerate(names):
        per_rank = {rank: row[column] for rank, row in enumerate(table)}
        if len(set(per_rank.values())) > 1:
            raise GrowthError(
                f"the ranks disagree on {name} (per rank: {per_rank}); every rank must grow "
                "the same model with the same number of scoring batches, because the scores "
                "are averaged over ranks with collectives"
            )


# Settings a DDP wrapper stores under the same name as its constructor argument.
_CARRIED = (
    "device_ids",
    "output_device",
    "dim",
    "process_group",
    "device_mesh",
    "find_unused_parameters",
    "gradient_as_bucket_view",
    "static_graph",
    "skip_all_reduce_unused_params",
    "batched_grad_copy",
    "forward_sync_buffers",
)


def _carried_settings(ddp_model: DistributedDataParallel) -> dict[str, Any]:
    kwargs = {name: getattr(ddp_model, name) for name in _CARRIED if hasattr(ddp_model, name)}
    if kwargs.get("device_mesh") is not None:
        kwargs.pop("process_group", None)  # derived from the mesh; DDP refuses both
    else:
        kwargs.pop("device_mesh", None)
        if kwargs.get("process_group") is None:
            kwargs.pop("process_group", None)
    if "forward_sync_buffers" not in kwargs and hasattr(ddp_model, "broadcast_buffers"):
        kwargs["broadcast_buffers"] = ddp_model.broadcast_buffers  # older torch
    # Stored in bytes; the constructor takes MiB.
    if getattr(ddp_model, "bucket_bytes_cap", None) is not None:
        kwargs["bucket_cap_mb"] = ddp_model.bucket_bytes_cap / (1024 * 1024)
    return kwargs


def regrow_ddp(ddp_model: DistributedDataParallel, **overrides: Any) -> DistributedDataParallel:
    """Wrap ``ddp_model.module`` (just grown) in a new DDP, carrying the old wrapper's settings.

    Carried from the old wrapper (what it stores): ``device_ids``, ``output_device``,
    ``dim``, ``process_group`` or ``device_mesh``, ``find_unused_parameters``,
    ``gradient_as_bucket_view``, ``static_graph``, ``skip_all_reduce_unused_params``,
    ``batched_grad_copy``, ``forward_sync_buffers`` (``broadcast_buffers`` on torch
    versions that store it), ``bucket_cap_mb`` (from ``bucket_bytes_cap``), and every
    communication hook registered with ``register_comm_hook``, re-registered with the
    same ``state`` object (a stateful hook whose state depends on bucket shapes,
    e.g. PowerSGD's error buffers, should be registered afresh by the caller instead:
    pass ``comm_hooks=[(hook, state), ...]``; ``comm_hooks=[]`` registers none).

    Not carried: ``init_sync`` is not stored by DDP, so the new wrapper uses the
    constructor default (``True``: shapes verified across ranks and rank 0's values
    broadcast, which growth relies on); ``bucket_cap_mb_list`` and ``check_reduction``
    (deprecated) are not stored either. These can be given in ``overrides``.

    Refused (``ValueError``) unless overridden: ``mixed_precision`` (DDP installed
    its forward hooks and low-precision copies on the module itself; a second wrapper
    would stack a second set) and ``delay_all_reduce_named_params`` (the old wrapper
    holds the pre-growth parameter objects). Pass ``mixed_precision=None`` or fresh
    ``delay_all_reduce_named_params=...``/``param_to_hook_all_reduce=...`` in
    ``overrides`` to decide explicitly.

    ``overrides`` are passed to :class:`~torch.nn.parallel.DistributedDataParallel`
    instead of the carried values. Raises ``TypeError`` for a model that is not a
    DDP wrapper. Optimizers need no change: growth already pointed them at the new
    parameters, which the new wrapper shares.
    """
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"ddp_model must be a DistributedDataParallel wrapper, got {type(ddp_model).__name__}"
        )
    module: nn.Module = ddp_model.module
    if getattr(ddp_model, "mixed_precision", None) is not None and (
        "mixed_precision" not in overrides
    ):
        raise ValueError(
            "regrow_ddp cannot carry mixed_precision: DDP set up its low-precision copies and "
            "forward hooks on the module itself; pass mixed_precision=None (or a config) "
            "explicitly after removing them"
        )
    if getattr(ddp_model, "_delay_all_reduce_params", None) and (
        "delay_all_reduce_named_params" not in overrides
    ):
        raise ValueError(
            "regrow_ddp cannot carry delay_all_reduce_named_params: the old wrapper holds the "
            "parameters from before the growth; pass delay_all_reduce_named_params= and "
            "param_to_hook_all_reduce= with the grown module's parameters"
        )
    comm_hooks = overrides.pop("comm_hooks", None)
    if comm_hooks is None:
        comm_hooks = [(hook, state) for hook, state in getattr(ddp_model, "_comm_hooks", [])]
    kwargs = _carried_settings(ddp_model)
    kwargs.update(overrides)
    if "forward_sync_buffers" in overrides or "broadcast_buffers" in overrides:
        # The caller chose one of the two buffer switches: do not add the carried other one.
        kwargs.pop("broadcast_buffers" if "forward_sync_buffers" in overrides
                   else "forward_sync_buffers", None)
    if "device_mesh" in overrides and overrides["device_mesh"] is not None:
        kwargs.pop("process_group", None)
    if "process_group" in overrides and overrides["process_group"] is not None:
        kwargs.pop("device_mesh", None)
    wrapped = DistributedDataParallel(module, **kwargs)
    for hook, state in comm_hooks:
        wrapped.register_comm_hook(state, hook)
    return wrapped
