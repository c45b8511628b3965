"""A catalogue of hostile inputs, each with its documented behaviour.

The contract (docs/scaling.md, "Hostile inputs"): every bad input either raises
a clear ``ValueError``/``TypeError`` naming the argument *before* any work, or
produces a result that says so (``finite=False``, ``converged=False``,
``skipped=True``, a NaN that propagates) -- never finite-looking garbage, and
never an optimizer state that differs from the one before the bad step.

Rows of the catalogue, in order: non-finite values (params, loss, data,
tangent / start vector, products); mismatched and empty pytrees; integer and
complex dtypes; sizes (``k = 0``, ``k >= dim``, ``dim = 0``, ``dim >= N``);
scales (``sigma <= 0``, huge ``sigma``, negative damping); zero start vectors;
non-symmetric matvecs.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvlib
from curvlib import landscape, optim

# ------------------------------------------------------------------ fixtures


def _loss(p, x, y):
    h = jnp.tanh(x @ p["w"] + p["b"])
    return 0.5 * jnp.mean((h @ p["v"] - y) ** 2)


def _problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {
        "w": jax.random.normal(k1, (3, 4)) / 2,
        "b": jnp.zeros(4),
        "v": jax.random.normal(k2, (4,)),
    }
    x = jax.random.normal(k3, (16, 3))
    y = jax.random.normal(k4, (16,))
    return params, x, y


def _poison(tree, value, leaf="w"):
    return {**tree, leaf: tree[leaf].at[(0,) * tree[leaf].ndim].set(value)}


def _diag_op(d):
    d = jnp.asarray(d)
    return (lambda v: {"a": d * v["a"]}), {"a": jnp.ones_like(d)}


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


# ------------------------------------------------- non-finite params / data / loss


@pytest.mark.parametrize(
    "where, bad",
    [("params", jnp.nan), ("params", jnp.inf), ("data", jnp.nan), ("data", -jnp.inf),
     ("loss", jnp.nan), ("loss", jnp.inf)],
)
def test_nonfinite_problem_flags_eigsh_and_cg(where, bad):
    """A NaN/Inf in params, data or the loss value propagates into the products,
    and the solvers flag it: ``finite=False``, ``converged=False``, finite vectors and NaN
    (never plausible) eigenvalues."""
    params, x, y = _problem()
    loss = _loss
    if where == "params":
        # ``v`` enters linearly: a saturating unit (tanh of an infinite pre-activation)
        # can turn an infinite weight into finite, meaningful derivatives
        params = _poison(params, bad, leaf="v")
    elif where == "data":
        x = x.at[2, 1].set(bad)
    else:
        loss = lambda p, x, y: _loss(p, x, y) + bad * jnp.sum(p["w"] ** 2)
    mv = curvlib.hessian_matvec(loss, params, x, y)
    v0 = jax.tree.map(jnp.ones_like, params)
    hv = mv(v0)
    assert not _all_finite(hv)  # propagated, not hidden
    e = curvlib.eigsh(mv, v0, 2, basis_size=8, max_restarts=5)
    assert not bool(e.finite) and not bool(e.converged)
    assert _all_finite(e.eigenvectors) and bool(jnp.all(jnp.isnan(e.eigenvalues)))
    c = curvlib.cg(mv, v0, damping=1.0)
    assert not bool(c.finite) and not bool(c.converged)
    assert _all_finite(c.x)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_tangent_propagates_through_products(bad):
    params, x, y = _problem()
    v = _poison(jax.tree.map(jnp.ones_like, params), bad)
    for mv in (
        curvlib.hessian_matvec(_loss, params, x, y),
        curvlib.hessian_matvec(_loss, params, x, y, mode="fwd-rev"),
        curvlib.ggn_matvec(
            lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"],
            lambda o, y: 0.5 * jnp.mean((o - y) ** 2), params, x, loss_args=(y,),
        ),
    ):
        assert not _all_finite(mv(v))
    assert not _all_finite(curvlib.hvp(lambda p: _loss(p, x, y), params, v))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_start_vector_is_flagged(bad):
    mv, v0 = _diag_op(jnp.arange(1.0, 11.0))
    v0 = {"a": v0["a"].at[3].set(bad)}
    e = curvlib.eigsh(mv, v0, 2)
    assert not bool(e.finite) and not bool(e.converged)
    l = curvlib.lanczos(mv, v0, 4)
    assert not bool(l.finite)
    c = curvlib.cg(mv, v0)
    assert not bool(c.finite) and not bool(c.converged) and _all_finite(c.x)
    p = curvlib.power_iteration(mv, v0, 1, num_iters=5)
    assert not bool(jnp.any(p.converged)) and not bool(p.finite)
    assert bool(jnp.all(jnp.isnan(p.eigenvalues))) and bool(jnp.all(jnp.isnan(p.residual_norms)))


def test_nonfinite_product_mid_run_keeps_last_finite_iterate():
    """A matvec that goes non-finite on some inputs (here: any not along ``b``, so the
    first step's product is finite and the second's is not, whatever scaling cg applies
    to the vectors it multiplies): cg stops, says so, and returns the last finite
    iterate, never a NaN-laden vector."""
    d = jnp.arange(1.0, 31.0)

    def mv(v):
        along_b = jnp.abs(jnp.sum(v["a"])) >= (1 - 1e-9) * jnp.sqrt(30.0) * jnp.linalg.norm(v["a"])
        return {"a": jnp.where(along_b, 1.0, jnp.nan) * d * v["a"]}

    c = curvlib.cg(mv, {"a": jnp.ones(30) * 2.0}, rtol=1e-12)
    assert not bool(c.finite) and not bool(c.converged)
    assert _all_finite(c.x) and _all_finite(c.curvature_direction)


def test_hutchinson_and_slq_do_not_hide_nonfinite_products():
    nanmv = lambda v: {"a": jnp.nan * v["a"]}
    v = {"a": jnp.ones(10)}
    key = jax.random.PRNGKey(0)
    t = curvlib.hutchinson_trace(nanmv, v, key, 6)
    assert bool(jnp.isnan(t.estimate)) and bool(jnp.isnan(t.stderr)) and not bool(t.finite)
    dg = curvlib.hutchinson_diag(nanmv, v, key, 4)
    assert bool(jnp.all(jnp.isnan(dg.estimate["a"]))) and not bool(dg.finite)
    assert bool(jnp.all(jnp.isnan(dg.stderr["a"])))
    sd = curvlib.spectral_density(nanmv, v, key, num_matvecs=4, num_probes=2)
    flagged = (hasattr(sd, "finite") and not bool(sd.finite)) or not bool(
        jnp.all(jnp.isfinite(sd.density))
    )
    assert flagged, "spectral_density returned a finite density from NaN products"


# ------------------------------------------------------ mismatched / empty trees


def test_mismatched_trees_raise_value_error():
    params, x, y = _problem()
    f = lambda p: _loss(p, x, y)
    wrong_struct = {"w": params["w"], "b": params["b"]}
    wrong_shape = {**params, "v": jnp.ones(5)}
    for t in (wrong_struct, wrong_shape):
        with pytest.raises(ValueError, match="tangent"):
            curvlib.hvp(f, params, t)
        with pytest.raises(ValueError, match="tangent"):
            curvlib.hessian_matvec(_loss, params, x, y)(t)
        with pytest.raises(ValueError, match="x0"):
            curvlib.cg(curvlib.hessian_matvec(_loss, params, x, y), params, x0=t)
        # a vector an algorithm hands to the operator is named as the user passed it (the
        # operator's own check said "the tangent", an argument no one passed)
        H = curvlib.hessian_matvec(_loss, params, x, y)
        key = jax.random.PRNGKey(0)
        for arg, call in (("v0", lambda: curvlib.eigsh(H, t, 1)),
                          ("b", lambda: curvlib.cg(H, t)),
                          ("v_like", lambda: curvlib.hutchinson_trace(H, t, key, 3))):
            with pytest.raises(ValueError, match=rf"^`{arg}` must match `params` in pytree "
                                                 rf"structure and leaf shapes"):
                call()
    with pytest.raises(ValueError, match="eigenvectors"):
        landscape.increment_coefficients(
            lambda p, b: _loss(p, *b), params, (x, y), 8, {"w": params["w"][None]}
        )


@pytest.mark.parametrize("solver", ["eigsh", "lanczos", "cg", "power_iteration"])
def test_matvec_returning_the_wrong_tree_raises(solver):
    """A matvec whose output does not match its input is a user error: raise, don't compute."""
    v0 = {"a": jnp.ones(6)}
    bad = lambda v: {"a": v["a"], "extra": v["a"]}
    call = {
        "eigsh": lambda: curvlib.eigsh(bad, v0, 2),
        "lanczos": lambda: curvlib.lanczos(bad, v0, 3),
        "cg": lambda: curvlib.cg(bad, v0),
        "power_iteration": lambda: curvlib.power_iteration(bad, v0, 1),
    }[solver]
    with pytest.raises((ValueError, TypeError)):
        call()


