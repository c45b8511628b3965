"""The shared optax contract suite: every curvlib transform behaves like optax's own.

Each case is an alias (``newton_cg``, ``newton``, ``bfgs``, ``svrg``, and
``track_curvature`` chained with SGD) trained on a small softmax regression whose
parameters are a dict pytree; the extra arguments follow each transform's
documented contract. Checked for every case: jit with no retrace on the second
step, ``optax.chain``, ``optax.inject_hyperparams``, ``optax.apply_if_finite``
with a NaN loss, ``optax.MultiSteps``, dtype/shape stability of the state in
float32 and float64 (modelled on optax's ``alias_test.py``), and the one calling
convention: ``value_fn`` alone (equal to passing ``value=``/``grad=``), the loop
``optax.lbfgs`` documents (``optax.value_and_grad_from_state``) and a flax
``nnx.Optimizer.update(model, grads, value_fn=...)`` step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvlib import optim
from curvlib.optim._common import RecomputeState

N, D, K = 24, 4, 3


def _data(dtype):
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (N, D), dtype)
    labels = jnp.argmax(x @ jax.random.normal(kw, (D, K), dtype), axis=-1)
    return x, jax.nn.one_hot(labels, K, dtype=dtype)


def _params(dtype):
    return {"w": jnp.zeros((D, K), dtype), "b": jnp.zeros((K,), dtype)}


def loss(params, batch):
    x, y = batch
    logits = x @ params["w"] + params["b"]
    l2 = 1e-2 * (jnp.sum(params["w"] ** 2) + jnp.sum(params["b"] ** 2))
    return jnp.mean(optax.softmax_cross_entropy(logits, y)) + l2


def _extra(name, batch, full_batch):
    """The documented extra arguments of each transform for one step."""
    if name == "svrg":
        return {"batch": batch, "full_value_fn": lambda p: loss(p, full_batch)}
    return {"batch": batch}


def _tracked(lr=None):
    tracker = optim.track_curvature(2, 2, key=jax.random.PRNGKey(0), num_probes=3)
    return optax.chain(tracker, optax.sgd(0.5 if lr is None else lr))


CASES = {
    "newton_cg": lambda lr=None: optim.newton_cg(lr),
    "newton": lambda lr=None: optim.newton(lr),
    "bfgs": lambda lr=None: optim.bfgs(lr),
    "svrg": lambda lr=None: optim.svrg(0.5 if lr is None else lr, snapshot_every=4),
    "track_curvature": _tracked,
}
SCALE_BY = {
    "newton_cg": optim.scale_by_newton_cg,
    "newton": optim.scale_by_newton,
    "bfgs": optim.scale_by_bfgs,
    "svrg": lambda: optim.scale_by_svrg(snapshot_every=4),
    "track_curvature": lambda: optim.track_curvature(1, 1, key=jax.random.PRNGKey(0)),
}
STATE_TYPES = {
    "newton_cg": optim.ScaleByNewtonCGState,
    "newton": optim.ScaleByNewtonState,
    "bfgs": optim.ScaleByBFGSState,
    "svrg": optim.ScaleBySVRGState,
    "track_curvature": optim.TrackCurvatureState,
}


def _make_step(name, opt, counter=None, *, pass_value_and_grad=True):
    def step(params, state, batch, full_batch):
        if counter is not None:
            counter.append(1)
        value, grad = jax.value_and_grad(loss)(params, batch)
        given = {"value": value, "grad": grad} if pass_value_and_grad else {}
        updates, state = opt.update(
            grad, state, params, value_fn=loss, **given, **_extra(name, batch, full_batch),
        )
        return optax.apply_updates(params, updates), state, value

    return step


def _signature(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _all_finite(tree):
    """Every floating leaf finite, but the documented ``+inf`` of the aliases' recompute marker.

    (``RecomputeState.value = +inf`` is how an alias without a line search tells
    ``optax.value_and_grad_from_state`` to evaluate the loss and gradient itself.)
    """
    tree = jax.tree.map(
        lambda s: s._replace(value=jnp.zeros_like(s.value))
        if isinstance(s, RecomputeState) else s,
        tree, is_leaf=lambda s: isinstance(s, RecomputeState),
    )
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.result_type(x), jnp.inexact))


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_jit_no_retrace_and_stable_state(name, dtype):
    batch = _data(dtype)
    opt = CASES[name]()
    params = _params(dtype)
    state = opt.init(params)
    assert any(isinstance(s, STATE_TYPES[name]) for s in state)
    sig = _signature(state)
    traces = []
    step = jax.jit(_make_step(name, opt, traces))
    losses = []
    for _ in range(3):
        params, state, value = step(params, state, batch, batch)
        losses.append(float(value))
        assert _signature(state) == sig
        assert jax.tree.map(lambda x: x.dtype, params) == {"w": dtype, "b": dtype}
    assert len(traces) == 1, "the second jitted step retraced"
    assert losses[-1] < losses[0]
    assert _all_finite(state)


@pytest.mark.parametrize("name", list(SCALE_BY))
def test_chain_with_other_transforms(name):
    batch = _data(jnp.float64)
    opt = optax.chain(optax.clip_by_global_norm(100.0), SCALE_BY[name](), optax.scale(-0.5))
    step = jax.jit(_make_step(name, opt))
    params, state = _params(jnp.float64), opt.init(_params(jnp.float64))
    first = float(loss(params, batch))
    for _ in range(3):
        params, state, _ = step(params, state, batch, batch)
    assert float(loss(params, batch)) < first


ALIASES = {"newton_cg": optim.newton_cg, "newton": optim.newton, "bfgs": optim.bfgs,
           "svrg": lambda learning_rate: optim.svrg(learning_rate, snapshot_every=4)}


@pytest.mark.parametrize("name", ["newton", "bfgs"])
def test_eager_line_searched_steps_compile_nothing_even_for_a_fresh_loss(name, compiles):
    """The default line searches (optax's backtracking and zoom) build their loop body afresh
    at every call: an eager step compiled that loop again every time (0.3-1.3 s a step, a
    fresh closure or not). Now the search runs as one program per loss program; the steps
    equal those of the same alias under ``jax.jit``."""
    batch = _data(jnp.float64)
    opt = ALIASES[name](None)
    params0 = _params(jnp.float64)
    eager = (params0, opt.init(params0))
    jitted = (params0, opt.init(params0))

    x, y = batch  # passed by name, as optax routes them to `value_fn`

    # (relu: a custom derivative rule, keyed through the second-order program, whose
    # arguments are named x and y here too)
    @jax.jit
    def step(params, state, scale, xs, ys):
        fn = lambda p, x, y: scale * loss(p, (jax.nn.relu(x), y))
        updates, state = opt.update(jax.grad(fn)(params, xs, ys), state, params, value_fn=fn,
                                    x=xs, y=ys)
        return optax.apply_updates(params, updates), state

    for i in range(6):
        fn = lambda p, x, y: 1.5 * loss(p, (jax.nn.relu(x), y))  # new each step (a notebook)
        xs, ys = x + 1e-3 * i, y  # and a new batch
        with compiles() as seen:
            updates, state = opt.update(jax.grad(fn)(eager[0], xs, ys), eager[1], eager[0],
                                        value_fn=fn, x=xs, y=ys)
            eager = (optax.apply_updates(eager[0], updates), state)
            jax.block_until_ready(eager)
        if i >= 2:
            assert seen.count == 0, (i, seen.names)
        jitted = step(*jitted, 1.5, xs, ys)
        for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted[0]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    assert float(loss(eager[0], batch)) < float(loss(params0, batch))


@pytest.mark.parametrize("name", ["newton", "bfgs"])
def test_eager_line_searched_steps_pass_int_and_bool_arguments_as_given(name):
    """An extra argument the loss uses in Python (an int power, a bool flag) is passed as
    given to an eager line-searched step, as under ``jax.jit`` with it closed over (it was
    traced: the step failed); steps with another value use their own program (an int of the
    same shape and dtype must not be served the first value's search)."""
    batch = _data(jnp.float64)
    opt = ALIASES[name](None)
    x, y = batch

    def fn(p, x, y, power, relu, reduce="mean"):
        z = jax.nn.relu(x) if relu else x
        assert reduce in ("mean", "sum")
        return loss(p, (z, y)) ** power  # Python uses all three

    # (True and 1, 2 and np.int64(2): each its own program)
    for power, relu in ((1, True), (True, True), (2, True), (np.int64(2), np.bool_(False))):
        params = _params(jnp.float64)
        eager = jitted = (params, opt.init(params))
        step = jax.jit(lambda p, s, power=power, relu=relu: opt.update(
            jax.grad(fn)(p, x, y, power, relu), s, p, value_fn=lambda q, x, y: fn(
                q, x, y, power, relu), x=x, y=y))
        for _ in range(3):
            updates, state = opt.update(jax.grad(fn)(eager[0], x, y, power, relu), eager[1],
                                        eager[0], value_fn=fn, x=x, y=y, power=power,
                                        relu=relu, reduce="mean")
            eager = (optax.apply_updates(eager[0], updates), state)
            updates, state = step(*jitted)
            jitted = (optax.apply_updates(jitted[0], updates), state)
            for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(jitted[0]), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12,
                                           err_msg=str((power, relu)))


def test_an_int_the_loss_computes_with_is_traced_in_eager_steps(compiles):
    """An int the loss only computes with (a step counter) is traced, as ``jax.jit`` traces
    it: a new value each eager step compiles nothing (only ints the loss uses in Python are
    passed as given, keyed by value)."""
    batch = _data(jnp.float64)
    opt = ALIASES["bfgs"](None)
    x, y = batch
    fn = lambda p, x, y, step: loss(p, (x, y)) * (1.0 + 0.0 * step)
    params, state = _params(jnp.float64), opt.init(_params(jnp.float64))
    for step in range(5):
        with compiles() as seen:
            updates, state = opt.update(jax.grad(fn)(params, x, y, step), state, params,
                                        value_fn=fn, x=x, y=y, step=step)
            params = jax.block_until_ready(optax.apply_updates(params, updates))
        if step >= 2:
            assert seen.count == 0, (step, seen.names)


@pytest.mark.parametrize("name, form", [(n, "closure") for n in CASES]
                         + [(n, "alias") for n in ALIASES])
def test_inject_hyperparams(name, form):
    """A closure factory, and the alias itself as one writes it for ``optax.adam``
    (``inject_hyperparams(curvlib.newton)(learning_rate=...)``: every numeric default is
    injected too; ``max_params`` of ``newton`` and ``bfgs`` was refused as "not a static
    int")."""
    batch = _data(jnp.float64)
    lr = "lr" if form == "closure" else "learning_rate"
    opt = optax.inject_hyperparams(CASES[name] if form == "closure" else ALIASES[name])(
        **{lr: 0.5})
    params = _params(jnp.float64)
    state = opt.init(params)
    step = jax.jit(_make_step(name, opt))
    p1, s1, _ = step(params, state, batch, batch)
    state = state._replace(hyperparams={**state.hyperparams, lr: jnp.asarray(0.0)})
    p0, _, _ = step(params, state, batch, batch)
    # a zero learning rate leaves the params; the injected value is a traced input
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p0, params))
    assert float(loss(p1, batch)) < float(loss(params, batch))
    assert _all_finite(s1)


