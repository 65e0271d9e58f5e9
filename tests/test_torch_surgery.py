"""Flow discovery with torch.fx and atomic application of a growth to a PyTorch model."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from simcore.adapters.torch import surgery, surgery_swaps  # noqa: E402
from simcore.adapters.torch.models import mobilenet_v1, vgg16  # noqa: E402
from simcore.adapters.torch.optim import OptimizerGrowth  # noqa: E402
from simcore.adapters.torch.surgery import (  # noqa: E402
    GrowthError,
    TorchConsumer,
    TorchDepthwise,
    TorchFlow,
    apply_growth,
    discover_flows,
    find_flow,
)
from torch import nn  # noqa: E402

from simcore.growth import add_neurons, replicate_neurons, split_neurons  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class FlattenHead(nn.Module):
    """A CNN written here: functional ReLU, max-pool, flatten -> Linear -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(6 * 4 * 4, 7)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.conv2(F.relu(self.conv1(h)))
        return self.head(h.mean((2, 3)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), F.relu(self.b(x))], 1)).mean((2, 3))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc2(F.relu(self.fc1(x)))


def _x(shape=(4, 3, 32, 32), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _calibrated(model, x, seed=0):
    """Random BN affine and running statistics of ``x`` (momentum=None), then eval mode.

    A freshly built model in eval mode has running mean 0 / var 1: activations die across
    layers and the logits are about the classifier bias whatever the input, so a growth that
    breaks the function would go unnoticed (and every running_var equals every other).
    """
    torch.manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: exactly the statistics of x
        model.train()
        model(x)
    for bn, momentum in zip(norms, momenta, strict=True):
        bn.momentum = momentum
    return model.eval()


# --------------------------------------------------------------------------- discovery


def test_vgg16_flows():
    model = vgg16()
    flows = discover_flows(model, _x((1, 3, 32, 32)))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [f.producer for f in flows] == convs[:-1]  # 13 convs; the classifier only consumes
    for f, nxt in zip(flows, convs[1:], strict=True):
        index = int(f.producer.split(".")[1])
        assert f.norm == f"features.{index + 1}"
        assert f.activation == f"features.{index + 2}" and f.activation_kind == "relu"
        assert f.consumers == (TorchConsumer(nxt, 1),)
        assert f.depthwise == ()
    assert flows[-1].consumers == (TorchConsumer("classifier", 1),)


def test_mobilenet_flows_pass_through_depthwise_blocks():
    model = mobilenet_v1()
    flows = discover_flows(model)  # adaptive pool to 1x1: no example input needed
    assert len(flows) == 14
    first = flows[0]
    assert first == TorchFlow(
        "features.0", consumers=(TorchConsumer("features.6"),), norm="features.1",
        depthwise=(TorchDepthwise("features.3", "features.4"),), activation="features.2",
        activation_kind="swish",
    )
    for f in flows[:-1]:
        (dw,) = f.depthwise
        conv = model.get_submodule(dw.conv)
        assert conv.groups == conv.in_channels == conv.out_channels
    assert flows[-1].depthwise == ()
    assert flows[-1].consumers == (TorchConsumer("classifier"),)
    # The core's description of the same flow uses state_dict names.
    core = first.channel_flow(model)
    assert core.producer == "features.0.weight" and core.bias is None
    assert core.depthwise[0].weight == "features.3.weight"
    assert core.depthwise[0].norm.var == "features.4.running_var"
    assert core.consumers[0].weight == "features.6.weight"


def test_flatten_head_owns_h_times_w_columns():
    model = FlattenHead()
    flows = discover_flows(model, _x((2, 3, 8, 8)))
    by = {f.producer: f for f in flows}
    assert set(by) == {"conv1", "conv2", "fc1"}
    assert by["conv1"].norm == "bn1" and by["conv1"].activation is None
    assert by["conv1"].activation_kind == "relu"
    assert by["conv2"].consumers == (TorchConsumer("fc1", 16),)  # 8x8 -> pool -> 4x4
    assert by["conv2"].activation_kind == "tanh"
    assert by["fc1"].consumers == (TorchConsumer("fc2", 1),)
    # The spatial size follows the input: a 16x16 input gives 8x8 per channel.
    model16 = FlattenHead()
    model16.fc1 = nn.Linear(6 * 8 * 8, 7)
    assert find_flow(model16, "conv2", _x((1, 3, 16, 16))).consumers[0].spatial == 64


def test_flatten_without_example_input_is_a_clear_error():
    with pytest.raises(ValueError, match="example_input"):
        discover_flows(FlattenHead())


def test_discovery_restores_mode_and_leaves_running_stats():
    model = vgg16()
    model.train()
    model.features[2].eval()
    before = model.features[1].running_mean.clone()
    discover_flows(model, _x((2, 3, 32, 32)))
    assert model.training and model.features[1].training and not model.features[2].training
    assert torch.equal(model.features[1].running_mean, before)


def test_residual_add_joins_its_producers_into_one_group():
    model = Residual()
    flows = discover_flows(model)
    assert [f.producers for f in flows] == [("stem", "conv2"), ("conv1",)]
    assert find_flow(model, "conv2") == flows[0]  # a member names its group
    assert {c.module for c in flows[0].consumers} == {"conv1", "head"}


def test_concatenation_and_classifier_and_unknown_names():
    model = Concat()
    with pytest.raises(ValueError, match="example_input"):  # b's offset is a's channel count
        find_flow(model, "b")
    assert find_flow(model, "a", _x((1, 3, 4, 4))).consumers == (TorchConsumer("head", 1, 0),)
    assert find_flow(model, "b", _x((1, 3, 4, 4))).consumers == (TorchConsumer("head", 1, 4),)
    with pytest.raises(GrowthError, match="output layer"):
        find_flow(model, "head", _x((1, 3, 4, 4)))
    with pytest.raises(GrowthError, match="no module"):
        find_flow(model, "nope", _x((1, 3, 4, 4)))
    with pytest.raises(GrowthError, match="output layer"):
        find_flow(vgg16(), "classifier")
    with pytest.raises(GrowthError, match="depthwise"):
        find_flow(mobilenet_v1(), "features.3")


def test_untraceable_model_needs_a_hand_written_flow():
    model = Untraceable()
    with pytest.raises(GrowthError, match="TorchFlow"):
        discover_flows(model)
    flow = TorchFlow("fc1", consumers=("fc2",))
    grown, cmap = add_neurons(dict(model.state_dict()), flow.channel_flow(model), 3, rng=0)
    x = _x((5, 3))
    before = model(x)
    apply_growth(model, flow, grown, cmap)
    assert model.fc1.out_features == 7 and model.fc2.in_features == 7
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_hand_written_flows_are_checked():
    model = mobilenet_v1()
    with pytest.raises(GrowthError, match="not a depthwise"):
        TorchFlow("features.0", depthwise=("features.6",)).check(model)
    with pytest.raises(GrowthError, match="not a BatchNorm"):
        TorchFlow("features.0", norm="features.2").check(model)
    with pytest.raises(GrowthError, match="producer"):
        TorchFlow("features.3").check(model)
    with pytest.raises(GrowthError, match="not a module"):
        TorchFlow("features.0", consumers=("missing",)).check(model)
    with pytest.raises(TypeError):
        TorchFlow(3)


# --------------------------------------------------------------------------- applying


def _grow_every_flow(model, x, operator):
    for flow in reversed(discover_flows(model, x)):
        params = {k: v.detach() for k, v in model.state_dict().items()}
        grown, cmap = operator(params, flow.channel_flow(model))
        apply_growth(model, flow, grown, cmap)


@pytest.mark.parametrize("make", [vgg16, mobilenet_v1, FlattenHead])
def test_add_and_replicate_keep_the_function(make):
    x = _x((2, 3, 32, 32)) if make is not FlattenHead else _x((2, 3, 8, 8))
    torch.manual_seed(0)
    model = _calibrated(make(), _x((16,) + x.shape[1:], seed=1))
    before = model(x).detach()
    spread = float((before - before.mean(0)).abs().max())
    assert spread > 0.01  # the logits depend on the input: a broken growth shows
    _grow_every_flow(model, x, lambda p, f: add_neurons(p, f, 3, rng=1))
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-4 * spread)
    _grow_every_flow(model, x, lambda p, f: replicate_neurons(p, f, [0, 0, 1]))
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-4 * spread)
    assert model(x).shape == before.shape


