"""curvlib.landscape against independent oracles (spec delta2.md, facts 1-7).

Dense numpy Hessians, gradients and eigendecompositions on small least-squares
and quadratic problems are the oracles; float64 is on (conftest).
"""

from __future__ import annotations

import importlib
import itertools
import json
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import subspace_angles

from curvlib import Eigsh, Status
from curvlib import landscape as ls

# ------------------------------------------------------------------ problems

N_FEAT = 5  # parameters: w (5,) and b () -> N = 6


def ls_loss(params, batch):
    x, y = batch
    r = x @ params["w"] + params["b"] - y
    return 0.5 * jnp.mean(r**2)


def ls_sum_loss(params, batch):
    x, y = batch
    return 0.5 * jnp.sum((x @ params["w"] + params["b"] - y) ** 2)


def _ls_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, N_FEAT))
    y = x @ rng.normal(size=N_FEAT) + 0.5 * rng.normal(size=n)
    return jnp.asarray(x), jnp.asarray(y)


def _design(x):
    x = np.asarray(x)
    return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def _flat(params):
    return jnp.concatenate([params["w"], jnp.atleast_1d(params["b"])])


def _unflat(v):
    v = jnp.asarray(v)
    return {"w": v[..., :N_FEAT], "b": v[..., N_FEAT]}


def np_loss_grad_hess(theta, x, y):
    """Oracle: mean least-squares loss, gradient and Hessian in numpy."""
    Z = _design(x)
    r = Z @ theta - np.asarray(y)
    m = Z.shape[0]
    return 0.5 * np.mean(r**2), Z.T @ r / m, Z.T @ Z / m


def np_coefficients(theta, x, y, k, U):
    L1, g1, H1 = np_loss_grad_hess(theta, x[: k + 1], y[: k + 1])
    L0, g0, H0 = np_loss_grad_hess(theta, x[:k], y[:k])
    return L1 - L0, U @ (g1 - g0), U @ (H1 - H0) @ U.T


def np_gaussian_moment(a, c, B, sigma):
    """E (a + c.z + z.B.z/2)^2 by diagonalising B (independent of the closed form's algebra)."""
    lam, V = np.linalg.eigh(B)
    cp = V.T @ c
    s2 = np.asarray(sigma) ** 2
    # q = a + sum_i cp_i y_i + lam_i y_i^2 / 2, y_i ~ N(0, s2) independent
    mean = a + 0.5 * s2 * lam.sum()
    var = s2 * (cp**2).sum() + 0.5 * s2**2 * (lam**2).sum()
    return var + mean**2


@pytest.fixture(scope="module")
def lsq():
    x, y = _ls_data()
    rng = np.random.default_rng(1)
    theta = rng.normal(size=N_FEAT + 1)
    return x, y, theta


def _random_orthonormal(rng, d, n):
    q, _ = np.linalg.qr(rng.normal(size=(n, d)))
    return q.T  # rows orthonormal


# -------------------------------------------------------- fact 1: identity


def test_increment_identity_at_any_point(lsq):
    x, y, _ = lsq
    rng = np.random.default_rng(2)
    for k in (1, 5, 17):
        for _ in range(3):
            w = _unflat(rng.normal(size=N_FEAT + 1) * 3)
            want = ls_loss(w, (x[: k + 1], y[: k + 1])) - ls_loss(w, (x[:k], y[:k]))
            got = ls.loss_increment(ls_loss, w, (x, y), k)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(ls.delta1(ls_loss, w, (x, y), k), abs(want), rtol=1e-10)
    # microbatched means give the same increment
    w = _unflat(rng.normal(size=N_FEAT + 1))
    np.testing.assert_allclose(
        ls.loss_increment(ls_loss, w, (x, y), 11, microbatch_size=4),
        ls.loss_increment(ls_loss, w, (x, y), 11), rtol=1e-12)


def test_non_mean_loss_is_detected(lsq):
    x, y, theta = lsq
    w = _unflat(theta)
    msg = "does not behave as a mean over the leading axis"
    with pytest.raises(ValueError, match=msg):
        ls.check_mean_loss(ls_sum_loss, w, (x, y), 4)
    with pytest.raises(ValueError, match=msg):
        ls.check_mean_loss(ls_sum_loss, w, (x, y), 4, microbatch_size=5)
    with pytest.raises(ValueError, match=msg):
        ls.delta1(ls_sum_loss, w, (x, y), 4)
    with pytest.raises(ValueError, match=msg):
        ls.loss_increment(ls_sum_loss, w, (x, y), 4)
    with pytest.raises(ValueError, match=msg):
        ls.increment_coefficients(ls_sum_loss, w, (x, y), 4,
                                  _unflat(jnp.asarray(theta / np.linalg.norm(theta))[None]))
    # the subspace too: its products weight the per-sample losses, so of a sum it returned
    # another matrix's eigenvalues (5x too small here) with converged=True
    for mb in (None, 3):
        with pytest.raises(ValueError, match=msg):
            ls.curvature_subspace(ls_sum_loss, w, (x, y), 4, 2, key=jax.random.key(0),
                                  microbatch_size=mb)
    # unequal weights of the samples (a weighted mean) are caught too
    weighted = lambda p, b: ls_loss(p, b) * b[0].shape[0] / (b[0].shape[0] + 1.0)
    with pytest.raises(ValueError, match=msg):
        ls.check_mean_loss(weighted, w, (x, y), 4)
    # a sample-independent penalty leaves every increment unchanged: accepted
    penalised = lambda p, b: ls_loss(p, b) + 0.1 * jnp.sum(p["w"] ** 2)
    ls.check_mean_loss(penalised, w, (x, y), 4)


# ------------------------------------------------ coefficients vs the oracle


def test_coefficients_match_dense_oracle(lsq):
    x, y, theta = lsq
    rng = np.random.default_rng(3)
    k, D = 9, 3
    U = _random_orthonormal(rng, D, N_FEAT + 1)
    coef = ls.increment_coefficients(ls_loss, _unflat(theta), (x, y), k, _unflat(U))
    a, c, B = np_coefficients(theta, np.asarray(x), np.asarray(y), k, U)
    np.testing.assert_allclose(coef.a, a, rtol=1e-10)
    np.testing.assert_allclose(coef.c, c, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(coef.B, B, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(coef.B, coef.B.T)
    # microbatched products and gradients agree
    mb = ls.increment_coefficients(ls_loss, _unflat(theta), (x, y), k, _unflat(U),
                                   microbatch_size=4)
    for p, q in zip(mb, coef, strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-13)
    # nested D: prefixes equal the coefficients of the smaller basis
    small = ls.increment_coefficients(ls_loss, _unflat(theta), (x, y), k, _unflat(U[:2]))
    for p, q in zip(coef.prefix(2), small, strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-13)


def test_coefficients_with_ritz_values_skip_the_k_sample_products(lsq):
    """Ritz pairs of H^(k) (even unconverged: a short Krylov run) give U H^(k) U^T = diag(theta),
    so passing their Ritz values reproduces B of the dense oracle without those products."""
    x, y, theta = lsq
    k, D = 9, 3
    w = _unflat(theta)
    # loose tolerance and a tiny basis: Ritz pairs, not eigenpairs
    sub = ls.curvature_subspace(ls_loss, w, (x, y), k, D, key=jax.random.PRNGKey(0),
                                eigsh=Eigsh(basis_size=D + 2, rtol=0.5, max_restarts=0))
    E = sub.eigenvectors
    U = np.concatenate([np.asarray(E["w"]), np.asarray(E["b"])[:, None]], axis=1)
    _, _, B = np_coefficients(theta, np.asarray(x), np.asarray(y), k, U)
    fast = ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors,
                                     eigenvalues=sub.eigenvalues)
    full = ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors)
    np.testing.assert_allclose(fast.B, B, rtol=1e-9, atol=1e-12)
    for p, q in zip(fast, full, strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-12)
    # the shortcut is only for Ritz values: wrong values give a different B
    off = ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors,
                                    eigenvalues=sub.eigenvalues * 1.1)
    assert not np.allclose(off.B, B, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`eigenvalues` must have shape \(3,\)"):
        ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors,
                                  eigenvalues=sub.eigenvalues[:2])
    # microbatched: the products run over the one chunk holding sample k+1, same numbers
    mb = ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors,
                                   eigenvalues=sub.eigenvalues, microbatch_size=4)
    for p, q in zip(mb, fast, strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-12)


# ----------------------------------------------- fact 2: GM = lim quad MC


