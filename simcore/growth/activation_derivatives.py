"""The derivatives of the built-in activations, and the one rule that smooths their corners.

SSD's splitting matrix needs ``sigma''(z)`` and the closed-form Firefly scores need
``sigma'(z)``. Each entry is a function ``fn(xp, z)`` of an Array-API namespace and
an array, returning an array of ``z``'s shape, namespace and dtype. The functions
use only element-wise standard operations, so they trace under ``jax.jit``, and
none of them overflows (every exponential takes a non-positive argument).

Built-in names:

==============  ==========================================  ==========================
name            ``sigma'(z)``                               ``sigma''(z)``
==============  ==========================================  ==========================
``relu``        ``1 if z > 0 else 0``                       kink surrogate (below)
``relu6``       ``1 if 0 < z < 6 else 0``                   kink surrogates at 0 and 6
``hardtanh``    ``1 if min_val < z < max_val else 0``       kink surrogates (params
                                                            ``min_val=-1, max_val=1``)
``leaky_relu``  ``1 if z > 0 else a``                       kink surrogate, jump ``1 - a``
                                                            (param ``negative_slope=0.01``)
``elu``         ``1 if z > 0 else alpha e^z``               ``0 if z > 0 else alpha e^z``,
                                                            kink jump ``1 - alpha`` (param
                                                            ``alpha=1``)
``selu``        ``lambda`` times ``elu`` with its alpha     likewise
``hardsigmoid`` ``1/6 if -3 < z < 3 else 0``                kink surrogates at -3 and 3
``hardswish``   ``0, (2 z + 3) / 6, 1`` on the three parts  ``1/3`` on ``(-3, 3)`` plus
                                                            kinks (jump -1/2 at -3 and 3)
``mish``        ``t + z (1 - t^2) s``, ``t = tanh(sp(z))``  ``(1 - t^2) (2 s + z s (1 - s)
                                                            - 2 z t s^2)``
``softplus``    ``sigmoid(b z)``; 1 where ``b z >`` thr     ``b s (1 - s)``; 0 there
                                                            (params ``beta=1,
                                                            threshold=20``)
``swish``       ``s + z s (1 - s)``                         ``s (1 - s) (2 + z (1 - 2 s))``
``silu``        same as ``swish``                           same as ``swish``
``sigmoid``     ``s (1 - s)``                               ``s (1 - s) (1 - 2 s)``
``tanh``        ``1 - t^2``                                 ``-2 t (1 - t^2)``
``gelu``        ``Phi(z) + z phi(z)`` (erf form)            ``phi(z) (2 - z^2)`` (exact)
``gelu_tanh``   derivative of the tanh approximation        its second derivative
``identity``    ``1``                                       ``0``
==============  ==========================================  ==========================

Why a surrogate for ReLU: ReLU's second derivative is 0 almost everywhere, which
would make every splitting matrix zero. The SSD and Firefly reference code
(Liu, Wang, Wu 2019; Wu et al. 2020) replace it by the second derivative of
``softplus_beta(z) = log(1 + exp(beta z)) / beta`` with ``beta = 3``
(:data:`RELU_SURROGATE_BETA`); so do we.

The kink rule, the same for every activation with corners: where ``sigma'`` jumps by
``delta`` at ``z0`` (ReLU: ``delta = 1`` at 0), ``sigma''`` gets the term
``delta * beta s (1 - s)`` with ``s = sigmoid(beta (z - z0))``, ``beta = 3``: the second
derivative of ``delta * softplus_beta(z - z0)``, the smoothed corner. Away from the kinks
``sigma''`` is the exact second derivative plus these terms;
:func:`~simcore.growth.activations.activation_kinks` lists each activation's ``(z0, delta)``.
``sigma'`` is exact (at a kink itself, one of its one-sided values).
Softplus's switch to the identity above ``threshold`` is a jump of ``sigmoid(-threshold)``
(2e-9 at the default 20), below float32's resolution, and is not smoothed.

Where we differ from that code on purpose: its ``sigmoid`` entry returns
``s (1 - s)^3`` (wrong; the true second derivative is ``s (1 - s)(1 - 2 s)``) and its
"no activation" entry returns 1 (the identity's second derivative is 0, so an
identity layer has no splitting benefit). ``gelu``'s second derivative needs no
``erf`` and is exact; its first derivative needs ``Phi``, the normal CDF, which the
Array API lacks: we compute ``erf`` with the Numerical Recipes ``erfc`` Chebyshev
fit (relative error below 1.2e-7 everywhere), so ``gelu``'s first derivative is
accurate to about float32 precision, not to float64's.

These are the formulas; :mod:`simcore.growth.activations` finds them by name (parameters
written into the name, the user's own registrations). They live apart because the maths here
is fixed, while the registry there is process-wide state that users extend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "ENTRIES",
    "FAMILIES",
    "FAMILY_PARAMETERS",
    "RELU_SURROGATE_BETA",
    "ActivationDerivative",
    "Entry",
    "Kinks",
    "softplus_second_derivative",
]

ActivationDerivative = Callable[[Any, Any], Any]

#: The softplus sharpness whose second derivative stands in for ReLU's (the reference code's value).
RELU_SURROGATE_BETA = 3.0

_GELU_TANH_A = math.sqrt(2.0 / math.pi)
_GELU_TANH_B = 0.044715
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# SELU's fixed constants (Klambauer et al. 2017), as in torch.nn.SELU.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946

Kinks = tuple[tuple[float, float], ...]
# A registry entry: sigma', sigma'' and the kinks the second one smooths.
Entry = tuple[ActivationDerivative, ActivationDerivative, Kinks]


def _sigmoid(xp: Any, z: Any) -> Any:
    # exp of a non-positive number only: no overflow for any z.
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _erf(xp: Any, x: Any) -> Any:
    # Numerical Recipes (2nd ed., 6.2) erfc Chebyshev fit, fractional error < 1.2e-7.
    a = xp.abs(x)
    t = 1.0 / (1.0 + 0.5 * a)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * xp.exp(-a * a + poly)
    return xp.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def softplus_second_derivative(beta: float) -> ActivationDerivative:
    """``d^2/dz^2 log(1 + exp(beta z)) / beta = beta s (1 - s)`` with ``s = sigmoid(beta z)``.

    >>> import numpy as np
    >>> float(softplus_second_derivative(1.0)(np, np.asarray(0.0)))
    0.25
    """
    beta = float(beta)
    if not beta > 0.0:
        raise ValueError(f"beta must be positive, got {beta}")

    def d2(xp: Any, z: Any) -> Any:
        s = _sigmoid(xp, beta * z)
        return beta * s * (1.0 - s)

    return d2


def _step(xp: Any, z: Any, at: float) -> Any:
    return xp.astype(z > at, z.dtype)


def _kink_terms(kinks: Kinks) -> ActivationDerivative:
    """The smoothed corners: ``sum delta * softplus_3''(z - z0)`` (the module's kink rule)."""
    corner = softplus_second_derivative(RELU_SURROGATE_BETA)

    def d2(xp: Any, z: Any) -> Any:
        total = xp.zeros_like(z)
        for at, jump in kinks:
            total = total + jump * corner(xp, z - at)
        return total

    return d2


def _with_kinks(d1: ActivationDerivative, smooth_d2: ActivationDerivative | None,
                kinks: Kinks) -> Entry:
    corners = _kink_terms(kinks)
    if smooth_d2 is None:
        return d1, corners, kinks

    def d2(xp: Any, z: Any) -> Any:
        return smooth_d2(xp, z) + corners(xp, z)

    return d1, d2, kinks


def _piecewise_linear(left_slope: float, kinks: Kinks) -> Entry:
    """An activation made of straight pieces: slope ``left_slope``, then a jump at each kink."""

    def d1(xp: Any, z: Any) -> Any:
        total = xp.zeros_like(z) + left_slope
        for at, jump in kinks:
            total = total + jump * _step(xp, z, at)
        return total

    return _with_kinks(d1, None, kinks)


def _negative_part(xp: Any, z: Any) -> Any:
    """``min(z, 0)``: the argument of ELU's exponential, never positive."""
    return xp.where(z > 0, xp.zeros_like(z), z)


def _elu(alpha: float = 1.0, scale: float = 1.0) -> Entry:
    def d1(xp: Any, z: Any) -> Any:
        return scale * xp.where(z > 0, xp.ones_like(z), alpha * xp.exp(_negative_part(xp, z)))

    def smooth_d2(xp: Any, z: Any) -> Any:
        return scale * xp.where(z > 0, xp.zeros_like(z), alpha * xp.exp(_negative_part(xp, z)))

    jump = scale * (1.0 - alpha)
    return _with_kinks(d1, smooth_d2, ((0.0, jump),) if jump != 0.0 else ())


def _hardswish_d1(xp: Any, z: Any) -> Any:
    middle = (2.0 * z + 3.0) / 6.0
    return xp.where(z < -3.0, xp.zeros_like(z), xp.where(z > 3.0, xp.ones_like(z), middle))


def _hardswish_smooth_d2(xp: Any, z: Any) -> Any:
    inside = xp.logical_and(z > -3.0, z < 3.0)
    return xp.where(inside, xp.zeros_like(z) + 1.0 / 3.0, xp.zeros_like(z))


def _mish_parts(xp: Any, z: Any) -> tuple[Any, Any]:
    softplus = xp.where(z > 0, z, xp.zeros_like(z)) + xp.log1p(xp.exp(-xp.abs(z)))
    return xp.tanh(softplus), _sigmoid(xp, z)


def _mish_d1(xp: Any, z: Any) -> Any:
    t, s = _mish_parts(xp, z)
    return t + z * (1.0 - t * t) * s


def _mish_d2(xp: Any, z: Any) -> Any:
    # mish = z t, t = tanh(softplus z), t' = (1 - t^2) s:
    # mish'' = 2 t' + z t'' = (1 - t^2) (2 s + z s (1 - s) - 2 z t s^2).
    t, s = _mish_parts(xp, z)
    return (1.0 - t * t) * (2.0 * s + z * s * (1.0 - s) - 2.0 * z * t * s * s)


def _softplus(beta: float = 1.0, threshold: float = 20.0) -> Entry:
    if not beta > 0.0:
        raise ValueError(f"softplus beta must be positive, got {beta}")
    curve = softplus_second_derivative(beta)

    def d1(xp: Any, z: Any) -> Any:
        return xp.where(beta * z > threshold, xp.ones_like(z), _sigmoid(xp, beta * z))

    def d2(xp: Any, z: Any) -> Any:
        return xp.where(beta * z > threshold, xp.zeros_like(z), curve(xp, z))

    return d1, d2, ()


def _hardtanh(min_val: float = -1.0, max_val: float = 1.0) -> Entry:
    if not min_val < max_val:
        raise ValueError(f"hardtanh needs min_val < max_val, got {min_val} and {max_val}")
    return _piecewise_linear(0.0, ((min_val, 1.0), (max_val, -1.0)))


def _leaky_relu(negative_slope: float = 0.01) -> Entry:
    return _piecewise_linear(negative_slope, ((0.0, 1.0 - negative_slope),))


def _swish_d1(xp: Any, z: Any) -> Any:
    s = _sigmoid(xp, z)
    return s + z * s * (1.0 - s)


def _swish_d2(xp: Any, z: Any) -> Any:
    s = _sigmoid(xp, z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


def _sigmoid_d1(xp: Any, z: Any) -> Any:
    s = _sigmoid(xp, z)
    return s * (1.0 - s)


def _sigmoid_d2(xp: Any, z: Any) -> Any:
    s = _sigmoid(xp, z)
    return s * (1.0 - s) * (1.0 - 2.0 * s)


def _tanh_d1(xp: Any, z: Any) -> Any:
    t = xp.tanh(z)
    return 1.0 - t * t


def _tanh_d2(xp: Any, z: Any) -> Any:
    t = xp.tanh(z)
    return -2.0 * t * (1.0 - t * t)


def _normal_pdf(xp: Any, z: Any) -> Any:
    return _INV_SQRT_2PI * xp.exp(-0.5 * z * z)


def _gelu_d1(xp: Any, z: Any) -> Any:
    cdf = 0.5 * (1.0 + _erf(xp, z / math.sqrt(2.0)))
    return cdf + z * _normal_pdf(xp, z)


def _gelu_d2(xp: Any, z: Any) -> Any:
    return _normal_pdf(xp, z) * (2.0 - z * z)


def _gelu_tanh_parts(xp: Any, z: Any) -> tuple[Any, Any, Any]:
    t = xp.tanh(_GELU_TANH_A * (z + _GELU_TANH_B * z * z * z))
    du = _GELU_TANH_A * (1.0 + 3.0 * _GELU_TANH_B * z * z)
    return t, du, 1.0 - t * t


def _gelu_tanh_d1(xp: Any, z: Any) -> Any:
    t, du, sech2 = _gelu_tanh_parts(xp, z)
    return 0.5 * (1.0 + t) + 0.5 * z * sech2 * du


def _gelu_tanh_d2(xp: Any, z: Any) -> Any:
    # g = z (1 + tanh u) / 2, u = a (z + b z^3):
    # g'' = (1 - t^2) (u' + z (u'' - 2 t u'^2) / 2), u'' = 6 a b z.
    t, du, sech2 = _gelu_tanh_parts(xp, z)
    d2u = 6.0 * _GELU_TANH_A * _GELU_TANH_B * z
    return sech2 * (du + 0.5 * z * (d2u - 2.0 * t * du * du))


def _identity_d1(xp: Any, z: Any) -> Any:
    return xp.ones_like(z)


def _identity_d2(xp: Any, z: Any) -> Any:
    return xp.zeros_like(z)


def _smooth(d1: ActivationDerivative, d2: ActivationDerivative) -> Entry:
    return d1, d2, ()


#: The built-in activations without parameters: name -> (sigma', sigma'', kinks).
ENTRIES: dict[str, Entry] = {
    "relu": _piecewise_linear(0.0, ((0.0, 1.0),)),
    "relu6": _piecewise_linear(0.0, ((0.0, 1.0), (6.0, -1.0))),
    "hardsigmoid": _piecewise_linear(0.0, ((-3.0, 1.0 / 6.0), (3.0, -1.0 / 6.0))),
    "hardswish": _with_kinks(_hardswish_d1, _hardswish_smooth_d2, ((-3.0, -0.5), (3.0, -0.5))),
    "selu": _elu(_SELU_ALPHA, _SELU_SCALE),
    "mish": _smooth(_mish_d1, _mish_d2),
    "swish": _smooth(_swish_d1, _swish_d2),
    "silu": _smooth(_swish_d1, _swish_d2),
    "sigmoid": _smooth(_sigmoid_d1, _sigmoid_d2),
    "tanh": _smooth(_tanh_d1, _tanh_d2),
    "gelu": _smooth(_gelu_d1, _gelu_d2),
    "gelu_tanh": _smooth(_gelu_tanh_d1, _gelu_tanh_d2),
    "identity": _smooth(_identity_d1, _identity_d2),
}

#: Activations with parameters: name -> factory(**params), each parameter's default in its
#: signature.
FAMILIES: dict[str, Callable[..., Entry]] = {
    "leaky_relu": _leaky_relu,
    "elu": lambda alpha=1.0: _elu(alpha),
    "hardtanh": _hardtanh,
    "softplus": _softplus,
}
#: Each family's parameters with their defaults, in the order a name spells them.
FAMILY_PARAMETERS = {
    "leaky_relu": {"negative_slope": 0.01},
    "elu": {"alpha": 1.0},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0},
    "softplus": {"beta": 1.0, "threshold": 20.0},
}
