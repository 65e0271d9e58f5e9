"""The adapters and the application build on public names only (read from the source).

No module under ``adapters/`` or ``simcore/experiment/`` may import a private ``simcore``
name: a module or attribute whose name starts with ``_`` (dunders such as ``__version__``
excepted), outside its own package. What they need is public in :mod:`simcore.extend`.
Nothing is imported: the check reads the syntax tree.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_imports import resolve  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
#: Source folder -> the package name it installs as.
ROOTS = {REPO / "adapters": "simcore.adapters",
         REPO / "simcore" / "experiment": "simcore.experiment"}


def _module_name(path: Path, root: Path, package: str) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_path(dotted: str) -> bool:
    return any(_is_private(part) for part in dotted.split("."))


def private_imports(source: str, module: str, is_package: bool) -> list[str]:
    """The private ``simcore`` names that ``source`` (the module ``module``) uses."""
    own = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(source)
    found, aliases = [], set()  # aliases: local names bound to a simcore module

    def outside(dotted: str) -> bool:
        """A simcore module outside the importing module's own package."""
        return dotted.split(".")[0] == "simcore" and not (dotted == own
                                                          or dotted.startswith(own + "."))

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source_module = resolve(module, is_package, node)
            if not outside(source_module):
                continue
            if _private_path(source_module):
                found.append(source_module)
                continue
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"{source_module}.{alias.name}")
                else:
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "simcore":
                    continue
                if _private_path(alias.name):
                    found.append(alias.name)
                aliases.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(ast.unparse(node))
    return found


SOURCES = sorted((path, root, package) for root, package in ROOTS.items()
                 for path in root.rglob("*.py"))


def test_the_sources_were_found():
    paths = {path for path, _, _ in SOURCES}
    assert REPO / "adapters" / "cupy.py" in paths
    assert REPO / "simcore" / "experiment" / "runner.py" in paths


@pytest.mark.parametrize("path, root, package", SOURCES,
                         ids=[str(p.relative_to(REPO)) for p, _, _ in SOURCES])
def test_no_private_simcore_name_is_imported(path, root, package):
    module = _module_name(path, root, package)
    assert private_imports(path.read_text(), module, path.name == "__init__.py") == []


@pytest.mark.parametrize("source, expected", [
    ("from simcore._arrays import check_int", ["simcore._arrays"]),
    ("from simcore.similarity import _value_and_grad", ["simcore.similarity._value_and_grad"]),
    ("import simcore._arrays as arrays", ["simcore._arrays"]),
    ("import simcore\nsimcore.similarity._value_and_grad(1)",
     ["simcore.similarity._value_and_grad"]),
    ("from simcore import growth\ngrowth._host", ["growth._host"]),
    ("from simcore.adapters.torch.growers import _param_count",
     ["simcore.adapters.torch.growers._param_count"]),
    ("from ..growers import _param_count", ["simcore.growers._param_count"]),
    ("from .runner import _helper", []),             # its own package
    ("from simcore.extend import check_int\nimport simcore\nsimcore.__version__", []),
    ("import numpy as np\nnp._private", []),          # not simcore
])
def test_the_check_sees_a_private_import(source, expected):
    assert private_imports(source, "simcore.experiment.probe", False) == expected