def test_closed_form_and_terms_match_isserlis_oracle():
    rng = np.random.default_rng(4)
    D = 4
    a, c = 0.3, rng.normal(size=D)
    M = rng.normal(size=(D, D))
    B = (M + M.T) / 2
    sig = np.array([1e-3, 0.1, 0.7, 2.0])
    got = ls.delta2_closed_form(a, c, B, sig)
    np.testing.assert_allclose(got, np_gaussian_moment(a, c, B, sig), rtol=1e-12)
    t = ls.delta2_closed_form_terms(a, c, B, sig)
    np.testing.assert_allclose(t.constant + t.sigma2 + t.sigma4, got, rtol=1e-13)
    np.testing.assert_allclose(t.constant, a * a)
    np.testing.assert_allclose(t.sigma2, sig**2 * (a * np.trace(B) + c @ c), rtol=1e-12)
    np.testing.assert_allclose(
        t.sigma4, sig**4 * (2 * np.trace(B @ B) + np.trace(B) ** 2) / 4, rtol=1e-12)
    # scalar sigma gives a scalar
    assert ls.delta2_closed_form(a, c, B, 0.5).shape == ()


@pytest.mark.parametrize("antithetic", [True, False])
def test_quadratic_mc_converges_to_closed_form(antithetic):
    rng = np.random.default_rng(5)
    D = 3
    a, c = -0.2, rng.normal(size=D)
    M = rng.normal(size=(D, D))
    B = (M + M.T) / 2
    sig = np.array([0.3, 1.0])
    gm = np_gaussian_moment(a, c, B, sig)
    key = jax.random.PRNGKey(0)
    small = ls.delta2_quadratic_mc(a, c, B, sig, key=key, num_samples=400, antithetic=antithetic)
    big = ls.delta2_quadratic_mc(a, c, B, sig, key=key, num_samples=40_000,
                                 antithetic=antithetic)
    for est in (small, big):
        assert np.all(np.abs(est.estimate - gm) <= 5 * est.stderr)
    # standard error shrinks like S^-1/2 (x100 samples -> /10)
    ratio = np.asarray(small.stderr / big.stderr)
    assert np.all((ratio > 7) & (ratio < 14)), ratio  # 10 up to the spread of 400 draws
    assert np.all(np.abs(big.estimate - gm) / gm < 0.03)
    assert big.num_evaluations == 40_000 * (2 if antithetic else 1)


# ----------------------------- fact 3: exact quadratic -> direct MC == GM


def test_direct_mc_equals_closed_form_on_least_squares(lsq):
    x, y, _ = lsq
    k, D = 8, 3
    # w* = the exact least-squares solution of L_k
    Zk = _design(np.asarray(x[:k]))
    theta = np.linalg.lstsq(Zk, np.asarray(y[:k]), rcond=None)[0]
    w = _unflat(theta)
    sub = ls.curvature_subspace(ls_loss, w, (x, y), k, D, key=jax.random.PRNGKey(1))
    coef = ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors)
    sig = np.array([1e-3, 0.1, 1.0])
    gm = ls.delta2_closed_form(*coef, sig)
    key = jax.random.PRNGKey(7)
    direct = ls.delta2_direct_mc(ls_loss, w, (x, y), k, sub.eigenvectors, sig, key=key,
                                 num_samples=4000)
    quad = ls.delta2_quadratic_mc(*coef, sig, key=key, num_samples=4000)
    # the quadratic model is exact: same draws give the same numbers
    np.testing.assert_allclose(direct.estimate, quad.estimate, rtol=1e-9)
    np.testing.assert_allclose(direct.stderr, quad.stderr, rtol=1e-7)
    # and both equal the closed form in expectation
    assert np.all(np.abs(direct.estimate - gm) <= 5 * direct.stderr + 1e-12 * gm)
    # gradient of L_k vanishes at w*, so c is the projected single-sample gradient / (k+1)
    _, g1, _ = np_loss_grad_hess(theta, x[k: k + 1], y[k: k + 1])
    U = np.asarray(jax.vmap(_flat)(sub.eigenvectors))
    np.testing.assert_allclose(coef.c, U @ g1 / (k + 1), rtol=1e-8, atol=1e-12)


def test_nested_direct_mc_and_batching(lsq):
    x, y, theta = lsq
    w = _unflat(theta)
    k = 8
    sub = ls.curvature_subspace(ls_loss, w, (x, y), k, 3, key=jax.random.PRNGKey(2))
    sig = np.array([0.05, 0.5])
    key = jax.random.PRNGKey(3)
    masked = ls.delta2_direct_mc(ls_loss, w, (x, y), k, sub.eigenvectors, sig, key=key,
                                 num_samples=64, dim=2)
    prefix = jax.tree.map(lambda v: v[:2], sub.eigenvectors)
    direct = ls.delta2_direct_mc(ls_loss, w, (x, y), k, prefix, sig, key=key, num_samples=64)
    np.testing.assert_allclose(masked.estimate, direct.estimate, rtol=1e-10)
    chunked = ls.delta2_direct_mc(ls_loss, w, (x, y), k, prefix, sig, key=key, num_samples=64,
                                  microbatch_size=3, sample_batch_size=16)
    np.testing.assert_allclose(chunked.estimate, direct.estimate, rtol=1e-10)
    np.testing.assert_allclose(chunked.stderr, direct.stderr, rtol=1e-8)


# ------------------------------------------ fact 4: D = N equals full space


def test_full_dimension_equals_full_space(lsq):
    x, y, theta = lsq
    w = _unflat(theta)
    k, N = 6, N_FEAT + 1
    rng = np.random.default_rng(6)
    sig = np.array([0.05, 0.4])
    vals = []
    for U in (np.eye(N), _random_orthonormal(rng, N, N), _random_orthonormal(rng, N, N)):
        coef = ls.increment_coefficients(ls_loss, w, (x, y), k, _unflat(U))
        vals.append(np.asarray(ls.delta2_closed_form(*coef, sig)))
    np.testing.assert_allclose(vals[1], vals[0], rtol=1e-10)  # rotation invariance
    np.testing.assert_allclose(vals[2], vals[0], rtol=1e-10)
    full = ls.delta2_full_mc(ls_loss, w, (x, y), k, sig, key=jax.random.PRNGKey(4),
                             num_samples=4000)
    assert np.all(np.abs(full.estimate - vals[0]) <= 5 * full.stderr)
    direct = ls.delta2_direct_mc(ls_loss, w, (x, y), k, _unflat(_random_orthonormal(rng, N, N)),
                                 sig, key=jax.random.PRNGKey(5), num_samples=4000)
    assert np.all(np.abs(direct.estimate - vals[0]) <= 5 * direct.stderr)


# ------------------------------- fact 5: commuting Hessians, corollary, extremality


