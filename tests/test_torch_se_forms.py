"""Squeeze-excitation blocks as repositories write them grow like the plainly written gate.

SENet's ``b, c, _, _ = x.size()`` with ``view(b, c)``, ``view(b, c, 1, 1).expand_as(x)``;
timm's ``flatten(1)`` and ``[:, :, None, None]``; ``unsqueeze`` chains; ``x.shape`` with
``expand(b, c, h, w)``. In each the gated conv and the gate's last Linear are one group, as in
``tests/test_torch_se_growth.py`` (whose checks are reused), growth keeps the function and
the grown model trains; reshapes that move channels and channel counts used for anything but
a reshape of the same channels stay refused, with their reasons.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from simcore.adapters.torch.coverage import KEPT, check_growth
from simcore.adapters.torch.discovery import survey_flows
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_torch_se_growth import GROWERS, _kept_followed_and_trains  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("torch_one_thread")]


class SENet(nn.Module):
    """The SENet paper's block, copied by many repositories."""

    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c),
                                nn.Sigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class Timm(SENet):
    def forward(self, x):
        return x * self.fc(self.pool(x).flatten(1))[:, :, None, None]


class Unsqueezed(SENet):
    def forward(self, x):
        return x * self.fc(self.pool(x).flatten(1)).unsqueeze(-1).unsqueeze(2)


class Expanded(SENet):
    def forward(self, x):
        b, c, h, w = x.shape
        y = self.fc(self.pool(x).view(b, -1))
        return x * y.view(b, c, 1, 1).expand(b, c, h, w)


class Net(nn.Module):
    def __init__(self, se=SENet):
        super().__init__()
        self.c1, self.se = nn.Conv2d(3, 16, 3, padding=1), se(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.head(self.c2(self.se(torch.relu(self.c1(x)))))


FORMS = {"senet": SENet, "timm": Timm, "unsqueeze": Unsqueezed, "expand": Expanded}


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("form", FORMS)
def test_the_gated_conv_and_the_gate_are_one_group(form):
    survey = survey_flows(Net(FORMS[form]), torch.zeros(2, 3, 8, 8))
    assert survey.skipped == {}
    flows = {f.producer: f for f in survey.flows}
    assert sorted(flows) == ["c1", "c2", "se.fc.0"]
    assert [(m.producer, m.gate) for m in flows["c1"].members] == [("se.fc.2", True)]
    assert sorted(c.module for c in flows["c1"].consumers) == ["c2", "se.fc.0"]
    assert [c.module for c in flows["se.fc.0"].consumers] == ["se.fc.2"]


@pytest.mark.parametrize("form, method", [(f, m) for f in FORMS for m in ("random", "ssd")]
                         + [("senet", "firefly"), ("timm", "firefly")])
def test_every_layer_grows_and_keeps_the_function(form, method):
    check = check_growth(Net(FORMS[form]), GROWERS[method](), [_batch()], F.cross_entropy)
    assert check.grew and check.growable_share == 1.0 and check.skipped == {}
    assert check.trains
    if method == "random":
        assert check.output_change < KEPT
    else:  # SSD's splits of eps 1e-3, Firefly's eps 0.01: O(eps)
        assert 0 < check.output_change < (1e-2 if method == "ssd" else 5e-2)


@pytest.mark.parametrize("form, method", [(f, m) for f in FORMS for m in ("random", "ssd")])
def test_the_grown_gate_has_the_new_width_and_trains(form, method):
    torch.manual_seed(0)
    net, (x, y) = Net(FORMS[form]), _batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(net(x), y).backward()
    opt.step()  # momentum to grow
    before = net.eval()(x).detach()
    report = GROWERS[method]().grow(net, [(x, y)], F.cross_entropy, opt, ratio=0.5,
                                    layers=["c1"])
    grown = report.widths_after["c1"]
    fc = net.se.fc
    assert grown > 16 and net.c1.out_channels == fc[2].out_features == grown
    assert fc[0].in_features == net.c2.in_channels == grown
    _kept_followed_and_trains(net, opt, x, y, before, method)  # forward, backward, a step


class Shuffled(SENet):  # the gate's channels are reordered: its view moves them
    def forward(self, x):
        b = x.size(0)
        y = self.fc(self.pool(x).flatten(1)).view(b, 4, -1).transpose(1, 2)
        return x * y.reshape(b, -1, 1, 1)


class Selected(SENet):  # only the first channels are gated: indexing selects channels
    def forward(self, x):
        y = self.fc(self.pool(x).flatten(1))
        return torch.cat([x[:, :8] * y[:, :8, None, None], x[:, 8:]], 1)


class Divided(SENet):  # the channel count is arithmetic, not a size
    def forward(self, x):
        b, c, _, _ = x.size()
        return x * self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1) / c


