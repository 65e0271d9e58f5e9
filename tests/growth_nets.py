"""Small networks in pure Array-API code for growth tests (a helper module, not a test file).

API
---
``NETS``: ``dict[name, builder]``; ``builder(seed: int = 0) -> GrowthNet``.
``build(name, seed=0) -> GrowthNet`` does the same by name; ``cases()`` lists every
``(net name, flow index)``; ``on_backend(backend, params, dtype="float64")`` copies a params
dict onto a ``simcore.testing.Backend``; ``to_host(backend, params)`` brings it back as float64.

``GrowthNet`` is a named tuple ``(params, forward, flows, inputs)``:

* ``params``: ``dict[str, numpy.ndarray]`` (float64; BatchNorm running statistics are random,
  not 0/1, so that copying them matters). Convert with ``backend.asarray`` per entry, e.g.
  ``{k: backend.asarray(v) for k, v in net.params.items()}``.
* ``forward(xp, params, x) -> logits``: eval mode (BatchNorm uses running statistics), written
  with Array-API functions only (convolutions as sums over kernel offsets of matmuls, no
  framework). ``xp`` is the params' namespace (``backend.xp``).
* ``flows``: ``list[ChannelFlow]``, one per growable producer, in network order.
* ``inputs``: a fixed float64 numpy batch for ``forward``.

Activations are smooth (swish, tanh) so that splitting keeps the function to O(eps^2) and not
only almost everywhere (ReLU would add O(eps) errors at kinks).

Networks: ``mlp`` (torch ``(out, in)`` dense layers), ``mlp_flax`` (Flax ``(in, out)`` kernels:
``out_axis=-1``, ``in_axis=0``), ``conv_bn`` (OIHW convs with BatchNorm, global pooling, dense
head), ``mobile_block`` (pointwise -> BN -> depthwise(+bias) -> BN -> pointwise -> BN, MobileNet),
``flatten_head`` (conv -> BN -> avgpool -> NCHW flatten -> dense: a channel owns ``H*W = 4``
consecutive columns), ``conv_flax_nhwc`` (HWIO conv -> BN -> HW1C depthwise -> BN -> NHWC
flatten -> Flax dense: ``channels_last`` columns).

>>> import numpy as np
>>> net = build("mlp")
>>> net.forward(np, net.params, net.inputs).shape
(4, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from simcore.growth import BatchNorm, ChannelFlow, Consumer, Depthwise

__all__ = ["NETS", "GrowthNet", "build", "cases", "on_backend", "to_host"]

BN_EPS = 1e-5


class GrowthNet(NamedTuple):
    params: dict[str, np.ndarray]
    forward: Callable[[Any, dict[str, Any], Any], Any]
    flows: list[ChannelFlow]
    inputs: np.ndarray


# --- Array-API building blocks -----------------------------------------------------------------


def swish(xp: Any, z: Any) -> Any:
    return z / (1.0 + xp.exp(-z))


def dense(xp: Any, x: Any, w: Any, b: Any = None) -> Any:
    """torch layout: ``w`` is ``(out, in)``."""
    y = x @ xp.permute_dims(w, (1, 0))
    return y if b is None else y + b


def _pad(xp: Any, x: Any, pad: int, axes: tuple[int, int]) -> Any:
    if pad == 0:
        return x
    for axis in axes:
        edge = [slice(None)] * x.ndim
        edge[axis] = slice(0, pad)
        zeros = xp.zeros_like(x[tuple(edge)])  # same dtype and device as x
        x = xp.concat([zeros, x, zeros], axis=axis)
    return x


def conv_nchw(xp: Any, x: Any, w: Any, pad: int) -> Any:
    """Stride-1 convolution, x ``(N, C, H, W)``, w ``(O, C, kh, kw)``: a sum over kernel offsets."""
    _, _, h, wd = x.shape
    _, _, kh, kw = w.shape
    x = _pad(xp, x, pad, (2, 3))
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = xp.permute_dims(x[:, :, i : i + ho, j : j + wo], (0, 2, 3, 1))  # N,H,W,C
            term = patch @ xp.permute_dims(w[:, :, i, j], (1, 0))  # N,H,W,O
            out = term if out is None else out + term
    return xp.permute_dims(out, (0, 3, 1, 2))


def depthwise_nchw(xp: Any, x: Any, w: Any, pad: int) -> Any:
    """Channel-wise convolution, w ``(C, 1, kh, kw)`` (torch, groups = C)."""
    _, c, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    x = _pad(xp, x, pad, (2, 3))
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = x[:, :, i : i + ho, j : j + wo] * xp.reshape(w[:, 0, i, j], (1, c, 1, 1))
            out = term if out is None else out + term
    return out


def conv_nhwc(xp: Any, x: Any, w: Any, pad: int) -> Any:
    """Stride-1 convolution, x ``(N, H, W, C)``, w ``(kh, kw, C, O)`` (Flax HWIO)."""
    _, h, wd, _ = x.shape
    kh, kw = w.shape[0], w.shape[1]
    x = _pad(xp, x, pad, (1, 2))
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = x[:, i : i + ho, j : j + wo, :] @ w[i, j, :, :]
            out = term if out is None else out + term
    return out


def depthwise_nhwc(xp: Any, x: Any, w: Any, pad: int) -> Any:
    """Channel-wise convolution, w ``(kh, kw, 1, C)`` (Flax, feature_group_count = C)."""
    _, h, wd, _ = x.shape
    kh, kw = w.shape[0], w.shape[1]
    x = _pad(xp, x, pad, (1, 2))
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = x[:, i : i + ho, j : j + wo, :] * w[i, j, 0, :]
            out = term if out is None else out + term
    return out


def batchnorm(xp: Any, h: Any, p: dict[str, Any], prefix: str, axis: int) -> Any:
    """Eval-mode BatchNorm over ``axis`` with running statistics."""
    shape = [1] * h.ndim
    shape[axis] = h.shape[axis]

    def v(key: str) -> Any:
        return xp.reshape(p[f"{prefix}.{key}"], tuple(shape))

    return (h - v("mean")) / xp.sqrt(v("var") + BN_EPS) * v("weight") + v("bias")


def _bn_params(rng: np.random.Generator, prefix: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.weight": rng.uniform(0.5, 1.5, c),
        f"{prefix}.bias": rng.normal(0.0, 0.1, c),
        f"{prefix}.mean": rng.normal(0.0, 0.1, c),
        f"{prefix}.var": rng.uniform(0.5, 1.5, c),
    }


def _bn_flow(prefix: str) -> BatchNorm:
    return BatchNorm(f"{prefix}.weight", f"{prefix}.bias", f"{prefix}.mean", f"{prefix}.var")


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)


# --- networks ----------------------------------------------------------------------------------


def mlp(seed: int = 0) -> GrowthNet:
    rng = np.random.default_rng(seed)
    p = {
        "fc1.weight": _he(rng, (8, 5), 5),
        "fc1.bias": rng.normal(0, 0.1, 8),
        "fc2.weight": _he(rng, (6, 8), 8),
        "fc2.bias": rng.normal(0, 0.1, 6),
        "fc3.weight": _he(rng, (3, 6), 6),
        "fc3.bias": rng.normal(0, 0.1, 3),
    }

    def forward(xp: Any, p: dict[str, Any], x: Any) -> Any:
        h = swish(xp, dense(xp, x, p["fc1.weight"], p["fc1.bias"]))
        h = xp.tanh(dense(xp, h, p["fc2.weight"], p["fc2.bias"]))
        return dense(xp, h, p["fc3.weight"], p["fc3.bias"])

    flows = [
        ChannelFlow("fc1.weight", bias="fc1.bias", consumers=(Consumer("fc2.weight"),)),
        ChannelFlow("fc2.weight", bias="fc2.bias", consumers=(Consumer("fc3.weight"),)),
    ]
    return GrowthNet(p, forward, flows, rng.normal(size=(4, 5)))


def mlp_flax(seed: int = 0) -> GrowthNet:
    rng = np.random.default_rng(seed)
    p = {
        "Dense_0/kernel": _he(rng, (5, 7), 5),
        "Dense_0/bias": rng.normal(0, 0.1, 7),
        "Dense_1/kernel": _he(rng, (7, 6), 7),
        "Dense_1/bias": rng.normal(0, 0.1, 6),
        "Dense_2/kernel": _he(rng, (6, 3), 6),
    }

    def forward(xp: Any, p: dict[str, Any], x: Any) -> Any:
        h = swish(xp, x @ p["Dense_0/kernel"] + p["Dense_0/bias"])
        h = swish(xp, h @ p["Dense_1/kernel"] + p["Dense_1/bias"])
        return h @ p["Dense_2/kernel"]

    flows = [
        ChannelFlow(
            "Dense_0/kernel", out_axis=-1, bias="Dense_0/bias",
            consumers=(Consumer("Dense_1/kernel", in_axis=0),),
        ),
        ChannelFlow(
            "Dense_1/kernel", out_axis=-1, bias="Dense_1/bias",
            consumers=(Consumer("Dense_2/kernel", in_axis=0),),
        ),
    ]
    return GrowthNet(p, forward, flows, rng.normal(size=(4, 5)))


def conv_bn(seed: int = 0) -> GrowthNet:
    rng = np.random.default_rng(seed)
    p = {
        "conv1.weight": _he(rng, (4, 3, 3, 3), 27),
        **_bn_params(rng, "bn1", 4),
        "conv2.weight": _he(rng, (5, 4, 3, 3), 36),
        "conv2.bias": rng.normal(0, 0.1, 5),
        **_bn_params(rng, "bn2", 5),
        "fc.weight": _he(rng, (2, 5), 5),
        "fc.bias": rng.normal(0, 0.1, 2),
    }

    def forward(xp: Any, p: dict[str, Any], x: Any) -> Any:
        h = swish(xp, batchnorm(xp, conv_nchw(xp, x, p["conv1.weight"], 1), p, "bn1", 1))
        h = conv_nchw(xp, h, p["conv2.weight"], 1) + xp.reshape(p["conv2.bias"], (1, -1, 1, 1))
        h = swish(xp, batchnorm(xp, h, p, "bn2", 1))
        return dense(xp, xp.mean(h, axis=(2, 3)), p["fc.weight"], p["fc.bias"])

    flows = [
        ChannelFlow("conv1.weight", norm=_bn_flow("bn1"), consumers=(Consumer("conv2.weight"),)),
        ChannelFlow(
            "conv2.weight", bias="conv2.bias", norm=_bn_flow("bn2"),
            consumers=(Consumer("fc.weight"),),
        ),
    ]
    return GrowthNet(p, forward, flows, rng.normal(size=(2, 3, 5, 5)))


def mobile_block(seed: int = 0) -> GrowthNet:
    rng = np.random.default_rng(seed)
    p = {
        "pw1.weight": _he(rng, (6, 3, 1, 1), 3),
        **_bn_params(rng, "bn1", 6),
        "dw.weight": _he(rng, (6, 1, 3, 3), 9),
        "dw.bias": rng.normal(0, 0.1, 6),
        **_bn_params(rng, "bn_dw", 6),
        "pw2.weight": _he(rng, (5, 6, 1, 1), 6),
        **_bn_params(rng, "bn2", 5),
        "fc.weight": _he(rng, (2, 5), 5),
        "fc.bias": rng.normal(0, 0.1, 2),
    }

    def forward(xp: Any, p: dict[str, Any], x: Any) -> Any:
        h = swish(xp, batchnorm(xp, conv_nchw(xp, x, p["pw1.weight"], 0), p, "bn1", 1))
        h = depthwise_nchw(xp, h, p["dw.weight"], 1) + xp.reshape(p["dw.bias"], (1, -1, 1, 1))
        h = swish(xp, batchnorm(xp, h, p, "bn_dw", 1))
        h = swish(xp, batchnorm(xp, conv_nchw(xp, h, p["pw2.weight"], 0), p, "bn2", 1))
        return dense(xp, xp.mean(h, axis=(2, 3)), p["fc.weight"], p["fc.bias"])

    flows = [
        ChannelFlow(
            "pw1.weight", norm=_bn_flow("bn1"),
            depthwise=(Depthwise("dw.weight", bias="dw.bias", norm=_bn_flow("bn_dw")),),
            consumers=(Consumer("pw2.weight"),),
        ),
        ChannelFlow("pw2.weight", norm=_bn_flow("bn2"), consumers=(Consumer("fc.weight"),)),
    ]
    return GrowthNet(p, forward, flows, rng.normal(size=(2, 3, 4, 4)))


def flatten_head(seed: int = 0) -> GrowthNet:
    rng = np.random.default_rng(seed)
    p = {
        "conv.weight": _he(rng, (4, 3, 3, 3), 27),
        "conv.bias": rng.normal(0, 0.1, 4),
        **_bn_params(rng, "bn", 4),
        "fc1.weight": _he(rng, (6, 16), 16),
        "fc1.bias": rng.normal(0, 0.1, 6),
        "fc2.weight": _he(rng, (2, 6), 6),
    }

    def forward(xp: Any, p: dict[str, Any], x: Any) -> Any:
        h = conv_nchw(xp, x, p["conv.weight"], 1) + xp.reshape(p["conv.bias"], (1, -1, 1, 1))
        h = swish(xp, batchnorm(xp, h, p, "bn", 1))
        n, c = h.shape[0], h.shape[1]
        h = xp.mean(xp.reshape(h, (n, c, 2, 2, 2, 2)), axis=(3, 5))  # 2x2 average pool
        h = xp.reshape(h, (n, c * 4))  # NCHW flatten: channel c owns columns 4c .. 4c+3
        h = xp.tanh(dense(xp, h, p["fc1.weight"], p["fc1.bias"]))
        return dense(xp, h, p["fc2.weight"])

    flows = [
        ChannelFlow(
            "conv.weight", bias="conv.bias", norm=_bn_flow("bn"),
            consumers=(Consumer("fc1.weight", spatial=4),),
        ),
        ChannelFlow("fc1.weight", bias="fc1.bias", consumers=(Consumer("fc2.weight"),)),
    ]
    return GrowthNet(p, forward, flows, rng.normal(size=(2, 3, 4, 4)))


def conv_flax_nhwc(seed: int = 0) -> GrowthNet:
    rng = np.random.default_rng(seed)
    p = {
        "Conv_0/kernel": _he(rng, (3, 3, 3, 4), 27),
        "Conv_0/bias": rng.normal(0, 0.1, 4),
        **_bn_params(rng, "BatchNorm_0", 4),
        "Depthwise_0/kernel": _he(rng, (3, 3, 1, 4), 9),
        **_bn_params(rng, "BatchNorm_1", 4),
        "Dense_0/kernel": _he(rng, (3 * 3 * 4, 2), 36),
    }

    def forward(xp: Any, p: dict[str, Any], x: Any) -> Any:
        h = conv_nhwc(xp, x, p["Conv_0/kernel"], 1) + p["Conv_0/bias"]
        h = swish(xp, batchnorm(xp, h, p, "BatchNorm_0", 3))
        h = depthwise_nhwc(xp, h, p["Depthwise_0/kernel"], 1)
        h = swish(xp, batchnorm(xp, h, p, "BatchNorm_1", 3))
        h = xp.reshape(h, (h.shape[0], -1))  # NHWC flatten: channel c owns columns c, c+C, ...
        return h @ p["Dense_0/kernel"]

    flows = [
        ChannelFlow(
            "Conv_0/kernel", out_axis=-1, bias="Conv_0/bias", norm=_bn_flow("BatchNorm_0"),
            depthwise=(
                Depthwise("Depthwise_0/kernel", channel_axis=-1, norm=_bn_flow("BatchNorm_1")),
            ),
            consumers=(Consumer("Dense_0/kernel", in_axis=0, spatial=9, channels_last=True),),
        ),
    ]
    return GrowthNet(p, forward, flows, rng.normal(size=(2, 3, 3, 3)))


NETS: dict[str, Callable[[int], GrowthNet]] = {
    "mlp": mlp,
    "mlp_flax": mlp_flax,
    "conv_bn": conv_bn,
    "mobile_block": mobile_block,
    "flatten_head": flatten_head,
    "conv_flax_nhwc": conv_flax_nhwc,
}


def build(name: str, seed: int = 0) -> GrowthNet:
    """The network ``name`` of :data:`NETS`, built from ``seed``."""
    return NETS[name](seed)


def on_backend(backend: Any, params: dict[str, np.ndarray], dtype: str | None = "float64") -> dict:
    """``params`` copied onto ``backend`` (a ``simcore.testing.Backend``) in ``dtype``."""
    return {k: backend.asarray(v, dtype) for k, v in params.items()}


def to_host(backend: Any, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """``params`` back as float64 NumPy arrays."""
    return {k: np.asarray(backend.to_numpy(v), dtype=np.float64) for k, v in params.items()}


def cases() -> list[tuple[str, int]]:
    """``(net name, flow index)`` for every growable producer of every network."""
    return [(name, i) for name in NETS for i in range(len(build(name).flows))]
