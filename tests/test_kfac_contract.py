"""K-FAC passes the optax contract suite the other curvlib transforms pass.

The problem, extra arguments and checks mirror ``tests/test_optim_contract.py``
(softmax regression on a dict pytree, ``batch=(x, y)`` routed by name): jit with
no retrace on the second step and a dtype/shape-stable state in float32 and
float64, ``optax.chain``, ``optax.inject_hyperparams``, ``optax.apply_if_finite``
with a NaN loss, ``optax.MultiSteps``, a flax ``nnx.Optimizer`` step, and a
checkpoint (flax bytes or pickle) resumed bit-identically. K-FAC additionally
needs the model (``model_fn(params, batch)``: the logits) and an example of
the extra arguments to size its factors.
"""

from __future__ import annotations

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvlib import kronecker

# the problem of tests/test_optim_contract.py (softmax regression on a dict pytree)
N, D, K = 24, 4, 3


def _data(dtype):
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (N, D), dtype)
    labels = jnp.argmax(x @ jax.random.normal(kw, (D, K), dtype), axis=-1)
    return x, jax.nn.one_hot(labels, K, dtype=dtype)


def _params(dtype):
    return {"w": jnp.zeros((D, K), dtype), "b": jnp.zeros((K,), dtype)}


def loss(params, batch):
    x, y = batch
    logits = x @ params["w"] + params["b"]
    l2 = 1e-2 * (jnp.sum(params["w"] ** 2) + jnp.sum(params["b"] ** 2))
    return jnp.mean(optax.softmax_cross_entropy(logits, y)) + l2


