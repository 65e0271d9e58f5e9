"""Row operations and the in-place strip path of the similarity loss's value and gradient.

Two ways to run the same maths (simcore/similarity.py holds the maths and the choice):

* :class:`RowOps`, functional: every operation returns a new array. It runs on every
  Array-API library (JAX, array-api-strict, CuPy, ...) and traces under ``jax.jit``.
* an :class:`InPlaceKernel`, for libraries with mutable arrays (NumPy here; PyTorch
  registers one from ``simcore.adapters.torch``): the gradient is built by
  :func:`strip_products` in a few large GEMMs written into preallocated buffers
  (``out=``, in-place accumulation), with the work buffers kept per thread between
  calls (:class:`Workspace`), so a training loop allocates only the returned gradient.

The strip path (see docs/design.md, 'The similarity loss (Eq. 1-2)'): rows are taken
``h`` at a time; strip ``a`` is ``C[a, a:] = U_a U[a:]^T`` (the diagonal block and
everything right of it: the upper triangle only, so about half a GEMM forward), its
signs ``S`` are formed in place, and ``G = S U`` is accumulated from the strip alone,
``G_a = S[a, a:] U[a:]`` and ``G[below] += S[a, below]^T U_a``: one GEMM backward.
Strips run last to first, so ``G_a`` is written once (``out=``) and only the second
product accumulates. Extra memory: the unit rows, one ``h x n`` strip and (for
kernels that cannot accumulate in the GEMM) one ``h x d`` product buffer.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any

from ._types import Array, Namespace

__all__ = [
    "InPlaceKernel",
    "RowOps",
    "Workspace",
    "in_place_kernel",
    "register_in_place_kernel",
    "strip_products",
]


class RowOps:
    """The ``n x d`` operations of the loss, functional (Array API only)."""

    in_place = False

    def __init__(self, xp: Namespace):
        self.xp = xp

    def max_abs_rows(self, rows: Array) -> Array:
        """Each row's largest magnitude."""
        return self.xp.max(self.xp.abs(rows), axis=1)

    def divide_rows(self, rows: Array, divisors: Array) -> Array:
        """``rows / divisors[:, None]`` (a new array: ``rows`` may be the caller's)."""
        return rows / divisors[:, None]

    def row_dots(self, a: Array, b: Array) -> Array:
        """``(a_i . b_i)`` for every row ``i``."""
        return self.xp.vecdot(a, b)

    def scale_rows(self, x: Array, factors: Array) -> Array:
        """``x * factors[:, None]``; in place for an in-place kernel (``x`` is its own)."""
        return x * factors[:, None]

    def subtract_scaled_rows(self, g: Array, u: Array, factors: Array) -> Array:
        """``g - u * factors[:, None]``; in place for an in-place kernel."""
        return g - u * factors[:, None]


class Workspace(threading.local):
    """Per-thread scratch buffers by role, grown to the largest size asked for, kept between calls.

    A buffer is kept only while it is at most ``limit_bytes``; larger ones are allocated
    per call (and freed after it), so the memory held between calls is bounded.
    """

    def __init__(self, limit_bytes: int = 256 * 2**20):
        self.limit_bytes = limit_bytes
        self.buffers: dict[Any, Any] = {}

    def get(self, key: Any, size: int, itemsize: int, allocate: Any) -> Any:
        """A flat buffer of at least ``size`` items for ``key`` (``allocate(size)`` makes one)."""
        buffer = self.buffers.get(key)
        if buffer is not None and buffer.shape[0] >= size:
            return buffer
        buffer = allocate(size)
        if size * itemsize <= self.limit_bytes:
            self.buffers[key] = buffer
        else:
            self.buffers.pop(key, None)
        return buffer


