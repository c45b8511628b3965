"""The pieces behind eigsh's ``converged=True``, each against hand-computed values.

``eigsh`` certifies a pair when its residual is below a threshold, and ends
verification when a fresh random block finds fewer new wanted values than it
holds; the probabilistic guard of Kuczynski & Wozniakowski decides when no
eigenvalue beyond the wanted ones is likely missed. These are pure functions of
a few small arrays, so they are checked directly (no products, nothing compiled
but a few tiny eager ops) against values worked out by hand or written out from
the formulas of their docstrings in NumPy, at the boundaries where a changed
comparison or constant flips the answer. Written against the mutants of
mutation run 3 (docs/testing.md); the end-to-end checks of these decisions are
in test_eigsh_certified.py.
"""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvlib
from curvlib.krylov import _band, eigen

# ------------------------------------------------------------------ _count_new


def _count(which, new, ref, thr_new, thr_ref, pad=(7.0, -7.0, 0.0)):
    """`_count_new` on the values as given, checked against the same values padded beyond
    ``k`` with values that would count (the padding of the answer-now steps), and against
    ``which`` given as its traced code."""
    f = jnp.float64
    k = len(new)

    def count(order, extra):
        def arr(x, fill):
            return jnp.asarray(list(x) + [fill] * len(extra), f)
        return int(eigen._count_new(order, jnp.asarray(list(new) + list(extra), f),
                                    arr(ref, -9.0), arr(thr_new, 9.0), arr(thr_ref, 0.0),
                                    jnp.int32(k)))

    plain = count(_band.Order(which), [])
    assert count(_band.Order(which), pad) == plain
    assert count(_band.Order(jnp.int32(_band.Order.CODES[which])), pad) == plain
    return plain


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_count_new_counts_the_values_no_old_value_accounts_for(which):
    """Multiset difference of wanted values, for every ordering (hand-computed counts)."""
    s = -1.0 if which == "SA" else 1.0  # SA: the same cases mirrored
    z = [0.0, 0.0, 0.0]
    # nothing new: the same values again
    assert _count(which, [s * 3, s * 2, s * 1], [s * 3, s * 2, s * 1], z, z) == 0
    # a second copy of 3 pushes 1 out: one new value
    assert _count(which, [s * 3, s * 3, s * 2], [s * 3, s * 2, s * 1], z, z) == 1
    # three copies of 3 replace 2 and 1: two new values
    assert _count(which, [s * 3, s * 3, s * 3], [s * 3, s * 2, s * 1], z, z) == 2
    # a value pushing in from beyond the old best: one new value
    assert _count(which, [s * 4, s * 3, s * 2], [s * 3, s * 2, s * 1], z, z) == 1
    # old values better than every new one (never from Rayleigh-Ritz): zero, not negative
    assert _count(which, [s * 2, s * 1, s * 0.5], [s * 3, s * 3, s * 3], z, z) == 0
    # two copies of the best: two new, none accounted for
    assert _count(which, [s * 5, s * 5, s * 3], [s * 3, s * 2, s * 1], z, z) == 2


def test_count_new_tolerance_is_twice_the_summed_thresholds_inclusive():
    """Old ``r`` accounts for new ``t`` iff ``r >= t - 2 (thr_t + thr_r)`` (binary-exact cases)."""
    # gap 0.5, thresholds 0.125 + 0.125: exactly at the tolerance -> accounted for
    assert _count("LA", [1.5], [1.0], [0.125], [0.125]) == 0
    # a gap beyond it -> new
    assert _count("LA", [1.625], [1.0], [0.125], [0.125]) == 1
    # the two thresholds add (not subtract): one of them alone is not enough
    assert _count("LA", [1.5], [1.0], [0.25], [0.0]) == 0
    assert _count("LA", [1.5], [1.0], [0.0], [0.25]) == 0
    assert _count("LA", [1.5], [1.0], [0.125], [0.0]) == 1
    # the tolerance widens the old value towards the new one only: an old value far *beyond*
    # a new one accounts for it (it was there before), and SA mirrors LA
    assert _count("SA", [-1.5], [-1.0], [0.125], [0.125]) == 0
    assert _count("SA", [-1.625], [-1.0], [0.125], [0.125]) == 1
    # LM compares magnitudes: -1.5 is as new against 1.0 as 1.5 is
    assert _count("LM", [-1.625], [1.0], [0.125], [0.125]) == 1
    assert _count("LM", [-1.5], [1.0], [0.125], [0.125]) == 0


# ------------------------------------------------------------ _largest_cluster


