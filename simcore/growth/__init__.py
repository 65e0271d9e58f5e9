"""Growth maths: widening operators, budgets and selection, SSD splitting, Firefly scoring.

Everything works on a flat ``Mapping[str, array]`` of parameters and a
:class:`ChannelFlow` that names the entries one growable layer's channels flow through;
operators return new dicts and never mutate. See :mod:`simcore.growth.flow` and
:mod:`simcore.growth.widen`.
"""

from .flow import ROLES, BatchNorm, ChannelFlow, Consumer, Depthwise, FlowEntry
from .widen import ChannelMap, add_neurons, replicate_neurons, split_neurons

__all__ = [
    "ROLES",
    "BatchNorm",
    "ChannelFlow",
    "ChannelMap",
    "Consumer",
    "Depthwise",
    "FlowEntry",
    "add_neurons",
    "replicate_neurons",
    "split_neurons",
]

# SSD / Firefly / activations (owned by the SSD-Firefly engineer) are imported below.
