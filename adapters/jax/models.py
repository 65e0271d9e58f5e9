"""The paper's growth seeds in Flax linen: VGG16 and MobileNetV1 for 32x32 inputs, any widths.

Both are built from the core's plain-data descriptions
(:func:`simcore.growth.presets.vgg16_cifar`, :func:`~simcore.growth.presets.mobilenet_v1_cifar`),
the same architecture as the PyTorch seeds of ``simcore.adapters.torch.models`` and with the
same parameter counts (28,666 and 19,978 at the paper's widths, 10 classes; a test compares
them at other widths too): 3x3 convs with padding 1 and no bias, BatchNorm after every conv,
ReLU (VGG16) or swish (MobileNetV1), VGG16's five 2x2 max-pools, MobileNetV1's depthwise 3x3 +
pointwise 1x1 blocks with stride 2 in blocks 2, 4, 6 and 12, a global average pool, and a 1x1
conv classifier with bias whose 1x1 map is reshaped to ``(batch, classes)``.

Differences that are Flax's, not the architecture's:

* **Channels last.** Inputs are NHWC, ``(batch, 32, 32, 3)``; the project's data is NCHW,
  so a batch ``x`` from ``simcore.experiment.data`` goes in as ``x.permute(0, 2, 3, 1)``
  (torch) or ``jnp.transpose(x, (0, 2, 3, 1))``. Kernels are HWIO, neurons on the last axis.
* **The widths are a field.** ``widths`` (a tuple, producers in forward order: VGG16's 13
  convs; MobileNetV1's stem and 13 pointwise convs; a depthwise conv always has its input's
  width) defines the module, so a grown model is ``model.clone(widths=new_widths)`` applied
  to the grown variables.
* **Initial values** are drawn from the same distributions as PyTorch's defaults
  (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for kernels and the classifier's bias), not the
  same numbers. BatchNorm uses PyTorch's momentum (0.1, Flax ``momentum=0.9``) and epsilon
  (1e-5); its running variance is updated with the biased batch variance (PyTorch uses the
  unbiased one).

Module names: VGG16's conv ``k`` (0-based) is ``conv{k}`` with BatchNorm ``bn{k}``;
MobileNetV1's stem is ``conv0``/``bn0``, block ``b`` (1-based) has ``dw{b}``/``dw{b}_bn``
(depthwise) and ``conv{b}``/``bn{b}`` (pointwise); both end in ``classifier``. So ``conv{i}``
is always the producer of ``widths[i]``.

>>> import jax, jax.numpy as jnp
>>> from simcore.adapters.jax.models import mobilenet_v1, parameter_count, vgg16
>>> model, x = vgg16(), jnp.zeros((2, 32, 32, 3))
>>> shapes = jax.eval_shape(model.init, jax.random.key(0), x)  # model.init(...) for values
>>> parameter_count(shapes)
28666
>>> jax.eval_shape(model.apply, shapes, x).shape
(2, 10)
>>> parameter_count(jax.eval_shape(mobilenet_v1().init, jax.random.key(0), x))
19978
>>> vgg16(width=[8] * 13).clone(widths=[9] * 13).widths[:2]
(9, 9)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from simcore.extend import check_int
from simcore.growth.presets import (
    MOBILENET_V1_SEED_WIDTHS,
    VGG16_SEED_WIDTHS,
    mobilenet_v1_cifar,
    vgg16_cifar,
)

__all__ = ["ACTIVATIONS", "MobileNetV1", "VGG16", "mobilenet_v1", "parameter_count", "vgg16",
           "widths"]

#: The activations a seed may use, by the name the core's layer lists give them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"relu": nn.relu, "swish": nn.swish}
# PyTorch's BatchNorm2d defaults, in Flax's terms (Flax's momentum is 1 - PyTorch's).
_BN_MOMENTUM, _BN_EPSILON = 0.9, 1e-5


def _torch_uniform(fan_in: int) -> Callable[..., jax.Array]:
    """PyTorch's default conv init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, for any shape."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _as_widths(widths: Any, count: int) -> tuple[int, ...]:
    """``widths`` as a tuple of ``count`` positive ints (an int means the same for every layer)."""
    if isinstance(widths, (str, bytes)) or hasattr(widths, "shape"):
        raise TypeError(f"widths must be an int or a sequence of ints, got "
                        f"{type(widths).__name__}")
    if isinstance(widths, Sequence):
        if len(widths) != count:
            raise ValueError(f"widths must have {count} entries (one per layer), got "
                             f"{len(widths)}")
        return tuple(check_int(w, f"widths[{i}]", minimum=1) for i, w in enumerate(widths))
    return (check_int(widths, "widths", minimum=1),) * count


