"""Certificates at every scale: each result is right or flagged, and its residuals are true.

An operator ``s A`` has the eigenvectors of ``A``, eigenvalues ``s lambda``; ``(s A) x = s b``
has the solution of ``A x = b``. Norms taken as ``sqrt(<v, v>)`` overflow above about
``1.8e19`` (float32) / ``1.3e154`` (float64) and underflow below the reciprocals, and a
zero or infinite norm then reads as a Krylov breakdown, a zero tolerance or a non-finite
input. Every test runs one small operator at scales from both ends of each dtype's range
(``s`` chosen so that the answer is representable), and compares with dense oracles in
NumPy float64 whose norms are computed scale-safe (:func:`_norm`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib

F32 = [1e-30, 1e-20, 1e20, 1e30]
F64 = [1e-300, 1e-160, 1e160, 1e300]
SCALES = ([pytest.param(np.float32, s, id=f"f32-{s:.0e}") for s in F32]
          + [pytest.param(np.float64, s, id=f"f64-{s:.0e}") for s in F64])

N = 40


def _norm(x, axis=None):
    """``||x||`` in float64, scaled by the largest entry first (a scale-safe oracle)."""
    x = np.asarray(x, np.float64)
    m = np.max(np.abs(x), axis=axis, keepdims=True)
    m = np.where(m > 0, m, 1.0)
    return np.squeeze(m, axis=axis) * np.sqrt(np.sum((x / m) ** 2, axis=axis))


def _close(reported, true, dt, s):
    """Reported residual norms equal true ones to 10%, or both are at rounding level."""
    floor = 100 * np.finfo(dt).eps * s
    return np.all(np.abs(np.asarray(reported, np.float64) - true) <= 0.1 * true + floor)


def _sym(dt):
    rng = np.random.default_rng(7)
    B = rng.standard_normal((N, N))
    return ((B + B.T) / (2 * np.sqrt(N))).astype(dt)


@pytest.mark.parametrize("dt,s", SCALES)
def test_eigsh_right_with_true_residuals_at_every_scale(dt, s):
    d = np.linspace(0.1, 1.0, N) * s
    dj = jnp.asarray(d.astype(dt))
    v0 = {"a": jnp.ones(N // 2, dt), "b": jnp.asarray(np.linspace(1, 2, N // 2).astype(dt))}
    split = lambda v: jnp.concatenate([v["a"], v["b"]])
    mv = lambda v: {"a": dj[: N // 2] * v["a"], "b": dj[N // 2:] * v["b"]}
    r = curvlib.eigsh(mv, v0, k=3)
    assert bool(r.finite)
    fi = np.finfo(dt)
    # right (below), so not merely flagged; flagged only where residuals at rounding level
    # (eps ||A||) are subnormal and cannot certify anything (float64 1e-300)
    assert bool(r.converged) == (s * fi.eps >= fi.tiny)
    # the status agrees (it said SUCCESS below the normal range): STALLED, right but uncertified
    ok, stalled = curvlib.Status.SUCCESS, curvlib.Status.STALLED
    assert int(r.status) == (ok if bool(r.converged) else stalled)
    want = np.sort(d)[::-1][:3]
    np.testing.assert_allclose(np.asarray(r.eigenvalues, np.float64), want, rtol=1e-3)
    X = np.stack([np.asarray(split(jax.tree.map(lambda x: x[i], r.eigenvectors)), np.float64)
                  for i in range(3)])
    ev = np.asarray(r.eigenvalues, np.float64)
    true = _norm(d[None] * X - ev[:, None] * X, axis=1)
    if bool(r.converged):
        assert _close(r.residual_norms, true, dt, s), (r.residual_norms, true)
    else:  # no residual below the normal range is claimed (it would read as a certificate)
        assert np.all(np.isnan(np.asarray(r.residual_norms)))


@pytest.mark.parametrize("dt,s", SCALES)
def test_lanczos_relation_and_residual_at_every_scale(dt, s):
    d = (np.linspace(0.1, 1.0, N) * s).astype(dt)
    dj = jnp.asarray(d)
    m = 8
    r = curvlib.lanczos(lambda v: dj * v, jnp.ones(N, dt), m)
    assert bool(r.finite) and not bool(r.breakdown)
    Q = np.asarray(r.basis, np.float64)
    T = np.diag(np.asarray(r.alphas, np.float64))
    b = np.asarray(r.betas, np.float64)
    T += np.diag(b, 1) + np.diag(b, -1)
    res = np.asarray(r.residual, np.float64)
    # A Q^T - Q^T T = r e_m^T, to rounding relative to ||A|| = s
    E = d.astype(np.float64)[:, None] * Q.T - Q.T @ T
    E[:, -1] -= res
    assert _norm(E) <= 1e3 * np.finfo(dt).eps * s
    np.testing.assert_allclose(Q @ Q.T, np.eye(m), atol=1e2 * np.finfo(dt).eps)
    assert np.all(b > 0.01 * s)  # no spurious breakdown: the betas are those of the scaled chain
    assert _close(r.residual_norm, _norm(res), dt, s)


@pytest.mark.parametrize("dt,s", SCALES)
def test_power_iteration_right_with_true_residual_at_every_scale(dt, s):
    d = np.concatenate([[1.0, 0.5], np.linspace(0.05, 0.2, N - 2)]) * s
    dj = jnp.asarray(d.astype(dt))
    r = curvlib.power_iteration(lambda v: dj * v, jnp.ones(N, dt), k=2, rtol=1e-3)
    assert bool(r.finite) and bool(jnp.all(r.converged))
    ev = np.asarray(r.eigenvalues, np.float64)
    np.testing.assert_allclose(ev, [s, 0.5 * s], rtol=1e-3)
    X = np.asarray(r.eigenvectors, np.float64)
    true = _norm(d[None] * X - ev[:, None] * X, axis=1)
    assert _close(r.residual_norms, true, dt, s)


# The right-hand side spans the range; so does the operator, down to float32 1e-30 (where
# p^T A p of CG's shrinking directions underflowed before the products were taken of unit
# directions) and float64 1e-300.
CG_SCALES = ([pytest.param(np.float32, s, False, id=f"f32-b{s:.0e}") for s in F32]
             + [pytest.param(np.float64, s, False, id=f"f64-b{s:.0e}") for s in F64]
             + [pytest.param(np.float32, s, True, id=f"f32-A{s:.0e}")
                for s in (1e-30, 1e-20, 1e20, 1e30)]
             + [pytest.param(np.float64, s, True, id=f"f64-A{s:.0e}")
                for s in (1e-300, 1e-160, 1e300)])


@pytest.mark.parametrize("dt,s,scale_a", CG_SCALES)
def test_cg_right_with_true_residual_at_every_scale(dt, s, scale_a):
    a = np.linspace(1.0, 10.0, N) * (s if scale_a else 1.0)
    bvec = np.full(N, 1.0 if scale_a else s)
    aj, bj = jnp.asarray(a.astype(dt)), jnp.asarray(bvec.astype(dt))
    r = curvlib.cg(lambda v: aj * v, bj, rtol=1e-4)
    assert bool(r.finite)  # a finite b is never called non-finite
    assert bool(r.converged) and int(r.num_steps) > 0
    x = np.asarray(r.x, np.float64)
    xt = bvec / a
    assert _norm(x - xt) <= 1e-3 * _norm(xt)
    true = _norm(bvec - a * x)
    assert _close(r.residual_norm, true, dt, np.max(bvec))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_cg_zero_rhs_is_exact(dt):
    r = curvlib.cg(lambda v: 2.0 * v, jnp.zeros(N, dt))
    assert bool(r.converged) and bool(r.finite)
    assert int(r.num_steps) == 0 and float(r.residual_norm) == 0.0
    assert not np.any(np.asarray(r.x))


def test_hutch_plus_plus_of_a_float16_operator_near_its_range_is_finite(key):
    """float16 products up to 3e4 (< 65504): Hutch++'s remainder multiplied a deflated
    probe by its product in float16 before summing in float32, which overflowed: the
    estimate was inf, ``finite=True``. Now within a few stderr of the float64 trace."""
    d = jnp.asarray(np.linspace(1000, 30000, N), jnp.float16)
    true = float(np.sum(np.asarray(d, np.float64)))
    for method in ("hutchinson", "hutch++"):
        r = curvlib.hutchinson_trace(lambda v: d * v, jnp.ones(N, jnp.float16), key, 10,
                                     method=method)
        assert bool(r.finite) and np.isfinite(float(r.estimate)), method
        assert abs(float(r.estimate) - true) <= 4 * float(r.stderr) + 1e-3 * true, method


@pytest.mark.parametrize("dt,s", SCALES)
def test_hutchinson_estimates_scale_with_the_operator(dt, s, key):
    M = _sym(dt)
    Mj, Ms = jnp.asarray(M), jnp.asarray((M.astype(np.float64) * s).astype(dt))
    for method in ("hutchinson", "hutch++"):
        one = curvlib.hutchinson_trace(lambda v: Mj @ v, jnp.zeros(N, dt), key, 9, method=method)
        big = curvlib.hutchinson_trace(lambda v: Ms @ v, jnp.zeros(N, dt), key, 9, method=method)
        assert bool(big.finite)
        # the same probes: estimate and standard error are those at scale one, times s
        np.testing.assert_allclose(float(big.estimate) / s, float(one.estimate), rtol=1e-3,
                                   atol=1e-3 * float(one.stderr))
        np.testing.assert_allclose(float(big.stderr) / s, float(one.stderr), rtol=1e-3)
        assert float(one.stderr) > 0
    one = curvlib.hutchinson_diag(lambda v: Mj @ v, jnp.zeros(N, dt), key, 6)
    big = curvlib.hutchinson_diag(lambda v: Ms @ v, jnp.zeros(N, dt), key, 6)
    assert bool(big.finite)
    e1, s1 = np.asarray(one.estimate, np.float64), np.asarray(one.stderr, np.float64)
    np.testing.assert_allclose(np.asarray(big.estimate, np.float64) / s, e1, rtol=1e-3,
                               atol=1e-3 * np.max(s1))
    np.testing.assert_allclose(np.asarray(big.stderr, np.float64) / s, s1, rtol=1e-3,
                               atol=1e-4 * np.max(s1))


@pytest.mark.parametrize("dt,s", SCALES)
def test_spectral_density_nodes_span_the_spectrum_at_every_scale(dt, s, key):
    d = np.linspace(0.1, 1.0, N) * s
    dj = jnp.asarray(d.astype(dt))
    r = curvlib.spectral_density(lambda v: dj * v, jnp.zeros(N, dt), key, num_matvecs=12,
                                 num_probes=2, num_points=64)
    assert bool(r.finite)
    nodes = np.asarray(r.nodes, np.float64)
    w = np.asarray(r.weights, np.float64)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-4)
    # Gauss nodes of 12 steps on [0.1 s, s]: extremes within 1% of the spectrum's ends,
    # all inside it (a spurious breakdown leaves zero nodes carrying weight)
    np.testing.assert_allclose(nodes.max(axis=1), s, rtol=1e-2)
    np.testing.assert_allclose(nodes.min(axis=1), 0.1 * s, rtol=1e-1)
    assert np.all(nodes[w > 1e-6] >= 0.1 * s * (1 - 1e-3))


@pytest.mark.parametrize("dt,s", [pytest.param(np.float32, s, id=f"f32-{s:.0e}")
                                  for s in (1e-30, 1e-20, 1.0, 1e20, 1e30)]
                         + [pytest.param(np.float64, s, id=f"f64-{s:.0e}")
                            for s in (1e-300, 1.0, 1e300)])
def test_newton_cg_gradient_fallback_at_every_gradient_scale(dt, s):
    # negative curvature at CG's first step: the step falls back to the gradient scaled by
    # its absolute Rayleigh quotient, g / (|u^T C u| + damping) with u = g / ||g||
    from curvlib.optim.hessian_free import _solve

    c = np.array([-2.0, 1.0, 3.0])
    g = np.array([1.0, 0.5, 0.25]) * s
    cj, gj = jnp.asarray(c.astype(dt)), jnp.asarray(g.astype(dt))
    p, res, fell_back = _solve(lambda v: cj * v, gj, None, 0.5, 1e-6, 10)
    assert bool(fell_back)
    u = np.array([1.0, 0.5, 0.25]) / np.linalg.norm([1.0, 0.5, 0.25])
    expect = g / (abs(np.sum(c * u * u)) + 0.5)
    got = np.asarray(p, np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expect, rtol=1e-5 if dt == np.float32 else 1e-12)


def test_newton_cg_falls_back_when_cg_leaves_its_warm_start_unimproved():
    """Negative curvature on CG's first direction from a warm start (the previous step's
    direction, decayed): CG returns the warm start itself, a descent direction by a hair,
    which was taken as the step (on a saddle the steps shrank 0.03, 6e-5, 8e-8, ... while
    the gradient stayed, each reported accepted). The gradient fallback is taken instead."""
    from curvlib.optim.hessian_free import _solve

    c, g = jnp.asarray([-2.0, 1.0, 3.0]), jnp.asarray([1.0, 0.5, 0.25])
    p, res, fell_back = _solve(lambda v: c * v, g, 1e-6 * g, 0.5, 1e-6, 10)
    assert bool(res.negative_curvature) and bool(fell_back)
    u = g / jnp.linalg.norm(g)
    np.testing.assert_allclose(p, g / (abs(float(jnp.sum(c * u * u))) + 0.5), rtol=1e-12)


@pytest.mark.parametrize("dt,top", [pytest.param(np.float32, 3e38, id="f32-3e38"),
                                    pytest.param(np.float64, 1.7e308, id="f64-1.7e308")])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_eigsh_and_power_near_the_largest_float(dt, top, jit):
    # the projected matrix's row sums overflowed from ||A|| ~ fmax / 2: it was zeroed, and
    # eigsh returned the eigenvalue 0 with the start vector, converged (both paths)
    d = jnp.asarray(np.array([top, 0.5 * top, 1.0, 0.5, 0.25, 0.1], dt))
    run = (lambda f: jax.jit(f)) if jit else (lambda f: f)
    r = run(lambda v0: curvlib.eigsh(lambda v: d * v, v0, k=2))(jnp.ones(6, dt))
    p = run(lambda v0: curvlib.power_iteration(lambda v: d * v, v0, k=1))(jnp.ones(6, dt))
    for res, want in ((r, [top, 0.5 * top]), (p, [top])):
        assert bool(res.converged) and bool(res.finite)
        np.testing.assert_allclose(np.asarray(res.eigenvalues, np.float64), want, rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.asarray(r.eigenvectors, np.float64)),
                               np.eye(6)[:2], atol=1e-5)


def test_float16_products_below_their_normal_range_are_not_certified():
    # a float16 operator of norm 2e-6: its products are float16 subnormals with a few bits;
    # Ritz values came out 6-10% above its largest eigenvalue, "converged"
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((30, 30)))[0]
    for s, certified in ((1e-6, False), (1.0, True)):
        A = jnp.asarray((Q * np.linspace(-2, 2, 30)) @ Q.T * s, jnp.float16)
        r = curvlib.eigsh(lambda v: A @ v, jnp.ones(30, jnp.float16), k=2)
        want = np.linalg.eigvalsh(np.asarray(A, np.float64))[::-1][:2]
        assert bool(r.finite) and bool(r.converged) == certified
        assert int(r.status) == (curvlib.Status.SUCCESS if certified else curvlib.Status.STALLED)
        if certified:
            np.testing.assert_allclose(np.asarray(r.eigenvalues, np.float64), want, rtol=0.05)


def test_power_iteration_below_the_normal_range_is_stalled_as_eigsh_is():
    """A float32 operator of norm 4e-36 (below tiny / eps = 1e-31): its own products are 6%
    off (subnormals flushed), the residual power iteration measures is rounding of zeros:
    it said SUCCESS with an eigenvalue 0.8% off at rtol 1e-4. Now STALLED, not converged;
    at norm 4 the same operator converges (numpy the oracle)."""
    rng = np.random.default_rng(15)
    n = 40
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    B = (Q * np.r_[[3.0, 3.0, -4.0], rng.uniform(-2, 2, n - 3)]) @ Q.T
    v0 = jnp.asarray(rng.standard_normal(n), jnp.float32)
    for scale, certified in ((1e-36, False), (1.0, True)):
        A = jnp.asarray((B + B.T) / 2 * scale, jnp.float32)
        p = curvlib.power_iteration(lambda v: A @ v, v0, k=1, num_iters=300)
        assert bool(p.finite) and bool(p.converged[0]) == certified
        assert int(p.status) == (curvlib.Status.SUCCESS if certified else curvlib.Status.STALLED)
        want = np.linalg.eigvalsh(np.asarray(A, np.float64))[0]  # -4 scale: largest in modulus
        np.testing.assert_allclose(float(p.eigenvalues[0]), want, rtol=1e-3 if certified else 0.05)


def test_the_lanczos_family_below_the_normal_range_is_stalled_never_non_finite():
    """A float32 operator of norm 3e-37 (below tiny / eps): eager eigsh's NumPy steps kept a
    subnormal remainder XLA flushes, and its reciprocal overflowed: NaN eigenvalues and
    NONFINITE with every product finite. Compiled, lanczos returned a "tridiagonal" with
    alphas to -1e-36 and negative betas, and it and spectral_density said SUCCESS. Each is
    now finite and STALLED; the zero operator and the operator at norm 3 are unchanged."""
    n = 20
    Q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((n, n)))
    B = (Q * np.linspace(1.0, 3.0, n)) @ Q.T
    v0 = jnp.asarray(np.random.default_rng(4).standard_normal(n), jnp.float32)
    key = jax.random.PRNGKey(0)
    S = curvlib.Status
    for scale, want in ((1e-37, S.STALLED), (0.0, S.SUCCESS), (1.0, S.SUCCESS)):
        A = jnp.asarray(B * scale, jnp.float32)
        runs = {
            "eigsh": curvlib.eigsh(lambda v: A @ v, v0, k=2),
            "eigsh_jit": jax.jit(lambda v, A: curvlib.eigsh(lambda u: A @ u, v, k=2))(v0, A),
            "lanczos": curvlib.lanczos(lambda v: A @ v, v0, 10),
            "lanczos_jit": jax.jit(lambda v, A: curvlib.lanczos(lambda u: A @ u, v, 10))(v0, A),
            "spectral_density": curvlib.spectral_density(lambda v: A @ v, v0, num_matvecs=10,
                                                         num_probes=2, key=key),
        }
        for name, r in runs.items():
            if name.startswith("eigsh") and scale == 0.0:
                continue  # eigsh: the zero operator is STALLED (nothing certifies a zero)
            assert bool(r.finite), (scale, name)
            assert int(r.status) == want, (scale, name, int(r.status))
            assert bool(jnp.all(r.converged)) == (want == S.SUCCESS), (scale, name)
        if scale == 1.0:
            top = np.linalg.eigvalsh(np.asarray(A, np.float64))[::-1][:2]
            np.testing.assert_allclose(np.asarray(runs["eigsh"].eigenvalues), top, rtol=1e-4)
        assert np.all(np.isfinite(np.asarray(runs["eigsh"].eigenvalues)))


@pytest.mark.parametrize("s", [1e33, 1e36], ids=["f32-A1e33", "f32-A1e36"])
def test_cg_compiled_as_eager_when_the_step_length_is_below_the_normal_range(s):
    # ||A|| / ||b|| = s: the step length (rz / pn) / (d^T A d) fell below float32's normal
    # range near convergence; XLA flushed it to zero (the compiled solve stagnated, then at
    # 1e36 took a positive diagonal for negative curvature) where NumPy kept it
    a = np.linspace(0.5, 10.0, 20) * s
    aj, b = jnp.asarray(a.astype(np.float32)), jnp.ones(20, jnp.float32)
    eager = curvlib.cg(lambda v: aj * v, b)
    jitted = jax.jit(lambda b: curvlib.cg(lambda v: aj * v, b))(b)
    for r in (eager, jitted):
        assert int(r.status) == curvlib.Status.SUCCESS and int(r.num_steps) <= 25
        x = np.asarray(r.x, np.float64)
        assert _norm(x - 1.0 / a) <= 1e-4 * _norm(1.0 / a)
        assert _close(r.residual_norm, _norm(1.0 - a * x), np.float32, 1.0)


@pytest.mark.parametrize("antithetic", [True, False])
def test_monte_carlo_estimates_of_large_finite_draws_are_finite(key, antithetic):
    """Draws of ``q^2`` near 1e33 in float32 (representable) gave a NaN estimate with
    ``finite=False``: the standard deviation squared them again. With ``a = 0, c = 0`` the
    draws are ``(sigma^2 z^T B z / 2)^2``: the estimate and its standard error scale as
    ``sigma^4`` exactly, the same draws at every ``sigma``."""
    from curvlib import landscape

    a, c = jnp.float32(0.0), jnp.zeros(2, jnp.float32)
    B = jnp.asarray([[1.0, 0.3], [0.3, 0.5]], jnp.float32)
    kw = dict(key=key, num_samples=64, antithetic=antithetic)
    unit = landscape.delta2_quadratic_mc(a, c, B, 1.0, **kw)
    for s in (1e4, 1e8):
        est = landscape.delta2_quadratic_mc(a, c, B, s, **kw)
        assert bool(est.finite), s
        np.testing.assert_allclose(float(est.estimate) / s**4, float(unit.estimate), rtol=1e-5)
        np.testing.assert_allclose(float(est.stderr) / s**4, float(unit.stderr), rtol=1e-5)

    # the direct estimator: a quadratic loss whose (k+1)-th sample moves the minimum
    X = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], jnp.float32)
    loss = lambda w, x: 0.5 * jnp.sum(x * w) ** 2 + 0.25 * jnp.sum(w * w)  # noqa: E731
    w, U = jnp.zeros(2, jnp.float32), jnp.eye(2, dtype=jnp.float32)
    direct = lambda s: landscape.delta2_direct_mc(  # noqa: E731
        loss, w, X, 2, U, s, key=key, num_samples=64, antithetic=antithetic)
    unit = direct(1.0)
    est = direct(1e8)
    assert bool(est.finite)
    np.testing.assert_allclose(float(est.estimate) / 1e32, float(unit.estimate), rtol=1e-4)
    np.testing.assert_allclose(float(est.stderr) / 1e32, float(unit.stderr), rtol=1e-4)
