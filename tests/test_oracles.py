"""Exact-value oracle tests written to kill the mutants that survived mutation testing.

Each test pins a numerical kernel to an independent oracle (a closed form derived
here, scipy, or the same random draws re-evaluated in NumPy) at exact-to-rounding
tolerances, so that a changed constant, operator or axis fails it. docs/testing.md
lists the mutants these tests were written against. Tiny float64 problems; a few
compiled programs in all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import curvlib
from curvlib import landscape as ls
from curvlib.krylov import stochastic


def test_delta2_bound_is_the_theorem_formula():
    """Every constant and power of ``(12 M_l^2 + 3 s^2 M_g^2 + 3 s^4 (D^2+2D) M_H^2)/(k+1)^2``."""
    k = np.array([1.0, 4.0])[:, None]
    sig = np.array([0.5, 2.0])
    dim, Ml, Mg, Mh = 3, 1.5, 0.7, 1.3
    # each term alone, against the formula written out in NumPy
    one = {"max_loss": 0.0, "max_grad": 0.0, "max_hess": 0.0}
    for name, val, expect in [
        ("max_loss", Ml, 12 * Ml**2 + 0 * sig),
        ("max_grad", Mg, 3 * sig**2 * Mg**2),
        ("max_hess", Mh, 3 * sig**4 * (dim**2 + 2 * dim) * Mh**2),
    ]:
        got = ls.delta2_bound(k, sig, dim, **{**one, name: val})
        np.testing.assert_allclose(got, expect / (k + 1) ** 2, rtol=1e-14, err_msg=name)
    got = ls.delta2_bound(k, sig, dim, max_loss=Ml, max_grad=Mg, max_hess=Mh)
    total = 12 * Ml**2 + 3 * sig**2 * Mg**2 + 3 * sig**4 * (dim**2 + 2 * dim) * Mh**2
    np.testing.assert_allclose(got, total / (k + 1) ** 2, rtol=1e-14)
    assert got.shape == (2, 2)
    # grids that do not broadcast: a message naming both and the way to a table
    with pytest.raises(ValueError, match=r"`num_examples` \(shape \(3,\)\) and `sigma` "
                                         r"\(shape \(2,\)\) must broadcast.*\[:, None\]"):
        ls.delta2_bound(np.array([1, 2, 4]), sig, dim, max_loss=Ml, max_grad=Mg, max_hess=Mh)


def test_delta2_spectral_equals_the_gaussian_fourth_moments():
    """``E[(z^T diag(d) z / 2)^2]`` from ``E z_i^4 = 3 s^4``, ``E z_i^2 z_j^2 = s^4`` (i != j)."""
    lk = np.array([3.0, 1.0, -0.5])
    lk1 = np.array([3.5, 0.25, 0.5])
    d = lk1 - lk
    sig = np.array([0.3, 1.7])
    s4 = sig**4
    moments = sum(
        d[i] * d[j] * (3 * s4 if i == j else s4) for i in range(3) for j in range(3)
    ) / 4
    np.testing.assert_allclose(ls.delta2_spectral(lk, lk1, sig), moments, rtol=1e-13)
    # and it is the closed form at a = 0, c = 0, B = diag(d)
    np.testing.assert_allclose(
        ls.delta2_spectral(lk, lk1, sig), ls.delta2_closed_form(0.0, np.zeros(3), np.diag(d), sig),
        rtol=1e-13)
    with pytest.raises(ValueError, match="eigenvalue vectors must be 1-D of equal length"):
        ls.delta2_spectral(lk, lk1[:2], sig)


@pytest.mark.parametrize("antithetic", [True, False])
def test_quadratic_mc_is_the_sample_mean_of_its_own_draws(antithetic):
    """Mean and stderr are exactly NumPy's on the same draws (``subspace_normals(key)``)."""
    rng = np.random.default_rng(11)
    D, S = 3, 7
    a, c = 0.4, rng.normal(size=D)
    M = rng.normal(size=(D, D))
    B = (M + M.T) / 2
    sig = np.array([0.2, 1.3])
    key = jax.random.PRNGKey(3)
    est = ls.delta2_quadratic_mc(a, c, B, sig, key=key, num_samples=S, antithetic=antithetic)
    z = np.asarray(ls.subspace_normals(key, S, D, jnp.float64))  # the estimator's draws
    signs = [1.0, -1.0] if antithetic else [1.0]
    per = np.zeros((len(sig), S))
    for g, s in enumerate(sig):
        for sg in signs:
            x = sg * s * z
            q = a + x @ c + 0.5 * np.einsum("si,ij,sj->s", x, B, x)
            per[g] += q**2 / len(signs)
    np.testing.assert_allclose(est.estimate, per.mean(1), rtol=1e-13)
    np.testing.assert_allclose(est.stderr, per.std(1, ddof=1) / np.sqrt(S), rtol=1e-12)
    assert est.estimate.shape == sig.shape and est.stderr.shape == sig.shape
    assert (est.num_samples, est.num_evaluations) == (S, S * len(signs))
    # a scalar sigma gives scalar results
    one = ls.delta2_quadratic_mc(a, c, B, 1.3, key=key, num_samples=S, antithetic=antithetic)
    assert one.estimate.shape == () and one.stderr.shape == ()
    np.testing.assert_allclose(one.estimate, est.estimate[1], rtol=1e-13)


