"""The three model kinds growth takes -- Flax linen, Flax nnx, Equinox -- behind one interface.

Each kind flattens its model's arrays into named leaves (:func:`._trees.named_leaves` names,
stable across growth), runs the model in scoring mode on a ``{name: array}`` mapping (BatchNorm
on its running statistics, dropout off), and builds the wider model for grown leaves:

* linen: ``rebuild(widths)`` or ``model.clone(widths=...)``; variables keep their structure;
* nnx: a clone of the module (``nnx.merge`` of its split) with the grown values and its
  ``in_features``/``out_features``/``feature_group_count``/``num_features`` updated; the
  module given to growth is not changed;
* Equinox: the module rebuilt with the grown arrays and its ``in_channels``/``out_channels``/
  ``groups``/``in_features``/``out_features``/``input_size`` fields updated, and its
  ``eqx.nn.State`` (BatchNorm statistics) grown; called per sample under ``jax.vmap``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from simcore.growth import GrowthError

from ._trees import leaf_name, named_leaves

__all__ = ["ModelKind", "model_kind"]

#: Keyword arguments that put a linen ``__call__`` into inference mode, where it takes them.
_EVAL_KEYWORDS = {"train": False, "training": False, "is_training": False,
                  "deterministic": True, "use_running_average": True}

ApplyFn = Callable[..., Any]


def _eval_kwargs(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in _EVAL_KEYWORDS.items() if k in parameters}


class ModelKind:
    """One model of one kind: its named leaves, its scoring-mode forward, its wider copies."""

    framework = "base"

    def __init__(self, model: Any, variables: Any, apply_fn: ApplyFn | None):
        self.model, self.variables, self.apply_fn = model, variables, apply_fn
        self.leaves: dict[str, Any] = {}
        self.definition: Any = model

    def apply(self, definition: Any, flat: Mapping[str, Any], inputs: Any) -> Any:
        """Outputs of ``definition`` (a model of this kind) with the arrays of ``flat``."""
        raise NotImplementedError

    def widen(self, flat: Mapping[str, Any], widths: Mapping[str, int]) -> Any:
        """A definition of the model for the grown ``flat`` (checked against its shapes)."""
        raise NotImplementedError

    def parameter_count(self, flat: Mapping[str, Any]) -> int:
        raise NotImplementedError

    def result(self, definition: Any, flat: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(model, variables)`` for the user, from a definition and its arrays."""
        raise NotImplementedError

    def optimizer_trees(self, new_model: Any = None) -> list[tuple[Any, str, Any]]:
        """``[(params tree, name prefix, grown tree's structure or None)]`` an optax state
        may mirror (the structure is needed where it holds more than the arrays' shapes)."""
        raise NotImplementedError

    def check_shapes(self, definition: Any, flat: Mapping[str, Any], inputs: Any) -> None:
        try:
            jax.eval_shape(lambda f, x: self.apply(definition, f, x), dict(flat), inputs)
        except GrowthError:
            raise
        except Exception as error:  # noqa: BLE001 - Flax/Equinox raise many types
            raise GrowthError(
                f"the wider {self.framework} model does not accept the grown variables "
                f"({type(error).__name__}: {str(error)[:300]})"
            ) from error


class LinenKind(ModelKind):
    framework = "linen"

    def __init__(self, model, variables, apply_fn, rebuild):
        super().__init__(model, variables, apply_fn)
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise TypeError("a linen model needs its variables: a dict with a 'params' collection")
        self.rebuild = rebuild
        self.definition = model
        self.leaves = named_leaves(variables)
        self.treedef = jax.tree_util.tree_structure(variables)

    def tree(self, flat: Mapping[str, Any]) -> Any:
        paths = jax.tree_util.tree_flatten_with_path(self.variables)[0]
        return jax.tree_util.tree_unflatten(self.treedef, [flat[leaf_name(p)] for p, _ in paths])

    def apply(self, definition, flat, inputs):
        variables = self.tree(flat)
        if self.apply_fn is not None:
            return self.apply_fn(definition, variables, inputs)
        return definition.apply(variables, inputs, **_eval_kwargs(definition.__call__))

    def widen(self, flat, widths):
        if self.rebuild is not None:
            return self.rebuild(dict(widths))
        fields = {f.name for f in dataclasses.fields(self.model)}
        current = getattr(self.model, "widths", None)
        if "widths" not in fields or not isinstance(current, Sequence):
            raise GrowthError(
                f"cannot build the wider {type(self.model).__name__}: pass rebuild=(widths -> "
                "Module), or give the module a field `widths` (one entry per growable layer, "
                "in forward order)"
            )
        if len(current) != len(widths):
            raise GrowthError(
                f"{type(self.model).__name__}.widths has {len(current)} entries but the model "
                f"has {len(widths)} growable layers ({list(widths)}); pass rebuild="
            )
        new = tuple(widths.values())
        return self.model.clone(widths=new if isinstance(current, tuple) else list(new))

    def parameter_count(self, flat):
        return sum(int(a.size) for name, a in flat.items() if name.startswith("params/"))

    def result(self, definition, flat):
        return definition, self.tree(flat)

    def optimizer_trees(self, new_model=None):
        return [(self.variables["params"], "params/", None)]


