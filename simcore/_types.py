"""The array and namespace type aliases of the public layer, defined once.

The library accepts arrays of any Array-API library (NumPy, PyTorch, JAX, CuPy,
array-api-strict), which share no common base class; a precise static type would be a
``Protocol`` of the standard's array methods, which the frameworks' own stubs do not all
satisfy. The aliases name the intent at every public signature; they are ``Any`` to a type
checker. Import them from :mod:`simcore.extend`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Array", "GramFunction", "Namespace"]

#: An array of any Array-API library (``numpy.ndarray``, ``torch.Tensor``, ``jax.Array``,
#: ``cupy.ndarray``, ...). Functions return arrays of the library, dtype and device they got.
Array = Any

#: An Array-API namespace, as ``array_api_compat.array_namespace(x)`` returns it.
Namespace = Any

#: ``gram(u) -> u @ u.T`` for one 2-D tile of unit rows: a replacement kernel for the
#: symmetric diagonal tiles of Eq. 1's Gram matrix (e.g. cuBLAS SYRK).
GramFunction = Callable[[Any], Any]
