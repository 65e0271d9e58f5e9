"""Widening operators: function preservation on small networks, agreement with the loop oracle.

Every operator runs on every backend (``backend`` fixture, ``jax_jit`` included) on every growable
producer of tests/growth_nets.py; logits before and after growth are compared in float64 on the
fixed batch, in eval mode (the forward pass itself runs in NumPy on the grown arrays).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import growth_nets  # noqa: E402
from simcore.reference import growth as ref  # noqa: E402

from simcore.growth import (  # noqa: E402
    BatchNorm,
    ChannelFlow,
    ChannelMap,
    Consumer,
    add_neurons,
    replicate_neurons,
    split_neurons,
)
from simcore.testing import assert_close, get_backend  # noqa: E402

# On every backend: one producer per network, the one whose channels flow through the most
# entries (its own BatchNorm, a depthwise conv, a flatten consumer, a Flax layout). Every producer
# of every network runs on NumPy in test_every_producer_of_every_network_on_numpy.
CASES = [
    ("mlp", 0),
    ("mlp_flax", 0),
    ("conv_bn", 1),
    ("mobile_block", 0),
    ("flatten_head", 0),
    ("conv_flax_nhwc", 0),
]
CASE_IDS = [f"{name}-{i}" for name, i in CASES]
ALL_CASES = growth_nets.cases()


# Wrappers returning only the params dict, so that jax_jit can compile them (keywords are static).
def _add(params, *, flow, count, **kwargs):
    return add_neurons(params, flow, count, **kwargs)[0]


def _replicate(params, *, flow, parents):
    return replicate_neurons(params, flow, parents)[0]


def _split(params, directions, *, flow, parents, eps):
    return split_neurons(params, flow, parents, directions, eps=eps)[0]


def _setup(backend, name, index):
    net = growth_nets.build(name)
    flow = net.flows[index]
    params = growth_nets.on_backend(backend, net.params)
    n = flow.channels(net.params)
    return net, flow, params, n


def _logits(backend, net, params):
    # The operators run on the backend; the forward pass (not under test, and slow op by op on
    # eager JAX) runs in NumPy float64 on the grown arrays brought back to the host.
    return net.forward(np, growth_nets.to_host(backend, params), net.inputs)


def _row_width(net, flow):
    w = net.params[flow.producer]
    return w.size // w.shape[flow.out_axis]


def _directions(net, flow, count, seed=1):
    return np.random.default_rng(seed).normal(size=(count, _row_width(net, flow)))


# --- function preservation and agreement with the loop oracle ---------------------------------
# Each test grows once per backend and checks both: the logits (preservation) and every grown
# array against simcore.reference.growth (placement, division, BatchNorm, depthwise).


def _assert_params_match(backend, grown, expected, dtype="float64"):
    assert set(grown) == set(expected)
    for key, value in expected.items():
        assert_close(grown[key], value, backend=backend, dtype=dtype, err_msg=key)


def _fresh_blocks(flow, host, n, k):
    """The random blocks of the fresh channels, read with the oracle's own indexing."""
    return {
        name: [ref.channel_block(host[name], axis, c, spatial, last) for c in range(n, n + k)]
        for name, role, axis, spatial, last in ref.flow_entries(flow)
        if role in ("producer", "depthwise", "consumer")
    }


@pytest.mark.parametrize("outgoing", ["zero", "small"])
@pytest.mark.parametrize(("name", "index"), CASES, ids=CASE_IDS)
def test_add_neurons(backend, name, index, outgoing):
    net, flow, params, n = _setup(backend, name, index)
    k, scale = 3, 1e-2
    grown = backend.run(
        _add, params, flow=flow, count=k, rng=7, outgoing=outgoing, outgoing_scale=scale
    )
    assert flow.channels(grown) == n + k
    host = growth_nets.to_host(backend, grown)
    fresh = _fresh_blocks(flow, host, n, k)
    # the oracle rebuilds everything but the random blocks: old channels, bias 0, BN 1/0/0/1
    _assert_params_match(backend, grown, ref.add_neurons(net.params, flow, fresh))
    for entry_name, role, *_ in ref.flow_entries(flow):
        if role in ("producer", "depthwise"):  # fresh filters are never silent
            assert all(np.linalg.norm(b) > 0 for b in fresh[entry_name]), entry_name
        if role == "consumer":
            largest = max(np.max(np.abs(b)) for b in fresh[entry_name])
            assert largest == 0.0 if outgoing == "zero" else 0 < largest <= scale
    change = np.max(np.abs(_logits(backend, net, grown) - _logits(backend, net, params)))
    if outgoing == "zero":
        assert change <= 1e-12  # Dota 2 surgery: exact
    else:
        assert 0 < change < 10 * scale  # Firefly-style: O(scale)


