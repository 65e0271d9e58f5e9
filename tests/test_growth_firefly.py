"""Firefly: candidates, the exact-k global selection, application and closed-form gate scores.

Oracles: ``simcore.reference.firefly`` (selection as a plain sort), finite differences of
hand-written losses (gate gradients), and function preservation on the small networks of
``tests/growth_nets.py`` (splits to O(delta^2), new neurons to O(outgoing scale)).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np
import pytest
from simcore.reference import firefly as ref

from simcore.growth import (
    FireflySelection,
    candidate_weights,
    firefly_apply,
    firefly_candidates,
    firefly_select,
    new_neuron_gate_scores,
    split_gate_scores,
    splitting_matrices,
)
from simcore.testing import assert_close

_spec = importlib.util.spec_from_file_location(
    "growth_nets", pathlib.Path(__file__).with_name("growth_nets.py")
)
growth_nets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(growth_nets)


def _rows(a, axis):
    return np.moveaxis(np.asarray(a), axis, 0).reshape(a.shape[axis], -1)


# --- candidates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("net_name", sorted(growth_nets.NETS))
def test_candidate_shapes_and_layouts(net_name):
    net = growth_nets.build(net_name)
    cands = firefly_candidates(net.params, net.flows, rng=0, new_per_layer=7)
    assert len(cands) == len(net.flows)
    for flow, cand in zip(net.flows, cands, strict=True):
        w = net.params[flow.producer]
        rows = _rows(w, flow.out_axis)
        assert cand.split_directions.shape == rows.shape
        assert cand.new_incoming.shape == (7, rows.shape[1])
        assert cand.new_count == 7
        assert len(cand.new_outgoing) == len(flow.consumers)
        layout = candidate_weights(net.params, flow, cand)
        assert layout["split"].shape == w.shape
        np.testing.assert_array_equal(_rows(layout["split"], flow.out_axis), cand.split_directions)
        grown_shape = list(w.shape)
        grown_shape[flow.out_axis] = 7
        assert layout["incoming"].shape == tuple(grown_shape)
        for consumer, cols, full in zip(flow.consumers, cand.new_outgoing, layout["outgoing"],
                                        strict=True):
            shape = list(net.params[consumer.weight].shape)
            shape[consumer.in_axis] = 7 * consumer.spatial
            assert full.shape == tuple(shape)
            assert cols.shape[0] == 7 and cols.size == full.size


def test_candidates_follow_reference_distributions_and_seed():
    net = growth_nets.build("conv_bn")
    # K = 70, the reference's value
    a = firefly_candidates(net.params, net.flows, rng=3, scales="absolute")
    b = firefly_candidates(net.params, net.flows, rng=np.random.default_rng(3), scales="absolute")
    for ca, cb in zip(a, b, strict=True):
        np.testing.assert_array_equal(ca.split_directions, cb.split_directions)
        np.testing.assert_array_equal(ca.new_incoming, cb.new_incoming)
        np.testing.assert_array_equal(ca.new_outgoing[0], cb.new_outgoing[0])
    c = firefly_candidates(net.params, net.flows, rng=4, scales="absolute")
    assert not np.array_equal(a[0].new_incoming, c[0].new_incoming)
    incoming = np.concatenate([x.new_incoming.ravel() for x in a])
    assert a[0].new_count == 70
    assert abs(incoming.std() - 0.1) < 0.01 and abs(incoming.mean()) < 0.01
    split = np.concatenate([x.split_directions.ravel() for x in a])
    assert np.abs(split).max() <= 0.1 and np.abs(split).max() > 0.09
    outgoing = np.concatenate([x.new_outgoing[0].ravel() for x in a])
    assert np.abs(outgoing).max() <= 0.01 and np.abs(outgoing).max() > 0.009
    assert firefly_candidates(net.params, net.flows, rng=0, split=False)[0].split_directions is None


def test_candidates_same_values_on_every_backend(backend):
    net = growth_nets.build("mlp_flax")
    want = firefly_candidates(net.params, net.flows, rng=5, new_per_layer=3)
    params = {k: backend.asarray(v) for k, v in net.params.items()}
    got = firefly_candidates(params, net.flows, rng=5, new_per_layer=3)
    for g, w in zip(got, want, strict=True):
        assert_close(g.split_directions, w.split_directions, backend=backend, rtol=0, atol=0)
        assert_close(g.new_incoming, w.new_incoming, backend=backend, rtol=0, atol=0)
        assert_close(g.new_outgoing[0], w.new_outgoing[0], backend=backend, rtol=0, atol=0)


# --- selection ------------------------------------------------------------------------------------


def test_select_exactly_k_with_ties_matches_plain_sort():
    split = [np.asarray([-1.0, 0.0, -1.0]), np.asarray([-2.0, -1.0])]
    new = [np.asarray([-1.0, -1.0, 5.0, -3.0]), np.asarray([-1.0])]
    for k in range(0, 11):
        got = firefly_select(split, new, k)
        want = ref.firefly_select(split, new, k)
        assert sum(s.count for s in got) == k
        for g, (ws, wn) in zip(got, want, strict=True):
            assert g.split.tolist() == ws.tolist() and g.new.tolist() == wn.tolist()
    # the reference code's rule keeps every tie with the k-th score: more than k
    combined = [np.concatenate([s, a]) for s, a in zip(split, new, strict=True)]
    assert sum(p.size for p in ref.threshold_rule_of_reference_code(combined, 3)) > 3
    got = firefly_select(split, new, 10, only_negative=True)
    assert sum(s.count for s in got) == 8
    got = firefly_select([None, split[1]], new, 2)
    assert got[0].split.size == 0 and got[0].new.tolist() == [3]


def test_select_groups_and_caps():
    split = [np.asarray([-5.0, -4.0]), np.asarray([-1.0, -0.5])]
    new = [np.asarray([-3.0]), np.asarray([-2.0])]
    got = firefly_select(split, new, [1, 2], groups=[[0], [1]])
    assert [s.count for s in got] == [1, 2]
    got = firefly_select(split, new, 3, caps=[1, None])
    assert [s.count for s in got] == [1, 2]


# --- application ----------------------------------------------------------------------------------


def _change(net, cands, selection, params=None):
    params = net.params if params is None else params
    grown, maps = firefly_apply(params, net.flows, cands, selection)
    before = net.forward(np, params, net.inputs)
    return np.abs(net.forward(np, grown, net.inputs) - before).max(), grown, maps


@pytest.mark.parametrize("net_name", sorted(growth_nets.NETS))
def test_apply_preserves_function_to_the_candidates_order(net_name):
    net = growth_nets.build(net_name)
    splits = [FireflySelection(np.asarray([0, 2]), np.asarray([], dtype=np.int64))
              for _ in net.flows]
    news = [FireflySelection(np.asarray([], dtype=np.int64), np.asarray([1, 3]))
            for _ in net.flows]
    split_err, new_err = [], []
    for scale in (1.0, 0.5):
        cands = firefly_candidates(net.params, net.flows, rng=1, new_per_layer=5,
                                   split_scale=0.1 * scale, outgoing_scale=0.01 * scale)
        split_err.append(_change(net, cands, splits)[0])
        new_err.append(_change(net, cands, news)[0])
    assert 3.0 < split_err[0] / split_err[1] < 5.0  # splits: O(delta^2)
    assert 1.7 < new_err[0] / new_err[1] < 2.3  # new neurons: O(outgoing scale)
    assert 0 < new_err[0] < 0.05


def test_apply_places_trained_values_in_reference_order():
    net = growth_nets.build("mlp")
    cands = firefly_candidates(net.params, net.flows, rng=2, new_per_layer=4)
    sel = [FireflySelection(np.asarray([1, 5]), np.asarray([0, 3])),
           FireflySelection(np.asarray([2]), np.asarray([1]))]
    _, grown, maps = _change(net, cands, sel)
    w1, w2, w3 = (grown[f"fc{i}.weight"] for i in (1, 2, 3))
    p = net.params
    d1 = cands[0].split_directions
    # fc1: old rows (parents moved by +delta), split copies (-delta), new rows (trained incoming)
    assert w1.shape == (12, 5)
    np.testing.assert_allclose(w1[[1, 5]], p["fc1.weight"][[1, 5]] + d1[[1, 5]])
    np.testing.assert_allclose(w1[[8, 9]], p["fc1.weight"][[1, 5]] - d1[[1, 5]])
    np.testing.assert_allclose(w1[10:], cands[0].new_incoming[[0, 3]])
    assert maps[0][0].sources == tuple(range(8)) + (1, 5)
    assert maps[0][1].sources == tuple(range(10)) + (-1, -1)
    assert grown["fc1.bias"][10:].tolist() == [0.0, 0.0]
    # fc2 (consumer of fc1 and producer of its own growth): 6 old + 1 copy + 1 new rows
    assert w2.shape == (8, 12)
    out1 = cands[0].new_outgoing[0]  # (K, 6): columns for fc2's old rows
    np.testing.assert_allclose(w2[:6, 10:], out1[[0, 3]].T)
    np.testing.assert_allclose(w2[6, 10:], out1[[0, 3], 2])  # split copy of row 2 reads like it
    np.testing.assert_array_equal(w2[7, 10:], 0.0)  # new-to-new links start at zero
    halved = cands[1].new_incoming[1].copy()
    halved[[1, 5]] /= 2  # fc1's split halves what every fc2 row reads from the parents
    np.testing.assert_allclose(w2[7, :8], halved)
    np.testing.assert_allclose(w2[7, 8:10], halved[[1, 5]])
    # halved columns for fc1's split neurons, in every fc2 row
    np.testing.assert_allclose(w2[:, 8], w2[:, 1])
    np.testing.assert_allclose(w3[:, 6], w3[:, 2])
    np.testing.assert_allclose(w3[:, 7], cands[1].new_outgoing[0][1])


def test_apply_new_depthwise_channels_are_not_silent():
    net = growth_nets.build("mobile_block")
    cands = firefly_candidates(net.params, net.flows, rng=0, new_per_layer=3)
    sel = [FireflySelection(np.asarray([], dtype=np.int64), np.asarray([0, 1, 2])),
           FireflySelection(np.asarray([], dtype=np.int64), np.asarray([], dtype=np.int64))]
    grown, _ = firefly_apply(net.params, net.flows, cands, sel)
    fresh = grown["dw.weight"][6:]
    assert fresh.shape == (3, 1, 3, 3) and (np.abs(fresh).reshape(3, -1).sum(axis=1) > 0).all()


def test_apply_on_every_backend_matches_numpy(backend):
    net = growth_nets.build("mlp")
    sel = [FireflySelection(np.asarray([0]), np.asarray([1])),
           FireflySelection(np.asarray([3]), np.asarray([0, 2]))]
    cands = firefly_candidates(net.params, net.flows, rng=4, new_per_layer=3)
    want, _ = firefly_apply(net.params, net.flows, cands, sel)
    params = {k: backend.asarray(v) for k, v in net.params.items()}
    cands_b = firefly_candidates(params, net.flows, rng=4, new_per_layer=3)
    got, _ = firefly_apply(params, net.flows, cands_b, sel)
    for name in want:
        assert_close(got[name], want[name], backend=backend, rtol=1e-12, err_msg=name)


# --- closed-form gate gradients ------------------------------------------------------------------


def _mlp_pieces(p, x):
    z1 = x @ p["fc1.weight"].T + p["fc1.bias"]
    h1 = z1 / (1 + np.exp(-z1))
    return z1, h1


def _mlp_tail(p, h1, t):
    h2 = np.tanh(h1 @ p["fc2.weight"].T + p["fc2.bias"])
    y = h2 @ p["fc3.weight"].T + p["fc3.bias"]
    return 0.5 * np.mean(np.sum((y - t) ** 2, axis=1)), h2, y


def test_split_gate_scores_are_the_leading_order_gate_gradient():
    net = growth_nets.build("mlp")
    p, x = net.params, net.inputs
    t = np.random.default_rng(1).normal(size=(x.shape[0], 3))
    z1, h1 = _mlp_pieces(p, x)
    _, h2, y = _mlp_tail(p, h1, t)
    g1 = ((((y - t) / x.shape[0]) @ p["fc3.weight"]) * (1 - h2**2)) @ p["fc2.weight"]
    delta = np.random.default_rng(2).uniform(-0.05, 0.05, size=(8, 5))
    scores = split_gate_scores(x, g1, z1, delta, activation="swish")
    s = splitting_matrices(x, g1, z1, activation="swish")
    np.testing.assert_allclose(scores, np.einsum("nd,nde,ne->n", delta, s, delta), rtol=1e-12)

    def loss(i, gate):  # only neuron i split, +/- gate * delta_i, outgoing halved
        tt = gate * (x @ delta[i])
        h = h1.copy()
        h[:, i] = 0.5 * (z1[:, i] + tt) / (1 + np.exp(-(z1[:, i] + tt))) + \
            0.5 * (z1[:, i] - tt) / (1 + np.exp(-(z1[:, i] - tt)))
        return _mlp_tail(p, h, t)[0]

    h = 1e-4
    fd = np.asarray([(loss(i, 1 + h) - loss(i, 1 - h)) / (2 * h) for i in range(8)])
    np.testing.assert_allclose(scores, fd, rtol=2e-2, atol=1e-9)


def test_new_neuron_gate_scores_equal_finite_differences(backend):
    net = growth_nets.build("mlp")
    p, x = net.params, net.inputs
    t = np.random.default_rng(1).normal(size=(x.shape[0], 3))
    _, h1 = _mlp_pieces(p, x)
    rng = np.random.default_rng(3)
    u = rng.normal(0, 0.1, (4, 8))  # incoming rows of 4 new fc2 neurons
    a = rng.uniform(-0.01, 0.01, (4, 3))  # what fc3's 3 outputs read from each

    def loss(gates):
        _, h2, y = _mlp_tail(p, h1, t)
        y = y + np.tanh((h1 @ u.T) * gates) @ a
        return 0.5 * np.mean(np.sum((y - t) ** 2, axis=1)), y

    _, y1 = loss(np.ones(4))
    dy = (y1 - t) / x.shape[0]  # consumer backprop with the candidates in place (gate 1)
    hstep = 1e-5
    fd = []
    for j in range(4):
        e = np.zeros(4)
        e[j] = hstep
        fd.append((loss(1 + e)[0] - loss(1 - e)[0]) / (2 * hstep))

    def fn(h1b, ub, ab, dyb):
        return new_neuron_gate_scores(h1b, ub, ab, dyb, activation="tanh")

    got = backend.run(fn, *(backend.asarray(v) for v in (h1, u, a, dy)))
    assert_close(got, np.asarray(fd), backend=backend, rtol=1e-6, atol=1e-12)


# --- bad inputs ------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    net = growth_nets.build("mlp")
    cands = firefly_candidates(net.params, net.flows, rng=0, new_per_layer=2)
    empty = np.asarray([], dtype=np.int64)
    sel = [FireflySelection(empty, empty)] * 2
    with pytest.raises(ValueError, match="k"):
        firefly_select([np.zeros(2)], [np.zeros(2)], -1)
    with pytest.raises(ValueError, match="same layers"):
        firefly_select([np.zeros(2)], [np.zeros(2), np.zeros(1)], 1)
    with pytest.raises(ValueError, match="NaN"):
        firefly_select([np.asarray([np.nan])], [np.zeros(1)], 1)
    with pytest.raises(ValueError, match=r"new must lie in \[0, 2\)"):
        firefly_apply(net.params, net.flows, cands,
                      [FireflySelection(empty, np.asarray([2])), sel[1]])
    with pytest.raises(ValueError, match="one FireflySelection per flow"):
        firefly_apply(net.params, net.flows, cands, sel[:1])
    # Any order of the flows gives the same growth (residual groups need it: GrowthChain).
    both = [FireflySelection(np.asarray([0]), np.asarray([1]))] * 2
    forward, _ = firefly_apply(net.params, net.flows, cands, both)
    backward, _ = firefly_apply(net.params, net.flows[::-1], cands[::-1], both)
    for name in forward:
        np.testing.assert_allclose(backward[name], forward[name], err_msg=name)
    no_split = dataclasses.replace(cands[0], split_directions=None)
    with pytest.raises(ValueError, match="picks splits"):
        firefly_apply(net.params, net.flows, [no_split, cands[1]],
                      [FireflySelection(np.asarray([0]), empty), sel[1]])
    with pytest.raises(ValueError, match="new_per_layer"):
        firefly_candidates(net.params, net.flows, rng=0, new_per_layer=-1)
    with pytest.raises(TypeError, match="flows must be a sequence"):
        firefly_candidates(net.params, net.flows[0], rng=0)
    with pytest.raises(ValueError, match=r"outgoing must have shape \(2, 3\)"):
        new_neuron_gate_scores(np.ones((4, 8)), np.ones((2, 8)), np.ones((2, 4)),
                               np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"directions must have shape \(3, 4\)"):
        split_gate_scores(np.ones((2, 4)), np.ones((2, 3)), np.ones((2, 3)), np.ones((3, 5)))


def test_a_new_neuron_gets_the_depthwise_filter_it_was_scored_with():
    """Picking only candidate 2 installs candidate 2's own depthwise filter (the one a
    gated forward pass scored), not whichever filter a fresh draw happens to give."""
    net = growth_nets.build("mobile_block")
    [flow] = [f for f in net.flows if f.depthwise]
    [cands] = firefly_candidates(net.params, [flow], rng=0, new_per_layer=3)
    [filters] = cands.new_depthwise
    assert filters.shape[0] == 3 and np.all(np.any(filters != 0, axis=1))  # never silent
    empty = np.zeros(0, dtype=np.int64)
    grown, [(_, add_map)] = firefly_apply(net.params, [flow], [cands],
                                          [FireflySelection(empty, np.asarray([2]))])
    dw = flow.depthwise[0]
    new_channel = add_map.sources.index(-1)
    installed = np.take(grown[dw.weight], new_channel, axis=dw.channel_axis).reshape(-1)
    np.testing.assert_array_equal(installed, filters[2])
