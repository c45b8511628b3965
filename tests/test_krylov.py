"""Layer 2 against dense oracles: ``numpy.linalg.eigh`` / ``solve`` and exact identities.

Every operator is a dense symmetric matrix with a *designed* spectrum, applied
to pytrees that mix a dict, a vector and a matrix leaf (``ravel_pytree`` in the
test only). Jitted entry points take the matrix as an argument so that one
compilation serves every spectrum of a given size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvlib
from curvlib import (
    cg,
    eigsh,
    hutchinson_diag,
    hutchinson_trace,
    lanczos,
    power_iteration,
    spectral_density,
)

EPS64 = np.finfo(np.float64).eps


def _like(n, dtype=jnp.float64):
    """A pytree of total size ``n``: a dict holding a vector and a matrix."""
    r = 4 if n % 4 == 0 else 1
    b = min(n // 2 // r, 20) * r
    return {"a": jnp.zeros(n - b, dtype), "b": jnp.zeros((r, b // r), dtype)}


def _tree_op(A, like):
    unravel = ravel_pytree(like)[1]
    return lambda v: unravel(A @ ravel_pytree(v)[0])


def _rows(basis):
    """A basis pytree with leading axis ``m`` as an ``(m, n)`` numpy array."""
    return np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(basis))


@functools.lru_cache(maxsize=8)
def _orthogonal(n, seed):
    """A Haar-random orthogonal matrix (cached: the big ones are shared by several spectra)."""
    Q, R = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def _sym(evals, seed):
    """``U diag(evals) U^T`` with a Haar-random orthogonal ``U``."""
    Q = _orthogonal(len(evals), seed)
    A = (Q * evals) @ Q.T
    return (A + A.T) / 2


def _like_rows(M, like=None):
    """Rows of an ``(d, n)`` array as a basis pytree shaped like ``_like(n)``."""
    unravel = ravel_pytree(like if like is not None else _like(M.shape[1]))[1]
    return jax.vmap(unravel)(jnp.asarray(M))


def _start(like, seed):
    flat, unravel = ravel_pytree(like)
    v = np.random.default_rng(seed).standard_normal(flat.shape[0])
    return unravel(jnp.asarray(v, flat.dtype))


# ------------------------------------------------------------ designed spectra

N_BIG = 1000


def _spectra():
    n = N_BIG
    rng = np.random.default_rng(1)
    decaying = 0.85 ** np.arange(n)
    clustered = np.concatenate([
        10.0 - 1e-3 * np.arange(5),  # a tight cluster
        5.0 - 1e-3 * np.arange(5),  # and another
        rng.uniform(0.0, 1.0, n - 10),
    ])
    indefinite = np.concatenate([
        -10.0 * np.arange(10, 0, -1),  # dominant negatives -100 .. -10
        19.5 - np.arange(10.0),  # top positives 19.5 .. 10.5
        rng.uniform(-1.0, 1.0, n - 20),
    ])
    return {"decaying": decaying, "clustered": clustered, "indefinite": indefinite}


@pytest.fixture(scope="module")
def big_operators():
    out = {}
    for name, ev in _spectra().items():
        A = _sym(ev, seed=0)
        out[name] = (jnp.asarray(A), np.linalg.eigvalsh(A))  # oracle: dense LAPACK eigh
    return out


@functools.partial(jax.jit, static_argnames=("k", "which"))
def _eigsh_dense(A, v0, k, which):
    return eigsh(_tree_op(A, v0), v0, k, which=which)


def _wanted(evals, k, which):
    if which == "LA":
        return np.sort(evals)[::-1][:k]
    if which == "SA":
        return np.sort(evals)[:k]
    return evals[np.argsort(-np.abs(evals), kind="stable")][:k]


@pytest.mark.parametrize(
    "name,which",
    [("decaying", "LA"), ("clustered", "LA"), ("indefinite", "LA"), ("indefinite", "SA"),
     ("indefinite", "LM")],
)
def test_eigsh_designed_spectra_match_eigh(big_operators, name, which):
    A, evals = big_operators[name]
    k = 10
    v0 = _start(_like(N_BIG), seed=3)
    res = _eigsh_dense(A, v0, k, which)
    want = _wanted(evals, k, which)
    got = np.asarray(res.eigenvalues)
    assert bool(res.converged) and bool(res.finite)
    assert np.max(np.abs(got - want) / np.abs(want)) <= 1e-8
    # explicit residuals, against the operator itself, within tol * scale
    X = _rows(res.eigenvectors)
    R = X @ np.asarray(A) - got[:, None] * X
    explicit = np.linalg.norm(R, axis=1)
    tol = np.sqrt(EPS64)
    scale = np.maximum(np.abs(got), np.max(np.abs(evals)) * EPS64 ** (2 / 3))
    assert np.all(explicit <= tol * scale * 1.01 + 1e3 * EPS64 * np.max(np.abs(evals)))
    # the reported residuals are the true ones
    assert np.allclose(np.asarray(res.residual_norms), explicit,
                       atol=1e3 * EPS64 * np.max(np.abs(evals)))
    assert np.max(np.abs(X @ X.T - np.eye(k))) <= 1e-10
    assert jax.tree.structure(res.eigenvectors) == jax.tree.structure(v0)
    # the memory bound: restarts happened only as needed, products were counted
    assert int(res.num_matvecs) >= 20
    if which == "LA" and name == "indefinite":
        assert np.all(got > 0)  # the dominant negatives never displace the top positives


def test_eigsh_float32_pytree():
    ev = np.concatenate([np.array([8.0, 6.0, 4.0, 3.0, 2.5]), np.linspace(-1.0, 1.0, 195)])
    A = _sym(ev, seed=5)
    like = _like(200, jnp.float32)
    res = _eigsh_dense(jnp.asarray(A, jnp.float32), _start(like, 0), 3, "LA")
    assert res.eigenvalues.dtype == jnp.float32
    assert bool(res.converged)
    assert np.allclose(np.asarray(res.eigenvalues), [8.0, 6.0, 4.0], rtol=1e-4)
    X = _rows(res.eigenvectors).astype(np.float64)
    assert np.max(np.abs(X @ X.T - np.eye(3))) <= 1e-5


def test_eigsh_half_precision_leaves():
    """bfloat16 leaves (alone or mixed with float32): default tol from the least precise leaf."""
    ev = np.concatenate([[5.0, 4.0], np.linspace(-1.0, 1.0, 38)])
    A = jnp.asarray(_sym(ev, seed=8), jnp.float32)

    def op(v):
        x = jnp.concatenate([v["a"].astype(jnp.float32), v["b"].astype(jnp.float32)])
        y = A @ x
        return {"a": y[:30].astype(v["a"].dtype), "b": y[30:].astype(v["b"].dtype)}

    rng = np.random.default_rng(0)
    for db in (jnp.bfloat16, jnp.float32):
        v0 = {"a": jnp.asarray(rng.standard_normal(30), jnp.bfloat16),
              "b": jnp.asarray(rng.standard_normal(10), db)}
        res = eigsh(op, v0, 2)
        assert bool(res.converged) and res.eigenvectors["a"].dtype == jnp.bfloat16
        assert np.allclose(np.asarray(res.eigenvalues, np.float64), [5.0, 4.0], rtol=2e-2)


def test_eigsh_tiny_norm_operator_float32():
    """A Hessian with entries ~1e-6 in float32 must not be mistaken for a breakdown."""
    ev = 1e-6 * np.concatenate([[2.0, 1.9, 1.8], np.linspace(0.0, 1.0, 57)])
    A = jnp.asarray(_sym(ev, seed=6), jnp.float32)
    res = _eigsh_dense(A, _start(_like(60, jnp.float32), 1), 3, "LA")
    assert bool(res.converged)
    assert np.allclose(np.asarray(res.eigenvalues), 1e-6 * np.array([2.0, 1.9, 1.8]), rtol=1e-4)


def test_eigsh_exhaustive_and_zero_start():
    """``basis_size == dim`` is one exact Lanczos pass (nothing to verify); a zero ``v0`` works."""
    ev = np.arange(1.0, 13.0)
    A = jnp.asarray(_sym(ev, seed=7))
    res = eigsh(_tree_op(A, jnp.zeros(12)), jnp.zeros(12), 4, which="SA", basis_size=12)
    assert np.allclose(np.asarray(res.eigenvalues), [1, 2, 3, 4], rtol=1e-10)
    assert bool(res.converged) and int(res.num_restarts) == 0


# ------------------------------------------------------------------ Lanczos


@pytest.fixture(scope="module")
def lanczos_operator():
    # well separated extremes (fast Ritz convergence) over a bulk
    ev = np.concatenate([100.0 * 0.8 ** np.arange(12), np.linspace(-1.0, 1.0, 188)])
    return jnp.asarray(_sym(ev, seed=11))


@functools.partial(jax.jit, static_argnames=("m", "reortho"))
def _lanczos_dense(A, v0, m, reortho):
    return lanczos(_tree_op(A, v0), v0, m, reortho=reortho)


def _tridiag(res):
    a, b = np.asarray(res.alphas), np.asarray(res.betas)
    return np.diag(a) + np.diag(b, 1) + np.diag(b, -1)


def test_lanczos_relation_and_orthonormality(lanczos_operator):
    A = np.asarray(lanczos_operator)
    like = _like(200)
    m = 60
    res = _lanczos_dense(lanczos_operator, _start(like, 2), m, "full")
    Q = _rows(res.basis)
    assert Q.shape == (m, 200)
    assert np.max(np.abs(Q @ Q.T - np.eye(m))) <= 1e-12
    # A Q^T = Q^T T + r e_m^T
    r = np.asarray(ravel_pytree(res.residual)[0])
    E = A @ Q.T - Q.T @ _tridiag(res)
    E[:, -1] -= r
    assert np.max(np.abs(E)) <= 1e-12 * np.abs(A).max() * np.sqrt(200)
    assert np.isclose(float(res.residual_norm), np.linalg.norm(r))
    assert np.max(np.abs(Q @ r)) <= 1e-12 * max(np.linalg.norm(r), 1.0)
    assert res.num_matvecs == m and not bool(res.breakdown) and bool(res.finite)
    # the extreme Ritz value has converged to the top eigenvalue
    assert np.isclose(np.linalg.eigvalsh(_tridiag(res))[-1], 100.0, rtol=1e-12)


@pytest.mark.parametrize("p", [1, 3, 8, 9])
def test_basis_gram_of_long_rows(p):
    # up to 8 long rows go through one matrix-vector product each, more through one
    # matrix-matrix product: both are P Q^T
    from curvlib import _tree

    rng = np.random.default_rng(p)
    n = 1 << 15
    P = {"a": rng.standard_normal((p, n)), "b": rng.standard_normal((p, 3, 5))}
    Q = {"a": rng.standard_normal((7, n)), "b": rng.standard_normal((7, 3, 5))}
    want = P["a"] @ Q["a"].T + P["b"].reshape(p, -1) @ Q["b"].reshape(7, -1).T
    got = _tree.basis_gram(jax.tree.map(jnp.asarray, P), jax.tree.map(jnp.asarray, Q))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-10)


def test_lanczos_relation_on_long_vectors():
    # vectors of 2^16 entries take the Gram path of a few matrix-vector products (the one
    # XLA:CPU runs fast); the same relation and orthonormality as the dense test above
    n, m = 1 << 16, 24
    rng = np.random.default_rng(3)
    d = np.concatenate([[5.0, 4.0, 4.0], rng.uniform(-1.0, 1.0, n - 3)])
    v0 = {"a": jnp.asarray(rng.standard_normal(n // 2)),
          "b": jnp.asarray(rng.standard_normal((2, n // 4)))}
    dt = {"a": jnp.asarray(d[: n // 2]), "b": jnp.asarray(d[n // 2:].reshape(2, n // 4))}
    res = jax.jit(lambda v: lanczos(lambda x: jax.tree.map(jnp.multiply, dt, x), v, m))(v0)
    Q = _rows(res.basis)
    assert np.max(np.abs(Q @ Q.T - np.eye(m))) <= 1e-12
    r = np.asarray(ravel_pytree(res.residual)[0])
    E = d[:, None] * Q.T - Q.T @ _tridiag(res)
    E[:, -1] -= r
    assert np.max(np.abs(E)) <= 1e-12 * np.sqrt(n)
    assert np.max(np.abs(Q @ r)) <= 1e-12 * np.linalg.norm(r)
    # eigsh on the same vectors: a verification round drops its chain (the stored dropped
    # vectors' Gram with the basis takes the same path), and finds the second copy of 4
    out = jax.jit(lambda v: eigsh(lambda x: jax.tree.map(jnp.multiply, dt, x), v, 3,
                                  basis_size=12, key=jax.random.PRNGKey(1)))(v0)
    assert bool(out.converged) and int(out.num_verifications) >= 1
    np.testing.assert_allclose(np.asarray(out.eigenvalues), [5.0, 4.0, 4.0], atol=1e-8)
    X = _rows(out.eigenvectors)
    true = np.linalg.norm(d * X - np.asarray(out.eigenvalues)[:, None] * X, axis=1)
    np.testing.assert_allclose(np.asarray(out.residual_norms), true, rtol=1e-6, atol=1e-13)


def test_eigsh_then_multiplies_vectors_built_from_the_answer_in_the_same_loop(compiles):
    from curvlib.krylov import eigen

    rng = np.random.default_rng(5)
    n = 40
    Qm = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = (Qm * np.concatenate([[6.0, 5.0, 5.0], np.linspace(-2.0, 2.0, n - 3)])) @ Qm.T
    mv = lambda v: {"a": jnp.asarray(A) @ v["a"]}
    v0 = {"a": jnp.asarray(rng.standard_normal(n))}
    key = jax.random.PRNGKey(2)
    then = lambda r, n, c: {"a": r.eigenvectors["a"][:n] + c}  # depends on the answer
    res, rows, products = jax.jit(
        lambda v: eigen.eigsh_then(mv, v, 3, then, 2, 1.0, key=key, rtol=1e-10))(v0)
    ref = eigsh(mv, v0, 3, key=key, rtol=1e-10)
    np.testing.assert_array_equal(res.eigenvalues, ref.eigenvalues)
    assert int(res.num_matvecs) == int(ref.num_matvecs) and bool(res.converged)
    np.testing.assert_allclose(rows["a"], np.asarray(ref.eigenvectors["a"][:2]) + 1.0,
                               rtol=1e-12)
    np.testing.assert_allclose(products["a"], np.asarray(rows["a"]) @ A, rtol=1e-12)
    # eagerly: the same loop, compiled once for the operator, `then` and the options;
    # new data for `then` (and a new operator of the same program) compile nothing
    eager = eigen.eigsh_then(mv, v0, 3, then, 2, jnp.asarray(1.0), key=key, rtol=1e-10)
    np.testing.assert_allclose(eager[2]["a"], products["a"], rtol=1e-12)
    product = lambda B, v: {"a": B @ v["a"]}  # an operator as data: a Partial over B
    eigen.eigsh_then(jax.tree_util.Partial(product, jnp.asarray(A)), v0, 3, then, 2,
                     jnp.asarray(1.0), key=key, rtol=1e-10)
    B, c = jnp.asarray(2.0 * A), jnp.asarray(-1.0)
    with compiles() as seen:
        again = eigen.eigsh_then(jax.tree_util.Partial(product, B), v0, 3, then, 2, c, key=key,
                                 rtol=1e-10)
    assert seen.count == 0
    np.testing.assert_allclose(again[0].eigenvalues, 2 * np.asarray(ref.eigenvalues),
                               rtol=1e-9)
    np.testing.assert_allclose(again[2]["a"], (np.asarray(again[1]["a"])) @ (2 * A),
                               rtol=1e-10)


def test_lanczos_without_reorthogonalisation_loses_orthogonality(lanczos_operator):
    m = 60
    v0 = _start(_like(200), 2)
    plain = _lanczos_dense(lanczos_operator, v0, m, "none")
    Q = _rows(plain.basis)
    assert np.max(np.abs(Q @ Q.T - np.eye(m))) > 1e-2
    # ... and duplicates converged eigenvalues ("ghosts")
    theta = np.linalg.eigvalsh(_tridiag(plain))
    assert np.sum(np.abs(theta - 100.0) < 1e-6) >= 2
    full = _lanczos_dense(lanczos_operator, v0, m, "full")
    assert np.sum(np.abs(np.linalg.eigvalsh(_tridiag(full)) - 100.0) < 1e-6) == 1


def test_lanczos_invariant_subspace_breakdown():
    """Three distinct eigenvalues: the Krylov space is invariant after 3 steps."""
    ev = np.repeat([1.0, 2.0, 3.0], [10, 10, 12])
    A = jnp.asarray(_sym(ev, seed=12))
    like = {"x": jnp.zeros(16), "y": jnp.zeros((4, 4))}
    res = lanczos(_tree_op(A, like), _start(like, 4), 8)
    assert bool(res.breakdown) and bool(res.finite)
    Q = _rows(res.basis)
    assert np.max(np.abs(Q @ Q.T - np.eye(8))) <= 1e-12
    assert abs(float(res.betas[2])) <= 1e-12
    theta = np.linalg.eigvalsh(_tridiag(res))
    for lam in (1.0, 2.0, 3.0):
        assert np.min(np.abs(theta - lam)) <= 1e-12
    E = np.asarray(A) @ Q.T - Q.T @ _tridiag(res)
    E[:, -1] -= np.asarray(ravel_pytree(res.residual)[0])
    assert np.max(np.abs(E)) <= 1e-12


def test_lanczos_tiny_norm_float32_is_not_a_breakdown():
    ev = 1e-6 * np.linspace(1.0, 2.0, 40)
    A = jnp.asarray(_sym(ev, seed=13), jnp.float32)
    like = jnp.zeros(40, jnp.float32)
    res = lanczos(_tree_op(A, like), _start(like, 5), 10)
    assert not bool(res.breakdown)
    assert np.all(np.asarray(res.betas) > 1e-9)
    Q = _rows(res.basis).astype(np.float64)
    E = np.asarray(A, np.float64) @ Q.T - Q.T @ _tridiag(res)
    E[:, -1] -= np.asarray(res.residual, np.float64)
    assert np.max(np.abs(E)) <= 1e-5 * 2e-6


# ----------------------------------------------------------------------- CG


@functools.partial(jax.jit, static_argnames=("precond",))
def _cg_dense(A, b, x0, damping, rtol, precond=False):
    op = _tree_op(A, b)
    pre = None
    if precond:
        d = jnp.diag(A) + damping
        unravel = ravel_pytree(b)[1]
        pre = lambda r: unravel(ravel_pytree(r)[0] / d)
    return cg(op, b, x0=x0, damping=damping, rtol=rtol, preconditioner=pre)


def _q(A, b, x):
    return 0.5 * x @ A @ x - b @ x


@pytest.fixture(scope="module")
def spd():
    n = 60
    rng = np.random.default_rng(21)
    A = _sym(np.geomspace(1.0, 100.0, n), seed=21)
    d = np.geomspace(1.0, 1e3, n)
    rng.shuffle(d)
    scaled = np.sqrt(d)[:, None] * A * np.sqrt(d)[None, :]  # badly scaled, SPD
    return A, scaled, _start(_like(n), 22)


def test_cg_matches_solve_with_damping(spd):
    A, _, b = spd
    bf = np.asarray(ravel_pytree(b)[0])
    zero = jax.tree.map(jnp.zeros_like, b)
    for damping in (0.0, 0.7):
        res = _cg_dense(jnp.asarray(A), b, zero, damping, 1e-12)
        assert bool(res.converged)
        x = np.asarray(ravel_pytree(res.x)[0])
        ref = np.linalg.solve(A + damping * np.eye(len(bf)), bf)
        assert np.linalg.norm(x - ref) <= 1e-9 * np.linalg.norm(ref)
        assert bool(res.converged) and not bool(res.negative_curvature)
        true_res = np.linalg.norm(bf - (A + damping * np.eye(len(bf))) @ x)
        assert true_res <= 1e-10 * np.linalg.norm(bf)
        assert jax.tree.structure(res.x) == jax.tree.structure(b)


def test_cg_preconditioner_and_warm_start(spd):
    _, S, b = spd
    bf = np.asarray(ravel_pytree(b)[0])
    ref = np.linalg.solve(S, bf)
    zero = jax.tree.map(jnp.zeros_like, b)
    plain = _cg_dense(jnp.asarray(S), b, zero, 0.0, 1e-10)
    jacobi = _cg_dense(jnp.asarray(S), b, zero, 0.0, 1e-10, precond=True)
    for res in (plain, jacobi):
        assert np.linalg.norm(np.asarray(ravel_pytree(res.x)[0]) - ref) <= 1e-6 * np.linalg.norm(
            ref)
    assert int(jacobi.num_steps) < int(plain.num_steps)
    # warm start at the solution: nothing to do; near it: fewer steps
    unravel = ravel_pytree(b)[1]
    at = _cg_dense(jnp.asarray(S), b, unravel(jnp.asarray(ref)), 0.0, 1e-8)
    assert int(at.num_steps) == 0 and bool(at.converged)
    near = unravel(jnp.asarray(ref + 1e-4 * np.random.default_rng(0).standard_normal(len(ref))))
    warm = _cg_dense(jnp.asarray(S), b, near, 0.0, 1e-10)
    assert int(warm.num_steps) < int(plain.num_steps) and bool(warm.converged)


def test_cg_negative_curvature_exit():
    ev = np.concatenate([[-1.0, -0.5], np.linspace(0.1, 10.0, 38)])
    A = _sym(ev, seed=23)
    b = _start(_like(40), 24)
    bf = np.asarray(ravel_pytree(b)[0])
    res = _cg_dense(jnp.asarray(A), b, jax.tree.map(jnp.zeros_like, b), 0.0, 1e-10)
    assert bool(res.negative_curvature) and not bool(res.converged)
    x = np.asarray(ravel_pytree(res.x)[0])
    assert np.all(np.isfinite(x))
    assert _q(A, bf, x) <= 0.0  # the returned iterate still decreases the model
    p = np.asarray(ravel_pytree(res.curvature_direction)[0])
    assert np.linalg.norm(p) > 0 and p @ A @ p <= 0.0
    # enough damping makes the system SPD again: plain convergence to solve()
    damped = _cg_dense(jnp.asarray(A), b, jax.tree.map(jnp.zeros_like, b), 1.5, 1e-12)
    assert bool(damped.converged) and not bool(damped.negative_curvature)
    ref = np.linalg.solve(A + 1.5 * np.eye(40), bf)
    assert np.allclose(np.asarray(ravel_pytree(damped.x)[0]), ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("jit", [False, True])
def test_cg_stops_at_zero_curvature_on_a_singular_system(dtype, jit):
    """``diag(1, 2, 0, 0) x = ones``: ``b`` leaves the range, the model is unbounded along the
    null space, and ``d^T A d`` falls to rounding level (1e-140 here) instead of below zero.
    CG took those steps: the iterate reached 1e287 under ``jit`` and inf eagerly. A curvature
    below ``eps`` times the largest one met is zero: the exit returns a finite iterate that
    decreases the model, and a direction of (numerically) zero curvature along which it is
    unbounded."""
    d = jnp.asarray([1.0, 2.0, 0.0, 0.0], dtype)
    b = jnp.ones(4, dtype)
    solve = lambda b: curvlib.cg(lambda v: d * v, b)
    res = (jax.jit(solve) if jit else solve)(b)
    assert bool(res.negative_curvature) and bool(res.finite) and not bool(res.converged)
    assert int(res.status) == curvlib.Status.NEGATIVE_CURVATURE
    x, p, dd = (np.asarray(a, np.float64) for a in (res.x, res.curvature_direction, d))
    assert np.all(np.isfinite(x)) and np.max(np.abs(x)) < 100
    assert 0.5 * x @ (dd * x) - x.sum() < 0  # below q(0) = 0
    assert np.linalg.norm(p) > 0 and p @ (dd * p) <= 1e-6 * (p @ p) and abs(p.sum()) > 0
    np.testing.assert_allclose(float(res.residual_norm), np.linalg.norm(1 - dd * x), rtol=1e-5)


def test_cg_traced_max_steps_matches_static(spd):
    """``max_steps`` may be a jit argument: one compilation serves every cap, and each
    cap gives the result of the same cap passed as a static int."""
    A, _, b = spd
    A = jnp.asarray(A)
    traces = [0]

    def solve(A, b, m):
        traces[0] += 1
        return cg(_tree_op(A, b), b, rtol=1e-12, max_steps=m)

    traced = jax.jit(solve)
    for m in (1, 5, 17, 600):
        res = traced(A, b, jnp.asarray(m))
        ref = jax.jit(functools.partial(solve, m=m))(A, b)
        assert int(res.num_steps) == int(ref.num_steps) <= m
        assert bool(res.converged) == bool(ref.converged)
        np.testing.assert_allclose(ravel_pytree(res.x)[0], ravel_pytree(ref.x)[0],
                                   rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(res.residual_norm, ref.residual_norm, rtol=1e-12)
    assert int(traced(A, b, jnp.asarray(5)).num_steps) == 5
    assert bool(traced(A, b, jnp.asarray(600)).converged)
    # 1 trace for the traced cap (4 + 2 calls), 4 for the static caps
    assert traces[0] == 1 + 4
    # a traced cap below 1 takes no steps; a non-integer traced cap is refused
    zero = traced(A, b, jnp.asarray(0))
    assert int(zero.num_steps) == 0 and not bool(zero.converged)
    with pytest.raises(ValueError, match="max_steps"):
        traced(A, b, jnp.asarray(5.0))


# ------------------------------------------------------------ power iteration


def test_power_iteration_signed_and_deflated():
    ev = np.concatenate([[-30.0, 20.0, 10.0], np.linspace(-1.0, 1.0, 37)])
    A = jnp.asarray(_sym(ev, seed=31))
    like = _like(40)
    op = _tree_op(A, like)
    res = jax.jit(lambda v: power_iteration(op, v, 3, num_iters=300, rtol=1e-8))(_start(like, 1))
    assert np.allclose(np.asarray(res.eigenvalues), [-30.0, 20.0, 10.0], rtol=1e-10)
    assert bool(np.all(res.converged)) and bool(res.finite)
    X = _rows(res.eigenvectors)
    assert np.max(np.abs(X @ X.T - np.eye(3))) <= 1e-8
    R = X @ np.asarray(A) - np.asarray(res.eigenvalues)[:, None] * X
    assert np.allclose(np.linalg.norm(R, axis=1), np.asarray(res.residual_norms), atol=1e-9)
    # eigsh "LA" is not fooled by the dominant negative eigenvalue
    la = eigsh(op, _start(like, 1), 1, which="LA")
    assert np.isclose(float(la.eigenvalues[0]), 20.0, rtol=1e-10)


# ------------------------------------------------------- stochastic estimators


@pytest.fixture(scope="module")
def decaying_100():
    ev = 10.0 * 0.7 ** np.arange(100) + 0.01
    return _sym(ev, seed=41)


@functools.partial(jax.jit, static_argnames=("num_probes", "method"))
def _traces(A, keys, num_probes, method):
    like = _like(A.shape[0])
    f = lambda k: hutchinson_trace(_tree_op(A, like), like, k, num_probes, method=method)
    return jax.vmap(f)(keys)


def test_hutchinson_and_hutchpp_are_unbiased(decaying_100):
    A = decaying_100
    tr = np.trace(A)
    keys = jax.random.split(jax.random.PRNGKey(0), 300)
    for method in ("hutchinson", "hutch++"):
        out = _traces(jnp.asarray(A), keys, 24, method)
        est = np.asarray(out.estimate)
        sem = est.std(ddof=1) / np.sqrt(len(est))
        assert abs(est.mean() - tr) <= 4 * sem, method
        # the reported standard error matches the spread of the estimates
        ratio = np.mean(np.asarray(out.stderr) ** 2) / est.var(ddof=1)
        assert 0.5 <= ratio <= 2.0, (method, ratio)
        assert bool(np.all(out.finite))
    plain = np.asarray(_traces(jnp.asarray(A), keys, 24, "hutchinson").estimate)
    pp = np.asarray(_traces(jnp.asarray(A), keys, 24, "hutch++").estimate)
    rmse = lambda e: np.sqrt(np.mean((e - tr) ** 2))
    assert rmse(pp) < 0.4 * rmse(plain)  # measured: ~0.2


def test_deflated_trace_is_unbiased_and_free_sketch_helps(decaying_100):
    """Deflation by any orthonormal Q is unbiased; by the top eigenvectors (trace known
    from their eigenvalues, no product) it beats Hutch++ at the same product count."""
    A = decaying_100
    tr = np.trace(A)
    w, V = np.linalg.eigh(A)
    like = _like(100)
    keys = jax.random.split(jax.random.PRNGKey(5), 300)
    Qr = np.linalg.qr(np.random.default_rng(0).standard_normal((100, 6)))[0].T  # random span

    def run(Q, qtrace, num):
        f = lambda k: hutchinson_trace(_tree_op(jnp.asarray(A), like), like, k, num,
                                       deflate=_like_rows(Q), deflate_trace=qtrace)
        return jax.jit(jax.vmap(f))(keys)

    out = run(Qr, None, 12)  # tr(Q A Q^T) by 6 extra products
    est = np.asarray(out.estimate)
    assert abs(est.mean() - tr) <= 4 * est.std(ddof=1) / np.sqrt(len(est))
    assert np.all(np.asarray(out.num_matvecs) == 18) and bool(np.all(out.finite))
    top = V[:, -10:].T
    defl = np.asarray(run(top, jnp.sum(jnp.asarray(w[-10:])), 24).estimate)
    pp = np.asarray(_traces(jnp.asarray(A), keys, 24, "hutch++").estimate)
    rmse = lambda e: np.sqrt(np.mean((e - tr) ** 2))
    assert abs(defl.mean() - tr) <= 4 * defl.std(ddof=1) / np.sqrt(len(defl))
    assert rmse(defl) < 0.5 * rmse(pp)
    with pytest.raises(ValueError, match="deflate"):
        hutchinson_trace(_tree_op(jnp.asarray(A), like), like, keys[0], 4, method="hutch++",
                         deflate=_like_rows(top))
    with pytest.raises(ValueError, match="deflate"):
        hutchinson_trace(_tree_op(jnp.asarray(A), like), like, keys[0], 4,
                         deflate={"a": jnp.zeros((3, 99)), "b": jnp.zeros((3, 4, 5))})


def test_hutchinson_trace_exact_on_low_rank():
    """Hutch++ captures a rank-3 matrix exactly with its sketch (even in float32)."""
    rng = np.random.default_rng(3)
    U = np.linalg.qr(rng.standard_normal((50, 3)))[0]
    A = (U * np.array([5.0, 2.0, 1.0])) @ U.T
    for dtype, tol in ((jnp.float64, 1e-10), (jnp.float32, 1e-4)):
        like = jnp.zeros(50, dtype)
        est = hutchinson_trace(_tree_op(jnp.asarray(A, dtype), like), like,
                               jax.random.PRNGKey(1), 15)
        assert abs(float(est.estimate) - 8.0) <= tol * 8.0


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_hutchinson_trace_on_a_sketch_of_rank_below_its_rows_is_exact_not_nan(dtype):
    """Rank 1 and 2 with 30 and 60 probes (a sketch of 10 or 20 rows): every key gives the
    trace to rounding, finite (Cholesky-QR of the rank-deficient sketch gave NaN with
    ``finite=False`` for most keys)."""
    rng = np.random.default_rng(3)
    n = 100
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    keys = jax.random.split(jax.random.PRNGKey(0), 40)
    for values, probes in (([5.0, 3.0], 30), ([4.0], 60)):
        A = jnp.asarray((Q[:, :len(values)] * np.asarray(values)) @ Q[:, :len(values)].T,
                        dtype)
        like = jnp.zeros(n, dtype)
        r = jax.vmap(lambda key: hutchinson_trace(lambda v: A @ v, like, key, probes))(keys)
        assert bool(jnp.all(r.finite))
        np.testing.assert_allclose(np.asarray(r.estimate), sum(values),
                                   rtol=1e-12 if dtype == jnp.float64 else 1e-5)


def test_hutchinson_diag(decaying_100):
    A = decaying_100
    like = _like(100)
    out = hutchinson_diag(_tree_op(jnp.asarray(A), like), like, jax.random.PRNGKey(2), 2000)
    est = np.asarray(ravel_pytree(out.estimate)[0])
    se = np.asarray(ravel_pytree(out.stderr)[0])
    assert jax.tree.structure(out.estimate) == jax.tree.structure(like)
    assert np.all(np.abs(est - np.diag(A)) <= 5 * se)
    # exact for a diagonal operator (z * z = 1 for Rademacher probes)
    d = jnp.arange(1.0, 101.0)
    exact = hutchinson_diag(lambda v: d * v, jnp.zeros(100), jax.random.PRNGKey(3), 3)
    assert np.allclose(np.asarray(exact.estimate), np.asarray(d), rtol=1e-14)


def test_spectral_density_defaults_scale_with_the_operator():
    """The default ``sigma`` is ``range / 100`` at every scale: ``s A`` gives the density of
    ``A`` stretched by ``s`` (an absolute floor merged the two atoms of an operator of norm
    ``4e-10`` into one bump in float32); the zero operator still gets a positive width."""
    d = jnp.asarray(np.r_[np.zeros(10), np.full(10, 4.0)], jnp.float32)
    key = jax.random.PRNGKey(0)
    ref = spectral_density(lambda v: d * v, jnp.zeros(20, jnp.float32), key, num_matvecs=6,
                           num_probes=2)
    for s in (1e-6, 1e-11):
        out = spectral_density(lambda v, s=s: (s * d) * v, jnp.zeros(20, jnp.float32), key,
                               num_matvecs=6, num_probes=2)
        np.testing.assert_allclose(float(out.sigma), s * float(ref.sigma), rtol=1e-3)
        np.testing.assert_allclose(np.asarray(out.grid), s * np.asarray(ref.grid), rtol=1e-3,
                                   atol=1e-3 * s)
        np.testing.assert_allclose(s * np.asarray(out.density), np.asarray(ref.density),
                                   rtol=1e-3, atol=1e-3 * float(jnp.max(ref.density)))
    zero = spectral_density(lambda v: 0 * v, jnp.zeros(20, jnp.float32), key, num_matvecs=6,
                            num_probes=2)
    assert float(zero.sigma) > 0 and bool(jnp.all(jnp.isfinite(zero.density)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("c", [1.0, -3.0, 250.0])
def test_spectral_density_of_one_eigenvalue_integrates_to_one(c, dtype):
    """``c I``: every node at ``c``. The width floor was one ulp of ``c``: the default grid
    collapsed to one repeated point and the density, a spike of 1e17, integrated to 0."""
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        pytest.skip("float64 needs jax_enable_x64")
    for num_points in (8, 32, 512):
        out = spectral_density(lambda v: c * v, jnp.zeros(20, dtype), jax.random.PRNGKey(0),
                               num_matvecs=4, num_probes=2, num_points=num_points)
        grid, dens = np.asarray(out.grid, np.float64), np.asarray(out.density, np.float64)
        assert len(np.unique(grid)) == grid.size
        np.testing.assert_allclose(np.trapezoid(dens, grid), 1.0, rtol=1e-2 if num_points < 32
                                   else 1e-3)
        assert abs(grid[np.argmax(dens)] - c) <= 2 * float(out.sigma)


def test_spectral_density_sets_its_width_from_the_weighted_nodes():
    """Two atoms, 100 and 101: a probe's Krylov space stops growing after two products, and
    a depth of 8 leaves six zero-weight nodes at 0. They set the default width and grid
    (sigma 1.01 on a grid from -5 to 106: one bump); the weighted nodes alone do."""
    d = jnp.concatenate([jnp.full(50, 100.0), jnp.full(50, 101.0)])
    key = jax.random.PRNGKey(0)
    out = [spectral_density(lambda v: d * v, jnp.zeros(100), key, num_matvecs=m, num_probes=4)
           for m in (2, 8)]
    assert np.any(np.asarray(out[1].weights) == 0)  # the fillers are there
    np.testing.assert_allclose(float(out[1].sigma), float(out[0].sigma), rtol=1e-6)
    np.testing.assert_allclose(float(out[1].sigma), 0.01, rtol=1e-3)
    grid, dens = np.asarray(out[1].grid), np.asarray(out[1].density)
    assert grid[0] > 99.0 and grid[-1] < 102.0
    assert dens[np.argmin(np.abs(grid - 100.5))] < 1e-3 * dens.max()  # two atoms apart


def test_lanczos_without_reorthogonalisation_on_a_zero_start_breaks_down_finite():
    """``reortho="none"`` from a zero ``v0``: a breakdown at once, every number finite (it
    divided by the zero norm: NaN everywhere, status NONFINITE with every product finite)."""
    d = jnp.arange(1.0, 21.0)
    r = lanczos(lambda v: d * v, jnp.zeros(20), 5, reortho="none")
    assert bool(r.finite) and bool(r.breakdown)
    assert int(r.status) == curvlib.Status.BREAKDOWN
    assert np.all(np.isfinite(np.asarray(r.alphas)))


def test_spectral_density_integrates_to_one_and_matches_histogram():
    rng = np.random.default_rng(5)
    ev = np.concatenate([
        rng.uniform(0.0, 1.0, 200), rng.uniform(3.0, 4.0, 150), 10.0 + 0.2 * rng.standard_normal(50)
    ])
    A = jnp.asarray(_sym(ev, seed=51))
    like = _like(400)
    grid = jnp.linspace(-2.0, 13.0, 3001)
    out = jax.jit(lambda A, k: spectral_density(
        _tree_op(A, like), like, k, num_matvecs=40, num_probes=30, sigma=0.05, grid=grid
    ))(A, jax.random.PRNGKey(0))
    dens, t = np.asarray(out.density), np.asarray(out.grid)
    assert bool(out.finite) and np.all(dens >= 0)
    assert abs(np.trapezoid(dens, t) - 1.0) <= 1e-3
    assert np.allclose(np.asarray(out.weights).sum(axis=1), 1.0, atol=1e-10)
    # mass between spectral gaps vs the true fractions 0.5 / 0.375 / 0.125
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(t))])
    for a, b in ((-2.0, 2.0), (2.0, 6.0), (6.0, 13.0)):
        mass = np.interp(b, t, cdf) - np.interp(a, t, cdf)
        true = np.mean((ev >= a) & (ev < b))
        assert abs(mass - true) <= 0.03, (a, b, mass, true)
    # a unit-width histogram
    edges = np.arange(-2.0, 14.0, 1.0)
    est_hist = np.diff(np.interp(edges, t, cdf))
    true_hist = np.histogram(ev, edges)[0] / len(ev)
    assert np.abs(est_hist - true_hist).sum() <= 0.15


# --------------------------------------------------------------- bad input


def test_bad_inputs():
    like = {"a": jnp.zeros(3), "b": jnp.zeros((2,))}
    I = lambda v: v
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="k"):
        eigsh(I, like, 5)  # k >= dim
    with pytest.raises(ValueError, match="basis_size"):
        eigsh(I, jnp.ones(30), 5, basis_size=4)  # basis_size < k
    with pytest.raises(ValueError, match="basis_size"):
        eigsh(I, jnp.ones(30), 5, basis_size=6)  # no room for a residual and a guard
    with pytest.raises(ValueError, match="which"):
        eigsh(I, jnp.ones(30), 2, which="BE")
    with pytest.raises(ValueError, match="k"):
        power_iteration(I, like, 5)
    with pytest.raises(ValueError, match="num_matvecs"):
        lanczos(I, like, 6)
    with pytest.raises(ValueError, match="num_matvecs"):
        lanczos(I, like, 0)
    with pytest.raises(ValueError, match="reortho"):
        lanczos(I, like, 2, reortho="partial")
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_probes"):
            hutchinson_trace(I, like, key, bad)
        with pytest.raises(ValueError, match="num_probes"):
            hutchinson_diag(I, like, key, bad)
        with pytest.raises(ValueError, match="num_probes"):
            spectral_density(I, like, key, num_matvecs=2, num_probes=bad)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            spectral_density(I, like, key, num_matvecs=2, num_probes=1, sigma=bad)
    with pytest.raises(ValueError, match=r"b.*x0"):
        cg(I, like, x0={"a": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"b.*x0"):
        cg(I, like, x0={"a": jnp.zeros(3), "b": jnp.zeros(4)})
    # a matvec whose output does not match the vector space
    drop = lambda v: {"a": v["a"]}
    with pytest.raises(ValueError, match=r"v0.*matvec"):
        eigsh(drop, like, 1)
    with pytest.raises(ValueError, match=r"v0.*matvec"):
        lanczos(drop, like, 2)
    with pytest.raises(ValueError, match=r"b.*matvec"):
        cg(drop, like)
    with pytest.raises(TypeError):
        eigsh(I, jnp.arange(10), 2)  # integer vectors


def test_non_finite_products_are_flagged_inside_jit():
    nan_op = lambda v: jax.tree.map(lambda x: x * jnp.nan, v)
    like = {"a": jnp.ones(12), "b": jnp.ones((2, 3))}

    @jax.jit
    def run(v):
        return (
            eigsh(nan_op, v, 2, basis_size=8),
            lanczos(nan_op, v, 5),
            cg(nan_op, v),
            power_iteration(nan_op, v, 2),
            spectral_density(nan_op, v, jax.random.PRNGKey(0), num_matvecs=4, num_probes=2),
            hutchinson_trace(nan_op, v, jax.random.PRNGKey(0), 6),
        )

    e, lz, c, p, s, h = run(like)
    assert not bool(e.converged) and not bool(e.finite)
    # NaN, never plausible numbers (zeros would look like eigenvalues)
    assert np.all(np.isnan(np.asarray(e.eigenvalues)))
    assert np.all(np.isnan(np.asarray(e.residual_norms)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(e.eigenvectors))
    assert not bool(lz.finite) and np.all(np.isnan(np.asarray(lz.alphas)))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(lz.basis))
    assert not bool(c.converged) and not bool(c.finite)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(c.x))
    assert not bool(np.any(p.converged)) and not bool(p.finite)
    # no pair was computed: NaN, never zeros that look like eigenvalues
    assert np.all(np.isnan(np.asarray(p.eigenvalues)))
    assert np.all(np.isnan(np.asarray(p.residual_norms)))
    assert all(np.all(np.isnan(np.asarray(x))) for x in jax.tree.leaves(p.eigenvectors))
    assert not bool(s.finite) and not bool(h.finite)
    assert np.isnan(float(h.estimate)) and np.isnan(float(h.stderr))


def test_zero_start_vectors():
    A = jnp.asarray(_sym(np.arange(1.0, 21.0), seed=71))
    op = lambda v: A @ v
    z = jnp.zeros(20)
    res = eigsh(op, z, 2, basis_size=10)
    assert bool(res.converged) and np.allclose(np.asarray(res.eigenvalues), [20.0, 19.0])
    lz = lanczos(op, z, 5)
    Q = np.asarray(lz.basis)
    assert np.max(np.abs(Q @ Q.T - np.eye(5))) <= 1e-12 and bool(lz.finite)
    p = power_iteration(op, z, 1, num_iters=2000, rtol=1e-8, key=jax.random.PRNGKey(0))
    assert np.isclose(float(p.eigenvalues[0]), 20.0, rtol=1e-8)
    c = cg(op, z)
    assert bool(c.converged) and int(c.num_steps) == 0


def test_eigsh_stops_at_the_smallest_certifying_depth():
    """Without restarts eigsh certifies at exactly the shallowest adequate Lanczos depth.

    Oracle: plain ``lanczos`` at depth ``d`` gives Ritz pairs whose residuals are
    ``|beta_d y_{d-1,i}|``; the smallest ``d`` at which the top-``k`` all meet the
    tolerance is what a fixed-depth solver would have to guess. eigsh (basis large
    enough to need no restart) must certify there (its verification products are
    reported apart), and ARPACK on the same operator must not need fewer products
    for what eigsh certifies without verification.
    """
    import scipy.sparse.linalg as sla

    ev = np.concatenate([np.array([10.0, 9.0, 8.5, 8.0, 7.0]), np.linspace(-2.0, 5.0, 295)])
    A = _sym(ev, seed=11)
    v0 = np.random.default_rng(4).standard_normal(300)
    k, tol = 5, 1e-6
    # m <= 64: the test runs after every step (above, every ceil(m / 64) steps)
    res = eigsh(lambda v: jnp.asarray(A) @ v, jnp.asarray(v0), k, basis_size=64, rtol=tol)
    assert bool(res.converged) and int(res.num_verifications) == 1
    search = int(res.num_matvecs) - int(res.verification_matvecs)

    # one run to depth 64: its first d steps are the depth-d run, whose residual is beta_d
    lz = lanczos(lambda v: jnp.asarray(A) @ v, jnp.asarray(v0), 64)
    alphas = np.asarray(lz.alphas)
    betas = np.append(np.asarray(lz.betas), float(lz.residual_norm))

    def certified(d):
        T = np.diag(alphas[:d]) + np.diag(betas[:d - 1], 1) + np.diag(betas[:d - 1], -1)
        th, Y = np.linalg.eigh(T)
        top = np.argsort(-th)[:k]
        r = np.abs(betas[d - 1] * Y[-1, top])
        return np.all(r <= tol * np.abs(th[top]))

    depth = next(d for d in range(k + 1, 65) if certified(d))
    assert search == depth
    count = [0]

    def mv(x):
        count[0] += 1
        return A @ x

    sla.eigsh(sla.LinearOperator((300, 300), matvec=mv, dtype=np.float64), k=k, which="LA",
              v0=v0, tol=tol)
    assert search <= count[0]


def test_eigsh_deficient_start_does_not_stop_on_an_invariant_subspace():
    """v0 inside a low invariant subspace: residuals vanish there, yet the top pairs are found."""
    A = jnp.diag(jnp.arange(1.0, 101.0))
    v0 = jnp.zeros(100).at[:4].set(1.0)  # spans eigenvalues 1..4 only
    res = eigsh(lambda v: A @ v, v0, 3, basis_size=30)
    assert bool(res.converged)
    assert np.allclose(np.asarray(res.eigenvalues), [100.0, 99.0, 98.0])


def test_a_function_reused_after_what_it_reads_changed_is_read_as_it_is_now():
    # the same function object, called eagerly again after a global (or a dict entry) it
    # reads changed: its trace was cached by identity, and eigsh, cg, power_iteration and
    # hutchinson_trace kept computing the first call's operator
    import curvlib

    d = jnp.arange(1.0, 6.0)
    state = {"lam": 0.0}

    def mv(v):
        return d * v + state["lam"] * v

    for lam in (0.0, 1.0, 10.0):
        state["lam"] = lam
        top = float(curvlib.eigsh(mv, jnp.ones(5), k=1).eigenvalues[0])
        x = curvlib.cg(mv, jnp.ones(5)).x
        p = float(curvlib.power_iteration(mv, jnp.ones(5), k=1).eigenvalues[0])
        tr = float(curvlib.hutchinson_trace(mv, jnp.ones(5), jax.random.PRNGKey(0), 4).estimate)
        np.testing.assert_allclose([top, p], 5.0 + lam, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(x), 1.0 / (np.arange(1.0, 6.0) + lam), rtol=1e-6)
        fresh = curvlib.hutchinson_trace(lambda v, lam=lam: d * v + lam * v, jnp.ones(5),
                                         jax.random.PRNGKey(0), 4).estimate
        np.testing.assert_allclose(tr, float(fresh), rtol=1e-6)  # (same probes)
        inv = curvlib.inverse_matvec(mv, damping=1.0)
        np.testing.assert_allclose(np.asarray(inv(jnp.ones(5))),
                                   1.0 / (np.arange(1.0, 6.0) + lam + 1.0), rtol=1e-5)


def test_restrict_and_block_eigsh_read_a_reused_function_as_it_is_now():
    """The same for an operator built again from the same plain function: `restrict` kept it
    as a static function and `block_eigsh`'s compiled program keyed on it, so both returned
    the first point's spectrum at every step of a loop (192 where 768, 1728, 3072 were
    right), flagged converged. Diagonal Hessian ``3 p^2`` of ``sum(p^4) / 4``: closed form."""
    import curvlib

    loss = lambda p: 0.25 * jnp.sum(p["u"] ** 4) + 0.25 * jnp.sum(p["w"] ** 4)
    point = {}

    def mv(v):  # the Hessian product at the current `point`
        return jax.jvp(jax.grad(loss), (point["p"],), (v,))[1]

    for step in (1.0, 2.0, 3.0):
        point["p"] = params = {"u": step * jnp.arange(1.0, 9.0), "w": jnp.arange(1.0, 9.0)}
        r = curvlib.eigsh(curvlib.restrict(mv, params, {"u": True, "w": False}),
                          {"u": jnp.ones(8), "w": None}, 1)
        np.testing.assert_allclose(float(r.eigenvalues[0]), 3 * (8 * step) ** 2, rtol=1e-8)
        x = curvlib.cg(curvlib.restrict(mv, params, {"u": False, "w": True}),
                       {"u": None, "w": jnp.ones(8)}).x
        np.testing.assert_allclose(np.asarray(x["w"]), 1 / (3 * np.arange(1.0, 9.0) ** 2),
                                   rtol=1e-6)
        spectra = curvlib.block_eigsh(mv, params, 1, key=jax.random.PRNGKey(0))
        np.testing.assert_allclose([float(spectra[b].eigenvalues[0]) for b in ("u", "w")],
                                   [3 * (8 * step) ** 2, 3 * 64.0], rtol=1e-8)


def test_eigenvalue_derivatives_forward_mode_and_the_rayleigh_quotient_gradient():
    # the documented routes: jax.jvp through eigsh, and the gradient of v^T H(p) v at the
    # returned vector held fixed (Hellmann-Feynman); both against central differences
    import curvlib

    def f(p):
        return jnp.sum(jnp.cos(p) * jnp.arange(1.0, 7.0)) + 0.25 * jnp.sum(p**4)

    def top(p):
        return curvlib.eigsh(curvlib.hessian_matvec(f, p), p, k=1, rtol=1e-12).eigenvalues[0]

    p = jnp.linspace(0.3, 1.2, 6)
    t = jnp.linspace(-1.0, 1.0, 6)
    h = 1e-5
    fd = (top(p + h * t) - top(p - h * t)) / (2 * h)
    _, tangent = jax.jvp(top, (p,), (t,))
    np.testing.assert_allclose(float(tangent), float(fd), rtol=1e-6)
    v = jax.lax.stop_gradient(curvlib.eigsh(curvlib.hessian_matvec(f, p), p, k=1,
                                            rtol=1e-12).eigenvectors[0])
    g = jax.grad(lambda q: v @ curvlib.hvp(f, q, v))(p)
    np.testing.assert_allclose(float(g @ t), float(fd), rtol=1e-6)