@pytest.mark.parametrize(("name", "index"), CASES, ids=CASE_IDS)
def test_replicate_neurons(backend, name, index):
    net, flow, params, n = _setup(backend, name, index)
    parents = (1, n - 1, 1, 1)  # channel 1 ends up carried by four channels
    grown = backend.run(_replicate, params, flow=flow, parents=parents)
    assert flow.channels(grown) == n + 4
    _assert_params_match(backend, grown, ref.replicate_neurons(net.params, flow, list(parents)))
    before = _logits(backend, net, params)
    np.testing.assert_allclose(_logits(backend, net, grown), before, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "index"), CASES, ids=CASE_IDS)
def test_split_neurons(backend, name, index):
    net, flow, params, n = _setup(backend, name, index)
    directions = _directions(net, flow, 2)
    on_backend = backend.asarray(directions, "float64")
    parents = (n - 1, 0)
    before = _logits(backend, net, params)
    errors = []
    for eps in (1e-2, 5e-3):
        grown = backend.run(_split, params, on_backend, flow=flow, parents=parents, eps=eps)
        if not errors:
            expected = ref.split_neurons(net.params, flow, list(parents), directions, eps)
            _assert_params_match(backend, grown, expected)
        errors.append(np.max(np.abs(_logits(backend, net, grown) - before)))
    assert errors[0] > 1e-9  # the split really moved the neurons
    assert 3.5 < errors[0] / errors[1] < 4.5  # halving eps divides the error by ~4: O(eps^2)


@pytest.mark.parametrize(("name", "index"), ALL_CASES, ids=[f"{n}-{i}" for n, i in ALL_CASES])
def test_every_producer_of_every_network_on_numpy(name, index):
    numpy_backend = get_backend("numpy")
    for outgoing in ("zero", "small"):
        test_add_neurons(numpy_backend, name, index, outgoing)
    test_replicate_neurons(numpy_backend, name, index)
    test_split_neurons(numpy_backend, name, index)
    net = growth_nets.build(name)
    flow, n = net.flows[index], net.flows[index].channels(net.params)
    before = net.forward(np, net.params, net.inputs)
    # split at eps = 0 is an exact replicate
    exact, _ = split_neurons(net.params, flow, [0, n - 1], _directions(net, flow, 2), eps=0.0)
    np.testing.assert_allclose(net.forward(np, exact, net.inputs), before, rtol=0, atol=1e-12)
    # small outgoing columns: the change is linear in their scale (same seed, scaled columns)
    changes = []
    for scale in (1e-2, 5e-3):
        grown, _ = add_neurons(net.params, flow, 3, rng=7, outgoing="small", outgoing_scale=scale)
        changes.append(np.max(np.abs(net.forward(np, grown, net.inputs) - before)))
    assert 1.8 < changes[0] / changes[1] < 2.2


def test_depthwise_filters_and_their_norm_are_duplicated_not_halved():
    net = growth_nets.build("mobile_block")
    flow = net.flows[0]
    grown, cmap = replicate_neurons(net.params, flow, [2])
    assert cmap.sources == (0, 1, 2, 3, 4, 5, 2)
    for key in ("dw.weight", "dw.bias", "bn_dw.weight", "bn_dw.bias", "bn_dw.mean", "bn_dw.var"):
        np.testing.assert_array_equal(grown[key][6], net.params[key][2])
        np.testing.assert_array_equal(grown[key][:6], net.params[key])
    # halving happens in the consumer only
    np.testing.assert_allclose(grown["pw2.weight"][:, 6], net.params["pw2.weight"][:, 2] / 2)
    np.testing.assert_allclose(grown["pw2.weight"][:, 2], net.params["pw2.weight"][:, 2] / 2)
    assert grown["dw.weight"].shape == (7, 1, 3, 3)  # groups = 7 channels for the adapter


