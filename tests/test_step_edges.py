"""Edges of the optax transforms and the K-FAC operators a user meets: low-precision
parameters with a float32 loss, tiny BFGS pairs, a zero Newton step, options that do not
apply, vectors that do not match, a new K-FAC preconditioner per step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvlib
from curvlib.kronecker import kfac_curvature, scale_by_kfac
from curvlib.optim import (
    bfgs,
    newton,
    newton_cg,
    scale_by_bfgs,
    scale_by_newton,
    scale_by_newton_cg,
    scale_by_svrg,
    track_curvature,
)
from curvlib.optim.quasi_newton import secant_update

A = jnp.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
B = jnp.array([1.0, -2.0, 0.5])


def _run(opt, p, f, steps):
    state = opt.init(p)
    for _ in range(steps):
        u, state = opt.update(jax.grad(f)(p), state, p, value_fn=f)
        p = optax.apply_updates(p, u)
    return p, state[0].info if isinstance(state, tuple) else state.info


def test_bfgs_in_float16_keeps_updating_after_small_steps():
    """The inverse-Hessian update formed ``rho^2 y^T H y`` in the parameters' dtype: in
    float16 a pair of an ordinary step (|s| ~ 4e-3) overflowed it, the step was flagged
    non-finite, and every later call met the same pair: zeros and NONFINITE for good."""
    f = lambda p: (0.5 * p.astype(jnp.float32) @ A @ p.astype(jnp.float32)
                   - B @ p.astype(jnp.float32))
    opt, p = bfgs(), jnp.zeros(3, jnp.float16)
    state = opt.init(p)
    for _ in range(10):
        u, state = opt.update(jax.grad(f)(p), state, p, value_fn=f)
        p = optax.apply_updates(p, u)
        assert bool(state[0].info.finite) and int(state[0].info.status) != curvlib.Status.NONFINITE
    want = np.linalg.solve(np.asarray(A, float), np.asarray(B, float))
    np.testing.assert_allclose(np.asarray(p, float), want, atol=5e-3)


def test_the_secant_update_is_the_textbook_formula_at_every_scale():
    """``(I - rho s y^T) H (I - rho y s^T) + rho s s^T`` (float64 NumPy), for pairs whose
    ``s^T y`` underflows ``rho`` in float32 (|s|, |y| ~ 1e-20) and for ordinary ones."""
    rng = np.random.default_rng(0)
    M = rng.standard_normal((4, 4))
    H = M @ M.T + np.eye(4)
    for scale in (1.0, 1e-20, 1e18):
        s = rng.standard_normal(4) * scale
        y = H @ s + 0.1 * s  # s^T y > 0, and ~ scale^2: it under- or overflows float32
        state = scale_by_bfgs().init(jnp.zeros(4, jnp.float32))  # the pair starts at 0
        state = state._replace(count=jnp.asarray(2), num_finite=jnp.asarray(2),
                               num_updates=jnp.asarray(1), inv_hessian=jnp.asarray(H, jnp.float32))
        x, g = jnp.asarray(s, jnp.float32), jnp.asarray(y, jnp.float32)
        H_new, num, sy, ok = secant_update(state, x, g, jnp.asarray(True), 1e-10)
        s, y = np.asarray(x, float), np.asarray(g, float)
        rho = 1.0 / (s @ y)
        E = np.eye(4) - rho * np.outer(s, y)
        want = E @ np.asarray(jnp.asarray(H, jnp.float32), float) @ E.T + rho * np.outer(s, s)
        assert bool(ok) and int(num) == 2, scale
        np.testing.assert_allclose(np.asarray(H_new, float), want, rtol=2e-4,
                                   atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", ["newton_cg", "newton"])
def test_bfloat16_parameters_read_a_float32_loss_in_float32(name):
    """The loss was cast to the parameters' dtype before the acceptance test: in bfloat16
    a decrease from 100.26 to 100.07 rounds to none, every newton_cg step was rejected
    (STALLED, damping growing) and the parameters stayed at 0.09 c."""
    c = jnp.array([1.0, -2.0, 0.5])
    f = lambda p: 100.0 + 0.05 * jnp.sum((p.astype(jnp.float32) - c) ** 2)
    opt = {"newton_cg": newton_cg(), "newton": newton()}[name]
    p, info = _run(opt, jnp.zeros(3, jnp.bfloat16), f, 10)
    np.testing.assert_allclose(np.asarray(p, float), c, atol=1e-2)
    assert info.loss.dtype == jnp.float32
    assert float(info.loss) == pytest.approx(float(f(p)), abs=1e-4)


@pytest.mark.parametrize("name", ["newton_cg", "newton", "bfgs", "scale_by_newton"])
def test_float16_parameters_with_a_loss_past_65504_still_step(name):
    """A finite float32 loss above float16's range became inf in the cast: every step of
    every transform skipped as NONFINITE, the parameters never moved."""
    c = jnp.array([1.0, -2.0, 0.5])
    f = lambda p: 1e5 + jnp.sum((p.astype(jnp.float32) - c) ** 2)
    opt = {"newton_cg": newton_cg(), "newton": newton(), "bfgs": bfgs(),
           "scale_by_newton": optax.chain(scale_by_newton(), optax.scale(-1.0))}[name]
    p, info = _run(opt, jnp.zeros(3, jnp.float16), f, 5)
    assert bool(info.finite)
    np.testing.assert_allclose(np.asarray(p, float), c, atol=1e-2)


def test_a_zero_newton_step_at_a_non_zero_gradient_is_a_stall():
    """A piecewise-linear loss (mean absolute error) has zero curvature: every direction is
    dropped and the step is zero forever; it was reported converged, SUCCESS."""
    X = jax.random.normal(jax.random.PRNGKey(0), (16, 3))
    y = X @ jnp.array([1.0, -2.0, 0.5])
    loss = lambda w: jnp.mean(jnp.abs(X @ w - y))
    for opt in (optax.chain(scale_by_newton(), optax.scale(-1.0)), newton()):
        w, info = _run(opt, jnp.zeros(3), loss, 2)
        assert float(jnp.linalg.norm(jax.grad(loss)(w))) > 0.1
        assert int(info.status) == curvlib.Status.STALLED and not bool(info.converged)
    # a zero gradient is no stall
    _, info = _run(optax.chain(scale_by_newton(), optax.scale(-1.0)), jnp.zeros(3),
                   lambda w: jnp.sum(w**2), 1)
    assert int(info.status) == curvlib.Status.SUCCESS


def test_a_skipped_newton_step_reports_no_measured_eigenvalues():
    f = lambda p: jnp.sum(p**2) * jnp.nan
    tx = scale_by_newton()
    state = tx.init(jnp.ones(3))
    _, state = tx.update(jnp.ones(3), state, jnp.ones(3), value_fn=f)
    info = state.info
    assert bool(info.skipped) and int(info.num_modified) == 0
    assert np.isnan(float(info.min_eigenvalue)) and np.isnan(float(info.max_eigenvalue))


@pytest.mark.parametrize("build, name", [
    (lambda: scale_by_svrg(None), "snapshot_every"),
    (lambda: scale_by_newton(None), "damping"),
    (lambda: scale_by_newton(min_eigenvalue=None), "min_eigenvalue"),
    (lambda: scale_by_newton_cg(None), "damping"),
    (lambda: scale_by_newton_cg(min_damping=None), "min_damping"),
    (lambda: scale_by_newton_cg(max_damping=None), "max_damping"),
    (lambda: scale_by_bfgs(curvature_rtol=None), "curvature_rtol"),
    (lambda: track_curvature(None, 1, key=jax.random.PRNGKey(0)), "every"),
    (lambda: track_curvature(1, 1, key=jax.random.PRNGKey(0), warm_noise=None), "warm_noise"),
    (lambda: scale_by_kfac(lambda p, x: x @ p["w"], example_inputs={"x": jnp.ones((2, 2))},
                           damping_decay=0.0), "damping_decay"),
])
def test_options_without_a_meaning_for_none_or_zero_are_refused_by_name(build, name):
    """None passed construction and failed later ("None is not a valid value for
    jnp.array"); ``damping_decay=0`` failed at the first adaptation (ZeroDivisionError)."""
    with pytest.raises(ValueError, match=f"`{name}`"):
        build()


def test_svrg_names_the_full_loss_and_checks_the_full_gradient():
    p = {"w": jnp.ones(3), "b": jnp.asarray(0.0)}
    f = lambda p: jnp.sum(p["w"] ** 2) + p["b"] ** 2
    tx = scale_by_svrg(2)
    state = tx.init(p)
    update = lambda **kw: tx.update(jax.grad(f)(p), state, p, value_fn=f, **kw)
    with pytest.raises(ValueError, match="`full_value_fn` must return a scalar loss"):
        update(full_value_fn=lambda q: q["w"] ** 2)
    with pytest.raises(ValueError, match="`full_value_fn` must return a scalar loss.*has_aux"):
        update(full_value_fn=lambda q: (f(q), {}))
    with pytest.raises(ValueError, match=r"`full_grad_fn\(params\)` must match `params`"):
        update(full_grad_fn=lambda q: jnp.ones(4))
    with pytest.raises(ValueError, match=r"full_grad_fn\(params\)\['w'\] of shape \(2,\)"):
        update(full_grad_fn=lambda q: {"w": jnp.ones(2), "b": jnp.asarray(0.0)})
    # the right full gradient: the direction is g(x) - g(snapshot) + full_grad(snapshot)
    u, _ = update(full_grad_fn=jax.grad(f))
    np.testing.assert_allclose(u["w"], jax.grad(f)(p)["w"], rtol=1e-6)


def _mlp():
    k = jax.random.split(jax.random.PRNGKey(19), 3)
    p = {"enc": jax.random.normal(k[0], (6, 8)) / 2, "dec": jax.random.normal(k[1], (8, 3)) / 2}
    model = lambda p, x: jnp.tanh(x @ p["enc"]) @ p["dec"]
    return p, model, k[2]


def test_kfac_operators_check_their_vector_against_the_parameters():
    """A list for a dict of layers was read by position (each gradient took the other
    layer's factors); a transposed leaf was reshaped silently."""
    p, model, key = _mlp()
    C = kfac_curvature(model, p, jax.random.normal(key, (20, 6)))
    v = jax.tree.map(jnp.ones_like, p)
    for op in (C.matvec, C.inverse_matvec(1e-3)):
        op(v)  # the right vector
        with pytest.raises(ValueError, match="must match `params`"):
            op([v["dec"], v["enc"]])
        with pytest.raises(ValueError, match=r"\['enc'\] has shape \(8, 6\)"):
            op({"enc": jnp.ones((8, 6)), "dec": v["dec"]})


def test_kfac_refuses_options_that_do_not_apply():
    p, model, key = _mlp()
    x = jax.random.normal(key, (20, 6))
    with pytest.raises(ValueError, match="`num_samples` applies to the Monte-Carlo Fisher"):
        kfac_curvature(model, p, x, num_samples=64)
    with pytest.raises(ValueError, match="`variance` applies to likelihood='gaussian'"):
        kfac_curvature(model, p, x, variance=100.0)
    kfac_curvature(model, p, x, num_samples=4, key=key)  # sampled: samples apply
    kfac_curvature(model, p, x, likelihood="gaussian", variance=100.0)


def test_a_new_kfac_preconditioner_each_step_compiles_no_new_solve(compiles):
    """`inverse_matvec(..., preconditioner=P)` with a new K-FAC inverse per step (same
    shapes, new factors) compiled the whole CG solve again (~2 s a step): the inverse was
    wrapped as a constant of the program. Each answer is the dense solve's."""
    p, model, key = _mlp()
    ce = lambda o: jnp.mean(jax.nn.logsumexp(o, -1) - o[:, 0])
    b = jax.tree.map(lambda a: jax.random.normal(key, a.shape), p)
    flat = lambda t: np.concatenate([np.ravel(t["dec"]), np.ravel(t["enc"])])

    def solve(step):
        x = jax.random.normal(jax.random.fold_in(key, step), (40, 6))
        G = curvlib.ggn_matvec(model, ce, p, x)
        P = kfac_curvature(model, p, x).inverse_matvec(1e-3)
        inv = curvlib.inverse_matvec(G, damping=1e-3, preconditioner=P,
                                     cg=curvlib.CG(rtol=1e-10))
        res = inv.solve(b)
        # the oracle: the dense GGN of this batch plus the damping
        basis = np.eye(flat(p).size)
        unflat = lambda e: {"dec": jnp.asarray(e[:24].reshape(8, 3)),
                            "enc": jnp.asarray(e[24:].reshape(6, 8))}
        M = np.stack([flat(G(unflat(e))) for e in basis], axis=1) + 1e-3 * np.eye(basis.shape[0])
        np.testing.assert_allclose(flat(res.x), np.linalg.solve(M, flat(b)), rtol=1e-6,
                                   atol=1e-6)

    solve(0)
    with compiles() as seen:
        x = jax.random.normal(jax.random.fold_in(key, 1), (40, 6))
        G = curvlib.ggn_matvec(model, ce, p, x)
        P = kfac_curvature(model, p, x).inverse_matvec(1e-3)
        jax.block_until_ready(curvlib.inverse_matvec(
            G, damping=1e-3, preconditioner=P, cg=curvlib.CG(rtol=1e-10)).solve(b).x)
    assert not any("solve" in n for n in seen.names), seen.names
    solve(1)


@pytest.mark.parametrize("dt", [jnp.bfloat16, jnp.float16])
def test_a_cast_inside_the_model_does_not_round_kfac_s_vectors(dt):
    """float32 parameters cast to a lower precision inside the model: the cast was replayed
    on every vector the K-FAC operators multiply (bfloat16: 3e-3 relative error with the
    same factors; float16: a gradient entry of 1e5 became inf)."""
    from curvlib.kronecker import find_layers
    from curvlib.kronecker.curvature import KfacCurvature

    k = jax.random.split(jax.random.PRNGKey(16), 3)
    x = jax.random.normal(k[0], (32, 8))
    p = {"w": jax.random.normal(k[1], (8, 4))}
    plain = kfac_curvature(lambda p, x: x @ p["w"], p, x, likelihood="gaussian")
    model = lambda p, x: (x.astype(dt) @ p["w"].astype(dt)).astype(jnp.float32)
    mixed = KfacCurvature(plain.factors, find_layers(model, p, x))  # the same factors
    assert any(s.kind == "convert" for s in mixed.layers.layers[0].chain)
    v = {"w": 1.0 + 1e-3 * jax.random.normal(k[2], (8, 4))}
    for a, b in ((mixed.matvec(v), plain.matvec(v)),
                 (mixed.inverse_matvec(1e-3)(v), plain.inverse_matvec(1e-3)(v)),
                 (mixed.inverse_matvec(1e-3)({"w": jnp.full((8, 4), 1e5)}),
                  plain.inverse_matvec(1e-3)({"w": jnp.full((8, 4), 1e5)}))):
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)


