"""Module boundaries of the adapters, read from the source (no framework is imported).

The torch growth modules talk to each other through public names only: the growers and the
host use ``apply_growths``/``GrowthTransaction``, never the swaps behind them, and only the
surgery imports the module that plans those swaps.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_imports import resolve  # noqa: E402

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
SWAP_PLANNER = "simcore.adapters.torch.surgery_swaps"
GUARDED = {"simcore.adapters.torch.surgery", SWAP_PLANNER}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ADAPTERS).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("simcore", "adapters", *parts))


def _private_uses(path: Path) -> list[str]:
    """Private names of a guarded module that ``path`` imports or reads as an attribute."""
    module = _module_name(path)
    if module in GUARDED:
        return []
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = set()  # local names bound to a guarded module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(module, path.name == "__init__.py", node)
            for alias in node.names:
                if source in GUARDED and alias.name.startswith("_"):
                    found.append(f"{source}.{alias.name}")
                if f"{source}.{alias.name}" in GUARDED:
                    aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in GUARDED and alias.asname:
                    aliases.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


SOURCES = sorted(ADAPTERS.rglob("*.py"))


def test_the_adapters_were_found():
    assert ADAPTERS / "torch" / "surgery.py" in SOURCES
    assert len(SOURCES) > 10


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ADAPTERS)))
def test_no_adapter_module_uses_a_private_name_of_the_surgery(path):
    assert _private_uses(path) == []


def _imports_swap_planner(path: Path) -> bool:
    module = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(module, path.name == "__init__.py", node)
            if SWAP_PLANNER in (source, *(f"{source}.{alias.name}" for alias in node.names)):
                return True
        elif isinstance(node, ast.Import):
            if any(alias.name == SWAP_PLANNER for alias in node.names):
                return True
    return False


def test_only_the_surgery_imports_the_planning_of_its_swaps():
    importers = [_module_name(path) for path in SOURCES if _imports_swap_planner(path)]
    assert importers == ["simcore.adapters.torch.surgery"]


def test_the_check_sees_a_private_import(tmp_path, monkeypatch):
    fake = ADAPTERS / "torch" / "probe.py"
    monkeypatch.setattr(Path, "read_text", lambda self: (
        "from .surgery import _commit\nfrom . import surgery\nsurgery._undo([])\n"))
    assert _private_uses(fake) == ["simcore.adapters.torch.surgery._commit", "surgery._undo"]
