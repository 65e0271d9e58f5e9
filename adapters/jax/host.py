"""The JAX side of the core growers: a linen, nnx or Equinox model as a :class:`GrowthHost`.

:class:`JaxGrowthHost` holds one model (:mod:`._models`), its flows (found by tracing,
:mod:`.discovery`) and its optax state for one growth. It reads the state as named leaves,
captures SSD's statistics in one jitted batched pass per batch (:mod:`.capture`), runs a wider
copy for Firefly, takes gradients with ``jax.value_and_grad`` and, on :meth:`apply`, builds the
grown model, variables and optimizer state as new objects (:attr:`result`): nothing the user
holds is changed, so a failed growth leaves everything as it was.

Replicas: in one process JAX arrays are global (a batch sharded over a mesh is one array), so
the statistics are already over every device and :meth:`mean_over_replicas` is the identity.
With several processes (``jax.distributed``) scores and statistics are averaged with
``multihost_utils.process_allgather`` and the seed is process 0's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from simcore.growth import ChannelMap, GrowableLayer, GrowthError, SplittingStatistics
from simcore.growth.flow import ChannelFlow

from ._models import ModelKind
from ._optstate import grow_opt_state
from ._program import trace_program
from .capture import batch_statistics, to_statistics
from .discovery import JaxFlow, analyse

__all__ = ["JaxGrowthHost", "trace_flows"]

_VECTOR_ROLES = ("bias", "scale", "shift", "mean", "var")


class Traced(NamedTuple):
    """``kind``'s model traced on one batch: its flows, the layers it cannot grow (why, and
    their widths), and the traced program with its output tree."""

    flows: list[JaxFlow]
    blocked: dict[str, str]
    blocked_widths: dict[str, int]
    program: Any
    out_tree: Any


def trace_flows(kind: ModelKind, inputs: Any) -> Traced:
    """:class:`Traced` of ``kind``'s model traced on ``inputs``."""
    names = list(kind.leaves)
    definition = kind.definition

    def forward(leaves: list[Any], x: Any) -> Any:
        return kind.apply(definition, dict(zip(names, leaves, strict=True)), x)

    try:
        program, out_tree = trace_program(forward, list(kind.leaves.values()), inputs)
    except GrowthError:
        raise
    except Exception as error:  # noqa: BLE001 - the model's own errors, any type
        raise GrowthError(f"tracing the {kind.framework} model on the batch failed "
                          f"({type(error).__name__}: {str(error)[:300]})") from error
    flows, blocked, widths = analyse(program, names,
                                     [tuple(np.shape(a)) for a in kind.leaves.values()])
    return Traced(flows, blocked, widths, program, out_tree)


def _vector_views(flows: Sequence[ChannelFlow], leaves: Mapping[str, Any]) -> dict[str, tuple]:
    """Per-channel entries stored with size-1 axes (Equinox's ``(C, 1, 1)`` conv bias)."""
    views = {}
    for flow in flows:
        for entry in flow._named():
            name, role = entry.name, entry.role
            shape = tuple(np.shape(leaves[name]))
            if role in _VECTOR_ROLES and len(shape) != 1:
                views[name] = shape
    return views


