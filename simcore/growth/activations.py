"""Activation derivatives by name, for the growth maths: the registry.

:func:`first_derivative` and :func:`second_derivative` give ``sigma'`` and ``sigma''`` of a
named activation as ``fn(xp, z)``, :func:`activation_kinks` its corners. The formulas of the
built-in names, their table and the kink rule that smooths ReLU-like corners are in
:mod:`simcore.growth.activation_derivatives`; this module maps names to them, reads parameters
written into a name, and holds the user's own registrations (process-wide).

Parameters: ``leaky_relu``, ``elu``, ``hardtanh`` and ``softplus`` take parameters, written
into the name as ``"leaky_relu(negative_slope=0.2)"`` (what :func:`activation_spec` makes);
the bare name means the defaults, as in ``torch.nn``. Any other name is a ``ValueError``
listing the known ones.

Register your own with :func:`register_activation`.

>>> import numpy as np
>>> d2 = second_derivative("tanh")
>>> round(float(d2(np, np.asarray(0.5))), 4)  # -2 tanh(0.5) (1 - tanh(0.5)^2)
-0.7269
>>> round(float(second_derivative("relu")(np, np.asarray(0.0))), 6)
0.75
>>> activation_kinks("leaky_relu(negative_slope=0.2)")
((0.0, 0.8),)
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from .activation_derivatives import (
    ENTRIES,
    FAMILIES,
    FAMILY_PARAMETERS,
    ActivationDerivative,
    Entry,
    Kinks,
)

__all__ = [
    "activation_kinks",
    "activation_names",
    "activation_spec",
    "first_derivative",
    "register_activation",
    "second_derivative",
]

# The bare name of a family is registered too, with the defaults.
_REGISTRY: dict[str, Entry] = dict(ENTRIES)
_REGISTRY.update({name: factory() for name, factory in FAMILIES.items()})
#: What ships; :func:`register_activation` adds to ``_REGISTRY`` for the whole process.
_BUILT_IN = frozenset(_REGISTRY)
_SPEC = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\((.*)\)$")


def activation_spec(name: str, **params: float) -> str:
    """The registry name of activation ``name`` with ``params`` (those at their default dropped).

    >>> activation_spec("leaky_relu", negative_slope=0.2)
    'leaky_relu(negative_slope=0.2)'
    >>> activation_spec("softplus", beta=1.0, threshold=20.0)
    'softplus'
    """
    if name not in FAMILY_PARAMETERS:
        if params:
            raise ValueError(f"activation {name!r} takes no parameters, got {sorted(params)}; "
                             f"parametrised ones: {', '.join(sorted(FAMILY_PARAMETERS))}")
        return name
    defaults = FAMILY_PARAMETERS[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"activation {name!r} has no parameter {unknown[0]!r}; "
                         f"its parameters: {', '.join(defaults)}")
    given = []
    for key in defaults:  # the family's own order, so equal activations get one name
        if key not in params:
            continue
        value = params[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ValueError(f"activation {name!r}: {key} must be a finite number, got {value!r}")
        if float(value) != defaults[key]:
            given.append(f"{key}={float(value)!r}")
    return f"{name}({', '.join(given)})" if given else name


@lru_cache(maxsize=256)
def _parse(spec: str) -> Entry | None:
    match = _SPEC.match(spec.replace(" ", ""))
    if match is None or match.group(1) not in FAMILIES:
        return None
    name, body = match.groups()
    params: dict[str, float] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            params[key] = float(value)
        except ValueError:
            raise ValueError(f"activation {spec!r}: {key}={value!r} is not a number") from None
    activation_spec(name, **params)  # checks the parameter names and values
    return FAMILIES[name](**params)


def activation_names() -> tuple[str, ...]:
    """The registered activation names, sorted."""
    return tuple(sorted(_REGISTRY))


def _lookup(name: Any) -> Entry:
    if not isinstance(name, str):
        raise TypeError(f"activation must be a str name, got {type(name).__name__}")
    found = _REGISTRY.get(name) or _parse(name)
    if found is None:
        raise ValueError(
            f"unknown activation {name!r}; registered: {', '.join(activation_names())} "
            "(parametrised as e.g. 'leaky_relu(negative_slope=0.2)'; add one with "
            "register_activation)"
        )
    return found


def activation_kinks(name: str) -> Kinks:
    """``(z0, delta)`` for each corner of ``name`` where ``sigma'`` jumps by ``delta``.

    Its ``sigma''`` has the smoothed-corner term of the kink rule there
    (:mod:`simcore.growth.activation_derivatives`).

    >>> activation_kinks("relu6")
    ((0.0, 1.0), (6.0, -1.0))
    """
    return _lookup(name)[2]


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

    Re-registering an existing name raises ``ValueError`` unless ``overwrite=True``. A
    registered function has no kinks listed by :func:`activation_kinks`.

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
    _REGISTRY[name] = (first, second, ())


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
