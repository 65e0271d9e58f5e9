"""``simcore grow``: the paper's experiment — grow a network while training, with or without
the similarity phase, and report accuracy, training time, N and parameters like its Tables 1-3.

Modules: :mod:`.config` (a run's choices and the presets), :mod:`.data` (bundled digits,
local CIFAR through a restricted unpickler, augmentation), :mod:`.terms` (the post-growth
phase for each term of the ablation), :mod:`.runner` (one run, checkpointed and resumable),
:mod:`.compare` (several runs and their table), :mod:`.fingerprint` (which code made a run:
earlier runs are reused only when it matches), :mod:`.report` (JSON, CSV, tables),
:mod:`.figures` and :mod:`.gradcam` (the paper's Fig. 4 and Fig. 6), :mod:`.cli` (the
``grow`` subcommand's arguments).
"""

from .config import METHODS, MODELS, PRESETS, TERMS, RunConfig, preset
from .data import (
    ImageDataset,
    RestrictedUnpickler,
    UnsafePickleError,
    load_cifar,
    load_dataset,
    load_digits_dataset,
)
from .gradcam import grad_cam
from .runner import Hooks, RunInterrupted, load_model, run_one

__all__ = [
    "METHODS", "MODELS", "PRESETS", "TERMS", "Hooks", "ImageDataset", "RestrictedUnpickler",
    "RunConfig", "RunInterrupted", "UnsafePickleError", "grad_cam", "load_cifar", "load_dataset",
    "load_digits_dataset", "load_model", "preset", "run_experiment", "run_one",
]


def run_experiment(*args, **kwargs):
    """See :func:`simcore.experiment.compare.run_experiment`."""
    from .compare import run_experiment as run  # matplotlib is imported only when needed

    return run(*args, **kwargs)
