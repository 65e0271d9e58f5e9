"""Oracle for the paper's Eq. 1 (cosine similarity map) and Eq. 2 (mean |cosine|) with its gradient.

Everything is float64 and written pair by pair with Python loops over neurons.

Eq. 1: ``u_i = w_i / r_i`` with ``r_i = ||w_i||``, ``C_ij = u_i . u_j`` (= w_i.w_j / (r_i r_j)).
Eq. 2: ``mu = 1/N * sum_{i != j} |C_ij|`` over ordered pairs of *active* rows, ``N = m(m-1)``.

Gradient, per pair.  For active i != j,
    d cos(w_i, w_j) / d w_i = w_j / (r_i r_j) - cos_ij * w_i / r_i^2 = (u_j - cos_ij u_i) / r_i.
|C_ij| and |C_ji| are the same number, so w_i appears in two ordered terms of each unordered
pair {i, j} and
    d mu / d w_i = (2 / N) * sum_{j != i, active} sign(C_ij) * (u_j - C_ij u_i) / r_i,
with sign(0) = 0.  Inactive rows, and every row when m < 2, get an exactly zero gradient.
"""

from __future__ import annotations

import math

import numpy as np

from ._rows import active_rows, from_rows, sign, to_rows


def _unit_rows_and_cosines(rows: np.ndarray, zero_tol):
    """Active indices, row norms, unit rows of the active neurons, and C for active pairs."""
    r, active = active_rows(rows, zero_tol)
    unit = {i: rows[i] / r[i] for i in active}
    cos = {}
    for a, i in enumerate(active):
        for j in active[a + 1:]:
            c = float(np.dot(unit[i], unit[j]))
            cos[(i, j)] = c
            cos[(j, i)] = c
    return active, r, unit, cos


def similarity_map(w, *, neuron_axis=0, zero_tol=None) -> np.ndarray:
    """Eq. 1: the (n, n) float64 cosine similarity map between neurons.

    Active rows: ``C_ij = cos(w_i, w_j)``, diagonal exactly 1.0.  A row/column of an inactive
    neuron (``r_i <= zero_tol * max_k r_k``) is all zeros, its diagonal entry included.
    Off-diagonal values are not clipped to [-1, 1].
    """
    rows, _ = to_rows(w, neuron_axis)
    n = rows.shape[0]
    active, _, _, cos = _unit_rows_and_cosines(rows, zero_tol)
    out = np.zeros((n, n), dtype=np.float64)
    for i in active:
        for j in active:
            out[i, j] = 1.0 if i == j else cos[(i, j)]
    return out


def similarity_loss(w, *, neuron_axis=0, zero_tol=None) -> float:
    """Eq. 2: mean |C_ij| over ordered pairs i != j of active rows (0.0 when fewer than 2)."""
    rows, _ = to_rows(w, neuron_axis)
    active, _, _, cos = _unit_rows_and_cosines(rows, zero_tol)
    m = len(active)
    if m < 2:
        return 0.0
    n_pairs = m * (m - 1)
    terms = [abs(cos[(i, j)]) for i in active for j in active if i != j]
    return math.fsum(terms) / n_pairs


def similarity_loss_and_grad(w, *, neuron_axis=0, zero_tol=None):
    """Eq. 2 and its gradient w.r.t. w, returned in w's original shape and layout (float64)."""
    rows, layout = to_rows(w, neuron_axis)
    active, r, unit, cos = _unit_rows_and_cosines(rows, zero_tol)
    grad = np.zeros_like(rows)
    m = len(active)
    if m < 2:
        return 0.0, from_rows(grad, layout)
    n_pairs = m * (m - 1)
    terms = []
    for i in active:
        g_i = np.zeros(rows.shape[1], dtype=np.float64)
        for j in active:
            if j == i:
                continue
            c = cos[(i, j)]
            terms.append(abs(c))
            s = sign(c)
            if s == 0.0:
                continue
            dcos_dwi = (unit[j] - c * unit[i]) / r[i]
            g_i += s * dcos_dwi
        grad[i] = (2.0 / n_pairs) * g_i
    loss = math.fsum(terms) / n_pairs
    return loss, from_rows(grad, layout)
