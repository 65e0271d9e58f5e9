"""Growth requests that cannot end well are refused up front with a clear error.

Tied parameters (one ``Parameter`` in two modules), hand-written flows that contradict the
traced graph, non-finite learning rates, a ``ratio`` the caps cannot hold, SSD with nothing
to differentiate, Firefly with no candidates, and optimizers whose state a growth cannot
carry (LBFGS, Adafactor). Each would otherwise report success and break later, or fail deep
inside autograd or at the optimizer's next step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from simcore.adapters.torch import discovery  # noqa: E402
from simcore.adapters.torch.growers import (  # noqa: E402
    FireflyGrower,
    RandomGrower,
    SSDGrower,
)
from simcore.adapters.torch.surgery import (  # noqa: E402
    GrowthError,
    TorchFlow,
    apply_growth,
    discover_flows,
    find_flow,
)
from torch import nn  # noqa: E402

from simcore.growth import add_neurons  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _batches(n=1, features=3, classes=2):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, features, generator=generator),
             torch.randint(0, classes, (8,), generator=generator)) for _ in range(n)]


# --------------------------------------------------------------------------- tied parameters


class TiedEmbedding(nn.Module):
    """A language-model shape: the head's weight is the embedding's (weight tying)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.hidden = nn.Linear(4, 5)
        self.project = nn.Linear(5, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = torch.relu(self.hidden(self.embed(tokens)))
        return self.head(torch.relu(self.project(h)))


def test_weights_tied_between_two_linears_are_refused_naming_both_modules():
    tied = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                         nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tied[4].weight = tied[2].weight  # b.weight = a.weight
    with pytest.raises(GrowthError, match=r"'2'.*'4'|'4'.*'2'"):
        find_flow(tied, "2")
    with pytest.raises(GrowthError, match="tied"):
        find_flow(tied, "0")  # its consumer '2' holds the tied weight
    assert [f.producer for f in discover_flows(tied)] == []  # nothing growable is left
    flow = TorchFlow("2", consumers=("4",))
    with pytest.raises(GrowthError, match=r"'2'.*tied.*'4'"):
        flow.channel_flow(tied)


def test_an_embedding_tied_to_the_head_is_refused_and_stays_tied():
    model = TiedEmbedding()
    tokens = torch.randint(0, 10, (6,))
    with pytest.raises(GrowthError, match=r"'head'.*'embed'|'embed'.*'head'"):
        find_flow(model, "project", tokens)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(GrowthError, match="tied"):
        RandomGrower(seed=0).grow(model, None, None, optimizer, layers=["project"],
                                  example_input=tokens)
    with pytest.raises(GrowthError, match="tied"):
        RandomGrower(seed=0).grow(model, None, None, optimizer, example_input=tokens,
                                  flows=[TorchFlow("project", consumers=("head",))])
    assert model.head.weight is model.embed.weight
    # The untied producer still grows, and the tie survives it.
    RandomGrower(seed=0).grow(model, None, None, optimizer, layers=["hidden"],
                              example_input=tokens)
    assert model.hidden.out_features > 5 and model.head.weight is model.embed.weight
    model(tokens)


# --------------------------------------------------------------------------- hand-written flows


def test_a_hand_written_flow_naming_a_module_that_does_not_read_the_channels_is_refused():
    model = _mlp()  # '0' feeds '2', which feeds '4'; both 4 wide, so sizes cannot tell
    wrong = TorchFlow("0", consumers=("4",))
    with pytest.raises(GrowthError, match=r"'4' does not read .*'0'"):
        discovery.check_flows(model, [wrong])
    with pytest.raises(GrowthError, match=r"'4' does not read .*'0'"):
        RandomGrower(seed=0).grow(model, None, None, flows=[wrong])
    assert model[0].out_features == 4 and model[4].in_features == 4
    model(torch.randn(2, 3))


def test_a_hand_written_flow_leaving_out_a_reader_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(GrowthError, match=r"'3' reads the channels of '0'"):
        discovery.check_flows(model, [TorchFlow("0", norm="1")])
    with pytest.raises(GrowthError, match=r"'1'.*not named"):
        discovery.check_flows(model, [TorchFlow("0", consumers=("3",))])
    discovery.check_flows(model, discover_flows(model))  # the traced flows pass
    discovery.check_flows(model, [TorchFlow("0", norm="1", consumers=("3",))])


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize("lr", [math.inf, math.nan, -0.1, 0.0])
def test_apply_growth_refuses_a_learning_rate_that_is_not_finite_and_positive(lr):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    flow = find_flow(model, "0")
    grown, cmap = add_neurons(dict(model.state_dict()), flow.channel_flow(model), 2,
                              rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="lr"):
        apply_growth(model, flow, grown, cmap, optimizer, lr=lr)
    assert model[0].out_features == 4 and optimizer.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("make", [lambda: RandomGrower(seed=0), lambda: SSDGrower(seed=0)])
def test_a_ratio_above_what_one_growth_can_add_is_refused_with_the_real_reason(make):
    model = _mlp()  # 8 neurons: one growth adds at most one neuron per neuron
    with pytest.raises(ValueError, match=r"ratio=1\.5 .*at most 8 ") as error:
        make().grow(model, _batches(), nn.functional.cross_entropy, ratio=1.5)
    assert "clamp" not in str(error.value)
    assert model[0].out_features == 4
    report = make().grow(model, _batches(), nn.functional.cross_entropy, ratio=1.0)
    assert report.total_added == 8  # ratio 1 doubles the width, as documented


def test_a_ratio_of_1e308_is_a_clear_error_not_an_overflow():
    model = _mlp()
    for unit in ("neurons", "parameters"):
        with pytest.raises(ValueError, match=r"ratio=1e\+308"):
            RandomGrower(seed=0).grow(model, None, None, ratio=1e308, unit=unit,
                                      example_input=torch.zeros(1, 3))
    assert model[0].out_features == 4


@pytest.mark.parametrize("make", [
    lambda: RandomGrower(seed=0, outgoing="small", outgoing_scale=1e308),
    lambda: FireflyGrower(new_per_layer=2, split_scale=1e308, seed=0),
    lambda: FireflyGrower(new_per_layer=2, outgoing_scale=1e308, seed=0),
], ids=["random-outgoing_scale", "firefly-split_scale", "firefly-outgoing_scale"])
def test_a_scale_of_1e308_is_a_clear_error_not_an_overflow(make):
    """U(-1e308, 1e308) is drawn (NumPy's own range overflowed); the float32 weights it would
    give are not finite, which the growth refuses, leaving the model as it was."""
    model = _mlp()
    with pytest.raises(ValueError, match="NaN or inf"):
        make().grow(model, _batches(), nn.functional.cross_entropy, ratio=0.5)
    assert model[0].out_features == 4


def test_ssd_scores_a_model_whose_parameters_are_all_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 2))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    report = SSDGrower(seed=0).grow(model, _batches(), nn.functional.cross_entropy, ratio=0.5)
    assert report.total_added == 4
    assert all(not p.requires_grad for p in model.parameters())  # still frozen, grown too


