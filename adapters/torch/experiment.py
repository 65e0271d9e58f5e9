"""Deprecated: ``simcore grow`` moved to :mod:`simcore.experiment`; this alias goes next release.

Only the package's top-level names are forwarded (each access warns with a
``DeprecationWarning``); its submodules (``.runner``, ``.data``, ...) are now
``simcore.experiment.runner`` and so on.
"""

from __future__ import annotations

from typing import Any

from simcore.extend import warn_deprecated


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    import simcore.experiment as experiment  # lazily: it is the application, not the adapter

    if name not in experiment.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warn_deprecated(f"simcore.adapters.torch.experiment.{name}", f"simcore.experiment.{name}")
    return getattr(experiment, name)


def __dir__() -> list[str]:
    import simcore.experiment as experiment

    return sorted(experiment.__all__)
