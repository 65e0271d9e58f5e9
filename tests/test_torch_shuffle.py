"""Channel-shuffled streams (ShuffleNetV2) grow with every method, each old channel on its path;
Firefly's new neurons there are scored, chosen and written on their paths."""

import collections

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from simcore.adapters.torch import (  # noqa: E402
    FireflyGrower,
    GrowthError,
    RandomGrower,
    SSDGrower,
    load_checkpoint,
    save_checkpoint,
    surgery_swaps,  # noqa: E402
)
from simcore.adapters.torch.discovery import survey_flows  # noqa: E402
from simcore.adapters.torch.permutations import stream_layout  # noqa: E402
from simcore.adapters.torch.stream_outgoing import stand_in_name  # noqa: E402
from simcore.adapters.torch.streams import slot_tracer  # noqa: E402
from simcore.adapters.torch.zoo import build  # noqa: E402
from torch import nn  # noqa: E402

from simcore.growth import ChannelMap, firefly_grower  # noqa: E402

GROWERS = {
    "random": lambda: RandomGrower(seed=0),
    "ssd": lambda: SSDGrower("fast", seed=0, rayleigh_steps=20),
    "firefly": lambda: FireflyGrower(seed=0),
}
#: Output moves allowed: Random keeps the function; splits of eps = 0.01 move it O(eps^2).
TOLERANCE = {"random": 1e-5, "ssd": 1e-2, "firefly": 1e-2}
STAGES = {"stage2": 5, "stage3": 9, "stage4": 5}  # branch tails per stage at the zoo's depth


def _batches(size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g))]


def _tails(model, stage):
    return {name: m.out_channels for name, m in model.named_modules()
            if name.startswith(f"{stage}.") and isinstance(m, nn.Conv2d)
            and (name.endswith("branch2.2.0") or name.endswith("branch1.1.0"))}


def _outputs(model, x):
    """Eval-mode outputs; the model is left in eval mode (the SGD step sets train mode)."""
    with torch.no_grad():
        return model.eval()(x)


def _relative_change(after, before):
    return float((after - before).abs().max() / before.abs().max())


def _sgd_step(model, optimizer, batch):
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("method", list(GROWERS))
def test_shufflenet_streams_grow_keep_the_function_train_and_reload(method, tmp_path):
    model = build("shufflenet_v2", width=0.125, seed=0)
    batches = _batches()
    x = batches[0][0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _sgd_step(model, optimizer, batches[0])  # momentum to carry
    before = _outputs(model, x)
    widths = {stage: _tails(model, stage) for stage in STAGES}
    conv5_in = model.conv5[0].in_channels
    report = GROWERS[method]().grow(model, batches, F.cross_entropy, optimizer, ratio=0.35)
    assert report.skipped == {} and report.growable_share == 1.0
    for stage, count in STAGES.items():
        grown = _tails(model, stage)
        assert len(grown) == count
        assert len(set(grown.values())) == 1, grown  # the halves stay equal
    grew = [s for s in STAGES if next(iter(_tails(model, s).values())) > next(iter(
        widths[s].values()))]
    assert len(grew) >= 2, (method, widths)
    assert model.conv5[0].in_channels > conv5_in  # the last stream's width grew
    change = _relative_change(_outputs(model, x), before)
    assert change < TOLERANCE[method], change
    weight = model.stage4[1].branch2[0][0].weight
    old = weight.detach().clone()
    assert torch.isfinite(_sgd_step(model, optimizer, batches[0]))
    assert not torch.equal(weight, old)
    path = tmp_path / "grown.pt"
    save_checkpoint(path, model)
    loaded = load_checkpoint(path, model=build("shufflenet_v2", width=0.125, seed=1)).model
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x))


def test_every_old_channel_keeps_its_path_and_unfit_widths_keep_fewer_channels():
    model = build("shufflenet_v2", width=0.125, seed=0)
    flows = [f for f in survey_flows(model, torch.zeros(1, 3, 32, 32)).flows if f.routing]
    assert [f.producer for f in flows] == ["stage2.0.branch1.1.0", "stage3.0.branch1.1.0",
                                           "stage4.0.branch1.1.0"]
    stage3 = flows[1]
    width = model.get_submodule(stage3.producer).out_channels  # 14 at this width
    tracer = slot_tracer(model, stage3.routing)
    old = tracer.slots(width)
    # At 14 + 4 a deep path has fewer slots than old channels: the growth keeps 2 of the 4.
    fits = {k: all(collections.Counter(after)[p] >= n
                   for before, after in zip(old.paths, tracer.slots(width + k).paths, strict=True)
                   for p, n in collections.Counter(before).items()) for k in range(1, 5)}
    assert fits == {1: False, 2: True, 3: False, 4: False}
    layout = stream_layout(model, stage3, ChannelMap((*range(width), -1, -1, -1, -1), "add"))
    assert layout.width == width + 2
    for p, placement in enumerate(layout.placements):
        for slot, channel in enumerate(placement.logical):
            if channel < width:  # an old channel: the same layers read it
                assert layout.new.paths[p][slot] == old.paths[p][channel]
            else:
                assert placement.outgoing[slot] == 0  # a fresh one: zero outgoing columns


