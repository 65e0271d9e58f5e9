"""How many neurons a growth adds, which ones, and how many parameters a network has.

* :func:`growth_budget`: Firefly's ``grow_ratio`` (0.35 in the paper) read as a share of the
  current *neuron* count (the default, Firefly's meaning: 0.0287M -> ~0.31M after four growths of
  VGG16's seed) or of the *parameter* count (which would end near 0.095M).
* :func:`select_lowest`: global top-k of the lowest scores over per-layer score vectors (SSD's
  smallest eigenvalues, Firefly's gate gradients), exactly ``k`` picks, deterministic ties,
  optional per-layer caps, groups of layers with their own budgets, and "only negative scores".
* :func:`count_parameters`: parameters of a network described as plain data (see
  :mod:`simcore.growth.presets` for the paper's seeds).

Selection is a host-side decision that sizes new arrays: scores of any Array-API library are
copied to NumPy (one device sync per growth) and picks come back as NumPy int64 arrays.

>>> import numpy as np
>>> growth_budget(208, 0.35)  # VGG16 seed: 13 layers x 16 neurons
73
>>> [p.tolist() for p in select_lowest([np.array([0.3, -1.0]), np.array([-2.0, 0.1, -1.0])], 3)]
[[1], [0, 2]]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._arrays import check_choice, check_int, check_real
from ._host import as_index, to_numpy

__all__ = [
    "LAYER_KINDS",
    "UNITS",
    "count_parameters",
    "growth_budget",
    "round_half_up",
    "select_lowest",
]

UNITS = ("neurons", "parameters")


def round_half_up(x: float) -> int:
    """Round to the nearest int, halves upwards (``40.5 -> 41``; Python's ``round`` gives 40).

    Budgets use this one rule everywhere, so a ratio of a neuron count never depends on
    banker's rounding.

    >>> round_half_up(40.5), round_half_up(72.8), round_half_up(2.4999)
    (41, 73, 2)
    """
    return int(math.floor(float(x) + 0.5))


def _nonnegative_int(value: Any, name: str) -> int:
    return check_int(value, name, minimum=0)


def growth_budget(
    neurons: int,
    ratio: float,
    *,
    unit: str = "neurons",
    params_per_neuron: float | None = None,
    total_params: int | None = None,
) -> int:
    """Number of neurons one growth adds.

    ``unit="neurons"``: ``round_half_up(ratio * neurons)`` with ``neurons`` the current number of
    neurons over all growable layers (Firefly's ``grow_ratio``). ``unit="parameters"``: as many
    neurons as add about ``ratio * total_params`` parameters, i.e.
    ``round_half_up(ratio * total_params / params_per_neuron)``, where ``params_per_neuron`` is
    the (average) number of parameters one added neuron brings (its fan-in, its consumers'
    columns, its BatchNorm pair); both keywords are required for this unit and ``neurons`` is
    only validated.

    >>> growth_budget(10, 0.25)  # 2.5 rounds up
    3
    >>> growth_budget(208, 0.35, unit="parameters", params_per_neuron=300.0, total_params=28666)
    33
    """
    neurons = _nonnegative_int(neurons, "neurons")
    ratio = check_real(ratio, "ratio")
    check_choice(unit, UNITS, "unit")
    if unit == "neurons":
        return _count(ratio * neurons, ratio)
    if params_per_neuron is None or total_params is None:
        raise ValueError('unit="parameters" needs params_per_neuron and total_params')
    per_neuron = check_real(params_per_neuron, "params_per_neuron")
    if per_neuron == 0:
        raise ValueError("params_per_neuron must be > 0")
    total = _nonnegative_int(total_params, "total_params")
    return _count(ratio * total / per_neuron, ratio)


def _count(neurons: float, ratio: float) -> int:
    if not math.isfinite(neurons):  # round_half_up would raise OverflowError
        raise ValueError(f"ratio={ratio} asks for more neurons than can be counted; "
                         "use a smaller ratio")
    return round_half_up(neurons)


def _layer_scores(scores: Any) -> list[np.ndarray]:
    if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Sequence):
        raise TypeError(
            f"scores must be a sequence of per-layer score vectors, got {type(scores).__name__}"
        )
    out = []
    for i, s in enumerate(scores):
        arr = to_numpy(s, f"scores[{i}]")
        if arr.ndim != 1:
            raise ValueError(f"scores[{i}] must be one-dimensional, got shape {arr.shape}")
        if arr.size and not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise TypeError(f"scores[{i}] must hold real numbers, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
        if np.isnan(arr).any():
            raise ValueError(f"scores[{i}] contains NaN")
        out.append(arr)
    return out


def _caps(caps: Any, layers: int) -> list[int | None]:
    if caps is None:
        return [None] * layers
    if isinstance(caps, (str, bytes)) or not isinstance(caps, Sequence):
        raise TypeError(
            f"caps must be a sequence with one int (or None) per layer, got {type(caps).__name__}"
        )
    if len(caps) != layers:
        raise ValueError(f"caps must have one entry per layer ({layers}), got {len(caps)}")
    return [None if c is None else _nonnegative_int(c, f"caps[{i}]") for i, c in enumerate(caps)]


def _groups(groups: Any, layers: int) -> list[list[int]]:
    if groups is None:
        return [list(range(layers))]
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError("groups must be a sequence of sequences of layer indices")
    owner: dict[int, int] = {}
    out = []
    for g, group in enumerate(groups):
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise TypeError(f"groups[{g}] must be a sequence of layer indices")
        members = []
        for layer in group:
            layer = as_index(layer, f"groups[{g}] entry")
            if not 0 <= layer < layers:
                raise ValueError(
                    f"groups[{g}] names layer {layer}, out of range for {layers} layers"
                )
            if layer in owner:
                raise ValueError(f"layer {layer} appears in groups[{owner[layer]}] and groups[{g}]")
            owner[layer] = g
            members.append(layer)
        out.append(sorted(members))
    missing = [i for i in range(layers) if i not in owner]
    if missing:
        raise ValueError(
            f"groups must cover every layer exactly once; layer {missing[0]} is in none"
        )
    return out


def _room(cap: int | None, candidates: int) -> int:
    """How many of a layer's ``candidates`` its ``cap`` (None: no cap) lets be picked."""
    return candidates if cap is None else min(cap, candidates)


def select_lowest(
    scores: Sequence[Any],
    k: int | Sequence[int],
    *,
    caps: Sequence[int | None] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    only_negative: bool = False,
    clamp: bool = False,
) -> list[np.ndarray]:
    """Pick the ``k`` lowest scores over all layers; return the chosen indices per layer.

    ``scores[i]`` is a 1-d array (any library, or a sequence) of layer ``i``'s candidate scores.
    The result has one sorted NumPy int64 array per layer with exactly ``k`` picks in total:
    candidates are ranked by (score, layer, index), so ties go to the earlier layer, then the
    lower index -- never ``score <= kth`` (which picks every tie, more than ``k``).

    ``caps[i]`` (an int, or ``None`` for no limit) bounds the picks in layer ``i``; the ``k``
    picks are then the lowest scores that respect the caps (greedy in rank order, skipping
    layers that are full: optimal for per-layer limits).

    ``groups``: a partition of the layer indices. Each group has its own budget and its layers
    compete only with each other: ``k`` is then one int per group (a sequence) or one int used
    for every group. ``groups=None`` is one group of all layers: the global top-k.

    ``only_negative`` keeps only candidates with a score ``< 0`` (SSD: splitting a neuron whose
    smallest eigenvalue is not negative cannot decrease the loss); then FEWER than ``k`` picks
    come back when fewer scores are negative -- that is the option's purpose, not an error.

    A budget larger than a group's capacity (its number of candidates, each layer limited by
    its cap) raises ``ValueError``, unless ``clamp=True``, which picks every candidate instead.

    >>> import numpy as np
    >>> ties = [np.zeros(3), np.zeros(2)]
    >>> [p.tolist() for p in select_lowest(ties, 2)]
    [[0, 1], []]
    >>> [p.tolist() for p in select_lowest(ties, 2, caps=[1, None])]
    [[0], [0]]
    >>> [p.tolist() for p in select_lowest([np.array([-1.0, 2.0]), np.array([3.0])], 2,
    ...                                    only_negative=True)]
    [[0], []]
    >>> [p.tolist() for p in select_lowest([np.array([5.0]), np.array([1.0, 0.0])], [1, 1],
    ...                                    groups=[[0], [1]])]
    [[0], [1]]
    """
    per_layer = _layer_scores(scores)
    layers = len(per_layer)
    cap_list = _caps(caps, layers)
    group_list = _groups(groups, layers)
    if isinstance(only_negative, (bool, np.bool_)) is False:
        raise TypeError(f"only_negative must be a bool, got {type(only_negative).__name__}")
    if isinstance(clamp, (bool, np.bool_)) is False:
        raise TypeError(f"clamp must be a bool, got {type(clamp).__name__}")

    if groups is not None and not isinstance(k, numbers.Integral):
        if isinstance(k, (str, bytes)) or not isinstance(k, Sequence):
            raise TypeError("k must be an int or a sequence with one int per group")
        if len(k) != len(group_list):
            raise ValueError(f"k must have one budget per group ({len(group_list)}), got {len(k)}")
        budgets = [_nonnegative_int(b, f"k[{g}]") for g, b in enumerate(k)]
    else:
        budgets = [_nonnegative_int(k, "k")] * len(group_list)

    picks: list[list[int]] = [[] for _ in range(layers)]
    for g, (members, budget) in enumerate(zip(group_list, budgets, strict=True)):
        capacity = sum(_room(cap_list[i], len(per_layer[i])) for i in members)
        if budget > capacity:
            if not clamp:
                where = "" if groups is None else f" of group {g}"
                raise ValueError(
                    f"budget k={budget}{where} exceeds the {capacity} candidates available "
                    f"under the caps; pass clamp=True to pick them all"
                )
            budget = capacity
        if budget == 0 or not members:
            continue
        values = np.concatenate([per_layer[i] for i in members])
        layer_of = np.concatenate([np.full(len(per_layer[i]), i, dtype=np.int64) for i in members])
        index_of = np.concatenate([np.arange(len(per_layer[i]), dtype=np.int64) for i in members])
        order = np.lexsort((index_of, layer_of, values))  # last key is the primary one
        taken = dict.fromkeys(members, 0)
        chosen = 0
        for position in order:
            if chosen == budget:
                break
            if only_negative and not values[position] < 0:
                break  # sorted: no negative score is left
            layer = int(layer_of[position])
            cap = cap_list[layer]
            if cap is not None and taken[layer] >= cap:
                continue
            picks[layer].append(int(index_of[position]))
            taken[layer] += 1
            chosen += 1
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in picks]


#: Layer kinds :func:`count_parameters` understands, with the keys each one needs.
LAYER_KINDS = {
    "conv": ("in_channels", "out_channels", "kernel_size"),
    "dense": ("in_features", "out_features"),
    "batchnorm": ("channels",),
    "activation": (),
    "maxpool": (),
    "avgpool": (),
    "flatten": (),
}


def count_parameters(layers: Sequence[Mapping[str, Any]]) -> int:
    """Trainable parameters of a network described as a list of plain layer dicts.

    Each layer is a mapping with ``"kind"`` in :data:`LAYER_KINDS`:

    * ``conv``: ``in_channels``, ``out_channels``, ``kernel_size`` (int or pair), optional
      ``groups`` (default 1; a depthwise conv has ``groups = in_channels``) and ``bias``
      (default False): ``out * in/groups * kh * kw (+ out)``;
    * ``dense``: ``in_features``, ``out_features``, optional ``bias`` (default True);
    * ``batchnorm``: ``channels``, optional ``affine`` (default True): ``2 * channels``
      (gamma, beta; running statistics are buffers, not parameters);
    * ``activation``, ``maxpool``, ``avgpool``, ``flatten``: none.

    Other keys (``stride``, ``padding``, ``name``, ...) are ignored.

    >>> count_parameters([{"kind": "conv", "in_channels": 3, "out_channels": 16, "kernel_size": 3},
    ...                   {"kind": "batchnorm", "channels": 16}, {"kind": "activation"}])
    464
    """
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of layer mappings, got {type(layers).__name__}")
    total = 0
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise TypeError(f"layers[{i}] must be a mapping, got {type(layer).__name__}")
        kind = layer.get("kind")
        if kind not in LAYER_KINDS:
            raise ValueError(
                f"layers[{i}] has unknown kind {kind!r}; expected one of {sorted(LAYER_KINDS)}"
            )
        for key in LAYER_KINDS[kind]:
            if key not in layer:
                raise ValueError(f"layers[{i}] ({kind}) is missing {key!r}")

        def get(key: str, i: int = i, layer: Mapping[str, Any] = layer) -> int:
            value = _nonnegative_int(layer[key], f"layers[{i}][{key!r}]")
            if value == 0:
                raise ValueError(f"layers[{i}][{key!r}] must be > 0")
            return value

        if kind == "conv":
            cin, cout = get("in_channels"), get("out_channels")
            ks = layer["kernel_size"]
            sizes = (ks, ks) if isinstance(ks, numbers.Integral) else tuple(ks)
            if len(sizes) != 2:
                raise ValueError(f"layers[{i}]['kernel_size'] must be an int or a pair, got {ks!r}")
            kh, kw = (check_int(s, f"layers[{i}]['kernel_size']", minimum=1) for s in sizes)
            groups = get("groups") if "groups" in layer else 1
            if cin % groups or cout % groups:
                raise ValueError(
                    f"layers[{i}]: groups={groups} must divide in/out channels {cin}/{cout}"
                )
            total += cout * (cin // groups) * kh * kw + (cout if layer.get("bias", False) else 0)
        elif kind == "dense":
            fin, fout = get("in_features"), get("out_features")
            total += fin * fout + (fout if layer.get("bias", True) else 0)
        elif kind == "batchnorm":
            total += 2 * get("channels") if layer.get("affine", True) else 0
    return total
