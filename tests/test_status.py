"""One status convention: every result and transform Info reports the same four fields.

Oracles: dense linear algebra (``numpy.linalg``) for the answers, designed spectra for the
situations (a budget too small, a NaN operator, an indefinite system, an invariant subspace).
"""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvlib
from curvlib import CurvatureError, Status, raise_if_failed
from curvlib import landscape as ls

N = 12


def _spd(n=N, seed=0, cond=10.0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.geomspace(1.0, cond, n)
    return jnp.asarray((Q * ev) @ Q.T), ev


def _op(A):
    return lambda v: A @ v


def _nan_op(v):
    return jnp.full_like(v, jnp.nan)


def _check_fields(r):
    for name in ("converged", "finite", "num_matvecs", "status"):
        assert hasattr(r, name), (type(r).__name__, name)
    assert jnp.asarray(r.converged).dtype == jnp.bool_, type(r).__name__
    assert jnp.asarray(r.finite).dtype == jnp.bool_, type(r).__name__
    assert jnp.asarray(r.num_matvecs).dtype == jnp.int32, type(r).__name__
    assert jnp.asarray(r.status).dtype == jnp.int32, type(r).__name__
    assert jnp.shape(r.status) == ()


def _algorithms(A, key):
    v = jnp.ones(A.shape[0])
    inv = curvlib.inverse_matvec(_op(A), damping=0.1)
    return {
        "eigsh": curvlib.eigsh(_op(A), v, 2),
        "lanczos": curvlib.lanczos(_op(A), v, 4),
        "power_iteration": curvlib.power_iteration(_op(A), v, 1),
        "cg": curvlib.cg(_op(A), v),
        "hutchinson_trace": curvlib.hutchinson_trace(_op(A), v, key, 6),
        "hutchinson_diag": curvlib.hutchinson_diag(_op(A), v, key, 4),
        "spectral_density": curvlib.spectral_density(_op(A), v, key, num_matvecs=4,
                                                     num_probes=2),
        "check_symmetric": curvlib.check_symmetric(_op(A), v, key),
        "inverse_solve": inv.solve(v),
        "delta2_quadratic_mc": ls.delta2_quadratic_mc(
            jnp.asarray(0.1), jnp.ones(3), jnp.eye(3), 0.5, key=key, num_samples=8),
    }


def test_every_algorithm_result_has_the_four_fields():
    A, _ = _spd()
    for name, r in _algorithms(A, jax.random.PRNGKey(0)).items():
        _check_fields(r)
        assert int(r.status) == Status.SUCCESS, name
        assert bool(r.converged) and bool(r.finite), name


def test_num_matvecs_counts_products():
    A, _ = _spd()
    v, key = jnp.ones(N), jax.random.PRNGKey(0)
    assert int(curvlib.lanczos(_op(A), v, 5).num_matvecs) == 5
    assert int(curvlib.check_symmetric(_op(A), v, key, num_pairs=3).num_matvecs) == 6
    sd = curvlib.spectral_density(_op(A), v, key, num_matvecs=4, num_probes=3)
    assert int(sd.num_matvecs) == 12
    tr = curvlib.hutchinson_trace(_op(A), v, key, 9)
    assert int(tr.num_matvecs) == int(tr.num_evaluations) == 9 and int(tr.num_samples) == 9
    mc = ls.delta2_quadratic_mc(jnp.asarray(0.1), jnp.ones(3), jnp.eye(3), 0.5,
                                key=key, num_samples=8)
    assert int(mc.num_matvecs) == 0 and int(mc.num_evaluations) == 16  # antithetic pairs
    assert int(mc.num_samples) == 8


# ------------------------------------------------------------ oracle situations


def test_eigsh_statuses():
    A, ev = _spd(cond=100.0)
    v = jnp.ones(N)
    ok = curvlib.eigsh(_op(A), v, 2)
    np.testing.assert_allclose(ok.eigenvalues, ev[::-1][:2], rtol=1e-6)
    assert int(ok.status) == Status.SUCCESS
    short = curvlib.eigsh(_op(A), v, 2, basis_size=4, max_matvecs=3)
    assert not bool(short.converged) and int(short.status) == Status.MAX_STEPS
    bad = curvlib.eigsh(_nan_op, v, 2)
    assert not bool(bad.finite) and int(bad.status) == Status.NONFINITE


def test_cg_statuses():
    A, _ = _spd(cond=1e4)
    b = jnp.arange(1.0, N + 1.0)
    ok = curvlib.cg(_op(A), b, rtol=1e-10)
    np.testing.assert_allclose(ok.x, np.linalg.solve(np.asarray(A), np.asarray(b)), rtol=1e-6)
    assert int(ok.status) == Status.SUCCESS
    short = curvlib.cg(_op(A), b, rtol=1e-10, max_steps=2)
    assert int(short.status) == Status.MAX_STEPS and not bool(short.converged)
    indefinite = jnp.diag(jnp.linspace(-1.0, 2.0, N))
    neg = curvlib.cg(_op(indefinite), b)
    assert bool(neg.negative_curvature) and int(neg.status) == Status.NEGATIVE_CURVATURE
    assert int(curvlib.cg(_nan_op, b).status) == Status.NONFINITE


def test_lanczos_breakdown_is_a_status_only_when_it_is_not_recovered():
    d = jnp.arange(1.0, N + 1.0)
    e0 = jnp.zeros(N).at[0].set(1.0)  # an eigenvector: K(A, e0) is invariant after one step
    full = curvlib.lanczos(lambda v: d * v, e0, 4)
    # a fresh direction continued the recursion: Q is orthonormal and A Q^T = Q^T T + r e_m^T
    T = np.diag(full.alphas) + np.diag(full.betas, 1) + np.diag(full.betas, -1)
    Q = np.asarray(full.basis)
    assert abs(float(full.alphas[0]) - 1.0) < 1e-12 and abs(float(full.betas[0])) < 1e-12
    np.testing.assert_allclose(Q @ Q.T, np.eye(4), atol=1e-12)
    E = np.diag(np.asarray(d)) @ Q.T - Q.T @ T
    E[:, -1] -= np.asarray(full.residual)
    assert np.abs(E).max() < 1e-12
    assert bool(full.breakdown) and bool(full.converged)
    assert int(full.status) == Status.SUCCESS
    plain = curvlib.lanczos(lambda v: d * v, e0, 4, reortho="none")
    assert bool(plain.breakdown) and not bool(plain.converged)
    assert int(plain.status) == Status.BREAKDOWN
    generic = curvlib.lanczos(lambda v: d * v, jnp.ones(N), 4, reortho="none")
    assert not bool(generic.breakdown) and int(generic.status) == Status.SUCCESS
    assert int(curvlib.lanczos(_nan_op, jnp.ones(N), 4).status) == Status.NONFINITE


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_power_iteration_reports_a_rank_below_k_as_a_breakdown(dt):
    # a dense rank-one (and rank-two) operator, more pairs asked than its rank: the product
    # of a null direction is rounding noise; deflated against its own norm it looked like
    # a direction, and the iteration spent its whole budget, then said MAX_STEPS
    rng = np.random.default_rng(2)
    U = np.linalg.qr(rng.standard_normal((N, 2)))[0]
    for vals in ([3.0], [3.0, -2.0]):
        A = jnp.asarray((U[:, :len(vals)] * vals) @ U[:, :len(vals)].T, dt)
        k = len(vals) + 1
        r = curvlib.power_iteration(_op(A), jnp.asarray(rng.standard_normal(N), dt), k=k)
        assert int(r.status) == Status.BREAKDOWN and bool(r.finite)
        assert np.asarray(r.converged).tolist() == [True] * len(vals) + [False]
        assert int(r.num_matvecs) < 50  # (100 per pair before)
        np.testing.assert_allclose(np.asarray(r.eigenvalues[:-1], np.float64), vals,
                                   rtol=1e-5)
        assert abs(float(r.eigenvalues[-1])) < 1e-5  # about zero, its vector orthogonal
        X = np.asarray(r.eigenvectors, np.float64)
        np.testing.assert_allclose(X @ X.T, np.eye(k), atol=1e-5)


def test_power_iteration_status_summarises_every_pair():
    d = jnp.asarray([10.0, 1.0] + list(np.linspace(0.9, 0.1, N - 2)))
    ok = curvlib.power_iteration(lambda v: d * v, jnp.ones(N), 2, rtol=1e-6, max_matvecs=3000)
    np.testing.assert_allclose(ok.eigenvalues, [10.0, 1.0], rtol=1e-6)
    assert bool(jnp.all(ok.converged)) and int(ok.status) == Status.SUCCESS
    # the budget covers the first pair only: one pair converged, the status says the run did not
    short = curvlib.power_iteration(lambda v: d * v, jnp.ones(N), 2, rtol=1e-6, max_matvecs=40)
    assert bool(short.converged[0]) and not bool(short.converged[1])
    assert int(short.status) == Status.MAX_STEPS


def test_nonfinite_operators_give_nonfinite_status_everywhere():
    v, key = jnp.ones(N), jax.random.PRNGKey(1)
    results = [
        curvlib.power_iteration(_nan_op, v, 1),
        curvlib.hutchinson_trace(_nan_op, v, key, 6),
        curvlib.hutchinson_diag(_nan_op, v, key, 3),
        curvlib.spectral_density(_nan_op, v, key, num_matvecs=4, num_probes=2),
        curvlib.check_symmetric(_nan_op, v, key),
        curvlib.inverse_matvec(_nan_op, damping=1.0).solve(v),
    ]
    for r in results:
        assert not bool(r.finite) and not bool(r.converged), type(r).__name__
        assert int(r.status) == Status.NONFINITE, type(r).__name__


def test_asymmetry_is_a_verdict_not_a_failure():
    A = jnp.triu(jnp.ones((N, N)))
    chk = curvlib.check_symmetric(_op(A), jnp.zeros(N), jax.random.PRNGKey(0))
    assert not bool(chk.symmetric) and int(chk.status) == Status.SUCCESS


def test_inverse_solve_reports_negative_curvature():
    indefinite = jnp.diag(jnp.linspace(-1.0, 2.0, N))
    inv = curvlib.inverse_matvec(_op(indefinite), damping=0.0)
    out = inv.solve(jnp.ones(N))
    assert int(out.status) == Status.NEGATIVE_CURVATURE and not bool(out.converged)


# ------------------------------------------------------------ raising, jit, vmap


def test_raise_if_failed():
    A, _ = _spd()
    ok = curvlib.cg(_op(A), jnp.ones(N))
    assert raise_if_failed(ok) is ok
    with pytest.raises(CurvatureError, match="CGResult failed: MAX_STEPS"):
        raise_if_failed(curvlib.cg(_op(A), jnp.ones(N), rtol=1e-12, max_steps=1))
    with pytest.raises(CurvatureError, match="EigshResult failed: NONFINITE"):
        raise_if_failed(curvlib.eigsh(_nan_op, jnp.ones(N), 1))
    neg = curvlib.cg(_op(jnp.diag(jnp.linspace(-1.0, 2.0, N))), jnp.ones(N))
    assert raise_if_failed(neg, allow=(Status.NEGATIVE_CURVATURE,)) is neg
    with pytest.raises(CurvatureError, match="MonteCarloEstimate failed: NONFINITE"):
        raise_if_failed(curvlib.hutchinson_trace(_nan_op, jnp.ones(N), jax.random.PRNGKey(0), 3))


def test_raise_if_failed_checks_each_block_of_block_eigsh():
    # block_eigsh returns a dict of results, one per block: raise_if_failed refused it
    # with a TypeError ("no status field")
    scale = {"a": jnp.linspace(1.0, 2.0, 6), "b": jnp.linspace(3.0, 5.0, 6)}
    ok = curvlib.block_eigsh(lambda v: jax.tree.map(jnp.multiply, scale, v),
                             jax.tree.map(jnp.ones_like, scale), 2, key=jax.random.PRNGKey(0))
    assert raise_if_failed(ok) is ok
    bad = {"a": scale["a"], "b": scale["b"].at[0].set(jnp.nan)}
    res = curvlib.block_eigsh(lambda v: jax.tree.map(jnp.multiply, bad, v),
                              jax.tree.map(jnp.ones_like, bad), 2, key=jax.random.PRNGKey(0))
    with pytest.raises(CurvatureError, match=r"\['b'\] EigshResult failed: NONFINITE") as e:
        raise_if_failed(res)
    assert e.value.result is res


def test_status_under_jit_and_vmap():
    A, _ = _spd()

    @jax.jit
    def solve(b, scale):
        return curvlib.cg(lambda v: scale * (A @ v), b)

    out = solve(jnp.ones(N), 1.0)
    assert isinstance(out.status, jax.Array) and int(out.status) == Status.SUCCESS
    batched = jax.vmap(solve)(jnp.ones((3, N)), jnp.asarray([1.0, jnp.nan, -1.0]))
    assert batched.status.dtype == jnp.int32
    assert batched.status.tolist() == [Status.SUCCESS, Status.NONFINITE,
                                       Status.NEGATIVE_CURVATURE]
    with pytest.raises(CurvatureError, match=r"\(2 of 3 entries\): NONFINITE"):
        raise_if_failed(batched)
    # the message of a batched status: the most serious code, and how many carry it
    assert curvlib.status_message(batched.status).startswith("NONFINITE (1 of 3 entries): ")
    lz = jax.jit(lambda v: curvlib.lanczos(_op(A), v, 3))(jnp.ones(N))
    assert isinstance(lz.num_matvecs, jax.Array) and int(lz.num_matvecs) == 3


# ------------------------------------------------------------ transforms


def _quadratic():
    A, _ = _spd(n=6, seed=3)
    return A, lambda p: 0.5 * p @ A @ p - jnp.sum(p)


def test_every_transform_info_has_the_four_fields():
    A, f = _quadratic()
    p = jnp.zeros(6)
    g = jax.grad(f)(p)
    infos = {}
    for name, tx in [("newton", curvlib.scale_by_newton()),
                     ("newton_cg", curvlib.scale_by_newton_cg()),
                     ("bfgs", curvlib.scale_by_bfgs())]:
        _, s = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, value_fn=f))(g, tx.init(p), p)
        infos[name] = s.info
    svrg = curvlib.scale_by_svrg(snapshot_every=2)
    _, s = svrg.update(g, svrg.init(p), p, value_fn=f, full_value_fn=f)
    infos["svrg"] = s.info
    tr = curvlib.track_curvature(1, 1, key=jax.random.PRNGKey(0), num_probes=0)
    _, s = tr.update(g, tr.init(p), p, value_fn=f)
    infos["track"] = curvlib.curvature_info(s)
    for name, info in infos.items():
        _check_fields(info)
        assert int(info.status) == Status.SUCCESS, name
    assert int(infos["newton"].num_matvecs) == 6  # one product per parameter: the dense matrix
    assert int(infos["bfgs"].num_matvecs) == 0 and int(infos["svrg"].num_matvecs) == 0
    # Newton-CG: CG's products (steps, plus its true residual) and one for the model decrease
    ncg = infos["newton_cg"]
    assert int(ncg.num_matvecs) >= int(ncg.num_steps) + 1


