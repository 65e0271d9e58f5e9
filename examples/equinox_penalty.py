"""Train a small Equinox MLP with the neuron-similarity penalty added to the loss.

``penalty`` returns Eq. 2 of Sakai & Hotta summed over the model's Linear
weights; ``jax.grad`` of it is the library's analytic gradient. Equinox stores
``Linear.weight`` as ``(out, in)``: ``find_kernels`` gives neuron axis 0.
Run: ``python examples/equinox_penalty.py [--steps 30] [--strength 2.0] [--seed 0]``
(``--help`` lists them).
"""

from __future__ import annotations

import argparse

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from simcore.adapters.jax import find_kernels, penalty


def main(steps: int = 30, strength: float = 2.0, seed: int = 0) -> list[dict[str, float]]:
    """Train ``steps`` steps on a synthetic regression; return per-step task loss and penalty."""
    data_key, model_key = jax.random.split(jax.random.key(seed))
    inputs = jax.random.normal(data_key, (64, 6))
    targets = jnp.sin(inputs @ jnp.linspace(-1.0, 1.0, 6))[:, None]
    model = eqx.nn.MLP(6, 1, width_size=16, depth=2, key=model_key)
    kernels = find_kernels(model)  # {"layers/0/weight": 0, ...}

    optimizer = optax.sgd(0.05, momentum=0.9)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    def task_loss(model):
        return jnp.mean((jax.vmap(model)(inputs) - targets) ** 2)

    def total_loss(model):
        params = eqx.filter(model, eqx.is_array)
        return task_loss(model) + strength * penalty(params, neuron_axis=kernels)

    @eqx.filter_jit
    def step(model, opt_state):
        grads = eqx.filter_grad(total_loss)(model)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    @eqx.filter_jit
    def measure(model):
        return task_loss(model), penalty(eqx.filter(model, eqx.is_array), neuron_axis=kernels)

    history = []
    for _ in range(steps):
        loss, value = measure(model)
        history.append({"loss": float(loss), "penalty": float(value)})
        model, opt_state = step(model, opt_state)
    return history


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30,
                        help="SGD steps on the synthetic regression (default 30)")
    parser.add_argument("--strength", type=float, default=2.0,
                        help="factor of the penalty added to the MSE loss (default 2.0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data and of the MLP's initial weights (default 0)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    history = main(steps=args.steps, strength=args.strength, seed=args.seed)
    for i, record in enumerate(history):
        print(f"step {i:2d}  task loss {record['loss']:.4f}  penalty {record['penalty']:.4f}")