def _cluster(theta, thr):
    """`_largest_cluster` of the values, the same with copies padded beyond ``k``."""
    f = jnp.float64
    plain = int(eigen._largest_cluster(jnp.asarray(theta, f), jnp.asarray(thr, f),
                                       jnp.int32(len(theta))))
    padded = eigen._largest_cluster(jnp.asarray(list(theta) + [theta[0]] * 5, f),
                                    jnp.asarray(list(thr) + [1.0] * 5, f), jnp.int32(len(theta)))
    assert int(padded) == plain
    return plain


def _guard(theta, ref, k, thr=1e-3):
    theta, ref = jnp.asarray(theta), jnp.asarray(ref + [0.0] * (len(theta) - len(ref)))
    t = jnp.full(len(theta), thr)
    g, ok = eigen._guard(theta, jnp.ones(len(theta), bool), t, ref, t, k)
    return int(g) if bool(ok) else None


def test_the_guard_skips_the_copies_a_round_pushed_out_of_the_wanted_set():
    """The guard is the first unwanted value left after skipping, value by value, as many
    copies as the round displaced from the wanted set (copies in ``ref`` less copies wanted
    now): a pair certified before the round is not the fresh block's certificate."""
    # nothing displaced: the guard is theta[k], whatever ref holds
    assert _guard([9.0, 8.0, 7.0, 6.0], [9.0, 8.0], 2) == 2
    assert _guard([9.0, 8.0, 8.0, 6.0], [9.0, 8.0], 2) == 2  # a fresh copy of a wanted value
    # a new 9.5 pushed 8 out: the 8 below is the displaced pair, the 7 is the guard
    assert _guard([9.5, 9.0, 8.0, 7.0], [9.0, 8.0], 2) == 3
    # two copies of 8 wanted, one displaced: only one of the unwanted copies is skipped
    assert _guard([9.5, 8.0, 8.0, 8.0, 7.0], [8.0, 8.0], 2) == 3
    # every unwanted value repeats a displaced one and there are more copies than displaced
    # (a deflated space of zeros): no deadlock, the first copy past the displaced ones
    assert _guard([2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 1.0, 0.0], 4) == 6
    # within thresholds (inclusive, 2 (thr_i + thr_j)): 8.004 repeats 8; 8.005 does not
    assert _guard([9.5, 9.0, 8.004, 7.0], [9.0, 8.0], 2) == 3
    assert _guard([9.5, 9.0, 8.0041, 7.0], [9.0, 8.0], 2) == 2
    # nothing unwanted left but displaced copies: no guard
    assert _guard([9.5, 9.0, 8.0], [9.0, 8.0], 2) is None


def test_largest_cluster_is_the_largest_group_equal_within_thresholds():
    """``|theta_i - theta_j| <= 2 (thr_i + thr_j)``, inclusive; the largest row count."""
    t = [0.125] * 4
    assert _cluster([5.0, 4.0, 3.0, 2.0], t) == 1  # all separated
    assert _cluster([5.0, 5.0, 5.0, 2.0], t) == 3  # three copies
    assert _cluster([5.0, 5.0, 2.0, 2.0], t) == 2  # two pairs: the largest group, not the sum
    # exactly 2 (0.125 + 0.125) = 0.5 apart: equal; 0.75 apart: not
    assert _cluster([3.0, 3.5, 4.25, -7.0], t) == 2
    # thresholds add: 3.0 and 3.5 with thresholds (0.25, 0) are equal, with (0.125, 0) not
    assert _cluster([3.0, 3.5], [0.25, 0.0]) == 2
    assert _cluster([3.0, 3.5], [0.125, 0.0]) == 1
    # values of opposite sign are not close because their magnitudes are
    assert _cluster([2.0, -2.0], [0.125, 0.125]) == 1


def _cluster_res(theta, res, thr, valid=None):
    f = jnp.float64
    valid = [True] * len(theta) if valid is None else valid
    return np.asarray(eigen._cluster_residuals(jnp.asarray(theta, f), jnp.asarray(res, f),
                                               jnp.asarray(thr, f), jnp.asarray(valid)))


