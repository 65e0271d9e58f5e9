"""The code fingerprint: which version of simcore produced a run.

A finished run is reused, and an interrupted one resumed, only when both its settings
(:meth:`.config.RunConfig.training_key`) and the code that ran it match: a change to, say, the
loss kernel changes the numbers, and a result of the old code must not be shown as this code's.
The fingerprint is a short hash of the Python source of the installed ``simcore`` package,
``simcore.adapters`` and ``simcore.reference`` included (they install from the top-level
``adapters/`` and ``reference/`` folders: see ``pyproject.toml``), so it is the same for a
wheel and for an editable install of the same source, on any machine and in any checkout.

It hashes every file, docstrings and comments included: a docs-only edit changes it too
(``simcore grow --reuse-runs-from-other-code`` is the way out when a change is known not to
matter).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Mapping
from pathlib import Path

__all__ = ["FINGERPRINT_LENGTH", "code_fingerprint", "package_roots", "source_fingerprint"]

#: Hex digits kept: 48 bits, enough that two versions of one project never collide by chance.
FINGERPRINT_LENGTH = 12


def _package_files(root: Path) -> list[Path]:
    """The ``.py`` files of the package at ``root`` and of its subpackages (folders with an
    ``__init__.py``, as setuptools installs them), caches and stray folders left out."""
    files = sorted(root.glob("*.py"))
    for child in sorted(root.iterdir()):
        if child.is_dir() and (child / "__init__.py").is_file():
            files += _package_files(child)
    return files


def source_fingerprint(roots: Mapping[str, Path]) -> str:
    """A hash of the source under ``roots``: {installed name (``"simcore/adapters"``): folder}.

    Each file enters as its installed path (name + path inside the folder, ``/``-separated) and
    its contents with line endings made ``\\n``, in sorted order: the hash does not depend on
    where the folders are, on the order the file system lists them, or on a checkout's line
    endings. A file reached through two roots (a wheel keeps ``simcore/adapters`` inside
    ``simcore``) counts once.
    """
    files: dict[str, Path] = {}
    for name, root in roots.items():
        root = Path(root)
        if not (root / "__init__.py").is_file():
            raise ValueError(f"{root} is not a package folder (no __init__.py)")
        for path in _package_files(root):
            files[f"{name}/{path.relative_to(root).as_posix()}"] = path
    digest = hashlib.sha256()
    for installed in sorted(files):
        contents = files[installed].read_bytes().replace(b"\r\n", b"\n")
        digest.update(f"{installed}\0{len(contents)}\0".encode())
        digest.update(contents)
    return digest.hexdigest()[:FINGERPRINT_LENGTH]


def package_roots() -> dict[str, Path]:
    """Where the installed ``simcore``, ``simcore.adapters`` and ``simcore.reference`` live
    (found without importing the adapters, which would import their frameworks)."""
    roots = {}
    for module in ("simcore", "simcore.adapters", "simcore.reference"):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"cannot locate the installed package {module}")
        roots[module.replace(".", "/")] = Path(list(spec.submodule_search_locations)[0])
    return roots


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The fingerprint of the installed simcore (:func:`source_fingerprint` of
    :func:`package_roots`), computed once per process from the files on disk."""
    return source_fingerprint(package_roots())