def test_empty_pytrees_raise_value_error():
    mv = lambda v: v
    key = jax.random.PRNGKey(0)
    for call in (
        lambda: curvlib.hessian_matvec(lambda p: 0.0, {}),
        lambda: curvlib.ggn_matvec(lambda p: 0.0, lambda o: o, {}),
        lambda: curvlib.eigsh(mv, {}, 1),
        lambda: curvlib.lanczos(mv, {}, 1),
        lambda: curvlib.cg(mv, {}),
        lambda: curvlib.power_iteration(mv, {}, 1),
        lambda: curvlib.hutchinson_trace(mv, {}, key, 3),
        lambda: curvlib.check_symmetric(mv, {}, key),
        lambda: curvlib.microbatch_mean(lambda b: b, {}, 2),
    ):
        with pytest.raises(ValueError, match="empty"):
            call()


# --------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_])
def test_non_real_float_leaves_raise_type_error(dtype):
    ones = {"a": jnp.ones(4, dtype)}
    f = lambda p: jnp.sum(jnp.abs(p["a"]) ** 2).real.astype(jnp.float32)
    mv = lambda v: v
    for call in (
        lambda: curvlib.hessian_matvec(f, ones),
        lambda: curvlib.ggn_matvec(lambda p: p["a"], lambda o: jnp.sum(o).real, ones),
        lambda: curvlib.eigsh(mv, ones, 1),
        lambda: curvlib.lanczos(mv, ones, 2),
        lambda: curvlib.cg(mv, ones),
        lambda: curvlib.power_iteration(mv, ones, 1),
        lambda: curvlib.hutchinson_trace(mv, ones, jax.random.PRNGKey(0), 3),
    ):
        with pytest.raises(TypeError):
            call()
    # the optimizers refuse them at init (test_optimizer_init_refuses_non_real_float_params)
    with pytest.raises(TypeError):
        optim.scale_by_newton_cg().init(ones)


INIT_TRANSFORMS = {
    "newton_cg": lambda: optim.newton_cg(),
    "scale_by_newton_cg": lambda: optim.scale_by_newton_cg(),
    "newton": lambda: optim.newton(),
    "scale_by_newton": lambda: optim.scale_by_newton(),
    "bfgs": lambda: optim.bfgs(),
    "scale_by_bfgs": lambda: optim.scale_by_bfgs(),
    "svrg": lambda: optim.svrg(0.1),
    "scale_by_svrg": lambda: optim.scale_by_svrg(),
}


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_])
@pytest.mark.parametrize("name", sorted(INIT_TRANSFORMS))
def test_optimizer_init_refuses_non_real_float_params(name, dtype):
    """``init`` raises a ``ValueError`` (also a ``TypeError``, like every other dtype error)
    naming ``params`` and the expected dtype, instead of failing at the first update."""
    tx = INIT_TRANSFORMS[name]()
    good = {"b": jnp.zeros(2), "w": jnp.ones(3)}
    bad = {**good, "w": jnp.ones(3, dtype)}
    transform = "scale_by_" + name.removeprefix("scale_by_")
    for init in (tx.init, jax.jit(tx.init)):
        with pytest.raises(ValueError,
                           match=rf"{transform}\.init: `params\['w'\]` must be a real floating") \
                as err:
            init(bad)
        assert isinstance(err.value, TypeError)
        assert jnp.dtype(dtype).name in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        tx.init({})
    tx.init(good)  # real floating leaves of any width are fine
    tx.init({"b": jnp.zeros(2, jnp.bfloat16), "w": jnp.ones(3, jnp.float32)})


def test_non_float_loss_raises_type_error():
    params, x, y = _problem()
    with pytest.raises(TypeError, match="floating"):
        curvlib.hessian_matvec(lambda p: jnp.sum(p["w"]).astype(jnp.int32), params)
    with pytest.raises(TypeError, match="scalar"):
        curvlib.hessian_matvec(lambda p: p["w"], params)


# ---------------------------------------------------------------------- sizes


