"""SSD exact mode by Lanczos (``simcore.growth.ssd_exact``) against the direct path it replaces.

The direct path forms every splitting matrix and takes its lowest eigenpair
(``min_eigenpairs(splitting_matrices(...))``); the Lanczos path must give the same pair to the
solver's precision, fall back to the direct path for the neurons it leaves unconverged, and
handle the rank-deficient matrices of layers with fewer rows than fan-in.
"""

from __future__ import annotations

import numpy as np
import pytest
from simcore.reference import ssd as ref

from simcore.growth import ssd_exact
from simcore.growth.ssd import hvp_from_statistics, min_eigenpairs, splitting_matrices
from simcore.growth.ssd_exact import exact_min_eigenpairs, lanczos_min_eigenpairs
from simcore.testing import available_backends


def _statistics(seed, rows, d, n):
    # Input features of decaying scale, like a trained layer's: the extreme eigenvalues stand
    # out and Lanczos converges within its default steps (isotropic rows would fall back).
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 1, d)) * np.arange(1, d + 1) ** -0.5
    g = rng.normal(size=(rows, 1, n))
    z = rng.normal(size=(rows, 1, n))
    return x, g, z, rng.uniform(0.5, 1.5, n)


def _solvers(backend, arrays, activation="swish"):
    x, g, z, c = (backend.asarray(a) for a in arrays)
    hvp = hvp_from_statistics(x, g, z, activation=activation, bn_scale=c)
    formed = []

    def form(index):
        formed.append(index.tolist())
        s = splitting_matrices(x, g, z, activation=activation, bn_scale=c)
        return backend.xp.take(s, backend.asarray(index), axis=0)

    return hvp, form, formed


def _skip_jit(backend):
    if backend.name == "jax_jit":
        pytest.skip("Lanczos decides on the host after every product: it runs eagerly")


def test_lanczos_gives_the_direct_paths_lowest_eigenpair(backend):
    _skip_jit(backend)
    arrays = _statistics(0, 300, 100, 6)
    s = ref.splitting_matrices(*arrays[:3], activation="swish", bn_scale=arrays[3])
    eig = np.linalg.eigvalsh(s)
    spread = np.abs(eig).max(axis=1)
    assert ((eig[:, 1] - eig[:, 0]) / spread).min() > 1e-3  # lowest eigenvalues well separated
    hvp, form, formed = _solvers(backend, arrays)
    assert hvp.d >= ssd_exact.LANCZOS_MIN_DIM
    lam, v = exact_min_eigenpairs(hvp, hvp.n, hvp.d, form, rng=0)
    assert formed == []  # every neuron converged: no matrix formed
    lam_direct, v_direct = min_eigenpairs(form(np.arange(hvp.n)))
    lam, v, lam_direct, v_direct = (backend.to_numpy(a) for a in (lam, v, lam_direct, v_direct))
    eps = np.finfo(lam.dtype).eps
    np.testing.assert_array_less(np.abs(lam - lam_direct), 64 * eps * spread)
    np.testing.assert_array_less(np.abs(lam - eig[:, 0]), 64 * eps * spread)
    np.testing.assert_allclose(v, v_direct, rtol=0, atol=1e5 * eps)  # same canonical sign
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)


def test_neurons_lanczos_leaves_unconverged_are_solved_directly():
    arrays = _statistics(1, 300, 100, 5)
    hvp, form, formed = _solvers(_NUMPY, arrays)
    lam_few, _, converged = lanczos_min_eigenpairs(hvp, hvp.n, hvp.d, rng=0, max_steps=3)
    assert not converged.any()  # three steps are far from the precision asked
    lam, v = exact_min_eigenpairs(hvp, hvp.n, hvp.d, form, rng=0, max_steps=3)
    assert formed[-1] == list(range(hvp.n))
    lam_direct, v_direct = min_eigenpairs(splitting_matrices(*arrays[:3], activation="swish",
                                                             bn_scale=arrays[3]))
    np.testing.assert_array_equal(lam, lam_direct)
    np.testing.assert_array_equal(v, v_direct)
    assert (lam_few > lam_direct).all()  # a Ritz value approaches lambda_min from above


