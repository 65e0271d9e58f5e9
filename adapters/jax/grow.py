"""Grow a Flax linen, Flax nnx or Equinox model with the core's Random, SSD or Firefly grower.

:func:`grow` traces the model on the first batch to find every layer's channel flow
(:mod:`.discovery`), hands a :class:`~.host.JaxGrowthHost` to the core grower and returns a
:class:`JaxGrowth`: the wider model, its variables and its optax state, all new objects (JAX is
functional; nothing given is changed, so a failed growth leaves everything as it was).

After a growth every array that touches a grown layer has a new shape, so a jitted training
step compiled for the old shapes cannot take them: ``jax.jit`` retraces by itself when it is
called with the new shapes (the closure must use the new model: rebuild the step from
``JaxGrowth.model``), and the optimizer state to continue with is ``JaxGrowth.opt_state``
(the same optax transformation keeps working on it)::

    grown = grow(SSDGrower(), model, variables, batches=batches, loss_fn=loss_fn,
                 opt_state=opt_state)
    model, variables, opt_state = grown.model, grown.variables, grown.opt_state
    step = jax.jit(make_step(model, tx))          # a step closing over the new model
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from simcore.growth import ChannelFlow, FireflyGrower, Grower, GrowthError, GrowthReport
from simcore.growth.growers import as_batches

from ._models import model_kind
from ._walk import OUTPUT_REASON
from .discovery import JaxFlow, layer_of
from .host import JaxGrowthHost, Traced, trace_flows

__all__ = ["JaxGrowth", "check_flows", "discover_flows", "grow"]


@dataclass(frozen=True)
class JaxGrowth:
    """What :func:`grow` returns: the wider model, its variables, its optax state, the report.

    ``model``: linen -- the wider Module (from ``rebuild`` or ``clone(widths=...)``); nnx -- a
    new Module (a clone holding the grown state; the one given is unchanged); Equinox -- a new
    Module. ``variables``: linen -- the grown variables dict; nnx -- the new module's
    ``nnx.state`` if a state was given, else None; Equinox -- the grown ``eqx.nn.State`` if
    one was given, else None. ``opt_state``: the grown optax state (None if none was given).
    ``report``: the core's :class:`~simcore.growth.GrowthReport` (widths per layer, keyed
    by module path, before and after); where neither ``layers`` nor ``flows`` was given, its
    ``skipped`` names every dense or conv layer found but not growable, with why, as the
    PyTorch adapter's does (the output layer, a consumer only, is not listed).
    """

    model: Any
    variables: Any
    opt_state: Any
    report: GrowthReport


def _kind(model, variables, apply_fn, rebuild):
    return model_kind(model, variables, apply_fn=apply_fn, rebuild=rebuild)


def discover_flows(model: Any, variables: Any, inputs: Any, *,
                   layers: Sequence[str] | None = None,
                   apply_fn: Callable[..., Any] | None = None) -> list[JaxFlow]:
    """The growable layers of ``model`` traced on ``inputs``, producers in forward order.

    With ``layers`` (module paths, e.g. ``"Conv_0"``) only those, in that order; a layer
    that cannot grow raises :class:`~simcore.growth.GrowthError` with the reason. A residual
    group (producers whose outputs are added) is one flow, named by its first producer and
    picked by any of them.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 4)))
    >>> [(f.name, f.flow.consumers[0].weight) for f in discover_flows(model, variables,
    ...                                                               jnp.zeros((2, 4)))]
    [('layers_0', 'params/layers_2/kernel')]
    """
    return _picked(trace_flows(_kind(model, variables, apply_fn, None), inputs), layers)


def _picked(traced: Traced, layers: Sequence[str] | None) -> list[JaxFlow]:
    """:func:`discover_flows`'s answer from a traced model."""
    flows, blocked = traced.flows, traced.blocked
    if layers is None:
        return flows
    by_name = {layer: f for f in flows for layer in f.layers}  # a group by any producer
    picked: list[JaxFlow] = []
    for name in [layers] if isinstance(layers, str) else layers:
        if name in by_name:
            if all(by_name[name] is not f for f in picked):
                picked.append(by_name[name])
        elif name in blocked:
            raise GrowthError(f"cannot grow {name!r}: {blocked[name]}")
        else:
            raise GrowthError(f"cannot grow {name!r}: the model has no dense or convolution "
                              f"layer of that name (growable: {sorted(by_name)})")
    return picked


def _canonical(flow: ChannelFlow, leaves: Mapping[str, Any]) -> dict[str, tuple]:
    out = {}
    for entry in flow._named():
        name, role, axis, spatial = entry.name, entry.role, entry.axis, entry.spatial
        channels_last = entry.channels_last
        ndim = len(np.shape(leaves[name])) if name in leaves else 1
        out[name] = (role, axis % max(ndim, 1), spatial, channels_last and spatial > 1)
    return out


