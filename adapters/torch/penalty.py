"""Eq. 5 over chosen layers of a PyTorch model: :class:`SimilarityPenalty`.

The autograd functions it calls (the loss and the growth objective with the core's
analytic gradients) live in :mod:`simcore.adapters.torch.functions`; they are
re-exported here for code that imported them from this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

import simcore
from simcore.extend import (
    DEPTHWISE,
    Objective,
    as_objective,
    check_choice,
    check_int,
    check_real,
    is_depthwise,
    warn_deprecated,
)

from .flows import layer_weight
from .functions import (
    GrowthObjectiveFunction,
    SimilarityLossFunction,
    _check_tensor,
    _eager,
    growth_objective,
    similarity_loss,
)

__all__ = [
    "GrowthObjectiveFunction",
    "SimilarityLossFunction",
    "SimilarityPenalty",
    "growth_objective",
    "is_depthwise_layer",
    "similarity_loss",
]

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_depthwise_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a depthwise conv by :func:`simcore.extend.is_depthwise`.

    The one rule of the penalty and the similarity statistics (any depth multiplier);
    growth's stricter rule is :func:`simcore.extend.is_growable_depthwise`.
    """
    return (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and is_depthwise(module.in_channels, module.groups))


class SimilarityPenalty:
    """Eq. 5 over chosen layers of a model, as a term to add to the task loss.

    Chooses the weights (never biases) of the model's ``Conv1d/2d/3d`` and
    ``Linear`` layers (neurons on axis 0, PyTorch's layout):

    * ``layers=None``: all of them, with ``depthwise`` (one of
      :data:`simcore.extend.DEPTHWISE`) deciding depthwise convs
      (:func:`is_depthwise_layer`): ``"exclude"`` (the default in every adapter),
      ``"include"`` or ``"only"``. They are left out by default
      because a depthwise neuron has only ``d = kh*kw`` weights (9 for 3x3): far more
      neurons than dimensions cannot be decorrelated, so Eq. 2 would pull against a
      floor it cannot reach (see docs/design.md, 'The similarity loss (Eq. 1-2)');
    * ``layers=callable``: those for which ``layers(name, module)`` is true
      (after the depthwise rule);
    * ``layers=[names]``: exactly the named modules (naming a depthwise conv
      needs ``depthwise="include"`` or ``"only"``).

    ``include_depthwise=True/False`` is the deprecated spelling of
    ``depthwise="include"/"exclude"``.

    Layers are looked up by name at every use, so growth that replaces a
    module's parameters (or the module itself) is picked up.

    ``W_prev`` of Eq. 4 (``lam * weight_sum_penalty``) is a stored copy of the
    weights: taken at construction and by :meth:`snapshot`, which a grower calls
    right after each growth (the post-growth reading). ``anchor`` (one of
    :data:`simcore.ANCHORS`) names the reading (see docs/design.md,
    'The weight-sum term (Eq. 4)'):

    * ``"snapshot"``: every call measures against the last :meth:`snapshot`;
    * ``"previous"``: after every call (and after :meth:`decorrelate`) the
      stored copy is replaced by the weights that call saw, so the next call,
      one optimizer step later, measures against the previous step's weights.

    The stored copy is read (and, with ``"previous"``, refreshed) only while
    Eq. 4 is part of the value, i.e. ``lam != 0`` or ``similarity=False``; with
    ``lam == 0`` the weights are not copied at every call.

    The Eq. 5 options come as one :class:`simcore.Objective` (``objective=``; its
    ``neuron_axis`` must be 0, PyTorch's layout) or as its keywords (``lam`` required).
    A call returns ``strength * Eq. 5`` as a 0-d tensor with the core's gradient;
    ``similarity=False`` leaves Eq. 2 out (``lam`` times Eq. 4 alone, the paper's
    Table 3 ablation).

    >>> import torch
    >>> from simcore.adapters.torch import SimilarityPenalty, vgg16
    >>> model = vgg16()
    >>> penalty = SimilarityPenalty(model, lam=0.1)
    >>> len(penalty.layer_names)  # 13 convs and the classifier
    14
    >>> term = penalty()
    >>> term.backward()  # fills .grad of the chosen weights only
    >>> model.classifier.bias.grad is None
    True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: None | Callable[[str, nn.Module], bool] | Sequence[str] = None,
        objective: Objective | None = None,
        lam: float | None = None,
        form: str | None = None,
        statistic: str | None = None,
        anchor: str = "snapshot",
        depthwise: str = "exclude",
        include_depthwise: bool | None = None,
        strength: float = 1.0,
        block_size: int | None = None,
        zero_tol: float | None = None,
        similarity: bool | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_choice(anchor, simcore.ANCHORS, "anchor")
        self.objective = as_objective(objective, lam=lam, form=form, statistic=statistic,
                                      block_size=block_size, zero_tol=zero_tol,
                                      similarity=similarity)
        if self.objective.neuron_axis != 0:
            raise ValueError("SimilarityPenalty reads neurons on axis 0 (PyTorch's layout); "
                             "leave the objective's neuron_axis at 0")
        self.model = model
        self.strength = check_real(strength, "strength")
        self.anchor = anchor
        if include_depthwise is not None:
            warn_deprecated(f"include_depthwise={include_depthwise!r}",
                            "depthwise='include' or 'exclude'")
            depthwise = "include" if include_depthwise else "exclude"
        self.depthwise = check_choice(depthwise, DEPTHWISE, "depthwise")
        self.layer_names = self._choose(layers)
        self._refs: list[torch.Tensor] = []
        self.snapshot()

    def _depthwise_allows(self, module: nn.Module) -> bool:
        if self.depthwise == "include":
            return True
        return is_depthwise_layer(module) == (self.depthwise == "only")

    def _choose(self, layers) -> list[str]:
        modules = dict(self.model.named_modules())
        if layers is None or callable(layers):
            chosen = [
                name for name, m in modules.items()
                if isinstance(m, _LAYER_TYPES) and self._depthwise_allows(m)
                and (layers is None or layers(name, m))
            ]
        elif isinstance(layers, Sequence) and not isinstance(layers, str):
            chosen = []
            for name in layers:
                if name not in modules:
                    raise ValueError(f"layers names {name!r}, which is not a module of the model")
                module = modules[name]
                if not isinstance(module, _LAYER_TYPES):
                    raise ValueError(
                        f"layers names {name!r}, a {type(module).__name__}; expected a conv or "
                        f"linear layer"
                    )
                if not self._depthwise_allows(module):
                    kind = "a depthwise" if is_depthwise_layer(module) else "not a depthwise"
                    raise ValueError(
                        f"layers names {name!r}, {kind} conv, but depthwise="
                        f"{self.depthwise!r}; pass depthwise='include'"
                    )
                chosen.append(name)
        else:
            raise TypeError(
                f"layers must be None, a callable or a list of module names, "
                f"got {type(layers).__name__}"
            )
        if not chosen:
            raise ValueError("no conv or linear layer of the model was chosen")
        return chosen

    def weights(self) -> list[torch.Tensor]:
        """The chosen layers' current weight parameters, in ``layer_names`` order."""
        return [layer_weight(self.model, name) for name in self.layer_names]

    def snapshot(self) -> None:
        """Store the current weights as ``W_prev`` (call right after a growth)."""
        self._refs = [w.detach().clone() for w in self.weights()]

    @property
    def refs(self) -> list[torch.Tensor]:
        """The stored ``W_prev``, one tensor per layer (e.g. to checkpoint a phase)."""
        return list(self._refs)

    @refs.setter
    def refs(self, tensors: Sequence[torch.Tensor]) -> None:
        # Validated in full before anything is stored: a failed assignment changes nothing.
        tensors = [_check_tensor(t, f"refs[{i}]").detach() for i, t in enumerate(tensors)]
        if len(tensors) != len(self.layer_names):
            raise ValueError(f"refs has {len(tensors)} tensors for {len(self.layer_names)} layers")
        weights = self.weights()
        refs = [t.to(device=w.device, dtype=w.dtype) for t, w in zip(tensors, weights,
                                                                      strict=True)]
        self._refs = _checked_refs(self.layer_names, weights, refs)

    @property
    def lam(self) -> float:
        return self.objective.lam

    @property
    def form(self) -> str:
        return self.objective.form

    @property
    def statistic(self) -> str:
        return self.objective.statistic

    @property
    def block_size(self) -> int | None:
        return self.objective.block_size

    @property
    def zero_tol(self) -> float | None:
        return self.objective.zero_tol

    @property
    def similarity(self) -> bool:
        return self.objective.similarity

    def _needs_refs(self) -> bool:
        """Whether Eq. 4 is part of the value: only then is ``W_prev`` read (or refreshed)."""
        return self.objective.needs_refs

    def __call__(self) -> torch.Tensor:
        weights = self.weights()
        needs_refs = self._needs_refs()
        refs = _checked_refs(self.layer_names, weights, self._refs) if needs_refs else None
        value = growth_objective(weights, refs, objective=self.objective)
        if self.anchor == "previous" and needs_refs:
            self._refs = [w.detach().clone() for w in weights]
        return value * self.strength if self.strength != 1.0 else value

    @torch.no_grad()
    def decorrelate(self, steps: int, lr: float, *, step: str = "relative") -> None:
        """The weight-only reading: ``steps`` gradient steps on ``strength * Eq. 5``, in place.

        Uses :func:`simcore.decorrelate` (the core's gradient) on the chosen
        weights with the stored snapshot as ``W_prev`` and this penalty's
        ``anchor``; the parameters keep their identity (optimizers still hold
        them) and only their values change. ``step="relative"`` (default) sizes
        each step relative to the rows' norms, so ``lr`` has the same effect at
        any weight scale; ``step="absolute"`` is plain gradient descent
        (:data:`simcore.STEPS`).
        """
        steps = check_int(steps, "steps", minimum=0)
        lr = check_real(lr, "lr")  # > 0 is the core's check; refused here before any early return
        check_choice(step, simcore.STEPS, "step")
        weights = self.weights()
        needs_refs = self._needs_refs()
        refs = _checked_refs(self.layer_names, weights, self._refs) if needs_refs else None
        if steps == 0 or self.strength == 0.0:
            return
        new = _eager(simcore.decorrelate)(
            [w.detach() for w in weights], refs, steps=steps, lr=lr * self.strength,
            objective=self.objective, anchor=self.anchor, step=step,
        )
        for w, value in zip(weights, new, strict=True):
            w.copy_(value)
        if self.anchor == "previous" and needs_refs:
            self._refs = [w.detach().clone() for w in weights]


def _checked_refs(names, weights, refs) -> list[torch.Tensor]:
    """``refs`` after checking each has its layer's current shape (growth needs a snapshot)."""
    for name, w, ref in zip(names, weights, refs, strict=True):
        if ref.shape != w.shape:
            raise ValueError(
                f"layer {name!r} has shape {tuple(w.shape)} but its snapshot has "
                f"{tuple(ref.shape)}: call snapshot() after growing the model"
            )
    return refs
