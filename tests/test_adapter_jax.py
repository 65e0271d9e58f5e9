"""simcore.adapters.jax: custom_vjp wrappers, kernel finder, optax transform, penalty, examples.

The oracle is simcore.reference (NumPy float64 loops, no code shared with the
core); JAX runs in float32, compared with simcore.testing.assert_close.
"""

from __future__ import annotations

import logging
import runpy
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from simcore.adapters import jax as sj  # noqa: E402

import simcore  # noqa: E402
from simcore import reference  # noqa: E402
from simcore.extend import RawRows  # noqa: E402
from simcore.testing import assert_close, get_backend, strategies  # noqa: E402

JAX = get_backend("jax")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _f32(x):
    return jnp.asarray(np.asarray(x), dtype=jnp.float32)


# -- the custom_vjp loss -------------------------------------------------------------------


def _grad_atol(w, neuron_axis):
    # The gradient scales like 1/||w_i||: float32 rounding noise does too.
    rows = np.moveaxis(np.asarray(w, np.float64), neuron_axis, 0).reshape(w.shape[neuron_axis], -1)
    norms = np.linalg.norm(rows, axis=1)
    return 1e-5 / max(min(norms[norms > 0], default=1.0), 1e-3)


@settings(max_examples=6)
@given(strategies.weights(layouts=("dense", "dense_io", "hwio", "oihw"), zero_rows=True))
def test_value_and_grad_match_reference(draw):
    w = _f32(draw.w)
    value, grad = jax.value_and_grad(lambda x: sj.similarity_loss(x, neuron_axis=draw.neuron_axis))(
        w
    )
    want_value, want_grad = reference.similarity_loss_and_grad(
        np.asarray(w, np.float64), neuron_axis=draw.neuron_axis
    )
    assert_close(value, np.asarray(want_value), backend=JAX, dtype="float32")
    atol = _grad_atol(w, draw.neuron_axis)
    assert_close(grad, want_grad, backend=JAX, dtype="float32", atol=atol)


def test_grad_is_the_core_gradient_scaled_by_the_cotangent():
    w = _f32(np.random.default_rng(0).standard_normal((6, 5)))
    _, core_grad = simcore.similarity_loss_and_grad(w)
    grad = jax.grad(sj.similarity_loss)(w)
    scaled = jax.grad(lambda x: 3.0 * sj.similarity_loss(x))(w)
    np.testing.assert_allclose(np.asarray(scaled), 3.0 * np.asarray(grad), rtol=1e-6)
    # The same gradient as NumPy's, to float32 rounding (the two sum in different orders).
    assert_close(grad, np.asarray(core_grad), backend=JAX, dtype="float32")


def _layer(scale=1.0, zero_row=False, n=10, d=7, row_scale=0.0):
    rows = np.random.default_rng(5).standard_normal((n, d))
    if zero_row:
        rows[3] *= row_scale
    return rows * scale


# The raw Gram matrix overflows (1e20^2 d), underflows (1e-21^2), or a row's square underflows
# to 0 where that decides its activity (zero_tol=0: a zero row cannot be told from it): the
# unit rows' branch runs there.
RAW_GRAM_CASES = {
    "ordinary": (_layer(), None, True),
    "zero row": (_layer(zero_row=True), None, True),
    "huge": (_layer(1e20), None, False),
    "tiny": (_layer(1e-21), None, False),
    "zero row, zero_tol=0": (_layer(zero_row=True), 0.0, False),
    "underflowing row, zero_tol=0": (_layer(zero_row=True, row_scale=1e-25), 0.0, False),
}


def test_the_raw_gram_branch_runs_where_it_is_exact_and_both_match_the_reference():
    # One compiled function per zero_tol (a static option), not per case.
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda x, tol: sj.similarity_loss(x, zero_tol=tol, block_size=4)), static_argnums=1)
    for case, (rows, zero_tol, safe) in RAW_GRAM_CASES.items():
        w = _f32(rows)
        assert bool(RawRows(w, 0, zero_tol).safe) is safe, case
        value, grad = value_and_grad(w, zero_tol)
        want_value, want_grad = reference.similarity_loss_and_grad(rows, zero_tol=zero_tol)
        assert_close(value, np.asarray(want_value), backend=JAX, dtype="float32")
        assert_close(grad, want_grad, backend=JAX, dtype="float32")


@pytest.mark.parametrize("block_size", [None, 4])  # one tile; three with a padding row
def test_the_raw_gram_and_unit_row_branches_agree_over_tiles_and_padding(block_size):
    from simcore.adapters.jax import _loss

    w = _f32(_layer(zero_row=True, n=11, d=9))
    tol = simcore.DEFAULT_ZERO_TOL
    raw = _loss._from_raw_gram(RawRows(w, -1, tol), block_size, True)
    unit = _loss._from_unit_rows(w, -1, block_size, tol, True)
    assert_close(raw[0], np.asarray(unit[0]), backend=JAX, dtype="float32")
    assert_close(raw[1], np.asarray(unit[1]), backend=JAX, dtype="float32")
    assert float(jnp.abs(raw[1]).max()) > 0


