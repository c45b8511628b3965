"""Tests of curvlib.track_curvature: dense oracles, cold-start agreement, warm-start savings,
the optax contract (jit, chain, inject_hyperparams, vmap, MultiSteps, apply_if_finite), bad
input, the history/plot helpers and the edge of stability (Cohen et al. 2021)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvlib
from curvlib.optim.track import TrackCurvatureInfo, warm_start_vector

# ---------------------------------------------------------------- problems


def _quadratic(seed=0, n=12):
    """``0.5 p^T A p - b^T p`` on a dict/tuple pytree with a dense SPD-indefinite A."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    evals = np.concatenate([[9.0, 6.0, 4.0], np.linspace(-1.0, 2.0, n - 3)])
    A = (Q * evals) @ Q.T
    b = rng.standard_normal(n)

    def flat(p):
        return jnp.concatenate([p["w"].reshape(-1), p["b"][0], p["b"][1]])

    def loss(p):
        x = flat(p)
        return 0.5 * x @ (jnp.asarray(A) @ x) - jnp.asarray(b) @ x

    params = {"w": jnp.ones((2, 4)), "b": (jnp.ones(3), jnp.ones(1))}
    return loss, params, A, b, flat


@functools.cache
def _digits(num=200):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X[:num] / 16.0
    X = X - X.mean(0)
    return X, np.eye(10)[y[:num]]


def _mlp(sizes=(64, 16, 10), scale=0.5, seed=0, num=200, dtype=jnp.float64):
    X, Y = _digits(num)
    X, Y = jnp.asarray(X, dtype), jnp.asarray(Y, dtype)
    key = jax.random.PRNGKey(seed)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        key, k = jax.random.split(key)
        w = scale * jax.random.normal(k, (a, b), dtype) / np.sqrt(a)
        params.append({"w": w, "b": jnp.zeros(b, dtype)})

    def apply(ps, x):
        for p in ps[:-1]:
            x = jnp.tanh(x @ p["w"] + p["b"])
        return x @ ps[-1]["w"] + ps[-1]["b"]

    def loss(ps):
        return 0.5 * jnp.mean(jnp.sum((apply(ps, X) - Y) ** 2, -1))

    return loss, params


def _gd_step(opt, loss):
    @jax.jit
    def step(params, state):
        g = jax.grad(loss)(params)
        updates, state = opt.update(g, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    return step


def _cold(loss, params, k, key, tol):
    return curvlib.eigsh(
        curvlib.hessian_matvec(loss, params), curvlib._tree.normal_like(key, params), k, rtol=tol
    )


# ------------------------------------------------------------ dense oracles


def test_quadratic_matches_dense_oracle():
    loss, params, A, b, flat = _quadratic()
    k = 3
    opt = curvlib.track_curvature(every=1, k=k, key=jax.random.PRNGKey(0),
                                  eigsh=curvlib.Eigsh(rtol=1e-8), num_probes=12)
    state = opt.init(params)
    g = jax.grad(loss)(params)
    updates, state = jax.jit(functools.partial(opt.update, value_fn=loss))(g, state, params)
    # updates pass through unchanged
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(u, v), updates, g)
    info = curvlib.curvature_info(state)
    evals, evecs = np.linalg.eigh(A)
    np.testing.assert_allclose(info.eigenvalues, evals[::-1][:k], rtol=1e-10)
    assert int(info.count) == 0 and bool(info.converged) and not bool(info.skipped)
    # trace: Hutch++ on n=12 with 12 probes spans the whole space exactly up to rounding
    assert abs(float(info.trace) - np.trace(A)) <= 5 * float(info.trace_stderr) + 1e-8
    # gradient fraction in the top-k eigenspace, from the dense eigenvectors
    gx = np.asarray(flat(g))
    V = evecs[:, ::-1][:, :k]
    np.testing.assert_allclose(info.grad_fraction, np.sum((V.T @ gx) ** 2) / (gx @ gx),
                               rtol=1e-8)
    np.testing.assert_allclose(info.grad_norm, np.linalg.norm(gx), rtol=1e-12)
    np.testing.assert_allclose(info.loss, loss(params), rtol=1e-12)
    # eigenvectors kept in the state (pytree, leading axis k) are the dense ones up to sign
    X = np.stack([np.asarray(flat(jax.tree.map(lambda x: x[i], state.eigenvectors)))
                  for i in range(k)])
    np.testing.assert_allclose(np.abs(np.sum(X * V.T, axis=1)), 1.0, atol=1e-8)


