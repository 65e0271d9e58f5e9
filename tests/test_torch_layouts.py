"""Channels moved to the last axis (ConvNeXt): Linear layers there read the channels, a
LayerNorm over the channels refuses the layer by name, a layer scale refuses only as the last
reason (adapters/torch/layouts.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from simcore.adapters.torch.discovery import discover_flows, survey_flows
from simcore.adapters.torch.growers import RandomGrower, SSDGrower
from simcore.adapters.torch.zoo import build
from torch import nn

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("torch_one_thread")]


class ChannelsLast(nn.Module):
    """conv -> BN -> ReLU -> permute -> Linear -> GELU -> Linear -> (scale) -> permute -> conv."""

    def __init__(self, scale=False, norm=False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 4)
        self.norm = nn.LayerNorm(4) if norm else None
        self.gamma = nn.Parameter(torch.full((4,), 0.5)) if scale else None
        self.out, self.head = nn.Conv2d(4, 5, 1), nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).permute(0, 2, 3, 1)
        if self.norm is not None:
            h = self.norm(h)
        h = self.fc2(F.gelu(self.fc1(h)))
        if self.gamma is not None:
            h = self.gamma * h
        return self.head(F.relu(self.out(h.permute(0, 3, 1, 2))).mean((2, 3)))


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def test_linear_layers_on_the_last_axis_read_and_produce_channels():
    flows = {f.producer: f for f in discover_flows(ChannelsLast(), torch.zeros(1, 3, 6, 6))}
    assert [c.module for c in flows["conv"].consumers] == ["fc1"]
    assert [c.module for c in flows["fc2"].consumers] == ["out"]  # back to channels-first


@pytest.mark.parametrize("method", ["random", "ssd"])
def test_a_conv_read_by_a_channels_last_linear_grows_and_keeps_the_function(method):
    torch.manual_seed(0)
    net, (x, y) = ChannelsLast(), _data()
    net.eval()
    before = net(x).detach()
    grower = RandomGrower(seed=0) if method == "random" else SSDGrower("exact", eps=1e-3)
    layers = ["conv", "fc2"] if method == "random" else ["conv"]
    grower.grow(net, [(x, y)], F.cross_entropy, ratio=0.5, layers=layers)
    assert net.conv.out_channels == net.fc1.in_features > 4
    if method == "random":
        assert net.fc2.out_features == net.out.in_channels > 4
    change = (net.eval()(x) - before).abs().max().item() / before.abs().max().item()
    assert change < 1e-6 if method == "random" else 0 < change < 1e-3


def test_a_layer_scale_is_refused_unless_something_further_on_is():
    skipped = survey_flows(ChannelsLast(scale=True), torch.zeros(1, 3, 6, 6)).skipped
    assert skipped == {"fc2": "its output feeds a layer scale in the model's forward: a "
                              "multiplication with the parameter 'gamma', which growth does "
                              "not widen"}
    skipped = survey_flows(ChannelsLast(norm=True), torch.zeros(1, 3, 6, 6)).skipped
    assert skipped == {"conv": "its output feeds the LayerNorm 'norm', which normalises over "
                               "the channels: a new channel changes every channel's output"}


def test_convnext_stream_is_refused_for_its_layer_norms_by_name():
    skipped = survey_flows(build("convnext", width=0.125, seed=0),
                           torch.zeros(1, 3, 32, 32)).skipped
    assert len(skipped) == 12
    assert all("normalises over the channels" in why for why in skipped.values())
    assert skipped["stages.0"] == ("its output feeds a LayerNorm in 'stages.1', which "
                                   "normalises over the channels: a new channel changes every "
                                   "channel's output")
