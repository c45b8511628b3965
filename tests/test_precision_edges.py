"""Precision edges: answers at the ends of a half-precision format's range are right or flagged.

float16 holds numbers between about 6e-5 (normal; 6e-8 subnormal) and 65504: a solution, a
damping or a product past either end cannot be stored, however well the algorithm ran in
its own (scaled, float32-accumulated) arithmetic. Each test compares with a float64 NumPy
oracle evaluated on what was returned, in the dtype it was returned in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvlib
from curvlib import optim


def _true_residual(d, damping, b, x):
    """``||b - (diag(d) + damping I) x||`` in float64 of the arrays as they are stored."""
    d, b, x = (np.asarray(a, np.float64) for a in (d, b, x))
    return float(np.linalg.norm(b - (d + damping) * x))


# (d, damping, b): a float16 answer below the subnormal range (1e-8: returned as zeros),
# partly subnormal (1e-8 .. 8e-8: a few bits each), and one above 65504 (inf)
CG_CASES = [
    pytest.param([1.0, 3.0, 10.0], 30000.0, [2.441e-4, -7.324e-4, 5.19e-4], id="x-underflows"),
    pytest.param([1.0, 3.0, 10.0], 9096.0, [2.441e-4, -7.324e-4, 5.19e-4], id="x-subnormal"),
    pytest.param([1e-3, 2e-3, 3e-3], 0.0, [100.0, 50.0, 30.0], id="x-overflows"),
]


@pytest.mark.parametrize("d,damping,b", CG_CASES)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_cg_residual_is_that_of_the_float16_answer_returned(d, damping, b, jit):
    """CG runs on ``b / sigma`` with its iterate held scaled, where the answer is in range,
    and scales it back at the end. The true residual was measured before that scaling: a
    solution of 1e-8 came back as zeros, "converged" with a residual of 2e-7 (the true one
    is ``||b|| = 9e-4``, over the tolerance); one of 1e5 came back as ``inf``, "converged"
    and finite. The residual is now that of the ``x`` returned."""
    dj, bj = jnp.asarray(d, jnp.float16), jnp.asarray(b, jnp.float16)
    rtol = 0.5
    run = (lambda f: jax.jit(f)) if jit else (lambda f: f)
    r = run(lambda b: curvlib.cg(lambda v: dj * v, b, damping=damping, rtol=rtol))(bj)
    x = np.asarray(r.x, np.float64)
    if bool(r.finite):
        assert np.all(np.isfinite(x))
        true = _true_residual(dj, damping, bj, r.x)
        np.testing.assert_allclose(float(r.residual_norm), true, rtol=0.1)
        assert bool(r.converged) == (true <= rtol * np.linalg.norm(np.asarray(bj, np.float64)))
        if not bool(r.converged):
            assert int(r.status) in (curvlib.Status.STALLED, curvlib.Status.MAX_STEPS)
    else:  # the answer is past float16's range
        assert not bool(r.converged) and int(r.status) == curvlib.Status.NONFINITE
        assert np.isnan(float(r.residual_norm))
        exact = np.asarray(bj, np.float64) / (np.asarray(dj, np.float64) + damping)
        assert np.max(np.abs(exact)) > float(jnp.finfo(jnp.float16).max)


def test_cg_answer_now_reports_the_returned_answers_residual(compile_behind_on):
    """The eager first call's host-driven path (compile-behind on) measures the same."""
    dj = jnp.asarray([1.0, 3.0, 10.0], jnp.float16)
    bj = jnp.asarray([2.441e-4, -7.324e-4, 5.19e-4], jnp.float16)
    r = curvlib.cg(lambda v: dj * v, bj, damping=30000.0, rtol=0.5)
    true = _true_residual(dj, 30000.0, bj, r.x)
    np.testing.assert_allclose(float(r.residual_norm), true, rtol=0.1)
    assert not bool(r.converged) and int(r.status) == curvlib.Status.STALLED


def test_newton_cg_float16_damping_stays_in_range():
    """Every step rejected (it moves the parameters and raises the loss) raises the damping
    by 1.5. float16 cannot hold the default ``max_damping=1e8``: the damping became ``inf``
    and every later step was skipped as NONFINITE for good, with finite inputs. It now stops
    at a quarter of float16's largest number, where CG's damped products stay finite: the
    steps are rejected (STALLED), finite."""
    p = jnp.asarray([0.01], jnp.float16)
    loss = lambda p: jnp.sum(p.astype(jnp.float32)) + 1e3 * jnp.sum(
        jnp.abs(p.astype(jnp.float32) - 0.01))
    tx = optim.scale_by_newton_cg(damping=1e4)
    state = tx.init(p)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, value_fn=loss))
    for _ in range(8):
        u, state = step(p, state)
        assert bool(state.info.finite), curvlib.status_message(state.info.status)
        assert int(state.info.status) == curvlib.Status.STALLED and not bool(state.info.accepted)
        assert u.dtype == jnp.float16 and float(u[0]) == 0.0
        assert 0 < float(state.damping) <= float(jnp.finfo(jnp.float16).max) / 4