def test_flatten_consumer_moves_all_spatial_columns_of_a_channel():
    net = growth_nets.build("flatten_head")
    flow = net.flows[0]
    grown, _ = replicate_neurons(net.params, flow, [1])
    fc, old = grown["fc1.weight"], net.params["fc1.weight"]
    assert fc.shape == (6, 20)
    np.testing.assert_allclose(fc[:, 16:20], old[:, 4:8] / 2)  # channel 1 owns columns 4..7
    np.testing.assert_allclose(fc[:, 4:8], old[:, 4:8] / 2)
    np.testing.assert_array_equal(fc[:, 8:16], old[:, 8:16])


# --- initialisation of fresh neurons -----------------------------------------------------------


def test_he_rows_have_the_kaiming_standard_deviation():
    params = {"w": np.ones((2, 50)), "v": np.ones((3, 2))}
    flow = ChannelFlow("w", consumers=(Consumer("v"),))
    grown, _ = add_neurons(params, flow, 4000, rng=0)
    fresh = grown["w"][2:]
    assert abs(fresh.std() / np.sqrt(2 / 50) - 1) < 0.02
    assert abs(fresh.mean()) < 0.01


def test_match_norm_rows_have_the_mean_norm_of_existing_rows(backend):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 4, 3, 3)) * np.arange(1, 6)[:, None, None, None]
    params = growth_nets.on_backend(backend, {"w": w, "v": rng.normal(size=(2, 5, 1, 1))})
    flow = ChannelFlow("w", consumers=(Consumer("v"),))
    grown = growth_nets.to_host(
        backend, backend.run(_add, params, flow=flow, count=6, rng=1, incoming="match_norm")
    )
    norms = np.linalg.norm(grown["w"][5:].reshape(6, -1), axis=1)
    np.testing.assert_allclose(norms, np.linalg.norm(w.reshape(5, -1), axis=1).mean(), rtol=1e-12)


def test_fresh_batchnorm_and_bias_values():
    net = growth_nets.build("conv_bn")
    grown, cmap = add_neurons(net.params, net.flows[1], 2, rng=3)
    assert cmap.fresh == (5, 6)
    np.testing.assert_array_equal(grown["conv2.bias"][5:], 0.0)
    np.testing.assert_array_equal(grown["bn2.weight"][5:], 1.0)
    np.testing.assert_array_equal(grown["bn2.bias"][5:], 0.0)
    np.testing.assert_array_equal(grown["bn2.mean"][5:], 0.0)
    np.testing.assert_array_equal(grown["bn2.var"][5:], 1.0)


def test_seeded_draws_are_reproducible_and_backend_independent(backend):
    net = growth_nets.build("mobile_block")
    flow = net.flows[0]
    first, _ = add_neurons(net.params, flow, 3, rng=5, outgoing="small")
    again, _ = add_neurons(net.params, flow, 3, rng=np.random.default_rng(5), outgoing="small")
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other, _ = add_neurons(net.params, flow, 3, rng=6, outgoing="small")
    assert not np.array_equal(first["pw1.weight"], other["pw1.weight"])
    on_backend = backend.run(
        _add,
        growth_nets.on_backend(backend, net.params),
        flow=flow,
        count=3,
        rng=5,
        outgoing="small",
    )
    _assert_params_match(backend, on_backend, first)


