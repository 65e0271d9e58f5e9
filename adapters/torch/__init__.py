"""PyTorch glue for simcore: the similarity penalty, the paper's models, optimizer and checkpoints.

Importing this package imports torch. The maths lives in the core (``simcore``);
these modules wrap it into PyTorch's autograd, modules, optimizers and files.
"""

from .models import VGG16, MobileNetV1, architecture, build, mobilenet_v1, vgg16, widths  # noqa: F401
from .penalty import (  # noqa: F401  # noqa: F401
    GrowthObjectiveFunction,
    SimilarityLossFunction,
    SimilarityPenalty,
    growth_objective,
    similarity_loss,
)
