"""The torch similarity penalty: gradients, layer choice, snapshots, compile and autocast."""

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simcore.adapters.torch import (  # noqa: E402
    SimilarityPenalty,
    growth_objective,
    mobilenet_v1,
    similarity_loss,
    vgg16,
)
from torch import nn  # noqa: E402

import simcore  # noqa: E402


def _weights_away_from_zero_cosines(shape, seed, neuron_axis=0, margin=0.02):
    """Gaussian weights whose cosines all keep ``margin`` from 0, where |C| has a kink."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        c = simcore.similarity_map(w, neuron_axis=neuron_axis)
        off = c[~torch.eye(c.shape[0], dtype=torch.bool)]
        if off.abs().min() > margin:
            return w
    raise AssertionError("could not draw weights away from C_ij = 0")


@pytest.mark.parametrize(
    "shape, neuron_axis, block_size",
    [((5, 7), 0, None), ((4, 3, 3, 3), 0, None), ((3, 2, 6), -1, None), ((6, 4), 0, 4)],
)
def test_gradcheck_float64(shape, neuron_axis, block_size):
    w = _weights_away_from_zero_cosines(shape, seed=1, neuron_axis=neuron_axis)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: similarity_loss(x, neuron_axis=neuron_axis, block_size=block_size), (w,)
    )


def test_gradient_is_the_cores_and_matches_plain_autograd():
    w = _weights_away_from_zero_cosines((8, 2, 3, 3), seed=2)
    ours = w.clone().requires_grad_(True)
    similarity_loss(ours).backward()
    value, core_grad = simcore.similarity_loss_and_grad(w)
    assert torch.equal(ours.grad, core_grad)
    # Plain autograd through the core's formula (smooth away from C_ij = 0).
    traced = w.clone().requires_grad_(True)
    (auto_grad,) = torch.autograd.grad(simcore.similarity_loss(traced), traced)
    torch.testing.assert_close(ours.grad, auto_grad, rtol=1e-10, atol=1e-13)
    # The value-only path sums the tiles of |C|, the gradient path the row sums G_i . u_i
    # (docs/design.md): the same loss to a few ulp, not bit for bit.
    assert similarity_loss(w).item() == pytest.approx(value.item(), rel=1e-14)


def test_grad_output_scales_gradient_and_dtype_is_kept():
    w = _weights_away_from_zero_cosines((6, 5), seed=3).float().requires_grad_(True)
    (3.0 * similarity_loss(w)).backward()
    _, core_grad = simcore.similarity_loss_and_grad(w.detach())
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, 3.0 * core_grad)


def test_a_retained_graph_gives_the_same_gradient_on_every_backward():
    # The first backward hands the kept gradient itself to autograd; a second one
    # recomputes it from the saved weight rather than reuse a tensor the caller now owns.
    w = _weights_away_from_zero_cosines((6, 5), seed=3).requires_grad_(True)
    _, core_grad = simcore.similarity_loss_and_grad(w.detach())
    loss = similarity_loss(w)
    (first,) = torch.autograd.grad(2.0 * loss, w, retain_graph=True)
    first.zero_()  # the caller's tensor to do with as it likes
    (second,) = torch.autograd.grad(loss, w, retain_graph=True)
    torch.testing.assert_close(second, core_grad, rtol=1e-12, atol=1e-15)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(w.grad, 2.0 * core_grad, rtol=1e-12, atol=1e-15)


def test_a_second_backward_after_changing_the_weight_in_place_raises():
    w = _weights_away_from_zero_cosines((6, 5), seed=3).requires_grad_(True)
    loss = similarity_loss(w)
    loss.backward(retain_graph=True)
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_orthogonal_rows_give_exactly_zero_gradient():
    w = torch.zeros(4, 6, dtype=torch.float32)
    w[0, 0], w[1, 3], w[2, 1], w[3, 5] = 2.0, -0.5, 1.0, 7.0
    w.requires_grad_(True)
    loss = similarity_loss(w)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(w.grad) == 0


def test_zero_rows_get_zero_gradient_and_no_nan():
    w = _weights_away_from_zero_cosines((5, 4), seed=4)
    w[2] = 0.0
    w.requires_grad_(True)
    loss = similarity_loss(w)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.all(w.grad[2] == 0)
    assert torch.isfinite(w.grad).all()


def test_no_gradient_needed_returns_same_value():
    w = _weights_away_from_zero_cosines((5, 4), seed=5)
    assert similarity_loss(w).item() == simcore.similarity_loss(w).item()
    assert similarity_loss(w).grad_fn is None


def test_growth_objective_matches_core_and_refs_get_no_gradient():
    ws = [_weights_away_from_zero_cosines(s, seed=6) for s in [(4, 3), (3, 2, 2)]]
    refs = [1.5 * w + 0.1 for w in ws]
    params = [w.clone().requires_grad_(True) for w in ws]
    ref_params = [r.clone().requires_grad_(True) for r in refs]
    value = growth_objective(params, ref_params, lam=0.7, form="abs_log", statistic="mean_abs")
    value.backward()
    core_value, core_grads = simcore.growth_objective_and_grad(
        ws, refs, lam=0.7, form="abs_log", statistic="mean_abs"
    )
    assert value.item() == core_value.item()
    for p, g in zip(params, core_grads, strict=True):
        assert torch.equal(p.grad, g)
    assert all(r.grad is None for r in ref_params)
    # gradcheck of the whole Eq. 5 (squared-log form is smooth).
    for p in params:
        p.grad = None
    assert torch.autograd.gradcheck(
        lambda a, b: growth_objective([a, b], refs, lam=0.7), tuple(params)
    )


def test_growth_objective_rejects_bad_input():
    w = torch.randn(3, 4)
    with pytest.raises(TypeError, match="weights"):
        growth_objective(w, None, lam=0.0)
    with pytest.raises(TypeError, match=r"weights\[0\]"):
        growth_objective([np.ones((3, 4))], None, lam=0.0)
    with pytest.raises(ValueError, match="refs has 2"):
        growth_objective([w], [w, w], lam=1.0)
    with pytest.raises(ValueError, match="lam"):
        growth_objective([w], None, lam=1.0)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        similarity_loss(np.ones((3, 4)))


def _expected(weights, refs, lam):
    return sum(
        simcore.similarity_loss(w).item() + lam * simcore.weight_sum_penalty(w, r).item()
        for w, r in zip(weights, refs, strict=True)
    )


def test_penalty_chooses_conv_and_linear_weights_without_depthwise():
    torch.manual_seed(0)
    model = mobilenet_v1(width=8)
    penalty = SimilarityPenalty(model, lam=0.0)
    depthwise = [n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 13
    assert not set(depthwise) & set(penalty.layer_names)
    assert penalty.layer_names == ["features.0"] + [f"features.{6 + 6 * b}" for b in range(13)] + [
        "classifier"
    ]
    weights = [model.get_submodule(n).weight.detach() for n in penalty.layer_names]
    value = penalty()
    assert value.item() == pytest.approx(
        sum(simcore.similarity_loss(w).item() for w in weights), rel=1e-6
    )
    value.backward()
    for name, p in model.named_parameters():
        chosen = name.endswith(".weight") and name[: -len(".weight")] in penalty.layer_names
        assert (p.grad is not None) == chosen, name
    with_depthwise = SimilarityPenalty(model, lam=0.0, depthwise="include")
    only = SimilarityPenalty(model, lam=0.0, depthwise="only")
    assert set(only.layer_names) == set(with_depthwise.layer_names) - set(
        SimilarityPenalty(model, lam=0.0).layer_names)
    with pytest.warns(DeprecationWarning, match="include_depthwise"):
        old = SimilarityPenalty(model, lam=0.0, include_depthwise=True)
    assert old.layer_names == with_depthwise.layer_names
    assert len(with_depthwise.layer_names) == 15 + 13


def test_penalty_layer_selection_by_callable_and_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 5),
                          nn.Linear(5, 2))
    by_callable = SimilarityPenalty(model, lam=0.0,
                                    layers=lambda name, m: isinstance(m, nn.Linear))
    assert by_callable.layer_names == ["3", "4"]
    by_names = SimilarityPenalty(model, lam=0.0, layers=["4", "0"])
    assert by_names.layer_names == ["4", "0"]
    with pytest.raises(ValueError, match="'7'"):
        SimilarityPenalty(model, lam=0.0, layers=["7"])
    with pytest.raises(ValueError, match="ReLU"):
        SimilarityPenalty(model, lam=0.0, layers=["1"])
    with pytest.raises(TypeError, match="layers"):
        SimilarityPenalty(model, lam=0.0, layers=3)
    with pytest.raises(ValueError, match="no conv or linear"):
        SimilarityPenalty(model, lam=0.0, layers=lambda name, m: False)
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="depthwise='include'"):
        SimilarityPenalty(depthwise, lam=0.0, layers=["0"])
    assert SimilarityPenalty(depthwise, lam=0.0, layers=["0"], depthwise="only").layer_names == [
        "0"]
    with pytest.raises(ValueError, match="not a depthwise"):
        SimilarityPenalty(model, lam=0.0, layers=["0"], depthwise="only")
    with pytest.raises(ValueError, match="depthwise"):
        SimilarityPenalty(model, lam=0.0, depthwise="some")
    with pytest.raises(TypeError, match="model"):
        SimilarityPenalty(object(), lam=0.0)
    with pytest.raises(ValueError, match="anchor"):
        SimilarityPenalty(model, lam=0.0, anchor="last")


def test_penalty_strength_and_lambda_with_snapshot_anchor():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    penalty = SimilarityPenalty(model, lam=0.5, strength=2.0)
    refs = [m.weight.detach().clone() for m in model]
    with torch.no_grad():
        model[0].weight.mul_(2.0)  # similarity unchanged, RMS doubled: Eq. 4 = (log 2)^2
    weights = [m.weight.detach() for m in model]
    first = penalty().item()
    assert first == pytest.approx(2.0 * _expected(weights, refs, 0.5), rel=1e-6)
    assert first == pytest.approx(
        2.0 * (_expected(weights, weights, 0.0) + 0.5 * math.log(2.0) ** 2), rel=1e-6
    )
    assert penalty().item() == first  # the snapshot anchor does not move
    penalty.snapshot()
    assert penalty().item() == pytest.approx(2.0 * _expected(weights, weights, 0.0), rel=1e-6)


def test_previous_anchor_refreshes_after_each_call():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5))
    penalty = SimilarityPenalty(model, lam=1.0, anchor="previous")
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    similarity = simcore.similarity_loss(model[0].weight.detach()).item()
    assert penalty().item() == pytest.approx(similarity + math.log(3.0) ** 2, rel=1e-6)
    # The second call measures against the weights of the first one: unchanged, Eq. 4 = 0.
    assert penalty().item() == pytest.approx(similarity, rel=1e-6)


def test_growth_without_snapshot_is_an_error():
    model = vgg16(width=4)
    penalty = SimilarityPenalty(model, lam=0.1)
    model.features[0].weight = nn.Parameter(torch.randn(6, 3, 3, 3))
    with pytest.raises(ValueError, match="features.0.*snapshot"):
        penalty()
    penalty.snapshot()
    assert torch.isfinite(penalty())
    assert SimilarityPenalty(model, lam=0.0)().item() > 0  # lam = 0 needs no snapshot


@pytest.mark.parametrize("anchor", ["snapshot", "previous"])
def test_decorrelate_is_the_cores_weight_only_phase_in_place(anchor):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    penalty = SimilarityPenalty(model, lam=0.2, anchor=anchor)
    before = [m.weight.detach().clone() for m in model]
    biases = [m.bias.detach().clone() for m in model]
    params = [m.weight for m in model]
    expected = simcore.decorrelate(before, before, steps=5, lr=0.1, lam=0.2, anchor=anchor)
    penalty.decorrelate(steps=5, lr=0.1)
    for m, p, e, b in zip(model, params, expected, biases, strict=True):
        assert m.weight is p
        assert torch.equal(m.weight.detach(), e)
        assert torch.equal(m.bias.detach(), b)
    after = sum(simcore.similarity_loss(m.weight.detach()).item() for m in model)
    assert after < sum(simcore.similarity_loss(w).item() for w in before)
    with pytest.raises(ValueError, match="steps"):
        penalty.decorrelate(steps=-1, lr=0.1)


def _train_step(model, penalty, x, y):
    loss = nn.functional.cross_entropy(model(x), y) + penalty()
    loss.backward()
    return loss.detach()


@pytest.mark.slow  # long: see tests/conftest.py for the two tiers
def test_compile_smoke_matches_eager():
    # aot_eager runs dynamo and AOTAutograd (what meets the autograd.Function) without
    # inductor's C++ build, which takes minutes on a small CPU; the core itself runs
    # eagerly behind a graph break (torch._disable_dynamo, torch.compiler.disable imported at
    # the first call).
    torch.manual_seed(4)
    model = vgg16(width=4)
    penalty = SimilarityPenalty(model, lam=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    eager_loss = _train_step(model, penalty, x, y)
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(_train_step, backend="aot_eager")
    compiled_loss = compiled(model, penalty, x, y)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_importing_the_adapter_leaves_dynamo_for_the_first_loss():
    # dynamo takes as long to import as torch itself: every `simcore grow` and every process
    # that grows a model without the loss would pay it (the functions import it when called)
    code = ("import sys\n"
            "import simcore.adapters.torch, simcore.adapters.torch.penalty\n"
            "assert 'torch._dynamo' not in sys.modules, 'importing the adapter imported dynamo'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_autocast_bf16_keeps_fp32_reductions():
    torch.manual_seed(5)
    model = vgg16(width=8)
    penalty = SimilarityPenalty(model, lam=0.1)
    with torch.no_grad():
        for w in penalty.weights():
            w.mul_(1.1)
    reference = penalty()
    reference.backward()
    ref_grads = [w.grad.clone() for w in penalty.weights()]
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = penalty()
    assert value.dtype == torch.float32
    assert value.item() == reference.item()  # autocast never reached the reductions
    value.backward()
    for w, g in zip(penalty.weights(), ref_grads, strict=True):
        assert w.grad.dtype == torch.float32
        assert torch.equal(w.grad, g)


def test_bf16_parameters_get_bf16_gradients_close_to_fp32():
    # A common positive component keeps every cosine far from 0, where bf16 rounding
    # could flip a sign of C_ij and so a term of the gradient.
    gen = torch.Generator().manual_seed(6)
    w32 = 0.5 * torch.randn(16, 4, 3, 3, generator=gen) + 1.0
    w16 = w32.to(torch.bfloat16).requires_grad_(True)
    loss = similarity_loss(w16)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    value, grad = simcore.similarity_loss_and_grad(w16.detach().float())
    torch.testing.assert_close(loss.float(), value, rtol=1e-2, atol=0)
    torch.testing.assert_close(w16.grad.float(), grad, rtol=2e-2, atol=1e-3)


def _second_order(f, w):
    """Differentiate ``f(w) + sum(w**2)`` twice; the quadratic keeps the first gradient
    attached to the graph, so without a guard the penalty's Hessian would silently be 0."""
    w = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(w) + (w**2).sum(), w, create_graph=True)
    return torch.autograd.grad(grad.sum(), w)