def test_closed_form_terms_are_shaped_like_sigma_and_exact():
    a, c, B = -0.7, np.array([0.5, -2.0]), np.array([[1.0, 0.3], [0.3, -2.5]])
    for sig in (0.9, np.array([0.1, 0.9, 3.0])):
        t = ls.delta2_closed_form_terms(a, c, B, sig)
        s = np.asarray(sig)
        assert t.constant.shape == s.shape == t.sigma2.shape == t.sigma4.shape
        np.testing.assert_allclose(t.constant, np.full(s.shape, a * a), rtol=1e-15)
        np.testing.assert_allclose(t.sigma2, s**2 * (a * -1.5 + 4.25), rtol=1e-14)
        # tr B^2 = 1 + 6.25 + 2 * 0.09, (tr B)^2 = 2.25
        np.testing.assert_allclose(t.sigma4, s**4 * (2 * 7.43 + 2.25) / 4, rtol=1e-14)
        np.testing.assert_allclose(ls.delta2_closed_form(a, c, B, sig),
                                   t.constant + t.sigma2 + t.sigma4, rtol=1e-15)
    with pytest.raises(ValueError, match=r"expected coefficients a \(scalar\), c of shape"):
        ls.delta2_closed_form(a, c, B[:1], 0.5)


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 6, 9, 10, 29, 1000, 1001, 5000])
def test_t975_matches_scipy(dof):
    """The Student-t quantile behind every stochastic estimator's 95% interval."""
    # bisection to rounding up to 1000 dof; Cornish-Fisher beyond (1.3e-9 at 1001 dof)
    rtol = 1e-11 if dof <= 1000 else 2e-9
    np.testing.assert_allclose(stochastic._t975(dof), scipy.stats.t.ppf(0.975, dof), rtol=rtol)
    for t in (0.3, 1.0, 2.5):
        np.testing.assert_allclose(stochastic._t_coverage(t, dof),
                                   scipy.stats.t.cdf(t, dof) - scipy.stats.t.cdf(-t, dof),
                                   rtol=1e-12)


def test_eigsh_residual_norms_are_the_true_residuals_before_convergence():
    """Stopped early by the product budget, the reported residuals are ``||A x - theta x||``."""
    rng = np.random.default_rng(2)
    n = 40
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = (Q * np.linspace(-1.0, 3.0, n)) @ Q.T
    Aj = jnp.asarray(A)
    r = curvlib.eigsh(lambda v: Aj @ v, jnp.asarray(rng.normal(size=n)), 3, basis_size=8,
                      max_matvecs=10, key=jax.random.PRNGKey(0))
    assert not bool(r.converged)
    X = np.asarray(r.eigenvectors)
    theta = np.asarray(r.eigenvalues)
    np.testing.assert_allclose(X @ X.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(theta, np.einsum("ki,ij,kj->k", X, A, X), rtol=1e-12)
    true = np.linalg.norm(X @ A - theta[:, None] * X, axis=1)
    assert np.all(true > 1e-3)  # not converged: the residuals are sizeable
    np.testing.assert_allclose(r.residual_norms, true, rtol=1e-8)
