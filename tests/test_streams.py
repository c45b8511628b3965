"""Operators over data streamed from the host equal the full-batch operators (float64, 1e-12).

The dataset (13 examples) comes from a host iterator factory in NumPy batches
of 5, 5 and a ragged 3; each product makes one pass. Checked: Hessian (two
modes), GGN, exact Fisher and empirical Fisher products, a block of products
in one pass, the Monte-Carlo Fisher's per-batch keys, the gradient and value,
compilation counts (two batch shapes: two compilations, then none), a
host-driven eigensolver (SciPy's ARPACK) on a streamed Hessian, and the errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvlib

N, B, C = 13, 5, 3


def _setup():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(0.6 * rng.standard_normal((4, 5))),
              "head": (jnp.asarray(0.6 * rng.standard_normal((5, C))), jnp.zeros(C))}
    x = rng.standard_normal((N, 4))
    y = rng.integers(0, C, N)

    def model(p, x):
        w, b = p["head"]
        return jnp.tanh(x @ p["w"]) @ w + b

    def ce(logits, y):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    def loss(p, batch):
        x, y = batch
        return ce(model(p, x), y) + 0.05 * jnp.sum(p["w"] ** 2)

    batches = lambda: ((x[i:i + B], y[i:i + B]) for i in range(0, N, B))  # 5 + 5 + 3
    return params, x, y, model, ce, loss, batches


def _close(a, b, tol=1e-12):
    a, b = np.asarray(ravel_pytree(a)[0]), np.asarray(ravel_pytree(b)[0])
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert err <= tol, err


def test_streamed_products_equal_the_full_batch():
    params, x, y, model, ce, loss, batches = _setup()
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)
    per_example = lambda p, ex: loss(p, (ex[0][None], ex[1][None]))
    cases = {
        "hessian": (lambda p, b: curvlib.hessian_matvec(loss, p, b),
                    curvlib.hessian_matvec(loss, params, (xj, yj))),
        "hessian fwd-rev": (lambda p, b: curvlib.hessian_matvec(loss, p, b, mode="fwd-rev"),
                            None),
        "ggn": (lambda p, b: curvlib.ggn_matvec(model, ce, p, b[0], loss_args=(b[1],)),
                curvlib.ggn_matvec(model, ce, params, xj, loss_args=(yj,))),
        "fisher": (lambda p, b: curvlib.fisher_matvec(model, p, b[0]),
                   curvlib.fisher_matvec(model, params, xj)),
        "empirical fisher": (lambda p, b: curvlib.empirical_fisher_matvec(per_example, p, b),
                             curvlib.empirical_fisher_matvec(per_example, params, (xj, yj))),
    }
    for name, (build, full) in cases.items():
        op = curvlib.stream_matvec(build, params, batches)
        assert op.host_driven
        got = op(v)
        ref = (full or cases["hessian"][1])(v)
        _close(got, ref)
        assert (op.num_examples, op.num_batches) == (N, 3), name
        assert jax.tree.structure(got) == jax.tree.structure(params)
    # a block of vectors in one pass
    H = curvlib.stream_matvec(cases["hessian"][0], params, batches)
    V = jax.tree.map(lambda a: jnp.stack([a, 2 * a + 1]), v)
    block = H.matmat(V)
    for i in range(2):
        _close(jax.tree.map(lambda a, i=i: a[i], block),
               cases["hessian"][1](jax.tree.map(lambda a, i=i: a[i], V)))


def test_streamed_gradient_equals_the_full_batch():
    params, x, y, model, ce, loss, batches = _setup()
    full = (jnp.asarray(x), jnp.asarray(y))
    value, grad = curvlib.stream_gradient(loss, params, batches)
    value_ref, grad_ref = jax.value_and_grad(loss)(params, full)
    assert abs(float(value) - float(value_ref)) <= 1e-12 * abs(float(value_ref))
    _close(grad, grad_ref)
    aux_loss = lambda p, b: (loss(p, b), {"acc": jnp.mean(jnp.argmax(model(p, b[0]), 1) == b[1])})
    (value, aux), grad = curvlib.stream_gradient(aux_loss, params, batches, has_aux=True)
    (_, aux_ref), _ = jax.value_and_grad(aux_loss, has_aux=True)(params, full)
    assert abs(float(aux["acc"]) - float(aux_ref["acc"])) < 1e-12
    _close(grad, grad_ref)


def test_streamed_monte_carlo_fisher_uses_one_key_per_batch():
    params, x, y, model, ce, loss, batches = _setup()
    key = jax.random.key(5)
    v = jax.tree.map(jnp.ones_like, params)
    build = lambda p, b, k: curvlib.fisher_matvec(model, p, b[0], key=k, num_samples=2)
    op = curvlib.stream_matvec(build, params, batches, key=key)
    got = op(v)
    parts = [(len(b[0]), build(params, (jnp.asarray(b[0]), b[1]), jax.random.fold_in(key, i))(v))
             for i, b in enumerate(batches())]
    ref = jax.tree.map(lambda *t: sum(n * a for (n, _), a in zip(parts, t, strict=True)) / N,
                       *[p for _, p in parts])
    _close(got, ref)
    _close(op(v), got, tol=0.0)  # the same draws on every pass


def test_one_compilation_per_batch_shape():
    params, x, y, model, ce, loss, batches = _setup()
    traces = []

    def build(p, b):
        traces.append(b[0].shape[0])
        return curvlib.hessian_matvec(loss, p, b)

    H = curvlib.stream_matvec(build, params, batches)
    v = jax.tree.map(jnp.ones_like, params)
    H(v)
    assert sorted(traces) == [3, 5]  # the full batches and the ragged last one
    H(jax.tree.map(lambda a: 2 * a, v))
    assert sorted(traces) == [3, 5]  # a second product: no new trace


def test_batches_per_call_stacks_equal_batches_into_one_call():
    # 13 examples in batches of 2: six of 2 and a ragged 1. With batches_per_call=4 the
    # pass runs as calls of 4, 2 and 1 batches: the same operator, keys and gradient
    params, x, y, model, ce, loss, _ = _setup()
    batches = lambda: ((x[i:i + 2], y[i:i + 2]) for i in range(0, N, 2))
    traces = []

    def build(p, b):
        traces.append(b[0].shape[0])
        return curvlib.hessian_matvec(loss, p, b)

    v = jax.tree.map(jnp.ones_like, params)
    one = curvlib.stream_matvec(build, params, batches)(v)
    del traces[:]
    H = curvlib.stream_matvec(build, params, batches, batches_per_call=4)
    got = H(v)
    _close(got, one)
    _close(got, curvlib.hessian_matvec(loss, params, (jnp.asarray(x), jnp.asarray(y)))(v))
    assert (H.num_examples, H.num_batches) == (N, 7)
    # new programs: a scan over 4 stacked batches of 2 and one over 2; the ragged batch
    # of 1 runs alone, in the per-batch program the first operator compiled already
    assert sorted(traces) == [2, 2]
    H(v)
    assert sorted(traces) == [2, 2]  # no new trace on the next pass
    key = jax.random.key(3)
    mc = lambda p, b, k: curvlib.fisher_matvec(model, p, b[0], key=k)
    _close(curvlib.stream_matvec(mc, params, batches, key=key, batches_per_call=3)(v),
           curvlib.stream_matvec(mc, params, batches, key=key)(v))
    value, grad = curvlib.stream_gradient(loss, params, batches, batches_per_call=5)
    value1, grad1 = curvlib.stream_gradient(loss, params, batches)
    assert abs(float(value) - float(value1)) <= 1e-12 * abs(float(value1))
    _close(grad, grad1)
    with pytest.raises(ValueError, match="batches_per_call"):
        curvlib.stream_matvec(build, params, batches, batches_per_call=0)


def test_a_host_driven_eigensolver_on_a_streamed_hessian():
    """SciPy's ARPACK drives the streamed operator from the host: it finds the top
    eigenvalue of the full-batch Hessian."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    params, x, y, model, ce, loss, batches = _setup()
    flat, unravel = ravel_pytree(params)
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), params, batches)
    op = LinearOperator((flat.size,) * 2, dtype=np.float64,
                        matvec=lambda f: np.asarray(ravel_pytree(H(unravel(jnp.asarray(f))))[0]))
    top = eigsh(op, k=1, which="LA", tol=1e-12, v0=np.ones(flat.size))[0][0]
    dense = jax.hessian(lambda f: loss(unravel(f), (jnp.asarray(x), jnp.asarray(y))))(flat)
    assert abs(top - np.linalg.eigvalsh(np.asarray(dense))[-1]) < 1e-10