class Literal(SENet):  # a literal count would refold the batch of a grown layer
    def forward(self, x):
        return x * self.fc(self.pool(x).flatten(1)).view(-1, 16, 1, 1)


class Borrowed(SENet):  # the count of a layer outside the gate's group
    def __init__(self, c):
        super().__init__(c)
        self.side = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.fc(self.pool(x).flatten(1))
        return x * y.view(x.size(0), self.side(x).size(1), 1, 1)


REFUSED = {
    Shuffled: ("a view to (2, 4, 4), neither a flatten from dim 1 nor singleton axes",
               "se.fc.2"),
    Selected: ("indexing [:, :8] that selects or moves channels", "c1"),
    Divided: ("a size() query whose channel count feeds 'truediv'", "c1"),
    Literal: ("a view to the literal channel count 16", "se.fc.2"),
    Borrowed: ("reads its channel count from a tensor whose channels its residual group does "
               "not produce", "c1"),
}


@pytest.mark.parametrize("form", REFUSED, ids=lambda form: form.__name__)
def test_reshapes_that_move_channels_and_other_uses_of_the_count_are_refused(form):
    words, layer = REFUSED[form]
    skipped = survey_flows(Net(form), torch.zeros(2, 3, 8, 8)).skipped
    assert words in skipped[layer]
    assert {"c1", "se.fc.2"} <= set(skipped)  # the gate never grows without its conv


def test_a_gate_reshape_without_an_example_input_asks_for_one():
    with pytest.raises(ValueError, match="example_input is needed: a 'view' in 'se'"):
        survey_flows(Net(SENet))


class SEBasicBlock(nn.Module):
    """SE-ResNet's block: the gate scales the residual branch before the add."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.se = SENet(c)

    def forward(self, x):
        out = self.se(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(out + x)


class SEResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.block = SEBasicBlock(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))


def test_a_gate_before_a_residual_add_is_the_groups_gate_and_a_split_copies_it():
    survey = survey_flows(SEResNet(), torch.zeros(2, 3, 8, 8))
    assert survey.skipped == {}
    flow = next(f for f in survey.flows if f.producer == "stem")
    assert [(m.producer, m.gate) for m in flow.members] == [("block.conv2", False),
                                                           ("block.se.fc.2", True)]
    torch.manual_seed(0)
    net, (x, y) = SEResNet(), _batch()
    gate = net.block.se.fc[2].weight.detach().clone()
    net.eval()
    before = net(x).detach()
    GROWERS["ssd"]().grow(net, [(x, y)], F.cross_entropy, ratio=0.5, layers=["stem"])
    grown = net.block.se.fc[2].weight.detach()
    assert grown.shape[0] == net.stem.out_channels > 16
    torch.testing.assert_close(grown[:16], gate, rtol=0, atol=0)
    assert torch.cdist(grown[16:], gate).min(1).values.max() == 0  # copies, not split rows
    change = (net.eval()(x) - before).abs().max() / before.abs().max()
    assert 0 < change < 1e-2
