"""K-FAC factors and operators against dense oracles and closed forms (float64).

* one example, one dense layer (with its bias) under softmax cross-entropy or
  a Bernoulli likelihood: K-FAC *is* the Gauss-Newton block (``curvlib.ggn_matvec``
  materialised), to 1e-12;
* a deep linear network under a Gaussian likelihood: ``A_l = M_l^T (X^T X / N) M_l``
  and ``G_l = P_l P_l^T`` for the products ``M_l`` below and ``P_l`` above layer ``l``;
* weight sharing: on a sum-pooled shared layer "reduce" is exact for one
  example and both conventions match their closed forms;
* embeddings: token frequencies and the head's outer product;
* the diagonal fallback: the exact Fisher's diagonal from ``jax.jacobian``;
* Monte Carlo: the sample mean of ``G`` approaches the exact ``G``;
* ``inverse_matvec``: exact against ``numpy.linalg.solve``, factored against
  the explicit Kronecker product of the damped factor inverses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvlib
from curvlib.kronecker import curvature as cv
from curvlib.kronecker import kfac_curvature


def _dense(matvec, params):
    """The operator as a dense matrix in ``ravel_pytree`` order."""
    flat, unravel = ravel_pytree(params)
    cols = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(jnp.eye(flat.size))
    return np.asarray(cols).T


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_single_example_dense_layer_equals_the_ggn_block(likelihood):
    kw, kb, kx, ky = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w": jax.random.normal(kw, (6, 4)), "b": jax.random.normal(kb, (4,))}
    x = jax.random.normal(kx, (1, 6))
    model = lambda p, x: x @ p["w"] + p["b"]
    if likelihood == "categorical":
        y = jax.nn.one_hot(jax.random.randint(ky, (1,), 0, 4), 4)
        loss = lambda o, y: jnp.mean(optax.softmax_cross_entropy(o, y))
    else:
        y = jax.random.bernoulli(ky, 0.5, (1, 4)).astype(x.dtype)
        loss = lambda o, y: jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(o, y), -1))
    curv = kfac_curvature(model, params, x, likelihood=likelihood)
    ggn = curvlib.ggn_matvec(model, loss, params, x, loss_args=(y,))
    K, Gm = _dense(curv.matvec, params), _dense(ggn, params)
    assert np.max(np.abs(K - Gm)) < 1e-12 * max(1.0, np.max(np.abs(Gm)))
    # and the damped inverse is its inverse
    inv = _dense(curv.inverse_matvec(0.3), params)
    np.testing.assert_allclose(inv, np.linalg.inv(Gm + 0.3 * np.eye(len(Gm))), atol=1e-11)


def test_deep_linear_network_factors_match_the_closed_form():
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    dims = (5, 4, 3, 2)
    Ws = [jax.random.normal(k, (a, b)) for k, a, b in zip(keys, dims[:-1], dims[1:],
                                                          strict=False)]
    x = jax.random.normal(keys[-1], (7, dims[0]))

    def model(p, x):
        for w in p:
            x = x @ w
        return x

    curv = kfac_curvature(model, Ws, x, likelihood="gaussian", variance=0.5)
    Xc = np.asarray(x).T @ np.asarray(x) / x.shape[0]
    for l in range(len(Ws)):
        M = np.eye(dims[0])
        for w in Ws[:l]:
            M = M @ np.asarray(w)
        P = np.eye(dims[l + 1])
        for w in Ws[l + 1:]:
            P = P @ np.asarray(w)
        np.testing.assert_allclose(curv.factors.A[l], M.T @ Xc @ M, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(curv.factors.G[l], P @ P.T / 0.5, rtol=1e-12, atol=1e-13)


def test_weight_sharing_reduce_and_expand_closed_forms():
    kw, kv, kx = jax.random.split(jax.random.PRNGKey(2), 3)
    params = {"w": jax.random.normal(kw, (3, 4)), "v": jax.random.normal(kv, (4, 2))}
    n, r = 5, 6
    x = jax.random.normal(kx, (n, r, 3))

    def model(p, x):  # a shared layer at r positions, sum-pooled, then a head
        return jnp.sum(x @ p["w"], axis=1) @ p["v"]

    V = np.asarray(params["v"])
    xs = np.asarray(x)
    xbar = xs.mean(axis=1)
    red = kfac_curvature(model, params, x, likelihood="gaussian", convention="reduce")
    exp = kfac_curvature(model, params, x, likelihood="gaussian", convention="expand")
    np.testing.assert_allclose(red.factors.A[1], xbar.T @ xbar / n, rtol=1e-12)
    np.testing.assert_allclose(red.factors.G[1], r**2 * V @ V.T, rtol=1e-12)
    flat = xs.reshape(n * r, 3)
    np.testing.assert_allclose(exp.factors.A[1], flat.T @ flat / (n * r), rtol=1e-12)
    np.testing.assert_allclose(exp.factors.G[1], r * V @ V.T, rtol=1e-12)
    # one example: "reduce" is the exact GGN block of the shared weight
    one = kfac_curvature(model, params, x[:1], likelihood="gaussian", convention="reduce")
    mse = lambda o: 0.5 * jnp.mean(jnp.sum(o**2, -1))
    K = _dense(one.matvec, params)
    Gm = _dense(curvlib.ggn_matvec(model, mse, params, x[:1]), params)
    w = slice(8, 20)  # ravel order: "v" (8 entries) then "w"
    np.testing.assert_allclose(K[w, w], Gm[w, w], atol=1e-11)


def test_embedding_factors_are_token_frequencies_and_head_outer_product():
    ke, kv = jax.random.split(jax.random.PRNGKey(3))
    params = {"emb": jax.random.normal(ke, (6, 3)), "v": jax.random.normal(kv, (3, 2))}
    ids = jnp.array([[0, 2, 2, 5], [1, 2, 0, 0]])

    def model(p, ids):
        return jnp.sum(p["emb"][ids], axis=1) @ p["v"]

    curv = kfac_curvature(model, params, ids, likelihood="gaussian", convention="reduce")
    i = [l.weight_path for l in curv.layers.layers].index("['emb']")
    counts = np.bincount(np.asarray(ids).ravel(), minlength=6)
    np.testing.assert_allclose(curv.factors.A[i], counts / ids.size, rtol=1e-12)
    V = np.asarray(params["v"])
    # embeddings use the "expand" convention: G = (1/N) sum_{n,r} V V^T = R V V^T
    np.testing.assert_allclose(curv.factors.G[i], 4 * V @ V.T, rtol=1e-12)


def test_diagonal_fallback_is_the_exact_fisher_diagonal():
    kw, ks, kx = jax.random.split(jax.random.PRNGKey(4), 3)
    params = {"w": jax.random.normal(kw, (3, 4)), "scale": jax.random.normal(ks, (4,))}
    x = jax.random.normal(kx, (5, 3))

    def model(p, x):
        return jnp.tanh(x @ p["w"]) * p["scale"]

    curv = kfac_curvature(model, params, x, likelihood="categorical")
    assert [f.path for f in curv.layers.diagonal] == ["['scale']"]

    def one(xi):
        f = lambda s: model({"w": params["w"], "scale": s}, xi[None])[0]
        J = jax.jacobian(f)(params["scale"])  # (4 outputs, 4 params)
        p = jax.nn.softmax(f(params["scale"]))
        H = jnp.diag(p) - jnp.outer(p, p)
        return jnp.diag(J.T @ H @ J)

    expect = jnp.mean(jax.vmap(one)(x), axis=0)
    np.testing.assert_allclose(curv.factors.D[0], expect, rtol=1e-12, atol=1e-15)


def test_monte_carlo_factors_average_to_the_exact_ones():
    kw, kx = jax.random.split(jax.random.PRNGKey(5))
    params = {"w": jax.random.normal(kw, (3, 4))}
    x = jax.random.normal(kx, (4, 3))
    model = lambda p, x: jnp.tanh(x) @ p["w"]
    exact = kfac_curvature(model, params, x, likelihood="categorical")
    mc = kfac_curvature(model, params, x, likelihood="categorical",
                        key=jax.random.PRNGKey(0), num_samples=20000)
    G, Gmc = np.asarray(exact.factors.G[0]), np.asarray(mc.factors.G[0])
    assert np.max(np.abs(Gmc - G)) < 0.03 * np.max(np.abs(G))
    np.testing.assert_array_equal(mc.factors.A[0], exact.factors.A[0])  # A needs no sampling
    same = kfac_curvature(model, params, x, likelihood="categorical",
                          key=jax.random.PRNGKey(0), num_samples=20000)
    np.testing.assert_array_equal(same.factors.G[0], Gmc)  # same key, same bits


def test_inverse_matvec_exact_and_factored_damping():
    keys = jax.random.split(jax.random.PRNGKey(6), 4)
    params = {"w1": jax.random.normal(keys[0], (3, 4)), "b1": jax.random.normal(keys[1], (4,)),
              "w2": jax.random.normal(keys[2], (4, 3)), "gain": jnp.ones(3)}
    x = jax.random.normal(keys[3], (6, 3))
    model = lambda p, x: (jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]) * p["gain"]
    curv = kfac_curvature(model, params, x, likelihood="categorical")
    lam = 0.05
    K = _dense(curv.matvec, params)
    exact = _dense(curv.inverse_matvec(lam), params)
    np.testing.assert_allclose(exact, np.linalg.inv(K + lam * np.eye(len(K))), rtol=1e-9,
                               atol=1e-9)
    # factored: (A + pi sqrt(lam) I)^{-1} (x) (G + sqrt(lam) / pi I)^{-1} on the w1/b1 block
    fac = curv.inverse_matvec(lam, method="factored")
    A, G = (np.asarray(m) for m in (curv.factors.A[0], curv.factors.G[0]))
    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    Ai = np.linalg.inv(A + pi * np.sqrt(lam) * np.eye(len(A)))
    Gi = np.linalg.inv(G + np.sqrt(lam) / pi * np.eye(len(G)))
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                     params)
    out = fac(v)
    Vm = np.concatenate([np.asarray(v["w1"]), np.asarray(v["b1"])[None]])
    want = Ai @ Vm @ Gi
    np.testing.assert_allclose(out["w1"], want[:-1], rtol=1e-10)
    np.testing.assert_allclose(out["b1"], want[-1], rtol=1e-10)
    np.testing.assert_allclose(out["gain"], v["gain"] / (curv.factors.D[0] + lam), rtol=1e-12)


def test_operator_is_a_pytree_under_jit_and_cached_when_eager():
    params = {"w": jnp.ones((3, 2)) / 3}
    x = jnp.arange(12.0).reshape(4, 3) / 10
    model = lambda p, x: jnp.tanh(x @ p["w"])
    curv = kfac_curvature(model, params, x, likelihood="gaussian")
    v = {"w": jnp.arange(6.0).reshape(3, 2)}
    jitted = jax.jit(lambda c, v: c.matvec(v))(curv, v)
    np.testing.assert_allclose(jitted["w"], curv.matvec(v)["w"], rtol=1e-14)
    inv = jax.jit(lambda op, v: op(v))(curv.inverse_matvec(0.1), v)
    np.testing.assert_allclose(inv["w"], curv.inverse_matvec(0.1)(v)["w"], rtol=1e-13)
    before = cv._statistics_jit._cache_size()
    kfac_curvature(model, {"w": jnp.zeros((3, 2))}, x + 1, likelihood="gaussian")
    assert cv._statistics_jit._cache_size() == before  # the second eager call hit the cache


def test_bad_arguments_are_named():
    params = {"w": jnp.ones((3, 2))}
    x = jnp.ones((4, 3))
    model = lambda p, x: x @ p["w"]
    with pytest.raises(ValueError, match="`likelihood` must be one of"):
        kfac_curvature(model, params, x, likelihood="poisson")
    with pytest.raises(ValueError, match="`convention` must be one of"):
        kfac_curvature(model, params, x, convention="sum")
    with pytest.raises(ValueError, match="`num_samples` must be >= 1; got 0"):
        kfac_curvature(model, params, x, num_samples=0)
    with pytest.raises(ValueError, match="`variance` must be > 0"):
        kfac_curvature(model, params, x, likelihood="gaussian", variance=0.0)
    curv = kfac_curvature(model, params, x, likelihood="gaussian")
    with pytest.raises(ValueError, match="`method` must be one of"):
        curv.inverse_matvec(0.1, method="cholesky")


@pytest.mark.parametrize("shared", [False, True])
def test_ekfac_scales_are_the_fisher_diagonal_in_the_kronecker_eigenbasis(shared):
    """EK-FAC (George et al. 2018): diag(Q^T F Q) for Q = Q_A (x) Q_G, F the exact Fisher."""
    kw, kb, kx = jax.random.split(jax.random.PRNGKey(7), 3)
    params = {"w": jax.random.normal(kw, (3, 4)), "b": jax.random.normal(kb, (4,))}
    if shared:  # a layer at 3 positions, mean-pooled: per-example gradients sum over them
        x = jax.random.normal(kx, (5, 3, 3))
        model = lambda p, x: jnp.mean(jnp.tanh(x) @ p["w"] + p["b"], axis=1)
    else:
        x = jax.random.normal(kx, (5, 3))
        model = lambda p, x: jnp.tanh(x) @ p["w"] + p["b"]
    curv = kfac_curvature(model, params, x, likelihood="categorical")
    eig = cv.eigen(curv.layers, curv.factors)
    _, _, scales = cv.statistics(curv.layers, params, cv.batch_leaves((x,)),
                                 likelihood="categorical", eigenbasis=eig)
    ce = lambda o: jnp.mean(jnp.sum(-jax.nn.log_softmax(o) * jax.nn.softmax(
        jax.lax.stop_gradient(o)), -1))  # any loss with the categorical output Hessian
    F = _dense(curvlib.ggn_matvec(model, ce, params, x), params)  # ravel order: b, then w
    perm = np.concatenate([np.arange(4, 16), np.arange(4)])  # to the [w; b] matrix order
    F = F[np.ix_(perm, perm)]
    Q = np.kron(np.asarray(eig.QA[0]), np.asarray(eig.QG[0]))
    want = np.diag(Q.T @ F @ Q).reshape(4, 4)
    np.testing.assert_allclose(scales[0], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
def test_likelihood_square_roots_samples_and_quadratic_forms(likelihood):
    """``B B^T`` and the Monte-Carlo second moment are the NLL's output Hessian."""
    from curvlib.kronecker import _likelihood as lik

    f = jax.random.normal(jax.random.PRNGKey(8), (2, 3))  # two positions of three outputs
    var = 0.7
    if likelihood == "categorical":  # the mean over the two positions
        nll = lambda f, y: -jnp.sum(y * jax.nn.log_softmax(f, -1)) / 2
        y = jax.nn.one_hot(jnp.array([0, 2]), 3)
    elif likelihood == "gaussian":
        nll = lambda f, y: jnp.sum((f - y) ** 2) / (2 * var)
        y = jnp.zeros_like(f)
    else:
        nll = lambda f, y: jnp.sum(optax.sigmoid_binary_cross_entropy(f, y))
        y = jnp.ones_like(f)
    H = jax.hessian(nll)(f, y).reshape(6, 6)
    B = lik.sqrt_hessian(likelihood, f, var).reshape(-1, 6)
    np.testing.assert_allclose(B.T @ B, H, atol=1e-12)
    g = lik.sampled_gradients(likelihood, f, jax.random.PRNGKey(9), 100000, var).reshape(-1, 6)
    np.testing.assert_allclose(g.T @ g / len(g), H, atol=0.02 * np.max(np.abs(H)))
    t1, t2 = jax.random.normal(jax.random.PRNGKey(10), (2, 1, 2, 3))  # a batch of one example
    want = t1.reshape(-1) @ H @ t2.reshape(-1)
    np.testing.assert_allclose(lik.quadratic(likelihood, f[None], t1, t2, var), want, rtol=1e-12)


