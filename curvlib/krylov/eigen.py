"""``eigsh``: a few extreme eigenpairs of a symmetric operator, certified.

Thick-restart Lanczos (Wu & Simon 2000) on the band Krylov engine of
`curvlib.krylov._band`, written as one product loop (the user's product
appears once in the compiled program), with

* a convergence test after every product (an ``m x m`` ``eigh``, no product),
  so the run stops at the first Krylov depth that certifies the wanted pairs;
* thresholds that the floating-point format can reach (``tol = 0`` means
  machine precision, as in SciPy), so zero eigenvalues converge;
* a **verification** phase that makes ``converged=True`` mean that no copy of
  a repeated eigenvalue (and no eigenvalue beyond the wanted ones) was missed:
  a single Krylov chain started from ``v0`` sees only one direction of each
  eigenspace, so once the wanted pairs are certified they are locked, the
  chain is dropped, and a *fresh* block of random vectors (from ``key``) is
  run against them, two products per fresh vector at least, until the best unwanted
  Ritz value *of the fresh block* is certified to lie beyond the wanted ones (pairs
  the round pushed out of the wanted set were certified before it and do not
  count: `_guard`). If the fresh block finds new wanted values, another
  round follows, with a block as large as the largest cluster of equal
  values found (a block of ``b`` random vectors sees ``b`` directions of every
  eigenspace); a round that finds fewer new values than its block size ends
  the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _compile, _deprecation, _space, _tree, _validate
from curvlib._status import Status, from_flags
from curvlib._xp import cond, xp
from curvlib.krylov import _band, _driver, solvers

PyTree = Any

WHICH = ("LA", "SA", "LM")


class EigshResult(NamedTuple):
    """Output of [`eigsh`][curvlib.eigsh].

    Attributes:
      eigenvalues: shape ``(k,)``; for ``"LA"`` algebraically largest first, for
        ``"SA"`` smallest first, for ``"LM"`` largest magnitude first. Signed.
        NaN if a product was not finite, or when the budget ended before the basis
        held ``k`` Ritz vectors (``max_matvecs < k``; ``status`` ``MAX_STEPS``).
      eigenvectors: pytree shaped like ``v0`` with a leading axis ``k``; orthonormal. Each
        vector's sign is fixed: its entry of largest magnitude is positive (the same
        vectors from the answer-now steps and the compiled program).
      residual_norms: ``||A x_i - theta_i x_i||`` (shape ``(k,)``), from the Krylov
        relation without extra products: the true residuals to rounding
        (convergence is judged on rigorous upper bounds of them). With a lower-precision
        ``basis_dtype`` the rounding is the basis's: the true residuals can exceed these by
        up to about ``sqrt(eps) ||A||`` of that dtype, its attainable accuracy. NaN when
        residuals certify nothing at the operator's scale (``status`` ``STALLED``: ``||A||``
        below ``tiny / eps``, the zero operator included).
      num_matvecs: products used (int32 scalar).
      num_restarts: thick restarts performed (verification restarts included); a run that
        the ``max_restarts`` cap stopped reports ``max_restarts + 1``: the restart past the
        cap is made, then the run ends without another product.
      converged: every residual is below its threshold (see [`eigsh`][curvlib.eigsh]) *and*
        the verification phase found no missing eigenvalue.
      finite: every product was finite; if not, eigenvalues are NaN and
        ``converged=False``.
      num_verifications: verification rounds run (each one fresh random block).
      verification_matvecs: the part of ``num_matvecs`` spent after the wanted
        pairs were first certified, on verification (its cost).
      status: the [`curvlib.Status`][curvlib.Status] code, most serious first: ``NONFINITE``
        (not ``finite``), ``STALLED`` (finished, but ``||A||`` is below ``tiny / eps``:
        residuals at rounding level are subnormal and certify nothing, ``converged=False``),
        ``MAX_STEPS`` (the product or restart budget ran out before ``converged``), else
        ``SUCCESS``. ``SUCCESS`` exactly when ``converged``.
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residual_norms: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array
    converged: jax.Array
    finite: jax.Array
    num_verifications: jax.Array = 0  # (defaults: results built by hand, e.g. given eigenpairs)
    verification_matvecs: jax.Array = 0
    status: jax.Array = Status.SUCCESS


class _Cfg(NamedTuple):
    """Static configuration (hashable: a compile-cache key).

    The fused program is keyed on all of it. The answer-now steps (`_solve_now`) are
    keyed on `_shape_cfg`'s: ``k``, ``keep``, ``check_every``, ``max_inject`` zero,
    ``which`` empty and ``m`` the capacity of a size class (`_band.capacity`); the values
    themselves are data in the state (`_sizes`), so one set of step programs serves
    every ``k``, ``which`` and basis size of the class. The steps read ``k``, ``keep``,
    ``check_every``, ``max_inject`` and the basis size (``band.limit``) from the state.
    """

    k: int
    which: str
    m: int  # basis rows
    keep: int  # Ritz vectors kept by a thick restart
    check_every: int
    max_inject: int
    layout: str
    basis_dtype: Any
    dim: int  # N, for the verification's probability bound
    verify: bool = True  # run the verification phase (`Eigsh.verify`)
    precision: Any = None  # the coarsest of v0's, the basis' and the products' dtypes


class _State(NamedTuple):
    band: _band.Band
    z: PyTree  # the next fresh random direction (internal layout), redrawn after each use
    key: jax.Array  # uint32 seed: fresh direction i is Space.gaussian(key, i)
    draws: jax.Array  # fresh directions used so far
    phase: jax.Array  # 0 search, 1 verify, 2 done
    ref: jax.Array  # (k,) wanted values at the start of the verification round
    injected: jax.Array  # block size of this verification round
    to_inject: jax.Array  # fresh directions still to add (one per product)
    fresh: jax.Array  # products since this verification round started
    filtered: jax.Array  # of those, the products since a restart last dropped the fresh
    # block's best Ritz vectors (what the probabilistic certificate may count, `_update`)
    near: jax.Array  # int32: near breakdowns (`_band.Band.near`) when this round started
    rounds: jax.Array
    verify_count: jax.Array  # products since the first verification round started
    restarts: jax.Array
    since: jax.Array  # products since the last (re)start
    count: jax.Array  # products in total
    tol: jax.Array
    max_matvecs: jax.Array
    max_restarts: jax.Array
    theta: jax.Array  # (m,) Ritz values of the last test, wanted first
    Y: jax.Array  # (m, m) their vectors in the current basis
    like: PyTree  # zeros shaped like v0 (user layout): dtypes and shapes of products
    k: jax.Array  # int32: wanted pairs (the basis size is ``band.limit``)
    keep: jax.Array  # int32: Ritz vectors kept by a thick restart
    check_every: jax.Array  # int32: products between convergence tests
    max_inject: jax.Array  # int32: largest verification block
    which: jax.Array  # int32: ``cfg.which``'s code (`_band.Order.CODES`)
    verify: jax.Array  # bool: certified search pairs start a verification round (else finish)


