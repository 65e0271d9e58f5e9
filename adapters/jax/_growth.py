"""Widen a Flax linen model's variables and its optax state through simcore.growth.

The core operators (:mod:`simcore.growth`) work on a flat ``{name: array}``
mapping and a :class:`~simcore.growth.ChannelFlow`. Here a linen ``variables``
dict (``{"params": ..., "batch_stats": ...}``) is flattened to names like
``"params/Conv_0/kernel"`` and ``"batch_stats/BatchNorm_0/mean"``,
:func:`linen_flow` describes a layer in Flax's layout (neurons on the last axis
of HWIO/``(in, out)`` kernels; a consumer conv reads them on axis -2, a
consumer ``Dense`` on axis 0, after a channels-last flatten if it comes after
one), and the grown arrays are put back into a dict of the same structure.
Nothing is mutated: every function returns new trees.

The model definition does not change by itself: build the wider module (more
``features``) and apply it to the grown variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from simcore import growth

from ._optstate import grow_mirrors
from ._trees import leaf_name, named_leaves

__all__ = [
    "add_neurons",
    "flatten_variables",
    "grow_optax_state",
    "linen_flow",
    "replicate_neurons",
    "split_neurons",
    "unflatten_variables",
]


def flatten_variables(variables: Any) -> dict[str, Any]:
    """``{"collection/module/.../leaf": array}`` for a linen ``variables`` dict."""
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a dict of collections, got {type(variables).__name__}")
    return named_leaves(variables)


def unflatten_variables(variables: Any, flat: Mapping[str, Any]) -> Any:
    """A tree of ``variables``' structure whose leaves are ``flat[name]`` (shapes may differ)."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(variables)
    return jax.tree_util.tree_unflatten(treedef, [flat[leaf_name(path)] for path, _ in paths])


def _module_entry(flat, collection, module, leaf, required):
    name = f"{collection}/{module}/{leaf}"
    if name in flat:
        return name
    if required:
        raise ValueError(f"variables has no {name!r} (is {module!r} the module's name?)")
    return None


def _norm(flat, module):
    if module is None:
        return None
    names = {
        "scale": _module_entry(flat, "params", module, "scale", False),
        "shift": _module_entry(flat, "params", module, "bias", False),
        "mean": _module_entry(flat, "batch_stats", module, "mean", False),
        "var": _module_entry(flat, "batch_stats", module, "var", False),
    }
    if all(v is None for v in names.values()):
        raise ValueError(f"variables has no BatchNorm entries under {module!r}")
    return growth.BatchNorm(**names)


def linen_flow(
    variables: Any,
    producer: str,
    *,
    consumers: Sequence[str] = (),
    norm: str | None = None,
    depthwise: Sequence[str | tuple[str, str | None]] = (),
) -> growth.ChannelFlow:
    """Describe one growable linen layer: a :class:`~simcore.growth.ChannelFlow` for the core.

    Names are module paths inside ``variables["params"]`` (``"Conv_0"``, or
    ``"block/Conv_0"`` for nested modules). ``producer`` is the grown ``Conv``
    or ``Dense`` (its bias is found if present); ``norm`` the ``BatchNorm``
    right after it (``scale``/``bias`` in params, ``mean``/``var`` in
    batch_stats); ``depthwise`` the channel-wise convs after it, each a name or
    ``(name, its BatchNorm)``; ``consumers`` the layers reading its channels. A
    consumer ``Dense`` whose fan-in is ``spatial`` times the channel count sits
    after a channels-last flatten (``x.reshape(batch, -1)`` of NHWC): each
    channel owns every ``C``-th row.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from simcore.adapters.jax import linen_flow
    >>> model = nn.Sequential([nn.Dense(3), nn.Dense(2)])
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> flow = linen_flow(variables, "layers_0", consumers=["layers_1"])
    >>> flow.producer, flow.consumers[0].in_axis
    ('params/layers_0/kernel', 0)
    """
    flat = flatten_variables(variables)
    kernel = _module_entry(flat, "params", producer, "kernel", True)
    channels = int(flat[kernel].shape[-1])
    consumer_specs = []
    for module in consumers:
        name = _module_entry(flat, "params", module, "kernel", True)
        weight = flat[name]
        if weight.ndim == 2:  # Dense (in, out)
            rows = int(weight.shape[0])
            if rows % channels:
                raise ValueError(
                    f"consumer {module!r} has fan-in {rows}, not a multiple of the "
                    f"{channels} channels of {producer!r}"
                )
            spatial = rows // channels
            consumer_specs.append(
                growth.Consumer(name, in_axis=0, spatial=spatial, channels_last=spatial > 1)
            )
        else:  # Conv HWIO
            consumer_specs.append(growth.Consumer(name, in_axis=-2))
    depthwise_specs = []
    for item in depthwise:
        module, dw_norm = (item, None) if isinstance(item, str) else item
        depthwise_specs.append(
            growth.Depthwise(
                _module_entry(flat, "params", module, "kernel", True),
                channel_axis=-1,
                bias=_module_entry(flat, "params", module, "bias", False),
                norm=_norm(flat, dw_norm),
            )
        )
    flow = growth.ChannelFlow(
        kernel,
        out_axis=-1,
        consumers=tuple(consumer_specs),
        bias=_module_entry(flat, "params", producer, "bias", False),
        norm=_norm(flat, norm),
        depthwise=tuple(depthwise_specs),
    )
    flow.channels(flat)  # validate every size now, naming the entry that disagrees
    return flow


