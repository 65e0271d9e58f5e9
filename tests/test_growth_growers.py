"""The core growers (simcore.growth) on a host written here: a NumPy MLP, no framework.

``MLPHost`` implements :class:`simcore.growth.GrowthHost` for dense layers ``(out, in)`` with
tanh between them and a mean-squared-error loss: SSD's statistics by hand-written backprop,
gradients by central differences (float64), optimizer state (a momentum per parameter) carried
with the core's ``map_optimizer_state``. Checks: the budget, function preservation, SSD's
``lambda_min`` against the loss change of a real split, the typed per-method state, and that a
growth refused before writing leaves the host untouched.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from simcore.growth import (
    ChannelFlow,
    Consumer,
    FireflyCandidates,
    FireflyGrower,
    FireflySelection,
    FireflyState,
    GrowableLayer,
    GrowthHost,
    GrowthReport,
    RandomGrower,
    RandomState,
    SplittingStatistics,
    SSDGrower,
    SSDState,
    firefly_apply,
    firefly_candidates,
    growth_budget,
    map_optimizer_state,
)
from simcore.growth.growers import neuron_cost


def mse(outputs, targets):
    return np.asarray(np.mean((outputs - targets) ** 2))


class MLPHost:
    """A GrowthHost over a NumPy MLP; ``loss_fn`` must be :func:`mse` (backprop is by hand)."""

    def __init__(self, sizes=(5, 6, 4, 3), seed=0):
        rng = np.random.default_rng(seed)
        self.depth = len(sizes) - 1
        self.state = {}
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            self.state[f"fc{i}.weight"] = rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)
            self.state[f"fc{i}.bias"] = 0.3 * rng.standard_normal(fan_out)
        self.momentum = {k: {"momentum": rng.standard_normal(v.shape)}
                         for k, v in self.state.items()}
        self.applied = 0

    # the model -------------------------------------------------------------
    def forward(self, state, x, keep=False):
        h, seen = x, []
        for i in range(self.depth):
            z = h @ state[f"fc{i}.weight"].T + state[f"fc{i}.bias"]
            seen.append((h, z))
            h = np.tanh(z) if i < self.depth - 1 else z
        return (h, seen) if keep else h

    # the protocol ------------------------------------------------------------
    def layers(self):
        return [GrowableLayer(f"fc{i}", ChannelFlow(f"fc{i}.weight", bias=f"fc{i}.bias",
                                                    consumers=(Consumer(f"fc{i + 1}.weight"),)))
                for i in range(self.depth - 1)]

    def read_state(self):
        return dict(self.state)

    def parameter_count(self):
        return sum(v.size for v in self.state.values())

    def splitting_statistics(self, batches, loss_fn):
        assert loss_fn is mse
        captured = [[] for _ in range(self.depth - 1)]
        for x, t in batches:
            y, seen = self.forward(self.state, x, keep=True)
            grad = 2 * (y - t) / y.size  # dL/dz of the last layer
            for i in reversed(range(self.depth - 1)):
                dh = grad @ self.state[f"fc{i + 1}.weight"]  # dL/d tanh(z_i)
                h_in, z = seen[i]
                captured[i].append((h_in[:, None, :], dh[:, None, :], z[:, None, :]))
                grad = dh * (1 - np.tanh(z) ** 2)
        return [SplittingStatistics("tanh", None, tuple(c)) for c in captured]

    def forward_with(self, widened_state, channel_maps):
        return lambda state, x: self.forward(state, x)  # NumPy arrays carry their own shapes

    def value_and_grad(self, fn, variables, h=1e-6):
        values = [np.array(v, dtype=np.float64) for v in variables]
        grads = []
        for v in values:
            g = np.zeros_like(v)
            for index in np.ndindex(v.shape):
                old = v[index]
                v[index] = old + h
                up = float(fn(values))
                v[index] = old - h
                down = float(fn(values))
                v[index] = old
                g[index] = (up - down) / (2 * h)
            grads.append(g)
        return fn(values), grads

    def mean_over_replicas(self, x):
        return x

    def shared_seed(self, seed):
        return seed

    def apply(self, new_state, channel_maps):
        momentum = self.momentum
        for layer, maps in reversed(list(zip(self.layers(), channel_maps, strict=True))):
            if maps is None:
                continue
            for cmap in (maps if isinstance(maps, tuple) else (maps,)):
                momentum = map_optimizer_state(momentum, layer.flow, cmap)
        self.state, self.momentum = dict(new_state), momentum
        self.applied += 1


def _batches(sizes=(5, 6, 4, 3), count=2, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((8, sizes[0])), rng.standard_normal((8, sizes[-1])))
            for _ in range(count)]


GROWERS = {
    "random": (lambda: RandomGrower(seed=1), 1e-12),
    "ssd_exact": (lambda: SSDGrower("exact", eps=1e-3, seed=1), 1e-4),
    "ssd_fast": (lambda: SSDGrower("fast", eps=1e-3, seed=1, rayleigh_steps=100), 1e-4),
    "firefly": (lambda: FireflyGrower(new_per_layer=3, split_scale=1e-3, outgoing_scale=1e-4,
                                      train_candidates=False, seed=1), 2e-3),
    # RMSprop's first steps move every candidate variable by about lr / sqrt(1 - alpha).
    "firefly_trained": (lambda: FireflyGrower(new_per_layer=3, split_scale=1e-3,
                                              outgoing_scale=1e-4, seed=1), 2e-2),
}


def test_the_host_written_here_is_a_growth_host():
    assert isinstance(MLPHost(), GrowthHost)


@pytest.mark.parametrize("name", list(GROWERS))
def test_growth_adds_the_budget_and_keeps_the_function(name):
    make, tolerance = GROWERS[name]
    host = MLPHost()
    batches = _batches()
    x = batches[0][0]
    before = host.forward(host.state, x)
    params_before = host.parameter_count()
    report = make().grow(host, batches, mse, ratio=0.5)
    assert isinstance(report, GrowthReport)
    assert report.budget == growth_budget(6 + 4, 0.5) == report.total_added
    assert report.widths_before == {"fc0": 6, "fc1": 4}
    assert report.widths_after == {"fc0": host.state["fc0.weight"].shape[0],
                                   "fc1": host.state["fc1.weight"].shape[0]}
    assert host.state["fc1.weight"].shape[1] == report.widths_after["fc0"]
    assert (report.params_before, report.params_after) == (params_before,
                                                           host.parameter_count())
    assert set(report.scores) == {"fc0", "fc1"}
    assert all(s.dtype == np.float64 for s in report.scores.values())
    # the optimizer state followed the parameters
    assert {k: v["momentum"].shape for k, v in host.momentum.items()} == {
        k: v.shape for k, v in host.state.items()}
    gap = np.abs(host.forward(host.state, x) - before).max()
    assert gap <= tolerance * np.abs(before).max()


def test_random_growth_needs_no_data_and_keeps_old_momentum():
    host = MLPHost()
    old = {k: v["momentum"].copy() for k, v in host.momentum.items()}
    report = RandomGrower(seed=0).grow(host, None, None, ratio=0.3)
    assert report.total_added == growth_budget(10, 0.3)
    rows = host.momentum["fc0.weight"]["momentum"]
    np.testing.assert_array_equal(rows[:6], old["fc0.weight"])
    assert not rows[6:].any()  # fresh neurons start with zero momentum


def test_parameter_budget_counts_what_a_neuron_costs():
    host = MLPHost()
    report = RandomGrower(seed=0).grow(host, None, None, ratio=0.2, unit="parameters")
    # one more fc0 neuron: 5 inputs + bias + 4 consumer weights; fc1: 6 + 1 + 3
    per_neuron = (6 * 10 + 4 * 10) / 10
    assert report.budget == growth_budget(10, 0.2, unit="parameters",
                                          params_per_neuron=per_neuron,
                                          total_params=report.params_before)


def test_a_stand_in_consumer_grows_like_any_consumer_and_costs_nothing():
    params = {"w1": np.ones((4, 3)), "w2": np.ones((2, 4)), "w2@p": np.ones((5, 4))}
    plain = ChannelFlow("w1", consumers=(Consumer("w2"),))
    flow = ChannelFlow("w1", consumers=(Consumer("w2"), Consumer("w2@p", stand_in=True)))
    assert neuron_cost(flow, params) == neuron_cost(plain, params) == 3 + 2
    [candidates] = firefly_candidates(params, [flow], rng=0, new_per_layer=3)
    assert candidates.new_outgoing[1].shape == (3, 5)  # new neurons get columns there too
    picks = [FireflySelection(np.zeros(0, dtype=np.int64), np.asarray([1]))]
    grown, _ = firefly_apply(params, [flow], [candidates], picks)
    np.testing.assert_array_equal(grown["w2@p"][:, 4], candidates.new_outgoing[1][1])
    with pytest.raises(TypeError, match="stand_in must be a bool"):
        Consumer("w2", stand_in=1)


def test_ssd_lambda_min_predicts_the_loss_change_of_a_split():
    eps, sizes = 0.02, (4, 6, 3)
    host = MLPHost(sizes, seed=3)
    batches = _batches(sizes, seed=4)

    def loss():
        return np.mean([float(mse(host.forward(host.state, x), t)) for x, t in batches])

    before = loss()
    report = SSDGrower("exact", eps=eps).grow(host, batches, mse, ratio=1 / 6)
    assert report.added == {"fc0": 1}
    predicted = eps**2 / 2 * float(report.scores["fc0"].min())
    assert abs((loss() - before) - predicted) <= 0.02 * abs(predicted)


class _Kept:
    """Keeps the state each grower hands to plan()."""

    def plan(self, params, core_flows, picks, state, rng):
        self.kept = state
        return super().plan(params, core_flows, picks, state, rng)


@pytest.mark.parametrize("base, state_type, item_type", [
    (RandomGrower, RandomState, None),
    (SSDGrower, SSDState, np.ndarray),
    (FireflyGrower, FireflyState, FireflyCandidates),
])
def test_each_method_hands_a_typed_frozen_state_to_plan(base, state_type, item_type):
    grower = type("Kept", (_Kept, base), {})(**({"new_per_layer": 2, "train_candidates": False}
                                              if base is FireflyGrower else {}))
    grower.grow(MLPHost(), _batches(), mse, ratio=0.3)
    state = grower.kept
    assert type(state) is state_type and dataclasses.is_dataclass(state)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.anything = None
    if item_type is not None:
        assert len(state) == 2 and all(isinstance(item, item_type) for item in state)


def test_a_refused_growth_writes_nothing():
    host = MLPHost()
    state = dict(host.state)
    with pytest.raises(ValueError, match="Firefly candidates"):
        FireflyGrower(new_per_layer=1, split=False, train_candidates=False).grow(
            host, _batches(), mse, ratio=0.9)
    with pytest.raises(TypeError, match="loss_fn"):
        SSDGrower().grow(host, _batches(), None)
    with pytest.raises(ValueError, match="data_batches"):
        SSDGrower().grow(host, [], mse)
    with pytest.raises(ValueError, match="unit"):
        RandomGrower().grow(host, None, None, unit="bytes")
    assert host.applied == 0 and host.state == state


def test_a_loss_that_is_not_a_scalar_array_is_refused():
    with pytest.raises(TypeError, match="0-d"):
        FireflyGrower(new_per_layer=2, train_candidates=False).grow(
            MLPHost(), _batches(), lambda y, t: float(mse(y, t)))


def test_the_growers_import_without_any_framework():
    code = ("import sys\n"
            "for name in ('torch', 'jax', 'cupy'):\n"
            "    sys.modules[name] = None  # any import of it fails\n"
            "import simcore.growth as g\n"
            "print(g.RandomGrower.__name__, g.SSDGrower.__name__, g.FireflyGrower.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["RandomGrower", "SSDGrower", "FireflyGrower"]