def test_cluster_residuals_are_the_norm_over_each_cluster():
    """``sqrt(sum_j res_j^2)`` over the valid values equal within thresholds; alone otherwise."""
    t = [0.125] * 4
    np.testing.assert_allclose(_cluster_res([5.0, 4.0, 3.0, 2.0], [3.0, 4.0, 0.5, 1.0], t),
                               [3.0, 4.0, 0.5, 1.0])  # simple values: their own residual
    np.testing.assert_allclose(_cluster_res([5.0, 5.0, 5.0, 2.0], [3.0, 4.0, 0.0, 1.0], t),
                               [5.0, 5.0, 5.0, 1.0])  # a triple: the norm of its three
    # an invalid row neither counts nor is counted
    np.testing.assert_allclose(
        _cluster_res([5.0, 5.0, 5.0, 2.0], [3.0, 4.0, 12.0, 1.0], t, [True, True, False, True])[
            [0, 1, 3]], [5.0, 5.0, 1.0])
    # scale-safe: residuals whose squares overflow float64
    np.testing.assert_allclose(_cluster_res([5.0, 5.0], [3e200, 4e200], t[:2]), [5e200] * 2)
    # equal within 2 (thr_i + thr_j), inclusive (binary-exact gaps), as `_largest_cluster`
    np.testing.assert_allclose(_cluster_res([3.0, 3.5], [3.0, 4.0], [0.125, 0.125]), [5.0] * 2)
    np.testing.assert_allclose(_cluster_res([3.0, 3.75], [3.0, 4.0], [0.125, 0.125]),
                               [3.0, 4.0])
    # the thresholds add, whichever value holds the larger one
    np.testing.assert_allclose(_cluster_res([3.0, 3.5], [3.0, 4.0], [0.25, 0.0]), [5.0] * 2)
    np.testing.assert_allclose(_cluster_res([3.0, 3.5], [3.0, 4.0], [0.0, 0.25]), [5.0] * 2)


def test_a_clusters_bound_holds_for_every_rotation_of_its_vectors():
    """The reason for the cluster norm: rotating a degenerate cluster's Ritz vectors (what
    another ``eigh`` may return) changes each vector's residual but never beyond the bound."""
    rng = np.random.default_rng(0)
    R = rng.standard_normal((50, 3)) * 1e-3  # residual vectors of three equal-valued pairs
    bound = _cluster_res([5.0] * 3, np.linalg.norm(R, axis=0), [1e-6] * 3)
    for _ in range(20):
        U, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        rotated = np.linalg.norm(R @ U, axis=0)
        assert np.all(rotated <= bound * (1 + 1e-12))
        np.testing.assert_allclose(_cluster_res([5.0] * 3, rotated, [1e-6] * 3), bound)


def _two_fives(coupling):
    """A band whose multiplied rows hold ``diag(5, 5, 1)`` with one pending row coupled to the
    two fives by ``coupling`` each: the per-vector residuals are ``coupling``, the pair's
    norm ``sqrt(2) coupling``."""
    m = 6
    H = np.zeros((m, m))
    H[[0, 1, 2], [0, 1, 2]] = 5.0, 5.0, 1.0
    H[3, :2] = coupling
    return _band.init(jnp.ones(40), m, jnp.float64)._replace(
        H=jnp.asarray(H), mult=jnp.asarray([True] * 3 + [False] * 3), nbas=jnp.int32(4),
        anorm=jnp.float64(5.0))


@pytest.mark.parametrize("ratio, certified", [(0.8, False), (0.6, True)])
def test_a_repeated_value_is_certified_by_its_clusters_norm(ratio, certified):
    """``k = 2`` wanted copies of 5, ``rtol = 1e-3`` (threshold 5e-3): residuals of 0.8 of the
    threshold each pass one by one but their norm (1.13) does not; 0.6 each (0.85) does."""
    cfg = _cfg(m=6, k=2, dim=40)
    s = SimpleNamespace(k=jnp.int32(2), tol=jnp.float64(1e-3), phase=jnp.int32(0),
                        to_inject=jnp.int32(0), injected=jnp.int32(0), fresh=jnp.int32(0),
                        filtered=jnp.int32(0),
                        near=jnp.int32(0), ref=jnp.zeros(6), max_inject=jnp.int32(4),
                        which=jnp.int32(0))
    band = _two_fives(ratio * 5e-3)
    res = np.asarray(_band.ritz(band, _band.Order("LA"))[2][:2])
    np.testing.assert_allclose(res, ratio * 5e-3, rtol=1e-12)  # each below the threshold
    assert bool(eigen._evaluate(cfg, s, band).search_cert) is certified


