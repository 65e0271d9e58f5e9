"""The wheel ships every module under the ``simcore`` name, and each imports from the wheel.

The repository's flat layout lets ``simcore/`` in the checkout shadow the
installed package, so this builds a real wheel (from a copy of the sources,
keeping build artefacts out of the checkout), unpacks it, and imports every
module from there in a fresh interpreter whose working directory is outside the
repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Source folder -> import name, as pyproject.toml's package-dir maps them.
SOURCE_PACKAGES = {"simcore": "simcore", "adapters": "simcore/adapters",
                   "reference": "simcore/reference"}
FRAMEWORKS = ("torch", "jax", "cupy", "flax", "equinox", "optax")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel once from a copy of the sources; return its path."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".*")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    for folder in SOURCE_PACKAGES:
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)],
        cwd=source, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [built] = out.glob("simcore-*.whl")
    return built


def _expected_modules():
    """Wheel paths of every .py file under simcore/, adapters/ and reference/ in the checkout."""
    expected = set()
    for folder, target in SOURCE_PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            relative = path.relative_to(REPO / folder)
            if folder == "simcore" and relative.parts[0] in ("adapters", "reference"):
                continue  # not a real clash today, but these names belong to the other folders
            expected.add(f"{target}/{relative.as_posix()}")
    return expected


def test_wheel_contains_every_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = sorted(_expected_modules() - names)
    assert not missing, f"modules missing from the wheel (add the package to pyproject): {missing}"
    assert not any(n.split("/")[0] in ("adapters", "reference", "tests", "benchmarks")
                   for n in names), "a top-level name other than simcore is shipped"
    assert "simcore/py.typed" in names, "the PEP 561 marker is missing (package-data)"
    # The application is its own package; the adapter keeps only a deprecated alias module.
    assert "simcore/experiment/runner.py" in names
    assert not any(n.startswith("simcore/adapters/torch/experiment/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "simcore = simcore.cli:main" in archive.read(entry_points).decode()


@pytest.mark.slow  # long: see tests/conftest.py for the two tiers
def test_every_module_imports_from_the_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    modules = sorted(
        ".".join(Path(name).with_suffix("").parts).removesuffix(".__init__")
        for name in _expected_modules()
        if not name.endswith("__main__.py")
    )
    absent = [m for m in FRAMEWORKS if importlib.util.find_spec(m) is None]
    code = f"""
import importlib, json, sys
report = {{}}
for name in {modules!r}:
    try:
        module = importlib.import_module(name)
        report[name] = ["ok", module.__file__]
    except ImportError as err:  # includes ModuleNotFoundError
        report[name] = ["missing", str(err.name) + " " + str(err)]
    except Exception as err:
        report[name] = ["error", repr(err)]
print(json.dumps(report))
"""
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("SIMCORE_TEST_BACKENDS", None)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    problems = {}
    for name, (status, detail) in report.items():
        if status == "ok":
            if not Path(detail).resolve().is_relative_to(site.resolve()):
                problems[name] = f"imported from {detail}, not from the wheel"
        elif status == "missing" and any(f in detail.lower() for f in absent):
            continue  # an adapter for a framework this machine does not have
        else:
            problems[name] = f"{status}: {detail}"
    assert not problems, problems
    assert report["simcore"][0] == "ok" and report["simcore.testing"][0] == "ok"