def _commuting_problem(n, N, seed):
    """l_i(w) = 1/2 (w - w0)^T Q diag(h_i) Q^T (w - w0): one shared eigenbasis, a = c = 0 at w0."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(N, N)))
    base = np.sort(rng.uniform(1.0, 10.0, size=N))[::-1]
    h = base[None, :] * rng.uniform(0.5, 1.5, size=(n, N))
    w0 = rng.normal(size=N)
    Qj, w0j = jnp.asarray(Q), jnp.asarray(w0)

    def loss(w, hb):
        u = Qj.T @ (w - w0j)
        return 0.5 * jnp.mean(hb @ (u * u))

    return loss, jnp.asarray(h), w0j, Q


def test_commuting_hessians_reproduce_the_corollary():
    N, k, D = 8, 5, 3
    loss, h, w0, Q = _commuting_problem(12, N, 7)
    lam_k = np.asarray(h[:k]).mean(0)
    lam_k1 = np.asarray(h[: k + 1]).mean(0)
    # choose the sample k+1 so that the top-D order is the same at k and k+1
    sub = ls.curvature_subspace(loss, w0, h, k, D, key=jax.random.PRNGKey(0))
    top = np.argsort(-lam_k)[:D]
    np.testing.assert_allclose(sub.eigenvalues, lam_k[top], rtol=1e-8)
    coef = ls.increment_coefficients(loss, w0, h, k, sub.eigenvectors)
    assert abs(float(coef.a)) < 1e-14 and np.max(np.abs(coef.c)) < 1e-12
    sig = np.array([1e-2, 0.3, 1.0])
    spectral = ls.delta2_spectral(lam_k[top], lam_k1[top], sig)
    np.testing.assert_allclose(ls.delta2_closed_form(*coef, sig), spectral, rtol=1e-8)
    # B is diagonal with the eigenvalue increments
    np.testing.assert_allclose(np.diag(coef.B), lam_k1[top] - lam_k[top], rtol=1e-8, atol=1e-12)
    # direct MC (exact quadratic) agrees too
    mc = ls.delta2_direct_mc(loss, w0, h, k, sub.eigenvectors, sig, key=jax.random.PRNGKey(1),
                             num_samples=2000)
    assert np.all(np.abs(mc.estimate - spectral) <= 5 * mc.stderr)


def test_extremality_of_the_top_d_set():
    N, k, D = 6, 4, 2
    rng = np.random.default_rng(8)
    Q, _ = np.linalg.qr(rng.normal(size=(N, N)))
    lam_k = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.0])
    # sample k+1 has 3x the curvature of the mean: delta_i = 2 lam_i / (k+1), decreasing, >= 0
    h = np.concatenate([np.tile(lam_k, (k, 1)), 3 * lam_k[None]], 0)
    Qj = jnp.asarray(Q)
    loss = lambda w, hb: 0.5 * jnp.mean(hb @ ((Qj.T @ w) ** 2))
    w0 = jnp.zeros(N)
    sub = ls.curvature_subspace(loss, w0, jnp.asarray(h), k, D, key=jax.random.PRNGKey(0))
    coef = ls.increment_coefficients(loss, w0, jnp.asarray(h), k, sub.eigenvectors)
    sig = 0.5
    chosen = float(ls.delta2_closed_form(*coef, sig))
    best = -np.inf
    for S in itertools.combinations(range(N), D):
        U = Q[:, list(S)].T
        c2 = ls.increment_coefficients(loss, w0, jnp.asarray(h), k, jnp.asarray(U),
                                       check_mean=False)
        v = float(ls.delta2_closed_form(*c2, sig))
        lam_k1 = h[: k + 1].mean(0)
        np.testing.assert_allclose(v, ls.delta2_spectral(lam_k[list(S)], lam_k1[list(S)], sig),
                                   rtol=1e-9)
        best = max(best, v)
    np.testing.assert_allclose(chosen, best, rtol=1e-9)


# --------------------------------- fact 6: k^-2 decay under the theorem's bound


def _bounded_problem(n=160, seed=9):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, N_FEAT))
    y = rng.uniform(-1, 1, size=n)
    w = _unflat(0.3 * rng.normal(size=N_FEAT + 1))
    theta = np.asarray(_flat(w))
    Z = _design(x)
    r = Z @ theta - y
    consts = dict(max_loss=np.max(0.5 * r**2),
                  max_grad=2 * np.max(np.abs(r) * np.linalg.norm(Z, axis=1)),
                  max_hess=np.max(np.sum(Z**2, axis=1)))  # ||z z^T||_2 = ||z||^2
    return x, y, w, theta, consts, rng


def test_decay_slope_and_theorem_bound():
    """Averaged over orderings, Delta2(D) ~ k^-2 and Delta1 ~ k^-1, under the theorem's bound."""
    x, y, w, theta, consts, rng = _bounded_problem()
    D, n = 2, x.shape[0]
    ks = [2, 4, 8, 16, 32, 64, 128]
    sig = np.array([1e-3, 0.3])
    cf = np.zeros((16, len(ks), 2, len(sig)))
    d1 = np.zeros((16, len(ks)))
    for o in range(16):  # orderings
        perm = rng.permutation(n)
        data = (jnp.asarray(x[perm]), jnp.asarray(y[perm]))
        for i, k in enumerate(ks):
            # the subspace from the dense oracle Hessian (top-D, signed)
            _, _, Hk = np_loss_grad_hess(theta, x[perm][:k], y[perm][:k])
            U = np.linalg.eigh(Hk)[1][:, ::-1][:, :D].T
            coef = ls.increment_coefficients(ls_loss, w, data, k, _unflat(U), check_mean=False)
            for j, d in enumerate((1, D)):
                cf[o, i, j] = ls.delta2_closed_form(*coef.prefix(d), sig)
                bound = ls.delta2_bound(k, sig, d, **consts)
                assert np.all(cf[o, i, j] <= bound)
            d1[o, i] = abs(float(coef.a))
    mean_cf = cf.mean(0)
    for j in range(2):
        for s in range(len(sig)):
            slope, _ = ls.fit_slope(ks, mean_cf[:, j, s])
            assert -2.3 < slope < -1.7, slope
    assert -1.3 < ls.fit_slope(ks, d1.mean(0))[0] < -0.8


def test_k_curve_driver(tmp_path, lsq):
    # k and D as in the tests above, so the compiled subspace programs are shared
    x, y, theta = lsq
    w = _unflat(theta)
    data = (x, y)
    Z = _design(x)
    r = Z @ theta - np.asarray(y)
    consts = dict(max_loss=np.max(0.5 * r**2),
                  max_grad=2 * np.max(np.abs(r) * np.linalg.norm(Z, axis=1)),
                  max_hess=np.max(np.sum(Z**2, axis=1)))
    ks, sig = [8, 9], [1e-3, 0.3]
    c = ls.k_curve(ls_loss, w, data, ks, dims=[1, 3], sigmas=sig, key=jax.random.PRNGKey(0),
                   num_samples=8, full_samples=8, progress=False)
    assert c.closed_form.shape == (2, 2, 2) and np.all(c.converged)
    assert np.all(np.isfinite(c.direct_mean)) and np.all(np.isfinite(c.full_mean))
    x, y = np.asarray(x), np.asarray(y)
    for i, k in enumerate(ks):
        # the driver's numbers are the estimators' numbers
        _, _, Hk = np_loss_grad_hess(theta, x[:k], y[:k])
        _, _, Hk1 = np_loss_grad_hess(theta, x[: k + 1], y[: k + 1])
        lam_k, V_k = np.linalg.eigh(Hk)
        lam_k1, V_k1 = np.linalg.eigh(Hk1)
        np.testing.assert_allclose(c.eigenvalues[i], lam_k[::-1][:3], rtol=1e-8)
        np.testing.assert_allclose(c.eigenvalues_next[i], lam_k1[::-1][:3], rtol=1e-8)
        np.testing.assert_allclose(c.delta1[i], ls.delta1(ls_loss, w, data, k), rtol=1e-10)
        for j, d in enumerate(c.dims):
            assert np.all(c.closed_form[i, j] <= ls.delta2_bound(k, sig, d, **consts))
            # overlap of the top-d eigenspaces of H^(k) and H^(k+1): dense oracle
            want = np.max(subspace_angles(V_k[:, ::-1][:, :d], V_k1[:, ::-1][:, :d]))
            assert want > 1e-3  # the subspaces do move: a zero angle would fail below
            np.testing.assert_allclose(c.max_angle[i, j], want, rtol=1e-5, atol=1e-7)
            # the corollary along eigenvectors: H^(k+1)'s top-3 values assigned to H^(k)'s
            # vectors by overlap (every assignment tried; here two values cross at k = 8
            # and at k = 9, with overlaps 0.84-1.0)
            G = np.abs(V_k[:, ::-1][:, :3].T @ V_k1[:, ::-1][:, :3])
            best = max(itertools.permutations(range(3)), key=lambda p: G[range(3), p].sum())
            matched = lam_k1[::-1][:3][list(best)]
            np.testing.assert_allclose(
                c.spectral[i, j], ls.delta2_spectral(lam_k[::-1][:d], matched[:d], sig),
                rtol=1e-8)
        # exact quadratic: direct MC within its error of the closed form
        assert np.all(np.abs(c.direct_mean[i] - c.closed_form[i]) <= 5 * c.direct_stderr[i]
                      + 1e-9 * c.closed_form[i])
    np.testing.assert_allclose(c.constant + c.sigma2 + c.sigma4, c.closed_form, rtol=1e-12)
    assert set(c.timings) == {"subspace", "coefficients", "closed_form", "direct_mc", "full_mc"}
    # the status fields every result has: finite, products, status
    assert c.finite.dtype == bool and np.all(c.finite) and np.all(c.status == Status.SUCCESS)
    assert c.num_matvecs.shape == (2,) and np.all(c.num_matvecs > 0)
    # params as a function of k, options from a config object, and the reports
    cfg = ls.KCurveConfig(next_subspace=False, progress=False)
    c2 = ls.k_curve(ls_loss, lambda k: w, data, ks[:1], dims=[1, 3], sigmas=sig,
                    key=jax.random.PRNGKey(0), config=cfg)
    np.testing.assert_allclose(c2.closed_form[0], c.closed_form[0], rtol=1e-8)
    # without the subspace at k + 1, the products of the one eigensolve at k: fewer
    assert 0 < c2.num_matvecs[0] < c.num_matvecs[0]
    assert np.all(np.isnan(c2.max_angle)) and np.all(np.isnan(c2.direct_mean))
    table = ls.curve_table(c, 0.3)
    assert "slopes" in table and "angle D=3" in table
    # a curve whose ks came back as floats (from JSON) reads the same
    assert ls.curve_table(c._replace(ks=c.ks.astype(float)), 0.3) == table
    assert max(len(line) for line in table.splitlines()) <= 100
    ls.save_curve_json(c, tmp_path / "curve.json")
    loaded = json.loads((tmp_path / "curve.json").read_text())
    assert loaded["ks"] == ks and "sigma=0.3" in loaded["slopes"]
    np.testing.assert_allclose(loaded["max_angle"], c.max_angle)
    import matplotlib

    backend = matplotlib.get_backend()
    ls.plot_curve(c, sigma=0.3, path=tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert matplotlib.get_backend() == backend  # a library never switches the backend


def test_k_curve_options(lsq):
    x, y, theta = lsq
    w = _unflat(theta)
    kw = dict(dims=[1, 2], sigmas=[0.1], key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['num_sample'\]; "
                                        r"its options are \['num_samples'"):
        ls.k_curve(ls_loss, w, (x, y), [4], num_sample=3, **kw)
    with pytest.raises(ValueError, match=r"`dims` must be positive ints .*got \[0, 2\]"):
        ls.k_curve(ls_loss, w, (x, y), [4], **{**kw, "dims": [0, 2]})
    with pytest.raises(ValueError, match=r"`num_samples` must be >= 2"):
        ls.k_curve(ls_loss, w, (x, y), [4], num_samples=1, **kw)
    with pytest.raises(ValueError, match=r"`ks` \(k\): k \+ 1 = 25 exceeds"):
        ls.k_curve(ls_loss, w, (x, y), [4, 24], **kw)
    with pytest.raises(ValueError, match=r"`max\(dims\)` = 6 \(the subspace dimension D\)"):
        ls.k_curve(ls_loss, w, (x, y), [4], **{**kw, "dims": [1, 6]})
    with pytest.warns(DeprecationWarning, match="basis_size"):
        c = ls.k_curve(ls_loss, w, (x, y), [4], num_matvecs=4, progress=False,
                       next_subspace=False, **kw)
    c2 = ls.k_curve(ls_loss, w, (x, y), [4], config=ls.KCurveConfig(
        eigsh=Eigsh(basis_size=4), progress=False, next_subspace=False), **kw)
    np.testing.assert_array_equal(c.eigenvalues, c2.eigenvalues)


# ------------------------------- one compiled program for every k


class _Counted:
    """A loss that counts its traces (the Python body runs once per trace)."""

    def __init__(self, fn):
        self.fn, self.traces = fn, 0

    def __call__(self, params, batch):
        self.traces += 1
        return self.fn(params, batch)


class _Compiles:
    """Counts XLA backend compilations while active."""

    def __enter__(self):
        self.count = 0
        self._cb = lambda name, *a, **kw: setattr(
            self, "count", self.count + (name == "/jax/core/compile/backend_compile_duration"))
        jax.monitoring.register_event_duration_secs_listener(self._cb)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._cb)


