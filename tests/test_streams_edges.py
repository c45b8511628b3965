"""Edges of streamed operators, checked against the full-batch oracle (float64).

A loader that refills one host buffer in place, an array (or a function returning
one) passed as the stream, ``batch_size`` of the Hutchinson estimators on a
stream, a ``build`` whose operator returns the wrong shapes, and a function that
returns the same, already used, iterator on every pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib


def _problem(n=12, d=3):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((n, d)), rng.standard_normal(n)
    w = jnp.asarray(rng.standard_normal(d))

    def loss(w, batch):
        xb, yb = batch
        return jnp.mean((jnp.tanh(xb @ w) - yb) ** 2)

    return x, y, w, loss


@pytest.mark.parametrize("per_call", [2, 4])
def test_a_loader_refilling_one_buffer_in_place_gives_the_full_batch_answers(per_call):
    """A loader that yields one preallocated buffer, refilled for every batch (a common fast
    loader): the batches handed over earlier must keep their values. JAX aliased the host
    buffer (a later batch's group call, or an asynchronous step, read the refilled data):
    gradient errors of 0.07 (``batches_per_call=2``) against entries of about 1."""
    x, y, w, loss = _problem()

    def refilled():
        bx, by = np.empty((3, x.shape[1])), np.empty(3)
        for i in range(0, len(x), 3):
            bx[:], by[:] = x[i:i + 3], y[i:i + 3]
            yield bx, by

    value, grad = curvlib.stream_gradient(loss, w, refilled, batches_per_call=per_call)
    ref_value, ref_grad = jax.value_and_grad(loss)(w, (x, y))
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-12, atol=1e-14)
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), w, refilled,
                              batches_per_call=per_call)
    dense = np.asarray(jax.hessian(loss)(w, (x, y)))
    np.testing.assert_allclose(np.asarray(H.matmat(jnp.eye(3))), dense, rtol=1e-12, atol=1e-14)


def test_a_loader_refilling_one_aligned_buffer_one_batch_per_call():
    """``batches_per_call=1`` too: JAX on CPU reads a 64-byte-aligned host buffer in place,
    asynchronously, and each step waits for the previous one (the running sum), so the
    loader had refilled the buffer before the step read it (relative errors 0.1 to 0.2 on
    every product)."""
    rng = np.random.default_rng(1)
    n, b, d = 1024, 128, 64
    x = rng.standard_normal((n, d))
    w = jnp.asarray(rng.standard_normal(d))
    mix = jnp.asarray(rng.standard_normal((d, d))) / np.sqrt(d)

    def loss(w, xb):
        h = xb
        for _ in range(4):
            h = jnp.tanh((h * w) @ mix + 0.1)
        return jnp.mean(h ** 2)

    def refilled():  # one page-aligned buffer (a loader's pinned or preallocated memory)
        raw = np.empty(b * d * 8 + 4096, np.uint8)
        off = (-raw.ctypes.data) % 4096
        buf = raw[off:off + b * d * 8].view(np.float64).reshape(b, d)
        for i in range(0, n, b):
            buf[:] = x[i:i + b]
            yield buf

    H = curvlib.stream_matvec(lambda p, xb: curvlib.hessian_matvec(loss, p, xb), w, refilled)
    v = jnp.cos(jnp.arange(d, dtype=jnp.float64))
    ref = np.asarray(curvlib.hessian_matvec(loss, w, jnp.asarray(x))(v))
    for _ in range(3):
        np.testing.assert_allclose(np.asarray(H(v)), ref, rtol=1e-10,
                                   atol=1e-12 * np.abs(ref).max())
    grad = curvlib.stream_gradient(loss, w, refilled)[1]
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(loss)(w, jnp.asarray(x))),
                               rtol=1e-10, atol=1e-14)


def test_an_array_passed_as_the_stream_is_refused():
    """An array (or a function returning one) was iterated row by row: each row of a
    ``(n, d)`` array became a "batch" of ``d`` samples; a function returning a dict or
    ``None`` failed with an unclear message."""
    x, y, w, loss = _problem()
    sq = lambda w, xb: jnp.mean((xb @ w) ** 2)
    for batches in (x, jnp.asarray(x), lambda: x, lambda: jnp.asarray(x)):
        with pytest.raises(TypeError, match=r"an array of shape \(12, 3\): iterating it yields "
                                            "its rows as batches"):
            curvlib.stream_gradient(sq, w, batches)
    with pytest.raises(TypeError, match=r"`batches\(\)` returned a dict: iterating it yields"):
        curvlib.stream_mean(lambda b: jnp.mean(b["x"]), lambda: {"x": x})
    with pytest.raises(TypeError, match=r"`batches\(\)` returned a NoneType"):
        curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), w,
                              lambda: None)(w)
    with pytest.raises(TypeError, match=r"`batches` is an array of shape \(12, 3\)"):
        curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(sq, p, b), w, x)
    # batches stacked on a leading axis, as the message advises: the full-batch gradient
    g = curvlib.stream_gradient(sq, w, list(x.reshape(4, 3, 3)))[1]
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(sq)(w, x)), rtol=1e-12)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_hutchinson_batch_size_bounds_the_products_of_each_pass_over_a_stream(method):
    """``batch_size`` chunks the block products; on a stream all ``num_probes`` went in one
    pass whatever ``batch_size`` (every batch's operator vmapped over all probes at once)."""
    x, y, w, loss = _problem()
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), w, data)
    rows = []
    matmat = H.matmat
    H.matmat = lambda V: (rows.append(jax.tree.leaves(V)[0].shape[0]), matmat(V))[1]
    M = curvlib.hessian_matvec(loss, w, (x, y))
    key = jax.random.key(2)
    got = curvlib.hutchinson_trace(H, w, key, 6, method=method, batch_size=2)
    ref = curvlib.hutchinson_trace(M, w, key, 6, method=method, batch_size=2)
    assert rows and max(rows) <= 2 and sum(rows) == 6, rows
    np.testing.assert_allclose(float(got.estimate), float(ref.estimate), rtol=1e-10)
    np.testing.assert_allclose(float(got.stderr), float(ref.stderr), rtol=1e-8)
    rows.clear()
    d = curvlib.hutchinson_diag(H, w, key, 5, batch_size=3)
    assert rows == [3, 2], rows
    np.testing.assert_allclose(np.asarray(d.estimate),
                               np.asarray(curvlib.hutchinson_diag(M, w, key, 5).estimate),
                               rtol=1e-10)


