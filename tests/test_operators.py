"""Layer 1 against dense oracles: Hessians and Jacobians from ``jax.hessian`` / ``jax.jacfwd``.

Every product is compared with the dense matrix of the *flattened* problem
(``ravel_pytree`` is fine in a test) on pytrees that mix dicts, tuples and
shapes. Tolerances come from the dtype: 1e-10 in float64, 1e-4 in float32.
"""

import gc
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvlib
from curvlib import fisher_matvec, ggn_matvec, gradient, hessian_matvec, hvp, microbatch_mean
from curvlib._compile import quick_options
from curvlib.optim import _common as optim_common

RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-4}
N = 10  # samples: microbatch 4 leaves a remainder chunk of 2


def _params(key, dtype):
    k = jax.random.split(key, 4)
    return {
        "w": 0.5 * jax.random.normal(k[0], (3, 4), dtype),
        "b": 0.1 * jax.random.normal(k[1], (4,), dtype),
        "head": (
            0.5 * jax.random.normal(k[2], (4, 2), dtype),
            0.1 * jax.random.normal(k[3], (2,), dtype),
        ),
    }


def _model(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"])
    return h @ p["head"][0] + p["head"][1]


def _loss(p, x, y):
    """A non-quadratic mean loss with parameter coupling across leaves."""
    out = _model(p, x)
    return jnp.mean(jnp.sum((out - y) ** 2, axis=-1)) + 0.1 * jnp.sum(jnp.sin(p["b"]) ** 2)


def _loss_batch(p, batch):
    """``_loss`` with the batch as one pytree: ``args[0]`` is what microbatching chunks."""
    return _loss(p, *batch)


def _data(key, dtype):
    kx, ky = jax.random.split(jax.random.fold_in(key, 1))
    return jax.random.normal(kx, (N, 3), dtype), jax.random.normal(ky, (N, 2), dtype)


def _dense_hessian(fun, params, *args):
    """The oracle, in float64 regardless of the input dtype."""
    p64 = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    a64 = jax.tree.map(lambda x: x.astype(jnp.float64), args)
    flat, unravel = ravel_pytree(p64)
    return np.asarray(jax.jit(jax.hessian(lambda f: fun(unravel(f), *a64)))(flat))


def _flat(tree):
    return np.asarray(ravel_pytree(jax.tree.map(lambda x: x.astype(jnp.float64), tree))[0])


@jax.jit
def _apply(matvec, v):
    return matvec(v)


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module", params=[jnp.float64, jnp.float32], ids=["f64", "f32"])
def problem(request):
    dtype = request.param
    key = jax.random.PRNGKey(0)
    params = _params(key, dtype)
    x, y = _data(key, dtype)
    tangents = [
        jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.PRNGKey(10 + i), p.shape, dtype),
                     params)
        for i in range(3)
    ]
    H = _dense_hessian(_loss, params, x, y)
    return dtype, params, (x, y), tangents, H


@pytest.mark.parametrize("mode", ["linearize", "fwd-rev", "rev-rev"])
def test_hessian_matvec_matches_dense_hessian(problem, mode):
    dtype, params, args, tangents, H = problem
    Hv = hessian_matvec(_loss, params, *args, mode=mode)
    for i, v in enumerate(tangents):
        out = Hv(v) if i == 0 else _apply(Hv, v)  # eager once, then jitted
        assert jax.tree.structure(out) == jax.tree.structure(params)
        assert all(o.dtype == dtype and o.shape == p.shape
                   for o, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True))
        assert _rel(_flat(out), H @ _flat(v)) <= RTOL[dtype]


def test_hvp_matches_dense_hessian(problem):
    dtype, params, args, tangents, H = problem
    for v in tangents:
        assert _rel(_flat(hvp(_loss, params, v, *args)), H @ _flat(v)) <= RTOL[dtype]


def test_jit_and_vmap_over_tangents(problem):
    dtype, params, args, tangents, H = problem
    if dtype == jnp.float32:
        pytest.skip("composition is dtype-independent; float64 suffices")
    Hv = hessian_matvec(_loss, params, *args)
    V = jax.tree.map(lambda *xs: jnp.stack(xs), *tangents)  # a block, leading axis 3
    block = jax.jit(lambda mv, V: jax.vmap(mv)(V))(Hv, V)
    for i, v in enumerate(tangents):
        got = _flat(jax.tree.map(lambda b, i=i: b[i], block))
        assert _rel(got, H @ _flat(v)) <= RTOL[dtype]
    # vmap of a fwd-rev product too
    Hv2 = hessian_matvec(_loss, params, *args, mode="fwd-rev")
    block2 = jax.vmap(Hv2)(V)
    assert _rel(_flat(block2), _flat(block)) <= RTOL[dtype]