def test_stream_errors():
    params, x, y, model, ce, loss, batches = _setup()
    build = lambda p, b: curvlib.hessian_matvec(loss, p, b)
    v = jax.tree.map(jnp.ones_like, params)
    with pytest.raises(TypeError, match="one-shot iterator"):
        curvlib.stream_matvec(build, params, batches())
    # a dict (one batch, or a dataset's columns) iterated its keys as batches
    with pytest.raises(TypeError, match=r"`batches` is a dict: iterating it yields its keys"):
        curvlib.stream_matvec(build, params, {"x": x, "y": y})
    with pytest.raises(TypeError, match=r"`batches` is a dict"):
        curvlib.stream_gradient(loss, params, {"x": x, "y": y})
    with pytest.raises(ValueError, match="yielded no batch"):
        curvlib.stream_matvec(build, params, lambda: iter([]))(v)
    with pytest.raises(ValueError, match=r"`batch 1\[1\]` has shape \(4,\)"):
        curvlib.stream_gradient(loss, params, [(x[:5], y[:5]), (x[5:], y[5:9])])
    with pytest.raises(ValueError, match="batch 1 of the stream has structure"):
        curvlib.stream_gradient(loss, params, [(x[:5], y[:5]), [x[5:], y[5:]]])
    H = curvlib.stream_matvec(build, params, batches)
    with pytest.raises(TypeError, match="host-driven operator.*traced"):
        jax.jit(lambda v: H(v))(v)
    with pytest.raises(ValueError, match=r"vector\['w'\] has shape \(5, 4\)"):
        H({**v, "w": jnp.ones((5, 4))})
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    H = curvlib.stream_matvec(build, params, data)
    H(v)
    data.pop()
    with pytest.raises(ValueError, match="the stream changed between products"):
        H(v)
    with pytest.raises(TypeError, match="floating means"):
        curvlib.stream_mean(lambda b: jnp.sum(b[1]), batches)