def test_a_build_whose_operator_misshapes_its_output_is_named():
    """``build``'s operator returning another structure or shape failed inside the
    accumulation with JAX's internal words ("add got incompatible shapes", "prefix pytree
    tree_map tree"); a ``build`` returning no operator, with "'float' object is not
    callable"."""
    x, y, w, loss = _problem()
    p = {"a": w, "b": jnp.ones(())}
    data = [(x[:5], y[:5]), (x[5:], y[5:])]
    V = jax.tree.map(lambda a: jnp.stack([a, a]), p)
    cases = [
        (lambda p, b: (lambda v: (v["a"], v["b"])), ValueError,
         r"`build\(params, batch\)\(v\)` must match `v` in pytree structure"),
        (lambda p, b: (lambda v: {"a": v["a"][:2], "b": v["b"]}), ValueError,
         r"build\(params, batch\)\(v\)\['a'\] of shape \(2,\) where v\['a'\] has shape \(3,\)"),
        (lambda p, b: (lambda v: {"a": jnp.zeros(3, int), "b": v["b"]}), TypeError,
         r"`build\(params, batch\)\(v\)\['a'\]` must be a real floating array"),
        (lambda p, b: 3.0, TypeError, r"`build\(params, batch\)` must return an operator"),
    ]
    for build, err, msg in cases:
        S = curvlib.stream_matvec(build, p, data)
        with pytest.raises(err, match=msg):
            S(p)
        with pytest.raises(err, match=msg):
            S.matmat(V)


def test_a_function_returning_a_used_iterator_says_why_the_second_pass_is_empty():
    """``batches = lambda: it`` with one iterator: the first product passes over the data, the
    second finds it exhausted; the message now says a fresh iterator is needed per call."""
    x, y, w, loss = _problem()
    it = iter([(x[:5], y[:5]), (x[5:], y[5:])])
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), w, lambda: it)
    v = jnp.ones(3)
    np.testing.assert_allclose(np.asarray(H(v)), np.asarray(jax.hessian(loss)(w, (x, y)) @ v),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="must return a fresh iterator on every call"):
        H(v)


SCALE = 1.0  # a setting the loss below reads, as a notebook's global


def _scaled_loss(w, batch):
    xb, yb = batch
    return SCALE * jnp.mean((jnp.tanh(xb @ w) - yb) ** 2)


def _build(w, batch):
    return curvlib.hessian_matvec(_scaled_loss, w, batch)


def test_a_new_stream_on_the_same_function_reads_a_changed_global():
    """The per-batch steps were cached per function object: after ``SCALE`` changed, a new
    `stream_matvec`, `stream_gradient` and `stream_mean` on the same functions returned the
    first ``SCALE``'s numbers (1/10 of the oracle's), where `hessian_matvec` re-reads it.
    A loss that changes what it reads when traced (a trace counter) keeps its steps."""
    global SCALE
    x, y, w, _ = _problem()
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    v = jnp.ones_like(w)
    mean = lambda b: jnp.mean(b[1]) + SCALE  # noqa: E731
    try:
        for scale in (1.0, 10.0):
            SCALE = scale
            H = jax.hessian(_scaled_loss)(w, (x, y))
            np.testing.assert_allclose(curvlib.stream_matvec(_build, w, batches)(v), H @ v,
                                       rtol=1e-12)
            g = curvlib.stream_gradient(_scaled_loss, w, batches)[1]
            np.testing.assert_allclose(g, jax.grad(_scaled_loss)(w, (x, y)), rtol=1e-12)
            np.testing.assert_allclose(curvlib.stream_mean(mean, batches), y.mean() + scale,
                                       rtol=1e-12)
    finally:
        SCALE = 1.0
    traces = []

    def counted(w, batch):
        traces.append(1)
        return _scaled_loss(w, batch)

    first = curvlib.stream_gradient(counted, w, batches)[1]
    n = len(traces)
    second = curvlib.stream_gradient(counted, w, batches)[1]
    np.testing.assert_array_equal(first, second)
    assert len(traces) == n, (n, len(traces))  # the second call traced nothing
