"""Every registered activation's derivatives against torch autograd, and the kink rule.

Away from kinks ``sigma'`` is autograd's first derivative and ``sigma''`` is autograd's
second derivative plus the documented smoothed-corner terms
(simcore/growth/activation_derivatives.py); each listed kink is a real jump of autograd's
``sigma'`` and there is no other on [-8, 8].
"""

import numpy as np
import pytest

from simcore.growth import activations as acts
from simcore.growth.activation_derivatives import RELU_SURROGATE_BETA

torch = pytest.importorskip("torch")
F = torch.nn.functional

_TORCH = {
    "relu": F.relu,
    "relu6": F.relu6,
    "hardtanh": F.hardtanh,
    "hardtanh(min_val=-2.0, max_val=3.0)": lambda z: F.hardtanh(z, -2.0, 3.0),
    "leaky_relu": F.leaky_relu,
    "leaky_relu(negative_slope=0.2)": lambda z: F.leaky_relu(z, 0.2),
    "elu": F.elu,
    "elu(alpha=0.5)": lambda z: F.elu(z, alpha=0.5),
    "selu": F.selu,
    # torch has no double backward for hardsigmoid; relu6(z + 3) / 6 is the same function
    "hardsigmoid": lambda z: F.relu6(z + 3.0) / 6.0,
    "hardswish": F.hardswish,
    "mish": F.mish,
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "softplus": F.softplus,
    "softplus(beta=2.0, threshold=5.0)": lambda z: F.softplus(z, beta=2.0, threshold=5.0),
    "identity": lambda z: z * 1.0,
}


def _autograd(fn, z):
    t = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(fn(t).sum(), t, create_graph=True)
    d2 = torch.autograd.grad(d1.sum(), t, allow_unused=True)[0] if d1.requires_grad else None
    d2 = torch.zeros_like(t) if d2 is None else d2
    return d1.detach().numpy(), d2.numpy()


def _corners(kinks, z):
    beta = RELU_SURROGATE_BETA
    total = np.zeros_like(z)
    for at, jump in kinks:
        s = 1.0 / (1.0 + np.exp(-beta * (z - at)))
        total += jump * beta * s * (1.0 - s)
    return total


def test_hardsigmoid_stand_in_is_torchs_hardsigmoid():
    z = torch.linspace(-5.0, 5.0, 101, dtype=torch.float64)
    torch.testing.assert_close(_TORCH["hardsigmoid"](z), F.hardsigmoid(z))


def test_every_built_in_activation_is_checked_here():
    # the built-in ones: a doctest or a user may register more in the same process
    assert acts._BUILT_IN <= set(acts.activation_names())
    assert acts._BUILT_IN <= {name.partition("(")[0] for name in _TORCH}


@pytest.mark.parametrize("name", sorted(_TORCH))
def test_derivatives_match_autograd_away_from_kinks(name):
    kinks = acts.activation_kinks(name)
    z = np.random.default_rng(0).uniform(-8.0, 8.0, 4000)
    switch = [5.0 / 2.0] if name.startswith("softplus(") else [20.0] if name == "softplus" else []
    for at in [k for k, _ in kinks] + switch:
        z = z[np.abs(z - at) > 1e-3]
    want1, want2 = _autograd(_TORCH[name], z)
    # gelu's sigma' needs erf, fitted to 1.2e-7 (the registry's docstring); the rest is exact
    np.testing.assert_allclose(acts.first_derivative(name)(np, z), want1,
                               atol=1e-7 if name == "gelu" else 1e-9)
    np.testing.assert_allclose(acts.second_derivative(name)(np, z) - _corners(kinks, z), want2,
                               atol=1e-9)


@pytest.mark.parametrize("name", sorted(_TORCH))
def test_listed_kinks_are_every_jump_of_the_first_derivative(name):
    kinks = acts.activation_kinks(name)
    for at, jump in kinks:
        left, right = _autograd(_TORCH[name], np.asarray([at - 1e-7, at + 1e-7]))[0]
        assert right - left == pytest.approx(jump, abs=1e-5)
    grid = np.arange(-8.0, 8.0, 1e-3)
    d1 = _autograd(_TORCH[name], grid)[0]
    jumps = grid[1:][np.abs(np.diff(d1)) > 0.02]
    for where in jumps:
        assert any(abs(where - at) < 2e-3 for at, _ in kinks), (name, where)


def test_kinked_activations_get_a_nonzero_surrogate_at_the_kink():
    # the point of the rule: a piecewise-linear activation does not zero SSD's matrices
    at_kinks = acts.second_derivative("relu6")(np, np.asarray([0.0, 6.0]))
    assert at_kinks.tolist() == pytest.approx([0.75, -0.75])
    leaky = acts.second_derivative("leaky_relu(negative_slope=0.2)")(np, np.asarray([0.0]))
    assert leaky.tolist() == pytest.approx([0.6])


def test_parameters_are_spelled_once_and_checked():
    assert acts.activation_spec("leaky_relu", negative_slope=0.01) == "leaky_relu"
    assert acts.activation_spec("elu", alpha=2) == "elu(alpha=2.0)"
    assert acts.activation_spec("relu") == "relu"
    z = np.linspace(-2.0, 2.0, 9)
    np.testing.assert_array_equal(acts.second_derivative("elu(alpha = 2)")(np, z),
                                  acts.second_derivative("elu(alpha=2.0)")(np, z))
    with pytest.raises(ValueError, match="'leaky_relu' has no parameter 'slope'"):
        acts.second_derivative("leaky_relu(slope=0.2)")
    with pytest.raises(ValueError, match="'relu' takes no parameters"):
        acts.activation_spec("relu", beta=2.0)
    with pytest.raises(ValueError, match="alpha='x' is not a number"):
        acts.second_derivative("elu(alpha=x)")
    with pytest.raises(ValueError, match="unknown activation 'celu'.*leaky_relu"):
        acts.first_derivative("celu")
    with pytest.raises(ValueError, match="min_val < max_val"):
        acts.second_derivative("hardtanh(min_val=2.0, max_val=1.0)")


def test_new_derivatives_do_not_overflow_and_keep_float32():
    z = np.asarray([-1e4, -800.0, 800.0, 1e4], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for name in _TORCH:
            for fn in (acts.first_derivative(name), acts.second_derivative(name)):
                out = fn(np, z)
                assert np.isfinite(out).all() and out.dtype == np.float32, name
