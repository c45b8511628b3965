"""Mixed precision: half-precision storage, float32 accumulation, float64 references.

Parameters and activations in ``bfloat16`` (or ``float32``); every inner
product, norm, basis projection and the Lanczos tridiagonal accumulate in at
least ``float32`` (``curvlib._tree.acc_dtype``), while vectors and the Krylov
basis stay in the parameters' dtype -- the basis is *stored* in lower precision
than the inner products accumulate in. Each result is compared with the same
computation in float64, with tolerances ``c * eps(dtype)`` relative to the
operator's scale (``eps = 2^-7`` for bfloat16, ``2^-23`` for float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib
from curvlib import _tree

DTYPES = [jnp.bfloat16, jnp.float32]


def eps(dt) -> float:
    return float(jnp.finfo(dt).eps)


def _cast(tree, dt):
    return jax.tree.map(lambda a: a.astype(dt), tree)


def _problem():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {
        "w1": jax.random.normal(k[0], (16, 32), jnp.float64) / 4,
        "w2": jax.random.normal(k[1], (32, 4), jnp.float64) / 6,
    }
    x = jax.random.normal(k[2], (64, 16), jnp.float64)
    y = jax.random.normal(k[3], (64, 4), jnp.float64)
    return params, x, y


def _model(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _out_loss(o, y):
    return 0.5 * jnp.mean(jnp.sum((o - y) ** 2, -1))


def _loss(p, x, y):
    return _out_loss(_model(p, x), y)


def _rel(a, b):
    a64, b64 = _cast(a, jnp.float64), _cast(b, jnp.float64)
    return float(_tree.norm(_tree.sub(a64, b64)) / _tree.norm(b64))


@pytest.fixture(scope="module")
def reference():
    params, x, y = _problem()
    mv = curvlib.hessian_matvec(_loss, params, x, y)
    v = jax.tree.map(jnp.ones_like, params)
    e = curvlib.eigsh(mv, v, 3, basis_size=20)
    gv = curvlib.ggn_matvec(_model, _out_loss, params, x, loss_args=(y,))
    c = curvlib.cg(gv, v, damping=0.5, rtol=1e-12)
    return {"hv": mv(v), "eig": e.eigenvalues, "cg": c.x, "matvec": mv}


def _half(dt):
    params, x, y = _problem()
    return _cast(params, dt), x.astype(dt), y.astype(dt)


def test_half_precision_inner_products_accumulate_in_float32():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0.5, 1.5, 200_000), jnp.bfloat16)
    exact = float(np.dot(np.asarray(a, np.float64), np.asarray(a, np.float64)))
    got = _tree.vdot({"a": a}, {"a": a})
    assert got.dtype == jnp.float32
    assert abs(float(got) - exact) / exact < 10 * eps(jnp.float32)
    # the naive bfloat16 reduction is far off: the test would notice a regression
    naive = float(jnp.vdot(a, a))
    assert abs(naive - exact) / exact > 100 * eps(jnp.float32)
    assert _tree.acc_dtype(a) == jnp.float32
    assert _tree.acc_dtype(jnp.zeros(2, jnp.float64)) == jnp.float64


@pytest.mark.parametrize("dt", DTYPES)
def test_products_in_half_precision_match_float64(dt, reference):
    params, x, y = _half(dt)
    v = jax.tree.map(jnp.ones_like, params)
    hv = curvlib.hessian_matvec(_loss, params, x, y)(v)
    assert all(l.dtype == dt for l in jax.tree.leaves(hv))
    # a forward + backward + tangent pass in dt: a few roundings per layer
    assert _rel(hv, reference["hv"]) < 4 * eps(dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_lanczos_stores_basis_in_dt_and_accumulates_tridiagonal_in_float32(dt):
    params, x, y = _half(dt)
    mv = curvlib.hessian_matvec(_loss, params, x, y)
    v = jax.tree.map(jnp.ones_like, params)
    m = 10
    l = curvlib.lanczos(mv, v, m)
    assert all(q.dtype == dt for q in jax.tree.leaves(l.basis))
    assert l.alphas.dtype == jnp.float32 and l.betas.dtype == jnp.float32
    Q = np.concatenate(
        [np.asarray(l.basis[k], np.float64).reshape(m, -1) for k in sorted(l.basis)], axis=1
    )
    # orthonormal to the storage precision (rows rounded to dt after orthogonalisation)
    assert np.max(np.abs(Q @ Q.T - np.eye(m))) < 2 * eps(dt)


@pytest.mark.parametrize("dt", DTYPES)
def test_eigsh_in_half_precision_matches_float64(dt, reference):
    params, x, y = _half(dt)
    mv = curvlib.hessian_matvec(_loss, params, x, y)
    v = jax.tree.map(jnp.ones_like, params)
    e = curvlib.eigsh(mv, v, 3, basis_size=20, max_restarts=50)
    assert bool(e.finite)
    assert e.eigenvalues.dtype == jnp.float32
    assert all(q.dtype == dt for q in jax.tree.leaves(e.eigenvectors))
    lam = np.asarray(reference["eig"])
    err = np.max(np.abs(np.asarray(e.eigenvalues, np.float64) - lam)) / abs(lam[0])
    # Weyl: |dlambda| <= ||E|| for the rounding E of the projected matrix: its entries are
    # inner products of length N accumulated in float32 (~ sqrt(N) eps ||A|| each), plus the
    # default residual tolerance sqrt(eps) (an O(res^2 / gap) error, far smaller here)
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert err < np.sqrt(n) * max(eps(dt), eps(jnp.float32))


@pytest.mark.parametrize("dt", DTYPES)
def test_cg_in_half_precision_matches_float64(dt, reference):
    params, x, y = _half(dt)
    gv = curvlib.ggn_matvec(_model, _out_loss, params, x, loss_args=(y,))
    v = jax.tree.map(jnp.ones_like, params)
    rtol = max(4 * eps(dt), 1e-5)
    c = curvlib.cg(gv, v, damping=0.5, rtol=rtol, max_steps=200)
    assert bool(c.finite)
    assert c.residual_norm.dtype == jnp.float32
    assert all(q.dtype == dt for q in jax.tree.leaves(c.x))
    # the damped GGN here has condition number ~10: error ~ cond * max(eps(dt), rtol)
    assert _rel(c.x, reference["cg"]) < max(20 * eps(dt), 10 * rtol)


@pytest.mark.parametrize("dt", DTYPES)
def test_trace_estimate_in_half_precision_matches_float64(dt, reference):
    params, x, y = _half(dt)
    mv = curvlib.hessian_matvec(_loss, params, x, y)
    key = jax.random.PRNGKey(1)
    t = curvlib.hutchinson_trace(mv, params, key, 30)
    t64 = curvlib.hutchinson_trace(reference["matvec"], _problem()[0], key, 30)
    assert t.estimate.dtype == jnp.float32
    assert abs(float(t.estimate) - float(t64.estimate)) / abs(float(t64.estimate)) < 4 * eps(dt)


def test_bfloat16_basis_for_a_float32_model(reference):
    """A float32 model with the Krylov basis stored in bfloat16 (half the basis memory).

    Pass a bfloat16 start vector and a matvec that computes in float32 and rounds its
    output: the basis, eigenvectors and all Lanczos vectors are bfloat16, the
    tridiagonal and every inner product float32, the products themselves float32.
    """
    params, x, y = _half(jnp.float32)
    mv32 = curvlib.hessian_matvec(_loss, params, x, y)
    mv = lambda v: _cast(mv32(_cast(v, jnp.float32)), jnp.bfloat16)
    v0 = _cast(jax.tree.map(jnp.ones_like, params), jnp.bfloat16)
    l = curvlib.lanczos(mv, v0, 10)
    assert all(q.dtype == jnp.bfloat16 for q in jax.tree.leaves(l.basis))
    assert l.alphas.dtype == jnp.float32
    e = curvlib.eigsh(mv, v0, 3, basis_size=20, max_restarts=50)
    assert e.eigenvalues.dtype == jnp.float32
    assert all(q.dtype == jnp.bfloat16 for q in jax.tree.leaves(e.eigenvectors))
    lam = np.asarray(reference["eig"])
    err = np.max(np.abs(np.asarray(e.eigenvalues, np.float64) - lam)) / abs(lam[0])
    assert err < 4 * eps(jnp.bfloat16)


@pytest.mark.parametrize(
    "param_dtype,basis_dtype,rtol",
    [(jnp.float64, jnp.float32, 1e-6), (jnp.float32, jnp.bfloat16, 3e-2)],
)
def test_lower_precision_basis_storage(param_dtype, basis_dtype, rtol):
    """``basis_dtype``: the basis is stored narrower, inner products stay wide.

    Oracle: numpy eigh in float64. The stored basis has the narrow dtype (the
    memory saving is real), the eigenvectors come back in the parameters' dtype,
    and the eigenvalues are as accurate as the basis precision allows.
    """
    from curvlib import eigsh, lanczos

    rng = np.random.default_rng(7)
    ev = np.concatenate([[9.0, 7.0, 6.0, 5.5], rng.uniform(-1.0, 3.0, 196)])
    Qm = np.linalg.qr(rng.standard_normal((200, 200)))[0]
    A = (Qm * ev) @ Qm.T
    Aj = jnp.asarray(A, param_dtype)
    op = lambda v: {"w": (Aj @ v["w"].reshape(-1)).reshape(v["w"].shape)}
    v0 = {"w": jnp.asarray(rng.standard_normal((20, 10)), param_dtype)}
    lz = lanczos(op, v0, 30, basis_dtype=basis_dtype)
    assert lz.basis["w"].dtype == basis_dtype and lz.basis["w"].shape == (30, 20, 10)
    res = eigsh(op, v0, 3, basis_dtype=basis_dtype)
    assert res.eigenvectors["w"].dtype == param_dtype
    assert bool(res.converged) and bool(res.finite)
    np.testing.assert_allclose(np.asarray(res.eigenvalues, np.float64), [9.0, 7.0, 6.0],
                               rtol=rtol)
    X = np.asarray(res.eigenvectors["w"], np.float64).reshape(3, -1)
    R = X @ A - np.asarray(res.eigenvalues, np.float64)[:, None] * X
    # explicit residuals against the float64 operator, at the basis precision
    assert np.max(np.linalg.norm(R, axis=1) / 9.0) <= 10 * np.sqrt(
        float(jnp.finfo(basis_dtype).eps))
    with pytest.raises(ValueError, match="basis_dtype"):
        eigsh(op, v0, 3, basis_dtype=jnp.int32)


@pytest.mark.parametrize("seed", [27, 30, 34])
def test_a_bfloat16_basis_keeps_ritz_values_inside_the_spectrum(seed):
    """Few distinct eigenvalues (two to four, n = 20-25, the basis spans the space) with a
    bfloat16 basis under ``jit``. A remainder far below ``||A q||`` is mostly the stored
    rows' rounding (their orthogonality is bfloat16's); normalised, it made a row nearly
    dependent on the others, and eigsh certified 8.43 for an operator whose largest
    eigenvalue is 3.86 (seed 27). Such a remainder is a breakdown now: every certified pair
    is within the basis precision of the dense answer (numpy eigh in float64)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 70))
    vals = rng.standard_normal(int(rng.integers(2, 5))) * 4
    ev = vals[rng.integers(0, len(vals), n)]
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * ev) @ Q.T
    v0 = rng.standard_normal(n)
    k = int(rng.integers(1, min(9, n - 1)))
    which = ["LA", "SA", "LM"][int(rng.integers(0, 3))]
    mv = jax.tree_util.Partial(lambda A, v: A @ v, jnp.asarray(A, jnp.float32))
    res = jax.jit(lambda v: curvlib.eigsh(mv, v, k, which=which, basis_dtype=jnp.bfloat16))(
        jnp.asarray(v0, jnp.float32))
    assert bool(res.converged), curvlib.status_message(res.status)
    key = {"LA": -ev, "SA": ev, "LM": -np.abs(ev)}[which]
    want = np.sort(ev[np.argsort(key, kind="stable")[:k]])
    got = np.sort(np.asarray(res.eigenvalues, np.float64))
    scale = np.max(np.abs(ev))
    np.testing.assert_allclose(got, want, atol=0.05 * scale)
    X = np.asarray(res.eigenvectors, np.float64)
    theta = np.asarray(res.eigenvalues, np.float64)
    rel = np.linalg.norm(X @ A - theta[:, None] * X, axis=1) / scale
    assert np.max(rel) <= np.sqrt(float(jnp.finfo(jnp.bfloat16).eps))


