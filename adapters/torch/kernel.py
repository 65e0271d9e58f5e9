"""The in-place kernel that runs :func:`simcore.similarity_loss_and_grad` on torch tensors.

Registered with the core when this package is imported (the core also imports it
itself the first time it sees a tensor): products go straight into reused buffers
(``torch.mm(..., out=)``) and the second product of each strip accumulates inside
the GEMM (``addmm_``, BLAS ``beta = 1``), so a call allocates only its result.
Tensors that autograd tracks, and code being traced by ``torch.compile``, take the
core's functional path instead.
"""

from __future__ import annotations

import torch

from simcore.extend import InPlaceKernel, Workspace, register_in_place_kernel

__all__ = ["TorchKernel"]

_WORKSPACE = Workspace()


class TorchKernel(InPlaceKernel):
    @classmethod
    def accepts(cls, xp, u) -> bool:
        return (isinstance(u, torch.Tensor) and u.layout == torch.strided
                and not (u.requires_grad and torch.is_grad_enabled())
                and not torch.compiler.is_compiling())

    def empty(self, shape, like):
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    def scratch(self, role, shape, like):
        size = 1
        for extent in shape:
            size *= int(extent)
        # A buffer made under inference_mode cannot be written outside it (and vice versa).
        key = (role, like.dtype, like.device, torch.is_inference_mode_enabled())
        flat = _WORKSPACE.get(key, size, like.element_size(),
                              lambda count: torch.empty(count, dtype=like.dtype,
                                                        device=like.device))
        return flat[:size].view(shape)

    def max_abs_rows(self, rows):
        # Two plain reductions: vector_norm(ord=inf) and aminmax were 20x slower (torch 2.13 CPU).
        return torch.maximum(rows.amax(dim=1), -rows.amin(dim=1))

    def divide_rows(self, rows, divisors):
        return torch.div(rows, divisors[:, None], out=self.scratch("unit", rows.shape, rows))

    def row_dots(self, a, b):
        return torch.linalg.vecdot(a, b)

    def scale_rows(self, x, factors):
        return x.mul_(factors[:, None])

    def subtract_scaled_rows(self, g, u, factors):
        return g.addcmul_(u, factors[:, None], value=-1)

    def matmul(self, a, b, out):
        torch.mm(a, b, out=out)

    def copy_transposed(self, source, out):
        out.copy_(source.T)

    def add_matmul(self, out, a, b):
        out.addmm_(a, b)

    def sign_(self, x):
        x.sign_()

    def zero_diagonal_(self, x):
        x.diagonal().zero_()

    def cheap_host_reads(self, u):
        # On a GPU the raw-Gram path's host checks would sync the device on every call.
        return u.device.type == "cpu"

    def reshape(self, x, shape):
        return x.view(shape)

    def diagonal(self, x):
        return x.diagonal().clone()

    def sign_into(self, x, out):
        torch.sign(x, out=out)

    def abs_(self, x):
        x.abs_()

    def matvec(self, a, v):
        return torch.mv(a, v)

    def vecmat(self, v, a):
        return torch.mv(a.T, v)

    def scale_columns_(self, x, factors):
        x.mul_(factors)

    def set_diagonal_(self, x, values):
        x.diagonal().copy_(values)

    def rows_are_zero(self, rows, mask):
        return not bool(rows[torch.from_numpy(mask)].any())

    def host(self, x):
        return x.numpy()

    def from_host(self, x, like):
        return torch.from_numpy(x)


register_in_place_kernel(TorchKernel)