def test_second_order_gradients_raise_instead_of_a_silent_zero_hessian():
    w = _weights_away_from_zero_cosines((4, 3), seed=7)
    with pytest.raises(RuntimeError, match="first-order only"):
        _second_order(similarity_loss, w)
    with pytest.raises(RuntimeError, match="first-order only"):
        _second_order(lambda x: growth_objective([x], [2.0 * w], lam=0.5), w)
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.functional.hessian(similarity_loss, w)


def test_growth_objective_when_only_refs_require_grad():
    w = _weights_away_from_zero_cosines((4, 3), seed=8)
    ref = (2.0 * w).requires_grad_(True)
    value = growth_objective([w], [ref], lam=1.0)
    value.backward()
    assert ref.grad is None and w.grad is None  # refs get no gradient, w wanted none
    assert value.item() == simcore.growth_objective([w], [2.0 * w], lam=1.0).item()


def test_without_grad_only_the_cores_value_path_runs(monkeypatch):
    w = _weights_away_from_zero_cosines((5, 4), seed=9).requires_grad_(True)
    ref = 1.5 * w.detach()
    expected_loss = simcore.similarity_loss(w.detach()).item()
    expected_objective = simcore.growth_objective([w.detach()], [ref], lam=0.3).item()

    def no_gradient_wanted(*args, **kwargs):
        raise AssertionError("the gradient was computed although none was needed")

    monkeypatch.setattr(simcore, "similarity_loss_and_grad", no_gradient_wanted)
    monkeypatch.setattr(simcore, "growth_objective_and_grad", no_gradient_wanted)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            loss = similarity_loss(w)
            objective = growth_objective([w], [ref], lam=0.3)
        assert loss.item() == expected_loss and loss.grad_fn is None
        assert objective.item() == expected_objective and objective.grad_fn is None
    plain = w.detach()
    assert similarity_loss(plain).item() == expected_loss
    assert growth_objective([plain], [ref], lam=0.3).item() == expected_objective