def test_warm_start_vector_is_the_block_sum_or_random():
    _, params, *_ = _quadratic()
    key = jax.random.PRNGKey(3)
    zero = jax.tree.map(lambda x: jnp.zeros((2,) + x.shape, x.dtype), params)
    cold = warm_start_vector(key, zero, params, 1e-2)
    np.testing.assert_allclose(curvlib._tree.norm(cold), 1.0, rtol=1e-12)
    X = jax.tree.map(lambda x: jnp.stack([jnp.full(x.shape, 2.0), jnp.zeros(x.shape)]), params)
    warm = warm_start_vector(key, X, params, 0.0)
    n = curvlib._tree.size(params)
    jax.tree.map(lambda w: np.testing.assert_allclose(w, 1.0 / np.sqrt(n)), warm)


# ------------------------------------------- agreement with a cold start, cost


def test_tracked_eigenvalues_match_cold_eigsh_and_warm_start_is_cheaper():
    """GD on a tanh MLP: each refresh equals a cold eigsh at the same point, for fewer products.

    Products are compared at the same tolerance (``tol=1e-3``); the eigenvalues
    are compared with a tightly converged cold solve (their error is ~tol^2).
    """
    loss, params = _mlp()
    k, every, tol = 3, 10, 1e-3
    opt = optax.chain(
        curvlib.track_curvature(
            every, k, key=jax.random.PRNGKey(1),
            eigsh=curvlib.Eigsh(rtol=tol, max_restarts=100, verify=True), num_probes=0),
        optax.sgd(0.5),
    )
    step = _gd_step(opt, loss)
    cold = jax.jit(lambda p, key, tol: _cold(loss, p, k, key, tol))
    state = opt.init(params)
    warm_counts, cold_counts = [], []
    for t in range(61):
        before = params
        params, state = step(params, state)
        if t % every:
            continue
        info = curvlib.curvature_info(state)
        assert int(info.count) == t and bool(info.converged)
        exact = cold(before, jax.random.PRNGKey(100 + t), 1e-10)
        np.testing.assert_allclose(info.eigenvalues, exact.eigenvalues, rtol=2e-5)
        same_tol = cold(before, jax.random.PRNGKey(200 + t), tol)
        assert bool(same_tol.converged)
        assert 0 < int(info.verification_matvecs) < int(info.eigsh_matvecs)
        if t > 0:  # the first refresh is itself a cold start
            # the search is what a warm start shortens: the verification's fresh random
            # blocks cost the same from any start
            warm_counts.append(int(info.eigsh_matvecs - info.verification_matvecs))
            cold_counts.append(int(same_tol.num_matvecs - same_tol.verification_matvecs))
    # warm refreshes need markedly fewer search products than cold solves at the same points
    counts = (warm_counts, cold_counts)
    assert np.sum(warm_counts) <= 0.8 * np.sum(cold_counts), counts
    assert max(warm_counts) <= max(cold_counts), counts


def test_default_refresh_skips_verification_and_agrees_with_a_verified_one():
    """The tracker's default ``Eigsh(verify=False)``: the same eigenvalues as refreshes that
    run eigsh's verification round, no verification products, and fewer products in all."""
    loss, params = _mlp()
    k, every = 3, 10
    key = jax.random.PRNGKey(1)
    runs = {}
    for name, opts in {"default": {}, "verified": {"eigsh": curvlib.Eigsh(verify=True)}}.items():
        opt = optax.chain(curvlib.track_curvature(every, k, key=key, num_probes=0, **opts),
                          optax.sgd(0.5))
        step, p, state, infos = _gd_step(opt, loss), params, opt.init(params), []
        for t in range(31):
            p, state = step(p, state)
            if t % every == 0:
                infos.append(curvlib.curvature_info(state))
        runs[name] = infos
    for default, verified in zip(runs["default"], runs["verified"], strict=True):
        assert bool(default.converged) and bool(verified.converged)
        assert int(default.verification_matvecs) == 0 < int(verified.verification_matvecs)
        # the same training (the tracker does not touch the updates): the same Hessians
        np.testing.assert_allclose(default.eigenvalues, verified.eigenvalues, rtol=1e-6)
        rel = np.asarray(default.residual_norms) / np.abs(np.asarray(default.eigenvalues))
        assert np.all(rel <= np.sqrt(np.finfo(np.float64).eps) * 1.01), rel
    used = [sum(int(i.eigsh_matvecs) for i in runs[n]) for n in ("default", "verified")]
    assert used[0] < used[1], used
    # the deprecated `tol` folds into the tracker's own default: still no verification
    with pytest.warns(DeprecationWarning, match="verify=False"):
        opt = curvlib.track_curvature(every, k, key=key, num_probes=0, tol=1e-3)
    state = opt.init(params)
    _, state = opt.update(jax.grad(loss)(params), state, params, value_fn=loss)
    assert int(curvlib.curvature_info(state).verification_matvecs) == 0


