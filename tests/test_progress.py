"""`curvlib.show_progress`: eager host-driven solves report products, budget and residuals.

The bar is tqdm's, written to stderr; the answers with the bar on equal the fused
program's (the host-driven path is the same algorithm) and nothing is shown inside
``jax.jit`` or with the bar off.
"""

import builtins

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib


@pytest.fixture
def progress():
    curvlib.show_progress(True)
    try:
        yield
    finally:
        curvlib.show_progress(False)


def _problem(n=60, seed=0):
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    d = np.linspace(1.0, 10.0, n)
    A = jnp.asarray(Q @ np.diag(d) @ Q.T)
    return (lambda v: A @ v), jnp.asarray(rng.standard_normal(n)), d


def test_eager_eigsh_shows_products_budget_and_residual(progress, capsys):
    """One bar: ``eigsh``, the products used out of ``max_matvecs``, the verification rounds
    and the worst relative residual; the answer is the fused program's (and ``eigh``'s)."""
    mv, v0, d = _problem()
    res = curvlib.eigsh(mv, v0, 3, max_matvecs=500)
    err = capsys.readouterr().err
    n = int(res.num_matvecs)
    assert "eigsh" in err and f"{n}/500" in err and "worst residual=" in err, err[-400:]
    assert "rounds=" in err
    curvlib.show_progress(False)
    fused = curvlib.eigsh(mv, v0, 3, max_matvecs=500)
    assert capsys.readouterr().err == ""
    np.testing.assert_allclose(np.asarray(res.eigenvalues), np.asarray(fused.eigenvalues),
                               rtol=1e-12)
    np.testing.assert_allclose(np.asarray(res.eigenvalues), d[::-1][:3], rtol=1e-9)
    assert int(res.num_matvecs) == int(fused.num_matvecs)
    assert bool(res.converged) and bool(fused.converged)


def test_algorithms_without_a_bar_keep_their_usual_path(progress, capsys):
    """``lanczos`` draws no bar: with progress on it is not diverted to its host-driven path
    (which would show nothing and skip the fused program), and its answer is unchanged."""
    from curvlib.krylov import _driver

    def host_steps():  # steps compiled, run, or run on NumPy
        info = _driver._host_steps.cache_info()
        return info.hits + info.misses + _driver.HOST_STEPS[0]

    mv, v0, _ = _problem(30, seed=2)
    before = host_steps()
    res = curvlib.lanczos(mv, v0, 8)
    assert capsys.readouterr().err == ""
    assert host_steps() == before  # (the suite compiles in front: the fused program answered)
    curvlib.eigsh(mv, v0, 2)  # while eigsh, which draws one, takes the host-driven path
    assert host_steps() > before
    curvlib.show_progress(False)
    np.testing.assert_allclose(np.asarray(res.alphas),
                               np.asarray(curvlib.lanczos(mv, v0, 8).alphas), rtol=1e-13)


def test_nothing_is_shown_inside_jit(progress, capsys):
    mv, v0, d = _problem(40, seed=1)
    res = jax.jit(lambda v: curvlib.eigsh(mv, v, 2))(v0)
    assert capsys.readouterr().err == ""
    np.testing.assert_allclose(np.asarray(res.eigenvalues), d[::-1][:2], rtol=1e-9)


def test_streamed_products_show_their_batches(progress, capsys):
    """A streamed Hessian product shows one pass over the batches; the product equals the
    in-memory one over the whole data set."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((24, 3)), rng.standard_normal(24)
    loss = lambda w, b: 0.5 * jnp.mean((jnp.tanh(b[0] @ w) - b[1]) ** 2)
    w = jnp.asarray(rng.standard_normal(3))
    batches = lambda: ((jnp.asarray(x[i:i + 8]), jnp.asarray(y[i:i + 8])) for i in (0, 8, 16))
    H = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss, p, b), w, batches)
    v = jnp.asarray([1.0, -2.0, 0.5])
    got = H(v)
    err = capsys.readouterr().err
    # one bar per pass, cleared when the pass ends (tqdm redraws at its own pace)
    assert "a streamed product:" in err and "batch/s" in err, err[-400:]
    full = curvlib.hessian_matvec(loss, w, (jnp.asarray(x), jnp.asarray(y)))(v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), rtol=1e-12)


def test_off_by_default_and_needs_tqdm(monkeypatch):
    assert curvlib.show_progress() is False
    real = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm" or name.startswith("tqdm."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with pytest.raises(ImportError, match="needs tqdm"):
        curvlib.show_progress(True)
    assert curvlib.show_progress() is False


@pytest.mark.parametrize("switch", ["show_progress", "compile_behind"])
def test_a_switch_returns_the_setting_it_replaces(switch):
    """``was = switch(x)`` ... ``switch(was)`` restores the setting, whatever it was."""
    flip = getattr(curvlib, switch)
    start = flip()
    assert flip() is start  # reading changes nothing
    was = flip(not start)
    assert was is start and flip() is (not start)
    assert flip(was) is (not start)
    assert flip() is start
