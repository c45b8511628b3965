"""Every public entry point that takes a loss refuses a per-sample (vector) loss the same way.

A per-sample loss ``l(w, batch) -> (n,)`` is not the mean loss curvature is defined for. The
Hessian product refused it; ``landscape.curvature_subspace`` accepted it and returned
eigenvalues ~127.6 and ~59.3 with ``converged=True`` on a problem whose true top two are
~1.9 and ~1.4 (the dense oracle below), and the coefficient and Monte Carlo estimators
failed deep inside with "Cannot stack arrays with different numbers of dimensions".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib
from curvlib import landscape, optim

N, DIM = 8, 3
MATCH = (r"`(fun|loss_fn|value_fn)` must return a scalar loss \(shape \(\)\); it returned "
         r"shape \(\d+,\)\. A per-sample loss is not accepted")


def _problem():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (N, DIM))
    y = x @ jnp.array([1.0, -2.0, 0.5])
    w = 0.1 * jnp.ones(DIM)
    return w, (x, y)


def per_sample(w, batch):
    x, y = batch
    return 0.5 * (x @ w - y) ** 2 + 0.1 * jnp.sin(x @ w)  # shape (n,): NOT reduced


def mean_loss(w, batch):
    return jnp.mean(per_sample(w, batch))


def _entry_points():
    w, data = _problem()
    key = jax.random.PRNGKey(1)
    U = jnp.eye(DIM)[:2]
    xy = lambda f: (lambda p, x, y: f(p, (x, y)))
    return {
        "hessian_matvec": lambda f: curvlib.hessian_matvec(f, w, data),
        "hvp": lambda f: curvlib.hvp(f, w, w, data),
        "gradient": lambda f: curvlib.gradient(f, w, data),
        "gradient_microbatched": lambda f: curvlib.gradient(f, w, data, microbatch_size=4),
        "ggn_matvec": lambda f: curvlib.ggn_matvec(lambda p: p, lambda o: f(o, data), w),
        "stream_gradient": lambda f: curvlib.stream_gradient(
            f, w, [jax.tree.map(lambda a: a[:4], data), jax.tree.map(lambda a: a[4:], data)]),
        "curvature_subspace": lambda f: landscape.curvature_subspace(f, w, data, 6, 2, key=key),
        "increment_coefficients": lambda f: landscape.increment_coefficients(f, w, data, 4, U),
        "loss_increment": lambda f: landscape.loss_increment(f, w, data, 4),
        "check_mean_loss": lambda f: landscape.check_mean_loss(f, w, data, 4),
        "delta1": lambda f: landscape.delta1(f, w, data, 4),
        "delta1_unchecked": lambda f: landscape.delta1(f, w, data, 4, check_mean=False),
        "delta2_direct_mc": lambda f: landscape.delta2_direct_mc(
            f, w, data, 4, U, 0.1, key=key, num_samples=4, check_mean=False),
        "delta2_full_mc": lambda f: landscape.delta2_full_mc(
            f, w, data, 4, 0.1, key=key, num_samples=4, check_mean=False),
        "k_curve": lambda f: landscape.k_curve(f, w, data, [2], dims=[1], sigmas=[0.1],
                                               key=key, progress=False),
        "newton_cg": lambda f: _update(optim.newton_cg(), w, xy(f), data),
        "newton": lambda f: _update(optim.newton(), w, xy(f), data),
        "bfgs": lambda f: _update(optim.bfgs(), w, xy(f), data),
        "track_curvature": lambda f: _update(optim.track_curvature(1, 1, key=key), w, xy(f),
                                             data),
    }


def _update(tx, w, value_fn, data):
    x, y = data
    return tx.update(w, tx.init(w), w, value_fn=value_fn, x=x, y=y)


ENTRY_POINTS = sorted(_entry_points())


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_per_sample_loss_is_refused_the_same_way(name):
    call = _entry_points()[name]
    with pytest.raises(ValueError, match=MATCH) as err:
        call(per_sample)
    assert isinstance(err.value, TypeError)  # what the operators raised before: still caught
    # the shape the user's data gives (k_curve said (16,) for 32 samples: its trimmed copy)
    n = 4 if name == "stream_gradient" else len(_problem()[1][0])
    assert f"it returned shape ({n},)" in str(err.value)


def test_the_mean_loss_passes_and_the_subspace_matches_the_dense_oracle():
    """The accepted (mean) loss gives the top Hessian eigenvalues of L_k (numpy oracle)."""
    w, data = _problem()
    k = 6
    sub = landscape.curvature_subspace(mean_loss, w, data, k, 2, key=jax.random.PRNGKey(1))
    Lk = lambda p: mean_loss(p, jax.tree.map(lambda a: a[:k], data))
    dense = np.linalg.eigvalsh(np.asarray(jax.hessian(Lk)(w), np.float64))[::-1][:2]
    np.testing.assert_allclose(np.asarray(sub.eigenvalues), dense, rtol=1e-4, atol=1e-5)
    assert bool(sub.converged)
    for name in ("loss_increment", "delta1", "increment_coefficients"):  # accepted, finite
        out = _entry_points()[name](mean_loss)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_entry_point_accepts_the_mean_loss(name):
    _entry_points()[name](mean_loss)
