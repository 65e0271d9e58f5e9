"""Growth of JAX models (Flax linen, Flax nnx, Equinox) with the core growers.

Models are written the way each library's documentation writes them, not with project helpers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")

from simcore.adapters.jax import JaxGrowth, discover_flows, grow, linen_flow  # noqa: E402

from simcore.growth import GrowthError, RandomGrower  # noqa: E402


class LinenCNN(nn.Module):
    """A docs-style linen CNN with BatchNorm and a depthwise conv (MobileNet block)."""

    widths: Sequence[int] = (4, 6, 8)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.widths[0], (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Conv(self.widths[0], (3, 3), feature_group_count=self.widths[0])(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Conv(self.widths[1], (1, 1), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.swish(x)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.widths[2])(x)
        x = nn.relu(x)
        return nn.Dense(3)(x)


def loss_fn(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean()


def _perturb(tree, key, scale=0.1):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    moved = [a + scale * jax.random.uniform(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, moved)


@pytest.fixture(scope="module")
def linen_setup():
    key = jax.random.key(0)
    x = jax.random.normal(key, (16, 8, 8, 2))
    y = jax.random.randint(key, (16,), 0, 3)
    model = LinenCNN()
    variables = _perturb(model.init(key, x), jax.random.key(1))  # BN statistics not 0/1
    return model, variables, x, y


def test_linen_flows_are_found_with_batchnorm_depthwise_and_channels_last_flatten(linen_setup):
    model, variables, x, _ = linen_setup
    flows = {f.name: f.flow for f in discover_flows(model, variables, x)}
    assert list(flows) == ["Conv_0", "Conv_2", "Dense_0"]
    first = flows["Conv_0"]
    assert first.bias == "params/Conv_0/bias"
    assert first.norm.scale == "params/BatchNorm_0/scale"
    assert first.norm.shift == "params/BatchNorm_0/bias"
    assert first.norm.mean == "batch_stats/BatchNorm_0/mean"
    assert first.norm.var == "batch_stats/BatchNorm_0/var"
    assert [d.weight for d in first.depthwise] == ["params/Conv_1/kernel"]
    assert first.depthwise[0].norm.var == "batch_stats/BatchNorm_1/var"
    assert [(c.weight, c.in_axis) for c in first.consumers] == [("params/Conv_2/kernel", 2)]
    head = flows["Conv_2"].consumers[0]
    assert (head.weight, head.in_axis, head.spatial, head.channels_last) == (
        "params/Dense_0/kernel", 0, 16, True)
    with pytest.raises(GrowthError, match="'Dense_1'.*output layer"):
        discover_flows(model, variables, x, layers=["Dense_1"])


def test_linen_random_growth_keeps_the_function_and_grows_adam_state(linen_setup):
    model, variables, x, y = linen_setup
    tx = optax.adam(1e-3)
    opt_state = tx.init(variables["params"])
    grown = grow(RandomGrower(seed=0), model, variables, batches=[(x, y)], opt_state=opt_state,
                 ratio=0.3)
    assert isinstance(grown, JaxGrowth)
    report = grown.report
    assert report.widths_before == {"Conv_0": 4, "Conv_2": 6, "Dense_0": 8}
    assert report.total_added == 5 and report.params_after > report.params_before
    assert tuple(grown.model.widths) == tuple(report.widths_after.values())
    before = model.apply(variables, x)
    after = grown.model.apply(grown.variables, x)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-5)
    mu = grown.opt_state[0].mu
    for name in ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"):
        assert mu[name]["kernel"].shape == grown.variables["params"][name]["kernel"].shape
    # the same transformation keeps training the grown model
    grads = jax.grad(lambda p: loss_fn(grown.model.apply(
        {**grown.variables, "params": p}, x), y))(grown.variables["params"])
    updates, _ = tx.update(grads, grown.opt_state, grown.variables["params"])
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(grads)


class Residual(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        h = nn.Dense(8)(h) + h
        return nn.Dense(2)(nn.relu(h))


def test_a_residual_add_is_refused_naming_both_layers():
    model = Residual()
    x = jnp.ones((4, 5))
    variables = model.init(jax.random.key(0), x)
    assert discover_flows(model, variables, x) == []
    with pytest.raises(GrowthError, match=r"'Dense_0'.*meet those of 'Dense_1'.*residual add"):
        discover_flows(model, variables, x, layers=["Dense_0"])
    with pytest.raises(GrowthError, match="no growable layer"):
        grow(RandomGrower(), model, variables, batches=[(x, jnp.zeros(4, int))])


class MnistCNN(nn.Module):
    """The Flax docs' CNN (1-channel input)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(features=64, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(features=256)(x))
        return nn.Dense(features=10)(x)


def test_a_hand_written_flow_naming_the_wrong_consumer_is_refused():
    model = MnistCNN()
    x = jnp.ones((2, 8, 8, 1))
    variables = model.init(jax.random.key(0), x)
    wrong = linen_flow(variables, "Conv_1", consumers=["Dense_1"])  # 256 = 4 x 64: accepted
    with pytest.raises(GrowthError, match="'params/Dense_1/kernel' does not read its channels"):
        grow(RandomGrower(), model, variables, batches=[(x, jnp.zeros(2, int))], flows=[wrong],
             rebuild=lambda widths: model)
    right = linen_flow(variables, "Conv_1", consumers=["Dense_0"])
    grown = grow(RandomGrower(), model, variables, batches=[(x, jnp.zeros(2, int))],
                 flows=[right], ratio=0.25,
                 rebuild=lambda widths: _Mnist(widths["Conv_1"]))
    assert grown.variables["params"]["Conv_1"]["kernel"].shape == (3, 3, 32, 80)


class _Mnist(MnistCNN):
    conv1: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(features=32, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(features=self.conv1, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(features=256)(x))
        return nn.Dense(features=10)(x)