@pytest.mark.parametrize("name", list(ALIASES))
def test_bad_learning_rates_and_mismatched_updates_are_named(name):
    make = ALIASES[name]
    for bad in ("0.1", True, jnp.asarray([0.1]), float("nan")):
        with pytest.raises(ValueError, match="`learning_rate` must be"):
            make(bad)
    if name == "svrg":  # first order: no full step to take for ``None``
        with pytest.raises(ValueError, match="`learning_rate` must be .*; got None"):
            make(None)
    opt = make(0.5)
    batch = _data(jnp.float64)
    params = _params(jnp.float64)
    grads = {"w": params["w"]}  # the gradient of another model
    with pytest.raises(ValueError, match=r"`updates` must match `params`.*only in params: \['b'\]"):
        opt.update(grads, opt.init(params), params, value_fn=loss,
                   **_extra(name, batch, batch))


@pytest.mark.parametrize("name", list(CASES))
def test_apply_if_finite_with_nan_loss(name):
    x, y = _data(jnp.float64)
    opt = optax.apply_if_finite(CASES[name](), max_consecutive_errors=5)
    step = jax.jit(_make_step(name, opt))
    params = _params(jnp.float64)
    state = opt.init(params)
    params, state, _ = step(params, state, (x, y), (x, y))
    bad = (x.at[0, 0].set(jnp.nan), y)
    p_bad, state, value = step(params, state, bad, (x, y))
    assert not np.isfinite(float(value))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p_bad, params))
    assert int(state.notfinite_count) == 1
    before = float(loss(p_bad, (x, y)))
    for _ in range(2):
        p_bad, state, _ = step(p_bad, state, (x, y), (x, y))
    assert _all_finite(p_bad) and _all_finite(state.inner_state)
    assert float(loss(p_bad, (x, y))) < before