def test_transform_infos_report_nonfinite():
    _, f = _quadratic()
    p = jnp.full(6, jnp.nan)
    g = jnp.full(6, jnp.nan)
    for tx in (curvlib.scale_by_newton(), curvlib.scale_by_newton_cg(), curvlib.scale_by_bfgs()):
        _, s = tx.update(g, tx.init(jnp.zeros(6)), p, value_fn=f)
        assert bool(s.info.skipped) and not bool(s.info.finite)
        assert int(s.info.status) == Status.NONFINITE
        with pytest.raises(CurvatureError, match="failed: NONFINITE"):
            raise_if_failed(s.info)


def test_newton_cg_rejected_step_is_stalled():
    # a loss whose quadratic model is exact but whose trial point is worse: f has a kink
    f = lambda p: jnp.sum(p**2) + 100.0 * jnp.sum(jnp.abs(p - 0.5) > 0.25)
    tx = curvlib.scale_by_newton_cg(damping=1e-8)
    p = jnp.full(4, 0.5)  # the Newton step lands at 0, on the far side of the kink
    _, s = tx.update(jax.grad(f)(p), tx.init(p), p, value_fn=f)
    assert not bool(s.info.accepted) and bool(s.info.finite)
    assert int(s.info.status) == Status.STALLED