# ----------------------------------------------------------- optax contract


def _poisonable_quadratic():
    loss, params, *_ = _quadratic()

    def value_fn(p, poison=False):
        jax.debug.callback(lambda: _CALLS.append(1))
        return jnp.where(poison, jnp.nan, loss(p))

    return loss, value_fn, params


_CALLS: list = []
_TRACES: list = []


@functools.cache
def _shared_step():
    """One compiled tracked step reused by the schedule, NaN and history tests."""
    loss, value_fn, params = _poisonable_quadratic()
    opt = optax.chain(
        curvlib.track_curvature(4, 2, key=jax.random.PRNGKey(0), num_probes=3),
        optax.adam(1e-2),
    )

    @jax.jit
    def step(params, state, poison):
        _TRACES.append(1)
        g = jax.grad(loss)(params)
        u, state = opt.update(g, state, params, value_fn=value_fn, poison=poison)
        return optax.apply_updates(params, u), state

    return opt, step, params


def test_refresh_schedule_zero_cost_between_and_no_recompilation():
    opt, step, params = _shared_step()
    state = opt.init(params)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    steps, states = [], []
    _CALLS.clear()
    num_traces = len(_TRACES)
    for _ in range(10):
        params, state = step(params, state, False)
        jax.block_until_ready(state)
        states.append(state)
        steps.append(int(curvlib.curvature_info(state).count))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    assert len(_TRACES) - num_traces <= 1  # no recompilation after the first step
    assert steps == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    assert int(curvlib.curvature_info(state).num_refreshes) == 3
    # value_fn ran only at the three refreshes: the lax.cond branch is skipped otherwise
    assert 0 < len(_CALLS) <= 3 * 2, len(_CALLS)
    # collect the run into columns and a table, and plot it
    hist = curvlib.curvature_history(states)
    np.testing.assert_array_equal(hist["step"], [0, 4, 8])
    assert hist["eigenvalues"].shape == (3, 2)
    np.testing.assert_allclose(hist["sharpness"], 9.0, rtol=1e-5)
    assert np.all(np.isfinite(hist["trace"]))
    table = curvlib.format_curvature_table(hist)
    assert len(table.splitlines()) == 4 and "sharpness" in table


def test_plot_curvature(tmp_path):
    import matplotlib

    matplotlib.use("Agg")  # the test's choice; the library never sets a backend
    from matplotlib.container import ErrorbarContainer

    n = 5
    hist = {
        "step": np.arange(n) * 10, "loss": np.linspace(1, 0.1, n),
        "eigenvalues": np.linspace(1, 2, 2 * n).reshape(n, 2), "trace": np.ones(n),
        "trace_stderr": np.full(n, 0.1), "grad_fraction": np.full(n, 0.5),
    }
    fig = curvlib.plot_curvature(hist, learning_rate=1.0)
    fig.savefig(tmp_path / "curv.png")
    assert (tmp_path / "curv.png").stat().st_size > 0
    trace_ax = fig.axes[2]
    assert "Hutch++" not in trace_ax.get_title()  # the default estimator is deflated Hutchinson
    bars = [c for c in trace_ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and bars[0].has_yerr


def test_report_module_is_separate_from_the_algorithm():
    """Plotting and tables live in curvlib.optim.report; track.py imports no matplotlib/numpy
    report code and sets no backend."""
    import inspect

    import curvlib.optim.report as report
    import curvlib.optim.track as track

    src = inspect.getsource(track)
    assert "matplotlib" not in src and "def plot_curvature" not in src
    assert "matplotlib.use" not in inspect.getsource(report).replace('matplotlib.use("Agg")  #', "")
    assert curvlib.plot_curvature is report.plot_curvature


def test_nnx_optimizer_history_has_one_row_per_refresh():
    """nnx.Optimizer keeps the state in mutable Variables: curvature_info reads them out, so
    infos appended after each step are a history, not aliases of the last step."""
    nnx = pytest.importorskip("flax.nnx")
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 3))
    y = jnp.sin(x[:, :2])
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model)
    model_loss = lambda m: jnp.mean((m(x) - y) ** 2)
    value_fn = lambda state: model_loss(nnx.merge(graphdef, state))
    tx = optax.chain(curvlib.track_curvature(2, 1, key=jax.random.PRNGKey(0), num_probes=0),
                     optax.sgd(0.05))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(model_loss)(model)
        optimizer.update(model, grads, value_fn=value_fn)

    infos = []
    for _ in range(5):
        step(model, optimizer)
        infos.append(curvlib.curvature_info(optimizer.opt_state))
    assert [int(i.count) for i in infos] == [0, 0, 2, 2, 4]
    hist = curvlib.curvature_history(infos)
    np.testing.assert_array_equal(hist["step"], [0, 2, 4])
    assert len(set(np.round(hist["loss"], 12))) == 3  # three different points


