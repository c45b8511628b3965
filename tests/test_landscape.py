"""curvlib.landscape against independent oracles (spec delta2.md, facts 1-7).

Dense numpy Hessians, gradients and eigendecompositions on small least-squares
and quadratic problems are the oracles; float64 is on (conftest).
"""

from __future__ import annotations

import doctest
import importlib
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import subspace_angles

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
    with pytest.raises(ValueError, match="mean over the leading axis"):
        ls.check_mean_loss(ls_sum_loss, w, (x, y), 4)
    with pytest.raises(ValueError, match="mean"):
        ls.delta1(ls_sum_loss, w, (x, y), 4)
    with pytest.raises(ValueError, match="mean"):
        ls.increment_coefficients(ls_sum_loss, w, (x, y), 4, jax.tree.map(lambda p: p[None], w))
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
                                num_matvecs=D + 1, tol=0.5, max_restarts=0)
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
    with pytest.raises(ValueError, match="eigenvalues"):
        ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors,
                                  eigenvalues=sub.eigenvalues[:2])


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
        assert np.all(np.abs(est.mean - gm) <= 5 * est.stderr)
    # standard error shrinks like S^-1/2 (x100 samples -> /10)
    ratio = np.asarray(small.stderr / big.stderr)
    assert np.all((ratio > 7) & (ratio < 14)), ratio  # 10 up to the spread of 400 draws
    assert np.all(np.abs(big.mean - gm) / gm < 0.03)
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
    np.testing.assert_allclose(direct.mean, quad.mean, rtol=1e-9)
    np.testing.assert_allclose(direct.stderr, quad.stderr, rtol=1e-7)
    # and both equal the closed form in expectation
    assert np.all(np.abs(direct.mean - gm) <= 5 * direct.stderr + 1e-12 * gm)
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
    np.testing.assert_allclose(masked.mean, direct.mean, rtol=1e-10)
    chunked = ls.delta2_direct_mc(ls_loss, w, (x, y), k, prefix, sig, key=key, num_samples=64,
                                  microbatch_size=3, sample_batch_size=16)
    np.testing.assert_allclose(chunked.mean, direct.mean, rtol=1e-10)
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
    assert np.all(np.abs(full.mean - vals[0]) <= 5 * full.stderr)
    direct = ls.delta2_direct_mc(ls_loss, w, (x, y), k, _unflat(_random_orthonormal(rng, N, N)),
                                 sig, key=jax.random.PRNGKey(5), num_samples=4000)
    assert np.all(np.abs(direct.mean - vals[0]) <= 5 * direct.stderr)


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
    assert np.all(np.abs(mc.mean - spectral) <= 5 * mc.stderr)


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
    assert np.all(np.isfinite(c.max_angle)) and np.all(np.isfinite(c.direct_mean))
    x, y = np.asarray(x), np.asarray(y)
    for i, k in enumerate(ks):
        # the driver's numbers are the estimators' numbers
        _, _, Hk = np_loss_grad_hess(theta, x[:k], y[:k])
        _, _, Hk1 = np_loss_grad_hess(theta, x[: k + 1], y[: k + 1])
        np.testing.assert_allclose(c.eigenvalues[i], np.linalg.eigvalsh(Hk)[::-1][:3], rtol=1e-8)
        np.testing.assert_allclose(c.eigenvalues_next[i], np.linalg.eigvalsh(Hk1)[::-1][:3],
                                   rtol=1e-8)
        np.testing.assert_allclose(c.delta1[i], ls.delta1(ls_loss, w, data, k), rtol=1e-10)
        for j, d in enumerate(c.dims):
            assert np.all(c.closed_form[i, j] <= ls.delta2_bound(k, sig, d, **consts))
        # exact quadratic: direct MC within its error of the closed form
        assert np.all(np.abs(c.direct_mean[i] - c.closed_form[i]) <= 5 * c.direct_stderr[i]
                      + 1e-9 * c.closed_form[i])
    np.testing.assert_allclose(c.constant + c.sigma2 + c.sigma4, c.closed_form, rtol=1e-12)
    # params as a function of k, and the reports
    c2 = ls.k_curve(ls_loss, lambda k: w, data, ks[:1], dims=[1, 3], sigmas=sig,
                    key=jax.random.PRNGKey(0), next_subspace=False, progress=False)
    np.testing.assert_allclose(c2.closed_form[0, 0], c.closed_form[0, 0], rtol=1e-8)
    assert "slopes" in ls.curve_table(c, 0.3)
    ls.save_curve_json(c, tmp_path / "curve.json")
    loaded = json.loads((tmp_path / "curve.json").read_text())
    assert loaded["ks"] == ks and "sigma=0.3" in loaded["slopes"]
    ls.plot_curve(c, sigma=0.3, path=tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


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
                                flatten=flatten, tol=1e-10)
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
    A = _random_orthonormal(rng, 3, 7)
    B = _random_orthonormal(rng, 3, 7)
    got = np.asarray(ls.principal_angles(jnp.asarray(A), jnp.asarray(B)))
    np.testing.assert_allclose(got, np.sort(subspace_angles(A.T, B.T)), atol=1e-7)


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors(lsq):
    x, y, theta = lsq
    w = _unflat(theta)
    key = jax.random.PRNGKey(0)
    U = jax.tree.map(lambda p: jnp.zeros((2,) + p.shape).at[0].set(1.0), w)
    with pytest.raises(ValueError, match=">= 1"):
        ls.delta1(ls_loss, w, (x, y), 0)
    with pytest.raises(ValueError, match="exceeds the number of samples"):
        ls.curvature_subspace(ls_loss, w, (x, y), 24, 2, key=key)
    with pytest.raises(ValueError, match="smaller than the parameter count"):
        ls.curvature_subspace(ls_loss, w, (x, y), 5, 6, key=key)
    with pytest.raises(ValueError, match="sigma"):
        ls.delta2_closed_form(0.1, jnp.zeros(2), jnp.eye(2), [0.1, 0.0])
    with pytest.raises(ValueError, match="sigma"):
        ls.delta2_direct_mc(ls_loss, w, (x, y), 5, U, -1.0, key=key, num_samples=4)
    with pytest.raises(ValueError, match="sigma"):
        ls.delta2_full_mc(ls_loss, w, (x, y), 5, float("nan"), key=key, num_samples=4)
    with pytest.raises(ValueError, match="num_samples"):
        ls.delta2_quadratic_mc(0.1, jnp.zeros(2), jnp.eye(2), 0.1, key=key, num_samples=1)
    with pytest.raises(ValueError, match="key"):
        ls.delta2_quadratic_mc(0.1, jnp.zeros(2), jnp.eye(2), 0.1, key=None, num_samples=8)
    with pytest.raises(ValueError, match="extra leading axis"):
        ls.increment_coefficients(ls_loss, w, (x, y), 5, w)
    with pytest.raises(ValueError, match="dim"):
        ls.delta2_direct_mc(ls_loss, w, (x, y), 5, U, 0.1, key=key, num_samples=4, dim=3)
    with pytest.raises(ValueError, match="sample axis"):
        ls.delta1(ls_loss, w, (x, y[:-1]), 5)


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
    assert np.all(np.abs(cv.mean - plain.mean) <= 5 * np.hypot(cv.stderr, plain.stderr))
    same_s = ls.delta2_direct_mc(_tanh_loss, w, (x, y), k, sub.eigenvectors, sig,
                                 key=jax.random.PRNGKey(2), num_samples=300)
    # in the local regime (small sigma) the control variate is far tighter
    assert cv.stderr[0] < 0.1 * same_s.stderr[0]
    # nested dim with a control variate uses the prefix of (a, c, B)
    cv1 = ls.delta2_direct_mc(_tanh_loss, w, (x, y), k, sub.eigenvectors, 1e-4,
                              key=jax.random.PRNGKey(3), num_samples=8, dim=1,
                              control_variate=coef)
    np.testing.assert_allclose(cv1.mean, ls.delta2_closed_form(*coef.prefix(1), 1e-4),
                               rtol=1e-6)
    # exact quadratic: the control variate removes all Monte Carlo noise
    exact = ls.increment_coefficients(ls_loss, w, (x, y), k, sub.eigenvectors)
    e = ls.delta2_direct_mc(ls_loss, w, (x, y), k, sub.eigenvectors, sig,
                            key=jax.random.PRNGKey(4), num_samples=8, control_variate=exact)
    np.testing.assert_allclose(e.mean, ls.delta2_closed_form(*exact, sig), rtol=1e-9)
    assert np.all(e.stderr < 1e-9 * e.mean)