def test_a_batch_mixing_exact_and_inexact_raw_grams_is_right_for_each_layer():
    layers = [_layer(), _layer(1e20), _layer(1e-21), _layer(zero_row=True)]
    batch = jnp.stack([_f32(rows) for rows in layers])
    values, grads = jax.vmap(jax.value_and_grad(sj.similarity_loss))(batch)
    for rows, value, grad in zip(layers, values, grads, strict=True):
        want_value, want_grad = reference.similarity_loss_and_grad(rows)
        assert_close(value, np.asarray(want_value), backend=JAX, dtype="float32")
        assert_close(grad, want_grad, backend=JAX, dtype="float32")


def test_orthonormal_rows_get_an_exactly_zero_gradient_unlike_jnp_abs_autodiff():
    w = jnp.eye(4, 6, dtype=jnp.float32)
    ours = jax.grad(sj.similarity_loss)(w)
    assert np.all(np.asarray(ours) == 0.0)

    # Why the wrapper exists: JAX gives |x| slope +1 at 0, so the textbook
    # jnp.abs formulation of Eq. 2 pushes orthonormal rows off their optimum.
    def abs_loss(x):
        u = x / jnp.linalg.norm(x, axis=1, keepdims=True)
        c = jnp.abs(u @ u.T)
        n = x.shape[0]
        return (jnp.sum(c) - jnp.trace(c)) / (n * (n - 1))

    assert float(jnp.abs(jax.grad(abs_loss)(w)).max()) > 0.1
    # The core writes |C| as sign(C) * C, whose autodiff slope at 0 happens to be 0:
    # plain jax.grad of the core is right here by implementation detail, not contract.
    assert np.all(np.asarray(jax.grad(simcore.similarity_loss)(w)) == 0.0)


@settings(max_examples=5)
@given(strategies.orthogonal_rows())
def test_exactly_orthogonal_rows_get_an_exactly_zero_gradient(w):
    value, grad = jax.value_and_grad(sj.similarity_loss)(_f32(w))
    assert float(value) == 0.0 and not np.any(np.asarray(grad))


def test_zero_rows_get_zero_gradient_from_the_adapter_and_through_the_core():
    w = _f32([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [2.0, -0.5, 1.0]])
    ours = np.asarray(jax.grad(sj.similarity_loss)(w))
    assert np.all(np.isfinite(ours)) and np.all(ours[1] == 0.0)
    _, want = reference.similarity_loss_and_grad(np.asarray(w, np.float64))
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-7)
    # Autodiff through the core's own value path: its square roots never see 0 (issue 14).
    plain = np.asarray(jax.grad(simcore.similarity_loss)(w))
    assert np.all(plain[1] == 0.0)
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-7)