def test_renamed_info_fields_keep_their_old_names_with_a_warning():
    _, f = _quadratic()
    p = jnp.zeros(6)
    tx = curvlib.scale_by_newton_cg()
    _, s = tx.update(jax.grad(f)(p), tx.init(p), p, value_fn=f)
    with pytest.warns(DeprecationWarning, match="use `NewtonCGInfo.num_steps`"):
        old = s.info.num_cg_steps
    assert int(old) == int(s.info.num_steps) > 0
    tr = curvlib.track_curvature(1, 1, key=jax.random.PRNGKey(0), num_probes=0)
    _, s = tr.update(jax.grad(f)(p), tr.init(p), p, value_fn=f)
    info = curvlib.curvature_info(s)
    with pytest.warns(DeprecationWarning, match="use `TrackCurvatureInfo.count`"):
        assert int(info.step) == int(info.count) == 0


def test_one_monte_carlo_estimate_type():
    assert ls.MonteCarloEstimate is curvlib.MonteCarloEstimate
    with pytest.warns(DeprecationWarning, match="use `MonteCarloEstimate`"):
        old = curvlib.StochasticEstimate
    assert old is curvlib.MonteCarloEstimate
    with pytest.warns(DeprecationWarning, match="use `MonteCarloEstimate`"):
        assert curvlib.krylov.StochasticEstimate is curvlib.MonteCarloEstimate
    est = curvlib.hutchinson_trace(lambda v: 3.0 * v, jnp.zeros(5), jax.random.PRNGKey(0), 3,
                                   method="hutchinson")
    assert isinstance(est, curvlib.MonteCarloEstimate)
    assert float(est.estimate) == pytest.approx(15.0)  # Rademacher z^T (3I) z = 3 N exactly
    with pytest.warns(DeprecationWarning, match="use `.estimate`"):
        assert float(est.mean) == float(est.estimate)