def _three_chains(seed, n=30, m=16):
    """``(rng, A, v0, band)``: a random symmetric ``A`` and a band of ``m`` rows that has run
    three chains (``v0`` and two fresh rows) for 9 products: three pending rows."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((n, n))
    A = jnp.asarray((B + B.T) / 2)
    v0 = jnp.asarray(rng.standard_normal(n))
    band = _band.init(v0, m, jnp.float64, num_external=4)
    for _ in range(2):
        q, ok = _band.fresh(band, jnp.asarray(rng.standard_normal(n)), jnp.asarray(True))
        band = _band.inject(band, q, ok)
    for _ in range(9):
        band = _band.absorb(band, A @ _band.request(band, v0))
    return rng, A, v0, band


def _assert_bounds_hold(band, A, *bounds):
    """Each of ``bounds(band, Y)`` lies between the true residual of every valid Ritz pair
    (dense oracle) and twice it; returns `_band.ritz`'s ``(theta, Y, res, valid)``."""
    theta, Y, res, valid = _band.ritz(band, _band.Order("LA"))
    X = np.asarray(Y).T @ np.asarray(band.Q)
    true = np.linalg.norm(X @ np.asarray(A) - np.asarray(theta)[:, None] * X, axis=1)
    both = np.asarray(valid) & (true > 1e-10)
    assert both.sum() >= 5
    for bound in bounds:
        b = np.asarray(bound(band, Y))[both]
        assert np.all(b >= true[both] * (1 - 1e-10)) and np.all(b <= 2 * true[both])
    return theta, Y, res, valid


def test_residual_bounds_hold_with_dropped_and_pending_parts():
    """After a drop, a fresh chain adds pending rows: the bound ``||F y|| + ||dropped part||``
    is at least the true residual of every Ritz pair (dense oracle), and at most twice it."""
    rng, A, v0, band = _three_chains(2)
    n, m = A.shape[0], _band.size(band)
    theta, Y, _, _ = _band.ritz(band, _band.Order("LA"))
    band = _band.compress(band, Y, jnp.int32(4), drop_pending=jnp.asarray(True))
    q, ok = _band.fresh(band, jnp.asarray(rng.standard_normal(n)), jnp.asarray(True))
    band = _band.inject(band, q, ok)
    for _ in range(3):
        band = _band.absorb(band, A @ _band.request(band, v0))
    theta, Y, bound, _ = _assert_bounds_hold(band, A, _band.residual_norms)
    # a second drop: the earlier dropped vectors, projected off the basis, are no longer
    # orthogonal (Gram entries of 0.2 here); with no pending row left the bound is the norm of
    # the dropped part alone, through their Gram matrix: the true residual
    K = 4
    kept = _band.compress(band, Y, jnp.int32(K), drop_pending=jnp.asarray(True))
    c = int(kept.ndrop)
    Dm = np.asarray(kept.D)[:c]
    assert c == 4 and np.max(np.abs(Dm @ Dm.T - np.eye(c))) > 0.1
    X = np.asarray(Y[:, :K]).T @ np.asarray(band.Q)
    true = np.linalg.norm(X @ np.asarray(A) - np.asarray(theta[:K])[:, None] * X, axis=1)
    np.testing.assert_allclose(np.asarray(_band.residual_norms(kept, jnp.eye(m)[:, :K])), true,
                               rtol=1e-8)


def test_dropping_pending_rows_keeps_the_residual_norms():
    """A verification round drops the pending rows of three chains: the kept pairs' residual
    bounds stay their norms before the drop, which are the true residuals (dense oracle).

    (A sum of the couplings to each dropped row, instead of their norm, grew by up to
    ``sqrt(3)`` here: a pair certified before the round could fail after it.)
    """
    _, A, _, band = _three_chains(1)
    m = _band.size(band)
    assert int(jnp.sum(_band.pending(band))) == 3
    theta, Y, res, _ = _band.ritz(band, _band.Order("LA"))
    K = 3
    Q = np.asarray(band.Q)
    X = np.asarray(Y[:, :K]).T @ Q
    true = np.linalg.norm(X @ np.asarray(A) - np.asarray(theta[:K])[:, None] * X, axis=1)
    np.testing.assert_allclose(np.asarray(res[:K]), true, rtol=1e-8)
    kept = _band.compress(band, Y, jnp.int32(K), drop_pending=jnp.asarray(True))
    assert int(kept.ndrop) == 3 and int(jnp.sum(_band.pending(kept))) == 0
    eye = jnp.eye(m)[:, :K]
    np.testing.assert_allclose(np.asarray(_band.residual_norms(kept, eye)), true, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(_band.exact_residuals(kept, eye)), true, rtol=1e-8)


