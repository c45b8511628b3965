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
from curvlib.krylov import _band, density, eigen, tridiag

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


class _Scaled:
    def __init__(self, scale):
        self.scale = scale

    def loss(self, w, b):
        return self.scale * jnp.mean((b - w) ** 2)


_CFG = {"scale": 1.0}


def _global_loss(w, b):
    return _CFG["scale"] * jnp.mean((b - w) ** 2)


_CHANGED = {
    # the same loss object (a bound method of one model, a global function) reading a
    # number that changed between two eager calls
    "attribute": (lambda: _Scaled(1.0), lambda m, s: setattr(m, "scale", s),
                  lambda m: m.loss),
    "global": (lambda: _CFG, lambda cfg, s: cfg.__setitem__("scale", s),
               lambda cfg: _global_loss),
    # two levels down: an attribute's entry (``model.cfg["scale"]``), a fresh closure's
    "nested": (lambda: _Scaled({"scale": 1.0}), lambda m, s: m.scale.__setitem__("scale", s),
               lambda m: lambda w, b: m.scale["scale"] * jnp.mean((b - w) ** 2)),
}


@pytest.mark.parametrize("how", sorted(_CHANGED))
def test_a_loss_reading_a_changed_attribute_or_global_answers_for_the_new_value(how, compiles):
    """An eager call re-keys a loss whose attribute or global changed (closed forms: the
    loss is ``s mean((b - w)^2)``, its Hessian ``2 s`` times the identity); an unchanged one
    compiles nothing new."""
    from curvlib import landscape

    make, change, loss_of = _CHANGED[how]
    obj = make()
    x = jnp.arange(6.0)
    w = jnp.asarray(0.5)
    W, X = jnp.asarray([0.5, 0.1]), jnp.stack([x, x], 1)
    try:
        for s in (1.0, 10.0, 1.0):
            change(obj, s)
            loss = loss_of(obj)
            hv = curvlib.hessian_matvec(loss, w, x)(jnp.asarray(1.0))
            np.testing.assert_allclose(hv, 2 * s, rtol=1e-6)
            truth = s * (np.mean((np.arange(4.0) - 0.5) ** 2) - np.mean((np.arange(3.0) - 0.5)
                                                                        ** 2))
            np.testing.assert_allclose(landscape.delta1(loss, w, x, 3), abs(truth), rtol=1e-6)
            # the subspace Hessian of the first k = 3 rows: (2 s / 2) I over the 2 columns
            sub = landscape.curvature_subspace(loss, W, X, 3, 1, key=KEY)
            np.testing.assert_allclose(sub.eigenvalues, [s], rtol=1e-5)
        with compiles() as seen:  # the same value again: every program is found
            curvlib.hessian_matvec(loss_of(obj), w, x)(jnp.asarray(1.0))
            landscape.delta1(loss_of(obj), w, x, 3)
        assert seen.count == 0, seen.names
    finally:
        change(obj, 1.0)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_jitted_product_closing_over_new_arrays_answers_for_them(name):
    """``jax.jit(lambda v: hvp(w, v))`` rebuilt at a new ``w`` (a common fast HVP): the
    arrays its inner ``jit`` closed over are not in the program's text; they must become
    inputs (one compilation, the new ``w``'s answer), not a key collision that reuses the
    first operator's program with ``converged=True``."""
    call, jitted = CALLS[name]
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    M1 = jnp.asarray((Q * np.linspace(1.0, 10.0, 12)) @ Q.T)
    v = jnp.asarray(rng.standard_normal(12))
    first = call(jax.jit(lambda x: M1 @ x), v)
    size = jitted()._cache_size()
    M7 = 7.0 * M1
    second = call(jax.jit(lambda x: M7 @ x), v)
    assert jitted()._cache_size() == size  # the same program, the new matrix as an input
    # the same problem at 7 times the operator: the answer moves with it
    direct = call(lambda x: M7 @ x, v)
    for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                                   rtol=1e-6, atol=1e-9)
    assert any(not np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64))
               for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True))


def test_callback_operators_on_different_host_matrices_stay_apart():
    """Operators through ``jax.pure_callback`` print the same text whatever their host
    function: each must run its own matrix."""
    Ms = [np.diag(np.linspace(1.0, s, 12)) for s in (10.0, 30.0)]

    def host(M):
        return lambda v: jax.pure_callback(lambda x: M @ np.asarray(x),
                                           jax.ShapeDtypeStruct(v.shape, v.dtype), v)

    for M in Ms + Ms:
        top = curvlib.eigsh(host(M), jnp.ones(12), k=1, key=KEY)
        assert bool(top.converged)
        np.testing.assert_allclose(top.eigenvalues[0], M.max(), rtol=1e-8)
        x = curvlib.cg(host(M), jnp.ones(12), rtol=1e-10).x
        np.testing.assert_allclose(x, 1.0 / np.diag(M), rtol=1e-8)


def _host_scaled(x):
    return 3.0 * np.asarray(x)


def test_a_fresh_closure_over_the_same_callback_compiles_once(compiles):
    """JAX wraps a callback's host function anew at every trace: the operator is keyed by
    that wrapper's equality (the same host function), not its identity (which recompiled
    at every call)."""
    def op():
        return lambda v: jax.pure_callback(_host_scaled, jax.ShapeDtypeStruct(v.shape, v.dtype),
                                           v)

    b = jnp.ones(12)
    jax.block_until_ready(curvlib.cg(op(), b).x)
    with compiles() as seen:
        x = jax.block_until_ready(curvlib.cg(op(), b).x)
    assert seen.count == 0
    np.testing.assert_allclose(x, 1.0 / 3.0, rtol=1e-6)

    # a jax.debug.callback (a print while debugging) returns nothing: not part of the key
    def printing():
        def mv(v):
            jax.debug.callback(lambda: None)
            return 3.0 * v
        return mv

    jax.block_until_ready(curvlib.cg(printing(), b).x)
    with compiles() as seen:
        jax.block_until_ready(curvlib.cg(printing(), b).x)
    assert seen.count == 0


def test_a_typed_key_closed_over_by_a_nested_jit_is_keyed_not_converted():
    """A ``jax.random.key`` closed over by a ``jit`` inside a ``cond`` stays nested (not
    inlined): it is keyed by identity (NumPy cannot hold a typed key)."""
    key = jax.random.key(0)
    d = jnp.linspace(1.0, 3.0, 8)

    @jax.jit
    def noisy(v):
        return d * v + 0.0 * jax.random.normal(key, v.shape, v.dtype)

    op = lambda v: jax.lax.cond(True, noisy, lambda u: u, v)
    x = curvlib.cg(op, jnp.ones(8), rtol=1e-10).x
    np.testing.assert_allclose(x, 1.0 / np.asarray(d), rtol=1e-8)


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


# ------------------------------------------------------------ answer now, compile behind


# The fused programs compiled behind in this file, by the signature `_Behind` keys them with:
# `engine`'s two paths, and tests that reuse a problem, share one program of a signature
# instead of each compiling its own (seconds each on two cores). A program compiled earlier
# under the same key is what the same process would run (`_Behind`'s own entries are per
# test: `behind` clears them).
_FUSED: dict = {}


@pytest.fixture
def behind(monkeypatch, compile_behind_on):
    """`curvlib.compile_behind` on (the suite runs with it off), every entry forgotten after;
    a signature's fused program compiled once for the whole file (`_FUSED`)."""
    from curvlib import _compile

    compile_behind = _compile.BEHIND._compile

    def compile_once(jitted, static, a, quiet=True):
        key = _compile._signature(jitted, static, a)
        keyed = [a[n] for n in static if isinstance(a[n], _compile.SameFunction)]
        if key in _FUSED and not any(f.changed() for f in keyed):
            return _FUSED[key]
        compiled = compile_behind(jitted, static, a, quiet)
        if compiled is not None:
            _FUSED[key] = compiled
        return compiled

    monkeypatch.setattr(_compile.BEHIND, "_compile", compile_once)
    yield compile_behind_on  # (conftest's fixture waits, clears and turns it off after)


@pytest.fixture
def answer_now(behind, monkeypatch):
    """`behind` with every compile behind skipped, for tests that read answer-now answers
    only, or compare them with the fused program compiled in front: a compile behind would
    only be waited for at the end."""
    monkeypatch.setattr(behind, "_compile", lambda *args: None)
    return behind


