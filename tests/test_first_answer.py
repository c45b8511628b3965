"""Time to first answer: compiled once, compiled small, never recompiled by an eager call.

The figures themselves (first call, eager second call, warm call, against matfree and
ARPACK) are in ``benchmarks/first_answer.py``; these tests pin the mechanisms: an eager
call with a freshly built operator hits the compile cache, closures over new arrays do
too, and the user's product appears once in each compiled program.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib
from curvlib.krylov import density, eigen, tridiag

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 5)))
    y = jnp.asarray(rng.standard_normal((32, 2)))
    params = {"w": jnp.asarray(rng.standard_normal((5, 4))) / 3,
              "v": jnp.asarray(rng.standard_normal((4, 2))) / 3}

    def loss(p, x, y):
        return jnp.mean((jnp.sin(x @ p["w"]) @ p["v"] - y) ** 2)

    return params, x, y, loss


KEY = jax.random.PRNGKey(0)

CALLS = {
    "eigsh": (lambda mv, v: curvlib.eigsh(mv, v, 2, key=KEY), lambda: eigen._compiled.jitted),
    "lanczos": (lambda mv, v: curvlib.lanczos(mv, v, 6), lambda: tridiag._compiled.jitted),
    "spectral_density": (
        lambda mv, v: curvlib.spectral_density(mv, v, KEY, num_matvecs=6, num_probes=2),
        lambda: density._compiled.jitted),
    "cg": (lambda mv, v: curvlib.cg(mv, v, damping=1.0), lambda: curvlib.cg.jitted),
    "power_iteration": (lambda mv, v: curvlib.power_iteration(mv, v, 2, key=KEY),
                        lambda: curvlib.power_iteration.jitted),
    "hutchinson_trace": (lambda mv, v: curvlib.hutchinson_trace(mv, v, KEY, 6),
                         lambda: curvlib.hutchinson_trace.jitted),
    "hutchinson_diag": (lambda mv, v: curvlib.hutchinson_diag(mv, v, KEY, 3),
                        lambda: curvlib.hutchinson_diag.jitted),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_an_eager_call_with_a_fresh_operator_does_not_recompile(name):
    params, x, y, loss = _problem()
    call, jitted = CALLS[name]
    first = call(curvlib.hessian_matvec(loss, params, x, y), params)
    size = jitted()._cache_size()
    # a notebook cell run again: the same model, a freshly built operator, new data values
    second = call(curvlib.hessian_matvec(loss, params, 2 * x, y), params)
    assert jitted()._cache_size() == size
    assert jax.tree.structure(first) == jax.tree.structure(second)


def test_closures_over_new_arrays_share_one_compilation():
    size = eigen._compiled.jitted._cache_size()
    rng = np.random.default_rng(1)
    results = []
    for scale in (1.0, 2.0, 3.0):
        D = jnp.asarray(scale * rng.uniform(0.0, 1.0, 40))
        results.append(curvlib.eigsh(lambda v, D=D: D * v, jnp.ones(40), 2, key=KEY))
    assert eigen._compiled.jitted._cache_size() - size == 1
    assert all(bool(r.converged) for r in results)


def _count_sines(fn, *args):
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.sine")


@pytest.mark.parametrize("name", ["eigsh", "lanczos", "spectral_density", "cg",
                                  "power_iteration", "hutchinson_diag"])
def test_the_product_appears_once_in_the_compiled_program(name):
    params, x, y, loss = _problem()
    mv = curvlib.hessian_matvec(loss, params, x, y, mode="fwd-rev")  # re-traces the model
    one = _count_sines(lambda mv, v: mv(v), mv, params)
    assert one > 0
    call = CALLS[name][0]
    assert _count_sines(lambda mv, v: call(mv, v), mv, params) == one


def test_jit_of_eigsh_needs_no_static_argnames():
    params, x, y, loss = _problem()
    mv = curvlib.hessian_matvec(loss, params, x, y)
    res = jax.jit(curvlib.eigsh)(mv, params)  # the defaults: k=6, which="LA"
    assert res.eigenvalues.shape == (6,) and bool(res.converged)
    with pytest.raises(ValueError, match="`k` must be a static Python int"):
        jax.jit(curvlib.eigsh)(mv, params, 3)


@pytest.mark.parametrize("name", ["lanczos", "eigsh", "eigsh_restarting"])
def test_no_step_copies_the_krylov_basis(name):
    # Per step, the Krylov loop reads the (m, N) basis a few times and writes one row
    # in place. XLA copies the whole basis instead when a read of the old array may
    # follow the in-place write (a `where` against the old row) or when a `lax.cond`
    # passes it through its untaken branch: each such copy cost more than the rest
    # of the step on a 0.47M-parameter model. A restart's compression builds a new
    # basis anyway; its one copy lives in the restart branch, never taken per step.
    n = 5000
    d = jnp.linspace(-1.0, 2.0, n, dtype=jnp.float32)
    v0 = jnp.ones(n, jnp.float32)
    mv = lambda v: d * v
    fn, rows, allowed = {
        "lanczos": (lambda v: curvlib.lanczos(mv, v, 30), 31, 0),
        "eigsh": (lambda v: curvlib.eigsh(mv, v, 5, basis_size=20, key=KEY), 20, 1),
        "eigsh_restarting": (lambda v: curvlib.eigsh(mv, v, 3, basis_size=8, key=KEY), 8, 1),
    }[name]
    hlo = jax.jit(fn).lower(v0).compile().as_text()
    copies = re.findall(rf"= f32\[{rows},{n}\]\{{[^}}]*\}} copy\(", hlo)
    assert len(copies) <= allowed, f"{len(copies)} copies of the basis in {name}'s program"
    # and the in-place row writes are there (so the pattern above can match at all)
    assert re.search(rf"f32\[{rows},{n}\]\{{[^}}]*\}} (fusion|dynamic-update-slice|scatter)\(",
                     hlo)