def test_rows_dropped_beyond_the_stored_slots_leave_no_chain_pending():
    """Three pending chains dropped with one slot for a stored vector: one is stored, the other
    two are not, and none is carried (a carried chain stayed pending through every later
    round, and a run with many rounds restarted at every product). Their couplings move to the
    bound ``U``: every residual bound, at the drop and after a fresh chain has run on, is at
    least the true residual (dense oracle) and at most twice it."""
    rng, A, v0, band = _three_chains(3)
    band = _band.init(v0, _band.size(band), jnp.float64, num_external=1)
    for _ in range(2):
        q, ok = _band.fresh(band, jnp.asarray(rng.standard_normal(A.shape[0])), jnp.asarray(True))
        band = _band.inject(band, q, ok)
    for _ in range(9):
        band = _band.absorb(band, A @ _band.request(band, v0))
    n, m, K = A.shape[0], _band.size(band), 3
    theta, Y, _, _ = _band.ritz(band, _band.Order("LA"))
    X = np.asarray(Y[:, :K]).T @ np.asarray(band.Q)
    true = np.linalg.norm(X @ np.asarray(A) - np.asarray(theta[:K])[:, None] * X, axis=1)
    kept = _band.compress(band, Y, jnp.int32(K), drop_pending=jnp.asarray(True))
    assert int(kept.ndrop) == 1 and int(jnp.sum(_band.pending(kept))) == 0
    assert int(kept.lost) == 1 and float(jnp.max(jnp.abs(kept.R))) > 0
    eye = jnp.eye(m)[:, :K]
    for bound in (_band.residual_norms(kept, eye), _band.exact_residuals(kept, eye)):
        bound = np.asarray(bound)
        assert np.all(bound >= true * (1 - 1e-10)) and np.all(bound <= 2 * true)
    q, ok = _band.fresh(kept, jnp.asarray(rng.standard_normal(n)), jnp.asarray(True))
    band = _band.inject(kept, q, ok)
    for _ in range(4):
        band = _band.absorb(band, A @ _band.request(band, v0))
    _assert_bounds_hold(band, A, _band.residual_norms, _band.exact_residuals)


def test_ritz_flushes_couplings_below_rounding_before_eigh():
    """A projected matrix ``T`` that eigsh met (ten copies of 5, ``"LM"``; 48 rows, couplings
    of 1e-27): LAPACK's divide-and-conquer ``eigh`` raised "did not converge" on NumPy and
    returned NaN on XLA:CPU. `ritz` answers on both, with SciPy's MRRR eigenvalues."""
    from pathlib import Path

    import jax
    import scipy.linalg

    from curvlib import _xp

    T = np.load(Path(__file__).parent / "data" / "eigh_divide_and_conquer_T.npy")
    m = T.shape[0]
    band = _band.init(jnp.ones(60), m, jnp.float64)._replace(
        H=jnp.asarray(np.triu(T)), mult=jnp.ones(m, bool), nbas=jnp.int32(m))
    want = np.sort(np.abs(scipy.linalg.eigh(T, driver="evr", eigvals_only=True)))[::-1]
    with _xp.host():
        host = _band.ritz(jax.tree.map(np.asarray, band), _band.Order("LM"))[0]
    for theta in (host, _band.ritz(band, _band.Order("LM"))[0]):
        np.testing.assert_allclose(np.abs(np.asarray(theta)), want, rtol=0, atol=1e-13)


# ----------------------------------------------------------------- _thresholds


def _cfg(m=10, basis_dtype=None, which="LA", k=2, dim=100):
    return eigen._Cfg(k=k, which=which, m=m, keep=m - 2, check_every=1, max_inject=4,
                      layout="tree", basis_dtype=basis_dtype, dim=dim)


def _thresholds_np(m, eps, anorm, theta, valid, tol):
    """The docstring's formula in NumPy.

    ``max(tol |theta|, max(min(10 m eps, sqrt eps), tol eps^(2/3)) ||A||)``.
    """
    anorm = max(anorm, np.max(np.where(valid, np.abs(theta), 0.0)))
    floor = max(min(10 * m * eps, np.sqrt(eps)), tol * eps ** (2 / 3)) * anorm
    return np.maximum(tol * np.abs(theta), floor)


