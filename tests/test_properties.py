"""Property tests (hypothesis) on random SPD / indefinite matrices and random pytrees.

Matrices are drawn from a seed and a size in a small set, so every jitted entry
point compiles once per size; examples are derandomised (reproducible runs).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

from curvlib import cg, eigsh, hessian_matvec, hutchinson_diag, hvp, lanczos

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)
SIZES = st.sampled_from([8, 26])
SEEDS = st.integers(0, 2**31 - 1)


def _like(n):
    return {"u": jnp.zeros(n - 3), "v": (jnp.zeros(3),)}


def _op(A, like):
    unravel = ravel_pytree(like)[1]
    return lambda v: unravel(A @ ravel_pytree(v)[0])


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def _vec(rng, n):
    return ravel_pytree(_like(n))[1](jnp.asarray(rng.standard_normal(n)))


@functools.partial(jax.jit, static_argnames=("which",))
def _eigsh(A, v0, which):
    return eigsh(_op(A, v0), v0, 2, which=which, num_matvecs=min(A.shape[0], 10))


@jax.jit
def _cg(A, b):
    # ``converged`` judges the true residual, which cannot fall far below eps * cond(A)
    # (~2e-12 at the largest condition number drawn): ask for what float64 can certify
    return cg(_op(A, b), b, rtol=1e-11)


@functools.partial(jax.jit, static_argnames=("m",))
def _lanczos(A, v0, m):
    return lanczos(_op(A, v0), v0, m)


@SETTINGS
@given(n=SIZES, seed=SEEDS, log_cond=st.floats(0.0, 4.0))
def test_cg_solves_random_spd(n, seed, log_cond):
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = (Q * np.geomspace(1.0, 10.0**log_cond, n)) @ Q.T
    b = _vec(rng, n)
    res = _cg(jnp.asarray(A), b)
    ref = np.linalg.solve(A, _flat(b))
    assert bool(res.converged) and not bool(res.negative_curvature)
    assert np.linalg.norm(_flat(res.x) - ref) <= 1e-8 * 10.0**log_cond * np.linalg.norm(ref)


@SETTINGS
@given(n=SIZES, seed=SEEDS, which=st.sampled_from(["LA", "SA", "LM"]))
def test_eigsh_random_indefinite(n, seed, which):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, n))
    A = (G + G.T) / 2
    evals = np.linalg.eigvalsh(A)
    res = _eigsh(jnp.asarray(A), _vec(rng, n), which)
    got = np.asarray(res.eigenvalues)
    anorm = np.abs(evals).max()
    if which == "LA":
        want = evals[::-1][:2]
    elif which == "SA":
        want = evals[:2]
    else:  # magnitudes (opposite-signed near-ties may come in either order)
        got, want = np.sort(np.abs(got))[::-1], np.sort(np.abs(evals))[::-1][:2]
    assert bool(res.converged) and bool(res.finite)
    assert np.max(np.abs(got - want)) <= 1e-8 * anorm
    X = np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(res.eigenvectors))
    assert np.max(np.abs(X @ X.T - np.eye(2))) <= 1e-10
    R = X @ A - np.asarray(res.eigenvalues)[:, None] * X
    assert np.all(np.linalg.norm(R, axis=1) <= 1e-7 * anorm)


@SETTINGS
@given(n=SIZES, seed=SEEDS, m=st.sampled_from([2, 8]))
def test_lanczos_relation_random_symmetric(n, seed, m):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n, n))
    A = (G + G.T) / 2
    res = _lanczos(jnp.asarray(A), _vec(rng, n), m)
    Q = np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(res.basis))
    a, b = np.asarray(res.alphas), np.asarray(res.betas)
    T = np.diag(a) + np.diag(b, 1) + np.diag(b, -1)
    E = A @ Q.T - Q.T @ T
    E[:, -1] -= _flat(res.residual)
    assert np.max(np.abs(Q @ Q.T - np.eye(m))) <= 1e-12
    assert np.max(np.abs(E)) <= 1e-12 * np.abs(A).max() * n


SHAPES = st.sampled_from([(), (3,), (2, 2), (1, 4)])


@settings(max_examples=8, deadline=None, derandomize=True)
@given(shapes=st.lists(SHAPES, min_size=1, max_size=3), seed=SEEDS,
       as_dict=st.booleans())
def test_hvp_random_pytrees_closed_form(shapes, seed, as_dict):
    """``f(p) = x^T A x / 2 + sum(x^4) / 4`` with ``x = ravel(p)``: ``H = A + 3 diag(x^2)``."""
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.standard_normal(s)) for s in shapes]
    params = {f"k{i}": x for i, x in enumerate(leaves)} if as_dict else tuple(leaves)
    flat, unravel = ravel_pytree(params)
    n = flat.shape[0]
    G = rng.standard_normal((n, n))
    A = jnp.asarray((G + G.T) / 2)

    def f(p):
        x = ravel_pytree(p)[0]
        return 0.5 * x @ A @ x + 0.25 * jnp.sum(x**4)

    H = np.asarray(A) + 3 * np.diag(np.asarray(flat) ** 2)
    v = unravel(jnp.asarray(rng.standard_normal(n)))
    want = H @ _flat(v)
    scale = np.linalg.norm(want) + 1e-300
    assert np.linalg.norm(_flat(hvp(f, params, v)) - want) <= 1e-10 * scale
    for mode in ("linearize", "rev-rev"):
        got = _flat(hessian_matvec(f, params, mode=mode)(v))
        assert np.linalg.norm(got - want) <= 1e-10 * scale


@SETTINGS
@given(n=SIZES, seed=SEEDS)
def test_hutchinson_diag_exact_on_diagonal_operators(n, seed):
    rng = np.random.default_rng(seed)
    d = _vec(rng, n)
    op = lambda v: jax.tree.map(jnp.multiply, d, v)
    est = hutchinson_diag(op, d, jax.random.PRNGKey(seed % 1000), 2)
    assert np.allclose(_flat(est.estimate), _flat(d), rtol=1e-14, atol=1e-14)