def test_split_copies_share_their_parents_path_with_half_the_columns():
    model = build("shufflenet_v2", width=0.125, seed=0)
    flow = next(f for f in survey_flows(model, torch.zeros(1, 3, 32, 32)).flows if f.routing)
    width = model.get_submodule(flow.producer).out_channels
    layout = stream_layout(model, flow, ChannelMap((*range(width), 0, 5), "split"))
    placed = 0
    for p, placement in enumerate(layout.placements):
        paths = layout.new.paths[p]
        for slot, channel in enumerate(placement.logical):
            if channel >= width and placement.outgoing[slot]:  # a copy on a path
                parent = int(placement.source[slot])
                home = list(placement.logical).index(parent)
                assert paths[slot] == paths[home]
                assert placement.outgoing[slot] == placement.outgoing[home] == 0.5
                placed += 1
    assert placed >= len(layout.placements)  # most producers have room for both copies


def test_a_second_growth_recomputes_the_paths_from_the_grown_model():
    model = build("shufflenet_v2", width=0.125, seed=0)
    x = _batches()[0][0]
    before = _outputs(model, x)
    first = RandomGrower(seed=0).grow(model, None, None, example_input=x[:1], ratio=0.35)
    middle = {s: _tails(model, s) for s in STAGES}
    assert _relative_change(_outputs(model, x), before) < 1e-5
    between = _outputs(model, x)
    second = GROWERS["ssd"]().grow(model, _batches(), F.cross_entropy, ratio=0.35)
    assert first.total_added > 0 and second.total_added > 0 and second.skipped == {}
    assert sum(sum(_tails(model, s).values()) for s in STAGES) > sum(
        sum(w.values()) for w in middle.values())
    assert _relative_change(_outputs(model, x), between) < TOLERANCE["ssd"]


