"""Conformance kit: check that simcore runs correctly on an Array-API backend.

Importing it imports no framework (torch, JAX and CuPy are detected when a
backend is first asked for). What it offers:

* a backend registry: :func:`available_backends` (honours the environment
  variable ``SIMCORE_TEST_BACKENDS``), :func:`get_backend`, :class:`Backend`,
  :func:`backend_for_namespace` (wraps any Array-API namespace). Setting up
  the JAX backends turns on ``jax_enable_x64`` process-wide (float64 tests);
* :func:`assert_close`, which checks namespace, dtype, shape and device before
  values, with per-dtype :data:`TOLERANCES`;
* :mod:`simcore.testing.strategies`: Hypothesis strategies drawing NumPy inputs,
  plus :func:`~simcore.testing.strategies.given_for` (per-backend example
  budgets) and size helpers that keep JAX from recompiling (imported lazily:
  Hypothesis is only needed by those who use them);
* :func:`check_backend`, which runs every public core function on fixed inputs
  against :mod:`simcore.reference` (the ``simcore check`` command prints it).

>>> from simcore.testing import get_backend
>>> get_backend("numpy").dtypes
('float32', 'float64', 'float16')
"""

from __future__ import annotations

import importlib
from typing import Any

from ._assertions import TOLERANCES, Tolerance, assert_close, max_error, tolerance_for
from ._backends import (
    BACKEND_NAMES,
    ENV_VAR,
    Backend,
    BackendUnavailableError,
    available_backends,
    backend_for_namespace,
    get_backend,
)
from ._check import CheckResult, check_backend

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "TOLERANCES",
    "Backend",
    "BackendUnavailableError",
    "CheckResult",
    "Tolerance",
    "assert_close",
    "available_backends",
    "backend_for_namespace",
    "check_backend",
    "get_backend",
    "max_error",
    "strategies",
    "tolerance_for",
]


def __getattr__(name: str) -> Any:
    # Hypothesis is a test dependency: load the strategies module only when asked for.
    if name == "strategies":
        module = importlib.import_module(".strategies", __name__)
        globals()["strategies"] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