# ------------------------------------------------------------ demo smoke


def test_demo_main_tiny(tmp_path):
    from curvlib.demo import main

    r = main(["--d-model", "8", "--layers", "1", "--heads", "2", "--seq-len", "8",
              "--train-steps", "3", "--batch-size", "4", "--k", "3", "--dims", "1,2",
              "--num-sigmas", "3", "--num-samples", "4", "--full-samples", "4",
              "--num-matvecs", "6", "--no-overlap", "--out", str(tmp_path)])
    assert r["dims"] == [1, 2] and len(r["sigmas"]) == 3
    for key in ("delta1", "delta2_full", "closed_form", "terms", "quadratic_mc", "direct_mc",
                "ratio_to_full", "direct_vs_closed_form_rel_error", "timings",
                "speedup_closed_form_vs_direct", "model_error_same_draws"):
        assert key in r
    # sigma -> 0: every Delta2 tends to Delta1^2
    np.testing.assert_allclose(r["closed_form"]["2"][0], r["delta1"] ** 2, rtol=1e-3)
    saved = json.loads((tmp_path / "delta2_transformer.json").read_text())
    assert saved["k"] == 3
    assert (tmp_path / "delta2_transformer.png").stat().st_size > 0


@pytest.mark.parametrize("name", ["curvlib.landscape.coefficients", "curvlib.landscape.subspace",
                                  "curvlib.landscape.estimators", "curvlib.landscape.curve"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
