"""Growth maths: widening operators, budgets and selection, SSD splitting, Firefly scoring.

Everything works on a flat ``Mapping[str, array]`` of parameters and a
:class:`ChannelFlow` that names the entries one growable layer's channels flow through;
operators return new dicts and never mutate. See :mod:`simcore.growth.flow`,
:mod:`simcore.growth.widen` (the operators), :mod:`simcore.growth.channel_map` (what they
return) and :mod:`simcore.growth.channel_rows` (the per-channel view they work on); budgets
and selection in :mod:`simcore.growth.budget`, optimizer state in
:mod:`simcore.growth.optim_state`, the paper's seeds as plain data in
:mod:`simcore.growth.presets`. The growth algorithms (:class:`RandomGrower`, :class:`SSDGrower`,
:class:`FireflyGrower`) drive a framework through the small protocol of
:mod:`simcore.growth.protocol` (:class:`GrowthHost`), which each adapter implements.
"""

from .budget import UNITS, count_parameters, growth_budget, round_half_up, select_lowest
from .channel_map import ChannelMap
from .flow import (
    ROLES,
    BatchNorm,
    ChannelFlow,
    Consumer,
    Depthwise,
    FlowEntry,
    is_depthwise,
    is_growable_depthwise,
)
from .optim_state import map_optimizer_state
from .widen import add_neurons, replicate_neurons, split_neurons

__all__ = [
    "ROLES",
    "UNITS",
    "BatchNorm",
    "ChannelFlow",
    "ChannelMap",
    "Consumer",
    "Depthwise",
    "is_depthwise",
    "is_growable_depthwise",
    "FlowEntry",
    "add_neurons",
    "count_parameters",
    "growth_budget",
    "map_optimizer_state",
    "replicate_neurons",
    "round_half_up",
    "select_lowest",
    "split_neurons",
]

# SSD / Firefly / activations (owned by the SSD-Firefly engineer) are imported below.
from .activation_derivatives import RELU_SURROGATE_BETA  # noqa: E402
from .activations import (  # noqa: E402
    activation_kinks,
    activation_names,
    activation_spec,
    first_derivative,
    register_activation,
    second_derivative,
)
from .firefly import (  # noqa: E402
    FireflyCandidates,
    FireflySelection,
    candidate_weights,
    firefly_apply,
    firefly_candidates,
    firefly_select,
    new_neuron_gate_scores,
    split_gate_scores,
)
from .ssd import (  # noqa: E402
    SplittingHVP,
    bn_coefficient,
    hvp_from_statistics,
    min_eigenpairs,
    rayleigh_min_direction,
    select_splits,
    splitting_matrices,
    ssd_split,
    subsample_rows,
)

__all__ += [
    "RELU_SURROGATE_BETA",
    "FireflyCandidates",
    "FireflySelection",
    "SplittingHVP",
    "activation_kinks",
    "activation_names",
    "activation_spec",
    "bn_coefficient",
    "candidate_weights",
    "firefly_apply",
    "firefly_candidates",
    "firefly_select",
    "first_derivative",
    "hvp_from_statistics",
    "min_eigenpairs",
    "new_neuron_gate_scores",
    "rayleigh_min_direction",
    "register_activation",
    "second_derivative",
    "select_splits",
    "split_gate_scores",
    "splitting_matrices",
    "ssd_split",
    "subsample_rows",
]

# The growth algorithms, written once against the framework protocol (adapters implement it).
from .firefly_grower import FireflyGrower, FireflyState  # noqa: E402
from .growers import Grower, GrowthReport, PerLayerState, RandomGrower, RandomState  # noqa: E402
from .protocol import GrowableLayer, GrowthError, GrowthHost, SplittingStatistics  # noqa: E402
from .ssd_grower import SSDGrower, SSDState  # noqa: E402

__all__ += [
    "FireflyGrower",
    "FireflyState",
    "GrowableLayer",
    "GrowthError",
    "GrowthHost",
    "GrowthReport",
    "Grower",
    "PerLayerState",
    "RandomGrower",
    "RandomState",
    "SSDGrower",
    "SSDState",
    "SplittingStatistics",
]
