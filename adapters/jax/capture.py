"""SSD's statistics of a JAX model: one jitted, batched pass per batch, no loop over samples.

The traced program (:mod:`._program`) is run with a zero perturbation ``delta`` added to every
scored layer's activation output ``h``; ``jax.value_and_grad`` with respect to the ``delta``\\ s
gives ``dL/dh`` of the batch-mean loss for the whole batch. The same run keeps the producer's
input, unfolded into the rows its kernel multiplies by a convolution with an identity kernel
(same strides, padding and dilation, so the rows are ordered like
:func:`simcore.growth.channel_rows.channel_rows` of the kernel), the pre-activation ``z`` and the
per-channel factors between the producer and the activation (BatchNorm's
``scale / sqrt(var + eps)``, read from the computation itself).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simcore.growth import GrowthError, SplittingStatistics
from simcore.growth.growers import check_loss

from ._program import Lit, Program
from .discovery import FlowCapture

__all__ = ["batch_statistics"]


def _rows(x: jax.Array, axis: int) -> jax.Array:
    """``(M, k)``: ``axis`` last, everything else flattened in order."""
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(-1, x.shape[-1])


def _patches(program: Program, cap: FlowCapture, x: jax.Array, name: str) -> jax.Array:
    step = program.steps[cap.step]
    params = step.params
    if cap.kind == "dense":
        (lc, rc), _ = params["dimension_numbers"]
        position = list(step.ins).index(cap.data)
        return _rows(x, (lc, rc)[position][0])
    kernel_shape = program.shape(step.ins[1])
    axes = cap.kernel_axes
    if sorted(axes) != list(range(len(kernel_shape))) or int(params["feature_group_count"]) != 1:
        raise GrowthError(f"SSD cannot unfold the input of {name!r}: its kernel is used "
                          "through a view or groups")
    leaf_shape = [0] * len(axes)
    for var_axis, leaf_axis in enumerate(axes):
        leaf_shape[leaf_axis] = kernel_shape[var_axis]
    others = [s for a, s in enumerate(leaf_shape) if a != cap.out_axis]
    d = math.prod(others)
    identity = jnp.eye(d, dtype=x.dtype).reshape(*others, d)
    identity = jnp.moveaxis(identity, -1, cap.out_axis)  # leaf layout, d "neurons"
    identity = jnp.transpose(identity, axes)  # the layout the convolution reads
    dn = params["dimension_numbers"]
    out = jax.lax.conv_general_dilated(
        x, identity, window_strides=params["window_strides"], padding=params["padding"],
        lhs_dilation=params["lhs_dilation"], rhs_dilation=params["rhs_dilation"],
        dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST,
    )
    return _rows(out, dn.out_spec[1])


def _factor(value: Any, axis: int, n: int) -> jax.Array:
    value = jnp.asarray(value)
    if value.ndim == 0:
        return jnp.broadcast_to(value, (n,))
    vector = jnp.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)[:, 0]
    return jnp.broadcast_to(vector, (n,))


def batch_statistics(program: Program, out_tree: Any, captures: Mapping[str, FlowCapture],
                     loss_fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    """A jittable ``f(args, targets) -> {layer: (patches, backprop, z, factor | None)}``.

    ``args`` are the program's flattened inputs. Rows are ``(M, 1, k)``: every sample and
    position is one row (SSD sums positions; the batch-mean loss averages samples).
    """
    for name, cap in captures.items():
        if cap.problem is not None:
            raise GrowthError(f"SSD cannot score {name!r}: {cap.problem}")
    taps: dict[int, list[tuple[str, int]]] = {}
    tapped: dict[str, int] = {}
    keep: set[int] = set()
    for name, cap in captures.items():
        z = cap.z
        assert z is not None and cap.h_step is not None
        step = program.steps[cap.h_step]
        h = step.outs[0] if cap.activation != "identity" else z
        taps.setdefault(cap.h_step, []).append((name, step.outs.index(h)))
        tapped[name] = h
        keep |= {z} | ({cap.data} if not isinstance(cap.data, Lit) else set())
        keep |= {ref for _, ref, _, _ in cap.multipliers if not isinstance(ref, Lit)}

    def run(args: Sequence[Any], targets: Any):
        deltas = {name: jnp.zeros(program.shapes[h], program.dtypes.get(h) or jnp.float32)
                  for name, h in tapped.items()}

        def loss_of(deltas):
            def after(index: int, outs: list[Any]) -> list[Any]:
                for name, position in taps.get(index, ()):
                    outs[position] = outs[position] + deltas[name].astype(outs[position].dtype)
                return outs

            outputs, kept = program.run(args, after=after, keep=keep)
            outputs = jax.tree_util.tree_unflatten(out_tree, outputs)
            return check_loss(loss_fn(outputs, targets), finite=False), kept

        (_, kept), grads = jax.value_and_grad(loss_of, has_aux=True)(deltas)
        found = {}
        for name, cap in captures.items():
            z = kept[cap.z]
            n = z.shape[cap.z_axis]
            data = cap.data.value if isinstance(cap.data, Lit) else kept[cap.data]
            patches = _patches(program, cap, data, name)
            z_rows, g_rows = _rows(z, cap.z_axis), _rows(grads[name], cap.z_axis)
            if patches.shape[0] != z_rows.shape[0]:
                raise GrowthError(
                    f"SSD cannot score {name!r}: {patches.shape[0]} input patches but "
                    f"{z_rows.shape[0]} pre-activation rows (an operation between the layer and "
                    "its activation changes the positions)")
            factor = None
            for _, ref, op, axis in cap.multipliers:
                value = _factor(ref.value if isinstance(ref, Lit) else kept[ref], axis, n)
                value = value if op == "mul" else 1.0 / value
                factor = value if factor is None else factor * value
            found[name] = (patches[:, None, :], g_rows[:, None, :], z_rows[:, None, :], factor)
        return found

    return run


def to_statistics(per_batch: Sequence[Mapping[str, Any]], names: Sequence[str],
                  activations: Mapping[str, str]) -> list[SplittingStatistics]:
    """:class:`~simcore.growth.SplittingStatistics` per layer from per-batch captures."""
    out = []
    for name in names:
        batches = tuple((b[name][0], b[name][1], b[name][2]) for b in per_batch)
        factor = per_batch[0][name][3]
        if factor is not None and len(per_batch) > 1:
            first = np.asarray(factor)
            for b in per_batch[1:]:
                if not np.allclose(np.asarray(b[name][3]), first, rtol=1e-5, atol=1e-7):
                    raise GrowthError(f"SSD cannot score {name!r}: its per-channel factor "
                                      "changes between batches (a batch statistic?)")
        out.append(SplittingStatistics(activation=activations[name], bn_scale=factor,
                                       batches=batches))
    return out