def test_apply_updates_sizes_groups_and_buffers():
    model = _calibrated(mobilenet_v1(), _x((8, 3, 32, 32)))
    flow = find_flow(model, "features.6")
    params = dict(model.state_dict())
    grown, cmap = split_neurons(params, flow.channel_flow(model), [0, 5],
                                torch.randn(2, 32), eps=0.0)
    apply_growth(model, flow, grown, cmap)
    pw, bn, dw, dwbn, nxt = (model.features[i] for i in (6, 7, 9, 10, 12))
    assert pw.out_channels == 34 and pw.weight.shape == (34, 32, 1, 1)
    assert bn.num_features == 34 and bn.running_var.shape == (34,)
    assert (dw.in_channels, dw.out_channels, dw.groups) == (34, 34, 34)
    assert dw.weight.shape == (34, 1, 3, 3) and dwbn.num_features == 34
    assert nxt.in_channels == 34 and nxt.weight.shape[1] == 34
    # Copies duplicate the depthwise filter and BN statistics of their parent.
    torch.testing.assert_close(dw.weight[32], dw.weight[0])
    assert not torch.equal(dwbn.running_var[5], dwbn.running_var[0])  # calibrated: distinct
    torch.testing.assert_close(dwbn.running_var[33], dwbn.running_var[5])
    torch.testing.assert_close(dwbn.running_mean[33], dwbn.running_mean[5])
    torch.testing.assert_close(bn.running_var[33], bn.running_var[5])