@pytest.mark.parametrize(
    "m, basis_dtype, tol",
    [
        (10, None, 0.0),  # machine precision: the 10 m eps floor
        (10, None, 1e-3),  # ARPACK's tol eps^(2/3) floor exceeds 10 m eps
        (10, None, 1e-8),  # tol |theta| above the floor for large theta only
        (10, jnp.float32, 1e-9),  # eps of a coarser basis storage
        (1000, jnp.float32, 0.0),  # 10 m eps capped at sqrt(eps)
        (10, jnp.bfloat16, 0.0),  # sqrt(eps) cap for a very coarse basis
    ],
)
def test_thresholds_are_the_documented_formula(m, basis_dtype, tol):
    theta = np.array([40.0, -3.0, 1e-9, 0.0, -250.0])
    valid = np.array([True, True, True, True, False])  # the invalid value must not count
    eps = float(jnp.finfo(jnp.float64).eps)
    if basis_dtype is not None:
        eps = max(eps, float(jnp.finfo(basis_dtype).eps))
    for anorm in (7.0, 100.0):  # below and above the largest valid |theta|
        band = SimpleNamespace(H=jnp.zeros((m, m), jnp.float64), anorm=jnp.float64(anorm),
                               limit=jnp.int32(m))
        got = np.asarray(eigen._thresholds(_cfg(m, basis_dtype), band, jnp.asarray(theta),
                                           jnp.asarray(valid), jnp.float64(tol)))
        want = _thresholds_np(m, eps, anorm, theta, valid, tol)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_an_rtol_below_the_products_precision_certifies_at_their_floor():
    """float32 products of a float64 ``v0`` (a float32 model with x64 on), ``rtol=1e-10``:
    the floor was float64's, so the pairs were certified with residuals of 2e-10 that
    omitted the products' rounding, the true ones 1.4e-7 (500x). The floor is now the
    products' dtype's: reported residuals are the true ones (float64 oracle on the matrix
    the float32 products compute), and each is below its documented threshold."""
    n, m = 40, 20
    rng = np.random.default_rng(11)
    M = rng.standard_normal((n, n))
    A32 = jnp.asarray(M @ M.T / n + 0.1 * np.eye(n), jnp.float32)
    A = np.asarray(A32, np.float64)
    r = curvlib.eigsh(lambda v: A32 @ v.astype(jnp.float32), jnp.ones(n), k=2, rtol=1e-10)
    assert bool(r.converged)
    X, th = np.asarray(r.eigenvectors, np.float64), np.asarray(r.eigenvalues, np.float64)
    true = np.linalg.norm(X @ A - th[:, None] * X, axis=1)
    eps32 = float(jnp.finfo(jnp.float32).eps)
    thr = _thresholds_np(m, eps32, np.linalg.norm(A, 2), th, np.ones(2, bool), 1e-10)
    assert np.all(true <= 1.5 * thr), (true, thr)
    np.testing.assert_allclose(np.asarray(r.residual_norms), true, rtol=0.1, atol=0)
    np.testing.assert_allclose(th, np.linalg.eigvalsh(A)[::-1][:2], rtol=0, atol=thr.max())


def test_thresholds_follow_the_accumulation_dtype_and_scale():
    """float32 accumulation: float32 eps and a float32 result; tiny operators scale down."""
    m, eps32 = 10, float(jnp.finfo(jnp.float32).eps)
    theta = np.array([4.0, 1.0, 0.0], np.float32)
    valid = np.array([True, True, False])
    band = SimpleNamespace(H=jnp.zeros((m, m), jnp.float32), anorm=jnp.float32(2.0),
                           limit=jnp.int32(m))
    got = eigen._thresholds(_cfg(m), band, jnp.asarray(theta), jnp.asarray(valid),
                            jnp.float32(0.0))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), 10 * m * eps32 * 4.0, rtol=1e-6)
    # an operator of norm 1e-3: the floor is relative to it (invalid entries count as zero)
    small = np.array([1e-3, 5e-4, 0.0, 7.0])
    band = SimpleNamespace(H=jnp.zeros((m, m), jnp.float64), anorm=jnp.float64(2e-4),
                           limit=jnp.int32(m))
    valid = np.array([True, True, True, False])
    got = eigen._thresholds(_cfg(m), band, jnp.asarray(small), jnp.asarray(valid),
                            jnp.float64(0.0))
    np.testing.assert_allclose(np.asarray(got), 10 * m * 2.0**-52 * 1e-3, rtol=1e-12)


def test_thresholds_hand_values():
    """Two values worked out by hand: ``10 m eps ||A||`` and ``tol |theta|``."""
    eps = 2.0**-52
    band = SimpleNamespace(H=jnp.zeros((4, 4), jnp.float64), anorm=jnp.float64(2.0),
                           limit=jnp.int32(4))
    thr = eigen._thresholds(_cfg(4), band, jnp.asarray([8.0, 1.0]), jnp.asarray([True, True]),
                            jnp.float64(0.0))
    np.testing.assert_allclose(np.asarray(thr), [40 * eps * 8.0] * 2, rtol=1e-15)
    thr = eigen._thresholds(_cfg(4), band, jnp.asarray([8.0, 1.0]), jnp.asarray([True, True]),
                            jnp.float64(1e-2))
    floor = 1e-2 * eps ** (2 / 3) * 8.0
    np.testing.assert_allclose(np.asarray(thr), [8e-2, max(1e-2, floor)], rtol=1e-15)


