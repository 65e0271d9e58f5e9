"""Growth under DistributedDataParallel: the same decision on every rank, then a fresh wrapper.

DDP registers gradient hooks on the parameters it was built with and checks
their shapes across ranks once, at construction. Growth replaces parameters by
larger ones, so the old wrapper must be dropped and the grown module wrapped
again. The growers (:mod:`.growers`) already make every rank take the same
decision: each growth's random seed comes from rank 0, and
scores (SSD: the splitting statistics; Firefly: gate gradients and candidate
updates) are averaged over ranks before the global
selection; every rank must pass the same number of batches (checked first with one cheap
``all_gather``, so ranks that disagree all get a
:class:`~simcore.growth.GrowthError` instead of waiting for the collectives' timeout).
A growth's collectives run on a gloo group of their own with a short timeout
(:class:`GrowthCollectives`): a rank that stops answering, fails or dies mid-growth gives the
others a :class:`GrowthCollectiveError` naming the step, with their model and optimizer
unchanged, instead of a wait of torch's default 30 minutes. :func:`mean_over_ranks`,
:func:`shared_seed` and :func:`check_same_on_ranks` are the same collectives on the default
group; all are no-ops without an initialised process group of more than one rank.
:func:`regrow_ddp` then wraps
the grown module with the old wrapper's settings; DDP's construction checks
that every rank holds the same shapes and broadcasts rank 0's values, so any
floating-point drift between ranks is removed as well (on the wrapper's own group, with
its timeout).

Typical loop (every rank)::

    model = DistributedDataParallel(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ...
    if schedule.should_grow(epoch):
        report = grower.grow(model, batches, loss_fn, optimizer)  # grows model.module
        model = regrow_ddp(model)
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from simcore.growth import GrowthError
from simcore.growth.growers import check_real_range

__all__ = ["DEFAULT_COLLECTIVE_TIMEOUT", "GrowthCollectiveError", "GrowthCollectives",
           "check_same_on_ranks", "is_distributed", "mean_over_ranks", "regrow_ddp",
           "shared_seed"]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GrowthCollectiveError(RuntimeError):
    """A collective of a growth failed: another rank did not answer in time, failed or died.

    Raised before anything was written: the model and the optimizer are as they were on
    this rank. The process group may be unusable afterwards.
    """


#: Seconds a growth's collective waits for the other ranks (torch's own default is 30 minutes).
DEFAULT_COLLECTIVE_TIMEOUT = 300.0


def _collective_device(t: torch.Tensor, group: Any = None) -> torch.device:
    """Where a collective on ``t`` must run: NCCL only takes CUDA tensors, gloo takes CPU ones."""
    if torch.distributed.get_backend(group) == "nccl":
        return t.device if t.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return t.device if group is None else torch.device("cpu")


def _mean(x: torch.Tensor, group: Any) -> torch.Tensor:
    out = x.detach().to(_collective_device(x, group), copy=True)
    torch.distributed.all_reduce(out, group=group)
    return (out / torch.distributed.get_world_size(group)).to(x.device)


def _mean_of_any(x: torch.Tensor | np.ndarray, group: Any) -> torch.Tensor | np.ndarray:
    if isinstance(x, np.ndarray):
        return _mean(torch.tensor(x), group).numpy()
    return _mean(x, group)


def _broadcast_seed(seed: int, group: Any) -> int:
    box = torch.tensor([seed], dtype=torch.int64)
    box = box.to(_collective_device(box, group))
    torch.distributed.broadcast(box, src=0, group=group)
    return int(box.item())


def _check_same(counts: dict[str, int], group: Any) -> None:
    names = sorted(counts)
    mine = torch.tensor([int(counts[name]) for name in names], dtype=torch.int64)
    mine = mine.to(_collective_device(mine, group))
    gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()
    for column, name in enumerate(names):
        per_rank = {rank: row[column] for rank, row in enumerate(table)}
        if len(set(per_rank.values())) > 1:
            raise GrowthError(
                f"the ranks disagree on {name} (per rank: {per_rank}); every rank must grow "
                "the same model with the same number of scoring batches, because the scores "
                "are averaged over ranks with collectives"
            )


def mean_over_ranks(x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Mean of ``x`` (a tensor, or a NumPy array) over all ranks; ``x`` without a process group.

    Every rank must call it the same number of times in the same order (same flows, same
    number of batches), as with any collective. It runs on the default process group with
    its timeout; a growth uses :class:`GrowthCollectives` instead.
    """
    return _mean_of_any(x, None) if is_distributed() else x


