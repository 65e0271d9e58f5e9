"""Grow an optax state with its parameters: every part that mirrors the params tree.

An optax state is a tree of states, one per transformation of the chain; the parts that hold
one array per parameter (SGD's ``trace``, Adam's ``mu``/``nu``, ...) have the structure and the
shapes of the params tree given to ``init``. Those parts are grown with
:func:`simcore.growth.map_optimizer_state` (``"carry"``: old channels keep their state, copies
their parent's, fresh channels zeros); step counts and every other part pass through. The
Eq. 4 snapshot of :func:`~simcore.adapters.jax.add_similarity_gradient` is re-taken from the
grown kernels (after a growth the paper's reference is the grown layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from simcore import growth

from ._optax import SimilarityGradientState
from ._trees import leaf_name

__all__ = ["grow_mirrors"]


def _is_mirror(node: Any, treedef: Any, shapes: list[tuple[int, ...]]) -> bool:
    if jax.tree_util.tree_structure(node) != treedef:
        return False
    leaves = jax.tree_util.tree_leaves(node)
    return all(getattr(x, "shape", None) == s for x, s in zip(leaves, shapes, strict=True))


def grow_mirrors(
    opt_state: Any,
    growths: Sequence[tuple[growth.ChannelFlow, Sequence[growth.ChannelMap]]],
    *,
    params: Any,
    prefix: str,
    new_named: Mapping[str, Any] | None,
    mode: str = "carry",
    new_treedef: Any = None,
) -> tuple[Any, int]:
    """``(grown opt_state, number of mirrors found)``.

    ``params`` is the old params tree the state mirrors, ``prefix`` what its leaf names need
    to match the flows' names (``"params/"`` for a linen variables dict); ``growths`` the
    flows with their channel maps, applied in order; ``new_named`` the grown leaves by flow
    name (for the Eq. 4 snapshot).
    """
    treedef = jax.tree_util.tree_structure(params)
    shapes = [tuple(x.shape) for x in jax.tree_util.tree_leaves(params)]
    grown_names = {name for flow, _ in growths for name in flow.names()}
    found = 0

    def grow_mirror(node: Any) -> Any:
        flat, node_def = jax.tree_util.tree_flatten_with_path(node)
        # On the host: one eager JAX operation per entry would compile one XLA program each.
        state = {prefix + leaf_name(p): {"slot": np.asarray(x)} for p, x in flat}
        for flow, maps in growths:
            for cmap in maps:
                state = growth.map_optimizer_state(state, flow, cmap, mode=mode)
        leaves = []
        for p, x in flat:
            value = state[prefix + leaf_name(p)]["slot"]
            leaves.append(x if value.shape == x.shape and value is not None and
                          (prefix + leaf_name(p)) not in grown_names else
                          jax.device_put(np.asarray(value, dtype=x.dtype)))
        return jax.tree_util.tree_unflatten(node_def if new_treedef is None else new_treedef,
                                            leaves)

    def walk(node: Any) -> Any:
        nonlocal found
        if isinstance(node, SimilarityGradientState):
            refs = dict(node.refs)
            for name in refs:
                if prefix + name in grown_names:
                    if new_named is None:
                        raise ValueError("opt_state holds an Eq. 4 snapshot of a grown kernel: "
                                         "pass new_params to re-take it")
                    refs[name] = new_named[prefix + name]
            return node._replace(refs=refs)
        if _is_mirror(node, treedef, shapes):
            found += 1
            return grow_mirror(node)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(walk(child) for child in node))
        if isinstance(node, (tuple, list)):
            return type(node)(walk(child) for child in node)
        if isinstance(node, Mapping):
            # the concrete mappings of optimizer states (dict, FrozenDict) take a dict
            return type(node)({key: walk(child) for key, child in node.items()})  # type: ignore[call-arg]
        return node

    return walk(opt_state), found


def grow_opt_state(opt_state: Any, growths, kind: Any, new_leaves: Mapping[str, Any],
                   new_model: Any) -> Any:
    """``opt_state`` grown for a model of ``kind`` (:mod:`._models`); the first params tree
    the state mirrors wins."""
    for params, prefix, new_treedef in kind.optimizer_trees(new_model):
        grown, found = grow_mirrors(opt_state, growths, params=params, prefix=prefix,
                                    new_named=new_leaves, new_treedef=new_treedef)
        if found:
            return grown
    return grown
