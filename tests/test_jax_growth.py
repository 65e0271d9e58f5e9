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
eqx = pytest.importorskip("equinox")
nnx = pytest.importorskip("flax.nnx")

from simcore.adapters.jax import (  # noqa: E402
    JaxGrowth,
    add_similarity_gradient,
    discover_flows,
    find_kernels,
    grow,
    linen_flow,
    penalty,
    similarity_loss,
    split_neurons,
)

from simcore.growth import FireflyGrower, GrowthError, RandomGrower, SSDGrower  # noqa: E402


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


def _perturb(tree, seed, scale=0.1):
    # NumPy, not jax.random: eager JAX compiles one program per operation and shape
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rng.uniform(size=a.shape), a.dtype), tree)


@pytest.fixture(scope="module")
def linen_setup():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 8, 8, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16))
    model = LinenCNN()
    variables = _perturb(jax.jit(model.init)(jax.random.key(0), x), 1)  # BN stats not 0/1
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
    assert report.skipped == {} and report.growable_share == 1.0  # the output layer is no skip
    assert tuple(grown.model.widths) == tuple(report.widths_after.values())
    before = jax.jit(model.apply)(variables, x)
    after = jax.jit(grown.model.apply)(grown.variables, x)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-5)
    mu = grown.opt_state[0].mu
    for name in ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1"):
        assert mu[name]["kernel"].shape == grown.variables["params"][name]["kernel"].shape

    @jax.jit
    def update(variables, opt_state):  # the same transformation keeps training the grown model
        grads = jax.grad(lambda p: loss_fn(grown.model.apply(
            {**variables, "params": p}, x), y))(variables["params"])
        return tx.update(grads, opt_state, variables["params"])[0]

    updates = update(grown.variables, grown.opt_state)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(
        grown.variables["params"])


class Gated(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        h = nn.Dense(8)(h) * h
        return nn.Dense(2)(nn.relu(h))


def test_a_product_of_two_layers_is_refused_naming_both_layers():
    x = jnp.ones((4, 5))  # a residual add joins the layers: tests/test_jax_residual_growth.py
    model = Gated()
    variables = model.init(jax.random.key(0), x)
    assert discover_flows(model, variables, x) == []
    with pytest.raises(GrowthError, match=r"'Dense_0'.*meet those of 'Dense_1'.*multiplication"):
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


@pytest.fixture(scope="module")
def mnist():
    model = MnistCNN()
    x = jnp.ones((2, 8, 8, 1))
    return model, jax.jit(model.init)(jax.random.key(0), x), x


def test_a_hand_written_flow_naming_the_wrong_consumer_is_refused(mnist):
    model, variables, x = mnist
    wrong = linen_flow(variables, "Conv_1", consumers=["Dense_1"])  # 256 = 4 x 64: accepted
    with pytest.raises(GrowthError, match="'params/Dense_1/kernel' does not read its channels"):
        grow(RandomGrower(), model, variables, batches=[(x, jnp.zeros(2, int))], flows=[wrong],
             rebuild=lambda widths: model)


@pytest.mark.slow  # a growth of the docs' MNIST CNN (256-wide dense layer)
def test_a_right_hand_written_flow_grows(mnist):
    model, variables, x = mnist
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


@pytest.mark.slow  # Firefly traces and trains candidates: about a minute on 2 busy cores
def test_linen_firefly_growth_moves_the_function_by_its_outgoing_scale(linen_setup):
    model, variables, x, y = linen_setup
    grown = grow(FireflyGrower(seed=0, new_per_layer=4), model, variables, batches=[(x, y)],
                 loss_fn=loss_fn, ratio=0.3)
    assert grown.report.total_added == 5
    change = jnp.abs(grown.model.apply(grown.variables, x) - model.apply(variables, x)).max()
    assert 0 < float(change) < 0.2


@pytest.mark.slow  # SSD is also in the fast tier on nnx and Equinox models
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_linen_ssd_growth_keeps_the_function_to_order_eps_squared(linen_setup, mode):
    model, variables, x, y = linen_setup
    grown = grow(SSDGrower(mode, eps=0.01, rayleigh_steps=20), model, variables,
                 batches=[(x, y)], loss_fn=loss_fn, ratio=0.3)
    assert grown.report.total_added == 5
    change = jnp.abs(jax.jit(grown.model.apply)(grown.variables, x)
                     - jax.jit(model.apply)(variables, x)).max()
    assert float(change) < 1e-3


class NnxMLP(nnx.Module if nnx is not None else object):
    """An nnx MLP as the Flax docs write one, with BatchNorm."""

    def __init__(self, rngs):
        self.linear1 = nnx.Linear(5, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.linear2 = nnx.Linear(8, 6, rngs=rngs)
        self.linear3 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.linear1(x)))
        return self.linear3(nnx.tanh(self.linear2(x)))