class InPlaceKernel(RowOps):
    """:class:`RowOps` plus the buffer operations :func:`strip_products` needs.

    Subclasses implement the abstract methods for one library with mutable arrays;
    ``accepts(xp, u)`` says whether this kernel runs ``u`` (e.g. not a tensor that
    autograd tracks). ``symmetric_gram`` is true where ``a @ a.T`` costs about half a GEMM
    (NumPy calls SYRK for it), so diagonal blocks need not be split small.
    """

    in_place = True
    symmetric_gram = False

    @classmethod
    def accepts(cls, xp: Namespace, u: Array) -> bool:
        raise NotImplementedError

    def empty(self, shape: tuple[int, ...], like: Array) -> Array:
        """A new uninitialised array of ``like``'s dtype and device."""
        raise NotImplementedError

    def scratch(self, role: str, shape: tuple[int, ...], like: Array) -> Array:
        """A reused buffer of ``shape`` (contents undefined) for ``role``."""
        raise NotImplementedError

    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array:
        """A view of the contiguous ``x`` with ``shape``."""
        return self.xp.reshape(x, shape)

    def matmul(self, a: Array, b: Array, out: Array) -> None:
        """``out[...] = a @ b``."""
        raise NotImplementedError

    def add_matmul(self, out: Array, a: Array, b: Array) -> None:
        """``out += a @ b``."""
        raise NotImplementedError

    def sign_(self, x: Array) -> None:
        """``x[...] = sign(x)`` (``sign(0) = 0``)."""
        raise NotImplementedError

    def zero_diagonal_(self, x: Array) -> None:
        """Zero the main diagonal of the square 2-D view ``x``."""
        raise NotImplementedError

    def copy_transposed(self, source: Array, out: Array) -> None:
        """``out[...] = source.T``."""
        raise NotImplementedError

    def cheap_host_reads(self, u: Array) -> bool:
        """Whether reading a few values of ``u`` on the host costs no device sync.

        Only then does the loss take the raw-Gram path (simcore/_gram.py), which decides on
        the host whether the raw Gram matrix is safe; kernels that leave this ``False`` need
        none of the methods below it."""
        return False

    def overflow_allowed(self) -> Any:
        """A context in which products may overflow without a warning or error."""
        return contextlib.nullcontext()

    def diagonal(self, x: Array) -> Array:
        """A copy of the main diagonal of the square 2-D ``x``."""
        raise NotImplementedError

    def sign_into(self, x: Array, out: Array) -> None:
        """``out[...] = sign(x)`` (``sign(0) = 0``)."""
        raise NotImplementedError

    def abs_(self, x: Array) -> None:
        """``x[...] = |x|``."""
        raise NotImplementedError

    def matvec(self, a: Array, v: Array) -> Array:
        """``a @ v`` for a 2-D ``a`` and a vector ``v`` (a new vector)."""
        raise NotImplementedError

    def vecmat(self, v: Array, a: Array) -> Array:
        """``v @ a`` for a vector ``v`` and a 2-D ``a`` (a new vector)."""
        raise NotImplementedError

    def scale_columns_(self, x: Array, factors: Array) -> None:
        """``x[...] = x * factors[None, :]``."""
        raise NotImplementedError

    def set_diagonal_(self, x: Array, values: Array) -> None:
        """Write ``values`` on the main diagonal of the square 2-D view ``x``."""
        raise NotImplementedError

    def rows_are_zero(self, rows: Array, mask: Any) -> bool:
        """Whether every row of ``rows`` where the NumPy bool vector ``mask`` is true is 0."""
        raise NotImplementedError

    def host(self, x: Array) -> Any:
        """A NumPy view of the kernel's array ``x`` (no copy: host memory)."""
        raise NotImplementedError

    def from_host(self, x: Any, like: Array) -> Array:
        """The NumPy array ``x`` as an array of ``like``'s library (no copy)."""
        raise NotImplementedError

    def diagonal_block(self, rows: int) -> int:
        """Rows of the pieces a strip's ``rows x rows`` diagonal block is built from.

        With a half-cost ``a @ a.T`` (``symmetric_gram``) each piece is one, and the blocks
        right of it are GEMMs. Without one, each piece of ``b`` rows is a single GEMM from
        its diagonal to the strip's end (wasting the lower half of its ``b x b`` diagonal
        block, ``b / (2 rows)`` of the diagonal block's products): ``rows / 8`` within
        ``[64, 256]`` was the fastest on torch's CPU GEMM, Python's cost per piece included
        (docs/design.md).
        """
        return rows if self.symmetric_gram else max(64, min(256, rows // 8))

    def gram_strip(self, u_a: Array, u_rest: Array, out: Array) -> None:
        """``out[...] = u_a @ u_rest.T`` where ``u_rest`` starts with the rows of ``u_a``.

        Only the products on and above the diagonal are computed; the lower triangle of the
        diagonal block is a mirror copy."""
        rows = int(u_a.shape[0])
        block = self.diagonal_block(rows)
        if not self.symmetric_gram:
            for start in range(0, rows, block):
                stop = min(start + block, rows)
                self.matmul(u_a[start:stop], u_rest[start:].T, out[start:stop, start:])
                if stop < rows:
                    self.copy_transposed(out[start:stop, stop:rows], out[stop:rows, start:stop])
            return
        if u_rest.shape[0] > rows:
            self.matmul(u_a, u_rest[rows:].T, out[:, rows:])
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            part = u_a[start:stop]
            self.matmul(part, part.T, out[start:stop, start:stop])
            if stop < rows:
                self.matmul(part, u_a[stop:].T, out[start:stop, stop:rows])
                self.copy_transposed(out[start:stop, stop:rows], out[stop:rows, start:stop])

    def strip_height(self, n: int, d: int, itemsize: int) -> int:
        """Rows per strip when no ``block_size`` is given: as many as keep the ``rows x n``
        strip under 16 MiB (all of them up to n = 2048 in float32). Tall strips make the
        second product of each strip (``G[below] += S^T U_a``, inner size ``rows``) an
        efficient GEMM rather than a memory-bound low-rank update."""
        return min(n, max(64, (16 * 2**20) // (n * itemsize)))


_KERNELS: list[type[InPlaceKernel]] = []


def register_in_place_kernel(kernel: type[InPlaceKernel]) -> None:
    """Let :func:`simcore.similarity_loss_and_grad` run arrays ``kernel.accepts`` in place.

    Later registrations are tried first; registering a class twice has no effect.
    """
    if not (isinstance(kernel, type) and issubclass(kernel, InPlaceKernel)):
        raise TypeError(f"kernel must be an InPlaceKernel subclass, got {kernel!r}")
    if kernel not in _KERNELS:
        _KERNELS.insert(0, kernel)


#: Kernels shipped in simcore's own adapters, by the top-level module of the array type:
#: imported the first time such an array is seen (its framework is loaded by then), so
#: the core's plain functions get them without the caller importing the adapter.
_SHIPPED = {"torch": "simcore.adapters.torch.kernel"}


def in_place_kernel(xp: Namespace, u: Array) -> InPlaceKernel | None:
    """The registered kernel that runs ``u`` in place, or ``None`` (the functional path)."""
    shipped = _SHIPPED.pop(type(u).__module__.split(".")[0], None)
    if shipped is not None:
        try:
            importlib.import_module(shipped)
        except ImportError:  # pragma: no cover - a broken install: the functional path still works
            pass
    for kernel in _KERNELS:
        if kernel.accepts(xp, u):
            return kernel(xp)
    return None


def strip_products(kernel: InPlaceKernel, u: Array, height: int) -> Array:
    """``G = S U`` with ``S = sign(U U^T)`` off the diagonal (0 on it), from upper strips.

    ``u`` is ``(n, d)`` and C-contiguous; the result is a new ``(n, d)`` array. See the
    module docstring for the order of the products.
    """
    n, d = int(u.shape[0]), int(u.shape[1])
    height = max(1, min(height, n))
    g = kernel.empty((n, d), u)
    strip = kernel.scratch("strip", (height * n,), u)
    for start in reversed(range(0, n, height)):
        stop = min(start + height, n)
        rows, width = stop - start, n - start
        signs = kernel.reshape(strip[: rows * width], (rows, width))
        u_a = u[start:stop, :]
        kernel.gram_strip(u_a, u[start:, :], signs)
        kernel.sign_(signs)
        # A neuron is not paired with itself.
        kernel.zero_diagonal_(signs[:, :rows])
        kernel.matmul(signs, u[start:, :], g[start:stop, :])
        if width > rows:
            kernel.add_matmul(g[stop:, :], signs[:, rows:].T, u_a)
    return g
