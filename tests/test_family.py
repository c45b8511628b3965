"""The curvature family against dense oracles, float64, on three tiny models.

Softmax regression, a tanh MLP and a small CNN (kept tiny: XLA compile time
dominates). Every operator is densified column by column (``vmap`` over the
identity, which also proves it composes with ``vmap``) and compared with a
matrix built independently from ``jax.jacfwd`` / per-example ``jax.grad``:

* exact Fisher vs ``J^T blockdiag(diag p_i - p_i p_i^T) J / N`` (categorical) and
  ``J^T J / (sigma^2 N)`` (Gaussian);
* Monte-Carlo Fisher: the mean over many keys tends to the exact one within
  a tolerance set by the sample spread, and the spread of ``v^T F_hat v``
  matches the variance formula in the docstring;
* empirical Fisher vs ``G^T G / n`` with ``G`` the stacked per-example gradients;
* ``J v`` and ``J^T u`` vs ``jax.jacfwd``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvlib

N = 6  # examples; microbatch 4 leaves a remainder chunk of 2
C = 3  # classes


# ---------------------------------------------------------------- models


def softmax_regression():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": 0.7 * jax.random.normal(k[0], (4, C)), "b": 0.1 * jax.random.normal(k[1], (C,))}
    x = jax.random.normal(k[2], (N, 4))
    return lambda p, x: x @ p["w"] + p["b"], params, x


def tanh_mlp():
    k = jax.random.split(jax.random.PRNGKey(1), 5)
    params = {
        "hidden": (0.8 * jax.random.normal(k[0], (3, 5)), 0.1 * jax.random.normal(k[1], (5,))),
        "out": {"w": 0.8 * jax.random.normal(k[2], (5, C)),
                "b": 0.1 * jax.random.normal(k[3], (C,))},
    }
    x = jax.random.normal(k[4], (N, 3))

    def model(p, x):
        w, b = p["hidden"]
        return jnp.tanh(x @ w + b) @ p["out"]["w"] + p["out"]["b"]

    return model, params, x


def small_cnn():
    k = jax.random.split(jax.random.PRNGKey(2), 4)
    params = {
        "conv": 0.5 * jax.random.normal(k[0], (3, 3, 1, 2)),
        "dense": 0.3 * jax.random.normal(k[1], (2 * 3 * 3, C)),
        "bias": 0.1 * jax.random.normal(k[2], (C,)),
    }
    x = jax.random.normal(k[3], (N, 5, 5, 1))

    def model(p, x):
        h = jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.tanh(h).reshape(x.shape[0], -1)
        return h @ p["dense"] + p["bias"]

    return model, params, x


MODELS = {"softmax": softmax_regression, "mlp": tanh_mlp, "cnn": small_cnn}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    model_fn, params, x = MODELS[request.param]()
    flat, unravel = ravel_pytree(params)
    out = model_fn(params, x)
    J = np.asarray(jax.jit(jax.jacfwd(lambda f: model_fn(unravel(f), x).reshape(-1)))(flat))
    return request.param, model_fn, params, x, np.asarray(out), J, unravel


def dense(matvec, unravel, P):
    """The operator's matrix, one column per unit vector (``vmap``: block products work)."""
    cols = jax.jit(jax.vmap(lambda e, mv: ravel_pytree(mv(unravel(e)))[0], (0, None)))(
        jnp.eye(P), matvec
    )
    return np.asarray(cols).T


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def categorical_oracle(out, J):
    """``J^T blockdiag(diag p_i - p_i p_i^T) J / N`` in numpy."""
    p = softmax(out.reshape(-1, out.shape[-1]))
    n = p.shape[0]
    M = np.zeros((p.size, p.size))
    for i in range(n):
        s = slice(i * p.shape[1], (i + 1) * p.shape[1])
        M[s, s] = np.diag(p[i]) - np.outer(p[i], p[i])
    return J.T @ M @ J / n


def cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


# ---------------------------------------------------------- exact Fisher


