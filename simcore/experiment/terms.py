"""The post-growth phase for each choice of terms of the paper's Table 3 ablation, and a control.

``"both"`` is Eq. 5 (the similarity loss plus ``lam`` times the weight-sum
term), ``"eq2"`` the similarity loss alone (``lam = 0``), ``"eq4"`` the
weight-sum term alone (``similarity=False``): all three are
:class:`~simcore.adapters.torch.schedule.SimilarityPhase`; ``"none"`` is the
baseline, with no phase. ``"control"`` is :class:`PerturbationControl`: it
moves each grown neuron by as much as the Eq. 5 phase would, in a random
direction, so that a table can tell decorrelation from perturbation noise.

Worth knowing when reading an ablation table: with a well-posed form
(``squared_log``/``abs_log``) and the ``snapshot`` anchor, the weight-sum term
and its gradient are exactly 0 right after the snapshot, so ``"eq4"`` with the
``weights_only`` reading changes nothing (it restrains a drift of the weights'
scale, and a phase of Eq. 4 alone has none to restrain); with the ``joint``
reading it restrains the drift the training steps cause, and
``form="literal"`` is the paper's formula as printed.

>>> make_phase("eq4", method="ssd", phase="joint", steps=10, lam=0.5, lr=0.01,
...            form="squared_log", anchor="snapshot").similarity
False
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from simcore.adapters.torch import layer_weight
from simcore.adapters.torch.schedule import SimilarityPhase

from .config import TERMS

__all__ = ["PerturbationControl", "make_phase"]


@dataclass
class PerturbationControl:
    """A random move of each grown neuron as large as the Eq. 5 phase's move of it.

    :meth:`start` runs ``phase`` (a weights-only :class:`SimilarityPhase`) to
    learn how far it moves each neuron's incoming weights, puts the weights
    back, and instead adds to each neuron a Gaussian direction scaled to that
    same distance. So the perturbation matches the phase neuron by neuron in
    size but not in direction. Draws come from ``generator``.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> control = PerturbationControl(SimilarityPhase(method="ssd"), torch.Generator())
    >>> before = net[0].weight.detach().clone()
    >>> control.start(net, ["0"])
    >>> moved = (net[0].weight - before).norm(dim=1)
    >>> bool(torch.allclose(moved, control.distances[0]))
    True
    """

    phase: SimilarityPhase
    generator: torch.Generator
    distances: list[torch.Tensor] = field(default_factory=list, init=False)

    def __post_init__(self):
        if self.phase.phase != "weights_only":
            raise ValueError("the perturbation control needs a weights-only phase")

    # What the runner asks of any phase: the control, like a weights-only phase, is over as
    # soon as start() returns, so no training step is ever due.
    remaining = 0
    active = False

    @torch.no_grad()
    def start(self, model: nn.Module, layers: Sequence[str]) -> None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        weights = [layer_weight(model, name) for name in layers]
        originals = [w.detach().clone() for w in weights]
        self.phase.start(model, layers)
        self.distances = []
        for w, original in zip(weights, originals, strict=True):
            rows = (w.detach() - original).reshape(w.shape[0], -1)
            distance = rows.norm(dim=1)
            noise = torch.randn(rows.shape, generator=self.generator, dtype=torch.float64)
            noise = noise.to(device=w.device, dtype=w.dtype)
            noise = noise / noise.norm(dim=1, keepdim=True) * distance[:, None]
            w.copy_(original + noise.reshape(w.shape))
            self.distances.append(distance)


def make_phase(terms: str, *, method: str, phase: str, steps: int, lam: float, lr: float,
               form: str, anchor: str, step: str = "relative",
               generator: torch.Generator | None = None
               ) -> SimilarityPhase | PerturbationControl | None:
    """The post-growth phase for ``terms`` (``None`` for the baseline ``"none"``).

    ``"control"`` needs the ``generator`` its random directions are drawn from.
    """
    if terms not in TERMS:
        raise ValueError(f"terms must be one of {TERMS}, got {terms!r}")
    if terms == "none":
        return None
    similarity_phase = SimilarityPhase(
        method=method, phase=phase, steps=steps, lr=lr, form=form, anchor=anchor, step=step,
        lam=0.0 if terms == "eq2" else lam, similarity=terms != "eq4")
    if terms == "control":
        if generator is None:
            raise ValueError("terms 'control' needs a generator for its random directions")
        return PerturbationControl(similarity_phase, generator)
    return similarity_phase
