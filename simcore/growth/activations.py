"""Derivatives of activation functions, by name, for the growth maths.

SSD's splitting matrix needs ``sigma''(z)`` and the closed-form Firefly scores need
``sigma'(z)``. Each entry is a function ``fn(xp, z)`` of an Array-API namespace and
an array, returning an array of ``z``'s shape, namespace and dtype. The functions
use only element-wise standard operations, so they trace under ``jax.jit``, and
none of them overflows (every exponential takes a non-positive argument).

Built-in names:

==============  ==========================================  ==========================
name            ``sigma'(z)``                               ``sigma''(z)``
==============  ==========================================  ==========================
``relu``        ``1 if z > 0 else 0``                       surrogate: softplus with
                                                            beta = 3, ``3 s (1 - s)``,
                                                            ``s = sigmoid(3 z)``
``softplus``    ``sigmoid(z)``                              ``s (1 - s)``
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

Where we differ from that code on purpose: its ``sigmoid`` entry returns
``s (1 - s)^3`` (wrong; the true second derivative is ``s (1 - s)(1 - 2 s)``) and its
"no activation" entry returns 1 (the identity's second derivative is 0, so an
identity layer has no splitting benefit). ``gelu``'s second derivative needs no
``erf`` and is exact; its first derivative needs ``Phi``, the normal CDF, which the
Array API lacks: we compute ``erf`` with the Numerical Recipes ``erfc`` Chebyshev
fit (relative error below 1.2e-7 everywhere), so ``gelu``'s first derivative is
accurate to about float32 precision, not to float64's.

Register your own with :func:`register_activation`.

>>> import numpy as np
>>> d2 = second_derivative("tanh")
>>> round(float(d2(np, np.asarray(0.5))), 4)  # -2 tanh(0.5) (1 - tanh(0.5)^2)
-0.7269
>>> round(float(second_derivative("relu")(np, np.asarray(0.0))), 6)
0.75
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "RELU_SURROGATE_BETA",
    "activation_names",
    "first_derivative",
    "register_activation",
    "second_derivative",
    "softplus_second_derivative",
]

ActivationDerivative = Callable[[Any, Any], Any]

#: The softplus sharpness whose second derivative stands in for ReLU's (the reference code's value).
RELU_SURROGATE_BETA = 3.0

_GELU_TANH_A = math.sqrt(2.0 / math.pi)
_GELU_TANH_B = 0.044715
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


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


def _relu_d1(xp: Any, z: Any) -> Any:
    return xp.astype(z > 0, z.dtype)


def _softplus_d1(xp: Any, z: Any) -> Any:
    return _sigmoid(xp, z)


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


_REGISTRY: dict[str, tuple[ActivationDerivative, ActivationDerivative]] = {
    "relu": (_relu_d1, softplus_second_derivative(RELU_SURROGATE_BETA)),
    "softplus": (_softplus_d1, softplus_second_derivative(1.0)),
    "swish": (_swish_d1, _swish_d2),
    "silu": (_swish_d1, _swish_d2),
    "sigmoid": (_sigmoid_d1, _sigmoid_d2),
    "tanh": (_tanh_d1, _tanh_d2),
    "gelu": (_gelu_d1, _gelu_d2),
    "gelu_tanh": (_gelu_tanh_d1, _gelu_tanh_d2),
    "identity": (_identity_d1, _identity_d2),
}


def activation_names() -> tuple[str, ...]:
    """The registered activation names, sorted."""
    return tuple(sorted(_REGISTRY))


def _lookup(name: Any) -> tuple[ActivationDerivative, ActivationDerivative]:
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str name, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; registered: {', '.join(activation_names())} "
            "(add one with register_activation)"
        ) from None


def first_derivative(name: str) -> ActivationDerivative:
    """``sigma'`` of the registered activation ``name`` as ``fn(xp, z)``.

    >>> import numpy as np
    >>> first_derivative("relu")(np, np.asarray([-1.0, 2.0])).tolist()
    [0.0, 1.0]
    """
    return _lookup(name)[0]


def second_derivative(name: str) -> ActivationDerivative:
    """``sigma''`` of the registered activation ``name`` (ReLU: the softplus surrogate).

    >>> import numpy as np
    >>> second_derivative("identity")(np, np.asarray([1.0, -3.0])).tolist()
    [0.0, 0.0]
    """
    return _lookup(name)[1]


def register_activation(
    name: str,
    *,
    first: ActivationDerivative,
    second: ActivationDerivative,
    overwrite: bool = False,
) -> None:
    """Register ``name`` with its derivatives ``first(xp, z)`` and ``second(xp, z)``.

    Re-registering an existing name raises ``ValueError`` unless ``overwrite=True``.

    >>> import numpy as np
    >>> register_activation("square", first=lambda xp, z: 2.0 * z,
    ...                     second=lambda xp, z: 2.0 * xp.ones_like(z), overwrite=True)
    >>> second_derivative("square")(np, np.asarray([5.0])).tolist()
    [2.0]
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    for label, fn in (("first", first), ("second", second)):
        if not callable(fn):
            raise TypeError(f"{label} must be callable as fn(xp, z), got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"activation {name!r} is already registered; pass overwrite=True")
    _REGISTRY[name] = (first, second)


def resolve_second_derivative(activation: Any) -> ActivationDerivative:
    """A registered name or a callable ``fn(xp, z)`` -> the second-derivative function."""
    if callable(activation):
        return activation
    return second_derivative(activation)


def resolve_first_derivative(activation: Any) -> ActivationDerivative:
    """A registered name or a callable ``fn(xp, z)`` -> the first-derivative function."""
    if callable(activation):
        return activation
    return first_derivative(activation)
