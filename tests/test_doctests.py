"""Every docstring example in the installed package runs and prints what it says.

``doctest.testmod`` on the imported modules, not ``--doctest-modules``: pytest's
importlib mode would import each file a second time, under another name, and
break ``isinstance`` checks between the two copies.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest
import simcore.adapters
import simcore.reference

import simcore

# __main__ would run the CLI on import.
SKIPPED = ("simcore.__main__",)
FRAMEWORKS = ("torch", "jax", "cupy")


def _modules():
    # Walked separately: under an editable install simcore.reference and simcore.adapters
    # live in their own folders.
    names = {"simcore", "simcore.reference", "simcore.adapters"}
    for package in (simcore, simcore.reference, simcore.adapters):
        # onerror: a framework-specific subpackage whose framework is missing is
        # reported by its own test below, not here.
        walk = pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".",
                                     onerror=lambda name: None)
        names.update(info.name for info in walk if not info.name.startswith(SKIPPED))
    return sorted(names)


MODULES = _modules()


def _framework_of(name):
    parts = name.split(".")
    if parts[:2] == ["simcore", "adapters"] and len(parts) > 2 and parts[2] in FRAMEWORKS:
        return parts[2]
    return None


def test_modules_were_found():
    expected = {"simcore.similarity", "simcore.growth.widen", "simcore.reference.similarity",
                "simcore.adapters.torch.schedule", "simcore.adapters.jax"}
    assert expected <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    framework = _framework_of(name)
    if framework is not None and importlib.util.find_spec(framework) is None:
        pytest.skip(f"{name} needs {framework}, which is not installed")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
