"""simcore.adapters.cupy.

Two tests run everywhere (no CuPy needed): importing the adapter without CuPy
fails with an ImportError that says how to install it, and the adapter's glue
(device context, SYRK triangle mirroring, the SYRK-path formulas, argument
errors) runs against a NumPy stand-in for the ``cupy`` module in a subprocess.
The stand-in checks the adapter's own code, not CuPy or a GPU.

The rest needs CuPy and a CUDA device and skips cleanly without them: the
Hypothesis conformance suite against simcore.reference for both Gram kernels,
device placement, no host synchronisation in the loss path (CUDA graph capture
and ``cupyx.allow_synchronize``), the current stream, and SYRK == GEMM.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simcore import reference
from simcore.testing import assert_close, strategies


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300
    )


def test_import_without_cupy_raises_a_clear_import_error():
    done = _run(
        """
        import sys
        sys.modules["cupy"] = None  # make CuPy unimportable, whatever is installed
        try:
            import simcore.adapters.cupy
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("imported without CuPy")
        """
    )
    assert done.returncode == 0, done.stderr + done.stdout
    message = done.stdout
    assert "CuPy" in message and "cupy-cuda12x" in message and "cupy-cuda13x" in message


STAND_IN = """
import sys, types
import numpy as np

class Device:
    entered = 0
    def __enter__(self):
        Device.entered += 1
        return self
    def __exit__(self, *exc):
        return False

class StandInArray(np.ndarray):
    @property
    def device(self):
        return Device()

def syrk(trans, a, out=None, alpha=1.0, beta=0.0, lower=False):
    # Like cuBLAS: only one triangle of the (Fortran-ordered) result is written.
    assert trans == "N" and a.dtype in (np.float32, np.float64)
    full = np.asarray(a) @ np.asarray(a).T
    return np.asfortranarray(np.tril(full) if lower else np.triu(full))

stand_in = types.ModuleType("cupy")
stand_in.__getattr__ = lambda name: getattr(np, name)
stand_in.ndarray = StandInArray
stand_in.cublas = types.SimpleNamespace(syrk=syrk)
sys.modules["cupy"] = stand_in

from simcore import reference
from simcore.adapters import cupy as sc

rng = np.random.default_rng(0)
w = rng.standard_normal((3, 3, 4, 7))
w[..., 2] = 0.0  # a zero neuron
want_value, want_grad = reference.similarity_loss_and_grad(w, neuron_axis=-1)
for method in ("gemm", "syrk", "auto"):
    for block_size in (None, 2):  # 2: several tiles, SYRK on each diagonal one
        before = Device.entered
        value, grad = sc.similarity_loss_and_grad(w.view(StandInArray), neuron_axis=-1,
                                                  method=method, block_size=block_size)
        assert Device.entered > before, "the input's device context was not entered"
        np.testing.assert_allclose(float(value), want_value, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-10, atol=1e-14)
        assert grad.shape == w.shape
eye = np.eye(4, 6).view(StandInArray)
assert not np.any(np.asarray(sc.similarity_loss_and_grad(eye, method="syrk")[1]))
u = rng.standard_normal((5, 3)).view(StandInArray)
np.testing.assert_allclose(np.asarray(sc.syrk_gram(u)), np.asarray(u) @ np.asarray(u).T, rtol=1e-12)
half = rng.standard_normal((6, 5)).astype(np.float16)
value, grad = sc.similarity_loss_and_grad(half.view(StandInArray), method="syrk")
assert value.dtype == np.float16 and grad.dtype == np.float16
for call, error in (
    (lambda: sc.similarity_loss_and_grad(w.view(StandInArray), method="fast"), ValueError),
    (lambda: sc.similarity_loss_and_grad(w), TypeError),
    (lambda: sc.syrk_gram(u[None]), ValueError),
):
    try:
        call()
    except error:
        pass
    else:
        raise SystemExit(f"no {error.__name__}")
