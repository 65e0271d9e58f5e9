"""Every public core function, on every backend and dtype, against the NumPy float64 reference.

Inputs are drawn as NumPy float64, rounded to the dtype under test on the
backend, and the reference is evaluated on the rounded values, so the comparison
measures simcore's arithmetic only (tolerances: ``simcore.testing.TOLERANCES``).
"""

from __future__ import annotations

import numpy as np
import pytest
import simcore.reference as ref
from hypothesis import assume
from hypothesis import strategies as st

import simcore
from simcore.testing import TOLERANCES, assert_close, strategies, tolerance_for
from simcore.testing.strategies import given_for, is_compiling

ALL_LAYOUTS = tuple(strategies.LAYOUTS)

#: Closest a cosine may come to 0 (where the gradient jumps: sign(C_ij)) for the
#: gradient of a rounded computation to be compared with the reference.
SIGN_MARGIN = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-4, "bfloat16": 1e-4}


def _jax_case_outside(covering, *names):
    """A ``slow_if`` predicate: a JAX case whose ``(dtype, *params[names])`` is not in
    ``covering``.

    Under JAX every case compiles its own programs (about a second each on 2 cores). The
    covering set keeps every value of every parameter on each JAX backend and each dtype in
    the fast tier, and every combination of the parameters on one of the two dtypes; the
    eager backends run every case.
    """
    def when(params):
        backend, dtype = params["backend_dtype"]
        return is_compiling(backend) and (dtype, *(params[n] for n in names)) not in covering

    return when


def gradient_atol(w, axis, dtype):
    """Absolute tolerance for a similarity gradient of ``w`` computed in ``dtype``.

    The gradient of row i is a difference of two terms of size up to
    ``2 / (n r_i)`` (the tangent projection), so its rounding error scales with
    that, even where the difference itself is ~0 (e.g. d = 1, where it is exactly 0).
    """
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    norms = np.linalg.norm(rows, axis=1)
    active = norms[norms > simcore.DEFAULT_ZERO_TOL * norms.max()] if norms.max() > 0 else norms[:0]
    if active.size < 2:
        return TOLERANCES[dtype].atol_floor
    return TOLERANCES[dtype].rtol * 2.0 / (active.size * active.min())


def _default_atol(expected, dtype):
    return tolerance_for(expected, dtype)[1]


def _draw_weights(data, backend, dtype, **kwargs):
    draw = data.draw(strategies.weights(**{**strategies.size_limits(backend), **kwargs}))
    x = backend.asarray(draw.w, dtype)
    return x, backend.rounded(draw.w, dtype), draw.neuron_axis


def _check_similarity(backend, dtype, data, **weight_kwargs):
    x, w, axis = _draw_weights(data, backend, dtype, layouts=ALL_LAYOUTS, **weight_kwargs)
    assume(strategies.min_abs_cosine(w, axis) > SIGN_MARGIN[dtype])

    cosines = backend.run(simcore.similarity_map, x, neuron_axis=axis)
    assert_close(cosines, ref.similarity_map(w, neuron_axis=axis), backend=backend, dtype=dtype)

    expected_loss, expected_grad = ref.similarity_loss_and_grad(w, neuron_axis=axis)
    loss = backend.run(simcore.similarity_loss, x, neuron_axis=axis)
    assert_close(loss, expected_loss, backend=backend, dtype=dtype)
    loss, grad = backend.run(simcore.similarity_loss_and_grad, x, neuron_axis=axis)
    assert_close(loss, expected_loss, backend=backend, dtype=dtype)
    assert_close(grad, expected_grad, backend=backend, dtype=dtype,
                 atol=max(gradient_atol(w, axis, dtype), _default_atol(expected_grad, dtype)))


def test_similarity_functions_match_reference(backend_dtype):
    backend, dtype = backend_dtype

    @given_for(backend, data=st.data())
    def check(data):
        _check_similarity(backend, dtype, data)

    check()


def test_similarity_functions_match_reference_with_zero_rows(backend_dtype):
    backend, dtype = backend_dtype

    @given_for(backend, data=st.data())
    def check(data):
        _check_similarity(backend, dtype, data, zero_rows=True)

    check()


def test_similarity_functions_match_reference_in_half_precision(backend_half):
    backend, dtype = backend_half

    @given_for(backend, data=st.data())
    def check(data):
        _check_similarity(backend, dtype, data)

    check()