def test_firefly_without_any_candidate_is_refused_at_construction():
    with pytest.raises(ValueError, match="new_per_layer=0.*split=False.*no candidate"):
        FireflyGrower(new_per_layer=0, split=False)


def _stepped(optimizer_kind):
    model = _mlp()
    optimizer = optimizer_kind(model.parameters())
    (inputs, targets), = _batches()

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return model, optimizer


@pytest.mark.parametrize("mode", ["carry", "fresh"])
def test_lbfgs_is_refused_at_growth_time_not_at_its_next_step(mode):
    model, optimizer = _stepped(lambda p: torch.optim.LBFGS(p, lr=0.1))
    with pytest.raises(GrowthError, match="LBFGS.*rebuild"):
        RandomGrower(seed=0).grow(model, None, None, optimizer, optimizer_mode=mode)
    assert model[0].out_features == 4


def test_adafactor_carry_is_refused_saying_what_to_do():
    model, optimizer = _stepped(lambda p: torch.optim.Adafactor(p, lr=0.01))
    with pytest.raises(ValueError, match=r"(?s)shaped like its parameter.*optimizer_mode='fresh'"):
        RandomGrower(seed=0).grow(model, None, None, optimizer)
    RandomGrower(seed=0).grow(model, None, None, optimizer, optimizer_mode="fresh")
    optimizer.step(lambda: nn.functional.cross_entropy(model(_batches()[0][0]),
                                                       _batches()[0][1]))
