"""Residual streams and concatenations grow: Random keeps the function, Firefly nearly so.

Small nets (tests/residual_nets.py): a ResNet with identity and projection shortcuts and
functional ReLU, a DenseNet-style and an Inception-style concatenation.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F
from simcore.adapters.torch.discovery import discover_flows
from simcore.adapters.torch.growers import FireflyGrower, RandomGrower, SSDGrower
from simcore.adapters.torch.zoo import build

_spec = importlib.util.spec_from_file_location(
    "residual_nets", pathlib.Path(__file__).with_name("residual_nets.py"))
assert _spec is not None and _spec.loader is not None
residual_nets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(residual_nets)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STREAM = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2", "layer2.0.shortcut.0",
          "layer2.1.conv2"]


def _grower(method):
    """Each method with the settings under which it promises to keep the function."""
    if method == "random":
        return RandomGrower(seed=0)
    if method == "ssd":
        return SSDGrower("exact", eps=1e-4)
    return FireflyGrower(seed=0, new_per_layer=4, split_scale=1e-4, outgoing_scale=1e-6,
                         train_candidates=False)


def _tolerance(method, scale):
    return 0.0 if method == "random" else 1e-3 * scale  # splits: O(eps^2), kinks O(eps)


def _check_optimizer_follows(net, opt):
    for p in net.parameters():
        assert p in opt.state
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.ndim:
                assert value.shape == p.shape


def _grow_and_check(net, opt, x, y, method, ratio, grower=None):
    """Grow; the function is kept to the method's tolerance, the optimizer follows, it trains."""
    net.eval()
    before = net(x).detach()
    report = (grower or _grower(method)).grow(net, [(x, y)], F.cross_entropy, opt, ratio=ratio)
    net.eval()
    torch.testing.assert_close(net(x).detach(), before, rtol=0,
                               atol=_tolerance(method, before.abs().max().item()) + 1e-6)
    _check_optimizer_follows(net, opt)
    _train_step(net, opt, x, y)
    return report


def _train_step(net, opt, x, y):
    net.train()
    opt.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def _setup(make, optimizer):
    torch.manual_seed(0)
    net = make()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    opt = optimizer(net.parameters())
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt, x, y


def test_resnet_stream_is_one_group_per_stage():
    flows = discover_flows(residual_nets.ResNet(), torch.zeros(1, 3, 8, 8))
    groups = [f.producers for f in flows if f.members]
    assert groups == [("conv1", "layer1.0.conv2", "layer1.1.conv2"),
                      ("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2")]


def _sgd(p):
    return torch.optim.SGD(p, lr=0.1, momentum=0.9)


def _adam(p):
    return torch.optim.Adam(p, lr=0.01)


@pytest.mark.parametrize(("method", "optimizer"), [
    ("random", _sgd), ("random", _adam), ("firefly", _sgd), ("ssd", _adam)])
def test_resnet_grows_its_residual_stream(method, optimizer):
    make = residual_nets.ResNetModules if method == "ssd" else residual_nets.ResNet
    net, opt, x, y = _setup(make, optimizer)
    modules = dict(net.named_modules())
    widths = {n: modules[n].out_channels for n in STREAM}
    _grow_and_check(net, opt, x, y, method, 0.6)
    modules = dict(net.named_modules())
    grown = {n: modules[n].out_channels for n in STREAM}
    assert all(grown[n] > widths[n] for n in STREAM), (widths, grown)
    assert grown["conv1"] == grown["layer1.1.conv2"] and grown["layer2.0.shortcut.0"] == grown[
        "layer2.1.conv2"]  # a group grows together


def test_ssd_scores_a_group_as_one_unit():
    net, _, x, y = _setup(residual_nets.ResNetModules, lambda p: torch.optim.SGD(p, lr=0.1))
    report = SSDGrower("exact").grow(net, [(x, y)], F.cross_entropy, ratio=0.3)
    scores = report.scores["conv1"]  # the group of the stem and the stage's second convs
    assert scores.shape == (4,) and (scores != 0).any()


