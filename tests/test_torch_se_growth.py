"""Squeeze-excitation gates grow: the gated producer and the gate's fc2 are one group.

An EfficientNet-style MBConv (SiLU, ``x * sigmoid(fc2(silu(fc1(pool(x)))))``, residual) and the
zoo's MobileNetV3-style ``se_net`` (Hardswish, Hardsigmoid): Random keeps the function exactly,
SSD and Firefly to O(eps), the optimizer follows, the grown model trains and reloads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from simcore.adapters.torch import load_checkpoint, save_checkpoint
from simcore.adapters.torch.discovery import discover_flows, survey_flows
from simcore.adapters.torch.growers import FireflyGrower, RandomGrower, SSDGrower
from simcore.adapters.torch.zoo import build
from torch import nn

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("torch_one_thread")]


class MBConv(nn.Module):
    """EfficientNet's block: expand -> BN-SiLU -> depthwise -> BN-SiLU -> SE -> project (+ x)."""

    def __init__(self, channels=4, hidden=8, squeezed=3):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.fc1, self.fc2 = nn.Conv2d(hidden, squeezed, 1), nn.Conv2d(squeezed, hidden, 1)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        h = F.silu(self.bn2(self.dw(F.silu(self.bn1(self.expand(x))))))
        h = h * torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return x + self.bn3(self.project(h))


class EfficientNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.block = MBConv()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(F.silu(self.bn(self.stem(x)))).mean((2, 3)))


class StreamSE(nn.Module):
    """A block without expansion on the stream: stem -> depthwise -> SE -> project -> + stem.

    The projection is a member of the stem's group (it adds to the stream) and one of its
    consumers (it reads the stream through the depthwise conv and the gate).
    """

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn_dw = nn.BatchNorm2d(4)
        self.fc1, self.fc2 = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)
        self.project, self.bn_p = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        s = F.silu(self.bn(self.stem(x)))
        h = F.silu(self.bn_dw(self.dw(s)))
        h = h * torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return self.head(F.silu(s + self.bn_p(self.project(h))).mean((2, 3)))


def _setup(make=EfficientNetLike):
    torch.manual_seed(0)
    net = make()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # running statistics and momentum that are not the initial ones
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt, x, y


GROWERS = {
    "random": lambda: RandomGrower(seed=0),
    "ssd": lambda: SSDGrower("exact", eps=1e-3),
    "firefly": lambda: FireflyGrower(seed=0),
}


def _kept_followed_and_trains(net, opt, x, y, before, method):
    """Random keeps the outputs, splits move them O(eps); the optimizer follows; it trains."""
    net.eval()
    change = (net(x).detach() - before).abs().max().item() / before.abs().max().item()
    if method == "random":
        assert change < 1e-5
    else:
        assert 0 < change < 1e-2  # splits of eps 1e-3 (SSD), Firefly's eps 0.01: O(eps)
    for p in net.parameters():
        assert all(v.shape == p.shape for v in opt.state[p].values() if v.ndim)
    net.train()
    opt.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_the_gated_producer_and_the_gate_are_one_group():
    flows = {f.producer: f for f in discover_flows(EfficientNetLike(), torch.zeros(1, 3, 8, 8))}
    flow = flows["block.expand"]
    assert [(m.producer, m.gate) for m in flow.members] == [("block.fc2", True)]
    assert [d.conv for d in flow.depthwise] == ["block.dw"]
    assert sorted(c.module for c in flow.consumers) == ["block.fc1", "block.project"]
    assert [c.module for c in flows["block.fc1"].consumers] == ["block.fc2"]  # the SE's hidden
    assert [(m.producer, m.gate) for m in flows["stem"].members] == [("block.project", False)]


@pytest.mark.parametrize("method", ["random", "ssd", "firefly"])
def test_gated_channels_grow_together_and_keep_the_function(method):
    net, opt, x, y = _setup()
    net.eval()
    before = net(x).detach()
    report = GROWERS[method]().grow(net, [(x, y)], F.cross_entropy, opt, ratio=0.5,
                                    layers=["block.expand"])
    grown = report.widths_after["block.expand"]
    assert grown > 8 and net.block.fc2.out_channels == grown == net.block.dw.out_channels
    assert net.block.fc1.in_channels == grown == net.block.project.in_channels
    _kept_followed_and_trains(net, opt, x, y, before, method)