class NnxKind(ModelKind):
    framework = "nnx"

    def __init__(self, model, variables, apply_fn):
        super().__init__(model, variables, apply_fn)
        from flax import nnx

        self.graphdef, self.state = nnx.split(model)
        if variables is not None:
            self.state = variables
        self.definition = self.graphdef
        self.leaves = named_leaves(self.state)
        self.treedef = jax.tree_util.tree_structure(self.state)

    def state_of(self, flat):
        paths = jax.tree_util.tree_flatten_with_path(self.state)[0]
        return jax.tree_util.tree_unflatten(self.treedef, [flat[leaf_name(p)] for p, _ in paths])

    def apply(self, definition, flat, inputs):
        from flax import nnx

        module = nnx.merge(definition, self.state_of(flat))
        if self.apply_fn is not None:
            return self.apply_fn(module, inputs)
        module.eval()
        return module(inputs)

    def widen(self, flat, widths):
        from flax import nnx

        module = nnx.merge(self.graphdef, self.state_of(flat))
        for _, node in nnx.iter_graph(module):
            if isinstance(node, nnx.Conv):
                kernel = node.kernel[...]
                groups = int(node.feature_group_count)
                if groups > 1 and groups == int(node.in_features):  # depthwise: groups follow
                    node.feature_group_count = int(kernel.shape[-1])
                    groups = node.feature_group_count
                node.in_features = int(kernel.shape[-2]) * groups
                node.out_features = int(kernel.shape[-1])
            elif isinstance(node, nnx.Linear):
                node.in_features, node.out_features = (int(s) for s in node.kernel[...].shape)
            elif isinstance(node, nnx.BatchNorm):
                node.num_features = int(node.mean[...].shape[-1])
        return nnx.split(module)[0]

    def parameter_count(self, flat):
        from flax import nnx

        names = named_leaves(nnx.state(self.model, nnx.Param))
        return sum(int(flat[n].size) for n in names)

    def result(self, definition, flat):
        from flax import nnx

        module = nnx.merge(definition, self.state_of(flat))
        return module, (None if self.variables is None else nnx.state(module))

    def optimizer_trees(self, new_model=None):
        from flax import nnx

        return [(nnx.state(self.model, nnx.Param), "", None)]


def _rebuild_module(module: Any, **fields: Any) -> Any:
    new = copy.copy(module)
    for key, value in fields.items():
        object.__setattr__(new, key, value)
    return new


