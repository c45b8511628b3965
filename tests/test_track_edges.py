"""Edges of `track_curvature` and its reports: skipped refreshes in the history, records kept
in a deque or a generator, donated states, non-positive losses in the plot, refused arguments.
Every eigenvalue is checked against the dense Hessian (``numpy.linalg.eigvalsh``)."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import curvlib

_A = jnp.array([4.0, 3.0, 1.0, 0.5])


def _loss(p, poison=False):
    value = 0.5 * jnp.sum(_A * p["w"] ** 2) + 0.25 * jnp.sum(p["b"] ** 4) + jnp.sum(
        p["w"][:2] * p["b"])
    return value * jnp.where(poison, jnp.nan, 1.0)


def _dense_top(p, k):
    flat, unravel = ravel_pytree(p)
    H = np.asarray(jax.hessian(lambda v: _loss(unravel(v)))(flat))
    return np.sort(np.linalg.eigvalsh(H))[::-1][:k]


_P0 = {"w": jnp.ones(4), "b": jnp.full(2, 0.5)}


@functools.cache
def _step(donate=False):
    """A jitted tracked SGD step whose measured loss is NaN when ``poison`` (gradient finite)."""
    opt = optax.chain(
        curvlib.track_curvature(2, 2, key=jax.random.PRNGKey(0), num_probes=0,
                                eigsh=curvlib.Eigsh(rtol=1e-8, verify=False)),
        optax.sgd(0.05),
    )

    def step(p, state, poison):
        u, state = opt.update(jax.grad(_loss)(p), state, p, value_fn=_loss, poison=poison)
        return optax.apply_updates(p, u), state

    return opt, jax.jit(step, donate_argnums=(0, 1) if donate else ())


def _run(num_steps, poisoned=(), donate=False):
    opt, step = _step(donate)
    p = jax.tree.map(jnp.copy, _P0)
    state, params, infos = opt.init(p), [], []
    for t in range(num_steps):
        params.append(jax.tree.map(np.asarray, p))
        p, state = step(p, state, t in poisoned)
        infos.append(curvlib.curvature_info(state))
    return params, infos


def test_history_flags_the_refresh_skipped_after_a_row():
    """A refresh that meets a NaN loss keeps the previous values and step: the history's
    ``skipped`` column says so on the row whose values were held (it was always False)."""
    params, infos = _run(9, poisoned=(4,))
    assert bool(infos[4].skipped)  # the info itself says so
    h = curvlib.curvature_history(infos)
    np.testing.assert_array_equal(h["step"], [0, 2, 6, 8])
    np.testing.assert_array_equal(h["skipped"], [False, True, False, False])
    for s, ev in zip(h["step"], h["eigenvalues"], strict=True):  # measured at its step
        np.testing.assert_allclose(ev, _dense_top(params[s], 2), rtol=1e-10)
    # one record per refresh only (no row of a held step): the flag comes from a later record
    np.testing.assert_array_equal(curvlib.curvature_history(infos[:4])["skipped"], [False, False])


def test_history_reads_a_deque_and_a_generator():
    """A ``collections.deque`` is a sequence, as the docs ask (it raised a KeyError saying the
    state holds no TrackCurvatureInfo); a generator of infos is read too."""
    params, infos = _run(7)
    recent = collections.deque(infos, maxlen=4)  # steps 3..6: refreshes 2, 4, 6
    want = curvlib.curvature_history(list(recent))
    np.testing.assert_array_equal(want["step"], [2, 4, 6])
    for records in (recent, (i for i in recent)):
        h = curvlib.curvature_history(records)
        assert h.keys() == want.keys()
        for c in want:
            np.testing.assert_array_equal(h[c], want[c])
    for s, ev in zip(want["step"], want["eigenvalues"], strict=True):
        np.testing.assert_allclose(ev, _dense_top(params[s], 2), rtol=1e-10)


def test_infos_stay_readable_when_the_step_donates_the_state():
    """``curvature_info`` appended after a step that donates the state (``donate_argnums``):
    the history is built after the run (it raised 'Array has been deleted')."""
    params, infos = _run(5, donate=True)
    h = curvlib.curvature_history(infos)
    np.testing.assert_array_equal(h["step"], [0, 2, 4])
    for s, ev in zip(h["step"], h["eigenvalues"], strict=True):
        np.testing.assert_allclose(ev, _dense_top(params[s], 2), rtol=1e-10)


def test_plot_curvature_draws_losses_that_are_not_positive():
    """A loss <= 0 (a negative log-likelihood of densities) is drawn on a linear axis; on the
    log axis the panel was empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = np.array([-1.0, -2.5, -3.0])
    h = {"step": np.array([0, 10, 20]), "loss": loss,
         "eigenvalues": np.array([[8.0, 3.0], [9.0, 3.5], [9.5, 3.6]]),
         "trace": np.array([20.0, 21.0, 21.5]), "grad_fraction": np.array([0.9, 0.7, 0.6])}
    fig = curvlib.plot_curvature(h)
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"
    lo, hi = ax.get_ylim()
    assert lo <= loss.min() and loss.max() <= hi
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), loss)
    h["loss"] = np.array([1.0, 0.5, np.nan])  # positive (NaN aside): the log axis stays
    assert curvlib.plot_curvature(h).axes[0].get_yscale() == "log"
    plt.close("all")


@pytest.mark.parametrize("call, name", [
    (lambda: curvlib.track_curvature(1, 1, key=jax.random.PRNGKey(0), warm_noise=np.inf),
     "warm_noise"),
    (lambda: curvlib.format_curvature_table({"step": np.arange(2)}, max_rows=-1), "max_rows"),
    (lambda: curvlib.plot_curvature({"step": np.arange(2)}, learning_rate=0.0), "learning_rate"),
])
def test_meaningless_arguments_are_refused_by_name(call, name):
    """``warm_noise=inf`` made every warm start non-finite (each refresh after the first skipped);
    ``max_rows=-1`` printed a header alone; ``learning_rate=0`` raised ZeroDivisionError."""
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        call()


def test_plot_curvature_on_a_grid_of_axes():
    """``axes=plt.subplots(2, 2)[1]`` (four axes in a 2 x 2 array) is drawn in reading order
    (it raised AttributeError: 'numpy.ndarray' object has no attribute 'figure'); three axes are
    refused by name before anything is drawn (an IndexError after three panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = np.array([[8.0, 3.0], [9.0, 3.5]])
    h = {"step": np.array([0, 10]), "loss": np.array([1.0, 0.5]), "eigenvalues": ev,
         "trace": np.array([20.0, 21.0]), "grad_fraction": np.array([0.9, 0.7])}
    fig, grid = plt.subplots(2, 2)
    assert curvlib.plot_curvature(h, axes=grid) is fig
    np.testing.assert_array_equal(grid[0, 1].lines[0].get_ydata(), ev[:, 0])  # the eigenvalues
    np.testing.assert_array_equal(grid[1, 1].lines[0].get_ydata(), h["grad_fraction"])
    _, three = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="`axes` must be four matplotlib axes; got 3"):
        curvlib.plot_curvature(h, axes=three)
    assert not any(a.lines for a in three)
    plt.close("all")
