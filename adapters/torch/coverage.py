"""Does a growth method work on a model? Grow a copy once and check what growth promises.

:func:`check_growth` grows a deep copy of a model with a grower (an SGD-momentum optimizer
attached, so its state is grown too) and reports what a user needs to know: whether it grew or
was refused (in the ``GrowthError``'s own words), the share of neurons in growable layers and
the layers skipped with why, how far the outputs moved (eval mode, relative to their scale),
and whether the grown model trains (one SGD-momentum step: finite loss, finite and changed
weights). The model itself is never touched.

``benchmarks/growth_coverage.py`` prints the zoo's coverage table (model x method) from it;
``tests/test_torch_zoo.py`` asserts the same facts model by model.

>>> import torch
>>> from torch import nn
>>> from simcore.adapters.torch import RandomGrower
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
>>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
>>> check = check_growth(net, RandomGrower(seed=0), [batch], nn.functional.cross_entropy)
>>> check.grew, check.added, check.growable_share, check.output_change < 1e-6, check.trains
(True, 3, 1.0, True, True)
>>> check.cell()
'100% · kept'
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .flows import GrowthError
from .growers import Grower

__all__ = ["KEPT", "GrowthCheck", "check_growth"]

#: Relative output change below which a growth counts as keeping the function (float32 noise).
KEPT = 1e-5


@dataclass(frozen=True)
class GrowthCheck:
    """What one growth of a copy of a model did; see :func:`check_growth`.

    ``output_change`` is ``max |f_grown(x) - f(x)| / max |f(x)|`` over the first batch in eval
    mode; ``reason`` the ``GrowthError`` message when the growth was refused (then the other
    measurements are None).
    """

    method: str
    grew: bool
    reason: str | None = None
    added: int = 0
    growable_share: float | None = None
    output_change: float | None = None
    trains: bool | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def keeps_function(self) -> bool:
        return self.output_change is not None and self.output_change < KEPT

    def cell(self, words: int = 8) -> str:
        """A table cell: grown share and function kept (or the change), or the refusal."""
        if not self.grew:
            text = " ".join(str(self.reason).split()[:words])
            return f"refused: {text}" + (" …" if len(str(self.reason).split()) > words else "")
        kept = "kept" if self.keeps_function else f"Δ {self.output_change:.0e}"
        trains = "" if self.trains else " · does not train"
        return f"{self.growable_share:.0%} · {kept}{trains}"


def _outputs(model: nn.Module, inputs: Any) -> torch.Tensor:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(inputs).detach().clone()
    finally:
        for m, mode in modes:
            m.training = mode


def _sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Any, Any],
              loss_fn: Callable[[Any, Any], torch.Tensor]) -> bool:
    """One training step; whether the loss and the weights stay finite and the weights move."""
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(batch[0]), batch[1])
    loss.backward()
    optimizer.step()
    after = list(model.parameters())
    finite = math.isfinite(float(loss.detach()))
    finite = finite and all(bool(torch.isfinite(p).all()) for p in after)
    moved = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return finite and moved


def check_growth(
    model: nn.Module,
    grower: Grower,
    batches: Sequence[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    ratio: float = 0.35,
    lr: float = 0.01,
) -> GrowthCheck:
    """Grow a deep copy of ``model`` once with ``grower`` and check it (the module docstring).

    Before the growth the copy takes one SGD step (momentum 0.9, ``lr``) on the first batch,
    so the optimizer has state to grow; after it, one more. Only ``GrowthError`` counts as a
    refusal; any other exception propagates (it is a bug, not an answer).
    """
    if not batches:
        raise ValueError("check_growth needs at least one (inputs, targets) batch")
    work = copy.deepcopy(model)
    optimizer = torch.optim.SGD(work.parameters(), lr=lr, momentum=0.9)
    _sgd_step(work, optimizer, batches[0], loss_fn)
    before = _outputs(work, batches[0][0])
    try:
        report = grower.grow(work, list(batches), loss_fn, optimizer, ratio=ratio)
    except GrowthError as error:
        return GrowthCheck(method=grower.method, grew=False, reason=str(error))
    change = float((_outputs(work, batches[0][0]) - before).abs().max())
    scale = float(before.abs().max())
    return GrowthCheck(
        method=grower.method,
        grew=True,
        added=report.total_added,
        growable_share=report.growable_share,
        output_change=change / scale if scale > 0 else change,
        trains=_sgd_step(work, optimizer, batches[0], loss_fn),
        skipped=dict(report.skipped),
    )
