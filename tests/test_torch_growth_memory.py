"""A growth does not hold more copies of the model than it needs (benchmarks/growth_memory.py)."""

from __future__ import annotations

import inspect

import torch
from simcore.adapters.torch import TorchGrowthHost, apply_growth, discover_flows
from torch import nn

from simcore.growth import add_neurons, firefly_apply, firefly_candidates
from simcore.growth.firefly import FireflySelection


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def test_surgery_takes_fresh_contiguous_arrays_without_copying_them():
    net = _net()
    flow = discover_flows(net, torch.zeros(1, 3, 8, 8))[0]
    grown, cmap = add_neurons(dict(net.state_dict()), flow.channel_flow(net), 2, rng=0)
    grown = {k: v.contiguous() for k, v in grown.items()}
    producer, consumer = grown["0.weight"], grown["3.weight"]
    apply_growth(net, flow, grown, cmap)
    assert net[0].weight.data_ptr() == producer.data_ptr()  # taken as it is
    assert net[3].weight.data_ptr() == consumer.data_ptr()
    assert net(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


def test_surgery_still_copies_views_and_permuted_arrays():
    net = _net()
    flow = discover_flows(net, torch.zeros(1, 3, 8, 8))[0]
    grown, cmap = add_neurons(dict(net.state_dict()), flow.channel_flow(net), 2, rng=0)
    permuted = grown["3.weight"].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    apply_growth(net, flow, {**grown, "3.weight": permuted}, cmap)
    assert net[3].weight.is_contiguous()
    assert net[3].weight.data_ptr() != permuted.data_ptr()
    assert torch.equal(net[3].weight, permuted)


def test_firefly_shadow_model_holds_no_weights():
    net = _net()
    flows = discover_flows(net, torch.zeros(1, 3, 8, 8))
    host = TorchGrowthHost(net, flows)
    state = host.read_state()
    core = [layer.flow for layer in host.layers()]
    candidates = firefly_candidates(state, core, rng=0, new_per_layer=2)
    everything = [FireflySelection(torch.arange(c.split_directions.shape[0]).numpy(),
                                   torch.arange(c.new_count).numpy()) for c in candidates]
    widened, maps = firefly_apply(state, core, candidates, everything)
    forward = host.forward_with(widened, maps)
    shadow = inspect.getclosurevars(forward).nonlocals["shadow"]
    assert all(t.device.type == "meta" for t in [*shadow.parameters(), *shadow.buffers()])
    assert shadow[0].weight.shape[0] == widened["0.weight"].shape[0]
    out = forward(widened, torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert all(p.device.type == "cpu" for p in net.parameters())  # the model is untouched
