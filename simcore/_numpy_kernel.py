"""The in-place kernel for NumPy arrays (NumPy is the core's own dependency).

``np.matmul(..., out=)`` writes products straight into work buffers, ``u @ u.T`` of
one array is SYRK inside NumPy (half a GEMM), and the work buffers are reused
between calls (see simcore/_tiles.py): on glibc, freeing and re-mapping large
temporaries costs page faults that were a large part of the loss's time.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np

from ._tiles import InPlaceKernel, Workspace, register_in_place_kernel

__all__ = ["NumpyKernel"]

_WORKSPACE = Workspace()

#: Diagonal blocks of at least this many rows are built from quarters (see gram_strip).
_SPLIT_FROM = 256


class NumpyKernel(InPlaceKernel):
    symmetric_gram = True

    @classmethod
    def accepts(cls, xp: Any, u: Any) -> bool:
        return array_api_compat.is_numpy_namespace(xp) and isinstance(u, np.ndarray)

    def empty(self, shape, like):
        return np.empty(shape, dtype=like.dtype)

    def scratch(self, role, shape, like):
        size = int(np.prod(shape))
        flat = _WORKSPACE.get((role, like.dtype), size, like.dtype.itemsize,
                              lambda count: np.empty(count, dtype=like.dtype))
        return flat[:size].reshape(shape)

    def max_abs_rows(self, rows):
        # Two reductions that read ``rows`` in place rather than one over an abs() copy.
        return np.maximum(rows.max(axis=1), -rows.min(axis=1))

    def divide_rows(self, rows, divisors):
        out = self.scratch("unit", rows.shape, rows)
        return np.divide(rows, divisors[:, None], out=out)

    def row_dots(self, a, b):
        return np.einsum("ij,ij->i", a, b)

    def scale_rows(self, x, factors):
        return np.multiply(x, factors[:, None], out=x)

    def subtract_scaled_rows(self, g, u, factors):
        product = self.scratch("product", u.shape, u)
        np.multiply(u, factors[:, None], out=product)
        return np.subtract(g, product, out=g)

    def diagonal_block(self, rows):
        # SYRK, in quarters from 256 rows: OpenBLAS's SYRK (with NumPy's mirroring of its
        # triangle) costs about 0.63 of a GEMM at 2048 x 2048, four quarter SYRKs, six GEMMs
        # and six mirror copies about 0.57; at 256 x 1152 0.67 against 0.63 on one thread,
        # 0.83 against 0.73 on two (OpenBLAS threads its SYRK poorly at that size).
        return rows // 4 if rows >= _SPLIT_FROM else rows

    def copy_transposed(self, source, out):
        np.copyto(out, source.T)

    def matmul(self, a, b, out):
        np.matmul(a, b, out=out)

    def add_matmul(self, out, a, b):
        # NumPy's matmul cannot accumulate (BLAS beta = 1): one block of rows at a time
        # through a reused buffer of a's row count.
        step = max(1, a.shape[1])
        for start in range(0, out.shape[0], step):
            stop = min(start + step, out.shape[0])
            product = self.scratch("product", (stop - start, b.shape[1]), b)
            np.matmul(a[start:stop], b, out=product)
            np.add(out[start:stop], product, out=out[start:stop])

    def sign_(self, x):
        self.sign_into(x, x)

    def zero_diagonal_(self, x):
        np.fill_diagonal(x, 0)

    def cheap_host_reads(self, u):
        return True

    def reshape(self, x, shape):
        return x.reshape(shape)

    def overflow_allowed(self):
        return np.errstate(over="ignore", under="ignore", invalid="ignore")

    def diagonal(self, x):
        return x.diagonal().copy()

    def sign_into(self, x, out):
        # np.sign in place loses its SIMD loop (13x slower than out of place, NumPy 2.4).
        # Scaling by 2**(2 maxexp - 4) takes every non-zero magnitude, the smallest
        # subnormal included, to >= 1 (or inf), and clip maps it to exactly +-1; zeros
        # stay 0 and NaN stays NaN.
        big = np.asarray(2.0 ** (np.finfo(x.dtype).maxexp - 2), dtype=x.dtype)
        with np.errstate(over="ignore"):
            np.multiply(x, big, out=out)
            np.multiply(out, big, out=out)
        np.clip(out, -1, 1, out=out)

    def abs_(self, x):
        np.abs(x, out=x)

    def matvec(self, a, v):
        return a @ v

    def vecmat(self, v, a):
        return v @ a

    def scale_columns_(self, x, factors):
        np.multiply(x, factors, out=x)

    def set_diagonal_(self, x, values):
        np.fill_diagonal(x, values)

    def rows_are_zero(self, rows, mask):
        return not rows[mask].any()

    def host(self, x):
        return x

    def from_host(self, x, like):
        return x


register_in_place_kernel(NumpyKernel)
