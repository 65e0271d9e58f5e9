"""Shared fixtures: the ``backend`` fixture over every available backend, Hypothesis profiles.

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
    max_examples=15,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=15,
    suppress_health_check=[HealthCheck.too_slow],
)
_DEFAULT_PROFILE = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or _DEFAULT_PROFILE)

_BACKENDS = available_backends()


@pytest.fixture(params=_BACKENDS, ids=[b.name for b in _BACKENDS])
def backend(request):
    """One :class:`simcore.testing.Backend` (numpy, array_api_strict, torch, jax, jax_jit, ...)."""
    return request.param
