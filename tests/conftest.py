"""Shared fixtures: backends (and backend x dtype pairs) and Hypothesis profiles.

``SIMCORE_TEST_BACKENDS=torch,jax`` restricts the backends; a backend named
there that cannot be used makes collection fail (see ``simcore.testing``).
Hypothesis profile ``ci`` (derandomised, no deadline: ``jax.jit`` compiles on
first call) is loaded when the environment variable ``CI`` is set, ``dev``
otherwise; ``HYPOTHESIS_PROFILE`` picks one explicitly.

Two tiers: tests marked ``@pytest.mark.slow`` (long end-to-end runs, the biggest
parametrisations) are left out of a plain ``pytest`` run, which covers every backend and
module within a few minutes on 2 CPU cores; ``SIMCORE_FULL_TESTS=1`` (or any ``-m``
expression, e.g. ``-m slow``) runs them too. ``@pytest.mark.slow_if(when=predicate)`` marks
only the parametrised cases whose ``callspec.params`` satisfy ``predicate`` slow (e.g. the
JAX cases of a parametrisation whose other backends run every case in the fast tier).
Hypothesis draws half as many examples per property in the fast tier as with
``SIMCORE_FULL_TESTS=1``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from simcore.testing import available_backends

#: Examples per property (JAX backends get a sixth, at least 2: see
#: ``simcore.testing.strategies.given_for``); the full tier draws twice the fast tier's.
FULL_TIER = os.environ.get("SIMCORE_FULL_TESTS") == "1"
MAX_EXAMPLES = 12 if FULL_TIER else 6

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=MAX_EXAMPLES,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=MAX_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow],
)
_DEFAULT_PROFILE = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or _DEFAULT_PROFILE)

_BACKENDS = available_backends()
_FULL = ("float32", "float64")
_PAIRS = [(b, d) for b in _BACKENDS for d in b.dtypes if d in _FULL]
_HALF_PAIRS = [(b, d) for b in _BACKENDS for d in b.dtypes if d not in _FULL]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow_if(when): mark slow the parametrised cases whose callspec.params "
        "satisfy when(params)")


# First, so that ``-m slow`` / ``-m 'not slow'`` see the marks ``slow_if`` adds.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Leave out the slow tier unless ``SIMCORE_FULL_TESTS=1`` or ``-m`` chooses."""
    for item in items:
        for mark in item.iter_markers("slow_if"):
            if mark.kwargs["when"](item.callspec.params):
                item.add_marker(pytest.mark.slow)
    if FULL_TIER or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_report_header(config):
    full = FULL_TIER or config.getoption("markexpr")
    return ("tier: full (slow tests included)" if full else
            "tier: fast (tests marked slow left out; SIMCORE_FULL_TESTS=1 runs them)")


# Function scope (the fixtures only hand out a parameter): session-scoped parametrised
# fixtures make pytest regroup the tests by parameter, listing each file several times.
@pytest.fixture(params=_BACKENDS, ids=[b.name for b in _BACKENDS])
def backend(request):
    """One :class:`simcore.testing.Backend` (numpy, array_api_strict, torch, jax, jax_jit, ...)."""
    return request.param


@pytest.fixture(params=_PAIRS, ids=[f"{b.name}-{d}" for b, d in _PAIRS])
def backend_dtype(request):
    """``(backend, dtype name)`` for every backend in float32 and float64."""
    return request.param


@pytest.fixture(params=_HALF_PAIRS, ids=[f"{b.name}-{d}" for b, d in _HALF_PAIRS])
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