def test_every_function_compiles_once_for_all_k(lsq):
    """A second (eager) call at another k neither retraces the loss nor compiles anything."""
    x, y, theta = lsq
    w = _unflat(theta)
    data = (x, y)
    key = jax.random.PRNGKey(0)
    loss = _Counted(lambda p, b: ls_loss(p, b))
    sub = ls.curvature_subspace(loss, w, data, 3, 2, key=key)
    U = sub.eigenvectors
    sig = jnp.asarray([0.01, 0.1])
    calls = {
        "check_mean_loss": lambda k: ls.check_mean_loss(loss, w, data, k),
        "loss_increment": lambda k: ls.loss_increment(loss, w, data, k),
        "delta1": lambda k: ls.delta1(loss, w, data, k),
        "curvature_subspace": lambda k: ls.curvature_subspace(loss, w, data, k, 2, key=key),
        "increment_coefficients": lambda k: ls.increment_coefficients(loss, w, data, k, U),
        "increment_coefficients(ritz, microbatched)": lambda k: ls.increment_coefficients(
            loss, w, data, k, U, eigenvalues=sub.eigenvalues, microbatch_size=5),
        "delta2_direct_mc": lambda k: ls.delta2_direct_mc(loss, w, data, k, U, sig, key=key,
                                                          num_samples=4),
        "delta2_full_mc": lambda k: ls.delta2_full_mc(loss, w, data, k, sig, key=key,
                                                      num_samples=4, microbatch_size=7),
    }
    for name, call in calls.items():
        jax.block_until_ready(call(3))
        before = loss.traces
        assert before > 0
        with _Compiles() as compiles:
            for k in (5, 17):
                jax.block_until_ready(call(k))
        assert loss.traces == before, (name, "retraced the loss")
        assert compiles.count == 0, (name, "compiled again")


def test_k_curve_compiles_once(lsq):
    """Six values of k cost the traces of one: every stage's program serves all k."""
    x, y, theta = lsq
    w = _unflat(theta)
    kw = dict(dims=[1, 2], sigmas=[1e-3, 0.1], key=jax.random.PRNGKey(0), num_samples=4,
              full_samples=4, progress=False)
    # two programs no other test compiles (the landscape keys a loss by its program: one
    # computing what an earlier call computed shares its compilations, with fewer traces)
    one = _Counted(lambda p, b: 1.000123 * ls_loss(p, b))
    six = _Counted(lambda p, b: 1.000456 * ls_loss(p, b))
    ls.k_curve(one, w, (x, y), [4], **kw)
    ls.k_curve(six, w, (x, y), [2, 4, 7, 11, 16, 21], **kw)
    assert six.traces == one.traces > 0
    with _Compiles() as compiles:
        c = ls.k_curve(six, w, (x, y), [3, 5, 8, 13, 19, 22], **kw)
    assert compiles.count == 0 and six.traces == one.traces
    assert np.all(np.isfinite(c.closed_form)) and np.all(np.isfinite(c.max_angle))


