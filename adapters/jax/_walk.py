"""The walk behind :mod:`.discovery`: what each primitive does to a layer's channels.

Every variable of the flat program (:mod:`._program`) gets an :class:`_Info`: data (with a
:class:`_Tag` when it carries some producer's channels on one axis), a parameter (the leaves it
is computed from, and whether it went through ``sqrt``/``rsqrt``/a division, which is how a
BatchNorm's variance is told from its scale) or a constant. :class:`Analysis` runs the steps in
order, starting a :class:`Walk` at every producer and recording, per walk, its per-channel
parameters, depthwise convs, consumers, activation and why it cannot grow; an add of two
producers' channels joins their walks into one residual group (:mod:`._residual`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ._program import ACTIVATIONS, PRIMITIVE_ACTIVATIONS, Lit, Program, Step
from ._residual import ADDS, Groups, merge_add, pending_of

__all__ = ["Analysis", "Walk", "layer_of"]

_UNARY = {
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan",
    "abs", "sign", "floor", "ceil", "round", "sqrt", "rsqrt", "cbrt", "integer_pow", "erf",
    "erfc", "erf_inv", "is_finite", "not", "convert_element_type", "copy", "copy_p",
    "reduce_precision", "square", "real", "imag", "lgamma", "digamma", "asin", "acos", "atan",
    "sinh", "cosh", "asinh", "acosh", "atanh", "stop_gradient", "optimization_barrier",
}
_BINARY = {"add", "add_any", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem",
           "nextafter", "and", "or", "xor", "eq", "ne", "lt", "le", "gt", "ge", "select_n",
           "clamp"}
_KEEPS_VALUES = {"convert_element_type", "copy", "copy_p", "reduce_precision",
                 "optimization_barrier"}
_INVERTS = {"sqrt", "rsqrt"}
_REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
               "reduce_or", "argmax", "argmin"}
_MERGE_LABELS = {"sub": "subtraction", "mul": "multiplication", "div": "division",
                 "concatenate": "concatenation"}
#: Never grown by design (a consumer only): not reported as skipped.
OUTPUT_REASON = "it is the network's output layer (a classifier is a consumer only)"


def layer_of(leaf: str) -> str:
    """The module path of a kernel leaf: ``params/Conv_0/kernel`` -> ``Conv_0``."""
    parts = leaf.split("/")
    if parts and parts[0] in ("params", "batch_stats"):
        parts = parts[1:]
    return "/".join(parts[:-1]) or leaf


@dataclass(frozen=True)
class _Tag:
    pid: int
    axis: int
    segment: int = -1  # -1: right after the producer; k: after depthwise conv k
    spatial: int = 1
    channels_last: bool = False
    pre: bool = True  # still on the affine chain from the producer to its activation
    pending: tuple[int, ...] = ()  # merged: the members whose activation is still ahead
    merged: bool = False  # the sum of a residual group (:mod:`._residual`)


@dataclass
class _Info:
    kind: str  # "data", "param" or "const"
    tag: _Tag | None = None
    leaves: dict[int, bool] = field(default_factory=dict)  # leaf -> went through sqrt/1/x
    view: tuple[int, tuple[int | None, ...]] | None = None  # pure view: (leaf, var axis -> leaf)


@dataclass
class Walk:
    pid: int
    step: int
    leaf: int
    out_axis: int
    kind: str
    data: Any
    kernel_axes: tuple[int, ...]
    n: int
    out_id: int
    events: dict[int, list[tuple[str, dict[int, bool]]]] = field(default_factory=dict)
    depthwise: list[tuple[int, int]] = field(default_factory=list)
    consumers: dict[int, tuple[int, int, bool]] = field(default_factory=dict)
    activation: tuple[str | None, int, int, int] | None = None  # kind, z, h, step of h
    z_axis: int = 0
    multipliers: list[tuple[int, Any, str, int]] = field(default_factory=list)
    problem: str | None = None
    blocked: str | None = None


def _reshape_map(src: Sequence[int], dst: Sequence[int], axis: int):
    """Where ``src``'s ``axis`` goes in a reshape to ``dst``.

    ``("same", j)``; ``("flat", j, spatial, channels_last)`` when it is merged with the axes
    on one side only; None when it is merged with axes on both sides or split.
    """
    n, lead = src[axis], math.prod(src[:axis])
    for j, size in enumerate(dst):
        if size == n and math.prod(dst[:j]) == lead:
            return ("same", j)
    prefix_in = [math.prod(src[:i]) for i in range(len(src) + 1)]
    for j in range(len(dst)):
        start, stop = math.prod(dst[:j]), math.prod(dst[: j + 1])
        if start in prefix_in and stop in prefix_in:
            i0, i1 = prefix_in.index(start), len(prefix_in) - 1 - prefix_in[::-1].index(stop)
            if i0 <= axis < i1:
                before, after = math.prod(src[i0:axis]), math.prod(src[axis + 1:i1])
                if before == 1:
                    return ("flat", j, after, False)
                if after == 1:
                    return ("flat", j, before, True)
                return None
    return None


class Analysis:
    def __init__(self, program: Program, names: Sequence[str], shapes: Sequence[tuple[int, ...]]):
        self.program, self.names, self.shapes = program, list(names), list(shapes)
        self.info: dict[int, _Info] = {}
        self.walks: dict[int, Walk] = {}
        self.made_by: dict[int, int] = {}
        self.kernel_uses: dict[int, list[int]] = {}
        self.groups = Groups()
        for index, ref in enumerate(program.inputs):
            if index < len(names):
                ndim = len(program.shape(ref))
                self.info[ref] = _Info("param", leaves={index: False},
                                       view=(index, tuple(range(ndim))))
            else:
                self.info[ref] = _Info("data")
        for ref in program.consts:
            self.info[ref] = _Info("const")

    # -- helpers -----------------------------------------------------------------------------
    def get(self, ref: Any) -> _Info:
        return _Info("const") if isinstance(ref, Lit) else self.info[ref]

    def name(self, pid: int) -> str:
        return layer_of(self.names[self.walks[pid].leaf])

    def block(self, pid: int, reason: str) -> None:
        walk = self.walks[pid]
        if walk.blocked is None:
            walk.blocked = reason

    def set_out(self, step: Step, info: _Info) -> None:
        for ref in step.outs:
            self.info[ref] = info

    def settle_activation(self, tag: _Tag, ref: int) -> None:
        """A pre-activation value leaves the affine chain without an activation: identity."""
        for walk in (self.walks[pid] for pid in pending_of(tag)):
            if walk.activation is None and walk.problem is None:
                walk.activation = ("identity", ref, ref, self.made_by.get(ref, walk.step))
                walk.z_axis = tag.axis

    # -- the walk ------------------------------------------------------------------------------
    def run(self) -> None:
        for index, step in enumerate(self.program.steps):
            for ref in step.outs:
                self.made_by[ref] = index
            infos = [self.get(r) for r in step.ins]
            tagged = [(i, info) for i, info in enumerate(infos) if info.tag is not None]
            pids = [info.tag.pid for _, info in tagged if info.tag is not None]
            live = [pid for pid in pids if self.walks[pid].blocked is None]
            if step.name in ("conv_general_dilated", "dot_general"):
                self.linear(index, step, infos)
            elif not tagged:
                self.untagged(step, infos)
            elif len(live) < len(tagged) or not live:
                for pid in pids:  # one side already refused: refuse the others too
                    self.block(pid, f"its channels meet a non-growable layer's in "
                                    f"'{step.name}'")
                self.set_out(step, _Info("data"))
            else:
                self.tagged(index, step, infos, tagged)
        for ref in self.program.outputs:
            info = self.get(ref)
            if info.tag is not None:
                self.block(info.tag.pid, OUTPUT_REASON)
        for leaf, steps in self.kernel_uses.items():
            if len(steps) > 1:
                for walk in self.walks.values():
                    if walk.leaf == leaf:
                        self.block(walk.pid, f"its kernel is used {len(steps)} times "
                                             "(shared weights)")
        owners: dict[int, set[int]] = {}
        for walk in self.walks.values():
            for leaf in self.flow_leaves(walk):
                owners.setdefault(leaf, set()).add(walk.pid)
        for leaf, sharing in owners.items():
            if len(sharing) > 1:
                for pid in sharing:
                    self.block(pid, f"{self.names[leaf]!r} is shared with another layer")

    def flow_leaves(self, walk: Walk) -> set[int]:
        leaves = {walk.leaf} | {leaf for leaf, _ in walk.depthwise}
        for events in walk.events.values():
            for _, per in events:
                leaves |= set(per)
        return leaves

    def untagged(self, step: Step, infos: list[_Info]) -> None:
        kinds = {info.kind for info in infos}
        if "data" in kinds or not infos:
            self.set_out(step, _Info("data" if "data" in kinds else "const"))
            return
        if kinds == {"const"}:
            self.set_out(step, _Info("const"))
            return
        leaves: dict[int, bool] = {}
        for position, info in enumerate(infos):
            inverted = step.name in _INVERTS or (step.name == "div" and position == 1)
            for leaf, flag in info.leaves.items():
                leaves[leaf] = leaves.get(leaf, False) or flag or inverted
        params = [info for info in infos if info.kind == "param"]
        view = None
        if len(params) == 1 and params[0].view is not None:
            view = self.view_after(step, params[0].view)
        self.set_out(step, _Info("param", leaves=leaves, view=view))

    def view_after(self, step: Step, view):
        leaf, axes = view
        src = self.program.shape(step.ins[0])
        dst = self.program.shapes[step.outs[0]]
        p = step.params
        if step.name in _KEEPS_VALUES:
            return view
        if step.name == "transpose":
            return (leaf, tuple(axes[i] for i in p["permutation"]))
        if step.name == "broadcast_in_dim":
            new: list[int | None] = [None] * len(dst)
            for i, j in enumerate(p["broadcast_dimensions"]):
                new[j] = axes[i]
            return (leaf, tuple(new))
        if step.name == "squeeze":
            return (leaf, tuple(a for i, a in enumerate(axes) if i not in p["dimensions"]))
        if step.name == "reshape":
            new = [None] * len(dst)
            for i, size in enumerate(src):
                if size == 1:
                    continue
                where = _reshape_map(src, dst, i)
                if where is None or where[0] != "same":
                    return None
                new[where[1]] = axes[i]
            return (leaf, tuple(new))
        return None

    # -- producers, consumers, depthwise ------------------------------------------------------
    def linear(self, index: int, step: Step, infos: list[_Info]) -> None:
        if step.name == "conv_general_dilated":
            self.conv(index, step, infos)
        else:
            self.dot(index, step, infos)

    def new_walk(self, index: int, step: Step, kernel: _Info, kind: str, out_axis_var: int,
                 out_axis_leaf: int, data: Any) -> None:
        leaf, axes = kernel.view  # type: ignore[misc]
        pid = len(self.walks)
        n = self.program.shapes[step.outs[0]][out_axis_var]
        self.walks[pid] = Walk(pid, index, leaf, out_axis_leaf, kind, data,
                                tuple(a if a is not None else -1 for a in axes), n, step.outs[0],
                                z_axis=out_axis_var)
        self.kernel_uses.setdefault(leaf, []).append(index)
        self.set_out(step, _Info("data", tag=_Tag(pid, out_axis_var)))

    def consume(self, tag: _Tag, leaf: int, in_axis: int, ref: int) -> None:
        self.settle_activation(tag, ref)
        self.walks[tag.pid].consumers[leaf] = (in_axis, tag.spatial, tag.channels_last)

    def conv(self, index: int, step: Step, infos: list[_Info]) -> None:
        data, kernel = infos
        p = step.params
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        groups = int(p["feature_group_count"])
        if kernel.kind != "param" or kernel.view is None or data.kind != "data" \
                or int(p.get("batch_group_count", 1)) != 1:
            if data.tag is not None:
                self.block(data.tag.pid, "its channels reach a convolution that is not a "
                                         "layer with a kernel")
            self.set_out(step, _Info("data"))
            return
        leaf, axes = kernel.view
        out_leaf, in_leaf = axes[rhs_spec[0]], axes[rhs_spec[1]]
        if out_leaf is None or in_leaf is None:
            self.set_out(step, _Info("data"))
            return
        tag = data.tag
        if tag is not None and self.walks[tag.pid].blocked is None:
            if tag.axis != lhs_spec[1] or tag.spatial != 1:
                self.block(tag.pid, "its channels reach a convolution on another axis")
                self.set_out(step, _Info("data"))
                return
            n = self.program.shape(step.ins[0])[tag.axis]
            rhs_shape = self.program.shape(step.ins[1])
            if groups > 1:
                if groups == n and rhs_shape[rhs_spec[1]] == 1 and rhs_shape[rhs_spec[0]] == n:
                    self.settle_activation(tag, step.ins[0])
                    walk = self.walks[tag.pid]
                    walk.depthwise.append((leaf, out_leaf))
                    self.kernel_uses.setdefault(leaf, []).append(index)
                    self.set_out(step, _Info("data", tag=_Tag(
                        tag.pid, out_spec[1], segment=len(walk.depthwise) - 1, pre=False)))
                    return
                self.block(tag.pid, f"its channels reach a grouped convolution "
                                    f"(feature_group_count={groups}) of "
                                    f"{layer_of(self.names[leaf])!r}")
            else:
                self.consume(tag, leaf, in_leaf, step.ins[0])
        self.new_walk(index, step, kernel, "conv", out_spec[1], out_leaf, step.ins[0])
        if groups > 1:
            self.block(len(self.walks) - 1, f"it is a grouped convolution "
                                            f"(feature_group_count={groups})")

    def dot(self, index: int, step: Step, infos: list[_Info]) -> None:
        (lc, rc), (lb, rb) = step.params["dimension_numbers"]
        shapes = [self.program.shape(r) for r in step.ins]
        param_side = [i for i, info in enumerate(infos)
                      if info.kind == "param" and info.view is not None]
        data_side = [i for i, info in enumerate(infos) if info.kind == "data"]
        if len(param_side) != 1 or len(data_side) != 1 or lb or rb:
            for info in infos:
                if info.tag is not None:
                    self.block(info.tag.pid, "its channels reach a product of two activations "
                                             "or a batched matrix product")
            self.set_out(step, _Info("data"))
            return
        k, d = param_side[0], data_side[0]
        contracting = (lc, rc)
        kernel, data = infos[k], infos[d]
        leaf, axes = kernel.view  # type: ignore[misc]
        tag = data.tag
        if tag is not None and self.walks[tag.pid].blocked is None:
            if len(contracting[d]) != 1 or tag.axis != contracting[d][0]:
                self.block(tag.pid, "its channels reach a matrix product on another axis")
            else:
                in_leaf = axes[contracting[k][0]]
                if in_leaf is not None:
                    self.consume(tag, leaf, in_leaf, step.ins[d])
        free = [i for i in range(len(shapes[k])) if i not in contracting[k]]
        out_leaf = axes[free[0]] if len(free) == 1 else None
        if out_leaf is None:
            self.set_out(step, _Info("data"))
            return
        position = 0 if k == 0 else len(shapes[0]) - len(lc)  # out: lhs free, then rhs free
        self.new_walk(index, step, kernel, "dense", position, out_leaf, step.ins[d])

    # -- tagged elementwise and structural steps ----------------------------------------------
    def tagged(self, index: int, step: Step, infos: list[_Info], tagged) -> None:
        position, first = tagged[0]
        tag = first.tag
        assert tag is not None
        pids = {info.tag.pid for _, info in tagged}
        if step.name in ADDS and len(tagged) == 2 and len({info.tag for _, info in tagged}) > 1:
            self.set_out(step, _Info("data", tag=merge_add(
                self, step, [info.tag for _, info in tagged])))
            return
        if len({self.groups.find(pid) for pid in pids}) > 1:
            label = _MERGE_LABELS.get(step.name, f"'{step.name}'")
            layers = sorted(self.name(pid) for pid in pids)
            for pid in pids:
                others = [name for name in layers if name != self.name(pid)]
                self.block(pid, f"its channels meet those of {others[0]!r} in a {label}")
            self.set_out(step, _Info("data"))
            return
        if any(info.tag != tag and (info.tag.axis, info.tag.segment, info.tag.spatial)
               != (tag.axis, tag.segment, tag.spatial) for _, info in tagged):
            self.block(tag.pid, f"its channels meet themselves along another axis in "
                                f"'{step.name}'")
            self.set_out(step, _Info("data"))
            return
        ref = step.ins[position]
        if step.unit is not None or step.name in _UNARY or step.name in _BINARY:
            self.elementwise(index, step, infos, tag, ref)
            return
        self.structural(index, step, tag, ref)

    def elementwise(self, index, step, infos, tag, ref) -> None:
        walk = self.walks[tag.pid]
        n = self.program.shape(ref)[tag.axis]
        out_shape = self.program.shapes[step.outs[0]]
        if len(out_shape) != len(self.program.shape(ref)) or out_shape[tag.axis] != n:
            self.block(tag.pid, f"'{step.name}' changes the shape of its channels")
            self.set_out(step, _Info("data"))
            return
        others = [(i, info) for i, info in enumerate(infos) if info.tag is None]
        affine = step.name in ("add", "add_any", "sub", "mul", "div") or \
            step.name in _KEEPS_VALUES
        relu = step.name == "max" and any(isinstance(step.ins[i], Lit) and
                                          float(step.ins[i].value) == 0.0 for i, _ in others)
        for i, info in others:
            shape = self.program.shape(step.ins[i])
            size = shape[tag.axis] if len(shape) == len(out_shape) else 1
            if info.kind == "data":
                affine = False
                if size == n and n > 1:
                    self.block(tag.pid, f"its channels are combined with other data in "
                                        f"'{step.name}'")
                    self.set_out(step, _Info("data"))
                    return
                continue
            if step.name == "div" and i == 0:
                affine = False
            if size == n and n > 1:
                if tag.spatial != 1 or any(s != 1 for a, s in enumerate(shape) if a != tag.axis):
                    self.block(tag.pid, f"a parameter of {n} channels x other axes meets its "
                                        f"channels in '{step.name}'")
                    self.set_out(step, _Info("data"))
                    return
                if info.kind == "param" and tag.merged:  # a norm after an add
                    self.block(tag.pid, f"a per-channel parameter meets its residual stream "
                                        f"after the add in '{step.name}'")
                    self.set_out(step, _Info("data"))
                    return
                if info.kind == "param":
                    per = {leaf: flag for leaf, flag in info.leaves.items()
                           if math.prod(self.shapes[leaf]) == n}
                    walk.events.setdefault(tag.segment, []).append((step.name, per))
            if step.name in ("mul", "div") and affine:
                for target in (self.walks[pid] for pid in pending_of(tag)):
                    if any(s != 1 for a, s in enumerate(shape) if a != tag.axis):
                        target.problem = target.problem or "a per-position factor scales its " \
                                                           "output"
                    target.multipliers.append((index, step.ins[i], step.name, tag.axis))
        unit = step.unit or ("relu" if relu else None)
        for target in (self.walks[pid] for pid in pending_of(tag)):
            if target.activation is not None or target.problem is not None:
                continue
            if unit is not None:
                kind = ACTIVATIONS.get(unit, PRIMITIVE_ACTIVATIONS.get(unit))
                target.activation = (kind, ref, step.outs[0], index)
                target.z_axis = tag.axis
                if kind is None:
                    target.problem = f"no second derivative is known for its activation {unit!r}"
            elif not affine:
                target.problem = f"'{step.name}' after it is not an activation SSD knows"
        self.set_out(step, _Info("data", tag=replace(tag, pre=tag.pre and affine)))

    def structural(self, index: int, step: Step, tag: _Tag, ref: Any) -> None:
        p = step.params
        src = self.program.shape(ref)
        dst = self.program.shapes[step.outs[0]]
        axis, n = tag.axis, src[tag.axis]
        new: _Tag | None = None
        keeps_layout = False
        if step.name == "reshape":
            where = _reshape_map(src, dst, axis)
            if where is not None and where[0] == "same":
                new, keeps_layout = replace(tag, axis=where[1]), True
            elif where is not None and tag.spatial == 1:
                new = replace(tag, axis=where[1], spatial=where[2], channels_last=where[3])
        elif step.name == "broadcast_in_dim":
            j = p["broadcast_dimensions"][axis]
            if dst[j] == n:
                new = replace(tag, axis=j)
                added = [s for i, s in enumerate(dst) if i not in p["broadcast_dimensions"]]
                keeps_layout = all(s == 1 for s in added)
        elif step.name == "squeeze":
            if axis not in p["dimensions"]:
                new = replace(tag, axis=axis - sum(1 for d in p["dimensions"] if d < axis))
                keeps_layout = True
        elif step.name == "transpose":
            perm = list(p["permutation"])
            new = replace(tag, axis=perm.index(axis))
            rest = [i for i in perm if i != axis and src[i] != 1]
            keeps_layout = rest == sorted(rest)
        elif step.name in _REDUCTIONS:
            axes = tuple(p["axes"])
            if axis not in axes:
                new = replace(tag, axis=axis - sum(1 for a in axes if a < axis))
        elif step.name.startswith("reduce_window") or step.name.startswith("cum"):
            dims = p.get("window_dimensions")
            if dims is not None and dims[axis] == 1 and p["window_strides"][axis] == 1 and \
                    tuple(p["padding"][axis]) == (0, 0):
                new = tag
            elif step.name.startswith("cum") and p.get("axis") != axis:
                new = tag
        elif step.name == "pad":
            if tuple(p["padding_config"][axis]) == (0, 0, 0):
                new = tag
        elif step.name == "slice":
            strides = p.get("strides") or (1,) * len(src)
            if p["start_indices"][axis] == 0 and p["limit_indices"][axis] == n and \
                    strides[axis] == 1:
                new = tag
        elif step.name == "dynamic_slice":
            if p["slice_sizes"][axis] == n:
                new = tag
        if new is None:
            what = {"concatenate": "a concatenation", "reshape": "a reshape that mixes them "
                    "with other axes"}.get(step.name, f"'{step.name}', which growth cannot "
                                                      "follow along them")
            if step.name in _REDUCTIONS:
                what = "a reduction over them"
            self.block(tag.pid, f"its channels reach {what}")
            self.set_out(step, _Info("data"))
            return
        if not keeps_layout:
            self.settle_activation(tag, ref)
            new = replace(new, pre=False)
        self.set_out(step, _Info("data", tag=new))