@pytest.mark.parametrize("dt,damping", [(jnp.float32, 1e6), (jnp.float16, 1e4)],
                         ids=["float32", "float16"])
def test_newton_cg_moves_again_after_a_stall_at_the_parameters_precision(dt, damping):
    """At the minimum to the parameters' precision the steps cannot move them (the loss
    stays equal): each was counted a failure and raised the damping by 1.5, up to
    ``max_damping`` (float32: 1e8; float16: past its range, NONFINITE from then on). There
    the steps of every later loss (the next batches) were below the precision too: the
    parameters never moved again. A step that moves nothing now keeps the damping, and on
    a new loss the steps are taken (oracle: the loss, in float64, falls 100-fold)."""
    A = jnp.asarray([1.0, 3.0, 10.0], jnp.float32)

    def loss(p, t):
        d = p.astype(jnp.float32) - t
        return 0.5 * jnp.sum(A * d * d)

    opt = optim.newton_cg(1.0, damping=damping)
    t0 = jnp.asarray([0.3, -0.7, 1.1], jnp.float32)
    p = t0.astype(dt)  # the minimum, to the precision of dt
    state = opt.init(p)
    step = jax.jit(lambda p, s, t: opt.update(jax.grad(loss)(p, t), s, p, value_fn=loss, t=t))
    for _ in range(16):
        u, state = step(p, state, t0)
        p = optax.apply_updates(p, u)
        assert bool(state[0].info.finite), curvlib.status_message(state[0].info.status)
    t1 = jnp.asarray([0.8, -0.2, 0.6], jnp.float32)  # a new loss (the next batch)
    f64 = lambda p: 0.5 * float(np.sum(np.asarray(A, np.float64)
                                       * (np.asarray(p, np.float64) - np.asarray(t1)) ** 2))
    before = f64(p)
    for _ in range(30):
        u, state = step(p, state, t1)
        p = optax.apply_updates(p, u)
    assert p.dtype == dt
    assert f64(p) < 0.01 * before


def test_newton_cg_lengthens_a_damped_step_below_the_parameters_precision():
    """A flat loss far from its minimum, ``1e-6 (w - 10100)^2 / 2`` from ``w = 1e4`` in
    float32 (spacing 1e-3 there): the damped step (``damping=1``, about 1e-4) moved nothing,
    the damping was kept, and the parameter stayed at 1e4 for good (STALLED at every step)
    though the undamped step lands on the minimum (oracle: ``w*`` = 10100, exact)."""
    f = lambda w: 0.5e-6 * jnp.sum((w.astype(jnp.float32) - 10100.0) ** 2)  # noqa: E731
    opt = optim.newton_cg(1.0)  # damping=1.0, the default
    w = jnp.asarray([10000.0], jnp.float32)
    state = opt.init(w)
    step = jax.jit(lambda w, s: opt.update(jax.grad(f)(w), s, w, value_fn=f))
    for _ in range(60):
        u, state = step(w, state)
        w = optax.apply_updates(w, u)
    assert float(w[0]) == 10100.0
    assert int(state[0].info.status) != curvlib.Status.STALLED


_X64_OFF = r"""
import warnings
warnings.simplefilter("error")  # a float64 request, truncated with a warning, fails here
import jax, jax.numpy as jnp, optax
import curvlib
from curvlib import optim
curvlib.compile_behind(False)
assert not jax.config.jax_enable_x64
d = jnp.asarray([1.0, 3.0, 10.0], jnp.float16)
b = jnp.asarray([2.441e-4, -7.324e-4, 5.19e-4], jnp.float16)
for r in (curvlib.cg(lambda v: d * v, b, damping=30000.0, rtol=0.5),
          jax.jit(lambda b: curvlib.cg(lambda v: d * v, b, damping=30000.0, rtol=0.5))(b)):
    assert r.x.dtype == jnp.float16 and r.residual_norm.dtype == jnp.float32
    assert int(r.status) == curvlib.Status.STALLED and not bool(r.converged)
A = jnp.asarray([1.0, 3.0, 10.0], jnp.float32)
loss = lambda p, t: 0.5 * jnp.sum(A * (p.astype(jnp.float32) - t) ** 2)
t0 = jnp.asarray([0.3, -0.7, 1.1], jnp.float32)
for dt in (jnp.float16, jnp.bfloat16, jnp.float32):
    opt = optim.newton_cg(1.0, damping=1e4)
    p = t0.astype(dt)
    s = opt.init(p)
    sig = jax.tree.map(lambda a: (a.shape, a.dtype), s)
    traces = []
    def step(p, s):
        traces.append(1)
        return opt.update(jax.grad(loss)(p, t0), s, p, value_fn=loss, t=t0)
    step = jax.jit(step)
    for _ in range(5):
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
        assert u.dtype == dt and jax.tree.map(lambda a: (a.shape, a.dtype), s) == sig
        assert bool(s[0].info.finite)
    assert len(traces) == 1
print("ok")
"""


def test_float16_cg_and_newton_cg_with_x64_off():
    """A user's default (x64 off), in a fresh process: the same answers, the states keep
    their dtypes (one trace), and nothing requests float64 (warnings are errors)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _X64_OFF], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