def test_gauss_newton_products_name_a_non_floating_output_and_count_args_as_given():
    """A model returning an argmax beside its logits: `ggn_matvec` leaked JAX's "grad
    requires real- or complex-valued inputs" (`jacobian_matvec` named the leaf). With
    ``wrt=``, a loss argument without the batch axis was measured against ``args[1]``
    (the block's complement counted as argument 0)."""
    p = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    x = jnp.ones((5, 3))
    model = lambda p, x: x @ p["w"] + p["b"]
    both = lambda p, x: {"logits": model(p, x), "pred": jnp.argmax(model(p, x), -1)}
    for build in (lambda: curvlib.jacobian_matvec(both, p, x),
                  lambda: curvlib.ggn_matvec(both, lambda o: jnp.mean(o["logits"] ** 2), p, x),
                  lambda: curvlib.fisher_matvec(both, p, x, likelihood="gaussian")):
        with pytest.raises(ValueError, match=r"`outputs of model_fn\['pred'\]` must be a real "
                                             r"floating array.*`aux`"):
            build()
    for wrt in (None, {"w": True, "b": False}):
        with pytest.raises(ValueError, match=r"leading axis of `args\[0\]`"):
            curvlib.ggn_matvec(model, lambda o, y: jnp.mean(o), p, x, loss_args=(jnp.zeros(3),),
                               microbatch_size=2, wrt=wrt)