@pytest.mark.parametrize("name", list(CASES))
def test_multisteps(name):
    batch = _data(jnp.float64)
    opt = optax.MultiSteps(CASES[name](), every_k_schedule=2)
    step = jax.jit(_make_step(name, opt))
    params = _params(jnp.float64)
    state = opt.init(params)
    p1, state, _ = step(params, state, batch, batch)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), p1, params))
    p2, state, _ = step(p1, state, batch, batch)
    assert float(loss(p2, batch)) < float(loss(params, batch))
    assert _all_finite(state)


@pytest.mark.parametrize("name", list(CASES))
def test_value_fn_alone_gives_the_same_steps(name):
    """``update(grads, state, params, value_fn=loss, batch=...)`` without ``value=``/``grad=``:
    the transform computes them itself, and the iterates equal those with them passed."""
    batch = _data(jnp.float64)
    runs = []
    for given in (True, False):
        opt = CASES[name]()
        traces = []
        step = jax.jit(_make_step(name, opt, traces, pass_value_and_grad=given))
        params, state = _params(jnp.float64), opt.init(_params(jnp.float64))
        for _ in range(3):
            params, state, _ = step(params, state, batch, batch)
        assert len(traces) == 1
        runs.append(params)
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert float(loss(runs[1], batch)) < float(loss(_params(jnp.float64), batch))


