"""The README tells the truth: its examples run and CI runs its test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_the_two_commands():
    commands = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL).group(1).splitlines()
    main_job, tests = commands[:2]
    assert "simcore " in main_job
    assert "-m pytest" in tests
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


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=BLOCK_IDS)
def test_readme_python_example_runs(block, tmp_path):
    for module in re.findall(r"^import (\w+)", block, flags=re.MULTILINE):
        pytest.importorskip(module)
    script = tmp_path / "example.py"
    script.write_text(block)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


def test_the_slow_tier_is_left_out_by_default_and_switched_on_by_one_variable():
    def collected(full):
        env = {k: v for k, v in os.environ.items() if k != "SIMCORE_FULL_TESTS"}
        if full:
            env["SIMCORE_FULL_TESTS"] = "1"
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
             "tests/test_packaging.py"], capture_output=True, text=True, cwd=ROOT, env=env,
            timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return [line for line in done.stdout.splitlines() if "::" in line]

    fast, full = collected(False), collected(True)
    slow = set(full) - set(fast)
    assert slow and set(fast) < set(full)
    assert all("wheel" in test for test in slow)  # the one test marked slow in that file
