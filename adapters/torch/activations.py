"""Which PyTorch modules and calls are element-wise activations, and their registry names.

Flow discovery lets a layer's channels pass through an activation and records it as the
layer's activation; SSD needs its second derivative, looked up in
:mod:`simcore.growth.activations` by the name given here. An activation is the same whether it
is a module (``nn.ReLU()``), a function (``F.relu``, ``torch.relu``, in place or not) or a
tensor method (``x.relu()``, ``x.relu_()``), and its parameters (LeakyReLU's slope, ELU's alpha,
GELU's approximation, Softplus's beta and threshold) are part of the name. An element-wise
activation without a known second derivative (``nn.CELU``, ``F.softsign``, ...) still passes
channels through; its name is its own (``"celu"``), which the registry refuses when SSD asks.

>>> from torch import nn
>>> module_activation(nn.LeakyReLU(0.2))
'leaky_relu(negative_slope=0.2)'
>>> module_activation(nn.GELU(approximate="tanh"))
'gelu_tanh'
>>> module_activation(nn.Conv2d(1, 1, 1)) is None
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from simcore.growth.activations import activation_names, activation_spec, second_derivative

__all__ = ["ACTIVATION_TYPES", "call_activation", "is_known_activation", "module_activation",
           "tensor_method_name"]

# Module type -> (registry family, the module attributes that are its parameters).
_MODULES: dict[type[nn.Module], tuple[str, tuple[str, ...]]] = {
    nn.ReLU: ("relu", ()),
    nn.ReLU6: ("relu6", ()),
    nn.Hardtanh: ("hardtanh", ("min_val", "max_val")),
    nn.LeakyReLU: ("leaky_relu", ("negative_slope",)),
    nn.ELU: ("elu", ("alpha",)),
    nn.SELU: ("selu", ()),
    nn.SiLU: ("swish", ()),
    nn.Mish: ("mish", ()),
    nn.Hardswish: ("hardswish", ()),
    nn.Hardsigmoid: ("hardsigmoid", ()),
    nn.Sigmoid: ("sigmoid", ()),
    nn.Tanh: ("tanh", ()),
    nn.Softplus: ("softplus", ("beta", "threshold")),
    nn.Identity: ("identity", ()),
}
# Element-wise and parameter-free, but no second derivative is registered: named for errors.
_UNKNOWN_MODULES = (nn.CELU, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink,
                    nn.Softshrink, nn.Threshold, nn.RReLU)

#: Module types a layer's channels pass through as its activation.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (*_MODULES, nn.GELU, *_UNKNOWN_MODULES)

# Function -> (registry family, its parameters in positional order after the input).
_FUNCTIONS: dict[Callable[..., Any], tuple[str, tuple[str, ...]]] = {
    F.relu: ("relu", ()), torch.relu: ("relu", ()), F.relu_: ("relu", ()),
    torch.relu_: ("relu", ()), F.relu6: ("relu6", ()),
    F.hardtanh: ("hardtanh", ("min_val", "max_val")),
    F.hardtanh_: ("hardtanh", ("min_val", "max_val")),
    F.leaky_relu: ("leaky_relu", ("negative_slope",)),
    F.leaky_relu_: ("leaky_relu", ("negative_slope",)),
    F.elu: ("elu", ("alpha",)), F.elu_: ("elu", ("alpha",)),
    F.selu: ("selu", ()), torch.selu: ("selu", ()), F.selu_: ("selu", ()),
    F.silu: ("swish", ()), F.mish: ("mish", ()),
    F.hardswish: ("hardswish", ()), F.hardsigmoid: ("hardsigmoid", ()),
    torch.sigmoid: ("sigmoid", ()), F.sigmoid: ("sigmoid", ()), torch.sigmoid_: ("sigmoid", ()),
    torch.tanh: ("tanh", ()), F.tanh: ("tanh", ()), torch.tanh_: ("tanh", ()),
    F.softplus: ("softplus", ("beta", "threshold")),
    F.gelu: ("gelu", ("approximate",)),
    F.celu: ("celu", ()), F.softsign: ("softsign", ()), F.tanhshrink: ("tanhshrink", ()),
    F.logsigmoid: ("logsigmoid", ()), F.hardshrink: ("hardshrink", ()),
    F.softshrink: ("softshrink", ()), F.rrelu: ("rrelu", ()),
}
# Tensor method name -> registry family (none of them takes a parameter).
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
            "tanh": "tanh", "tanh_": "tanh"}
_NOT_PARAMETERS = ("inplace",)


def _name(family: str, params: dict[str, Any]) -> str:
    if family == "gelu":
        return "gelu_tanh" if params.get("approximate", "none") == "tanh" else "gelu"
    if family not in activation_names():  # an element-wise function SSD cannot score
        return family
    return activation_spec(family, **{k: float(v) for k, v in params.items()})


def module_activation(module: nn.Module) -> str | None:
    """The registry name of activation ``module``, its own name if unregistered, else None."""
    if type(module) is nn.GELU:
        return _name("gelu", {"approximate": module.approximate})
    entry = _MODULES.get(type(module))
    if entry is not None:
        family, attributes = entry
        return _name(family, {a: getattr(module, a) for a in attributes})
    if isinstance(module, _UNKNOWN_MODULES):
        return type(module).__name__.lower()
    return None


def call_activation(function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """The registry name of an activation call ``function(*args, **kwargs)``, else None.

    ``function`` is a function (``F.leaky_relu``) or a tensor method's name (``"relu_"``);
    ``args[0]`` is the input. The parameters are read from the remaining arguments.
    """
    if isinstance(function, str):
        family = _METHODS.get(function)
        return None if family is None else _name(family, {})
    try:
        entry = _FUNCTIONS.get(function)
    except TypeError:  # an unhashable callable is no activation
        return None
    if entry is None:
        return None
    family, parameters = entry
    params = dict(zip(parameters, args[1:], strict=False))
    params.update((k, v) for k, v in kwargs.items() if k in parameters)
    return _name(family, {k: v for k, v in params.items() if k not in _NOT_PARAMETERS})


def tensor_method_name(function: Any) -> str | None:
    """``"relu"`` for ``torch.Tensor.relu`` (as ``__torch_function__`` sees a method call)."""
    name = getattr(function, "__name__", None)
    if name in _METHODS and getattr(torch.Tensor, name, None) is function:
        return name
    return None


def is_known_activation(name: str) -> bool:
    """Whether the registry has ``name`` (a second derivative SSD can use)."""
    try:
        second_derivative(name)
    except ValueError:
        return False
    return True