class EquinoxKind(ModelKind):
    framework = "equinox"

    def __init__(self, model, variables, apply_fn):
        super().__init__(model, variables, apply_fn)
        import equinox as eqx

        if variables is not None and not isinstance(variables, eqx.nn.State):
            raise TypeError("an Equinox model takes variables=None or its eqx.nn.State "
                            f"(BatchNorm statistics), got {type(variables).__name__}")
        self.params, self.static = eqx.partition(model, eqx.is_array)
        self.param_def = jax.tree_util.tree_structure(self.params)
        # (structure of the arrays, the rest): field values such as out_channels are part of
        # both, so a wider module has its own pair.
        self.definition = (self.param_def, self.static)
        self.param_names = list(named_leaves(self.params))
        self.leaves = named_leaves(self.params)
        self.state_names: list[str] = []
        if variables is not None:
            self.state_def = jax.tree_util.tree_structure(variables)
            known = self._state_names(model, variables)
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
                name = known.get(id(leaf), "state/" + leaf_name(path))
                self.state_names.append(name)
                self.leaves[name] = leaf

    @staticmethod
    def _state_names(model: Any, state: Any) -> dict[int, str]:
        import equinox as eqx

        names = {}

        def is_norm(x):
            return isinstance(x, eqx.nn.BatchNorm)

        for path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_norm)[0]:
            if not is_norm(node):
                continue
            for attribute, labels in (("ema_state_index", ("running_mean", "running_var")),
                                      ("batch_state_index", ("hidden_mean", "hidden_var"))):
                index = getattr(node, attribute, None)
                if index is None:
                    continue
                for value, label in zip(state.get(index), labels, strict=True):
                    names[id(value)] = f"{leaf_name(path)}/{label}"
        return names

    def split(self, flat, param_def=None):
        param_def = self.param_def if param_def is None else param_def
        params = jax.tree_util.tree_unflatten(param_def, [flat[n] for n in self.param_names])
        state = None
        if self.variables is not None:
            state = jax.tree_util.tree_unflatten(self.state_def,
                                                 [flat[n] for n in self.state_names])
        return params, state

    def apply(self, definition, flat, inputs):
        import equinox as eqx

        params, state = self.split(flat, definition[0])
        module = eqx.nn.inference_mode(eqx.combine(params, definition[1]))
        if self.apply_fn is not None:
            return self.apply_fn(module, state, inputs)
        if state is None:
            return jax.vmap(module)(inputs)
        forward = jax.vmap(module, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        return forward(inputs, state)[0]

    def widen(self, flat, widths):
        import equinox as eqx

        params, _ = self.split(flat)
        module = eqx.combine(params, self.static)

        def fix(node):
            if isinstance(node, eqx.nn.Conv):
                out, per_group = int(node.weight.shape[0]), int(node.weight.shape[1])
                groups = int(node.groups)
                if groups > 1 and groups == int(node.in_channels):
                    groups = out
                return _rebuild_module(node, in_channels=per_group * groups, out_channels=out,
                                       groups=groups)
            if isinstance(node, eqx.nn.Linear):
                out, fan_in = (int(s) for s in node.weight.shape)
                return _rebuild_module(
                    node, in_features="scalar" if node.in_features == "scalar" else fan_in,
                    out_features="scalar" if node.out_features == "scalar" else out)
            if isinstance(node, eqx.nn.BatchNorm):
                size = node.weight.shape[0] if node.weight is not None else node.input_size
                return _rebuild_module(node, input_size=int(size))
            return node

        def is_layer(x):
            return isinstance(x, (eqx.nn.Conv, eqx.nn.Linear, eqx.nn.BatchNorm))

        module = jax.tree_util.tree_map(fix, module, is_leaf=is_layer)
        params, static = eqx.partition(module, eqx.is_array)
        return jax.tree_util.tree_structure(params), static

    def parameter_count(self, flat):
        import equinox as eqx

        return sum(int(flat[n].size) for n, leaf in zip(self.param_names,
                                                         jax.tree_util.tree_leaves(self.params),
                                                         strict=True)
                   if eqx.is_inexact_array(leaf))

    def result(self, definition, flat):
        import equinox as eqx

        params, state = self.split(flat, definition[0])
        return eqx.combine(params, definition[1]), state

    def optimizer_trees(self, new_model=None):
        import equinox as eqx

        out = []
        for keep in (eqx.is_array, eqx.is_inexact_array):
            new = None if new_model is None else jax.tree_util.tree_structure(
                eqx.filter(new_model, keep))  # the field values (out_channels) are structure
            out.append((eqx.filter(self.model, keep), "", new))
        return out


def model_kind(model: Any, variables: Any, *, apply_fn: ApplyFn | None = None,
               rebuild: Callable[[dict[str, int]], Any] | None = None) -> ModelKind:
    """The :class:`ModelKind` of ``model``: a linen, nnx or Equinox module."""
    try:
        import flax.linen as linen

        if isinstance(model, linen.Module):
            return LinenKind(model, variables, apply_fn, rebuild)
    except ImportError:
        pass
    try:
        from flax import nnx

        if isinstance(model, nnx.Module):
            return NnxKind(model, variables, apply_fn)
    except ImportError:
        pass
    try:
        import equinox as eqx

        if isinstance(model, eqx.Module):
            return EquinoxKind(model, variables, apply_fn)
    except ImportError:
        pass
    raise TypeError(
        f"model must be a Flax linen Module, a Flax nnx Module or an Equinox Module, got "
        f"{type(model).__name__}"
    )
