"""The ``simcore`` console command, run as a user would (in a subprocess)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


def _simcore(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "SIMCORE_TEST_BACKENDS"}
    return subprocess.run([sys.executable, "-m", "simcore", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def test_check_on_numpy_prints_the_table_and_exits_0(tmp_path):
    done = _simcore("check", "--backends", "numpy", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["backend", "device", "function", "dtype", "max", "error",
                                "tolerance", "result"]
    rows = [line.split() for line in lines[2:] if line.startswith("numpy")]
    functions = {row[2].split("[")[0] for row in rows}
    assert {"similarity_map", "similarity_loss_and_grad", "weight_sum_penalty_and_grad",
            "growth_objective_and_grad", "decorrelate", "similarity_stats"} <= functions
    assert {row[3] for row in rows} == {"float32", "float64", "float16"}
    assert all(row[-1] == "pass" for row in rows)
    assert lines[-1] == f"0 failed of {len(rows)} checks on numpy"


def test_check_with_an_unknown_backend_exits_1(tmp_path):
    done = _simcore("check", "--backends", "numpy,nonexistent", cwd=tmp_path)
    assert done.returncode == 1
    assert "unknown backend" in done.stderr and "'nonexistent'" in done.stderr


def test_check_dtype_filter_and_usage_errors(tmp_path):
    done = _simcore("check", "--backends", "numpy", "--dtypes", "float64", "--failures-only",
                    cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.strip() == "0 failed of 26 checks on numpy (float64)"
    assert _simcore(cwd=tmp_path).returncode == 2  # argparse: a subcommand is required
    assert _simcore("frobnicate", cwd=tmp_path).returncode == 2


def test_console_script_is_installed():
    script = shutil.which("simcore")
    if script is None:
        pytest.skip("simcore is not installed with its console script (pip install -e .)")
    done = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "check" in done.stdout


def test_a_failing_check_exits_1(monkeypatch, capsys):
    import simcore
    from simcore import cli

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(simcore, "similarity_stats", broken)
    status = cli.main(["check", "--backends", "numpy", "--dtypes", "float64"])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL" in out and "RuntimeError: boom" in out
    assert out.splitlines()[-1] == "1 failed of 26 checks on numpy (float64)"


def test_grow_names_the_missing_extra_instead_of_a_traceback(tmp_path):
    """Without the experiment extra, `simcore grow` says what to install."""
    blocker = tmp_path / "sitecustomize.py"  # makes scikit-learn look uninstalled
    blocker.write_text(
        "import importlib.util, sys\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = (\n"
        "    lambda name, *a: None if name == 'sklearn' else _find(name, *a))\n"
    )
    path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-m", "simcore", "grow"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "scikit-learn" in result.stderr and "simcore[experiment]" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_refuses_a_misspelt_dtype():
    result = subprocess.run([sys.executable, "-m", "simcore", "check", "--backends", "numpy",
                             "--dtypes", "float64,flaot64"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert "unknown dtypes ['flaot64']" in result.stderr and "Traceback" not in result.stderr


def test_version(capsys):
    from simcore import __version__, cli

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"simcore {__version__}"


def test_check_streams_its_rows_to_a_file_while_it_runs(tmp_path, monkeypatch):
    """Each backend's rows are in the file (stdout redirected: block-buffered unless told
    otherwise) before the next backend's checks begin."""
    from simcore import cli, testing

    path = tmp_path / "out.txt"
    on_disk_when_called = []
    real_check = testing.check_backend

    def check_backend(backend, **kwargs):
        on_disk_when_called.append(path.read_text())
        return real_check(backend, **kwargs)

    monkeypatch.setattr(testing, "check_backend", check_backend)
    with open(path, "w") as out:  # a file, as `simcore check > out.txt` makes stdout
        monkeypatch.setattr(sys, "stdout", out)
        status = cli.main(["check", "--backends", "numpy,array_api_strict", "--dtypes",
                           "float64"])
    assert status == 0 and on_disk_when_called[0] == ""
    rows = on_disk_when_called[1].splitlines()
    assert len(rows) == 2 + 26 and all(row.endswith("pass") for row in rows[2:])
    assert path.read_text().splitlines()[-1] == (
        "0 failed of 52 checks on numpy, array_api_strict (float64)")