def test_a_fresh_closure_each_call_compiles_nothing_and_keeps_its_constants(lsq):
    """A new loss closure at every call (``lambda p, b: scale * loss(p, b)`` in a loop over
    checkpoints or hyperparameters) compiled every landscape program again (1.7-3.5 s a call
    on a small MLP). The loss is now keyed by its program and what it closes over: the same
    computation compiles nothing, and another constant (a Python number, a small array, a
    large one) gives its own answer, checked against the numpy oracle."""
    x, y, theta = lsq
    w, data, key, k = _unflat(theta), (x, y), jax.random.PRNGKey(0), 9
    U = _random_orthonormal(np.random.default_rng(3), 2, N_FEAT + 1)
    a, c, B = np_coefficients(theta, np.asarray(x), np.asarray(y), k, U)

    def run(fn):
        sub = ls.curvature_subspace(fn, w, data, k, 2, key=key)
        coef = ls.increment_coefficients(fn, w, data, k, _unflat(U))
        d2 = ls.delta2_direct_mc(fn, w, data, k, _unflat(U), jnp.asarray([0.01, 0.1]),
                                 key=key, num_samples=4)
        return jax.block_until_ready((sub.eigenvalues, coef, d2.estimate,
                                      ls.delta1(fn, w, data, k)))

    def closure(scale, arr):
        return lambda p, b: scale * arr[-1] * ls_loss(p, b)

    ref = run(closure(1.0, jnp.ones(3)))
    with _Compiles() as compiles:
        again = run(closure(1.0, jnp.ones(3)))
    assert compiles.count == 0
    jax.tree.map(np.testing.assert_array_equal, again, ref)
    for scale, arr in [(3.0, jnp.ones(3)), (1.0, jnp.full(3, 3.0)), (1.0, jnp.full(5000, 3.0)),
                       (1.0, jnp.full(5000, 1.0))]:
        s = scale * float(arr[-1])
        eigenvalues, coef, d2, d1 = run(closure(scale, arr))
        np.testing.assert_allclose(coef.a, s * a, rtol=1e-10)
        np.testing.assert_allclose(coef.c, s * c, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(coef.B, s * B, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(d1, abs(s * a), rtol=1e-10)
        np.testing.assert_allclose(eigenvalues, s * ref[0], rtol=1e-8)
        np.testing.assert_allclose(d2, s**2 * ref[2], rtol=1e-8)


def test_keyed_losses_that_print_alike_but_differ_are_kept_apart(lsq):
    """Cases where two losses have the same program text but compute different things:
    a custom derivative rule's constant (it prints as a name only), a NumPy array changed in
    place (same identity, new values), and a batch-size-dependent normaliser (the same on one
    sample). Each gets its own answer, whatever ran before it."""
    x, y, theta = lsq
    w, data, k = _unflat(theta), (x, y), 9
    U = _random_orthonormal(np.random.default_rng(3), 2, N_FEAT + 1)

    def reversed_gradient(c):  # the identity forward, its gradient scaled by c
        @jax.custom_jvp
        def f(z):
            return z

        f.defjvp(lambda primals, tangents: (f(primals[0]), c * tangents[0]))
        return lambda p, b: ls_loss(jax.tree.map(f, p), b)

    for c in (1.0, -3.0):
        coef = ls.increment_coefficients(reversed_gradient(c), w, data, k, _unflat(U))
        _, c_want, _ = np_coefficients(theta, np.asarray(x), np.asarray(y), k, U)
        np.testing.assert_allclose(coef.c, c * c_want, rtol=1e-9, atol=1e-12)

    buf = np.ones(5000)  # large: keyed by its values, not its identity
    a_want, _, _ = np_coefficients(theta, np.asarray(x), np.asarray(y), k, U)
    for scale in (1.0, 3.0):
        buf[:] = scale
        got = ls.loss_increment(lambda p, b: buf[0] * ls_loss(p, b), w, data, k)
        np.testing.assert_allclose(got, scale * a_want, rtol=1e-10)
    # the same loss object too, whose key is remembered (the NumPy arrays it computes with
    # hashed again; a value read from one in Python is fixed at its trace, as under jax.jit)
    scaled = lambda p, b: jnp.mean(buf) * ls_loss(p, b)
    for scale in (1.0, 3.0, 1.0):
        buf[:] = scale
        np.testing.assert_allclose(ls.loss_increment(scaled, w, data, k), scale * a_want,
                                   rtol=1e-10)

    per = lambda p, b: (b[0] @ p["w"] + p["b"] - b[1]) ** 2
    mean = lambda p, b: jnp.sum(per(p, b)) / b[0].shape[0]
    unbiased = lambda p, b: jnp.sum(per(p, b)) / max(1, b[0].shape[0] - 1)  # equal at n = 1
    with pytest.raises(ValueError, match="does not behave as a mean"):
        ls.check_mean_loss(unbiased, w, data, k)
    ls.check_mean_loss(mean, w, data, k)


# ------------------------------------ masked means: rounding, chunks, traced k


def _offset_problem(n, dtype):
    rng = np.random.default_rng(21)
    x = rng.normal(size=(n, N_FEAT))
    y = rng.normal(size=n)
    w = {"w": jnp.asarray(rng.normal(size=N_FEAT), dtype), "b": jnp.asarray(0.0, dtype)}
    return w, (jnp.asarray(x, dtype), jnp.asarray(y, dtype))


def _offset_loss(params, batch):
    """Per-sample losses ~1000 with O(1) spread: increments are tiny next to the means."""
    return ls_loss(params, batch) + 1000.0


def test_masked_means_equal_plain_means_to_rounding():
    from curvlib.landscape import _common

    k, n = 1000, 1010
    w32, data32 = _offset_problem(n, jnp.float32)
    w64, data64 = _offset_problem(n, jnp.float64)
    eps = float(np.finfo(np.float32).eps)
    L = lambda w, d, m: _offset_loss(w, (d[0][:m], d[1][:m]))
    # L_k as a masked weighted sum over all n samples = the plain mean over data[:k]
    plain = float(L(w32, data32, k))
    for mb in (None, 64, 70):
        masked = _common.weighted_value_fn(_offset_loss, data32, k, "mean", mb,
                                           jnp.float32)(w32)
        assert abs(float(masked) - plain) <= 4 * eps * abs(plain), mb
    # the increment through the identity keeps its digits (error ~ eps max|l| / (k+1));
    # the difference of the two means does not (error ~ eps max|l|)
    exact = float(L(w64, data64, k + 1) - L(w64, data64, k))
    tol = 4 * eps * 1010.0 / (k + 1)
    naive = float(L(w32, data32, k + 1)) - plain
    assert abs(naive - exact) > 10 * tol  # the cancellation is real here
    for mb in (None, 64, 70):
        got = float(ls.loss_increment(_offset_loss, w32, data32, k, microbatch_size=mb))
        assert abs(got - exact) <= tol, (mb, got, exact)
        coef = ls.increment_coefficients(_offset_loss, w32, data32, k,
                                         jax.tree.map(lambda p: jnp.ones((1,) + p.shape)
                                                      / np.sqrt(N_FEAT + 1), w32),
                                         microbatch_size=mb)
        assert abs(float(coef.a) - exact) <= tol, mb


def test_microbatched_chunks_and_samples_past_k(lsq):
    """Chunk loops (k+1 at and past chunk boundaries, a last chunk that overlaps its
    predecessor) give the unchunked numbers, and samples past k+1 (NaN) never reach a result."""
    x, y, theta = lsq
    w = _unflat(theta)
    key = jax.random.PRNGKey(0)
    sig = np.array([0.05, 0.5])
    bad = (x.at[14:].set(jnp.nan), y.at[14:].set(jnp.nan))

    def run(data, k, mb):
        sub = ls.curvature_subspace(ls_loss, w, data, k, 2, key=key, microbatch_size=mb)
        coef = ls.increment_coefficients(ls_loss, w, data, k, U, microbatch_size=mb)
        mc = ls.delta2_direct_mc(ls_loss, w, data, k, U, sig, key=key, num_samples=4,
                                 microbatch_size=mb)
        return sub.eigenvalues, *coef, mc.estimate

    U = ls.curvature_subspace(ls_loss, w, (x, y), 8, 2, key=key).eigenvectors
    for k, data in ((4, bad), (6, bad), (12, bad), (20, (x, y)), (22, (x, y))):
        ref = run((x, y), k, None)  # clean data, no chunks: the same compiled programs
        for mb in (None, 7):  # chunks [0,7) [7,14) [14,21) and the window [17,24)
            for got, want in zip(run(data, k, mb), ref, strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-13)


def test_traced_k_inside_jit(lsq):
    x, y, theta = lsq
    w = _unflat(theta)
    f = jax.jit(lambda k: ls.loss_increment(ls_loss, w, (x, y), k))
    for k in (3, 11):
        np.testing.assert_allclose(f(k), ls.loss_increment(ls_loss, w, (x, y), k), rtol=1e-12)
    # out of range: NaN, never a plausible number
    assert np.isnan(f(0)) and np.isnan(f(24))


# ------------------------------- fact 7: eigenpairs vs eigh of the explicit Hessian


def _mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["W1"] + params["b1"])
    out = h @ params["W2"] + params["b2"]
    return 0.5 * jnp.mean((out[:, 0] - y) ** 2)


@pytest.mark.parametrize("flatten", [False, True])
def test_subspace_matches_dense_eigh(flatten):
    rng = np.random.default_rng(10)
    n, d_in, hid = 20, 3, 5
    x = jnp.asarray(rng.normal(size=(n, d_in)))
    y = jnp.asarray(rng.normal(size=n))
    params = {"W1": jnp.asarray(rng.normal(size=(d_in, hid))),
              "b1": jnp.asarray(rng.normal(size=hid)),
              "W2": jnp.asarray(rng.normal(size=(hid, 1))),
              "b2": jnp.asarray(rng.normal(size=1))}
    k, D = 12, 4
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    Hd = np.asarray(jax.hessian(lambda v: _mlp_loss(unravel(v), (x[:k], y[:k])))(flat))
    lam, V = np.linalg.eigh(Hd)
    assert lam[0] < 0  # indefinite: signs matter
    sub = ls.curvature_subspace(_mlp_loss, params, (x, y), k, D, key=jax.random.PRNGKey(0),
                                flatten=flatten, eigsh=Eigsh(rtol=1e-10))
    assert bool(sub.converged)
    np.testing.assert_allclose(sub.eigenvalues, lam[::-1][:D], rtol=1e-7, atol=1e-9)
    U = np.asarray(jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(sub.eigenvectors))
    np.testing.assert_allclose(U @ U.T, np.eye(D), atol=1e-10)
    Vt = V[:, ::-1][:, :D].T
    np.testing.assert_allclose(U.T @ U, Vt.T @ Vt, atol=1e-6)  # same projector


def test_algebraically_largest_not_largest_magnitude():
    """|lambda_min| > lambda_max: a sign-blind power iteration would return -8."""
    N = 6
    rng = np.random.default_rng(11)
    Q, _ = np.linalg.qr(rng.normal(size=(N, N)))
    lam = np.array([3.0, 2.0, 1.0, 0.5, -1.0, -8.0])
    H = Q @ np.diag(lam) @ Q.T
    Hj = jnp.asarray(H)
    loss = lambda w, s: 0.5 * w @ Hj @ w + jnp.mean(s) * 0.0
    data = jnp.zeros((4, 1))
    sub = ls.curvature_subspace(loss, jnp.ones(N), data, 2, 2, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(sub.eigenvalues, [3.0, 2.0], rtol=1e-8)


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(12)
    for p, q in ((3, 3), (2, 4), (4, 2)):
        A = _random_orthonormal(rng, p, 7)
        B = _random_orthonormal(rng, q, 7)
        got = np.asarray(ls.principal_angles(jnp.asarray(A), jnp.asarray(B)))
        np.testing.assert_allclose(got, np.sort(subspace_angles(A.T, B.T)), atol=1e-12)
    with pytest.raises(ValueError, match=r"leaf 0 has shapes \(4, 7\) and \(2, 6\)"):
        ls.principal_angles(jnp.asarray(A), jnp.asarray(B)[:, :6])


def _rotated_pair(angles, N, seed, dtype):
    """Orthonormal bases U, V (as {"w": (p, N-1), "b": (p,)} pytrees) at the given angles.

    U spans e_1..e_p and V the vectors cos(t_i) e_i + sin(t_i) e_{p+i}, both rotated by one
    random orthogonal Q (computed in float64, then rounded to ``dtype``).
    """
    p = len(angles)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(N, N)))
    U = np.eye(N)[:p]
    V = np.zeros((p, N))
    for i, t in enumerate(angles):
        V[i, i], V[i, p + i] = np.cos(t), np.sin(t)
    tree = lambda M: {"w": jnp.asarray((M @ Q)[:, :-1], dtype), "b": jnp.asarray((M @ Q)[:, -1],
                                                                                  dtype)}
    return tree(U), tree(V)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("small", [1e-4, 1e-6])
