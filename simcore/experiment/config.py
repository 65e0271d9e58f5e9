"""What one ``simcore grow`` run does: :class:`RunConfig`, and the ``quick`` and ``paper`` presets.

A run is one model grown by one method with one choice of similarity terms
and one seed. ``terms`` names the post-growth objective (the paper's Table 3
ablation): ``"none"`` (the baseline: no similarity phase), ``"eq2"`` (the
similarity loss alone, ``lam = 0``), ``"eq4"`` (the weight-sum term alone),
``"both"`` (Eq. 5, the paper's method, "+ours") and ``"control"`` (a random
perturbation of the grown layers as large as the phase's change: it separates
decorrelation from perturbation noise).

>>> config = preset("quick").replace(method="ssd", seed=3)
>>> config.method, config.seed, config.dataset
('ssd', 3, 'digits')
>>> config.phase_steps_or_default
10
>>> RunConfig.from_dict(config.to_dict()) == config
True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from simcore import ANCHORS, FORMS, STEPS
from simcore.adapters.torch.schedule import (
    DEFAULT_PHASE_LAM,
    DEFAULT_PHASE_LR,
    DEFAULT_PHASE_STEPS,
    PHASES,
)
from simcore.extend import check_choice, check_int
from simcore.growth import UNITS

__all__ = ["EPOCH_SECONDS", "FRAMEWORKS", "METHODS", "MODELS", "PRESETS", "PRESET_SEEDS",
           "PRESET_TERMS", "TERMS", "TERM_LABELS", "RunConfig", "estimate_seconds", "preset"]

MODELS = ("vgg16", "mobilenet_v1")
METHODS = ("random", "ssd", "firefly")
#: The ablation of the two terms of Eq. 5 (the paper's Table 3), "none" being the baseline.
TERMS = ("none", "eq2", "eq4", "both", "control")
#: How figures and reports name each choice of ``terms``.
TERM_LABELS = {"none": "baseline", "eq2": "Eq. 2 only", "eq4": "Eq. 4 only", "both": "+ours",
               "control": "+control"}
LR_SCHEDULES = ("cosine", "constant")
#: The frameworks a run trains with: PyTorch (:mod:`.runner`) or JAX/Flax (:mod:`.jax_runner`).
FRAMEWORKS = ("torch", "jax")


def _int(value: Any, name: str, minimum: int) -> int:
    return check_int(value, name, minimum=minimum)


def _float(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {kind} number, got {value}")
    return value


@dataclass(frozen=True)
class RunConfig:
    """Every choice of one run; validated on construction, stored in its checkpoint and results."""

    # model and growth
    model: str = "vgg16"
    width: int | None = None          # seed width; None: the paper's (VGG16 16, MobileNetV1 32)
    method: str = "firefly"
    ssd_mode: str = "exact"           # SSD: splitting matrices formed ("exact") or HVPs ("fast")
    ratio: float = 0.35
    unit: str = "neurons"
    grow_every: int = 50              # grow after every ``grow_every`` epochs of training
    max_growths: int = 4
    growth_batches: int = 4           # batches SSD/Firefly use to score candidates
    firefly_candidates: int = 70      # new-neuron candidates per layer (Firefly's reference: 70)
    # similarity phase
    terms: str = "both"
    phase: str = "weights_only"
    phase_steps: int | None = None    # N; None: the paper's best N for the method
    phase_step: str = "relative"      # how a phase step is sized (simcore.STEPS)
    phase_lr: float | None = None     # None: DEFAULT_PHASE_LR[phase_step]
    lam: float | None = None          # None: DEFAULT_PHASE_LAM[phase_step]
    form: str = "squared_log"
    anchor: str = "snapshot"
    # training
    epochs: int = 250
    batch_size: int = 128
    lr: float = 0.1
    lr_schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # data
    dataset: str = "cifar10"
    data_root: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    val_fraction: float = 0.0         # share of the training images held out for validation
    data_seed: int = 0
    # run
    seed: int = 0
    device: str = "cpu"
    framework: str = "torch"          # "jax": the Flax seed, optax and simcore.adapters.jax

    def __post_init__(self):
        check_choice(self.model, MODELS, "model")
        if self.width is not None:
            _int(self.width, "width", 1)
        check_choice(self.method, METHODS, "method")
        check_choice(self.ssd_mode, ("exact", "fast"), "ssd_mode")
        _float(self.ratio, "ratio", positive=True)
        check_choice(self.unit, UNITS, "unit")
        _int(self.grow_every, "grow_every", 1)
        _int(self.max_growths, "max_growths", 0)
        _int(self.growth_batches, "growth_batches", 1)
        _int(self.firefly_candidates, "firefly_candidates", 0)
        check_choice(self.terms, TERMS, "terms")
        check_choice(self.phase, PHASES, "phase")
        if self.phase_steps is not None:
            _int(self.phase_steps, "phase_steps", 0)
        check_choice(self.phase_step, STEPS, "phase_step")
        if self.phase_lr is not None:
            _float(self.phase_lr, "phase_lr", positive=True)
        if self.phase_step == "relative" and not self.phase_lr_or_default * (
                self.lam_or_default) < 2.0:
            raise ValueError(
                f"phase_lr * lam = {self.phase_lr_or_default * self.lam_or_default:g}: each "
                f"relative phase step removes a fraction phase_lr * lam of the scale drift, so "
                f"it must be below 2 (lower --phase-lr or --lam)")
        if self.terms == "control" and self.phase != "weights_only":
            raise ValueError("terms 'control' (a random perturbation as large as the phase's "
                             "change) needs phase 'weights_only'")
        if self.lam is not None:
            _float(self.lam, "lam")
        check_choice(self.form, FORMS, "form")
        check_choice(self.anchor, ANCHORS, "anchor")
        _int(self.epochs, "epochs", 1)
        _int(self.batch_size, "batch_size", 1)
        _float(self.lr, "lr", positive=True)
        check_choice(self.lr_schedule, LR_SCHEDULES, "lr_schedule")
        if _float(self.momentum, "momentum") >= 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum}")
        _float(self.weight_decay, "weight_decay")
        check_choice(self.dataset, ("digits", "cifar10", "cifar100"), "dataset")
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise TypeError(f"data_root must be a str or None, got {type(self.data_root).__name__}")
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                _int(getattr(self, name), name, 1)
        if _float(self.val_fraction, "val_fraction") >= 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        _int(self.data_seed, "data_seed", 0)
        _int(self.seed, "seed", 0)
        if not isinstance(self.device, str) or not self.device:
            raise TypeError(f"device must be a device name such as 'cpu' or 'cuda', "
                            f"got {self.device!r}")
        check_choice(self.framework, FRAMEWORKS, "framework")
        if self.framework == "jax" and self.phase == "joint" and self.phase_step == "absolute":
            raise ValueError("framework 'jax' runs the joint phase with relative steps only "
                             "(decoupled from the optimizer): use phase_step 'relative' or "
                             "phase 'weights_only'")

    @property
    def phase_steps_or_default(self) -> int:
        """N: ``phase_steps`` or the paper's best N for the method (its Tables 1-3, N_best)."""
        return DEFAULT_PHASE_STEPS[self.method] if self.phase_steps is None else self.phase_steps

    @property
    def phase_lr_or_default(self) -> float:
        """The phase's step size: ``phase_lr`` or the default for ``phase_step``."""
        return DEFAULT_PHASE_LR[self.phase_step] if self.phase_lr is None else self.phase_lr

    @property
    def lam_or_default(self) -> float:
        """lambda of Eq. 4: ``lam`` or the default for ``phase_step``."""
        return DEFAULT_PHASE_LAM[self.phase_step] if self.lam is None else self.lam

    @property
    def seed_width(self) -> int:
        return self.width if self.width is not None else (16 if self.model == "vgg16" else 32)

    @property
    def label(self) -> str:
        """A short unique name of the run, used for its folder: ``vgg16-firefly-both-seed0``.

        An explicit ``phase_steps`` (an N sweep) adds ``-N<steps>``, a JAX run ``-jax`` (so
        the two frameworks' runs can share an output folder).
        """
        label = f"{self.model}-{self.method}-{self.terms}-seed{self.seed}"
        if self.phase_steps is not None and self.terms != "none":
            label += f"-N{self.phase_steps}"
        if self.framework != "torch":
            label += f"-{self.framework}"
        return label

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown RunConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict, got {type(values).__name__}")
        return cls().replace(**values)

    def training_key(self) -> dict[str, Any]:
        """The fields that decide the numbers a run produces (``device`` excluded).

        A checkpoint resumes only a run with the same key; a different device
        is allowed (the result may then differ in the last bits). ``framework`` is in the key
        only when it is not the default, so results written before the field existed still
        match their PyTorch runs.
        """
        key = self.to_dict()
        key.pop("device")
        if key["framework"] == "torch":
            key.pop("framework")
        return key