@pytest.mark.parametrize("name", sorted(CALLS))
def test_the_answer_now_path_returns_the_compiled_paths_dtypes(answer_now, name):
    """A float32 operator with float64 enabled: the eager answer (steps on NumPy) has the
    compiled call's dtypes and shapes, field by field (the host path's density came back in
    float64: NumPy's float64 constant promoted it). The compiled path's are its abstract
    evaluation's; the fused program itself is not needed (its compile behind is skipped)."""
    d = jnp.linspace(0.5, 4.0, 40, dtype=jnp.float32)
    mv = lambda v: {"a": d[:24] * v["a"], "b": d[24:] * v["b"]}
    v = {"a": jnp.ones(24, jnp.float32), "b": jnp.linspace(1.0, 2.0, 16, dtype=jnp.float32)}
    call = CALLS[name][0]
    eager = call(mv, v)
    traced = jax.eval_shape(lambda v: call(mv, v), v)  # the compiled path's, not compiled
    shapes = lambda r: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), r)
    assert shapes(eager) == shapes(traced)


def _steps_compiled():
    """``(runs, misses)``: answer-now steps run (hits of the caches of the compiled steps, and
    steps run on NumPy), and step programs compiled (misses) (`_driver`)."""
    from curvlib.krylov import _driver

    infos = [f.cache_info() for f in (_driver._jitted, _driver._host_steps, _driver._start)]
    return sum(i.hits for i in infos) + _driver.HOST_STEPS[0], sum(i.misses for i in infos)


@pytest.fixture(params=["numpy", "compiled"])
def engine(request, monkeypatch):
    """The answer-now steps of eigsh, lanczos, spectral_density, cg and power_iteration on
    NumPy (every problem of these tests is small enough), or compiled
    (`_driver.HOST_MAX_ENTRIES` zero: the path of large problems)."""
    from curvlib.krylov import _driver

    if request.param == "compiled":
        monkeypatch.setattr(_driver, "HOST_MAX_ENTRIES", 0)
    return request.param


def _same_answer(a, b, atol=1e-12, products=0):
    """The same answer and certificate; the same product counts, or within ``products``."""
    for field in ("num_verifications", "converged", "finite", "status"):
        assert int(getattr(a, field)) == int(getattr(b, field)), field
    for field in ("num_matvecs", "num_restarts", "verification_matvecs"):
        assert abs(int(getattr(a, field)) - int(getattr(b, field))) <= products, field
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):  # same types
        assert isinstance(x, jax.Array) and x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=0, atol=atol)
    if bool(jnp.all(jnp.isfinite(a.eigenvalues))):
        # residuals at rounding level, and the same invariant subspace: eigenvectors of a
        # repeated eigenvalue are any basis of its eigenspace, and eigh picks each sign
        scale = float(jnp.max(jnp.abs(a.eigenvalues)))
        np.testing.assert_allclose(a.residual_norms, b.residual_norms, rtol=0, atol=1e-6 * scale)
        rows = jax.vmap(lambda t: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(t)]))
        A, B = rows(a.eigenvectors), rows(b.eigenvectors)
        np.testing.assert_allclose(A.T @ A, B.T @ B, rtol=0, atol=1e-7)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("with_key", [False, True])
def test_the_first_eager_answer_is_the_fused_programs_answer(answer_now, engine, which,
                                                               with_key):
    params, x, y, loss = _problem()
    mv = curvlib.hessian_matvec(loss, params, x, y)
    v0 = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                      params)
    key = KEY if with_key else None
    before = len(answer_now._entries)
    now = curvlib.eigsh(mv, v0, 3, which=which, key=key)  # answered now, compile submitted
    assert len(answer_now._entries) == before + 1
    cfg, tol, mm, mr = eigen._configure(mv, v0, 3, which, curvlib.Eigsh())
    fused = eigen._compiled.jitted(cfg, mv, v0, key, tol, mm, mr)
    _same_answer(now, fused)
    # the answer is right, too (dense Hessian of the 18-parameter model)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H = jax.hessian(lambda f: loss(unravel(f), x, y))(flat)
    ev = np.linalg.eigvalsh(np.asarray(H))
    want = {"LA": ev[::-1], "SA": ev, "LM": ev[np.argsort(-np.abs(ev))]}[which][:3]
    np.testing.assert_allclose(now.eigenvalues, want, atol=1e-8)


def _hostile_cases():
    D = jnp.concatenate([jnp.full(4, 5.0), jnp.linspace(0.0, 4.5, 56)])  # a fourfold top value
    S = jnp.linspace(-2.0, 6.0, 60) ** 3  # distinct values: one answer, up to sign
    return {
        "repeated": (lambda v: D * v, jnp.ones(60), dict(k=4)),
        "zero_start": (lambda v: S * v, jnp.zeros(60), dict(k=2)),
        "budget": (lambda v: S * v, jnp.ones(60), dict(k=3, max_matvecs=7)),
        "whole_space": (lambda v: S[:12] * v, jnp.ones(12), dict(k=3, basis_size=12)),
        "non_finite": (lambda v: (S * jnp.nan) * v, jnp.ones(60), dict(k=2)),
        "restarts": (lambda v: S * v, jnp.ones(60), dict(k=3, basis_size=8, which="SA")),
    }


@pytest.mark.parametrize("case", sorted(_hostile_cases()))
def test_answer_now_and_fused_agree_on_hard_cases(behind, engine, case):
    mv, v0, kw = _hostile_cases()[case]
    now = curvlib.eigsh(mv, v0, **kw)
    behind.wait()
    fused = curvlib.eigsh(mv, v0, **kw)  # the compile is done: the fused program answers
    # A repeated eigenvalue's copies are certified together, by the norm of their residuals:
    # the test that starts a verification round can land within the two engines' rounding of
    # the threshold (0.99 against 1.03 of it on this case), and one engine then takes one
    # product more; every other case takes the same products.
    _same_answer(now, fused, products=2 if case == "repeated" else 0)
    if case == "repeated":
        assert bool(now.converged) and now.eigenvalues.tolist() == pytest.approx([5.0] * 4)
    if case == "non_finite":
        assert not bool(now.finite) and int(now.status) == int(curvlib.Status.NONFINITE)
    if case == "budget":
        assert int(now.status) == int(curvlib.Status.MAX_STEPS)


def test_calls_run_the_fused_program_once_it_is_ready(behind):
    D = jnp.linspace(-1.0, 2.0, 48)
    lookups = sum(_steps_compiled()[:2])
    first = curvlib.eigsh(lambda v: D * v, jnp.ones(48), 2, key=KEY)  # answered now
    assert sum(_steps_compiled()[:2]) > lookups  # the host-driven steps ran
    behind.wait()
    steps = _steps_compiled()
    third = curvlib.eigsh(lambda v: D * v, jnp.ones(48), 2, key=KEY)
    assert _steps_compiled() == steps  # no host-driven step ran: the fused program answered
    _same_answer(first, third)


def test_a_new_model_of_the_same_size_compiles_only_its_product(answer_now):
    rng = np.random.default_rng(3)
    M = jnp.asarray(rng.standard_normal((30, 30)))
    S = M + M.T
    first = curvlib.eigsh(lambda v: S @ v, jnp.ones(30), 3, key=KEY)
    misses = _steps_compiled()[1]
    # a different model (another program) of the same size: the engine's steps are reused
    second = curvlib.eigsh(lambda v: jnp.tanh(1.0) * (S @ v) + v, jnp.ones(30), 3, key=KEY)
    assert _steps_compiled()[1] == misses
    np.testing.assert_allclose(second.eigenvalues, np.tanh(1.0) * first.eigenvalues + 1.0,
                               rtol=1e-10)


def test_a_new_k_which_or_basis_size_of_the_size_class_compiles_no_step(behind):
    """The answer-now steps take ``k``, ``which`` and the basis size as data: in a running
    session a new one of the same size class (`_band.capacity`) reuses every step program,
    and each answer is still the fused program's (and the dense one's)."""
    rng = np.random.default_rng(5)
    M = jnp.asarray(rng.standard_normal((60, 60)))
    S = M + M.T
    ev = np.linalg.eigvalsh(np.asarray(S))
    curvlib.eigsh(lambda v: S @ v, jnp.ones(60), 3, key=KEY)  # k=3: m=20, class 24
    misses = _steps_compiled()[1]
    calls = [dict(k=6), dict(k=2, which="SA", basis_size=22), dict(k=4, which="LM"),
             dict(k=1, basis_size=17)]
    for kw in calls:
        assert _band.capacity(eigen._configure(None, jnp.ones(60), kw["k"],
                                               kw.get("which", "LA"),
                                               curvlib.Eigsh(basis_size=kw.get("basis_size"))
                                               )[0].m, 60) == 24
        now = curvlib.eigsh(lambda v: S @ v, jnp.ones(60), key=KEY, **kw)
        assert _steps_compiled()[1] == misses, kw
        if kw in (dict(k=6), dict(k=4, which="LM"), dict(k=1, basis_size=17)):
            behind.wait()  # (each fused program compiles for ~2 s: three of the four)
            _same_answer(now, curvlib.eigsh(lambda v: S @ v, jnp.ones(60), key=KEY, **kw))
        k, which = kw["k"], kw.get("which", "LA")
        want = {"LA": ev[::-1], "SA": ev, "LM": ev[np.argsort(-np.abs(ev))]}[which][:k]
        assert bool(now.converged), kw
        np.testing.assert_allclose(now.eigenvalues, want, rtol=1e-6, atol=1e-6)


