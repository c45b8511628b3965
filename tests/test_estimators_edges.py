"""Edge cases of the Delta2(D) estimators (`curvlib.landscape`) against independent oracles.

Oracles: dense `jax.hessian`/`jax.grad` of the flattened loss with numpy algebra, Gauss-Hermite
quadrature of the exact (non-quadratic) increment, `scipy.linalg.subspace_angles`, and the
spectral corollary written out in numpy. float64 is on (conftest).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import subspace_angles

import curvlib
from curvlib import landscape as ls

curvlib.compile_behind(False)

# ------------------------------------------------------------------ a logistic model, N = 2

_R = np.random.default_rng(7)
_X = _R.normal(size=(9, 2))
_Y = np.sign(_R.normal(size=9))
DATA = (jnp.asarray(_X), jnp.asarray(_Y))
W0 = jnp.asarray([0.4, -0.7])  # not a minimiser: a, c and B all nonzero


def logistic(w, batch):
    x, y = batch
    return jnp.mean(jnp.log1p(jnp.exp(-y * (x @ w))))


def _mean_loss(w, m):
    return logistic(w, (DATA[0][:m], DATA[1][:m]))


def _increment(w, k):
    return _mean_loss(w, k + 1) - _mean_loss(w, k)


def _gauss_hermite(k, U, sigma, points=48):
    """``E_z inc(w0 + U^T z)^2``, ``z ~ N(0, sigma^2 I_D)``, by tensor Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(points)
    w = w / w.sum()
    U = np.atleast_2d(U)
    nodes = np.array(list(itertools.product(x, repeat=U.shape[0])))
    weights = np.prod(np.array(list(itertools.product(w, repeat=U.shape[0]))), axis=1)
    inc = jax.vmap(lambda t: _increment(t, k))(jnp.asarray(np.asarray(W0) + sigma * nodes @ U))
    return float(np.sum(weights * np.asarray(inc) ** 2))


def _dense_coefficients(k, U):
    a = float(_increment(W0, k))
    g = np.asarray(jax.grad(_increment)(W0, k))
    A = np.asarray(jax.hessian(_increment)(W0, k))
    return a, U @ g, U @ A @ U.T


