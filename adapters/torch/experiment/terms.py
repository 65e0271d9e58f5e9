"""The post-growth phase for each choice of terms of the paper's Table 3 ablation.

``"both"`` is Eq. 5 (the similarity loss plus ``lam`` times the weight-sum
term), ``"eq2"`` the similarity loss alone (``lam = 0``), ``"eq4"`` the
weight-sum term alone (``similarity=False``): all three are
:class:`~simcore.adapters.torch.schedule.SimilarityPhase`; ``"none"`` is the
baseline, with no phase.

Worth knowing when reading an ablation table: with a well-posed form
(``squared_log``/``abs_log``) and the ``snapshot`` anchor, the weight-sum term
and its gradient are exactly 0 right after the snapshot, so ``"eq4"`` with the
``weights_only`` reading changes nothing — the paper's Table 3 likewise reports
the same accuracy for "Proposed2 only" as for the baseline.

>>> make_phase("eq4", method="ssd", phase="joint", steps=10, lam=0.5, lr=0.01,
...            form="squared_log", anchor="snapshot").similarity
False
"""

from __future__ import annotations

from ..schedule import SimilarityPhase
from .config import TERMS

__all__ = ["make_phase"]


def make_phase(terms: str, *, method: str, phase: str, steps: int, lam: float, lr: float,
               form: str, anchor: str) -> SimilarityPhase | None:
    """The post-growth phase for ``terms`` (``None`` for the baseline ``"none"``)."""
    if terms not in TERMS:
        raise ValueError(f"terms must be one of {TERMS}, got {terms!r}")
    if terms == "none":
        return None
    return SimilarityPhase(method=method, phase=phase, steps=steps, lr=lr, form=form,
                           anchor=anchor, lam=0.0 if terms == "eq2" else lam,
                           similarity=terms != "eq4")