def test_principal_angles_small_angles(dtype, small):
    """The sine form keeps small angles to ~eps absolute; arccos of the cosine loses them
    (in float32, cos(1e-4) = 1 - 5e-9 rounds to 1: arccos gives 0 or ~3e-4)."""
    angles = np.array([small, 3 * small, 0.5, 1.4])
    U, V = _rotated_pair(angles, 40, 0, dtype)
    got = np.asarray(ls.principal_angles(U, V), np.float64)
    # oracle: the angles between the spans of the *rounded* bases, in float64 by the sine form
    # on re-orthonormalised bases (scipy.linalg.subspace_angles is off by ~3e-13 at 1e-4)
    flat = lambda T: np.concatenate([np.asarray(T["w"], np.float64),
                                     np.asarray(T["b"], np.float64)[:, None]], 1).T
    Qu, Qv = np.linalg.qr(flat(U))[0], np.linalg.qr(flat(V))[0]
    sin = np.sort(np.linalg.svd(Qv - Qu @ (Qu.T @ Qv), compute_uv=False))
    cos = np.linalg.svd(Qu.T @ Qv, compute_uv=False)
    want = np.arctan2(sin, cos)
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(want, angles, atol=4 * eps)  # the construction
    # absolute accuracy a few eps: at 1e-6 in float32 (eps 1.2e-7) a zero would fail
    np.testing.assert_allclose(got, want, rtol=0, atol=3 * eps)
    assert np.asarray(ls.principal_angles(U, V)).dtype == dtype


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors(lsq):
    x, y, theta = lsq
    w = _unflat(theta)
    key = jax.random.PRNGKey(0)
    U = _unflat(jnp.eye(N_FEAT + 1)[:2])
    with pytest.raises(ValueError, match=r"`num_examples` \(k\) must be >= 1 .*got 0"):
        ls.delta1(ls_loss, w, (x, y), 0)
    with pytest.raises(ValueError,
                       match=r"`num_examples` \(k, the sample count\) must be an int; got 2.0"):
        ls.loss_increment(ls_loss, w, (x, y), 2.0)
    with pytest.raises(ValueError, match=r"`num_examples` \(k\): k \+ 1 = 25 exceeds the number "
                                         r"of samples .*\(24\)"):
        ls.curvature_subspace(ls_loss, w, (x, y), 24, 2, key=key)
    # D and N are named as what they are (not eigsh's `k=..., dim=...`)
    with pytest.raises(ValueError, match=r"`dim` = 6 \(the subspace dimension D\) must be "
                                         r"smaller than the parameter count N = 6"):
        ls.curvature_subspace(ls_loss, w, (x, y), 5, 6, key=key)
    with pytest.raises(ValueError, match=r"`basis_size` = 4 must satisfy D \+ 2 <= basis_size <= N"
                                         r".* D = 3 wanted eigenvectors.* N = 6 parameters"):
        ls.curvature_subspace(ls_loss, w, (x, y), 5, 3, key=key, eigsh=Eigsh(basis_size=4))
    with pytest.raises(ValueError, match=r"`basis_size` = 7 must satisfy"):
        ls.curvature_subspace(ls_loss, w, (x, y), 5, 3, key=key, eigsh=Eigsh(basis_size=7))
    with pytest.raises(ValueError, match=r"`mode='linearize'` stores every microbatch"):
        ls.curvature_subspace(ls_loss, w, (x, y), 5, 2, key=key, microbatch_size=2,
                              mode="linearize")
    with pytest.raises(ValueError, match=r"`sigma` must be > 0 \(the probe's .*; got \[0.1, 0.0\]"):
        ls.delta2_closed_form(0.1, jnp.zeros(2), jnp.eye(2), [0.1, 0.0])
    with pytest.raises(ValueError, match=r"`sigma` must be > 0 \(the probe's .*; got -1.0"):
        ls.delta2_direct_mc(ls_loss, w, (x, y), 5, U, -1.0, key=key, num_samples=4)
    with pytest.raises(ValueError, match=r"`sigma` must be finite and > 0 \(the probe.*; got nan"):
        ls.delta2_full_mc(ls_loss, w, (x, y), 5, float("nan"), key=key, num_samples=4)
    with pytest.raises(ValueError, match=r"`num_samples` must be >= 2 .*got 1"):
        ls.delta2_quadratic_mc(0.1, jnp.zeros(2), jnp.eye(2), 0.1, key=key, num_samples=1)
    with pytest.raises(ValueError, match=r"`key` is required"):
        ls.delta2_quadratic_mc(0.1, jnp.zeros(2), jnp.eye(2), 0.1, key=None, num_samples=8)
    with pytest.raises(ValueError, match=r"matching `params` leaf with one extra leading axis D; "
                                         r"at `eigenvectors\['b'\]` got shape \(\)"):
        ls.increment_coefficients(ls_loss, w, (x, y), 5, w)
    with pytest.raises(ValueError, match=r"`dim` \(the nested subspace dimension\) must be an "
                                         r"int in \[1, D\] with D = 2 the number of "
                                         r"`eigenvectors`; got 3"):
        ls.delta2_direct_mc(ls_loss, w, (x, y), 5, U, 0.1, key=key, num_samples=4, dim=3)
    with pytest.raises(ValueError, match=r"share the leading sample axis; got lengths \[23, 24\]"):
        ls.delta1(ls_loss, w, (x, y[:-1]), 5)


def test_num_matvecs_is_a_deprecated_basis_size(lsq):
    x, y, theta = lsq
    w = _unflat(theta)
    key = jax.random.PRNGKey(0)
    new = ls.curvature_subspace(ls_loss, w, (x, y), 8, 3, key=key, eigsh=Eigsh(basis_size=5))
    with pytest.warns(DeprecationWarning, match=r"`num_matvecs` is deprecated.*`basis_size`"):
        old = ls.curvature_subspace(ls_loss, w, (x, y), 8, 3, key=key, num_matvecs=5)
    np.testing.assert_array_equal(old.eigenvalues, new.eigenvalues)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="pass `basis_size`"):
        ls.curvature_subspace(ls_loss, w, (x, y), 8, 3, key=key, basis_size=5, num_matvecs=6)


# ------------------------------------------------------ control variate


def _tanh_loss(params, batch):
    x, y = batch
    return jnp.mean(jnp.log(jnp.cosh(x @ params["w"] + params["b"] - y)))