print("ok")
"""


def test_adapter_glue_against_a_numpy_stand_in_for_cupy():
    done = _run(STAND_IN)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip().endswith("ok")


# -- on a GPU ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 - no driver, no runtime: many error types
        pytest.skip(f"no usable CUDA device: {error}")
    if count < 1:
        pytest.skip("no CUDA device")
    return cupy


@pytest.fixture(scope="module")
def gpu(cp):
    from simcore.testing import get_backend

    return get_backend("cupy")


@pytest.fixture(scope="module")
def sc(cp):
    from simcore.adapters import cupy as adapter

    return adapter


def _atol(w, axis):
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    norms = np.linalg.norm(rows, axis=1)
    return 1e-5 / max(min(norms[norms > 0], default=1.0), 1e-3)


@settings(max_examples=15)
@given(
    draw=strategies.weights(layouts=("dense", "dense_io", "oihw", "hwio"), zero_rows=True),
    method=st.sampled_from(["gemm", "syrk"]),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_conformance_with_the_reference(gpu, sc, draw, method, dtype):
    w = gpu.asarray(draw.w, dtype)
    value, grad = sc.similarity_loss_and_grad(w, neuron_axis=draw.neuron_axis, method=method)
    want_value, want_grad = reference.similarity_loss_and_grad(
        gpu.to_numpy(w).astype(np.float64), neuron_axis=draw.neuron_axis
    )
    assert_close(value, np.asarray(want_value), backend=gpu, dtype=dtype)
    atol = _atol(draw.w, draw.neuron_axis) if dtype == "float32" else None
    assert_close(grad, want_grad, backend=gpu, dtype=dtype, atol=atol)


@settings(max_examples=10)
@given(strategies.orthogonal_rows())
def test_orthogonal_rows_get_an_exactly_zero_gradient(gpu, sc, cp, w):
    for method in ("gemm", "syrk"):
        value, grad = sc.similarity_loss_and_grad(gpu.asarray(w, "float32"), method=method)
        assert float(value) == 0.0
        assert not bool(cp.any(grad != 0))


def test_syrk_gram_equals_gemm(cp, sc):
    rng = np.random.default_rng(0)
    for dtype in (cp.float32, cp.float64):
        u = cp.asarray(rng.standard_normal((257, 65)), dtype=dtype)
        rtol = 1e-5 if dtype == cp.float32 else 1e-12
        cp.testing.assert_allclose(sc.syrk_gram(u), u @ u.T, rtol=rtol, atol=rtol)
        gemm = sc.similarity_loss_and_grad(u, method="gemm")
        syrk = sc.similarity_loss_and_grad(u, method="syrk")
        cp.testing.assert_allclose(syrk[0], gemm[0], rtol=rtol)
        cp.testing.assert_allclose(syrk[1], gemm[1], rtol=100 * rtol, atol=rtol)


@pytest.mark.parametrize("method", ["auto", "syrk"])
def test_loss_path_has_no_host_synchronisation_under_graph_capture(cp, sc, method):
    # A host round trip (device-to-host copy, .item(), a sync) is illegal while a
    # stream is being captured into a CUDA graph: capture fails. Work that went to
    # another stream would not be in the graph, so replaying it also proves the
    # current stream was used.
    w = cp.asarray(np.random.default_rng(1).standard_normal((64, 3, 3, 8)), dtype=cp.float32)
    eager = sc.similarity_loss_and_grad(w, method=method)  # warms the memory pool and cuBLAS
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        captured = sc.similarity_loss_and_grad(w, method=method)
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    cp.testing.assert_allclose(captured[0], eager[0], rtol=1e-6)
    cp.testing.assert_allclose(captured[1], eager[1], rtol=1e-5, atol=1e-7)


def test_loss_path_does_not_synchronise(cp, sc):
    cupyx = pytest.importorskip("cupyx")
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    w = cp.asarray(np.random.default_rng(2).standard_normal((40, 30)), dtype=cp.float32)
    with cupyx.allow_synchronize(False):
        for method in ("gemm", "syrk"):
            sc.similarity_loss_and_grad(w, method=method)


def test_results_stay_on_the_inputs_device(cp, sc):
    count = cp.cuda.runtime.getDeviceCount()
    target = count - 1  # the last GPU: not the current one where there are several
    with cp.cuda.Device(target):
        w = cp.asarray(np.random.default_rng(3).standard_normal((12, 9)), dtype=cp.float32)
    with cp.cuda.Device(0):
        for method in ("gemm", "syrk"):
            value, grad = sc.similarity_loss_and_grad(w, method=method)
            assert value.device.id == target and grad.device.id == target
        assert sc.similarity_loss(w).device.id == target


def test_a_non_default_stream_gives_the_same_result(cp, sc):
    w = cp.asarray(np.random.default_rng(4).standard_normal((33, 17)), dtype=cp.float64)
    want = sc.similarity_loss_and_grad(w)
    stream = cp.cuda.Stream()
    with stream:
        got = sc.similarity_loss_and_grad(w, method="syrk")
    stream.synchronize()
    cp.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    cp.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-14)


def test_argument_errors(cp, sc):
    w = cp.ones((3, 4), dtype=cp.float32)
    with pytest.raises(ValueError, match="unknown method"):
        sc.similarity_loss_and_grad(w, method="fast")
    with pytest.raises(ValueError, match="block_size"):
        sc.similarity_loss_and_grad(w, method="syrk", block_size=0)
    with pytest.raises(TypeError, match="cupy.ndarray"):
        sc.similarity_loss_and_grad(np.ones((3, 4)))