def test_block_path_gives_the_same_value_and_gradient():
    w = _f32(np.random.default_rng(1).standard_normal((3, 3, 4, 10)))
    full = jax.value_and_grad(lambda x: sj.similarity_loss(x, neuron_axis=-1))(w)
    blocked = jax.jit(
        jax.value_and_grad(lambda x: sj.similarity_loss(x, neuron_axis=-1, block_size=3))
    )(w)
    np.testing.assert_allclose(float(blocked[0]), float(full[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(blocked[1]), np.asarray(full[1]), rtol=1e-5, atol=1e-7)


def test_vmap_over_a_stack_of_layers_matches_a_python_loop():
    stack = _f32(np.random.default_rng(2).standard_normal((5, 3, 3, 2, 7)))
    stack = stack.at[2, ..., 4].set(0.0)  # a zero neuron in one layer

    def one(w):
        return sj.similarity_loss(w, neuron_axis=-1)

    values, grads = jax.jit(jax.vmap(jax.value_and_grad(one)))(stack)
    total_grad = jax.grad(lambda s: jnp.sum(jax.vmap(one)(s)))(stack)
    for i in range(stack.shape[0]):
        value, grad = jax.value_and_grad(one)(stack[i])
        np.testing.assert_allclose(float(values[i]), float(value), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(grads[i]), np.asarray(grad), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            np.asarray(total_grad[i]), np.asarray(grad), rtol=1e-5, atol=1e-7
        )


def test_similarity_loss_rejects_non_jax_input():
    with pytest.raises(TypeError, match="w must be a jax.Array"):
        sj.similarity_loss(np.eye(3))


def test_options_are_checked_before_they_become_static_arguments():
    w = jnp.ones((3, 4))
    with pytest.raises(TypeError, match="zero_tol must be a float or None"):
        sj.similarity_loss(w, zero_tol=jnp.float32(1e-6))  # an array is not hashable
    with pytest.raises(TypeError, match="neuron_axis must be an int"):
        sj.similarity_loss(w, neuron_axis=1.5)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        sj.similarity_loss(w, block_size=0)


def test_an_eager_call_compiles_once_per_shape():
    # lax.scan caches by its body's identity, and the bodies are closures made per call: an
    # eager call used to trace and compile the tile loop every time (65 ms for a tiny layer).
    compiled = []

    class Compilations(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling"):
                compiled.append(record.getMessage())

    handler = Compilations()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    value_and_grad = jax.value_and_grad(sj.similarity_loss)
    w = jnp.arange(30.0).reshape(6, 5) ** 0.5
    other = w[::-1] * 2.0  # same shape, other values
    try:
        with jax.log_compiles(True):
            first = value_and_grad(w)
            sj.similarity_loss(w)
            warm = len(compiled)
            again = [value_and_grad(w) for _ in range(3)]
            for _ in range(2):
                sj.similarity_loss(w)
                value_and_grad(other)
    finally:
        logger.removeHandler(handler)
    assert warm > 0  # the compilations do reach the handler
    assert compiled[warm:] == []
    np.testing.assert_array_equal(np.asarray(again[0][1]), np.asarray(first[1]))


# -- Eq. 5 over layers ---------------------------------------------------------------------


@settings(max_examples=3)
@given(st.sampled_from(["squared_log", "abs_log", "literal"]), st.integers(0, 2**31 - 1))
def test_growth_objective_matches_reference_and_refs_get_no_gradient(form, seed):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((5, 4)) + 0.5, rng.standard_normal((3, 3, 2, 6)) + 0.5]
    refs = [w * rng.uniform(0.7, 1.3) for w in weights]
    axes = [0, -1]
    ws, rs = [_f32(w) for w in weights], [_f32(r) for r in refs]

    def objective(ws, rs):
        return sj.growth_objective(ws, rs, lam=0.3, form=form, neuron_axis=axes)

    value, (grads, ref_grads) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))(ws, rs)
    f64 = [np.asarray(x, np.float64) for x in ws], [np.asarray(x, np.float64) for x in rs]
    want_value, want_grads = reference.growth_objective_and_grad(
        *f64, lam=0.3, form=form, neuron_axis=axes
    )
    assert_close(value, np.asarray(want_value), backend=JAX, dtype="float32")
    for grad, want in zip(grads, want_grads, strict=True):
        assert_close(grad, want, backend=JAX, dtype="float32")
    assert all(np.all(np.asarray(g) == 0.0) for g in ref_grads)


def test_growth_objective_without_refs_is_the_sum_of_similarity_losses():
    ws = [_f32(np.random.default_rng(3).standard_normal((4, 6))), jnp.eye(3)]
    value, grads = jax.value_and_grad(sj.growth_objective)(ws)
    np.testing.assert_allclose(
        float(value), float(sj.similarity_loss(ws[0]) + sj.similarity_loss(ws[1])), rtol=1e-6
    )
    # the loss runs as one compiled program from the raw Gram matrix, the objective op by op
    # from the unit rows: float32 rounding apart
    assert_close(grads[0], np.asarray(jax.grad(sj.similarity_loss)(ws[0])), backend=JAX,
                 dtype="float32")


def test_growth_objective_without_similarity_is_lam_times_the_reference_weight_sum_penalty():
    # The paper's Table 3 ablation: Eq. 5 with the Eq. 2 term left out.
    rng = np.random.default_rng(11)
    weights = [rng.standard_normal((4, 6)) + 0.3, rng.standard_normal((3, 3, 2, 5)) + 0.3]
    refs = [w * rng.uniform(0.6, 1.4) for w in weights]
    axes, lam = [0, -1], 0.7
    ws, rs = [_f32(w) for w in weights], [_f32(r) for r in refs]

    def objective(ws):
        return sj.growth_objective(ws, rs, lam=lam, neuron_axis=axes, similarity=False)

    value, grads = jax.jit(jax.value_and_grad(objective))(ws)
    want_value = 0.0
    for w, r, grad in zip(ws, rs, grads, strict=True):
        v, g = reference.weight_sum_penalty_and_grad(
            np.asarray(w, np.float64), np.asarray(r, np.float64)
        )
        want_value += lam * v
        assert_close(grad, lam * g, backend=JAX, dtype="float32")
    assert_close(value, np.asarray(want_value), backend=JAX, dtype="float32")
    with pytest.raises(ValueError, match="needs refs"):
        sj.growth_objective(ws, similarity=False)


def test_growth_objective_argument_errors():
    with pytest.raises(TypeError, match="weights must be a sequence"):
        sj.growth_objective(jnp.eye(3))
    with pytest.raises(TypeError, match=r"weights\[1\] must be a jax.Array"):
        sj.growth_objective([jnp.eye(3), np.eye(3)])
    with pytest.raises(ValueError, match="refs is None"):
        sj.growth_objective([jnp.eye(3)], lam=0.5)


# -- kernels in Flax and Equinox trees -----------------------------------------------------


