"""Bad input gets a clear error naming the argument: TypeError for types, ValueError for values."""

from __future__ import annotations

import numpy as np
import pytest

import simcore

W = np.random.default_rng(0).standard_normal((4, 3))


def _single_weight_calls():
    """``(name, call)`` for every function whose first argument is one weight array ``w``."""
    return [
        ("similarity_map", lambda w, **kw: simcore.similarity_map(w, **kw)),
        ("similarity_loss", lambda w, **kw: simcore.similarity_loss(w, **kw)),
        ("similarity_loss_and_grad", lambda w, **kw: simcore.similarity_loss_and_grad(w, **kw)),
        ("similarity_stats", lambda w, **kw: simcore.similarity_stats(w, **kw)),
    ]


SINGLE = _single_weight_calls()
SINGLE_IDS = [name for name, _ in SINGLE]


@pytest.mark.parametrize(("name", "call"), SINGLE, ids=SINGLE_IDS)
@pytest.mark.parametrize("bad", [[[1.0, 2.0], [3.0, 4.0]], 3.0, "w", None], ids=repr)
def test_not_an_array_is_a_type_error_naming_w(name, call, bad):
    with pytest.raises(TypeError, match=r"\bw\b must be an array"):
        call(bad)


@pytest.mark.parametrize(("name", "call"), SINGLE, ids=SINGLE_IDS)
@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_integer_or_bool_dtype_is_a_type_error(backend, name, call, dtype):
    x = backend.asarray(np.ones((3, 2), dtype=dtype))
    with pytest.raises(TypeError, match=r"\bw\b must have a real floating dtype"):
        call(x)


@pytest.mark.parametrize(("name", "call"), SINGLE, ids=SINGLE_IDS)
@pytest.mark.parametrize("shape", [(), (5,)])
def test_fewer_than_two_dimensions_is_a_value_error(name, call, shape):
    with pytest.raises(ValueError, match=r"\bw\b must have at least 2 dimensions"):
        call(np.ones(shape))


@pytest.mark.parametrize(("name", "call"), SINGLE, ids=SINGLE_IDS)
@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 3)])
def test_empty_array_is_a_value_error(name, call, shape):
    with pytest.raises(ValueError, match=r"\bw\b must not be empty"):
        call(np.ones(shape))


@pytest.mark.parametrize(("name", "call"), SINGLE, ids=SINGLE_IDS)
@pytest.mark.parametrize("axis", [1.0, "0", None, True])
def test_neuron_axis_of_wrong_type_is_a_type_error(name, call, axis):
    with pytest.raises(TypeError, match="neuron_axis must be an int"):
        call(W, neuron_axis=axis)


@pytest.mark.parametrize(("name", "call"), SINGLE, ids=SINGLE_IDS)
@pytest.mark.parametrize("axis", [2, -3, 10])
def test_neuron_axis_out_of_range_is_a_value_error(name, call, axis):
    with pytest.raises(ValueError, match=f"neuron_axis={axis} is out of range"):
        call(W, neuron_axis=axis)


def test_numpy_integer_neuron_axis_is_accepted():
    assert float(simcore.similarity_loss(W, neuron_axis=np.int64(-1))) == pytest.approx(
        float(simcore.similarity_loss(W.T))
    )


@pytest.mark.parametrize("fn", [simcore.similarity_loss, simcore.similarity_loss_and_grad])
@pytest.mark.parametrize(("block_size", "error"), [(0, ValueError), (-2, ValueError),
                                                   (1.5, TypeError), (True, TypeError),
                                                   ("4", TypeError)])
def test_bad_block_size(fn, block_size, error):
    with pytest.raises(error, match="block_size must be a positive int"):
        fn(W, block_size=block_size)


@pytest.mark.parametrize("zero_tol", [-0.1, 1.0, 2.0])
def test_bad_zero_tol_is_a_value_error(zero_tol):
    with pytest.raises(ValueError, match="zero_tol"):
        simcore.similarity_loss(W, zero_tol=zero_tol)


@pytest.mark.parametrize("bins", [0, -1])
def test_bad_bins(bins):
    with pytest.raises(ValueError, match="bins"):
        simcore.similarity_stats(W, bins=bins)
    with pytest.raises(TypeError, match="bins"):
        simcore.similarity_stats(W, bins=2.5)


# ----------------------------------------------------------------------------- w and w_ref

PENALTIES = [simcore.weight_sum_penalty, simcore.weight_sum_penalty_and_grad]


@pytest.mark.parametrize("fn", PENALTIES)
def test_w_ref_not_an_array_is_a_type_error(fn):
    with pytest.raises(TypeError, match="w_ref must be an array"):
        fn(W, W.tolist())


@pytest.mark.parametrize("fn", PENALTIES)
def test_w_ref_from_another_library_is_a_type_error(fn):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="w_ref comes from a different array library"):
        fn(W, torch.from_numpy(W.copy()))
    with pytest.raises(TypeError, match="w_ref comes from a different array library"):
        fn(torch.from_numpy(W.copy()), W)


@pytest.mark.parametrize("fn", PENALTIES)
def test_w_ref_of_another_shape_is_a_value_error(fn):
    with pytest.raises(ValueError, match="w_ref must have the shape of w"):
        fn(W, W.T)


@pytest.mark.parametrize("fn", PENALTIES)
def test_w_ref_of_integer_dtype_is_a_type_error(fn):
    with pytest.raises(TypeError, match="w_ref must have a real floating dtype"):
        fn(W, np.ones(W.shape, dtype=np.int64))


@pytest.mark.parametrize("fn", PENALTIES)
@pytest.mark.parametrize(("option", "value"), [("form", "log"), ("form", None),
                                               ("statistic", "median")])
def test_unknown_form_or_statistic_is_a_value_error(fn, option, value):
    with pytest.raises(ValueError, match=f"unknown {option}"):
        fn(W, W, **{option: value})


# ----------------------------------------------------------------------------- Eq. 5, decorrelate


def test_growth_objective_rejects_a_single_array_and_mismatched_lists():
    with pytest.raises(TypeError, match="weights must be a sequence"):
        simcore.growth_objective(W, [W], lam=0.1)
    with pytest.raises(ValueError, match="weights must hold at least one layer"):
        simcore.growth_objective([], [], lam=0.1)
    with pytest.raises(ValueError, match="refs has 2 layers but weights has 1"):
        simcore.growth_objective([W], [W, W], lam=0.1)
    with pytest.raises(ValueError, match="neuron_axis has 2 entries"):
        simcore.growth_objective([W], [W], lam=0.1, neuron_axis=[0, 0])
    with pytest.raises(ValueError, match="refs is None"):
        simcore.growth_objective_and_grad([W], None, lam=0.1)
    with pytest.raises(ValueError, match="unknown form"):
        simcore.growth_objective_and_grad([W], [W], lam=0.1, form="nope")


def test_growth_objective_rejects_layers_from_different_libraries():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"weights\[1\] comes from a different array library"):
        simcore.growth_objective([W, torch.from_numpy(W.copy())], None, lam=0.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"steps": 1.5}, TypeError, "steps must be an int"),
        ({"steps": -1}, ValueError, "steps must be >= 0"),
        ({"lr": 0.0}, ValueError, "lr must be > 0"),
        ({"lr": -1.0}, ValueError, "lr must be > 0"),
        ({"anchor": "start"}, ValueError, "unknown anchor"),
    ],
)
def test_decorrelate_rejects_bad_options(kwargs, error, message):
    options = {"steps": 2, "lr": 0.1, "lam": 0.1, **kwargs}
    with pytest.raises(error, match=message):
        simcore.decorrelate([W], **options)
