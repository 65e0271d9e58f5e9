"""The conformance kit itself: registry, assert_close, strategies and check_backend can fail."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given

import simcore
import simcore.testing as kit
from simcore.testing import _backends as backends_module
from simcore.testing import assert_close, strategies

# ----------------------------------------------------------------------------- registry


def test_backend_round_trip_keeps_values_dtype_and_device(backend):
    data = np.arange(6.0).reshape(2, 3) / 7
    for dtype in backend.dtypes:
        x = backend.asarray(data, dtype)
        assert x.dtype == backend.dtype(dtype)
        assert kit.max_error(backend.to_numpy(x), data) <= kit.TOLERANCES[dtype].rtol
        assert backend.dtype_name(x.dtype) == dtype
    x = backend.asarray(data)
    assert backend.xp is __import__("array_api_compat").array_namespace(x)
    assert backend.to_numpy(x).dtype == np.float64
    np.testing.assert_array_equal(backend.to_numpy(x), data)


def test_env_var_restricts_and_orders_backends(monkeypatch):
    monkeypatch.setenv(kit.ENV_VAR, "array_api_strict, numpy")
    assert [b.name for b in kit.available_backends()] == ["array_api_strict", "numpy"]
    monkeypatch.setenv(kit.ENV_VAR, "")
    assert [b.name for b in kit.available_backends()][0] == "numpy"


def test_unknown_backend_name_is_an_error(monkeypatch):
    monkeypatch.setenv(kit.ENV_VAR, "numpy,nonexistent")
    with pytest.raises(ValueError, match="unknown backend.*'nonexistent'"):
        kit.available_backends()
    with pytest.raises(ValueError, match="unknown backend"):
        kit.get_backend("numpyy")


def test_named_but_unusable_backend_is_an_error_unnamed_is_absent(monkeypatch):
    def unusable():
        raise backends_module._unavailable("torch", "pretend it is not installed")

    monkeypatch.setitem(backends_module._FACTORIES, "torch", unusable)
    monkeypatch.setattr(backends_module, "_CACHE", {})
    monkeypatch.setenv(kit.ENV_VAR, "numpy,torch")
    with pytest.raises(kit.BackendUnavailableError, match="'torch' is not usable here"):
        kit.available_backends()
    monkeypatch.delenv(kit.ENV_VAR)
    assert "torch" not in [b.name for b in kit.available_backends()]


def test_env_var_naming_a_missing_library_fails_in_a_fresh_process(tmp_path):
    """The pytest conftest calls available_backends() at collection: this is what it sees."""
    code = "from simcore.testing import available_backends; available_backends()"
    missing = "cupy"  # never importable on a machine without CUDA
    try:
        kit.get_backend(missing)
        pytest.skip("cupy works here")  # only on a GPU machine
    except kit.BackendUnavailableError:
        pass
    env = {**os.environ, kit.ENV_VAR: f"numpy,{missing}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert done.returncode != 0
    assert "BackendUnavailableError" in done.stderr and "'cupy'" in done.stderr


def test_backend_for_namespace_accepts_modules_and_compat_namespaces():
    import array_api_compat.numpy as compat_numpy

    assert kit.backend_for_namespace(np).name == "numpy"
    assert kit.backend_for_namespace(compat_numpy).name == "numpy"
    with pytest.raises(TypeError, match="Array-API namespace"):
        kit.backend_for_namespace(object())


def test_jax_jit_backend_really_compiles():
    try:
        jit = kit.get_backend("jax_jit")
    except kit.BackendUnavailableError:
        pytest.skip("jax is not installed")
    seen = []

    def probe(x, *, power):
        seen.append(type(x).__name__)  # a tracer while tracing
        return x**power

    x = jit.asarray(np.arange(3.0))
    np.testing.assert_array_equal(jit.to_numpy(jit.run(probe, x, power=2)), [0.0, 1.0, 4.0])
    assert seen and all("Tracer" in name for name in seen)
    stats = jit.run(simcore.similarity_stats, jit.asarray(np.eye(3)), bins=2)
    assert isinstance(stats, simcore.SimilarityStats)


# ----------------------------------------------------------------------------- assert_close


NUMPY = kit.get_backend("numpy")


def test_assert_close_passes_within_tolerance():
    assert_close(np.float32([1.0, 2.0]), np.array([1.0, 2.0 + 1e-7]), backend=NUMPY,
                 dtype="float32")
    assert_close(np.array([np.nan, np.inf, 1.0]), np.array([np.nan, np.inf, 1.0]),
                 backend=NUMPY)


@pytest.mark.parametrize(
    ("actual", "expected", "kwargs", "message"),
    [
        (np.float32([1.0]), np.array([1.0]), {}, "dtype mismatch"),
        (np.ones((2, 1)), np.ones(2), {}, "shape mismatch"),
        (np.array([1.0]), np.array([1.0 + 1e-6]), {}, "differ beyond"),
        (np.array([np.nan]), np.array([1.0]), {}, "differ beyond"),
        (np.array([np.inf]), np.array([-np.inf]), {}, "differ beyond"),
        ([1.0], np.array([1.0]), {}, "expected a numpy array"),
    ],
)
def test_assert_close_detects(actual, expected, kwargs, message):
    with pytest.raises(AssertionError, match=message):
        assert_close(actual, expected, backend=NUMPY, **kwargs)


def test_assert_close_checks_namespace_and_device():
    strict = kit.get_backend("array_api_strict")
    with pytest.raises(AssertionError, match="namespace mismatch"):
        assert_close(np.ones(2), np.ones(2), backend=strict)
    import array_api_strict

    elsewhere = array_api_strict.asarray([1.0], device=array_api_strict.Device("device1"))
    with pytest.raises(AssertionError, match="device mismatch"):
        assert_close(elsewhere, np.ones(1), backend=strict)


def test_default_tolerance_scales_with_the_largest_expected_entry():
    expected = np.array([1000.0, 1e-3])
    rtol, atol = kit.tolerance_for(expected, "float32")
    assert rtol == kit.TOLERANCES["float32"].rtol and atol == pytest.approx(1000 * rtol)
    assert kit.tolerance_for(np.arange(3), "int64") == (0.0, 0.0)


# ----------------------------------------------------------------------------- strategies


@given(strategies.weights(layouts=tuple(strategies.LAYOUTS), zero_rows=True))
def test_weights_strategy_layouts(draw):
    w, axis = draw
    assert w.dtype == np.float64 and w.ndim in (2, 4)
    assert axis in (0, -1)
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    norms = np.linalg.norm(rows, axis=1)
    live = norms[norms > 0]
    if live.size:
        assert live.max() / live.min() <= 1e3 * (1 + 1e-12)


@given(strategies.orthogonal_rows())
def test_orthogonal_rows_are_exactly_orthogonal_in_float64_and_float32(w):
    for dtype in (np.float64, np.float32):
        u = w.astype(dtype) / np.linalg.norm(w.astype(dtype), axis=1, keepdims=True)
        gram = u @ u.T
        assert np.all(gram[~np.eye(len(w), dtype=bool)] == 0.0)


@given(strategies.rows_at_angle())
def test_rows_at_angle(drawn):
    w, t = drawn
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    assert float(u[0] @ u[1]) == pytest.approx(np.cos(t), abs=1e-12)


def test_given_for_budget():
    assert strategies.is_compiling("jax_jit") and not strategies.is_compiling(NUMPY)
    assert strategies.size_limits("numpy") == {}
    calls = []

    @strategies.given_for("jax", strategies.parallel_rows())
    def probe(w):
        calls.append(w)

    probe()
    assert 1 <= len(calls) <= max(2, kit_max_examples() // 6)


def kit_max_examples():
    from hypothesis import settings

    return settings.default.max_examples


# ----------------------------------------------------------------------------- check_backend


def test_check_backend_passes_on_numpy_and_covers_every_function():
    results = kit.check_backend(np, dtypes=["float64", "float32", "float16"])
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    functions = {r.function.split("[")[0] for r in results}
    public = {"similarity_map", "similarity_loss", "similarity_loss_and_grad",
              "weight_sum_penalty", "weight_sum_penalty_and_grad", "growth_objective",
              "growth_objective_and_grad", "decorrelate", "similarity_stats"}
    assert functions == public
    assert {r.dtype for r in results} == {"float64", "float32", "float16"}
    assert all(0.0 <= r.max_error <= r.tolerance for r in results)


def test_check_backend_reports_a_wrong_result_and_an_exception(monkeypatch):
    original = simcore.similarity_map

    def off_by_a_bit(w, **kwargs):
        return original(w, **kwargs) * 1.001

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(simcore, "similarity_map", off_by_a_bit)
    monkeypatch.setattr(simcore, "similarity_stats", broken)
    results = {r.function: r for r in kit.check_backend("numpy", dtypes=["float64"])}
    assert not results["similarity_map"].passed
    assert results["similarity_map"].max_error > results["similarity_map"].tolerance
    assert not results["similarity_stats"].passed
    assert "RuntimeError: boom" in results["similarity_stats"].detail
    assert results["similarity_loss"].passed


def test_check_backend_argument_errors():
    with pytest.raises(ValueError, match="unknown backend"):
        kit.check_backend("nope")
    with pytest.raises(TypeError, match="sequence of dtype names"):
        kit.check_backend("numpy", dtypes="float32")


def test_check_backend_refuses_unknown_dtype_names():
    """A typo must not shrink the check silently to the dtypes that were spelled right."""
    with pytest.raises(ValueError, match="unknown dtypes"):
        simcore.testing.check_backend("numpy", dtypes=["float64", "flaot64"])
    # A real dtype the backend lacks is skipped, not an error.
    results = simcore.testing.check_backend("numpy", dtypes=["float64", "bfloat16"])
    assert results and {r.dtype for r in results} == {"float64"}
    assert all(r.passed and r.max_error <= r.tolerance for r in results)