def test_float32_basis_lowers_compiled_memory_of_a_float64_eigsh():
    """The storage saving survives compilation: XLA's memory analysis of eigsh on a
    float64 operator shows smaller temporaries with ``basis_dtype=float32`` by at
    least a third of the float64 basis (no widened copy of the basis per step)."""
    n, m = 200_000, 30
    d = jnp.linspace(0.0, 1.0, n, dtype=jnp.float64)
    op = lambda v: d * v
    v0 = jnp.ones(n, jnp.float64)

    def temp_bytes(bdt):
        f = jax.jit(lambda v: curvlib.eigsh(op, v, 3, basis_size=m, basis_dtype=bdt))
        ma = f.lower(v0).compile().memory_analysis()
        if ma is None:
            pytest.skip("this backend reports no memory analysis")
        return ma.temp_size_in_bytes

    wide, narrow = temp_bytes(None), temp_bytes(jnp.float32)
    assert narrow < wide - (m * n * 8) / 3, (wide, narrow)


def test_a_basis_wider_than_the_vectors_runs():
    """A float32 operator with a float64 basis (``basis_dtype`` accepts it): the fresh
    direction's orthogonalisation promoted it to float64 inside a ``lax.cond`` whose other
    branch kept float32, and ``lanczos``/``eigsh`` raised JAX's "cond branches" error."""
    d = jnp.arange(1.0, 31.0, dtype=jnp.float32)
    v0 = jnp.ones(30, jnp.float32)
    for run in (lambda f: f(), lambda f: jax.jit(f)()):
        res = run(lambda: curvlib.eigsh(lambda v: d * v, v0, 2, basis_dtype=jnp.float64))
        np.testing.assert_allclose(np.asarray(res.eigenvalues), [30.0, 29.0], rtol=1e-5)
        assert bool(res.converged)
        lz = run(lambda: curvlib.lanczos(lambda v: d * v, v0, 10, basis_dtype=jnp.float64))
        assert bool(lz.finite) and np.all(np.isfinite(np.asarray(lz.alphas)))


