"""Pieces of `simcore grow` against independent oracles: Grad-CAM, the Eq. 4-only penalty,
the summary table, the run configuration and the command line (the modules' examples run in
tests/test_doctests.py)."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from simcore.adapters.torch import SimilarityPenalty
from torch import nn

from simcore.experiment import RunConfig, grad_cam, preset
from simcore.experiment.cli import build_parser, plan
from simcore.experiment.report import format_table, summarize
from simcore.experiment.terms import make_phase


class _TinyCam(nn.Module):
    """conv -> ReLU -> global average pool -> linear: Grad-CAM has a closed form here."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))


def test_grad_cam_matches_the_closed_form_of_a_pooled_linear_head():
    torch.manual_seed(0)
    model = _TinyCam()
    images = torch.randn(3, 3, 8, 8)
    targets = torch.tensor([0, 2, 3])
    maps = grad_cam(model, images, targets, layer="conv")
    # d y_c / d A_k(h, w) = W_ck * 1[A_k(h, w) > 0] / (H W) after the ReLU; Grad-CAM explains
    # the conv output A, so alpha_k = W_ck * (share of positive positions of A_k) / (H W)
    with torch.no_grad():
        a = model.conv(images)
        positive = (a > 0).to(a.dtype).mean(dim=(2, 3))
        alpha = model.head.weight[targets] * positive / 64
        cam = F.relu((alpha[:, :, None, None] * a).sum(dim=1))
        cam = cam / cam.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(maps, cam, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the model's gradients untouched


def test_grad_cam_defaults_to_the_predicted_class_and_the_last_conv():
    torch.manual_seed(1)
    model = _TinyCam()
    images = torch.randn(2, 3, 8, 8)
    predicted = model(images).argmax(dim=1)
    torch.testing.assert_close(grad_cam(model, images), grad_cam(model, images, predicted,
                                                                 layer="conv"))
    with pytest.raises(ValueError, match="not a module"):
        grad_cam(model, images, layer="nope")
    with pytest.raises(ValueError, match="2 entries for 3 images"):
        grad_cam(model, torch.randn(3, 3, 8, 8), torch.tensor([0, 1]))


class _TinyBnCam(nn.Module):
    """conv -> BatchNorm -> ReLU module -> global average pool -> linear, as the paper's blocks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.act = nn.ReLU()
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))).mean(dim=(2, 3)))


def test_grad_cam_explains_the_rectified_output_after_batchnorm_by_default():
    from simcore.experiment.gradcam import default_cam_layer

    torch.manual_seed(2)
    model = _TinyBnCam()
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.normal_()
        model.bn.bias.normal_()
    model.eval()
    images = torch.randn(3, 3, 8, 8)
    targets = torch.tensor([1, 0, 3])
    assert default_cam_layer(model) == "act"
    maps = grad_cam(model, images, targets)
    # A = ReLU(BN(conv(x))) feeds a mean pool and a linear head: dy_c/dA_k = W_ck / (H W), so
    # the map is ReLU(sum_k W_ck A_k) up to the positive factor removed by the scaling
    with torch.no_grad():
        activation = model.act(model.bn(model.conv(images)))
        cam = F.relu(torch.einsum("bk,bkhw->bhw", model.head.weight[targets], activation))
        expected = cam / cam.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(maps, expected)
    # the layer can still be chosen: the conv's raw output gives another map
    assert not torch.allclose(grad_cam(model, images, targets, layer="conv"), maps)


def test_weight_sum_penalty_has_the_formula_s_gradient():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    penalty = SimilarityPenalty(net, layers=["0", "2"], lam=0.3, similarity=False)
    refs = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    with torch.no_grad():
        net[0].weight.mul_(1.5).add_(0.1)
        net[2].weight.mul_(0.7)
    value = penalty()
    value.backward()
    ours = [net[0].weight.grad.clone(), net[2].weight.grad.clone()]
    net.zero_grad()

    def rms(w):
        return w.square().mean().sqrt()

    formula = 0.3 * sum(torch.log(rms(w) / rms(r)).square()
                        for w, r in zip([net[0].weight, net[2].weight], refs, strict=True))
    formula.backward()
    torch.testing.assert_close(value.detach(), formula.detach())
    torch.testing.assert_close(ours[0], net[0].weight.grad)
    torch.testing.assert_close(ours[1], net[2].weight.grad)


def test_the_eq4_only_phase_changes_nothing_right_after_a_growth():
    # the well-posed forms are 0 with zero gradient at W = W_prev (see terms.py)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    before = [p.detach().clone() for p in net.parameters()]
    phase = make_phase("eq4", method="random", phase="weights_only", steps=20, lam=1.0, lr=0.5,
                       form="squared_log", anchor="snapshot")
    phase.start(net, ["0", "2"])
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    # ... while Eq. 2 alone moves the grown layer's neurons apart
    eq2 = make_phase("eq2", method="random", phase="weights_only", steps=20, lam=1.0, lr=0.5,
                     form="squared_log", anchor="snapshot")
    from simcore.adapters.torch import similarity_loss

    start = similarity_loss(net[0].weight.detach()).item()
    eq2.start(net, ["0"])
    assert similarity_loss(net[0].weight.detach()).item() < start
    assert make_phase("none", method="random", phase="joint", steps=1, lam=0.1, lr=0.1,
                      form="squared_log", anchor="snapshot") is None


def _result(method, terms, seed, accuracy, seconds, model="vgg16"):
    return {"config": {"model": model, "method": method, "terms": terms, "seed": seed},
            "final_accuracy": accuracy, "training_seconds": seconds,
            "phase_steps": None if terms == "none" else 10, "parameters_seed": 28666,
            "parameters_final": 300000 + seed}


def test_summary_is_mean_and_sample_std_over_seeds_in_the_paper_s_order():
    runs = [_result("ssd", "both", s, a, 10 + s) for s, a in enumerate([90.0, 91.0, 95.0])]
    runs += [_result("random", t, 0, 80.0, 5.0) for t in ("both", "eq4", "none", "eq2")]
    rows = summarize(runs)
    assert [(r["method"], r["terms"]) for r in rows] == [
        ("random", "none"), ("random", "eq2"), ("random", "eq4"), ("random", "both"),
        ("ssd", "both")]
    ssd = rows[-1]
    assert ssd["accuracy_mean"] == pytest.approx(92.0)
    assert ssd["accuracy_std"] == pytest.approx(statistics.stdev([90.0, 91.0, 95.0]))
    assert ssd["time_mean"] == pytest.approx(11.0) and ssd["seeds"] == [0, 1, 2]
    table = format_table(rows, legend=False).splitlines()
    assert table[0].split()[:4] == ["Method", "Architecture", "Eq.2", "Eq.4"]
    marks = [line.split()[2:4] for line in table[1:]]
    assert marks == [["x", "x"], ["o", "x"], ["x", "o"], ["o", "o"], ["o", "o"]]
    assert "92.00 ± 2.65" in table[-1] and "0.0287M -> 0.3000M" in table[-1]


def test_run_config_validates_every_choice_by_name():
    with pytest.raises(ValueError, match="method"):
        RunConfig(method="grow")
    with pytest.raises(TypeError, match="epochs"):
        RunConfig(epochs=2.5)
    with pytest.raises(ValueError, match="ratio"):
        RunConfig(ratio=-0.1)
    with pytest.raises(ValueError, match="lr must be a finite positive"):
        RunConfig(lr=math.inf)
    with pytest.raises(TypeError, match="unknown RunConfig field"):
        RunConfig().replace(nope=1)
    with pytest.raises(ValueError, match="unknown model 'resnet'; expected one of"):
        RunConfig(model="resnet")
    paper = preset("paper")
    assert (paper.dataset, paper.epochs, paper.grow_every, paper.max_growths, paper.batch_size,
            paper.momentum, paper.lr_schedule) == ("cifar10", 250, 50, 4, 128, 0.9, "cosine")
    assert [paper.replace(method=m).phase_steps_or_default
            for m in ("random", "ssd", "firefly")] == [20, 10, 15]
    assert preset("quick").training_key() == preset("quick").replace(device="cuda").training_key()


@pytest.mark.parametrize("field, value, match", [
    ("phase_lr", 0.0, "phase_lr must be a finite positive"),
    ("phase_lr", -0.01, "phase_lr must be a finite positive"),
    ("phase_lr", 0.2, r"phase_lr \* lam = 2"),   # with lam 10: the Eq. 4 steps would diverge
    ("momentum", 1.0, r"momentum must lie in \[0, 1\)"),
    ("momentum", 1.5, r"momentum must lie in \[0, 1\)"),
    ("momentum", -0.1, "momentum must be a finite non-negative"),
])
def test_run_config_refuses_a_dead_phase_or_a_divergent_one(field, value, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(**{field: value})
    assert getattr(RunConfig(**{field: 0.05}), field) == 0.05


def test_command_line_plans():
    parse = build_parser().parse_args
    quick = plan(parse([]))
    assert quick["methods"] == ["firefly"] and quick["terms"] == ["none", "both", "control"]
    assert quick["seeds"] == [0, 1, 2, 3, 4] and quick["base"] == preset("quick")
    assert quick["phase_steps"] == [None]
    compare = plan(parse(["--compare", "--ablation", "--model", "mobilenet_v1", "--N", "7"]))
    assert compare["methods"] == ["random", "ssd", "firefly"]
    assert compare["terms"] == ["none", "eq2", "eq4", "both"]
    assert compare["seeds"] == [0, 1, 2, 3, 4]
    assert compare["base"].model == "mobilenet_v1" and compare["phase_steps"] == [7]
    sweep = plan(parse(["--N", "1", "5", "10", "--similarity", "both", "--control"]))
    assert sweep["phase_steps"] == [1, 5, 10]
    assert sweep["terms"] == ["none", "both", "control"]
    with pytest.raises(ValueError, match="validation"):
        plan(parse(["--N", "1", "5", "--val-fraction", "0"]))
    with pytest.raises(ValueError, match="ablation"):
        plan(parse(["--ablation", "--similarity", "on"]))
    # the control mirrors a weights-only phase: a joint phase's default runs leave it out
    assert plan(parse(["--phase", "joint"]))["terms"] == ["none", "both"]
    with pytest.raises(ValueError, match="control"):
        plan(parse(["--phase", "joint", "--control"]))
    paper = plan(parse(["--preset", "paper", "--similarity", "on", "--data-root", "/d"]))
    assert paper["terms"] == ["both"] and paper["base"].data_root == "/d"
    assert str(paper["out"]).endswith("paper")
    with pytest.raises(ValueError, match="epochs"):
        plan(parse(["--epochs", "0"]))


def test_the_simcore_command_imports_torch_only_for_grow():
    code = ("import sys, simcore, simcore.cli\n"
            "simcore.cli.build_parser().parse_args(['grow', '--epochs', '3'])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