def check_flows(flows: Sequence[ChannelFlow], traced: Sequence[JaxFlow],
                leaves: Mapping[str, Any], blocked: Mapping[str, str] | None = None
                ) -> list[JaxFlow]:
    """Hand-written ``flows`` checked against the traced ones; returns them as :class:`JaxFlow`.

    Each flow's producer must be a growable traced layer, and its entries (consumers with
    their axes and spatial layout, bias, norm, depthwise) must be the traced ones; otherwise
    the growth would succeed and the next forward would fail (or compute something else), so
    :class:`~simcore.growth.GrowthError` says what differs. ``leaves`` are the model's named
    arrays (to compare negative axes).
    """
    by_producer = {f.flow.producer: f for f in traced}
    checked = []
    for flow in flows:
        if not isinstance(flow, ChannelFlow):
            raise TypeError(f"flows must hold ChannelFlow objects, got {type(flow).__name__}")
        found = by_producer.get(flow.producer)
        if found is None:
            layer = layer_of(flow.producer)
            reason = (blocked or {}).get(layer, "it is not a growable layer of the traced "
                                                "computation")
            raise GrowthError(f"flow of {layer!r}: {reason}")
        want, got = _canonical(found.flow, leaves), _canonical(flow, leaves)
        where = f"flow of {found.name!r}"
        readers = sorted(n for n, e in want.items() if e[0] == "consumer")
        for name, entry in got.items():
            if entry[0] == "consumer" and name not in want:
                raise GrowthError(f"{where}: {name!r} does not read its channels in the traced "
                                  f"computation (its readers are {readers}); the next forward "
                                  "would fail")
        for name in readers:
            if name not in got:
                raise GrowthError(f"{where}: {name!r} reads its channels in the traced "
                                  "computation but is not named as a consumer; the next "
                                  "forward would fail")
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                raise GrowthError(
                    f"{where}: entry {name!r} is {got.get(name)} in the flow but "
                    f"{want.get(name)} in the traced computation ((role, axis, spatial, "
                    "channels_last); None: absent)")
        checked.append(JaxFlow(found.name, flow, found.capture, found.members))
    return checked


def grow(
    grower: Grower,
    model: Any,
    variables: Any = None,
    *,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], Any] | None = None,
    opt_state: Any = None,
    rebuild: Callable[[dict[str, int]], Any] | None = None,
    seed: int | None = None,
    ratio: float = 0.35,
    unit: str = "neurons",
    layers: Sequence[str] | None = None,
    flows: Sequence[ChannelFlow] | None = None,
    caps: Sequence[int | None] | None = None,
    apply_fn: Callable[..., Any] | None = None,
) -> JaxGrowth:
    """Grow ``model`` once with a core ``grower``; returns a :class:`JaxGrowth`.

    ``grower``: :class:`simcore.growth.RandomGrower`, :class:`~simcore.growth.SSDGrower`
    (``mode="exact"`` or ``"fast"``) or :class:`~simcore.growth.FireflyGrower`. ``model``: a
    linen Module with its ``variables`` dict, an nnx Module (``variables`` None, or its
    ``nnx.State`` to use instead of the module's own), or an Equinox Module (``variables``
    None, or its ``eqx.nn.State`` when it has BatchNorm; the module is called per sample under
    ``jax.vmap``, with ``axis_name="batch"`` when there is a state). ``batches``: ``(inputs,
    targets)`` pairs, inputs batched; the first one is also traced to find the flows (Random
    growth needs it for that only). ``loss_fn(outputs, targets)``: a batch-mean loss (not
    needed by Random). ``opt_state``: an optax state whose per-parameter parts mirror the
    params (linen ``variables["params"]``; nnx ``nnx.state(model, nnx.Param)``; Equinox
    ``eqx.filter(model, eqx.is_array)``), grown with them. ``rebuild(widths)`` (linen): the
    wider Module for ``{layer: width}`` (keys: producer module paths); without it a module
    with a ``widths`` field is cloned with the new widths (one per growable layer, forward
    order). ``seed``: None (default) continues the grower's own generator (its ``seed=``; so
    a sequence of growths draws what the PyTorch adapter draws), an int restarts it from
    that seed for this growth; ``ratio``/``unit``/``caps`` as in :meth:`simcore.growth.Grower.grow`;
    ``layers`` restricts growth to those module paths; ``flows`` gives hand-written
    :class:`~simcore.growth.ChannelFlow` objects (e.g. from
    :func:`~simcore.adapters.jax.linen_flow`), checked against the traced ones.
    ``apply_fn`` replaces the default forward in scoring mode: ``apply_fn(module, variables,
    inputs)`` for linen, ``apply_fn(module, inputs)`` for nnx, ``apply_fn(module, state,
    inputs)`` for Equinox (default: ``module.apply(variables, x, train=False)`` -- the
    inference keywords the module's ``__call__`` takes -- , ``module.eval()`` then
    ``module(x)``, and ``jax.vmap`` of ``eqx.nn.inference_mode(module)``).
    """
    if not isinstance(grower, Grower):
        raise TypeError("grower must be a simcore.growth grower (RandomGrower, SSDGrower, "
                        f"FireflyGrower), got {type(grower).__name__}")
    if layers is not None and flows is not None:
        raise ValueError("give layers= or flows=, not both (flows already name the layers)")
    batches = as_batches(batches, True)
    if seed is not None:
        grower.rng = np.random.default_rng(seed)
    kind = _kind(model, variables, apply_fn, rebuild)
    traced = trace_flows(kind, batches[0][0])
    blocked = traced.blocked
    skipped: dict[str, str] = {}
    if flows is not None:
        found = check_flows(list(flows), traced.flows, kind.leaves, blocked)
    elif layers is not None:
        found = _picked(traced, layers)
    else:
        found = traced.flows
        skipped = {name: why for name, why in blocked.items() if why != OUTPUT_REASON}
    if not found:
        reasons = "; ".join(f"{k}: {v}" for k, v in blocked.items())
        raise GrowthError(f"{type(model).__name__} has no growable layer ({reasons})")
    host = JaxGrowthHost(kind, found, batches[0][0], opt_state,
                         host_arrays=not isinstance(grower, FireflyGrower))
    report = grower.grow(host, batches, loss_fn, ratio=ratio, unit=unit, caps=caps)
    report = replace(report, skipped=skipped,
                     skipped_widths={name: traced.blocked_widths[name] for name in skipped})
    assert host.result is not None
    new_model, new_variables, new_opt_state = host.result
    return JaxGrowth(new_model, new_variables, new_opt_state, report)