def test_categorical_fisher_is_jt_p_j_over_n(model):
    name, model_fn, params, x, out, J, unravel = model
    P = J.shape[1]
    oracle = categorical_oracle(out, J)
    F = curvlib.fisher_matvec(model_fn, params, x)
    assert rel(dense(F, unravel, P), oracle) < 1e-12
    # = the GGN of the mean cross-entropy (any labels: its output Hessian ignores them)
    G = curvlib.ggn_matvec(model_fn, cross_entropy, params, x, loss_args=(jnp.arange(N) % C,))
    assert rel(dense(G, unravel, P), oracle) < 1e-12
    if name != "softmax":
        return
    # recomputed and microbatched (4 + 2): same matrix
    v = unravel(jnp.asarray(np.random.default_rng(0).standard_normal(P)))
    for kw in ({"mode": "recompute"}, {"microbatch_size": 4}):
        got = ravel_pytree(curvlib.fisher_matvec(model_fn, params, x, **kw)(v))[0]
        assert rel(np.asarray(got), oracle @ np.asarray(ravel_pytree(v)[0])) < 1e-12


def test_fisher_normalises_over_every_example_position():
    """Logits ``(batch, time, classes)``: the mean is over all ``batch * time`` positions."""
    model_fn, params, x = softmax_regression()
    seq = x.reshape(2, 3, 4)  # 2 sequences of 3 tokens
    flat, unravel = ravel_pytree(params)
    J = np.asarray(jax.jacfwd(lambda f: model_fn(unravel(f), seq).reshape(-1))(flat))
    oracle = categorical_oracle(np.asarray(model_fn(params, seq)), J)  # N = 6 positions
    F = curvlib.fisher_matvec(model_fn, params, seq)
    assert rel(dense(F, unravel, J.shape[1]), oracle) < 1e-12


@pytest.mark.parametrize("variance", [1.0, 0.25, "per-example"])
def test_gaussian_fisher_is_jtj_over_sigma2_n(variance):
    model_fn, params, x = tanh_mlp()
    flat, unravel = ravel_pytree(params)
    P = flat.size
    J = np.asarray(jax.jacfwd(lambda f: model_fn(unravel(f), x).reshape(-1))(flat))
    if variance == "per-example":  # a (N, 1) array: sigma_i^2 for example i, all dimensions
        variance = jnp.linspace(0.5, 2.0, N)[:, None]
        w = np.repeat(1.0 / np.asarray(variance)[:, 0], C)
    else:
        w = np.full(N * C, 1.0 / variance)
    oracle = J.T @ (w[:, None] * J) / N
    F = curvlib.fisher_matvec(model_fn, params, x, likelihood="gaussian", variance=variance)
    assert rel(dense(F, unravel, P), oracle) < 1e-12
    Fmb = curvlib.fisher_matvec(model_fn, params, x, likelihood="gaussian", variance=variance,
                                microbatch_size=4)
    assert rel(dense(Fmb, unravel, P), oracle) < 1e-12
    # = the GGN of sum((f - y)^2 / (2 sigma^2)) / N
    mse = lambda o, y: jnp.sum((o - y) ** 2 / (2 * jnp.asarray(variance))) / o.shape[0]
    G = curvlib.ggn_matvec(model_fn, mse, params, x, loss_args=(jnp.zeros((N, C)),))
    assert rel(dense(G, unravel, P), oracle) < 1e-12


def test_gaussian_fisher_of_scalar_predictions():
    """Outputs of shape ``(n,)`` are ``n`` scalar predictions (event size 1)."""
    model_fn, params, x = tanh_mlp()
    scalar = lambda p, x: model_fn(p, x)[:, 0]
    flat, unravel = ravel_pytree(params)
    J = np.asarray(jax.jacfwd(lambda f: scalar(unravel(f), x))(flat))
    F = curvlib.fisher_matvec(scalar, params, x, likelihood="gaussian")
    assert rel(dense(F, unravel, flat.size), J.T @ J / N) < 1e-12
    # a variance that would widen the outputs (a column (n, 1) for predictions (n,)) is
    # refused by name: it failed inside the product with JAX's broadcasting message
    for shape in ((N, 1), (2, N)):
        with pytest.raises(ValueError, match=r"`variance` of shape .* does not broadcast"):
            curvlib.fisher_matvec(scalar, params, x, likelihood="gaussian",
                                  variance=jnp.ones(shape))


# ------------------------------------------------------- Monte-Carlo Fisher