@pytest.mark.parametrize("name", ["scale_by_newton_cg", "scale_by_bfgs", "scale_by_svrg",
                                  "track_curvature"])  # (scale_by_newton keeps no such state)
def test_a_state_made_for_other_parameters_is_refused_by_name(name):
    """The aliases checked their state against ``init(params)``; the transforms themselves
    failed deep inside ("`x0` must match `b`", "sub got incompatible shapes")."""
    f = lambda p: jnp.sum(p**2)
    tx = {"scale_by_newton_cg": scale_by_newton_cg, "scale_by_bfgs": scale_by_bfgs,
          "scale_by_svrg": scale_by_svrg,
          "track_curvature": lambda: track_curvature(1, 1, key=jax.random.PRNGKey(0))}[name]()
    kw = {"full_value_fn": f} if name == "scale_by_svrg" else {}
    p3 = jnp.ones(3)
    tx.update(jax.grad(f)(p3), tx.init(p3), p3, value_fn=f, **kw)  # its own state
    with pytest.raises(ValueError, match=rf"`state` must match `{name}.init\(params\)`"):
        tx.update(jax.grad(f)(p3), tx.init(jnp.ones(4)), p3, value_fn=f, **kw)


def test_the_closed_form_is_inf_only_where_its_value_overflows_and_never_nan():
    """float32: ``sigma^2 a tr B`` overflowed to -inf beside the +inf of ``sigma^4``: NaN for
    a value that is positive (E q^2 >= 0); and ``sigma^4`` alone overflowed for a term that
    fits (sigma = 1e12, tr B^2 = 1e-30: 7.5e17)."""
    L = curvlib.landscape
    f32 = np.finfo(np.float32).max
    cases = [(1.0, np.zeros(2), -np.eye(2)), (0.0, np.zeros(1), 1e-15 * np.eye(1)),
             (0.5, np.array([1e-3, 2.0]), np.array([[2.0, 0.1], [0.1, -1.0]]))]
    sigmas = np.array([1e-3, 1.0, 1e6, 1e12, 1e19, 1e20], np.float32)
    for a, c, B in cases:
        got = np.asarray(L.delta2_closed_form(jnp.float32(a), jnp.asarray(c, jnp.float32),
                                              jnp.asarray(B, jnp.float32), jnp.asarray(sigmas)))
        for s, g in zip(sigmas.astype(float), got, strict=True):  # the exact value (floats)
            Bs = 0.5 * (B + B.T)
            want = (a * a + s**2 * (a * np.trace(Bs) + c @ c)
                    + s**4 * (2 * np.sum(Bs * Bs) + np.trace(Bs) ** 2) / 4)
            assert not np.isnan(g)
            if want > f32:
                assert g == np.inf, (a, s)
            else:
                np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-37,  # (subnormal: 0)
                                           err_msg=f"{a} {s}")