#: The presets: ``quick`` (digits on 2 CPU cores, about two minutes for its five seeds) and
#: ``paper`` (CIFAR-10 as in the paper: 250 epochs, a growth every 50, SGD momentum 0.9, cosine
#: lr, batch 128).
PRESETS: dict[str, dict[str, Any]] = {
    # Firefly scores 16 new-neuron candidates per layer instead of 70: its growth then takes
    # seconds, not a minute, on a CPU (the budget and the selection rule are unchanged).
    # 8 epochs with growths after epochs 2, 4 and 6 reach about 98% on the digits; a tenth of
    # the training images is held out for validation (N sweeps choose on it).
    "quick": dict(dataset="digits", epochs=8, grow_every=2, max_growths=3, batch_size=64,
                  lr=0.05, weight_decay=5e-4, growth_batches=1, firefly_candidates=16,
                  val_fraction=0.1, device="cpu"),
    "paper": dict(dataset="cifar10", data_root="data", epochs=250, grow_every=50, max_growths=4,
                  batch_size=128, lr=0.1, weight_decay=5e-4, growth_batches=4,
                  val_fraction=0.1, device="auto"),
}


#: The seeds each preset runs unless told otherwise.
PRESET_SEEDS: dict[str, tuple[int, ...]] = {"quick": (0, 1, 2, 3, 4), "paper": (0, 1, 2)}
#: The similarity terms each preset runs by default: the baseline, the paper's method and,
#: where runs are cheap, the perturbation control.
PRESET_TERMS: dict[str, tuple[str, ...]] = {"quick": ("none", "both", "control"),
                                            "paper": ("none", "both")}


