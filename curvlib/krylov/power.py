"""Deflated power iteration with signed Rayleigh quotients (the classical baseline)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _compile, _deprecation, _space, _tree, _validate
from curvlib._status import Status, from_flags
from curvlib._xp import at_set, cond, xp
from curvlib.krylov import _driver, solvers

PyTree = Any

_INT32_MAX = int(np.iinfo(np.int32).max)


class PowerIterationResult(NamedTuple):
    """Output of [`power_iteration`][curvlib.power_iteration].

    Attributes:
      eigenvalues: signed Rayleigh quotients ``theta_i = x_i^T A x_i`` (shape
        ``(k,)``), largest magnitude first (Ritz values of the pairs' span when
        all ``k`` were found, else in the order found); NaN for a pair that was
        never computed (see ``finite``).
      eigenvectors: pytree with leading axis ``k``, unit norm, mutually
        orthogonal, each signed so that its entry of largest magnitude is positive;
        NaN rows for pairs never computed.
      residual_norms: the true residuals ``||A x_i - theta_i x_i||`` (shape
        ``(k,)``), from the pairs' products (no recurrence); NaN for pairs never
        computed.
      num_matvecs: products used in total.
      converged: per pair, ``residual_norms[i] <= rtol |theta_i|`` (the true
        residual, not the deflated operator's), at an operator scale the products
        resolve (see ``status``).
      finite: ``v0`` and every product were finite. If not, the pairs completed
        before the first non-finite product are kept and every later one is NaN
        with ``converged=False``. (A pair is also NaN, with ``finite=True``, when
        the product budget ran out before it started.)
      status: the [`curvlib.Status`][curvlib.Status] code summarising all pairs: ``NONFINITE``
        (not ``finite``), ``BREAKDOWN`` (some pair not ``converged``, and a pair's deflated
        product vanished to rounding, or exactly: ``A``'s rank, numerically, is below ``k``;
        that pair's eigenvalue is about 0 and its vector orthogonal to the others; or a
        pair's start vanished to rounding), ``STALLED`` (every pair met its test at a
        scale where the products' terms fall below the dtype's normal range, flushed to
        zero: ``rtol |theta| / 10 < n^1.5 tiny``, e.g. below about ``4e-29`` for 1,000
        float32 entries at ``rtol = 1e-4``: right to what the products hold, not
        certified),
        ``MAX_STEPS`` (some pair not ``converged``: the budget ran out, or a pair was
        never computed), else ``SUCCESS`` (every pair converged).
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residual_norms: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array
    finite: jax.Array
    status: jax.Array = Status.SUCCESS


class _PowerState(NamedTuple):
    X: PyTree  # (k, ...) pairs found so far (zero rows beyond them)
    AX: PyTree  # their products A x_i (from the pair's last iteration)
    thetas: jax.Array
    res: jax.Array
    conv: jax.Array
    i: jax.Array  # the pair being computed
    x: PyTree  # its current unit iterate, orthogonal to the rows of X
    it: jax.Array  # products spent on pair i
    total: jax.Array
    started: jax.Array  # pair i has a usable start
    finite: jax.Array
    broke: jax.Array  # a pair stopped because its deflated product vanished to rounding


def _project_out(X, v, acc, passes: int = 2):
    """``v`` minus its components along the rows of ``X``, classical Gram-Schmidt ``passes``
    times (twice by default)."""
    for _ in range(passes):
        v = _tree.sub(v, _tree.basis_combine(X, _tree.basis_project(X, v, acc), like=v))
    return v


def _start(X, i, u0, draw, acc):
    """Unit start for pair ``i``: ``u0``, plus for every pair after the first a fresh random
    direction ``draw(i)``, projected onto the complement of the pairs found.

    A start shared by every pair would fail on a repeated eigenvalue: once one copy is
    found, the deflated start has no component left along the others (``u0`` projected on
    the eigenspace *is* that copy), and the next pair converges to the next value instead,
    reported as converged. The random part sees every direction; ``u0``'s part keeps what a
    good start knows. A zero ``u0`` (a zero or non-finite ``v0``) starts pair 0 at random
    too. ``u0`` is the unit (or zero) start vector, so every norm here is of a vector of
    order one. Returns ``(x, ok)``; ``ok`` is False when the start vanishes to rounding
    (``<= 10 eps``).
    """
    eps = xp.finfo(acc).eps
    fresh = (i > 0) | ~(_tree.plain_norm(u0).astype(acc) > 0)
    g = _tree.unit(draw(i), acc)
    v = _project_out(X, _tree.add_scale(u0, xp.where(fresh, 1.0, 0.0).astype(acc), g), acc)
    good = _tree.plain_norm(v).astype(acc) > 10 * eps
    return _tree.unit(v, acc), good


def _drawer(space, seed):
    """``i -> `` pair ``i``'s random direction in ``space``'s layout (`_space.Space.gaussian`:
    the same numbers on every path)."""
    return lambda i: space.gaussian(seed, i)


def _options(solver, max_matvecs, num_iters, rtol):
    """``(max_matvecs, num_iters, rtol)`` of ``solver`` (default ``PowerIteration()``)."""
    s = solvers.resolve(solvers.PowerIteration, solver, max_matvecs=max_matvecs,
                        num_iters=num_iters, rtol=rtol)
    return s.max_matvecs, s.num_iters, s.rtol


def _precheck(matvec, v0, k, key, solver, max_matvecs, num_iters, rtol):
    _validate.prng_key(key, optional=True)
    max_matvecs, num_iters, rtol = _options(solver, max_matvecs, num_iters, rtol)
    if not isinstance(rtol, jax.Array):  # a JAX array may be computed at run time
        _validate.number(rtol, "rtol", minimum=0)


# ------------------------------------------------------------------ answer now
#
# An eager first call answers through the same iteration driven from the host
# (`_driver.solve_now`): its steps are programs of v0's size, dtype and ``k`` only (the
# budgets and the tolerance are data), with the model's product compiled alone; the fused
# program compiles behind (`compile_behind`).


class _NowCfg(NamedTuple):
    k: int
    acc: str
    layout: str = "identity"  # (`solve_now` runs the steps on one flat vector)


class _NowState(NamedTuple):
    power: _PowerState
    u0: jax.Array
    seed: jax.Array  # uint32: the pairs' random directions (`_drawer`)
    tol: jax.Array
    num_iters: jax.Array
    max_matvecs: jax.Array


def _now_setup(cfg: _NowCfg, v0, _key, tol, num_iters, max_matvecs, seed) -> _NowState:
    draw = _drawer(_space.Space(v0, cfg.layout), seed)
    init, u0 = _power_init(v0, cfg.k, draw, xp.dtype(cfg.acc))
    return _NowState(init, u0, xp.asarray(seed, xp.uint32), tol, num_iters, max_matvecs)


def _now_request(cfg: _NowCfg, s: _NowState):
    return s.power.x


def _now_update(cfg: _NowCfg, s: _NowState, w) -> _NowState:
    draw = _drawer(_space.Space(s.u0, cfg.layout), s.seed)
    power = _power_step(s.power, w, s.u0, draw, cfg.k, s.tol, s.num_iters,
                        s.max_matvecs, xp.dtype(cfg.acc))
    return s._replace(power=power)


def _now_running(cfg: _NowCfg, s: _NowState):
    p = s.power
    return (p.i < cfg.k) & p.started & p.finite & (p.total < s.max_matvecs)


def _now_finish(cfg: _NowCfg, s: _NowState) -> PowerIterationResult:
    return _power_result(s.power, cfg.k, s.tol, xp.dtype(cfg.acc))


def _answers_now(matvec, v0, k, key, solver, max_matvecs, num_iters, rtol) -> bool:
    return (not _driver.is_host_driven(matvec)
            and _driver.answers_now(_space.choose_layout(v0), v0))


def _power_now(matvec, v0, k, key, solver, max_matvecs, num_iters, rtol):
    """`power_iteration` answered without its fused compile (`_driver.solve_now`)."""
    k, max_matvecs, num_iters, tol = _checked(v0, k, solver, max_matvecs, num_iters, rtol)
    _validate.operator(matvec, v0, "matvec", "v0")
    cfg = _NowCfg(k=k, acc=jnp.dtype(_tree.acc_dtype(_tree.dtype(v0))).name)
    # (the setup receives the seed the fused program derives from the key or v0: the same
    # draws)
    return _driver.solve_now(
        _now_setup, _now_request, _now_update, _now_running, _now_finish, cfg, matvec, v0, key,
        tol, np.int32(num_iters), np.int32(max_matvecs),
        bases=("eigenvectors",), host_rows=2 * k + 4)


@_deprecation.renamed("curvlib.power_iteration", tol="rtol")
@_compile.function(static=("k", "max_matvecs", "num_iters"), operators={"matvec": "v0"},
                   precheck=_precheck, now=_power_now, now_when=_answers_now)
def power_iteration(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    k: int = 1,
    *,
    key: jax.Array | None = None,
    solver: solvers.PowerIteration | None = None,
    max_matvecs: int | None = None,
    num_iters: int | None = None,
    rtol=None,
) -> PowerIterationResult:
    """``k`` dominant eigenpairs by power iteration with deflation.

    For pair ``i`` iterate ``x <- P A x / ||P A x||`` with ``P`` the projector
    onto the complement of the pairs already found (Hotelling / Wielandt
    deflation by orthogonalisation) and the *signed* Rayleigh quotient
    ``theta = x^T A x``. This is the method PyHessian and most loss-landscape
    code use; it finds the largest-*magnitude* eigenvalues (a dominant negative
    Hessian eigenvalue comes first) and converges at the rate
    ``|lambda_{i+1} / lambda_i|``. It is kept as a baseline:
    [`curvlib.eigsh`][curvlib.eigsh] is faster and targets the algebraically largest values.

    A pair stops iterating when the residual of the *deflated* operator,
    ``||P A x - theta x||``, is at most ``rtol |theta| / sqrt(k)`` (iterating further
    cannot lower the true residual: its component along the pairs already found
    is fixed by their own residuals), or at its product cap. ``converged``
    judges the *true* residual ``||A x - theta x|| <= rtol |theta|`` of the
    returned pairs: it certifies eigenpairs, not that they are the dominant ones.
    From a ``v0`` with no component along the dominant eigenvector (another
    eigenvector, say ``e_1`` of a diagonal operator) pair 0 converges to ``v0``'s
    own eigenvalue, certified; ``eigsh``'s verification rounds (fresh random
    directions) find the one such a start misses.

    When all ``k`` pairs are found, a final Rayleigh-Ritz step on their span
    (``X A X^T = Y Theta Y^T``, from the products already computed) rotates
    them into the Ritz pairs of that span: this removes the couplings
    ``x_j^T A x_i`` that each pair's residual leaves in the later ones. A Ritz
    pair's residual combines up to ``k`` of the pairs' deflated residuals (at most
    ``sqrt(k)`` times the largest), hence the ``1 / sqrt(k)`` of the stopping rule:
    a repeated eigenvalue's pairs, mixed by the rotation, still meet ``rtol``.

    Every pair runs in one ``lax.while_loop`` with one product per iteration:
    the compiled program holds the operator once, whatever ``k``.

    Cost: at most ``max_matvecs`` products (each iteration's product serves its
    Rayleigh quotient, both residuals and the next iterate; the Rayleigh-Ritz
    step reuses each pair's last product); memory ``2k + 3`` vectors.

    Args:
      matvec: symmetric operator on pytrees shaped like ``v0``.
      v0: start vector of the first pair; each later pair starts from it plus a fresh
        random direction, deflated (a start shared by every pair has no component left
        along the other copies of a repeated eigenvalue once one is found).
      k: number of pairs (static, ``1 <= k < dim``).
      key: PRNG key for the random directions of the later pairs' starts (and of the
        first pair's when ``v0`` is zero); ``None``: a seed derived from ``v0``
        (deterministic, as in [`curvlib.eigsh`][curvlib.eigsh]).
      max_matvecs: total product budget over all pairs (static, ``>= 1``);
        default ``k * num_iters``. A pair cut short by it is returned with its
        current (unconverged) values; pairs never started are NaN.
      num_iters: product cap per pair (static, ``>= 1``); default 100 when
        ``max_matvecs`` is not given either, else no per-pair cap.
      solver: a [`curvlib.PowerIteration`][curvlib.PowerIteration] holding ``max_matvecs``,
        ``num_iters`` and ``rtol`` (their one place of defaults and checks); the
        keywords below override its fields.
      rtol: relative residual tolerance; ``None``:
        [`curvlib.PowerIteration`][curvlib.PowerIteration]'s, ``1e-4`` (renamed from ``tol``, which
        still works with a warning; traceable, ``>= 0``; a negative or
        non-finite Python/NumPy number is refused).

    Returns:
      A [`PowerIterationResult`][curvlib.PowerIterationResult].

    Raises:
      ValueError: if ``k`` is not an int in ``[1, dim)``, ``max_matvecs`` or
        ``num_iters`` is not an int ``>= 1``, ``rtol`` is a negative Python/NumPy
        number, or ``matvec(v0)`` does not match ``v0``.
      TypeError: for non-float leaves of ``v0``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib import power_iteration
      >>> A = jnp.diag(jnp.array([-3.0, 2.0, 1.0, 0.5]))
      >>> res = power_iteration(lambda v: A @ v, jnp.ones(4), k=2, num_iters=500, rtol=1e-5)
      >>> res.eigenvalues.round(4).tolist()  # signed, by magnitude
      [-3.0, 2.0]
      >>> res.converged.tolist()  # judged on the true residuals ||A x - theta x||
      [True, True]
      >>> bool(jnp.all(res.residual_norms <= 1e-5 * jnp.abs(res.eigenvalues)))
      True

      A zero start begins at random:

      >>> res = power_iteration(lambda v: A @ v, jnp.zeros(4), key=jax.random.PRNGKey(0),
      ...                       max_matvecs=1000, rtol=1e-6)
      >>> round(float(res.eigenvalues[0]), 4)
      -3.0

    References:
      R. von Mises and H. Pollaczek-Geiringer, *Praktische Verfahren der
      Gleichungsaufloesung*, ZAMM 1929; Yao et al., *PyHessian*, 2020.
    """
    k, max_matvecs, num_iters, tol = _checked(v0, k, solver, max_matvecs, num_iters, rtol)
    acc = _tree.acc_dtype(_tree.dtype(v0))
    host = _driver.is_host_driven(matvec)
    # on one device with one dtype, the iteration runs on the leaves concatenated into one
    # vector (`_space`): one operation per vector update instead of one per leaf (a smaller
    # program, compiled faster), one copy of N numbers around each product
    space = _space.Space(v0, "concat" if not host and _space.choose_layout(v0) == "concat"
                         else "identity")

    def checked(v):
        out = matvec(v)
        # checked at the operator's (only) trace: no separate shape-checking trace
        _validate.same_structure(v0, out, "v0", "matvec(v0)")
        return out

    flat = space.layout == "concat"
    slot = _driver.Slot(space.wrap(checked) if flat else matvec)
    start = space.flatten(v0)
    draw = _drawer(space, _space.seed(v0, key))
    init, u0 = _power_init(start, k, draw, acc)

    def product(x):
        out = slot(x)
        if flat:
            return out  # checked and cast by the wrap
        _validate.same_structure(v0, out, "v0", "matvec(v0)")
        return jax.tree.map(lambda a, b: jnp.asarray(a).astype(b.dtype), out, x)

    def cond(s: _PowerState):
        return (s.i < k) & s.started & s.finite & (s.total < max_matvecs)

    def body(s: _PowerState):
        return _power_step(s, product(s.x), u0, draw, k, tol, num_iters, max_matvecs, acc)

    s = _driver.while_loop(cond, body, init, host=host, slot=slot)
    res = _power_result(s, k, tol, acc)
    return res._replace(eigenvectors=space.unflatten_basis(res.eigenvectors))


def _checked(v0, k, solver, max_matvecs, num_iters, rtol):
    """``(k, max_matvecs, num_iters, rtol)`` validated, the budgets' defaults filled in."""
    _validate.float_leaves(v0, "v0")
    n = _tree.size(v0)
    k = _validate.static_int(k, "k", minimum=1, maximum=n - 1, what=f"the dimension of v0 is {n}")
    max_matvecs, num_iters, tol = _options(solver, max_matvecs, num_iters, rtol)
    num_iters = _validate.static_int(num_iters, "num_iters", optional=True, minimum=1)
    max_matvecs = _validate.static_int(max_matvecs, "max_matvecs", optional=True, minimum=1)
    if not isinstance(tol, jax.Array):  # a JAX array may be computed at run time
        _validate.number(tol, "rtol", minimum=0)
    return (k, *_budgets(k, max_matvecs, num_iters), tol)


def _budgets(k, max_matvecs, num_iters):
    """``(max_matvecs, num_iters)``: the total and per-pair product caps, defaults filled in."""
    if max_matvecs is None:
        num_iters = 100 if num_iters is None else num_iters
        max_matvecs = k * num_iters
    elif num_iters is None:
        num_iters = max_matvecs
    return min(max_matvecs, _INT32_MAX), min(num_iters, _INT32_MAX)


def _power_init(v0, k, draw, acc):
    """``(state, u0)``: the loop's start (no pair found, pair 0 started) and the unit ``v0``."""
    finite0 = _tree.all_finite(v0)
    v0 = _tree.where(finite0, v0, _tree.zeros_like(v0))
    X = _tree.basis_zeros(v0, k)
    u0 = _tree.unit(v0, acc, _tree.norm)  # the one scale-safe norm of the start
    x, ok = _start(X, 0, u0, draw, acc)
    init = _PowerState(
        X=X, AX=X, thetas=xp.zeros(k, acc), res=xp.zeros(k, acc), conv=xp.zeros(k, bool),
        i=xp.zeros((), xp.int32), x=x, it=xp.zeros((), xp.int32),
        total=xp.zeros((), xp.int32), started=ok, finite=finite0, broke=xp.asarray(False),
    )
    return init, u0


def _power_measure(s: _PowerState, raw, acc):
    """``(raw, fin, theta, true_res, defl, defl_res, c)`` of the iterate from its product
    ``raw`` (``c = ||A x||``, 1 for a zero or non-finite product).

    ``theta = x^T A x``, ``true_res = ||A x - theta x||``, ``defl = P A x / ||A x||``
    (``x`` is already in ``range(P)``; the rows of ``X`` past ``i`` are zero) and
    ``defl_res = ||P A x - theta x||``; a non-finite ``raw`` is replaced by zeros.
    Everything is computed on ``u = A x / ||A x||`` (one scale-safe norm per
    iteration; the vectors after it are of order one, their plain norms neither
    overflow nor underflow at any operator scale) and scaled back.
    """
    fin = _tree.all_finite(raw)
    raw = _tree.where(fin, raw, _tree.zeros_like(raw))
    c = _tree.norm(raw).astype(acc)
    c = xp.where((c > 0) & xp.isfinite(c), c, 1.0)
    # (divided in ``acc``: ``||A x||`` may lie past the vector dtype's range, float16's 65504,
    # where ``c`` cast down was inf and ``u`` zero: theta 0, residual 0, "converged")
    u = jax.tree.map(lambda y: (y.astype(acc) / c).astype(y.dtype), raw)
    theta = _tree.vdot(s.x, u).astype(acc)
    true_res = c * _tree.plain_norm(_tree.add_scale(u, -theta, s.x)).astype(acc)
    defl = _tree.sub(u, _tree.basis_combine(s.X, _tree.basis_project(s.X, u, acc), like=u))
    defl_res = c * _tree.plain_norm(_tree.add_scale(defl, -theta, s.x)).astype(acc)
    return raw, fin, c * theta, true_res, defl, defl_res, c


def _power_step(s: _PowerState, raw, u0, draw, k, tol, num_iters, max_matvecs, acc):
    """One iteration from the product ``raw = A x``: store the pair when done, else iterate.

    Cost: no product (``raw`` is the iteration's one); two projections onto ``X``.
    """
    raw, fin, theta, true_res, defl, defl_res, c = _power_measure(s, raw, acc)
    it, total = s.it + 1, s.total + 1
    # each pair to rtol / sqrt(k): the final Rayleigh-Ritz residual of a pair mixes up to
    # k deflated residuals (a sum bounded by sqrt(k) times the largest)
    stop = tol / math.sqrt(k) if k > 1 else tol
    # the deflated product vanished to rounding (``A x`` lies in the span of the pairs
    # found: the complement is numerically null, rank(A) < k): x is as good as it gets,
    # and iterating on the noise would only turn it away from the complement. Rounding
    # of ``||A||``'s scale, not of ``A x``'s: a null direction's product is itself
    # rounding noise (a dense rank-one A), and deflated relative to its own norm it was
    # of order one: 100 products, then MAX_STEPS instead of the breakdown
    anorm = xp.maximum(xp.where(s.i > 0, xp.abs(s.thetas[0]), 0.0), c)
    broke = fin & (c * _tree.plain_norm(defl).astype(acc) <= 10 * xp.finfo(acc).eps * anorm)
    done = fin & ((defl_res <= stop * xp.abs(theta)) | broke | (it >= num_iters)
                  | (total >= max_matvecs))
    store = lambda B, v: jax.tree.map(
        lambda q, y: xp.where(done, at_set(q, s.i, y.astype(q.dtype)), q), B, v)
    X, AX = store(s.X, s.x), store(s.AX, raw)
    thetas = xp.where(done, at_set(s.thetas, s.i, theta), s.thetas)
    res = xp.where(done, at_set(s.res, s.i, true_res), s.res)
    conv = xp.where(done, at_set(s.conv, s.i, true_res <= tol * xp.abs(theta)), s.conv)
    i = s.i + done.astype(xp.int32)

    def next_pair(_):
        return _start(X, i, u0, draw, acc)

    def same_pair(_):
        # ``defl`` was projected once; a second pass keeps the iterate orthogonal to X
        # where ``A x`` lies almost inside span(X) (a null direction's product is rounding
        # noise: one pass left it far from orthogonal, and the final Rayleigh-Ritz step,
        # which assumes orthonormal rows, corrupted the pairs already found)
        return _tree.unit(_project_out(X, defl, acc, passes=1), acc), xp.asarray(True)

    x, started = cond(done & (i < k), next_pair, same_pair, None)
    return _PowerState(
        X=X, AX=AX, thetas=thetas, res=res, conv=conv, i=i, x=x,
        it=xp.where(done, 0, it).astype(xp.int32), total=total, started=started,
        # (every vanished product counts, an exact one too: a pair whose product was exactly
        # zero met its own test, 0 <= 0, and the final Rayleigh-Ritz step left it
        # unconverged at rounding level; masked by that test, such a run, the all-ones matrix
        # from v0 = ones with k = 2, said MAX_STEPS after 2 of 200 products. `_power_result`
        # reports the breakdown only when some pair is not converged)
        finite=s.finite & fin, broke=s.broke | broke,
    )


def _products_resolve(scale, tol, like):
    """Whether products at the operator's scale resolve its pairs to ``tol`` (traceable).

    The residuals here are measured on unit vectors, exact at any scale; the user's products
    are not: a product in a dtype whose terms fall below its smallest normal number
    (``tiny``) loses them (XLA flushes subnormals to zero), up to ``n tiny`` per entry and
    ``n^1.5 tiny`` in norm over the ``n`` entries. Certified only while that stays below a
    tenth of ``tol |theta|``: a float32 operator of norm ``4e-36`` had products 6% off and
    an eigenvalue 0.8% off reported converged at ``rtol = 1e-4``.
    """
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(like))
    tiny = max(float(np.finfo(np.dtype(x.dtype)).tiny) for x in jax.tree.leaves(like))
    return scale * xp.asarray(tol, scale.dtype) / 10 >= float(n) ** 1.5 * tiny