def _mc_estimates(model_fn, params, x, v, likelihood, num_keys, num_samples, **kw):
    """``F_hat v`` for ``num_keys`` independent keys (vmapped: one compilation)."""

    @jax.jit
    def run(keys):
        return jax.vmap(lambda k: ravel_pytree(curvlib.fisher_matvec(
            model_fn, params, x, likelihood=likelihood, key=k, num_samples=num_samples, **kw
        )(v))[0])(keys)

    return np.asarray(run(jax.random.split(jax.random.key(7), num_keys)))


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_monte_carlo_fisher_is_unbiased_with_the_documented_variance(likelihood):
    model_fn, params, x = tanh_mlp()
    flat, unravel = ravel_pytree(params)
    P = flat.size
    J = np.asarray(jax.jacfwd(lambda f: model_fn(unravel(f), x).reshape(-1))(flat))
    out = np.asarray(model_fn(params, x))
    exact = categorical_oracle(out, J) if likelihood == "categorical" else J.T @ J / N
    vflat = np.random.default_rng(1).standard_normal(P)
    v = unravel(jnp.asarray(vflat))
    K, S = 4000, 2
    est = _mc_estimates(model_fn, params, x, v, likelihood, K, S)  # (K, P)
    # unbiased: the mean over keys is within 5 standard errors of F v, coordinatewise
    se = est.std(axis=0, ddof=1) / np.sqrt(K)
    err = np.abs(est.mean(axis=0) - exact @ vflat)
    assert np.all(err <= 5 * se + 1e-12), np.max(err / se)
    # the spread of v^T F_hat v matches the docstring's formula
    q = est @ vflat
    u = (J @ vflat).reshape(N, C)
    if likelihood == "categorical":
        p = softmax(out)
        mean_u = np.sum(p * u, axis=1, keepdims=True)
        m2 = np.sum(p * (u - mean_u) ** 2, axis=1)
        m4 = np.sum(p * (u - mean_u) ** 4, axis=1)
        var = np.sum(m4 - m2**2) / (N**2 * S)
    else:
        var = 2 * np.sum(np.sum(u * u, axis=1) ** 2) / (N**2 * S)
    assert abs(q.var(ddof=1) / var - 1) < 0.15, (q.var(ddof=1), var)
    assert abs(q.mean() - vflat @ exact @ vflat) < 5 * np.sqrt(var / K)


def test_monte_carlo_fisher_is_a_fixed_psd_operator_and_microbatches_exactly():
    """The draws happen once: the operator is symmetric PSD, and chunking changes nothing."""
    model_fn, params, x = small_cnn()
    flat, unravel = ravel_pytree(params)
    key = jax.random.key(3)
    F = curvlib.fisher_matvec(model_fn, params, x, key=key, num_samples=3)
    D = dense(F, unravel, flat.size)
    assert np.allclose(D, D.T, atol=1e-13 * np.abs(D).max())
    assert np.linalg.eigvalsh(D).min() > -1e-12 * np.abs(D).max()
    # a sum of N * S rank-one terms
    assert np.linalg.matrix_rank(D, tol=1e-10 * np.abs(D).max()) <= N * 3
    Fmb = curvlib.fisher_matvec(model_fn, params, x, key=key, num_samples=3, microbatch_size=4)
    assert rel(dense(Fmb, unravel, flat.size), D) < 1e-12
    # a raw uint32 key works too; a different key gives a different estimate
    F2 = curvlib.fisher_matvec(model_fn, params, x, key=jax.random.PRNGKey(4), num_samples=3)
    assert rel(dense(F2, unravel, flat.size), D) > 1e-3


# --------------------------------------------------------- empirical Fisher


def test_empirical_fisher_is_mean_of_gradient_outer_products(model):
    name, model_fn, params, x, out, J, unravel = model
    labels = jnp.arange(N) % C

    def per_example(p, ex):
        xi, yi = ex
        return -jax.nn.log_softmax(model_fn(p, xi[None])[0])[yi] + 0.01 * jnp.sum(xi)

    G = jax.vmap(lambda ex: ravel_pytree(jax.grad(per_example)(params, ex))[0])((x, labels))
    G = np.asarray(G)  # (N, P): the dense per-example gradients
    oracle = G.T @ G / N
    P = J.shape[1]
    EF = curvlib.empirical_fisher_matvec(per_example, params, (x, labels))
    assert rel(dense(EF, unravel, P), oracle) < 1e-12
    if name != "mlp":
        return
    for kw in ({"mode": "recompute"}, {"microbatch_size": 4}):
        EFk = curvlib.empirical_fisher_matvec(per_example, params, (x, labels), **kw)
        assert rel(dense(EFk, unravel, P), oracle) < 1e-12


