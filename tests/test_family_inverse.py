"""Inverse products against ``numpy.linalg.solve`` (float64, a tiny tanh MLP)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvlib
from curvlib import inverse_matvec


def _problem(n=12):
    k = jax.random.split(jax.random.PRNGKey(21), 4)
    params = {"w": 0.7 * jax.random.normal(k[0], (3, 4)), "v": 0.7 * jax.random.normal(k[1], (4,))}
    x = jax.random.normal(k[2], (n, 3))
    y = jax.random.normal(k[3], (n,))
    model = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
    loss = lambda p, x, y: jnp.mean((model(p, x) - y) ** 2)
    return model, loss, params, x, y


def _dense(matvec, params):
    flat, unravel = ravel_pytree(params)
    cols = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(jnp.eye(flat.size))
    return np.asarray(cols).T, unravel


def test_cg_inverse_matches_numpy_solve():
    model, loss, params, x, y = _problem()
    G = curvlib.ggn_matvec(model, lambda o, y: jnp.mean((o - y) ** 2), params, x, loss_args=(y,))
    D, unravel = _dense(G, params)
    lam = 1e-2
    inv = inverse_matvec(G, damping=lam, cg=curvlib.CG(rtol=1e-12))
    # densified by vmap over right-hand sides, and passed into jit as an argument
    Dinv = np.asarray(jax.jit(jax.vmap(lambda op, e: ravel_pytree(op(unravel(e)))[0],
                                       (None, 0)))(inv, jnp.eye(D.shape[0]))).T
    ref = np.linalg.solve(D + lam * np.eye(D.shape[0]), np.eye(D.shape[0]))
    assert np.linalg.norm(Dinv - ref) <= 1e-9 * np.linalg.norm(ref)
    b = unravel(jnp.asarray(np.random.default_rng(0).standard_normal(D.shape[0])))
    res = inv.solve(b)
    assert bool(res.converged) and bool(res.finite)
    bf = np.asarray(ravel_pytree(b)[0])
    assert np.allclose(ravel_pytree(res.x)[0], np.linalg.solve(D + lam * np.eye(len(bf)), bf),
                       rtol=1e-9, atol=0)
    # a warm start from a nearby right-hand side's solution saves products, same answer
    b2 = jax.tree.map(lambda a: a * (1 + 1e-4), b)
    cold, warm = inv.solve(b2), inv.solve(b2, x0=res.x)
    assert int(warm.num_matvecs) < int(cold.num_matvecs)
    assert np.allclose(ravel_pytree(warm.x)[0], ravel_pytree(cold.x)[0], rtol=1e-9)


def test_cg_inverse_of_an_indefinite_operator_is_nan_with_a_flag():
    model, loss, params, x, y = _problem()
    H = curvlib.hessian_matvec(lambda p, x, y: -loss(p, x, y), params, x, y)  # mostly negative
    D, unravel = _dense(H, params)
    assert np.linalg.eigvalsh(D).min() < -1e-3
    b = jax.tree.map(jnp.ones_like, params)
    res = inverse_matvec(H, damping=1e-3).solve(b)
    assert not bool(res.converged)
    assert all(bool(jnp.all(jnp.isnan(a))) for a in jax.tree.leaves(res.x))
    shift = -np.linalg.eigvalsh(D).min() + 1.0  # enough damping makes it definite
    x_ok = inverse_matvec(H, damping=shift, cg=curvlib.CG(rtol=1e-12))(b)
    bf = np.asarray(ravel_pytree(b)[0])
    assert np.allclose(ravel_pytree(x_ok)[0], np.linalg.solve(D + shift * np.eye(len(bf)), bf),
                       rtol=1e-9)


def test_lowrank_inverse_of_an_indefinite_damped_projection_is_refused_or_flagged():
    """One rule for computed and given pairs: ``theta + damping <= 0`` has no inverse (the
    formula gave answers of the wrong sign, ``converged``). Concrete pairs are refused
    when the operator is built; pairs traced into a solve give NaN and NEGATIVE_CURVATURE,
    as CG's path does."""
    d = jnp.concatenate([jnp.array([-5.0]), jnp.linspace(0.1, 1.0, 19)])
    mv = lambda v: d * v
    b = jnp.ones(20)
    v0 = jnp.asarray(np.random.default_rng(0).standard_normal(20))
    with pytest.raises(ValueError, match=r"eigsh computed .* must be > 0 .* = -4"):
        inverse_matvec(mv, damping=1.0, method="lowrank", rank=1, v0=v0, which="LM")
    pairs = curvlib.eigsh(mv, v0, 1, which="LM")
    with pytest.raises(ValueError, match=r"`eigenpairs` eigenvalues plus `damping` must be > 0"):
        inverse_matvec(mv, damping=1.0, method="lowrank", eigenpairs=pairs)
    computed = jax.jit(lambda lam: inverse_matvec(mv, damping=lam, method="lowrank", rank=1,
                                                  v0=v0, which="LM").solve(b))
    given = jax.jit(lambda lam: inverse_matvec(mv, damping=lam, method="lowrank",
                                               eigenpairs=pairs).solve(b))
    for solve in (computed, given):
        res = solve(1.0)
        assert int(res.status) == curvlib.Status.NEGATIVE_CURVATURE
        assert not bool(res.converged) and bool(jnp.all(jnp.isnan(res.x)))
        ok = solve(6.0)  # definite: exact on the projection's span, 1/damping off it
        assert int(ok.status) == curvlib.Status.SUCCESS and bool(ok.converged)
        np.testing.assert_allclose(ok.x, jnp.concatenate([jnp.array([1.0]),
                                                          jnp.full(19, 1 / 6.0)]), rtol=1e-9)


