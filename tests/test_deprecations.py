"""One vocabulary and solvers as values: every rename still works (with a warning naming the
new spelling) and gives the answer of the new spelling; solver values carry the one set of
defaults and checks; the functions built on an algorithm give the dense oracle's answer
when handed a solver value, the same answer as their old keywords."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvlib
from curvlib import CG, Eigsh, Lanczos, PowerIteration, _deprecation
from curvlib import landscape as ls
from curvlib.krylov import eigen as eigen_module
from curvlib.landscape import curve as curve_module
from curvlib.operators import blocks as blocks_module
from curvlib.optim import hessian_free

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ small problems

_D = np.linspace(1.0, 3.0, 12) ** 2  # a 12 x 12 SPD diagonal, distinct eigenvalues
_Q = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 12)))[0]
A = jnp.asarray((_Q * _D) @ _Q.T)
MV = jax.tree_util.Partial(lambda A, v: A @ v, A)
V0 = jnp.ones(12)
P2 = {"a": jnp.ones(7), "b": jnp.ones(5)}  # two blocks of a block-diagonal operator
SCALE = {"a": jnp.linspace(1.0, 2.0, 7), "b": jnp.linspace(3.0, 5.0, 5)}
BMV = jax.tree_util.Partial(lambda s, v: jax.tree.map(lambda x, y: x * y, s, v), SCALE)

_rng = np.random.default_rng(1)
X = jnp.asarray(_rng.normal(size=(10, 6)))
Y = jnp.asarray(_rng.normal(size=10))
W = jnp.zeros(6)


def lsq(w, batch):  # L_k = mean squared residual: H^(k) = 2 X_k^T X_k / k (no sample weights)
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def quad(p):  # f(p) = 1/2 p^T A p - 1^T p, Hessian A
    return 0.5 * p @ (A @ p) - jnp.sum(p)


def _track(**kw):
    opt = curvlib.track_curvature(1, 2, key=jax.random.PRNGKey(0), num_probes=0, **kw)
    state = opt.init(V0)
    _, state = jax.jit(lambda s: opt.update(V0, s, V0, value_fn=quad))(state)
    return curvlib.curvature_info(state).eigenvalues


def _step(make, **kw):
    tx = make(**kw)
    u, _ = jax.jit(lambda: tx.update(jax.grad(quad)(V0), tx.init(V0), V0, value_fn=quad))()
    return u


def _with_k(kw):
    return kw if "k" in kw else {"num_examples": 4, **kw}


BASE = {
    "curvlib.eigsh": lambda **kw: curvlib.eigsh(MV, V0, 2, **kw).eigenvalues,
    "curvlib.power_iteration": lambda **kw: curvlib.power_iteration(
        MV, V0, 1, num_iters=400, **kw).eigenvalues,
    "curvlib.block_eigsh": lambda **kw: {n: r.eigenvalues for n, r in curvlib.block_eigsh(
        BMV, P2, 2, key=jax.random.PRNGKey(0), **kw).items()},
    "curvlib.inverse_matvec": lambda **kw: curvlib.inverse_matvec(MV, damping=0.5, **kw)(V0),
    "curvlib.inverse_matvec:lowrank": lambda **kw: curvlib.inverse_matvec(
        MV, damping=0.5, method="lowrank", rank=2, v0=V0, **kw)(V0),
    "curvlib.track_curvature": _track,
    "curvlib.scale_by_newton_cg": lambda **kw: _step(curvlib.scale_by_newton_cg, **kw),
    "curvlib.newton_cg": lambda **kw: _step(curvlib.newton_cg, **kw),
    "curvlib.scale_by_newton": lambda **kw: _step(curvlib.scale_by_newton, **kw),
    "curvlib.newton": lambda **kw: _step(curvlib.newton, linesearch=None, **kw),
    "curvlib.landscape.curvature_subspace": lambda **kw: ls.curvature_subspace(
        lsq, W, (X, Y), dim=2, key=jax.random.PRNGKey(0), **_with_k(kw)).eigenvalues,
    "curvlib.landscape.k_curve": lambda **kw: ls.k_curve(
        lsq, W, (X, Y), [4], dims=[2], sigmas=[0.1], key=jax.random.PRNGKey(0),
        progress=False, next_subspace=False, **kw).eigenvalues,
    "curvlib.landscape.check_mean_loss": lambda **kw: ls.check_mean_loss(lsq, W, (X, Y), **kw),
    "curvlib.landscape.loss_increment": lambda **kw: ls.loss_increment(lsq, W, (X, Y), **kw),
    "curvlib.landscape.delta1": lambda **kw: ls.delta1(lsq, W, (X, Y), **kw),
    "curvlib.landscape.delta2_bound": lambda **kw: ls.delta2_bound(
        sigma=0.1, dim=2, max_loss=1.0, max_grad=1.0, max_hess=1.0, **kw),
    "curvlib.landscape.increment_coefficients": lambda **kw: ls.increment_coefficients(
        lsq, W, (X, Y), eigenvectors=jnp.eye(6)[:2], **kw),
    "curvlib.landscape.delta2_direct_mc": lambda **kw: ls.delta2_direct_mc(
        lsq, W, (X, Y), eigenvectors=jnp.eye(6)[:2], sigma=0.1, key=jax.random.PRNGKey(0),
        num_samples=4, **kw).mean,
    "curvlib.landscape.delta2_full_mc": lambda **kw: ls.delta2_full_mc(
        lsq, W, (X, Y), sigma=0.1, key=jax.random.PRNGKey(0), num_samples=4, **kw).mean,
}

_OLD_VALUES = dict(tol=1e-9, num_matvecs=8, cg_rtol=1e-9, max_cg_steps=5, atol=1e-12,
                   max_steps=30, hvp_mode="fwd-rev", k=4, rtol=1e-9, basis_size=8, num_keep=4,
                   max_matvecs=400, max_restarts=50, basis_dtype=jnp.float32)
# problem-dependent values: blocks of 7 and 5 entries; 6 parameters in the landscape
_SPECIAL = {("curvlib.block_eigsh", "basis_size"): 5, ("curvlib.block_eigsh", "num_matvecs"): 5,
            ("curvlib.block_eigsh", "num_keep"): 3,
            ("curvlib.landscape.curvature_subspace", "basis_size"): 6,
            ("curvlib.landscape.curvature_subspace", "num_matvecs"): 6,
            ("curvlib.landscape.k_curve", "basis_size"): 4,
            ("curvlib.landscape.k_curve", "num_matvecs"): 4}


def _base(rename):
    if rename.where == "curvlib.inverse_matvec" and rename.new.startswith("eigsh="):
        return BASE["curvlib.inverse_matvec:lowrank"]
    return BASE[rename.where]


def _new_kwargs(rename, value):
    """The new spelling of ``old=value``: a plain keyword, or a field of a solver value."""
    m = re.fullmatch(r"(\w+)=(\w+)\(((?:\w+=[^,]+, )*)(\w+)=\.\.\.\)", rename.new)
    if m is None:
        return {rename.new: value}
    arg, cls, keep, field = m.groups()  # keep: the function's own default ("rtol=0.5, ")
    kept = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in keep.split(", ") if kv)}
    return {arg: getattr(curvlib, cls)(**kept, **{field: value})}


def _value(rename):
    return _SPECIAL.get((rename.where, rename.old), _OLD_VALUES[rename.old])


RENAMES = sorted(set(_deprecation.RENAMES))


class _Called(Exception):
    """Raised by a stand-in for the implementation: the call was recorded, no work done."""


def _innermost_renaming_wrapper(fn):
    """The last wrapper of ``fn``'s ``__wrapped__`` chain that `curvlib._deprecation` made."""
    found = None
    while fn is not None:
        if getattr(getattr(fn, "__code__", None), "co_filename", None) == _deprecation.__file__:
            found = fn
        fn = getattr(fn, "__wrapped__", None)
    assert found is not None, "no renaming wrapper"
    return found


