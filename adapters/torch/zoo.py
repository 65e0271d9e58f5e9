"""A zoo of the architectures people grow, written here for 32x32 inputs (no torchvision).

The growth tests and the coverage table (``benchmarks/growth_coverage.py``) try every
growth method on these models, which are written the way people write them: some with
``nn.ReLU`` modules, some with ``F.relu`` calls (the widely copied CIFAR style), with
projection shortcuts, inverted residuals, channel split and shuffle, dense and inception
concatenations, fire modules, squeeze-excitation gates and ConvNeXt's channel permutes.

``build(name, width=1.0)`` gives the usual CIFAR sizes (``resnet18`` about 11M parameters);
``width`` multiplies every channel count (rounded, at least 1; ShuffleNet's block widths
stay even so the channel split works), so a test can use ``width=0.125``. ``seed`` makes
the weights reproducible without touching the global random state.

>>> import torch
>>> from simcore.adapters.torch.zoo import NAMES, build
>>> len(NAMES)
15
>>> build("resnet18_functional", width=0.125, seed=0)(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from simcore.extend import check_int

from .zoo_branching import (
    _ConvNeXt,
    _DenseNet,
    _Inception,
    _SENet,
    _ShuffleNetV2,
    _SqueezeNet,
)
from .zoo_chains import _VGG, _LeNet, _MobileNetV2, _ResNet, _Scale, _VGGFunctional

__all__ = ["NAMES", "build"]




_BUILDERS: dict[str, Callable[[_Scale, int, int], nn.Module]] = {
    "lenet": _LeNet,
    "vgg11": lambda s, n, c: _VGG(s, n, c, batch_norm=False),
    "vgg11_bn": lambda s, n, c: _VGG(s, n, c, batch_norm=True),
    "vgg11_functional": _VGGFunctional,
    "resnet18": lambda s, n, c: _ResNet(s, n, c, "basic", (2, 2, 2, 2)),
    "resnet18_functional": lambda s, n, c: _ResNet(s, n, c, "functional", (2, 2, 2, 2)),
    "resnet_bottleneck": lambda s, n, c: _ResNet(s, n, c, "bottleneck", (1, 1, 1, 1)),
    "preact_resnet18": lambda s, n, c: _ResNet(s, n, c, "preact", (2, 2, 2, 2)),
    "mobilenet_v2": _MobileNetV2,
    "shufflenet_v2": _ShuffleNetV2,
    "densenet": _DenseNet,
    "inception": _Inception,
    "squeezenet": _SqueezeNet,
    "se_net": _SENet,
    "convnext": _ConvNeXt,
}

#: Every model :func:`build` makes, in the order the coverage table lists them.
NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build(name: str, *, width: float = 1.0, num_classes: int = 10, in_channels: int = 3,
          seed: int | None = None) -> nn.Module:
    """The zoo model ``name`` (one of :data:`NAMES`) for 32x32 inputs.

    ``width`` multiplies every channel count; ``seed`` draws the initial weights from
    ``torch.manual_seed(seed)`` inside a forked random state (the global one is untouched).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown zoo model {name!r}; expected one of {list(NAMES)}")
    scale = _Scale(width)
    num_classes = check_int(num_classes, "num_classes", minimum=1)
    in_channels = check_int(in_channels, "in_channels", minimum=1)
    if seed is None:
        return _BUILDERS[name](scale, num_classes, in_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(check_int(seed, "seed", minimum=0))
        return _BUILDERS[name](scale, num_classes, in_channels)