class JaxGrowthHost:
    """One JAX model growing along ``flows``; the grown objects land in :attr:`result`."""

    def __init__(self, kind: ModelKind, flows: Sequence[JaxFlow], example_inputs: Any,
                 opt_state: Any = None, *, host_arrays: bool = False):
        self.kind, self.flows = kind, list(flows)
        # Host (NumPy) arrays for growers that never differentiate through the state (Random,
        # SSD): the widening runs without compiling one XLA program per eager operation.
        self.host_arrays = host_arrays
        self.example_inputs = example_inputs
        self.opt_state = opt_state
        self.views = _vector_views([f.flow for f in self.flows], kind.leaves)
        self.state = {name: self._to_view(name, a) for name, a in kind.leaves.items()}
        self.result: tuple[Any, Any, Any] | None = None
        self._stat_fns: dict[Any, Any] = {}

    # -- views ------------------------------------------------------------------------------
    def _to_view(self, name: str, array: Any) -> Any:
        return jnp.reshape(array, (-1,)) if name in self.views else array

    def _from_view(self, name: str, array: Any) -> Any:
        if name not in self.views:
            return array
        shape = list(self.views[name])
        axis = next((i for i, s in enumerate(shape) if s != 1), 0)
        shape[axis] = int(array.shape[0])
        return jnp.reshape(array, shape)

    def _leaves(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self._from_view(name, state[name]) for name in self.kind.leaves}

    # -- GrowthHost -------------------------------------------------------------------------
    def layers(self) -> list[GrowableLayer]:
        return [GrowableLayer(f.name, f.flow) for f in self.flows]

    def read_state(self) -> dict[str, Any]:
        if self.host_arrays:
            return {name: np.asarray(a) for name, a in self.state.items()}
        return dict(self.state)

    def parameter_count(self) -> int:
        return self.kind.parameter_count(self._leaves(self.state))

    def splitting_statistics(self, batches, loss_fn) -> list[SplittingStatistics]:
        # every producer's statistics, by its module path; a residual group's members are
        # then handed to the core as the group's ``members``
        names = [layer for f in self.flows for layer in f.layers]
        per_batch = []
        leaves = list(self.kind.leaves.values())
        for inputs, targets in batches:
            key = jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), str(jnp.result_type(a))),
                                         inputs)
            key = str(key)
            if key not in self._stat_fns:
                traced = trace_flows(self.kind, inputs)
                blocked, program, out_tree = traced.blocked, traced.program, traced.out_tree
                by_name = {layer: capture for f in traced.flows
                           for layer, capture in zip(f.layers, (f.capture, *f.members),
                                                     strict=True)}
                missing = [n for n in names if n not in by_name]
                if missing:
                    reason = blocked.get(missing[0], "it is not found on this batch")
                    raise GrowthError(f"SSD cannot score {missing[0]!r}: {reason}")
                run = batch_statistics(program, out_tree, {n: by_name[n] for n in names},
                                       loss_fn)
                activations: dict[str, str] = {}
                for n in names:
                    activation = by_name[n].activation
                    assert activation is not None  # batch_statistics refuses a capture without
                    activations[n] = activation
                self._stat_fns[key] = (jax.jit(run), activations)
            run, activations = self._stat_fns[key]
            args = jax.tree_util.tree_leaves((leaves, inputs))
            found = run(args, targets)
            if self.host_arrays:
                found = jax.tree_util.tree_map(np.asarray, found)
            per_batch.append(found)
        by_layer = dict(zip(names, to_statistics(per_batch, names, activations), strict=True))
        return [replace(by_layer[f.name], members=tuple(by_layer[m] for m in f.layers[1:]))
                for f in self.flows]

    def forward_with(self, widened_state: Mapping[str, Any],
                     channel_maps: Sequence[Any]) -> Callable[[Mapping[str, Any], Any], Any]:
        definition = self._widened_definition(widened_state)

        def forward(state: Mapping[str, Any], inputs: Any) -> Any:
            return self.kind.apply(definition, self._leaves(state), inputs)

        return forward

    def _widths(self, state: Mapping[str, Any]) -> dict[str, int]:
        return {f.name: f.flow.channels(state) for f in self.flows}

    def _widened_definition(self, state: Mapping[str, Any]) -> Any:
        leaves = self._leaves(state)
        try:
            definition = self.kind.widen(leaves, self._widths(state))
        except GrowthError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's rebuild, any type
            raise GrowthError(f"building the wider model failed ({type(error).__name__}: "
                              f"{error})") from error
        self.kind.check_shapes(definition, leaves, self.example_inputs)
        return definition

    def value_and_grad(self, fn, variables):
        # One XLA program per call (fn closes over its batch) instead of one per eager operation.
        value, grads = jax.jit(jax.value_and_grad(lambda vs: fn(list(vs))))(list(variables))
        return value, list(grads)

    def mean_over_replicas(self, x: Any) -> Any:
        if jax.process_count() == 1:
            return x
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(x)
        mean = gathered.mean(axis=0)
        return np.asarray(mean) if isinstance(x, np.ndarray) else mean

    def shared_seed(self, seed: int) -> int:
        if jax.process_count() == 1:
            return int(seed)
        from jax.experimental import multihost_utils

        return int(multihost_utils.broadcast_one_to_all(np.asarray(seed, dtype=np.int64)))

    def apply(self, new_state: Mapping[str, Any],
              channel_maps: Sequence[ChannelMap | Sequence[ChannelMap] | None]) -> None:
        state = dict(self.state)
        # device_put, not jnp.asarray: an eager asarray of a host array compiles one XLA
        # program per new shape (about 20 per growth of VGG16)
        state.update({name: jax.device_put(a) for name, a in new_state.items()})
        definition = self._widened_definition(state)
        leaves = self._leaves(state)
        model, variables = self.kind.result(definition, leaves)
        growths = []
        for flow, cmap in zip(self.flows, channel_maps, strict=True):
            if cmap is None:
                continue
            maps = [cmap] if isinstance(cmap, ChannelMap) else list(cmap)
            growths.append((flow.flow, maps))
        opt_state = self.opt_state
        if opt_state is not None:
            opt_state = grow_opt_state(opt_state, growths, self.kind, leaves, model)
        self.result = (model, variables, opt_state)
        self.state = state
