"""Hypothesis strategies that draw NumPy float64 weight arrays for the property tests.

Inputs are always drawn as NumPy float64; a test converts them to each backend
with :meth:`Backend.asarray`. Two kinds of strategy:

* :func:`weights`: generic layers. Hypothesis draws the layout, the shape, the
  row norms and which rows are zero; the row *directions* are Gaussian from a
  Hypothesis-drawn seed. Hypothesis' own float heuristics favour 0, 1 and 0.5,
  which makes exactly orthogonal pairs (``C_ij = 0``, where the loss has a
  kink) common, while Gaussian directions make them have probability zero.
  Row norms span a bounded ratio (``max_norm_ratio``) so no row is mistaken
  for a zero row and float32 neither under- nor overflows.
* structured generators with known exact answers: :func:`orthogonal_rows`
  (signed, scaled permutation rows or Sylvester-Hadamard rows; never QR, whose
  "orthogonal" rows have cosines of ~1e-16 instead of 0), :func:`parallel_rows`
  (duplicate and antiparallel rows) and :func:`rows_at_angle`.

>>> from hypothesis import given
>>> from simcore.testing import strategies
>>> @given(strategies.weights(layouts=("oihw",)))
... def test_shape(draw):
...     assert draw.w.ndim == 4 and draw.neuron_axis == 0
>>> test_shape()
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

__all__ = [
    "LAYOUTS",
    "WeightDraw",
    "min_abs_cosine",
    "orthogonal_rows",
    "parallel_rows",
    "random_orthogonal",
    "given_for",
    "is_compiling",
    "rows_at_angle",
    "size_limits",
    "structured_shape",
    "weights",
]

#: Backends that compile for every new input shape (JAX traces per shape):
#: :func:`size_limits` pins their shapes so a Hypothesis run compiles once per layout.
_COMPILING_BACKENDS = ("jax", "jax_jit")


def size_limits(backend) -> dict[str, int]:
    """Keyword arguments for :func:`weights` that keep a test fast on ``backend``.

    Empty for eager backends; for JAX (which compiles per shape, ~0.5 s each) one
    shape per layout, so the values vary across examples but the shapes do not.
    """
    if getattr(backend, "name", backend) in _COMPILING_BACKENDS:
        return {"min_neurons": 6, "max_neurons": 6, "min_fan_in": 4, "max_fan_in": 4,
                "min_kernel": 2, "max_kernel": 2}
    return {}


def is_compiling(backend) -> bool:
    """Whether ``backend`` compiles per input shape and keyword set (JAX)."""
    return getattr(backend, "name", backend) in _COMPILING_BACKENDS


def given_for(backend, *given_args, **given_kwargs):
    """``hypothesis.given`` with an example budget that suits ``backend``.

    Eager backends get the active profile's ``max_examples``; JAX backends,
    where every new shape costs a compilation, a sixth of it (at least 2).
    Use it on a function nested in a test that receives the backend::

        def test_loss_is_bounded(backend):
            @given_for(backend, strategies.weights())
            def check(draw):
                ...
            check()
    """
    budget = settings().max_examples  # the active profile's (settings.default may be unset)
    if is_compiling(backend):
        budget = max(2, budget // 6)

    def decorate(fn):
        return settings(max_examples=budget)(given(*given_args, **given_kwargs)(fn))

    return decorate

#: Weight layouts and the neuron axis each uses: ``dense`` is PyTorch's
#: ``(out, in)``, ``dense_io`` Flax/Keras ``(in, out)``, ``oihw`` a PyTorch conv
#: kernel, ``hwio`` a Flax/Keras conv kernel.
LAYOUTS = {"dense": 0, "dense_io": -1, "oihw": 0, "hwio": -1}


class WeightDraw(NamedTuple):
    """A drawn weight array and the axis that holds its neurons."""

    w: np.ndarray
    neuron_axis: int


def _layout_shape(layout: str, n: int, fan_in: int, kernel: tuple[int, int]) -> tuple[int, ...]:
    kh, kw = kernel
    if layout == "dense":
        return (n, fan_in)
    if layout == "dense_io":
        return (fan_in, n)
    if layout == "oihw":
        return (n, fan_in, kh, kw)
    return (kh, kw, fan_in, n)


@st.composite
def weights(
    draw,
    *,
    layouts: tuple[str, ...] = ("dense",),
    min_neurons: int = 2,
    max_neurons: int = 12,
    min_fan_in: int = 1,
    max_fan_in: int = 16,
    min_kernel: int = 1,
    max_kernel: int = 3,
    max_norm_ratio: float = 1e3,
    zero_rows: bool = False,
) -> WeightDraw:
    """A :class:`WeightDraw` ``(w, neuron_axis)`` with ``w`` float64 in one of ``layouts``.

    ``min_fan_in``/``max_fan_in`` bound the input channels (for conv layouts the
    fan-in is that times ``kh * kw``, each in ``min_kernel..max_kernel``). Row norms lie
    in ``[1/sqrt(max_norm_ratio), sqrt(max_norm_ratio)]``. With
    ``zero_rows=True`` some rows (possibly none, possibly all but one, possibly
    all) are set exactly to zero.
    """
    unknown = set(layouts) - set(LAYOUTS)
    if unknown or not layouts:
        raise ValueError(f"layouts must be a non-empty subset of {sorted(LAYOUTS)}, got {layouts}")
    layout = draw(st.sampled_from(layouts))
    n = draw(st.integers(min_neurons, max_neurons))
    fan_in = draw(st.integers(min_fan_in, max_fan_in))
    kernel = (1, 1)
    if layout in ("oihw", "hwio"):
        kernel = (
            draw(st.integers(min_kernel, max_kernel)),
            draw(st.integers(min_kernel, max_kernel)),
        )
    seed = draw(st.integers(0, 2**32 - 1))
    half_decades = math.log10(max_norm_ratio) / 2
    log_norms = draw(
        st.lists(st.floats(-half_decades, half_decades), min_size=n, max_size=n)
    )
    rng = np.random.default_rng(seed)
    d = fan_in * kernel[0] * kernel[1]
    rows = rng.standard_normal((n, d))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows *= (10.0 ** np.asarray(log_norms))[:, None]
    if zero_rows:
        zeroed = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        rows[np.asarray(zeroed, dtype=bool)] = 0.0
    shape = _layout_shape(layout, n, fan_in, kernel)
    axis = LAYOUTS[layout]
    # Rows are (n, d) with d in the C order of the non-neuron axes: move the neuron axis back.
    moved = (shape[axis], *(s for i, s in enumerate(shape) if i != axis % len(shape)))
    w = np.ascontiguousarray(np.moveaxis(rows.reshape(moved), 0, axis))
    return WeightDraw(w, axis)


def _hadamard(m: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    return h


@st.composite
def orthogonal_rows(
    draw, *, max_neurons: int = 16, max_fan_in: int = 24, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """An ``(n, d)`` float64 array whose rows are *exactly* orthogonal in floating point.

    Either a signed, scaled partial permutation (each row one non-zero entry in
    its own column, any positive scale: every product in a dot product is an
    exact 0) or ``n`` rows of a Sylvester-Hadamard matrix of size 4 or 16 with
    power-of-two scales, padded with zero columns (entries ``+-2^k``: after
    normalisation every product is an exact power of two, so the sums are
    exact). The cosines, hence the loss and its gradient, are exactly 0 on every
    backend and in every floating dtype. ``shape=(n, d)`` (``2 <= n <= d``)
    fixes the shape (see :func:`structured_shape`).
    """
    if shape is not None:
        n, d = shape
        if not 2 <= n <= d:
            raise ValueError(f"orthogonal rows need 2 <= n <= d, got shape {shape}")
    hadamard_sizes = [m for m in (4, 16) if m <= (max_fan_in if shape is None else d)
                      and (shape is None or n <= m)]
    kinds = ("permutation", "hadamard") if hadamard_sizes else ("permutation",)
    kind = draw(st.sampled_from(kinds))
    if kind == "permutation":
        if shape is None:
            d = draw(st.integers(2, max_fan_in))
            n = draw(st.integers(2, min(max_neurons, d)))
        columns = draw(st.permutations(range(d)))[:n]
        signs = draw(st.lists(st.sampled_from((-1.0, 1.0)), min_size=n, max_size=n))
        scales = draw(st.lists(st.floats(0.05, 20.0), min_size=n, max_size=n))
        w = np.zeros((n, d))
        w[np.arange(n), columns] = np.asarray(signs) * np.asarray(scales)
        return w
    m = draw(st.sampled_from(hadamard_sizes))
    if shape is None:
        n = draw(st.integers(2, min(m, max_neurons)))
        d = m + draw(st.integers(0, max(0, max_fan_in - m)))
    chosen = draw(st.permutations(range(m)))[:n]
    powers = draw(st.lists(st.integers(-4, 4), min_size=n, max_size=n))
    rows = _hadamard(m)[list(chosen)] * (2.0 ** np.asarray(powers, dtype=float))[:, None]
    return np.concatenate([rows, np.zeros((n, d - m))], axis=1)


@st.composite
def parallel_rows(
    draw, *, max_neurons: int = 10, max_fan_in: int = 16, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """An ``(n, d)`` array of copies of one row, each scaled by ``+-2^k``.

    Every pair is parallel or antiparallel, so ``|C_ij| = 1`` and the loss is 1
    up to rounding (power-of-two scales make every unit row bit-identical up to
    sign). ``shape=(n, d)`` fixes the shape.
    """
    if shape is None:
        n = draw(st.integers(2, max_neurons))
        d = draw(st.integers(1, max_fan_in))
    else:
        n, d = shape
    seed = draw(st.integers(0, 2**32 - 1))
    base = np.random.default_rng(seed).standard_normal(d)
    signs = draw(st.lists(st.sampled_from((-1.0, 1.0)), min_size=n, max_size=n))
    powers = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    return np.asarray(signs)[:, None] * (2.0 ** np.asarray(powers, dtype=float))[:, None] * base


def structured_shape(backend) -> tuple[int, int] | None:
    """``shape=`` for :func:`orthogonal_rows`/:func:`parallel_rows` on ``backend``.

    ``None`` (any shape) on eager backends; one fixed shape on JAX backends, so
    each dtype compiles once.
    """
    return (4, 16) if is_compiling(backend) else None


@st.composite
def rows_at_angle(draw, *, max_fan_in: int = 16) -> tuple[np.ndarray, float]:
    """``(w, t)``: two rows at angle ``t`` in ``[0, pi]`` (so ``mu = |cos t|``), any norms.

    The pair spans the first two coordinates, then is rotated by a random
    orthogonal matrix so the rows are not axis-aligned.
    """
    d = draw(st.integers(2, max_fan_in))
    t = draw(st.floats(0.0, math.pi))
    r1, r2 = draw(st.floats(0.1, 10.0)), draw(st.floats(0.1, 10.0))
    seed = draw(st.integers(0, 2**32 - 1))
    w = np.zeros((2, d))
    w[0, 0] = r1
    w[1, 0], w[1, 1] = r2 * math.cos(t), r2 * math.sin(t)
    return w @ random_orthogonal(d, np.random.default_rng(seed)), t


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random ``d x d`` orthogonal matrix (QR of a Gaussian, signs fixed).

    Fine for rotating inputs; not for building exactly orthogonal rows (see
    :func:`orthogonal_rows`).
    """
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]


def min_abs_cosine(w: np.ndarray, neuron_axis: int = 0) -> float:
    """Smallest ``|C_ij|``, ``i != j``, over non-zero rows (``inf`` with fewer than 2 of them).

    The gradient jumps where a cosine changes sign (``sign(C_ij)``), so a test
    comparing gradients computed with different rounding should skip draws with
    a cosine closer to 0 than its dtype's rounding error.
    """
    w = np.asarray(w, dtype=np.float64)
    rows = np.moveaxis(w, neuron_axis, 0).reshape(w.shape[neuron_axis], -1)
    norms = np.linalg.norm(rows, axis=1)
    rows = rows[norms > 0] / norms[norms > 0, None]
    if rows.shape[0] < 2:
        return math.inf
    cosines = np.abs(rows @ rows.T)[~np.eye(rows.shape[0], dtype=bool)]
    return float(cosines.min())