def test_deprecated_names_warn_at_the_callers_line_under_the_default_filters(tmp_path):
    """A script run as ``__main__`` with Python's default warning filters shows every kind of
    deprecation (a keyword through two stacked rename decorators, a module attribute, an
    attribute imported with ``from``, a result field): each warning names the script's line."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent("""
        import jax, jax.numpy as jnp
        import curvlib
        from curvlib import landscape as ls
        key = jax.random.PRNGKey(0)
        x = jax.random.normal(key, (8, 3)); p = {"w": jnp.ones(3)}
        loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2) + jnp.sum(p["w"] ** 4)
        curvlib.newton_cg(cg_rtol=1e-3)
        curvlib.track_curvature(1, 2, key=key, tol=1e-2)
        ls.curvature_subspace(loss, p, x, k=4, dim=1, key=key)
        curvlib.StochasticEstimate
        from curvlib import StochasticEstimate
        est = curvlib.hutchinson_trace(lambda v: v, jnp.zeros(3), key, 2, method="hutchinson")
        est.mean
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "DeprecationWarning" in ln]
    assert len(lines) == 6, out.stderr
    assert all(ln.startswith(f"{script}:") for ln in lines), out.stderr
    with warnings.catch_warnings():  # no deprecated name is exported
        warnings.simplefilter("error")
        for name in curvlib.__all__ + ls.__all__ + curvlib.krylov.__all__:
            assert "StochasticEstimate" not in name
            getattr(curvlib, name, None)


