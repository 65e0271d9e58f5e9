"""The zoo of third-party-style architectures: every model builds and runs at any width."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

from simcore.adapters.torch.zoo import NAMES, build  # noqa: E402


@pytest.mark.parametrize("name", NAMES)
def test_every_zoo_model_builds_and_runs_at_small_width(name):
    model = build(name, width=0.125, num_classes=7, seed=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_zoo_model_traces_with_torch_fx(name):
    model = build(name, width=0.125, seed=0).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_full_width_sizes_are_the_cifar_ones():
    counts = {name: sum(p.numel() for p in build(name).parameters())
              for name in ("resnet18", "resnet18_functional", "vgg11_bn", "mobilenet_v2")}
    assert counts["resnet18"] == counts["resnet18_functional"]
    assert 11.0e6 < counts["resnet18"] < 11.3e6  # the CIFAR ResNet18's 11.17M
    assert 9.2e6 < counts["vgg11_bn"] < 9.3e6  # CIFAR VGG11: 9.23M
    assert 2.2e6 < counts["mobilenet_v2"] < 2.4e6


def test_seed_reproduces_weights_and_leaves_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    first, second = build("lenet", seed=3), build("lenet", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_width_scales_channels_and_bad_arguments_are_refused():
    assert build("vgg11", width=0.5).features[0].out_channels == 32
    assert build("vgg11", width=0.001).features[0].out_channels == 1
    with pytest.raises(ValueError, match="unknown zoo model 'alexnet'"):
        build("alexnet")
    with pytest.raises(ValueError, match="width must be a positive number"):
        build("lenet", width=0)


# --- growth on every zoo model -------------------------------------------------------------------

import re  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from simcore.adapters.torch import (  # noqa: E402
    FireflyGrower,
    GrowthError,
    RandomGrower,
    SSDGrower,
    load_checkpoint,
    save_checkpoint,
)
from simcore.adapters.torch.coverage import KEPT, check_growth  # noqa: E402
from simcore.adapters.torch.discovery import survey_flows  # noqa: E402
from torch import nn  # noqa: E402

WIDTH = 0.125
# SSD and Firefly on these in the fast tier (functional and module activations, residual,
# inverted residual, squeeze-excitation, permute); every other pair is marked slow.
FAST = {"lenet", "vgg11_functional", "resnet18_functional", "mobilenet_v2", "se_net", "convnext"}
GROWERS = {
    "random": lambda: RandomGrower(seed=0),
    "ssd": lambda: SSDGrower("fast", seed=0, rayleigh_steps=20),
    "firefly": lambda: FireflyGrower(seed=0),
}
CASES = [pytest.param(name, method, marks=() if method == "random" or name in FAST
                      else pytest.mark.slow)
         for name in NAMES for method in GROWERS]


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))]


@pytest.mark.parametrize("name, method", CASES)
def test_zoo_model_grows_or_is_refused_clearly_and_trains(name, method):
    model = build(name, width=WIDTH, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        check = check_growth(model, GROWERS[method](), _batches(), F.cross_entropy)
    except GrowthError:  # a clear refusal is an answer; any other exception fails the test
        return
    for key, value in model.state_dict().items():  # a copy was grown, not the model
        assert torch.equal(value, before[key]), key
    if not check.grew:
        assert check.reason  # the GrowthError's words are kept for the table
        return
    assert check.added > 0 and 0 < check.growable_share <= 1
    assert check.trains, "the grown model's SGD-momentum step is not finite or does not move"
    if method == "random":
        assert check.output_change < KEPT  # zero outgoing weights: the function is kept
    if method == "ssd":
        assert check.output_change < 0.05  # splits of eps = 0.01 move the outputs O(eps)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in NAMES])
def test_grown_zoo_model_checkpoint_round_trips_or_is_refused(name, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = build(name, width=WIDTH, seed=0)
    RandomGrower(seed=0).grow(model, None, None, example_input=x[:1], ratio=0.35)
    path = tmp_path / "grown.pt"
    save_checkpoint(path, model)  # any module: every layer's sizes are recorded
    # Reloaded into the model built as at the start (other weights: all are loaded).
    loaded = load_checkpoint(path, model=build(name, width=WIDTH, seed=1)).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


@pytest.mark.parametrize("name", NAMES)
def test_skip_reasons_name_modules_never_graph_nodes(name):
    model = build(name, width=WIDTH, seed=0)
    survey = survey_flows(model, torch.zeros(1, 3, 32, 32))
    known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for layer, why in survey.skipped.items():
        assert layer in known
        for quoted in re.findall(r"'([^']*)'", why):
            # operations are named by their function (a channel shuffle's unflatten), not node
            assert quoted in known or quoted in ("permute", "transpose", "unflatten"), (layer, why)


def test_a_layer_norm_over_the_channels_is_refused_per_layer_with_the_module_named():
    convnext = build("convnext", width=WIDTH, seed=0)
    with pytest.raises(GrowthError, match=r"cannot grow 'stages.5': its output feeds the "
                                          r"LayerNorm 'stages.6.norm', which normalises over "
                                          r"the channels"):
        RandomGrower().grow(convnext, None, None, example_input=torch.zeros(1, 3, 32, 32),
                            layers=["stages.5"])


class _Product(nn.Module):
    """Two branches multiplied (a GLU-style gate, neither computed from the other): both skip."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 6, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x)) * torch.sigmoid(self.fc2(F.relu(self.fc1(x))))
        return self.head(F.relu(self.conv2(h)).mean((2, 3)))


def test_report_lists_skipped_layers_and_the_growable_share():
    report = RandomGrower(seed=0).grow(_Product(), None, None,
                                       example_input=torch.zeros(1, 3, 8, 8), ratio=0.5)
    assert report.widths_before == {"fc1": 2, "conv2": 5}
    assert report.skipped == {
        "conv1": "its output feeds a multiplication in the model's forward",
        "fc2": "its output feeds a multiplication in the model's forward",
    }
    assert report.skipped_widths == {"conv1": 6, "fc2": 6}
    assert report.growable_share == pytest.approx(7 / 19)


def test_coverage_command_prints_the_table_row(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "growth_coverage.py"
    monkeypatch.setattr("sys.argv", [str(script), "--models", "lenet"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "| model | random | ssd (fast) | firefly |" in out
    assert re.search(r"^\| `lenet` \| 100% · kept \| 100% · Δ \de-0\d \| 100% · ", out, re.M), out


def test_check_growth_measures_a_changed_function_and_reports_a_refusal():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,)))]
    noisy = RandomGrower(seed=0, outgoing="small", outgoing_scale=0.5)
    check = check_growth(net, noisy, batches, F.cross_entropy)
    assert check.grew and check.output_change > KEPT and not check.keeps_function
    assert check.cell().startswith("100% · Δ ")
    head_only = nn.Sequential(nn.Linear(4, 3))
    refused = check_growth(head_only, RandomGrower(seed=0), batches, F.cross_entropy)
    assert not refused.grew and "no growable layer" in refused.reason
    assert refused.cell() == "refused: Sequential has no growable layer"
    with pytest.raises(ValueError, match="at least one"):
        check_growth(net, noisy, [], F.cross_entropy)