def test_stream_caches_reuse_compilations_and_release_user_functions():
    import gc
    import weakref

    params, x, y, model, ce, loss, batches = _setup()
    traces = []

    def make():
        big = jnp.ones(1_000_000)  # what a leak would keep alive

        def counted(p, b):
            traces.append(1)
            return loss(p, b) + 0.0 * big[0]

        return counted

    counted = make()
    ref = weakref.ref(counted)
    for _ in range(2):
        curvlib.stream_gradient(counted, params, batches)
    assert len(traces) == 3  # one shape probe, one trace per batch shape; then no retrace
    build = lambda p, b, f=counted: curvlib.hessian_matvec(f, p, b)
    op = curvlib.stream_matvec(build, params, batches)
    op(jax.tree.map(jnp.ones_like, params))
    del op, counted, build
    gc.collect()
    assert ref() is None


def test_restricted_and_block_spectra_of_a_streamed_operator():
    """``restrict`` keeps a streamed operator host-driven; ``block_eigsh`` hands its blocks to
    ``curvlib.eigsh`` one by one, which drives each from the host."""
    params, x, y, model, ce, loss, batches = _setup()
    full = (jnp.asarray(x), jnp.asarray(y))
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), params, batches)
    where = {"w": False, "head": (True, False)}
    Hb = curvlib.restrict(H, params, where)
    assert Hb.host_driven
    ref = curvlib.restrict(curvlib.hessian_matvec(loss, params, full), params, where)
    u = jnp.cos(jnp.arange(5.0 * C)).reshape(5, C)  # (ones would lie in the softmax's null space)
    v = {"w": None, "head": (u, None)}
    _close(Hb(v), ref(v))
    V = {"w": None, "head": (jnp.stack([u, jnp.eye(5, C)]), None)}
    block = Hb.matmat(V)
    _close(jax.tree.map(lambda a: a[1], block), ref({"w": None, "head": (jnp.eye(5, C), None)}))
    spectra = curvlib.block_eigsh(H, params, 2, key=jax.random.key(0),
                                  eigsh=curvlib.Eigsh(rtol=1e-10))
    flat, unravel = ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda f: loss(unravel(f), full))(flat))
    mask = ravel_pytree({"w": jnp.ones((4, 5)), "head": (jnp.zeros((5, C)), jnp.zeros(C))})[0]
    idx = np.flatnonzero(np.asarray(mask))  # "w" in ravel order (after "head": keys sort)
    np.testing.assert_allclose(np.asarray(spectra["w"].eigenvalues),
                               np.linalg.eigvalsh(dense[np.ix_(idx, idx)])[::-1][:2], rtol=1e-8)