def _far_field(p):
    """``sum(sqrt(1 + p^2))``: convex, minimiser 0; at ``p = 3000`` Newton's step is
    ``-p (1 + p^2)`` (``2.7e10`` long), more than 2^20 times too long."""
    return jnp.sum(jnp.sqrt(1.0 + p**2))


@pytest.mark.parametrize("name", ["newton", "newton_backtracking_2", "bfgs_zoom_1"])
def test_a_failed_line_search_withholds_a_step_that_raises_the_loss(name):
    """A search that finds no decrease within its budget returns its last, smallest step;
    applied, it raised the loss (3000 -> 13380, then on). Withheld: the loss never rises, a
    step that does not move reads STALLED, and the default search goes on halving from
    where it stopped, down to the minimiser's neighbourhood."""
    opt = {"newton": newton(),
           "newton_backtracking_2": newton(linesearch=optax.scale_by_backtracking_linesearch(
               2, store_grad=True)),
           "bfgs_zoom_1": bfgs(linesearch=optax.scale_by_zoom_linesearch(1))}[name]
    p = jnp.array([3000.0]) if name != "bfgs_zoom_1" else jnp.array([3.0, -2.0])
    f = _far_field
    state = opt.init(p)
    step = jax.jit(lambda p, s: opt.update(jax.grad(f)(p), s, p, value_fn=f))
    stalled = 0
    for _ in range(8):
        u, state = step(p, state)
        new = optax.apply_updates(p, u)
        assert float(f(new)) <= float(f(p)), (name, p, new)
        status = int(state[0].info.status)
        if np.array_equal(new, p):
            assert status == curvlib.Status.STALLED
            stalled += 1
        else:
            assert status == curvlib.Status.SUCCESS
        # the search's stored loss and gradient are those at the parameters it leaves
        np.testing.assert_allclose(state[-1].value, f(new), rtol=1e-12)
        np.testing.assert_allclose(state[-1].grad, jax.grad(f)(new), rtol=1e-12)
        p = new
    assert stalled >= 1
    if name == "newton":  # out of the far field: the loss falls twentyfold in 8 steps
        assert float(f(p)) < 150.0