def test_lowrank_inverse_is_the_inverse_of_the_damped_projection():
    model, loss, params, x, y = _problem(n=3)
    per_example = lambda p, ex: (model(p, ex[0][None])[0] - ex[1]) ** 2
    EF = curvlib.empirical_fisher_matvec(per_example, params, (x, y))  # rank 3 of 16
    D, unravel = _dense(EF, params)
    P = D.shape[0]
    lam = 0.1
    theta, U = np.linalg.eigh(D)
    b = np.random.default_rng(1).standard_normal(P)
    v0 = unravel(jnp.asarray(np.random.default_rng(2).standard_normal(P)))
    # rank 3 = rank(EF): exact
    exact = inverse_matvec(EF, damping=lam, method="lowrank", rank=3, v0=v0,
                           eigsh=curvlib.Eigsh(rtol=1e-10))

    got = np.asarray(ravel_pytree(exact(unravel(jnp.asarray(b))))[0])
    assert np.allclose(got, np.linalg.solve(D + lam * np.eye(P), b), rtol=1e-8, atol=1e-10)
    assert bool(exact.solve(unravel(jnp.asarray(b))).converged)
    # rank 2: the inverse of U2 diag(theta2) U2^T + lam I (the top two of those eigenpairs)
    top2 = jax.tree.map(lambda a: a[:2], exact.eigenvectors)
    eig = curvlib.EigshResult(exact.eigenvalues[:2], top2, jnp.zeros(2), jnp.asarray(0),
                              jnp.asarray(0), jnp.asarray(True), jnp.asarray(True))
    approx = inverse_matvec(EF, damping=lam, method="lowrank", eigenpairs=eig)
    U2, t2 = U[:, -2:], theta[-2:]
    want = np.linalg.solve(U2 @ np.diag(t2) @ U2.T + lam * np.eye(P), b)
    got = np.asarray(ravel_pytree(approx(unravel(jnp.asarray(b))))[0])
    assert np.allclose(got, want, rtol=1e-8)
    res = approx.solve(unravel(jnp.asarray(b)))
    assert int(res.num_matvecs) == 0 and np.isnan(float(res.residual_norm))
    # eigenpairs as a plain pair; jit with the operator as an argument
    pair = inverse_matvec(EF, damping=lam, method="lowrank",
                          eigenpairs=(eig.eigenvalues, eig.eigenvectors))
    got = jax.jit(lambda op, v: op(v))(pair, unravel(jnp.asarray(b)))
    assert np.allclose(ravel_pytree(got)[0], want, rtol=1e-8)


def test_inverse_matvec_bad_input():
    A = lambda v: 2.0 * v
    with pytest.raises(ValueError, match="method"):
        inverse_matvec(A, damping=1.0, method="svd")
    with pytest.raises(ValueError, match=r"`damping` must be >= 0"):
        inverse_matvec(A, damping=-1.0)
    with pytest.raises(ValueError, match=r"`damping` must be > 0 for method='lowrank'"):
        inverse_matvec(A, damping=0.0, method="lowrank", rank=1, v0=jnp.ones(3))
    with pytest.raises(ValueError, match="needs the eigenpairs"):
        inverse_matvec(A, damping=1.0, method="lowrank")
    with pytest.raises(ValueError, match="lowrank' only"):
        inverse_matvec(A, damping=1.0, rank=2)
    with pytest.raises(ValueError, match=r"leading axis of length 2.*eigenvectors\['a'\]"):
        inverse_matvec(A, damping=1.0, method="lowrank",
                       eigenpairs=(jnp.ones(2), {"a": jnp.ones((3, 4))}))


