"""JAX glue for simcore."""

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

__all__ = [
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
