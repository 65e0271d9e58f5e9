"""CuPy glue for simcore: the loss on the GPU, on the input's device, without host round trips.

The core already runs on CuPy arrays (through array-api-compat): every step of
:func:`simcore.similarity_loss_and_grad` is a CuPy kernel or cuBLAS call on the
current stream, and values are never inspected on the host. This module adds:

* :func:`similarity_loss_and_grad`: runs the core inside ``with w.device:`` so
  an array on GPU 1 is computed on GPU 1 whatever the current device is; the
  current stream is used (wrap the call in ``with stream:`` to choose one).
* a SYRK Gram matrix, :func:`syrk_gram` (``cupy.cublas.syrk``: ``n^2 d`` flops
  instead of GEMM's ``2 n^2 d``, one triangle computed and mirrored), behind
  ``method="auto" | "gemm" | "syrk"``.

State of the measurement: ``"auto"`` means ``"gemm"`` for now. Which path is
faster depends on the GPU and on ``n`` (cuBLAS GEMM often beats the symmetric
kernels below ``n ~ 4096``); no GPU was available when this module was written,
so neither its tests nor a benchmark have been run on one, and the choice is
not yet made by measurement.

Install CuPy with the extra matching your CUDA: ``pip install
"simcore[cupy-cuda12x]"`` or ``"simcore[cupy-cuda13x]"``.
"""

from __future__ import annotations

from typing import Any

try:
    import cupy
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "simcore.adapters.cupy needs CuPy, which is not installed. Install the build for "
        "your CUDA version: pip install 'simcore[cupy-cuda12x]' (CUDA 12.x) or "
        "pip install 'simcore[cupy-cuda13x]' (CUDA 13.x)."
    ) from error

import simcore
from simcore.extend import check_block_size, check_choice

__all__ = ["METHODS", "similarity_loss", "similarity_loss_and_grad", "syrk_gram"]

#: Gram-matrix kernels: ``"gemm"`` (``u @ u.T``), ``"syrk"`` (``cupy.cublas.syrk``), and
#: ``"auto"``, which currently means ``"gemm"`` (not yet chosen by measurement).
METHODS = ("auto", "gemm", "syrk")


def _check_cupy(w: Any, name: str = "w") -> None:
    if not isinstance(w, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(w).__name__}")


def syrk_gram(u: Any) -> Any:
    """``u @ u.T`` for a 2-D float32/float64 CuPy array through cuBLAS SYRK, on ``u``'s device.

    SYRK fills one triangle; the other is mirrored, so the result is the full
    symmetric matrix (C-contiguous, like ``u @ u.T``).
    """
    _check_cupy(u, "u")
    if u.ndim != 2:
        raise ValueError(f"u must be 2-D (rows x features), got shape {u.shape}")
    if u.dtype not in (cupy.float32, cupy.float64):
        raise TypeError(f"u must be float32 or float64 for SYRK, got {u.dtype}")
    with u.device:
        triangle = cupy.cublas.syrk("N", cupy.ascontiguousarray(u))
        full = triangle + triangle.T - cupy.diag(cupy.diag(triangle))
        return cupy.ascontiguousarray(full)


def similarity_loss_and_grad(
    w: Any,
    *,
    neuron_axis: int = 0,
    block_size: int | None = None,
    zero_tol: float | None = None,
    method: str = "auto",
) -> tuple[Any, Any]:
    """:func:`simcore.similarity_loss_and_grad` for a CuPy array, on ``w``'s own device.

    ``method="syrk"`` builds the symmetric diagonal tiles of the Gram matrix
    (all of it when ``n`` fits one tile) with cuBLAS SYRK; ``"gemm"`` and
    ``"auto"`` run the core as it is. Results are 0-d / ``w``-shaped CuPy
    arrays on ``w.device``.
    """
    _check_cupy(w)
    check_choice(method, METHODS, "method")
    block_size = check_block_size(block_size)
    with w.device:
        # The core's maths with only the diagonal tiles' Gram product swapped for SYRK.
        gram = syrk_gram if method == "syrk" else None
        return simcore.similarity_loss_and_grad(w, neuron_axis=neuron_axis, block_size=block_size,
                                                zero_tol=zero_tol, gram=gram)


def similarity_loss(
    w: Any,
    *,
    neuron_axis: int = 0,
    block_size: int | None = None,
    zero_tol: float | None = None,
) -> Any:
    """:func:`simcore.similarity_loss` for a CuPy array, computed on ``w``'s own device."""
    _check_cupy(w)
    with w.device:
        return simcore.similarity_loss(
            w, neuron_axis=neuron_axis, block_size=block_size, zero_tol=zero_tol
        )