def test_control_variate_is_unbiased_and_tighter(lsq):
    x, y, theta = lsq
    w = _unflat(0.3 * theta)
    k = 8
    sub = ls.curvature_subspace(_tanh_loss, w, (x, y), k, 3, key=jax.random.PRNGKey(0))
    coef = ls.increment_coefficients(_tanh_loss, w, (x, y), k, sub.eigenvectors)
    sig = np.array([0.05, 0.3])
    plain = ls.delta2_direct_mc(_tanh_loss, w, (x, y), k, sub.eigenvectors, sig,
                                key=jax.random.PRNGKey(1), num_samples=3000)
    cv = ls.delta2_direct_mc(_tanh_loss, w, (x, y), k, sub.eigenvectors, sig,
                             key=jax.random.PRNGKey(2), num_samples=300, control_variate=coef)
    assert np.all(np.abs(cv.estimate - plain.estimate) <= 5 * np.hypot(cv.stderr, plain.stderr))
    same_s = ls.delta2_direct_mc(_tanh_loss, w, (x, y), k, sub.eigenvectors, sig,
                                 key=jax.random.PRNGKey(2), num_samples=300)
    # in the local regime (small sigma) the control variate is far tighter
    assert cv.stderr[0] < 0.1 * same_s.stderr[0]
    # nested dim with a control variate uses the prefix of (a, c, B)
    cv1 = ls.delta2_direct_mc(_tanh_loss, w, (x, y), k, sub.eigenvectors, 1e-4,
                              key=jax.random.PRNGKey(3), num_samples=8, dim=1,
                              control_variate=coef)
    np.testing.assert_allclose(cv1.estimate, ls.delta2_closed_form(*coef.prefix(1), 1e-4),
                               rtol=1e-6)
    # exact quadratic: the control variate removes all Monte Carlo noise
    exact = ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors)
    e = ls.delta2_direct_mc(ls_loss, w, (x, y), k, sub.eigenvectors, sig,
                            key=jax.random.PRNGKey(4), num_samples=8, control_variate=exact)
    np.testing.assert_allclose(e.estimate, ls.delta2_closed_form(*exact, sig), rtol=1e-9)
    assert np.all(e.stderr < 1e-9 * e.estimate)


def test_every_public_function_has_an_example_and_docs_stay_in_the_repository():
    import inspect

    for name in ls.__all__:
        obj = getattr(ls, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            assert "Examples:" in doc and ">>> from curvlib.landscape import" in doc, name
    for mod in ("curvlib.landscape", "curvlib.landscape._common", "curvlib.landscape.subspace",
                "curvlib.landscape.coefficients", "curvlib.landscape.estimators",
                "curvlib.landscape.curve", "curvlib.landscape.report"):
        src = inspect.getsource(importlib.import_module(mod))
        assert "shared/spec" not in src and "delta2.md" not in src, mod


def test_k_curve_counts_the_products_of_its_eigensolves(lsq, monkeypatch):
    """``KCurve.num_matvecs`` is, per ``k``, the sum of the products its eigensolves report
    (the subspace at ``k`` and at ``k + 1``); ``finite`` and ``status`` fold theirs."""
    from curvlib.landscape import subspace as subspace_module

    x, y, theta = lsq
    seen = []
    solve = subspace_module.subspace

    def counted(*args):
        out = solve(*args)
        seen.append((int(args[3]), int(out.num_matvecs)))
        return out

    monkeypatch.setattr(subspace_module, "subspace", counted)
    c = ls.k_curve(ls_loss, _unflat(theta), (x, y), [8, 9], dims=[1, 3], sigmas=[1e-3],
                   key=jax.random.PRNGKey(0), num_samples=0, full_samples=0, progress=False)
    # k and k + 1 at each point, the largest k first
    assert [k for k, _ in seen] == [9, 10, 8, 9]
    assert c.num_matvecs.tolist() == [seen[2][1] + seen[3][1], seen[0][1] + seen[1][1]]
    assert c.finite.tolist() == [True, True]


# ------------------------------------------------- inputs at the edges (audit)


def test_the_closed_form_reads_only_the_symmetric_part_of_B():
    """``q = a + c^T z + z^T B z / 2`` sees only ``(B + B^T) / 2``: a non-symmetric ``B``
    gives the closed form of its symmetric part, as the Monte Carlo does (it gave 0 for
    ``[[0, 1], [0, 0]]``, where the symmetric part's value is ``0.25``)."""
    B = jnp.asarray([[0.0, 1.0], [0.0, 0.0]])
    a, c, sig = jnp.asarray(0.0), jnp.zeros(2), jnp.asarray([1.0, 0.3])
    S = 0.5 * (B + B.T)
    np.testing.assert_allclose(ls.delta2_closed_form(a, c, B, sig),
                               ls.delta2_closed_form(a, c, S, sig), rtol=1e-14)
    np.testing.assert_allclose(float(ls.delta2_closed_form(a, c, B, 1.0)), 0.25, rtol=1e-14)
    mc = ls.delta2_quadratic_mc(a, c, B, 1.0, key=jax.random.PRNGKey(0), num_samples=40000)
    assert abs(float(mc.estimate) - 0.25) <= 5 * float(mc.stderr)


def test_bound_and_fit_inputs_are_named():
    for kw, match in (({"num_examples": 0}, "`num_examples` must be an integer >= 1"),
                      ({"num_examples": 2.5}, "`num_examples` must be an integer"),
                      ({"dim": 0}, "`dim` must be an integer >= 1"),
                      ({"max_hess": -1.0}, "`max_hess` must be >= 0")):
        args = {**dict(num_examples=4, sigma=1.0, dim=2, max_loss=1.0, max_grad=1.0,
                       max_hess=1.0), **kw}
        with pytest.raises(ValueError, match=match):
            ls.delta2_bound(**args)
    with pytest.raises(ValueError, match="`ks` and `values` must be 1-D sequences of one"):
        ls.fit_slope([1, 2, 4], [1.0, 0.5])
    assert ls.fit_slope([0, 1, 2, 4], [5.0, 1.0, 0.25, 0.0625])[0] == pytest.approx(-2.0)


def test_check_mean_loss_refuses_a_bad_tolerance(lsq):
    x, y, theta = lsq
    for rtol in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="`rtol` must be"):
            ls.check_mean_loss(ls_loss, _unflat(theta), (x, y), 4, rtol=rtol)


def test_a_basis_that_is_not_orthonormal_is_refused(lsq):
    """The estimators and the angles assume orthonormal rows; a basis scaled by 2, or with
    more vectors than dimensions, gave numbers with no meaning."""
    x, y, theta = lsq
    w = _unflat(theta)
    U = _random_orthonormal(np.random.default_rng(3), 2, N_FEAT + 1)
    good = _unflat(jnp.asarray(U))
    ls.increment_coefficients(ls_loss, w, (x, y), 4, good)  # accepted
    for bad in (_unflat(2 * jnp.asarray(U)),
                _unflat(jnp.asarray(np.random.default_rng(4).normal(size=(8, N_FEAT + 1))))):
        with pytest.raises(ValueError, match="`eigenvectors` must be an orthonormal basis"):
            ls.increment_coefficients(ls_loss, w, (x, y), 4, bad)
        with pytest.raises(ValueError, match="`eigenvectors` must be an orthonormal basis"):
            ls.delta2_direct_mc(ls_loss, w, (x, y), 4, bad, 1e-2, key=jax.random.PRNGKey(0),
                                num_samples=4)
    with pytest.raises(ValueError, match="`U` must be an orthonormal basis"):
        ls.principal_angles(2 * jnp.eye(3)[:1], jnp.eye(3)[:1])
    # inside a jit the basis is traced: nothing to compare, the call is part of the program
    jax.jit(lambda U: ls.increment_coefficients(ls_loss, w, (x, y), 4, U,
                                                check_mean=False).a)(good)


def test_k_curve_refuses_a_non_finite_loss_before_computing_any_k(lsq, monkeypatch):
    # a NaN in a sample that only the largest k uses: the curve computed the k's below,
    # then raised at that k and threw them away
    from curvlib.landscape import curve as curve_module
    x, y, theta = lsq
    w = _unflat(theta)
    computed = []
    real = curve_module.subspace_step
    monkeypatch.setattr(curve_module, "subspace_step",
                        lambda *a, **kw: computed.append(a[3]) or real(*a, **kw))
    bad = (x.at[7, 0].set(jnp.nan), y)
    with pytest.raises(ValueError, match=r"`data` has NaN/Inf entries in 1 of its first "
                                         r"k\+1 = 9 samples \(sample indices 7\)"):
        ls.k_curve(ls_loss, w, bad, [2, 4, 8], dims=[1], sigmas=[0.1],
                   key=jax.random.PRNGKey(0), progress=False)
    assert not computed
    # a loss that handles the NaN (a missing-value marker, masked) is the user's right
    masked = lambda p, b: ls_loss(p, (jnp.where(jnp.isnan(b[0]), 0.0, b[0]), b[1]))
    c = ls.k_curve(masked, w, bad, [2, 4, 8], dims=[1], sigmas=[0.1],
                   key=jax.random.PRNGKey(0), progress=False)
    assert c.finite.all() and computed == [8, 4, 2]  # (the largest first)
    # each k's values are its own, whatever the order: the same as k by k
    for i, k in enumerate([2, 4, 8]):
        one = ls.k_curve(masked, w, bad, [k], dims=[1], sigmas=[0.1],
                         key=jax.random.PRNGKey(0), progress=False)
        np.testing.assert_allclose(one.closed_form[0], c.closed_form[i], rtol=1e-10)
        np.testing.assert_allclose(one.eigenvalues[0], c.eigenvalues[i], rtol=1e-10)