#: Measured wall time of one epoch of one run, in seconds, and the training images it was
#: measured on, per (dataset, model) with the paper's seed width, on a 2-core CPU with one
#: torch thread per run and two runs at a time: the quick preset's 15 runs of 8 epochs took
#: 117 s, about 13 s per run (growths, phases and evaluation included).
EPOCH_SECONDS: dict[tuple[str, str], tuple[float, int]] = {("digits", "vgg16"): (1.6, 1212)}


def estimate_seconds(config: RunConfig, epochs: int, train_images: int,
                     jobs: int = 1) -> float | None:
    """Rough wall time of ``epochs`` epochs (summed over runs) of ``config``'s dataset and model
    at ``jobs`` runs at a time, scaled from :data:`EPOCH_SECONDS` by the training images;
    ``None`` where no cost was measured (another dataset or model, a GPU, or JAX).

    >>> round(estimate_seconds(preset("quick"), 15 * 8, 1212, jobs=2))
    96
    """
    measured = EPOCH_SECONDS.get((config.dataset, config.model))
    if measured is None or config.device not in ("cpu",) or config.framework != "torch":
        return None
    seconds, images = measured
    return seconds * epochs * (train_images / images) / max(1, jobs)


def preset(name: str) -> RunConfig:
    """The :class:`RunConfig` of preset ``name`` (``"quick"`` or ``"paper"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
    return RunConfig(**PRESETS[name])