@pytest.mark.parametrize("convention", ["reduce", "expand"])
def test_one_sequence_with_repeated_inputs_equals_fisher_matvec(convention):
    """Normalisation of :func:`curvlib.fisher_matvec`: the mean cross-entropy over tokens.

    A dense layer at 5 positions whose inputs coincide: both conventions are exact
    for one example, and equal the exact Fisher of the per-token mean.
    """
    kw, kb, kx = jax.random.split(jax.random.PRNGKey(11), 3)
    params = {"w": jax.random.normal(kw, (3, 4)), "b": jax.random.normal(kb, (4,))}
    x = jnp.broadcast_to(jax.random.normal(kx, (1, 1, 3)), (1, 5, 3))
    pos = jnp.arange(5.0)[None, :, None] / 5  # position-dependent logits, same layer input
    model = lambda p, x: x @ p["w"] + p["b"] + pos
    curv = kfac_curvature(model, params, x, likelihood="categorical", convention=convention)
    F = _dense(curvlib.fisher_matvec(model, params, x), params)
    np.testing.assert_allclose(_dense(curv.matvec, params), F, atol=1e-12)


def test_a_categorical_likelihood_needs_a_class_axis():
    """One logit per example (shape ``(N,)``) with ``likelihood="categorical"``: a named
    error from ``kfac_curvature`` and from the transform's ``init`` (a bare IndexError at
    the first step before); the one-logit likelihood reads it."""
    p = {"w": jnp.ones((3, 1)) * 0.1}
    x = jnp.ones((4, 3))
    model = lambda p, x: (x @ p["w"])[:, 0]
    with pytest.raises(ValueError, match="needs logits with a class axis"):
        kfac_curvature(model, p, x, likelihood="categorical")
    with pytest.raises(ValueError, match="needs logits with a class axis"):
        curvlib.kfac(model_fn=model, example_inputs={"x": x}).init(p)
    kfac_curvature(model, p, x, likelihood="bernoulli")
    curv = kfac_curvature(model, p, x, likelihood="gaussian")
    with pytest.raises(ValueError, match="`damping` must be >= 0"):
        curv.inverse_matvec(-1.0)