# ---------------------------------------------------------------- Jacobians


def test_jacobian_products_match_jax_jacobian(model):
    name, model_fn, params, x, out, J, unravel = model
    rng = np.random.default_rng(2)
    P = J.shape[1]
    Jv = curvlib.jacobian_matvec(model_fn, params, x)
    JTu = curvlib.jacobian_transpose_matvec(model_fn, params, x)
    apply = jax.jit(lambda mv, a: mv(a))
    for _ in range(2):
        v = rng.standard_normal(P)
        got = apply(Jv, unravel(jnp.asarray(v)))
        assert got.shape == out.shape
        assert rel(np.asarray(got).reshape(-1), J @ v) < 1e-12
        u = rng.standard_normal(out.shape)
        got = apply(JTu, jnp.asarray(u))
        assert jax.tree.structure(got) == jax.tree.structure(params)
        assert rel(np.asarray(ravel_pytree(got)[0]), J.T @ u.reshape(-1)) < 1e-12


def test_jacobian_products_on_pytree_outputs_with_aux():
    model_fn, params, x = tanh_mlp()

    def two_heads(p, x):
        logits = model_fn(p, x)
        return {"logits": logits, "energy": jnp.sum(logits**2, axis=1)}, {"note": jnp.ones(2)}

    flat, unravel = ravel_pytree(params)
    head = lambda f: ravel_pytree(two_heads(unravel(f), x)[0])[0]
    J = np.asarray(jax.jacfwd(head)(flat))
    _, unravel_out = ravel_pytree(two_heads(params, x)[0])
    v = np.random.default_rng(3).standard_normal(flat.size)
    u = np.random.default_rng(4).standard_normal(J.shape[0])
    Jv = curvlib.jacobian_matvec(two_heads, params, x, has_aux=True)(unravel(jnp.asarray(v)))
    assert rel(np.asarray(ravel_pytree(Jv)[0]), J @ v) < 1e-12
    JTu = curvlib.jacobian_transpose_matvec(two_heads, params, x, has_aux=True)
    assert rel(np.asarray(ravel_pytree(JTu(unravel_out(jnp.asarray(u))))[0]), J.T @ u) < 1e-12
    with pytest.raises(ValueError, match=r"cotangent\['energy'\] has shape \(5,\)"):
        JTu({"logits": jnp.ones((N, C)), "energy": jnp.ones(5)})


def test_new_points_reuse_one_compilation():
    """Operators built at new points (new parameters, new batch) are equal pytree types:
    a jitted consumer compiles once per operator kind."""
    model_fn, params, x = tanh_mlp()
    per_example = lambda p, ex: jnp.sum(model_fn(p, ex[None]) ** 2)
    out_loss = lambda o: jnp.mean(o**2)  # defined once (a new lambda per call is a new program)
    builders = {
        "fisher": lambda p, x: curvlib.fisher_matvec(model_fn, p, x),
        "mc fisher": lambda p, x: curvlib.fisher_matvec(model_fn, p, x, key=jax.random.key(0)),
        "gaussian": lambda p, x: curvlib.fisher_matvec(model_fn, p, x, likelihood="gaussian"),
        "ggn": lambda p, x: curvlib.ggn_matvec(model_fn, out_loss, p, x),
        "empirical fisher": lambda p, x: curvlib.empirical_fisher_matvec(per_example, p, x),
        "jacobian": lambda p, x: curvlib.jacobian_matvec(model_fn, p, x),
    }
    v = jax.tree.map(jnp.ones_like, params)
    for name, build in builders.items():
        traces = []

        @jax.jit
        def apply(mv, v, traces=traces):
            traces.append(1)
            return mv(v)

        for s in range(3):
            p = jax.tree.map(lambda a, s=s: a * (1 + 0.1 * s), params)
            apply(build(p, x + s), v)
        assert len(traces) == 1, name