def test_only_the_unconverged_neurons_are_formed():
    arrays = _statistics(2, 300, 100, 4)
    hvp, form, formed = _solvers(_NUMPY, arrays)

    def half_converged(*args, **kwargs):
        lam, v, converged = lanczos_min_eigenpairs(*args, **kwargs)
        assert converged.all()
        return lam, v, np.asarray([True, False, True, False])

    lanczos = ssd_exact.lanczos_min_eigenpairs
    ssd_exact.lanczos_min_eigenpairs = half_converged
    try:
        lam, v = exact_min_eigenpairs(hvp, hvp.n, hvp.d, form, rng=0)
    finally:
        ssd_exact.lanczos_min_eigenpairs = lanczos
    assert formed == [[1, 3]]
    lam_direct, v_direct = min_eigenpairs(form(np.arange(4)))
    np.testing.assert_allclose(lam, lam_direct, rtol=1e-10)
    np.testing.assert_allclose(v, v_direct, atol=1e-8)
    np.testing.assert_array_equal(lam[[1, 3]], lam_direct[[1, 3]])  # taken, not recomputed


def test_small_fan_in_is_solved_directly():
    arrays = _statistics(3, 50, ssd_exact.LANCZOS_MIN_DIM - 1, 3)
    hvp, form, formed = _solvers(_NUMPY, arrays)
    lam, v = exact_min_eigenpairs(hvp, hvp.n, hvp.d, form, rng=0)
    assert formed == [[0, 1, 2]]
    np.testing.assert_array_equal(lam, min_eigenpairs(form(np.arange(3)))[0])


def test_fewer_rows_than_fan_in_give_lambda_min_of_the_rank_deficient_matrix():
    # 40 rows, d = 120: S_i has rank <= 40 and 80 zero eigenvalues. softplus'' > 0, so neuron
    # 0, whose backprop is all positive, has S_0 positive semidefinite and lambda_min = 0 (along
    # the null space of the rows); the others have lambda_min < 0 inside the rows' span.
    x, g, z, c = _statistics(4, 40, 120, 3)
    g[:, :, 0] = np.abs(g[:, :, 0])
    s = ref.splitting_matrices(x, g, z, activation="softplus", bn_scale=c)
    eig = np.linalg.eigvalsh(s)
    spread = np.abs(eig).max(axis=1)
    assert abs(eig[0, 0]) < 1e-12 * spread[0] and (eig[1:, 0] < -1e-3 * spread[1:]).all()
    hvp, form, formed = _solvers(_NUMPY, (x, g, z, c), activation="softplus")
    # Krylov spaces of S_i have at most rank + 1 = 41 dimensions: at step 41 they are invariant
    # and Lanczos exact. (Neuron 0 needs them all: its lambda_min = 0 is not an outlier.)
    lam, v = exact_min_eigenpairs(hvp, hvp.n, hvp.d, form, rng=0, max_steps=41)
    assert formed == []
    np.testing.assert_array_less(np.abs(lam - eig[:, 0]), 1e-12 * spread)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", s, v), lam[:, None] * v,
                               atol=1e-12 * spread.max())
    np.testing.assert_allclose(v[1:], ref.min_eigenpairs(s)[1][1:], atol=1e-9)


def test_zero_matrices_converge_at_once():
    lam, v, converged = lanczos_min_eigenpairs(lambda v: 0.0 * v, 2, 5, rng=0,
                                               like=np.zeros(1))
    assert converged.all() and (lam == 0).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0)


def test_bad_arguments_are_refused():
    like = np.zeros(1)
    with pytest.raises(TypeError, match="callable"):
        lanczos_min_eigenpairs(None, 2, 5, rng=0, like=like)
    with pytest.raises(TypeError, match="like="):
        lanczos_min_eigenpairs(lambda v: v, 2, 5, rng=0)
    with pytest.raises(TypeError, match="rng"):
        lanczos_min_eigenpairs(lambda v: v, 2, 5, like=like)
    with pytest.raises(ValueError, match="tol"):
        lanczos_min_eigenpairs(lambda v: v, 2, 5, rng=0, like=like, tol=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        lanczos_min_eigenpairs(lambda v: v, 2, 5, rng=0, like=like, max_steps=0)
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        lanczos_min_eigenpairs(lambda v: v[:1], 2, 5, rng=0, like=like)


_NUMPY = next(b for b in available_backends() if b.name == "numpy")


def test_a_non_finite_product_leaves_the_neuron_to_the_direct_solve():
    s = np.stack([np.diag([3.0, -1.0, 2.0]), np.diag([1.0, 2.0, 3.0])])
    s[0, 0, 0] = np.nan

    def hvp(v):
        return np.einsum("nij,nj->ni", s, v)

    lam, v, converged = lanczos_min_eigenpairs(hvp, 2, 3, rng=0, like=s)
    assert converged.tolist() == [False, True]
    np.testing.assert_allclose(lam[1], 1.0)