def test_given_incoming_and_outgoing_blocks_are_placed_exactly(backend):
    net = growth_nets.build("flatten_head")
    flow = net.flows[0]  # conv (4, 3, 3, 3) -> fc1 (6, 16), spatial 4
    rng = np.random.default_rng(2)
    incoming = rng.normal(size=(2, 3, 3, 3))
    outgoing = rng.normal(size=(2, 4 * 6))  # per channel: (spatial, out) flattened
    params = growth_nets.on_backend(backend, net.params)
    grown, _ = add_neurons(
        params,
        flow,
        2,
        rng=0,
        incoming=backend.asarray(incoming),
        outgoing=[backend.asarray(outgoing)],
    )
    host = growth_nets.to_host(backend, grown)
    np.testing.assert_array_equal(host["conv.weight"][4:], incoming)
    expected = outgoing.reshape(2, 4, 6)
    for c in range(2):
        np.testing.assert_array_equal(
            ref.channel_block(host["fc1.weight"], 1, 4 + c, 4), expected[c]
        )


def test_split_accepts_directions_in_the_per_neuron_shape():
    net = growth_nets.build("conv_flax_nhwc")
    flow = net.flows[0]  # HWIO producer (3, 3, 3, 4): per-neuron shape (3, 3, 3)
    directions = np.random.default_rng(4).normal(size=(2, 3, 3, 3))
    grown, _ = split_neurons(net.params, flow, [0, 3], directions, eps=0.1)
    flat, _ = split_neurons(net.params, flow, [0, 3], directions.reshape(2, -1), eps=0.1)
    np.testing.assert_array_equal(grown["Conv_0/kernel"], flat["Conv_0/kernel"])
    np.testing.assert_allclose(
        grown["Conv_0/kernel"][..., 4], net.params["Conv_0/kernel"][..., 0] - 0.1 * directions[0]
    )


# --- purity, dtypes ---------------------------------------------------------------------------


def test_inputs_are_not_mutated_and_untouched_entries_pass_through():
    net = growth_nets.build("conv_bn")
    snapshot = {k: v.copy() for k, v in net.params.items()}
    flow = net.flows[0]
    for grown in (
        add_neurons(net.params, flow, 2, rng=0)[0],
        replicate_neurons(net.params, flow, [0])[0],
        split_neurons(net.params, flow, [0], np.ones((1, 27)), eps=0.1)[0],
    ):
        for key in net.params:
            np.testing.assert_array_equal(net.params[key], snapshot[key])
            if key not in flow.names():
                assert grown[key] is net.params[key]
            else:
                assert grown[key] is not net.params[key]
        assert grown is not net.params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_is_kept(backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} is not tested in {dtype}")
    net = growth_nets.build("mlp")
    flow = net.flows[0]
    params = growth_nets.on_backend(backend, net.params, dtype)
    replicated = backend.run(_replicate, params, flow=flow, parents=(0, 0))
    for grown in (
        backend.run(
            _add, params, flow=flow, count=2, rng=0, incoming="match_norm", outgoing="small"
        ),
        replicated,
        backend.run(
            _split,
            params,
            backend.asarray(np.ones((1, 5)), dtype),
            flow=flow,
            parents=(1,),
            eps=0.1,
        ),
    ):
        for key in flow.names():
            assert backend.dtype_name(grown[key].dtype) == dtype, key
    expected = ref.replicate_neurons(net.params, flow, [0, 0])
    # The reference is float64 on the exact input; the check is against the rounding of
    # the input and of the halved columns in this dtype, so bf16 needs a looser bound.
    loose = {"float32": 1e-6, "bfloat16": 2e-2}[dtype]
    for key in flow.names():
        assert_close(
            replicated[key], expected[key], backend=backend, dtype=dtype, rtol=loose, atol=loose
        )


def test_empty_growth_returns_the_same_arrays():
    net = growth_nets.build("mlp")
    flow = net.flows[0]
    grown, cmap = add_neurons(net.params, flow, 0)
    assert cmap.sources == tuple(range(8)) and all(grown[k] is net.params[k] for k in net.params)
    grown, cmap = replicate_neurons(net.params, flow, [])
    assert cmap.new_channels == 8


# --- ChannelMap and bad inputs ---------------------------------------------------------------


