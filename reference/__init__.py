"""simcore.reference: an independent NumPy float64 oracle for the maths of simcore.

This package re-derives the paper's equations (Sakai & Hotta, "Growing Deep Neural Network
Considering with Similarity between Neurons"): Eq. 1 (cosine similarity map), Eq. 2 (mean
absolute off-diagonal cosine) and its gradient, Eq. 4 (weight-sum term, literal and well-posed
forms), Eq. 5 (their sum over layers) and the Fig. 6 cosine-distribution statistics.

It is an *oracle* for tests, not a fast implementation:

* float64 everywhere (inputs go through ``np.asarray(x, dtype=np.float64)``);
* written straight from the equations, with explicit Python loops over neurons and pairs
  (gradients derived pair by pair, not from a matrix formula);
* only NumPy and the standard library; it shares NO code with the simcore core (it neither
  imports nor reads it), so one mistake cannot hide in both.

Layout contract shared with the core: a neuron is one slice along ``neuron_axis`` (default 0,
negative values allowed); its incoming weights are ``np.moveaxis(w, neuron_axis, 0)`` reshaped
to ``(n, d)`` in C order.  Gradients come back in the original shape and layout.  A row is
active iff ``||w_i|| > zero_tol * max_k ||w_k||`` (``zero_tol=None`` means float32 eps); inactive
rows are left out of every pair and the pair count, and get exactly zero gradient.
``sign(0) = 0`` throughout.
"""

from .objective import growth_objective, growth_objective_and_grad, relative_update
from .similarity import similarity_loss, similarity_loss_and_grad, similarity_map
from .stats import similarity_stats
from .weight_sum import weight_sum_penalty, weight_sum_penalty_and_grad

__all__ = [
    "similarity_map",
    "similarity_loss",
    "similarity_loss_and_grad",
    "weight_sum_penalty",
    "weight_sum_penalty_and_grad",
    "growth_objective",
    "growth_objective_and_grad",
    "relative_update",
    "similarity_stats",
]