def test_k_and_num_matvecs_out_of_range_raise():
    mv, v0 = _diag_op(jnp.arange(1.0, 11.0))
    key = jax.random.PRNGKey(0)
    cases = [
        (lambda: curvlib.eigsh(mv, v0, 0), r"`k` must be >= 1"),
        (lambda: curvlib.eigsh(mv, v0, 10),
         r"`k` must be in \[1, 9\] \(smaller than dim = 10, the size of `v0`\); got 10"),
        (lambda: curvlib.eigsh(mv, v0, 2, basis_size=2), r"`basis_size` must be in \[4, 10\]"),
        (lambda: curvlib.eigsh(mv, v0, 2, basis_size=11), r"`basis_size` must be in \[4, 10\]"),
        (lambda: curvlib.lanczos(mv, v0, 0), r"`num_matvecs` must be >= 1; got 0"),
        (lambda: curvlib.lanczos(mv, v0, 11), r"`num_matvecs` must be in \[1, 10\]"),
        (lambda: curvlib.power_iteration(mv, v0, 0), r"`k` must be in \[1, 9\]"),
        (lambda: curvlib.power_iteration(mv, v0, 10), r"`k` must be in \[1, 9\]"),
        (lambda: curvlib.cg(mv, v0, max_steps=0), r"`max_steps` must be >= 1"),
        (lambda: curvlib.hutchinson_trace(mv, v0, key, 0), r"`num_probes` must be >= 3"),
        (lambda: curvlib.spectral_density(mv, v0, key, num_matvecs=0, num_probes=1),
         r"`num_matvecs` must be in \[1, 10\]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_largest_legal_sizes_are_exact():
    """k = dim - 1 and a basis of dim vectors: the Krylov space is everything; answers exact."""
    d = jnp.arange(1.0, 11.0)
    mv, v0 = _diag_op(d)
    e = curvlib.eigsh(mv, {"a": jnp.linspace(1.0, 2.0, 10)}, 9)
    np.testing.assert_allclose(e.eigenvalues, d[::-1][:9], rtol=1e-10)
    l = curvlib.lanczos(mv, {"a": jnp.linspace(1.0, 2.0, 10)}, 10)
    T = np.diag(l.alphas) + np.diag(l.betas, 1) + np.diag(l.betas, -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), d, rtol=1e-10)


def test_zero_size_leaves_are_carried_along():
    """A pytree may contain size-0 leaves (an empty bias); they take no part and stay empty."""
    d = jnp.arange(1.0, 11.0)
    mv = lambda v: {"a": d * v["a"], "e": 3.0 * v["e"]}
    v0 = {"a": jnp.ones(10), "e": jnp.ones((0, 4))}
    e = curvlib.eigsh(mv, v0, 2)
    np.testing.assert_allclose(e.eigenvalues, [10.0, 9.0], rtol=1e-10)
    assert e.eigenvectors["e"].shape == (2, 0, 4)
    c = curvlib.cg(mv, v0, rtol=1e-12)
    np.testing.assert_allclose(c.x["a"], 1.0 / d, rtol=1e-10)


def test_dimension_zero_raises():
    """``dim = 0``: a pytree with no entries at all, or a subspace dimension of 0."""
    mv = lambda v: v
    z = {"a": jnp.ones((0,))}
    for call in (
        lambda: curvlib.eigsh(mv, z, 1),
        lambda: curvlib.lanczos(mv, z, 1),
        lambda: curvlib.power_iteration(mv, z, 1),
    ):
        with pytest.raises(ValueError):
            call()
    params, x, y = _problem()
    loss_b = lambda p, b: _loss(p, *b)
    with pytest.raises(ValueError, match="dim"):
        landscape.curvature_subspace(loss_b, params, (x, y), 8, 0, key=jax.random.PRNGKey(0))


def test_landscape_dim_at_least_parameter_count_raises():
    params, x, y = _problem()
    n = sum(p.size for p in jax.tree.leaves(params))
    loss_b = lambda p, b: _loss(p, *b)
    for dim in (n, n + 5):
        with pytest.raises(ValueError, match="parameter count"):
            landscape.curvature_subspace(loss_b, params, (x, y), 8, dim,
                                         key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="k"):
        landscape.curvature_subspace(loss_b, params, (x, y), 0, 2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="key"):
        landscape.curvature_subspace(loss_b, params, (x, y), 8, 2, key=None)


# --------------------------------------------------------------------- scales


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_or_nonfinite_sigma_raises(sigma):
    a, c, B = jnp.asarray(0.1), jnp.ones(2), jnp.eye(2)
    with pytest.raises(ValueError, match="sigma"):
        landscape.delta2_closed_form(a, c, B, sigma)
    with pytest.raises(ValueError, match="sigma"):
        landscape.delta2_quadratic_mc(a, c, B, sigma, key=jax.random.PRNGKey(0), num_samples=4)
    with pytest.raises(ValueError, match="sigma"):
        landscape.delta2_closed_form(a, c, B, jnp.array([1e-3, sigma]))
    mv, v0 = _diag_op(jnp.arange(1.0, 11.0))
    with pytest.raises(ValueError, match="sigma"):
        curvlib.spectral_density(mv, v0, jax.random.PRNGKey(0), num_matvecs=4, num_probes=2,
                                 sigma=sigma)


def test_huge_sigma_is_finite_or_overflows_visibly():
    """Huge sigma: the closed form is a polynomial in sigma^2; it stays exact while it fits
    and overflows to +inf (never NaN, never a wrapped value) when it does not."""
    a, c, B = jnp.asarray(0.1), jnp.array([1.0, 2.0]), jnp.diag(jnp.array([1.0, 3.0]))
    s = 1e3
    want = a**2 + a * s**2 * 4.0 + s**2 * 5.0 + s**4 / 4 * (2 * 10.0 + 16.0)
    np.testing.assert_allclose(landscape.delta2_closed_form(a, c, B, s), want, rtol=1e-12)
    big = landscape.delta2_closed_form(
        a.astype(jnp.float32), c.astype(jnp.float32), B.astype(jnp.float32), jnp.float32(1e30)
    )
    assert bool(jnp.isposinf(big))
    mv, v0 = _diag_op(jnp.arange(1.0, 11.0))
    sd = curvlib.spectral_density(mv, v0, jax.random.PRNGKey(0), num_matvecs=4, num_probes=2,
                                  sigma=1e6)
    assert bool(jnp.all(jnp.isfinite(sd.density))) and bool(jnp.all(sd.density >= 0))
    mass = jnp.sum(sd.density) * (sd.grid[1] - sd.grid[0])
    np.testing.assert_allclose(mass, 1.0, rtol=1e-2)


def test_negative_damping_is_refused_and_indefinite_cg_exits_on_negative_curvature():
    mv, b = _diag_op(jnp.arange(1.0, 11.0))
    with pytest.raises(ValueError, match="damping"):
        curvlib.cg(mv, b, damping=-100.0)
    neg, _ = _diag_op(jnp.arange(1.0, 11.0) - 100.0)
    c = curvlib.cg(neg, b)
    assert bool(c.negative_curvature) and not bool(c.converged)
    assert _all_finite(c.x)
    with pytest.raises(ValueError):
        optim.scale_by_newton_cg(damping=-1.0)


# ------------------------------------------------------------- zero start vectors


def test_zero_start_vector_restarts_from_a_random_direction():
    d = jnp.arange(1.0, 11.0)
    mv, _ = _diag_op(d)
    z = {"a": jnp.zeros(10)}
    e = curvlib.eigsh(mv, z, 2)
    assert bool(e.converged)
    np.testing.assert_allclose(e.eigenvalues, [10.0, 9.0], rtol=1e-8)
    l = curvlib.lanczos(mv, z, 5)
    Q = np.asarray(l.basis["a"])
    np.testing.assert_allclose(Q @ Q.T, np.eye(5), atol=1e-12)
    c = curvlib.cg(mv, z)
    assert bool(c.converged) and int(c.num_steps) == 0
    np.testing.assert_array_equal(c.x["a"], 0.0)
    p = curvlib.power_iteration(mv, z, 1, num_iters=500, rtol=1e-10, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(p.eigenvalues, [10.0], rtol=1e-3)


# ------------------------------------------------------------- non-symmetric ops


def test_nonsymmetric_matvec_is_detected():
    key = jax.random.PRNGKey(0)
    A = jax.random.normal(key, (12, 12))
    S = A + A.T
    v = {"a": jnp.zeros(12)}
    bad = curvlib.check_symmetric(lambda v: {"a": A @ v["a"]}, v, key)
    assert not bool(bad.symmetric) and float(bad.relative) > 1e-2
    assert bad.num_matvecs == 2
    good = curvlib.check_symmetric(lambda v: {"a": S @ v["a"]}, v, key, num_pairs=3)
    assert bool(good.symmetric) and float(good.relative) < 1e-12
    # a tiny asymmetry relative to ||A|| is caught in float64 (rtol = sqrt(eps))
    E = S + 1e-5 * (A - A.T)
    assert not bool(curvlib.check_symmetric(lambda v: {"a": E @ v["a"]}, v, key).symmetric)
    nan = curvlib.check_symmetric(lambda v: {"a": jnp.nan * v["a"]}, v, key)
    assert not bool(nan.symmetric) and not bool(nan.finite)
    with pytest.raises(ValueError, match="num_pairs"):
        curvlib.check_symmetric(lambda v: {"a": S @ v["a"]}, v, key, num_pairs=0)


@pytest.mark.parametrize("dtype, scales", [(jnp.float32, (1e-20, 1.0, 1e18, 1e25)),
                                           (jnp.float64, (1e-150, 1.0, 1e155, 1e200))])
def test_the_symmetry_verdict_does_not_depend_on_the_operators_scale(dtype, scales):
    """An upper-triangular operator times ``s``: the same relative asymmetry at every
    ``s`` (its products' squared norms overflowed from 1e18 in float32 and 1e155 in
    float64, and the check called it symmetric, ``relative = 0``)."""
    key = jax.random.PRNGKey(0)
    U = jnp.triu(jnp.ones((30, 30), dtype))
    v = jnp.zeros(30, dtype)
    rel = []
    for s in scales:
        r = curvlib.check_symmetric(lambda x, s=s: (s * U) @ x, v, key)
        assert bool(r.finite) and not bool(r.symmetric)
        rel.append(float(r.relative))
    np.testing.assert_allclose(rel, rel[1], rtol=1e-4)
    assert rel[1] > 1e-3


def test_hessian_and_ggn_products_pass_the_symmetry_check():
    params, x, y = _problem()
    key = jax.random.PRNGKey(1)
    for mode in ("linearize", "fwd-rev", "rev-rev"):
        mv = curvlib.hessian_matvec(_loss, params, x, y, mode=mode)
        assert bool(curvlib.check_symmetric(mv, params, key, num_pairs=2).symmetric), mode
    gv = curvlib.ggn_matvec(
        lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"],
        lambda o, y: 0.5 * jnp.mean((o - y) ** 2), params, x, loss_args=(y,),
    )
    assert bool(curvlib.check_symmetric(gv, params, key).symmetric)


def test_check_symmetric_is_jittable():
    S = jnp.diag(jnp.arange(1.0, 5.0))
    f = jax.jit(lambda k: curvlib.check_symmetric(lambda v: S @ v, jnp.zeros(4), k).relative)
    assert float(f(jax.random.PRNGKey(0))) < 1e-12


# ----------------------------------------------- optimizer states survive bad steps


def _quadratic_problem():
    A = jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0]))

    def f(p, x):
        return 0.5 * (p["w"] @ A @ p["w"]) * x + jnp.sum(jnp.sin(p["w"]))

    return f, {"w": jnp.ones(4)}


