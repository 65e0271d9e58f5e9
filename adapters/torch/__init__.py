"""PyTorch glue for simcore: the similarity penalty, the paper's models, optimizer and checkpoints.

Importing this package imports torch. The maths lives in the core (``simcore``);
these modules wrap it into PyTorch's autograd, modules, optimizers and files.
"""
# A plain list of re-exports, one module per line; append new ones at the end.
# ruff: noqa: F401, I001

from .models import VGG16, MobileNetV1, architecture, build, mobilenet_v1, vgg16, widths
from .functions import GrowthObjectiveFunction, SimilarityLossFunction
from .penalty import SimilarityPenalty
from .functions import growth_objective, similarity_loss
from .optim import OptimizerGrowth, grow_optimizer, plan_optimizer_growth
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .flows import GrowthError, TorchConsumer, TorchDepthwise, TorchFlow
from .discovery import discover_flows, find_flow
from .surgery import GrowthTransaction, apply_growth, apply_growths
from .growers import FireflyGrower, Grower, GrowthReport, RandomGrower, SSDGrower
from .schedule import DEFAULT_PHASE_STEPS, PHASES, GrowthSchedule, SimilarityPhase
from .distributed import regrow_ddp
from .host import TorchGrowthHost
from .penalty import is_depthwise_layer
from .host import parameter_count
from .flows import layer_weight
from .kernel import TorchKernel