def test_a_split_copies_the_gate_exactly_and_halves_every_consumer():
    net, _, x, y = _setup()
    fc2, fc1 = net.block.fc2.weight.detach().clone(), net.block.fc1.weight.detach().clone()
    expand = net.block.expand.weight.detach().clone()
    SSDGrower("exact", eps=0.1).grow(net, [(x, y)], F.cross_entropy, ratio=0.25,
                                     layers=["block.expand"])
    new = net.block.expand.out_channels - 8
    assert new > 0
    parents = [int(torch.cdist(net.block.fc2.weight[j].flatten()[None], fc2.flatten(1)).argmin())
               for j in range(8, 8 + new)]
    for j, parent in zip(range(8, 8 + new), parents, strict=True):
        torch.testing.assert_close(net.block.fc2.weight[j], fc2[parent], rtol=0, atol=0)
        torch.testing.assert_close(net.block.fc2.weight[parent], fc2[parent], rtol=0, atol=0)
        assert not torch.equal(net.block.expand.weight[j], expand[parent])  # the split moved
        for w in (net.block.fc1.weight[:, j], net.block.fc1.weight[:, parent]):
            torch.testing.assert_close(w, fc1[:, parent] / 2)


def test_the_squeeze_excitation_hidden_layer_grows_on_its_own():
    net, opt, x, y = _setup()
    net.eval()
    before = net(x).detach()
    RandomGrower(seed=0).grow(net, [(x, y)], F.cross_entropy, opt, ratio=1.0,
                              layers=["block.fc1"])
    assert net.block.fc1.out_channels == net.block.fc2.in_channels == 6
    torch.testing.assert_close(net.eval()(x), before, rtol=0, atol=1e-6)


def test_a_grown_gated_net_round_trips_through_a_checkpoint(tmp_path):
    net, opt, x, y = _setup()
    before = {k: v.shape for k, v in net.state_dict().items()}
    RandomGrower(seed=0).grow(net, [(x, y)], F.cross_entropy, opt, ratio=0.5)
    grown = {k: v.shape for k, v in net.state_dict().items()}
    assert grown != before  # the checkpoint has grown widths to restore
    save_checkpoint(tmp_path / "grown.pt", net)
    loaded = load_checkpoint(tmp_path / "grown.pt", model=EfficientNetLike()).model.eval()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == grown
    torch.testing.assert_close(loaded(x), net.eval()(x))


def test_se_net_grows_every_gate():
    model = build("se_net", width=0.125, seed=0)
    x = torch.randn(4, 3, 32, 32)
    survey = survey_flows(model, x[:1])
    gates = {m.producer for f in survey.flows for m in f.members if m.gate}
    assert len(gates) == 9 and survey.skipped == {}  # every SE block's fc2
    report = RandomGrower(seed=0).grow(model, None, None, example_input=x[:1], ratio=0.35)
    assert report.growable_share == 1.0
    widths = dict(model.named_modules())
    assert (widths["features.4.block.0.0"].out_channels
            == widths["features.4.block.2.fc2"].out_channels
            == widths["features.4.block.2.fc1"].in_channels)


def test_a_projection_that_reads_and_adds_to_its_group_is_a_member_and_a_consumer():
    flow = discover_flows(StreamSE(), torch.zeros(1, 3, 8, 8), layers=["stem"])[0]
    assert [(m.producer, m.gate) for m in flow.members] == [("fc2", True), ("project", False)]
    assert sorted(c.module for c in flow.consumers) == ["fc1", "head", "project"]


@pytest.mark.parametrize("method", ["random", "ssd", "firefly"])
def test_a_projection_reading_its_own_group_grows_its_inputs_and_outputs_together(method,
                                                                                   tmp_path):
    net, opt, x, y = _setup(StreamSE)
    net.eval()
    before = net(x).detach()
    GROWERS[method]().grow(net, [(x, y)], F.cross_entropy, opt, ratio=0.5, layers=["stem"])
    grown = net.stem.out_channels
    assert grown > 4 and net.project.weight.shape[:2] == (grown, grown)
    assert net.fc2.out_channels == net.fc1.in_channels == net.dw.out_channels == grown
    _kept_followed_and_trains(net, opt, x, y, before, method)
    save_checkpoint(tmp_path / "grown.pt", net)
    loaded = load_checkpoint(tmp_path / "grown.pt", model=StreamSE()).model.eval()
    torch.testing.assert_close(loaded(x), net.eval()(x))
