"""The post-growth phase on weight arrays, for frameworks whose parameters are values (JAX).

:class:`ArrayPhase` is the array-in, array-out twin of the PyTorch runner's phase
(:func:`.terms.make_phase`: ``SimilarityPhase`` and ``PerturbationControl``), with the same
meaning of every choice: ``terms`` ``"both"`` (Eq. 5), ``"eq2"`` (``lam = 0``), ``"eq4"``
(Eq. 4 alone) or ``"control"`` (each grown neuron moved as far as the Eq. 5 phase would move
it, in a random direction); ``phase`` ``"weights_only"`` (``steps`` steps at once) or
``"joint"`` (one decoupled relative step after each of the next ``steps`` optimizer steps).
Every step is :func:`simcore.decorrelate`'s (the core's gradient and relative step); nothing
here computes Eq. 2 or Eq. 4. Arrays of any Array-API library come back in the same library.

>>> import numpy as np
>>> w = np.array([[1.0, 1.0, 0.0], [0.1, 1.0, 1.0]])  # neurons on the last axis
>>> phase = ArrayPhase("both", phase="weights_only", steps=20, lr=0.1, lam=1.0)
>>> [new] = phase.start([w])
>>> import simcore
>>> bool(simcore.similarity_loss(new, neuron_axis=-1) < simcore.similarity_loss(w, neuron_axis=-1))
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

import simcore

from .config import TERMS

__all__ = ["ArrayPhase"]


@dataclass
class ArrayPhase:
    """The phase after one growth, on the grown layers' weights (neurons on ``neuron_axis``).

    :meth:`start` takes the weights right after the growth (its snapshot is ``W_prev`` of
    Eq. 4) and returns them after a weights-only phase (unchanged for a joint one);
    :meth:`after_optimizer_step` returns them after one joint step while :attr:`active`.
    ``rng`` draws the control's directions.
    """

    terms: str
    phase: str = "weights_only"
    steps: int = 15
    lr: float = 0.01
    lam: float = 10.0
    form: str = "squared_log"
    anchor: str = "snapshot"
    step: str = "relative"
    neuron_axis: int = -1
    rng: np.random.Generator | None = None
    remaining: int = field(default=0, init=False)
    refs: list[Any] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        if self.terms not in TERMS or self.terms == "none":
            raise ValueError(f"terms must be one of {TERMS[1:]} (no phase for 'none'), "
                             f"got {self.terms!r}")
        if self.terms == "control" and (self.rng is None or self.phase != "weights_only"):
            raise ValueError("terms 'control' needs a weights-only phase and an rng for its "
                             "random directions")
        if self.phase == "joint" and self.step != "relative":
            raise ValueError("a joint phase on arrays takes decoupled relative steps: use "
                             "step='relative'")
        # checked now (lam, form, lr * lam < 2), not at the first growth
        simcore.decorrelate([np.eye(2)], steps=0, **self._options())

    def _options(self) -> dict[str, Any]:
        return {"lr": self.lr, "lam": 0.0 if self.terms == "eq2" else self.lam,
                "form": self.form, "similarity": self.terms != "eq4", "anchor": self.anchor,
                "step": self.step, "neuron_axis": self.neuron_axis}

    @property
    def active(self) -> bool:
        """Whether joint steps are still due."""
        return self.remaining > 0

    def _descend(self, weights: Sequence[Any], steps: int) -> list[Any]:
        new = simcore.decorrelate(list(weights), self.refs, steps=steps, **self._options())
        if self.anchor == "previous":
            self.refs = list(new)
        return new

    def start(self, weights: Sequence[Any]) -> list[Any]:
        """Begin the phase on the grown layers' weights; returns them after its weights-only
        steps (as given for a joint phase, whose steps come after the optimizer's)."""
        weights = list(weights)
        self.refs = list(weights)
        self.remaining = 0
        if not weights:
            return weights
        if self.phase == "joint":
            self.remaining = self.steps
            return weights
        new = self._descend(weights, self.steps)
        return self._perturb(weights, new) if self.terms == "control" else new

    def after_optimizer_step(self, weights: Sequence[Any]) -> list[Any]:
        """One decoupled relative Eq. 5 step (joint phase), or ``weights`` when none is due."""
        if not self.active:
            return list(weights)
        self.remaining -= 1
        return self._descend(weights, 1)

    def _perturb(self, originals: list[Any], moved: list[Any]) -> list[Any]:
        """Each neuron of ``originals`` moved as far as in ``moved``, in a random direction."""
        if self.rng is None:  # refused in __post_init__; kept for the type checker
            raise RuntimeError("the control needs an rng")
        out = []
        for original, new in zip(originals, moved, strict=True):
            xp = array_api_compat.array_namespace(original)
            before = np.moveaxis(np.asarray(original, dtype=np.float64), self.neuron_axis, 0)
            after = np.moveaxis(np.asarray(new, dtype=np.float64), self.neuron_axis, 0)
            rows = before.reshape(before.shape[0], -1)
            distance = np.linalg.norm(after.reshape(rows.shape) - rows, axis=1)
            noise = self.rng.standard_normal(rows.shape)
            noise *= (distance / np.linalg.norm(noise, axis=1))[:, None]
            perturbed = np.moveaxis((rows + noise).reshape(before.shape), 0, self.neuron_axis)
            out.append(xp.asarray(perturbed, dtype=original.dtype))
        return out