@pytest.mark.parametrize("name", list(CASES))
def test_the_loop_optax_lbfgs_documents(name):
    """``optax.value_and_grad_from_state`` + ``update(..., value=, grad=, value_fn=)``.

    The value it hands back is the loss at the current parameters (a stored one
    is reused only when it is that), and the loss decreases. For the tracker the
    loop's optimiser is ``chain(track_curvature, optax.lbfgs())``.
    """
    batch = _data(jnp.float64)
    if name == "track_curvature":
        opt = optax.chain(optim.track_curvature(2, 2, key=jax.random.PRNGKey(0)), optax.lbfgs())
    else:
        opt = CASES[name]()
    value_and_grad = optax.value_and_grad_from_state(loss)
    extra = _extra(name, batch, batch)

    @jax.jit
    def step(params, state):
        value, grad = value_and_grad(params, batch, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                    value_fn=loss, **extra)
        return optax.apply_updates(params, updates), state, value, grad

    params = _params(jnp.float64)
    state = opt.init(params)
    first = float(loss(params, batch))
    for _ in range(4):
        before = params
        params, state, value, grad = step(params, state)
        np.testing.assert_allclose(value, loss(before, batch), rtol=1e-12)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(jax.grad(loss)(before, batch)),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    assert float(loss(params, batch)) < first


@pytest.mark.parametrize("name", list(CASES))
def test_flax_nnx_optimizer_step_with_value_fn_only(name):
    """``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, value_fn=...)`` alone."""
    nnx = pytest.importorskip("flax.nnx")
    x, y = _data(jnp.float32)

    model = nnx.Linear(D, K, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, CASES[name](), wrt=nnx.Param)
    graphdef, _ = nnx.split(model)

    def model_loss(m, batch):
        bx, by = batch
        l2 = 1e-2 * (jnp.sum(m.kernel[...] ** 2) + jnp.sum(m.bias[...] ** 2))
        return jnp.mean(optax.softmax_cross_entropy(m(bx), by)) + l2

    def value_fn(params, batch):  # params: the pure nnx.Param state the optimizer passes
        return model_loss(nnx.merge(graphdef, params), batch)

    @nnx.jit
    def train_step(model, optimizer, batch):
        value, grads = nnx.value_and_grad(model_loss)(model, batch)
        extra = {"batch": batch}
        if name == "svrg":
            extra["full_value_fn"] = lambda p: value_fn(p, (x, y))
        optimizer.update(model, grads, value_fn=value_fn, **extra)
        return value

    first = float(train_step(model, optimizer, (x, y)))
    for _ in range(3):
        last = float(train_step(model, optimizer, (x, y)))
    assert last < first


