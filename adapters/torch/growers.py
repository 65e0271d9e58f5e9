"""Growers for PyTorch models: Random (Dota 2 / Net2Net-style add), SSD and Firefly.

The algorithms are the core's (:mod:`simcore.growth.growers`): budget (``ratio`` of the neuron
count by default), scoring, global selection (:func:`simcore.growth.select_lowest`) and the
widening operators. These classes add what a PyTorch model needs around them: the growable
layers found with :func:`~simcore.adapters.torch.discovery.discover_flows` (or given as
``flows``), and a :class:`~simcore.adapters.torch.host.TorchGrowthHost` that scores with
forward hooks and ``torch.autograd.grad`` (BatchNorm in eval mode while scoring; the model's
modes restored and no ``.grad`` left on parameters afterwards) and writes the growth with
:func:`~simcore.adapters.torch.surgery.apply_growths`. A growth is atomic as a whole: if any
layer fails, the model and the optimizer are left exactly as they were.

Under ``torch.distributed`` (e.g. DistributedDataParallel), each growth draws
its random seed on rank 0 and broadcasts it, and scores (SSD: the splitting
statistics) are averaged over ranks before selection, so every rank makes the
same decision (every rank must pass the same number of batches: the averages are
collectives; checked up front with one cheap collective). The collectives run with a short
timeout (:class:`~simcore.adapters.torch.distributed.GrowthCollectives`); wrap the grown module
again with :func:`~simcore.adapters.torch.distributed.regrow_ddp`.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
>>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
>>> report = RandomGrower(seed=0).grow(net, batches, nn.functional.cross_entropy, ratio=0.5)
>>> report.total_added, report.params_after > report.params_before
(8, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from simcore import growth as core
from simcore.growth import GrowthReport
from simcore.growth.growers import check_real_range

from .capture import ssd_refusal
from .discovery import check_flows, discover_flows, survey_flows
from .distributed import DEFAULT_COLLECTIVE_TIMEOUT, GrowthCollectives
from .flows import GrowthError, TorchFlow, unwrap
from .host import TorchGrowthHost
from .optim import check_growable_optimizer, check_optimizer_mode

__all__ = ["FireflyGrower", "Grower", "GrowthReport", "RandomGrower", "SSDGrower"]


class Grower(core.Grower):
    """Base of the PyTorch growers: :meth:`grow` takes an ``nn.Module`` and its optimizer.

    Subclasses combine it with a core grower (:class:`simcore.growth.Grower`), whose
    ``score``/``select``/``plan``/``widen`` they inherit.
    """

    def grow(  # type: ignore[override]  # a model, not a host: the host is built here
        self,
        model: nn.Module,
        data_batches: Iterable[tuple[Any, Any]] | None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        ratio: float = 0.35,
        unit: str = "neurons",
        layers: Sequence[str] | None = None,
        flows: Sequence[TorchFlow] | None = None,
        example_input: Any = None,
        optimizer_mode: str = "carry",
        lr: float | None = None,
        caps: Sequence[int] | None = None,
        collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT,
    ) -> GrowthReport:
        """Grow ``model`` once; returns a :class:`~simcore.growth.GrowthReport`.

        ``data_batches``: an iterable of ``(inputs, targets)``; ``loss_fn(outputs,
        targets)`` a batch-mean loss. ``layers`` restricts growth to those
        producers (a layer that cannot grow raises ``GrowthError``); ``flows``
        gives hand-written flows instead of tracing (not both), checked against the traced
        graph where there is one (:func:`~simcore.adapters.torch.discovery.check_flows`).
        Without either, every layer found is grown that can be, and the report's ``skipped``
        says, per other layer (by module name), why not; ``growable_share`` the share of
        neurons that could grow. ``example_input`` is needed only without data when a flatten
        feeds a Linear. ``optimizer``
        follows the grown parameters: ``optimizer_mode="carry"`` keeps every
        state and gives new channels zero state, ``"fresh"`` (deprecated spelling
        ``"reset"``) drops the state of every parameter of the optimizer (see
        :mod:`simcore.adapters.torch.optim`); ``lr`` (optional) then sets every
        param group's learning rate, as the reference does after a growth.
        ``collective_timeout``: seconds each of the growth's collectives waits for the other
        DDP ranks before :class:`~simcore.adapters.torch.distributed.GrowthCollectiveError`
        (raise it if a rank does long work, e.g. saving a checkpoint, just before growing).
        """
        optimizer_mode = check_optimizer_mode(optimizer_mode)
        check_growable_optimizer(optimizer)  # before scoring, not after it
        if lr is not None:
            lr = check_real_range(lr, "lr", low=0.0, low_open=True)
            if optimizer is None:
                raise ValueError("lr is given but there is no optimizer to set it on")
        if layers is not None and flows is not None:
            raise ValueError("give layers= or flows=, not both (flows already name the layers)")
        batches = self.check_request(data_batches, loss_fn, ratio=ratio, unit=unit)
        net = unwrap(model)
        if example_input is None and batches:
            example_input = batches[0][0][:1]
        skipped: dict[str, str] = {}
        if flows is None and layers is None:
            survey = survey_flows(net, example_input)
            skipped = dict(survey.skipped)
            flows = []
            for flow in survey.flows:
                why = self.refusal(net, flow)
                if why is None:
                    flows.append(flow)
                else:
                    skipped[flow.producer] = why
        elif flows is None:
            flows = discover_flows(net, example_input, layers=layers)
            for flow in flows:
                why = self.refusal(net, flow)
                if why is not None:
                    raise GrowthError(f"{type(self).__name__} cannot grow {flow.producer!r}: {why}")
        else:
            flows = list(flows)
            check_flows(net, flows)  # against the traced graph: no success before a bad forward
        if not flows:
            reasons = "; ".join(f"{name!r}: {why}" for name, why in list(skipped.items())[:3])
            more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
            raise GrowthError(f"{type(net).__name__} has no growable layer"
                              + (f": {reasons}{more}" if reasons else ""))
        with GrowthCollectives(collective_timeout) as collectives:
            collectives.check_same(  # one cheap collective before the expensive ones
                scoring_batches=len(batches) if self.needs_data else 0,
                growable_layers=len(flows),
                neurons=sum(f.channels(net) for f in flows),
            )
            host = TorchGrowthHost(net, flows, optimizer, optimizer_mode=optimizer_mode, lr=lr,
                                   collectives=collectives)
            report = super().grow(host, batches, loss_fn, ratio=ratio, unit=unit, caps=caps)
        return replace(report, skipped=skipped,
                       skipped_widths={name: _width(net.get_submodule(name)) for name in skipped})

    def refusal(self, model: nn.Module, flow: TorchFlow) -> str | None:
        """Why this method cannot grow ``flow``'s layer though discovery found it, or None."""
        return None


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return int(module.out_channels)
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    raise TypeError(f"a skipped layer must be a Conv2d or Linear, got {type(module).__name__}")


class RandomGrower(Grower, core.RandomGrower):
    __doc__ = core.RandomGrower.__doc__


class SSDGrower(Grower, core.SSDGrower):
    __doc__ = (core.SSDGrower.__doc__ or "") + """
    An activation may be a module or a function call (``F.relu``, ``x.relu_()``); a layer whose
    activation has no registered second derivative (:mod:`simcore.growth.activations`) is
    skipped with that reason (refused with ``GrowthError`` when named in ``layers``).
    """

    def refusal(self, model: nn.Module, flow: TorchFlow) -> str | None:
        return ssd_refusal(model, flow)


class FireflyGrower(Grower, core.FireflyGrower):
    __doc__ = (core.FireflyGrower.__doc__ or "") + """
    The widened copy is built with the same surgery as a real growth (depthwise convs,
    BatchNorm and flatten heads handled alike) and run with ``torch.func.functional_call``,
    BatchNorm in eval mode throughout.
    """