def test_microbatched_equals_full_batch(problem):
    dtype, params, args, tangents, H = problem
    if dtype == jnp.float32:
        pytest.skip("chunking is dtype-independent; float64 suffices")
    v = tangents[0]
    ref = H @ _flat(v)
    for mode in ("fwd-rev", "rev-rev"):
        mb = hessian_matvec(_loss_batch, params, args, mode=mode, microbatch_size=4)  # 4+4+2
        assert _rel(_flat(_apply(mb, v)), ref) <= RTOL[dtype]
    # gradient accumulation
    val, g = jax.jit(lambda p, b: gradient(_loss_batch, p, b, microbatch_size=3))(params, args)
    val_ref, g_ref = jax.value_and_grad(_loss)(params, *args)
    assert abs(float(val) - float(val_ref)) <= RTOL[dtype] * abs(float(val_ref))
    assert _rel(_flat(g), _flat(g_ref)) <= RTOL[dtype]


def test_eager_microbatched_products_compile_once(problem, compiles):
    """An eager microbatched product, gradient or mean (a notebook cell run again): its scan
    compiled at every call (a fresh closure each time, 0.2 s); now once per computation,
    the arrays it closes over its inputs, so new values give their own answer."""
    dtype, params, args, tangents, H = problem
    if dtype == jnp.float32:
        pytest.skip("compilation does not depend on the dtype")
    v = tangents[0]
    calls = {
        "product": lambda a: hessian_matvec(_loss_batch, params, a, mode="fwd-rev",
                                            microbatch_size=4)(v),
        "gradient": lambda a: gradient(_loss_batch, params, a, microbatch_size=3),
        "mean": lambda a: microbatch_mean(lambda b: _loss_batch(params, b), a, 4),
    }
    other = jax.tree.map(lambda x: x * 1.5 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         args)
    for name, call in calls.items():
        jax.block_until_ready(call(args))
        with compiles() as seen:
            got = jax.block_until_ready(call(other))
        assert seen.count == 0, name
        want = {"product": lambda: hessian_matvec(_loss_batch, params, other)(v),
                "gradient": lambda: gradient(_loss_batch, params, other),
                "mean": lambda: _loss_batch(params, other)}[name]()
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)


def test_microbatch_mean_weights_the_remainder():
    x = jnp.arange(10.0)
    for size in (1, 3, 4, 9, 10, 20, None):
        assert np.isclose(float(microbatch_mean(jnp.mean, x, size)), 4.5, rtol=1e-12)
    with pytest.raises(ValueError, match="microbatch_size"):
        microbatch_mean(jnp.mean, x, 0)
    with pytest.raises(ValueError, match="microbatch_size"):
        microbatch_mean(jnp.mean, x, 2.5)
    # bfloat16 partial results are accumulated in float32: 1024 chunks of one sample
    u = jnp.asarray(np.random.default_rng(0).uniform(0.0, 1.0, 1024), jnp.bfloat16)
    got = microbatch_mean(jnp.mean, u, 1)
    assert got.dtype == jnp.bfloat16
    assert abs(float(got) - float(jnp.mean(u.astype(jnp.float32)))) <= 4e-3
    with pytest.raises(ValueError, match="leading"):
        microbatch_mean(lambda b: jnp.mean(b[0]), (x, jnp.ones(3)), 2)


# ------------------------------------------------------------------ GGN