def test_conv_layouts_agree_through_neuron_axis(backend_dtype):
    """OIHW with neuron_axis=0 and the same kernel as HWIO with neuron_axis=-1 agree."""
    backend, dtype = backend_dtype

    @given_for(backend, data=st.data())
    def check(data):
        draw = data.draw(strategies.weights(layouts=("oihw",), **strategies.size_limits(backend)))
        oihw = backend.asarray(draw.w, dtype)
        hwio = backend.asarray(np.transpose(draw.w, (2, 3, 1, 0)), dtype)
        loss_o, grad_o = backend.run(simcore.similarity_loss_and_grad, oihw, neuron_axis=0)
        loss_h, grad_h = backend.run(simcore.similarity_loss_and_grad, hwio, neuron_axis=-1)
        assume(strategies.min_abs_cosine(draw.w) > SIGN_MARGIN[dtype])
        assert_close(loss_h, backend.to_numpy(loss_o), backend=backend, dtype=dtype)
        grad_o_as_hwio = np.transpose(backend.to_numpy(grad_o), (2, 3, 1, 0))
        atol = max(gradient_atol(draw.w, 0, dtype), _default_atol(grad_o_as_hwio, dtype))
        assert_close(grad_h, grad_o_as_hwio, backend=backend, dtype=dtype, atol=atol)
        map_o = backend.run(simcore.similarity_map, oihw, neuron_axis=0)
        map_h = backend.run(simcore.similarity_map, hwio, neuron_axis=3)
        assert_close(map_h, backend.to_numpy(map_o), backend=backend, dtype=dtype)

    check()


def _penalty_inputs(data, backend, dtype, form):
    draw = data.draw(strategies.weights(layouts=ALL_LAYOUTS, **strategies.size_limits(backend)))
    factor = data.draw(st.floats(0.25, 4.0))
    noise = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    w_ref = draw.w * factor + 0.1 * noise.standard_normal(draw.w.shape)
    w = draw.w
    if form == "literal":  # log|sum w / sum w_ref| is ill-conditioned when a sum is near 0
        w, w_ref = np.abs(w) + 0.1, np.abs(w_ref) + 0.1
    return (backend.asarray(w, dtype), backend.asarray(w_ref, dtype),
            backend.rounded(w, dtype), backend.rounded(w_ref, dtype))


@pytest.mark.slow_if(when=_jax_case_outside({
    ("float32", "squared_log", "mean_abs"), ("float32", "abs_log", "rms"),
    ("float32", "literal", "mean_abs"), ("float64", "squared_log", "rms"),
    ("float64", "abs_log", "mean_abs"), ("float64", "literal", "rms")}, "form", "statistic"))
@pytest.mark.parametrize("form", simcore.FORMS)
@pytest.mark.parametrize("statistic", simcore.STATISTICS)
def test_weight_sum_penalty_matches_reference(backend_dtype, form, statistic):
    backend, dtype = backend_dtype

    @given_for(backend, data=st.data())
    def check(data):
        x, x_ref, w, w_ref = _penalty_inputs(data, backend, dtype, form)
        options = {"form": form, "statistic": statistic}
        expected, expected_grad = ref.weight_sum_penalty_and_grad(w, w_ref, **options)
        # |log q - log q_ref| has a kink at 0 (sign(0) = 0): stay clear of it.
        assume(form != "abs_log" or abs(expected) > 1e-6)
        # Every form is a log of a ratio of two reductions: its error is absolute, a few
        # rounding steps of the dtype, however small the value itself is.
        log_atol = 32 * float(np.finfo(np.float32 if dtype == "float32" else np.float64).eps)
        value = backend.run(simcore.weight_sum_penalty, x, x_ref, **options)
        assert_close(value, expected, backend=backend, dtype=dtype, atol=log_atol)
        value, grad = backend.run(simcore.weight_sum_penalty_and_grad, x, x_ref, **options)
        assert_close(value, expected, backend=backend, dtype=dtype, atol=log_atol)
        assert_close(grad, expected_grad, backend=backend, dtype=dtype)

    check()


@pytest.mark.parametrize("form", ["squared_log", "literal"])
def test_weight_sum_penalty_matches_reference_in_half_precision(backend_half, form):
    backend, dtype = backend_half

    @given_for(backend, data=st.data())
    def check(data):
        x, x_ref, w, w_ref = _penalty_inputs(data, backend, dtype, form)
        expected, expected_grad = ref.weight_sum_penalty_and_grad(w, w_ref, form=form)
        value, grad = backend.run(simcore.weight_sum_penalty_and_grad, x, x_ref, form=form)
        assert_close(value, expected, backend=backend, dtype=dtype)
        assert_close(grad, expected_grad, backend=backend, dtype=dtype)

    check()


