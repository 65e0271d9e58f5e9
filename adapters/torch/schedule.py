"""When to grow, and the similarity phase that follows each growth.

:class:`GrowthSchedule` answers "grow at the end of this epoch?" for the paper's
setting (250 epochs, a growth every 50 epochs, four growths of 35% each).

:class:`SimilarityPhase` runs the paper's post-growth step: Eq. 5 minimised for
``N`` iterations over the grown layers (its best ``N``: Random 20, SSD 10,
Firefly 15). The paper does not say what an iteration is, so both readings are
named:

* ``phase="weights_only"``: ``N`` steps on Eq. 5 alone, on the weights only,
  right after the growth (:meth:`SimilarityPenalty.decorrelate`);
* ``phase="joint"``: the next ``N`` training steps also minimise Eq. 5.

``step`` sizes the phase's steps (:data:`simcore.STEPS`). With ``"relative"``
(the default) each step moves every grown row by at most ``lr`` times its norm,
whatever the layer's weight scale (:func:`simcore.relative_update`); in the
joint reading that step is *decoupled* from the optimizer, like AdamW's weight
decay: call :meth:`SimilarityPhase.after_optimizer_step` after each
``optimizer.step()``, so the phase's strength does not depend on the
optimizer's learning rate or momentum. ``"absolute"`` is the earlier plain
gradient step: weights-only steps of size ``lr``, or, in the joint reading,
Eq. 5 added to the task loss (:meth:`SimilarityPhase.term`), coupled to the
optimizer.

The paper calls ``lambda`` "an arbitrary constant" and gives no value; the
defaults (:data:`DEFAULT_PHASE_LR`, ``lam``) are ours, chosen by the measured
sweep in the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import simcore
from simcore.extend import check_int, check_real
from simcore.growth import UNITS

from .penalty import SimilarityPenalty

__all__ = [
    "DEFAULT_PHASE_LAM",
    "DEFAULT_PHASE_LR",
    "DEFAULT_PHASE_STEPS",
    "PHASES",
    "GrowthSchedule",
    "SimilarityPhase",
]

#: The paper's best number of post-growth iterations per growth method (its Tables, N_best).
DEFAULT_PHASE_STEPS = {"random": 20, "ssd": 10, "firefly": 15}
#: The two readings of "N iterations of Eq. 5" (see the module docstring).
PHASES = ("weights_only", "joint")
#: The phase's step size for each kind of step (``simcore.STEPS``). A relative step of 0.01
#: moves a row by at most 1% of its norm per step: the largest step of the README's sweep
#: whose phase cost the test accuracy less than one point right after it; 0.01 is also the
#: earlier absolute default.
DEFAULT_PHASE_LR = {"relative": 0.01, "absolute": 0.01}
#: lambda of Eq. 4 for each kind of step. With relative steps each step removes about
#: ``lr * lam`` of the layer's scale drift from the post-growth snapshot (keep it below 1);
#: 0.1 is the earlier absolute default.
DEFAULT_PHASE_LAM = {"relative": 10.0, "absolute": 0.1}


def _index(value, name, minimum):
    return check_int(value, name, minimum=minimum)


@dataclass(frozen=True)
class GrowthSchedule:
    """Grow every ``every`` epochs from epoch ``start`` on, at most ``max_growths`` times.

    Epochs count from 0 and a growth happens *after* training epoch ``e`` when
    ``should_grow(e)``; ``start`` defaults to ``every - 1``, so the first growth
    comes once ``every`` epochs are done (the paper: after 50, 100, 150 and 200
    of 250 epochs, i.e. after epochs 49, 99, 149 and 199 counted from 0).
    ``ratio`` and ``unit`` are what each growth adds (35% of the neuron count by
    default; see docs/design.md, 'Growth'). The object holds no state, so resuming from a
    checkpoint needs only the epoch.

    >>> schedule = GrowthSchedule(every=50, max_growths=4)
    >>> [e + 1 for e in range(250) if schedule.should_grow(e)]  # epochs completed
    [50, 100, 150, 200]
    >>> schedule.growths_before(120)
    2
    """

    every: int = 50
    ratio: float = 0.35
    unit: str = "neurons"
    max_growths: int = 4
    start: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "every", _index(self.every, "every", 1))
        object.__setattr__(self, "max_growths", _index(self.max_growths, "max_growths", 0))
        start = self.every - 1 if self.start is None else _index(self.start, "start", 0)
        object.__setattr__(self, "start", start)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
            raise TypeError(f"ratio must be a float, got {type(self.ratio).__name__}")
        if not 0.0 < float(self.ratio) < float("inf"):
            raise ValueError(f"ratio must be positive and finite, got {self.ratio}")
        object.__setattr__(self, "ratio", float(self.ratio))
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")

    @property
    def _first_growth(self) -> int:
        """``start`` as __post_init__ resolved it: the first epoch after which it grows."""
        if self.start is None:  # __post_init__ resolves it; only a bypassed init leaves None
            raise RuntimeError("GrowthSchedule.start was not resolved")
        return self.start

    @property
    def growth_epochs(self) -> tuple[int, ...]:
        """Every epoch after which this schedule grows."""
        return tuple(self._first_growth + k * self.every for k in range(self.max_growths))

    def should_grow(self, epoch: int) -> bool:
        """Whether to grow after training epoch ``epoch`` (0-based)."""
        epoch = _index(epoch, "epoch", 0)
        if epoch < self._first_growth:
            return False
        k, rest = divmod(epoch - self._first_growth, self.every)
        return rest == 0 and k < self.max_growths

    def growths_before(self, epoch: int) -> int:
        """How many growths happened after epochs ``< epoch`` (the model's growth count)."""
        epoch = _index(epoch, "epoch", 0)
        return sum(1 for e in self.growth_epochs if e < epoch)


@dataclass
class SimilarityPhase:
    """The post-growth similarity phase (Eq. 5 for ``steps`` iterations on the grown layers).

    ``steps`` defaults to the paper's best ``N`` for ``method`` (Random 20, SSD 10,
    Firefly 15), ``lr`` and ``lam`` to :data:`DEFAULT_PHASE_LR` and
    :data:`DEFAULT_PHASE_LAM` for ``step``. After each
    growth call :meth:`start` with the model and the grown layers' names (a
    :class:`GrowthReport`'s ``grown_layers``):

    * ``phase="weights_only"``: the steps run at once;
    * ``phase="joint"`` with ``step="relative"``: call
      :meth:`after_optimizer_step` after each of the next ``steps`` optimizer
      steps (one decoupled relative step each);
    * ``phase="joint"`` with ``step="absolute"``: add :meth:`term` to the task
      loss in each of the next ``steps`` training steps.

    ``similarity=False`` keeps only the Eq. 4 term (with ``lam``), ``lam=0`` only
    Eq. 2: the paper's Table 3 ablation.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> phase = SimilarityPhase(method="ssd", phase="joint")
    >>> phase.steps, phase.lr
    (10, 0.01)
    >>> phase.start(net, ["0"])
    >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> net(torch.randn(3, 4)).square().mean().backward(); optimizer.step()
    >>> phase.after_optimizer_step()
    >>> phase.remaining
    9
    """

    method: str = "firefly"
    phase: str = "weights_only"
    steps: int | None = None
    lam: float | None = None
    lr: float | None = None
    strength: float = 1.0
    form: str = "squared_log"
    statistic: str = "rms"
    anchor: str = "snapshot"
    depthwise: str = "exclude"
    include_depthwise: bool | None = None  # deprecated: depthwise="include"/"exclude"
    similarity: bool = True
    step: str = "relative"
    remaining: int = field(default=0, init=False)
    penalty: SimilarityPenalty | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.method not in DEFAULT_PHASE_STEPS:
            raise ValueError(
                f"method must be one of {tuple(DEFAULT_PHASE_STEPS)}, got {self.method!r}"
            )
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.step not in simcore.STEPS:
            raise ValueError(f"step must be one of {simcore.STEPS}, got {self.step!r}")
        if self.steps is None:
            self.steps = DEFAULT_PHASE_STEPS[self.method]
        self.steps = _index(self.steps, "steps", 0)
        if self.lr is None:
            self.lr = DEFAULT_PHASE_LR[self.step]
        if self.lam is None:
            self.lam = DEFAULT_PHASE_LAM[self.step]
        # The core's Objective checks lam, form, statistic and similarity (a bool, not "no")
        # now, not at the first growth.
        objective = simcore.Objective(lam=self.lam, form=self.form, statistic=self.statistic,
                                      similarity=self.similarity)
        self.lam, self.similarity = objective.lam, objective.similarity
        self.strength = check_real(self.strength, "strength")
        self.lr = check_real(self.lr, "lr")
        if not self.lr > 0.0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.step == "relative" and not self.lr * self.lam < 2.0:
            raise ValueError(
                f"lr * lam = {self.lr * self.lam:g}: each relative step removes a fraction "
                f"lr * lam of the scale drift, so it must be below 2 (below 1 never overshoots)"
            )

    @property
    def coupled(self) -> bool:
        """Whether the joint reading adds Eq. 5 to the task loss (:meth:`term`)."""
        return self.step == "absolute"

    @property
    def active(self) -> bool:
        """Whether joint steps are still due (:meth:`term` or :meth:`after_optimizer_step`)."""
        return self._due_penalty() is not None

    def _due_penalty(self) -> SimilarityPenalty | None:
        """The penalty while joint steps are still due, else None."""
        return self.penalty if self.remaining > 0 else None

    def _schedule(self) -> tuple[int, float]:
        """``(steps, lr)`` as __post_init__ resolved them from the method's defaults."""
        if self.steps is None or self.lr is None:
            raise RuntimeError("SimilarityPhase.steps/lr were not resolved")
        return self.steps, self.lr

    def start(self, model: nn.Module, layers: Sequence[str]) -> None:
        """Begin the phase after a growth of ``layers`` (producer module names)."""
        if isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers:
            self.penalty, self.remaining = None, 0
            return
        self.penalty = SimilarityPenalty(
            model, layers=layers, lam=self.lam, form=self.form, statistic=self.statistic,
            anchor=self.anchor, depthwise=self.depthwise,
            include_depthwise=self.include_depthwise,
            strength=self.strength, similarity=self.similarity,
        )  # its construction snapshots the grown weights: W_prev of Eq. 4
        steps, lr = self._schedule()
        if self.phase == "weights_only":
            self.penalty.decorrelate(steps, lr, step=self.step)
            self.remaining = 0
        else:
            self.remaining = steps

    def term(self) -> torch.Tensor:
        """Eq. 5 to add to this training step's loss (joint, absolute step), else a zero tensor."""
        if not self.coupled and self.active:
            raise RuntimeError(
                "a relative-step joint phase is decoupled from the task loss: call "
                "after_optimizer_step() after each optimizer.step() (or use step='absolute' "
                "to add Eq. 5 to the loss)"
            )
        penalty = self._due_penalty()
        if penalty is None:
            return torch.zeros(())
        self.remaining -= 1
        return penalty()

    def after_optimizer_step(self) -> None:
        """One decoupled relative Eq. 5 step on the grown layers (joint, relative step)."""
        if self.coupled and self.active:
            raise RuntimeError(
                "an absolute-step joint phase is coupled to the task loss: add term() to the "
                "loss instead (or use step='relative')"
            )
        penalty = self._due_penalty()
        if penalty is None:
            return
        self.remaining -= 1
        penalty.decorrelate(1, self._schedule()[1], step=self.step)
