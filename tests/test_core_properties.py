"""Exact values, bounds and invariances of Eq. 1-5, on every backend.

These need no reference: each asserts a property the maths guarantees.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import simcore.reference as ref
from hypothesis import assume
from hypothesis import strategies as st

import simcore
from simcore.testing import assert_close, strategies
from simcore.testing.strategies import given_for, is_compiling, size_limits, structured_shape

#: Machine epsilon (one unit in the last place of 1.0) per dtype.
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


def _eps(dtype):
    return EPS[dtype]


def _all_dtypes(backend):
    return backend.dtypes


def _jax_cases_outside(*kept):
    """A ``slow_if`` predicate: the JAX cases other than ``kept`` (backend names, or
    ``(backend name, dtype)`` pairs) go to the full tier.

    Under JAX every case compiles its own programs (a second or more on 2 cores). For an
    approximate property the fast tier runs one JAX mode per dtype, eager for some
    properties and ``jit`` for others; ``test_core_reference.py`` checks every function
    against the reference in both modes, and the eager backends check every property. The
    exact properties (zeros, NaN, mutation) keep both JAX modes.
    """
    def when(params):
        backend, dtype = params.get("backend"), None
        for key in ("backend_dtype", "backend_half"):
            if key in params:
                backend, dtype = params[key]
        return (is_compiling(backend) and backend.name not in kept
                and (backend.name, dtype) not in kept)

    return when


# ----------------------------------------------------------------------------- exact values


def test_orthogonal_rows_give_zero_loss_and_exactly_zero_gradient(backend):
    @given_for(backend, strategies.orthogonal_rows(shape=structured_shape(backend)))
    def check(w):
        for dtype in _all_dtypes(backend):
            x = backend.asarray(w, dtype)
            loss, grad = backend.run(simcore.similarity_loss_and_grad, x)
            assert backend.to_numpy(loss) == 0.0, dtype
            assert np.all(backend.to_numpy(grad) == 0.0), dtype
            assert backend.to_numpy(backend.run(simcore.similarity_loss, x)) == 0.0, dtype

    check()


def test_parallel_and_antiparallel_rows_give_loss_one(backend):
    @given_for(backend, strategies.parallel_rows(shape=structured_shape(backend)))
    def check(w):
        for dtype in _all_dtypes(backend):
            loss = backend.to_numpy(backend.run(simcore.similarity_loss, backend.asarray(w, dtype)))
            # The unit rows are rounded, so each cosine is 1 to a few units in the last place.
            assert abs(float(loss) - 1.0) <= 4 * _eps(dtype), (dtype, float(loss))

    check()


@pytest.mark.slow_if(when=_jax_cases_outside(("jax", "float32"), ("jax_jit", "float64")))
def test_two_rows_at_angle_t_give_abs_cos_t(backend_dtype):
    backend, dtype = backend_dtype

    @given_for(backend, strategies.rows_at_angle())
    def check(drawn):
        w, t = drawn
        loss = backend.run(simcore.similarity_loss, backend.asarray(w, dtype))
        assert_close(loss, np.asarray(abs(math.cos(t))), backend=backend, dtype=dtype,
                     atol=50 * _eps(dtype))

    check()


@pytest.mark.slow_if(when=_jax_cases_outside("jax_jit"))
def test_gaussian_rows_have_mean_abs_cosine_sqrt_2_over_pi_d(backend):
    """E|cos| of Gaussian rows: Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)), about sqrt(2/(pi d))."""
    n, d = 200, 64
    w = np.random.default_rng(7).standard_normal((n, d))
    loss = float(backend.to_numpy(backend.run(simcore.similarity_loss, backend.asarray(w))))
    exact = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
    # 19900 pairs: the sample mean's standard deviation is ~0.0005; allow 4 of them.
    assert abs(loss - exact) < 0.002
    assert abs(loss - math.sqrt(2 / (math.pi * d))) < 0.003


# ----------------------------------------------------------------------------- bounds


@pytest.mark.slow_if(when=_jax_cases_outside("jax_jit"))
def test_loss_lies_in_unit_interval_and_respects_the_welch_bound(backend):
    @given_for(backend, st.data())
    def check(data):
        d = data.draw(st.integers(1, 5))
        drawn = data.draw(strategies.weights(min_neurons=d + 1, max_neurons=d + 6,
                                             min_fan_in=d, max_fan_in=d))
        loss = float(backend.to_numpy(backend.run(simcore.similarity_loss,
                                                  backend.asarray(drawn.w))))
        n = drawn.w.shape[0]
        assert 0.0 <= loss <= 1.0
        # Welch: mean C_ij^2 >= (n - d) / (d (n - 1)) when n > d, and |C| >= C^2.
        assert loss >= (n - d) / (d * (n - 1)) - 1e-12

    check()


# ----------------------------------------------------------------------------- invariances


def _loss_and_grad(backend, w):
    loss, grad = backend.run(simcore.similarity_loss_and_grad, backend.asarray(w))
    return float(backend.to_numpy(loss)), backend.to_numpy(grad)


@pytest.mark.slow_if(when=_jax_cases_outside("jax"))
def test_invariances_and_gradient_equivariances(backend):
    """Row permutation, positive row scaling, sign flips and right rotation W -> W Q."""

    @given_for(backend, st.data())
    def check(data):
        w = data.draw(strategies.weights(**size_limits(backend))).w
        assume(strategies.min_abs_cosine(w) > 1e-6)
        n, d = w.shape
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        loss, grad = _loss_and_grad(backend, w)
        # Rounding in g_i is ~eps * 2 / (n r_i) even where g_i itself is ~0 (d = 1).
        tol = {"rtol": 1e-10, "atol": 1e-12 / np.linalg.norm(w, axis=1).min()}

        perm = rng.permutation(n)
        p_loss, p_grad = _loss_and_grad(backend, w[perm])
        assert p_loss == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(p_grad, grad[perm], **tol)

        scales = rng.uniform(0.1, 10.0, size=(n, 1))
        s_loss, s_grad = _loss_and_grad(backend, w * scales)
        assert s_loss == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(s_grad * scales, grad, **tol)  # g_i(c_i w_i) = g_i / c_i

        signs = rng.choice([-1.0, 1.0], size=(n, 1))
        f_loss, f_grad = _loss_and_grad(backend, w * signs)
        assert f_loss == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(f_grad, grad * signs, **tol)

        q = strategies.random_orthogonal(d, rng)
        r_loss, r_grad = _loss_and_grad(backend, w @ q)
        assert r_loss == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(r_grad, grad @ q, **tol)

    check()


@pytest.mark.slow_if(when=_jax_cases_outside("jax"))
def test_gradient_is_orthogonal_to_its_row_and_scales_inversely(backend):
    @given_for(backend, st.data())
    def check(data):
        drawn = data.draw(strategies.weights(layouts=tuple(strategies.LAYOUTS),
                                             **size_limits(backend)))
        c = data.draw(st.floats(0.01, 100.0))
        w, axis = drawn.w, drawn.neuron_axis
        _, grad = backend.run(simcore.similarity_loss_and_grad, backend.asarray(w),
                              neuron_axis=axis)
        grad = backend.to_numpy(grad)
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        grad_rows = np.moveaxis(grad, axis, 0).reshape(rows.shape)
        # w_i . g_i = 0 exactly in the maths; in float64 it is rounding-sized, |G_i| eps.
        radial = np.sum(rows * grad_rows, axis=1)
        assert np.abs(radial).max() <= 1e-12
        _, scaled = backend.run(simcore.similarity_loss_and_grad, backend.asarray(c * w),
                                neuron_axis=axis)
        atol = 1e-12 / np.linalg.norm(rows, axis=1).min()  # rounding-sized where g ~ 0
        np.testing.assert_allclose(backend.to_numpy(scaled) * c, grad, rtol=1e-9, atol=atol)

    check()


# ----------------------------------------------------------------------------- finite differences


def _central_differences(f, w, h):
    grad = np.zeros_like(w)
    for index in np.ndindex(w.shape):
        step = np.zeros_like(w)
        step[index] = h
        grad[index] = (f(w + step) - f(w - step)) / (2 * h)
    return grad


@given_for("numpy", st.data())
def test_similarity_gradient_matches_central_finite_differences(data):
    drawn = data.draw(strategies.weights(layouts=tuple(strategies.LAYOUTS), max_neurons=6,
                                         max_fan_in=4, max_kernel=2, max_norm_ratio=10.0))
    w, axis = drawn.w, drawn.neuron_axis
    # Stay clear of the kinks |C_ij| = 0, which a step of h could cross.
    assume(strategies.min_abs_cosine(w, axis) > 1e-3)
    _, grad = simcore.similarity_loss_and_grad(w, neuron_axis=axis)
    numeric = _central_differences(
        lambda v: float(simcore.similarity_loss(v, neuron_axis=axis)), w, 1e-6)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7 * max(1.0, np.abs(grad).max()))


@pytest.mark.parametrize("form", simcore.FORMS)
@pytest.mark.parametrize("statistic", simcore.STATISTICS)
@given_for("numpy", st.data())
def test_weight_sum_gradient_matches_central_finite_differences(form, statistic, data):
    w = data.draw(strategies.weights(max_neurons=5, max_fan_in=4)).w
    w_ref = w * data.draw(st.floats(0.3, 3.0)) + 0.05
    if form == "literal":
        w, w_ref = np.abs(w) + 0.1, np.abs(w_ref) + 0.1
    options = {"form": form, "statistic": statistic}
    value, grad = simcore.weight_sum_penalty_and_grad(w, w_ref, **options)
    assume(form != "abs_log" or abs(float(value)) > 1e-4)
    if statistic == "mean_abs":
        assume(np.min(np.abs(w)) > 1e-4)  # |w| has a kink at 0
    numeric = _central_differences(
        lambda v: float(simcore.weight_sum_penalty(v, w_ref, **options)), w, 1e-6)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8 * max(1.0, np.abs(grad).max()))


@given_for("numpy", st.data())
def test_growth_objective_gradient_matches_central_finite_differences(data):
    layers = [data.draw(strategies.weights(max_neurons=4, max_fan_in=3)).w for _ in range(2)]
    refs = [w * 1.5 for w in layers]
    for w in layers:
        assume(strategies.min_abs_cosine(w) > 1e-3)
    lam = data.draw(st.floats(0.0, 2.0))
    _, grads = simcore.growth_objective_and_grad(layers, refs, lam=lam)
    for k, grad in enumerate(grads):
        def objective(v, k=k):
            trial = [v if i == k else w for i, w in enumerate(layers)]
            return float(simcore.growth_objective(trial, refs, lam=lam))

        numeric = _central_differences(objective, layers[k], 1e-6)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- block path


@pytest.mark.slow_if(when=_jax_cases_outside(("jax", "float32"), ("jax_jit", "float64")))
def test_block_path_equals_full_path(backend_dtype):
    backend, dtype = backend_dtype

    @given_for(backend, st.data())
    def check(data):
        drawn = data.draw(strategies.weights(layouts=("dense", "hwio"), zero_rows=True,
                                             **size_limits(backend)))
        n = drawn.w.shape[drawn.neuron_axis]
        block_size = data.draw(st.sampled_from([1, 2, max(1, n // 2), n - 1 or 1, n, n + 3]))
        x = backend.asarray(drawn.w, dtype)
        loss, grad = backend.run(simcore.similarity_loss_and_grad, x,
                                 neuron_axis=drawn.neuron_axis)
        b_loss, b_grad = backend.run(simcore.similarity_loss_and_grad, x,
                                     neuron_axis=drawn.neuron_axis, block_size=block_size)
        b_only = backend.run(simcore.similarity_loss, x, neuron_axis=drawn.neuron_axis,
                             block_size=block_size)
        # Same arithmetic, different summation grouping: a few units in the last place.
        ulps = 16 * _eps(dtype)
        expected_grad = backend.to_numpy(grad)
        assert_close(b_loss, backend.to_numpy(loss), backend=backend, dtype=dtype,
                     rtol=ulps, atol=ulps)
        assert_close(b_only, backend.to_numpy(loss), backend=backend, dtype=dtype,
                     rtol=ulps, atol=ulps)
        assert_close(b_grad, expected_grad, backend=backend, dtype=dtype, rtol=ulps,
                     atol=ulps * max(np.abs(expected_grad).max(), 1e-30))

    check()


# ----------------------------------------------------------------------------- zero rows


def test_zero_rows_are_excluded_and_get_zero_gradient(backend):
    @given_for(backend, st.data())
    def check(data):
        w = data.draw(strategies.weights(min_neurons=4, max_neurons=8)).w
        zeroed = data.draw(st.lists(st.booleans(), min_size=w.shape[0], max_size=w.shape[0]))
        zeroed = np.asarray(zeroed, dtype=bool)
        assume(np.count_nonzero(~zeroed) >= 2)
        w = w.copy()
        w[zeroed] = 0.0
        loss, grad = _loss_and_grad(backend, w)
        kept_loss, kept_grad = _loss_and_grad(backend, w[~zeroed])
        assert loss == pytest.approx(kept_loss, rel=1e-12, abs=1e-15)
        assert np.all(grad[zeroed] == 0.0)
        np.testing.assert_allclose(grad[~zeroed], kept_grad, rtol=1e-10,
                                   atol=1e-12 * np.abs(kept_grad).max())

    check()


@pytest.mark.parametrize("active", [0, 1])
def test_fewer_than_two_active_rows_give_zero_loss_not_nan(backend, active):
    w = np.zeros((6, 4))
    w[:active] = [1.0, -2.0, 0.5, 0.25]
    for dtype in backend.dtypes:
        x = backend.asarray(w, dtype)
        loss, grad = backend.run(simcore.similarity_loss_and_grad, x)
        assert backend.to_numpy(loss) == 0.0
        assert np.all(backend.to_numpy(grad) == 0.0)
        cosines = backend.to_numpy(backend.run(simcore.similarity_map, x))
        expected = np.zeros((6, 6))
        expected[:active, :active] = np.eye(active)
        np.testing.assert_array_equal(cosines, expected)


# ----------------------------------------------------------------------------- NaN / Inf


def test_nan_input_gives_nan_loss_and_gradient(backend):
    """Documented behaviour: values are never inspected, NaN propagates to the outputs."""
    w = np.random.default_rng(3).standard_normal((6, 4))
    w[2, 1] = np.nan
    loss, grad = backend.run(simcore.similarity_loss_and_grad, backend.asarray(w))
    assert np.isnan(backend.to_numpy(loss))
    assert np.isnan(backend.to_numpy(grad)).any()
    assert np.isnan(backend.to_numpy(backend.run(simcore.similarity_loss, backend.asarray(w))))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_inf_input_gives_nan_loss(backend):
    w = np.random.default_rng(3).standard_normal((6, 4))
    w[2, 1] = np.inf
    loss, _ = backend.run(simcore.similarity_loss_and_grad, backend.asarray(w))
    assert np.isnan(backend.to_numpy(loss))


# ----------------------------------------------------------------------------- weight-sum forms


def test_literal_weight_sum_is_eq_4_exactly(backend):
    @given_for(backend, st.data())
    def check(data):
        w = np.abs(data.draw(strategies.weights(**size_limits(backend))).w) + 0.1
        w_ref = w * data.draw(st.floats(0.1, 10.0))
        w_ref = -w_ref if data.draw(st.booleans()) else w_ref  # |.| makes the sign irrelevant
        value, grad = backend.run(simcore.weight_sum_penalty_and_grad, backend.asarray(w),
                                  backend.asarray(w_ref), form="literal")
        expected = math.log(abs(math.fsum(w.ravel()) / math.fsum(w_ref.ravel())))
        assert_close(value, np.asarray(expected), backend=backend, dtype="float64",
                     rtol=1e-12, atol=1e-13)
        assert_close(grad, np.full(w.shape, 1.0 / math.fsum(w.ravel())), backend=backend,
                     dtype="float64", rtol=1e-12)

    check()


@pytest.mark.parametrize("form", ["squared_log", "abs_log"])
@pytest.mark.parametrize("statistic", simcore.STATISTICS)
def test_well_posed_weight_sum_forms(backend, form, statistic):
    """>= 0, exactly 0 when unchanged, symmetric in (w, w_ref)."""
    options = {"form": form, "statistic": statistic}

    def penalty(a, b):
        value, grad = backend.run(simcore.weight_sum_penalty_and_grad, backend.asarray(a),
                                  backend.asarray(b), **options)
        return float(backend.to_numpy(value)), backend.to_numpy(grad)

    @given_for(backend, st.data())
    def check(data):
        w = data.draw(strategies.weights(**size_limits(backend))).w
        other = w * data.draw(st.floats(0.01, 100.0)) + 0.01
        forward, _ = penalty(w, other)
        backward, _ = penalty(other, w)
        assert forward >= 0.0
        assert forward == pytest.approx(backward, rel=1e-12, abs=1e-15)
        same, same_grad = penalty(w, w.copy())
        assert same == 0.0
        assert np.all(same_grad == 0.0)

    check()


@pytest.mark.parametrize("form", ["squared_log", "abs_log"])
@pytest.mark.parametrize("statistic", simcore.STATISTICS)
def test_well_posed_weight_sum_forms_are_finite_for_all_zero_arrays(backend, form, statistic):
    """An all-zero layer (or reference) gives a finite value >= 0 and a finite gradient,
    and an all-zero layer, whose statistic sits at its floor, gets no gradient at all."""
    w = np.random.default_rng(2).standard_normal((4, 3))
    zeros = np.zeros_like(w)
    for a, b in ((zeros, w), (w, zeros), (zeros, zeros)):
        value, grad = backend.run(simcore.weight_sum_penalty_and_grad, backend.asarray(a),
                                  backend.asarray(b), form=form, statistic=statistic)
        value, grad = float(backend.to_numpy(value)), backend.to_numpy(grad)
        assert math.isfinite(value) and value >= 0.0
        assert np.all(np.isfinite(grad))
        if a is zeros:
            assert np.all(grad == 0.0)


# ----------------------------------------------------------------------------- Eq. 5, decorrelate


@pytest.mark.slow_if(when=_jax_cases_outside("jax"))
def test_growth_objective_is_the_sum_over_layers(backend):
    @given_for(backend, st.data())
    def check(data):
        drawn = [data.draw(strategies.weights(layouts=tuple(strategies.LAYOUTS),
                                              **size_limits(backend))) for _ in range(3)]
        ws = [backend.asarray(d.w) for d in drawn]
        refs = [backend.asarray(d.w * 1.3 + 0.01) for d in drawn]
        axes = [d.neuron_axis for d in drawn]
        lam = 0.7
        value, grads = backend.run(simcore.growth_objective_and_grad, ws, refs, lam=lam,
                                   neuron_axis=axes)
        expected, expected_grads = 0.0, []
        for w, r, axis in zip(ws, refs, axes, strict=True):
            s, gs = backend.run(simcore.similarity_loss_and_grad, w, neuron_axis=axis)
            p, gp = backend.run(simcore.weight_sum_penalty_and_grad, w, r)
            expected += float(backend.to_numpy(s)) + lam * float(backend.to_numpy(p))
            expected_grads.append(backend.to_numpy(gs) + lam * backend.to_numpy(gp))
        assert_close(value, np.asarray(expected), backend=backend)
        for grad, eg in zip(grads, expected_grads, strict=True):
            assert_close(grad, eg, backend=backend)

    check()


@pytest.mark.slow_if(when=_jax_cases_outside("jax"))
def test_decorrelate_lowers_the_objective_and_mutates_nothing(backend):
    # The shapes size_limits gives JAX, so no extra compilation.
    rng = np.random.default_rng(11)
    base = rng.standard_normal((1, 4))
    layers = [base + 0.3 * rng.standard_normal((6, 4)), rng.standard_normal((6, 4, 2, 2)) + 0.5]
    for anchor in simcore.ANCHORS:
        ws = [backend.asarray(w) for w in layers]
        before = [backend.to_numpy(w) for w in ws]
        new = backend.run(simcore.decorrelate, ws, None, steps=4, lr=2.0, lam=0.1,
                          anchor=anchor)
        for w, original in zip(ws, before, strict=True):
            np.testing.assert_array_equal(backend.to_numpy(w), original)
        old_value = backend.run(simcore.growth_objective, ws, ws, lam=0.1)
        new_value = backend.run(simcore.growth_objective, new, ws, lam=0.1)
        assert float(backend.to_numpy(new_value)) < 0.9 * float(backend.to_numpy(old_value))
        for w, n in zip(ws, new, strict=True):
            assert n is not w
            # namespace, device and the input's dtype (the values are n's own)
            assert_close(n, backend.to_numpy(n), backend=backend,
                         dtype=backend.dtype_name(w.dtype))
            assert tuple(n.shape) == tuple(w.shape)


# ----------------------------------------------------------------------------- no mutation


def test_no_function_mutates_its_inputs(backend):
    rng = np.random.default_rng(5)
    w, w_ref = rng.standard_normal((2, 2, 4, 6)), rng.standard_normal((2, 2, 4, 6))
    x, x_ref = backend.asarray(w), backend.asarray(w_ref)
    calls = [
        (simcore.similarity_map, (x,), {}),
        (simcore.similarity_loss, (x,), {"block_size": 2}),
        (simcore.similarity_loss_and_grad, (x,), {"neuron_axis": -1}),
        (simcore.weight_sum_penalty_and_grad, (x, x_ref), {}),
        (simcore.growth_objective_and_grad, ([x], [x_ref]), {"lam": 0.5}),
        (simcore.decorrelate, ([x], [x_ref]), {"steps": 2, "lr": 0.1, "lam": 0.5}),
        (simcore.similarity_stats, (x,), {}),
    ]
    for fn, args, kwargs in calls:
        backend.run(fn, *args, **kwargs)
        np.testing.assert_array_equal(backend.to_numpy(x), w, err_msg=fn.__name__)
        np.testing.assert_array_equal(backend.to_numpy(x_ref), w_ref, err_msg=fn.__name__)


@pytest.mark.slow_if(when=_jax_cases_outside("jax_jit"))
def test_objective_without_the_similarity_term_is_lam_times_eq4(backend):
    """similarity=False (the Table 3 ablation) is exactly lam * sum of Eq. 4 over layers, and
    descending on it leaves every cosine alone (the RMS form only rescales rows)."""
    rng = np.random.default_rng(7)
    ws = [rng.standard_normal((5, 4)), rng.standard_normal((3, 2, 2, 2))]
    refs = [1.5 * w + 0.1 for w in ws]
    xs, x_refs = [backend.asarray(w) for w in ws], [backend.asarray(r) for r in refs]
    expected = [ref.weight_sum_penalty_and_grad(w, r) for w, r in zip(ws, refs, strict=True)]
    value, grads = backend.run(simcore.growth_objective_and_grad, xs, x_refs, lam=0.3,
                               similarity=False)
    assert_close(value, 0.3 * sum(v for v, _ in expected), backend=backend)
    for grad, (_, expected_grad) in zip(grads, expected, strict=True):
        assert_close(grad, 0.3 * expected_grad, backend=backend)
    [moved] = backend.run(simcore.decorrelate, xs[:1], x_refs[:1], steps=5, lr=0.5, lam=1.0,
                          similarity=False)
    assert not np.allclose(backend.to_numpy(moved), ws[0])
    assert_close(simcore.similarity_map(moved), ref.similarity_map(ws[0]), backend=backend,
                 rtol=1e-6)
    with pytest.raises(ValueError, match="needs refs"):
        simcore.growth_objective(xs, None, lam=0.0, similarity=False)


@pytest.mark.slow_if(when=_jax_cases_outside(("jax", "bfloat16"), ("jax_jit", "float16")))
def test_half_precision_stats_are_computed_from_float32_cosines(backend_half):
    """float16/bfloat16 input: the statistics come from float32 cosines of the (rounded)
    input, so they match the reference to float32 accuracy, not half-precision accuracy."""
    backend, dtype = backend_half
    w = np.random.default_rng(3).standard_normal((24, 40))
    stats = backend.run(simcore.similarity_stats, backend.asarray(w, dtype))
    expected = ref.similarity_stats(backend.rounded(w, dtype))
    for key in ("mean_abs", "share_within_half", "max_abs"):
        assert_close(getattr(stats, key), expected[key], backend=backend, dtype="float32",
                     rtol=1e-5, err_msg=key)
