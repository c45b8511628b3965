"""The landscape says when its top-D subspace is not unique (a tie at D, or D beyond the rank)."""

import jax
import jax.numpy as jnp
import numpy as np

from curvlib.landscape import curve_to_dict, k_curve
from curvlib.landscape.subspace import unique_prefixes


def test_unique_prefixes_against_a_dense_spectrum():
    lam = np.array([5.0, 3.0, 3.0 * (1 + 1e-12), 1.0, 1e-18, -1e-18])
    lam = np.sort(lam)[::-1]
    got = unique_prefixes(lam, np.full(6, 1e-14), [1, 2, 3, 4, 5, 6])
    # D=1 unique; D=2 splits the tie 3 ~ 3; D=3 unique (tie inside); D=4 unique (1 > 0);
    # D=5 and D=6 hold numerically zero eigenvalues (beyond the rank)
    assert got.tolist() == [True, False, True, True, False, False]
    # a wide gap is unique at any residual within it; a NaN residual is never a certificate
    assert unique_prefixes(np.array([2.0, 1.0]), np.array([0.1, 0.1]), [1]).tolist() == [True]
    assert unique_prefixes(np.array([2.0, 1.0]), np.array([0.6, 0.6]), [1]).tolist() == [False]
    assert unique_prefixes(np.array([2.0, 1.0]), np.array([np.nan, 0.0]), [1]).tolist() == [False]


def test_k_curve_flags_dimensions_beyond_the_rank_of_the_hessian():
    # exactly quadratic: H^(k) = X_k^T X_k / k has rank k (generic rows); with k = 2, D = 3
    # exceeds it and U_3 holds an arbitrary null-space direction
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
    loss = lambda w, b: 0.5 * jnp.mean((b @ w) ** 2)
    c = k_curve(loss, 0.1 * jnp.ones(6), x, [2, 4], dims=[1, 2, 3], sigmas=[1e-2],
                key=jax.random.PRNGKey(1), progress=False)
    H2 = np.asarray(x[:2], np.float64).T @ np.asarray(x[:2], np.float64) / 2
    assert np.linalg.matrix_rank(H2) == 2  # the dense oracle: rank 2 at k = 2
    assert c.converged.all()
    assert c.unique.tolist() == [[True, True, False], [True, True, True]]
    assert curve_to_dict(c)["unique"] == c.unique.tolist()


def test_k_curve_flags_a_tie_at_the_boundary():
    # H^(k) = diag(4, 1, 1, 0.25) / k-independent: a loss whose Hessian has a double
    # eigenvalue; D = 2 splits it, D = 1 and D = 3 do not
    d = jnp.array([4.0, 1.0, 1.0, 0.25])
    loss = lambda w, b: jnp.mean(0.5 * jnp.sum(d * w * w) + b @ w)
    data = jax.random.normal(jax.random.PRNGKey(2), (6, 4))
    c = k_curve(loss, jnp.zeros(4), data, [2], dims=[1, 2, 3], sigmas=[1e-2],
                key=jax.random.PRNGKey(3), progress=False)
    np.testing.assert_allclose(c.eigenvalues[0], [4.0, 1.0, 1.0], rtol=1e-6)
    assert c.unique.tolist() == [[True, False, True]]


def test_a_small_simple_eigenvalue_with_a_gap_is_unique():
    """A zero or small ``lambda_D`` is a tie only with its neighbour: an indefinite Hessian's
    zero eigenvalue between 2 and -1 splits nothing, and a float32 spectrum far below
    ``||H||`` but with gaps a thousand times the rounding is unique at every ``D``."""
    assert unique_prefixes(np.array([2.0, 0.0, -1.0]), np.zeros(3), [1, 2]).tolist() == [
        True, True]
    lam = np.array([100.0, 0.02, 0.005, 0.001], np.float32)
    assert unique_prefixes(lam, np.zeros(4, np.float32), [1, 2, 3]).tolist() == [True] * 3
    # D = 2 with the next value computed is unique; the largest D has no next value to
    # compare: a zero there is still flagged
    assert unique_prefixes(np.array([2.0, 0.0, -1.0]), np.zeros(3), [2, 3]).tolist() == [
        True, True]
    assert unique_prefixes(np.array([2.0, 0.0]), np.zeros(2), [2]).tolist() == [False]