_RECOVERING = {
    **{name: CASES[name] for name in ("newton_cg", "newton", "bfgs", "svrg")},
    "newton_cg+zoom": lambda: optim.newton_cg(
        linesearch=optax.scale_by_zoom_linesearch(10)),
    "newton_cg+backtracking": lambda: optim.newton_cg(
        linesearch=optax.scale_by_backtracking_linesearch(15)),
}


@pytest.mark.parametrize("name", list(_RECOVERING))
def test_a_nan_batch_is_skipped_and_leaves_the_run_as_if_it_never_came(name):
    """A step on a NaN batch (the first step, or one mid-run) leaves the parameters, and the
    state the next steps read, as they were: the clean batches that follow take exactly the
    steps of a run that never saw it. (With an optax line search the NaN step used to leave
    its step size at 0, from which every later search started: the run never moved again;
    `bfgs` skipped at its first step used to take the parameters themselves for the first
    secant pair.)"""
    x, y = _data(jnp.float64)
    bad = (x.at[0, 0].set(jnp.nan), y)
    kind = name.split("+")[0]
    opt = _RECOVERING[name]()
    step = jax.jit(_make_step(kind, opt))

    start = jax.tree.map(lambda a: a + 0.3, _params(jnp.float64))  # (not 0: a real pair start)

    def run(batches):
        params, state, path = start, opt.init(start), []
        for b in batches:
            params, state, _ = step(params, state, b, (x, y))
            path.append(params)
        return path

    clean = run([(x, y)] * 4)
    for at in (0, 2):
        batches = [(x, y)] * 4
        batches.insert(at, bad)
        path = run(batches)
        assert _all_finite(path[at])
        before = start if at == 0 else path[at - 1]
        jax.tree.map(np.testing.assert_array_equal, path[at], before)  # skipped
        for got, want in zip(path[at + 1:], clean[at:], strict=True):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
                         got, want)
    assert float(loss(clean[-1], (x, y))) < float(loss(start, (x, y)))


@pytest.mark.parametrize("name", list(CASES))
def test_a_fresh_state_can_be_donated_and_the_users_arrays_survive(name):
    # jax.jit(step, donate_argnums=...) on a fresh init: a state with one buffer in two
    # leaves raised "Attempt to donate the same buffer twice" (newton_cg, track_curvature),
    # and a state leaf that was the user's own key or damping array was deleted with it
    batch = _data(jnp.float32)
    key, damping = jax.random.PRNGKey(0), jnp.asarray(0.5, jnp.float32)
    opt = {"newton_cg": lambda: optim.newton_cg(damping=damping),
           "track_curvature": lambda: optax.chain(
               optim.track_curvature(1, 1, key=key, num_probes=3), optax.sgd(0.5))}.get(
        name, CASES[name])()
    step = jax.jit(_make_step(name, opt), donate_argnums=(0, 1))
    for _ in range(2):  # a second init after a donated run: nothing shared with the first
        p, s = _params(jnp.float32), opt.init(_params(jnp.float32))
        for _ in range(2):
            p, s, _ = step(p, s, batch, batch)
        assert _all_finite(p)
    assert not key.is_deleted() and not damping.is_deleted()
    # a typed key: its raw data is the state's own buffer (key_data shares the key's)
    typed = jax.random.key(4)
    tracker = optim.track_curvature(1, 1, key=typed, num_probes=3)
    jax.jit(lambda s: s, donate_argnums=0)(tracker.init(_params(jnp.float32)))
    jax.random.split(typed)  # raised "Buffer has been deleted or donated"


def test_newton_runs_on_bfloat16_parameters():
    # LAPACK has no half precision: the dense eigendecomposition raised NotImplementedError
    # ("Unsupported dtype bfloat16"); it runs in float32, the step comes back in bfloat16
    batch = _data(jnp.float32)
    tx = optim.scale_by_newton(damping=0.1)
    p32 = jax.tree.map(lambda x: x + 0.1, _params(jnp.float32))
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
    u16, s16 = tx.update(jax.grad(loss)(p16, batch), tx.init(p16), p16, value_fn=loss,
                         batch=batch)
    u32, _ = tx.update(jax.grad(loss)(p32, batch), tx.init(p32), p32, value_fn=loss,
                       batch=batch)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u16))
    assert bool(s16.info.finite)
    for a, b in zip(jax.tree.leaves(u16), jax.tree.leaves(u32), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.1, atol=0.02)