def _example_mask(mask: Any, x: jax.Array) -> jax.Array | None:
    """``mask`` (one bool per example) shaped to broadcast over NHWC ``x``, or None."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != x.shape[:1] or mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a bool array of shape {x.shape[:1]} (one entry per "
                         f"example), got {mask.dtype} {mask.shape}")
    return mask[:, None, None, None]


def _run_layers(module: nn.Module, layers: list[dict[str, Any]], x: jax.Array, train: bool,
                num_classes: int, mask: jax.Array | None = None) -> jax.Array:
    """Apply a core layer list (``simcore.growth.presets``) to NHWC ``x`` inside ``module``.

    Names follow the module docstring: a conv with a ``width_index`` is ``conv{i}``, any
    other conv before the classifier is the depthwise conv of the next block. ``mask``
    (training only): the examples BatchNorm takes its batch statistics over.
    """
    conv_name = bn_name = ""
    where = _example_mask(mask, x) if train else None
    for layer in layers:
        kind = layer["kind"]
        if kind == "conv":
            k, groups = layer["kernel_size"], layer.get("groups", 1)
            if layer.get("name") == "classifier":
                conv_name = "classifier"
            elif "width_index" in layer:
                conv_name, bn_name = f"conv{layer['width_index']}", f"bn{layer['width_index']}"
            else:  # depthwise: belongs to the block of the next pointwise conv
                block = int(conv_name.removeprefix("conv")) + 1
                conv_name, bn_name = f"dw{block}", f"dw{block}_bn"
            fan_in = layer["in_channels"] // groups * k * k
            padding = layer.get("padding", 0)
            x = nn.Conv(layer["out_channels"], (k, k), strides=layer.get("stride", 1),
                        padding=((padding, padding), (padding, padding)),
                        feature_group_count=groups, use_bias=layer.get("bias", False),
                        kernel_init=_torch_uniform(fan_in), bias_init=_torch_uniform(fan_in),
                        name=conv_name, parent=module)(x)
        elif kind == "batchnorm":
            x = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                             epsilon=_BN_EPSILON, name=bn_name, parent=module)(x, mask=where)
        elif kind == "activation":
            x = ACTIVATIONS[layer["name"]](x)
        elif kind == "maxpool":
            size = layer["kernel_size"]
            x = nn.max_pool(x, (size, size), strides=(layer["stride"], layer["stride"]))
        elif kind == "avgpool":
            x = jnp.mean(x, axis=(1, 2), keepdims=True)
        elif kind == "flatten":
            # reshape to (batch, classes), not flatten: an input that is not 32x32 leaves a map
            # larger than 1x1 and must fail here instead of returning too many logits.
            if x.shape[1:] != (1, 1, num_classes):
                raise ValueError(f"the classifier's output map is {x.shape[1:3]}, not 1x1: the "
                                 f"seeds take 32x32 inputs (NHWC), got another size")
            x = x.reshape(x.shape[0], num_classes)
        else:  # the presets use no other kind
            raise ValueError(f"unknown layer kind {kind!r}")
    return x


def _check_input(x: Any) -> None:
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"inputs must be NHWC images (batch, 32, 32, channels), got shape "
                         f"{getattr(x, 'shape', None)}; convert NCHW data with "
                         f"jnp.transpose(x, (0, 2, 3, 1))")


class VGG16(nn.Module):
    """VGG16 for 32x32 NHWC inputs with per-layer conv widths (see the module docstring).

    ``model.apply(variables, x, train=True, mutable=["batch_stats"])`` trains (batch
    statistics, running averages updated); ``train=False`` (default) evaluates. ``mask``
    (training, optional): one bool per example, the examples the batch statistics are taken
    over, so that a batch padded to a fixed size normalises as its real examples alone do.
    """

    widths: Sequence[int] = VGG16_SEED_WIDTHS
    num_classes: int = 10

    def __post_init__(self):
        # a tuple (hashable, so jit can take the module as a static argument), checked now
        object.__setattr__(self, "widths", _as_widths(self.widths, len(VGG16_SEED_WIDTHS)))
        object.__setattr__(self, "num_classes", check_int(self.num_classes, "num_classes",
                                                          minimum=1))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 mask: jax.Array | None = None) -> jax.Array:
        _check_input(x)
        layers = vgg16_cifar(self.widths, in_channels=int(x.shape[-1]), classes=self.num_classes)
        return _run_layers(self, layers, x, train, self.num_classes, mask)


class MobileNetV1(nn.Module):
    """MobileNetV1 for 32x32 NHWC inputs with per-layer widths (see the module docstring).

    ``widths``: the stem and the 13 pointwise convs; ``activation``: ``"swish"`` (the
    paper's) or ``"relu"``; ``train`` and ``mask`` as for :class:`VGG16`.
    """

    widths: Sequence[int] = MOBILENET_V1_SEED_WIDTHS
    num_classes: int = 10
    activation: str = "swish"

    def __post_init__(self):
        object.__setattr__(self, "widths",
                           _as_widths(self.widths, len(MOBILENET_V1_SEED_WIDTHS)))
        object.__setattr__(self, "num_classes", check_int(self.num_classes, "num_classes",
                                                          minimum=1))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of "
                             f"{tuple(ACTIVATIONS)}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False,
                 mask: jax.Array | None = None) -> jax.Array:
        _check_input(x)
        layers = mobilenet_v1_cifar(self.widths, in_channels=int(x.shape[-1]),
                                    classes=self.num_classes, activation=self.activation)
        return _run_layers(self, layers, x, train, self.num_classes, mask)


def vgg16(num_classes: int = 10, width: int | Sequence[int] = 16) -> VGG16:
    """The paper's VGG16 growth seed: 28,666 parameters at ``width=16``, 10 classes.

    ``width`` is one int for all 13 convs or a list of 13 widths (a grown model), as for
    ``simcore.adapters.torch.vgg16``.
    """
    return VGG16(widths=_as_widths(width, len(VGG16_SEED_WIDTHS)), num_classes=num_classes)


def mobilenet_v1(num_classes: int = 10, width: int | Sequence[int] = 32,
                 activation: str = "swish") -> MobileNetV1:
    """The paper's MobileNetV1 growth seed: 19,978 parameters at ``width=32``, 10 classes.

    ``width`` is one int for all 14 layers or a list of 14 (stem, then the 13 pointwise convs).
    """
    return MobileNetV1(widths=_as_widths(width, len(MOBILENET_V1_SEED_WIDTHS)),
                       num_classes=num_classes, activation=activation)


def widths(model: VGG16 | MobileNetV1) -> list[int]:
    """The per-layer widths of a seed (its ``widths`` field), in the order the builders take."""
    if not isinstance(model, (VGG16, MobileNetV1)):
        raise TypeError(f"model must be a VGG16 or MobileNetV1 from simcore.adapters.jax.models, "
                        f"got {type(model).__name__}")
    return list(model.widths)


def parameter_count(variables: Mapping[str, Any]) -> int:
    """Trainable parameters: the entries of ``variables["params"]`` (BatchNorm's running
    statistics are in ``batch_stats``, buffers as in PyTorch)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("variables must be a linen variables dict with a 'params' collection")
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(variables["params"]))