def test_the_exit_waits_until_the_compile_thread_is_idle():
    """At interpreter exit `_Behind._close` drains the compile thread: it returns only once the
    thread is back at its queue, past dropping the call's arguments and result. A thread still
    running when the interpreter finalizes is stopped there, and inside jaxlib that aborted
    the process (exit status 134, in about 4 of 10 scripts that ended while a compile ran)."""
    import time

    from curvlib._compile import _Worker

    released = []

    class SlowToRelease:  # the call's argument, dropped by the worker after the call
        def __del__(self):
            time.sleep(0.2)
            released.append(True)

    worker = _Worker()
    fut = worker.submit(lambda x: None, SlowToRelease())
    fut.result()
    worker.drain()
    assert released == [True] and worker._current is None


def test_the_compile_thread_is_stopped_before_the_interpreter_joins_its_threads():
    """The compile thread is not a daemon (a daemon frozen inside jaxlib while the interpreter
    finalized aborted scripts, exit status 134, with no compile running); at shutdown the hook
    CPython runs before joining threads wakes it from its quiet period, drops the compile it
    was about to start, and ends it at once."""
    import threading
    import time

    from curvlib import _compile

    assert hasattr(threading, "_register_atexit")  # CPython >= 3.9: the hook exists here
    behind = _compile._Behind()
    behind._QUIET_S = 60.0  # a compile would wait a minute for quiet
    behind._last = time.monotonic()
    ran = []
    fut = behind._executor().submit(behind._compile, lambda **a: ran.append(1), (), {})
    worker = behind._pool
    assert not worker._thread.daemon
    time.sleep(0.1)  # the worker is in its quiet period now
    t0 = time.monotonic()
    worker._exit()  # what interpreter shutdown calls
    worker._thread.join(5.0)
    assert not worker._thread.is_alive() and time.monotonic() - t0 < 2.0
    assert fut.result() is None and ran == []  # dropped, not compiled
    assert behind._closing


def test_a_script_of_eager_calls_exits_cleanly(tmp_path):
    """Eager calls leave the compile thread with work queued; the script still exits with
    status 0 (it aborted with 134 in 2 of 4 runs of 18 eager `eigsh` calls)."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "eager.py"
    script.write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp, curvlib
        for seed in range(3):
            k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
            p = {"w": jax.random.normal(k1, (8, 12)) / 3}
            x = jax.random.normal(k2, (64, 8))
            loss = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"]) ** 2)
            H = curvlib.hessian_matvec(loss, p, x)
            for k in (1, 4):
                r = curvlib.eigsh(H, jax.tree.map(jnp.ones_like, p), k=k)
        print("done", bool(r.converged))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done True" in out.stdout and "terminate called" not in out.stderr


def test_a_second_cache_folder_receives_the_programs_compiled_after_it(tmp_path):
    """`enable_compilation_cache` called again with another folder: programs compiled from then
    on are stored there (JAX opens its cache once; the second folder was reported as used
    while every entry kept going to the first)."""
    import subprocess
    import sys
    import textwrap

    one, two = tmp_path / "one", tmp_path / "two"
    script = tmp_path / "twice.py"
    script.write_text(textwrap.dedent(f"""
        import os, jax, jax.numpy as jnp, curvlib
        curvlib.compile_behind(False)
        A = jnp.diag(jnp.arange(1.0, 41.0))
        assert curvlib.enable_compilation_cache({str(one)!r}, min_compile_time_secs=0) \
            == {str(one)!r}
        curvlib.eigsh(lambda v: A @ v, jnp.ones(40), k=2)
        n1 = len(os.listdir({str(one)!r}))
        curvlib.enable_compilation_cache({str(two)!r}, min_compile_time_secs=0)
        curvlib.cg(lambda v: A @ v, jnp.ones(40))
        print("entries", n1, len(os.listdir({str(one)!r})), len(os.listdir({str(two)!r})))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n1, n1_after, n2 = map(int, out.stdout.split("entries")[1].split())
    assert n1 > 0 and n2 > 0 and n1_after == n1, out.stdout


def test_a_cache_folder_that_cannot_be_written_is_refused():
    import tempfile

    folder = "/sys/kernel"  # exists; no file can be created there, not even by root
    try:
        with tempfile.TemporaryFile(dir=folder):
            pytest.skip("a folder nobody can write is not at hand here")
    except OSError:
        pass
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(OSError, match="`path` must be a folder curvlib can write"):
        curvlib.enable_compilation_cache(folder)
    assert jax.config.jax_compilation_cache_dir == before  # nothing changed


def test_size_classes_pad_by_at_most_half():
    caps = [_band.capacity(m, 10**6) for m in range(1, 1000)]
    assert sorted(set(caps))[:8] == [16, 24, 32, 48, 64, 96, 128, 192]
    assert all(m <= c <= max(16, 1.5 * m) for m, c in zip(range(1, 1000), caps, strict=True))
    assert _band.capacity(20, 18) == 18  # never beyond the dimension


def test_the_background_compile_waits_for_a_quiet_second(behind, monkeypatch):
    """The fused compile starts only once no eager call has run for `_QUIET_S` (1 s): a call
    right after an answer (a new batch size) does not share the cores with it."""
    import time

    from curvlib import _compile

    started = []
    compile_now = _compile._lower_and_compile
    monkeypatch.setattr(_compile, "_lower_and_compile",
                        lambda j, a: started.append(time.monotonic()) or compile_now(j, a))
    monkeypatch.setattr(behind, "_QUIET_S", _compile._Behind._QUIET_S)
    assert behind._QUIET_S == 1.0
    D = jnp.linspace(-1.0, 3.0, 52)
    curvlib.eigsh(lambda v: D * v, jnp.ones(52), 2, key=KEY)  # answered now
    curvlib.eigsh(lambda v: 2 * D * v, jnp.ones(52), 3, key=KEY)  # the next call, at once
    again = time.monotonic()
    behind.wait()
    # (the first compile may have been replaced by the second's: one waits at most)
    assert started and started[0] >= again + 0.9  # after a quiet second, never before


def test_compile_behind_off_compiles_in_front(behind):
    curvlib.compile_behind(False)
    D = jnp.linspace(0.0, 1.0, 44)
    before = len(behind._entries)
    curvlib.eigsh(lambda v: D * v, jnp.ones(44), 2, key=KEY)
    assert len(behind._entries) == before


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("transform", ["jit", "vmap", "jit_of_constants"])
def test_a_closure_over_the_users_tracer_runs_inside_their_transformation(answer_now, name,
                                                                         transform):
    """``v -> H(params) v`` built inside the user's ``jit``/``vmap`` with a concrete start
    vector, or a ``jit`` of a function of no arguments (every array a constant it closes
    over): the call is part of the user's program (both raised: the answer-now path
    took them for eager calls)."""
    params, x, y, loss = _problem()
    call, _ = CALLS[name]

    def answer(p):
        mv = lambda v: jax.jvp(jax.grad(loss), (p, x, y), (v, jnp.zeros_like(x),
                                                         jnp.zeros_like(y)))[1]
        return call(mv, params)

    double = jax.tree.map(lambda t: 2 * t, params)
    want = [answer(params), answer(double)]
    if transform == "jit":
        got = [jax.jit(answer)(params), jax.jit(answer)(double)]
    elif transform == "jit_of_constants":
        got = [jax.jit(lambda: answer(params))(), jax.jit(lambda: answer(double))()]
    else:
        both = jax.vmap(answer)(jax.tree.map(lambda t: jnp.stack([t, 2 * t]), params))
        got = [jax.tree.map(lambda t: t[i], both) for i in range(2)]
    for w, g in zip(want, got, strict=True):
        assert jax.tree.structure(w) == jax.tree.structure(g)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(w), jax.tree.leaves(g),
                                strict=True):
            a, b = np.asarray(a, float), np.asarray(b, float)
            if "eigenvectors" in jax.tree_util.keystr(path):  # each up to its sign
                a, b = np.abs(a), np.abs(b)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_landscape_calls_of_constants_inside_a_users_jit_are_part_of_it(answer_now):
    """``jax.jit(lambda U: increment_coefficients(loss, params, data, k, U))``: ``params``
    and ``data`` are constants of the user's program; the eager route (concrete checks,
    answer-now programs) raised there."""
    params, x, y, loss = _problem()
    data = (x, y)
    L = curvlib.landscape

    def batch_loss(p, batch):
        return loss(p, *batch)

    sub = L.curvature_subspace(batch_loss, params, data, 6, 2, key=KEY)
    coef = L.increment_coefficients(batch_loss, params, data, 6, sub.eigenvectors)
    jit_sub = jax.jit(lambda: L.curvature_subspace(batch_loss, params, data, 6, 2, key=KEY))()
    jit_coef = jax.jit(lambda U: L.increment_coefficients(batch_loss, params, data, 6, U))(
        sub.eigenvectors)
    np.testing.assert_allclose(jit_sub.eigenvalues, sub.eigenvalues, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(coef), jax.tree.leaves(jit_coef), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["eigsh", "power_iteration"])