def test_track_curvature_state_with_a_typed_key_serialises_and_draws_the_same():
    from flax import serialization

    batch = _data(jnp.float32)
    params = jax.tree.map(lambda x: x + 0.1, _params(jnp.float32))
    out = {}
    for kind, key in (("typed", jax.random.key(0)), ("legacy", jax.random.PRNGKey(0))):
        tx = optim.track_curvature(1, 1, key=key, num_probes=3)
        s = tx.init(params)
        s = serialization.from_bytes(s, serialization.to_bytes(s))  # raised for a typed key
        _, s = tx.update(jax.grad(loss)(params, batch), s, params, value_fn=loss, batch=batch)
        out[kind] = s.info
    # a typed threefry key and the legacy key with the same data draw the same numbers
    np.testing.assert_array_equal(out["typed"].eigenvalues, out["legacy"].eigenvalues)
    np.testing.assert_array_equal(out["typed"].trace, out["legacy"].trace)


@pytest.mark.parametrize("name", list(SCALE_BY))
def test_eager_steps_compile_nothing_after_the_first_few(name, compiles):
    """An ``update`` called eagerly (no ``jax.jit`` of the step) compiles its ops once: a
    branch taken on some steps (a refresh, a fallback) is decided in Python, not by a
    ``lax.cond`` of fresh closures that compiled again at every step (a tracker: seconds)."""
    batch = _data(jnp.float64)
    opt = SCALE_BY[name]()
    params = _params(jnp.float64)
    opt = optax.chain(opt, optax.scale(-0.5))
    state, step = opt.init(params), _make_step(name, opt)
    for _ in range(5):  # a refresh (svrg every 4) and its skip both taken
        params, state, _ = step(params, state, batch, batch)
    with compiles() as seen:
        for _ in range(5):
            params, state, value = step(params, state, batch, batch)
        jax.block_until_ready(value)
    assert seen.count == 0, f"{seen.count} compilations in five eager steps"
    assert _all_finite(state)


COMPILED_WHEN_EAGER = {"newton_cg": (optim.scale_by_newton_cg, optim.newton_cg),
                       "newton": (optim.scale_by_newton, optim.newton),
                       "bfgs": (optim.scale_by_bfgs, optim.bfgs)}


@pytest.mark.parametrize("form", ["scale_by", "alias"])
@pytest.mark.parametrize("name", list(COMPILED_WHEN_EAGER))
def test_a_first_eager_step_is_one_program_with_the_jitted_steps_numbers(name, form, compiles):
    """An eager ``update`` ran op by op: 70-120 small programs compiled on its first call
    (3.8-7.2 s for a small MLP against 1.5-2.2 s for the whole step jitted), then 25-70 ms a
    step. Now it is one program: the first call compiles it, the next steps (a new batch
    and a fresh closure computing the same loss included) compile nothing, and every
    step equals that of ``jax.jit(update)`` to rounding."""
    batch = _data(jnp.float64)
    scale_by, alias = COMPILED_WHEN_EAGER[name]
    opt = scale_by() if form == "scale_by" else alias(None)
    sign = -1.0 if form == "scale_by" else 1.0  # (a direction, or the step itself)
    apply = lambda p, u: optax.apply_updates(p, jax.tree.map(lambda v: sign * v, u))  # noqa: E731
    params = _params(jnp.float64)
    eager = jitted = (params, opt.init(params))
    jupdate = jax.jit(lambda g, s, p, b: opt.update(g, s, p, value_fn=loss, batch=b))
    for i in range(4):
        b = (batch[0] + 1e-3 * i, batch[1])
        fn = lambda p, batch: loss(p, batch)  # noqa: E731  (new each step, as in a notebook)
        g = jax.block_until_ready(jax.grad(loss)(eager[0], b))
        with compiles() as seen:
            updates, state = opt.update(g, eager[1], eager[0], value_fn=fn, batch=b)
            jax.block_until_ready(updates)
        assert seen.count <= (1 if i == 0 else 0), (i, seen.names)
        eager = (apply(eager[0], updates), state)
        ju, js = jupdate(jax.grad(loss)(jitted[0], b), jitted[1], jitted[0], b)
        jitted = (apply(jitted[0], ju), js)
        for a, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-9, atol=1e-12)
    assert float(loss(eager[0], batch)) < float(loss(params, batch))


