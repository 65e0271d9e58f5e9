"""The post-growth phase has a predictable, scale-free effect, and Eq. 4 restrains scale drift.

The relative step (``step="relative"``, the default) makes ``N`` phase steps do the same to a
layer whatever its weight scale; the absolute step does not. The weight-sum term (Eq. 4) holds the
layer's scale, which the similarity steps (tangent to each row) inflate.
"""

from __future__ import annotations

import numpy as np
import pytest

import simcore


def _correlated_layer(seed: int, neurons: int = 24, fan_in: int = 72) -> np.ndarray:
    """Rows sharing a common direction, as after a growth by splitting: mean |cos| ~ 0.3."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((neurons, fan_in)) + 0.7 * rng.standard_normal((1, fan_in))


def _rms(w):
    return float(np.sqrt(np.mean(np.square(w))))


@pytest.mark.parametrize("scale", [10.0, 0.1])
def test_relative_phase_does_the_same_at_any_weight_scale(scale):
    layers = [_correlated_layer(0), _correlated_layer(1, 16, 36)]
    options = {"steps": 15, "lr": 0.03, "lam": 1.0}
    new = simcore.decorrelate(layers, **options)
    scaled = simcore.decorrelate([scale * w for w in layers], **options)
    for w, after, after_scaled in zip(layers, new, scaled, strict=True):
        np.testing.assert_allclose(after_scaled, scale * after, rtol=1e-9, atol=1e-12 * scale)
        before_loss = float(simcore.similarity_loss(w))
        assert float(simcore.similarity_loss(after)) < 0.8 * before_loss  # the phase acts
        np.testing.assert_allclose(float(simcore.similarity_loss(after_scaled)),
                                   float(simcore.similarity_loss(after)), rtol=1e-9)


def test_absolute_phase_depends_on_the_weight_scale():
    # The contrast the relative step removes: the same lr does nothing to large weights and
    # a lot to small ones, because Eq. 2's gradient shrinks as 1 / ||w_i||.
    w = _correlated_layer(0)
    drops = {}
    for scale in (10.0, 1.0, 0.1):
        [after] = simcore.decorrelate([scale * w], steps=15, lr=0.01, lam=0.0, step="absolute")
        drops[scale] = float(simcore.similarity_loss(w)) - float(simcore.similarity_loss(after))
    assert drops[10.0] < 0.01 * drops[0.1]


def test_relative_phase_effect_does_not_depend_much_on_the_width():
    # N steps of lr lower mean |cos| by a similar factor for narrow and wide layers.
    ratios = []
    for neurons, fan_in in [(16, 36), (64, 288), (128, 1152)]:
        w = _correlated_layer(3, neurons, fan_in)
        [after] = simcore.decorrelate([w], steps=15, lr=0.03, lam=0.0)
        ratios.append(float(simcore.similarity_loss(after)) / float(simcore.similarity_loss(w)))
    assert max(ratios) - min(ratios) < 0.25, ratios
    assert all(r < 0.8 for r in ratios), ratios


def test_weight_sum_term_restrains_the_scale_drift_of_the_phase():
    # Steps tangent to each row lengthen it (||u - e t|| > 1): without Eq. 4 the layer's RMS
    # drifts up; Eq. 4 pulls it back towards the post-growth snapshot.
    w = _correlated_layer(4, 32, 144)
    drift = {}
    for lam in (0.0, 10.0):
        [after] = simcore.decorrelate([w], steps=20, lr=0.05, lam=lam)
        drift[lam] = abs(_rms(after) / _rms(w) - 1.0)
    assert drift[0.0] > 1e-3
    assert drift[10.0] < 0.5 * drift[0.0]


def test_relative_update_matches_its_formula_and_refuses_bad_input():
    w = np.array([[3.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    g = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    h = np.ones_like(w)
    [moved] = simcore.relative_update([w], [g], [h], lr=0.1)
    # with n = 2 neurons, row i moves by lr * (n / 2) * (||w_i||^2 g_i + rho^2 h_i),
    # rho^2 = (9 + 2) / 2 the mean squared row norm
    expected = w - 0.1 * (np.array([[9.0], [2.0]]) * g + 5.5 * h)
    np.testing.assert_allclose(moved, expected)
    [hwio] = simcore.relative_update([w.T], [g.T], [h.T], lr=0.1, neuron_axis=-1)
    np.testing.assert_allclose(hwio, moved.T)
    [unchanged] = simcore.relative_update([w], [None], lr=0.1)
    np.testing.assert_array_equal(unchanged, w)
    with pytest.raises(ValueError, match="lr"):
        simcore.relative_update([w], [g], lr=0.0)
    with pytest.raises(ValueError, match="shape"):
        simcore.relative_update([w], [g[:, :2]], lr=0.1)
    with pytest.raises(ValueError, match="similarity_grads has 2"):
        simcore.relative_update([w], [g, g], lr=0.1)
    with pytest.raises(ValueError, match="step"):
        simcore.decorrelate([w], steps=1, lr=0.1, lam=0.0, step="natural")
    with pytest.raises(ValueError, match="lr \\* lam"):
        simcore.decorrelate([w], steps=1, lr=0.1, lam=20.0)


def test_weight_sum_step_removes_about_a_fraction_lr_lam_of_the_log_scale_drift():
    w = _correlated_layer(5)
    for lam in (10.0, 50.0):  # lr * lam = 0.1 and 0.5: a geometric decay, never an overshoot
        [after] = simcore.decorrelate([1.2 * w], [w], steps=1, lr=0.01, lam=lam,
                                      similarity=False)
        drift, start = np.log(_rms(after) / _rms(w)), np.log(1.2)
        # every row is scaled by 1 - lr * lam * drift: about a fraction lr * lam removed
        np.testing.assert_allclose(drift, start + np.log(1 - 0.01 * lam * start), rtol=1e-9)


@pytest.mark.parametrize("phase_kind", ["weights_only", "joint"])
@pytest.mark.parametrize("scale", [10.0, 0.1])
def test_torch_phase_moves_a_scaled_layer_by_the_same_relative_amount(phase_kind, scale):
    torch = pytest.importorskip("torch")
    from simcore.adapters.torch import SimilarityPhase

    def run(factor):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3), torch.nn.ReLU(),
                                  torch.nn.Conv2d(24, 16, 3))
        with torch.no_grad():
            net[2].weight.add_(0.05)       # correlated neurons, like a fresh growth
            net[2].weight.mul_(factor)
        before = net[2].weight.detach().clone()
        phase = SimilarityPhase(method="firefly", phase=phase_kind)
        phase.start(net, ["2"])
        for _ in range(phase.steps if phase_kind == "joint" else 0):
            phase.after_optimizer_step()
        after = net[2].weight.detach()
        change = float((after - before).norm() / before.norm())
        return change, float(simcore.similarity_loss(before)), float(
            simcore.similarity_loss(after))

    change, loss_before, loss_after = run(1.0)
    change_scaled, _, loss_after_scaled = run(scale)
    assert loss_after < 0.9 * loss_before and change > 0.01
    assert change_scaled == pytest.approx(change, rel=1e-4)
    assert loss_after_scaled == pytest.approx(loss_after, rel=1e-4)


def test_torch_joint_phase_with_eq4_restrains_the_drift_training_causes():
    # In the joint reading the training steps change the grown layer's scale; each decoupled
    # relative step of Eq. 5 pulls it back towards the post-growth snapshot.
    torch = pytest.importorskip("torch")
    from simcore.adapters.torch import SimilarityPhase

    def drift(lam):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 4))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
        x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
        before = net[0].weight.detach().clone()
        phase = SimilarityPhase(method="firefly", phase="joint", lam=lam, lr=0.02)
        phase.start(net, ["0"])
        while phase.active:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
            phase.after_optimizer_step()
        rms = net[0].weight.detach().square().mean().sqrt() / before.square().mean().sqrt()
        return abs(float(rms) - 1.0)

    without, with_eq4 = drift(0.0), drift(10.0)
    assert without > 0.01
    assert with_eq4 < 0.5 * without