# ------------------------------------------------------------ _unseen_unlikely


def _kw_probability(theta, valid, thr, k, which, b, fresh, dim):
    """Kuczynski-Wozniakowski's bound ``1.648 sqrt(N) exp(-sqrt(eps) (2 j - 1))``, NumPy."""
    sign = 1.0 if which == "LA" else -1.0
    spread = np.max(theta[valid]) - np.min(theta[valid])
    gap = sign * (theta[k - 1] - theta[k]) + thr[k - 1]
    eps = np.clip(gap / spread, 0.0, 1.0)
    j = max(fresh - b + 1, 0) // b
    return 1.648 * np.sqrt(dim) * np.exp(-np.sqrt(eps) * (2 * j - 1))


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_unseen_unlikely_is_the_kuczynski_wozniakowski_bound(which):
    """True exactly when the KW failure probability is at most 1e-6, in the verify phase."""
    sign = 1.0 if which == "LA" else -1.0
    k, dim = 2, 100
    # wanted first: 10, 9, then the guard 8 and the rest; an invalid far value is ignored
    theta = sign * np.array([10.0, 9.0, 8.0, 1.0, 0.0, 300.0])
    valid = np.array([True, True, True, True, True, False])
    thr = np.array([0.01, 0.02, 0.03, 0.5, 0.05, 0.06])
    cfg = _cfg(which=which, k=k, dim=dim)

    def call(b, fresh, phase=1, th=theta, th_thr=thr):
        s = SimpleNamespace(injected=jnp.int32(b), fresh=jnp.int32(fresh),
                            filtered=jnp.int32(fresh), phase=jnp.int32(phase),
                            k=jnp.int32(k))
        return bool(eigen._unseen_unlikely(cfg, s, jnp.asarray(th), jnp.asarray(valid),
                                           jnp.asarray(th_thr)))

    for b in (1, 2, 3):
        p = [_kw_probability(theta, valid, thr, k, which, b, f, dim) for f in range(400)]
        first = next(f for f in range(400) if p[f] <= 1e-6)  # first product count certified
        # exact around the boundary: j counts whole products per chain of the block
        for f in range(first - 2 * b, first + 2):
            assert call(b, f) == (p[f] <= 1e-6), (b, f, first)
        # the bound is scale-free: the same decisions for the operator times 1e-3
        assert not call(b, first - 1, th=theta * 1e-3, th_thr=thr * 1e-3), (b, first)
        assert call(b, first, th=theta * 1e-3, th_thr=thr * 1e-3), (b, first)
        assert call(b, first + 5)
        assert not call(b, first + 5, phase=0)  # only while verifying
        assert not call(b, first + 5, phase=2)
    # injected = 0 counts as a block of one
    p = [_kw_probability(theta, valid, thr, k, which, 1, f, dim) for f in range(400)]
    first = next(f for f in range(400) if p[f] <= 1e-6)
    assert not call(0, first - 1) and call(0, first)
    # a guard equal to the last wanted value (gap = its threshold only) needs far more products
    near = theta.copy()
    near[2] = near[1]
    assert not call(1, first, th=near)
    # a gap wider than the spread (a threshold larger than the spread): eps is capped at 1
    wide = sign * np.array([10.0, 9.9, 9.8, 9.8, 9.8, 300.0])
    wide_thr = np.array([0.01, 1.0, 0.01, 0.01, 0.01, 0.01])
    p = [_kw_probability(wide, valid, wide_thr, k, which, 1, f, dim) for f in range(40)]
    first = next(f for f in range(40) if p[f] <= 1e-6)
    assert not call(1, first - 1, th=wide, th_thr=wide_thr)
    assert call(1, first, th=wide, th_thr=wide_thr)


def test_unseen_unlikely_gives_no_certificate_without_a_spread():
    """Every Ritz value equal: no relative gap exists, so the bound must not certify (whatever
    the scale of the operator), only a certified guard can."""
    cfg = _cfg(which="LA", k=2, dim=100)
    s = SimpleNamespace(injected=jnp.int32(1), fresh=jnp.int32(10**6),
                        filtered=jnp.int32(10**6), phase=jnp.int32(1),
                        k=jnp.int32(2))
    for scale in (1e-3, 1.0, 1e6):
        theta = jnp.full(4, 5.0 * scale)
        assert not bool(eigen._unseen_unlikely(cfg, s, theta, jnp.ones(4, bool),
                                               jnp.full(4, 1e-3 * scale)))