def _layers(data, backend, dtype, count):
    drawn = [data.draw(strategies.weights(layouts=ALL_LAYOUTS, **strategies.size_limits(backend)))
             for _ in range(count)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    refs = [d.w * rng.uniform(0.5, 2.0) + 0.1 * rng.standard_normal(d.w.shape) for d in drawn]
    axes = [d.neuron_axis for d in drawn]
    for d in drawn:
        assume(strategies.min_abs_cosine(backend.rounded(d.w, dtype), d.neuron_axis)
               > SIGN_MARGIN[dtype])
    return (
        [backend.asarray(d.w, dtype) for d in drawn],
        [backend.asarray(r, dtype) for r in refs],
        [backend.rounded(d.w, dtype) for d in drawn],
        [backend.rounded(r, dtype) for r in refs],
        axes,
    )


def test_growth_objective_matches_reference(backend_dtype):
    backend, dtype = backend_dtype

    @given_for(backend, data=st.data())
    def check(data):
        # Keyword arguments are static under jax.jit: vary them on eager backends only.
        count = 2 if is_compiling(backend) else data.draw(st.integers(1, 3))
        xs, x_refs, ws, w_refs, axes = _layers(data, backend, dtype, count)
        lam = 0.5 if is_compiling(backend) else data.draw(st.floats(0.0, 2.0))
        options = {"lam": lam, "neuron_axis": axes}
        expected, expected_grads = ref.growth_objective_and_grad(ws, w_refs, **options)
        value = backend.run(simcore.growth_objective, xs, x_refs, **options)
        assert_close(value, expected, backend=backend, dtype=dtype)
        value, grads = backend.run(simcore.growth_objective_and_grad, xs, x_refs, **options)
        assert_close(value, expected, backend=backend, dtype=dtype)
        assert len(grads) == count
        for grad, expected_grad, w, axis in zip(grads, expected_grads, ws, axes, strict=True):
            atol = max(gradient_atol(w, axis, dtype), _default_atol(expected_grad, dtype))
            assert_close(grad, expected_grad, backend=backend, dtype=dtype, atol=atol)

    check()


@pytest.mark.slow_if(when=_jax_case_outside({
    ("float32", "snapshot", "absolute"), ("float32", "previous", "relative"),
    ("float64", "snapshot", "relative"), ("float64", "previous", "absolute")}, "anchor", "step"))
@pytest.mark.parametrize("step", simcore.STEPS)
@pytest.mark.parametrize("anchor", simcore.ANCHORS)
def test_decorrelate_matches_a_reference_gradient_descent_loop(backend_dtype, anchor, step):
    backend, dtype = backend_dtype

    @given_for(backend, data=st.data())
    def check(data):
        xs, x_refs, ws, w_refs, axes = _layers(data, backend, dtype, 2)
        steps, lr, lam = 3, 0.05, 0.5
        new = backend.run(simcore.decorrelate, xs, x_refs, steps=steps, lr=lr, lam=lam,
                          anchor=anchor, neuron_axis=axes, step=step)
        current, anchors = ws, w_refs
        for _ in range(steps):
            sims = [ref.similarity_loss_and_grad(w, neuron_axis=axis)[1]
                    for w, axis in zip(current, axes, strict=True)]
            sums = [lam * ref.weight_sum_penalty_and_grad(w, r)[1]
                    for w, r in zip(current, anchors, strict=True)]
            if anchor == "previous":
                anchors = current
            if step == "relative":
                moved = ref.relative_update(current, sims, sums, lr=lr, neuron_axis=axes)
            else:
                moved = [w - lr * (g + h) for w, g, h in zip(current, sims, sums, strict=True)]
            current = [backend.rounded(w, dtype) for w in moved]
        assert len(new) == 2
        for got, expected in zip(new, current, strict=True):
            assert_close(got, expected, backend=backend, dtype=dtype)

    check()


def test_similarity_stats_match_reference(backend_dtype):
    backend, dtype = backend_dtype

    @given_for(backend, data=st.data())
    def check(data):
        x, w, axis = _draw_weights(data, backend, dtype, layouts=ALL_LAYOUTS, zero_rows=True)
        bins = 8 if is_compiling(backend) else data.draw(st.integers(1, 12))
        expected = ref.similarity_stats(w, neuron_axis=axis, bins=bins)
        # A cosine within rounding of a bin edge (or of +-0.5) may land on either side.
        full = ref.similarity_map(w, neuron_axis=axis)
        active = np.flatnonzero(np.diag(full) == 1.0)  # zero rows have 0 on the diagonal
        cosines = full[np.ix_(active, active)][np.triu_indices(active.size, 1)]
        edges = np.concatenate([expected["edges"], [-0.5, 0.5]])
        if cosines.size:
            assume(np.min(np.abs(cosines[:, None] - edges[None, :])) > 1e-4)
        stats = backend.run(simcore.similarity_stats, x, neuron_axis=axis, bins=bins)
        assert isinstance(stats, simcore.SimilarityStats)
        integer = backend.xp.__array_namespace_info__().default_dtypes(device=backend.device)
        integer = backend.dtype_name(integer["integral"])
        assert_close(stats.counts, expected["counts"], backend=backend, dtype=integer)
        assert_close(stats.pairs, np.asarray(expected["pairs"]), backend=backend, dtype=integer)
        assert_close(stats.edges, expected["edges"], backend=backend, dtype=dtype)
        for key in ("share_within_half", "mean_abs", "max_abs"):
            assert_close(getattr(stats, key), expected[key], backend=backend, dtype=dtype,
                         err_msg=key)

    check()