def test_failed_refs_assignment_leaves_refs_unchanged():
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    penalty = SimilarityPenalty(model, lam=1.0)
    before = penalty.refs
    with pytest.raises(ValueError, match="'1'.*snapshot"):
        penalty.refs = [torch.ones(5, 6), torch.ones(3, 3)]  # the second has the wrong shape
    with pytest.raises(ValueError, match="refs has 1"):
        penalty.refs = [torch.ones(5, 6)]
    with pytest.raises(TypeError, match=r"refs\[1\]"):
        penalty.refs = [torch.ones(5, 6), np.ones((4, 5))]
    assert all(a is b for a, b in zip(penalty.refs, before, strict=True))
    penalty.refs = [torch.ones(5, 6, dtype=torch.float64), torch.ones(4, 5)]
    assert penalty.refs[0].dtype == torch.float32 and torch.equal(penalty.refs[1],
                                                                  torch.ones(4, 5))


def test_previous_anchor_copies_nothing_when_eq4_is_left_out():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(6, 5))
    penalty = SimilarityPenalty(model, lam=0.0, anchor="previous")
    before = penalty.refs
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    penalty()
    penalty.decorrelate(steps=1, lr=0.1)
    assert all(a is b for a, b in zip(penalty.refs, before, strict=True))
    # With Eq. 4 in the value (similarity=False reads W_prev even at lam = 0) it refreshes.
    ablation = SimilarityPenalty(model, lam=0.0, anchor="previous", similarity=False)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    ablation()
    assert torch.equal(ablation.refs[0], model[0].weight.detach())


def test_penalty_rejects_unknown_choices_by_name():
    model = nn.Sequential(nn.Linear(3, 2))
    for argument in ("anchor", "form", "statistic"):
        with pytest.raises(ValueError, match=f"unknown {argument} 'nope'"):
            SimilarityPenalty(model, lam=0.0, **{argument: "nope"})


def test_depthwise_is_the_projects_predicate_with_a_depth_multiplier():
    # groups == in_channels > 1 is depthwise whatever out_channels is; one input channel is not.
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 8, 1),
                          nn.Conv2d(1, 1, 3), nn.Conv2d(8, 8, 3, groups=2))
    assert SimilarityPenalty(model, lam=0.0).layer_names == ["1", "2", "3"]