def _signature(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def model(params, batch):
    x, _ = batch
    return x @ params["w"] + params["b"]


def make(lr=None, **kw):
    example = {"batch": _data(jnp.float32)}
    kw.setdefault("key", jax.random.PRNGKey(0))
    return kronecker.kfac(lr, model_fn=model, example_inputs=example, damping=0.1,
                          damping_every=2, inverse_every=2, **kw)


def _step_fn(opt, counter=None):
    def step(params, state, batch):
        if counter is not None:
            counter.append(1)
        value, grad = jax.value_and_grad(loss)(params, batch)
        updates, state = opt.update(grad, state, params, value=value, value_fn=loss, batch=batch)
        return optax.apply_updates(params, updates), state, value

    return step


def _same(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


@pytest.mark.parametrize("inverse, dtype", [("factored", jnp.float32), ("factored", jnp.float64),
                                            ("exact", jnp.float64), ("ekfac", jnp.float32)])
def test_jit_no_retrace_and_stable_state(inverse, dtype):
    batch = _data(dtype)
    opt = make(inverse=inverse)
    params = _params(dtype)
    state = opt.init(params)
    assert isinstance(state[0], kronecker.ScaleByKfacState)
    sig = _signature(state)
    traces = []
    step = jax.jit(_step_fn(opt, traces))
    losses = []
    for _ in range(4):
        params, state, value = step(params, state, batch)
        losses.append(float(value))
        assert _signature(state) == sig
        assert jax.tree.map(lambda x: x.dtype, params) == {"w": dtype, "b": dtype}
    assert len(traces) == 1, "the second jitted step retraced"
    assert losses[-1] < losses[0]
    assert _all_finite(state)


def test_chain_with_other_transforms():
    batch = _data(jnp.float64)
    inner = kronecker.scale_by_kfac(model, example_inputs={"batch": batch}, damping=0.1,
                                    key=jax.random.PRNGKey(1))
    opt = optax.chain(optax.clip_by_global_norm(100.0), inner, optax.scale(-0.5))
    step = jax.jit(_step_fn(opt))
    params, state = _params(jnp.float64), opt.init(_params(jnp.float64))
    first = float(loss(params, batch))
    for _ in range(3):
        params, state, _ = step(params, state, batch)
    assert float(loss(params, batch)) < first


def test_inject_hyperparams():
    batch = _data(jnp.float64)

    def factory(lr, damping):
        return kronecker.kfac(lr, model_fn=model, example_inputs={"batch": batch},
                              damping=damping, inverse_every=2, key=jax.random.PRNGKey(0))

    opt = optax.inject_hyperparams(factory)(lr=0.5, damping=0.1)
    params = _params(jnp.float64)
    state = opt.init(params)
    step = jax.jit(_step_fn(opt))
    p1, s1, _ = step(params, state, batch)
    state = state._replace(hyperparams={**state.hyperparams, "lr": jnp.asarray(0.0)})
    p0, _, _ = step(params, state, batch)
    # a zero learning rate leaves the params; the injected value is a traced input
    assert _same(p0, params)
    assert float(loss(p1, batch)) < float(loss(params, batch))
    assert _all_finite(s1)


@pytest.mark.parametrize("adaptive", [False, True])
def test_an_injected_damping_takes_effect_at_the_next_step(adaptive):
    # the injected damping was read at init only: a new value left the steps bit-identical
    batch = _data(jnp.float64)

    def factory(damping, inverse_every):
        return kronecker.kfac(0.5, model_fn=model, example_inputs={"batch": batch},
                              damping=damping, adaptive_damping=adaptive, inverse="exact",
                              inverse_every=inverse_every, key=jax.random.PRNGKey(0))

    params = jax.tree.map(lambda x: x + 0.3, _params(jnp.float64))
    layers, _ = kronecker.transform._layers_for(model, params, {"batch": batch})
    for every in (1, 3):
        opt = optax.inject_hyperparams(factory, static_args=("inverse_every",))(
            damping=1.0, inverse_every=every)
        step = jax.jit(_step_fn(opt))
        p, s, _ = step(params, opt.init(params), batch)  # step 0 at damping 1
        s = s._replace(hyperparams={**s.hyperparams, "damping": jnp.asarray(100.0)})
        p1, s1, _ = step(p, s, batch)  # step 1: damping injected as 100
        kf = s1.inner_state[0]
        assert float(kf.info.damping) == 100.0 and bool(kf.info.refreshed)
        # between two scheduled refreshes the preconditioner is refreshed at the new damping
        pre, _ = kronecker.transform.refresh(layers, kf.factors, kf.ema_weight,
                                             jnp.asarray(100.0), "exact")
        for a, b in zip(jax.tree.leaves(kf.inverses), jax.tree.leaves(pre), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        if every == 1:  # oracle: the step of a kfac built at 100 from the same state
            inner = s.inner_state[0]._replace(damping=jnp.asarray(100.0),
                                              damping_setting=jnp.asarray(100.0))
            want, _, _ = jax.jit(_step_fn(factory(100.0, 1)))(
                p, (inner,) + tuple(s.inner_state[1:]), batch)
            assert _same(p1, want)
            old, _, _ = jax.jit(_step_fn(factory(1.0, 1)))(p, s.inner_state, batch)
            assert not _same(old, p1)
        # the next step keeps the new setting (no reset back)
        _, s2, _ = step(p1, s1, batch)
        assert float(s2.inner_state[0].damping_setting) == 100.0


def test_inject_hyperparams_on_kfac_itself():
    """``optax.inject_hyperparams(kfac, static_args=("model_fn", "num_samples"))``: optax
    takes every callable for a schedule and injects every number, so the model and the
    sample count (a shape) are named static, as kfac's docstring says."""
    batch = _data(jnp.float64)
    opt = optax.inject_hyperparams(kronecker.kfac, static_args=("model_fn", "num_samples"))(
        learning_rate=0.5, model_fn=model, example_inputs={"batch": batch}, damping=0.1,
        key=jax.random.PRNGKey(0))
    params = _params(jnp.float64)
    p1, s1, _ = jax.jit(_step_fn(opt))(params, opt.init(params), batch)
    assert float(loss(p1, batch)) < float(loss(params, batch))
    assert _all_finite(s1)


def test_apply_if_finite_with_nan_loss():
    x, y = _data(jnp.float64)
    opt = optax.apply_if_finite(make(), max_consecutive_errors=5)
    step = jax.jit(_step_fn(opt))
    params = _params(jnp.float64)
    state = opt.init(params)
    params, state, _ = step(params, state, (x, y))
    bad = (x.at[0, 0].set(jnp.nan), y)
    p_bad, state, value = step(params, state, bad)
    assert not np.isfinite(float(value))
    assert _same(p_bad, params)
    assert int(state.notfinite_count) == 1
    before = float(loss(p_bad, (x, y)))
    for _ in range(2):
        p_bad, state, _ = step(p_bad, state, (x, y))
    assert _all_finite(p_bad) and _all_finite(state.inner_state)
    assert float(loss(p_bad, (x, y))) < before


def test_nan_batch_without_the_wrapper_is_skipped_and_state_kept():
    x, y = _data(jnp.float64)
    opt = make()
    step = jax.jit(_step_fn(opt))
    params = _params(jnp.float64)
    state = opt.init(params)
    params, state, _ = step(params, state, (x, y))
    p_bad, s_bad, _ = step(params, state, (x.at[0, 0].set(jnp.nan), y))
    assert _same(p_bad, params)
    inner, inner_bad = state[0], s_bad[0]
    assert bool(inner_bad.info.skipped) and not bool(inner_bad.info.statistics_updated)
    assert _same(inner_bad.factors, inner.factors)
    assert _same(inner_bad.velocity, inner.velocity)
    assert float(inner_bad.damping) == float(inner.damping)
    p_next, s_next, _ = step(p_bad, s_bad, (x, y))
    assert _all_finite(s_next) and not bool(s_next[0].info.skipped)
    assert float(loss(p_next, (x, y))) < float(loss(params, (x, y)))


def test_multisteps():
    batch = _data(jnp.float64)
    opt = optax.MultiSteps(make(), every_k_schedule=2)
    step = jax.jit(_step_fn(opt))
    params = _params(jnp.float64)
    state = opt.init(params)
    p1, state, _ = step(params, state, batch)
    assert _same(p1, params)
    p2, state, _ = step(p1, state, batch)
    assert float(loss(p2, batch)) < float(loss(params, batch))
    assert _all_finite(state)


def test_flax_nnx_optimizer_step():
    nnx = pytest.importorskip("flax.nnx")
    x, y = _data(jnp.float32)
    net = nnx.Linear(D, K, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(net)

    def model_fn(params, batch):
        return nnx.merge(graphdef, params)(batch[0])

    def value_fn(params, batch):
        m = nnx.merge(graphdef, params)
        l2 = 1e-2 * (jnp.sum(m.kernel[...] ** 2) + jnp.sum(m.bias[...] ** 2))
        return jnp.mean(optax.softmax_cross_entropy(m(batch[0]), batch[1])) + l2

    opt = kronecker.kfac(model_fn=model_fn, example_inputs={"batch": (x, y)}, damping=0.1,
                         key=jax.random.PRNGKey(0))
    optimizer = nnx.Optimizer(net, opt, wrt=nnx.Param)

    @nnx.jit
    def train_step(net, optimizer, batch):
        def model_loss(m):
            return value_fn(nnx.state(m, nnx.Param), batch)

        value, grads = nnx.value_and_grad(model_loss)(net)
        optimizer.update(net, grads, value=value, value_fn=value_fn, batch=batch)
        return value

    first = float(train_step(net, optimizer, (x, y)))
    for _ in range(3):
        last = float(train_step(net, optimizer, (x, y)))
    assert last < first


def test_checkpoint_resume_is_bit_identical(tmp_path):
    """Flax bytes and pickle checkpoints, restored into a rebuilt transform, resume exactly."""
    serialization = pytest.importorskip("flax.serialization")
    batch = _data(jnp.float64)
    params = _params(jnp.float64)

    def train(step, s, p, steps):
        for _ in range(steps):
            p, s, _ = step(p, s, batch)
        return p, s

    tx = make()
    step = jax.jit(_step_fn(tx))
    p_full, s_full = train(step, tx.init(params), params, 6)
    p_half, s_half = train(step, tx.init(params), params, 3)
    tx2 = make()  # a new process would rebuild the transform and a template
    step2 = jax.jit(_step_fn(tx2))
    flax_ckpt = tmp_path / "ckpt.msgpack"
    flax_ckpt.write_bytes(serialization.to_bytes({"params": p_half, "opt_state": s_half}))
    template = {"params": params, "opt_state": tx2.init(params)}
    pickled = tmp_path / "ckpt.pkl"
    pickled.write_bytes(pickle.dumps({"params": p_half, "opt_state": s_half}))
    for restored in (serialization.from_bytes(template, flax_ckpt.read_bytes()),
                     pickle.loads(pickled.read_bytes())):
        p_res, s_res = train(step2, restored["opt_state"], restored["params"], 3)
        assert _same(p_res, p_full)
        assert _same(s_res, s_full)


def test_a_fresh_state_can_be_donated_and_the_users_key_survives():
    key = jax.random.PRNGKey(3)
    opt = make(0.1, key=key)
    batch = _data(jnp.float32)
    step = jax.jit(_step_fn(opt), donate_argnums=(0, 1))
    for _ in range(2):
        p, s = _params(jnp.float32), opt.init(_params(jnp.float32))
        for _ in range(2):
            p, s, _ = step(p, s, batch)
        assert _all_finite(p)
    assert not key.is_deleted()
