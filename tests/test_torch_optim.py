"""Optimizer state across growth: carried moments, reset, schedulers, atomicity."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simcore.adapters.torch import grow_optimizer, plan_optimizer_growth  # noqa: E402
from torch import nn  # noqa: E402

from simcore.growth import (  # noqa: E402
    BatchNorm,
    ChannelFlow,
    Consumer,
    add_neurons,
    replicate_neurons,
    split_neurons,
)

MLP_FLOW = ChannelFlow("0.weight", bias="0.bias", consumers=(Consumer("2.weight"),))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def _train(model, optimizer, steps, seed=0):
    for s in range(steps):
        x, y = _batch(seed + s)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _grow_model(model, flow, grown):
    """Write the core's grown arrays into the model (a minimal test-side surgery)."""
    replaced = {}
    for name in flow.names():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            old = module._parameters[attr]
            new = nn.Parameter(grown[name].detach().clone())
            module._parameters[attr] = new
            replaced[name] = (old, new)
        else:
            module._buffers[attr] = grown[name].detach().clone()
    return replaced


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_carried_state_continues_the_old_channels_trajectory(kind):
    """Fresh neurons with zero outgoing weights leave the old channels' gradients unchanged on
    the first step after growth, so with carried state they take exactly the twin's step."""
    model = _mlp()
    optimizer = OPTIMIZERS[kind](model.parameters())
    _train(model, optimizer, 3)
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[kind](twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # step tensors are shared

    grown, cmap = add_neurons(dict(model.state_dict()), MLP_FLOW, 2,
                              rng=np.random.default_rng(0))
    replaced = _grow_model(model, MLP_FLOW, grown)
    grow_optimizer(optimizer, replaced, MLP_FLOW, cmap)

    params = optimizer.param_groups[0]["params"]
    assert [p is q for p, q in zip(params, model.parameters(), strict=True)] == [True] * 4
    assert not any(old in optimizer.state for old, _ in replaced.values())
    first = "momentum_buffer" if kind == "sgd" else "exp_avg"
    assert torch.count_nonzero(optimizer.state[model[0].weight][first][4:]) == 0
    if kind != "sgd":
        assert optimizer.state[model[0].weight]["step"].item() == 3

    _train(model, optimizer, 1, seed=10)
    _train(twin, twin_opt, 1, seed=10)
    torch.testing.assert_close(model[0].weight[:4], twin[0].weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model[0].bias[:4], twin[0].bias, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model[2].weight[:, :4], twin[2].weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model[2].bias, twin[2].bias, rtol=1e-6, atol=1e-7)


def _trained_and_grown(steps):
    """An SGD-trained MLP, its optimizer, and its first layer grown by two fresh neurons."""
    model = _mlp()
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    _train(model, optimizer, steps)
    grown, cmap = add_neurons(dict(model.state_dict()), MLP_FLOW, 2,
                              rng=np.random.default_rng(0))
    return model, optimizer, grown, cmap


def test_reset_drops_state_and_differs_from_carry():
    model, optimizer, grown, cmap = _trained_and_grown(3)
    fresh_model, carry_model = copy.deepcopy(model), copy.deepcopy(model)
    carry_opt = OPTIMIZERS["sgd"](carry_model.parameters())
    carry_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    grow_optimizer(carry_opt, _grow_model(carry_model, MLP_FLOW, grown), MLP_FLOW, cmap)
    replaced = _grow_model(model, MLP_FLOW, grown)
    _grow_model(fresh_model, MLP_FLOW, grown)
    grow_optimizer(optimizer, replaced, MLP_FLOW, cmap, mode="fresh", lr=0.05)
    assert len(optimizer.state) == 0
    assert optimizer.param_groups[0]["lr"] == 0.05
    # Exactly a freshly built optimizer (Firefly/SSD rebuild SGD after growth).
    fresh_opt = torch.optim.SGD(fresh_model.parameters(), lr=0.05, momentum=0.9)
    _train(model, optimizer, 2, seed=20)
    _train(fresh_model, fresh_opt, 2, seed=20)
    for p, q in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(p, q)
    _train(carry_model, carry_opt, 2, seed=20)
    assert not torch.allclose(carry_model[0].weight, model[0].weight)  # momentum mattered


def test_replicated_channels_take_their_parents_state_for_adamw_amsgrad():
    model = _mlp()
    optimizer = OPTIMIZERS["adamw_amsgrad"](model.parameters())
    _train(model, optimizer, 2)
    before = {n: {k: v.clone() for k, v in optimizer.state[p].items()}
              for n, p in model.named_parameters()}
    grown, cmap = replicate_neurons(dict(model.state_dict()), MLP_FLOW, [1, 3, 1])
    replaced = _grow_model(model, MLP_FLOW, grown)
    grow_optimizer(optimizer, replaced, MLP_FLOW, cmap)
    rows = [0, 1, 2, 3, 1, 3, 1]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        state_w = optimizer.state[model[0].weight][key]
        assert torch.equal(state_w, before["0.weight"][key][rows])
        assert torch.equal(optimizer.state[model[0].bias][key], before["0.bias"][key][rows])
        assert torch.equal(optimizer.state[model[2].weight][key],
                           before["2.weight"][key][:, rows])
        assert torch.equal(optimizer.state[model[2].bias][key], before["2.bias"][key])
    assert optimizer.state[model[2].weight]["step"].item() == 2
    _train(model, optimizer, 1, seed=30)  # the step runs on the grown state
    assert torch.isfinite(model[0].weight).all()


def test_conv_with_batchnorm_and_a_sequence_of_maps():
    """Firefly-style growth: split, then add; BN's gamma/beta are parameters and follow."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    flow = ChannelFlow("0.weight", norm=BatchNorm("1.weight", "1.bias", "1.running_mean",
                                                  "1.running_var"),
                       consumers=(Consumer("3.weight"),))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 6, 6)
    model(x).square().mean().backward()
    optimizer.step()
    before = {n: optimizer.state[p]["momentum_buffer"].clone()
              for n, p in model.named_parameters()}
    params = dict(model.state_dict())
    split, map1 = split_neurons(params, flow, [2], torch.randn(1, 27, dtype=torch.float32))
    grown, map2 = add_neurons(split, flow, 1, rng=np.random.default_rng(2))
    replaced = {}
    for name in flow.names():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            replaced[name] = (module._parameters[attr], nn.Parameter(grown[name].clone()))
    grow_optimizer(optimizer, replaced, flow, [map1, map2])
    new = {name: pair[1] for name, pair in replaced.items()}
    gamma = optimizer.state[new["1.weight"]]["momentum_buffer"]
    assert torch.equal(gamma[:4], before["1.weight"])
    assert gamma[4] == before["1.weight"][2] and gamma[5] == 0
    consumer = optimizer.state[new["3.weight"]]["momentum_buffer"]
    assert consumer.shape == (2, 6, 1, 1)
    assert torch.equal(consumer[:, 4], before["3.weight"][:, 2])
    assert torch.count_nonzero(consumer[:, 5]) == 0
    assert optimizer.state[new["0.weight"]]["momentum_buffer"].is_contiguous()


def test_lr_scheduler_keeps_going_after_growth():
    model, twin = _mlp(), _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    twin_sched = torch.optim.lr_scheduler.CosineAnnealingLR(twin_opt, T_max=10)
    lrs, twin_lrs = [], []
    for epoch in range(8):
        if epoch == 4:
            grown, cmap = add_neurons(dict(model.state_dict()), MLP_FLOW, 3,
                                      rng=np.random.default_rng(0))
            grow_optimizer(optimizer, _grow_model(model, MLP_FLOW, grown), MLP_FLOW, cmap)
            assert scheduler.last_epoch == twin_sched.last_epoch == 4
        _train(model, optimizer, 1, seed=epoch)
        _train(twin, twin_opt, 1, seed=epoch)
        scheduler.step()
        twin_sched.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        twin_lrs.append(twin_opt.param_groups[0]["lr"])
    assert lrs == twin_lrs
    assert scheduler.last_epoch == 8
    assert model[0].weight.shape == (7, 5)


def test_failure_leaves_the_optimizer_untouched_and_undo_restores():
    model = _mlp()
    optimizer = OPTIMIZERS["adam"](model.parameters())
    _train(model, optimizer, 2)
    groups_before = [list(g["params"]) for g in optimizer.param_groups]
    state_before = {p: dict(s) for p, s in optimizer.state.items()}
    grown, cmap = add_neurons(dict(model.state_dict()), MLP_FLOW, 2,
                              rng=np.random.default_rng(0))
    # A new parameter whose size disagrees with the channel map: planned, fails, nothing moved.
    bad = {n: (p, nn.Parameter(grown[n].clone())) for n, p in model.named_parameters()
           if n in MLP_FLOW.names()}
    bad["0.bias"] = (model[0].bias, nn.Parameter(torch.zeros(5)))
    with pytest.raises(ValueError, match="0.bias"):
        grow_optimizer(optimizer, bad, MLP_FLOW, cmap)
    # The core rejects a map whose old channel count is not the parameters'.
    good = {n: (p, nn.Parameter(grown[n].clone())) for n, p in model.named_parameters()
            if n in MLP_FLOW.names()}
    _, wrong_map = add_neurons(dict(_mlp().state_dict()) | {
        "0.weight": torch.zeros(3, 5), "0.bias": torch.zeros(3),
        "2.weight": torch.zeros(3, 3)}, MLP_FLOW, 2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError):
        grow_optimizer(optimizer, good, MLP_FLOW, wrong_map)
    assert [list(g["params"]) for g in optimizer.param_groups] == groups_before
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"],
                                      groups_before[0], strict=True))
    assert set(optimizer.state) == set(state_before)
    for p, s in state_before.items():
        assert all(optimizer.state[p][k] is v for k, v in s.items())

    change = plan_optimizer_growth(optimizer, good, MLP_FLOW, cmap, mode="fresh", lr=0.5)
    assert optimizer.param_groups[0]["params"][0] is groups_before[0][0]  # planning changes nothing
    change.apply()
    assert len(optimizer.state) == 0 and optimizer.param_groups[0]["lr"] == 0.5
    change.undo()
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"],
                                      groups_before[0], strict=True))
    for p, s in state_before.items():
        assert all(optimizer.state[p][k] is v for k, v in s.items())


def test_bad_arguments_name_themselves():
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grown, cmap = add_neurons(dict(model.state_dict()), MLP_FLOW, 1,
                              rng=np.random.default_rng(0))
    replaced = {"0.weight": (model[0].weight, nn.Parameter(grown["0.weight"]))}
    with pytest.raises(TypeError, match="optimizer"):
        grow_optimizer(object(), replaced, MLP_FLOW, cmap)
    with pytest.raises(ValueError, match="mode"):
        grow_optimizer(optimizer, replaced, MLP_FLOW, cmap, mode="keep")
    with pytest.raises(TypeError, match="channel_map"):
        grow_optimizer(optimizer, replaced, MLP_FLOW, "add")
    with pytest.raises(TypeError, match="flow"):
        grow_optimizer(optimizer, replaced, "0.weight", cmap)
    with pytest.raises(ValueError, match="'9.weight'"):
        grow_optimizer(optimizer, {"9.weight": replaced["0.weight"]}, MLP_FLOW, cmap)
    with pytest.raises(TypeError, match="pair"):
        grow_optimizer(optimizer, {"0.weight": model[0].weight}, MLP_FLOW, cmap)
    with pytest.raises(ValueError, match="lr"):
        grow_optimizer(optimizer, replaced, MLP_FLOW, cmap, lr=0.0)
    with pytest.raises(ValueError, match="already in the optimizer"):
        grow_optimizer(optimizer, {"0.weight": (model[0].weight, model[2].weight)},
                       MLP_FLOW, cmap)



def test_reset_is_the_deprecated_name_of_fresh():
    model, optimizer, grown, cmap = _trained_and_grown(2)
    replaced = _grow_model(model, MLP_FLOW, grown)
    with pytest.warns(DeprecationWarning, match="'fresh'"):
        grow_optimizer(optimizer, replaced, MLP_FLOW, cmap, mode="reset")
    assert len(optimizer.state) == 0  # every parameter's state dropped, as with "fresh"
