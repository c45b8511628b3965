"""K-FAC's one-pass gradient and statistics (issue 22): ``opt.value_and_grad`` (float64).

* the one-pass step equals the two-pass step (``jax.value_and_grad`` then
  ``update`` without ``statistics``): parameters, factors, inverses, velocity
  and ``KfacInfo``, for the exact and the Monte-Carlo Fisher, factored and
  EK-FAC inverses, statistics every step and every other step, under
  ``jax.jit``, for ``kfac`` and for ``scale_by_kfac`` inside a user's
  ``optax.chain``;
* the one-pass gradient equals ``jax.grad`` for dense layers with biases, a
  diagonal leaf, an embedding and a shared (weight-tied) layer;
* the one-pass step runs the model forward once: the step's jaxpr holds one
  ``tanh`` per ``tanh`` of the model (the two-pass step holds two), and with the
  adaptive step's quadratic model the compiled step still holds one;
* statistics that do not match the layers, a wrong type, and a state without a
  K-FAC state raise named errors.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvlib.kronecker import KfacStatistics, kfac, scale_by_kfac
from curvlib.kronecker import curvature as cv
from curvlib.kronecker.discovery import _find_layers


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def model(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"]) * p["s"]  # "s": a diagonal leaf
    return h @ p["w2"]


def out_loss(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def loss(p, x, y):
    return out_loss(model(p, x), y)


def _problem(n=10):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {"w1": jax.random.normal(k1, (4, 5)) / 2, "b1": jnp.zeros(5), "s": jnp.ones(5),
         "w2": jax.random.normal(k2, (5, 3)) / 2}
    x = jax.random.normal(k3, (n, 4))
    y = jax.random.randint(k4, (n,), 0, 3)
    return p, x, y


def _steps(opt, p, x, y, num, *, one_pass):
    @jax.jit
    def step(p, s):
        if one_pass:
            (v, g), st = opt.value_and_grad(out_loss)(p, s, x=x, y=y)
        else:
            (v, g), st = jax.value_and_grad(loss)(p, x, y), None
        u, s = opt.update(g, s, p, value=v, value_fn=loss, statistics=st, x=x, y=y)
        return optax.apply_updates(p, u), s, v, g

    s = opt.init(p)
    out = []
    for _ in range(num):
        p, s, v, g = step(p, s)
        out.append((p, s, v, g))
    return out


def _assert_close(a, b, tol=1e-12):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):
            scale = max(1.0, float(np.max(np.abs(y), initial=0.0)))
            np.testing.assert_allclose(x, y, rtol=0, atol=tol * scale)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("key", [None, 1], ids=["exact", "monte-carlo"])
@pytest.mark.parametrize("inverse,statistics_every", [("factored", 1), ("factored", 2),
                                                      ("ekfac", 2)])
def test_one_pass_equals_two_pass(key, inverse, statistics_every):
    p, x, y = _problem()
    opt = kfac(model_fn=model, example_inputs={"x": x}, inverse=inverse,
               key=None if key is None else jax.random.PRNGKey(key),
               statistics_every=statistics_every, inverse_every=3, damping_every=2)
    one = _steps(opt, p, x, y, 6, one_pass=True)
    two = _steps(opt, p, x, y, 6, one_pass=False)
    for (p1, s1, v1, g1), (p2, s2, v2, g2) in zip(one, two, strict=True):
        _assert_close((v1, g1), (v2, g2), 1e-14)
        _assert_close(s1[0].factors, s2[0].factors, 1e-14)
        _assert_close((p1, s1), (p2, s2))
    info = one[-1][1][0].info
    assert bool(info.statistics_updated) == (5 % statistics_every == 0)
    assert np.asarray([s[0].info.statistics_updated for _, s, _, _ in one]).tolist() == [
        c % statistics_every == 0 for c in range(6)]


def test_one_pass_inside_a_users_chain():
    p, x, y = _problem()
    direction = scale_by_kfac(model, example_inputs={"x": x}, key=jax.random.PRNGKey(3),
                              learning_rate=0.5, momentum=0.5, damping_every=2)
    opt = optax.chain(optax.clip_by_global_norm(10.0), direction, optax.scale(-1.0))

    def run(one_pass):
        @jax.jit
        def step(p, s):
            if one_pass:
                (v, g), st = direction.value_and_grad(out_loss)(p, s, x=x, y=y)
            else:
                (v, g), st = jax.value_and_grad(loss)(p, x, y), None
            u, s = opt.update(g, s, p, value=v, value_fn=loss, statistics=st, x=x, y=y)
            return optax.apply_updates(p, u), s

        s = opt.init(p)
        q = p
        for _ in range(4):
            q, s = step(q, s)
        return q, s

    _assert_close(run(True), run(False))


def _tied(p, ids):
    h = p["emb"][ids]  # (n, t, d): an embedding
    h = jnp.tanh(h @ p["w"] + p["b"])  # a layer shared over positions
    h = jnp.tanh(h @ p["w"] + p["b"])  # ... and applied twice
    return jnp.mean(h, axis=1) @ p["out"] * p["g"]


@pytest.mark.parametrize("which", ["mlp", "embedding and shared layer"])
def test_one_pass_gradient_is_the_gradient(which):
    if which == "mlp":
        p, x, y = _problem()
        fn, args = model, (x,)
    else:
        k = jax.random.split(jax.random.PRNGKey(5), 5)
        p = {"emb": jax.random.normal(k[0], (7, 4)), "w": jax.random.normal(k[1], (4, 4)) / 2,
             "b": jnp.zeros(4), "out": jax.random.normal(k[2], (4, 3)), "g": jnp.ones(3)}
        x = jax.random.randint(k[3], (6, 5), 0, 7)
        y = jax.random.randint(k[4], (6,), 0, 3)
        fn, args = _tied, (x,)
    layers = _find_layers(fn, p, args)
    value, grads, outs, rows_a, rows_g, dsq = jax.jit(lambda p: cv.value_grad_and_rows(
        layers, p, cv.batch_leaves(args), lambda o: out_loss(o, y),
        cv.likelihood_cotangents("categorical", 2, 1.0),
        keys=jax.random.split(jax.random.PRNGKey(0), y.shape[0])))(p)
    v2, g2 = jax.value_and_grad(lambda p: out_loss(fn(p, *args), y))(p)
    _assert_close((value, grads), (v2, g2), 1e-14)
    assert rows_g[0].shape[1] == 2  # the statistics' rows only (the loss row is dropped)
    # the statistics' rows equal the two-pass ones (same keys)
    _, ra, rg, d = cv.layer_rows(layers, p, cv.batch_leaves(args),
                                 cv.likelihood_cotangents("categorical", 2, 1.0),
                                 keys=jax.random.split(jax.random.PRNGKey(0), y.shape[0]))
    _assert_close((rows_a, rows_g, dsq), (ra, rg, d), 1e-14)


def _count(jaxpr, name):
    """Occurrences of primitive ``name`` in a jaxpr and its sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, name)
    return total