@pytest.mark.parametrize(("name", "form"), [("newton_cg", "closure"), ("newton_cg", "default"),
                                           ("newton", "closure"), ("bfgs", "closure")])
def test_an_eager_step_whose_loss_closes_over_its_batch_is_one_program(name, form, compiles):
    """``value_fn=lambda p: loss(p, (x, y))`` with each step's batch, the way an eager loop
    is written: a new function over new arrays at every step. It ran op by op (``newton``
    0.47 s and ``bfgs`` 0.92 s a step for a small MLP, their line search compiled again at
    every step). Its arrays are now inputs of one program: the steps after the first
    compile nothing, and each equals the step given the batch as an extra argument (the
    same program: to the last bit), whichever way the closure holds the batch."""
    batch = _data(jnp.float64)
    x, y = batch
    alias = COMPILED_WHEN_EAGER[name][1]
    opt = alias(None) if name == "newton_cg" else alias()
    params = _params(jnp.float64)
    closed = routed = (params, opt.init(params))
    for i in range(4):
        xs = x + 1e-3 * i
        # a closure over the batch, or a default argument holding it
        fn = (lambda p, xs=xs: loss(p, (xs, y))) if form == "default" else (
            lambda p: loss(p, (xs, y)))
        g = jax.block_until_ready(jax.grad(loss)(closed[0], (xs, y)))
        with compiles() as seen:
            updates, state = opt.update(g, closed[1], closed[0], value_fn=fn)
            closed = (jax.block_until_ready(optax.apply_updates(closed[0], updates)), state)
        if i >= 1:
            assert seen.count == 0, (i, seen.names)
        g = jax.grad(loss)(routed[0], (xs, y))
        updates, state = opt.update(g, routed[1], routed[0], value_fn=loss, batch=(xs, y))
        routed = (optax.apply_updates(routed[0], updates), state)
        for a, c in zip(jax.tree.leaves(closed), jax.tree.leaves(routed), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    assert float(loss(closed[0], batch)) < float(loss(params, batch))


def test_a_closed_over_custom_rule_keeps_its_step_s_arrays():
    """A loss calling a custom derivative rule that closes over the batch is not made one
    program with its arrays as inputs (the rule is not part of the program's text: a
    program traced at the first step would keep the first batch's rule): its steps run
    op by op and each follows its own batch, as the same step inside ``jax.jit`` does."""
    batch = _data(jnp.float64)
    x, y = batch
    opt = optim.newton_cg(None)

    def closure(xs):
        @jax.custom_jvp
        def data_term(p):
            return loss(p, (xs, y))

        @data_term.defjvp
        def rule(primals, tangents):  # the rule reads this step's batch
            return jax.jvp(lambda q: loss(q, (xs, y)), primals, tangents)

        return lambda p: data_term(p)

    params = _params(jnp.float64)
    eager = jitted = (params, opt.init(params))
    jupdate = jax.jit(lambda g, s, p, xs: opt.update(g, s, p, value_fn=closure(xs)))
    for i in range(3):
        xs = x * (1.0 + 0.5 * i)  # batches far apart: a stale rule would show
        fn = closure(xs)
        updates, state = opt.update(jax.grad(fn)(eager[0]), eager[1], eager[0], value_fn=fn)
        eager = (optax.apply_updates(eager[0], updates), state)
        ju, js = jupdate(jax.grad(fn)(jitted[0]), jitted[1], jitted[0], xs)
        jitted = (optax.apply_updates(jitted[0], ju), js)
        for a, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(COMPILED_WHEN_EAGER))