def test_apply_keeps_dtype_device_requires_grad_and_registers_new_parameters():
    model = FlattenHead().double()
    model.conv2.weight.requires_grad_(False)
    flow = find_flow(model, "conv2", _x((1, 3, 8, 8)).double())
    old = model.conv2.weight
    grown, cmap = add_neurons(dict(model.state_dict()), flow.channel_flow(model), 2, rng=0)
    grown = {k: v.float() for k, v in grown.items()}  # written back in the model's dtype
    apply_growth(model, flow, grown, cmap)
    assert model.conv2.weight is not old and isinstance(model.conv2.weight, nn.Parameter)
    assert model.conv2.weight.dtype == torch.float64
    assert model.conv2.weight.device == old.device
    assert not model.conv2.weight.requires_grad and model.fc1.weight.requires_grad
    names = {name for name, _ in model.named_parameters()}
    assert {"conv2.weight", "fc1.weight"} <= names
    assert any(p is model.fc1.weight for p in model.parameters())
    assert model.fc1.in_features == 8 * 16


def test_apply_rejects_bad_input_without_changing_anything():
    model = vgg16()
    flow = find_flow(model, "features.0")
    snapshot = _snapshot(model, None)
    grown, cmap = add_neurons(dict(model.state_dict()), flow.channel_flow(model), 2, rng=0)
    bad = dict(grown)
    bad["features.3.weight"] = bad["features.3.weight"][:, :-1]  # consumer not grown
    with pytest.raises(ValueError, match="features.3.weight"):
        apply_growth(model, flow, bad, cmap)
    missing = {k: v for k, v in grown.items() if k != "features.1.running_var"}
    with pytest.raises(ValueError, match="running_var"):
        apply_growth(model, flow, missing, cmap)
    nan = dict(grown)
    nan["features.0.weight"] = nan["features.0.weight"] * float("nan")
    with pytest.raises(ValueError, match="NaN"):
        apply_growth(model, flow, nan, cmap)
    with pytest.raises(TypeError):
        apply_growth(model, "features.0", grown, cmap)
    with pytest.raises(ValueError, match="optimizer_mode"):
        apply_growth(model, flow, grown, cmap, optimizer_mode="keep")
    _assert_same(model, None, snapshot)


# --------------------------------------------------------------------------- atomicity


def _snapshot(model, optimizer):
    modules = {
        name: {k: v for k, v in vars(m).items() if isinstance(v, (int, tuple, bool))}
        for name, m in model.named_modules()
    }
    params = {name: p for name, p in model.named_parameters()}
    values = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = None
    if optimizer is not None:
        opt = (
            [list(g["params"]) for g in optimizer.param_groups],
            {p: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for p, s in optimizer.state.items()},
            [g["lr"] for g in optimizer.param_groups],
        )
    return modules, params, values, opt