def test_channel_map_properties_and_validation():
    cmap = ChannelMap((0, 1, 2, 0, 0), "replicate")
    assert cmap.old_channels == 3 and cmap.new_channels == 5
    assert cmap.copies == ((3, 0), (4, 0)) and cmap.fresh == ()
    assert cmap.multiplicity().tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match="kind"):
        ChannelMap((0, 1), "grow")
    with pytest.raises(ValueError, match="fresh"):
        ChannelMap((0, 1, 0), "add")
    with pytest.raises(ValueError, match="copies"):
        ChannelMap((0, 1, -1), "split")
    with pytest.raises(ValueError, match="at most once"):
        ChannelMap((0, 1, 0, 0), "split")
    with pytest.raises(ValueError, match="old channel"):
        ChannelMap((0, 1, 5), "replicate")


def _mlp_flow():
    net = growth_nets.build("mlp")
    return net.params, net.flows[0]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda p, f: add_neurons(p, f, -1, rng=0), ValueError, "count must be >= 0"),
        (lambda p, f: add_neurons(p, f, True, rng=0), TypeError, "count"),
        (lambda p, f: add_neurons(p, f, 2.0, rng=0), TypeError, "count"),
        (lambda p, f: add_neurons(p, f, 2), ValueError, "rng"),
        (lambda p, f: add_neurons(p, f, 2, rng="seed"), TypeError, "rng"),
        (lambda p, f: add_neurons(p, f, 2, rng=-3), ValueError, "seed"),
        (lambda p, f: add_neurons(p, f, 2, rng=0, incoming="xavier"), ValueError, "incoming"),
        (lambda p, f: add_neurons(p, f, 2, rng=0, outgoing="big"), ValueError, "outgoing"),
        (
            lambda p, f: add_neurons(p, f, 2, rng=0, outgoing=[]),
            ValueError,
            "one array per consumer",
        ),
        (
            lambda p, f: add_neurons(p, f, 2, rng=0, outgoing_scale=-1.0),
            ValueError,
            "outgoing_scale",
        ),
        (
            lambda p, f: add_neurons(p, f, 2, incoming=np.ones((3, 5))),
            ValueError,
            r"incoming must have shape \(2, 5\)",
        ),
        (  # right size, wrong layout: an OIHW-ordered block for another per-channel shape
            lambda p, f: add_neurons(p, f, 2, incoming=np.ones((2, 1, 5))),
            ValueError,
            r"incoming must have shape \(2, 5\)",
        ),
        (lambda p, f: replicate_neurons(p, f, [8]), ValueError, r"parents\[0\]=8 is out of range"),
        (lambda p, f: replicate_neurons(p, f, [0, -1]), ValueError, r"parents\[1\]=-1"),
        (lambda p, f: replicate_neurons(p, f, [0.5]), TypeError, "parents"),
        (lambda p, f: replicate_neurons(p, f, np.array([[0]])), ValueError, "one-dimensional"),
        (lambda p, f: split_neurons(p, f, [1, 1], np.ones((2, 5))), ValueError, "distinct"),
        (lambda p, f: split_neurons(p, f, [1], np.ones((1, 4))), ValueError, "directions"),
        (lambda p, f: split_neurons(p, f, [1], np.ones((2, 5))), ValueError, "directions"),
        (lambda p, f: split_neurons(p, f, [1], np.ones((1, 5)), eps=-0.1), ValueError, "eps"),
        (
            lambda p, f: split_neurons(p, f, [1], np.ones((1, 5)), eps=float("nan")),
            ValueError,
            "eps",
        ),
        (lambda p, f: split_neurons(p, f, [1], [[1.0] * 5]), TypeError, "directions"),
        (
            lambda p, f: replicate_neurons(list(p.items()), f, [0]),
            TypeError,
            "params must be a Mapping",
        ),
        (
            lambda p, f: replicate_neurons(p, "fc1.weight", [0]),
            TypeError,
            "flow must be a ChannelFlow",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    params, flow = _mlp_flow()
    with pytest.raises(error, match=match):
        call(params, flow)


def test_mismatched_producer_and_consumer_is_an_error_for_every_operator():
    params = {"w1": np.ones((4, 3)), "w2": np.ones((2, 5)), "g": np.ones(4)}
    flow = ChannelFlow("w1", consumers=(Consumer("w2"),))
    for call in (
        lambda: add_neurons(params, flow, 1, rng=0),
        lambda: replicate_neurons(params, flow, [0]),
        lambda: split_neurons(params, flow, [0], np.ones((1, 3))),
    ):
        with pytest.raises(ValueError, match="'w2'"):
            call()
    bn_flow = ChannelFlow("w1", norm=BatchNorm(scale="g", shift="missing"))
    with pytest.raises(ValueError, match="'missing'"):
        replicate_neurons(params, bn_flow, [0])


def test_directions_from_another_library_are_rejected(backend):
    if backend.name == "numpy":
        pytest.skip("needs a second library")
    params, flow = _mlp_flow()
    with pytest.raises(TypeError, match="directions"):
        split_neurons(growth_nets.on_backend(backend, params), flow, [0], np.ones((1, 5)))


def test_a_split_copies_a_gate_member_exactly_and_keeps_the_gated_product():
    """``x * sigmoid(g)`` with ``g``'s producer a gate member: its rows are never perturbed, so
    the consumer reads ``mean(x+, x-) * g``, the old product to O(eps^2)."""
    from simcore.growth.flow import Member

    rng = np.random.default_rng(0)
    params = {"wx": rng.normal(size=(3, 4)), "wg": rng.normal(size=(3, 2)),
              "out": rng.normal(size=(2, 3))}
    flow = ChannelFlow("wx", consumers=(Consumer("out"),), members=(Member("wg", gate=True),))
    directions = [rng.normal(size=(2, 4)), rng.normal(size=(2, 2))]
    grown, cmap = split_neurons(params, flow, [0, 2], directions, eps=1e-3)
    np.testing.assert_array_equal(grown["wg"], params["wg"][list(cmap.sources)])
    assert not np.array_equal(grown["wx"][:3], params["wx"])
    x, s = rng.normal(size=(4, 5)), rng.normal(size=(2, 5))

    def f(p):
        return p["out"] @ (np.tanh(p["wx"] @ x) / (1 + np.exp(-(p["wg"] @ s))))

    assert np.abs(f(grown) - f(params)).max() < 1e-5
    with pytest.raises(TypeError, match="Member.gate must be a bool"):
        Member("wg", gate=1)


def test_a_member_that_reads_its_own_group_grows_rows_then_columns():
    """``s = Wa x; out = head tanh(s + Wp tanh(s))``: Wp adds to the stream it reads, so it
    is a member and a consumer of one flow; every operator keeps the function and the
    optimizer state follows both of its axes."""
    from simcore.growth import map_optimizer_state
    from simcore.growth.flow import Member

    rng = np.random.default_rng(1)
    params = {"wa": rng.normal(size=(3, 4)), "wp": rng.normal(size=(3, 3)) / 2,
              "head": rng.normal(size=(2, 3))}
    flow = ChannelFlow("wa", consumers=(Consumer("wp"), Consumer("head")),
                       members=(Member("wp"),))
    x = rng.normal(size=(4, 5))

    def f(p):
        s = p["wa"] @ x
        return p["head"] @ np.tanh(s + p["wp"] @ np.tanh(s))

    grown, _ = add_neurons(params, flow, 2, rng=0)
    assert grown["wp"].shape == (5, 5) and grown["wp"][3:, :3].any()  # fresh rows: random
    np.testing.assert_array_equal(grown["wp"][:3, 3:], 0.0)  # old rows read new channels 0
    np.testing.assert_allclose(f(grown), f(params), atol=1e-12)
    grown, _ = replicate_neurons(params, flow, [0, 2])
    np.testing.assert_allclose(f(grown), f(params), atol=1e-12)
    directions = [rng.normal(size=(2, 4)), rng.normal(size=(2, 3))]
    grown, cmap = split_neurons(params, flow, [0, 2], directions, eps=1e-4)
    assert grown["wp"].shape == (5, 5)
    assert np.abs(f(grown) - f(params)).max() < 1e-6
    state = {"wp": {"momentum": np.arange(9.0).reshape(3, 3)}}
    moved = map_optimizer_state(state, flow, cmap)["wp"]["momentum"]
    np.testing.assert_array_equal(moved, state["wp"]["momentum"][np.ix_(cmap.sources,
                                                                         cmap.sources)])