def test_eager_steps_that_cannot_share_a_program_run_op_by_op(name, compiles):
    """Where one program per step would be compiled, the step runs op by op as before (it
    compiles nothing after the first steps): a transform rebuilt at every step with its
    options as arrays (``optax.inject_hyperparams``). The line search of ``newton`` and
    ``bfgs`` is one program shared by the rebuilt transforms (it compiled again at every
    such step: 0.5 s and 1.2 s a step for a small MLP)."""
    batch = _data(jnp.float64)
    x, y = batch
    opt = optax.inject_hyperparams(COMPILED_WHEN_EAGER[name][1])(learning_rate=0.5)
    params = _params(jnp.float64)
    state = opt.init(params)
    for i in range(5):
        xs = x + 1e-3 * i
        fn = lambda p, batch: loss(p, batch)  # noqa: E731
        g = jax.block_until_ready(jax.grad(fn)(params, (xs, y)))
        with compiles() as seen:
            updates, state = opt.update(g, state, params, value_fn=fn, batch=(xs, y))
            params = jax.block_until_ready(optax.apply_updates(params, updates))
        if i >= 2:
            assert seen.count == 0, (i, seen.names)
    assert float(loss(params, batch)) < float(loss(_params(jnp.float64), batch))


def test_a_closed_over_loss_called_at_other_shapes_runs_op_by_op():
    """The program of a loss whose arrays became inputs is fixed to the shapes it was
    traced at (a mean's divisor, a slice's bounds). A transform that evaluates the loss at
    other shapes (here the first rows of the parameters) gets the eager step instead, with
    its numbers, not an error or a program of the wrong size."""
    from curvlib._chain import compiled_when_eager

    c = jnp.arange(1.0, 5.0, dtype=jnp.float64)

    def update_fn(updates, state, params=None, *, value_fn=None):
        head = value_fn(jax.tree.map(lambda a: a[:2], params))
        return jax.tree.map(lambda u: u * (value_fn(params) + head), updates), state

    wrapped = compiled_when_eager(update_fn)
    params = jnp.array([1.0, -2.0, 0.5, 3.0], jnp.float64)
    for scale in (1.0, 2.0):
        fn = lambda p, w=c * scale: jnp.sum(jnp.tanh(p * w[: p.shape[0]]))  # noqa: E731
        got, _ = wrapped(params, None, params, value_fn=fn)
        want, _ = update_fn(params, None, params, value_fn=fn)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-14)


@pytest.mark.parametrize("form", ["scale_by", "alias"])
def test_an_eager_svrg_step_is_one_program_with_the_jitted_steps_numbers(form, compiles):
    """``svrg`` called eagerly ran op by op (a small MLP's first step 8 s, later ones 20-70
    ms). Its step is now one program with the refresh a ``lax.cond`` inside: both functions
    (``value_fn`` and a fresh ``full_value_fn`` closing over the whole data at every step)
    are keyed by their programs, the data an input, so the steps after the first compile
    nothing, refresh steps included, and each equals the ``jax.jit`` step's."""
    batch = _data(jnp.float64)
    x, y = batch
    opt = optim.scale_by_svrg(2) if form == "scale_by" else optim.svrg(0.5, 2)
    sign = -0.5 if form == "scale_by" else 1.0
    apply = lambda p, u: optax.apply_updates(p, jax.tree.map(lambda v: sign * v, u))  # noqa: E731
    params = _params(jnp.float64)
    eager = jitted = (params, opt.init(params))
    jupdate = jax.jit(lambda g, s, p, b: opt.update(
        g, s, p, value_fn=loss, batch=b, full_value_fn=lambda q: loss(q, (x, y))))
    refreshed = []
    for i in range(5):
        b = (x[4 * i: 4 * i + 4], y[4 * i: 4 * i + 4])  # a new minibatch each step
        g = jax.block_until_ready(jax.grad(loss)(eager[0], b))
        with compiles() as seen:
            updates, state = opt.update(g, eager[1], eager[0], value_fn=loss, batch=b,
                                        full_value_fn=lambda q: loss(q, (x, y)))
            jax.block_until_ready(updates)
        assert seen.count <= (1 if i == 0 else 0), (i, seen.names)
        refreshed.append(bool((state if form == "scale_by" else state[0]).info.refreshed))
        eager = (apply(eager[0], updates), state)
        ju, js = jupdate(jax.grad(loss)(jitted[0], b), jitted[1], jitted[0], b)
        jitted = (apply(jitted[0], ju), js)
        for a, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-9, atol=1e-12)
    assert refreshed == [True, False, True, False, True]  # (since the first snapshot: 2 steps)
    assert float(loss(eager[0], batch)) < float(loss(params, batch))