def _assert_same(model, optimizer, snapshot):
    modules, params, values, opt = snapshot
    now = _snapshot(model, optimizer)
    assert now[0] == modules
    assert set(now[1]) == set(params)
    assert all(now[1][k] is params[k] for k in params)  # the very same Parameter objects
    assert set(now[2]) == set(values)
    for k in values:
        assert torch.equal(now[2][k], values[k]), k
    if optimizer is not None:
        groups, state, lrs = opt
        assert [list(g["params"]) for g in optimizer.param_groups] == groups
        assert all(a is b for g0, g1 in zip(groups, now[3][0], strict=True)
                   for a, b in zip(g0, g1, strict=True))
        assert set(optimizer.state) == set(state)
        for p, s in state.items():
            assert set(optimizer.state[p]) == set(s)
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(optimizer.state[p][k], v)
        assert [g["lr"] for g in optimizer.param_groups] == lrs


def _trained(model, x, optimizer):
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
def test_failure_at_any_point_of_the_swap_leaves_model_and_optimizer_untouched(
    monkeypatch, opt_kind
):
    model = mobilenet_v1(width=8)
    x = _x((2, 3, 32, 32))
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if opt_kind == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=1e-3))
    _trained(model, x, optimizer)
    flow = find_flow(model, "features.6")
    grown, cmap = split_neurons(dict(model.state_dict()), flow.channel_flow(model), [1, 2],
                                torch.randn(2, 8), eps=0.01)
    count = len(surgery_swaps.growth_swaps(model, flow, grown, cmap, optimizer, "carry"))
    assert count > 15  # parameters, buffers, sizes, groups, the optimizer
    snapshot = _snapshot(model, optimizer)
    real_swap, real_optimizer = surgery_swaps.Swap.apply, OptimizerGrowth.apply
    for fail_at in range(count):
        calls = {"n": 0}

        def tick(fail_at=fail_at, calls=calls):
            if calls["n"] == fail_at:
                raise RuntimeError("injected")
            calls["n"] += 1

        monkeypatch.setattr(surgery_swaps.Swap, "apply",
                            lambda self, tick=tick: (tick(), real_swap(self))[1])
        monkeypatch.setattr(OptimizerGrowth, "apply",
                            lambda self, tick=tick: (tick(), real_optimizer(self))[1])
        with pytest.raises(RuntimeError, match="injected"):
            apply_growth(model, flow, grown, cmap, optimizer)
        _assert_same(model, optimizer, snapshot)
    monkeypatch.undo()
    apply_growth(model, flow, grown, cmap, optimizer)  # and without a failure it works
    assert model.features[6].out_channels == 10


def test_failure_while_setting_an_attribute_is_rolled_back(monkeypatch):
    model = vgg16()
    flow = find_flow(model, "features.3")
    grown, cmap = add_neurons(dict(model.state_dict()), flow.channel_flow(model), 4, rng=0)
    snapshot = _snapshot(model, None)

    class Exploding(dict):
        def __setitem__(self, key, value):
            if key == "num_features":
                raise RuntimeError("setter failed")
            super().__setitem__(key, value)

    bn = model.features[4]
    real_swap = surgery_swaps.Swap

    class Spy(real_swap):
        __slots__ = ()

        def apply(self):
            if self.container is bn.__dict__:
                Exploding(self.container)[self.key] = self.new
            real_swap.apply(self)

    monkeypatch.setattr(surgery_swaps, "Swap", Spy)
    with pytest.raises(RuntimeError, match="setter failed"):
        apply_growth(model, flow, grown, cmap)
    _assert_same(model, None, snapshot)


# --------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("opt_kind", ["sgd", "adam", "adamw"])
def test_optimizer_step_after_growth_with_carried_state(opt_kind):
    model = FlattenHead()
    x = _x((4, 3, 8, 8))
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
            "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2)}[opt_kind]
    optimizer = make(model.parameters())
    _trained(model, x, optimizer)
    flow = find_flow(model, "conv2", x)
    old_weight = model.conv2.weight
    old_state = {k: v.clone() for k, v in optimizer.state[old_weight].items()}
    grown, cmap = replicate_neurons(dict(model.state_dict()), flow.channel_flow(model), [2])
    apply_growth(model, flow, grown, cmap, optimizer)
    new_weight = model.conv2.weight
    assert old_weight not in optimizer.state
    state = optimizer.state[new_weight]
    key = "momentum_buffer" if opt_kind == "sgd" else "exp_avg"
    assert state[key].shape == new_weight.shape
    torch.testing.assert_close(state[key][:6], old_state[key])
    torch.testing.assert_close(state[key][6], old_state[key][2])  # the copy takes its parent's
    if opt_kind != "sgd":
        assert torch.equal(state["step"], old_state["step"])
    fc1_state = optimizer.state[model.fc1.weight][key]
    assert fc1_state.shape == (7, 7 * 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before["conv2.weight"], model.conv2.weight.detach())
    assert not torch.equal(before["fc1.weight"], model.fc1.weight.detach())