@pytest.mark.parametrize("scale", [1e3, 7e3])
def test_power_iteration_in_float16_past_its_range_finds_the_top_eigenvalue(scale):
    """float16 vectors whose products have norm ``||A x||`` past float16's largest number
    (65504) while every entry is finite: the top eigenvalue (7e4), not 0 reported converged
    with a residual of 0 (the norm cast down to float16 was inf, the iterate zero)."""
    n = 60
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[10.0, 5.0, 4.0], np.linspace(-1.0, 3.0, n - 3)]) * scale
    A = jnp.asarray((Q * lam) @ Q.T, jnp.float16)
    dense = np.asarray(A.astype(jnp.float32), np.float64)
    top = np.linalg.eigvalsh((dense + dense.T) / 2)[-1]
    res = curvlib.power_iteration(lambda v: A @ v, jnp.ones(n, jnp.float16),
                                  key=jax.random.PRNGKey(0))
    assert bool(res.finite)
    np.testing.assert_allclose(float(res.eigenvalues[0]), top, rtol=1e-3)


def test_eigsh_certifies_no_more_than_its_products_precision():
    """A float32 operator given a float64 ``v0`` (x64 on, a float32 model): the default
    tolerance is float32's ``sqrt(eps)``, and every certified pair's true residual, in
    float64 against the operator's own float32 matrix, is within it (the tolerance came
    from ``v0`` alone, float64's, and the true residuals were 10x past it)."""
    n = 80
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A32 = jnp.asarray((Q * np.linspace(-1.0, 4.0, n)) @ Q.T, jnp.float32)
    A = np.asarray(A32, np.float64)
    mv = lambda v: A32 @ v.astype(jnp.float32)
    v0 = jnp.asarray(rng.standard_normal(n), jnp.float64)
    res = curvlib.eigsh(mv, v0, 4, key=jax.random.PRNGKey(0))
    assert bool(res.converged)
    rtol = float(np.sqrt(np.finfo(np.float32).eps))
    same = curvlib.eigsh(mv, v0, 4, key=jax.random.PRNGKey(0), rtol=rtol)  # the default's
    assert int(same.num_matvecs) == int(res.num_matvecs)
    np.testing.assert_array_equal(np.asarray(same.eigenvalues), np.asarray(res.eigenvalues))
    X, theta = np.asarray(res.eigenvectors), np.asarray(res.eigenvalues)
    true = np.linalg.norm(X @ A - theta[:, None] * X, axis=1)
    assert np.all(true <= rtol * np.abs(theta)), (true, rtol * np.abs(theta))


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16])
def test_direct_and_quadratic_mc_share_their_draws_at_every_parameter_dtype(dt):
    """The same key gives the direct and the quadratic estimator the same draws (their
    difference is the quadratic model's own error, zero for a quadratic loss up to the
    parameters' rounding). With bfloat16 parameters the direct estimator drew in bfloat16,
    the quadratic one in its float32 coefficients: 12.02 against 32.70."""
    from curvlib import landscape

    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    Y = jnp.asarray(rng.normal(size=8), jnp.float32)
    loss = lambda p, b: 0.5 * jnp.mean((b[0] @ p.astype(jnp.float32) - b[1]) ** 2)  # noqa: E731
    w = jnp.asarray([0.5, -0.25, 1.0, 0.125], dt)  # exact in bfloat16
    U = jnp.eye(4, dtype=dt)[:2]
    key, kw = jax.random.PRNGKey(1), dict(num_samples=64, antithetic=False)
    coef = landscape.increment_coefficients(loss, w, (X, Y), 4, U)
    direct = landscape.delta2_direct_mc(loss, w, (X, Y), 4, U, 4.0, key=key, **kw)
    quad = landscape.delta2_quadratic_mc(*coef, 4.0, key=key, **kw)
    assert float(quad.stderr) > 0.3 * float(quad.estimate)  # unpaired draws would differ a lot
    np.testing.assert_allclose(float(direct.estimate), float(quad.estimate),
                               rtol=1e-5 if dt == jnp.float32 else 1e-2)


def test_the_mean_loss_check_tolerance_is_the_losss_dtype():
    """bfloat16 parameters under a float32 loss: the tolerance was 10 sqrt(eps) of the
    parameters' dtype (0.88), and a summed loss passed as a mean; it is the loss's (3.5e-3),
    as documented. A mean loss still passes."""
    from curvlib import landscape

    X = jnp.asarray([[3.0, 0.0], [0.3, 0.1], [0.1, 0.2], [0.5, 0.5]], jnp.float32)
    w = jnp.asarray([1.0, 1.0], jnp.bfloat16)
    summed = lambda p, x: jnp.sum((x @ p.astype(jnp.float32)) ** 2)  # noqa: E731
    mean = lambda p, x: jnp.mean((x @ p.astype(jnp.float32)) ** 2)  # noqa: E731
    with pytest.raises(ValueError, match="does not behave as a mean"):
        landscape.check_mean_loss(summed, w, X, 2)
    landscape.check_mean_loss(mean, w, X, 2)