@pytest.mark.parametrize("grower", [RandomGrower(seed=0), SSDGrower("exact")],
                         ids=["random", "ssd"])
def test_nnx_growth_returns_a_new_module_and_keeps_the_function(grower):
    model = NnxMLP(nnx.Rngs(0))
    model.bn.mean[...] = model.bn.mean[...] + 0.2  # statistics as after training
    x = jax.random.normal(jax.random.key(0), (16, 5))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(nnx.state(model, nnx.Param))
    def forward(module):
        module.eval()
        return nnx.jit(lambda m, inputs: m(inputs))(module, x)

    before = forward(model)
    grown = grow(grower, model, batches=[(x, y)], loss_fn=loss_fn, opt_state=opt_state,
                 ratio=0.5)
    assert grown.report.widths_before == {"linear1": 8, "linear2": 6}
    assert model.linear1.kernel[...].shape == (5, 8)  # the given module is unchanged
    new = grown.model
    width = grown.report.widths_after["linear1"]
    assert new.linear1.kernel[...].shape == (5, width) and new.bn.num_features == width
    tolerance = 1e-5 if isinstance(grower, RandomGrower) else 1e-3
    assert float(jnp.abs(forward(new) - before).max()) < tolerance
    params = nnx.state(new, nnx.Param)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, grown.opt_state, params)
    assert jax.tree_util.tree_map(jnp.shape, updates) == jax.tree_util.tree_map(jnp.shape, params)


class EqxCNN(eqx.Module if eqx is not None else object):
    """An Equinox CNN as its docs write one: per sample, BatchNorm with state, depthwise conv."""

    conv: eqx.nn.Conv2d
    norm: eqx.nn.BatchNorm
    depthwise: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1)
        self.norm = eqx.nn.BatchNorm(4, axis_name="batch", mode="ema")
        self.depthwise = eqx.nn.Conv2d(4, 4, 3, padding=1, groups=4, key=k2)
        self.head = eqx.nn.Linear(4 * 8 * 8, 3, key=k3)

    def __call__(self, x, state):
        x, state = self.norm(self.conv(x), state)
        x = self.depthwise(jax.nn.relu(x))
        return self.head(jnp.ravel(x)), state


# SSD splits across ReLU's kink, so the largest output change is between O(eps) and O(eps^2)
@pytest.mark.parametrize("grower", [RandomGrower(seed=0),
                                    SSDGrower("fast", eps=1e-3, rayleigh_steps=20)],
                         ids=["random", "ssd-fast"])
def test_equinox_growth_updates_fields_state_and_keeps_the_function(grower):
    model, state = eqx.nn.make_with_state(EqxCNN)(jax.random.key(0))
    state = jax.tree_util.tree_map(lambda a: a + 0.3 if a.dtype == jnp.float32 else a, state)
    x = jax.random.normal(jax.random.key(0), (16, 1, 8, 8))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
    tx = optax.adam(1e-3)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def forward(m, s):
        m = eqx.nn.inference_mode(m)
        return jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s)[0]

    grown = grow(grower, model, state, batches=[(x, y)], loss_fn=loss_fn, opt_state=opt_state,
                 ratio=0.5)
    width = grown.report.widths_after["conv"]
    assert grown.report.widths_before == {"conv": 4} and width == 6
    new = grown.model
    assert (new.conv.out_channels, new.depthwise.groups, new.norm.input_size) == (6, 6, 6)
    assert new.head.in_features == 6 * 64 and new.conv.bias.shape == (6, 1, 1)
    before = forward(model, state)
    change = float(jnp.abs(forward(new, grown.variables) - before).max())
    scale = float(jnp.abs(before).max())
    assert change < (1e-6 if isinstance(grower, RandomGrower) else 1e-4) * scale
    params = eqx.filter(new, eqx.is_array)
    updates, _ = eqx.filter_jit(tx.update)(jax.tree_util.tree_map(jnp.ones_like, params),
                                           grown.opt_state, params)
    assert updates.conv.weight.shape == (6, 1, 3, 3)