def test_gaussian_outputs_with_positions_are_normalised_as_documented():
    """``(N, T, C)`` outputs: K-FAC's Gaussian NLL sums over an example's positions (as
    kfac-jax's), `fisher_matvec` counts every position as an example, so on a leaf K-FAC
    treats exactly (a diagonal fallback: the Fisher's diagonal) they differ by ``T``, as the
    docs say; the categorical NLL is averaged over positions by both (equal)."""
    def model(p, x):  # (N, T, d) -> (N, T, C)
        return (jnp.tanh(x @ p["W"]) * p["s"]) @ p["V"]

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {"W": jax.random.normal(k[0], (4, 5), jnp.float64) / 2, "s": jnp.ones(5, jnp.float64),
         "V": jax.random.normal(k[1], (5, 3), jnp.float64) / 2}
    x = jax.random.normal(k[2], (2, 3, 4), jnp.float64)  # N = 2 examples, T = 3 positions
    e = jax.tree.map(jnp.zeros_like, p)
    e["s"] = e["s"].at[1].set(1.0)
    for likelihood, kw, factor in (("categorical", {}, 1.0), ("gaussian", {"variance": 2.0}, 3.0)):
        fisher = curvlib.fisher_matvec(model, p, x, likelihood=likelihood, **kw)(e)["s"][1]
        kfac = curvlib.kfac_curvature(model, p, x, likelihood=likelihood, **kw).matvec(e)["s"][1]
        np.testing.assert_allclose(kfac, factor * fisher, rtol=1e-12, err_msg=likelihood)
