"""The README tells the truth: its examples run and CI runs its test command."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_the_two_commands():
    commands = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL).group(1).splitlines()
    main_job, tests = commands[:2]
    assert "simcore " in main_job
    assert "-m pytest -n auto" in tests  # every core: the tier's minutes are measured so
    assert README.index("```bash") < README.index("## ")


def test_ci_runs_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '([^']+)' README.md", script).group(1)
    found = [line for line in README.splitlines() if re.search(pattern, line)]
    assert found and "-m pytest" in found[0]
    assert 'eval "$test_command"' in script
    assert 'SIMCORE_FULL_TESTS=1 eval "$test_command"' in script  # CI runs the slow tier too


def test_ci_lints_and_type_checks_before_the_tests():
    script = (ROOT / ".ci" / "run").read_text()
    tests_at = script.index('eval "$test_command"')
    lint_at = script.index("\nruff check simcore adapters reference tests benchmarks examples\n")
    assert lint_at < tests_at and script.index("\nmypy\n") < tests_at


BLOCK_IDS = [f"block{i}" for i in range(len(PYTHON_BLOCKS))]


def _imports(block):
    return re.findall(r"^import (\w+)", block, flags=re.MULTILINE)


def _run_block(block, directory):
    directory.mkdir()
    script = directory / "example.py"
    script.write_text(block)
    return subprocess.run(
        [sys.executable, str(script)], cwd=directory, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def block_runs(request, tmp_path_factory):
    """Each collected README block running in its own interpreter, two at a time.

    The blocks spend most of their time importing torch or jax and compiling, on one core
    each, so the second core of a 2-core machine halves the wait; every block still runs
    alone in a fresh interpreter and a fresh directory.
    """
    wanted = [item.callspec.params["block"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_readme_python_example_runs"]
    runnable = [block for block in dict.fromkeys(wanted)
                if all(importlib.util.find_spec(module) for module in _imports(block))]
    root = tmp_path_factory.mktemp("readme")
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {block: pool.submit(_run_block, block, root / f"block{i}")
                for i, block in enumerate(runnable)}
        yield runs
        pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=BLOCK_IDS)
def test_readme_python_example_runs(block, block_runs):
    for module in _imports(block):
        pytest.importorskip(module)
    result = block_runs[block].result()
    assert result.returncode == 0, result.stderr


def test_the_slow_tier_is_left_out_by_default_and_switched_on_by_one_variable():
    def collect(full):
        # The numpy backend alone: the tiers do not depend on the backends, and collecting
        # without importing torch and jax takes a second instead of five.
        env = {k: v for k, v in os.environ.items() if k != "SIMCORE_FULL_TESTS"}
        env["SIMCORE_TEST_BACKENDS"] = "numpy"
        if full:
            env["SIMCORE_FULL_TESTS"] = "1"
        return subprocess.Popen(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
             "tests/test_packaging.py"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT, env=env)

    def collected(process):
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stdout + stderr
        return [line for line in stdout.splitlines() if "::" in line]

    fast_run, full_run = collect(False), collect(True)  # both at once
    fast, full = collected(fast_run), collected(full_run)
    slow = set(full) - set(fast)
    assert slow and set(fast) < set(full)
    assert all("wheel" in test for test in slow)  # the one test marked slow in that file
