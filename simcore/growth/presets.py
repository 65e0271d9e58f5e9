"""The paper's growth seeds as plain data: layer lists that adapters build models from.

Sakai & Hotta grow CIFAR networks from narrow seeds (see docs/design.md, 'Growth'):

* VGG16: the 13 convolutions of cfg ``[64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M]``
  (the pattern :data:`VGG16_PATTERN` times 64), every width 16 in the seed; conv3x3 (padding 1,
  no bias) + BatchNorm + ReLU, five 2x2 max-pools, then a 1x1 conv classifier with bias:
  28,666 parameters for 10 classes (the paper's 0.0288M).
* MobileNetV1: a conv3x3 then 13 depthwise(3x3) + pointwise(1x1) blocks, BatchNorm after every
  conv, swish, stride 2 in blocks 2, 4, 6 and 12, global average pool, 1x1 classifier with bias;
  all 14 widths 32 in the seed: 19,978 parameters.

Four growths of 35% in the proportional model (every width times 1.35, rounded half up:
16 -> 22 -> 30 -> 41 -> 55) take VGG16 through 28,666 -> 53,668 -> 99,100 -> 184,141 -> 330,175
parameters (0.33M; the paper reports 0.325M; unrounded widths 16 * 1.35**4 = 53.1 give ~0.308M)
and MobileNetV1 through 19,978 -> 32,991 -> 55,806 -> 95,326 -> 165,175. A global budget of 35%
of the VGG seed's 208 neurons adds 73, 98, 133 and 179 neurons (691 in the end, ~53 a layer).

The functions return lists of dicts (see :func:`simcore.growth.budget.count_parameters` for the
keys); growable layers carry ``"width_index"``, the position of their width in ``widths``.
Building modules from them is the adapters' job: the core never builds models.

>>> from simcore.growth.budget import count_parameters
>>> count_parameters(vgg16_cifar()), count_parameters(mobilenet_v1_cifar())
(28666, 19978)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._arrays import check_real
from ._host import as_index
from .budget import round_half_up

__all__ = [
    "MOBILENET_V1_SEED_WIDTHS",
    "MOBILENET_V1_STRIDES",
    "VGG16_PATTERN",
    "VGG16_SEED_WIDTHS",
    "mobilenet_v1_cifar",
    "scale_widths",
    "vgg16_cifar",
]

#: VGG16's layer pattern in units of 64 channels; ``"M"`` is a 2x2 max-pool.
VGG16_PATTERN: tuple[int | str, ...] = (
    1,
    1,
    "M",
    2,
    2,
    "M",
    4,
    4,
    4,
    "M",
    8,
    8,
    8,
    "M",
    8,
    8,
    8,
    "M",
)
#: The paper's VGG16 seed: all 13 convolutions 16 wide.
VGG16_SEED_WIDTHS: tuple[int, ...] = (16,) * 13
#: Stride of the depthwise conv of each of MobileNetV1's 13 blocks (CIFAR variant).
MOBILENET_V1_STRIDES: tuple[int, ...] = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
#: The paper's MobileNetV1 seed: the first conv and the 13 pointwise convs, all 32 wide.
MOBILENET_V1_SEED_WIDTHS: tuple[int, ...] = (32,) * 14


def _widths(widths: Sequence[int], expected: int, name: str) -> list[int]:
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise TypeError(f"{name} must be a sequence of {expected} ints")
    if len(widths) != expected:
        raise ValueError(f"{name} must have {expected} entries, got {len(widths)}")
    out = [as_index(w, f"{name}[{i}]") for i, w in enumerate(widths)]
    for i, w in enumerate(out):
        if w < 1:
            raise ValueError(f"{name}[{i}] must be >= 1, got {w}")
    return out


def _conv_bn(
    cin: int,
    cout: int,
    k: int,
    *,
    stride: int = 1,
    groups: int = 1,
    act: str,
    width_index: int | None,
) -> list[dict[str, Any]]:
    conv: dict[str, Any] = {
        "kind": "conv",
        "in_channels": cin,
        "out_channels": cout,
        "kernel_size": k,
        "stride": stride,
        "padding": k // 2,
        "groups": groups,
        "bias": False,
    }
    if width_index is not None:
        conv["width_index"] = width_index
    return [conv, {"kind": "batchnorm", "channels": cout}, {"kind": "activation", "name": act}]


def vgg16_cifar(
    widths: Sequence[int] = VGG16_SEED_WIDTHS, *, in_channels: int = 3, classes: int = 10
) -> list[dict[str, Any]]:
    """VGG16 for 32x32 inputs with the 13 given conv widths (see the module docstring)."""
    widths = _widths(widths, 13, "widths")
    layers: list[dict[str, Any]] = []
    cin, position = as_index(in_channels, "in_channels"), 0
    for item in VGG16_PATTERN:
        if item == "M":
            layers.append({"kind": "maxpool", "kernel_size": 2, "stride": 2})
            continue
        layers += _conv_bn(cin, widths[position], 3, act="relu", width_index=position)
        cin, position = widths[position], position + 1
    layers.append(
        {
            "kind": "conv",
            "in_channels": cin,
            "out_channels": as_index(classes, "classes"),
            "kernel_size": 1,
            "bias": True,
            "name": "classifier",
        }
    )
    layers.append({"kind": "flatten"})
    return layers


def mobilenet_v1_cifar(
    widths: Sequence[int] = MOBILENET_V1_SEED_WIDTHS,
    *,
    in_channels: int = 3,
    classes: int = 10,
    activation: str = "swish",
) -> list[dict[str, Any]]:
    """MobileNetV1 for 32x32 inputs with the 14 given widths (first conv + 13 pointwise)."""
    widths = _widths(widths, 14, "widths")
    layers = _conv_bn(
        as_index(in_channels, "in_channels"), widths[0], 3, act=activation, width_index=0
    )
    for block, stride in enumerate(MOBILENET_V1_STRIDES, start=1):
        c = widths[block - 1]
        # depthwise: its width follows the producer before it (no width_index of its own)
        layers += _conv_bn(c, c, 3, stride=stride, groups=c, act=activation, width_index=None)
        layers += _conv_bn(c, widths[block], 1, act=activation, width_index=block)
    layers.append({"kind": "avgpool", "global": True})
    layers.append(
        {
            "kind": "conv",
            "in_channels": widths[-1],
            "out_channels": as_index(classes, "classes"),
            "kernel_size": 1,
            "bias": True,
            "name": "classifier",
        }
    )
    layers.append({"kind": "flatten"})
    return layers


def scale_widths(widths: Sequence[int], factor: float) -> tuple[int, ...]:
    """Every width times ``factor``, rounded half up: the proportional model of one growth.

    >>> scale_widths((16, 30), 1.35)
    (22, 41)
    """
    factor = check_real(factor, "factor")
    return tuple(round_half_up(as_index(w, "widths entry") * factor) for w in widths)