# --------------------------------------------------------------------- pieces


def _thresholds(cfg: _Cfg, band: _band.Band, theta, valid, tol):
    """``max(tol |theta_i|, floor)``, ``floor = max(min(c eps, sqrt(eps)), tol eps^(2/3)) ||A||``.

    ``c eps ||A||`` (``c = 10 m``) is the residual level rounding
    allows, so ``tol = 0`` (machine precision) and eigenvalues near zero both
    converge; ``tol eps^(2/3) ||A||`` is ARPACK's floor for small eigenvalues.
    ``eps`` is that of the basis storage, ``v0`` or the products when one is coarser
    than the accumulation type (`_Cfg.precision`).
    """
    acc = band.H.dtype
    eps = xp.asarray(_eps(cfg, acc), acc)
    anorm = _anorm(band, theta, valid)
    c = 10 * band.limit.astype(acc)
    # (capped at sqrt(eps) ||A||: for a coarse basis dtype c eps would exceed the spectrum)
    floor = xp.maximum(xp.minimum(c * eps, xp.sqrt(eps)), tol * eps ** (2.0 / 3.0)) * anorm
    return xp.maximum(tol * xp.abs(theta), floor)


def _anorm(band: _band.Band, theta, valid):
    """``||A||`` as far as seen: the band's estimate or the largest valid ``|theta|``."""
    return xp.maximum(band.anorm, xp.max(xp.where(valid, xp.abs(theta), 0.0)))


def _rounding(band: _band.Band, theta, valid):
    """``min(c eps, sqrt(eps)) ||A||`` with the accumulation type's ``eps`` (`_thresholds`)."""
    acc = band.H.dtype
    eps = float(xp.finfo(acc).eps)
    return xp.minimum(10 * band.limit.astype(acc) * eps, np.sqrt(eps)) * _anorm(band, theta, valid)


def _eps(cfg: _Cfg, acc) -> float:
    """The coarsest of the accumulation type's, the basis storage's and the products' eps."""
    eps = float(xp.finfo(acc).eps)
    for dt in (cfg.basis_dtype, cfg.precision):
        if dt is not None:
            eps = max(eps, float(xp.finfo(dt).eps))
    return eps


def _cluster_tol(cfg: _Cfg, band: _band.Band, tol):
    """The relative tolerance whose thresholds say which Ritz values are one cluster:
    ``min(tol, sqrt(eps))``, the default ``rtol``'s.

    Clusters are values the algorithm cannot tell apart, whatever accuracy was asked of the
    pairs: with the thresholds of a loose ``rtol`` (``0.05`` and above) distinct eigenvalues
    within ``4 rtol`` of each other were one cluster, whose pooled residual took in
    unconverged unwanted Ritz pairs and never passed (every product of the budget spent,
    the wanted pairs exact). A tolerance at or below ``sqrt(eps)`` is unchanged.
    """
    return xp.minimum(tol, xp.asarray(np.sqrt(_eps(cfg, band.H.dtype)), band.H.dtype))


def _count_new(order, new, ref, thr_new, thr_ref, k):
    """Wanted values in ``new`` that no value of ``ref`` accounts for (within tolerance).

    Only the first ``k`` entries of each (traced ``k``) take part.

    Rayleigh-Ritz values only improve as the space grows, so a new value
    either matches an old one or pushes in from beyond: with ``n(t)`` the
    number of new values at least as wanted as ``t`` and ``r(t)`` the same for
    the old ones (widened by their tolerance), the count is ``max_t n(t) - r(t)``
    over the new values ``t`` (a multiset difference, vectorised).
    """
    tol = 2 * (thr_new[:, None] + thr_ref[None, :])
    wanted = xp.arange(new.shape[0]) < k
    n_at = xp.sum(wanted[None, :] & (order.gain(new[None, :], new[:, None]) >= 0), axis=1)
    r_at = xp.sum(wanted[None, :] & (order.gain(ref[None, :], new[:, None]) >= -tol), axis=1)
    return xp.maximum(xp.max(xp.where(wanted, n_at - r_at, 0)), 0)


def _equal(theta, thr):
    """``(m, m)``: values equal within their thresholds, ``|theta_i - theta_j| <= 2 (thr_i +
    thr_j)`` (inclusive): one cluster's rule for the verification block and the certificate."""
    return _close_to(theta, theta, thr, thr)


def _cluster_residuals(theta, res, thr, valid):
    """Each value's residual bound taken over its cluster: ``sqrt(sum_j res_j^2)``.

    The sum runs over the valid values ``theta_j`` equal to ``theta_i`` within their
    thresholds (``j = i`` alone for a simple eigenvalue). Inside a cluster of equal
    values the Ritz vectors are any orthonormal basis of one subspace, and the next test's
    ``eigh`` may return another one: a unit combination ``sum_j c_j x_j`` has residual at
    most ``sum_j |c_j| res_j <= ||res_C||``, so this bound holds for every vector the
    cluster can return, whatever the rotation. (A per-vector test of a repeated eigenvalue
    whose pairs kept residuals from an earlier round, frozen in the dropped rows, passed or
    failed with the rotation: it could keep a verification round from ever finishing.)
    """
    close = valid[None, :] & valid[:, None] & _equal(theta, thr)
    return _band.column_norms(xp.where(close, res[:, None], 0.0))


def _guard(theta, valid, thr, ref, thr_ref, k):
    """``(g, exists)``: the verification's guard, the best unwanted Ritz value of the round's
    fresh block.

    When a round finds new wanted values it pushes pairs that were wanted at its start
    (``ref``) out of the wanted set. They were certified before the round, not by its fresh
    block; taken as the guard, one ended rounds whose fresh chains had not yet climbed to an
    eigenvalue above it (float32, ``v0`` without the top eigenvectors: an eigenvalue just
    inside the wanted ones was missed). So the unwanted values that repeat such a displaced
    value are skipped, as many copies as were displaced (a multiset count: the copies of the
    value among ``ref`` less those among the wanted values now, within both thresholds); the
    guard is the first unwanted value left.
    """
    idx = xp.arange(theta.shape[0])
    wanted, unwanted = idx < k, (idx >= k) & valid
    same = _equal(theta, thr)  # (m, m)
    in_ref = xp.sum(wanted[None, :] & _close_to(theta, ref, thr, thr_ref), axis=1)
    in_wanted = xp.sum(wanted[None, :] & same, axis=1)
    displaced = xp.maximum(in_ref - in_wanted, 0)
    rank = xp.sum(unwanted[None, :] & (idx[None, :] < idx[:, None]) & same, axis=1)
    cand = unwanted & (rank >= displaced)
    return xp.argmax(cand), xp.any(cand)


