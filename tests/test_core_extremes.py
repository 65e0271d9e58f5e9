"""The core at the edges of its input domain (issue 14, items 4, 5, 8 and 10).

* Autodiff through the core (``simcore.similarity_loss(w).backward()``, ``jax.grad``) gives
  a zero gradient, never NaN, on zero rows and on rows below ``zero_tol``.
* Every finite input gives the right numbers: rows at the dtype's extremes are compared with
  the float64 reference on the input rescaled to ordinary magnitudes (Eq. 2 is invariant to
  the weights' scale, its gradient scales as ``1 / c``; Eq. 4 depends only on the ratio of
  the two scales).
* Numbers given as options are real, finite and of the right type, or a clear error names them.
* ``similarity_stats`` holds no ``n x n`` array: it is tiled like the loss.
"""

from __future__ import annotations

import gc
import math
import tracemalloc

import numpy as np
import pytest
import simcore.reference as ref

import simcore
from simcore.testing.strategies import is_compiling

RNG = np.random.default_rng(14)
W = RNG.standard_normal((8, 5))
W_REF = RNG.standard_normal((8, 5))


def _with_inactive_rows(w):
    """``w`` with row 0 exactly zero and row 1 below the default ``zero_tol`` (both inactive)."""
    w = np.array(w, copy=True)
    w[0] = 0.0
    w[1] = w[2] * 1e-9
    return w


# ----------------------------------------------------------------------------- item 4: autodiff


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_autograd_through_the_core_gives_zero_gradient_on_inactive_rows(dtype):
    torch = pytest.importorskip("torch")
    w_np = _with_inactive_rows(W)
    w = torch.tensor(w_np, dtype=getattr(torch, dtype), requires_grad=True)
    simcore.similarity_loss(w).backward()
    grad = w.grad.numpy()
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[:2], 0.0)
    _, expected = ref.similarity_loss_and_grad(w_np)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_grad_through_the_core_gives_zero_gradient_on_inactive_rows(jit):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    w_np = _with_inactive_rows(W).astype(np.float32)
    grad_fn = jax.grad(lambda w: simcore.similarity_loss(w, block_size=3))
    grad = np.asarray((jax.jit(grad_fn) if jit else grad_fn)(jnp.asarray(w_np)))
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[:2], 0.0)
    _, expected = ref.similarity_loss_and_grad(w_np.astype(np.float64))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("statistic", simcore.STATISTICS)
@pytest.mark.parametrize("form", ["squared_log", "abs_log"])
def test_torch_autograd_through_the_weight_sum_term_of_an_all_zero_layer_is_finite(form,
                                                                                  statistic):
    torch = pytest.importorskip("torch")
    w = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    ref_w = torch.tensor(W_REF[:4, :3])
    value = simcore.weight_sum_penalty(w, ref_w, form=form, statistic=statistic)
    value.backward()
    assert math.isfinite(float(value.detach()))
    np.testing.assert_array_equal(w.grad.numpy(), 0.0)


def test_jax_grad_of_the_growth_objective_through_the_core_is_finite_with_zero_rows():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    w = jnp.asarray(_with_inactive_rows(W).astype(np.float32))
    zero = jnp.zeros((3, 4), dtype=jnp.float32)

    def objective(layers):
        return simcore.growth_objective(layers, [jnp.asarray(W_REF, dtype=jnp.float32), zero],
                                        lam=0.5)

    grads = jax.jit(jax.grad(objective))([w, zero])
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)


