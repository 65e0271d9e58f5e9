"""Residual streams grow on JAX: producers whose outputs are added are one group.

A small Flax linen ResNet (stem conv + BatchNorm + relu, two basic blocks with identity
shortcuts, a block with a 1x1 projection shortcut that doubles the width and one more identity
block, global average pooling, a dense head) -- the layout of ``tests/residual_nets.py``'s
``ResNet``, with explicit paddings so the same weights give the same outputs in PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
nn = pytest.importorskip("flax.linen")
optax = pytest.importorskip("optax")
eqx = pytest.importorskip("equinox")
nnx = pytest.importorskip("flax.nnx")

from simcore.adapters.jax import discover_flows, grow  # noqa: E402

from simcore.growth import FireflyGrower, GrowthError, RandomGrower, SSDGrower  # noqa: E402

#: The producers of each stream, first producer first (the flow's), in forward order.
STREAM_1 = ("Conv_0", "Block_0/Conv_1", "Block_1/Conv_1")
STREAM_2 = ("Block_2/Conv_1", "Block_2/Conv_2", "Block_3/Conv_1")


class Block(nn.Module):
    width: int
    mid: int
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        out = nn.Conv(self.mid, (3, 3), self.stride, padding=1, use_bias=False)(x)
        out = nn.relu(nn.BatchNorm(use_running_average=not train)(out))
        out = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(out)
        out = nn.BatchNorm(use_running_average=not train)(out)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = nn.Conv(self.width, (1, 1), self.stride, padding=0, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.relu(out + x)


class ResNet(nn.Module):
    # one width per growable flow, forward order: stream 1, the mids of blocks 0-2, stream 2,
    # the mid of block 3
    widths: Sequence[int] = (4, 4, 4, 8, 8, 8)

    @nn.compact
    def __call__(self, x, train: bool = False):
        stream_1, mid_0, mid_1, mid_2, stream_2, mid_3 = self.widths
        x = nn.Conv(stream_1, (3, 3), padding=1, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = Block(stream_1, mid_0)(x, train)
        x = Block(stream_1, mid_1)(x, train)
        x = Block(stream_2, mid_2, 2)(x, train)
        x = Block(stream_2, mid_3)(x, train)
        return nn.Dense(3)(x.mean(axis=(1, 2)))


def loss_fn(outputs, targets):
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets).mean()


@pytest.fixture(scope="module")
def resnet():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 8, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8))
    model = ResNet()
    return model, _random_variables(model, x, rng), x, y


def _random_variables(model, x, rng):
    """He kernels, biases and BatchNorms away from their identity initialisation, drawn with
    NumPy for the shapes ``model.init`` gives (no compilation, unlike an eager init)."""

    def draw(path, leaf):
        if path[-1].key == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
        low, high = {"scale": (0.5, 1.5), "var": (0.5, 2.0)}.get(path[-1].key, (-0.3, 0.3))
        return rng.uniform(low, high, leaf.shape)

    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: jnp.asarray(draw(p, leaf), jnp.float32), shapes)


def _firefly():
    """Firefly with the settings under which it promises to keep the function (as for torch,
    tests/test_torch_residual_growth.py)."""
    return FireflyGrower(seed=0, new_per_layer=4, split_scale=1e-4, outgoing_scale=1e-6,
                         train_candidates=False)


def _zeros(model, x):
    """Variables of the right shapes for tracing (no compilation, unlike an eager init)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(np.zeros(s.shape, s.dtype)), shapes)


def _kernel(variables, layer):
    tree = variables["params"]
    for part in layer.split("/"):
        tree = tree[part]
    return tree["kernel"]


def test_discovery_finds_each_stream_as_one_group_with_its_members(resnet):
    model, variables, x, _ = resnet
    flows = discover_flows(model, variables, x)
    assert [f.name for f in flows] == ["Conv_0", "Block_0/Conv_0", "Block_1/Conv_0",
                                       "Block_2/Conv_0", "Block_2/Conv_1", "Block_3/Conv_0"]
    groups = {f.name: f for f in flows if f.flow.members}
    assert [f.layers for f in groups.values()] == [STREAM_1, STREAM_2]
    first = groups["Conv_0"].flow
    assert first.norm.scale == "params/BatchNorm_0/scale"
    assert [m.norm.var for m in first.members] == ["batch_stats/Block_0/BatchNorm_1/var",
                                                  "batch_stats/Block_1/BatchNorm_1/var"]
    # the sum's readers: every block's first conv and the projection shortcut
    assert [c.weight for c in first.consumers] == [
        "params/Block_0/Conv_0/kernel", "params/Block_1/Conv_0/kernel",
        "params/Block_2/Conv_0/kernel", "params/Block_2/Conv_2/kernel"]
    second = groups["Block_2/Conv_1"].flow
    assert [(c.weight, c.in_axis) for c in second.consumers] == [
        ("params/Block_3/Conv_0/kernel", 2), ("params/Dense_0/kernel", 0)]
    # a group is asked for by any of its producers
    assert discover_flows(model, variables, x, layers=["Block_3/Conv_1", "Block_2/Conv_2"]) \
        == [groups["Block_2/Conv_1"]]