def _apply(operator, variables, flow, *args, **kwargs):
    grown, channel_map = operator(flatten_variables(variables), flow, *args, **kwargs)
    return unflatten_variables(variables, grown), channel_map


def add_neurons(variables: Any, flow: growth.ChannelFlow, count: int, **kwargs: Any):
    """:func:`simcore.growth.add_neurons` on a linen ``variables`` dict.

    Returns ``(new_variables, channel_map)``; keyword arguments (``rng``,
    ``incoming``, ``outgoing``, ...) go to the core. ``outgoing="zero"`` keeps
    the network function exactly.
    """
    return _apply(growth.add_neurons, variables, flow, count, **kwargs)


def replicate_neurons(variables: Any, flow: growth.ChannelFlow, parents: Any):
    """:func:`simcore.growth.replicate_neurons` (Net2Net) on a linen ``variables`` dict."""
    return _apply(growth.replicate_neurons, variables, flow, parents)


def split_neurons(
    variables: Any, flow: growth.ChannelFlow, parents: Any, directions: Any, *, eps: float = 0.01
):
    """:func:`simcore.growth.split_neurons` on a linen ``variables`` dict.

    ``directions`` has shape ``(len(parents), fan_in)`` or ``(len(parents),
    kh, kw, C_in)`` (the kernel's shape without its last axis), a JAX array or anything
    ``jnp.asarray`` takes (a NumPy array).
    """
    if not isinstance(directions, jax.Array):  # NumPy (or a list): params are jax arrays
        directions = jax.numpy.asarray(directions)
    return _apply(growth.split_neurons, variables, flow, parents, directions, eps=eps)


def grow_optax_state(
    opt_state: Any,
    flow: growth.ChannelFlow,
    channel_map: growth.ChannelMap,
    *,
    params: Any,
    new_params: Any = None,
    mode: str = "carry",
    collection: str = "params",
) -> Any:
    """Grow an optax state to match params grown by ``flow`` and ``channel_map``.

    Every part of ``opt_state`` shaped like ``params`` (the *old* params tree,
    ``variables["params"]``: SGD's momentum ``trace``, Adam's ``mu`` and ``nu``,
    ...) goes through :func:`simcore.growth.map_optimizer_state` (``"carry"``:
    old channels keep their state, copies take their parent's, fresh channels
    zeros; ``"zero"``, formerly ``"reset"``: zeros for the grown entries). Everything else, optax's
    step counts included, passes through unchanged. The Eq. 4 snapshot of
    :func:`add_similarity_gradient` is re-taken from ``new_params`` for the
    grown kernels: after a growth the paper's reference is the grown layer.
    Parts of the state that do not mirror ``params`` (e.g. ``optax.masked``
    states) are not recognised and are left as they are.
    """
    prefix = f"{collection}/" if collection else ""
    new_named = None
    if new_params is not None:
        new_named = {
            prefix + leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(new_params)[0]
        }
    grown, _ = grow_mirrors(opt_state, [(flow, [channel_map])], params=params, prefix=prefix,
                            new_named=new_named, mode=mode)
    return grown
