"""Oracle for SSD's splitting matrices (Liu, Wang, Wu 2019), by brute force in float64.

For neuron ``i`` of a layer with inputs ``x_{b,p}`` (sample ``b``, position ``p``), backprop
``g_{b,p,i} = dL/dh_{b,p,i}``, pre-activation ``z_{b,p,i}`` and BatchNorm coefficient ``c_i``
(1 without BN)::

    S_i = sum_b sum_p g_{b,p,i} * sigma''(z_{b,p,i}) * c_i^2 * outer(x_{b,p}, x_{b,p})

written as an explicit Python loop over neurons, samples and positions, one outer product at
a time (``reduction="mean"`` divides by the number of samples). ``sigma''`` is computed here
from scalar formulas with ``math`` (ReLU: the second derivative of softplus with beta = 3, the
reference code's surrogate). Eigenpairs come from ``numpy.linalg.eigh``. Shares no code with
the core.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["second_derivative", "splitting_matrices", "min_eigenpairs", "hvp", "split_loss_change"]


def _sigmoid(t: float) -> float:
    if t >= 0:
        return 1.0 / (1.0 + math.exp(-t))
    e = math.exp(t)
    return e / (1.0 + e)


def second_derivative(name: str, z: float) -> float:
    """sigma''(z) for one float, from the textbook formulas."""
    if name == "relu":
        s = _sigmoid(3.0 * z)
        return 3.0 * s * (1.0 - s)
    if name == "softplus":
        s = _sigmoid(z)
        return s * (1.0 - s)
    if name in ("swish", "silu"):
        # swish = z s; swish' = s + z s (1-s); swish'' = 2 s (1-s) + z s (1-s)(1-2s)
        s = _sigmoid(z)
        return 2.0 * s * (1.0 - s) + z * s * (1.0 - s) * (1.0 - 2.0 * s)
    if name == "sigmoid":
        s = _sigmoid(z)
        return s * (1.0 - s) * (1.0 - 2.0 * s)
    if name == "tanh":
        t = math.tanh(z)
        return -2.0 * t * (1.0 - t * t)
    if name == "gelu":
        # z Phi(z): (z Phi)'' = 2 phi(z) + z phi'(z) = phi(z) (2 - z^2)
        return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) * (2.0 - z * z)
    if name == "identity":
        return 0.0
    raise ValueError(f"unknown activation {name!r}")


def splitting_matrices(patches, backprop, preactivations, *, activation="relu", bn_scale=None,
                       reduction="sum") -> np.ndarray:
    """(n, d, d) float64 splitting matrices; patches (B, P, d) or (B, d), the others (B, P, n)."""
    x = np.asarray(patches, dtype=np.float64)
    g = np.asarray(backprop, dtype=np.float64)
    z = np.asarray(preactivations, dtype=np.float64)
    if x.ndim == 2:
        x, g, z = x[:, None, :], g[:, None, :], z[:, None, :]
    batch, positions, d = x.shape
    n = g.shape[2]
    c = np.ones(n) if bn_scale is None else np.asarray(bn_scale, dtype=np.float64)
    out = np.zeros((n, d, d))
    for i in range(n):
        for b in range(batch):
            for p in range(positions):
                weight = g[b, p, i] * second_derivative(activation, float(z[b, p, i])) * c[i] ** 2
                out[i] += weight * np.outer(x[b, p], x[b, p])
    if reduction == "mean":
        out /= batch
    return out


def min_eigenpairs(s) -> tuple[np.ndarray, np.ndarray]:
    """(lambda_min (n,), v_min (n, d)) by numpy.linalg.eigh; largest |entry| of v made positive."""
    s = np.asarray(s, dtype=np.float64)
    lam = np.empty(s.shape[0])
    vec = np.empty(s.shape[:2])
    for i in range(s.shape[0]):
        w, v = np.linalg.eigh(s[i])
        lam[i] = w[0]
        u = v[:, 0]
        pivot = int(np.argmax(np.abs(u)))
        vec[i] = u if u[pivot] > 0 else -u
    return lam, vec


def hvp(s, v) -> np.ndarray:
    """[S_i v_i]_i from formed matrices, row by row."""
    s = np.asarray(s, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    return np.stack([s[i] @ v[i] for i in range(s.shape[0])])


def split_loss_change(s_i, v, eps: float) -> float:
    """SSD's second-order prediction of the loss change from splitting one neuron.

    Splitting ``theta`` into ``theta +/- eps v`` with halved outgoing weights changes the loss
    by ``eps^2 / 2 * v^T S v + O(eps^3)`` (Liu, Wang, Wu 2019, Theorem 2.4 with weights 1/2).
    """
    v = np.asarray(v, dtype=np.float64)
    return 0.5 * eps * eps * float(v @ np.asarray(s_i, dtype=np.float64) @ v)
