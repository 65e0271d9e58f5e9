"""Optimizer state follows the widening: carried along every grown axis, or reset."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import growth_nets  # noqa: E402
from simcore.reference import growth as ref  # noqa: E402

from simcore.growth import (  # noqa: E402
    ChannelFlow,
    ChannelMap,
    Consumer,
    add_neurons,
    map_optimizer_state,
    replicate_neurons,
    split_neurons,
)
from simcore.testing import assert_close  # noqa: E402

# depthwise + BN (torch layout), a flatten consumer, HWIO/NHWC with channels-last columns
CASES = [("mobile_block", 0), ("flatten_head", 0), ("conv_flax_nhwc", 0)]


def _grow(net, flow, kind):
    n = flow.channels(net.params)
    if kind == "add":
        return add_neurons(net.params, flow, 2, rng=0)
    if kind == "replicate":
        return replicate_neurons(net.params, flow, [n - 1, 0, n - 1])
    width = net.params[flow.producer].size // n
    return split_neurons(net.params, flow, [n - 1, 0], np.ones((2, width)), eps=0.1)


def _state(net, flow, seed=0):
    rng = np.random.default_rng(seed)
    state = {
        name: {
            "exp_avg": rng.normal(size=net.params[name].shape),
            "exp_avg_sq": rng.uniform(0.1, 1.0, size=net.params[name].shape),
            "step": 12,
        }
        for name in flow.names()
    }
    untouched = "some_other_layer.weight"  # not in the flow: passed through by identity
    state[untouched] = {"momentum_buffer": rng.normal(size=(3, 3))}
    return state, untouched


def _expected(array, flow, name, sources, reset):
    """Oracle: per new channel, the parent's block (or zeros), assembled element by element."""
    _, _, axis, spatial, last = next(e for e in ref.flow_entries(flow) if e[0] == name)
    template = ref.channel_block(array, axis, 0, spatial, last)
    blocks = [
        np.zeros_like(template)
        if reset or s < 0
        else ref.channel_block(array, axis, s, spatial, last)
        for s in sources
    ]
    return ref.assemble_channels(blocks, array.shape, axis, spatial, last)


@pytest.mark.parametrize("kind", ["add", "replicate", "split"])
@pytest.mark.parametrize(("name", "index"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_state_is_mapped_like_the_parameters(backend, name, index, kind):
    for mode in ("carry", "zero"):
        _check_state_mapping(backend, name, index, kind, mode)


def _check_state_mapping(backend, name, index, kind, mode):
    net = growth_nets.build(name)
    flow = net.flows[index]
    grown, cmap = _grow(net, flow, kind)
    state, untouched = _state(net, flow)
    on_backend = {
        key: {k: (backend.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in per.items()}
        for key, per in state.items()
    }
    new = map_optimizer_state(on_backend, flow, cmap, mode=mode)
    assert new[untouched] is on_backend[untouched]
    for param in flow.names():
        assert new[param]["step"] == (0 if mode == "zero" else 12)
        for key in ("exp_avg", "exp_avg_sq"):
            assert tuple(new[param][key].shape) == grown[param].shape, (param, key)
            expected = _expected(state[param][key], flow, param, cmap.sources, mode == "zero")
            assert_close(new[param][key], expected, backend=backend, dtype="float64", err_msg=param)


def test_copies_take_the_parents_moments_unscaled_even_in_consumers():
    """The consumer COLUMNS are halved by split; their moments are copied (module docstring)."""
    params = {"w1": np.eye(2), "w2": np.array([[4.0, 8.0]])}
    flow = ChannelFlow("w1", consumers=(Consumer("w2"),))
    grown, cmap = split_neurons(params, flow, [1], np.ones((1, 2)), eps=0.1)
    assert grown["w2"].tolist() == [[4.0, 4.0, 4.0]]
    state = {
        "w2": {"momentum": np.array([[1.0, 3.0]])},
        "w1": {"momentum": np.array([[1.0, 2.0], [3.0, 4.0]])},
    }
    new = map_optimizer_state(state, flow, cmap)
    assert new["w2"]["momentum"].tolist() == [[1.0, 3.0, 3.0]]
    assert new["w1"]["momentum"].tolist() == [[1.0, 2.0], [3.0, 4.0], [3.0, 4.0]]


def test_scalars_and_zero_d_arrays(backend):
    flow = ChannelFlow("w", consumers=(Consumer("v"),))
    step = backend.asarray(np.asarray(7.0))
    state = {"w": {"m": backend.asarray(np.ones((2, 3))), "step": step, "lr": 0.1, "tag": None}}
    cmap = ChannelMap((0, 1, -1), "add")
    carried = map_optimizer_state(state, flow, cmap)
    assert (
        carried["w"]["step"] is step and carried["w"]["lr"] == 0.1 and carried["w"]["tag"] is None
    )
    np.testing.assert_array_equal(
        backend.to_numpy(carried["w"]["m"]), [[1, 1, 1]] * 2 + [[0, 0, 0]]
    )
    reset = map_optimizer_state(state, flow, cmap, mode="zero")
    assert float(backend.to_numpy(reset["w"]["step"])) == 0.0 and reset["w"]["lr"] == 0.0
    assert reset["w"]["tag"] is None
    with pytest.warns(DeprecationWarning, match="'zero'"):  # the old name, for one release
        old = map_optimizer_state(state, flow, cmap, mode="reset")
    np.testing.assert_array_equal(backend.to_numpy(old["w"]["m"]),
                                  backend.to_numpy(reset["w"]["m"]))


def test_state_is_not_mutated():
    net = growth_nets.build("conv_bn")
    flow = net.flows[0]
    _, cmap = _grow(net, flow, "replicate")
    state, _ = _state(net, flow)
    snapshot = {k: {kk: np.copy(vv) for kk, vv in v.items()} for k, v in state.items()}
    map_optimizer_state(state, flow, cmap)
    for key, per in snapshot.items():
        assert set(state[key]) == set(per)
        for k, v in per.items():
            np.testing.assert_array_equal(state[key][k], v)


def test_errors():
    flow = ChannelFlow("w", consumers=(Consumer("v"),))
    cmap = ChannelMap((0, 1, 1), "replicate")
    with pytest.raises(
        ValueError, match=r"state\['w'\]\['m'\] has size 3 along axis 0, expected 2"
    ):
        map_optimizer_state({"w": {"m": np.ones((3, 4))}}, flow, cmap)
    with pytest.raises(ValueError, match=r"state\['v'\]\['m'\]"):
        map_optimizer_state({"v": {"m": np.ones((5, 3))}}, flow, cmap)
    with pytest.raises(ValueError, match="mode"):
        map_optimizer_state({}, flow, cmap, mode="keep")
    with pytest.raises(TypeError, match="channel_map"):
        map_optimizer_state({}, flow, (0, 1, 1))
    with pytest.raises(TypeError, match="flow"):
        map_optimizer_state({}, "w", cmap)
    with pytest.raises(TypeError, match=r"state\['w'\] must be a Mapping"):
        map_optimizer_state({"w": [np.ones((2, 2))]}, flow, cmap)
    with pytest.raises(TypeError, match=r"state\['w'\]\['m'\]"):
        map_optimizer_state({"w": {"m": [1.0, 2.0]}}, flow, cmap)