def test_the_answer_now_and_the_compiled_eigenvectors_have_the_same_signs(behind, engine,
                                                                           name):
    """The same call twice, answered now then by the fused program: the same vectors, not
    only the same spans (LAPACK's and XLA's eigensolvers pick opposite signs; a Δ2(D)
    direct Monte Carlo on the two subspaces then differed with the same key)."""
    params, x, y, loss = _problem()
    mv = curvlib.hessian_matvec(loss, params, x, y)
    call = CALLS[name][0]
    now = call(mv, params)
    behind.wait()
    fused = call(mv, params)
    for a, b in zip(jax.tree.leaves(now.eigenvectors), jax.tree.leaves(fused.eigenvectors),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for t in jax.tree.leaves(fused.eigenvectors):  # the convention itself
        assert t.shape[0] == 2
    flat = np.concatenate([np.asarray(t).reshape(2, -1) for t in
                           jax.tree.leaves(fused.eigenvectors)], axis=1)
    np.testing.assert_array_less(0.0, flat[np.arange(2), np.argmax(np.abs(flat), axis=1)])


def test_mixed_dtypes_go_straight_to_the_fused_program(behind):
    v0 = {"a": jnp.ones(20, jnp.float32), "b": jnp.ones(20, jnp.float64)}
    res = curvlib.eigsh(lambda v: jax.tree.map(lambda x: 2.0 * x, v), v0, 2, key=KEY)
    assert len(behind._entries) == 0
    assert res.eigenvalues.tolist() == pytest.approx([2.0, 2.0])


def test_a_narrower_basis_dtype_answers_through_the_compiled_steps(behind):
    """NumPy would accumulate a bfloat16 basis's inner products in bfloat16 (XLA accumulates
    them in float32): such a call takes the compiled steps, with the fused program's answer;
    a float32 basis for float32 vectors (the same dtype) runs on NumPy."""
    from curvlib.krylov import _driver

    D = jnp.linspace(-1.0, 3.0, 90, dtype=jnp.float32)
    v0 = jnp.ones(90, jnp.float32)
    for dtype, on_numpy in ((jnp.bfloat16, False), (jnp.float32, True)):
        steps = _driver.HOST_STEPS[0]
        now = curvlib.eigsh(lambda v: D * v, v0, 3, key=KEY, basis_dtype=dtype)
        assert (_driver.HOST_STEPS[0] > steps) == on_numpy, dtype
        behind.wait()
        fused = curvlib.eigsh(lambda v: D * v, v0, 3, key=KEY, basis_dtype=dtype)
        assert int(now.num_matvecs) == int(fused.num_matvecs) and bool(now.converged)
        np.testing.assert_allclose(now.eigenvalues, fused.eigenvalues, rtol=1e-5)


@pytest.mark.parametrize("microbatch_size", [None, 8])
def test_an_eager_curvature_subspace_answers_now(answer_now, microbatch_size):
    """An eager `curvature_subspace` builds its operator and start vector in small programs and
    calls eigsh eagerly, so the eigensolver answers now (NumPy steps); its answer is the one
    compiled program's (compile behind off), with the same certificate; inside `jit` the
    subspace stays one program."""
    from curvlib import landscape as L
    from curvlib.krylov import _driver

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((40, 12)))
    y = jnp.asarray(rng.standard_normal(40))
    params = {"w": jnp.asarray(rng.standard_normal((12, 3))) / 3,
              "v": jnp.asarray(rng.standard_normal(3)) / 3}

    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["w"]) @ p["v"] - batch[1]) ** 2)

    call = lambda: L.curvature_subspace(loss, params, (x, y), 24, 3, key=KEY,
                                        microbatch_size=microbatch_size)
    steps = _driver.HOST_STEPS[0]
    now = call()
    assert _driver.HOST_STEPS[0] > steps
    curvlib.compile_behind(False)
    one_program = call()
    curvlib.compile_behind(True)
    _same_answer(now, one_program)
    assert bool(now.converged)
    steps = _driver.HOST_STEPS[0]
    jitted = jax.jit(lambda p: L.curvature_subspace(loss, p, (x, y), 24, 3, key=KEY,
                                                    microbatch_size=microbatch_size))(params)
    assert _driver.HOST_STEPS[0] == steps
    _same_answer(jitted, one_program)


def test_a_compile_behind_traced_after_a_constant_changed_serves_no_one(behind):
    """The landscape keys a loss by the NumPy arrays it closes over, by value; its fused
    program is traced later, behind. An array changed in place in between (the user moved
    on) gave that program the new values under the old key: back at the old values, a fresh
    closure got the other values' coefficients. Now that program is dropped and the call
    compiles in front, with the values it holds."""
    from curvlib import landscape as L

    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=8))
    w0, U = jnp.asarray([0.3, -0.2, 0.5]), jnp.eye(3)[:2]
    scale = np.ones(3)

    def coefficients():  # a fresh closure each call, as in a notebook
        loss = lambda w, b: jnp.mean((jnp.tanh(b[0] @ (w * scale)) - b[1]) ** 2)
        return L.increment_coefficients(loss, w0, (x, y), 4, U)

    def oracle():
        s = scale.copy()
        inc = lambda w: (jnp.mean((jnp.tanh(x[:5] @ (w * s)) - y[:5]) ** 2)
                         - jnp.mean((jnp.tanh(x[:4] @ (w * s)) - y[:4]) ** 2))
        return float(inc(w0)), np.asarray(U @ jax.grad(inc)(w0))

    first = coefficients()
    scale[:] = 3.0  # changed in place before the compile behind traces the loss
    behind.wait()
    scale[:] = 1.0
    for _ in range(2):  # (the second call: whatever the first left behind)
        again = coefficients()
        a, c = oracle()
        np.testing.assert_allclose(again.a, a, rtol=1e-10)
        np.testing.assert_allclose(again.c, c, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(again.a, first.a, rtol=1e-10)
        behind.wait()
    scale[:] = 3.0
    np.testing.assert_allclose(coefficients().a, oracle()[0], rtol=1e-10)


def test_a_compile_behind_of_explicitly_sharded_data_is_kept(behind):
    """The check that a keyed loss still computes its key (above) runs in the compile
    thread, outside the user's ``jax.set_mesh``: it hashes the NumPy arrays the loss closes
    over instead of tracing it again (a trace there differed for explicitly sharded data,
    so every such program was dropped and the next call compiled in front)."""
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from curvlib import landscape as L

    mesh = jax.make_mesh((1,), ("d",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        x = jax.device_put(jnp.asarray(rng.normal(size=(8, 3))), NamedSharding(mesh, P("d")))
        y = jax.device_put(jnp.asarray(rng.normal(size=8)), NamedSharding(mesh, P("d")))
        w0, U = jnp.asarray([0.3, -0.2, 0.5]), jnp.eye(3)[:2]
        loss = lambda w, b: jnp.mean((jnp.tanh(b[0] @ w) - b[1]) ** 2)
        first = L.increment_coefficients(loss, w0, (x, y), 4, U)
        behind.wait()
        assert [f.result() is not None for f in behind._entries.values()] == [True]
        again = L.increment_coefficients(loss, w0, (x, y), 4, U)
    np.testing.assert_allclose(again.B, first.B, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_an_eager_pipeline_compiles_the_models_derivatives_once(behind, dtype):
    """Eager `curvature_subspace`, `increment_coefficients`, `prefix` and the closed form: the
    coefficients take the subspace's linearisation program (the weights are data) and the
    eigensolver's compiled product, so they compile nothing; their values are the compiled
    program's (with and without the Ritz values) to rounding, and the closed form on NumPy is
    the traced one's."""
    from unittest import mock

    from curvlib import _space
    from curvlib import landscape as L
    from curvlib.landscape import _common, coefficients

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((30, 6)), dtype)
    y = jnp.asarray(rng.standard_normal(30), dtype)
    params = {"w": jnp.asarray(rng.standard_normal((6, 4)) / 3, dtype),
              "v": jnp.asarray(rng.standard_normal(4) / 3, dtype)}

    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["w"]) @ p["v"] - batch[1]) ** 2)

    sub = L.curvature_subspace(loss, params, (x, y), 20, 3, key=KEY)
    sizes = lambda: (_common.linearized.jitted()._cache_size(), _space.flat_product._cache_size())
    before = sizes()
    coef = L.increment_coefficients(loss, params, (x, y), 20, sub.eigenvectors, check_mean=False,
                                    eigenvalues=sub.eigenvalues)
    assert sizes() == before  # no program of its own: the subspace's serve
    # its own program compiled behind serves later calls (single-sample products with the
    # Ritz values: far cheaper warm than the shared route at large n)
    behind.wait()
    with mock.patch.object(coefficients, "_coefficients_now", side_effect=AssertionError):
        again = L.increment_coefficients(loss, params, (x, y), 20, sub.eigenvectors,
                                         check_mean=False, eigenvalues=sub.eigenvalues)
    scale = float(jnp.max(jnp.abs(coef.B)))
    np.testing.assert_allclose(again.B, coef.B, rtol=0,
                               atol=(1e-12 if dtype == jnp.float64 else 2e-5) * scale)
    tol = 1e-12 if dtype == jnp.float64 else 2e-5
    curvlib.compile_behind(False)
    try:
        for ritz in (None, sub.eigenvalues):
            ref = L.increment_coefficients(loss, params, (x, y), 20, sub.eigenvectors,
                                           check_mean=False, eigenvalues=ritz)
            for got, want in zip(coef, ref, strict=True):
                assert isinstance(got, jax.Array) and got.dtype == want.dtype == dtype
                scale = float(jnp.max(jnp.abs(ref.B)))
                np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)
    finally:
        curvlib.compile_behind(True)
    sigma = jnp.asarray([1e-2, 1e-1, 1.0], dtype)
    for d in (1, 3):
        part = coef.prefix(d)
        assert part.c.shape == (d,) and part.B.shape == (d, d)
        eager = L.delta2_closed_form(*part, sigma)
        traced = jax.jit(L.delta2_closed_form)(*part, sigma)
        assert isinstance(eager, jax.Array) and eager.dtype == traced.dtype == dtype
        np.testing.assert_allclose(eager, traced, rtol=10 * float(jnp.finfo(dtype).eps))


