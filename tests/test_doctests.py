"""Every docstring example in the installed package runs and prints what it says.

``doctest.testmod`` on the imported modules, not ``--doctest-modules``: pytest's
importlib mode would import each file a second time, under another name, and
break ``isinstance`` checks between the two copies.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import simcore.reference

import simcore

# Framework glue is documented by its own tests; __main__ would run the CLI on import.
SKIPPED = ("simcore.adapters", "simcore.__main__")


def _core_modules():
    # Walked separately: under an editable install simcore.reference lives in its own folder.
    names = {"simcore", "simcore.reference"}
    for package in (simcore, simcore.reference):
        for info in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + "."):
            if not info.name.startswith(SKIPPED):
                names.add(info.name)
    return sorted(names)


MODULES = _core_modules()


def test_core_modules_were_found():
    assert {"simcore.similarity", "simcore.growth.widen", "simcore.reference.similarity"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