def test_optimizer_reset_mode_drops_state():
    model = FlattenHead()
    x = _x((4, 3, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _trained(model, x, optimizer)
    flow = find_flow(model, "conv1", x)
    grown, cmap = add_neurons(dict(model.state_dict()), flow.channel_flow(model), 2, rng=0)
    apply_growth(model, flow, grown, cmap, optimizer, optimizer_mode="fresh")
    assert len(optimizer.state) == 0
    model(x).square().mean().backward()
    optimizer.step()
    assert optimizer.state[model.conv1.weight]["momentum_buffer"].shape == (7, 3, 3, 3)


def test_grown_model_can_be_deep_copied_and_traced_again():
    model = vgg16()
    x = _x((1, 3, 32, 32))
    _grow_every_flow(model, x, lambda p, f: add_neurons(p, f, 1, rng=np.random.default_rng(0)))
    clone = copy.deepcopy(model)
    flows = discover_flows(clone, x)
    assert [f.channels(clone) for f in flows] == [17] * 13


def test_grown_parameters_are_contiguous_like_a_freshly_built_layer():
    """A checkpoint-rebuilt model has contiguous weights; a grown one must match it,
    or the two run different kernels and a resumed run drifts in the last bits."""
    from simcore.adapters.torch import RandomGrower, vgg16

    torch.manual_seed(0)
    model = vgg16(num_classes=10, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))]
    loss_fn = torch.nn.functional.cross_entropy
    loss_fn(model(batches[0][0]), batches[0][1]).backward()
    optimizer.step()
    RandomGrower(seed=0).grow(model, batches, loss_fn, optimizer, ratio=0.5)
    for name, p in model.named_parameters():
        assert p.is_contiguous(), name
        for key, value in optimizer.state[p].items():
            if isinstance(value, torch.Tensor) and value.ndim:
                assert value.is_contiguous(), (name, key)


def test_apply_growth_checks_the_optimizer_mode_and_lr():
    model = FlattenHead()
    flow = find_flow(model, "conv2", _x((1, 3, 8, 8)))
    grown, cmap = add_neurons(dict(model.state_dict()), flow.channel_flow(model), 2, rng=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="optimizer_mode"):
        apply_growth(model, flow, grown, cmap, optimizer, optimizer_mode="keep")
    with pytest.raises(ValueError, match="lr"):
        apply_growth(model, flow, grown, cmap, lr=0.1)
    assert model.conv2.out_channels == 6  # nothing applied
    apply_growth(model, flow, grown, cmap, optimizer, optimizer_mode="fresh", lr=0.02)
    assert model.conv2.out_channels == 8 and optimizer.param_groups[0]["lr"] == 0.02


def test_apply_growths_is_one_transaction_over_several_flows(monkeypatch):
    from simcore.adapters.torch.surgery import GrowthTransaction, apply_growths

    model = FlattenHead()
    x = _x((2, 3, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _trained(model, x, optimizer)
    flows = discover_flows(model, x)
    params = dict(model.state_dict())
    grown, maps = params, []
    for flow in reversed(flows):  # downstream first, on one dict
        grown, cmap = add_neurons(grown, flow.channel_flow(model), 2, rng=0)
        maps.append(cmap)
    growths = list(zip(reversed(flows), maps, strict=True))
    widths = [f.channels(model) for f in flows]
    snapshot = _snapshot(model, optimizer)
    real = surgery.growth_swaps
    calls = {"n": 0}

    def last_fails(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == len(growths):
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(surgery, "growth_swaps", last_fails)
    with pytest.raises(RuntimeError, match="injected"):
        apply_growths(model, growths, grown, optimizer)
    _assert_same(model, optimizer, snapshot)
    monkeypatch.undo()
    first_flow, first_map = growths[0]
    with GrowthTransaction(model, optimizer) as transaction:
        transaction.apply(first_flow, grown, first_map)
        transaction.rollback()
    _assert_same(model, optimizer, snapshot)
    apply_growths(model, growths, grown, optimizer)
    assert [f.channels(model) for f in flows] == [w + 2 for w in widths]
    assert all(t.shape == model.state_dict()[k].shape for k, t in grown.items())