def _ce(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


@pytest.fixture(scope="module")
def ggn_problem():
    key = jax.random.PRNGKey(3)
    params = _params(key, jnp.float64)
    x, y = _data(key, jnp.float64)
    flat, unravel = ravel_pytree(params)
    J = np.asarray(jax.jacfwd(lambda f: _model(unravel(f), x).reshape(-1))(flat))  # (N*2, P)
    return params, x, y, J, unravel


def _dense_of(matvec, unravel, P):
    cols = jax.vmap(lambda e: ravel_pytree(matvec(unravel(e)))[0])(jnp.eye(P))
    return np.asarray(cols).T


def test_ggn_mse_is_jtj_over_n(ggn_problem):
    params, x, y, J, unravel = ggn_problem
    mse = lambda o, t: jnp.sum((o - t) ** 2) / (2 * o.shape[0])
    G = ggn_matvec(_model, mse, params, x, loss_args=(y,))
    dense = _dense_of(G, unravel, J.shape[1])
    oracle = J.T @ J / N
    assert _rel(dense, oracle) <= 1e-10
    # microbatched (4 + 4 + 2) and jitted
    Gmb = ggn_matvec(_model, mse, params, x, loss_args=(y,), microbatch_size=4)
    v = unravel(jnp.asarray(np.random.default_rng(0).standard_normal(J.shape[1])))
    got = _flat(_apply(Gmb, v))
    assert _rel(got, oracle @ _flat(v)) <= 1e-10


def test_ggn_cross_entropy_is_psd_and_matches_jt_h_j(ggn_problem):
    params, x, _, J, unravel = ggn_problem
    labels = jnp.arange(N) % 2
    G = ggn_matvec(_model, _ce, params, x, loss_args=(labels,))
    dense = _dense_of(G, unravel, J.shape[1])
    logits = _model(params, x)
    Hl = np.asarray(jax.hessian(lambda o: _ce(o.reshape(N, 2), labels))(logits.reshape(-1)))
    assert _rel(dense, J.T @ Hl @ J) <= 1e-10
    assert np.allclose(dense, dense.T, atol=1e-12)
    evals = np.linalg.eigvalsh(dense)
    assert evals.min() >= -1e-12 * evals.max()
    # the full Hessian of the same loss is indefinite here: the GGN is not the Hessian
    H = _dense_hessian(lambda p: _ce(_model(p, x), labels), params)
    assert not np.allclose(H, dense, atol=1e-6)


# ------------------------------------------------- residuals stay traced inputs


def _constant_sizes(hlo_text):
    """Element counts of every ``constant`` in a StableHLO module."""
    sizes = []
    for line in hlo_text.splitlines():
        if "constant" not in line:
            continue
        m = re.search(r"tensor<([0-9x]*)x?[a-z]+[0-9]*>", line)
        dims = [int(d) for d in m.group(1).split("x") if d] if m else []
        sizes.append(int(np.prod(dims)) if dims else 1)
    return sizes


def test_hessian_matvec_keeps_residuals_as_jit_inputs():
    key = jax.random.PRNGKey(1)
    params = {"w": jax.random.normal(key, (40, 30)), "b": jnp.zeros(30)}
    x = jax.random.normal(jax.random.fold_in(key, 1), (64, 40))
    f = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
    apply = lambda mv, v: mv(v)
    traces = []

    @jax.jit
    def jitted(mv, v):
        traces.append(1)
        return apply(mv, v)

    for mode in ("linearize", "fwd-rev", "rev-rev"):
        Hv = hessian_matvec(f, params, x, mode=mode)
        sizes = _constant_sizes(jax.jit(apply).lower(Hv, params).as_text())
        assert max(sizes, default=0) < 64, (mode, sorted(sizes)[-3:])
    # the anti-pattern the test must be able to see: a closure over jax.linearize output
    _, lin = jax.linearize(lambda p: jax.grad(f)(p, x), params)
    baked = _constant_sizes(jax.jit(lambda v: lin(v)).lower(params).as_text())
    assert max(baked) >= 64 * 30
    # new residuals (another point, another batch) reuse the compiled program
    traces.clear()
    for s in range(3):
        p = jax.tree.map(lambda a, s=s: a + s, params)
        jitted(hessian_matvec(f, p, x + s), params)
    assert len(traces) == 1


def test_an_eager_hessian_matvec_rebuilt_from_a_new_closure_compiles_nothing(compiles):
    """A notebook cell building the operator again (new parameters, a new batch, a new
    lambda over them) linearises through one compiled program keyed on the loss's program,
    not op by op; its products are those of the dense Hessian at the new point."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 3))), "b": jnp.zeros(3)}
    x = jnp.asarray(rng.standard_normal((12, 5)))
    v = jax.tree.map(jnp.ones_like, params)

    def build(p, x):
        return hessian_matvec(lambda q, x: jnp.mean(jnp.tanh(x @ q["w"] + q["b"]) ** 2), p, x)

    jax.block_until_ready(build(params, x)(v))
    p2 = jax.tree.map(lambda a: a + 0.5, params)
    x2 = x * 2.0
    with compiles() as seen:
        got = jax.block_until_ready(build(p2, x2)(v))
    assert seen.count == 0, seen.names
    flat, unravel = ravel_pytree(p2)
    H = jax.hessian(lambda f: jnp.mean(jnp.tanh(x2 @ unravel(f)["w"] + unravel(f)["b"]) ** 2))(
        flat)
    np.testing.assert_allclose(ravel_pytree(got)[0], H @ ravel_pytree(v)[0], rtol=1e-10)
    # the Gauss-Newton product (mean squared error: 2/n J^T J) goes the same way
    model = lambda q, x: jnp.tanh(x @ q["w"] + q["b"])  # noqa: E731
    mse = lambda out, y: jnp.mean((out - y) ** 2)  # noqa: E731
    y = jnp.asarray(rng.standard_normal((12, 3)))
    jax.block_until_ready(ggn_matvec(lambda q, x: model(q, x), mse, params, x,
                                     loss_args=(y,), mode="linearize")(v))
    with compiles() as seen:
        got = jax.block_until_ready(ggn_matvec(lambda q, x: model(q, x), mse, p2, x2,
                                               loss_args=(y,), mode="linearize")(v))
    assert seen.count == 0, seen.names
    J = jax.jacobian(lambda f: model(unravel(f), x2).ravel())(flat)
    np.testing.assert_allclose(ravel_pytree(got)[0], 2 / y.size * J.T @ J @ ravel_pytree(v)[0],
                               rtol=1e-10)


def test_an_eager_build_linearises_in_one_program_not_op_by_op(compiles):
    """An eager build of the Hessian, Gauss-Newton or Jacobian operator ran the model's
    linearisation op by op: each primitive its own program, compiled on its first use (a
    small MLP's first build 1.5-2 s, 48 programs; a transformer's 9 s). It is one compiled
    program per loss program and shapes now (shapes no other test uses here, so nothing is
    cached). A loss closing over arrays, and a number argument, linearise as before; every
    operator equals its dense oracle."""
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.standard_normal((7, 13))), "b": jnp.zeros(13)}
    x = jnp.asarray(rng.standard_normal((11, 7)))
    y = jnp.asarray(rng.standard_normal((11, 13)))
    v = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    flat, unravel = ravel_pytree(params)

    def model(q, x):
        return jnp.sin(jnp.tanh(x @ q["w"] + q["b"]) * 1.5) + jnp.exp(-q["b"] ** 2)

    def loss(q, x, y, scale=1.0):
        return scale * jnp.mean(jnp.log1p((model(q, x) - y) ** 2))

    H = _dense_hessian(loss, params, x, y)
    quick_options()  # (its one-time probe of the backend's options is not the build's)
    with compiles() as seen:
        Hv = hessian_matvec(loss, params, x, y)
    assert seen.count <= 2, seen.names  # (the linearisation; a cast)
    assert any("_linearize" in n for n in seen.names), seen.names
    np.testing.assert_allclose(_flat(_apply(Hv, v)), H @ _flat(v), rtol=1e-10)
    with compiles() as seen:
        J = curvlib.jacobian_matvec(model, params, x)
        G = ggn_matvec(model, lambda o, y: jnp.mean((o - y) ** 2), params, x, loss_args=(y,),
                       mode="linearize")
    assert seen.count <= 2, seen.names
    Jd = np.asarray(jax.jacobian(lambda f: model(unravel(f), x).ravel())(flat))
    np.testing.assert_allclose(np.ravel(_apply(J, v)), Jd @ _flat(v), rtol=1e-10)
    np.testing.assert_allclose(_flat(_apply(G, v)), 2 / y.size * Jd.T @ Jd @ _flat(v),
                               rtol=1e-10)
    # (as before: a closure over the batch, a number the loss may use in Python)
    for Hv in (hessian_matvec(lambda q: loss(q, x, y), params),
               hessian_matvec(lambda q, s: loss(q, x, y, s), params, 1.0)):
        np.testing.assert_allclose(_flat(_apply(Hv, v)), H @ _flat(v), rtol=1e-10)


def test_an_eager_closure_over_the_batch_builds_and_multiplies_in_one_program_each(compiles):
    """``hessian_matvec(lambda p: loss(p, x, y), params)`` (a closure over the batch, as
    PyHessian users write it) and the product ``H v`` called eagerly: the build linearised
    op by op and the product replayed the tangent pass op by op (32 programs, 1.5 s before a
    small MLP's first ``H v``). Each is one program now, the closure's arrays its inputs: a
    fresh closure over the next batch of the same shapes compiles nothing, and computes at
    that batch (checked against the dense Hessian at both batches; the Jacobian's ``J v``
    and ``J^T u`` too). Shapes no other test uses; oracles after the measured blocks."""
    rng = np.random.default_rng(9)
    params = {"w": jnp.asarray(rng.standard_normal((6, 17))), "b": jnp.zeros(17)}
    xs = [jnp.asarray(rng.standard_normal((19, 6))) for _ in range(2)]
    y = jnp.asarray(rng.standard_normal((19, 17)))
    v = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params)
    u = jnp.asarray(rng.standard_normal((19, 17)))

    def model(q, x):
        return jnp.cos(jnp.tanh(x @ q["w"] + q["b"]) * 1.3)

    def loss(q, x, y):
        return jnp.mean(jnp.log1p((model(q, x) - y) ** 2))

    got, seen_per_batch = [], []
    quick_options()
    for x in xs:
        with compiles() as seen:
            Hv = hessian_matvec(lambda q: loss(q, x, y), params)  # noqa: B023 (used at once)
            got.append(Hv(v))
            J = curvlib.jacobian_matvec(lambda q: model(q, x), params)  # noqa: B023
            JT = curvlib.jacobian_transpose_matvec(lambda q: model(q, x), params)  # noqa: B023
            got.append((J(v), JT(u)))
        seen_per_batch.append(seen.names)
    assert len(seen_per_batch[0]) <= 7, seen_per_batch[0]  # (2 builds, 3 products, casts)
    assert seen_per_batch[1] == [], seen_per_batch[1]
    flat, unravel = ravel_pytree(params)
    for i, x in enumerate(xs):
        H = _dense_hessian(loss, params, x, y)
        np.testing.assert_allclose(_flat(got[2 * i]), H @ _flat(v), rtol=1e-10)
        Jd = np.asarray(jax.jacobian(lambda f: model(unravel(f), x).ravel())(flat))  # noqa: B023
        jv, jtu = got[2 * i + 1]
        np.testing.assert_allclose(np.ravel(jv), Jd @ _flat(v), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(_flat(jtu), Jd.T @ np.ravel(u), rtol=1e-10, atol=1e-14)


def test_an_eager_gradient_is_one_program_not_op_by_op(compiles):
    """``curvlib.gradient`` called eagerly evaluated ``value_and_grad`` op by op (33 programs
    and 1.5 s the first time for a small MLP); it is one program per loss program and
    shapes now, with ``jax.value_and_grad``'s numbers, ``aux`` included."""
    rng = np.random.default_rng(8)
    params = {"w": jnp.asarray(rng.standard_normal((9, 5))), "b": jnp.zeros(5)}
    x = jnp.asarray(rng.standard_normal((17, 9)))

    def loss(q, x):
        out = jnp.tanh(x @ q["w"] + q["b"])
        return jnp.mean(jnp.cosh(out) * out ** 2), {"peak": jnp.max(out)}

    with compiles() as seen:
        got = gradient(loss, params, x, has_aux=True)
    assert seen.count <= 2, seen.names  # (the gradient; a cast)
    want = jax.value_and_grad(loss, has_aux=True)(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)
    value, grad = gradient(lambda q, x: loss(q, x)[0], params, x)
    np.testing.assert_allclose(float(value), float(want[0][0]), rtol=1e-12)


def test_custom_derivative_rules_closing_over_the_batch_are_told_apart():
    """A custom JVP or VJP rule closing over the batch is not shown by a program's text:
    an operator rebuilt on a new batch (and an algorithm's program keyed on a plain
    closure) must differentiate with the new batch's rule, not reuse the first's."""
    rng = np.random.default_rng(1)
    p = {"w": jnp.asarray(rng.standard_normal((3, 2)))}
    v = {"w": jnp.ones((3, 2))}

    def tanh_on(X, scale=1.0):  # tanh(X w), its derivative scaled (a surrogate gradient)
        @jax.custom_jvp
        def f(w):
            return jnp.tanh(X @ w)

        @f.defjvp
        def f_jvp(primals, tangents):
            y = jnp.tanh(X @ primals[0])
            return y, scale * (1 - y**2) * (X @ tangents[0])

        return f

    for _ in range(2):
        f = tanh_on(jnp.asarray(rng.standard_normal((4, 3))))
        m = lambda q, f=f: f(q["w"])  # noqa: E731
        np.testing.assert_allclose(curvlib.jacobian_matvec(m, p)(v), jax.jvp(m, (p,), (v,))[1],
                                   rtol=1e-12)

    def loss_on(X):  # a custom VJP whose backward pass reads the batch
        @jax.custom_vjp
        def f(w):
            return jnp.sum(jnp.tanh(X @ w) ** 2)

        def fwd(w):
            return jnp.sum(jnp.tanh(X @ w) ** 2), w

        def bwd(w, ct):
            y = jnp.tanh(X @ w)
            return (ct * X.T @ (2 * y * (1 - y**2)),)

        f.defvjp(fwd, bwd)
        return lambda q: f(q["w"])

    for _ in range(2):
        loss = loss_on(jnp.asarray(rng.standard_normal((4, 3))))
        H = jax.hessian(lambda w: loss({"w": w}))(p["w"]).reshape(6, 6)
        np.testing.assert_allclose(hessian_matvec(loss, p)(v)["w"].ravel(),
                                   H @ np.ones(6), rtol=1e-12)
    # and through an algorithm, whose program is keyed on a plain closure's program: a rule
    # scaled by a Python number (a surrogate gradient) prints the same program for every
    # scale; each scale's rule must be its own
    X = jnp.asarray(rng.standard_normal((4, 3)))
    for scale in (1.0, 3.0):
        f = tanh_on(X, scale)
        loss = lambda w, f=f: jnp.sum(f(w) ** 2)  # noqa: E731
        hv = lambda u, loss=loss: {"w": jax.jvp(jax.grad(loss), (p["w"],), (u["w"],))[1]}  # noqa: E731
        H = jax.hessian(loss)(p["w"]).reshape(6, 6)
        res = curvlib.eigsh(hv, v, 2, key=jax.random.PRNGKey(0))
        np.testing.assert_allclose(res.eigenvalues, np.sort(np.linalg.eigvalsh(H))[::-1][:2],
                                   rtol=1e-8, err_msg=f"scale {scale}")


# ------------------------------------------ caches do not keep user functions alive


def test_product_caches_release_user_functions():
    """Equal builder calls still give the same matvec object (so jitted consumers do not
    recompile), but the caches hold user functions weakly: a loss closing over a large
    array is freed once the matvecs built on it are gone."""
    key = jax.random.PRNGKey(2)
    params = _params(key, jnp.float64)
    x, y = _data(key, jnp.float64)
    v = jax.tree.map(jnp.ones_like, params)

    def make():
        big = jnp.ones(1_000_000)  # what a leak would keep alive
        loss = lambda p, x, y: _loss(p, x, y) + 0.0 * big[0]
        model = lambda p, x: _model(p, x) + 0.0 * big[0]
        out_loss = lambda o, y: jnp.mean(jnp.sum((o - y) ** 2, axis=-1)) + 0.0 * big[0]
        return loss, model, out_loss

    loss, model, out_loss = make()
    refs = [weakref.ref(f) for f in (loss, model, out_loss)]
    mvs = [hessian_matvec(loss, params, x, y, mode=m) for m in ("linearize", "fwd-rev", "rev-rev")]
    mvs += [
        hessian_matvec(lambda p, b, f=loss: f(p, *b), params, (x, y), microbatch_size=4),
        ggn_matvec(model, out_loss, params, x, loss_args=(y,)),
        ggn_matvec(model, out_loss, params, x, loss_args=(y,), microbatch_size=4),
        # the optimizers' keyword routing wraps user functions in cached adapters too
        optim_common.curvature_matvec(loss, None, params, {"x": x, "y": y},
                                      hvp_mode="fwd-rev", microbatch_size=None),
        optim_common.curvature_matvec(loss, (model, out_loss), params, {"x": x, "y": y},
                                      hvp_mode=None, microbatch_size=None),
    ]
    # still memoised while in use
    assert hessian_matvec(loss, params, x, y, mode="fwd-rev").func is mvs[1].func
    assert ggn_matvec(model, out_loss, params, x, loss_args=(y,)).func is mvs[4].func
    H = _dense_hessian(_loss, params, x, y)
    for mv in mvs[:4]:
        assert _rel(_flat(mv(v)), H @ _flat(v)) < 1e-10
    for mv in mvs[4:]:
        mv(v)
    hvp(loss, params, v, x, y)
    del mvs, mv, loss, model, out_loss
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_product_caches_keep_one_compilation_and_accept_any_callable():
    key = jax.random.PRNGKey(3)
    params = _params(key, jnp.float64)
    x, y = _data(key, jnp.float64)
    v = jax.tree.map(jnp.ones_like, params)
    traces = []

    @jax.jit
    def jitted(mv, v):
        traces.append(1)
        return mv(v)

    # each matvec is dropped after its call; the next one (new point and batch) is equal
    for mode in ("fwd-rev", "rev-rev"):
        traces.clear()
        for s in range(3):
            jitted(hessian_matvec(_loss, params, x + s, y, mode=mode), v)
        assert len(traces) == 1, mode

    # an unhashable callable (which functools.lru_cache refused) is just not cached
    class Unhashable:
        __hash__ = None

        def __call__(self, p, x, y):
            return _loss(p, x, y)

    H = _dense_hessian(_loss, params, x, y)
    for mode in ("fwd-rev", "rev-rev"):
        Hv = hessian_matvec(Unhashable(), params, x, y, mode=mode)
        assert _rel(_flat(Hv(v)), H @ _flat(v)) < 1e-10


# -------------------------------------------------------------- bad input


def test_bad_inputs():
    p = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    f = lambda p: jnp.sum(p["a"] ** 3) + jnp.sum(p["b"] ** 4)
    with pytest.raises(ValueError, match=r"params.*tangent"):
        hvp(f, p, {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"params.*tangent"):
        hvp(f, p, {"a": jnp.ones(3), "b": jnp.ones(4)})
    Hv = hessian_matvec(f, p)
    for mode in ("linearize", "fwd-rev", "rev-rev"):
        Hv = hessian_matvec(f, p, mode=mode)
        with pytest.raises(ValueError, match=r"params.*tangent"):
            Hv({"a": jnp.ones(3), "c": jnp.ones((2, 2))})
        with pytest.raises(ValueError, match=r"params.*tangent"):
            Hv({"a": jnp.ones(3), "b": jnp.ones((4,))})
    G = ggn_matvec(lambda p: p["a"] * jnp.sum(p["b"]), lambda o: jnp.sum(o**2), p)
    with pytest.raises(ValueError, match=r"params.*tangent"):
        G({"a": jnp.ones(2), "b": jnp.ones((2, 2))})
    vec_loss = lambda p: p["a"] ** 2
    with pytest.raises(TypeError, match="scalar"):
        hvp(vec_loss, p, p)
    with pytest.raises(TypeError, match="scalar"):
        hessian_matvec(vec_loss, p)
    with pytest.raises(TypeError, match="scalar"):
        ggn_matvec(lambda p: p["a"], lambda o: o * 2, p)
    with pytest.raises(TypeError, match="scalar"):
        gradient(vec_loss, p)
    with pytest.raises(ValueError, match="mode"):
        hessian_matvec(f, p, mode="bogus")
    with pytest.raises(ValueError, match="linearize"):
        hessian_matvec(lambda p, x: f(p) * jnp.mean(x), p, jnp.ones(4), mode="linearize",
                       microbatch_size=2)


def test_public_surface():
    for name in curvlib.__all__:
        assert getattr(curvlib, name) is not None
        if not name.startswith("__") and name[0].islower():
            assert getattr(curvlib, name).__doc__, name


def test_the_default_linearised_product_casts_its_tangent_like_the_other_modes(problem):
    """A float32 tangent for float64 parameters: every mode returns the float64 product (the
    default ``linearize`` mode raised JAX's "tangent values inconsistent with the primal")."""
    dtype, params, args, tangents, H = problem
    if dtype == jnp.float32:
        pytest.skip("the float64 parameters are the case")
    v = jax.tree.map(lambda t: t.astype(jnp.float32), tangents[0])
    for mode in ("linearize", "fwd-rev", "rev-rev"):
        out = hessian_matvec(_loss, params, *args, mode=mode)(v)
        assert all(o.dtype == jnp.float64 for o in jax.tree.leaves(out))
        assert _rel(_flat(out), H @ _flat(v).astype(np.float64)) <= 1e-6


def test_an_empty_batch_is_refused_by_name():
    """A leading sample axis of length 0: ``microbatch_mean`` documented a ``ValueError`` and
    returned NaN; the microbatched operators returned zero products with no flag."""
    with pytest.raises(ValueError, match="`batch` is empty"):
        curvlib.microbatch_mean(jnp.mean, jnp.zeros((0,)), 2)
    params = {"w": jnp.ones(3)}
    loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
    with pytest.raises(ValueError, match="is empty"):
        hessian_matvec(loss, params, jnp.zeros((0, 3)), microbatch_size=2)(params)


def test_fresh_closures_share_programs_and_free_their_arrays(problem, compiles):
    """A new loss or model closure each step (``lambda p, b: loss(p, b, scale)``) with the
    same computation: every product mode compiled again at each call, and JAX's caches kept
    each closure's arrays alive. Now the operator is keyed by its program: no compile from
    the second closure on, the new closure's arrays give its own answer, and an operator
    dropped frees what its closure held (a jitted algorithm's cache holds its program only).
    """
    dtype, params, args, tangents, H = problem
    if dtype == jnp.float32:
        pytest.skip("compilation does not depend on the dtype")
    v = tangents[0]
    logits = lambda p, b: _model(p, b[0])
    labels = lambda b: jax.nn.one_hot(jnp.argmax(b[1], -1), 2)
    ce = lambda out, y: -jnp.mean(jnp.sum(y * jax.nn.log_softmax(out), -1))

    def build(kind, mode, scale, closed=True):
        big = jnp.full((300, 300), scale, dtype)  # closed over, as a model's buffers are
        c = (lambda: big[0, 0]) if closed else (lambda: scale)
        loss = lambda p, b: c() * _loss_batch(p, b)
        model = lambda p, b: c() * logits(p, b)
        if kind == "hessian":
            mb = 4 if mode != "linearize" else None
            return hessian_matvec(loss, params, args, mode=mode, microbatch_size=mb), big
        if kind == "ggn":
            return ggn_matvec(model, lambda out: ce(out, labels(args)), params, args,
                              mode=mode), big
        return fisher_matvec(model, params, args, mode=mode), big

    cases = [("hessian", m) for m in ("linearize", "fwd-rev", "rev-rev")]
    cases += [(k, m) for k in ("ggn", "fisher") for m in ("linearize", "recompute")]
    for kind, mode in cases:
        first = jax.block_until_ready(_apply(build(kind, mode, 1.0)[0], v))
        with compiles() as seen:
            op, big = build(kind, mode, 2.0)
            got = jax.block_until_ready(_apply(op, v))  # as an algorithm takes it
        assert seen.count == 0, (kind, mode, seen.names)
        want = build(kind, mode, 2.0, closed=False)[0](v)  # the scale as a Python number
        for a, b, c in zip(*map(jax.tree.leaves, (got, want, first)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
            assert not np.allclose(np.asarray(a), np.asarray(c))  # not the first closure's
        ref_big = weakref.ref(big) if _weakrefable(big) else None
        n_live = sum(x.shape == (300, 300) for x in jax.live_arrays())
        del op, big
        gc.collect()
        assert sum(x.shape == (300, 300) for x in jax.live_arrays()) < n_live, (kind, mode)
        assert ref_big is None or ref_big() is None


def _weakrefable(x) -> bool:
    try:
        weakref.ref(x)
    except TypeError:
        return False
    return True


def test_a_number_argument_stays_an_input_of_the_program(problem, compiles):
    """A Python or NumPy number passed as an argument (a temperature, a weight) was a leaf of
    the operator; tracing the operator into a program must not write it in as a constant,
    or each new value compiles the program again."""
    dtype, params, args, tangents, H = problem
    if dtype == jnp.float32:
        pytest.skip("compilation does not depend on the dtype")
    v = tangents[0]
    loss = lambda p, b, lam: lam * _loss_batch(p, b)
    first = _apply(hessian_matvec(loss, params, args, 1.0, mode="fwd-rev"), v)
    for number in (float, np.float64):  # (a Python float is weakly typed: its own program)
        _apply(hessian_matvec(loss, params, args, number(2.0), mode="fwd-rev"), v)
        with compiles() as seen:
            got = _apply(hessian_matvec(loss, params, args, number(3.0), mode="fwd-rev"), v)
        assert seen.count == 0, (number, seen.names)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(first), strict=True):
            np.testing.assert_allclose(np.asarray(a), 3.0 * np.asarray(b), rtol=1e-10)


def test_int_and_bool_arguments_are_passed_as_given_in_every_mode():
    """A loss may use an ``int`` or ``bool`` argument in Python (a class count, a training
    flag), as ``jax.hessian(loss)(p, x, y, 3, True)`` allows: every operator, mode and
    microbatching gives the dense Hessian's product (the entry checks traced them)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, 4)))
    y = jnp.asarray(rng.integers(0, 3, size=12))
    p = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
    v = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}

    def xent(o, y, num_classes, smooth):
        t = jax.nn.one_hot(y, num_classes)
        t = 0.9 * t + 0.1 / num_classes if smooth else t  # Python branches on both
        return -jnp.mean(jnp.sum(t * jax.nn.log_softmax(o), -1))

    model = lambda q, x: x @ q["w"] + q["b"]
    loss = lambda q, x, y, c, s: xent(model(q, x), y, c, s)
    flat, unravel = ravel_pytree(p)
    H = jax.hessian(lambda f: loss(unravel(f), x, y, 3, True))(flat)
    want = H @ ravel_pytree(v)[0]
    ops = {
        mode: hessian_matvec(loss, p, x, y, 3, True, mode=mode)
        for mode in ("linearize", "fwd-rev", "rev-rev")
    }
    ops["microbatched"] = hessian_matvec(loss, p, x, y, 3, True, microbatch_size=4,
                                         batch_argnums=(0, 1))
    for mode in ("linearize", "recompute"):  # the cross-entropy is convex in the outputs
        ops[f"ggn {mode}"] = ggn_matvec(model, xent, p, x, loss_args=(y, 3, True), mode=mode)
    got = {name: op(v) for name, op in ops.items()}
    got["hvp"] = hvp(loss, p, v, x, y, 3, True)
    # NumPy's ints and bools (``y.max() + 1``), as jax.hessian passes them
    got["numpy scalars"] = hessian_matvec(loss, p, x, y, np.int64(3), np.bool_(True))(v)
    for name, out in got.items():
        np.testing.assert_allclose(ravel_pytree(out)[0], want, rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    value, g = gradient(loss, p, x, y, 3, True)
    np.testing.assert_allclose(value, loss(p, x, y, 3, True), rtol=1e-12)
    np.testing.assert_allclose(ravel_pytree(g)[0],
                               jax.grad(lambda f: loss(unravel(f), x, y, 3, True))(flat),
                               rtol=1e-10, atol=1e-14)


def test_an_operator_is_the_curvature_at_its_build_even_if_a_numpy_array_changes_after():
    """An operator is the curvature at the point and data it was built with. A NumPy array
    the loss closes over (or a NumPy batch) is held by reference by JAX: changed in place
    after the build, the linearised product read a blend of old residuals and new values,
    the recomputing modes the new values alone. Every mode now holds its build's values."""
    x = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    scale = np.ones(3)
    p0, v = jnp.asarray([0.3, -0.2, 0.5]), jnp.asarray([1.0, -2.0, 0.5])
    loss = lambda p, x: jnp.mean(jnp.tanh(x @ (p * scale)) ** 2)
    model = lambda p, x: jnp.tanh(x @ (p * scale))
    half_mse = lambda o: jnp.mean(o ** 2)
    H = np.asarray(jax.hessian(loss)(p0, x))
    J = np.asarray(jax.jacobian(model)(p0, x))
    G = 2.0 / J.shape[0] * J.T @ J  # the GGN of the mean square
    ops = {m: (hessian_matvec(loss, p0, x, mode=m), H)
           for m in ("linearize", "fwd-rev", "rev-rev")}
    ops["microbatched"] = (hessian_matvec(loss, p0, x, microbatch_size=1), H)
    for m in ("linearize", "recompute"):
        ops[f"ggn {m}"] = (ggn_matvec(model, half_mse, p0, x, mode=m), G)
    scale[:] = 5.0  # after the build
    x[:] = -x
    for name, (op, M) in ops.items():
        np.testing.assert_allclose(op(v), M @ np.asarray(v), rtol=1e-10, err_msg=name)