# ------------------------------------------------------------ a stalled line search


def _digits_softmax():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = jnp.asarray(X / 16.0, jnp.float32)
    Y = jax.nn.one_hot(y, 10, dtype=jnp.float32)

    def loss(p):  # L2-regularised softmax regression, bias unregularised
        logits = X @ p["W"] + p["b"]
        return (jnp.mean(optax.softmax_cross_entropy(logits, Y))
                + 0.5e-3 * jnp.sum(p["W"] ** 2))

    return loss, {"W": jnp.zeros((64, 10), jnp.float32), "b": jnp.zeros(10, jnp.float32)}


def test_newton_stalled_line_search_is_a_status_and_the_state_stays_usable():
    """float32: at the precision floor of the loss the Armijo search fails; that is STALLED.

    Before: the line search silently carried its failed step down (2^-20 per iteration,
    to ~1e-27), parameters stopped with ``skipped=False`` and never moved again, even
    from a point far from the minimiser.
    """
    loss, p = _digits_softmax()
    opt = curvlib.newton()
    s = opt.init(p)

    @jax.jit
    def step(p, s):
        v, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss)
        return optax.apply_updates(p, u), s

    statuses, losses = [], [float(loss(p))]
    for _ in range(10):
        p, s = step(p, s)
        statuses.append(int(s[0].info.status))
        losses.append(float(loss(p)))
        assert not bool(s[0].info.skipped)
    first = statuses.index(Status.STALLED)  # the run does reach the floor and says so
    assert all(c == Status.SUCCESS for c in statuses[:first])
    assert all(b <= a for a, b in zip(losses[:first], losses[1:first + 1], strict=True))
    assert losses[first] < 0.12 * losses[0]  # Newton converged first (2.30 -> 0.2619)
    assert losses[first + 1] >= losses[first]  # honest: that step made no progress
    g = jax.grad(loss)(p)
    assert float(optax.tree.norm(g)) < 1e-4
    assert all(c == Status.STALLED for c in statuses[first:])
    with pytest.raises(CurvatureError, match="NewtonInfo failed: STALLED"):
        raise_if_failed(s[0].info)
    # the state stays usable: from a perturbed point the next step is a full Newton step again
    far = jax.tree.map(lambda x: x + 0.05, p)
    p2, s2 = step(far, s)
    assert int(s2[0].info.status) == Status.SUCCESS
    assert float(loss(p2)) - losses[-1] < 1e-3 * (float(loss(far)) - losses[-1])