def test_torch_autograd_matches_the_analytic_gradient_of_both_terms():
    torch = pytest.importorskip("torch")
    w = torch.tensor(W, requires_grad=True)
    value = simcore.similarity_loss(w) + simcore.weight_sum_penalty(w, torch.tensor(W_REF))
    value.backward()
    _, sim_grad = ref.similarity_loss_and_grad(W)
    _, ws_grad = ref.weight_sum_penalty_and_grad(W, W_REF)
    np.testing.assert_allclose(w.grad.numpy(), sim_grad + ws_grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- item 5: scale

#: Scales that push float32 rows' squared norms past overflow (>= 1e19) or into underflow
#: (<= 1e-19), and float64's counterparts; the weights stay finite and normal.
EXTREME_SCALES = {"float32": [1e19, 1e30, 1e37, 1e-23, 1e-30], "float64": [1e160, 1e300, 1e-160,
                                                                           1e-300]}
EXTREME_CASES = [(dtype, scale) for dtype, scales in EXTREME_SCALES.items() for scale in scales]


def _rescaled(backend, w, dtype, scale):
    """``(x, w64)``: ``w * scale`` on the backend in ``dtype``, and that input divided back by
    ``scale`` in float64 (what the reference sees: the same directions, ordinary magnitudes)."""
    x = backend.asarray(w * scale, dtype)
    return x, backend.to_numpy(x).astype(np.float64) / scale


@pytest.mark.parametrize(("dtype", "scale"), EXTREME_CASES)
def test_similarity_at_extreme_scales_matches_the_reference(backend, dtype, scale):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    x, w64 = _rescaled(backend, _with_inactive_rows(W), dtype, scale)
    expected_loss, expected_grad = ref.similarity_loss_and_grad(w64)
    loss, grad = backend.run(simcore.similarity_loss_and_grad, x, block_size=3)
    rtol = 1e-4 if dtype == "float32" else 1e-10
    assert float(loss) == pytest.approx(expected_loss, rel=rtol)
    # The gradient scales as 1 / scale: compare it at the reference's magnitude, down to the
    # smallest normal number (XLA on CPU flushes subnormal results to zero).
    atol = max(rtol * np.abs(expected_grad).max(), np.finfo(dtype).tiny * scale)
    np.testing.assert_allclose(backend.to_numpy(grad).astype(np.float64) * scale, expected_grad,
                               rtol=rtol, atol=atol)
    np.testing.assert_allclose(backend.to_numpy(backend.run(simcore.similarity_map, x)),
                               ref.similarity_map(w64), rtol=rtol, atol=rtol)
    stats = backend.run(simcore.similarity_stats, x, bins=4)
    expected = ref.similarity_stats(w64, bins=4)
    assert backend.to_numpy(stats.counts).tolist() == expected["counts"].tolist()
    assert float(stats.mean_abs) == pytest.approx(expected["mean_abs"], rel=rtol)


@pytest.mark.parametrize(("dtype", "scale"), EXTREME_CASES)
def test_weight_sum_term_at_extreme_scales_matches_the_reference(backend, dtype, scale):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    x, w64 = _rescaled(backend, W, dtype, scale)
    x_ref, ref64 = _rescaled(backend, 0.5 * W_REF, dtype, scale)
    rtol = 1e-4 if dtype == "float32" else 1e-10
    for form in ("squared_log", "abs_log"):
        for statistic in simcore.STATISTICS:
            expected, expected_grad = ref.weight_sum_penalty_and_grad(w64, ref64, form=form,
                                                                      statistic=statistic)
            value, grad = backend.run(simcore.weight_sum_penalty_and_grad, x, x_ref, form=form,
                                      statistic=statistic)
            assert float(value) == pytest.approx(expected, rel=rtol), (form, statistic)
            atol = max(rtol * np.abs(expected_grad).max(), np.finfo(dtype).tiny * scale)
            np.testing.assert_allclose(backend.to_numpy(grad).astype(np.float64) * scale,
                                       expected_grad, rtol=rtol, atol=atol)


#: Well-conditioned sums for the literal Eq. 4 (positive weights: no cancellation); at 1e37 in
#: float32 and 1e307 in float64 the weights are finite and their sums overflow.
W_POS, W_REF_POS = 5 * (np.abs(W) + 0.1), 5 * (np.abs(W_REF) + 0.1)


@pytest.mark.parametrize(("dtype", "scale"), EXTREME_CASES)
def test_literal_weight_sum_at_extreme_scales_matches_the_reference(backend, dtype, scale):
    """``log|sum w / sum w_ref|`` with both layers at one extreme scale (at 1e37 the float32
    sums overflow unless scaled): the reference's value, and ``1 / sum w`` at the reference's
    magnitude."""
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    x, w64 = _rescaled(backend, W_POS, dtype, scale)
    x_ref, ref64 = _rescaled(backend, W_REF_POS, dtype, scale)
    expected, expected_grad = ref.weight_sum_penalty_and_grad(w64, ref64, form="literal")
    value, grad = backend.run(simcore.weight_sum_penalty_and_grad, x, x_ref, form="literal")
    rtol = 1e-5 if dtype == "float32" else 1e-12
    assert float(value) == pytest.approx(expected, rel=rtol)
    # Down to the smallest normal number (XLA on CPU flushes subnormal results to zero).
    np.testing.assert_allclose(backend.to_numpy(grad).astype(np.float64) * scale, expected_grad,
                               rtol=rtol, atol=np.finfo(dtype).tiny * scale)


@pytest.mark.parametrize(("dtype", "low", "high"), [("float32", 1e-37, 1e37),
                                                    ("float64", 1e-300, 1e307)])
def test_literal_weight_sum_between_the_dtypes_extremes_is_exact(dtype, low, high):
    """A layer at the largest scale against one at the smallest and back: the sums at the
    largest scale and their ratio (1e74 or 1e607) overflow, its log does not; the gradient
    ``1 / sum w`` is representable at both ends."""
    for w_scale, ref_scale in ((high, low), (low, high)):
        x = (W_POS * w_scale).astype(dtype)
        x_ref = (W_REF_POS * ref_scale).astype(dtype)
        w64, ref64 = x.astype(np.float64) / w_scale, x_ref.astype(np.float64) / ref_scale
        expected, expected_grad = ref.weight_sum_penalty_and_grad(w64, ref64, form="literal")
        expected += math.log(w_scale) - math.log(ref_scale)
        value, grad = simcore.weight_sum_penalty_and_grad(x, x_ref, form="literal")
        rtol = 1e-6 if dtype == "float32" else 1e-14
        assert float(value) == pytest.approx(expected, rel=rtol)
        np.testing.assert_allclose(grad.astype(np.float64) * w_scale, expected_grad, rtol=rtol)


def test_literal_weight_sum_in_range_is_the_plain_formula():
    """Scaling by powers of two is exact: where the sums are in range the value is the plain
    ``log|sum w / sum w_ref|`` of the same dtype, to its last rounding."""
    for dtype in (np.float32, np.float64):
        x, x_ref = (W * 3).astype(dtype), (W_REF + 0.7).astype(dtype)
        plain = np.log(np.abs(np.sum(x) / np.sum(x_ref)))
        value = simcore.weight_sum_penalty(x, x_ref, form="literal")
        assert float(value) == pytest.approx(float(plain), rel=4 * float(np.finfo(dtype).eps))


def test_weight_sum_term_at_1e20_scaled_float32_weights_is_finite_and_right():
    x = (W * 1e20).astype(np.float32)
    assert float(simcore.weight_sum_penalty(x, 0.5 * x)) == pytest.approx(math.log(2.0) ** 2,
                                                                          rel=1e-5)


def test_weight_sum_term_sees_a_1e5_ratio_of_tiny_float32_weights():
    tiny = (W * 1e-30).astype(np.float32)
    value = float(simcore.weight_sum_penalty(tiny * np.float32(1e5), tiny))
    assert value == pytest.approx(math.log(1e5) ** 2, rel=1e-5)


def test_a_huge_row_keeps_its_direction_and_makes_the_others_relatively_zero():
    """One float64 row at 1e160 among ordinary rows: the huge row is active (it has a
    direction), the ordinary rows lie below zero_tol times the largest norm and count as zero
    rows (the relative rule, the reference's too); with zero_tol=0 every row counts."""
    w = np.array(W, copy=True)
    w[0] *= 1e160
    cosines = simcore.similarity_map(w)
    np.testing.assert_array_equal(np.diag(cosines), [1.0] + [0.0] * (len(w) - 1))
    assert float(simcore.similarity_loss(w)) == ref.similarity_loss(w) == 0.0
    # Two huge rows: their cosine is the loss.
    w[1] *= 1e160
    assert float(simcore.similarity_loss(w)) == pytest.approx(ref.similarity_loss(w), rel=1e-12)
    assert ref.similarity_loss(w) == pytest.approx(abs(np.dot(W[0], W[1]))
                                                   / np.linalg.norm(W[0]) / np.linalg.norm(W[1]))
    # zero_tol=0: only exactly-zero rows are left out, whatever the spread of the norms.
    loss, grad = simcore.similarity_loss_and_grad(w, zero_tol=0.0)
    expected_loss, expected_grad = ref.similarity_loss_and_grad(w, zero_tol=0.0)
    assert float(loss) == pytest.approx(expected_loss, rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-9 * np.abs(
        expected_grad).max())
    assert float(simcore.similarity_loss(w, zero_tol=0.0)) == pytest.approx(
        float(simcore.similarity_loss(W)), rel=1e-12)


@pytest.mark.parametrize("scale", [1e19, 1e-23])
def test_decorrelate_at_extreme_float32_scales_moves_the_same_relative_amount(scale):
    w = W.astype(np.float32)
    [moved] = simcore.decorrelate([w], steps=3, lr=0.1, lam=1.0)
    [scaled] = simcore.decorrelate([w * np.float32(scale)], steps=3, lr=0.1, lam=1.0)
    assert np.isfinite(scaled).all()
    np.testing.assert_allclose(scaled.astype(np.float64) / scale, moved, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- item 8: numbers

BAD_NUMBERS = [
    ("lam", "0.5", TypeError),
    ("lam", math.nan, ValueError),
    ("lam", math.inf, ValueError),
    ("lam", -1.0, ValueError),
    ("lr", "0.5", TypeError),
    ("lr", math.inf, ValueError),
    ("lr", math.nan, ValueError),
    ("lr", True, TypeError),
    ("similarity", "no", TypeError),
    ("similarity", 0, TypeError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_NUMBERS, ids=repr)
def test_decorrelate_refuses_bad_numbers_naming_them(name, value, error):
    # lam=0 for the lr cases: lr * lam < 2 must not be what catches an infinite lr.
    options = {"steps": 1, "lr": 0.1, "lam": 0.0 if name == "lr" else 0.1, name: value}
    with pytest.raises(error, match=rf"\b{name}\b"):
        simcore.decorrelate([W], **options)


@pytest.mark.parametrize("lr", [math.inf, 1e400, math.nan])
def test_decorrelate_with_absolute_steps_refuses_a_non_finite_lr(lr):
    with pytest.raises(ValueError, match=r"\blr\b"):
        simcore.decorrelate([W], steps=1, lr=lr, lam=0.1, step="absolute")


@pytest.mark.parametrize(("name", "value", "error"),
                         [(n, v, e) for n, v, e in BAD_NUMBERS if n != "lr"], ids=repr)
def test_objective_refuses_bad_numbers_naming_them(name, value, error):
    options = {"lam": 0.1, name: value}
    with pytest.raises(error, match=rf"\b{name}\b"):
        simcore.Objective(**options)
    with pytest.raises(error, match=rf"\b{name}\b"):
        simcore.growth_objective([W], [W], **options)


def test_objective_keeps_numpy_bools_and_numbers():
    objective = simcore.Objective(lam=np.float32(0.5), similarity=np.bool_(False))
    assert objective.lam == 0.5 and objective.similarity is False


@pytest.mark.parametrize(("value", "error"), [("0.5", TypeError), (math.inf, ValueError),
                                              (math.nan, ValueError), (None, TypeError)],
                         ids=repr)
def test_relative_update_refuses_bad_lr_naming_it(value, error):
    with pytest.raises(error, match=r"\blr\b"):
        simcore.relative_update([W], [W], lr=value)


@pytest.mark.parametrize(("name", "value", "error"),
                         [("lr", math.inf, ValueError), ("lr", math.nan, ValueError),
                          ("lr", "0.1", TypeError), ("strength", math.inf, ValueError),
                          ("strength", "1", TypeError)], ids=repr)
def test_torch_penalty_refuses_bad_numbers_naming_them(name, value, error):
    torch = pytest.importorskip("torch")
    from simcore.adapters.torch import SimilarityPenalty

    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    if name == "strength":
        with pytest.raises(error, match=rf"\b{name}\b"):
            SimilarityPenalty(model, lam=0.1, strength=value)
        return
    penalty = SimilarityPenalty(model, lam=0.0)
    before = model[0].weight.detach().clone()
    with pytest.raises(error, match=rf"\b{name}\b"):
        penalty.decorrelate(1, value)
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize(("name", "value", "error"), BAD_NUMBERS + [("strength", "1", TypeError),
                                                                   ("strength", math.inf,
                                                                    ValueError)], ids=repr)
def test_torch_phase_refuses_bad_numbers_naming_them(name, value, error):
    pytest.importorskip("torch")
    from simcore.adapters.torch import SimilarityPhase

    options = {"lam": 0.0} if name == "lr" else {}
    with pytest.raises(error, match=rf"\b{name}\b"):
        SimilarityPhase(**{**options, name: value})


# ----------------------------------------------------------------------------- item 10: memory


# JAX traces every tile (n = 11: 66 tile pairs at block size 1, 21 at 2, 10 at 3) and
# compiles for seconds; the tile loop is the core's, so the eager backends cover the small
# tiles and JAX runs one uneven tiling (5, 5, 1) and the untiled ones in the fast tier.
@pytest.mark.slow_if(when=lambda params: is_compiling(params["backend"])
                     and params["block_size"] in (1, 2, 3))
@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 64, None])
def test_tiled_stats_equal_the_untiled_ones(backend, block_size):
    w = _with_inactive_rows(RNG.standard_normal((11, 6)))
    x = backend.asarray(w)
    whole = backend.run(simcore.similarity_stats, x, bins=7, block_size=11)
    tiled = backend.run(simcore.similarity_stats, x, bins=7, block_size=block_size)
    for field in ("counts", "edges", "pairs"):
        np.testing.assert_array_equal(backend.to_numpy(getattr(tiled, field)),
                                      backend.to_numpy(getattr(whole, field)), err_msg=field)
    for field in ("share_within_half", "mean_abs", "max_abs"):
        assert float(getattr(tiled, field)) == pytest.approx(float(getattr(whole, field)),
                                                             rel=1e-12), field
    expected = ref.similarity_stats(w, bins=7)
    assert backend.to_numpy(tiled.counts).tolist() == expected["counts"].tolist()
    assert int(tiled.pairs) == expected["pairs"] == 36


def test_stats_memory_stays_far_below_20_bytes_per_pair():
    n, d = 6000, 8
    w = np.random.default_rng(10).standard_normal((n, d), dtype=np.float32)
    pairs = n * (n - 1) // 2
    gc.collect()
    tracemalloc.start()
    try:
        stats = simcore.similarity_stats(w, bins=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert int(stats.pairs) == pairs
    assert int(np.sum(stats.counts)) == pairs  # exact counts beyond float32's 2**24
    assert peak < 2.0 * pairs, f"{peak / pairs:.2f} bytes per pair"