def test_krylov_algorithms_run_on_a_streamed_operator():
    """eigsh, lanczos, spectral_density and the Hutchinson estimators drive a streamed Hessian
    from the host and agree with the in-memory operator on the same data."""
    params, x, y, model, ce, loss, batches = _setup()
    full = (jnp.asarray(x), jnp.asarray(y))
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), params, batches)
    M = curvlib.hessian_matvec(loss, params, full)
    v0 = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape) + 0.1,
                      params)
    key = jax.random.key(3)
    es, em = (curvlib.eigsh(op, v0, 3, key=key, rtol=1e-10) for op in (H, M))
    assert bool(es.converged) and bool(em.converged)
    np.testing.assert_allclose(np.asarray(es.eigenvalues), np.asarray(em.eigenvalues), rtol=1e-9)
    ls, lm = (curvlib.lanczos(op, v0, 6) for op in (H, M))
    np.testing.assert_allclose(np.asarray(ls.alphas), np.asarray(lm.alphas), rtol=1e-9)
    np.testing.assert_allclose(np.asarray(ls.betas), np.asarray(lm.betas), rtol=1e-9)
    ds, dm = (curvlib.spectral_density(op, v0, key, num_matvecs=5, num_probes=2, sigma=0.1)
              for op in (H, M))
    np.testing.assert_allclose(np.asarray(ds.nodes), np.asarray(dm.nodes), rtol=1e-8, atol=1e-12)
    ts, tm = (curvlib.hutchinson_trace(op, v0, key, 6) for op in (H, M))
    np.testing.assert_allclose(float(ts.estimate), float(tm.estimate), rtol=1e-10)
    gs, gm = (curvlib.hutchinson_diag(op, v0, key, 3) for op in (H, M))
    _close(gs.estimate, gm.estimate, tol=1e-10)
    assert bool(curvlib.check_symmetric(H, v0, key).symmetric)
    cs, cm = (curvlib.cg(op, v0, damping=2.0, rtol=1e-10) for op in (H, M))
    assert bool(cs.converged) and int(cs.num_steps) == int(cm.num_steps)
    _close(cs.x, cm.x, tol=1e-9)
    ps, pm = (curvlib.power_iteration(op, v0, 1, key=key, num_iters=50) for op in (H, M))
    np.testing.assert_allclose(np.asarray(ps.eigenvalues), np.asarray(pm.eigenvalues), rtol=1e-9)


def test_process_local_streams_in_one_process():
    """``process_local=True`` in one process: each batch is this process's whole part, placed
    by ``sharding``; the same products, gradient and mean (tests/test_multiprocess.py runs
    two processes). Without ``sharding`` it is refused."""
    params, x, y, model, ce, loss, batches = _setup()
    full = (jnp.asarray(x), jnp.asarray(y))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    v = jax.tree.map(jnp.ones_like, params)
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), params, batches,
                              sharding=sharding, process_local=True)
    _close(H(v), curvlib.hessian_matvec(loss, params, full)(v))
    assert (H.num_examples, H.num_batches) == (N, 3)
    _close(curvlib.stream_gradient(loss, params, batches, sharding=sharding,
                                   process_local=True)[1], jax.grad(loss)(params, full))
    mean = curvlib.stream_mean(lambda b: jnp.mean(b[0], 0), batches, sharding=sharding,
                               process_local=True)
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    for fn in (lambda: curvlib.stream_mean(lambda b: b[0].mean(), batches, process_local=True),
               lambda: curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b),
                                             params, batches, process_local=True)):
        with pytest.raises(ValueError, match="`process_local=True` needs `sharding`"):
            fn()
    with pytest.raises(ValueError, match="`process_local`"):
        curvlib.stream_mean(lambda b: b[0].mean(), batches, sharding=sharding, process_local=1)


@pytest.mark.parametrize("name", ["cg", "power_iteration", "inverse_matvec", "eigsh"])
def test_a_second_identical_call_on_a_stream_compiles_nothing(name, compiles):
    """The algorithms whose loop runs from the host on a streamed operator: the loop's
    pieces are programs keyed by what they compute (they compiled again at every call)."""
    params, x, y, model, ce, loss, batches = _setup()
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), params,
                              batches)
    calls = {
        "cg": lambda: curvlib.cg(H, params, damping=1.0).x,
        "power_iteration": lambda: curvlib.power_iteration(H, params, 1).eigenvalues,
        "inverse_matvec": lambda: curvlib.inverse_matvec(H, damping=1.0)(params),
        "eigsh": lambda: curvlib.eigsh(H, params, 2).eigenvalues,
    }
    first = jax.block_until_ready(calls[name]())
    with compiles() as seen:
        second = jax.block_until_ready(calls[name]())
    assert seen.count == 0
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["eigsh", "cg", "power_iteration", "lanczos", "inverse_matvec"])
def test_an_algorithm_on_a_stream_inside_jit_says_why_it_cannot(name):
    """Its loop runs from the host: inside the user's jit it raised JAX's
    TracerBoolConversionError from the driver; now a message that says what to do."""
    params, x, y, model, ce, loss, batches = _setup()
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), params,
                              batches)
    calls = {
        "eigsh": lambda v: curvlib.eigsh(H, v, 2).eigenvalues,
        "cg": lambda v: curvlib.cg(H, v, damping=1.0).x,
        "power_iteration": lambda v: curvlib.power_iteration(H, v, 1).eigenvalues,
        "lanczos": lambda v: curvlib.lanczos(H, v, 3).alphas,
        "inverse_matvec": lambda v: curvlib.inverse_matvec(H, damping=1.0)(v),
    }
    with pytest.raises(TypeError, match=r"^an algorithm on a host-driven operator .* cannot run "
                                        r"inside jax\.jit.*Call the algorithm eagerly"):
        jax.jit(calls[name])(params)
