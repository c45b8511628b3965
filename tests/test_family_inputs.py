"""How the operators take their inputs: ``has_aux``, microbatching every batched argument,
and errors that name the argument by its pytree path with the fix that fits the leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvlib

N = 10  # microbatch 4: chunks 4 + 4 + 2


def _setup():
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    params = {"w": 0.5 * jax.random.normal(k[0], (3, 4)), "v": 0.5 * jax.random.normal(k[1], (4,))}
    x = jax.random.normal(k[2], (N, 3))
    y = jax.random.normal(k[3], (N,))
    return params, x, y


def _model(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


def _loss(p, x, y):
    return jnp.mean((_model(p, x) - y) ** 2) + 0.1 * jnp.sum(jnp.sin(p["v"]))


def _aux_loss(p, x, y):
    r = _model(p, x) - y
    return _loss(p, x, y), {"mae": jnp.mean(jnp.abs(r)), "sq": jnp.mean(r**2)}


def _flat(t):
    return np.asarray(ravel_pytree(t)[0])


def _close(a, b, tol=1e-12):
    a, b = _flat(a), _flat(b)
    assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), np.linalg.norm(a - b)


# ------------------------------------------------------------------ has_aux


def test_has_aux_on_every_operator():
    params, x, y = _setup()
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)
    ref = curvlib.hessian_matvec(_loss, params, x, y)(v)
    for mode in ("linearize", "fwd-rev", "rev-rev"):
        _close(curvlib.hessian_matvec(_aux_loss, params, x, y, mode=mode, has_aux=True)(v), ref)
    _close(curvlib.hessian_matvec(_aux_loss, params, x, y, microbatch_size=4, has_aux=True)(v),
           ref)
    _close(curvlib.hvp(_aux_loss, params, v, x, y, has_aux=True), ref)
    # gradient returns aux like jax.value_and_grad(has_aux=True); microbatched, aux is averaged
    (val, aux), g = curvlib.gradient(_aux_loss, params, x, y, has_aux=True)
    (val_mb, aux_mb), g_mb = curvlib.gradient(_aux_loss, params, x, y, has_aux=True,
                                              microbatch_size=4)
    (val_ref, aux_ref), g_ref = jax.value_and_grad(_aux_loss, has_aux=True)(params, x, y)
    for got_v, got_aux, got_g in ((val, aux, g), (val_mb, aux_mb, g_mb)):
        assert abs(float(got_v) - float(val_ref)) < 1e-12
        _close(got_aux, aux_ref)
        _close(got_g, g_ref)
    with pytest.raises(TypeError, match=r"aux\['count'\].*int"):
        curvlib.gradient(lambda p, x, y: (_loss(p, x, y), {"count": jnp.sum(x > 0)}),
                         params, x, y, has_aux=True, microbatch_size=4)
    # models with an auxiliary output (flax's mutable collections): GGN, Fisher
    aux_model = lambda p, x: (_model(p, x), {"stats": jnp.mean(x)})
    mse = lambda o, y: jnp.mean((o - y) ** 2)
    G_ref = curvlib.ggn_matvec(_model, mse, params, x, loss_args=(y,))(v)
    _close(curvlib.ggn_matvec(aux_model, mse, params, x, loss_args=(y,), has_aux=True)(v), G_ref)
    F_ref = curvlib.fisher_matvec(_model, params, x, likelihood="gaussian")(v)
    _close(curvlib.fisher_matvec(aux_model, params, x, likelihood="gaussian", has_aux=True)(v),
           F_ref)
    per_example = lambda p, ex: (ex[1] - _model(p, ex[0][None])[0]) ** 2
    ef_ref = curvlib.empirical_fisher_matvec(per_example, params, (x, y))(v)
    aux_pe = lambda p, ex: (per_example(p, ex), ex[1])
    _close(curvlib.empirical_fisher_matvec(aux_pe, params, (x, y), has_aux=True)(v), ef_ref)


def test_has_aux_mismatches_are_explained():
    params, x, y = _setup()
    with pytest.raises(TypeError, match=r"returns `\(loss, aux\)`, pass `has_aux=True`"):
        curvlib.hessian_matvec(_aux_loss, params, x, y)
    with pytest.raises(TypeError, match=r"has_aux=True.*pair"):
        curvlib.hessian_matvec(_loss, params, x, y, has_aux=True)
    with pytest.raises(TypeError, match=r"has_aux=True.*pair"):
        curvlib.ggn_matvec(_model, lambda o: jnp.sum(o), params, x, has_aux=True)
    with pytest.raises(ValueError, match="`has_aux` must be True or False; got 'yes'"):
        curvlib.hessian_matvec(_loss, params, x, y, has_aux="yes")
    with pytest.raises(ValueError, match="`has_aux` must be True or False; got 2"):
        curvlib.ggn_matvec(_model, lambda o: jnp.sum(o), params, x, has_aux=2)


def test_has_aux_is_read_as_a_flag_the_same_way_for_losses_and_models():
    """``has_aux`` as a NumPy bool or 0/1 (a config file's value) means the same as the
    Python bool for a loss (Hessian) and for a model (GGN), as for ``jax.grad``."""
    params, x, y = _setup()
    v = jax.tree.map(jnp.ones_like, params)
    H_ref = curvlib.hessian_matvec(_aux_loss, params, x, y, has_aux=True)(v)
    aux_model = lambda p, x: (_model(p, x), {"stats": jnp.mean(x)})
    mse = lambda o, y: jnp.mean((o - y) ** 2)
    G_ref = curvlib.ggn_matvec(aux_model, mse, params, x, loss_args=(y,), has_aux=True)(v)
    for flag in (np.bool_(True), 1):
        _close(curvlib.hessian_matvec(_aux_loss, params, x, y, has_aux=flag)(v), H_ref)
        _close(curvlib.ggn_matvec(aux_model, mse, params, x, loss_args=(y,), has_aux=flag)(v),
               G_ref)


# -------------------------------------------------------------- microbatching


def test_microbatching_chunks_every_batched_argument():
    """``loss(p, x, y)`` chunks ``x`` and ``y`` together (it used to fail with a raw
    broadcast error); unbatched arguments are named by ``batch_argnums``."""
    params, x, y = _setup()
    v = jax.tree.map(jnp.ones_like, params)
    ref = curvlib.hessian_matvec(_loss, params, x, y)(v)
    for mode in ("fwd-rev", "rev-rev"):
        _close(curvlib.hessian_matvec(_loss, params, x, y, mode=mode, microbatch_size=4)(v), ref)
    val, g = curvlib.gradient(_loss, params, x, y, microbatch_size=4)
    val_ref, g_ref = jax.value_and_grad(_loss)(params, x, y)
    assert abs(float(val) - float(val_ref)) < 1e-12
    _close(g, g_ref)
    mse = lambda o, y: jnp.mean((o - y) ** 2)
    G = curvlib.ggn_matvec(_model, mse, params, x, loss_args=(y,), microbatch_size=4)
    _close(G(v), curvlib.ggn_matvec(_model, mse, params, x, loss_args=(y,))(v))

    # an unbatched argument (a PRNG key, a scale) goes whole to every chunk
    def keyed(p, x, scale, y, key):
        noise = jax.random.normal(key, (4,))
        return _loss(p, x, y) * scale + jnp.sum(noise * p["v"] ** 2)

    key = jax.random.key(0)
    args = (x, 2.0, y, key)
    ref = curvlib.hessian_matvec(keyed, params, *args)(v)
    for nums in ((0, 2), (2, 0), (-5 + 5, -2)):
        got = curvlib.hessian_matvec(keyed, params, *args, microbatch_size=4, batch_argnums=nums)
        _close(got(v), ref)
    _close(curvlib.gradient(keyed, params, *args, microbatch_size=3, batch_argnums=(0, 2))[1],
           jax.grad(keyed)(params, *args))
    with pytest.raises(ValueError, match=r"`args\[1\]` has shape \(\).*batch_argnums=\(0, 2\)"):
        curvlib.hessian_matvec(keyed, params, *args, microbatch_size=4)
    with pytest.raises(ValueError, match=r"args\[3\]` has a PRNG key"):
        curvlib.gradient(keyed, params, *args, microbatch_size=4, batch_argnums=(0, 2, 3))
    with pytest.raises(ValueError, match="out of range"):
        curvlib.hessian_matvec(keyed, params, *args, microbatch_size=4, batch_argnums=(0, 7))
    # a leaf of a batched pytree that is not batched is named by its path
    batch = {"x": x, "y": y, "w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"`args\[0\]\['w'\]` has shape \(3,\).*Take it out"):
        curvlib.hessian_matvec(lambda p, b: _loss(p, b["x"], b["y"]), params, batch,
                               microbatch_size=4)
    # a loss argument of a Gauss-Newton split that is not batched
    with pytest.raises(ValueError, match=r"`loss_args\[1\]` has shape \(\).*Close over it"):
        curvlib.ggn_matvec(_model, lambda o, y, s: s * mse(o, y), params, x,
                           loss_args=(y, 2.0), microbatch_size=4)


# --------------------------------------------------------------------- errors


def test_dtype_errors_name_the_leaf_and_never_advise_casting_a_key():
    params, x, y = _setup()
    f = lambda p, x, y: _loss({"w": p["w"], "v": p["v"]}, x, y)
    typed = {**params, "rng": jax.random.key(0)}
    with pytest.raises(TypeError, match=r"`params\['rng'\]` must be a real floating array; "
                                        r"got a PRNG key") as e:
        curvlib.hessian_matvec(f, typed, x, y)
    assert "Do not cast" in str(e.value) and "extra argument" in str(e.value)
    raw = {**params, "rng": jax.random.PRNGKey(0)}
    for build in (
        lambda: curvlib.hessian_matvec(f, raw, x, y),
        lambda: curvlib.fisher_matvec(lambda p, x: _model(p, x), raw, x, likelihood="gaussian"),
        lambda: curvlib.jacobian_matvec(lambda p, x: _model(p, x), raw, x),
    ):
        with pytest.raises(TypeError, match=r"`params\['rng'\]` must be a real floating array; "
                                            r"got dtype uint32") as e:
            build()
        assert "raw uint32 PRNG key" in str(e.value) and "do not cast it" in str(e.value)
    step = {"nested": (params["w"], jnp.asarray(3, jnp.int32)), "v": params["v"]}
    with pytest.raises(TypeError, match=r"`params\['nested'\]\[1\]` must be a real floating "
                                        r"array; got dtype int32"):
        curvlib.hvp(lambda p: jnp.sum(p["v"] ** 2), step, step)


def test_tangent_errors_name_the_leaf():
    params, x, y = _setup()
    H = curvlib.hessian_matvec(_loss, params, x, y)
    with pytest.raises(ValueError, match=r"tangent\['w'\] has shape \(4, 3\).*params\['w'\]"):
        H({"w": jnp.ones((4, 3)), "v": params["v"]})
    with pytest.raises(ValueError, match=r"only in params: \[.v.\]; only in tangent: none\."):
        curvlib.hvp(lambda p: jnp.sum(p["w"] ** 2), params, {"w": params["w"]})
