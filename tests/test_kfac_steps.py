"""Each named step of ``scale_by_kfac`` alone, against an independent oracle (float64).

* ``batch_statistics``: ``A (x) G`` of a dense layer is the dense Fisher built from
  ``jax.jacfwd`` and the likelihood's Hessian; a NaN batch is flagged;
* ``moving_average``: the closed form, and a non-finite batch keeps the average;
* ``refresh``: Cholesky inverses and eigendecompositions of the bias-corrected
  factors against numpy (``pi`` by its closed form); EK-FAC restarts at ``lA lG^T``;
* ``precondition`` with a refreshed preconditioner: the dense Kronecker solve;
* ``fisher_gram``: ``T^T F T`` with ``F = sum J^T (diag p - p p^T) J / n`` from ``jacfwd``;
* ``model_coefficients``: the 2x2 solve and its constrained forms, by ``numpy.linalg``;
* ``fixed_coefficients``, ``reduction_ratio``, ``levenberg_marquardt``, ``guard``:
  closed forms;
* the state: two ``init`` calls share one transform; a state rebuilt from numpy leaves or
  from its flattened leaves, stepped by a transform that never saw ``init``, gives the
  same updates; ``Placement`` pickles and is left out of flax checkpoints;
* ``KfacInfo``'s shared status fields.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvlib
from curvlib.kronecker import curvature as cv
from curvlib.kronecker import kfac, scale_by_kfac
from curvlib.kronecker import transform as T


def _spd(rng, d, scale=1.0):
    m = rng.standard_normal((d, d))
    return scale * (m @ m.T / d + 0.1 * np.eye(d))


def _linear(p, x):
    return x @ p["w"]


def _dense_layer(n=10, d_in=4, d_out=3):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, d_in)))
    params = {"w": jnp.asarray(rng.standard_normal((d_in, d_out)) / 2)}
    return params, x, cv._find_layers(_linear, params, (x,))


# ------------------------------------------------------------------ step 1


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
def test_batch_statistics_kronecker_product_is_the_dense_fisher(likelihood):
    params, x, layers = _dense_layer()
    f, scales, ok = T.batch_statistics(layers, params, {"x": x}, None, None,
                                       likelihood=likelihood, num_samples=1,
                                       convention="reduce", variance=2.0, dt=jnp.float64)
    assert bool(ok) and scales == ()
    J = np.asarray(jax.jacfwd(lambda w: _linear({"w": w}, x))(params["w"]))  # (n, o, i, o)
    n, o = J.shape[:2]
    J = J.reshape(n, o, -1)
    out = np.asarray(_linear(params, x))
    if likelihood == "gaussian":
        H = np.broadcast_to(np.eye(o) / 2.0, (n, o, o))
    else:
        p = np.exp(out - out.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        H = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    F = np.einsum("nai,nab,nbj->ij", J, H, J) / n
    if likelihood == "gaussian":  # A (x) G is exact for one dense layer and a constant H
        np.testing.assert_allclose(np.kron(f.A[0], f.G[0]), F, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(f.A[0], np.asarray(x).T @ np.asarray(x) / n, rtol=1e-12)
    np.testing.assert_allclose(f.G[0], H.mean(0), rtol=1e-12, atol=1e-15)
    _, _, bad = T.batch_statistics(layers, params, {"x": x.at[0, 0].set(jnp.nan)}, None, None,
                                   likelihood=likelihood, num_samples=1, convention="reduce",
                                   variance=2.0, dt=jnp.float64)
    assert not bool(bad)


def test_moving_average_closed_form_and_non_finite_batch_kept():
    rng = np.random.default_rng(1)
    old = {"a": jnp.asarray(rng.standard_normal((3, 3))), "b": (jnp.asarray(rng.random(4)),)}
    new = jax.tree.map(lambda t: t * 3.0 - 1.0, old)
    got = T.moving_average(old, new, jnp.asarray(True), 0.8)
    for g, o, x in zip(jax.tree.leaves(got), jax.tree.leaves(old), jax.tree.leaves(new),
                       strict=True):
        np.testing.assert_allclose(g, 0.8 * np.asarray(o) + 0.2 * np.asarray(x), rtol=1e-15)
    kept = T.moving_average(old, new, jnp.asarray(False), 0.8)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(old),
                                                    strict=True))
    w = T.moving_average(jnp.asarray(0.36), jnp.ones(()), jnp.asarray(True), 0.8)
    assert float(w) == pytest.approx(0.8 * 0.36 + 0.2, rel=1e-15)  # 1 - 0.8^3


# ------------------------------------------------------------------ steps 2 and 3


def _factors(rng, d_in=4, d_out=3):
    return cv.Factors((jnp.asarray(_spd(rng, d_in)),), (jnp.asarray(_spd(rng, d_out, 3.0)),), ())


def test_refresh_against_numpy_and_precondition_is_the_dense_kronecker_solve():
    params, _, layers = _dense_layer()
    rng = np.random.default_rng(2)
    f = _factors(rng)
    w, lam = jnp.asarray(0.36), jnp.asarray(0.05)
    A, G = np.asarray(f.A[0]) / 0.36, np.asarray(f.G[0]) / 0.36
    g = {"w": jnp.asarray(rng.standard_normal((4, 3)))}
    gv = np.asarray(g["w"]).reshape(-1)  # row-major vec: (A (x) G) vec(W) = vec(A W G)
    # factored: pi from its closed form, Cholesky inverses, two products
    inv, scales = T.refresh(layers, f, w, lam, "factored")
    pi = np.sqrt((np.trace(A) / 4) / (np.trace(G) / 3))
    Ai = np.linalg.inv(A + pi * np.sqrt(0.05) * np.eye(4))
    Gi = np.linalg.inv(G + np.sqrt(0.05) / pi * np.eye(3))
    assert scales == ()
    np.testing.assert_allclose(inv.A[0], Ai, rtol=1e-10)
    np.testing.assert_allclose(inv.G[0], Gi, rtol=1e-10)
    got = cv.precondition(layers, inv, g, lam)["w"]
    np.testing.assert_allclose(np.asarray(got).reshape(-1), np.kron(Ai, Gi) @ gv, rtol=1e-10)
    # exact: eigendecompositions, the damped Kronecker block inverted exactly
    eig, scales = T.refresh(layers, f, w, lam, "exact")
    QA, lA = np.asarray(eig.QA[0]), np.asarray(eig.lA[0])
    np.testing.assert_allclose(QA @ np.diag(lA) @ QA.T, A, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lA, np.linalg.eigvalsh(A), rtol=1e-10)
    np.testing.assert_allclose(eig.lG[0], np.linalg.eigvalsh(G), rtol=1e-10)
    got = cv.precondition(layers, eig, g, lam)["w"]
    want = np.linalg.solve(np.kron(A, G) + 0.05 * np.eye(12), gv)
    np.testing.assert_allclose(np.asarray(got).reshape(-1), want, rtol=1e-10)
    # EK-FAC: the same basis, scalings restarted at lA lG^T
    eig2, scales = T.refresh(layers, f, w, lam, "ekfac")
    np.testing.assert_allclose(scales[0], np.outer(lA, eig.lG[0]), rtol=1e-12)
    np.testing.assert_allclose(eig2.QG[0], eig.QG[0], rtol=0, atol=0)


# ------------------------------------------------------------------ step 4


def _mlp():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
    params = {"w1": jax.random.normal(k1, (3, 5)) / 2, "b1": jnp.full(5, 0.1),
              "w2": jax.random.normal(k2, (5, 4)) / 2}
    x = jax.random.normal(k3, (7, 3))
    return params, x


def _mlp_model(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def test_fisher_gram_is_the_dense_fisher_in_the_tangents():
    params, x = _mlp()
    flat, unravel = ravel_pytree(params)
    rng = np.random.default_rng(5)
    T1, T2 = (unravel(jnp.asarray(rng.standard_normal(flat.size))) for _ in range(2))
    tangents = jax.tree.map(lambda a, b: jnp.stack([a, b]), T1, T2)
    gram = T.fisher_gram(_mlp_model, "categorical", 1.0, params, {"x": x}, tangents, jnp.float64)
    J = np.asarray(jax.jacfwd(lambda v: _mlp_model(unravel(v), x))(flat))  # (n, c, P)
    out = np.asarray(_mlp_model(params, x))
    p = np.exp(out - out.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    F = sum(J[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J[i] for i in range(len(p)))
    F /= len(p)
    D = np.stack([ravel_pytree(T1)[0], ravel_pytree(T2)[0]], 1)
    np.testing.assert_allclose(np.array(gram, dtype=float), D.T @ F @ D, rtol=1e-10)


def _two_by_two(rng):
    D = rng.standard_normal((6, 2))
    F = _spd(rng, 6)
    gv = rng.standard_normal(6)
    fisher = tuple(tuple(jnp.asarray(v) for v in row) for row in D.T @ F @ D)
    inner = tuple(tuple(jnp.asarray(v) for v in row) for row in D.T @ D)
    return D, F, gv, fisher, inner, tuple(jnp.asarray(v) for v in D.T @ gv)


def test_model_coefficients_solve_the_two_by_two_system_and_its_constrained_forms():
    rng = np.random.default_rng(6)
    D, F, gv, fisher, inner, grad = _two_by_two(rng)
    lam = 0.3
    M = D.T @ (F + lam * np.eye(6)) @ D
    b = D.T @ gv
    alpha, mu, quad = T.model_coefficients(fisher, inner, grad, lam)
    c = np.linalg.solve(M, b)
    np.testing.assert_allclose([alpha, mu], c, rtol=1e-11)
    u = D @ c
    np.testing.assert_allclose(quad, -gv @ u + 0.5 * u @ F @ u, rtol=1e-11)
    # alpha fixed: mu minimises the damped model along v
    alpha, mu, _ = T.model_coefficients(fisher, inner, grad, lam, fixed_alpha=jnp.asarray(0.7))
    assert float(alpha) == 0.7
    np.testing.assert_allclose(mu, (b[1] - 0.7 * M[0, 1]) / M[1, 1], rtol=1e-12)
    # mu fixed: alpha minimises it along Delta
    alpha, mu, _ = T.model_coefficients(fisher, inner, grad, lam, fixed_mu=jnp.asarray(0.9))
    assert float(mu) == 0.9
    np.testing.assert_allclose(alpha, (b[0] - 0.9 * M[0, 1]) / M[0, 0], rtol=1e-12)
    # no previous step (v = 0): mu = 0, alpha = b1 / M11
    z = jnp.zeros(())
    fisher0 = ((fisher[0][0], z), (z, z))
    inner0 = ((inner[0][0], z), (z, z))
    alpha, mu, quad = T.model_coefficients(fisher0, inner0, (grad[0], z), lam)
    np.testing.assert_allclose(alpha, b[0] / M[0, 0], rtol=1e-12)
    assert float(mu) == 0.0
    np.testing.assert_allclose(quad, -alpha * b[0] + 0.5 * alpha**2 * D[:, 0] @ F @ D[:, 0],
                               rtol=1e-12)


def test_fixed_coefficients_and_the_norm_constraint():
    g = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([[3.0]])}
    delta = jax.tree.map(lambda t: 2.0 * t, g)  # g'Delta = 28
    a, m, q = T.fixed_coefficients(0.5, 0.9, g, delta, None, jnp.float64)
    assert (float(a), float(m), float(q)) == (0.5, 0.9, 0.0)
    a, _, _ = T.fixed_coefficients(0.5, 0.9, g, delta, 1.0, jnp.float64)  # 0.25 * 28 = 7 > 1
    np.testing.assert_allclose(a, 0.5 * np.sqrt(1.0 / 7.0), rtol=1e-14)
    np.testing.assert_allclose(float(a) ** 2 * 28.0, 1.0, rtol=1e-13)
    a, _, _ = T.fixed_coefficients(0.5, 0.9, g, delta, 10.0, jnp.float64)  # inactive
    assert float(a) == 0.5


# ------------------------------------------------------------------ step 5


def test_reduction_ratio_and_levenberg_marquardt_closed_forms():
    f = lambda v: jnp.asarray(v, jnp.float64)
    assert float(T.reduction_ratio(f(0.4), f(1.0), f(-0.8))) == pytest.approx(0.75)
    assert float(T.reduction_ratio(f(jnp.nan), f(1.0), f(-0.8))) == -np.inf
    assert float(T.reduction_ratio(f(1.0), f(1.0), f(0.0))) == 0.0  # no predicted decrease
    lm = lambda lam, rho, value=1.0: float(T.levenberg_marquardt(f(lam), f(rho), f(value), 0.5,
                                                                   1e-3, 10.0))
    assert lm(1.0, 0.9) == 0.5 and lm(1.0, 0.1) == 2.0 and lm(1.0, 0.5) == 1.0
    assert lm(1.0, 0.75) == 1.0 and lm(1.0, 0.25) == 1.0  # strict inequalities
    assert lm(8.0, -np.inf) == 10.0 and lm(1.5e-3, 0.9) == 1e-3  # clipped
    assert lm(1.0, 0.9, value=np.nan) == 1.0  # a non-finite loss keeps the damping


# ------------------------------------------------------------------ step 6


def test_guard_and_step_is_finite():
    u = {"a": jnp.asarray([1.0, jnp.nan]), "b": jnp.asarray(2.0)}
    u_prev = {"a": jnp.asarray([5.0, 6.0]), "b": jnp.asarray(7.0)}
    g = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones((), jnp.float32)}
    one = jnp.asarray(1.0)
    assert not bool(T.step_is_finite(g, u, one, one, one, True))
    ok = jax.tree.map(lambda t: jnp.nan_to_num(t), u)
    assert bool(T.step_is_finite(g, ok, one, one, jnp.asarray(jnp.nan), False))
    assert not bool(T.step_is_finite(g, ok, one, one, jnp.asarray(jnp.nan), True))
    assert not bool(T.step_is_finite(g, ok, jnp.asarray(jnp.inf), one, one, True))
    out, vel = T.guard(jnp.asarray(False), u, u_prev, g)
    assert jax.tree.map(lambda t: t.dtype, out) == {"a": jnp.float32, "b": jnp.float32}
    assert all(not np.any(t) for t in jax.tree.leaves(out))
    assert vel is not u and np.array_equal(vel["a"], u_prev["a"])
    out, vel = T.guard(jnp.asarray(True), ok, u_prev, g)
    np.testing.assert_array_equal(out["a"], np.float32([1.0, 0.0]))
    np.testing.assert_array_equal(vel["a"], ok["a"])


# ------------------------------------------------------------------ the state


def _width_params(width, seed):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"w1": jax.random.normal(k1, (3, width)) / 2, "b1": jnp.zeros(width),
            "w2": jax.random.normal(k2, (width, 4)) / 2}


def _loss(p, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_mlp_model(p, x), y))


def _data():
    k1, k2 = jax.random.split(jax.random.PRNGKey(8))
    return jax.random.normal(k1, (9, 3)), jax.random.randint(k2, (9,), 0, 4)


def _make():
    x, _ = _data()
    return scale_by_kfac(_mlp_model, example_inputs={"x": x}, damping=0.1, damping_every=2,
                         inverse_every=2, key=jax.random.PRNGKey(2))


def _run(tx, p, s, steps):
    x, y = _data()
    us = []
    for _ in range(steps):
        value, g = jax.value_and_grad(_loss)(p, x, y)
        u, s = tx.update(g, s, p, value=value, value_fn=_loss, x=x, y=y)
        p = optax.apply_updates(p, jax.tree.map(lambda t: -t, u))
        us.append(u)
    return p, s, us


def _same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(s, t) for s, t in zip(la, lb, strict=True))


def test_two_inits_share_one_transform_and_rebuilt_states_step_identically():
    pa, pb = _width_params(5, 0), _width_params(7, 1)
    ref_a = _run(_make(), pa, _make().init(pa), 3)
    ref_b = _run(_make(), pb, _make().init(pb), 3)
    tx = _make()
    sa, sb = tx.init(pa), tx.init(pb)  # the second init must not disturb the first state
    qa, qb, ua, ub = pa, pb, [], []
    for _ in range(3):  # alternately, on one transform
        qa, sa, u = _run(tx, qa, sa, 1)
        ua += u
        qb, sb, u = _run(tx, qb, sb, 1)
        ub += u
    assert _same(ua, ref_a[2]) and _same(ub, ref_b[2])
    assert _same(sa, ref_a[1]) and _same(sb, ref_b[1])
    # a state rebuilt from numpy leaves, or from its flattened leaves, in a transform that
    # never saw `init`, continues exactly
    p1, s1, _ = _run(_make(), pa, _make().init(pa), 1)
    want = _run(_make(), p1, s1, 2)
    as_numpy = jax.tree.map(np.asarray, s1)
    leaves, treedef = jax.tree.flatten(s1)
    rebuilt = jax.tree.unflatten(treedef, [np.asarray(t) for t in leaves])
    for s in (as_numpy, rebuilt):
        got = _run(_make(), p1, s, 2)
        assert _same(got[2], want[2]) and _same(got[1], want[1])


def test_placement_is_static_pickles_and_is_left_out_of_flax_checkpoints():
    serialization = pytest.importorskip("flax.serialization")
    mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    placement = T.Placement((s, s), (s,))
    assert pickle.loads(pickle.dumps(placement)) == placement
    pa = _width_params(5, 0)
    state = _make().init(pa)
    assert state.placement is None  # one device: nothing to place
    placed = state._replace(placement=placement)
    assert jax.tree.leaves(placed) == jax.tree.leaves(state)  # no leaves of its own
    assert jax.tree.structure(placed) != jax.tree.structure(state)
    T._register_flax_placement()
    restored = serialization.from_bytes(placed, serialization.to_bytes(placed))
    assert restored.placement == placement and _same(restored, state)


def test_info_carries_the_shared_status_fields():
    x, y = _data()
    p = _width_params(5, 0)
    g = jax.grad(_loss)(p, x, y)

    def info(tx, xb=x):
        s = tx.init(p)
        return tx.update(g, s, p, value_fn=_loss, x=xb, y=y)[1].info

    i = info(_make())  # quadratic model: J Delta and J u_prev
    assert bool(i.finite) and bool(i.converged) and int(i.status) == curvlib.Status.SUCCESS
    assert int(i.num_matvecs) == 2 and i.num_matvecs.dtype == jnp.int32
    fixed = dict(example_inputs={"x": x}, learning_rate=0.1, momentum=0.0, damping=0.1)
    i = info(scale_by_kfac(_mlp_model, damping_every=1, **fixed))  # q(-u) for rho: J u
    assert bool(i.damping_adapted) and int(i.num_matvecs) == 1
    i = info(scale_by_kfac(_mlp_model, damping_every=2, **fixed))  # no adaptation this step
    assert not bool(i.damping_adapted) and int(i.num_matvecs) == 0
    i = info(_make(), x.at[0, 0].set(jnp.nan))
    assert bool(i.skipped) and not bool(i.finite) and not bool(i.converged)
    assert int(i.status) == curvlib.Status.NONFINITE
    with pytest.raises(curvlib.CurvatureError, match="NONFINITE"):
        curvlib.raise_if_failed(i)
    # an adaptation step that is skipped keeps the damping and says it did (rho not computed)
    adapt = scale_by_kfac(_mlp_model, damping_every=1, **fixed)
    i = info(adapt, x.at[0, 0].set(jnp.nan))
    assert bool(i.skipped) and not bool(i.damping_adapted) and float(i.rho) == 0.0
    assert float(adapt.update(g, adapt.init(p), p, value_fn=_loss, x=x.at[0, 0].set(jnp.nan),
                              y=y)[1].damping) == 0.1
    # a fresh state's info: no step yet, nothing failed (as every transform's)
    i = kfac(model_fn=_mlp_model, example_inputs={"x": x}).init(p)[0].info
    assert int(i.status) == curvlib.Status.SUCCESS and bool(i.converged) and bool(i.finite)