def _power_result(s: _PowerState, k, tol, acc) -> PowerIterationResult:
    """The result from the final state: Ritz pairs of the span when all ``k`` were found."""
    found = xp.arange(k) < s.i
    X, thetas, res, conv = s.X, s.thetas, s.res, s.conv
    if k > 1:
        # Rayleigh-Ritz on the span of the pairs, from their stored products (no new
        # product): removes the couplings x_j^T A x_i = r_j^T x_i that the earlier pairs'
        # residuals leave in the later ones
        Xr, thr, resr = _rayleigh_ritz(s.X, s.AX, acc)
        use = s.finite & (s.i == k)
        X = jax.tree.map(lambda a, b: xp.where(use, a, b), Xr, X)
        thetas = xp.where(use, thr, thetas)
        res = xp.where(use, resr, res)
        conv = xp.where(use, resr <= tol * xp.abs(thr), conv)
    X = _tree.sign_fixed(X)  # one sign per vector, as eigsh's (whichever path ran)
    cert = _products_resolve(xp.max(xp.where(found, xp.abs(thetas), 0.0)), tol, s.x)
    stalled = ~cert & xp.all(found & conv)
    conv = conv & cert
    nan = xp.asarray(xp.nan, acc)
    return PowerIterationResult(
        eigenvalues=xp.where(found, thetas, nan),
        eigenvectors=jax.tree.map(
            lambda q: xp.where(found.reshape((k,) + (1,) * (q.ndim - 1)), q, xp.nan), X),
        residual_norms=xp.where(found, res, nan),
        num_matvecs=s.total,
        converged=found & conv,
        finite=s.finite,
        # (a start that vanished to rounding: the recursion ends there, a breakdown)
        status=from_flags(finite=s.finite, converged=xp.all(found & conv),
                          breakdown=(s.broke | ~s.started) & ~xp.all(found & conv),
                          stalled=stalled),
    )


