"""Edges of curvlib with flax nnx and linen models, each against an independent oracle.

Each test is a case a flax user meets: a model whose parameters are one vector, a whole
module (or linen's ``variables``) passed where the ``nnx.Param`` state belongs, a model that
mixes bfloat16 and float32 parameters under K-FAC.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvlib

nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")


class _Regression(nnx.Module):
    """Linear regression whose only parameter is one vector."""

    def __init__(self, n: int):
        self.w = nnx.Param(jnp.zeros(n))

    def __call__(self, x):
        return x @ self.w


def test_hutchinson_on_a_single_vector_param_state():
    # an nnx model with one 1-D parameter: the State holds one leaf; the estimators' eager
    # answer read the probes in one layout and the products in another and raised TypeError
    model = _Regression(5)
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.PRNGKey(0), (20, 5))
    y = jnp.sin(x[:, 0])
    loss = lambda p, x, y: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
    H = curvlib.hessian_matvec(loss, params, x, y)
    dense = 2 * x.T @ x / 20

    # 30 products, 10 of them sketch the 5-dim space: Hutch++ is the exact trace
    tr = curvlib.hutchinson_trace(H, params, jax.random.PRNGKey(1), 30)
    np.testing.assert_allclose(tr.estimate, np.trace(dense), rtol=1e-5)
    hutch = curvlib.hutchinson_trace(H, params, jax.random.PRNGKey(1), 4, method="hutchinson")
    fused = jax.jit(lambda p: curvlib.hutchinson_trace(H, p, jax.random.PRNGKey(1), 4,
                                                       method="hutchinson"))(params)
    np.testing.assert_allclose(hutch.estimate, fused.estimate, rtol=1e-6)

    diag = curvlib.hutchinson_diag(H, params, jax.random.PRNGKey(2), 6)
    assert isinstance(diag.estimate, nnx.State)
    fused = jax.jit(lambda p: curvlib.hutchinson_diag(H, p, jax.random.PRNGKey(2), 6))(params)
    np.testing.assert_allclose(diag.estimate["w"][...], fused.estimate["w"][...], rtol=1e-6)


class _WithBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.l2 = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.bn(jnp.tanh(self.l1(x))))


def test_whole_nnx_module_or_state_with_batch_stats_is_refused():
    # every leaf of a BatchNorm model is floating: the whole module (or nnx.state(model))
    # was accepted and its running mean and variance silently became curvature directions
    # (top Hessian eigenvalue 2.78 instead of the parameters' 2.19)
    model = _WithBatchNorm(nnx.Rngs(0))
    x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    loss_of_model = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    with pytest.raises(ValueError, match=r"`params\.bn\.mean` must be a parameter \(an "
                                         r"`nnx\.Param`\); got an `nnx\.BatchStat`"):
        curvlib.hessian_matvec(loss_of_model, model, x, y)
    with pytest.raises(ValueError, match=r"scale_by_newton_cg\.init: `params\['bn'\]\['mean'\]"
                                         r"` must be a parameter.*nnx\.split\(model, nnx\.Param"):
        curvlib.newton_cg().init(nnx.state(model))
    with pytest.raises(ValueError, match="must be a parameter"):
        nnx.Optimizer(model, curvlib.newton_cg(), wrt=nnx.Variable)
    # the Param state alone is fine
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p, x, y: loss_of_model(nnx.merge(graphdef, p, rest), x, y)
    curvlib.hessian_matvec(loss, params, x, y)
    curvlib.newton_cg().init(params)


def test_linen_variables_with_batch_stats_are_refused():
    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(2)(linen.BatchNorm(use_running_average=True)(x))

    net = Net()
    variables = net.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"`params` must be the parameters alone; got flax "
                                         r"linen `variables` with the collections \['params', "
                                         r"'batch_stats'\]"):
        curvlib.newton_cg().init(variables)
    curvlib.newton_cg().init(variables["params"])


def test_kfac_damping_step_with_bfloat16_and_float32_params():
    # a bfloat16 layer beside float32 norm parameters (nnx.Linear(param_dtype=bfloat16),
    # nnx.LayerNorm): K-FAC's damping step (`kfac(learning_rate)` every `damping_every`
    # steps) linearised the model with every tangent cast to the factors' float32 and jax
    # raised "tangent aval float32[2] for primal aval bfloat16[2]"
    from curvlib.kronecker import transform

    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
    y = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    params = {"w": jnp.full((3, 2), 0.5, jnp.bfloat16), "b": jnp.zeros(2, jnp.bfloat16),
              "s": jnp.ones(2, jnp.float32)}
    model = lambda p, x: (x @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32)) * p["s"]
    loss = lambda p: 0.5 * jnp.mean(jnp.sum((model(p, x) - y) ** 2, -1))
    g = jax.grad(loss)(params)
    u = jax.tree.map(lambda t: 0.5 * t, g)
    lam, rho, quad, adapted = transform.adapt_damping(
        model, "gaussian", 1.0, loss, params, {"x": x}, {}, g, u, None, 1.0, loss(params),
        0.5, 1e-6, 1e6, jnp.float32)
    # oracle: the Gauss-Newton (= Fisher of the Gaussian likelihood) quadratic model at u
    ju = jax.jvp(lambda p: model(p, x), (params,), (u,))[1]
    gu = sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32))
             for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(u), strict=True))
    np.testing.assert_allclose(quad, -gu + 0.5 * jnp.sum(ju**2) / 8, rtol=1e-5)
    assert bool(adapted) and np.isfinite(float(rho)) and float(lam) in (0.5, 1.0, 2.0)


def test_curvature_info_of_nnx_state_says_what_to_pass():
    # `nnx.state(optimizer)` (what a checkpoint holds) keeps the values but not the state's
    # types: the bare "expected one TrackCurvatureInfo in the state; found 0." named neither
    # the argument nor what to pass
    class Lin(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((2, 2)))

        def __call__(self, x):
            return x @ self.w

    model = Lin()
    tracker = curvlib.track_curvature(every=1, k=1, key=jax.random.PRNGKey(0), num_probes=0)
    optimizer = nnx.Optimizer(model, optax.chain(tracker, optax.sgd(0.1)), wrt=nnx.Param)
    graphdef, _ = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(jnp.eye(2)) ** 2)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.eye(2)) ** 2))(model)
    optimizer.update(model, grads, value_fn=loss)
    info = curvlib.curvature_info(optimizer.opt_state)
    np.testing.assert_allclose(info.eigenvalues, [2.0], rtol=1e-5)  # H = 2 I
    with pytest.raises(KeyError, match=r"`state` must hold one TrackCurvatureInfo.*found 0\. "
                                       r"`nnx\.state\(optimizer\)`.*`optimizer\.opt_state`"):
        curvlib.curvature_info(nnx.state(optimizer))


def test_linen_train_state_without_forwarding_names_the_cause():
    # the stock `TrainState.apply_gradients(grads=g, value_fn=loss)` hands `value_fn` to
    # `replace`, never to `tx.update`: the error told the user to pass the `value_fn` they
    # had passed
    from flax.training import train_state

    net = linen.Dense(2)
    x = jnp.ones((4, 3))
    params = net.init(jax.random.PRNGKey(0), x)["params"]
    loss = lambda p, x: jnp.mean(net.apply({"params": p}, x) ** 2)
    state = train_state.TrainState.create(apply_fn=net.apply, params=params,
                                          tx=curvlib.newton_cg())
    with pytest.raises(TypeError, match=r"needs the loss.*`TrainState\.apply_gradients"
                                        r"\(grads=\.\.\., \*\*kwargs\)` does not"):
        state.apply_gradients(grads=jax.grad(loss)(params, x), value_fn=loss, x=x)