class _TorchvisionUnit(nn.Module):
    """torchvision's spelling: ``torch.chunk``/``split``, ``view``/``transpose``/``contiguous``."""

    def __init__(self, c_in, c_out, stride, split):
        super().__init__()
        self.stride, self.split = stride, split
        half = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                nn.Conv2d(c_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.branch2 = nn.Sequential(
            nn.Conv2d(c_in if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            if self.split:
                x1, x2 = torch.split(x, x.shape[1] // 2, dim=1)
            else:
                x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        batchsize, num_channels, height, width = out.size()
        out = out.view(batchsize, 2, num_channels // 2, height, width)
        out = torch.transpose(out, 1, 2).contiguous()
        return out.view(batchsize, -1, height, width)


class _TorchvisionShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                   nn.ReLU(inplace=True))
        self.stage = nn.Sequential(_TorchvisionUnit(8, 12, 2, False),
                                   _TorchvisionUnit(12, 12, 1, False),
                                   _TorchvisionUnit(12, 12, 1, True))
        self.conv5 = nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.conv5(self.stage(self.conv1(x))).mean([2, 3]))


@pytest.mark.parametrize("method", list(GROWERS))
def test_torchvision_spelling_of_the_shuffle_grows_the_same_way(method):
    torch.manual_seed(0)
    model = _TorchvisionShuffle()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g))
    model(batch[0])  # BatchNorm statistics that are not the identity
    before = _outputs(model, batch[0])
    tails = ("stage.0.branch1.2", "stage.0.branch2.5", "stage.1.branch2.5", "stage.2.branch2.5")
    report = GROWERS[method]().grow(model, [batch], F.cross_entropy, ratio=0.5)
    assert report.skipped == {} and tails[0] in report.widths_before  # one routed flow
    widths = {model.get_submodule(t).out_channels for t in tails}
    assert len(widths) == 1 and model.conv5[0].in_channels == 2 * widths.pop()
    if method == "firefly":  # the stream's new neurons are scored (not 0); others win here
        assert (report.scores[tails[0]][report.widths_before[tails[0]]:] != 0).all()
    else:
        assert report.added[tails[0]] > 0
    assert _relative_change(_outputs(model, batch[0]), before) < TOLERANCE[method]


def test_a_failure_after_planning_leaves_model_and_optimizer_untouched(monkeypatch):
    model = build("shufflenet_v2", width=0.125, seed=0)
    batches = _batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _sgd_step(model, optimizer, batches[0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {id(p): optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    params = list(model.parameters())
    calls = []

    def failing(*args):  # the last routed stream fails, after every other flow was written
        calls.append(1)
        if len(calls) == 3:
            raise GrowthError("forced failure after planning")
        return real(*args)

    real = surgery_swaps.stream_layout
    monkeypatch.setattr(surgery_swaps, "stream_layout", failing)
    with pytest.raises(GrowthError, match="forced failure"):
        RandomGrower(seed=0).grow(model, batches, F.cross_entropy, optimizer, ratio=0.35)
    assert len(calls) == 3
    assert list(model.parameters()) == params == optimizer.param_groups[0]["params"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for p in model.parameters():
        assert torch.equal(optimizer.state[p]["momentum_buffer"], momentum[id(p)])
    assert model.stage2[1].branch2[0][0].in_channels == 7


class _ShuffleIntoAdd(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        out = torch.cat((self.a(x), self.b(x)), 1)
        out = out.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)
        return self.head(out + 1.0 * out.flip(1)).mean((2, 3))


def test_a_shuffle_into_other_operations_is_refused_with_the_module_named():
    survey = survey_flows(_ShuffleIntoAdd(), torch.zeros(1, 3, 4, 4))
    assert survey.flows == ()
    for layer in ("a", "b"):  # the region's reason, for each of its producers
        assert survey.skipped[layer] == (
            "its shuffled channels feed an operation (flip) that does not only move channels "
            "in the model's forward")


def test_optimizer_state_moves_with_every_channel():
    model = build("shufflenet_v2", width=0.125, seed=0)
    batches = _batches()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _sgd_step(model, optimizer, batches[0])
    for p in model.parameters():  # a state that says where its parameter's entries went
        optimizer.state[p]["momentum_buffer"] = 2 * p.detach().clone()
    kept = sum(int((p != 0).sum()) for p in model.parameters())
    RandomGrower(seed=0).grow(model, batches, F.cross_entropy, optimizer, ratio=0.35)
    moved = 0
    for name, p in model.named_parameters():
        state = optimizer.state[p]["momentum_buffer"]
        assert state.shape == p.shape, name
        carried = state != 0  # old entries; fresh ones start at zero
        torch.testing.assert_close(state[carried], 2 * p.detach()[carried], msg=name)
        moved += int(carried.sum())
    assert moved == kept  # no old entry's state was lost or left at the wrong place


class _FixedShuffle(nn.Module):
    """A shuffle written with fixed channel counts: it cannot run at another width."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        out = torch.cat((self.a(x), self.b(x)), 1)
        out = out.view(x.shape[0], 2, 4, x.shape[2], x.shape[3]).transpose(1, 2)
        return self.head(out.reshape(x.shape[0], 8, x.shape[2], x.shape[3])).mean((2, 3))


def test_shuffles_that_cannot_be_followed_are_refused_not_crashed():
    skipped = survey_flows(_FixedShuffle(), torch.zeros(1, 3, 4, 4)).skipped
    assert "cannot be followed" in skipped["a"] and "fail at 6 channels" in skipped["a"]
    with pytest.raises(ValueError, match="example_input is needed"):  # channel counts unknown
        survey_flows(build("shufflenet_v2", width=0.125, seed=0))


ROUTED = ("stage2.0.branch1.1.0", "stage3.0.branch1.1.0", "stage4.0.branch1.1.0")


def _spy(monkeypatch, model):
    """Records the plan's written candidates and selection, and each routed stream's layout in
    ``model`` (not in Firefly's widened shadow of it)."""
    seen = {"layouts": []}
    apply, layout = firefly_grower.firefly_apply, surgery_swaps.stream_layout

    def recording_apply(params, flows, candidates, selection):
        seen.update(flows=flows, candidates=candidates, selection=selection)  # the last: plan's
        return apply(params, flows, candidates, selection)

    def recording_layout(grown, *args):
        made = layout(grown, *args)
        if grown is model:
            seen["layouts"].append(made)
        return made

    monkeypatch.setattr(firefly_grower, "firefly_apply", recording_apply)
    monkeypatch.setattr(surgery_swaps, "stream_layout", recording_layout)
    return seen


def _nonzero_values(column):
    values = column[column != 0]
    return torch.unique(values)


def test_new_neurons_of_a_shuffled_stream_are_scored_chosen_and_reach_their_path(
        monkeypatch, tmp_path):
    model = build("shufflenet_v2", width=0.125, seed=0)
    batch = _batches()[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    _sgd_step(model, optimizer, batch)
    before = _outputs(model, batch[0])
    widths = {name: model.get_submodule(name).out_channels for name in ROUTED}
    seen = _spy(monkeypatch, model)
    report = FireflyGrower(seed=0).grow(model, [batch], F.cross_entropy, optimizer, ratio=0.35)

    names = [f.producer for f in seen["flows"]]
    fresh_in_streams = 0
    for name in ROUTED:
        scores = report.scores[name][widths[name]:]  # after the split candidates' scores
        # Gradients reach them (0 on every one before); a candidate the scoring layout has no
        # slot for (a width that does not fit, docs/design.md) or a dead unit may still get 0.
        assert np.count_nonzero(scores) >= 0.9 * scores.size, scores
    assert len(seen["layouts"]) >= 2  # streams Firefly grew (splits alone grew one before)
    for layout in seen["layouts"]:
        index = names.index(f"{layout.flow.producer}.weight")
        flow, selection = seen["flows"][index], seen["selection"][index]
        written = seen["candidates"][index]
        consumers = [c.weight for c in flow.consumers]
        first_new = layout.old_width + selection.split.size  # the core's order: old, copies, new
        for p, placement in enumerate(layout.placements):
            producer = layout.flow.routing.producers[p]
            for slot, logical in enumerate(placement.logical.tolist()):
                if placement.source[slot] >= 0:
                    continue
                fresh_in_streams += 1
                candidate = int(selection.new[logical - first_new])
                path = layout.new.paths[p][slot] & set(layout.flow.routing.consumers)
                assert path
                for module in path:
                    column = model.get_submodule(module).weight[
                        :, layout.new.position(module)[(p, slot)]].detach()
                    block = consumers.index(stand_in_name(module, producer))
                    expected = written.new_outgoing[block][candidate]
                    assert expected.abs().max() > 0
                    # Its rows: the candidate's (a row of the consumer copied by a split takes
                    # its parent's value; a fresh row reads a fresh channel with 0).
                    torch.testing.assert_close(_nonzero_values(column),
                                               _nonzero_values(expected))
    assert fresh_in_streams >= 10 * len(seen["layouts"])

    change = float((_outputs(model, batch[0]) - before).abs().max() / before.abs().max())
    # O(new_eps) per new neuron, as on other models (benchmarks/growth_coverage.py's Firefly
    # column: 5e-3 to 4e-2 at this width); 6e-3 here.
    assert 0 < change < 2e-2, change
    weight = model.stage2[1].branch2[0][0].weight
    old = weight.detach().clone()
    assert torch.isfinite(_sgd_step(model, optimizer, batch))
    assert not torch.equal(weight, old)
    path = tmp_path / "grown.pt"
    save_checkpoint(path, model)
    loaded = load_checkpoint(path, model=build("shufflenet_v2", width=0.125, seed=1)).model
    torch.testing.assert_close(_outputs(loaded, batch[0]), _outputs(model, batch[0]))


def test_fresh_depthwise_filters_on_a_path_come_from_the_growths_seed():
    from simcore.growth import add_neurons

    model = build("shufflenet_v2", width=0.125, seed=0)
    flow = next(f for f in survey_flows(model, torch.zeros(1, 3, 32, 32)).flows if f.routing)
    state = dict(model.state_dict())
    grown, cmap = add_neurons(state, flow.channel_flow(model), 2, rng=0)

    def depthwise_after(seed):
        layout = stream_layout(model, flow, cmap, seed)
        physical = layout.physical(model, {**state, **grown})
        return {name: value for name, value in physical.items()
                if value.ndim == 4 and value.shape[1] == 1}  # (C, 1, kh, kw): depthwise

    first, again, other = depthwise_after(1), depthwise_after(1), depthwise_after(2)
    assert first  # the stream reaches a depthwise conv (the next stage's branch1)
    for name, filters in first.items():
        old = state[name]
        fresh = [c for c in range(len(filters))
                 if not any(torch.equal(filters[c], row) for row in old)]
        assert len(fresh) == len(filters) - len(old) > 0
        torch.testing.assert_close(again[name], filters)  # the same growth, the same filters
        for c in fresh:  # another seed, other filters; He-normal over 9 taps, never zero
            assert not torch.equal(other[name][c], filters[c])
            assert 0 < float(filters[c].norm()) < 10 * (2 / 9) ** 0.5 * 3


def test_a_growers_seed_reaches_the_fresh_depthwise_filters_on_a_path(monkeypatch):
    from simcore.adapters.torch import permutations

    seeds = []
    draw = permutations._with_fresh

    def spy(value, fresh, attr, module, seed):
        if value.ndim > 1 and any(fresh):
            seeds.append(seed)
        return draw(value, fresh, attr, module, seed)

    monkeypatch.setattr(permutations, "_with_fresh", spy)
    x = _batches()[0][0][:1]
    drawn = {}
    for grower_seed in (0, 1):
        seeds.clear()
        model = build("shufflenet_v2", width=0.125, seed=0)
        RandomGrower(seed=grower_seed).grow(model, None, None, example_input=x, ratio=0.2)
        drawn[grower_seed] = set(seeds)
    # One seed per growth, its own: each grower seed gives the growth another one.
    assert len(drawn[0]) == len(drawn[1]) == 1 and drawn[0] != drawn[1]
