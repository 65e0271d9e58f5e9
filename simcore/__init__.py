"""simcore: grow neural networks and keep their neurons apart.

The framework-agnostic core of Sakai & Hotta, "Growing Deep Neural Network
Considering with Similarity between Neurons": the similarity loss (Eq. 1-2),
the weight-sum term (Eq. 4), their sum over layers (Eq. 5) and the growth
maths, written once against the Python Array API standard. Every function takes
arrays of any Array-API library (NumPy, PyTorch, JAX, CuPy, array-api-strict)
and returns arrays of the same library, dtype and device. Importing simcore
imports no deep-learning framework; ``simcore.adapters`` holds the glue.
"""

from ._types import Array, Namespace
from .objective import (
    ANCHORS,
    STEPS,
    Objective,
    decorrelate,
    growth_objective,
    growth_objective_and_grad,
    relative_update,
)
from .similarity import (
    DEFAULT_ZERO_TOL,
    similarity_loss,
    similarity_loss_and_grad,
    similarity_map,
)
from .stats import SimilarityStats, similarity_stats
from .weight_sum import FORMS, STATISTICS, weight_sum_penalty, weight_sum_penalty_and_grad

__version__ = "0.1.0"

__all__ = [
    "ANCHORS",
    "Array",
    "DEFAULT_ZERO_TOL",
    "FORMS",
    "Namespace",
    "Objective",
    "STATISTICS",
    "STEPS",
    "SimilarityStats",
    "decorrelate",
    "growth_objective",
    "growth_objective_and_grad",
    "relative_update",
    "similarity_loss",
    "similarity_loss_and_grad",
    "similarity_map",
    "similarity_stats",
    "weight_sum_penalty",
    "weight_sum_penalty_and_grad",
]
