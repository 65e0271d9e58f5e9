"""A model's computation as one flat list of primitive steps, read from ``jax.make_jaxpr``.

Flow discovery (:mod:`.discovery`) reads what happens to a layer's channels; SSD's statistics
(:mod:`.capture`) re-run the same steps while recording a few intermediate values and adding a
zero perturbation at the activations (so ``jax.value_and_grad`` gives ``dL/dh`` for the whole
batch at once). Nested calls (``jit``, ``closed_call``, ``remat``, ``custom_jvp_call``,
``custom_vjp_call``) are inlined, so that a model's layers are found wherever its author
jitted a helper; a call that *is* an activation (``jax.nn.relu``, ``jax.nn.silu``, ...) stays one
step, named, so that discovery knows the activation and evaluation keeps its custom derivative.
Control flow (``scan``, ``while``, ``cond``) stays one opaque step: discovery refuses channels
that enter it. Inlined ``custom_vjp`` functions are differentiated through their forward
implementation when SSD takes ``dL/dh``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.extend.core as jex_core
import numpy as np

__all__ = ["ACTIVATIONS", "Lit", "Program", "Step", "trace_program"]

#: Activation functions recognised as one step, by the name of their ``jit``/``custom_jvp``
#: call, mapped to the name :mod:`simcore.growth.activations` knows (None: no second
#: derivative is registered; SSD refuses those, the other methods do not care).
ACTIVATIONS: dict[str, str | None] = {
    "relu": "relu", "silu": "swish", "swish": "swish", "softplus": "softplus",
    "sigmoid": "sigmoid", "tanh": "tanh", "relu6": None, "leaky_relu": None, "elu": None,
    "celu": None, "selu": None, "gelu": None, "hard_tanh": None, "hard_swish": None,
    "hard_silu": None, "hard_sigmoid": None, "mish": None, "log_sigmoid": None,
    "sparse_plus": None, "squareplus": None,
}
#: Primitives that are activations by themselves.
PRIMITIVE_ACTIVATIONS = {"tanh": "tanh", "logistic": "sigmoid"}
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
          "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin")


@dataclass(frozen=True)
class Lit:
    """A literal operand (a Python or NumPy scalar inlined into the jaxpr)."""

    value: Any


@dataclass
class Step:
    """One primitive (or one opaque call) of the flat program.

    ``ins`` are variable ids or :class:`Lit`; ``outs`` variable ids; ``unit`` the activation's
    name when the step is an activation call kept whole (or an activation primitive).
    """

    eqn: Any
    ins: tuple[Any, ...]
    outs: tuple[int, ...]
    unit: str | None = None

    @property
    def name(self) -> str:
        return str(self.eqn.primitive.name)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.eqn.params)


@dataclass
class Program:
    """The flat program: ``inputs`` ids of the flattened arguments, ``consts`` known values."""

    inputs: list[int]
    outputs: list[Any]
    steps: list[Step]
    shapes: dict[int, tuple[int, ...]]
    consts: dict[int, Any] = field(default_factory=dict)
    dtypes: dict[int, Any] = field(default_factory=dict)

    def shape(self, ref: Any) -> tuple[int, ...]:
        if isinstance(ref, Lit):
            return tuple(np.shape(ref.value))
        return self.shapes[ref]

    def run(self, args: Sequence[Any], *, after: Callable[[int, list[Any]], list[Any]] | None
            = None, keep: set[int] = frozenset()) -> tuple[list[Any], dict[int, Any]]:  # type: ignore[assignment]
        """Evaluate on ``args`` (the flattened arguments); returns (outputs, kept values).

        ``after(step index, outputs)`` may replace a step's outputs (a perturbation);
        ``keep`` names variable ids whose values are returned.
        """
        env: dict[int, Any] = dict(self.consts)
        env.update(zip(self.inputs, args, strict=True))

        def read(ref: Any) -> Any:
            return ref.value if isinstance(ref, Lit) else env[ref]

        for index, step in enumerate(self.steps):
            values = [read(r) for r in step.ins]
            params = step.eqn.primitive.get_bind_params(step.eqn.params)
            if isinstance(params, tuple):  # JAX before 0.7: (subfuns, params)
                subfuns, params = params
                values = [*subfuns, *values]
            with step.eqn.ctx.manager:
                out = step.eqn.primitive.bind(*values, **params)
            outs = list(out) if step.eqn.primitive.multiple_results else [out]
            if after is not None:
                outs = after(index, outs)
            env.update(zip(step.outs, outs, strict=True))
        return [read(r) for r in self.outputs], {k: env[k] for k in keep}


def _name_of_call(eqn: Any) -> str | None:
    name = eqn.params.get("name")
    if name is None and eqn.primitive.name == "custom_jvp_call":
        inner = _inner(eqn)
        if inner is not None and len(inner[0].eqns) == 1:
            name = inner[0].eqns[0].params.get("name")
    return None if name is None else str(name)


def _inner(eqn: Any) -> tuple[Any, list[Any]] | None:
    """``(jaxpr, consts)`` of a call's body, or None."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        body = eqn.params.get(key)
        if body is None:
            continue
        if hasattr(body, "jaxpr") and hasattr(body, "consts"):  # ClosedJaxpr
            return body.jaxpr, list(body.consts)
        if hasattr(body, "eqns"):
            return body, []
    return None


class _Builder:
    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.dtypes: dict[int, Any] = {}
        self.consts: dict[int, Any] = {}
        self.count = 0

    def new(self, var: Any) -> int:
        self.count += 1
        self.shapes[self.count] = tuple(int(s) for s in getattr(var.aval, "shape", ()))
        self.dtypes[self.count] = getattr(var.aval, "dtype", None)
        return self.count

    def inline(self, jaxpr: Any, consts: Sequence[Any], refs: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}
        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = self.new(var)
            self.consts[env[var]] = value
        for var, ref in zip(jaxpr.invars, refs, strict=True):
            env[var] = ref

        def read(atom: Any) -> Any:
            if isinstance(atom, jex_core.Literal):
                return Lit(atom.val)
            return env[atom]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            prim = eqn.primitive.name
            unit = None
            if prim in _CALLS:
                name = _name_of_call(eqn)
                if name in ACTIVATIONS:
                    unit = name
                else:
                    body = _inner(eqn)
                    if body is not None and len(body[0].invars) == len(ins):
                        outs = self.inline(body[0], body[1], ins)
                        for var, ref in zip(eqn.outvars, outs, strict=True):
                            env[var] = ref
                        continue
            elif prim in PRIMITIVE_ACTIVATIONS:
                unit = prim
            outs_ids = tuple(self.new(v) for v in eqn.outvars)
            for var, ref in zip(eqn.outvars, outs_ids, strict=True):
                env[var] = ref
            self.steps.append(Step(eqn, tuple(ins), outs_ids, unit))
        return [read(a) for a in jaxpr.outvars]


def trace_program(fn: Callable[..., Any], *args: Any) -> tuple[Program, Any]:
    """The flat :class:`Program` of ``fn(*args)`` and the output tree's structure."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    builder = _Builder()
    inputs = [builder.new(v) for v in closed.jaxpr.invars]
    outputs = builder.inline(closed.jaxpr, list(closed.consts), inputs)
    program = Program(inputs, outputs, builder.steps, builder.shapes, builder.consts,
                      builder.dtypes)
    return program, jax.tree_util.tree_structure(out_shape)