def test_a_quick_program_inside_a_users_jit_is_part_of_it():
    """The programs compiled with the quick options (the quadratic Monte Carlo here) take no
    compiler options inside a caller's `jit` (JAX refuses them on a nested `jit`): the same
    estimate either way."""
    from curvlib import landscape as L

    a, c, B = jnp.asarray(0.1), jnp.asarray([1.0, -0.5]), jnp.asarray([[2.0, 0.3], [0.3, 1.0]])
    sigma = jnp.asarray([0.1, 0.2])
    est = lambda a, c, B: L.delta2_quadratic_mc(a, c, B, sigma, key=KEY, num_samples=8).estimate
    np.testing.assert_allclose(jax.jit(est)(a, c, B), est(a, c, B), rtol=1e-13)


def test_an_eager_k_curve_answers_as_its_compiled_steps(answer_now, monkeypatch):
    """`k_curve` called eagerly takes the answer-now subspace and the shared-program
    coefficients for every k; its curve is the one with every step compiled (compile behind
    off) to rounding."""
    from curvlib import landscape as L
    from curvlib.landscape import coefficients

    shared, real = [], coefficients._coefficients_now
    monkeypatch.setattr(coefficients, "_coefficients_now",
                        lambda **a: shared.append(a["k"]) or real(**a))

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((24, 5)))
    y = jnp.asarray(rng.standard_normal(24))
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)) / 3),
              "v": jnp.asarray(rng.standard_normal(3) / 3)}

    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["w"]) @ p["v"] - batch[1]) ** 2)

    call = lambda: L.k_curve(loss, params, (x, y), [6, 11], dims=[1, 3], sigmas=[1e-2, 0.3],
                             key=KEY, num_samples=0, progress=False)
    now = call()
    # the first k computed (the largest) answers now (the next may find the program compiled)
    assert shared[0] == 11
    used = len(shared)
    curvlib.compile_behind(False)
    try:
        compiled = call()
    finally:
        curvlib.compile_behind(True)
    assert len(shared) == used  # (the compiled curve: its own program)
    for field in ("eigenvalues", "eigenvalues_next", "closed_form", "delta1", "max_angle",
                  "spectral"):
        want = np.asarray(getattr(compiled, field))
        np.testing.assert_allclose(getattr(now, field), want, rtol=1e-9,
                                   atol=1e-12 * np.max(np.abs(want)), err_msg=field)


def test_new_dims_in_a_k_curve_compile_only_their_shaped_programs(compiles):
    """Other nested dimensions ``D`` (the same largest) compile the programs whose shapes
    they set (angles, the closed-form and spectral grids), each once, not the overlap and
    angles op by op (a dozen programs per leaf and ``D``)."""
    from curvlib import landscape as L

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((24, 5)))
    y = jnp.asarray(rng.standard_normal(24))
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)) / 3),
              "v": jnp.asarray(rng.standard_normal(3) / 3), "b": jnp.zeros(())}

    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["w"]) @ p["v"] + p["b"] - batch[1]) ** 2)

    def call(dims):
        return L.k_curve(loss, params, (x, y), [6, 11], dims=dims, sigmas=[1e-2, 0.3],
                         key=KEY, num_samples=0, progress=False)

    first = call([1, 4])
    with compiles() as seen:
        again = call([2, 3, 4])
    assert seen.count <= 4, seen.count
    np.testing.assert_allclose(again.max_angle[:, 2], first.max_angle[:, 1], rtol=1e-10)


