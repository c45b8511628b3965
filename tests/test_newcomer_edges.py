"""A flax/optax user's first hour with curvlib: the mistakes a newcomer makes get messages
that name the argument and the fix, and the results' status fields say what happened.

Each test failed before its fix (the message or the status it checks was missing or wrong).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvlib
from curvlib import Status

nnx = pytest.importorskip("flax.nnx")


def _mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def _ce(p, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_mlp(p, x), y))


def _problem(dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": (jax.random.normal(k1, (8, 16)) / 3).astype(dtype),
              "w2": (jax.random.normal(k2, (16, 3)) / 4).astype(dtype)}
    x = jax.random.normal(k3, (128, 8)).astype(dtype)
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0.5)
    return params, x, y


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def _nnx_problem():
    model = _MLP(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 4))
    y = jnp.arange(16) % 3

    def loss(params, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return model, params, loss, x, y


def test_newton_cg_status_cg_stopped_short_is_stalled_not_max_steps():
    # float32, CG(rtol=1e-7): CG stops at its attainable accuracy after ~20 of 400 steps
    # (its CGResult says STALLED); the step's info said MAX_STEPS, "the budget ran out"
    params, x, y = _problem(jnp.float32)
    opt = curvlib.newton_cg(damping=0.5, cg=curvlib.CG(rtol=1e-7, max_steps=400))
    state = opt.init(params)
    g = jax.grad(_ce)(params, x, y)
    u, state = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=_ce, x=x, y=y))(
        g, state, params)
    info = state[0].info
    assert not bool(info.converged) and int(info.num_steps) < 400  # the case tested
    assert bool(info.accepted)
    assert int(info.status) == Status.STALLED
    # the direction is the damped Newton step all the same (dense oracle)
    flat, unravel = ravel_pytree(params)
    H = np.asarray(jax.hessian(lambda f: _ce(unravel(f), x, y))(flat), np.float64)
    want = -np.linalg.solve(H + 0.5 * np.eye(H.shape[0]), np.asarray(ravel_pytree(g)[0]))
    got = np.asarray(ravel_pytree(u)[0], np.float64)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_function_in_place_of_params_is_named():
    # hessian_matvec(params, loss, ...) said "Cannot determine dtype of <function _ce>"
    params, x, y = _problem()
    with pytest.raises(TypeError, match=r"`params` must be a real floating array; got a "
                                        r"function \('_ce'\).*function first"):
        curvlib.hessian_matvec(params, _ce, x, y)
    with pytest.raises(ValueError, match=r"`params` must be a real floating array; got a "
                                         r"function"):
        curvlib.landscape.curvature_subspace(params, lambda p, b: _ce(p, *b), (x, y), 8, 2,
                                             key=jax.random.PRNGKey(0))


def test_operator_and_vector_swapped_are_named():
    # eigsh(params, H) said "`v0[<flat index 0>][0]...[6]` must be a real floating array;
    # got dtype bool" (a leaf of the operator's closure)
    params, x, y = _problem()
    H = curvlib.hessian_matvec(_ce, params, x, y)
    with pytest.raises(TypeError, match=r"`v0` must be a pytree of real floating arrays; got "
                                        r"a function.*Partial"):
        curvlib.eigsh(params, H, k=2)
    # eigsh(params, params) said "the first argument must be callable"
    with pytest.raises(TypeError, match=r"`matvec` must be a callable v -> A v; got dict"):
        curvlib.eigsh(params, params, k=2)
    with pytest.raises(TypeError, match=r"`matvec` must be a callable v -> A v; got dict"):
        curvlib.lanczos(params, params, 3)
    # the right order runs, and matches the dense Hessian
    flat, unravel = ravel_pytree(params)
    dense = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda f: _ce(unravel(f), x, y))(flat)))
    top = curvlib.eigsh(H, params, k=2, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(top.eigenvalues), dense[::-1][:2], rtol=1e-6)


def test_number_in_place_of_key_says_where_it_went():
    # hutchinson_trace(H, v, 30) said only "missing a required argument: 'num_probes'"
    params, x, y = _problem()
    H = curvlib.hessian_matvec(_ce, params, x, y)
    with pytest.raises(TypeError, match=r"(?s)^hutchinson_trace\(matvec, v_like, key, "
                                        r"num_probes.*'num_probes'.*30 was taken as `key`"):
        curvlib.hutchinson_trace(H, params, 30)
    with pytest.raises(TypeError, match=r"^hutchinson_diag\(matvec, v_like, key, num_probes"):
        curvlib.hutchinson_diag(H, params, num_probes=3)


def test_nnx_module_in_place_of_its_param_state():
    model, params, loss, x, y = _nnx_problem()
    H = curvlib.hessian_matvec(loss, params, x, y)
    # as the vector: a structure error of several thousand characters, no word of the fix
    with pytest.raises(ValueError, match=r"(?s)`v0` is a flax `nnx.Module`.*nnx.split"
                       ) as e:
        curvlib.eigsh(H, model, k=2)
    assert len(str(e.value)) < 1500
    # as an optimizer's params beside the Param state's gradients
    opt = curvlib.newton_cg()
    g = jax.grad(loss)(params, x, y)
    with pytest.raises(ValueError, match=r"`params` is a flax `nnx.Module`.*nnx.split") as e:
        opt.update(g, opt.init(model), model, value_fn=loss, x=x, y=y)
    assert len(str(e.value)) < 1500
    # as the point of a loss written against the Param state: flax's own error, with a note
    if sys.version_info >= (3, 11):
        with pytest.raises(Exception) as e:  # noqa: B017 (flax's error, whatever its type)
            curvlib.hessian_matvec(loss, model, x, y)
        assert any("nnx.split(model, nnx.Param" in n for n in getattr(e.value, "__notes__", []))
    # a loss written against the module itself works on the module (pure-Param model), and
    # agrees with the Param-state Hessian
    mloss = lambda m, x, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(x), y))
    a = curvlib.eigsh(curvlib.hessian_matvec(mloss, model, x, y), model, k=2,
                      key=jax.random.PRNGKey(0))
    b = curvlib.eigsh(H, params, k=2, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(a.eigenvalues), np.asarray(b.eigenvalues), rtol=1e-5)


def test_value_fn_inputs_message_uses_the_functions_own_names():
    # it said "cannot be called as `value_fn(x, **kw)`" and advised `batch=batch` to a loss
    # of (params, x, y) that had been given `batch=`
    params, x, y = _problem()
    opt = curvlib.newton_cg()
    state = opt.init(params)
    g = jax.grad(_ce)(params, x, y)
    with pytest.raises(TypeError) as e:
        opt.update(g, state, params, value_fn=_ce, batch=(x, y))
    msg = str(e.value)
    assert "`value_fn(p, **kw)`" in msg and "value_fn=..., x=..., y=...)" in msg
    assert "batch=batch" not in msg


def test_ggn_loss_args_not_a_tuple_is_named():
    # loss_args=y (an array) said "loss_fn() takes 2 positional arguments but 129 were
    # given" (its rows became arguments); a dict said "data type 'y' not understood"
    params, x, y = _problem()
    loss_fn = lambda out, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
    with pytest.raises(TypeError, match=r"`loss_args` must be a tuple.*\(y,\).*an array of "
                                        r"shape \(128,\)"):
        curvlib.ggn_matvec(_mlp, loss_fn, params, x, loss_args=y)
    with pytest.raises(ValueError, match=r"`loss_args` must be a tuple.*got a dict"):
        curvlib.ggn_matvec(_mlp, loss_fn, params, x, loss_args={"y": y})
    # the tuple works, and for this convex output loss the GGN equals J^T H_l J (dense)
    G = curvlib.ggn_matvec(_mlp, loss_fn, params, x, loss_args=(y,))
    flat, unravel = ravel_pytree(params)
    J = jax.jacobian(lambda f: _mlp(unravel(f), x).reshape(-1))(flat)
    out = _mlp(params, x)
    Hl = jax.hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape)
    got = ravel_pytree(G(unravel(v)))[0]
    np.testing.assert_allclose(got, J.T @ (Hl @ (J @ v)), rtol=1e-10, atol=1e-12)
