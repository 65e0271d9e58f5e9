"""JAX glue for simcore: autodiff wrappers, an optax transform, pytree helpers, growth.

* :func:`similarity_loss`, :func:`growth_objective`: Eq. 2 and Eq. 5 with the
  core's analytic gradient as a ``jax.custom_vjp`` (``sign(0) = 0``, zero rows
  get 0); they trace under ``jit`` and batch under ``vmap``.
* :func:`penalty` (a loss term over a parameter pytree) and
  :func:`add_similarity_gradient` (an optax ``GradientTransformation``).
* :func:`find_kernels`: ``{leaf name: neuron_axis}`` for the dense/conv kernels
  of Flax linen/nnx and Equinox trees (Flax: neurons last; Equinox: first).
* :func:`linen_flow`, :func:`add_neurons`, :func:`replicate_neurons`,
  :func:`split_neurons`, :func:`grow_optax_state`: out-of-place widening of a
  linen model's variables, and its optax state, through :mod:`simcore.growth`.
* :func:`grow`: the core's Random, SSD and Firefly growers on a Flax linen, Flax nnx or
  Equinox model, with every layer's channel flow found by tracing (:func:`discover_flows`);
  returns a :class:`JaxGrowth` (new model, variables, optax state, report).

>>> import jax, jax.numpy as jnp
>>> from simcore.adapters.jax import similarity_loss
>>> w = jnp.array([[1.0, 0.0], [1.0, 1.0]])
>>> round(float(similarity_loss(w)), 4)
0.7071
"""

from ._growth import (
    add_neurons,
    flatten_variables,
    grow_optax_state,
    linen_flow,
    replicate_neurons,
    split_neurons,
    unflatten_variables,
)
from ._loss import growth_objective, similarity_loss
from ._optax import SimilarityGradientState, add_similarity_gradient, penalty
from ._trees import find_kernels, leaf_name, named_leaves
from .discovery import JaxFlow
from .grow import JaxGrowth, check_flows, discover_flows, grow
from .host import JaxGrowthHost

__all__ = [
    "JaxFlow",
    "JaxGrowth",
    "JaxGrowthHost",
    "check_flows",
    "discover_flows",
    "grow",
    "add_neurons",
    "flatten_variables",
    "grow_optax_state",
    "linen_flow",
    "replicate_neurons",
    "split_neurons",
    "unflatten_variables",
    "SimilarityGradientState",
    "add_similarity_gradient",
    "find_kernels",
    "growth_objective",
    "leaf_name",
    "named_leaves",
    "penalty",
    "similarity_loss",
]
