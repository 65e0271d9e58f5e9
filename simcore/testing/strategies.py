"""Public home of the Hypothesis strategies (``from simcore.testing.strategies import ...``).

Implemented in :mod:`simcore.testing._strategies`; importing this module imports
Hypothesis, which ``import simcore.testing`` alone does not.
"""

from ._strategies import *  # noqa: F403
from ._strategies import __all__  # noqa: F401