@pytest.mark.parametrize("make", [residual_nets.Dense, residual_nets.Inception])
@pytest.mark.parametrize("method", ["random", "firefly"])
def test_concatenated_producers_grow(make, method):
    net, opt, x, y = _setup(make, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    flows = discover_flows(net, x[:1])
    concatenated = {f.producer for f in flows if any(c.offset for c in f.consumers)}
    assert len(concatenated) >= 2
    report = _grow_and_check(net, opt, x, y, method, 0.5)
    assert sum(report.added[n] for n in concatenated) > 0


def test_concatenation_offsets_follow_inputs_grown_before_them():
    """DenseNet's ``cat([new, x])``: the later layer's block comes first, so growing it moves
    every earlier block; Random must still keep the function exactly."""
    net = build("densenet", width=0.125, seed=0)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    before = net(x).detach()
    report = RandomGrower(seed=1).grow(net, None, None, ratio=0.5, example_input=x[:1])
    assert len(report.grown_layers) > 10
    net.eval()
    torch.testing.assert_close(net(x).detach(), before, rtol=0, atol=1e-6)


ZOO = ["resnet18", "resnet_bottleneck", "preact_resnet18", "mobilenet_v2", "densenet",
       "inception", "squeezenet"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["random", "firefly", "ssd"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_models_grow_everywhere(name, method):
    torch.manual_seed(0)
    net = build(name, width=0.125, seed=0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    _train_step(net, opt, x, y)
    flows = discover_flows(net, x[:1])  # every conv but the classifier is a candidate
    covered = {p for f in flows for p in f.producers} | {d.conv for f in flows for d in f.depthwise}
    layers = [n for n, m in net.named_modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert covered == set(layers[:-1])
    grower = SSDGrower("fast", eps=1e-4, rayleigh_steps=20) if method == "ssd" else None
    report = _grow_and_check(net, opt, x, y, method, 0.3, grower)
    reached = [f.producer for f in flows if f.members or any(
        c.offset is not None for c in f.consumers)]  # streams and concatenated layers
    if method == "ssd" and name == "mobilenet_v2":  # linear streams: lambda_min 0, never split
        assert all(not report.scores[n].any() for n in reached if n not in report.skipped)
    else:
        assert any(report.added[n] for n in reached)


def test_discovered_groups_pass_as_hand_given_flows():
    net, _, x, _ = _setup(residual_nets.ResNet, _sgd)
    flows = discover_flows(net, x[:1])
    before = net(x).detach()
    report = RandomGrower(seed=0).grow(net, None, None, ratio=0.4, flows=flows,
                                       example_input=x[:1])
    assert report.added["conv1"] > 0
    torch.testing.assert_close(net(x).detach(), before, rtol=0, atol=1e-6)


def test_an_add_with_the_network_input_keeps_the_group_fixed():
    class InputAdd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.head = torch.nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.head(F.relu(x + self.conv(x))).mean((2, 3))

    from simcore.adapters.torch.discovery import find_flow

    from simcore.growth import GrowthError
    with pytest.raises(GrowthError, match="is added to the network's input in the model's forward"):
        find_flow(InputAdd(), "conv")


@pytest.mark.parametrize("method", ["random", "firefly"])
def test_a_failed_group_growth_leaves_model_and_optimizer_as_they_were(method, monkeypatch):
    from simcore.adapters.torch import host, surgery_swaps

    net, opt, x, y = _setup(residual_nets.ResNet, _adam)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters()}
    params = list(net.parameters())
    calls = {"n": 0, "armed": False}
    original, apply = surgery_swaps.Swap.apply, host.TorchGrowthHost.apply

    def failing(self):  # fail late in the model's own write (not Firefly's shadow copy)
        calls["n"] += calls["armed"]
        if calls["n"] == 40:
            raise RuntimeError("injected")
        original(self)

    def armed(self, *args):
        calls["armed"] = True
        apply(self, *args)

    monkeypatch.setattr(surgery_swaps.Swap, "apply", failing)
    monkeypatch.setattr(host.TorchGrowthHost, "apply", armed)
    with pytest.raises(RuntimeError, match="injected"):
        _grower(method).grow(net, [(x, y)], F.cross_entropy, opt, ratio=0.6)
    assert calls["n"] == 40
    assert list(net.parameters()) == params and net.conv1.out_channels == 4
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p in net.parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(v, moments[id(p)][k])
    torch.testing.assert_close(net(x), net(x))  # the forward still runs