@pytest.mark.parametrize("case", ["model", "breakdown"])
def test_lanczos_answers_now_with_the_fused_programs_answer(answer_now, engine, case):
    if case == "model":
        params, x, y, loss = _problem()
        mv, v0, m = curvlib.hessian_matvec(loss, params, x, y), params, 12
    else:  # five distinct values: the chain breaks down and restarts from fresh directions
        D = jnp.repeat(jnp.arange(1.0, 6.0), 8)
        mv, v0, m = (lambda v: D * v), jnp.ones(40), 9
    lookups = sum(_steps_compiled()[:2])
    now = curvlib.lanczos(mv, v0, m)
    assert sum(_steps_compiled()[:2]) > lookups  # answered by the host-driven steps
    cfg = tridiag._Cfg(m=m, layout=eigen._space.choose_layout(v0), basis_dtype=None,
                       restart=True)
    from curvlib import _compile

    fused = tridiag._compiled.jitted(cfg, _compile.as_operator(mv, v0), v0, None)
    for f in ("num_matvecs", "finite", "converged", "breakdown", "status"):
        assert int(getattr(now, f)) == int(getattr(fused, f)), f
    assert bool(now.breakdown) == (case == "breakdown")
    np.testing.assert_allclose(now.alphas, fused.alphas, rtol=0, atol=1e-12)
    np.testing.assert_allclose(now.betas, fused.betas, rtol=0, atol=1e-12)
    for a, b in zip(jax.tree.leaves((now.basis, now.residual)),
                    jax.tree.leaves((fused.basis, fused.residual)), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_lanczos_a_new_depth_of_the_size_class_compiles_no_step(answer_now):
    """The answer-now steps take the depth as data: depths 16 to 23 (rows 17-24, class 24)
    share one set of step programs, and each is the fused program's answer (breakdowns
    and fresh directions included: five distinct values)."""
    from curvlib import _compile

    D = jnp.repeat(jnp.arange(1.0, 6.0), 10)
    mv, v0 = (lambda v: D * v), jnp.ones(50)
    curvlib.lanczos(mv, v0, 16)
    misses = _steps_compiled()[1]
    for m in (17, 20, 23):
        now = curvlib.lanczos(mv, v0, m)
        assert _steps_compiled()[1] == misses, m
        assert now.alphas.shape == (m,) and now.betas.shape == (m - 1,)
        assert now.basis.shape == (m, 50) and int(now.num_matvecs) == m
        cfg = tridiag._Cfg(m=m, layout="identity", basis_dtype=None, restart=True)
        fused = tridiag._compiled.jitted(cfg, _compile.as_operator(mv, v0), v0, None)
        for f in ("num_matvecs", "finite", "converged", "breakdown", "status"):
            assert int(getattr(now, f)) == int(getattr(fused, f)), (m, f)
        assert bool(now.breakdown)
        np.testing.assert_allclose(now.alphas, fused.alphas, rtol=0, atol=1e-12)
        np.testing.assert_allclose(now.betas, fused.betas, rtol=0, atol=1e-12)
        np.testing.assert_allclose(now.residual_norm, fused.residual_norm, rtol=0, atol=1e-12)
        np.testing.assert_allclose(now.basis, fused.basis, rtol=0, atol=1e-10)
        np.testing.assert_allclose(now.residual, fused.residual, rtol=0, atol=1e-10)


# ----------------------------------------------------------------- cg answers now


def _cg_cases():
    rng = np.random.default_rng(7)
    M = jnp.asarray(rng.standard_normal((40, 40)))
    spd = M @ M.T / 40 + 0.1 * jnp.eye(40)
    indefinite = jnp.diag(jnp.linspace(-1.0, 3.0, 40))
    b = jnp.asarray(rng.standard_normal(40))
    params, x, y, loss = _problem()
    return {
        "spd": (lambda v: spd @ v, b, dict(rtol=1e-10)),
        "damped_array": (lambda v: spd @ v, b, dict(damping=jnp.asarray(0.5), atol=1e-9)),
        "negative_curvature": (lambda v: indefinite @ v, b, {}),
        "zero_rhs": (lambda v: spd @ v, jnp.zeros(40), {}),
        "tiny_rhs": (lambda v: spd @ v, 1e-200 * b, dict(rtol=1e-8)),
        "budget": (lambda v: spd @ v, b, dict(max_steps=3)),
        "solver_value": (lambda v: spd @ v, b, dict(solver=curvlib.CG(rtol=1e-6))),
        "model": (curvlib.hessian_matvec(loss, params, x, y), params, dict(damping=1e-2)),
        "non_finite": (lambda v: (spd * jnp.nan) @ v, b, {}),
    }


def _same_cg(a, b, atol=1e-12, residual_rtol=1e-9):
    for f in ("num_steps", "num_matvecs", "converged", "negative_curvature", "finite", "status"):
        assert int(getattr(a, f)) == int(getattr(b, f)), f
    scale = max(float(np.max(np.abs(np.concatenate(
        [np.ravel(t) for t in jax.tree.leaves(b.x)])))), 1e-300)
    for u, v in zip(jax.tree.leaves((a.x, a.curvature_direction)),
                    jax.tree.leaves((b.x, b.curvature_direction)), strict=True):
        np.testing.assert_allclose(u, v, rtol=0, atol=atol * scale)
    if residual_rtol is not None:
        np.testing.assert_allclose(a.residual_norm, b.residual_norm, rtol=residual_rtol,
                                   atol=1e-12 * float(np.nan_to_num(b.residual_norm, nan=1.0)))


@pytest.mark.parametrize("case", sorted(_cg_cases()))
def test_cg_answers_now_with_the_fused_programs_answer(behind, engine, case):
    """An eager first `cg` answers through the host-driven steps (no fused compile in front);
    its iterates, certificate and flags are the fused program's (float64, to rounding)."""
    mv, b, kw = _cg_cases()[case]
    lookups = sum(_steps_compiled()[:2])
    entries = len(behind._entries)
    now = curvlib.cg(mv, b, **kw)
    assert sum(_steps_compiled()[:2]) > lookups  # answered by the host-driven steps
    assert len(behind._entries) == entries + 1  # and the fused program submitted
    behind.wait()
    steps = _steps_compiled()
    fused = curvlib.cg(mv, b, **kw)
    assert _steps_compiled() == steps  # the fused program answered
    if engine == "compiled":  # XLA's sums, in XLA's order: the fused program's iterates
        _same_cg(now, fused)
    else:
        # NumPy sums inner products in another order than XLA: over tens of CG steps the
        # rounding differences grow to the solve's own accuracy (4e-8 relative at rtol=1e-6,
        # 1e-10 at rtol=1e-10). The same steps and flags; iterates within the tolerance;
        # and the residual reported is the true residual of the iterate returned
        _same_cg(now, fused, atol=1e-6, residual_rtol=None)
        if bool(now.finite):
            flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])
            r = flat(b) - flat(mv(now.x)) - float(kw.get("damping", 0.0)) * flat(now.x)
            big = np.max(np.abs(r))  # (scaled: the tiny case's squares would underflow)
            true = big * np.linalg.norm(r / big) if big > 0 else 0.0
            np.testing.assert_allclose(now.residual_norm, true, rtol=1e-6)
    if case == "spd":
        np.testing.assert_allclose(now.x, np.linalg.solve(np.asarray(mv(jnp.eye(40))),
                                                          np.asarray(b)), rtol=1e-8)
    if case == "negative_curvature":
        assert bool(now.negative_curvature)
    if case == "non_finite":
        assert not bool(now.finite)


def test_cg_with_a_warm_start_or_preconditioner_compiles_in_front(behind):
    """Options the answer-now steps do not carry take the fused program, as before."""
    D = jnp.linspace(1.0, 2.0, 30)
    lookups = sum(_steps_compiled()[:2])
    a = curvlib.cg(lambda v: D * v, jnp.ones(30), x0=jnp.ones(30))
    b = curvlib.cg(lambda v: D * v, jnp.ones(30), preconditioner=lambda r: r / D)
    assert sum(_steps_compiled()[:2]) == lookups and len(behind._entries) == 0
    np.testing.assert_allclose(a.x, 1 / D, rtol=1e-5)
    np.testing.assert_allclose(b.x, 1 / D, rtol=1e-5)


def test_cg_a_new_model_or_option_of_the_same_size_compiles_no_step(answer_now):
    """The steps depend on b's size and dtype only: a new operator, damping, tolerance or
    step cap reuses them."""
    rng = np.random.default_rng(9)
    M = jnp.asarray(rng.standard_normal((36, 36)))
    A = M @ M.T / 36 + jnp.eye(36)
    b = jnp.asarray(rng.standard_normal(36))
    curvlib.cg(lambda v: A @ v, b)
    misses = _steps_compiled()[1]
    for kw in (dict(damping=0.3, rtol=1e-10), dict(rtol=1e-9), dict(max_steps=4),
               dict(atol=1e-3)):
        res = curvlib.cg(lambda v: jnp.tanh(1.0) * (A @ v), b, **kw)
        assert _steps_compiled()[1] == misses, kw
        want = np.linalg.solve(np.tanh(1.0) * np.asarray(A) + kw.get("damping", 0.0) * np.eye(36),
                               np.asarray(b))
        if "rtol" in kw:
            np.testing.assert_allclose(res.x, want, rtol=1e-6)
        else:
            assert int(res.num_steps) <= kw.get("max_steps", 36 * 10)


# ---------------------------------------------------- power_iteration answers now


def _power_cases():
    S = jnp.linspace(-2.0, 6.0, 50) ** 3 / 100
    D = jnp.concatenate([jnp.array([-9.0, 7.0, 5.0]), jnp.linspace(0.0, 3.0, 47)])
    Q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((20, 20)))
    R = jnp.asarray((Q * np.array([5.0, 5.0] + [-2.0] * 18)) @ Q.T)
    params, x, y, loss = _problem()
    return {
        "model": (curvlib.hessian_matvec(loss, params, x, y), params, dict(k=2, key=KEY)),
        "signed": (lambda v: D * v, jnp.ones(50), dict(k=3, rtol=1e-8, num_iters=400)),
        "zero_start_keyed": (lambda v: S * v, jnp.zeros(50), dict(k=2, key=KEY)),
        "zero_start_no_key": (lambda v: S * v, jnp.zeros(50), dict(k=2)),
        # 5 twice in a rotated basis: a start shared by both pairs finds one copy only
        "repeated": (lambda v: R @ v, jnp.asarray(np.random.default_rng(0).standard_normal(20)),
                     dict(k=2, rtol=1e-8, num_iters=1000)),
        "budget": (lambda v: S * v, jnp.ones(50), dict(k=3, max_matvecs=20)),
        "non_finite": (lambda v: (S * jnp.nan) * v, jnp.ones(50), dict(k=2)),
    }