def test_unseen_unlikely_never_for_lm():
    cfg = _cfg(which="LM")
    s = SimpleNamespace(injected=jnp.int32(1), fresh=jnp.int32(10**6),
                        filtered=jnp.int32(10**6), phase=jnp.int32(1),
                        k=jnp.int32(2))
    theta = jnp.asarray([10.0, -9.0, 0.1])
    assert not bool(eigen._unseen_unlikely(cfg, s, theta, jnp.ones(3, bool), jnp.zeros(3)))
    # the answer-now steps: ``which`` as the state's code; where "LA" certifies, "LM" does not
    cfg, theta = _cfg(which=""), jnp.asarray([10.0, 9.0, 0.1])
    for which, want in (("LM", False), ("LA", True)):
        s.which = jnp.int32(_band.Order.CODES[which])
        assert bool(eigen._unseen_unlikely(cfg, s, theta, jnp.ones(3, bool), jnp.zeros(3))) is want


# ---------------------------------------------------------------- end to end


def test_eigsh_certifies_a_repeated_zero_eigenvalue_and_the_next_one():
    """SA, k=4 on a rotated ``diag(0, 0, 0, 2, ...)``: three null directions, then 2, as ``eigh``.

    One chain sees one null direction; verification must find the other two (a
    block as large as the cluster) and the threshold floor must let exact zeros
    converge at ``tol=0``.
    """
    import jax

    import curvlib

    n = 40
    rng = np.random.default_rng(3)
    d = np.concatenate([np.zeros(3), [2.0], np.linspace(2.5, 6.0, n - 4)])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * d) @ Q.T
    A = (A + A.T) / 2
    Aj = jnp.asarray(A)
    res = curvlib.eigsh(lambda v: Aj @ v, jnp.asarray(rng.standard_normal(n)), 4, which="SA",
                        rtol=0.0, basis_size=12, key=jax.random.PRNGKey(0))
    want = np.linalg.eigh(A)[0][:4]
    assert bool(res.converged)
    assert int(res.num_verifications) >= 1
    np.testing.assert_allclose(np.asarray(res.eigenvalues), want, atol=1e-12)
    X = np.asarray(res.eigenvectors)
    np.testing.assert_allclose(X @ X.T, np.eye(4), atol=1e-10)
    true_res = np.linalg.norm(X @ A - np.asarray(res.eigenvalues)[:, None] * X, axis=1)
    floor = 10 * 12 * np.finfo(float).eps * 6.0  # 10 m eps ||A||, the tol=0 threshold
    assert np.all(true_res <= 10 * floor)


def test_restarts_that_drop_the_fresh_chains_best_vectors_certify_nothing_by_the_bound():
    """Eigenvalue 3 four times, 2 twice, a bulk in [-1.5, 1.5], k = 3. A thick restart is a
    filter whose roots are the Ritz values it drops: with a basis of k + 2 rows (or
    ``num_keep=k``) every restart dropped the fresh block's best vector, the block never
    climbed to the third copy of 3, and the probability bound, counting its products across
    those restarts, certified [3, 3, 2] (4 starts in 4). Now the bound counts only products
    whose chain was kept (the verification keeps ``k + b`` vectors where they fit): never a
    wrong answer reported converged, and the one that fits certifies (numpy the oracle)."""
    n = 60
    d = np.r_[np.full(4, 3.0), np.full(2, 2.0), np.linspace(-1.5, 1.5, n - 6)]
    want = np.sort(d)[::-1][:3]
    A = jnp.asarray(d)
    rng = np.random.default_rng(0)
    for kw, certifies in (({"basis_size": 5}, False), ({"basis_size": 20, "num_keep": 3}, True),
                          ({}, True)):
        for seed in range(3):
            v0 = jnp.asarray(rng.standard_normal(n))
            r = curvlib.eigsh(lambda v: A * v, v0, 3, key=jax.random.PRNGKey(seed),
                              max_matvecs=600, **kw)
            if bool(r.converged):
                np.testing.assert_allclose(r.eigenvalues, want, atol=1e-6, err_msg=str(kw))
            elif certifies:
                raise AssertionError(f"{kw}: not certified ({curvlib.status_message(r.status)})")
            else:
                assert int(r.status) == curvlib.Status.MAX_STEPS
