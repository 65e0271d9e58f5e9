"""Train a small Flax (linen) CNN with the neuron-similarity penalty as an optax transform.

The penalty (Eq. 2 of Sakai & Hotta, summed over every conv/dense kernel) enters
as ``add_similarity_gradient``, chained before the optimizer like weight decay.
Run: ``python examples/flax_penalty.py [--steps 30] [--strength 2.0] [--seed 0]``
(``--help`` lists them).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from simcore.adapters.jax import add_similarity_gradient, find_kernels, penalty


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))
        return nn.Dense(4)(x.reshape((x.shape[0], -1)))


def main(steps: int = 30, strength: float = 2.0, seed: int = 0) -> list[dict[str, float]]:
    """Train ``steps`` steps on a synthetic task; return per-step task loss and penalty."""
    data_key, init_key = jax.random.split(jax.random.key(seed))
    images = jax.random.normal(data_key, (32, 8, 8, 3))
    labels = jnp.argmax(images.mean(axis=(1, 2)) @ jnp.ones((3, 4)) * jnp.arange(4.0), axis=1)
    model = SmallCNN()
    params = model.init(init_key, images)["params"]
    kernels = find_kernels(params)  # {"Conv_0/kernel": -1, ...}: Flax keeps neurons last

    tx = optax.chain(
        add_similarity_gradient(strength, neuron_axis=kernels),
        optax.sgd(0.05, momentum=0.9),
    )
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def task_loss(p):
            logits = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(task_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    measure = jax.jit(lambda p: penalty(p, neuron_axis=kernels))
    history = []
    for _ in range(steps):
        value = measure(params)
        params, opt_state, loss = step(params, opt_state)
        history.append({"loss": float(loss), "penalty": float(value)})
    return history


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optax SGD steps (default 30)")
    parser.add_argument("--strength", type=float, default=2.0,
                        help="scale of add_similarity_gradient's gradient (default 2.0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the images and of the CNN's parameters (default 0)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    history = main(steps=args.steps, strength=args.strength, seed=args.seed)
    for i, record in enumerate(history):
        print(f"step {i:2d}  task loss {record['loss']:.4f}  penalty {record['penalty']:.4f}")