def test_random_growth_keeps_the_function_and_the_grown_resnet_trains(resnet):
    model, variables, x, y = resnet
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(variables["params"])
    grown = grow(RandomGrower(seed=0), model, variables, batches=[(x, y)], opt_state=opt_state,
                 ratio=0.5)
    added = grown.report.added
    assert added["Conv_0"] > 0 and added["Block_2/Conv_1"] > 0, added
    stream_1, stream_2 = (grown.report.widths_after[g[0]] for g in (STREAM_1, STREAM_2))
    assert tuple(grown.model.widths) == tuple(grown.report.widths_after.values())
    before = jax.jit(model.apply)(variables, x)
    after = jax.jit(grown.model.apply)(grown.variables, x)
    change = float(jnp.abs(after - before).max() / jnp.abs(before).max())
    assert change < 1e-5

    params, stats = grown.variables["params"], grown.variables["batch_stats"]
    for layers, width in ((STREAM_1, stream_1), (STREAM_2, stream_2)):
        for layer in layers:  # every member and its own BatchNorm
            assert _kernel(grown.variables, layer).shape[-1] == width, layer
            block, _, conv = layer.rpartition("/")
            norm = (block + "/" if block else "") + "BatchNorm_" + conv.split("_")[1]
            tree, stat = params, stats
            for part in norm.split("/"):
                tree, stat = tree[part], stat[part]
            assert tree["scale"].shape == stat["var"].shape == (width,), norm
    for reader in ("Block_0/Conv_0", "Block_1/Conv_0", "Block_2/Conv_0", "Block_2/Conv_2"):
        assert _kernel(grown.variables, reader).shape[-2] == stream_1, reader
    assert _kernel(grown.variables, "Block_3/Conv_0").shape[-2] == stream_2
    assert params["Dense_0"]["kernel"].shape == (stream_2, 3)
    trace = grown.opt_state[0].trace
    assert jax.tree_util.tree_map(jnp.shape, trace) == jax.tree_util.tree_map(jnp.shape, params)

    new_model = grown.model

    @jax.jit
    def step(variables, opt_state):
        def loss_of(p):
            return loss_fn(new_model.apply({**variables, "params": p}, x), y)

        loss, grads = jax.value_and_grad(loss_of)(variables["params"])
        updates, opt_state = tx.update(grads, opt_state, variables["params"])
        return loss, optax.apply_updates(variables["params"], updates)

    loss, trained = step(grown.variables, grown.opt_state)
    assert np.isfinite(float(loss))
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), trained, params)
    assert min(jax.tree_util.tree_leaves(moved)) > 0  # every parameter trains, grown ones too


class AddsAGroupedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = nn.Conv(4, (3, 3))(x)
        b = nn.Conv(4, (3, 3), feature_group_count=2)(x)  # grouped: cannot grow
        return nn.Dense(2)(nn.relu(nn.Conv(4, (3, 3))(a) + b).mean(axis=(1, 2)))


def test_an_add_with_a_refused_layers_channels_refuses_the_group_naming_the_reason():
    model, x = AddsAGroupedConv(), jnp.ones((2, 8, 8, 4))
    variables = _zeros(model, x)
    assert [f.name for f in discover_flows(model, variables, x)] == ["Conv_0"]
    with pytest.raises(GrowthError, match=r"'Conv_2'.*combined with other data in 'add'"):
        discover_flows(model, variables, x, layers=["Conv_2"])
    with pytest.raises(GrowthError, match=r"'Conv_1'.*grouped convolution"):
        discover_flows(model, variables, x, layers=["Conv_1"])