def _rayleigh_ritz(X, AX, acc):
    """Ritz pairs of ``A`` on the span of ``X``'s orthonormal rows, given ``AX``; by ``|theta|``.

    Returns ``(X Y, theta, ||A X Y - X Y theta||)`` with ``Y`` the eigenvectors of
    ``X A X^T`` (symmetrised), sorted by decreasing magnitude of ``theta``.
    """
    H = _tree.basis_gram(X, AX, acc)
    theta, Y = xp.linalg.eigh(0.5 * (H + H.T))
    order = xp.argsort(-xp.abs(theta), stable=True)
    theta, Y = theta[order], Y[:, order]
    Xr = _tree.basis_matmul(Y.T, X)
    AXr = _tree.basis_matmul(Y.T, AX)
    # residuals divided by the largest |theta| before they are squared (no overflow or
    # underflow of the squares at any operator scale), multiplied back after
    c = xp.max(xp.abs(theta))
    c = xp.where((c > 0) & xp.isfinite(c), c, 1.0)
    R = jax.tree.map(
        lambda a, x: ((a - theta.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype) * x)
                      / c.astype(x.dtype)), AXr, Xr)
    res = c * xp.sqrt(xp.maximum(xp.diagonal(_tree.basis_gram(R, R, acc)), 0.0))
    return Xr, theta, res