def test_a_refresh_traces_the_loss_once():
    """The loss, the gradient and every product of a refresh come from one linearisation:
    compiling a tracked step traces ``value_fn`` once (the step's own gradient uses
    another function here), so the model is compiled once for the tracker."""
    loss, params, *_ = _quadratic()
    calls = []

    def value_fn(p):
        calls.append(1)
        return loss(p)

    opt = optax.chain(curvlib.track_curvature(3, 2, key=jax.random.PRNGKey(0)), optax.sgd(0.1))
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p, value_fn=value_fn))
    step.lower(params, opt.init(params))
    assert len(calls) == 1, len(calls)


def test_a_refresh_compiles_the_product_once():
    """The deflated trace's probe products run in eigsh's own loop: a tracked step with
    6 probes holds as many copies of the model's tangent program as one without a
    trace, while a separate probe block (``trace_method="hutchinson"``) adds one."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((7, 13)), jnp.float32)
    params = {"w": jnp.asarray(rng.standard_normal((13, 11)), jnp.float32) / 4}

    def loss(p):
        return jnp.mean(jnp.tanh(x @ p["w"]) ** 2)

    def model_dots(**kw):
        opt = curvlib.track_curvature(3, 2, key=jax.random.PRNGKey(0), **kw)
        step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=loss))
        text = step.lower(params, opt.init(params)).as_text()
        # dot products with the data matrix (7 x 13) belong to the model, nothing else
        return sum("dot_general" in line and "tensor<7x13xf32>" in line
                   for line in text.splitlines())

    none = model_dots(num_probes=0)
    assert none > 0
    assert model_dots(num_probes=6) == none
    assert model_dots(num_probes=6, trace_method="hutchinson") > none


def test_nan_loss_at_refresh_keeps_previous_values_with_flag():
    opt, step, params = _shared_step()
    state = opt.init(params)
    params, state = step(params, state, False)  # refresh at step 0
    good = curvlib.curvature_info(state)
    for _ in range(3):
        params, state = step(params, state, False)
    p_before, vecs_before = params, state[0].eigenvectors
    params, state = step(params, state, True)  # the refresh at step 4 sees a NaN loss
    bad = curvlib.curvature_info(state)
    assert bool(bad.skipped) and int(bad.num_skipped) == 1
    assert int(bad.count) == 0 and int(bad.num_refreshes) == 1
    np.testing.assert_array_equal(bad.eigenvalues, good.eigenvalues)
    jax.tree.map(np.testing.assert_array_equal, state[0].eigenvectors, vecs_before)
    # training continued: the update was applied
    assert not np.allclose(params["w"], p_before["w"])
    for _ in range(4):
        params, state = step(params, state, False)  # the refresh at step 8 succeeds again
    info = curvlib.curvature_info(state)
    assert not bool(info.skipped) and int(info.count) == 8 and int(info.num_skipped) == 1


def test_readable_with_tree_get_and_through_wrappers():
    loss, params, *_ = _quadratic()
    # inject_hyperparams around the tracker itself (shape-fixing ints are static_args),
    # next to an injected optimiser, inside apply_if_finite and MultiSteps
    tracker = optax.inject_hyperparams(
        curvlib.track_curvature, static_args=("k", "num_probes")
    )(every=3, k=2, key=jax.random.PRNGKey(0), eigsh=curvlib.Eigsh(rtol=1e-6), num_probes=0)
    inner = optax.chain(tracker, optax.inject_hyperparams(optax.sgd)(learning_rate=0.05))
    opt = optax.MultiSteps(optax.apply_if_finite(inner, 3), every_k_schedule=1)
    update = jax.jit(functools.partial(opt.update, value_fn=loss))
    state = opt.init(params)
    p = params
    for _ in range(4):
        g = jax.grad(loss)(p)
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    info = curvlib.curvature_info(state)
    assert isinstance(info, TrackCurvatureInfo)
    assert int(info.count) == 3 and int(info.num_refreshes) == 2
    assert float(info.eigenvalues[0]) == pytest.approx(9.0, rel=1e-6)
    got = optax.tree_utils.tree_get(inner.init(params), "info")
    assert isinstance(got, TrackCurvatureInfo)


def test_vmap_over_seeds_matches_unbatched():
    """Under vmap the refresh runs every step (cond -> select) but commits the same values."""
    loss, p0, *_ = _quadratic()
    params = [jax.tree.map(lambda x, s=s: x * (1.0 + s), p0) for s in (0.0, 0.5)]
    batched = jax.tree.map(lambda *x: jnp.stack(x), *params)
    opt = optax.chain(
        curvlib.track_curvature(2, 2, key=jax.random.PRNGKey(0), num_probes=0), optax.sgd(0.05)
    )

    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p, value_fn=loss)
        return optax.apply_updates(p, u), s

    p_b, s_b = batched, jax.vmap(opt.init)(batched)
    vstep = jax.jit(jax.vmap(step))
    for _ in range(3):
        p_b, s_b = vstep(p_b, s_b)
    info_b = curvlib.curvature_info(s_b)
    assert info_b.eigenvalues.shape == (2, 2)
    assert np.all(np.asarray(info_b.count) == 2) and np.all(np.asarray(info_b.num_refreshes) == 2)
    one = jax.jit(step)
    for i, p in enumerate(params):
        s = opt.init(p)
        for _ in range(3):
            p, s = one(p, s)
        info = curvlib.curvature_info(s)
        np.testing.assert_allclose(info_b.eigenvalues[i], info.eigenvalues, rtol=1e-7)
        np.testing.assert_allclose(info_b.grad_fraction[i], info.grad_fraction, rtol=1e-5,
                                   atol=1e-10)
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-10), p_b, p)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("every,k,name", [(0, 2, "every"), (-3, 2, "every"), (2, 0, "k"),
                                          (1.5, 2, "every"), (2, 2.5, "k")])
def test_bad_static_arguments(every, k, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        curvlib.track_curvature(every, k, key=jax.random.PRNGKey(0))


@pytest.mark.parametrize("n", [1, 2])
def test_hutchpp_needs_three_probes_and_says_so_at_construction(n):
    with pytest.raises(ValueError, match=rf"`num_probes` must be 0 .* >= 3 .*hutch\+\+.*got {n}"):
        curvlib.track_curvature(5, 2, key=jax.random.PRNGKey(0), num_probes=n,
                                trace_method="hutch++")
    # plain Hutchinson takes any count
    curvlib.track_curvature(5, 2, key=jax.random.PRNGKey(0), num_probes=n,
                            trace_method="hutchinson")


def test_k_at_least_parameter_count_raises_at_init():
    _, params, *_ = _quadratic()  # 12 parameters
    with pytest.raises(ValueError, match="number of parameters"):
        curvlib.track_curvature(5, 12, key=jax.random.PRNGKey(0)).init(params)
    curvlib.track_curvature(5, 11, key=jax.random.PRNGKey(0), num_probes=0).init(params)
    # the Lanczos basis size: at least k + 2 vectors, at most the parameter count
    with pytest.raises(ValueError, match=r"`basis_size` must be >= 5"):
        curvlib.track_curvature(5, 3, key=jax.random.PRNGKey(0),
                                eigsh=curvlib.Eigsh(basis_size=4))
    with pytest.raises(ValueError, match=r"`basis_size`=13 exceeds the number of parameters"):
        curvlib.track_curvature(5, 3, key=jax.random.PRNGKey(0),
                                eigsh=curvlib.Eigsh(basis_size=13)).init(params)


def test_missing_value_fn_raises():
    _, params, *_ = _quadratic()
    opt = curvlib.track_curvature(5, 2, key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(params, opt.init(params), params)


# -------------------------------------------------------- edge of stability


def test_edge_of_stability_sharpness_hovers_at_two_over_eta():
    """Full-batch GD on a tanh MLP (digits, MSE): sharpness rises, then hovers near 2/eta."""
    eta, num_steps, every = 0.8, 800, 20
    loss, params = _mlp(sizes=(64, 32, 10), scale=0.5, num=500, dtype=jnp.float32)
    opt = optax.chain(
        curvlib.track_curvature(every, 1, key=jax.random.PRNGKey(0), num_probes=0),
        optax.sgd(eta),
    )

    def body(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p, value_fn=loss)
        return (optax.apply_updates(p, u), s), curvlib.curvature_info(s)

    _, infos = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=num_steps))(
        params, opt.init(params))
    hist = curvlib.curvature_history(infos)
    sharp, steps = hist["sharpness"], hist["step"]
    assert len(steps) == num_steps // every
    edge = 2.0 / eta
    # progressive sharpening: starts well below the edge and rises to it
    assert sharp[0] < 0.75 * edge
    assert np.max(sharp[: len(sharp) // 2]) > 0.95 * edge
    # then hovers at the edge: within +-15% of 2/eta over the last 40% of training
    late = sharp[steps >= 0.6 * num_steps]
    assert np.all(np.abs(late / edge - 1.0) <= 0.15), late / edge


def test_history_reads_one_state_of_a_chain_stacked_by_scan():
    """``curvature_history(states)`` for the stacked state of a ``lax.scan`` of chained steps
    (a tuple, as every optax chain state) and for one state: it took the tuple for a list of
    records and raised "found 0"."""
    loss, params, *_ = _quadratic()
    tx = optax.chain(curvlib.track_curvature(2, 1, key=jax.random.PRNGKey(0), num_probes=0),
                     optax.sgd(0.01))

    def step(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss)
        p = optax.apply_updates(p, u)
        return (p, s), s

    (_, last), states = jax.lax.scan(step, (params, tx.init(params)), None, length=5)
    hist = curvlib.curvature_history(states)
    np.testing.assert_array_equal(hist["step"], [0, 2, 4])
    one = curvlib.curvature_history(last)
    np.testing.assert_array_equal(one["step"], [4])
    np.testing.assert_allclose(one["loss"], hist["loss"][-1:])
    listed = curvlib.curvature_history([jax.tree.map(lambda x, i=i: x[i], states)
                                        for i in range(5)])
    np.testing.assert_array_equal(listed["step"], hist["step"])


def test_an_eager_refresh_runs_its_work_around_the_eigensolve_as_two_programs(compiles):
    """An eager refresh ran the work before and after its eigensolve op by op (the start
    vector, the keys, the info, the commit: about 80 small programs on the first refresh);
    it is now two compiled programs, and every refresh equals the jitted tracker's."""
    loss, params, A, _, flat = _quadratic(seed=3)
    tx = curvlib.track_curvature(1, 2, key=jax.random.PRNGKey(2), num_probes=4)
    jitted_update = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss)[1])
    eager = jitted = tx.init(params)
    for step in range(3):
        p = jax.tree.map(lambda a: a * (1.0 - 0.1 * step), params)
        g = jax.block_until_ready(jax.grad(loss)(p))
        with compiles() as seen:
            _, eager = tx.update(g, eager, p, value_fn=loss)
            jax.block_until_ready(eager)
        if step == 0:
            assert {"jit(_refresh_start)", "jit(_refresh_end)"} <= set(seen.names), seen.names
            op_level = [n for n in seen.names if n in ("jit(_where)", "jit(isfinite)",
                                                       "jit(_threefry_split)")]
            assert not op_level, seen.names
        else:
            assert seen.count == 0, seen.names
        jitted = jitted_update(g, jitted, p)
        a, b = curvlib.curvature_info(eager), curvlib.curvature_info(jitted)
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-10)
        np.testing.assert_allclose(a.eigenvalues, np.sort(np.linalg.eigvalsh(A))[::-1][:2],
                                   rtol=1e-6)
        np.testing.assert_allclose(a.trace, b.trace, rtol=1e-9)
        for field in ("num_matvecs", "num_refreshes", "converged", "skipped"):
            assert int(getattr(a, field)) == int(getattr(b, field)), field
