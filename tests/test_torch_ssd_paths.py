"""SSD through concatenations and average poolings: one splitting-matrix term per activation.

A DenseNet layer's channels reach every later layer's own BatchNorm and activation, and a
transition conv reaches them after an average pooling. The splitting matrix sums the paths'
terms, each with its own BN coefficient and its patches pooled as the path pools; it must
predict the loss change of a real split, ``eps^2 / 2 * lambda_min``, to O(eps^3).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from simcore.adapters.torch.coverage import check_growth
from simcore.adapters.torch.discovery import discover_flows
from simcore.adapters.torch.growers import SSDGrower
from simcore.adapters.torch.zoo import build
from torch import nn

from simcore.growth import GrowthError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.usefixtures("torch_one_thread")]


class _Layer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, growth, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.conv(F.silu(self.bn(x))), x], 1)


class DenseSmooth(nn.Module):
    """Stem, two dense layers, a transition with an average pooling, one more layer; SiLU."""

    def __init__(self, pool=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1, self.layer2 = _Layer(4, 3), _Layer(7, 3)
        self.bn_t, self.conv_t = nn.BatchNorm2d(10), nn.Conv2d(10, 5, 1)
        self.pool = nn.AvgPool2d(2) if pool is None else pool
        self.layer3 = _Layer(5, 3)
        self.bn, self.head = nn.BatchNorm2d(8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.layer2(self.layer1(self.stem(x)))
        h = self.layer3(self.pool(self.conv_t(F.silu(self.bn_t(h)))))
        return self.head(F.silu(self.bn(h)).mean((2, 3)))


def _trained(**kwargs):
    torch.manual_seed(0)
    net = DenseSmooth(**kwargs).double()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 8, 8, generator=gen, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=gen)) for _ in range(2)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for x, y in batches * 2:  # running statistics and BN gains that differ per path
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
    return net, batches


def _loss(model, batches):
    model.eval()
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)


def test_concatenated_and_pooled_layers_list_every_activation_they_reach():
    flows = {f.producer: f for f in discover_flows(DenseSmooth(), torch.zeros(1, 3, 8, 8))}
    stem = flows["stem"].activation_paths  # layer1's, layer2's and the transition's norms
    assert [(p.norm, p.norm_offset, p.offset) for p in stem] == [
        ("layer1.bn", None, None), ("layer2.bn", 3, 3), ("bn_t", 6, 6)]
    transition = flows["conv_t"].activation_paths  # after the pooling, two activations
    assert [(p.norm, p.pools) for p in transition] == [("layer3.bn", ("pool",)),
                                                      ("bn", ("pool",))]
    last = flows["layer3.conv"].activation_paths  # one, after the concatenation
    assert [(p.norm, p.norm_offset, p.pools) for p in last] == [("bn", 0, ())]


@pytest.mark.parametrize("layer", ["stem", "layer1.conv", "conv_t"])
def test_the_summed_splitting_matrix_predicts_the_loss_change_of_a_split(layer):
    errors = []
    for eps in (0.02, 0.01):
        model, batches = _trained()
        width = model.get_submodule(layer).out_channels
        before = _loss(model, batches)
        report = SSDGrower("exact", eps=eps, rows_per_dim=None).grow(
            model, batches, F.cross_entropy, ratio=1.0 / width, layers=[layer])
        assert report.added == {layer: 1}
        predicted = eps**2 / 2 * float(report.scores[layer].min())
        change = _loss(model, batches) - before
        assert abs(change - predicted) <= 0.05 * abs(predicted), (layer, change, predicted)
        errors.append(abs(change - predicted))
    assert errors[1] < errors[0] / 3  # the remainder is O(eps^3)


def test_a_max_pooling_before_the_activation_is_refused_by_name():
    model, batches = _trained(pool=nn.MaxPool2d(2))
    with pytest.raises(GrowthError, match=r"cannot grow 'conv_t': its channels reach an "
                                          r"activation after a pooling that is not an average "
                                          r"\('pool'\)"):
        SSDGrower("exact").grow(model, batches, F.cross_entropy, layers=["conv_t"])


def test_ssd_grows_every_densenet_layer():
    model = build("densenet", width=0.125, seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,)))]
    check = check_growth(model, SSDGrower("fast", seed=0, rayleigh_steps=20), batches,
                         F.cross_entropy)
    assert check.grew and check.skipped == {} and check.growable_share == 1.0
    assert check.trains and 0 < check.output_change < 0.05


class DenseMLP(nn.Module):
    """Dense connectivity of Linear layers: fc1 reaches two SiLUs, at offsets 0 and 4."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(5, 4), nn.Linear(9, 4), nn.Linear(13, 3)

    def forward(self, x):
        a = torch.cat([self.fc1(x), x], 1)
        return self.head(F.silu(torch.cat([self.fc2(F.silu(a)), a], 1)))


def test_a_concatenated_linear_layer_sums_its_paths_too():
    errors = []
    for eps in (0.04, 0.02):
        torch.manual_seed(0)
        model = DenseMLP().double()
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(16, 5, generator=gen, dtype=torch.float64),
                    torch.randint(0, 3, (16,), generator=gen))]
        flow = discover_flows(model, batches[0][0][:1], layers=["fc1"])[0]
        assert [p.offset for p in flow.activation_paths] == [0, 4]
        before = _loss(model, batches)
        report = SSDGrower("exact", eps=eps, rows_per_dim=None).grow(
            model, batches, F.cross_entropy, ratio=0.25, layers=["fc1"])
        predicted = eps**2 / 2 * float(report.scores["fc1"].min())
        change = _loss(model, batches) - before
        assert abs(change - predicted) <= 0.05 * abs(predicted), (change, predicted)
        errors.append(abs(change - predicted))
    assert errors[1] < errors[0] / 3
