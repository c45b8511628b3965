"""Edges of the one vocabulary and the one status convention (an audit).

Oracles: ``numpy.linalg`` on a small dense symmetric matrix, and the same estimator run on
a grid's finite entry alone (the draws are shared across a ``sigma`` grid).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib
from curvlib import CG, Eigsh, Status
from curvlib import landscape as ls

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 12
_Q = np.linalg.qr(np.random.default_rng(0).standard_normal((N, N)))[0]
_EV = np.geomspace(1.0, 100.0, N)
A = jnp.asarray((_Q * _EV) @ _Q.T)
V0 = jnp.ones(N)


def _mv(v):
    return A @ v


def test_lowrank_inverse_refuses_the_options_it_would_ignore():
    # method='lowrank' runs no CG: `cg=`, the deprecated `rtol` (folded into `cg`) and a
    # preconditioner were accepted and ignored (the answer was the same with CG(rtol=1e-12,
    # max_steps=1)); `verify=False` beside `eigsh=Eigsh(verify=True)` silently overrode it;
    # `k=` failed with Python's "eigsh() got multiple values"
    lam = 0.5
    low = curvlib.inverse_matvec(_mv, damping=lam, method="lowrank", rank=2, v0=V0,
                                 eigsh=Eigsh(rtol=1e-12), which="LA",
                                 key=jax.random.PRNGKey(0))
    u = _Q[:, -2:]  # the top-2 eigenvectors: there the low-rank inverse is exact
    b = u @ np.array([1.0, -2.0])
    np.testing.assert_allclose(low(jnp.asarray(b)),
                               np.linalg.solve(np.asarray(A) + lam * np.eye(N), b), rtol=1e-9)
    kw = dict(damping=lam, method="lowrank", rank=2, v0=V0)
    only_cg = "apply to method='cg' only"
    with pytest.raises(ValueError, match=only_cg):
        curvlib.inverse_matvec(_mv, cg=CG(rtol=1e-12, max_steps=1), **kw)
    with pytest.raises(ValueError, match=only_cg):
        curvlib.inverse_matvec(_mv, preconditioner=lambda v: v, **kw)
    with pytest.warns(DeprecationWarning, match="`rtol` is deprecated"), \
            pytest.raises(ValueError, match=only_cg):
        curvlib.inverse_matvec(_mv, rtol=1e-12, **kw)
    with pytest.raises(ValueError, match=only_cg):
        curvlib.inverse_matvec(_mv, damping=lam, method="lowrank", cg=CG(),
                               eigenpairs=(jnp.asarray(_EV[-2:]), jnp.asarray(u.T)))
    with pytest.raises(TypeError, match=r"\['verify'\].*eigsh=curvlib.Eigsh"):
        curvlib.inverse_matvec(_mv, eigsh=Eigsh(verify=True), verify=False, **kw)
    with pytest.raises(TypeError, match=r"\['k'\].*`rank`"):
        curvlib.inverse_matvec(_mv, k=3, **kw)


def test_delta2_estimates_that_overflow_are_nan_not_inf():
    # MonteCarloEstimate: "NaN if an evaluation was not finite" (Hutchinson's are); an
    # overflowed Delta_2 draw made the estimate `inf` (status NONFINITE), read as a value
    key = jax.random.PRNGKey(0)
    a, c, B = jnp.asarray(0.1), jnp.ones(3), jnp.eye(3)
    grid = ls.delta2_quadratic_mc(a, c, B, jnp.array([0.5, 1e200]), key=key, num_samples=8)
    alone = ls.delta2_quadratic_mc(a, c, B, 0.5, key=key, num_samples=8)
    assert int(grid.status) == Status.NONFINITE and not bool(grid.finite)
    np.testing.assert_allclose(grid.estimate[0], alone.estimate, rtol=1e-12)  # kept
    np.testing.assert_allclose(grid.stderr[0], alone.stderr, rtol=1e-12)
    assert np.isnan(grid.estimate[1]) and np.isnan(grid.stderr[1])
    # the direct estimators: a sample whose loss overflows makes L_{k+1} = inf
    rng = np.random.default_rng(1)
    X = jnp.asarray(rng.normal(size=(6, 3)))
    Y = jnp.asarray(rng.normal(size=6)).at[4].set(1e200)

    def lsq(w, batch):
        x, y = batch
        return jnp.mean((x @ w - y) ** 2)

    full = ls.delta2_full_mc(lsq, jnp.zeros(3), (X, Y), 4, sigma=0.1, key=key, num_samples=4,
                             check_mean=False)
    assert int(full.status) == Status.NONFINITE
    assert np.isnan(full.estimate) and np.isnan(full.stderr)


def test_power_iteration_that_turns_non_finite_returns_nan_pairs_as_documented():
    # docs/scaling.md said every solver keeps "finite vectors (the last finite iterate)";
    # power iteration returns the pair in progress as NaN (its docstring's contract)
    T = jnp.diag(jnp.arange(1.0, N + 1)) + jnp.diag(jnp.ones(N - 1), 1) \
        + jnp.diag(jnp.ones(N - 1), -1)

    def mid_run_nan(v):  # finite until the Krylov vectors reach coordinate 4
        w = T @ v
        return jnp.where(jnp.abs(v[4]) > 0, jnp.full_like(w, jnp.nan), w)

    r = curvlib.power_iteration(mid_run_nan, jnp.eye(N)[0], 1)
    assert int(r.status) == Status.NONFINITE and not bool(r.finite)
    assert np.all(np.isnan(np.asarray(r.eigenvectors)))
    row = next(ln for ln in (ROOT / "docs" / "scaling.md").read_text().splitlines()
               if ln.startswith("| a product that turns non-finite mid-run"))
    assert "power_iteration" in row and "NaN" in row