def _public(where):
    module, name = where.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def _stand_in(monkeypatch, rename, calls):
    """Replace the implementation behind ``rename.where`` by a recorder of its call.

    The deprecated keyword is translated either by a decorator (then the function it wraps
    is replaced) or, for the functions that fold forwarded solver options, in the body (then
    the algorithm call that receives the folded value is replaced).
    """
    def record(*args, **kwargs):
        calls.append((args, kwargs))
        raise _Called

    if rename.where == "curvlib.block_eigsh":
        monkeypatch.setattr(blocks_module, "_block_eigsh_jit", record)
    elif rename.where == "curvlib.landscape.k_curve":
        config = curve_module._config
        monkeypatch.setattr(curve_module, "_config",
                            lambda *a, **kw: record(config(*a, **kw)))
    elif rename.where == "curvlib.inverse_matvec" and rename.new.startswith("eigsh="):
        monkeypatch.setattr(eigen_module, "eigsh", record)
    else:
        wrapper = _innermost_renaming_wrapper(_public(rename.where))
        monkeypatch.setattr(wrapper, "__wrapped__", record)


def _same_call(a, b):
    """Equal positional and keyword arguments (arrays compared by value)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, (jax.Array, np.ndarray)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x is y or x == y


@pytest.mark.parametrize("rename", RENAMES, ids=[f"{r.where}:{r.old}" for r in RENAMES])
def test_every_rename_warns_and_makes_the_new_spelling_s_call(rename, monkeypatch):
    """The old keyword reaches the implementation as exactly the call the new spelling makes
    (so every answer is the new spelling's); the functions built on an algorithm are also run
    end to end with their old keywords against dense oracles below."""
    value = _value(rename)
    base = _base(rename)
    calls = []
    _stand_in(monkeypatch, rename, calls)
    with pytest.raises(_Called):
        base(**_new_kwargs(rename, value))
    short = re.escape(f"`{rename.old}` is deprecated in {rename.where}()")
    with pytest.warns(DeprecationWarning, match=short) as record, pytest.raises(_Called):
        base(**{rename.old: value})
    text = " ".join(str(w.message) for w in record)
    assert re.sub(r"\W", "", rename.new.split("(")[-1]) in re.sub(r"\W", "", text)
    # attributed to the caller's line (here), however many wrappers lie between: Python's
    # default filters show a DeprecationWarning only when it names the user's own code
    assert {w.filename for w in record} == {__file__}
    assert len(calls) == 2
    _same_call(calls[1], calls[0])


def test_every_renamed_function_has_a_case_and_the_changelog_lists_every_rename():
    assert {r.where for r in RENAMES} <= set(BASE)
    assert {r.where for r in RENAMES} >= {w for w in BASE if ":" not in w}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    for r in RENAMES:
        name = r.where.rsplit(".", 1)[-1]
        lines = [ln for ln in changelog.splitlines()
                 if re.search(rf"\b{name}\b", ln) and f"`{r.old}`" in ln]
        assert lines, f"CHANGELOG.md does not list {r.where}({r.old}=...)"


def test_old_and_new_name_together_is_an_error():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="pass `rtol` only"):
        curvlib.eigsh(MV, V0, 2, tol=1e-6, rtol=1e-7)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError,
                                                         match="two values for `basis_size`"):
        ls.curvature_subspace(lsq, W, (X, Y), 4, 2, key=jax.random.PRNGKey(0), basis_size=5,
                              num_matvecs=6)


def test_a_value_given_twice_is_a_conflict_not_a_silent_choice():
    # an old option and the solver value's own field, two old names of one field, or a new
    # name given by position: an error naming both (a TypeError, as Python's own "multiple
    # values", and a ValueError, as before). The old option was merged and won; two old
    # names kept the last keyword's value
    conflict = (TypeError, ValueError)
    cases = [
        (lambda: curvlib.newton_cg(cg=CG(rtol=0.1), cg_rtol=1e-3), "`rtol` twice"),
        (lambda: curvlib.inverse_matvec(MV, damping=0.5, cg=CG(rtol=1e-2), rtol=1e-10),
         "`rtol` twice"),
        (lambda: curvlib.block_eigsh(BMV, P2, 2, key=jax.random.PRNGKey(0), num_matvecs=5,
                                     basis_size=4), "two values for `basis_size`"),
        (lambda: curvlib.block_eigsh(BMV, P2, 2, key=jax.random.PRNGKey(0),
                                     eigsh=Eigsh(basis_size=6), basis_size=4),
         "`basis_size` twice"),
        (lambda: ls.k_curve(lsq, W, (X, Y), [4], dims=[2], sigmas=[0.1],
                            key=jax.random.PRNGKey(0), eigsh=Eigsh(rtol=1e-3), tol=1e-6),
         "`rtol` twice"),
        (lambda: curvlib.eigsh(MV, V0, 2, tol=1e-9, rtol=1e-8), "got both `tol`"),
        (lambda: ls.delta1(lsq, W, (X, Y), 4, k=5), "got both `k`"),
    ]
    for call, match in cases:
        with pytest.warns(DeprecationWarning), pytest.raises(conflict, match=match) as err:
            call()
        assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)
    # not a conflict: the value leaves the field at a default (the class's or the
    # function's own), or sets it to the same value; the old option fills it
    with pytest.warns(DeprecationWarning):
        assert curvlib.inverse_matvec(MV, damping=0.5, cg=CG(rtol=1e-10), rtol=1e-10).rtol \
            == 1e-10
        assert curvlib.inverse_matvec(MV, damping=0.5, cg=CG(max_steps=7), rtol=1e-9).rtol \
            == 1e-9
        curvlib.newton_cg(cg=CG(max_steps=5), cg_rtol=1e-3)
        curvlib.block_eigsh(BMV, P2, 2, key=jax.random.PRNGKey(0), num_matvecs=5,
                            basis_size=5)


@pytest.mark.parametrize("factory, kw", [
    (curvlib.newton_cg, dict(learning_rate=1.0)),
    (curvlib.newton, dict(learning_rate=1.0)),
    (curvlib.scale_by_newton_cg, {}),
])
def test_an_old_name_injected_with_the_new_one_at_its_default(factory, kw):
    # optax.inject_hyperparams binds the signature and fills in every default, the new
    # name's included: that is not the new name given twice
    def steps(**mode):
        with pytest.warns(DeprecationWarning) if "hvp_mode" in mode else _no_warning():
            tx = optax.inject_hyperparams(factory)(**kw, **mode)
            state = tx.init(V0)
            u, _ = tx.update(jax.grad(quad)(V0), state, V0, value_fn=quad)
        return u

    np.testing.assert_array_equal(steps(hvp_mode="fwd-rev"), steps(mode="fwd-rev"))


def _no_warning():
    import contextlib  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    @contextlib.contextmanager
    def ctx():
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            yield
    return ctx()


def test_the_warning_names_the_user_s_line_through_jax_and_optax():
    import warnings  # noqa: PLC0415

    def where(call):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        dep = [w for w in seen if issubclass(w.category, DeprecationWarning)]
        assert dep, "no DeprecationWarning"
        return {(pathlib.Path(w.filename).name, w.lineno) for w in dep}

    line = inspect.currentframe().f_lineno
    jitted = where(lambda: jax.jit(curvlib.eigsh, static_argnames="k")(MV, V0, k=2, tol=1e-6))
    tx = optax.inject_hyperparams(curvlib.newton_cg)(learning_rate=1.0, cg_rtol=1e-3)
    injected = where(lambda: tx.init(V0))  # (the factory runs at init)

    def imported():
        from curvlib import StochasticEstimate  # noqa: F401, PLC0415
    imported_at = inspect.getsourcelines(imported)[1] + 1
    here = pathlib.Path(__file__).name
    assert jitted == {(here, line + 1)}
    assert injected == {(here, line + 3)}
    assert where(imported) == {(here, imported_at)}


def test_an_injected_moved_option_that_fixes_a_shape_names_its_own_static_arg():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError,
                                                         match=r"static_args=\('max_cg_steps',\)"):
        optax.inject_hyperparams(curvlib.newton_cg)(learning_rate=1.0, max_cg_steps=3).init(V0)
    # CG's own cap may be traced: the old `max_steps` of inverse_matvec still is, under jit
    b = jnp.ones(12)
    with pytest.warns(DeprecationWarning):
        res = jax.jit(lambda ms, b: curvlib.inverse_matvec(MV, damping=1.0, max_steps=ms)
                      .solve(b))(3, b)
    assert int(res.num_matvecs) <= 4 and not bool(res.converged)  # (3 steps, the check)


def test_tools_that_bind_by_signature_still_accept_the_old_names():
    # optax.inject_hyperparams binds the factory's signature: the old keyword is advertised
    # there (keyword-only, "not given") for the release it is deprecated in
    params = inspect.signature(curvlib.track_curvature).parameters
    assert params["tol"].default is _deprecation.NOT_GIVEN
    with pytest.warns(DeprecationWarning, match="`tol` is deprecated"):
        tx = optax.inject_hyperparams(curvlib.track_curvature,
                                      static_args=("k", "num_probes"))(
            every=1, k=2, key=jax.random.PRNGKey(0), tol=1e-9, num_probes=0)
        state = tx.init(V0)
        _, state = jax.jit(lambda s: tx.update(V0, s, V0, value_fn=quad))(state)
    np.testing.assert_allclose(state.hyperparams["tol"], 1e-9)
    np.testing.assert_allclose(curvlib.curvature_info(state.inner_state).eigenvalues,
                               _D[::-1][:2], rtol=1e-7)


# ------------------------------------------------------------------ solver values


def test_solver_values_are_immutable_hashable_pytrees_with_static_options():
    e = Eigsh(rtol=1e-6, basis_size=10)
    assert e == Eigsh(rtol=1e-6, basis_size=10) and hash(e) == hash(Eigsh(rtol=1e-6,
                                                                         basis_size=10))
    with pytest.raises(dataclasses.FrozenInstanceError, match="rtol"):
        e.rtol = 1.0
    leaves, tree = jax.tree.flatten(e)
    assert leaves == [1e-6, 1000]  # rtol, max_restarts (max_matvecs None): traceable
    assert jax.tree.leaves(CG()) == [1e-5, 0.0] and jax.tree.leaves(Lanczos(5)) == []
    assert jax.tree.unflatten(tree, leaves) == e
    # a traced tolerance: one program for every rtol; the static basis size is the cache key
    traces = []

    def top(s):
        traces.append(1)
        return curvlib.eigsh(MV, V0, 2, solver=s).eigenvalues

    f = jax.jit(top)
    for rtol in (1e-6, 1e-9):
        np.testing.assert_allclose(f(Eigsh(rtol=rtol, basis_size=10)), _D[::-1][:2],
                                   rtol=1e-5)
    assert len(traces) == 1
    f(Eigsh(rtol=1e-9, basis_size=11))
    assert len(traces) == 2


@pytest.mark.parametrize("make, match", [
    (lambda: Eigsh(rtol=-1.0), r"`rtol` must be >= 0; got -1.0"),
    (lambda: Eigsh(rtol="tight"), r"`rtol` must be a real number >= 0; got 'tight'"),
    (lambda: Eigsh(basis_size=0), r"`basis_size` must be >= 1; got 0"),
    (lambda: Eigsh(basis_size=2.5), r"`basis_size` must be an int; got 2.5"),
    (lambda: Eigsh(num_keep=0), r"`num_keep` must be >= 1; got 0"),
    (lambda: Eigsh(max_matvecs=0), r"`max_matvecs` must be >= 1; got 0"),
    (lambda: Eigsh(max_restarts=-1), r"`max_restarts` must be >= 0; got -1"),
    (lambda: CG(rtol=float("nan")), r"`rtol` must be finite and >= 0; got nan"),
    (lambda: CG(atol=-1e-3), r"`atol` must be >= 0; got -0.001"),
    (lambda: CG(max_steps=0), r"`max_steps` must be >= 1; got 0"),
    (lambda: PowerIteration(num_iters=0), r"`num_iters` must be >= 1; got 0"),
    (lambda: PowerIteration(max_matvecs=True), r"`max_matvecs` must be an int; got True"),
    (lambda: Lanczos(0), r"`num_matvecs` must be >= 1; got 0"),
    (lambda: Lanczos(5, reortho="partial"), r"`reortho` must be one of \('full', 'none'\)"),
    # problem-dependent limits are checked where the problem is known, naming the option
    (lambda: curvlib.eigsh(MV, V0, 2, solver=Eigsh(basis_size=3)),
     r"`basis_size` must be in \[4, 12\]"),
    (lambda: curvlib.track_curvature(1, 2, key=jax.random.PRNGKey(0), eigsh=CG()),
     r"`eigsh` must be a curvlib.Eigsh; got CG"),
    (lambda: curvlib.newton_cg(cg=Eigsh()), r"`cg` must be a curvlib.CG; got Eigsh"),
])
def test_validation_messages_name_the_option(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_the_algorithms_take_their_value_or_its_fields_alike():
    want = np.linalg.eigvalsh(np.asarray(A))[::-1][:3]
    a = curvlib.eigsh(MV, V0, 3, solver=Eigsh(rtol=1e-10, basis_size=9))
    b = curvlib.eigsh(MV, V0, 3, rtol=1e-10, basis_size=9)
    c = curvlib.eigsh(MV, V0, 3, solver=Eigsh(rtol=1e-3), rtol=1e-10, basis_size=9)  # override
    for r in (a, b, c):
        np.testing.assert_allclose(r.eigenvalues, want, rtol=1e-9)
    assert int(a.num_matvecs) == int(b.num_matvecs) == int(c.num_matvecs)
    x = np.linalg.solve(np.asarray(A), np.ones(12))
    np.testing.assert_allclose(curvlib.cg(MV, V0, solver=CG(rtol=1e-12)).x, x, rtol=1e-9)
    np.testing.assert_allclose(curvlib.cg(MV, V0, rtol=1e-12).x, x, rtol=1e-9)
    p = curvlib.power_iteration(MV, V0, 1, solver=PowerIteration(rtol=1e-10, num_iters=2000))
    np.testing.assert_allclose(p.eigenvalues, want[:1], rtol=1e-9)
    lz = curvlib.lanczos(MV, V0, solver=Lanczos(12))
    np.testing.assert_allclose(np.linalg.eigvalsh(_tridiag(lz))[::-1][:3], want, rtol=1e-9)


def _tridiag(lz):
    return np.diag(lz.alphas) + np.diag(lz.betas, 1) + np.diag(lz.betas, -1)


# --------------------------------------- built-on functions: dense oracles and old keywords


def _hk(k):  # Hessian of L_k for lsq
    x = np.asarray(X[:k])
    return 2.0 * x.T @ x / k


def test_built_on_eigensolvers_match_the_dense_oracle_and_their_old_keywords():
    e = Eigsh(rtol=1e-11, basis_size=8, max_restarts=200)
    want = np.linalg.eigvalsh(np.asarray(A))[::-1][:2]
    np.testing.assert_allclose(_track(eigsh=e), want, rtol=1e-9)
    with pytest.warns(DeprecationWarning):
        old = _track(tol=1e-11, basis_size=8, max_restarts=200)
    # (the old keywords fold into the tracker's own default, Eigsh(verify=False))
    np.testing.assert_array_equal(old, _track(eigsh=dataclasses.replace(e, verify=False)))

    e = Eigsh(rtol=1e-11, basis_size=6, max_restarts=200)  # N = 6 parameters
    sub = ls.curvature_subspace(lsq, W, (X, Y), 5, 2, key=jax.random.PRNGKey(0), eigsh=e)
    np.testing.assert_allclose(sub.eigenvalues, np.linalg.eigvalsh(_hk(5))[::-1][:2],
                               rtol=1e-9)
    with pytest.warns(DeprecationWarning):
        old = ls.curvature_subspace(lsq, W, (X, Y), k=5, dim=2, key=jax.random.PRNGKey(0),
                                    tol=1e-11, basis_size=6, max_restarts=200)
    np.testing.assert_array_equal(old.eigenvalues, sub.eigenvalues)

    kw = dict(dims=[2], sigmas=[0.1], key=jax.random.PRNGKey(0), progress=False,
              next_subspace=False)
    curve = ls.k_curve(lsq, W, (X, Y), [4, 6], eigsh=Eigsh(rtol=1e-11, basis_size=6), **kw)
    for i, k in enumerate([4, 6]):
        np.testing.assert_allclose(curve.eigenvalues[i], np.linalg.eigvalsh(_hk(k))[::-1][:2],
                                   rtol=1e-9)
    with pytest.warns(DeprecationWarning):
        old = ls.k_curve(lsq, W, (X, Y), [4, 6], tol=1e-11, basis_size=6, **kw)
    np.testing.assert_array_equal(old.eigenvalues, curve.eigenvalues)

    blocks = curvlib.block_eigsh(BMV, P2, 2, key=jax.random.PRNGKey(0),
                                 eigsh=Eigsh(rtol=1e-11, basis_size=5))
    for name, s in SCALE.items():
        got = [v for n, v in blocks.items() if name in n][0].eigenvalues
        np.testing.assert_allclose(got, np.sort(np.asarray(s))[::-1][:2], rtol=1e-9)
    with pytest.warns(DeprecationWarning):
        old = curvlib.block_eigsh(BMV, P2, 2, key=jax.random.PRNGKey(0), tol=1e-11,
                                  basis_size=5)
    for n in blocks:
        np.testing.assert_array_equal(old[n].eigenvalues, blocks[n].eigenvalues)


def test_built_on_solvers_match_the_dense_oracle_and_their_old_keywords():
    lam = 0.5
    dense = np.asarray(A) + lam * np.eye(12)
    inv = curvlib.inverse_matvec(MV, damping=lam, cg=CG(rtol=1e-12, max_steps=60))
    np.testing.assert_allclose(inv(V0), np.linalg.solve(dense, np.ones(12)), rtol=1e-9)
    with pytest.warns(DeprecationWarning):
        old = curvlib.inverse_matvec(MV, damping=lam, rtol=1e-12, max_steps=60)
    np.testing.assert_array_equal(old(V0), inv(V0))
    # low rank: exact on the span of the top-3 eigenvectors of A
    vals, vecs = np.linalg.eigh(np.asarray(A))
    u = vecs[:, -3:]
    low = curvlib.inverse_matvec(MV, damping=lam, method="lowrank", rank=3, v0=V0,
                                 eigsh=Eigsh(rtol=1e-12))
    b = u @ np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(low(jnp.asarray(b)), np.linalg.solve(dense, b), rtol=1e-8)
    with pytest.warns(DeprecationWarning):
        old = curvlib.inverse_matvec(MV, damping=lam, method="lowrank", rank=3, v0=V0,
                                     tol=1e-12)
    np.testing.assert_array_equal(old(jnp.asarray(b)), low(jnp.asarray(b)))

    # newton_cg's inner CG: an exact solve makes one undamped step the Newton step A^{-1} g
    g = np.asarray(jax.grad(quad)(V0))
    cg = CG(rtol=1e-13, max_steps=40)
    u = _step(curvlib.scale_by_newton_cg, damping=0.0, cg=cg)
    np.testing.assert_allclose(u, np.linalg.solve(np.asarray(A), g), rtol=1e-8)
    with pytest.warns(DeprecationWarning):
        old = _step(curvlib.scale_by_newton_cg, damping=0.0, cg_rtol=1e-13, max_cg_steps=40)
    np.testing.assert_array_equal(old, u)


def test_a_moved_option_alone_keeps_the_function_s_own_solver_default():
    # newton_cg's inner CG defaults to the truncated-Newton CG(rtol=0.5): the deprecated
    # `max_cg_steps` alone caps the steps of *that* solve (it used to start from CG(), so
    # the forcing term silently became rtol=1e-5), and the warning spells the kept rtol
    for make in (curvlib.scale_by_newton_cg, curvlib.newton_cg):
        new = _step(make, damping=0.0, cg=CG(rtol=0.5, max_steps=20))
        with pytest.warns(DeprecationWarning, match=r"cg=curvlib.CG\(rtol=0.5, max_steps="):
            old = _step(make, damping=0.0, max_cg_steps=20)
        np.testing.assert_array_equal(old, new)
        # the old spelling of the old default, given in full, is the same step
        with pytest.warns(DeprecationWarning):
            full = _step(make, damping=0.0, max_cg_steps=20, cg_rtol=0.5)
        np.testing.assert_array_equal(full, new)
        # an exact CG would differ on this problem: the test can tell the two apart
        exact = _step(make, damping=0.0, cg=CG(max_steps=20))
        assert not np.allclose(exact, new)
        # `inject_hyperparams` passes every default explicitly (`cg=` and the old keywords'
        # `None`): the same step, and the same advice (it dropped the kept `rtol=0.5`, and
        # the advice followed gave the exact CG's step)
        injected = optax.inject_hyperparams(make, static_args=("max_cg_steps",))
        with pytest.warns(DeprecationWarning, match=r"cg=curvlib.CG\(rtol=0.5, max_steps="):
            np.testing.assert_array_equal(_step(injected, damping=0.0, max_cg_steps=20), new)
    # the advice keeps what an explicit solver value sets beside the moved option
    with pytest.warns(DeprecationWarning, match=r"cg=curvlib.CG\(rtol=0.1, max_steps="):
        _step(curvlib.newton_cg, cg=CG(rtol=0.1), max_cg_steps=20)


def test_built_on_functions_default_to_the_solver_value_s_defaults():
    # the signature default: None, meaning `Eigsh()` / `CG()`; the documented exceptions are
    # the truncated-Newton inner solve (a forcing-term cap, CG(rtol=0.5)) and the tracker's
    # warm-started refreshes (no verification round, Eigsh(verify=False))
    for fn, arg in [(ls.curvature_subspace, "eigsh"),
                    (curvlib.block_eigsh, "eigsh"), (curvlib.inverse_matvec, "eigsh"),
                    (curvlib.inverse_matvec, "cg"), (curvlib.eigsh, "solver"),
                    (curvlib.cg, "solver"), (curvlib.power_iteration, "solver"),
                    (curvlib.lanczos, "solver")]:
        assert inspect.signature(fn).parameters[arg].default is None, (fn, arg)
    assert ls.KCurveConfig().eigsh is None
    for fn in (curvlib.newton_cg, curvlib.scale_by_newton_cg):
        assert inspect.signature(fn).parameters["cg"].default == CG(rtol=0.5)
        assert hessian_free.TRUNCATED_CG == dataclasses.replace(CG(), rtol=0.5)
    assert inspect.signature(curvlib.track_curvature).parameters["eigsh"].default == Eigsh(
        verify=False)
    # no public signature re-defaults a solver option: the knobs left on the algorithms
    # default to None ("the value's default")
    knobs = {f.name for c in (Eigsh, CG, PowerIteration, Lanczos) for f in dataclasses.fields(c)}
    knobs |= {"tol", "cg_rtol", "max_cg_steps"}
    for name in sorted(set(curvlib.__all__) | {f"landscape.{n}" for n in ls.__all__}):
        fn = getattr(ls, name.split(".")[1]) if "." in name else getattr(curvlib, name)
        if not callable(fn) or isinstance(fn, type):
            continue
        for p in inspect.signature(fn).parameters.values():
            if p.name in knobs and p.default is not inspect.Parameter.empty:
                assert p.default in (None, _deprecation.NOT_GIVEN), (name, p.name, p.default)
    # and the behaviour: the same products and answers as the explicit default value
    a = ls.curvature_subspace(lsq, W, (X, Y), 5, 2, key=jax.random.PRNGKey(0))
    b = ls.curvature_subspace(lsq, W, (X, Y), 5, 2, key=jax.random.PRNGKey(0), eigsh=Eigsh())
    assert int(a.num_matvecs) == int(b.num_matvecs)
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    np.testing.assert_array_equal(_track(), _track(eigsh=Eigsh(verify=False)))
    np.testing.assert_array_equal(_track(eigsh=None), _track(eigsh=Eigsh(verify=False)))
    assert Eigsh().max_restarts == 1000 and Eigsh().rtol is None and CG().rtol == 1e-5
    assert PowerIteration().rtol == 1e-4


def test_conventions_page_has_one_table_and_the_symbol_map():
    text = (ROOT / "docs" / "conventions.md").read_text()
    assert text.count("| concept |") == 1
    for name in ("`rtol`", "`num_matvecs`", "`basis_size`", "`max_restarts`", "`mode`",
                 "`num_examples`", "`num_samples`", "`dim`", "`eigsh=`", "`cg=`",
                 "`solver=`"):
        assert name in text, name
    assert "conventions.md" in (ROOT / "mkdocs.yml").read_text()