def _one_and_two_pass_steps(opt, x, y):
    """``(one, two)``: ``(p, s) -> update`` from the one-pass statistics, and from a separate
    gradient pass (``update`` then takes its own statistics)."""

    def one(p, s):
        (v, g), st = opt.value_and_grad(out_loss)(p, s, x=x, y=y)
        return opt.update(g, s, p, value=v, statistics=st, x=x, y=y)

    def two(p, s):
        v, g = jax.value_and_grad(loss)(p, x, y)
        return opt.update(g, s, p, value=v, x=x, y=y)

    return one, two


@pytest.mark.parametrize("key", [None, 1], ids=["exact", "monte-carlo"])
def test_one_pass_runs_the_model_forward_once(key):
    """One ``tanh`` in the model: one in the one-pass step, two in the two-pass step.

    Fixed learning rate and momentum, no damping adaptation, ``value=`` passed: the
    step needs no other forward pass. A two-pass implementation (the gradient's
    forward, then the statistics' own) holds two.
    """
    p, x, y = _problem()
    opt = kfac(0.1, momentum=0.5, adaptive_damping=False, model_fn=model,
               example_inputs={"x": x}, key=None if key is None else jax.random.PRNGKey(key))
    s = opt.init(p)

    one, two = _one_and_two_pass_steps(opt, x, y)

    assert _count(jax.make_jaxpr(one)(p, s).jaxpr, "tanh") == 1
    assert _count(jax.make_jaxpr(two)(p, s).jaxpr, "tanh") == 2


def test_statistics_that_do_not_match_raise():
    p, x, y = _problem()
    opt = kfac(model_fn=model, example_inputs={"x": x}, key=jax.random.PRNGKey(0))
    s = opt.init(p)
    (v, g), st = opt.value_and_grad(out_loss)(p, s, x=x, y=y)
    with pytest.raises(TypeError, match="must be the KfacStatistics returned"):
        opt.update(g, s, p, value=v, value_fn=loss, statistics=st.factors, x=x, y=y)
    bad = KfacStatistics(st.factors._replace(A=(st.factors.A[0][:-1, :-1],) + st.factors.A[1:]),
                         st.scales, st.finite)
    with pytest.raises(ValueError, match="`statistics` do not match this model's layers"):
        opt.update(g, s, p, value=v, value_fn=loss, statistics=bad, x=x, y=y)
    # statistics of another model (no diagonal leaf) for this state
    q = {k: v for k, v in p.items() if k != "s"}
    other = kfac(model_fn=lambda q, x: jnp.tanh(x @ q["w1"] + q["b1"]) @ q["w2"],
                 example_inputs={"x": x}, key=jax.random.PRNGKey(0))
    (_, _), st2 = other.value_and_grad(out_loss)(q, other.init(q), x=x, y=y)
    with pytest.raises(ValueError, match="do not match"):
        opt.update(g, s, p, value=v, value_fn=loss, statistics=st2, x=x, y=y)
    with pytest.raises(ValueError, match="hold exactly one ScaleByKfacState"):
        opt.value_and_grad(out_loss)(p, (), x=x, y=y)
    with pytest.raises(ValueError, match="must return a scalar"):
        opt.value_and_grad(lambda o, y: o)(p, s, x=x, y=y)
    with pytest.raises(TypeError, match="must be callable"):
        opt.value_and_grad(None)


def test_one_pass_step_computes_one_forward_with_the_quadratic_model():
    """Compiled: the adaptive step's quadratic model replays the one-pass forward (the same
    program), and XLA keeps one forward for the whole step: one ``tanh`` (two-pass: two)."""
    p, x, y = _problem()
    opt = kfac(adaptive_damping=False, model_fn=model, example_inputs={"x": x},
               key=jax.random.PRNGKey(0))
    s = opt.init(p)

    one, two = _one_and_two_pass_steps(opt, x, y)

    def tanh_ops(fn):
        return len(re.findall(r" tanh\(", jax.jit(fn).lower(p, s).compile().as_text()))

    assert tanh_ops(one) == 1
    assert tanh_ops(two) == 2