@pytest.mark.parametrize("name", ["newton", "bfgs", "newton_cg_zoom", "newton_cg"])
@pytest.mark.parametrize("jit", [False, True])
def test_a_loss_taking_keyword_arguments_works_with_every_line_search(name, jit):
    """``value_fn(p, **batch)`` receives every extra argument (`kwargs_for`); optax's
    searches matched them against the named parameters only and refused them all."""
    x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    y = jnp.array([1.0, 0.0, 2.0])

    def loss(p, x, y):
        return jnp.mean((x @ p - y) ** 2) + 0.1 * jnp.sum(p**4)

    def kwloss(p, **batch):
        return loss(p, batch["x"], batch["y"])

    opt = {"newton": newton(), "bfgs": bfgs(), "newton_cg": newton_cg(),
           "newton_cg_zoom": newton_cg(linesearch=optax.scale_by_zoom_linesearch(10))}[name]
    p = jnp.array([0.3, -0.2])
    g = jax.grad(loss)(p, x, y)
    update = jax.jit(opt.update, static_argnames="value_fn") if jit else opt.update
    got, _ = update(g, opt.init(p), p, value_fn=kwloss, x=x, y=y)
    want, _ = opt.update(g, opt.init(p), p, value_fn=loss, x=x, y=y)
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("name", ["newton_cg", "newton", "bfgs", "svrg"])
def test_a_masked_second_order_transform_is_refused_naming_the_masked_leaves(name):
    """Inside ``optax.multi_transform``/``optax.masked`` a transform sees ``optax.MaskedNode``
    for the leaves outside its mask; the loss needs all of them, and the failure surfaced
    inside the user's loss ("can only concatenate tuple (not "int") to tuple")."""
    build = {"newton_cg": newton_cg, "newton": newton, "bfgs": bfgs,
             "svrg": lambda: curvlib.svrg(0.1)}[name]
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}

    def loss(p, x):
        return jnp.sum((p["a"] - x) ** 2) + jnp.sum(p["a"] ** 4) + jnp.sum((p["b"] + 1) ** 2)

    with pytest.raises(ValueError, match=r"optax.MaskedNode. at \['b'\].*optax.masked"):
        optax.masked(build(), {"a": True, "b": False}).init(params)
    opt = optax.multi_transform({"2nd": build(), "sgd": optax.sgd(0.1)}, {"a": "2nd", "b": "sgd"})
    with pytest.raises(ValueError, match=r"optax.MaskedNode. at \['b'\]"):
        opt.init(params)
    # the whole tree still works
    whole = build()
    extra = {"full_value_fn": lambda p: loss(p, 0.0)} if name == "svrg" else {}
    whole.update(jax.grad(loss)(params, 0.0), whole.init(params), params, value_fn=loss, x=0.0,
                 **extra)