@pytest.mark.parametrize("make", [
    lambda: curvlib.newton(),
    lambda: curvlib.bfgs(),
    lambda: curvlib.newton_cg(linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=20, initial_guess_strategy="one")),
], ids=["newton", "bfgs", "newton_cg+zoom"])
def test_line_search_below_the_loss_resolution_is_stalled(make):
    """``1 + ||p||^2 / 2`` in float32: at ``p = 1e-4`` the decrease (1.5e-8) is below eps."""
    f = lambda p: 1.0 + 0.5 * jnp.sum(p**2)
    opt = make()
    for start, want in ((1.0, Status.SUCCESS), (1e-4, Status.STALLED)):
        p = jnp.full(3, start, jnp.float32)
        v, g = jax.value_and_grad(f)(p)
        u, s = opt.update(g, opt.init(p), p, value=v, grad=g, value_fn=f)
        assert int(s[0].info.status) == want, start
        assert bool(s[0].info.finite) and bool(jnp.all(jnp.isfinite(u)))
        # a stalled step has not converged (the line search's stall said only its status)
        assert bool(s[0].info.converged) == (want == Status.SUCCESS), start


def test_built_on_eigsh_reports_eigsh_s_reason_not_a_budget():
    # a zero Hessian (eigsh: STALLED, the pairs right but not certifiable) read MAX_STEPS
    # ("the budget ran out") in the tracker and in the low-rank inverse
    f = lambda p: jnp.sum(jnp.arange(1.0, N + 1.0) * p)  # linear: zero Hessian
    p = jnp.ones(N)
    tr = curvlib.track_curvature(every=1, k=2, key=jax.random.PRNGKey(0), num_probes=0)
    _, s = tr.update(jax.grad(f)(p), tr.init(p), p, value_fn=f)
    info = curvlib.curvature_info(s)
    assert int(info.status) == Status.STALLED and not bool(info.converged)
    np.testing.assert_array_equal(np.asarray(info.eigenvalues), 0.0)
    tiny = jnp.linspace(1.0, 2.0, N) * 1e-300  # below tiny / eps: right, uncertified
    inv = curvlib.inverse_matvec(lambda v: tiny * v, damping=1e-300, method="lowrank", rank=2,
                                 v0=jnp.ones(N))
    res = inv.solve(jnp.ones(N))
    assert int(res.status) == Status.STALLED and bool(res.finite) and not bool(res.converged)
    # a converged low-rank inverse is still a success; a budget is still a budget
    ok = curvlib.inverse_matvec(lambda v: 1e300 * tiny * v, damping=1.0, method="lowrank",
                                rank=2, v0=jnp.ones(N)).solve(jnp.ones(N))
    assert int(ok.status) == Status.SUCCESS
    short = curvlib.inverse_matvec(lambda v: 1e300 * tiny * v, damping=1.0, method="lowrank",
                                   rank=2, v0=jnp.ones(N), eigsh=curvlib.Eigsh(max_matvecs=3))
    assert int(short.solve(jnp.ones(N)).status) == Status.MAX_STEPS


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_cg_below_attainable_accuracy_is_stalled_not_a_budget(jit):
    # rtol below rounding: the recurrence's residual meets it, the true one cannot; CG stops
    # long before max_steps, and said MAX_STEPS ("the budget ran out")
    d = jnp.arange(1.0, 21.0)
    run = jax.jit if jit else (lambda f: f)
    r = run(lambda b: curvlib.cg(lambda v: d * v, b, rtol=1e-17))(jnp.ones(20))
    assert int(r.status) == Status.STALLED and not bool(r.converged) and bool(r.finite)
    assert int(r.num_steps) < 200
    np.testing.assert_allclose(np.asarray(r.x), 1.0 / np.arange(1.0, 21.0), rtol=1e-12)
    short = run(lambda b: curvlib.cg(lambda v: d * v, b, max_steps=3))(jnp.ones(20))
    assert int(short.status) == Status.MAX_STEPS