def shared_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank (``seed`` itself without a process group)."""
    return _broadcast_seed(seed, None) if is_distributed() else seed


def check_same_on_ranks(**counts: int) -> None:
    """Raise :class:`~simcore.growth.GrowthError` on every rank if a count differs between ranks.

    One ``all_gather`` of a few integers, made before the growth's expensive collectives:
    ranks that disagree (e.g. on the number of scoring batches, which sets how many
    collectives each makes) would otherwise wait on each other until the process group's
    timeout and abort. Every rank sees the same gathered table, so every rank raises the
    same error. Every rank must pass the same names. Nothing happens without a process group.
    """
    if is_distributed():
        _check_same(counts, None)


class GrowthCollectives:
    """The collectives of one growth, on a gloo group of their own with a short ``timeout``.

    Used as a context manager around one growth by every rank (creating and destroying the
    group are themselves collective). Each collective names its ``step``; if another rank does
    not answer within ``timeout`` seconds, or fails or dies (gloo then reports a closed
    connection at once), :class:`GrowthCollectiveError` names the step. The data are small
    (a seed, a few counts, scores and the scoring's averages) and go through the CPU, so the
    same group serves a job whose training uses NCCL. Without a process group of more than one
    rank every method returns its input and no group is made. Why a group per growth:
    ``docs/design.md`` (growth under DDP).
    """

    def __init__(self, timeout: float = DEFAULT_COLLECTIVE_TIMEOUT):
        self.timeout = check_real_range(timeout, "collective_timeout", low=0.0, low_open=True)
        self.group: Any = None

    def __enter__(self) -> GrowthCollectives:
        if is_distributed():
            self.group = self._run(
                "creating the growth's process group",
                lambda: torch.distributed.new_group(
                    backend="gloo", timeout=datetime.timedelta(seconds=self.timeout)),
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        group, self.group = self.group, None
        if group is not None:
            torch.distributed.destroy_process_group(group)

    def _run(self, step: str, collective: Callable[[], T]) -> T:
        try:
            return collective()
        except RuntimeError as error:  # gloo's timeouts and lost connections
            # gloo's messages start with its source location: keep what it says.
            cause = re.sub(r"^\[[^\]]*\]\s*", "", str(error).splitlines()[0] if str(error)
                           else type(error).__name__)
            raise GrowthCollectiveError(
                f"growth stopped while {step}: another rank did not answer within "
                f"{self.timeout:g} s, or failed or died ({cause[:160]}); "
                "the model and the optimizer are unchanged on this rank, the process group "
                "may be unusable (restart the ranks, e.g. from the last checkpoint)"
            ) from error

    def mean(self, x: torch.Tensor | np.ndarray, step: str) -> torch.Tensor | np.ndarray:
        """:func:`mean_over_ranks` on the growth's group; ``step`` says what is averaged."""
        if self.group is None:
            return x
        return self._run(step, lambda: _mean_of_any(x, self.group))

    def shared_seed(self, seed: int) -> int:
        """:func:`shared_seed` on the growth's group."""
        if self.group is None:
            return seed
        return self._run("sharing rank 0's random seed",
                         lambda: _broadcast_seed(seed, self.group))

    def check_same(self, **counts: int) -> None:
        """:func:`check_same_on_ranks` on the growth's group."""
        if self.group is not None:
            self._run("checking that the ranks agree before scoring",
                      lambda: _check_same(counts, self.group))


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