@pytest.mark.parametrize("case", sorted(_power_cases()))
def test_power_iteration_answers_now_with_the_fused_programs_answer(behind, engine, case):
    mv, v0, kw = _power_cases()[case]
    lookups = sum(_steps_compiled()[:2])
    now = curvlib.power_iteration(mv, v0, **kw)
    assert sum(_steps_compiled()[:2]) > lookups  # answered by the host-driven steps
    behind.wait()
    steps = _steps_compiled()
    fused = curvlib.power_iteration(mv, v0, **kw)
    assert _steps_compiled() == steps  # the fused program answered
    for f in ("num_matvecs", "finite", "status"):
        assert int(getattr(now, f)) == int(getattr(fused, f)), f
    np.testing.assert_array_equal(now.converged, fused.converged)
    scale = float(np.nanmax(np.abs(np.concatenate([fused.eigenvalues, [1.0]]))))
    np.testing.assert_allclose(now.eigenvalues, fused.eigenvalues, rtol=0, atol=1e-12 * scale)
    if case == "repeated":
        # a repeated eigenvalue's vectors are any basis of its eigenspace: numpy's and XLA's
        # eigh of the (nearly scalar) Rayleigh-Ritz matrix pick different ones, in either
        # order. The same eigenspace, and each path's residuals within the tolerance asked.
        Vn, Vf = (np.stack([np.ravel(a) for a in r.eigenvectors]) for r in (now, fused))
        np.testing.assert_allclose(Vn.T @ Vn, Vf.T @ Vf, rtol=0, atol=1e-9)
        for r in (now, fused):
            assert np.all(np.asarray(r.residual_norms) <= kw["rtol"] * 5.0), r.residual_norms
    else:
        np.testing.assert_allclose(now.residual_norms, fused.residual_norms, rtol=1e-6,
                                   atol=1e-12 * scale)
        for a, b in zip(jax.tree.leaves(now.eigenvectors), jax.tree.leaves(fused.eigenvectors),
                        strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    if case == "signed":
        np.testing.assert_allclose(now.eigenvalues, [-9.0, 7.0, 5.0], rtol=1e-6)
    if case.startswith("zero_start"):  # a zero start begins at random, key or no key
        S = jnp.linspace(-2.0, 6.0, 50) ** 3 / 100
        assert bool(np.all(now.converged))
        np.testing.assert_allclose(now.eigenvalues, np.sort(np.asarray(S))[::-1][:2],
                                   rtol=1e-3)
    if case == "repeated":  # both copies, as numpy finds them
        assert bool(np.all(now.converged)) and int(now.status) == curvlib.Status.SUCCESS
        np.testing.assert_allclose(now.eigenvalues, [5.0, 5.0], rtol=1e-8)


def test_power_iteration_a_new_model_or_budget_compiles_no_step(answer_now):
    """The steps depend on v0's size and dtype and on ``k``: a new operator, tolerance or
    budget reuses them."""
    S = jnp.linspace(-2.0, 6.0, 44) ** 3 / 100
    curvlib.power_iteration(lambda v: S * v, jnp.ones(44), 2)
    misses = _steps_compiled()[1]
    for kw in (dict(rtol=1e-6), dict(num_iters=50), dict(max_matvecs=30)):
        res = curvlib.power_iteration(lambda v: jnp.tanh(1.0) * (S * v), jnp.ones(44), 2, **kw)
        assert _steps_compiled()[1] == misses, kw
        assert float(res.eigenvalues[0]) == pytest.approx(float(jnp.tanh(1.0) * S[-1]), rel=1e-3)


# --------------------------------------------------- spectral_density answers now


def _slq_cases():
    params, x, y, loss = _problem()
    D = jnp.repeat(jnp.arange(1.0, 6.0), 8)  # five distinct values: every chain breaks down
    return {
        "model": (curvlib.hessian_matvec(loss, params, x, y), params, dict(num_matvecs=8)),
        "breakdown": (lambda v: D * v, jnp.ones(40), dict(num_matvecs=9)),
        "grid": (lambda v: D * v, jnp.ones(40),
                 dict(num_matvecs=6, grid=jnp.linspace(0.0, 6.0, 7), sigma=0.3)),
        "non_finite": (lambda v: (D * jnp.nan) * v, jnp.ones(40), dict(num_matvecs=5)),
    }


@pytest.mark.parametrize("case", sorted(_slq_cases()))
def test_spectral_density_answers_now_with_the_fused_programs_answer(behind, engine, case):
    mv, v_like, kw = _slq_cases()[case]
    lookups = sum(_steps_compiled()[:2])
    now = curvlib.spectral_density(mv, v_like, KEY, num_probes=3, **kw)
    assert sum(_steps_compiled()[:2]) > lookups  # answered by the host-driven steps
    behind.wait()
    steps = _steps_compiled()
    fused = curvlib.spectral_density(mv, v_like, KEY, num_probes=3, **kw)
    assert _steps_compiled() == steps  # the fused program answered
    for f in ("finite", "num_matvecs", "converged", "status"):
        assert int(getattr(now, f)) == int(getattr(fused, f)), f
    for f in ("grid", "nodes", "weights", "density", "sigma"):
        a, b = np.asarray(getattr(now, f)), np.asarray(getattr(fused, f))
        scale = float(np.nanmax(np.abs(np.concatenate([b.ravel(), [1.0]]))))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * scale, err_msg=f)
    if case == "breakdown":  # exact quadrature of the five-point spectrum: z^T D z / z^T z
        D = np.repeat(np.arange(1.0, 6.0), 8)
        want = [float(z @ (D * z) / (z @ z)) for z in map(np.asarray, density._flat_probes(
            KEY, v_like, 3))]
        np.testing.assert_allclose(np.sum(now.weights * now.nodes, axis=1), want, rtol=1e-10)


# ------------------------------------------------- the Hutchinson estimators answer now


def _hutch_cases():
    params, x, y, loss = _problem()
    rng = np.random.default_rng(11)
    M = jnp.asarray(rng.standard_normal((30, 30)))
    S = M + M.T
    return {
        "model": (curvlib.hessian_matvec(loss, params, x, y), params),
        "vector": ((lambda v: S @ v), jnp.ones(30)),
        "non_finite": ((lambda v: (S * jnp.nan) @ v), jnp.ones(30)),
    }


def _same_estimate(a, b):
    for f in ("num_samples", "num_evaluations", "num_matvecs", "finite", "converged", "status"):
        assert int(getattr(a, f)) == int(getattr(b, f)), f
    for u, v in zip(jax.tree.leaves((a.estimate, a.stderr)),
                    jax.tree.leaves((b.estimate, b.stderr)), strict=True):
        scale = float(np.nanmax(np.abs(np.concatenate([np.ravel(v), [1.0]]))))
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("case", sorted(_hutch_cases()))
@pytest.mark.parametrize("estimator", ["hutch++", "hutchinson", "diag"])
def test_hutchinson_answers_now_with_the_fused_programs_answer(behind, case, estimator):
    """The estimator cut at its products (probes, the model's block product, the arithmetic
    between) gives the fused program's estimate and error bar, from the same probes."""
    mv, v_like = _hutch_cases()[case]
    if estimator == "diag":
        call = lambda: curvlib.hutchinson_diag(mv, v_like, KEY, 7)  # noqa: E731
    else:
        call = lambda: curvlib.hutchinson_trace(mv, v_like, KEY, 7, method=estimator)  # noqa: E731
    entries = len(behind._entries)
    now = call()
    assert len(behind._entries) == entries + 1  # answered now, the fused program submitted
    behind.wait()
    fused = call()
    _same_estimate(now, fused)
    if case == "vector" and estimator != "diag":
        S = mv(jnp.eye(30))
        truth = float(jnp.trace(S))
        assert abs(float(now.estimate) - truth) <= 6 * float(now.stderr) + 1e-9
    if case == "non_finite":
        assert not bool(now.finite)


def test_hutchinson_with_deflation_or_batches_compiles_in_front(behind):
    D = jnp.linspace(1.0, 2.0, 30)
    est = curvlib.hutchinson_trace(lambda v: D * v, jnp.ones(30), KEY, 6, batch_size=2,
                                   method="hutchinson")
    diag = curvlib.hutchinson_diag(lambda v: D * v, jnp.ones(30), KEY, 6, batch_size=3)
    assert len(behind._entries) == 0  # not the answer-now path: the fused program, in front
    np.testing.assert_allclose(diag.estimate, D, rtol=1e-12)
    assert abs(float(est.estimate) - float(D.sum())) < 1e-9  # diagonal: every probe exact


def test_the_quick_options_name_the_cpu_emitter_only_on_cpu(monkeypatch):
    """The GPU compiler refuses a program that names XLA:CPU's emitter option (every eager
    eigsh failed on an H200 when it was always given): it is asked for only on a CPU, by
    the answer-now programs (`quick_options`) and by every other program curvlib compiles
    for an eager call (`eager_options`: the emitter alone, XLA's optimisation kept)."""
    from curvlib import _compile
    from curvlib.krylov import _driver

    def clear():
        _compile.eager_options.cache_clear()
        _compile.quick_options.cache_clear()

    clear()
    try:
        if jax.default_backend() == "cpu":
            assert "xla_cpu_use_fusion_emitters" in _driver.quick_options()
            assert _compile.eager_options() == {"xla_cpu_use_fusion_emitters": False}
        clear()
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        assert _driver.quick_options() == _driver.QUICK
        assert _compile.eager_options() == {}
        assert not any(k.startswith("xla_cpu_") for k in _driver.QUICK)
    finally:
        monkeypatch.undo()
        clear()