class NormAfterAdd(nn.Module):
    """A pre-activation block: a BatchNorm reads the stream after the add."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3))(x))
        h = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3))(h) + h)
        return nn.Dense(2)(nn.relu(h).mean(axis=(1, 2)))


def test_a_group_with_a_refused_member_is_refused_as_a_whole_naming_the_member():
    model, x = NormAfterAdd(), jnp.ones((2, 8, 8, 3))
    variables = _zeros(model, x)
    assert discover_flows(model, variables, x) == []
    for layer in ("Conv_0", "Conv_1"):  # either member names the group's reason
        with pytest.raises(GrowthError, match=r"cannot grow '.*': 'Conv_0': a per-channel "
                                              r"parameter meets its residual stream after "
                                              r"the add"):
            discover_flows(model, variables, x, layers=[layer])


@pytest.mark.parametrize("mode", ["exact", pytest.param("fast", marks=pytest.mark.slow)])
def test_ssd_splits_the_streams_and_keeps_the_function_to_order_eps_squared(resnet, mode):
    model, variables, x, y = resnet
    before = jax.jit(model.apply)(variables, x)
    changes = []
    for eps in (1e-3, 1e-4):  # the same picks and directions, split ten times less
        grown = grow(SSDGrower(mode, eps=eps, rayleigh_steps=20), model, variables,
                     batches=[(x, y)], loss_fn=loss_fn, ratio=0.5)
        report = grown.report
        for group in (STREAM_1, STREAM_2):
            width = report.widths_after[group[0]]
            assert width > report.widths_before[group[0]], report.added
            assert all(_kernel(grown.variables, layer).shape[-1] == width for layer in group)
        after = jax.jit(grown.model.apply)(grown.variables, x)
        changes.append(float(jnp.abs(after - before).max()))
    # O(eps^2) where no pre-activation crosses ReLU's kink (O(eps) where one does): measured
    # 1.3e-2, 5.8e-4, 1.3e-5 at eps 1e-2, 1e-3, 1e-4 (outputs up to 8.4), both modes
    assert changes[0] < 1e-3 * float(jnp.abs(before).max())
    assert changes[0] > 20 * changes[1], changes


def _torch_resnet_as_linen(net):
    """The linen variables of ``tests/residual_nets.py``'s ``ResNetModules`` (same weights)."""

    def array(t):
        return jnp.asarray(t.detach().numpy())

    params, stats = {}, {}

    def put(tree, path, leaf, value):
        for part in path.split("/"):
            tree = tree.setdefault(part, {})
        tree[leaf] = value

    def conv_bn(conv, bn, conv_path, bn_path):
        put(params, conv_path, "kernel", array(conv.weight.permute(2, 3, 1, 0)))
        put(params, bn_path, "scale", array(bn.weight))
        put(params, bn_path, "bias", array(bn.bias))
        put(stats, bn_path, "mean", array(bn.running_mean))
        put(stats, bn_path, "var", array(bn.running_var))

    conv_bn(net.conv1, net.bn1, "Conv_0", "BatchNorm_0")
    blocks = [*net.layer1, *net.layer2]
    for i, block in enumerate(blocks):
        conv_bn(block.conv1, block.bn1, f"Block_{i}/Conv_0", f"Block_{i}/BatchNorm_0")
        conv_bn(block.conv2, block.bn2, f"Block_{i}/Conv_1", f"Block_{i}/BatchNorm_1")
        if len(block.shortcut):
            conv_bn(block.shortcut[0], block.shortcut[1], f"Block_{i}/Conv_2",
                    f"Block_{i}/BatchNorm_2")
    put(params, "Dense_0", "kernel", array(net.fc.weight.T))
    put(params, "Dense_0", "bias", array(net.fc.bias))
    return {"params": params, "batch_stats": stats}