def test_split_neurons_takes_numpy_directions_for_jax_params():
    model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    flow = linen_flow(variables, "layers_0", consumers=["layers_2"])
    grown, _ = split_neurons(variables, flow, [1], np.ones((1, 4)), eps=0.1)
    assert grown["params"]["layers_0"]["kernel"].shape == (4, 4)


@pytest.mark.slow  # compiles the loss for an Equinox MLP: about 20 s on 2 busy cores
def test_penalty_takes_the_equinox_neuron_axis_and_the_optax_error_names_the_filter():
    mlp = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    weights = [layer.weight for layer in mlp.layers]
    loss = jax.jit(similarity_loss, static_argnames="neuron_axis")
    expected = sum(float(loss(w, neuron_axis=0)) for w in weights)
    assert float(eqx.filter_jit(penalty)(mlp)) == pytest.approx(expected, rel=1e-5)
    flax_view = sum(float(loss(w, neuron_axis=-1)) for w in weights)
    assert abs(flax_view - expected) > 1e-3  # the old default's value differs
    tx = add_similarity_gradient(0.1)
    state = tx.init(mlp)
    grads = eqx.filter(jax.tree_util.tree_map(jnp.zeros_like, eqx.filter(mlp, eqx.is_array)),
                       eqx.is_array)
    with pytest.raises(ValueError, match=r"eqx.filter\(model, eqx.is_array\)"):
        tx.update(grads, state, mlp)


def test_find_kernels_keeps_the_first_conv_of_a_one_channel_cnn(mnist):
    _, variables, _ = mnist
    assert "Conv_0/kernel" in find_kernels(variables["params"], depthwise="exclude")


def _make_step(model, tx):
    """A jitted linen training step closing over ``model`` (rebuilt after each growth)."""

    @jax.jit
    def step(variables, opt_state, x, y):
        def loss(params):
            out, updates = model.apply({**variables, "params": params}, x, train=True,
                                       mutable=["batch_stats"])
            return loss_fn(out, y), updates

        (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
        changes, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], changes)
        return {**variables, **updates, "params": params}, opt_state, value

    return step


@pytest.mark.slow  # several jit compilations and two growths
def test_grow_train_grow_under_jit_with_the_similarity_transform(linen_setup):
    model, variables, x, y = linen_setup
    kernels = find_kernels(variables["params"])
    tx = optax.chain(add_similarity_gradient(0.01, neuron_axis=kernels, lam=0.1),
                     optax.sgd(0.05, momentum=0.9))
    opt_state = tx.init(variables["params"])
    losses = []
    for grower in (None, RandomGrower(seed=0), SSDGrower("fast", rayleigh_steps=10)):
        if grower is not None:
            grown = grow(grower, model, variables, batches=[(x, y)], loss_fn=loss_fn,
                         opt_state=opt_state, ratio=0.2)
            model, variables, opt_state = grown.model, grown.variables, grown.opt_state
            refs = opt_state[0].refs
            assert refs["Conv_0/kernel"].shape == variables["params"]["Conv_0"]["kernel"].shape
        step = _make_step(model, tx)  # shapes changed: a step for the new model
        for _ in range(3):
            variables, opt_state, value = step(variables, opt_state, x, y)
            losses.append(float(value))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert tuple(model.widths) != (4, 6, 8)