def _without_info(state):
    """The parts of a (possibly chained) state that must not move on a skipped step."""
    def strip(s):
        if hasattr(s, "_fields"):
            return {f: strip(getattr(s, f)) for f in s._fields if f not in ("info", "count")}
        if isinstance(s, (tuple, list)):
            return [strip(t) for t in s]
        return s
    return strip(state)


TRANSFORMS = {
    "newton_cg": lambda: optim.scale_by_newton_cg(),
    "newton": lambda: optim.scale_by_newton(),
    "bfgs": lambda: optim.scale_by_bfgs(),
    "svrg": lambda: optim.scale_by_svrg(snapshot_every=2),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_optimizer_state_survives_nonfinite_batch(name, bad):
    """A non-finite batch: zero update, ``info.skipped``, the state unchanged (except the
    step counter and the diagnostics), and the next good step is the one it would have been."""
    f, p0 = _quadratic_problem()
    tx = optax.chain(TRANSFORMS[name](), optax.scale(-0.5))
    extra = {"full_value_fn": lambda p: f(p, 1.0)} if name == "svrg" else {}

    def step(params, state, x):
        g = jax.grad(f)(params, x)
        u, state = tx.update(g, state, params, value_fn=f, x=x, **extra)
        return optax.apply_updates(params, u), state, u

    params, state, _ = step(p0, tx.init(p0), 1.0)
    p_bad, s_bad, u_bad = step(params, state, bad)
    assert all(bool(jnp.all(l == 0)) for l in jax.tree.leaves(u_bad))
    assert bool(s_bad[0].info.skipped)
    jax.tree.map(np.testing.assert_array_equal, _without_info(s_bad), _without_info(state))
    jax.tree.map(np.testing.assert_array_equal, p_bad, params)
    # recovery: the next finite step equals the step taken without the bad batch
    p_next, s_next, _ = step(p_bad, s_bad, 1.0)
    p_ref, s_ref, _ = step(params, state, 1.0)
    jax.tree.map(np.testing.assert_array_equal, p_next, p_ref)
    jax.tree.map(np.testing.assert_array_equal, _without_info(s_next), _without_info(s_ref))
    assert not bool(s_next[0].info.skipped)


@pytest.mark.parametrize("name", ["newton_cg", "newton", "bfgs"])
def test_optimizer_nonfinite_params_are_skipped(name):
    f, p0 = _quadratic_problem()
    tx = TRANSFORMS[name]()
    state = tx.init(p0)
    bad = {"w": p0["w"].at[1].set(jnp.nan)}
    g = jax.grad(f)(bad, 1.0)
    u, s = tx.update(g, state, bad, value_fn=f, x=1.0)
    assert all(bool(jnp.all(l == 0)) for l in jax.tree.leaves(u))
    assert bool(s.info.skipped)
    jax.tree.map(np.testing.assert_array_equal, _without_info(s), _without_info(state))


def test_optimizer_missing_value_fn_raises():
    f, p0 = _quadratic_problem()
    for name in ("newton_cg", "newton", "bfgs"):
        tx = TRANSFORMS[name]()
        with pytest.raises(TypeError, match="value_fn"):
            tx.update(p0, tx.init(p0), p0)


# --------------------------------------------------- landscape on non-finite data


def test_landscape_nonfinite_data_is_flagged_or_raises():
    params, x, y = _problem()
    loss_b = lambda p, b: _loss(p, *b)
    key = jax.random.PRNGKey(0)
    xb = x.at[3, 1].set(jnp.nan)
    # the mean-loss check (on by default, as in every landscape function) names the samples
    with pytest.raises(ValueError, match=r"`data` has NaN/Inf entries .* \(sample indices 3\)"):
        landscape.curvature_subspace(loss_b, params, (xb, y), 8, 2, key=key)
    e = landscape.curvature_subspace(loss_b, params, (xb, y), 8, 2, key=key, check_mean=False)
    assert not bool(e.finite) and not bool(e.converged)
    # a NaN *beyond* the first k+1 samples is never read
    e2 = landscape.curvature_subspace(loss_b, params, (x.at[12, 1].set(jnp.nan), y), 8, 2,
                                      key=key)
    assert bool(e2.finite)
    good = landscape.curvature_subspace(loss_b, params, (x, y), 8, 2, key=key)
    with pytest.raises(ValueError):
        landscape.increment_coefficients(loss_b, params, (xb, y), 8, good.eigenvectors)
    co = landscape.increment_coefficients(loss_b, params, (xb, y), 8, good.eigenvectors,
                                          check_mean=False)
    assert not bool(jnp.isfinite(co.a))  # NaN propagates into the coefficients


@pytest.mark.parametrize("where", ["data", "params", "loss"])
def test_landscape_nonfinite_losses_are_named_not_called_a_non_mean(where):
    """NaN/Inf in the first k+1 samples, in params or in the loss: the mean-loss check
    (on by default) says which, instead of "does not behave as a mean"; with
    ``check_mean=False`` the NaN/Inf propagates into the result."""
    params, x, y = _problem()
    loss_b = lambda p, b: _loss(p, *b)
    if where == "data":
        x = x.at[3, 1].set(jnp.nan).at[5, 0].set(-jnp.inf)
        match = (r"`data` has NaN/Inf entries in 2 of its first k\+1 = 9 samples "
                 r"\(sample indices 3, 5\)")
    elif where == "params":
        params = _poison(params, jnp.nan)
        match = "`params` has NaN/Inf entries"
    else:
        loss_b = lambda p, b: _loss(p, *b) + jnp.inf
        match = "`loss_fn` returned NaN/Inf on finite `params` and `data`"
    data, k, key = (x, y), 8, jax.random.PRNGKey(0)
    flat, unravel = ravel_pytree(params)
    basis = jax.vmap(unravel)(jnp.eye(flat.size, dtype=flat.dtype)[:2])  # orthonormal
    for call in (
        lambda: landscape.check_mean_loss(loss_b, params, data, k),
        lambda: landscape.increment_coefficients(loss_b, params, data, k, basis),
        lambda: landscape.delta1(loss_b, params, data, k),
        lambda: landscape.delta2_direct_mc(loss_b, params, data, k, basis, 0.1, key=key,
                                           num_samples=2),
        lambda: landscape.delta2_full_mc(loss_b, params, data, k, 0.1, key=key, num_samples=2),
    ):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "check_mean=False" in str(err.value)
        assert "does not behave as a mean" not in str(err.value)
    assert not bool(jnp.isfinite(landscape.delta1(loss_b, params, data, k, check_mean=False)))
    full = landscape.delta2_full_mc(loss_b, params, data, k, 0.1, key=key, num_samples=2,
                                    check_mean=False)
    assert not bool(jnp.isfinite(full.estimate))
    # a NaN beyond the first k+1 samples is never read, so it cannot fail the check
    if where == "data":
        landscape.check_mean_loss(loss_b, params, (x.at[3].set(0.0).at[5].set(0.0)
                                                   .at[12, 1].set(jnp.nan), y), k)


_KEY = jax.random.PRNGKey(0)
_ALGORITHMS = {
    "eigsh": lambda mv, q: curvlib.eigsh(mv, q, k=2, key=_KEY),
    "lanczos": lambda mv, q: curvlib.lanczos(mv, q, num_matvecs=5),
    "power_iteration": lambda mv, q: curvlib.power_iteration(mv, q, key=_KEY),
    "cg": lambda mv, q: curvlib.cg(mv, q),
    "hutchinson_trace": lambda mv, q: curvlib.hutchinson_trace(mv, q, _KEY, 4),
    "hutchinson_diag": lambda mv, q: curvlib.hutchinson_diag(mv, q, _KEY, 4),
    "spectral_density": lambda mv, q: curvlib.spectral_density(mv, q, _KEY, num_probes=2,
                                                               num_matvecs=5),
}


@pytest.mark.parametrize("how", ["eager", "partial", "jit", "vmap"])
@pytest.mark.parametrize("name", sorted(_ALGORITHMS))
def test_a_product_of_the_wrong_structure_is_named_on_every_path(name, how):
    """A product that drops a leaf or changes a leaf's shape is refused with the one message
    (`must match ... in pytree structure and leaf shapes`, naming the leaf), whether the
    call is eager, the operator a `Partial` (no tracing of our own), or the call inside the
    user's ``jit`` or ``vmap``. (``eigsh`` on the last three failed inside the algorithm
    with JAX's "Dict key mismatch", naming neither argument.)"""
    call = _ALGORITHMS[name]
    p = {"a": jnp.ones(30), "b": jnp.ones(40)}
    for bad, match in [(lambda v: {"a": v["a"]}, r"Leaves only in \w+: \['b'\]"),
                       (lambda v: {"a": v["a"], "b": v["b"][:3]}, r"\['b'\] of shape \(3,\)")]:
        run = {
            "eager": lambda: call(bad, p),
            "partial": lambda: call(jax.tree_util.Partial(bad), p),
            "jit": lambda: jax.jit(lambda q: call(bad, q))(p),
            "vmap": lambda: jax.vmap(lambda q: call(bad, q))(
                jax.tree.map(lambda a: jnp.ones((2,) + a.shape), p)),
        }[how]
        with pytest.raises(ValueError, match=r"must match `\w+` in pytree structure.*" + match):
            run()


def test_cg_takes_an_x0_of_another_dtype_as_bs():
    """``x0`` in float64 for a float32 ``b`` (or the reverse) starts CG in ``b``'s dtype, as
    SciPy does (it raised a raw ``while_loop`` carry TypeError)."""
    d = jnp.arange(1.0, 4.0, dtype=jnp.float32)
    for b_dt, x_dt in ((jnp.float32, jnp.float64), (jnp.float64, jnp.float32)):
        b = jnp.ones(3, b_dt)
        res = curvlib.cg(lambda v: d.astype(v.dtype) * v, b, x0=jnp.full(3, 0.5, x_dt))
        assert res.x.dtype == b_dt and int(res.status) == curvlib.Status.SUCCESS
        np.testing.assert_allclose(np.asarray(res.x), [1.0, 0.5, 1 / 3], rtol=1e-5)


def test_keys_grids_and_deflation_bases_are_checked_by_name():
    """A missing or non-key ``key``, a 2-D ``grid`` and a ``deflate`` basis that is not
    orthonormal (it gave 1935 +- 673 for a trace of 47.5) are refused with the argument's
    name (they raised bare JAX errors, or were accepted)."""
    A = jnp.diag(jnp.arange(1.0, 11.0))
    v = jnp.ones(10)
    mv = lambda x: A @ x
    key = jax.random.PRNGKey(0)
    for call, match in (
        (lambda: curvlib.hutchinson_trace(mv, v, None, 6), "`key` is required"),
        (lambda: curvlib.hutchinson_diag(mv, v, 0, 6), "`key` must be a PRNG key"),
        (lambda: curvlib.eigsh(mv, v, 2, key=3), "`key` must be a PRNG key"),
        (lambda: curvlib.power_iteration(mv, v, 1, key="a"), "`key` must be a PRNG key"),
        (lambda: curvlib.spectral_density(mv, v, 7, num_matvecs=4, num_probes=2),
         "`key` must be a PRNG key"),
        (lambda: curvlib.check_symmetric(mv, v, None), "`key` is required"),
        (lambda: curvlib.spectral_density(mv, v, key, num_matvecs=4, num_probes=2,
                                          grid=jnp.ones((3, 3))), "`grid` must be a 1-D"),
        (lambda: curvlib.hutchinson_trace(mv, v, key, 6, deflate=2 * jnp.eye(10)[:2]),
         "`deflate` must be an orthonormal basis"),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    exact = curvlib.hutchinson_trace(mv, v, key, 6, deflate=jnp.eye(10)[:2])
    assert float(exact.estimate) == pytest.approx(55.0)


# ---------------------------------------------- a systematic pass over the public API

_A = jnp.diag(jnp.arange(1.0, 13.0))
_V = jnp.ones(12)


@pytest.fixture(params=[False, True], ids=["fused", "answer-now"])
def behind(request):
    """Both eager paths: the fused program, and (as users get it) answer now, compile behind."""
    was = curvlib.compile_behind(request.param)
    try:
        yield
    finally:
        curvlib.compile_behind(was)


@pytest.mark.parametrize("call", [
    lambda mv: curvlib.eigsh(mv, _V, 3),
    lambda mv: jax.jit(lambda v: curvlib.eigsh(mv, v, 3))(_V),
    lambda mv: curvlib.power_iteration(mv, _V, 1),
    lambda mv: curvlib.cg(mv, _V),
    lambda mv: jax.jit(lambda b: curvlib.cg(mv, b))(_V),
    lambda mv: curvlib.lanczos(mv, _V, 5),
    lambda mv: curvlib.hutchinson_trace(mv, _V, jax.random.PRNGKey(0), 6),
    lambda mv: curvlib.hutchinson_diag(mv, _V, jax.random.PRNGKey(0), 4),
])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_an_integer_or_complex_product_is_refused(call, dtype, behind):
    # an int product gave wrong eigenvalues reported converged; a complex one lost its
    # imaginary part in the cast to the vector's dtype
    mv = lambda v: (_A @ v).astype(dtype) if dtype == jnp.int32 else (1 + 1j) * (_A @ v)
    with pytest.raises(ValueError, match=r"`matvec\(.*\)` must be a real floating array"):
        call(mv)


def test_operator_arguments_are_checked_before_the_users_function_runs():
    with pytest.raises(ValueError, match=r"`preconditioner\(b\)` must be a real floating"):
        curvlib.cg(lambda v: _A @ v, _V, preconditioner=lambda v: v.astype(jnp.int32))
    for call, name in ((lambda: curvlib.cg(lambda v: v, {}), "b"),
                       (lambda: curvlib.power_iteration(lambda v: v, [], 1), "v0"),
                       (lambda: curvlib.hutchinson_trace(lambda v: v, {}, jax.random.PRNGKey(0),
                                                         4), "v_like")):
        with pytest.raises(ValueError, match=f"`{name}` must hold at least one floating"):
            call()
    with pytest.raises(TypeError, match="`matvec` must be a callable"):
        curvlib.eigsh(None, _V, 2)
    f = lambda p: jnp.sum(p ** 3)
    for call, name in ((lambda: curvlib.hvp(3, _V, _V), "fun"),
                       (lambda: curvlib.hessian_matvec("loss", _V), "fun"),
                       (lambda: curvlib.ggn_matvec(lambda p: p, 3, _V), "loss_fn"),
                       (lambda: curvlib.jacobian_matvec(1, _V), "model_fn"),
                       (lambda: curvlib.inverse_matvec(None, damping=1.0), "matvec"),
                       (lambda: landscape.delta1(None, _V, jnp.ones((4, 12)), 2), "loss_fn")):
        with pytest.raises(TypeError, match=f"`{name}` must be"):
            call()
    with pytest.raises(TypeError, match="`linesearch` must be an optax"):
        optim.newton_cg(linesearch=3)
    # a complex tangent lost its imaginary part
    for call in (lambda: curvlib.hvp(f, _V, _V * (1 + 1j)),
                 lambda: curvlib.hessian_matvec(f, _V)(_V * (1 + 1j))):
        with pytest.raises(TypeError, match="`tangent` must be a real array"):
            call()
    with pytest.raises(ValueError, match="`damping` must be a real scalar; got shape"):
        curvlib.cg(lambda v: _A @ v, _V, damping=jnp.ones(12))


def test_keys_are_checked_where_they_are_taken():
    P = {"u": jnp.zeros(6), "w": jnp.zeros(6)}
    for call in (lambda: optim.track_curvature(1, 1, key=0),
                 lambda: curvlib.block_eigsh(lambda v: v, P, 1, key=0),
                 lambda: curvlib.lanczos(lambda v: v, _V, 4, key=3),
                 lambda: landscape.subspace_normals(3, 4, 2)):
        with pytest.raises(ValueError, match="`key` must be a PRNG key"):
            call()
    with pytest.raises(ValueError, match="`dim` must be >= 1"):
        landscape.subspace_normals(jax.random.PRNGKey(0), 4, -1)


def test_a_string_selection_of_leaves_is_refused():
    P = {"u": jnp.zeros(6), "w": jnp.zeros(6)}
    loss = lambda p: jnp.sum(p["u"] ** 2) + jnp.sum(p["w"] ** 4)
    with pytest.raises(ValueError, match=r"got the string 'u'.*lambda path, leaf"):
        curvlib.hessian_matvec(loss, P, wrt="u")
    with pytest.raises(ValueError, match="got the string"):
        curvlib.restrict(lambda v: v, P, "u")


def test_inverse_matvec_checks_given_eigenpairs():
    mv = lambda v: _A @ v
    cases = [((jnp.array([12.0, 11.0]), jnp.ones((2, 12))), "orthonormal"),
             ((jnp.array([-1.0, 11.0]), jnp.eye(12)[:2]), r"plus `damping` must be > 0"),
             ("x", "an EigshResult or a pair")]
    for pairs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            curvlib.inverse_matvec(mv, damping=1.0, method="lowrank", eigenpairs=pairs)
    with pytest.raises(ValueError, match=r"`rank` must be in \[1, 11\]"):
        curvlib.inverse_matvec(mv, damping=1.0, method="lowrank", rank=12, v0=_V)
    with pytest.raises(TypeError, match="`eigsh` must be a curvlib.Eigsh; got CG"):
        curvlib.inverse_matvec(mv, damping=1.0, method="lowrank", rank=2, v0=_V,
                               eigsh=curvlib.CG())
    # valid pairs: the exact inverse on their span, (theta + damping)^-1
    inv = curvlib.inverse_matvec(mv, damping=1.0, method="lowrank",
                                 eigenpairs=(jnp.array([12.0, 11.0]), jnp.eye(12)[-2:][::-1]))
    np.testing.assert_allclose(inv(jnp.eye(12)[-1]), jnp.eye(12)[-1] / 13.0, rtol=1e-6)


def test_a_state_of_other_params_and_integer_updates_are_named():
    f = lambda p: jnp.sum((p["w"] - 1.0) ** 4)
    P = {"w": jnp.zeros(3)}
    for make in (optim.newton_cg, optim.newton, optim.bfgs):
        opt = make()
        with pytest.raises(ValueError, match=r"`state` must match `\w+.init\(params\)`"):
            opt.update(jax.grad(f)(P), opt.init({"w": jnp.zeros(4)}), P, value_fn=f)
    opt = optim.newton_cg()
    with pytest.raises(ValueError, match=r"`updates\['w'\]` must be a real floating"):
        opt.update({"w": jnp.zeros(3, jnp.int32)}, opt.init(P), P, value_fn=f)


@pytest.mark.parametrize("make", [optim.newton_cg, optim.newton, optim.bfgs])
def test_a_non_finite_learning_rate_skips_the_step_and_says_so(make):
    # newton_cg gave NaN updates with finite=True and SUCCESS (newton: STALLED)
    f = lambda p: jnp.sum((p - 1.0) ** 2)
    p = jnp.zeros(3)
    opt = make(learning_rate=lambda count: jnp.nan)
    s0 = opt.init(p)
    u, s = opt.update(jax.grad(f)(p), s0, p, value_fn=f)
    assert bool(jnp.all(u == 0))
    info = s[0].info
    assert not bool(info.finite) and bool(info.skipped)
    assert int(info.status) == curvlib.Status.NONFINITE
    # the rest of the state is the state before the step
    rest = jax.tree.leaves((s[0]._replace(info=None), *s[1:]))
    before = jax.tree.leaves((s0[0]._replace(info=None), *s0[1:]))
    assert all(bool(jnp.array_equal(a, b, equal_nan=True)) for a, b in zip(rest, before,
                                                                           strict=True))


def test_the_landscape_names_the_grid_arguments_and_keeps_sigma_real():
    def loss(w, b):
        return jnp.mean((b @ w) ** 2)

    x = jnp.ones((12, 3)) + jnp.arange(36.0).reshape(12, 3) / 36
    kw = dict(dims=[1], sigmas=[0.1], key=jax.random.PRNGKey(0), progress=False)
    with pytest.raises(ValueError, match=r"`ks` \(k\): k \+ 1 = 13 exceeds"):
        landscape.k_curve(loss, jnp.ones(3), x, [2, 12], **kw)
    with pytest.raises(ValueError, match="`sigmas`"):
        landscape.k_curve(loss, jnp.ones(3), x, [2], **{**kw, "sigmas": [float("nan")]})
    with pytest.raises(TypeError, match="`ks` and `dims` must be sequences"):
        landscape.k_curve(loss, jnp.ones(3), x, [2], **{**kw, "dims": 1})
    # integer eigenvalues: sigma = 0.1 was cast to the eigenvalues' int dtype (0)
    got = landscape.delta2_spectral(jnp.array([1, 2]), jnp.array([2, 4]), 0.1)
    want = landscape.delta2_spectral(jnp.array([1.0, 2.0]), jnp.array([2.0, 4.0]), 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_switches_and_small_options_are_checked():
    for call in (lambda: curvlib.compile_behind("no"), lambda: curvlib.show_progress(2)):
        with pytest.raises(ValueError, match="`enabled` must be one of"):
            call()
    with pytest.raises(TypeError, match="`path` must be a folder"):
        curvlib.enable_compilation_cache(3)
    r = curvlib.cg(lambda v: 2.0 * v, jnp.ones(3))
    with pytest.raises(ValueError, match="`allow` must be a sequence of curvlib.Status"):
        curvlib.raise_if_failed(r, allow=("MAXSTEPS",))
    assert curvlib.raise_if_failed(r, allow=(curvlib.Status.NEGATIVE_CURVATURE,)) is r
    with pytest.raises(ValueError, match="`deflate` must be a real floating array"):
        curvlib.hutchinson_trace(lambda v: v, _V, jax.random.PRNGKey(0), 4,
                                 deflate=jnp.eye(12, dtype=jnp.int32)[:2])
    w, x = jnp.zeros(3), jnp.ones((6, 3))
    loss = lambda w, b: jnp.mean((b @ w - 1.0) ** 2)
    with pytest.raises(ValueError, match="`eigenvectors` must be a real floating array"):
        landscape.increment_coefficients(loss, w, x, 2, jnp.eye(3, dtype=jnp.int32)[:2])
    with pytest.raises(TypeError, match="`control_variate` must be"):
        landscape.delta2_direct_mc(loss, w, x, 2, jnp.eye(3)[:2], 0.1,
                                   key=jax.random.PRNGKey(0), num_samples=4,
                                   control_variate="yes")


@pytest.mark.parametrize("on", [False, True])
def test_power_iteration_from_a_zero_start_begins_at_random(on):
    # it returned NaN with MAX_STEPS after 0 products (later: BREAKDOWN without a key); it
    # now draws its start, from the key or from a seed derived from v0
    was = curvlib.compile_behind(on)
    try:
        for key in (None, jax.random.PRNGKey(0)):
            r = curvlib.power_iteration(lambda v: _A @ v, jnp.zeros(12), 1, key=key)
            assert bool(r.converged[0]) and abs(float(r.eigenvalues[0]) - 12.0) < 1e-2
            assert int(r.status) == curvlib.Status.SUCCESS
    finally:
        curvlib.compile_behind(was)


# -------------------------------------------- one vocabulary (the sixth audit, session 25)


def test_an_optimizer_refuses_a_mode_its_product_would_ignore_or_override():
    """`mode` with a Gauss-Newton split was silently ignored; `mode='linearize'` with
    microbatches silently became 'fwd-rev' (hessian_matvec refuses it: so do these)."""
    model = lambda p, x: jnp.tanh(x @ p["w"] + p["b"]) @ p["v"]
    sq = lambda out, y: 0.5 * jnp.mean((out - y) ** 2)
    with pytest.raises(ValueError, match="with `ggn=` the curvature is the Gauss-Newton"):
        curvlib.newton_cg(ggn=(model, sq), mode="rev-rev")
    with pytest.raises(ValueError, match="with `ggn=` the curvature is the Gauss-Newton"):
        curvlib.newton(ggn=(model, sq), mode="fwd-rev")
    for make in (lambda: curvlib.newton_cg(mode="linearize", microbatch_size=4),
                 lambda: curvlib.track_curvature(10, k=2, key=jax.random.PRNGKey(0),
                                                 mode="linearize", microbatch_size=4)):
        with pytest.raises(ValueError, match="`mode='linearize'` stores every microbatch"):
            make()
    curvlib.newton_cg(ggn=(model, sq))  # no mode: fine
    curvlib.newton_cg(mode="fwd-rev", microbatch_size=4)


def test_newton_cg_with_cg_none_is_its_default_truncated_solve():
    """`cg=None` gave a full `CG()` solve (3 steps, residual 5e-7) where leaving it out gives
    the truncated Newton default (`CG(rtol=0.5)`)."""
    params, x, y = _problem()
    vf = lambda p: _loss(p, x, y)
    g = jax.grad(vf)(params)
    infos = []
    for opt in (curvlib.newton_cg(), curvlib.newton_cg(cg=None),
                curvlib.newton_cg(cg=curvlib.CG())):
        _, state = opt.update(g, opt.init(params), params, value_fn=vf)
        infos.append(optax.tree_utils.tree_get(state, "info"))
    assert int(infos[0].num_steps) == int(infos[1].num_steps)
    assert float(infos[0].residual_norm) == float(infos[1].residual_norm)
    assert int(infos[2].num_steps) > int(infos[0].num_steps)  # the full solve differs


def test_eigsh_takes_every_field_of_its_solver_as_a_keyword():
    A = jnp.diag(jnp.arange(1.0, 41.0))
    mv, v0 = (lambda v: A @ v), jnp.ones(40)
    kw = curvlib.eigsh(mv, v0, k=2, verify=False)
    val = curvlib.eigsh(mv, v0, k=2, solver=curvlib.Eigsh(verify=False))
    full = curvlib.eigsh(mv, v0, k=2)
    np.testing.assert_array_equal(kw.eigenvalues, val.eigenvalues)
    assert int(kw.num_matvecs) == int(val.num_matvecs) < int(full.num_matvecs)
    import dataclasses
    import inspect

    params = inspect.signature(curvlib.eigsh).parameters
    assert {f.name for f in dataclasses.fields(curvlib.Eigsh)} <= set(params)


def test_kfac_variance_none_is_one_as_in_fisher_matvec():
    from curvlib.kronecker import kfac_curvature

    W = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    model = lambda p, x: x @ p
    none = kfac_curvature(model, W, x, likelihood="gaussian", variance=None)
    one = kfac_curvature(model, W, x, likelihood="gaussian", variance=1.0)
    jax.tree.map(np.testing.assert_array_equal, none.factors, one.factors)


def test_the_operator_check_does_not_keep_a_dropped_model_alive():
    """The remembered shape checks held each operator's function (and the arrays it closes
    over) in a strong dict of up to 512 entries."""
    import gc
    import weakref

    from curvlib import _validate

    traces = []

    class Model:  # a user object whose bound method is the loss
        def __init__(self):
            self.scale = jnp.ones(())

        def loss(self, p, x):
            traces.append(1)
            return self.scale * jnp.sum(jnp.tanh(x @ p) ** 2)

        def product(self, v):  # a bound method as a Partial's function
            traces.append(1)
            return self.scale * v

    m = Model()
    probe = weakref.ref(m)
    op = curvlib.hessian_matvec(m.loss, jnp.ones(3), jnp.ones((4, 3)), mode="fwd-rev")
    traces.clear()
    _validate.operator(op, jnp.ones(3))
    _validate.operator(op, jnp.ones(3))  # remembered: no second trace
    assert len(traces) <= 1  # (none: the operator is the program traced when it was built)
    traces.clear()
    for _ in range(3):  # a new bound-method object each time, the same model: one trace
        _validate.operator(jax.tree_util.Partial(m.product), jnp.ones(3))
    assert len(traces) == 1
    del m, op
    gc.collect()
    assert probe() is None


def test_a_bound_is_checked_after_its_own_range():
    """`max_damping` below `min_damping` because it is negative (or not a number) is told so,
    not that the two are out of order."""
    with pytest.raises(ValueError, match="`max_damping` must be > 0; got -1.0"):
        curvlib.newton_cg(max_damping=-1.0)
    with pytest.raises(ValueError, match="`max_damping` must be a real number"):
        curvlib.newton_cg(max_damping="abc")
    with pytest.raises(ValueError, match="`min_damping` must be <= `max_damping`; got 10"):
        curvlib.newton_cg(min_damping=10.0, max_damping=1.0)
    with pytest.raises(ValueError, match="`max_damping` must be > 0"):
        curvlib.kfac(model_fn=lambda p, x: x @ p, example_inputs={"x": jnp.ones((4, 3))},
                     max_damping=0.0)


def test_a_microbatched_gradient_names_the_leaf_of_another_length_before_the_loss_runs():
    """A batch leaf of another length failed inside the user's loss ("sub got incompatible
    shapes"), naming neither the argument nor the fix."""
    loss = lambda p, x, y: jnp.mean((x @ p - y) ** 2)
    p, x, y = jnp.ones(3), jnp.ones((8, 3)), jnp.ones(6)
    for f in (curvlib.gradient, curvlib.hessian_matvec):
        with pytest.raises(ValueError, match=r"`args\[1\]` has shape \(6,\), which does not "
                                             r"carry the batch size 8"):
            f(loss, p, x, y, microbatch_size=4)


def test_a_sigma_that_is_not_a_number_is_named():
    with pytest.raises(ValueError, match="`sigma` must be a positive number or a 1-D grid"):
        landscape.delta2_closed_form(0.1, jnp.ones(2), jnp.eye(2), "a")


def test_a_vector_or_basis_of_another_structure_is_told_which_leaves_differ():
    """A tangent or a basis with a renamed or missing leaf was shown two tree definitions to
    compare by eye; the message now names the leaves only one of them has."""
    from curvlib import landscape

    p = {"w": jnp.ones(3), "b": jnp.ones(())}
    H = curvlib.hessian_matvec(lambda q: jnp.sum(q["w"] ** 2) + q["b"] ** 2, p)
    with pytest.raises(ValueError, match=re.escape(
            "Leaves only in params: ['b']; only in tangent: ['c'].")):
        H({"w": jnp.ones(3), "c": jnp.ones(())})
    with pytest.raises(ValueError, match=re.escape(
            "Leaves only in params: ['b']; only in eigenvectors: none.")):
        landscape.increment_coefficients(lambda q, d: jnp.mean(d) * jnp.sum(q["w"] ** 2), p,
                                         jnp.ones(5), 2, {"w": jnp.ones((1, 3))})


# ------------------------------------------ entry points that checked less than their peers


def test_block_eigsh_names_the_leaf_a_product_drops():
    """A product that drops a leaf failed with an IndexError (one block of every leaf) or
    a message about the shapes of leaves by flat index (one block per leaf)."""
    A = jnp.diag(jnp.arange(1.0, 6.0))
    params = {"w": jnp.ones(5), "b": jnp.ones(3)}
    for blocks in ("all", None):
        with pytest.raises(ValueError, match=re.escape(
                "Leaves only in v: ['b']; only in matvec(v): none.")):
            curvlib.block_eigsh(lambda v: {"w": A @ v["w"]}, params, 2,
                                key=jax.random.PRNGKey(0), blocks=blocks)


def test_streamed_entry_points_check_key_and_params_as_their_in_memory_peers():
    """``stream_mean(key=1)`` failed inside JAX's PRNG, integer params inside ``jax.grad``,
    and empty params returned ``(value, {})``: `gradient` and `stream_matvec` refuse all
    three with the argument's name."""
    batches = [np.array([[1.0, 0.0], [0.0, 2.0]]), np.ones((1, 2))]
    loss = lambda w, b: jnp.mean((b @ w) ** 2)
    with pytest.raises(ValueError, match="`key` must be a PRNG key"):
        curvlib.stream_mean(lambda b: b.mean(), [np.ones(3)], key=1)
    with pytest.raises(TypeError, match=r"`params` must be a real floating array; got dtype "
                                        r"int"):
        curvlib.stream_gradient(loss, jnp.ones(2, int), batches)
    with pytest.raises(ValueError, match="`params` must hold at least one floating array"):
        curvlib.stream_gradient(lambda p, b: jnp.mean(b), {}, batches)
    value, grad = curvlib.stream_gradient(loss, jnp.ones(2), batches)  # (still answers)
    x = np.concatenate(batches)
    np.testing.assert_allclose(grad, 2 * x.T @ (x @ np.ones(2)) / 3, rtol=1e-12)
    np.testing.assert_allclose(value, np.mean((x @ np.ones(2)) ** 2), rtol=1e-12)


def test_find_layers_checks_params_as_kfac_curvature_does():
    from curvlib.kronecker import find_layers

    model = lambda p, x: x @ p["w"]
    with pytest.raises(TypeError, match=re.escape("`params['w']` must be a real floating")):
        find_layers(model, {"w": jnp.zeros((3, 2), int)}, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="`params` must hold at least one floating array"):
        find_layers(model, {}, jnp.ones((4, 3)))


@pytest.mark.parametrize("momentum", [-1.0, 1.0, float("nan"), "0.9"])
def test_kfac_refuses_a_momentum_outside_zero_one(momentum):
    """``momentum=-1.0`` ran (loss 0.147 after three steps against 6e-10 without): every
    other K-FAC range was checked."""
    from curvlib.kronecker import kfac

    with pytest.raises(ValueError, match="`momentum` must"):
        kfac(1.0, model_fn=lambda p, x: x @ p["w"], example_inputs={"x": jnp.ones((4, 3))},
             likelihood="gaussian", momentum=momentum)


def test_k_curve_refuses_repeated_dims_as_it_refuses_repeated_ks():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
    with pytest.raises(ValueError, match=re.escape(
            "`dims` must be distinct subspace dimensions; got [2, 1, 1].")):
        landscape.k_curve(loss, jnp.ones(4), (x, x[:, 0]), [2], dims=[2, 1, 1], sigmas=[0.1],
                          key=jax.random.PRNGKey(1))


def test_empirical_fisher_refuses_a_batch_loss_as_every_loss_taking_entry_point():
    """It raised a plain TypeError (``except ValueError`` missed it) telling a function called
    on one example to "reduce it over the batch"."""
    with pytest.raises(ValueError) as err:  # (an ArgumentError: a TypeError too)
        curvlib.empirical_fisher_matvec(lambda p, b: (b * p) ** 2, jnp.ones(5),
                                        jnp.ones((3, 5)))
    assert isinstance(err.value, TypeError)
    msg = str(err.value)
    assert msg.startswith("`per_example_loss` must return a scalar loss (shape ()); it "
                          "returned shape (5,).")
    assert "called on ONE example" in msg and "reduce it over the batch" not in msg


def test_eigsh_warns_where_a_basis_of_k_plus_2_leaves_verification_no_room():
    """At ``basis_size = k + 2 < dim`` with verification the call spends its budget with
    ``converged=False`` (documented); the user now hears it at the call, before the wait."""
    M = jax.random.normal(jax.random.PRNGKey(1), (30, 30))
    M = M @ M.T
    with pytest.warns(UserWarning, match=r"`basis_size` = 5, two more than the 3 wanted "
                                         r"eigenpairs, leaves no room"):
        r = curvlib.eigsh(lambda v: M @ v, jnp.ones(30), 3, basis_size=5, max_matvecs=60)
    assert not bool(r.converged)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw in ({"basis_size": 5, "verify": False}, {"basis_size": 6}):
            r = curvlib.eigsh(lambda v: M @ v, jnp.ones(30), 3, **kw)
            assert bool(r.converged), kw
            np.testing.assert_allclose(r.eigenvalues, np.linalg.eigvalsh(M)[::-1][:3],
                                       rtol=1e-6)
        # a basis spanning the whole space is exact: no warning
        curvlib.eigsh(lambda v: M[:5, :5] @ v, jnp.ones(5), 3, basis_size=5)


def test_report_helpers_and_small_utilities_name_what_they_were_given(tmp_path):
    """``curve_table(3)`` and ``curve_to_dict({})`` failed with an AttributeError, an integer
    ``dtype`` of `subspace_normals` inside JAX's sampler, and a file as the cache folder with
    a bare FileExistsError."""
    for f in (landscape.curve_table, landscape.curve_to_dict, landscape.curve_slopes):
        with pytest.raises(TypeError, match=r"`curve` must be a KCurve \(what `k_curve` "
                                            r"returns\); got int\."):
            f(3)
    with pytest.raises(ValueError, match="`dtype` must be a real floating dtype; got int32"):
        landscape.subspace_normals(jax.random.PRNGKey(0), 4, 2, dtype=jnp.int32)
    file = tmp_path / "a_file"
    file.write_text("")
    with pytest.raises(OSError, match="`path` must be a folder curvlib can write"):
        curvlib.enable_compilation_cache(file)


def test_explicit_mesh_monte_carlo_fisher_and_kfacs_refusal():
    """On a mesh of Explicit axes (one device suffices for the types), the Gaussian
    Monte-Carlo Fisher failed in its transposed product ("cotangent type does not match":
    its noise was drawn unsplit beside split outputs); now it equals the unplaced product
    (the same draws). K-FAC, which places its factors for Auto meshes only (docs/kfac.md),
    initialised silently and failed at the first update deep inside JAX; now ``init``
    names the leaf and the mesh."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 5)))
    W = {"w": jnp.asarray(rng.normal(size=(5, 3)))}
    v = {"w": jnp.asarray(rng.normal(size=(5, 3)))}
    key = jax.random.key(5)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Explicit,))
    models = (("gaussian", lambda p, x: x @ p["w"][:, 0]), ("gaussian", lambda p, x: x @ p["w"]),
              ("categorical", lambda p, x: x @ p["w"]))
    for likelihood, model in models:
        want = curvlib.fisher_matvec(model, W, x, likelihood=likelihood, key=key,
                                     num_samples=3)(v)
        with jax.set_mesh(mesh):
            rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            got = curvlib.fisher_matvec(model, jax.device_put(W, rep), jax.device_put(x, split),
                                        likelihood=likelihood, key=key,
                                        num_samples=3)(jax.device_put(v, rep))
        np.testing.assert_allclose(got["w"], want["w"], rtol=1e-12, atol=1e-14)
    opt = curvlib.kfac(0.1, model_fn=lambda p, x: x @ p["w"], likelihood="categorical",
                       example_inputs={"x": x})
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=re.escape(
            "scale_by_kfac.init: `params['w']` lives on a mesh with Explicit axes")):
        opt.init(jax.device_put(W, NamedSharding(mesh, P())))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=re.escape(
            "kfac_curvature: `args[0]` lives on a mesh with Explicit axes")):
        curvlib.kronecker.kfac_curvature(lambda p, x: x @ p["w"], W,
                                         jax.device_put(x, NamedSharding(mesh, P("data"))))