def test_a_step_skipped_for_a_nan_loss_with_a_finite_gradient_is_not_converged():
    # newton_cg said converged=True beside skipped=True (CG solved the finite system)
    f = lambda w, c: jnp.sum((w - 1.0) ** 2) + c  # noqa: E731
    w = jnp.zeros(3)
    for tx in (curvlib.scale_by_newton_cg(), curvlib.scale_by_newton(), curvlib.scale_by_bfgs()):
        u, s = tx.update(jax.grad(f)(w, jnp.nan), tx.init(w), w, value_fn=f, c=jnp.nan)
        assert bool(s.info.skipped) and not bool(s.info.finite), tx
        assert not bool(s.info.converged), tx
        assert int(s.info.status) == Status.NONFINITE
        np.testing.assert_array_equal(np.asarray(u), 0.0)


def test_a_step_skipped_after_the_direction_is_not_reported_accepted():
    # a learning-rate schedule that returns NaN: the chain skips the step; its info said
    # accepted=True beside skipped=True
    A, f = _quadratic()
    p = jnp.zeros(6)
    opt = curvlib.newton_cg(learning_rate=lambda c: jnp.where(c == 0, jnp.nan, 1.0))
    u, s = opt.update(jax.grad(f)(p), opt.init(p), p, value_fn=f)
    info = s[0].info
    assert bool(info.skipped) and not bool(info.accepted) and not bool(info.finite)
    assert int(info.status) == Status.NONFINITE
    np.testing.assert_array_equal(np.asarray(u), 0.0)


def test_bfgs_reports_no_curvature_before_its_first_pair():
    # the first call reported x^T g (25 here) as "s^T y of the last pair": the pair's start
    # buffers are zeros until a finite call stores one
    f = lambda w: 0.5 * jnp.sum(jnp.asarray([1.0, 3.0]) * w * w)  # noqa: E731
    tx = curvlib.scale_by_bfgs()
    w0, s = jnp.asarray([3.0, 4.0]), tx.init(jnp.zeros(2))
    u, s = tx.update(jax.grad(f)(w0), s, w0, value_fn=f)
    assert float(s.info.curvature) == 0.0 and not bool(s.info.updated)
    w1 = w0 - 0.1 * u
    _, s = tx.update(jax.grad(f)(w1), s, w1, value_fn=f)
    sy = float(jnp.dot(w1 - w0, jax.grad(f)(w1) - jax.grad(f)(w0)))
    np.testing.assert_allclose(float(s.info.curvature), sy, rtol=1e-12)
    assert bool(s.info.updated)
