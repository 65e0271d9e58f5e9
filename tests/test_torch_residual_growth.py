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
from simcore.adapters.torch.growers import FireflyGrower, RandomGrower

_spec = importlib.util.spec_from_file_location(
    "residual_nets", pathlib.Path(__file__).with_name("residual_nets.py"))
assert _spec is not None and _spec.loader is not None
residual_nets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(residual_nets)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: torch.optim.Adam(p, lr=0.01)])
@pytest.mark.parametrize("method", ["random", "firefly"])
def test_resnet_grows_its_residual_stream(method, optimizer):
    net, opt, x, y = _setup(residual_nets.ResNet, optimizer)
    net.eval()
    before = net(x).detach()
    stream = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2",
              "layer2.0.shortcut.0", "layer2.1.conv2"]
    modules = dict(net.named_modules())
    widths = {n: modules[n].out_channels for n in stream}
    grower = (RandomGrower(seed=0) if method == "random" else
              FireflyGrower(seed=0, new_per_layer=4, split_scale=1e-4, outgoing_scale=1e-6,
                            train_candidates=False))
    grower.grow(net, [(x, y)], F.cross_entropy, opt, ratio=0.6)
    modules = dict(net.named_modules())
    assert all(modules[n].out_channels > widths[n] for n in stream)
    net.eval()
    after = net(x).detach()
    tol = 0.0 if method == "random" else 1e-4
    torch.testing.assert_close(after, before, rtol=0, atol=tol + 1e-6)
    for p in net.parameters():  # the optimizer state follows the new shapes
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor) and value.ndim:
                assert value.shape == p.shape
    net.train()
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()


@pytest.mark.parametrize("make", [residual_nets.Dense, residual_nets.Inception])
@pytest.mark.parametrize("method", ["random", "firefly"])
def test_concatenated_producers_grow(make, method):
    net, opt, x, y = _setup(make, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    flows = discover_flows(net, x[:1])
    assert any(c.offset for f in flows for c in f.consumers)
    net.eval()
    before = net(x).detach()
    grower = (RandomGrower(seed=0) if method == "random" else
              FireflyGrower(seed=0, new_per_layer=4, split_scale=1e-4, outgoing_scale=1e-6,
                            train_candidates=False))
    report = grower.grow(net, [(x, y)], F.cross_entropy, opt, ratio=0.5)
    offsets = {f.producer for f in flows if any(c.offset for c in f.consumers)}
    assert sum(report.added[n] for n in offsets) > 0
    net.eval()
    tol = 0.0 if method == "random" else 1e-4
    torch.testing.assert_close(net(x).detach(), before, rtol=0, atol=tol + 1e-6)
    net.train()
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
