"""Find the weight kernels of Flax (linen, nnx) and Equinox parameter trees.

A kernel is named by its path in the tree, joined with "/" (``"Conv_0/kernel"``
in a linen ``params`` dict, ``"layers/0/weight"`` in an Equinox module). The
trailing ``value`` attribute of an ``nnx.Variable`` is dropped, so an nnx
``State``, its pure-dict form and the gradients ``jax.grad`` returns for it all
name a kernel ``"conv/kernel"``. :func:`find_kernels` returns
``{name: neuron_axis}``, which is what :func:`penalty` and
:func:`add_similarity_gradient` take as ``neuron_axis``.

Layouts: Flax stores ``Dense``/``Linear`` kernels as ``(in, out)`` and convs as
HWIO, neurons on the last axis (``-1``); Equinox stores ``Linear.weight`` as
``(out, in)`` and ``Conv.weight`` as OIHW, neurons first (``0``). Biases and
normalisation parameters are never kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from simcore.extend import DEPTHWISE, check_choice
from simcore.growth import is_depthwise

__all__ = ["DEPTHWISE", "LAYOUTS", "find_kernels", "leaf_name", "named_leaves"]

LAYOUTS = ("auto", "linen", "nnx", "equinox")


def _key_text(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_name(path: tuple) -> str:
    """``"a/b/c"`` for a ``jax.tree_util`` key path (an nnx Variable's ``value`` dropped)."""
    parts = [_key_text(k) for k in path]
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        parts = parts[:-1]
    return "/".join(parts)


def named_leaves(tree: Any) -> dict[str, Any]:
    """``{leaf_name: leaf}`` for every leaf of ``tree``, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {leaf_name(path): leaf for path, leaf in flat}


def _is_depthwise_kernel(kernel: Any, produced: set[int]) -> bool:
    # A linen params dict records no group count, only the HWIO kernel
    # (kh, kw, in_channels / groups, out_channels). is_depthwise's
    # ``in_channels == groups`` is that third axis being 1; its ``groups > 1`` is
    # not recorded. A depthwise conv reads the C channels some other layer produced,
    # so a (kh, kw, 1, C) kernel counts as depthwise only when another kernel has C
    # outputs: a conv reading a one-channel image (the MNIST CNN's first layer) is not.
    # (Still misjudged: such a first conv followed by a layer of the same width.)
    return (kernel.ndim >= 3 and int(kernel.shape[-2]) == 1 and int(kernel.shape[-1]) > 1
            and int(kernel.shape[-1]) in produced)


def _keep(depthwise_layer: bool, depthwise: str) -> bool:
    if depthwise == "include":
        return True
    return depthwise_layer if depthwise == "only" else not depthwise_layer


def _linen_kernels(tree: Any, depthwise: str) -> dict[str, int]:
    # No group count here: see _is_depthwise_kernel for the shape rule (pass
    # depthwise="include", the default, when a one-channel input conv matters).
    kernels = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = leaf_name(path)
        if name.rsplit("/", 1)[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2:
            kernels[name] = leaf
    found = {}
    for name, leaf in kernels.items():
        produced = {int(k.shape[-1]) for other, k in kernels.items()
                    if other != name and not (k.ndim >= 3 and int(k.shape[-2]) == 1)}
        if _keep(_is_depthwise_kernel(leaf, produced), depthwise):
            found[name] = -1
    return found


def _nnx_kernels(model: Any, depthwise: str) -> dict[str, int]:
    from flax import nnx

    kernel_paths = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Conv):
            layer_is_depthwise = is_depthwise(int(node.in_features), int(node.feature_group_count))
            if _keep(layer_is_depthwise, depthwise):
                kernel_paths[tuple(map(str, path)) + ("kernel",)] = -1
        elif isinstance(node, (nnx.Linear, nnx.LinearGeneral)):
            if _keep(False, depthwise):
                kernel_paths[tuple(map(str, path)) + ("kernel",)] = -1
    found = {}
    for name in named_leaves(nnx.state(model, nnx.Param)):
        axis = kernel_paths.get(tuple(name.split("/")))
        if axis is not None:
            found[name] = axis
    return found


def _equinox_kernels(model: Any, depthwise: str) -> dict[str, int]:
    import equinox as eqx

    def is_layer(x):
        return isinstance(x, (eqx.nn.Linear, eqx.nn.Conv))

    found = {}
    flat = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_layer)[0]
    for path, node in flat:
        if not is_layer(node):
            continue
        layer_is_depthwise = isinstance(node, eqx.nn.Conv) and is_depthwise(
            int(node.in_channels), int(node.groups)
        )
        if _keep(layer_is_depthwise, depthwise):
            found[leaf_name((*path, jax.tree_util.GetAttrKey("weight")))] = 0
    return found


def _detect_layout(tree: Any) -> str:
    try:
        import equinox as eqx

        if isinstance(tree, eqx.Module):
            return "equinox"
    except ImportError:
        pass
    try:
        from flax import nnx

        if isinstance(tree, nnx.Module):
            return "nnx"
    except ImportError:
        pass
    if isinstance(tree, Mapping):
        return "linen"
    raise TypeError(
        "cannot tell the layout of a tree of type "
        f"{type(tree).__name__}; pass layout='linen', 'nnx' or 'equinox'"
    )


def find_kernels(tree: Any, *, layout: str = "auto", depthwise: str = "exclude") -> dict[str, int]:
    """``{name: neuron_axis}`` for every dense/conv kernel of a Flax or Equinox tree.

    ``tree`` is a linen ``params`` dict (or the whole ``variables`` dict, or an
    nnx ``State``: any mapping whose kernels are leaves named ``kernel``), an
    ``nnx.Module`` or an ``eqx.Module``; ``layout="auto"`` tells them apart.
    ``depthwise`` drops depthwise convs (``"exclude"``, the default, as in the torch
    adapter's ``SimilarityPenalty``: a depthwise neuron has only ``kh*kw`` weights, far
    fewer than the layer has neurons, so Eq. 2 cannot decorrelate them and would pull
    against a floor it cannot reach; see docs/design.md, 'The similarity loss (Eq. 1-2)'),
    keeps them (``"include"``) or keeps only them (``"only"``); depthwise means
    :func:`simcore.growth.is_depthwise` (every group reads one input channel,
    so a ResNeXt-style grouped conv is not depthwise). nnx and Equinox modules
    report their input channels and group count; a linen dict does not, so
    there a kernel with one input channel per group and several outputs,
    ``(kh, kw, 1, C > 1)``, counts as depthwise when another (non-depthwise) kernel
    outputs ``C`` channels (so a conv on a one-channel image is not depthwise, unless
    a later layer has its width: pass ``depthwise="include"`` there).

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from simcore.adapters.jax import find_kernels
    >>> model = nn.Sequential([nn.Conv(4, (3, 3)), nn.BatchNorm(use_running_average=True),
    ...                        nn.Dense(2)])
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    >>> find_kernels(variables["params"])
    {'layers_0/kernel': -1, 'layers_2/kernel': -1}
    """
    check_choice(layout, LAYOUTS, "layout")
    check_choice(depthwise, DEPTHWISE, "depthwise")
    if layout == "auto":
        layout = _detect_layout(tree)
    if layout == "equinox":
        return _equinox_kernels(tree, depthwise)
    if layout == "nnx":
        from flax import nnx

        if isinstance(tree, nnx.Module):
            return _nnx_kernels(tree, depthwise)
        return _linen_kernels(tree, depthwise)
    return _linen_kernels(tree, depthwise)
