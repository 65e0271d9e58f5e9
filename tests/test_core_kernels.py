"""The in-place strip path of the loss's gradient (simcore/_tiles.py): NumPy's kernel in the
core, torch's from the adapter. Values against simcore.reference; the properties the
workspace must keep (results never aliased, bounded allocation, autograd left alone)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import simcore
from simcore import _numpy_kernel, reference
from simcore._gram import raw_gram_value_and_grad
from simcore._numpy_kernel import NumpyKernel
from simcore._tiles import in_place_kernel

RNG = np.random.default_rng(7)


def _weights(n=23, d=9, zero_rows=(4, 17)):
    w = RNG.standard_normal((n, d))
    w[list(zero_rows)] = 0.0
    return w


@pytest.mark.parametrize("height", [1, 2, 5, 22, 23, 40, None])
def test_every_strip_height_matches_the_reference(height):
    w = _weights()
    want_value, want_grad = reference.similarity_loss_and_grad(w)
    value, grad = simcore.similarity_loss_and_grad(w, block_size=height)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-14)
    assert np.all(grad[[4, 17]] == 0.0)


def test_numpy_runs_in_place_and_large_diagonal_blocks_are_split(monkeypatch):
    # Against the reference with the split threshold lowered (the reference's loops take
    # seconds at the real threshold's sizes): 23 rows in pieces of 5, the last one short.
    w = _weights()
    assert isinstance(in_place_kernel(np, w), NumpyKernel)
    monkeypatch.setattr(_numpy_kernel, "_SPLIT_FROM", 8)
    assert NumpyKernel(np).diagonal_block(23) == 5
    value, grad = simcore.similarity_loss_and_grad(w, block_size=23)
    want_value, want_grad = reference.similarity_loss_and_grad(w)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-14)
    assert np.all(grad[[4, 17]] == 0.0)
    # At the real threshold, against strips too short to be split (128 rows < 256), which
    # the reference checks above and in test_every_strip_height_matches_the_reference.
    monkeypatch.undo()
    w = RNG.standard_normal((1100, 3)).astype(np.float32)
    assert NumpyKernel(np).diagonal_block(1100) == 275  # quartered diagonal
    value, grad = simcore.similarity_loss_and_grad(w, block_size=1100)
    unsplit_value, unsplit_grad = simcore.similarity_loss_and_grad(w, block_size=128)
    np.testing.assert_allclose(value, unsplit_value, rtol=1e-5)
    np.testing.assert_allclose(grad, unsplit_grad, rtol=1e-3, atol=1e-6)


def test_results_are_never_workspace_buffers():
    first, second = _weights(), _weights()
    value, grad = simcore.similarity_loss_and_grad(first)
    kept = grad.copy()
    simcore.similarity_loss_and_grad(second)
    np.testing.assert_array_equal(grad, kept)


def test_a_repeated_call_allocates_little_beyond_its_gradient():
    w = RNG.standard_normal((512, 256)).astype(np.float32)
    simcore.similarity_loss_and_grad(w)  # fills the workspace
    tracemalloc.start()
    try:
        simcore.similarity_loss_and_grad(w)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The gradient (512 KiB) and n-vectors; the functional path allocated over 5 MiB here.
    assert peak < 1.25 * w.nbytes


def test_numpy_sign_keeps_sign_zero_and_nan_at_every_magnitude():
    kernel = NumpyKernel(np)
    for dtype in (np.float32, np.float64):
        info = np.finfo(dtype)
        x = np.array([0.0, -0.0, info.smallest_subnormal, -info.smallest_subnormal, info.tiny,
                      -0.5, 1.0, info.max, -info.max, np.nan], dtype=dtype)
        got = x.copy()
        kernel.sign_(got)
        np.testing.assert_array_equal(got, np.sign(x))


def test_torch_tensors_run_in_place_unless_autograd_tracks_them():
    torch = pytest.importorskip("torch")
    from simcore.adapters.torch import TorchKernel

    w_np = _weights()
    w = torch.tensor(w_np, dtype=torch.float32)
    assert isinstance(in_place_kernel(simcore.extend.namespace_of(w, "w"), w), TorchKernel)
    tracked = w.clone().requires_grad_(True)
    assert in_place_kernel(simcore.extend.namespace_of(w, "w"), tracked) is None
    want_value, want_grad = reference.similarity_loss_and_grad(w_np)
    for x in (w, tracked):
        value, grad = simcore.similarity_loss_and_grad(x, block_size=5)
        np.testing.assert_allclose(value.item(), want_value, rtol=1e-5)
        np.testing.assert_allclose(grad.detach().numpy(), want_grad, rtol=1e-4, atol=1e-6)


def test_torch_workspace_survives_switching_inference_mode():
    torch = pytest.importorskip("torch")
    w = torch.tensor(_weights(), dtype=torch.float32)
    with torch.inference_mode():
        inside = simcore.similarity_loss_and_grad(w)[1]
    outside = simcore.similarity_loss_and_grad(w)[1]  # would fail writing an inference buffer
    torch.testing.assert_close(inside.clone(), outside)


# ----------------------------------------------------------------------------- raw Gram path


def _raw(w, zero_tol=simcore.DEFAULT_ZERO_TOL, height=None):
    """The raw-Gram path on NumPy rows directly (``None``: it declined, the caller falls back)."""
    n = w.shape[0]
    return raw_gram_value_and_grad(NumpyKernel(np), w, zero_tol, height or n)


@pytest.mark.parametrize("height", [3, 8, 23])  # several strips, and one
def test_raw_gram_path_serves_ordinary_weights_and_matches_the_reference(height):
    w = _weights()
    value, grad = _raw(w, height=height)
    want_value, want_grad = reference.similarity_loss_and_grad(w)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-14)
    assert np.all(grad[[4, 17]] == 0.0)


def test_raw_gram_path_gives_orthonormal_rows_an_exact_zero():
    value, grad = _raw(np.eye(6, 9, dtype=np.float32) * 3.0)
    assert value == 0.0 and np.all(grad == 0.0)


@pytest.mark.parametrize(("dtype", "scale"), [(np.float32, 1e19), (np.float32, 1e-23),
                                               (np.float64, 1e160), (np.float64, 1e-160)])
@pytest.mark.parametrize("height", [4, None])
def test_raw_gram_path_declines_squares_out_of_range_and_the_result_is_still_right(
        dtype, scale, height):
    # The squared norms overflow (or underflow into the subnormals) while the weights are
    # finite and normal: the raw path must decline, the pre-scaled path answers.
    w = (_weights() * scale).astype(dtype)
    assert _raw(w, height=height) is None
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value, grad = simcore.similarity_loss_and_grad(w, block_size=height)
    want_value, want_grad = reference.similarity_loss_and_grad(w.astype(np.float64) / scale)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(value, want_value, rtol=rtol)
    np.testing.assert_allclose(grad.astype(np.float64) * scale, want_grad, rtol=100 * rtol,
                               atol=rtol * np.abs(want_grad).max())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_raw_gram_path_declines_nan_and_inf_and_the_loss_is_nan(bad):
    w = _weights().astype(np.float32)
    w[2, 3] = bad
    assert _raw(w) is None
    with np.errstate(invalid="ignore"):  # the pre-scaled path divides by the Inf
        value, grad = simcore.similarity_loss_and_grad(w)
    assert np.isnan(value) and np.isnan(grad).any()


def test_raw_gram_path_with_zero_tol_0_checks_its_tiny_rows_exactly():
    w = _weights().astype(np.float32)  # rows 4 and 17 exactly zero: inactive either way
    assert _raw(w, zero_tol=0.0) is not None
    w[9] *= 1e-24  # a non-zero row whose squares underflow: only the pre-scaled path sees it
    assert _raw(w, zero_tol=0.0) is None
    value, grad = simcore.similarity_loss_and_grad(w, zero_tol=0.0)
    w64 = w.astype(np.float64)
    want_value, want_grad = reference.similarity_loss_and_grad(w64, zero_tol=0.0)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    assert grad[9].any()  # it counts, with its own direction
    np.testing.assert_allclose(grad.astype(np.float64)[[0, 1, 2]], want_grad[[0, 1, 2]],
                               rtol=1e-3, atol=1e-6)


def test_torch_cpu_tensors_take_the_raw_gram_path():
    torch = pytest.importorskip("torch")
    from simcore.adapters.torch import TorchKernel

    w = torch.tensor(_weights(), dtype=torch.float32)
    kernel = in_place_kernel(simcore.extend.namespace_of(w, "w"), w)
    assert isinstance(kernel, TorchKernel) and kernel.cheap_host_reads(w)
    value, grad = raw_gram_value_and_grad(kernel, w, simcore.DEFAULT_ZERO_TOL, 5)
    assert isinstance(value, torch.Tensor) and value.ndim == 0
    want_value, want_grad = reference.similarity_loss_and_grad(_weights_like(w))
    np.testing.assert_allclose(value.item(), want_value, rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), want_grad, rtol=1e-4, atol=1e-6)
    assert raw_gram_value_and_grad(kernel, w * 1e19, simcore.DEFAULT_ZERO_TOL, 23) is None


def _weights_like(w):
    return w.numpy().astype(np.float64)
