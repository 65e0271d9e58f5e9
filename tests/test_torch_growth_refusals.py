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
    RandomGrower,
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
