"""Deprecated names kept for one release: one warning, one wording, everywhere."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (``DeprecationWarning``)."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed_choice(value: Any, renamed: Mapping[str, str], name: str, *,
                   stacklevel: int = 4) -> Any:
    """``value``, or its new spelling (with a ``DeprecationWarning``) if it is an old one."""
    if isinstance(value, str) and value in renamed:
        warn_deprecated(f"{name}={value!r}", f"{name}={renamed[value]!r}", stacklevel=stacklevel)
        return renamed[value]
    return value