def test_inverse_of_a_streamed_operator_solves_on_the_host():
    """``inverse_matvec`` of a `StreamMatvec` keeps its host-driven flag (wrapped in a
    `Partial` it lost it, and every solve traced the vector the stream cannot take traced)."""
    model, loss, params, x, y = _problem()
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    S = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, *b), params,
                              batches)
    H, unravel = _dense(curvlib.hessian_matvec(loss, params, x, y), params)
    lam = float(max(0.1, 0.5 - np.linalg.eigvalsh(H)[0]))  # H + lam I positive definite
    inv = inverse_matvec(S, damping=lam)
    assert inv.host_driven
    b = jax.tree.map(jnp.ones_like, params)
    want = np.linalg.solve(H + lam * np.eye(H.shape[0]), np.ones(H.shape[0]))
    np.testing.assert_allclose(ravel_pytree(inv(b))[0], want, rtol=1e-4, atol=1e-5)
    low = inverse_matvec(S, method="lowrank", rank=2, damping=lam, v0=b)
    assert np.all(np.isfinite(ravel_pytree(low(b))[0]))


def test_a_solve_counts_the_products_it_ran():
    """``InverseSolve.num_matvecs`` counts the products: the initial residual of a warm
    start is one more, a zero right-hand side none (it said ``num_steps + 1``)."""
    A = jnp.asarray(np.diag(np.linspace(1.0, 30.0, 25)))
    calls = []

    def mv(v):
        jax.debug.callback(lambda: calls.append(1))
        return A @ v

    inv = inverse_matvec(jax.jit(mv), damping=0.1, cg=curvlib.CG(rtol=1e-10))
    b = jnp.ones(25)
    for x0, rhs in ((None, b), (0.5 * b, b), (None, jnp.zeros(25))):
        calls.clear()
        res = jax.block_until_ready(inv.solve(rhs, x0=x0))
        jax.effects_barrier()
        assert int(res.num_matvecs) == len(calls), (x0 is None, len(calls))
        ref = curvlib.cg(mv, rhs, x0=x0, damping=0.1, rtol=1e-10)
        assert int(res.num_matvecs) == int(ref.num_matvecs)


def test_an_inverse_rebuilt_over_a_fresh_closure_compiles_once(compiles):
    """``inverse_matvec(lambda v: A @ v, ...)`` in a notebook cell run again, over a new
    ``A``: the solve's program is the closure's program with ``A`` an input (it compiled
    again for every new lambda), and it answers for the new ``A``."""
    rng = np.random.default_rng(0)
    b = jnp.asarray(rng.standard_normal(20))
    for scale in (1.0, 2.0, 3.0):
        A = jnp.asarray(np.diag(scale * np.linspace(1.0, 5.0, 20)))
        D = jnp.diag(A)
        build = lambda A=A, D=D: inverse_matvec(lambda v: A @ v, damping=0.5,
                                                preconditioner=lambda r: r / (D + 0.5),
                                                cg=curvlib.CG(rtol=1e-12))
        if scale == 1.0:
            jax.block_until_ready(build()(b))
            continue
        with compiles() as seen:
            x = jax.block_until_ready(build()(b))
        assert seen.count == 0
        np.testing.assert_allclose(x, np.linalg.solve(np.asarray(A) + 0.5 * np.eye(20), b),
                                   rtol=1e-10)


def test_a_lowrank_inverse_rebuilt_over_a_fresh_closure_compiles_once(compiles):
    """The low-rank build's eigsh keys the function on its program, and the low-rank solve
    (which takes no product) on nothing of the closure: a rebuilt cell compiles nothing."""
    rng = np.random.default_rng(1)
    b = jnp.asarray(rng.standard_normal(12))
    for scale in (1.0, 2.0):
        d = jnp.asarray(scale * np.linspace(1.0, 5.0, 12))
        with compiles() as seen:
            inv = inverse_matvec(lambda v, d=d: d * v, damping=0.5, method="lowrank", rank=3,
                                 v0=jnp.ones(12))
            x = jax.block_until_ready(inv(b))
        if scale == 2.0:
            assert seen.count == 0
    top = np.argsort(np.asarray(d))[-3:]  # the top-3 directions: solved; the rest: / damping
    want = np.asarray(b) / 0.5
    want[top] = np.asarray(b)[top] / (np.asarray(d)[top] + 0.5)
    np.testing.assert_allclose(x, want, rtol=1e-4)


def test_an_operator_that_cannot_be_weakly_referenced_still_solves():
    """A callable object with ``__slots__`` (no weak references): traced without a cache."""

    class Scaled:
        __slots__ = ("c",)

        def __init__(self, c):
            self.c = c

        def __call__(self, v):
            return self.c * v

    x = inverse_matvec(Scaled(3.0), damping=1.0)(jnp.ones(6))
    np.testing.assert_allclose(x, 0.25, rtol=1e-6)