def test_ssd_scores_of_each_group_equal_the_torch_adapters_on_the_same_weights():
    torch = pytest.importorskip("torch")
    import importlib.util
    import pathlib

    from simcore.adapters.torch.growers import SSDGrower as TorchSSDGrower

    spec = importlib.util.spec_from_file_location(
        "residual_nets", pathlib.Path(__file__).with_name("residual_nets.py"))
    assert spec is not None and spec.loader is not None
    residual_nets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(residual_nets)
    torch.manual_seed(0)
    net = residual_nets.ResNetModules()
    with torch.no_grad():  # BatchNorms away from their identity initialisation
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
    net.eval()
    rng = np.random.default_rng(0)
    images, labels = rng.standard_normal((8, 3, 8, 8)), rng.integers(0, 3, 8)
    t_x = torch.from_numpy(images).float()
    t_y = torch.from_numpy(labels)
    x, y = jnp.asarray(images.transpose(0, 2, 3, 1), jnp.float32), jnp.asarray(labels)
    model, variables = ResNet(), _torch_resnet_as_linen(net)
    np.testing.assert_allclose(np.asarray(jax.jit(model.apply)(variables, x)),
                               net(t_x).detach().numpy(), rtol=1e-4, atol=1e-5)

    def ssd():  # no row subsampling: both score the same rows, exactly
        return dict(mode="exact", rows_per_dim=None)

    t_report = TorchSSDGrower(**ssd()).grow(net, [(t_x, t_y)],
                                            torch.nn.functional.cross_entropy, ratio=0.3)
    j_report = grow(SSDGrower(**ssd()), model, variables, batches=[(x, y)], loss_fn=loss_fn,
                    ratio=0.3).report
    names = {"conv1": "Conv_0", "layer2.0.conv2": "Block_2/Conv_1"}
    for i, block in enumerate(["layer1.0", "layer1.1", "layer2.0", "layer2.1"]):
        names[f"{block}.conv1"] = f"Block_{i}/Conv_0"
    assert sorted(t_report.scores) == sorted(names)
    for t_name, j_name in names.items():
        expected = t_report.scores[t_name]
        assert np.abs(expected).max() > 1e-3, t_name  # a non-trivial comparison
        np.testing.assert_allclose(j_report.scores[j_name], expected, rtol=1e-3,
                                   atol=1e-4 * np.abs(expected).max(), err_msg=t_name)
    assert j_report.widths_after == {names[k]: v for k, v in t_report.widths_after.items()}


@pytest.mark.slow  # Firefly compiles the widened ResNet's gradient: about 25 s on 2 cores
def test_firefly_grows_the_streams_keeps_the_function_and_grows_adam_state(resnet):
    model, variables, x, y = resnet
    tx = optax.adam(1e-3)
    grown = grow(_firefly(), model, variables, batches=[(x, y)], loss_fn=loss_fn,
                 opt_state=tx.init(variables["params"]), ratio=0.5)
    report = grown.report
    for group in (STREAM_1, STREAM_2):
        width = report.widths_after[group[0]]
        assert width > report.widths_before[group[0]], report.added
        assert all(_kernel(grown.variables, layer).shape[-1] == width for layer in group)
    before = jax.jit(model.apply)(variables, x)
    change = jnp.abs(jax.jit(grown.model.apply)(grown.variables, x) - before).max()
    assert float(change) < 1e-3 * float(jnp.abs(before).max())
    shapes = jax.tree_util.tree_map(jnp.shape, grown.variables["params"])
    assert jax.tree_util.tree_map(jnp.shape, grown.opt_state[0].mu) == shapes


class DenseResidual(nn.Module):
    """``h + Dense_1(h)``: Dense_1 reads the stream it adds to (a member and a consumer)."""

    width: int = 8

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width)(x))
        h = nn.Dense(self.width)(h) + h
        return nn.Dense(2)(nn.relu(h))


# Firefly compiles a widened model's gradient (7 s): full tier, which CI runs; it is the test
# of core Firefly's member layout (Flax's output axis -1).
@pytest.mark.parametrize("method", ["random", "ssd",
                                    pytest.param("firefly", marks=pytest.mark.slow)])
def test_a_member_reading_its_own_group_grows_its_rows_and_columns(method):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, 16))
    model = DenseResidual()
    variables = model.init(jax.random.key(0), x)
    (flow,) = discover_flows(model, variables, x)
    assert flow.layers == ("Dense_0", "Dense_1")
    assert [c.weight for c in flow.flow.consumers] == ["params/Dense_1/kernel",
                                                       "params/Dense_2/kernel"]
    grower = {"random": RandomGrower(seed=0), "ssd": SSDGrower("exact", eps=1e-4),
              "firefly": _firefly()}[method]
    grown = grow(grower, model, variables, batches=[(x, y)], loss_fn=loss_fn, ratio=0.5,
                 rebuild=lambda widths: DenseResidual(widths["Dense_0"]))
    assert grown.variables["params"]["Dense_1"]["kernel"].shape == (12, 12)
    before = model.apply(variables, x)
    change = float(jnp.abs(grown.model.apply(grown.variables, x) - before).max())
    assert change < (1e-6 if method == "random" else 1e-4) * float(jnp.abs(before).max())


class NnxBlock(nnx.Module):
    """A stem and one identity block, as nnx's documentation writes modules."""

    def __init__(self, rngs):
        self.stem, self.bn0 = nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
        self.conv1, self.bn1 = nnx.Conv(4, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
        self.conv2, self.bn2 = nnx.Conv(4, 4, (3, 3), rngs=rngs), nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn0(self.stem(x)))
        h = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(h)) + x)
        return self.head(x.mean(axis=(1, 2)))