@pytest.mark.parametrize("jit", [False, True])
def test_newtons_default_search_on_parameters_of_two_dtypes(jit):
    """A bfloat16 leaf beside a float32 one (flax ``param_dtype=bfloat16`` for one layer):
    optax's backtracking stepped the bfloat16 leaf in float32 and failed ("cond branches must
    have equal output types"). The full step is accepted here, so the searched step is the
    unsearched one; the step and the search's state keep the leaves' dtypes."""

    def loss(p):
        return sum(jnp.sum((x.astype(jnp.float32) - 0.5) ** 2)
                   + 0.1 * jnp.sum(x.astype(jnp.float32) ** 4) for x in jax.tree.leaves(p))

    params = {"a": jnp.ones(3, jnp.float32), "h": jnp.ones(2, jnp.bfloat16)}
    g = jax.grad(loss)(params)
    searched, plain = newton(), newton(linesearch=None)
    run = (lambda f: jax.jit(f, static_argnames="value_fn")) if jit else (lambda f: f)
    state = searched.init(params)
    u, new = run(searched.update)(g, state, params, value_fn=loss)
    want, _ = plain.update(g, plain.init(params), params, value_fn=loss)
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, params)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    assert all(a.dtype == b.dtype
               for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True))
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=1e-2)
    assert float(loss(optax.apply_updates(params, u))) < float(loss(params))
