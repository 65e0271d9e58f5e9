"""The core inside the frameworks: autograd graphs survive, and importing simcore imports none."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import simcore
from simcore.testing import strategies

FRAMEWORKS = ("torch", "jax", "jaxlib", "cupy", "tensorflow", "flax", "equinox", "optax")


def test_importing_simcore_imports_no_framework(tmp_path):
    code = (
        "import json, sys\n"
        "import simcore, simcore.testing, simcore.adapters, simcore.reference, simcore.cli\n"
        f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SIMCORE_TEST_BACKENDS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def _torch_inputs(seed):
    w = np.random.default_rng(seed).standard_normal((7, 3, 2, 2))
    assert strategies.min_abs_cosine(w) > 1e-6  # away from the kinks C_ij = 0
    return w


@pytest.mark.parametrize("block_size", [None, 3])
@pytest.mark.parametrize("neuron_axis", [0, -1])
def test_torch_autograd_through_similarity_loss_matches_the_analytic_gradient(block_size,
                                                                                neuron_axis):
    torch = pytest.importorskip("torch")
    w = _torch_inputs(0)
    x = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    loss = simcore.similarity_loss(x, neuron_axis=neuron_axis, block_size=block_size)
    assert loss.requires_grad and loss.grad_fn is not None
    loss.backward()
    _, analytic = simcore.similarity_loss_and_grad(w, neuron_axis=neuron_axis)
    np.testing.assert_allclose(x.grad.numpy(), analytic, rtol=1e-10, atol=1e-13)


def test_torch_autograd_through_growth_objective():
    torch = pytest.importorskip("torch")
    layers = [_torch_inputs(1), _torch_inputs(2)[:, :, 0, 0]]
    refs = [1.5 * w for w in layers]
    xs = [torch.tensor(w, requires_grad=True) for w in layers]
    value = simcore.growth_objective(xs, [torch.tensor(r) for r in refs], lam=0.4)
    value.backward()
    _, analytic = simcore.growth_objective_and_grad(layers, refs, lam=0.4)
    for x, g in zip(xs, analytic, strict=True):
        np.testing.assert_allclose(x.grad.numpy(), g, rtol=1e-10, atol=1e-13)


def test_torch_autograd_keeps_the_input_device_and_dtype():
    torch = pytest.importorskip("torch")
    x = torch.randn(5, 4, dtype=torch.float32, requires_grad=True)
    loss, grad = simcore.similarity_loss_and_grad(x)
    assert loss.dtype == torch.float32 and loss.device == x.device and loss.shape == ()
    assert grad.dtype == torch.float32 and grad.shape == x.shape


def test_jax_grad_through_similarity_loss_matches_the_analytic_gradient():
    jax = pytest.importorskip("jax")
    from simcore.testing import get_backend

    get_backend("jax")  # turns on float64
    w = _torch_inputs(3)
    traced = jax.jit(jax.grad(lambda v: simcore.similarity_loss(v, neuron_axis=-1)))
    grad = np.asarray(traced(jax.numpy.asarray(w)))
    _, analytic = simcore.similarity_loss_and_grad(w, neuron_axis=-1)
    np.testing.assert_allclose(grad, analytic, rtol=1e-10, atol=1e-13)