def test_k_curve_reports_a_non_finite_monte_carlo_or_hessian_as_a_failure():
    import curvlib
    # the loss is finite at w* but NaN at probe points with x w < 0 (sigma = 10): the Monte
    # Carlo columns are NaN, which is a failure (finite False, NONFINITE), shown as `nan` in
    # the table, not as "-" (a stage that did not run)
    X = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=(8, 3))) + 0.5)

    def log_loss(w, b):
        return jnp.mean(jnp.log(b @ w) ** 2)

    c = ls.k_curve(log_loss, jnp.ones(3), X, [2, 4], dims=[1], sigmas=[0.01, 10.0],
                   key=jax.random.PRNGKey(0), progress=False, num_samples=16, full_samples=16)
    assert np.all(np.isfinite(c.direct_mean[:, 0, 0])) and np.all(np.isnan(c.direct_mean[..., 1]))
    assert not c.finite.any() and (c.status == Status.NONFINITE).all()
    with pytest.raises(curvlib.CurvatureError, match="NONFINITE"):
        curvlib.raise_if_failed(c)
    row = ls.curve_table(c, 10.0).splitlines()[2].split()
    assert row[2] == "nan" and row[4] == "nan" and row[3] != "nan", row
    assert "nan" not in ls.curve_table(c, 0.01)  # everything at sigma = 0.01 is finite
    # without the Monte Carlo stages the same curve is finite, and "-" marks them
    quiet = ls.k_curve(log_loss, jnp.ones(3), X, [2, 4], dims=[1], sigmas=[0.01, 10.0],
                       key=jax.random.PRNGKey(0), progress=False)
    assert quiet.finite.all() and (quiet.status == Status.SUCCESS).all()
    assert ls.curve_table(quiet, 10.0).splitlines()[2].split()[2] == "-"

    # a finite loss with a non-finite Hessian (sqrt|x w| at w = 0): the eigensolves say
    # NONFINITE and the curve reports it, with or without the next subspace (k_curve raised
    # "`U` must be an orthonormal basis" from the angles between the NaN subspaces)
    Xs = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [1.0, 3.0]])

    def kink(w, b):
        return jnp.mean(jnp.sqrt(jnp.abs(b @ w)) + (b @ w) ** 2)

    for nxt in (True, False):
        c = ls.k_curve(kink, jnp.zeros(2), Xs, [1, 2], dims=[1], sigmas=[0.1],
                       key=jax.random.PRNGKey(0), progress=False, next_subspace=nxt)
        assert not c.finite.any() and (c.status == Status.NONFINITE).all()
        assert np.isnan(c.max_angle).all()


def test_curve_json_keeps_the_slopes_of_close_sigmas_apart(lsq):
    x, y, theta = lsq
    c = ls.k_curve(ls_loss, _unflat(theta), (x, y), [8, 9], dims=[1],
                   sigmas=[1e-3, 1.0004e-3, 0.5],
                   key=jax.random.PRNGKey(0), progress=False, next_subspace=False)
    d = ls.curve_to_dict(c)
    assert list(d["slopes"]) == ["sigma=0.001", "sigma=0.0010004", "sigma=0.5"]
    for name, s in zip(d["slopes"], c.sigmas, strict=True):
        want = ls.curve_slopes(c, s)
        assert d["slopes"][name] == {k: float(v) if np.isfinite(v) else None
                                     for k, v in want.items()}


def test_landscape_refuses_a_loss_aux_pair_with_advice_it_can_follow():
    def loss_aux(w, b):
        v = jnp.mean((b @ w - 1.0) ** 2)
        return v, {"mse": v}

    x = jnp.arange(12.0).reshape(6, 2) / 10
    for call in (lambda: ls.delta1(loss_aux, jnp.ones(2), x, 2),
                 lambda: ls.curvature_subspace(loss_aux, jnp.ones(2), x, 2, 1,
                                               key=jax.random.PRNGKey(0))):
        with pytest.raises(ValueError, match="takes no `has_aux`") as e:
            call()
        assert "pass `has_aux=True`" not in str(e.value)


def test_raise_if_failed_names_the_most_serious_code_and_refuses_a_missing_status():
    import curvlib

    class Batched(typing.NamedTuple):
        status: np.ndarray

    with pytest.raises(curvlib.CurvatureError, match="NONFINITE") as e:
        curvlib.raise_if_failed(Batched(np.array([Status.MAX_STEPS, Status.NONFINITE, 0])))
    assert "(2 of 3 entries)" in str(e.value)
    assert curvlib.status_message(np.array([Status.MAX_STEPS, Status.NONFINITE])).startswith(
        "NONFINITE")
    # a hand-built KCurve has status None: the documented TypeError, not an int() error
    with pytest.raises(TypeError, match="status is None"):
        curvlib.raise_if_failed(Batched(None))


def test_k_curve_spectral_pairs_eigenvalues_along_eigenvectors():
    """Two eigenvalues of the shared top-2 subspace swap rank between k and k+1 (H^(k) =
    diag(2, 1, .2, .1), H^(k+1) = diag(4/3, 11/3, .2, .1)); w* = 0 minimises every sample
    (a = c = 0), so the corollary is exact with delta along each eigenvector (-2/3, 8/3):
    it equals the closed form, not the value from eigenvalues paired by rank."""
    mu = jnp.array([0.0, 0.0, 0.2, 0.1])

    def loss(w, x):
        return 0.5 * jnp.mean((x @ w) ** 2) + 0.5 * jnp.sum(mu * w**2)

    X = jnp.array([[2.0, 0, 0, 0], [0, np.sqrt(2.0), 0, 0], [0, 3.0, 0, 0], [1.0, 1, 1, 1]])
    c = ls.k_curve(loss, jnp.zeros(4), X, [2], dims=[2], sigmas=[1.0],
                   key=jax.random.PRNGKey(0), progress=False, num_samples=0)
    delta = np.array([4.0 / 3 - 2.0, 11.0 / 3 - 1.0])
    exact = 0.25 * (2 * np.sum(delta**2) + np.sum(delta) ** 2)  # 43/9
    np.testing.assert_allclose(c.eigenvalues_next[0], [11.0 / 3, 4.0 / 3], rtol=1e-10)
    np.testing.assert_allclose(c.spectral[0, 0, 0], exact, rtol=1e-8)
    np.testing.assert_allclose(c.closed_form[0, 0, 0], exact, rtol=1e-8)


def test_slopes_need_two_distinct_k_and_sigma_index_a_positive_sigma():
    """Two points at one ``k`` fix no slope (a least-squares fit through them invented
    one); a curve refuses repeated ``ks``; ``sigma_index`` refuses what has no logarithm."""
    assert all(np.isnan(ls.fit_slope([4, 4], [1.0, 2.0])))
    assert all(np.isnan(ls.fit_slope([4, 4, 8], [1.0, 2.0, float("nan")])))
    np.testing.assert_allclose(ls.fit_slope([4, 4, 16], [1.0, 1.0, 1 / 16])[0], -2.0)
    loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
    x = jax.random.normal(jax.random.PRNGKey(0), (12, 3))
    with pytest.raises(ValueError, match=r"`ks` must be distinct sample counts; got \[8, 8\]"):
        ls.k_curve(loss, jnp.ones(3), (x, x @ jnp.ones(3)), [8, 8], dims=[1], sigmas=[0.1],
                   key=jax.random.PRNGKey(1), progress=False)
    from curvlib.landscape.curve import sigma_index

    curve = types.SimpleNamespace(sigmas=np.array([1e-3, 1e-2, 1e-1]))
    assert sigma_index(curve, 0.02) == 1 and sigma_index(curve, None) == 0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`sigma` must be"):
            sigma_index(curve, bad)
