"""Growth budgets, global top-k selection and parameter counts of the paper's seeds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simcore.growth import count_parameters, growth_budget, round_half_up, select_lowest
from simcore.growth.presets import (
    MOBILENET_V1_SEED_WIDTHS,
    VGG16_SEED_WIDTHS,
    mobilenet_v1_cifar,
    scale_widths,
    vgg16_cifar,
)

# --- parameter counts of the paper's seeds and their growth -------------------------------------


def test_seed_parameter_counts():
    assert count_parameters(vgg16_cifar(VGG16_SEED_WIDTHS)) == 28_666  # the paper's 0.0288M
    assert count_parameters(mobilenet_v1_cifar(MOBILENET_V1_SEED_WIDTHS)) == 19_978


def test_vgg16_seed_layout():
    layers = vgg16_cifar()
    convs = [layer for layer in layers if layer["kind"] == "conv"]
    assert len(convs) == 14  # 13 growable convs + the 1x1 classifier
    assert sum(layer["kind"] == "maxpool" for layer in layers) == 5
    assert all(not c["bias"] and c["kernel_size"] == 3 for c in convs[:13])
    assert convs[-1]["bias"] and convs[-1]["kernel_size"] == 1 and convs[-1]["out_channels"] == 10
    assert [c["width_index"] for c in convs[:13]] == list(range(13))


def test_mobilenet_seed_layout():
    layers = mobilenet_v1_cifar()
    convs = [layer for layer in layers if layer["kind"] == "conv"]
    depthwise = [c for c in convs if c.get("groups", 1) > 1]
    assert all(c["groups"] == c["in_channels"] == c["out_channels"] for c in depthwise)
    assert len(depthwise) == 13
    assert [i + 1 for i, c in enumerate(depthwise) if c["stride"] == 2] == [2, 4, 6, 12]
    assert sum(layer["kind"] == "batchnorm" for layer in layers) == 27
    assert {layer["name"] for layer in layers if layer["kind"] == "activation"} == {"swish"}


def test_four_proportional_growths_of_35_percent():
    """Every width times 1.35, rounded half up, four times (16 -> 22 -> 30 -> 41 -> 55).

    VGG16: 28,666 -> 53,668 -> 99,100 -> 184,141 -> 330,175 (0.33M; the paper reports 0.325M;
    without rounding, 16 * 1.35**4 = 53.1 channels give ~0.308M, docs/design.md's ~0.31M, 'Growth').
    MobileNetV1: 19,978 -> 32,991 -> 55,806 -> 95,326 -> 165,175.
    """
    vgg, mobile = [VGG16_SEED_WIDTHS], [MOBILENET_V1_SEED_WIDTHS]
    for _ in range(4):
        vgg.append(scale_widths(vgg[-1], 1.35))
        mobile.append(scale_widths(mobile[-1], 1.35))
    assert [w[0] for w in vgg] == [16, 22, 30, 41, 55]
    assert [count_parameters(vgg16_cifar(w)) for w in vgg] == [
        28_666,
        53_668,
        99_100,
        184_141,
        330_175,
    ]
    assert [count_parameters(mobilenet_v1_cifar(w)) for w in mobile] == [
        19_978,
        32_991,
        55_806,
        95_326,
        165_175,
    ]
    continuous = 16 * 1.35**4
    params = 27 * continuous + 12 * 9 * continuous**2 + 13 * 2 * continuous + 10 * continuous + 10
    assert 0.30e6 < params < 0.315e6


def test_global_neuron_budget_of_the_vgg_seed():
    """35% of all 208 neurons (13 x 16) per growth: 73, 98, 133, 179 -> 691 neurons."""
    neurons, added = 13 * 16, []
    for _ in range(4):
        added.append(growth_budget(neurons, 0.35))
        neurons += added[-1]
    assert added == [73, 98, 133, 179] and neurons == 691
    # spread evenly that is 53.2 channels per layer: about 0.31M parameters
    assert 0.30e6 < count_parameters(vgg16_cifar([round(691 / 13)] * 13)) < 0.32e6


def test_parameter_unit_reading_ends_near_0_095m():
    total = 28_666
    for _ in range(4):
        # 35% of the parameter count per growth (params_per_neuron=1 counts parameters)
        total += growth_budget(
            0, 0.35, unit="parameters", params_per_neuron=1.0, total_params=total
        )
    assert 94_000 < total < 96_000


def test_rounding_is_half_up():
    assert round_half_up(40.5) == 41 and round(40.5) == 40
    assert growth_budget(10, 0.25) == 3  # 2.5
    assert growth_budget(10, 0.24) == 2
    assert growth_budget(0, 0.35) == 0
    assert growth_budget(100, 0.0) == 0
    assert (
        growth_budget(100, 0.35, unit="parameters", params_per_neuron=7.0, total_params=1000) == 50
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"neurons": -1, "ratio": 0.3}, ValueError, "neurons"),
        ({"neurons": 1.5, "ratio": 0.3}, TypeError, "neurons"),
        ({"neurons": 10, "ratio": -0.1}, ValueError, "ratio"),
        ({"neurons": 10, "ratio": float("inf")}, ValueError, "ratio"),
        ({"neurons": 10, "ratio": 1e308}, ValueError, "ratio=1e.308 asks for more neurons"),
        ({"neurons": 10, "ratio": 1e308, "unit": "parameters", "params_per_neuron": 1e-10,
          "total_params": 100}, ValueError, "ratio=1e.308 asks for more neurons"),
        ({"neurons": 10, "ratio": "0.3"}, TypeError, "ratio"),
        ({"neurons": 10, "ratio": 0.3, "unit": "layers"}, ValueError, "unit"),
        ({"neurons": 10, "ratio": 0.3, "unit": "parameters"}, ValueError, "params_per_neuron"),
        (
            {
                "neurons": 10,
                "ratio": 0.3,
                "unit": "parameters",
                "params_per_neuron": 0.0,
                "total_params": 100,
            },
            ValueError,
            "params_per_neuron",
        ),
    ],
)
def test_growth_budget_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        growth_budget(**kwargs)


def test_count_parameters_kinds_and_errors():
    layers = [
        {"kind": "conv", "in_channels": 8, "out_channels": 8, "kernel_size": (3, 1), "groups": 8},
        {"kind": "dense", "in_features": 8, "out_features": 2},
        {"kind": "dense", "in_features": 8, "out_features": 2, "bias": False},
        {"kind": "batchnorm", "channels": 8, "affine": False},
        {"kind": "maxpool"},
        {"kind": "flatten"},
    ]
    assert count_parameters(layers) == 8 * 3 + 18 + 16
    with pytest.raises(ValueError, match="unknown kind"):
        count_parameters([{"kind": "lstm"}])
    with pytest.raises(ValueError, match="missing 'kernel_size'"):
        count_parameters([{"kind": "conv", "in_channels": 1, "out_channels": 1}])
    with pytest.raises(ValueError, match="groups"):
        count_parameters(
            [{"kind": "conv", "in_channels": 6, "out_channels": 4, "kernel_size": 1, "groups": 4}]
        )
    with pytest.raises(ValueError, match="in_features"):
        count_parameters([{"kind": "dense", "in_features": -3, "out_features": 2}])
    with pytest.raises(TypeError, match="sequence"):
        count_parameters({"kind": "dense"})
    with pytest.raises(ValueError, match="13 entries"):
        vgg16_cifar([16] * 12)


# --- selection ---------------------------------------------------------------------------------


def _picks(result):
    return [p.tolist() for p in result]


def test_exactly_k_picks_with_ties_and_no_kth_value_trap():
    # "<= sorted[k]" would pick all four 2.0 entries plus the 1.0: five instead of three
    scores = [np.array([2.0, 1.0, 2.0]), np.array([2.0, 2.0])]
    assert _picks(select_lowest(scores, 3)) == [[0, 1, 2], []]
    assert _picks(select_lowest(scores, 4)) == [[0, 1, 2], [0]]
    everything_tied = [np.zeros(3), np.zeros(2), np.zeros(4)]
    assert _picks(select_lowest(everything_tied, 4)) == [[0, 1, 2], [0], []]


def test_lowest_scores_win_globally():
    scores = [np.array([0.5, -3.0, 0.0]), np.array([-1.0, 4.0]), np.array([-2.0])]
    assert _picks(select_lowest(scores, 3)) == [[1], [0], [0]]
    assert _picks(select_lowest(scores, 0)) == [[], [], []]


def test_caps_limit_each_layer_and_the_rest_of_the_budget_moves_on():
    scores = [np.array([-5.0, -4.0, -3.0]), np.array([1.0, 2.0])]
    assert _picks(select_lowest(scores, 3, caps=[1, None])) == [[0], [0, 1]]
    assert _picks(select_lowest(scores, 2, caps=[0, 5])) == [[], [0, 1]]
    with pytest.raises(ValueError, match="exceeds the 3 candidates available under the caps"):
        select_lowest(scores, 4, caps=[1, None])
    assert _picks(select_lowest(scores, 4, caps=[1, None], clamp=True)) == [[0], [0, 1]]
    with pytest.raises(ValueError, match="exceeds the 5 candidates"):
        select_lowest(scores, 6)


def test_groups_have_their_own_budgets():
    scores = [np.array([-9.0, -8.0]), np.array([5.0, 6.0]), np.array([-1.0]), np.array([7.0])]
    # without groups the two lowest come from layer 0
    assert _picks(select_lowest(scores, 2)) == [[0, 1], [], [], []]
    # layers 0 and 1 share one budget, layers 2 and 3 another
    assert _picks(select_lowest(scores, 1, groups=[[0, 1], [2, 3]])) == [[0], [], [0], []]
    assert _picks(select_lowest(scores, [0, 2], groups=[[1, 0], [3, 2]])) == [[], [], [0], [0]]
    with pytest.raises(ValueError, match="of group 1"):
        select_lowest(scores, [1, 3], groups=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="layer 3 is in none"):
        select_lowest(scores, 1, groups=[[0, 1], [2]])
    with pytest.raises(ValueError, match="appears in groups"):
        select_lowest(scores, 1, groups=[[0, 1], [1, 2, 3]])
    with pytest.raises(ValueError, match="one budget per group"):
        select_lowest(scores, [1], groups=[[0, 1], [2, 3]])


def test_only_negative_returns_fewer_when_fewer_scores_are_negative():
    scores = [np.array([-1.0, 0.0, 3.0]), np.array([-0.5, 2.0])]
    assert _picks(select_lowest(scores, 3, only_negative=True)) == [[0], [0]]
    assert _picks(select_lowest(scores, 1, only_negative=True)) == [[0], []]
    assert _picks(select_lowest(scores, 3)) == [[0, 1], [0]]


def test_scores_from_any_backend(backend):
    scores = [backend.asarray(np.array([0.3, -1.0, 0.2])), backend.asarray(np.array([-2.0]))]
    result = select_lowest(scores, 2)
    assert all(isinstance(p, np.ndarray) and p.dtype == np.int64 for p in result)
    assert _picks(result) == [[1], [0]]


@pytest.mark.parametrize(
    ("scores", "k", "kwargs", "error", "match"),
    [
        ([np.array([np.nan])], 1, {}, ValueError, "NaN"),
        ([np.ones((2, 2))], 1, {}, ValueError, "one-dimensional"),
        ([np.ones(2)], -1, {}, ValueError, "k must be >= 0"),
        ([np.ones(2)], 1.0, {}, TypeError, "k must be an int"),
        ([np.ones(2)], True, {}, TypeError, "k must be an int"),
        ([np.ones(2)], 1, {"caps": [-1]}, ValueError, "caps"),
        ([np.ones(2)], 1, {"caps": [1, 1]}, ValueError, "one entry per layer"),
        ([np.ones(2)], 1, {"groups": [[3]]}, ValueError, "out of range"),
        ([np.ones(2)], 1, {"only_negative": "yes"}, TypeError, "only_negative"),
        (np.ones(2), 1, {}, TypeError, "sequence"),
    ],
)
def test_selection_errors(scores, k, kwargs, error, match):
    with pytest.raises(error, match=match):
        select_lowest(scores, k, **kwargs)


@given(
    layers=st.lists(
        st.lists(st.integers(-3, 3).map(float), min_size=0, max_size=5), min_size=1, max_size=4
    ),
    data=st.data(),
)
def test_selection_matches_a_brute_force_ranking(layers, data):
    """Integer-valued scores make ties frequent; caps drawn per layer."""
    caps = [data.draw(st.one_of(st.none(), st.integers(0, 5))) for _ in layers]
    capacity = sum(
        len(s) if c is None else min(c, len(s)) for s, c in zip(layers, caps, strict=True)
    )
    k = data.draw(st.integers(0, capacity))
    result = select_lowest([np.array(s) for s in layers], k, caps=caps)
    ranked = sorted(
        (score, layer, index) for layer, s in enumerate(layers) for index, score in enumerate(s)
    )
    expected, taken = [[] for _ in layers], [0] * len(layers)
    for _score, layer, index in ranked:
        if sum(taken) == k:
            break
        if caps[layer] is None or taken[layer] < caps[layer]:
            expected[layer].append(index)
            taken[layer] += 1
    assert _picks(result) == [sorted(e) for e in expected]
    assert sum(len(p) for p in result) == k
    # the chosen scores are the k smallest allowed: nothing unpicked in an unfilled layer is lower
    for layer, s in enumerate(layers):
        if caps[layer] is not None and taken[layer] >= caps[layer]:
            continue
        unpicked = [v for i, v in enumerate(s) if i not in result[layer]]
        chosen = list(
            itertools.chain.from_iterable(
                [layers[j][i] for i in result[j]] for j in range(len(layers))
            )
        )
        if unpicked and chosen:
            assert min(unpicked) >= max(chosen)


def test_scores_that_require_grad_are_accepted():
    torch = pytest.importorskip("torch")
    scores = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64, requires_grad=True) * 2
    assert _picks(select_lowest([scores], 2)) == [[1, 2]]
