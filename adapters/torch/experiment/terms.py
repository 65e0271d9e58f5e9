"""The post-growth phase for each choice of terms of the paper's Table 3 ablation.

``"both"`` is Eq. 5 (the similarity loss plus ``lam`` times the weight-sum
term), ``"eq2"`` the similarity loss alone (``lam = 0``): both are part 1's
:class:`~simcore.adapters.torch.schedule.SimilarityPhase`. ``"eq4"``, the
weight-sum term alone, has no ready-made penalty in the adapter (its
:class:`SimilarityPenalty` always includes Eq. 2), so :class:`WeightSumPenalty`
here gives it the same interface, built on the core's
:func:`simcore.weight_sum_penalty_and_grad`.

Worth knowing when reading an ablation table: with a well-posed form
(``squared_log``/``abs_log``) and the ``snapshot`` anchor, the weight-sum term
and its gradient are exactly 0 right after the snapshot, so ``"eq4"`` with the
``weights_only`` reading changes nothing — the paper's Table 3 likewise reports
the same accuracy for "Proposed2 only" as for the baseline.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> penalty = WeightSumPenalty(net, layers=["0"], lam=0.5)
>>> penalty().item()  # measured against its own snapshot
0.0
>>> with torch.no_grad():
...     _ = net[0].weight.mul_(2.0)
>>> round(penalty().item(), 4)  # 0.5 * (log 2)^2
0.2402
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn

import simcore

from ..schedule import SimilarityPhase

__all__ = ["WeightSumPenalty", "WeightSumPhase", "make_phase"]


class _WeightSumFunction(torch.autograd.Function):
    """``weight_sum_penalty`` of one layer with the core's analytic gradient."""

    @staticmethod
    def forward(ctx, w, ref, form, statistic):
        value, grad = simcore.weight_sum_penalty_and_grad(
            w.detach(), ref.detach(), form=form, statistic=statistic)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad_output * grad).to(grad.dtype), None, None, None


class WeightSumPenalty:
    """``lam * sum_l weight_sum_penalty(W_l, W_prev_l)`` (Eq. 4 alone) over named layers.

    Mirrors :class:`~simcore.adapters.torch.SimilarityPenalty`'s interface:
    :meth:`snapshot`, a call returning a 0-d tensor to add to the loss, and
    :meth:`decorrelate` for the weights-only reading.
    """

    def __init__(self, model: nn.Module, *, layers: Sequence[str], lam: float,
                 form: str = "squared_log", statistic: str = "rms", anchor: str = "snapshot",
                 strength: float = 1.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
            raise ValueError("layers must be a non-empty list of module names")
        if form not in simcore.FORMS:
            raise ValueError(f"unknown form {form!r}; expected one of {simcore.FORMS}")
        if statistic not in simcore.STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; expected one of "
                             f"{simcore.STATISTICS}")
        if anchor not in simcore.ANCHORS:
            raise ValueError(f"unknown anchor {anchor!r}; expected one of {simcore.ANCHORS}")
        modules = dict(model.named_modules())
        for name in layers:
            if name not in modules or not isinstance(
                    getattr(modules[name], "weight", None), torch.Tensor):
                raise ValueError(f"layers names {name!r}, which is not a layer with a weight")
        self.model, self.layer_names = model, list(layers)
        self.lam, self.strength = float(lam), float(strength)
        self.form, self.statistic, self.anchor = form, statistic, anchor
        self.snapshot()

    def weights(self) -> list[torch.Tensor]:
        return [self.model.get_submodule(name).weight for name in self.layer_names]

    def snapshot(self) -> None:
        """Store the current weights as ``W_prev``."""
        self._refs = [w.detach().clone() for w in self.weights()]

    def __call__(self) -> torch.Tensor:
        weights = self.weights()
        terms = [_WeightSumFunction.apply(w, ref, self.form, self.statistic)
                 for w, ref in zip(weights, self._refs, strict=True)]
        if self.anchor == "previous":
            self.snapshot()
        return torch.stack(terms).sum() * (self.lam * self.strength)

    @torch.no_grad()
    def decorrelate(self, steps: int, lr: float) -> None:
        """``steps`` plain gradient steps on the term, in place (the weights-only reading)."""
        try:
            steps = operator.index(steps)
        except TypeError:
            raise TypeError(f"steps must be an int, got {type(steps).__name__}") from None
        scale = float(lr) * self.lam * self.strength
        for _ in range(steps):
            weights = self.weights()
            for w, ref in zip(weights, self._refs, strict=True):
                _, grad = simcore.weight_sum_penalty_and_grad(
                    w.detach(), ref, form=self.form, statistic=self.statistic)
                w.sub_(scale * grad)
            if self.anchor == "previous":
                self.snapshot()


class WeightSumPhase(SimilarityPhase):
    """:class:`SimilarityPhase` whose objective is the weight-sum term (Eq. 4) alone."""

    def start(self, model: nn.Module, layers: Sequence[str]) -> None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers:
            self.penalty, self.remaining = None, 0
            return
        self.penalty = WeightSumPenalty(model, layers=layers, lam=self.lam, form=self.form,
                                        statistic=self.statistic, anchor=self.anchor,
                                        strength=self.strength)
        if self.phase == "weights_only":
            self.penalty.decorrelate(self.steps, self.lr)
            self.remaining = 0
        else:
            self.remaining = self.steps


def make_phase(terms: str, *, method: str, phase: str, steps: int, lam: float, lr: float,
               form: str, anchor: str) -> SimilarityPhase | None:
    """The post-growth phase for ``terms`` (``None`` for the baseline ``"none"``)."""
    common = dict(method=method, phase=phase, steps=steps, lr=lr, form=form, anchor=anchor)
    if terms == "none":
        return None
    if terms == "both":
        return SimilarityPhase(lam=lam, **common)
    if terms == "eq2":
        return SimilarityPhase(lam=0.0, **common)
    if terms == "eq4":
        return WeightSumPhase(lam=lam, **common)
    raise ValueError(f"terms must be one of ('none', 'eq2', 'eq4', 'both'), got {terms!r}")