@pytest.mark.slow  # Firefly trains and scores candidates through a wider copy of each model
def test_firefly_grows_nnx_and_equinox_models():
    x = jax.random.normal(jax.random.key(0), (16, 5))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
    mlp = NnxMLP(nnx.Rngs(0))
    grown = grow(FireflyGrower(new_per_layer=3), mlp, batches=[(x, y)], loss_fn=loss_fn,
                 ratio=0.3)
    assert grown.report.total_added == 4
    assert grown.model.linear2.in_features == grown.report.widths_after["linear1"]
    cnn, state = eqx.nn.make_with_state(EqxCNN)(jax.random.key(0))
    images = jax.random.normal(jax.random.key(0), (16, 1, 8, 8))
    grown = grow(FireflyGrower(new_per_layer=3), cnn, state, batches=[(images, y)],
                 loss_fn=loss_fn, ratio=0.5)
    assert grown.model.depthwise.groups == grown.model.conv.out_channels == 6


class Concatenated(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = nn.relu(nn.Dense(4)(x))
        b = nn.relu(nn.Dense(3)(x))
        return nn.Dense(2)(jnp.concatenate([a, b], axis=-1))


class HalfConcatenated(nn.Module):
    widths: Sequence[int] = (4,)  # the one growable layer's

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.widths[0])(x))
        h = nn.relu(nn.Dense(5)(h))
        return nn.Dense(2)(jnp.concatenate([h, x], axis=-1))


def test_the_report_names_the_layers_found_but_not_grown_with_why_and_width():
    model = HalfConcatenated()
    x = jnp.ones((2, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    report = grow(RandomGrower(seed=0), model, variables, batches=[(x, None)]).report
    assert list(report.widths_before) == ["Dense_0"]
    assert list(report.skipped) == ["Dense_1"] and "concatenation" in report.skipped["Dense_1"]
    assert report.skipped_widths == {"Dense_1": 5}
    assert report.growable_share == 4 / 9
    # Told which layers to grow, the adapter does not survey the others (as in PyTorch).
    told = grow(RandomGrower(seed=0), model, variables, batches=[(x, None)],
                layers=["Dense_0"]).report
    assert told.skipped == {} and told.skipped_widths == {}


def test_a_concatenation_is_refused():
    model = Concatenated()
    x = jnp.ones((2, 5))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    with pytest.raises(GrowthError, match="'Dense_1'.*concatenation"):
        discover_flows(model, variables, x, layers=["Dense_1"])


@pytest.mark.slow  # one growth of the linen CNN
def test_a_failed_growth_leaves_model_variables_and_state_as_they_were(linen_setup):
    model, variables, x, y = linen_setup
    opt_state = optax.sgd(0.1, momentum=0.9).init(variables["params"])
    copies = jax.tree_util.tree_map(np.asarray, (variables, opt_state))
    with pytest.raises(GrowthError, match="does not accept the grown variables"):
        grow(RandomGrower(), model, variables, batches=[(x, y)], opt_state=opt_state,
             rebuild=lambda widths: LinenCNN())  # the old widths: a wrong rebuild
    jax.tree_util.tree_map(np.testing.assert_array_equal, (variables, opt_state), copies)


class NnxCNN(nnx.Module if nnx is not None else object):
    """An nnx CNN with BatchNorm and a depthwise conv (MobileNet block), NHWC as nnx has it."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
        self.pointwise = nnx.Conv(4, 6, (1, 1), rngs=rngs)
        self.head = nnx.Linear(6 * 8 * 8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = nnx.relu(self.pointwise(nnx.relu(self.depthwise(x))))
        return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.slow  # one more nnx growth
def test_nnx_depthwise_conv_follows_its_producer():
    model = NnxCNN(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 2))
    model.eval()
    before = model(x)
    grown = grow(RandomGrower(seed=0), model, batches=[(x, jnp.zeros(8, int))], ratio=0.4)
    width = grown.report.widths_after["conv"]
    new = grown.model
    assert width > 4 and new.depthwise.feature_group_count == new.depthwise.in_features == width
    new.eval()
    assert float(jnp.abs(new(x) - before).max()) < 1e-5
