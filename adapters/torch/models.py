"""The paper's growth seeds, VGG16 and MobileNetV1 for 32x32 inputs, at any per-layer width.

Both models are plain stacks that ``torch.fx`` traces without help: a flat
``nn.Sequential`` called ``features``, then (MobileNet only) ``pool``, then a
1x1 convolution with bias called ``classifier`` and a flatten to logits. No
data-dependent control flow. Module names are regular:

* ``VGG16``: for conv layer ``k`` (0-based, 13 of them) ``features.{i}`` is the
  ``Conv2d`` (3x3, padding 1, no bias), ``features.{i+1}`` its ``BatchNorm2d``
  and ``features.{i+2}`` its ``ReLU``; a ``MaxPool2d(2)`` follows conv layers
  2, 4, 7, 10 and 13 (1-based), so the conv indices are
  0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40. A 32x32 input reaches the
  classifier as a 1x1 map.
* ``MobileNetV1``: ``features.0/1/2`` are the stem (3x3 conv, no bias, BN,
  activation); block ``b`` (0-based, 13 of them) occupies ``features.{3+6b}``
  to ``features.{8+6b}``: depthwise 3x3 conv (``groups`` = channels), BN,
  activation, pointwise 1x1 conv, BN, activation. Blocks 2, 4, 6 and 12
  (1-based; see docs/design.md, 'Growth') have stride 2 in their depthwise conv, so a
  32x32 input ends as a 2x2 map that ``pool`` (adaptive average) reduces to 1x1.

``widths(model)`` reads the current per-layer widths (the 13 conv widths of
VGG16; the stem and the 13 pointwise widths of MobileNetV1: a depthwise conv
always has its input's width), and :func:`architecture` / :func:`build` turn a
(possibly grown) model into a primitive description and back, which is what
checkpoints store.

>>> import torch
>>> from simcore.adapters.torch import vgg16, mobilenet_v1, widths
>>> sum(p.numel() for p in vgg16().parameters())
28666
>>> sum(p.numel() for p in mobilenet_v1().parameters())
19978
>>> vgg16()(torch.zeros(2, 3, 32, 32)).shape
torch.Size([2, 10])
>>> widths(mobilenet_v1(width=[8] * 14))[:3]
[8, 8, 8]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from simcore.extend import check_int

__all__ = [
    "MOBILENET_V1_STRIDES",
    "VGG16_CONFIG",
    "MobileNetV1",
    "VGG16",
    "architecture",
    "build",
    "mobilenet_v1",
    "vgg16",
    "widths",
]

#: VGG16's layer pattern ("M" = 2x2 max-pool); only its shape matters, every conv
#: width is set by the ``width`` argument (the paper's seed: all 16).
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")
VGG16_CONVS = sum(1 for c in VGG16_CONFIG if c != "M")

#: Stride of each of MobileNetV1's 13 depthwise convs for 32x32 inputs (the stem
#: has stride 1): stride 2 at blocks 2, 4, 6 and 12 (1-based), as in the CIFAR
#: MobileNet that SSD and Firefly grow.
MOBILENET_V1_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
MOBILENET_V1_LAYERS = 1 + len(MOBILENET_V1_STRIDES)

_ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU}


def _positive_int(value: Any, name: str) -> int:
    return check_int(value, name, minimum=1)


def _layer_widths(width: Any, count: int) -> list[int]:
    """``width`` as one positive int per layer: an int for all, or a sequence of ``count``."""
    if isinstance(width, Sequence) and not isinstance(width, str):
        if len(width) != count:
            raise ValueError(f"width must have {count} entries (one per layer), got {len(width)}")
        return [_positive_int(w, f"width[{i}]") for i, w in enumerate(width)]
    if isinstance(width, torch.Tensor) or isinstance(width, str):
        raise TypeError(f"width must be an int or a sequence of ints, got {type(width).__name__}")
    return [_positive_int(width, "width")] * count


class VGG16(nn.Module):
    """VGG16 for CIFAR with per-layer conv widths; see the module docstring for names."""

    def __init__(self, num_classes: int = 10, width: int | Sequence[int] = 16,
                 in_channels: int = 3):
        super().__init__()
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.in_channels = _positive_int(in_channels, "in_channels")
        layer_widths = iter(_layer_widths(width, VGG16_CONVS))
        layers: list[nn.Module] = []
        channels = self.in_channels
        for item in VGG16_CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = next(layer_widths)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.features(x))
        # reshape to (batch, classes), not flatten: an input that is not 32x32 leaves a
        # map larger than 1x1 and must fail here instead of returning too many logits.
        return logits.reshape(logits.shape[0], self.num_classes)


class MobileNetV1(nn.Module):
    """MobileNetV1 for CIFAR with per-layer widths; see the module docstring for names."""

    def __init__(self, num_classes: int = 10, width: int | Sequence[int] = 32,
                 in_channels: int = 3, activation: str = "swish"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected 'swish' or 'relu'")
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.activation = activation
        act = _ACTIVATIONS[activation]
        stem, *pointwise = _layer_widths(width, MOBILENET_V1_LAYERS)
        layers: list[nn.Module] = [nn.Conv2d(self.in_channels, stem, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(stem), act()]
        channels = stem
        for out, stride in zip(pointwise, MOBILENET_V1_STRIDES, strict=True):
            layers += [
                nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels,
                          bias=False),
                nn.BatchNorm2d(channels), act(),
                nn.Conv2d(channels, out, 1, bias=False), nn.BatchNorm2d(out), act(),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(channels, self.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.pool(self.features(x))), 1)


def vgg16(num_classes: int = 10, width: int | Sequence[int] = 16,
          in_channels: int = 3) -> VGG16:
    """The paper's VGG16 growth seed: 28,666 parameters at ``width=16``, 10 classes.

    ``width`` is one int for all 13 convs or a list of 13 widths (a grown model).
    """
    return VGG16(num_classes, width, in_channels)


def mobilenet_v1(num_classes: int = 10, width: int | Sequence[int] = 32,
                 in_channels: int = 3, activation: str = "swish") -> MobileNetV1:
    """The paper's MobileNetV1 growth seed: 19,978 parameters at ``width=32``, 10 classes.

    ``width`` is one int for all 14 layers or a list of 14 (stem, then the 13
    pointwise convs); ``activation`` is ``"swish"`` (the paper's) or ``"relu"``.
    """
    return MobileNetV1(num_classes, width, in_channels, activation)


_BUILDERS: dict[str, Callable[..., VGG16 | MobileNetV1]] = {
    "vgg16": vgg16, "mobilenet_v1": mobilenet_v1}


def _check_model(model: Any) -> VGG16 | MobileNetV1:
    if not isinstance(model, (VGG16, MobileNetV1)):
        raise TypeError(
            f"model must be a VGG16 or MobileNetV1 from simcore.adapters.torch.models, "
            f"got {type(model).__name__}"
        )
    return model


def widths(model: VGG16 | MobileNetV1) -> list[int]:
    """The current per-layer widths, in the order the builders take them.

    Read from the modules themselves, so a model grown in place reports its new
    widths (13 for VGG16; stem + 13 pointwise for MobileNetV1). MobileNetV1's
    are picked by position (``features.0`` and ``features.{6+6b}``), not by
    ``groups``: a width-1 layer's depthwise conv has ``groups == 1`` too.
    """
    _check_model(model)
    if isinstance(model, MobileNetV1):
        picked = [model.features[0]] + [model.features[6 + 6 * b]
                                        for b in range(len(MOBILENET_V1_STRIDES))]
    else:
        picked = list(model.features)
    return [int(m.out_channels) for m in picked if isinstance(m, nn.Conv2d)]


def architecture(model: nn.Module) -> dict[str, Any]:
    """A primitive description ``{"builder": name, "kwargs": {...}}`` of ``model`` as it is now.

    ``build(architecture(model))`` makes a fresh model of the same shape; any other module is
    a ``TypeError`` (no builder makes it).
    """
    model = _check_model(model)
    kwargs: dict[str, Any] = {
        "num_classes": model.num_classes,
        "width": widths(model),
        "in_channels": model.in_channels,
    }
    if isinstance(model, MobileNetV1):
        kwargs["activation"] = model.activation
        return {"builder": "mobilenet_v1", "kwargs": kwargs}
    return {"builder": "vgg16", "kwargs": kwargs}


def build(description: Mapping[str, Any]) -> VGG16 | MobileNetV1:
    """Build a model from :func:`architecture`'s description (fresh weights)."""
    if not isinstance(description, Mapping):
        raise TypeError(f"description must be a mapping, got {type(description).__name__}")
    name = description.get("builder")
    if name not in _BUILDERS:
        raise ValueError(f"unknown builder {name!r}; expected one of {sorted(_BUILDERS)}")
    kwargs = description.get("kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"description['kwargs'] must be a mapping, got {type(kwargs).__name__}")
    return _BUILDERS[name](**kwargs)