class EqxBlock(eqx.Module):
    """The same without BatchNorm in Equinox (channels first, one sample per call)."""

    stem: eqx.nn.Conv2d
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, 4)
        self.stem = eqx.nn.Conv2d(3, 4, 3, padding=1, key=keys[0])
        self.conv1 = eqx.nn.Conv2d(4, 4, 3, padding=1, key=keys[1])
        self.conv2 = eqx.nn.Conv2d(4, 4, 3, padding=1, key=keys[2])
        self.head = eqx.nn.Linear(4, 3, key=keys[3])

    def __call__(self, x):
        x = jax.nn.relu(self.stem(x))
        x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))) + x)
        return self.head(x.mean(axis=(1, 2)))


# Equinox in the full tier: nnx already runs the same discovery and growth of a group.
@pytest.mark.parametrize("framework", ["nnx", pytest.param("equinox", marks=pytest.mark.slow)])
def test_nnx_and_equinox_streams_grow_as_one_group(framework):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 4))
    if framework == "nnx":
        model = NnxBlock(nnx.Rngs(0))
        model.eval()
        forward = jax.jit(lambda m, x: m(x))  # new shapes after growth: a new trace
    else:
        model = EqxBlock(jax.random.key(0))  # float64 where the suite enables x64
        x = jnp.transpose(x, (0, 3, 1, 2)).astype(model.stem.weight.dtype)
        forward = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
    (group, _) = discover_flows(model, None, x)
    assert group.layers == ("stem", "conv2")
    grown = grow(RandomGrower(seed=0), model, batches=[(x, y)], ratio=0.5)
    width = grown.report.widths_after["stem"]
    assert width > 4
    if framework == "nnx":
        grown.model.eval()
        assert grown.model.conv2.out_features == grown.model.bn2.num_features == width
    else:
        assert grown.model.conv2.out_channels == grown.model.conv1.in_channels == width
    before = forward(model, x)
    after = forward(grown.model, x)
    assert float(jnp.abs(after - before).max()) < 1e-5 * float(jnp.abs(before).max())


def test_discovered_groups_pass_as_hand_given_flows(resnet):
    model, variables, x, y = resnet
    flows = [f.flow for f in discover_flows(model, variables, x)]
    grown = grow(RandomGrower(seed=0), model, variables, batches=[(x, y)], flows=flows,
                 ratio=0.5)
    width = grown.report.widths_after["Block_2/Conv_1"]
    assert width > 8
    assert all(_kernel(grown.variables, layer).shape[-1] == width for layer in STREAM_2)
    with pytest.raises(GrowthError, match="'params/Block_3/Conv_0/kernel' reads its channels"):
        grow(RandomGrower(seed=0), model, variables, batches=[(x, y)], ratio=0.5,
             flows=[replace(flows[4], consumers=flows[4].consumers[1:])])


class DepthwiseOnTheStream(nn.Module):
    widths: Sequence[int] = (4, 4, 6)

    @nn.compact
    def __call__(self, x):
        stream, mid, out = self.widths
        s = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(stream, (3, 3))(x)))
        h = nn.relu(nn.Conv(mid, (3, 3))(s))
        s = nn.relu(nn.Conv(stream, (3, 3))(h) + s)
        d = nn.Conv(stream, (3, 3), feature_group_count=stream)(s)  # filters the sum
        d = nn.relu(nn.BatchNorm(use_running_average=True)(d))
        return nn.Dense(3)(nn.relu(nn.Conv(out, (1, 1))(d)).mean(axis=(1, 2)))


def test_a_depthwise_conv_on_the_sum_grows_with_the_group():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    model = DepthwiseOnTheStream()
    variables = _random_variables(model, x, rng)
    group = discover_flows(model, variables, x)[0]
    assert group.layers == ("Conv_0", "Conv_2")
    (depthwise,) = group.flow.depthwise
    assert (depthwise.weight, depthwise.norm.var) == ("params/Conv_3/kernel",
                                                      "batch_stats/BatchNorm_1/var")
    grown = grow(RandomGrower(seed=0), model, variables, batches=[(x, None)], ratio=0.5)
    width = grown.report.widths_after["Conv_0"]
    assert width > 4 and _kernel(grown.variables, "Conv_3").shape == (3, 3, 1, width)
    before = model.apply(variables, x)
    change = float(jnp.abs(grown.model.apply(grown.variables, x) - before).max())
    assert change < 1e-5 * float(jnp.abs(before).max())