def _close_to(a, b, thr_a, thr_b):
    """``(len(a), len(b))``: ``|a_i - b_j| <= 2 (thr_a_i + thr_b_j)`` (`_equal`'s rule)."""
    return xp.abs(a[:, None] - b[None, :]) <= 2 * (thr_a[:, None] + thr_b[None, :])


def _largest_cluster(theta, thr, k):
    """Size of the largest group of the first ``k`` values equal within their thresholds."""
    wanted = xp.arange(theta.shape[0]) < k
    close = _equal(theta, thr)
    return xp.max(xp.where(wanted, xp.sum(close & wanted[None, :], axis=1), 0))


FAILURE_PROBABILITY = 1e-6  # of the verification's probabilistic certificate
NUM_DROPPED = 4  # dropped chain vectors stored for exact final residuals


def _unseen_unlikely(cfg: _Cfg, s: _State, theta, valid, thr, g=None):
    """Whether, with probability >= 1 - FAILURE_PROBABILITY, no eigenvalue is missed.

    After ``j`` Lanczos steps from a random start, the largest Ritz value
    ``theta_1`` of a symmetric operator with spectrum in ``[lambda_n, lambda_1]``
    satisfies (Kuczynski & Wozniakowski 1992, Thm. 4.2)
    ``P(lambda_1 - theta_1 >= eps (lambda_1 - lambda_n)) <= 1.648 sqrt(N) exp(-sqrt(eps)(2j - 1))``.
    Applied to the fresh block of a verification round (each of its ``b``
    chains has had ``j = products / b`` steps) with ``theta_1`` its best Ritz
    value (the guard) and ``eps`` the distance from the guard to the last wanted
    value (plus its threshold) over the Ritz spread: if the bound is below the
    failure probability, an unseen eigenvalue beyond the wanted ones is that
    unlikely. Only for ``"LA"``/``"SA"``. Thick restarts inside the round keep
    the best Ritz vectors (the guard's value never decreases) and act as a
    polynomial filter that damps the interior of the spectrum, so ``j`` counts
    the round's products across restarts; strictly, the bound is proven for
    unrestarted Lanczos only.
    """
    if cfg.which == "LM":
        return xp.asarray(False)
    k = s.k
    order = _order(cfg, s)
    big = xp.where(valid, theta, -xp.inf)
    small = xp.where(valid, theta, xp.inf)
    spread = xp.max(big) - xp.min(small)
    gap = order.gain(theta[k - 1], theta[k if g is None else g]) + thr[k - 1]
    # no spread (every Ritz value equal): no relative gap to measure, no probabilistic certificate
    eps = xp.where(spread > 0, xp.clip(gap / xp.where(spread > 0, spread, 1.0), 0.0, 1.0), 0.0)
    b = xp.maximum(s.injected, 1)
    # products per fresh chain, counted since a restart last dropped the block's best Ritz
    # vectors (`_update`): a restart that keeps them filters the chain's start, one that
    # keeps only the wanted pairs starts it afresh
    j = (xp.maximum(s.filtered - b + 1, 0) // b).astype(theta.dtype)
    need = float(np.log(1.648 * np.sqrt(cfg.dim) / FAILURE_PROBABILITY))
    unlikely = (s.phase == 1) & (xp.sqrt(eps) * (2 * j - 1) >= need)
    return unlikely if cfg.which else unlikely & (s.which != _band.Order.CODES["LM"])


def _order(cfg: _Cfg, s: _State) -> _band.Order:
    """``cfg.which``'s order, or (answer-now steps) the one the state names."""
    return _band.Order(cfg.which or s.which)


class _Eval(NamedTuple):
    """What a convergence test decides (all scalars but ``theta``, ``Y``)."""

    search_cert: jax.Array  # search phase: the wanted pairs are certified
    verify_cert: jax.Array  # verification phase: wanted pairs and the guard certified
    finish: jax.Array  # a verification round found fewer new values than its block size
    n_inject: jax.Array  # block size of the next verification round
    theta: jax.Array  # (m,) Ritz values, wanted first
    Y: jax.Array  # (m, m) their vectors


def _evaluate(cfg: _Cfg, s: _State, band: _band.Band) -> _Eval:
    """Ritz pairs, thresholds, and the phase decisions of `_update` (one ``m x m`` eigh)."""
    order = _order(cfg, s)
    theta, Y, res, valid = _band.ritz(band, order)
    thr = _thresholds(cfg, band, theta, valid, s.tol)
    ctol = _cluster_tol(cfg, band, s.tol)
    thr_c = _thresholds(cfg, band, theta, valid, ctol)  # which values are one cluster
    k = s.k
    # Each pair meets its threshold, and its cluster's pooled residual (what any rotation
    # inside the cluster can return) meets it too, or the rounding level of the cluster's
    # q vectors together, sqrt(q) c eps ||A|| (eps the accumulation type's: a coarser
    # storage's floor already bounds each pair): q copies of a wanted value each at
    # rounding level pool above one floor, and seven zeros never certified (`which="SA"`,
    # every product of the budget spent; their mirror under "LA" certified).
    q = xp.sum(valid[None, :] & valid[:, None] & _equal(theta, thr_c), axis=0)
    pooled = xp.maximum(thr, xp.sqrt(q.astype(thr.dtype)) * _rounding(band, theta, valid))
    ok = valid & (res <= thr) & (_cluster_residuals(theta, res, thr_c, valid) <= pooled)
    nmul = xp.sum(band.mult)
    wanted = xp.arange(cfg.m) < k
    certified = xp.all(ok | ~wanted) & (nmul > k)
    if not cfg.verify:  # a program without the verification phase: the search's test only
        f = xp.asarray(False)
        done = certified & ((nmul >= cfg.dim) | (band.limit < cfg.dim))
        return _Eval(search_cert=f, verify_cert=f, finish=done,
                     n_inject=xp.ones((), xp.int32), theta=theta, Y=Y)
    thr_ref = _thresholds(cfg, band, s.ref, wanted, s.tol)
    g, fresh_guard = _guard(theta, valid, thr, s.ref, thr_ref, k)
    guard_ok = fresh_guard & (ok[g] | _unseen_unlikely(cfg, s, theta, valid, thr, g))
    # a basis spanning the whole space holds every eigenpair: nothing to verify. When the
    # basis can hold it (basis_size == dim), the chain simply runs until it does.
    whole = certified & (nmul >= cfg.dim)
    search_cert = certified & (s.phase == 0) & ~whole & (band.limit < cfg.dim)
    # (every fresh vector of the round injected, and two products per fresh chain at least:
    # a round could end before a fresh vector was multiplied, its copies of an eigenvalue
    # unseen, when an operator with few distinct values broke another chain down at once)
    verify_cert = certified & guard_ok & (s.phase == 1) & (s.to_inject == 0) & (
        nmul >= k + s.injected) & (s.fresh >= 2 * s.injected)
    n_new = _count_new(order, theta, s.ref, thr, thr_ref, k)
    # A round in which a chain (nearly) broke down finishes only when it found nothing new.
    # With few distinct eigenvalues a chain spans an invariant subspace within a few
    # products, while a chain one product behind still holds copies the test cannot see
    # yet: 7 x 5, 1.3 x 16, -3.7 x 9, k = 5, a block of two found one more 7, the other
    # waited in a pending row, and [7, 7, 7, 1.3, 1.3] was certified. (A remainder below
    # sqrt(eps) ||A||, not only a breakdown: rounding can leave one above the breakdown
    # threshold, and the chain goes on from noise.) Such a round starts another instead.
    broke = band.near > s.near
    cluster = _largest_cluster(theta, thr, k)
    return _Eval(
        search_cert=search_cert, verify_cert=verify_cert,
        finish=(verify_cert & (n_new < s.injected) & (~broke | (n_new == 0))) | whole,
        n_inject=xp.clip(cluster, 1, s.max_inject).astype(xp.int32), theta=theta, Y=Y,
    )


def _no_eval(cfg: _Cfg, s: _State, band: _band.Band) -> _Eval:
    m, acc = cfg.m, band.H.dtype
    f = xp.asarray(False)
    return _Eval(f, f, f, xp.ones((), xp.int32), xp.zeros(m, acc), xp.zeros((m, m), acc))


# ---------------------------------------------------------------- the machine


def _request(cfg: _Cfg, s: _State):
    space = _space.Space(s.like, cfg.layout)
    return space.unflatten(_band.request(s.band, space.flatten(s.like)))


def _running(cfg: _Cfg, s: _State):
    return (
        (s.phase < 2) & (s.count < s.max_matvecs) & s.band.finite
        & (s.restarts <= s.max_restarts)
    )


def _update(cfg: _Cfg, s: _State, product) -> _State:
    """Absorb one product, test convergence, restart or start a verification round."""
    space = _space.Space(s.like, cfg.layout)
    band = _band.absorb(s.band, space.flatten(product))
    count, since = s.count + 1, s.since + 1
    full, due = _due(cfg, s, band, count, since)
    s_now = s._replace(since=since, fresh=s.fresh + 1, filtered=s.filtered + 1)
    ev = cond(due, lambda b: _evaluate(cfg, s_now, b), lambda b: _no_eval(cfg, s_now, b),
                      band)
    finish = ev.finish | (ev.search_cert & ~s.verify)  # no verification asked: done
    new_round = (ev.search_cert & s.verify) | (ev.verify_cert & ~finish)
    restart = full & ~finish & ~new_round
    # a restart keeping fewer than k + b Ritz vectors (a basis of k + 2 rows) drops the best
    # vectors of the round's b fresh chains: their Lanczos bound starts over
    lost = restart & (_restart_size(s, band) < s.k + xp.maximum(s.injected, 1))
    band, Y = _compress(cfg, s, band, ev, new_round, restart, xp.where(due, ev.Y, s.Y))
    theta = xp.where(due, ev.theta, s.theta)
    # one fresh direction per product: the verification block, or a new chain when the
    # only chain broke down
    to_inject = xp.where(new_round, ev.n_inject, s.to_inject)
    band, z, used_z, redraw = _inject_fresh(cfg, s, space, band, to_inject)
    phase = xp.where(finish, 2, xp.where(new_round, 1, s.phase))
    return s._replace(
        band=band, z=z, draws=s.draws + redraw.astype(xp.int32),
        phase=phase.astype(xp.int32),
        ref=xp.where(new_round, ev.theta, s.ref),
        injected=xp.where(new_round, ev.n_inject, s.injected),
        to_inject=xp.maximum(to_inject - used_z.astype(xp.int32), 0),
        fresh=xp.where(new_round, 0, s.fresh + 1),
        filtered=xp.where(new_round | lost, 0, s.filtered + 1),
        near=xp.where(new_round, band.near, s.near),
        rounds=s.rounds + new_round.astype(xp.int32),
        verify_count=s.verify_count + (s.phase >= 1).astype(xp.int32),
        restarts=s.restarts + (new_round | restart).astype(xp.int32),
        since=xp.where(new_round | restart, 0, since), count=count, theta=theta, Y=Y,
    )


def _due(cfg: _Cfg, s: _State, band: _band.Band, count, since):
    """``(full, due)``: the basis must restart, and this product's step runs a test.

    A test is due when the basis is full, the budget is spent (the final answer is read
    from this step's test), the multiplied rows span the space, or every
    ``check_every`` products once more than ``k`` rows are multiplied.
    """
    # (a basis of dim rows spans the space: the last remainders are zero, no restart needed)
    full = ~_band.has_room(band) & (band.nbas < cfg.dim)
    last = count >= s.max_matvecs
    spans = xp.sum(band.mult) >= cfg.dim  # every row of a full-space basis multiplied
    due = full | last | spans | ((since % s.check_every == 0) & (xp.sum(band.mult) > s.k))
    return full, due


def _restart_size(s: _State, band: _band.Band):
    """Ritz vectors a thick restart keeps: ``keep``, at least ``k + b`` in a verification
    round of ``b`` fresh chains, at most ``m - pending - 1``.

    A restart is a polynomial filter on the chains' start whose roots are the Ritz values
    it drops (exact shifts). Dropping the best vector of a fresh chain damps the very
    eigenvector the chain is climbing towards, so a round restarted that way never
    finds an unseen copy of a wanted value, and counting its products for the probability
    bound certified answers that missed one (``num_keep=k``; a basis of ``k + 2`` rows,
    where nothing more fits: there the bound starts over at each restart, `_update`).
    """
    rest = xp.sum(_band.pending(band))
    keep = xp.where(s.phase == 1, xp.maximum(s.keep, s.k + xp.maximum(s.injected, 1)), s.keep)
    return xp.minimum(keep, band.limit - rest - 1)


def _compress(cfg: _Cfg, s: _State, band: _band.Band, ev: _Eval, new_round, restart, Y):
    """``(band, Y)``: the basis after a thick restart or a new round, and its Ritz vectors.

    A new verification round keeps the ``k`` wanted Ritz vectors (pending rows dropped);
    a restart keeps `_restart_size`'s. After either, the kept Ritz vectors
    are the first rows in the same order, so ``Y`` is the identity on them; otherwise
    ``Y`` is returned as given.
    """
    k, m = s.k, cfg.m

    def compress(band):
        K = xp.where(new_round, k, _restart_size(s, band))
        return _band.compress(band, ev.Y, K, drop_pending=new_round)

    band = _tree.apply_if(new_round | restart, compress, band)
    kept = xp.where(new_round, k, xp.sum(band.mult))
    eye = xp.where((xp.arange(m) < kept)[None, :], xp.eye(m, dtype=ev.Y.dtype), 0.0)
    return band, xp.where(new_round | restart, eye, Y)


def _inject_fresh(cfg: _Cfg, s: _State, space, band: _band.Band, to_inject):
    """``(band, z, used, redraw)``: a fresh random row added where wanted, and the next draw.

    A row is wanted while ``to_inject > 0`` or when no chain is left to continue; it is
    added only if the basis keeps a free row for the next product's remainder (unless
    the basis can span the whole space). A used or unusable direction is redrawn.
    """
    _, some = _band.next_row(band)
    want = (to_inject > 0) | ~some
    room = (band.nbas < band.limit - 1) | (band.limit >= cfg.dim)
    zq, z_ok = _band.fresh(band, s.z, want)
    band = _band.inject(band, zq, want & z_ok & room)
    used_z = want & z_ok
    # a used (or unusable) direction is replaced by a new draw; no draw otherwise
    redraw = want
    z = cond(redraw, lambda: space.gaussian(s.key, s.draws), lambda: s.z)
    return band, z, used_z, redraw


def _setup(cfg: _Cfg, v0, key, tol, max_matvecs, max_restarts, sizes=None, seed=None) -> _State:
    """The first state. ``sizes``: `_sizes`, traced in the answer-now steps (`_shape_cfg`);
    default ``cfg``'s."""
    k, m, keep, check_every, max_inject, which, verify = _sizes(cfg) if sizes is None else sizes
    space = _space.Space(v0, cfg.layout)
    seed = _space.seed(v0, key) if seed is None else seed
    z0 = space.gaussian(seed, 0)
    x0 = space.flatten(v0)
    nv = _tree.max_abs(x0)  # a test for zero at any scale (no square to underflow)
    usable = (nv > 0) & xp.isfinite(nv)  # a zero or non-finite v0: start at random instead
    x0 = _tree.where(usable, x0, z0)
    acc = _band.acc_dtype(x0)
    band = _band.init(x0, cfg.m, acc, cfg.basis_dtype, num_external=NUM_DROPPED, limit=m)
    band = band._replace(finite=_tree.all_finite(v0))
    z = xp.zeros((), xp.int32)
    return _State(
        band=band, z=cond(usable, lambda: z0, lambda: space.gaussian(seed, 1)),
        key=seed, draws=xp.where(usable, 1, 2).astype(xp.int32), phase=z,
        ref=xp.zeros(cfg.m, acc),
        injected=z, to_inject=z, fresh=z, filtered=z, near=z, rounds=z, verify_count=z,
        restarts=z, since=z, count=z,
        tol=xp.asarray(tol, acc), max_matvecs=xp.asarray(max_matvecs, xp.int32),
        max_restarts=xp.asarray(max_restarts, xp.int32), theta=xp.zeros(cfg.m, acc),
        Y=xp.zeros((cfg.m, cfg.m), acc), like=_tree.zeros_like(v0),
        k=xp.asarray(k, xp.int32), keep=xp.asarray(keep, xp.int32),
        check_every=xp.asarray(check_every, xp.int32),
        max_inject=xp.asarray(max_inject, xp.int32), which=xp.asarray(which, xp.int32),
        verify=xp.asarray(verify, bool),
    )


def _sizes(cfg: _Cfg):
    """``(k, m, keep, check_every, max_inject, which, verify)``: the options the state carries
    as data (``which`` as its code)."""
    return (cfg.k, cfg.m, cfg.keep, cfg.check_every, cfg.max_inject,
            _band.Order.CODES[cfg.which], cfg.verify)


def _shape_cfg(cfg: _Cfg) -> _Cfg:
    """The key of the answer-now steps: the size class, with the sizes moved into the state."""
    return cfg._replace(k=0, keep=0, check_every=0, max_inject=0, which="", verify=True,
                        m=_band.capacity(cfg.m, cfg.dim))


def _finish(cfg: _Cfg, s: _State) -> EigshResult:
    space = _space.Space(s.like, cfg.layout)
    r = cfg.k or cfg.m  # rows returned: k, or (answer-now steps) all of them, cut on the host
    band = s.band
    theta, Y = s.theta[:r], s.Y[:, :r]  # the last test's Ritz pairs (the loop ends on a test)
    wanted = xp.arange(r) < s.k
    valid = xp.sum(xp.where(band.mult[:, None], Y**2, 0.0), axis=0) > 0.5
    res = _band.exact_residuals(band, Y)
    X = space.unflatten_basis(_tree.basis_matmul(Y.T, band.Q))
    X = jax.tree.map(lambda q, x: q.astype(xp.result_type(x)), X, s.like)
    X = _tree.sign_fixed(X)
    finite = band.finite & xp.all(xp.isfinite(theta) | ~wanted)
    ok = finite & xp.all(valid | ~wanted)
    return EigshResult(
        eigenvalues=xp.where(ok, theta, xp.nan),
        eigenvectors=X,
        residual_norms=xp.where(ok & _band.certifiable(band, s.like), res, xp.nan),
        num_matvecs=s.count,
        num_restarts=s.restarts,
        converged=(s.phase == 2) & ok & _band.certifiable(band, s.like),
        finite=finite,
        num_verifications=s.rounds,
        verification_matvecs=s.verify_count,
        # (a finished run at a scale whose residuals are subnormal: right, not certified)
        status=from_flags(finite=finite, converged=(s.phase == 2) & ok,
                          stalled=(s.phase == 2) & ok & ~_band.certifiable(band, s.like)),
    )


def _solve(cfg: _Cfg, matvec, v0, key, tol, max_matvecs, max_restarts) -> EigshResult:
    state = _setup(cfg, v0, key, tol, max_matvecs, max_restarts)
    state = _driver.run(_request, _update, _running, cfg, _checked(matvec), state)
    return _finish(cfg, state)


def _checked(matvec):
    """``matvec`` whose output is checked against its input (shaped like ``v0``) at its one
    trace: inside the user's ``jit`` or ``vmap``, and for an operator given as a `Partial`,
    no other check sees the product's shapes."""

    def product(v):
        out = matvec(v)
        _validate.same_structure(v, out, "v0", "matvec(v0)", floating=True)
        return out

    return product


def _solve_now(cfg: _Cfg, matvec, v0, key, tol, max_matvecs, max_restarts) -> EigshResult:
    """`_solve` answered without compiling it (`_driver.solve_now`): the same certificate.

    The steps are those of ``cfg``'s size class (`_shape_cfg`), shared by every ``k`` and
    basis size of the class; the result's ``k`` rows are cut from the class's on the host.
    """
    shape = _shape_cfg(cfg)
    # (NumPy would accumulate a narrower basis dtype's products in that dtype: compiled steps)
    native = cfg.basis_dtype is None or jnp.dtype(cfg.basis_dtype) == _tree.dtype(v0)
    return _driver.solve_now(_setup, _request, _update, _running, _finish, shape,
                             matvec, v0, key, tol, max_matvecs, max_restarts, _sizes(cfg),
                             bases=("eigenvectors",),
                             cut={"eigenvalues": cfg.k, "residual_norms": cfg.k},
                             rows=cfg.k, report=_report,
                             host_rows=shape.m + NUM_DROPPED + 2 if native else None)


def _report(cfg: _Cfg, s: _State):
    """``(products, budget, verification rounds, worst relative residual)`` for the progress
    bar: the residual bounds of the wanted Ritz pairs at the last test, over ``|theta|``."""
    res = _band.residual_norms(s.band, s.Y)
    theta = xp.abs(s.theta)
    wanted = xp.arange(theta.shape[0]) < s.k
    worst = xp.max(xp.where(wanted, res / xp.where(theta > 0, theta, 1.0), 0.0))
    return s.count, s.max_matvecs, s.rounds, worst


_compiled = _compile.entry(
    static=("cfg",), operators={"matvec": "v0"}, now=_solve_now, now_reports=True,
    now_when=lambda cfg, v0, **_: _driver.answers_now(cfg.layout, v0))(_solve)


# --------------------------------------------------------------------- public


@_deprecation.renamed("curvlib.eigsh", tol="rtol", num_matvecs="basis_size")
def eigsh(
    matvec,
    v0: PyTree,
    k: int = 6,
    *,
    which: str = "LA",
    key: jax.Array | None = None,
    solver: solvers.Eigsh | None = None,
    rtol: float | None = None,
    basis_size: int | None = None,
    max_matvecs: int | None = None,
    max_restarts: int | None = None,
    num_keep: int | None = None,
    basis_dtype=None,
    verify: bool | None = None,
) -> EigshResult:
    """Top-``k`` eigenpairs of a symmetric operator by certified thick-restart Lanczos.

    A Krylov basis of at most ``m = basis_size`` vectors is built from ``v0``
    with full reorthogonalisation; Rayleigh-Ritz on the projected matrix
    ``T = Q A Q^T`` gives Ritz pairs ``(theta_i, x_i = Q^T y_i)`` whose residuals
    ``||A x_i - theta_i x_i||`` follow from the Krylov relation without extra
    products. They are tested after every product (every ``ceil(m / 64)``
    for large bases), so the run stops at the first depth that certifies them;
    when the basis is full it is compressed to its best ``num_keep`` Ritz
    vectors and re-extended (Wu & Simon 2000). Eigenvalues are signed and
    ordered algebraically: with ``which="LA"`` a Hessian's dominant *negative*
    eigenvalues never displace its largest positive ones.

    A pair is certified when its residual is at most
    ``max(rtol |theta_i|, max(min(10 m eps, sqrt(eps)), rtol eps^(2/3)) ||A||)``
    (``eps`` of the coarsest of the accumulation, the basis storage, ``v0`` and the
    products: float32 products of a float64 ``v0`` take float32's): relative to the
    eigenvalue, with a floor the floating-point format can reach, so
    eigenvalues at (numerical) zero converge and ``rtol=0`` means machine
    precision as in SciPy. Copies of a repeated eigenvalue are certified together, by
    the norm of their residuals: a bound for every orthonormal basis of their
    eigenspace that the next test's ``eigh`` may return. Then **verification** runs
    (module docstring): the certified pairs are locked and a fresh block of random
    vectors from ``key`` is run until the best remaining Ritz value is certified to lie
    beyond them; copies of repeated eigenvalues that one Krylov chain cannot
    see are found this way, and ``converged`` is ``True`` only after a round
    that finds nothing more than its block could hold.

    Cost: the products to certify the pairs from ``v0`` (for a top-10 Hessian
    spectrum typically 30-60), plus each verification round's products (a
    fresh block until the next eigenvalue is resolved from the wanted ones:
    about the number of products that takes, typically 10-30 for separated
    spectra, more for a clustered one). Memory: ``m + 2`` vectors. Work per
    product: ``O(m N)`` reorthogonalisation and one ``m x m`` ``eigh``; per
    restart ``O(m^2 N)``.

    Derivatives: forward mode (``jax.jvp``, ``jax.jacfwd``) differentiates the whole
    solve: a simple eigenvalue's tangent is ``v^T dA v``, an eigenvector's that of
    perturbation theory, to the solve's tolerance. At a repeated eigenvalue neither is
    defined (the copies' tangents are the eigenvalues of ``V^T dA V`` over the eigenspace
    ``V``, which a per-vector formula does not give; only their sum is right, and the
    eigenvectors' tangents divide by the copies' zero gap): differentiate the block's
    trace, or ``eigh`` of ``V^T dA V``, there. Reverse mode (``jax.grad``) is not
    supported (the solve is a ``lax.while_loop``; JAX's error suggests ``lax.scan``,
    which does not apply). For the gradient of a simple eigenvalue (a sharpness
    penalty), differentiate the Rayleigh quotient at the returned vector held fixed,
    ``lambda p: v @ hvp(p, v)`` with ``v = jax.lax.stop_gradient(eigenvector)``: by
    Hellmann-Feynman its gradient is the eigenvalue's, at the cost of one
    third-order product.

    Args:
      matvec: symmetric linear operator on pytrees shaped like ``v0``: a curvlib
        operator (a `jax.tree_util.Partial`), a host-driven operator
        over streamed data (``host_driven = True``), or any function. A plain
        function or closure is traced once per call to identify its program
        (a few milliseconds) and the arrays it closes over become inputs, so
        an eager call with a new closure of the same program reuses the
        compiled code; a Python scalar it closes over is part of the program.
      v0: non-zero start vector (e.g. ``jax.random.normal``-filled params).
      k: number of wanted pairs, ``1 <= k < dim``.
      which: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or
        ``"LM"`` (largest magnitude).
      key: PRNG key for the verification blocks and for restarts after a
        breakdown; default: derived from ``v0``'s values (deterministic).
      solver: a [`curvlib.Eigsh`][curvlib.Eigsh] holding the options below (their one
        place of defaults and checks); the keywords below override its fields.
      rtol: relative residual tolerance; ``None``: [`curvlib.Eigsh`][curvlib.Eigsh]'s,
        ``sqrt(eps)`` of the least precise leaf dtype of ``v0``, of
        ``basis_dtype`` and of ``matvec``'s products (a float32 model's products of a
        float64 ``v0`` certify no more than float32's); ``0`` for machine precision. May be traced.
        (Renamed from ``tol``, which still works with a warning.)
      basis_size: Krylov basis size ``m`` (vectors stored), ``k + 2 <= m <= dim``;
        default ``min(dim, max(4k, 20))``. With ``m = dim`` the basis spans the
        whole space and the answer is exact without verification (``dim``
        products at most). Verification wants ``m >= k + 3``: at ``k + 2`` a
        restart cannot keep a fresh chain's best vector beside the wanted ones, the
        probability bound starts over at each restart, and the call can spend its
        budget with ``converged=False`` while the residuals meet ``rtol`` (a
        ``UserWarning`` says so when ``k + 2 < dim``).
        (``num_matvecs`` is its deprecated name.)
      max_matvecs: product budget; default ``100 m``. May be traced.
      max_restarts: cap on thick restarts; default 1000. May be traced.
      num_keep: Ritz vectors kept per restart, ``k <= num_keep < m - 1``;
        default ``k + (m - k) // 2``.
      basis_dtype: storage dtype of the Krylov basis (default: ``v0``'s). A
        lower precision halves the stored basis (``m N`` entries) while inner
        products and the projected matrix accumulate in float32 or wider; the
        attainable relative residual is then about ``sqrt(eps)`` of
        ``basis_dtype`` (float32: ~3e-4; bfloat16: ~9e-2), which is also the
        default ``rtol``. Eigenvectors are returned in ``v0``'s dtypes.
      verify: run the verification phase (default ``True``; see
        [`Eigsh`][curvlib.Eigsh]): it also certifies that no copy of a wanted
        eigenvalue, and none beyond the wanted ones, was missed (about a basis of
        products more). ``False`` saves those products, and ``converged`` then
        certifies the Ritz residuals only, as in ARPACK.

    Returns:
      An [`EigshResult`][curvlib.EigshResult].

    Raises:
      ValueError: for ``k``, ``basis_size``, ``num_keep`` or ``max_matvecs`` out of
        range, an unknown ``which``, or a matvec whose output is not shaped like ``v0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import curvlib
      >>> A = jnp.diag(jnp.arange(-50.0, 50.0))  # dominant negative eigenvalues
      >>> res = curvlib.eigsh(lambda v: A @ v, jnp.ones(100), k=3, which="LA")
      >>> res.eigenvalues.round(3).tolist(), bool(res.converged)
      ([49.0, 48.0, 47.0], True)
      >>> res = curvlib.eigsh(lambda v: A @ v, jnp.ones(100), k=2, which="SA")
      >>> res.eigenvalues.round(6).tolist()
      [-50.0, -49.0]

      A repeated eigenvalue: one Krylov chain sees a single copy; verification
      finds the others.

      >>> D = jnp.concatenate([jnp.full(4, 5.0), jnp.linspace(0.0, 4.5, 196)])
      >>> res = curvlib.eigsh(lambda v: D * v, jnp.ones(200), k=4)
      >>> res.eigenvalues.round(6).tolist(), bool(res.converged)
      ([5.0, 5.0, 5.0, 5.0], True)

      The options as one value, the form every function built on eigsh takes:

      >>> opts = curvlib.Eigsh(rtol=1e-6, basis_size=30)
      >>> curvlib.eigsh(lambda v: A @ v, jnp.ones(100), k=3, solver=opts).eigenvalues.tolist()
      [49.0, 48.0, 47.0]

    References:
      K. Wu and H. Simon, *Thick-restart Lanczos method for large symmetric
      eigenvalue problems*, SIAM J. Matrix Anal. Appl. 2000; A. Ruhe,
      *Implementation aspects of band Lanczos algorithms for computation of
      eigenvalues of large sparse symmetric matrices*, Math. Comp. 1979.
    """
    solver = solvers.resolve(
        solvers.Eigsh, solver, rtol=rtol, basis_size=basis_size, max_matvecs=max_matvecs,
        max_restarts=max_restarts, num_keep=num_keep, basis_dtype=basis_dtype, verify=verify)
    cfg, tol, max_matvecs, max_restarts = _configure(matvec, v0, k, which, solver)
    _validate.prng_key(key, optional=True)
    if _driver.is_host_driven(matvec):
        return _solve_host(cfg, matvec, v0, key, tol, max_matvecs, max_restarts)
    return _compiled(cfg, matvec, v0, key, tol, max_matvecs, max_restarts)


def _configure(matvec, v0, k, which, solver: solvers.Eigsh):
    """Validated ``(cfg, tol, max_matvecs, max_restarts)`` for `eigsh`'s arguments."""
    tol, basis_size, max_matvecs = solver.rtol, solver.basis_size, solver.max_matvecs
    max_restarts, num_keep, basis_dtype = solver.max_restarts, solver.num_keep, solver.basis_dtype
    _validate.float_leaves(v0, "v0")
    n = _tree.size(v0)
    _validate.one_of(which, "which", WHICH)
    k = _validate.static_int(k, "k", minimum=1)
    if k > n - 1:
        raise ValueError(
            f"`k` must be in [1, {n - 1}] (smaller than dim = {n}, the size of `v0`); got {k}. "
            "For all eigenpairs use a dense eigendecomposition (jnp.linalg.eigh)."
        )
    if basis_size is None:
        m = min(n, max(4 * k, 20))
    else:
        m = _validate.static_int(basis_size, "basis_size", minimum=min(k + 2, n), maximum=n,
                                 what=f"k + 2 <= basis_size <= dim (or = dim), k={k}, dim={n}")
    if solver.verify and m == k + 2 < n:
        _deprecation.warn_user(
            f"eigsh: `basis_size` = {m}, two more than the {k} wanted eigenpairs, leaves no "
            "room for verification (a fresh chain beside the wanted vectors): the call will "
            "most likely spend its whole budget with converged=False, the residuals met. Pass "
            f"basis_size >= {k + 3}, or verify=False to certify the residuals only.")
    keep = k + (m - k) // 2 if num_keep is None else _validate.static_int(
        num_keep, "num_keep", minimum=k, maximum=m - 2, what="k <= num_keep < basis_size - 1")
    keep = min(keep, m - 2)
    if max_matvecs is None:
        max_matvecs = 100 * m
    elif not isinstance(max_matvecs, jax.core.Tracer):
        max_matvecs = _validate.static_int(max_matvecs, "max_matvecs", minimum=1)
    if not isinstance(max_restarts, jax.core.Tracer):
        max_restarts = _validate.static_int(max_restarts, "max_restarts", minimum=0)
    basis_dtype = _validate.float_dtype(basis_dtype, "basis_dtype", optional=True)
    # the least precise of v0, the basis and the products: float32 products of a float64 v0
    # (a float32 model, x64 on) were certified at float64's sqrt(eps), their true residuals
    # 10x the tolerance (the residuals the basis sees omit the products' rounding); an
    # explicit rtol below their precision, 500x (`_thresholds`' floor is this dtype's)
    dts = [x.dtype for x in jax.tree.leaves(v0)] + [basis_dtype] * (basis_dtype is not None)
    if not _driver.is_host_driven(matvec):
        with _compile.collector_paused():  # (a trace of the product, as the call's own)
            dts += [x.dtype for x in jax.tree.leaves(_validate.operator(matvec, v0))]
    coarsest = max((np.dtype(d) for d in dts), key=lambda d: float(jnp.finfo(d).eps))
    if tol is None:
        tol = float(np.sqrt(float(jnp.finfo(coarsest).eps)))
    else:
        _validate.number(tol, "rtol", minimum=0)
    # the product's shapes are checked once, at the compiled entry (`_compiled`) or by
    # `eigsh_then`, not here as well
    layout = _space.choose_layout(v0)
    cfg = _Cfg(
        k=k, which=which, m=m, keep=keep, check_every=max(1, -(-m // 64)),
        max_inject=max(1, min(k, (m - k) // 2)), layout=layout, basis_dtype=basis_dtype, dim=n,
        verify=bool(solver.verify), precision=coarsest,
    )
    return cfg, tol, max_matvecs, max_restarts


def _solve_host(cfg, matvec, v0, key, tol, max_matvecs, max_restarts):
    setup = _driver._jitted(_setup, cfg)
    finish = _driver._jitted(_finish, cfg)
    state = setup(v0, key, tol, max_matvecs, max_restarts)
    state = _driver.run_host(_request, _update, _running, cfg, matvec, state, report=_report)
    return finish(state)


# ----------------------------------------------- eigsh, then products that depend on it


class _ThenState(NamedTuple):
    eig: _State
    result: EigshResult  # eigsh's answer, from the step its loop stopped
    rows: PyTree  # (t, ...) the vectors ``then(result)`` to multiply
    products: PyTree  # (t, ...) their products, filled in order
    done: jax.Array  # int32: rows multiplied so far


def eigsh_then(matvec, v0, k, then, num_rows, *then_args, **kwargs):
    """`eigsh`, then the products of ``num_rows`` vectors built from its result: one loop.

    ``then(result, num_rows, *then_args)`` returns a pytree of ``num_rows`` vectors shaped like
    ``v0`` (leading axis ``num_rows``); the loop multiplies them one by one after
    eigsh's last product, through the same call site of ``matvec``, so the
    compiled program holds the operator once (a separate block of products
    would compile the model a second time: ``track_curvature``'s trace
    probes). Returns ``(result, rows, products)``. ``kwargs`` are
    [`eigsh`][curvlib.eigsh]'s; ``matvec`` must be traceable (not host-driven).
    An eager call compiles once per operator program, ``then`` (hashable: a
    module-level function, its data in ``then_args``) and options, as `eigsh`.
    """
    if _driver.is_host_driven(matvec):
        raise TypeError("eigsh_then needs a traceable `matvec`, not a host-driven operator.")
    options = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(solvers.Eigsh)
               if f.name in kwargs}  # eigsh's keywords for the fields of its solver value
    cfg, tol, max_matvecs, max_restarts = _configure(
        matvec, v0, k, kwargs.pop("which", "LA"),
        solvers.resolve(solvers.Eigsh, kwargs.pop("solver", None), **options))
    key = kwargs.pop("key", None)
    if kwargs:
        raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
    num_rows = _validate.static_int(num_rows, "num_rows", minimum=1)
    _validate.operator(matvec, v0, "matvec")
    return _then_compiled(cfg, matvec, v0, key, tol, max_matvecs, max_restarts, then, num_rows,
                          then_args)


def _then(cfg: _Cfg, matvec, v0, key, tol, max_matvecs, max_restarts, then, num_rows,
          then_args):
    """`eigsh_then`'s loop on checked arguments."""
    eig = _setup(cfg, v0, key, tol, max_matvecs, max_restarts)
    result = _zeros(jax.eval_shape(lambda e: _finish(cfg, e), eig))
    rows = _zeros(jax.eval_shape(lambda r: then(r, num_rows, *then_args), result))
    state = _ThenState(eig=eig, result=result, rows=rows, products=rows,
                       done=jnp.zeros((), jnp.int32))

    def switch(s):  # eigsh has stopped: its answer and the rows that depend on it
        res = _finish(cfg, s.eig)
        return s._replace(result=res, rows=then(res, num_rows, *then_args))

    def row(s):
        return jax.tree.map(lambda r: r[jnp.minimum(s.done, num_rows - 1)], s.rows)

    def body(s):
        searching = _running(cfg, s.eig)
        v = jax.lax.cond(searching, lambda: _request(cfg, s.eig), lambda: row(s))
        w = jax.tree.map(lambda a, b: jnp.asarray(a).astype(b.dtype), matvec(v), v)
        eig = _tree.apply_if(searching, lambda e: _update(cfg, e, w), s.eig)
        s = s._replace(eig=eig)
        s = _tree.apply_if(searching & ~_running(cfg, eig), switch, s)
        slot = jnp.where(searching, num_rows, s.done)  # out of range: dropped
        products = jax.tree.map(lambda P, x: P.at[slot].set(x, mode="drop"), s.products, w)
        return s._replace(products=products, done=s.done + (~searching).astype(jnp.int32))

    state = _tree.apply_if(~_running(cfg, eig), switch, state)
    state = jax.lax.while_loop(lambda s: _running(cfg, s.eig) | (s.done < num_rows), body,
                               state)
    return state.result, state.rows, state.products


def _then_now(cfg: _Cfg, matvec, v0, key, tol, max_matvecs, max_restarts, then, num_rows,
              then_args):
    """`_then` answered without compiling it: eigsh's answer-now path (`_solve_now`), then
    the rows' products one by one through the product it compiled alone (the loop of
    `_then` multiplies them one by one too: the same arithmetic to rounding)."""
    result = _solve_now(cfg, matvec, v0, key, tol, max_matvecs, max_restarts)
    rows, flat = _now_rows(then, result, num_rows, then_args, v0)
    products = jnp.stack([_space.flat_product(matvec, v0, x) for x in flat])
    return result, rows, _now_products(v0, rows, products)


@_driver.quick_jit(static_argnames=("then", "num_rows"))
def _now_rows(then, result, num_rows, then_args, v0):
    """``then``'s rows, and the same rows with ``v0`` ravelled (`_space.flat_product`'s)."""
    rows = then(result, num_rows, *then_args)
    return rows, _space.Space(v0, "concat").flatten_basis(rows)


@_driver.quick_jit
def _now_products(v0, rows, products):
    """The products (rows of ``v0`` ravelled) shaped and typed as ``rows``."""
    P = _space.Space(v0, "concat").unflatten_basis(products)
    return jax.tree.map(lambda p, r: p.astype(r.dtype), P, rows)


# (an eager `eigsh_then` answers now; its fused program compiles behind at once, without
# waiting for a quiet second: its caller, a curvature tracker's refresh, runs inside a
# training loop that never pauses, where the fused program would otherwise never compile)
_then_compiled = _compile.entry(
    static=("cfg", "then", "num_rows"), operators={"matvec": "v0"}, now=_then_now,
    now_when=lambda cfg, v0, **_: _driver.answers_now(cfg.layout, v0), quiet=False)(_then)


def _zeros(shapes):
    """Zeros for ``jax.eval_shape`` results, keeping explicit sharding types."""
    def zeros(a):
        s = getattr(a, "sharding", None)
        mesh = getattr(s, "mesh", None)
        explicit = (mesh is not None and not mesh.empty
                    and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types))
        return jnp.zeros(a.shape, a.dtype, out_sharding=s if explicit else None)

    return jax.tree.map(zeros, shapes)