def test_every_estimator_matches_quadrature_on_a_non_quadratic_loss():
    """Logistic loss (not quadratic), N = 2: the coefficients against the dense Hessian, the
    closed form against the Gaussian moment of that quadratic model, and direct (D = 1, and
    D = N with a rotated basis), control-variate and full-space Monte Carlo against Gauss-Hermite
    quadrature of the exact increment, at a small and a large sigma, an odd draw count and
    microbatches that do not divide k + 1."""
    k = 5
    U = np.array([[np.cos(0.3), np.sin(0.3)], [-np.sin(0.3), np.cos(0.3)]])
    sig = np.array([0.05, 1.5])
    coef = ls.increment_coefficients(logistic, W0, DATA, k, jnp.asarray(U))
    a, c, B = _dense_coefficients(k, U)
    np.testing.assert_allclose(coef.a, a, rtol=1e-12)
    np.testing.assert_allclose(coef.c, c, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(coef.B, B, rtol=1e-10, atol=1e-15)
    lam, V = np.linalg.eigh(B)  # the Gaussian moment of the quadratic model, diagonalised
    mean = a + 0.5 * sig**2 * lam.sum()
    var = sig**2 * np.sum((V.T @ c) ** 2) + 0.5 * sig**4 * np.sum(lam**2)
    np.testing.assert_allclose(ls.delta2_closed_form(*coef, sig), var + mean**2, rtol=1e-12)

    key = jax.random.PRNGKey(3)
    for dim in (1, 2):
        truth = np.array([_gauss_hermite(k, U[:dim], s) for s in sig])
        for kwargs in (dict(), dict(microbatch_size=4, sample_batch_size=7, antithetic=False),
                       dict(control_variate=coef)):
            est = ls.delta2_direct_mc(logistic, W0, DATA, k, jnp.asarray(U), sig, key=key,
                                      num_samples=3001, dim=dim, **kwargs)
            assert bool(est.finite) and int(est.status) == curvlib.Status.SUCCESS
            z = (np.asarray(est.estimate) - truth) / np.asarray(est.stderr)
            assert np.all(np.abs(z) < 4.5), (dim, kwargs, z)
        # the quadratic model is the sigma -> 0 limit: at sigma = 0.05 within 1e-3 of the truth
        assert abs(ls.delta2_closed_form(*coef.prefix(dim), sig[0]) / truth[0] - 1) < 1e-3
    full = ls.delta2_full_mc(logistic, W0, DATA, k, sig, key=key, num_samples=3001,
                             microbatch_size=4)
    truth = np.array([_gauss_hermite(k, np.eye(2), s) for s in sig])  # D = N: the full space
    z = (np.asarray(full.estimate) - truth) / np.asarray(full.stderr)
    assert np.all(np.abs(z) < 4.5), z


# -------------------------------------------------------------- half-precision parameters


def test_the_estimators_take_bfloat16_parameters_and_coefficients():
    """A sigma grid beside bfloat16 parameters or coefficients was refused as "`sigma` must be a
    real number > 0; got Array([0.5], dtype=bfloat16)" (NumPy calls bfloat16 kind "V", not a
    float). Now every estimator runs and agrees with the float64 oracle to bfloat16 accuracy."""
    k, sig = 5, np.array([0.5, 1.0])
    U = np.eye(2)[:1]
    a, c, B = _dense_coefficients(k, U)
    half = [jnp.asarray(x, jnp.bfloat16) for x in (a, c, B)]
    want = [np.asarray(ls.delta2_closed_form(*(np.asarray(x, np.float64) for x in half), s))
            for s in sig]
    np.testing.assert_allclose(np.asarray(ls.delta2_closed_form(*half, sig), np.float64), want,
                               rtol=3e-2)
    terms = ls.delta2_closed_form_terms(*half, 0.5)
    assert all(t.shape == () for t in terms)
    quad = ls.delta2_quadratic_mc(*half, sig, key=jax.random.PRNGKey(0), num_samples=64)
    assert bool(quad.finite)

    w16 = W0.astype(jnp.bfloat16)
    truth = np.array([_gauss_hermite(k, U, s) for s in sig])
    direct = ls.delta2_direct_mc(logistic, w16, DATA, k, jnp.asarray(U, jnp.bfloat16), sig,
                                 key=jax.random.PRNGKey(1), num_samples=512)
    full = ls.delta2_full_mc(logistic, w16, DATA, k, sig, key=jax.random.PRNGKey(2),
                             num_samples=512)
    truth_full = np.array([_gauss_hermite(k, np.eye(2), s) for s in sig])
    for est, want in ((direct, truth), (full, truth_full)):
        assert bool(est.finite) and int(est.status) == curvlib.Status.SUCCESS
        # W0 in bfloat16 moves the point by up to 2e-3: a loose, not a statistical, tolerance
        err = np.abs(np.asarray(est.estimate, np.float64) - want)
        assert np.all(err <= 5 * np.asarray(est.stderr, np.float64) + 0.05 * want), (err, want)
    np.testing.assert_allclose(ls.delta2_spectral(jnp.asarray([2.0, 1.0], jnp.bfloat16),
                                                  jnp.asarray([3.0, 2.0], jnp.bfloat16), 1.0),
                               2.0, rtol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_principal_angles_of_half_precision_bases(dtype):
    """`principal_angles` of bfloat16 or float16 bases (the eigenvectors `curvature_subspace`
    returns for half-precision parameters, which `k_curve` passes on) raised LAPACK's
    NotImplementedError "Unsupported dtype bfloat16"; now they are computed in float32 and match
    scipy on the same (rounded) vectors to the half dtype's accuracy."""
    rng = np.random.default_rng(0)
    U = np.linalg.qr(rng.normal(size=(8, 3)))[0].T
    V = np.linalg.qr(U.T + 0.2 * rng.normal(size=(8, 3)))[0].T
    Uh, Vh = jnp.asarray(U, dtype), jnp.asarray(V, dtype)
    tree = lambda M: {"a": M[:, :5], "b": M[:, 5:]}  # noqa: E731 - a two-leaf basis
    got = ls.principal_angles(tree(Uh), tree(Vh))
    want = np.sort(subspace_angles(np.asarray(Uh, np.float64).T, np.asarray(Vh, np.float64).T))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3)


# ------------------------------------------------------------------ the spectral corollary


def test_delta2_spectral_takes_sequences_and_names_bad_input():
    """`delta2_spectral([3.0, 2.0], [4.0, 3.0], 1.0)` raised "TypeError: Cannot determine dtype of
    [3.0, 2.0]" (every other landscape function takes sequences); now it computes the corollary
    sigma^4/4 (2 sum delta^2 + (sum delta)^2), and non-numeric input is refused by name."""
    lk, lk1, sig = [3.0, 2.0, 0.5], (4.5, 2.5, 0.0), [0.5, 2.0]
    d = np.subtract(lk1, lk)
    want = np.asarray(sig) ** 4 / 4 * (2 * np.sum(d * d) + np.sum(d) ** 2)
    np.testing.assert_allclose(ls.delta2_spectral(lk, lk1, sig), want, rtol=1e-12)
    np.testing.assert_allclose(ls.delta2_spectral([3, 2, 1], [4, 3, 2], 1.0), 15 / 4, rtol=1e-12)
    with pytest.raises(ValueError, match="`eigenvalues_k1` must be a 1-D array of real"):
        ls.delta2_spectral([1.0], ["x"], 1.0)
    # a string NumPy would read as a dtype ("3 2": a SyntaxError from deep inside) and a
    # matrix are refused by name, through the shared check
    with pytest.raises(ValueError, match="`eigenvalues_k` must be a 1-D array of real"):
        ls.delta2_spectral("3 2", [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match=r"`eigenvalues_k` must be a 1-D .*shape \(1, 2\)"):
        ls.delta2_spectral([[1.0, 2.0]], [1.0, 2.0], 1.0)


def test_k_curve_direct_mc_is_nan_where_the_subspace_failed():
    """``sqrt|x w|`` at ``w = 0``: a finite loss with infinite derivatives, the eigensolve
    non-finite. The direct Monte Carlo sampled in the zeroed basis and reported the loss
    increment at the weights alone (0.0) beside a NaN closed form; now NaN, shown ``nan``."""
    from curvlib import landscape

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
    loss = lambda w, x: jnp.mean(jnp.sqrt(jnp.abs(x @ w)))  # noqa: E731
    cur = landscape.k_curve(loss, jnp.zeros(5, jnp.float32), X, [3], dims=[1], sigmas=[0.1],
                            key=jax.random.PRNGKey(0), progress=False, num_samples=4,
                            full_samples=0)
    assert not bool(cur.finite[0]) and int(cur.status[0]) == curvlib.Status.NONFINITE
    assert np.all(np.isnan(cur.closed_form)) and np.all(np.isnan(cur.direct_mean))
    assert np.all(np.isnan(cur.direct_stderr))
    row = landscape.curve_table(cur).splitlines()[2].split()
    assert row[-2:] == ["nan", "nan"], row


def test_k_curve_keeps_the_direct_mc_where_only_the_next_subspace_failed():
    """A NaN in sample ``k + 2`` reaches only the optional subspace at ``k + 1`` (the
    principal angles): the direct Monte Carlo in the finite subspace at ``k`` was dropped
    to NaN with it. Now it equals the public `delta2_direct_mc` there, and the point still
    reports the failed stage (``finite=False``)."""
    rng = np.random.default_rng(0)
    n, k = 12, 10
    X = jnp.asarray(rng.normal(size=(n, 3)))
    Y = jnp.sin(X.sum(1))
    loss = lambda w, b: jnp.mean((jnp.tanh(b[0] @ w) - b[1]) ** 2)  # noqa: E731
    w = jnp.array([0.3, -0.2, 0.5])
    data = (X.at[k + 1].set(jnp.nan), Y)
    key = jax.random.PRNGKey(0)
    kw = dict(dims=[1], sigmas=[0.1], key=key, progress=False, num_samples=50, full_samples=0)
    cur = ls.k_curve(loss, w, data, [k], **kw)
    assert not bool(cur.finite[0]) and int(cur.status[0]) == curvlib.Status.NONFINITE
    assert np.isfinite(cur.closed_form).all() and np.isfinite(cur.direct_mean).all()
    alone = ls.k_curve(loss, w, data, [k], next_subspace=False, **kw)
    assert bool(alone.finite[0])
    np.testing.assert_allclose(cur.direct_mean, alone.direct_mean, rtol=1e-12)
    np.testing.assert_allclose(cur.closed_form, alone.closed_form, rtol=1e-12)


@pytest.mark.parametrize("B_scale, sigma", [(1e20, 1e-15), (1e-30, 1e20), (1e-18, 1e12)])
def test_the_closed_form_is_finite_and_right_wherever_its_terms_fit(B_scale, sigma):
    """float32: ``tr B^2`` was formed before ``sigma`` scaled it, so ``B = 1e20 I`` at
    ``sigma = 1e-15`` gave ``inf`` for 2e-20 and ``B = 1e-30 I`` at ``sigma = 1e20`` gave 0
    for 2e20 (the squares outside float32's range); likewise ``||c||^2``. The oracle: the
    same formula in float64."""
    B = np.diag([B_scale, -0.5 * B_scale]).astype(np.float32)
    c = np.array([B_scale, 2 * B_scale], np.float32)
    a = np.float32(0.5 * B_scale)
    got = ls.delta2_closed_form_terms(a, c, B, jnp.float32(sigma))
    s, B64, c64, a64 = float(sigma), B.astype(float), c.astype(float), float(a)
    want = (a64 ** 2, s**2 * (a64 * np.trace(B64) + c64 @ c64),
            s**4 * (2 * np.sum(B64 * B64) + np.trace(B64) ** 2) / 4)
    for g, w_ in zip(got, want, strict=True):
        if abs(w_) > 1e-36 and abs(w_) < 1e37:  # (in float32's normal range)
            np.testing.assert_allclose(float(g), w_, rtol=1e-5)