def test_an_eager_program_inside_the_callers_jit_is_part_of_its_program():
    """`eager_jit` (the programs of eager calls, compiled with `eager_options`) is a plain
    ``jax.jit`` when called on traced values: JAX refuses compiler options on a nested
    ``jit``, so the caller's ``jit``, ``vmap`` and ``grad`` of it work and agree with the
    eager call."""
    from curvlib._compile import eager_jit

    f = eager_jit(lambda x, n: jnp.sin(x) * n, static_argnames="n")
    x = jnp.linspace(0.0, 1.0, 7)
    eager = f(x, n=3)
    np.testing.assert_allclose(eager, np.sin(np.linspace(0.0, 1.0, 7)) * 3, rtol=1e-15)
    np.testing.assert_allclose(jax.jit(lambda x: f(x, n=3))(x), eager, rtol=1e-15)
    np.testing.assert_allclose(jax.vmap(lambda x: f(x, n=3))(x), eager, rtol=1e-15)
    np.testing.assert_allclose(jax.grad(lambda x: f(x, n=3).sum())(x), 3 * np.cos(x),
                               rtol=1e-15)


def test_curvlibs_own_inner_products_ask_for_full_precision():
    """curvlib's inner products and basis operations run at full matmul precision (TF32 on a
    GPU cost float32 eigsh its orthogonality); the user's product keeps its own."""
    from curvlib import _tree

    def precisions(f, *args):
        eqns = jax.make_jaxpr(f)(*args).jaxpr.eqns
        found = []

        def walk(eqns):
            for e in eqns:
                if e.primitive.name == "dot_general":
                    found.append(e.params["precision"])
                for p in e.params.values():
                    for j in (p if isinstance(p, (list, tuple)) else [p]):
                        inner = getattr(j, "jaxpr", None)
                        if inner is not None:
                            walk(getattr(inner, "eqns", []))
        walk(eqns)
        return found

    v, Q = jnp.ones(6, jnp.float32), jnp.ones((3, 6), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    for f, args in ((_tree.vdot, (v, v)), (_tree.basis_project, (Q, v)),
                    (_tree.basis_gram, (Q, Q)), (_tree.basis_combine, (Q, jnp.ones(3)))):
        found = precisions(f, *args)
        assert found and all(p == (hi, hi) for p in found), (f.__name__, found)
    user = precisions(lambda x: curvlib.eigsh(lambda u: Q.T @ (Q @ u), x, 1).eigenvalues, v)
    assert any(p is None or p == (None, None) for p in found + user)  # the user's @ is untouched


def test_an_answer_now_call_pauses_the_garbage_collector(answer_now):
    """The answer-now path traces with Python's cyclic collector paused (its collections
    took a fifth of a first eigsh); the collector is on again after the call, and one the
    user turned off stays off."""
    import gc

    seen = []
    D = jnp.linspace(1.0, 2.0, 37)

    def product(d, v):
        seen.append(gc.isenabled())  # at the product's traces, inside the call
        return d * v

    mv = jax.tree_util.Partial(product, D)  # (a plain function is traced once, up front)

    assert gc.isenabled()
    res = curvlib.eigsh(mv, jnp.ones(37), 2)
    np.testing.assert_allclose(res.eigenvalues, [2.0, D[-2]], rtol=1e-6)
    assert seen and not any(seen) and gc.isenabled()
    gc.disable()
    try:
        curvlib.eigsh(mv, jnp.ones(37), 3)  # a new k: the answer-now path again
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("per_block", [False, True])
def test_an_eager_block_eigsh_answers_block_by_block_as_its_compiled_program(behind, compiles,
                                                                            per_block):
    """Eagerly, `block_eigsh` solves one block at a time, each `eigsh` answering now from
    the start vector the compiled program draws: the same pairs, products and status as
    the program that batches blocks of equal shape; a new ``k`` or ``which`` then compiles
    no block program (it compiled the whole vmapped program again: seconds)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((16, 4)))
    params = {"a": jnp.asarray(rng.standard_normal((4, 4)) / 2),
              "c": jnp.asarray(rng.standard_normal((4, 4)) / 2)}

    def loss(p):
        return jnp.mean(jnp.sum(jnp.tanh(jnp.tanh(x @ p["a"]) @ p["c"]) ** 2, axis=1))

    def call(k, which="LA"):
        if per_block:
            return curvlib.block_eigsh(
                None, params, k, key=KEY, which=which, blocks={"a": "a", "c": "c"},
                block_matvec=lambda where: curvlib.hessian_matvec(loss, params, wrt=where))
        return curvlib.block_eigsh(curvlib.hessian_matvec(loss, params), params, k, key=KEY,
                                   which=which)  # per leaf: one group of two equal blocks

    now = call(3)
    curvlib.compile_behind(False)
    try:
        fused = call(3)
    finally:
        curvlib.compile_behind(True)
    assert list(now) == list(fused)
    for name in now:
        a, b = now[name], fused[name]
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9, err_msg=name)
        assert int(a.num_matvecs) == int(b.num_matvecs) and int(a.status) == int(b.status)
        for u, v in zip(jax.tree.leaves(a.eigenvectors), jax.tree.leaves(b.eigenvectors),
                        strict=True):
            dots = np.abs(np.sum(np.asarray(u) * np.asarray(v), axis=tuple(range(1, u.ndim))))
            norms = np.sqrt(np.sum(np.asarray(v) ** 2, axis=tuple(range(1, v.ndim))))
            np.testing.assert_allclose(dots, norms ** 2, rtol=1e-7, atol=1e-12)
    behind.wait()
    with compiles() as seen:
        two = call(2, "SA")
    assert "jit(_block_eigsh)" not in seen.names and seen.count <= 4, seen.names
    for name in two:
        assert two[name].eigenvalues.shape == (2,) and bool(two[name].converged)


def test_an_eager_tracker_refresh_answers_now_then_runs_the_fused_loop(behind, compiles,
                                                                       monkeypatch):
    """An eager `track_curvature` refresh compiled eigsh and its trace probes' products as one
    fused loop (`eigsh_then`), in front: 5.4 s before a small MLP's first eager step, where
    eigsh alone answers in 0.4 s. It answers now: eigsh's answer-now path, then the probes'
    products one by one through the product it compiled alone. The fused loop compiles
    behind at once, without a quiet second (a training loop never pauses), and serves the
    refreshes after. Every refresh equals the jitted tracker's (float64)."""
    waited = []  # the compiles behind that waited for a quiet second
    monkeypatch.setattr(behind, "_quiet", lambda: waited.append(1))
    params, x, y, loss = _problem()
    tx = curvlib.track_curvature(1, 2, key=KEY, num_probes=3)

    @jax.jit
    def jitted_update(p, s):
        return tx.update(jax.grad(loss)(p, x, y), s, p, value_fn=loss, x=x, y=y)[1]

    eager = jitted = tx.init(params)
    for step in range(3):
        p = jax.tree.map(lambda a: a * (1.0 + 0.05 * step), params)
        g = jax.block_until_ready(jax.grad(loss)(p, x, y))
        runs = _steps_compiled()[0]
        with compiles() as seen:
            _, eager = tx.update(g, eager, p, value_fn=loss, x=x, y=y)
            jax.block_until_ready(eager)
        if step == 0:  # answered now: the loop's steps ran, no fused loop compiled in front
            assert _steps_compiled()[0] > runs
            # (the compile behind starts at once, and may start inside this block)
            assert "jit(_then)" not in seen.in_front, seen.in_front
            behind.wait()
            assert not waited  # compiled at once, not after a quiet second
        else:  # the fused loop, compiled behind, answered: no answer-now step ran
            assert _steps_compiled()[0] == runs
        jitted = jitted_update(p, jitted)
        a, b = curvlib.curvature_info(eager), curvlib.curvature_info(jitted)
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10)
        np.testing.assert_allclose(a.trace, b.trace, rtol=1e-9)
        np.testing.assert_allclose(a.trace_stderr, b.trace_stderr, rtol=1e-7)
        assert int(a.num_matvecs) == int(b.num_matvecs) and bool(a.converged)
        for u, w in zip(jax.tree.leaves(eager.eigenvectors), jax.tree.leaves(jitted.eigenvectors),
                        strict=True):  # (up to sign)
            np.testing.assert_allclose(np.abs(np.asarray(u)), np.abs(np.asarray(w)), atol=1e-8)
