"""Activations called as functions are found and scored by SSD exactly as their module forms."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

import torch.nn.functional as F  # noqa: E402
from simcore.adapters.torch import GrowthError, SSDGrower, discover_flows  # noqa: E402
from simcore.adapters.torch.activations import module_activation  # noqa: E402
from torch import nn  # noqa: E402

# (module form, the same activation as a call in forward)
FORMS = {
    "F.relu": (nn.ReLU, F.relu),
    "torch.relu": (nn.ReLU, torch.relu),
    "x.relu()": (nn.ReLU, lambda x: x.relu()),
    "F.relu inplace": (lambda: nn.ReLU(inplace=True), lambda x: F.relu(x, inplace=True)),
    "x.relu_()": (nn.ReLU, lambda x: x.relu_()),
    "F.relu6": (nn.ReLU6, F.relu6),
    "F.hardtanh": (lambda: nn.Hardtanh(-2.0, 2.0), lambda x: F.hardtanh(x, -2.0, 2.0)),
    "F.leaky_relu": (lambda: nn.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2)),
    "F.leaky_relu kw inplace": (lambda: nn.LeakyReLU(0.2),
                                lambda x: F.leaky_relu(x, negative_slope=0.2, inplace=True)),
    "F.elu": (lambda: nn.ELU(0.5), lambda x: F.elu(x, alpha=0.5)),
    "F.selu": (nn.SELU, F.selu),
    "F.gelu": (nn.GELU, F.gelu),
    "F.gelu tanh": (lambda: nn.GELU("tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "F.silu": (nn.SiLU, F.silu),
    "F.mish": (nn.Mish, F.mish),
    "F.hardswish": (nn.Hardswish, F.hardswish),
    "F.hardsigmoid": (nn.Hardsigmoid, F.hardsigmoid),
    "torch.sigmoid": (nn.Sigmoid, torch.sigmoid),
    "x.tanh()": (nn.Tanh, lambda x: x.tanh()),
    "F.softplus": (lambda: nn.Softplus(2.0, 10.0), lambda x: F.softplus(x, 2.0, 10.0)),
}


class Net(nn.Module):
    """conv -> BN -> act -> conv -> act -> mean -> linear, the act a module or a function."""

    def __init__(self, module=None, function=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.fc = nn.Conv2d(4, 5, 3, padding=1), nn.Linear(5, 3)
        self.act1 = module() if module is not None else None
        self.act2 = module() if module is not None else None
        self.function = function

    def forward(self, x):
        act1 = self.act1 if self.act1 is not None else self.function
        act2 = self.act2 if self.act2 is not None else self.function
        h = act1(self.bn1(self.conv1(x)))
        return self.fc(act2(self.conv2(h)).mean((2, 3)))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_function_activation_is_found_with_its_module_kind(form):
    module, function = FORMS[form]
    flows = {f.producer: f for f in discover_flows(Net(function=function))}
    want = module_activation(module())
    assert flows["conv1"].activation is None and flows["conv1"].activation_kind == want
    assert flows["conv2"].activation_kind == want


@pytest.mark.parametrize("form", sorted(FORMS))
def test_ssd_scores_a_function_activation_as_its_module(form):
    module, function = FORMS[form]
    by_module, by_function = Net(module=module), Net(function=function)
    reports = [SSDGrower(seed=0).grow(net, _batches(), F.cross_entropy, ratio=0.5)
               for net in (by_module, by_function)]
    assert reports[0].widths_after == reports[1].widths_after
    for name in ("conv1", "conv2"):
        torch.testing.assert_close(torch.as_tensor(reports[1].scores[name]),
                                   torch.as_tensor(reports[0].scores[name]))
    for (name, a), (_, b) in zip(by_module.state_dict().items(),
                                 by_function.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, msg=name)
    assert reports[1].skipped == {}


def test_leaky_relu_slope_reaches_the_second_derivative():
    kinds = {f.producer: f.activation_kind for f in discover_flows(Net(function=FORMS[
        "F.leaky_relu kw inplace"][1]))}
    assert kinds["conv1"] == "leaky_relu(negative_slope=0.2)"


@pytest.mark.parametrize("module, function", [(None, F.celu), (nn.CELU, None)])
def test_an_activation_without_second_derivative_is_skipped_by_name(module, function):
    def net():
        model = Net(module=module, function=function)
        model.act2 = nn.ReLU()  # conv2 stays scorable
        return model

    report = SSDGrower(seed=0).grow(net(), _batches(), F.cross_entropy, ratio=0.25)
    assert list(report.skipped) == ["conv1"] and report.added["conv2"] == 1
    where = "('act1')" if module is not None else "(a function call)"
    assert f"activation 'celu' {where}" in report.skipped["conv1"]
    assert report.skipped_widths == {"conv1": 4} and report.growable_share == 5 / 9
    with pytest.raises(GrowthError, match=r"cannot grow 'conv1': no second derivative .*'celu'"):
        SSDGrower(seed=0).grow(net(), _batches(), F.cross_entropy, layers=["conv1"])
    with pytest.raises(GrowthError, match=r"Net has no growable layer: 'conv1': .*'celu'.*"
                                          r"'conv2': .*'celu'"):
        SSDGrower(seed=0).grow(Net(module=module, function=function), _batches(),
                               F.cross_entropy)