def _zeros_like_init(module, x):
    """Zeros in the structure and shapes of ``module.init``'s variables: all that finding kernels
    reads, without drawing the random initial values (eager init compiles each draw)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def test_find_kernels_in_linen_params():
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.Conv(8, (3, 3), feature_group_count=8)(x)
            x = nn.LayerNorm()(x)
            return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    variables = _zeros_like_init(Net(), jnp.zeros((1, 4, 4, 2)))
    params = variables["params"]
    assert sj.find_kernels(params, depthwise="include") == {
        "Conv_0/kernel": -1,
        "Conv_1/kernel": -1,
        "Dense_0/kernel": -1,
    }
    assert sj.find_kernels(params) == sj.find_kernels(params, depthwise="exclude") == {
        "Conv_0/kernel": -1,
        "Dense_0/kernel": -1,
    }
    assert sj.find_kernels(params, depthwise="only") == {"Conv_1/kernel": -1}
    assert list(sj.find_kernels(variables, depthwise="include")) == [
        "params/Conv_0/kernel",
        "params/Conv_1/kernel",
        "params/Dense_0/kernel",
    ]


def test_find_kernels_in_nnx_modules_and_states():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
            self.norm = nnx.BatchNorm(8, rngs=rngs)
            self.head = nnx.Linear(8, 4, rngs=rngs)

    model = Net(nnx.Rngs(0))
    kernels = sj.find_kernels(model, depthwise="include")
    assert kernels == {"conv/kernel": -1, "depthwise/kernel": -1, "head/kernel": -1}
    assert sj.find_kernels(model) == {"conv/kernel": -1, "head/kernel": -1}  # the default
    assert sj.find_kernels(model, depthwise="exclude") == {"conv/kernel": -1, "head/kernel": -1}
    _, state = nnx.split(model, nnx.Param, ...)[:2]
    # The names match those of the split state's leaves, so they select there.
    names = sj.named_leaves(state)
    assert set(kernels) <= set(names)
    assert names["head/kernel"].shape == (8, 4)
    assert sj.find_kernels(state, layout="nnx", depthwise="include") == kernels
    # ... and the penalty runs on the state (jax.grad gives a State of the same shape).
    value, grads = jax.value_and_grad(lambda s: sj.penalty(s, neuron_axis=kernels))(state)
    want = sum(float(sj.similarity_loss(names[k], neuron_axis=-1)) for k in kernels)
    assert float(value) == pytest.approx(want, rel=1e-6)
    assert sj.named_leaves(grads)["head/kernel"].shape == (8, 4)


def test_find_kernels_in_equinox_modules():
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), 4)
    model = [
        eqx.nn.Conv2d(3, 6, 3, key=keys[0]),
        eqx.nn.Conv2d(6, 6, 3, groups=6, key=keys[1]),
        eqx.nn.LayerNorm(6),
        eqx.nn.Linear(6, 2, key=keys[2]),
    ]
    model = eqx.nn.Sequential(model)
    kernels = sj.find_kernels(model, depthwise="include")
    assert kernels == {"layers/0/weight": 0, "layers/1/weight": 0, "layers/3/weight": 0}
    assert sj.find_kernels(model) == sj.find_kernels(model, depthwise="exclude") == {
        "layers/0/weight": 0,
        "layers/3/weight": 0,
    }
    names = sj.named_leaves(eqx.filter(model, eqx.is_array))
    assert names["layers/0/weight"].shape == (6, 3, 3, 3)  # OIHW: neurons on axis 0


def test_grouped_but_not_depthwise_convs_are_not_depthwise():
    # ResNeXt-style: groups=2 over 4 input channels reads 2 channels per group,
    # so simcore.growth.is_depthwise(4, 2) is False in every layout.
    assert not simcore.growth.is_depthwise(4, 2)
    nnx = pytest.importorskip("flax.nnx")
    eqx = pytest.importorskip("equinox")
    nn = pytest.importorskip("flax.linen")

    class NnxNet(nnx.Module):
        def __init__(self, rngs):
            self.grouped = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
            self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)

    nnx_model = NnxNet(nnx.Rngs(0))
    assert sj.find_kernels(nnx_model, depthwise="only") == {"depthwise/kernel": -1}
    assert sj.find_kernels(nnx_model, depthwise="exclude") == {"grouped/kernel": -1}

    keys = jax.random.split(jax.random.key(1), 2)
    eqx_model = eqx.nn.Sequential(
        [
            eqx.nn.Conv2d(4, 4, 3, groups=2, key=keys[0]),
            eqx.nn.Conv2d(4, 4, 3, groups=4, key=keys[1]),
        ]
    )
    assert sj.find_kernels(eqx_model, depthwise="only") == {"layers/1/weight": 0}
    assert sj.find_kernels(eqx_model, depthwise="exclude") == {"layers/0/weight": 0}

    linen_model = nn.Sequential(
        [nn.Conv(4, (3, 3), feature_group_count=2), nn.Conv(4, (3, 3), feature_group_count=4)]
    )
    params = _zeros_like_init(linen_model, jnp.zeros((1, 5, 5, 4)))["params"]
    assert sj.find_kernels(params, depthwise="only") == {"layers_1/kernel": -1}


def test_find_kernels_argument_errors():
    with pytest.raises(ValueError, match="unknown layout"):
        sj.find_kernels({}, layout="keras")
    with pytest.raises(ValueError, match="unknown depthwise"):
        sj.find_kernels({}, depthwise="maybe")
    with pytest.raises(TypeError, match="cannot tell the layout"):
        sj.find_kernels([jnp.zeros((2, 2))])


# -- penalty over a pytree -----------------------------------------------------------------


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv": {
            "kernel": _f32(rng.standard_normal((3, 3, 2, 5))),
            "bias": _f32(rng.standard_normal(5)),
        },
        "dense": {
            "kernel": _f32(rng.standard_normal((5, 4))),
            "bias": _f32(rng.standard_normal(4)),
        },
        "norm": {"scale": jnp.ones(5)},
    }


def test_penalty_over_a_pytree_equals_the_objective_of_its_kernels():
    params = _params()
    refs = jax.tree_util.tree_map(lambda x: 1.2 * x, params)
    kernels = [params["conv"]["kernel"], params["dense"]["kernel"]]
    ref_kernels = [refs["conv"]["kernel"], refs["dense"]["kernel"]]
    want = sj.growth_objective(kernels, ref_kernels, lam=0.5, neuron_axis=-1)
    got, grads = jax.value_and_grad(
        lambda p: sj.penalty(p, neuron_axis=sj.find_kernels(p), refs=refs, lam=0.5)
    )(params)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    _, want_grads = simcore.growth_objective_and_grad(kernels, ref_kernels, lam=0.5, neuron_axis=-1)
    np.testing.assert_allclose(
        np.asarray(grads["dense"]["kernel"]), np.asarray(want_grads[1]), rtol=1e-5
    )
    assert np.all(np.asarray(grads["conv"]["bias"]) == 0.0)
    assert np.all(np.asarray(grads["norm"]["scale"]) == 0.0)
    # An int axis selects every leaf with >= 2 dims (the two kernels here).
    np.testing.assert_allclose(
        float(sj.penalty(params, refs=refs, lam=0.5)), float(want), rtol=1e-6
    )


def test_penalty_mask_as_tree_and_callable():
    params = _params()
    only_dense = {
        "conv": {"kernel": False, "bias": False},
        "dense": {"kernel": True, "bias": False},
        "norm": {"scale": False},
    }
    want = float(sj.similarity_loss(params["dense"]["kernel"], neuron_axis=-1))
    assert float(sj.penalty(params, mask=only_dense)) == pytest.approx(want, rel=1e-6)
    assert float(sj.penalty(params, mask=lambda p: only_dense)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="structure of params"):
        sj.penalty(params, mask={"conv": True})
    with pytest.raises(ValueError, match="does not have"):
        sj.penalty(params, neuron_axis={"nope/kernel": -1})
    with pytest.raises(ValueError, match="no parameter is selected"):
        sj.penalty(params, mask=jax.tree_util.tree_map(lambda _: False, params))
    with pytest.raises(TypeError, match="neuron_axis must be"):
        sj.penalty(params, neuron_axis="last")


# -- the optax transform -------------------------------------------------------------------


def test_add_similarity_gradient_adds_strength_times_the_core_gradient():
    params = _params()
    kernels = sj.find_kernels(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    tx = sj.add_similarity_gradient(0.25, neuron_axis=kernels)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    _, core = simcore.growth_objective_and_grad(
        [params["conv"]["kernel"], params["dense"]["kernel"]], None, lam=0.0, neuron_axis=-1
    )
    np.testing.assert_allclose(
        np.asarray(updates["conv"]["kernel"]), 1.0 + 0.25 * np.asarray(core[0]), rtol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(updates["dense"]["kernel"]), 1.0 + 0.25 * np.asarray(core[1]), rtol=1e-6
    )
    assert np.all(np.asarray(updates["conv"]["bias"]) == 1.0)
    assert int(state.count) == 1 and state.refs == {}


def test_add_similarity_gradient_in_a_chain_equals_sgd_on_task_plus_penalty():
    params = _params(4)
    kernels = sj.find_kernels(params)
    strength, lr = 0.5, 0.1

    def task(p):
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(p))

    tx = optax.chain(sj.add_similarity_gradient(strength, neuron_axis=kernels), optax.sgd(lr))
    state = tx.init(params)
    updates, state = tx.update(jax.grad(task)(params), state, params)
    stepped = optax.apply_updates(params, updates)
    full = jax.grad(lambda p: task(p) + strength * sj.penalty(p, neuron_axis=kernels))(params)
    want = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, full)
    for got, exp in zip(
        jax.tree_util.tree_leaves(stepped), jax.tree_util.tree_leaves(want), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), rtol=1e-5, atol=1e-6)


def test_strength_schedule_reads_the_step_count():
    params = {"kernel": _f32([[1.0, 1.0], [1.0, 0.0]])}
    zeros = {"kernel": jnp.zeros((2, 2))}
    tx = sj.add_similarity_gradient(optax.linear_schedule(0.0, 2.0, 2))
    state = tx.init(params)
    first, state = tx.update(zeros, state, params)
    second, state = tx.update(zeros, state, params)
    assert np.all(np.asarray(first["kernel"]) == 0.0)  # strength 0 at step 0
    _, core = simcore.similarity_loss_and_grad(params["kernel"], neuron_axis=-1)
    np.testing.assert_allclose(np.asarray(second["kernel"]), 1.0 * np.asarray(core), rtol=1e-6)
    assert int(state.count) == 2


def test_refs_snapshot_and_previous():
    params = {"kernel": _f32(np.random.default_rng(5).standard_normal((4, 3)))}
    moved = {"kernel": 1.5 * params["kernel"]}
    zeros = {"kernel": jnp.zeros((4, 3))}

    snap = sj.add_similarity_gradient(1.0, lam=2.0, anchor="snapshot")
    state = snap.init(params)
    assert state.refs["kernel"] is params["kernel"]
    updates, state = snap.update(zeros, state, moved)
    _, core = simcore.growth_objective_and_grad(
        [moved["kernel"]], [params["kernel"]], lam=2.0, neuron_axis=-1
    )
    np.testing.assert_allclose(np.asarray(updates["kernel"]), np.asarray(core[0]), rtol=1e-6)
    assert state.refs["kernel"] is params["kernel"]  # the snapshot stays

    prev = sj.add_similarity_gradient(1.0, lam=2.0, anchor="previous")
    state = prev.init(params)
    _, state = prev.update(zeros, state, moved)
    assert state.refs["kernel"] is moved["kernel"]  # the next step compares with this one

    with pytest.warns(DeprecationWarning, match="refs"):  # the old spelling, for one release
        old = sj.add_similarity_gradient(1.0, lam=2.0, refs="previous")
    _, state = old.update(zeros, old.init(params), moved)
    assert state.refs["kernel"] is moved["kernel"]


def test_an_objective_replaces_the_keywords():
    params = {"kernel": _f32(np.random.default_rng(6).standard_normal((4, 3)))}
    moved = {"kernel": 1.5 * params["kernel"]}
    objective = simcore.Objective(lam=2.0, form="abs_log")
    by_keywords = sj.penalty(moved, refs=params, lam=2.0, form="abs_log")
    assert float(sj.penalty(moved, refs=params, objective=objective)) == float(by_keywords)
    # A frozen, hashable objective is a static argument of jit.
    jitted = jax.jit(lambda w, r, o: sj.growth_objective([w], [r], objective=o),
                     static_argnums=2)
    want = sj.growth_objective([moved["kernel"]], [params["kernel"]], lam=2.0, form="abs_log")
    assert float(jitted(moved["kernel"], params["kernel"], objective)) == float(want)
    with pytest.raises(TypeError, match="not both"):
        sj.penalty(moved, refs=params, objective=objective, lam=1.0)
    with pytest.raises(ValueError, match="neuron_axis"):
        sj.penalty(moved, objective=objective.replace(neuron_axis=-1))


def test_penalty_and_optax_transform_without_similarity_use_only_lam_times_eq4():
    params = _params(7)
    kernels = sj.find_kernels(params)
    moved = jax.tree_util.tree_map(lambda x: 1.3 * x, params)
    names = sorted(kernels)
    old = [sj.named_leaves(params)[n] for n in names]
    new = [sj.named_leaves(moved)[n] for n in names]
    lam = 0.4
    want = [
        reference.weight_sum_penalty_and_grad(np.asarray(w, np.float64), np.asarray(r, np.float64))
        for w, r in zip(new, old, strict=True)
    ]

    value = sj.penalty(moved, neuron_axis=kernels, refs=params, lam=lam, similarity=False)
    assert_close(value, np.asarray(lam * sum(v for v, _ in want)), backend=JAX, dtype="float32")

    tx = sj.add_similarity_gradient(2.0, neuron_axis=kernels, lam=lam, similarity=False)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), moved)
    got = sj.named_leaves(updates)
    for name, (_, grad) in zip(names, want, strict=True):
        assert_close(got[name], 2.0 * lam * grad, backend=JAX, dtype="float32")
    assert np.all(np.asarray(updates["dense"]["bias"]) == 0.0)


def test_add_similarity_gradient_errors():
    tx = sj.add_similarity_gradient(1.0)
    params = {"kernel": jnp.eye(2)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="unknown anchor"):
        sj.add_similarity_gradient(1.0, anchor="initial")


# -- examples ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["flax_penalty.py", "equinox_penalty.py"])
def test_examples_train_and_lower_the_penalty(name):
    module = runpy.run_path(str(EXAMPLES / name), run_name="example")
    history = module["main"](steps=6)
    assert len(history) == 6
    assert history[-1]["penalty"] < history[0]["penalty"]
    assert all(np.isfinite(h["loss"]) for h in history)


@pytest.mark.parametrize("name", ["flax_penalty.py", "equinox_penalty.py"])
def test_examples_take_their_arguments_and_help_without_training(name):
    module = runpy.run_path(str(EXAMPLES / name), run_name="example")
    with pytest.raises(SystemExit) as info:  # --help prints and exits before any training
        module["parse_args"](["--help"])
    assert info.value.code == 0
    args = module["parse_args"](["--steps", "3", "--strength", "0.5", "--seed", "2"])
    assert (args.steps, args.strength, args.seed) == (3, 0.5, 2)


# -- growth of a linen CNN with BatchNorm ----------------------------------------------------


def _cnn(widths):
    nn = pytest.importorskip("flax.linen")

    class CNN(nn.Module):
        widths: tuple

        @nn.compact
        def __call__(self, x):
            for width in self.widths:
                x = nn.Conv(width, (3, 3))(x)
                x = nn.BatchNorm(use_running_average=True)(x)
                x = nn.swish(x)  # smooth (MobileNet's): a split moves logits by O(eps^2)
            return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    return CNN(tuple(widths))


def _cnn_setup(widths=(4, 5)):
    model = _cnn(widths)
    images = jax.random.normal(jax.random.key(1), (6, 5, 5, 2))
    variables = model.init(jax.random.key(0), images)
    rng = np.random.default_rng(7)
    # Non-trivial BatchNorm state, so copying it wrongly would show in the logits.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            _f32(rng.uniform(0.5, 2.0, x.shape))
            if sj.leaf_name(path).endswith(("var", "scale"))
            else _f32(rng.normal(0.0, 0.3, x.shape)) + x
        ),
        variables,
    )
    return model, variables, images


def test_add_neurons_with_zero_outgoing_keeps_the_cnn_function_exactly():
    model, variables, images = _cnn_setup()
    flow = sj.linen_flow(variables, "Conv_0", norm="BatchNorm_0", consumers=["Conv_1"])
    grown, cmap = sj.add_neurons(variables, flow, 3, rng=0)
    assert cmap.sources == (0, 1, 2, 3, -1, -1, -1)
    assert grown["params"]["Conv_0"]["kernel"].shape == (3, 3, 2, 7)
    assert grown["params"]["Conv_1"]["kernel"].shape == (3, 3, 7, 5)
    assert grown["batch_stats"]["BatchNorm_0"]["var"].shape == (7,)
    np.testing.assert_array_equal(np.asarray(grown["batch_stats"]["BatchNorm_0"]["var"][4:]), 1.0)
    assert grown["params"]["Dense_0"]["kernel"] is variables["params"]["Dense_0"]["kernel"]
    before = model.apply(variables, images)
    after = _cnn((7, 5)).apply(grown, images)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-5, atol=1e-5)


def test_split_and_replicate_keep_the_cnn_function():
    model, variables, images = _cnn_setup()
    before = np.asarray(model.apply(variables, images))
    # Split the second conv, read by the Dense head after a channels-last flatten.
    flow = sj.linen_flow(variables, "Conv_1", norm="BatchNorm_1", consumers=["Dense_0"])
    assert flow.consumers[0].spatial == 25 and flow.consumers[0].channels_last
    directions = jax.random.normal(jax.random.key(2), (2, 3, 3, 4))
    changes = []
    for eps in (0.0, 0.04, 0.02):
        grown, cmap = sj.split_neurons(variables, flow, [1, 3], directions, eps=eps)
        assert cmap.kind == "split" and cmap.new_channels == 7
        after = np.asarray(_cnn((4, 7)).apply(grown, images))
        changes.append(np.abs(after - before).max())
    assert changes[0] < 1e-5  # exact at eps = 0
    # Second order: halving eps quarters the change (and the split is no no-op).
    assert changes[2] > 1e-5 and 3.0 < changes[1] / changes[2] < 5.0

    flow0 = sj.linen_flow(variables, "Conv_0", norm="BatchNorm_0", consumers=["Conv_1"])
    grown, cmap = sj.replicate_neurons(variables, flow0, [2, 2, 0])
    after = np.asarray(_cnn((7, 5)).apply(grown, images))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_linen_flow_errors_name_the_problem():
    _, variables, _ = _cnn_setup()
    with pytest.raises(ValueError, match="params/Conv_9/kernel"):
        sj.linen_flow(variables, "Conv_9")
    with pytest.raises(ValueError, match="not a multiple"):
        sj.linen_flow(variables, "Conv_0", consumers=["Dense_0"])
    with pytest.raises(ValueError, match="no BatchNorm entries"):
        sj.linen_flow(variables, "Conv_0", norm="BatchNorm_7")


@pytest.mark.slow  # long: see tests/conftest.py for the two tiers
def test_training_step_after_growth_with_the_padded_optax_state():
    model, variables, images = _cnn_setup()
    labels = jnp.arange(images.shape[0]) % 3
    kernels = sj.find_kernels(variables["params"])

    def make_tx():
        return optax.chain(
            sj.add_similarity_gradient(0.1, neuron_axis=kernels, lam=0.1),
            optax.sgd(0.05, momentum=0.9),
        )

    def train_step(module, tx, variables, opt_state):
        def loss_fn(params):
            logits = module.apply({**variables, "params": params}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], updates)
        return loss, {**variables, "params": params}, opt_state

    tx = make_tx()
    opt_state = tx.init(variables["params"])
    narrow_step = jax.jit(lambda v, s: train_step(model, tx, v, s))
    for _ in range(2):
        _, variables, opt_state = narrow_step(variables, opt_state)
    old_trace = opt_state[1][0].trace["Conv_0"]["kernel"]
    assert float(jnp.abs(old_trace).max()) > 0

    flow = sj.linen_flow(variables, "Conv_0", norm="BatchNorm_0", consumers=["Conv_1"])
    grown, cmap = sj.add_neurons(variables, flow, 2, rng=0)
    with pytest.raises(ValueError, match="pass new_params"):
        sj.grow_optax_state(opt_state, flow, cmap, params=variables["params"])
    new_state = sj.grow_optax_state(
        opt_state, flow, cmap, params=variables["params"], new_params=grown["params"]
    )
    trace = new_state[1][0].trace
    assert trace["Conv_0"]["kernel"].shape == (3, 3, 2, 6)
    np.testing.assert_array_equal(
        np.asarray(trace["Conv_0"]["kernel"][..., :4]), np.asarray(old_trace)
    )
    np.testing.assert_array_equal(np.asarray(trace["Conv_0"]["kernel"][..., 4:]), 0.0)
    assert trace["Conv_1"]["kernel"].shape == (3, 3, 6, 5)
    assert trace["Dense_0"]["kernel"] is opt_state[1][0].trace["Dense_0"]["kernel"]
    assert new_state[0].refs["Conv_0/kernel"] is grown["params"]["Conv_0"]["kernel"]
    assert int(new_state[0].count) == 2

    # The wider model trains on from the padded state (jit included).
    wide = _cnn((6, 5))
    step = jax.jit(lambda v, s: train_step(wide, tx, v, s))
    loss_before, stepped, _ = step(grown, new_state)
    loss_after, _, _ = step(stepped, new_state)
    assert np.isfinite(float(loss_before)) and float(loss_after) < float(loss_before)

    adam = optax.adam(1e-3)
    adam_state = adam.init(variables["params"])
    _, _, adam_state = jax.jit(lambda v, s: train_step(model, adam, v, s))(variables, adam_state)
    grown_adam = sj.grow_optax_state(adam_state, flow, cmap, params=variables["params"])
    assert grown_adam[0].mu["Conv_0"]["kernel"].shape == (3, 3, 2, 6)
    assert grown_adam[0].nu["BatchNorm_0"]["scale"].shape == (6,)
    assert int(grown_adam[0].count) == 1
    reset = sj.grow_optax_state(adam_state, flow, cmap, params=variables["params"], mode="zero")
    np.testing.assert_array_equal(np.asarray(reset[0].mu["Conv_0"]["kernel"]), 0.0)


# -- the tiles in lax.scan (issue 14: jit compile time grew with the tile count) --------------


def _dot_generals(n):
    loss = jax.value_and_grad(lambda x: sj.similarity_loss(x, block_size=256))
    return str(jax.make_jaxpr(loss)(jax.ShapeDtypeStruct((n, 8), jnp.float32))).count(
        "dot_general")


def test_the_traced_program_does_not_grow_with_the_number_of_tiles():
    # 8 tiles against 32: an unrolled tile loop would trace 36 against 528 tile products.
    assert _dot_generals(2048) == _dot_generals(8192)


@pytest.mark.parametrize("block_size", [1, 3, 4, 11])
def test_scanned_tiles_match_the_reference_with_padding_and_zero_rows(block_size):
    w = np.random.default_rng(3).standard_normal((10, 6))
    w[[2, 7]] = 0.0
    want_value, want_grad = reference.similarity_loss_and_grad(w)
    loss = jax.jit(jax.value_and_grad(lambda x: sj.similarity_loss(x, block_size=block_size)))
    value, grad = loss(_f32(w))
    np.testing.assert_allclose(float(value), want_value, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[[2, 7]] == 0.0)
    assert float(jax.jit(lambda x: sj.similarity_loss(x, block_size=block_size))(_f32(w))) \
        == pytest.approx(want_value, rel=1e-6)
