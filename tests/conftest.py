"""Shared fixtures: backends (and backend x dtype pairs) and Hypothesis profiles.

``SIMCORE_TEST_BACKENDS=torch,jax`` restricts the backends; a backend named
there that cannot be used makes collection fail (see ``simcore.testing``).
Hypothesis profile ``ci`` (derandomised, no deadline: ``jax.jit`` compiles on
first call) is loaded when the environment variable ``CI`` is set, ``dev``
otherwise; ``HYPOTHESIS_PROFILE`` picks one explicitly.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from simcore.testing import available_backends

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=12,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=12,
    suppress_health_check=[HealthCheck.too_slow],
)
_DEFAULT_PROFILE = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or _DEFAULT_PROFILE)

_BACKENDS = available_backends()
_FULL = ("float32", "float64")
_PAIRS = [(b, d) for b in _BACKENDS for d in b.dtypes if d in _FULL]
_HALF_PAIRS = [(b, d) for b in _BACKENDS for d in b.dtypes if d not in _FULL]


@pytest.fixture(scope="session", params=_BACKENDS, ids=[b.name for b in _BACKENDS])
def backend(request):
    """One :class:`simcore.testing.Backend` (numpy, array_api_strict, torch, jax, jax_jit, ...)."""
    return request.param


@pytest.fixture(scope="session", params=_PAIRS, ids=[f"{b.name}-{d}" for b, d in _PAIRS])
def backend_dtype(request):
    """``(backend, dtype name)`` for every backend in float32 and float64."""
    return request.param


@pytest.fixture(
    scope="session", params=_HALF_PAIRS, ids=[f"{b.name}-{d}" for b, d in _HALF_PAIRS]
)
def backend_half(request):
    """``(backend, dtype name)`` for every backend's float16/bfloat16 (looser tolerances)."""
    return request.param


@pytest.fixture
def torch_one_thread():
    """Run a test with one torch thread: on a loaded 2-core machine multi-threaded LAPACK
    (SSD's eigh) and small convolutions slow down many times over."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
