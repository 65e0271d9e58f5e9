"""The public extension API: what adapters and embedders need to build on the core.

The PyTorch, JAX and CuPy adapters import from here and from the documented modules
(``simcore``, ``simcore.growth``), never a private ``simcore`` name (a test checks it);
code that embeds simcore in another framework or growth algorithm can do the same.
See docs/design.md, 'Layout and layering'.

Types:
  :data:`Array`, :data:`Namespace`, :data:`GramFunction` -- the aliases of the public layer.

Argument checks (they read types, shapes and dtypes only, never values, so they trace
under ``jax.jit``; errors name the argument):
  :func:`check_int`, :func:`check_real`, :func:`check_choice`, :func:`check_block_size`,
  :func:`check_zero_tol`, :func:`check_weight` (one layer's kernel), :func:`check_partner`
  (a second array of the same library, device and shape, e.g. Eq. 4's reference),
  :func:`check_floating`, :func:`normalize_axis`.

Arrays:
  :func:`namespace_of` (the Array-API namespace, or a ``TypeError``), :func:`compute_dtype`
  (half precision computes in float32), :func:`device_of`, and the row view of Eq. 1:
  :func:`to_rows` (one row per neuron) and its inverse :func:`from_rows`.

Eq. 5:
  :class:`Objective` (the validated, hashable option bundle) and :func:`as_objective`
  (an ``Objective`` from ``objective=`` or from the keyword options, not both).

The Gram hook: :func:`simcore.similarity_loss_and_grad` takes ``gram=`` (a
:data:`GramFunction`, ``u -> u @ u.T``) to build the symmetric diagonal tiles of Eq. 1's
Gram matrix with a backend's own kernel; the CuPy adapter passes cuBLAS SYRK.

The unit rows of Eq. 1: :class:`UnitRows` (validation, the unit rows, Eq. 2's pair
count and the gradient's tangent projection), for adapters that form the Gram products
their own way; :class:`RawRows` (the same loss from the Gram matrix of the raw rows, with
whether that is exact as an array, for a traced branch: the JAX adapter's).

In-place kernels: :class:`InPlaceKernel` (the buffer operations of the loss's strip path,
simcore/_tiles.py), :class:`Workspace` (per-thread reused buffers) and
:func:`register_in_place_kernel`; the PyTorch adapter registers one for tensors.

Depthwise layers, one rule each:
  :func:`is_depthwise` (every group reads one input channel: left out of the penalty by
  default) and :func:`is_growable_depthwise` (the same with a depth multiplier of 1: what
  growth widens along with its producer).

Deprecations: :func:`warn_deprecated` and :func:`renamed_choice`, so that every deprecated
name warns with the same ``DeprecationWarning`` wording.

>>> import numpy as np
>>> from simcore.extend import from_rows, namespace_of, to_rows
>>> w = np.arange(24.0).reshape(2, 3, 4)       # neurons on the last axis
>>> xp = namespace_of(w, "w")
>>> to_rows(xp, w, 2).shape                    # 4 neurons of 6 weights each
(4, 6)
>>> bool((from_rows(xp, to_rows(xp, w, 2), w.shape, 2) == w).all())
True
"""

from __future__ import annotations

from ._arrays import (
    check_block_size,
    check_choice,
    check_floating,
    check_int,
    check_partner,
    check_real,
    check_weight,
    check_zero_tol,
    compute_dtype,
    device_of,
    from_rows,
    namespace_of,
    normalize_axis,
    to_rows,
)
from ._deprecation import renamed_choice, warn_deprecated
from ._raw_rows import RawRows
from ._tiles import InPlaceKernel, Workspace, register_in_place_kernel
from ._types import Array, GramFunction, Namespace
from .growth.flow import DEPTHWISE, is_depthwise, is_growable_depthwise
from .objective import Objective, as_objective
from .similarity import UnitRows

__all__ = [
    "DEPTHWISE",
    "InPlaceKernel",
    "RawRows",
    "UnitRows",
    "Workspace",
    "register_in_place_kernel",
    "Array",
    "GramFunction",
    "Namespace",
    "Objective",
    "as_objective",
    "check_block_size",
    "check_choice",
    "check_floating",
    "check_int",
    "check_partner",
    "check_real",
    "check_weight",
    "check_zero_tol",
    "compute_dtype",
    "device_of",
    "from_rows",
    "is_depthwise",
    "is_growable_depthwise",
    "namespace_of",
    "normalize_axis",
    "renamed_choice",
    "to_rows",
    "warn_deprecated",
]
