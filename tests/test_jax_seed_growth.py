"""Random growth of the PyTorch and the Flax seed from the same seed: the same widths.

Random growth's decisions are deterministic given the seed and the widths (uniform scores per
neuron, drawn layer after layer in forward order, the lowest ``budget`` kept globally), so the
two frameworks' seeds, whose growable layers are the same in the same order, must grow
identically, growth after growth (the grower's generator continues between growths on both).
"""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from simcore.adapters.jax import grow  # noqa: E402
from simcore.adapters.jax import models as flax_models  # noqa: E402
from simcore.adapters.torch import RandomGrower  # noqa: E402
from simcore.adapters.torch import models as torch_models  # noqa: E402

from simcore import growth as core  # noqa: E402

GROWTHS = 3


def _torch_widths(name, width, seed):
    model = getattr(torch_models, name)(width=width)
    grower = RandomGrower(seed=seed)
    batches = [(torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.long))]
    history = []
    for _ in range(GROWTHS):
        grower.grow(model, batches, torch.nn.functional.cross_entropy, ratio=0.35)
        history.append(torch_models.widths(model))
    return history


def _flax_widths(name, width, seed):
    model = getattr(flax_models, name)(width=width)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    grower = core.RandomGrower(seed=seed)
    batches = [(jnp.zeros((2, 32, 32, 3)), jnp.zeros(2, dtype=jnp.int32))]
    history = []
    for _ in range(GROWTHS):
        grown = grow(grower, model, variables, batches=batches, ratio=0.35)
        model, variables = grown.model, grown.variables
        assert flax_models.parameter_count(variables) == grown.report.params_after
        history.append(flax_models.widths(model))
    return history


@pytest.mark.slow
@pytest.mark.parametrize("name, width", [("vgg16", 16), ("mobilenet_v1", 8)])
def test_random_growth_gives_the_same_widths_on_both_frameworks(name, width):
    seed = 1234
    expected = _torch_widths(name, width, seed)
    got = _flax_widths(name, width, seed)
    assert got == expected
    # the growths did something, and not the same thing to every layer
    assert all(sum(b) > sum(a) for a, b in zip([[width] * len(expected[0])] + expected,
                                               expected, strict=False))
    assert len(set(expected[-1])) > 1
    # and another seed decides otherwise: the widths are the seed's, not a fixed rule
    assert _torch_widths(name, width, seed + 1) != expected

