"""Conjugate gradients: damping, a negative-curvature (Steihaug) exit, implicit derivatives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _compile, _space, _tree, _validate
from curvlib._status import Status, from_flags
from curvlib._xp import cond, xp
from curvlib.krylov import _driver, solvers

PyTree = Any

# the step and product counters are int32 on every backend (with or without x64): a cap
# leaves room for the two products outside the CG steps (warm start, true residual)
_MAX_STEPS_CAP = int(np.iinfo(np.int32).max) - 2


class CGResult(NamedTuple):
    """Output of [`cg`][curvlib.cg].

    Attributes:
      x: the approximate solution of ``(A + damping I) x = b``; finite, but where
        the answer itself is past the dtype's largest number (float16: 65504), whose
        entries overflow (``finite=False``).
      num_steps: CG iterations taken (one product each).
      residual_norm: the *true* residual ``||b - (A + damping I) x||`` of the
        returned ``x`` (as returned: entries below the dtype's range are zeros),
        from a direct product at exit (not the recurrence's, which
        drifts from it in floating point and on inconsistent systems); NaN if ``b``
        or that product is not finite.
      converged: ``finite`` and ``residual_norm <= max(rtol ||b||, atol)``.
      negative_curvature: a direction with ``p^T (A + damping I) p <= 0`` was
        met (or below ``eps`` times the largest curvature met: zero to rounding, as for a
        singular system whose ``b`` leaves the range); ``x`` is the last iterate before it
        (Steihaug 1983).
      curvature_direction: that direction ``p`` (zeros when none was met): a
        descent-and-negative-curvature direction a trust-region method can use.
      finite: ``b`` and every product were finite; if not, ``x`` is the last
        finite iterate (or the overflowed answer) and ``converged=False``.
      num_matvecs: products used: ``num_steps``, plus one for a warm start
        ``x0``, plus one for the true residual when ``x`` moved.
      status: the [`curvlib.Status`][curvlib.Status] code, most serious first: ``NONFINITE``,
        ``NEGATIVE_CURVATURE`` (the Steihaug exit), ``STALLED`` (not ``converged``,
        stopped before ``max_steps``: the recurrence's residual met the tolerance and the
        true one did not, an ``rtol`` below what rounding allows), ``MAX_STEPS`` (not
        ``converged``: ``max_steps`` ran out), else ``SUCCESS``.
    """

    x: PyTree
    num_steps: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array
    curvature_direction: PyTree
    finite: jax.Array
    num_matvecs: jax.Array = 0
    status: jax.Array = Status.SUCCESS


# phases of the single product loop
_WARM, _STEP, _CHECK, _DONE = 0, 1, 2, 3


class _CGState(NamedTuple):
    phase: jax.Array  # which vector the next product is applied to (see _WARM ... _DONE)
    x: PyTree
    r: PyTree  # residual of x: exact after _WARM/_CHECK, recurrence after _STEP
    p: PyTree  # last search direction p, held as p / pn (pn = _tree.pow2_floor(pnorm))
    rz: jax.Array  # <r, M r> of the last accepted step (1 before the first)
    pnorm: jax.Array  # the recurrence's estimate of ||p|| (0 before the first step)
    rnorm: jax.Array  # ||r||
    moved: jax.Array  # x changed since its residual was last computed by a product
    step: jax.Array
    num_matvecs: jax.Array
    negcurv: jax.Array
    negdir: PyTree
    finite: jax.Array
    curvmax: jax.Array  # largest curvature d^T A d met by a step (d = p / pn, ||d|| ~ 1)
    xs: jax.Array  # x is held as x * xs, xs a power of two near the first step's curvature


def _cast_like(y: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: xp.asarray(a).astype(b.dtype), y, like)


def _check_max_steps(max_steps, n: int):
    """A Python/NumPy int (validated, capped to int32) or a traced integer scalar (capped)."""
    if max_steps is None:
        # finite-precision CG loses conjugacy and may need more than ``dim`` steps (SciPy's
        # choice is 10 * dim); capped so that the int32 counters cannot overflow
        return min(10 * n, _MAX_STEPS_CAP)
    if isinstance(max_steps, jax.core.Tracer):
        # a traced cap (e.g. a jit argument) only bounds the while_loop: one program serves
        # every value; it cannot be validated, and one below 1 takes no steps
        ms = jnp.asarray(max_steps)
        if ms.shape != () or not jnp.issubdtype(ms.dtype, jnp.integer):
            raise ValueError(
                f"a traced `max_steps` must be an integer scalar; got {ms.dtype}"
                f"{list(ms.shape)}."
            )
        return jnp.minimum(ms, _MAX_STEPS_CAP).astype(jnp.int32)
    return min(_validate.static_int(max_steps, "max_steps", minimum=1), _MAX_STEPS_CAP)


def _cg_solve(op, rhs, *, x0, precond, rtol, atol, max_steps, acc, host=False, slot=None):
    """CG on ``op x = rhs`` with every product at one call site; returns ``(x, aux)``.

    One ``lax.while_loop`` whose body applies ``op`` once, to the vector its phase
    names: the warm start (``_WARM``), the next search direction (``_STEP``), or the
    final iterate for the true residual (``_CHECK``). A compiled program thus holds
    the operator once, however many roles its products play.
    """
    rhs, sigma, rnorm0, tol, finite0 = _cg_scale(rhs, rtol, atol, acc)
    init, x0 = _cg_init(rhs, x0, sigma, rnorm0, tol, finite0, max_steps, acc)

    def cond(s: _CGState):
        return s.phase != _DONE

    def body(s: _CGState):
        d, rz, v, pn, pnorm = _cg_direction(s, x0, precond, acc, sigma)
        w = op(v)  # the one product of this iteration
        return _cg_advance(s, rhs, x0, d, rz, v, pn, pnorm, w, tol, max_steps, acc)

    s = _driver.while_loop(cond, body, init, host=host, slot=slot)
    return _cg_finish(s, sigma, tol)


def _cg_finish(s: _CGState, sigma, tol):
    """``(x, aux)`` of a finished loop, ``x`` and the residual scaled back by ``sigma``.

    ``aux = (num_steps, num_matvecs, residual_norm, converged, negative_curvature,
    curvature_direction, finite)``, the arguments of `_result` after ``x``.
    """
    converged = s.finite & (s.rnorm <= tol)
    aux = (s.step, s.num_matvecs, s.rnorm * sigma, converged, s.negcurv, s.negdir, s.finite)
    return _returned(s, sigma), aux


def _returned(s: _CGState, sigma) -> PyTree:
    """The iterate as `cg` returns it, in ``b``'s units: ``x xs`` scaled by ``sigma / xs``.

    Powers of two, so exact while the answer is in the dtype's range; past it (a float16
    solution of ``1e-8`` or ``1e5``) entries underflow or overflow here.
    """
    return _tree.scale(sigma / s.xs, s.x)


def _result(x, num_steps, num_matvecs, residual_norm, converged, negcurv, negdir,
            finite, *, max_steps) -> CGResult:
    """The `CGResult` of a finished solve (``x`` and `_cg_finish`'s ``aux``), its status
    from the flags: `cg` and its answer-now path report alike.

    A finite solve that stopped before ``max_steps`` without meeting the tolerance or
    negative curvature stopped on its recurrence's residual, which met the tolerance
    while the true one did not (the attainable accuracy: ``rtol`` below rounding) and
    reports ``STALLED``, not an exhausted budget."""
    stalled = finite & ~converged & ~negcurv & (num_steps < max_steps)
    return CGResult(
        x=x, num_steps=num_steps, residual_norm=residual_norm, converged=converged,
        negative_curvature=negcurv, curvature_direction=negdir, finite=finite,
        num_matvecs=num_matvecs,
        status=from_flags(finite=finite, converged=converged, negative_curvature=negcurv,
                          stalled=stalled),
    )


def _cg_scale(rhs, rtol, atol, acc):
    """``(b / sigma, sigma, ||b / sigma||, tol, finite)`` with ``sigma ~ ||b||``.

    CG is linear in b: it runs on b / sigma with ``||b / sigma||`` in ``[1, 2)`` (residuals
    and inner products of order one whatever the scale of b: no square overflows or
    underflows), and scales x and the residual back. ``sigma`` is the power of two below
    the scale-safe norm (one inner product; a second only at extreme scales), so the
    scaling is exact: CG's arithmetic is that on b itself, scaled. A zero b is not
    scaled; a NaN or an infinite entry makes b non-finite (as does a b whose norm
    exceeds the format's largest number: its residual has no value to report).
    ``tol = max(rtol ||b / sigma||, atol / sigma)`` is in b / sigma's units.
    Cost: one pass over b (two at extreme scales) and the scaling, no product.
    """
    bnorm = _tree.norm(rhs).astype(acc)
    finite0 = xp.isfinite(bnorm)
    sigma = _tree.pow2_floor(bnorm)
    rhs = _tree.scale(1.0 / sigma, rhs)  # exact: sigma is a power of two
    rnorm0 = bnorm / sigma  # ||b / sigma||, in [1, 2) for a non-zero b (exact scaling)
    tol = xp.maximum(rtol * rnorm0, atol / sigma)
    return rhs, sigma, rnorm0, tol, finite0


def _cg_init(rhs, x0, sigma, rnorm0, tol, finite0, max_steps, acc):
    """``(state, x0)``: the loop's start at ``x = 0`` and the scaled, finite warm start.

    The first phase is ``_WARM`` for a finite ``x0``, else ``_STEP``; ``_DONE`` when
    ``b`` is not finite, ``b = 0`` already meets ``tol``, or ``max_steps < 1``.
    """
    zeros = _tree.zeros_like(rhs)
    rnorm0 = xp.where(finite0, rnorm0, xp.nan)  # a non-finite b has no residual to report
    if x0 is None:
        x0, phase0 = zeros, xp.where(max_steps >= 1, _STEP, _DONE)
    else:
        # a non-finite warm start is dropped (x0 = 0), not multiplied
        ok = _tree.all_finite(x0)
        x0 = _tree.where(ok, _tree.scale(1.0 / sigma, x0), zeros)
        phase0 = xp.where(ok, _WARM, _STEP).astype(xp.int32)
    phase0 = xp.where(finite0 & ~(rnorm0 <= tol), phase0, _DONE).astype(xp.int32)
    init = _CGState(
        phase=phase0, x=zeros, r=rhs, p=zeros, rz=xp.ones((), acc),
        pnorm=xp.zeros((), acc), rnorm=rnorm0,
        moved=xp.asarray(False), step=xp.zeros((), xp.int32),
        num_matvecs=xp.zeros((), xp.int32), negcurv=xp.asarray(False), negdir=zeros,
        finite=finite0, curvmax=xp.zeros((), acc), xs=xp.ones((), acc),
    )
    return init, x0


def _cg_direction(s: _CGState, x0, precond, acc, sigma):
    """``(d, rz, v, pn, pnorm)``: the search direction ``p = M r + beta p_prev`` held as
    ``d = p / pn``, ``<r, M r>``, the vector ``v`` this phase's product is applied to
    (``d``, ``x0`` or ``x``), ``pn``, a power of two near ``||p||``, and ``pnorm``, the
    estimate of ``||p||`` it is taken from.

    The direction is kept scaled by a power of two ``pn`` to norm of order one (exact:
    the same products, scaled): ``p`` shrinks with the residual, and ``p^T A p`` of a
    small ``p`` and a small operator (``||A|| ~ 1e-30`` in float32) underflows where
    ``d^T A d`` does not; the step is ``(rz / pn) / d^T A d`` along ``d`` (the same step
    as ``rz / p^T A p`` along ``p``, whatever power of two ``pn`` is). ``||p||`` is not
    measured: CG keeps ``r`` orthogonal to ``p_prev``, so
    ``||p||^2 = ||z||^2 + beta^2 ||p_prev||^2`` with ``z = M r``, and ``||z||`` is
    ``<r, z> / ||r||`` (exact without a preconditioner, a lower bound with one). Cost:
    no product; ``<r, z>`` and the update ``d = z / pn + beta (pn_prev / pn) d_prev``
    (the scalings are exact), as for the unscaled ``p``.

    The true residual (``_CHECK``) is that of the iterate as returned (`_returned`, scaled
    back by ``1 / sigma``: exact in range), so an answer below or beyond the dtype's range
    (float16 ``x ~ 1e-8``, returned as zeros, or ``~1e5``, as ``inf``) is not certified by
    the residual of the scaled iterate, which is in range.
    """
    in_step = s.phase == _STEP
    # (the preconditioner is applied only in the _STEP phase)
    z = cond(in_step, lambda r: _cast_like(precond(r), r), lambda r: r, s.r)
    rz = _tree.vdot(s.r, z).astype(acc)
    beta = xp.where(s.step > 0, rz / xp.where(s.rz != 0, s.rz, 1.0), 0.0)
    znorm = xp.abs(rz) / xp.where(s.rnorm > 0, s.rnorm, 1.0)
    pnorm = xp.hypot(znorm, beta * s.pnorm)
    pn = _tree.pow2_floor(pnorm)
    # s.p holds d_prev = p_prev / pn_prev, pn_prev = pow2_floor(s.pnorm) (kept together)
    d = _tree.add_scale(_tree.scale(1.0 / pn, z), beta * (_tree.pow2_floor(s.pnorm) / pn), s.p)
    # (the iterate, held scaled: `_CGState.xs`; as returned, in b / sigma's units)
    x = _tree.scale(1.0 / sigma, _returned(s, sigma))
    v = _tree.where(in_step, d, _tree.where(s.phase == _WARM, x0, x))
    return d, rz, v, pn, pnorm


def _cg_advance(s: _CGState, rhs, x0, d, rz, v, pn, pnorm, w, tol, max_steps, acc):
    """The next state from the product ``w = A v``: warm start, CG step or true residual.

    Cost: no product (``w`` is the iteration's one); a few vector updates.
    """
    in_step = s.phase == _STEP
    zeros = _tree.zeros_like(rhs)
    fin = _tree.all_finite(w)
    vw = _tree.vdot(v, w).astype(acc)

    # _WARM: x = c x0 with c minimising the quadratic model along x0 (0 when the
    # curvature along x0 is not positive or the product is not finite)
    c = xp.where(fin & (vw > 0), _tree.vdot(x0, rhs).astype(acc)
                  / xp.where(vw > 0, vw, 1.0), 0.0)
    w_safe = _tree.where(fin, w, zeros)
    x_warm = _tree.scale(c, x0)
    r_warm = _tree.add_scale(rhs, -c, w_safe)

    # _STEP: a CG step, rejected on non-positive curvature or a non-finite product. A
    # curvature below eps times the largest one met is zero to rounding: a singular system
    # whose b leaves the range (diag(1, 2, 0, 0), b = ones) drove d^T A d to 1e-140 and the
    # iterate to 1e287 or inf before one came out negative
    curvmax = xp.where(in_step & fin, xp.maximum(s.curvmax, xp.abs(vw)), s.curvmax)
    negcurv = in_step & fin & (vw <= xp.finfo(acc).eps * curvmax) & (s.rnorm > 0)
    good = in_step & fin & ~negcurv
    # the step along v = d = p / pn (pn a power of two, ||d|| of order one): rz / (p^T A p)
    # along p, ``alpha = (rz / pn) / vw``. It is of size 1 / ||A|| times the residual, and
    # near the format's ``tiny`` it fell below the normal range, which XLA flushes to zero
    # and NumPy keeps (float32, ||A|| = 1e33 ||b||: the compiled solve stagnated near a
    # relative residual of 1e-5, at 1e36 it took a positive diagonal for negative curvature;
    # the eager one converged). So the step is taken on the scale ``xs``, a power of two
    # fixed at the first step near its curvature (exact): ``alpha xs`` on ``w / xs``, and the
    # iterate is held as ``x xs``
    xs = xp.where(good & (s.step == 0), _tree.pow2_floor(xp.abs(vw)), s.xs)
    alpha_xs = (rz / pn) / (xp.where(good, vw, 1.0) / xs)
    x_held = _tree.scale(xs / s.xs, s.x)  # (a power of two: 1, or xs at the first step)
    x_step = _tree.add_scale(x_held, alpha_xs, v)
    r_step = _tree.add_scale(s.r, -alpha_xs, _tree.scale(1.0 / xs, w_safe))

    # _CHECK: the true residual of the returned iterate
    r_true = _tree.sub(rhs, w_safe)

    is_warm, is_check = s.phase == _WARM, s.phase == _CHECK
    x = _tree.where(is_warm, x_warm, _tree.where(good, x_step, s.x))
    r = _tree.where(is_warm, r_warm, _tree.where(
        good, r_step, _tree.where(is_check & fin, r_true, s.r)))
    # residuals of the scaled system b / sigma: of order one down to rtol, no range test
    rnorm = _tree.plain_norm(r).astype(acc)
    rnorm = xp.where(is_check & ~fin, xp.nan, rnorm)
    step = s.step + in_step.astype(xp.int32)
    negcurv_all = s.negcurv | negcurv
    # a non-finite warm-start product only drops the warm start
    finite = s.finite & (fin | is_warm)
    moved = xp.where(is_warm | is_check, False, s.moved | good)
    stop = ~(rnorm > tol) | (step >= max_steps) | negcurv_all | ~finite
    after = xp.where(stop, xp.where(moved, _CHECK, _DONE), _STEP)
    phase = xp.where(is_check, _DONE, after).astype(xp.int32)
    return _CGState(
        phase=phase, x=x, r=r, p=_tree.where(good, d, s.p), rz=xp.where(good, rz, s.rz),
        pnorm=xp.where(good, pnorm, s.pnorm), rnorm=rnorm, moved=moved, step=step,
        num_matvecs=s.num_matvecs + 1, negcurv=negcurv_all,
        negdir=_tree.where(negcurv, _tree.scale(pn, d), s.negdir), finite=finite,
        curvmax=curvmax, xs=xs,
    )


def _options(solver, rtol, atol, max_steps):
    """``(rtol, atol, max_steps)`` of ``solver`` (default `curvlib.CG`) with overrides."""
    s = solvers.resolve(solvers.CG, solver, rtol=rtol, atol=atol, max_steps=max_steps)
    return s.rtol, s.atol, s.max_steps


def _precheck(matvec, b, x0, damping, solver, rtol, atol, max_steps, preconditioner):
    """The value checks of `cg` that must run eagerly (the rest runs at trace time)."""
    rtol, atol, max_steps = _options(solver, rtol, atol, max_steps)
    for opt, val in (("damping", damping), ("rtol", rtol), ("atol", atol)):
        _validate.number(val, opt, minimum=0, runtime_arrays=True, scalar=True)
    _check_max_steps(max_steps, _tree.size(b))


# ------------------------------------------------------------------ answer now
#
# An eager first call answers through the same CG driven from the host
# (`_driver.solve_now`): the loop's steps are programs of b's size and dtype only (the
# options are data), compiled once per session for every model of that size, with the
# model's product compiled alone; the fused program compiles behind (`compile_behind`).


class _NowCfg(NamedTuple):
    """The answer-now steps' static configuration: the accumulation dtype."""

    acc: str
    layout: str = "identity"  # (`solve_now` runs the steps on one flat vector)


class _NowState(NamedTuple):
    cg: _CGState
    direction: tuple  # `_cg_direction`'s (d, rz, v, pn, pnorm) for the next product, once
    rhs: jax.Array  # b / sigma
    sigma: jax.Array
    tol: jax.Array  # in b / sigma's units
    max_steps: jax.Array
    damping: jax.Array


def _now_setup(cfg: _NowCfg, b, _key, damping, rtol, atol, max_steps, _seed) -> _NowState:
    acc = xp.dtype(cfg.acc)
    rhs, sigma, rnorm0, tol, finite0 = _cg_scale(b, rtol, atol, acc)
    init, _ = _cg_init(rhs, None, sigma, rnorm0, tol, finite0, max_steps, acc)
    return _NowState(cg=init, direction=_now_direction(cfg, init, rhs, sigma), rhs=rhs,
                     sigma=sigma, tol=tol, max_steps=max_steps, damping=damping)


def _now_direction(cfg: _NowCfg, cg: _CGState, rhs, sigma):
    return _cg_direction(cg, xp.zeros_like(rhs), lambda r: r, xp.dtype(cfg.acc), sigma)


def _now_request(cfg: _NowCfg, s: _NowState):
    return s.direction[2]


def _now_update(cfg: _NowCfg, s: _NowState, w) -> _NowState:
    d, rz, v, pn, pnorm = s.direction
    w = (w + s.damping * v).astype(v.dtype)  # the damped product, as `cg`'s operator forms it
    cg = _cg_advance(s.cg, s.rhs, xp.zeros_like(s.rhs), d, rz, v, pn, pnorm, w, s.tol,
                     s.max_steps, xp.dtype(cfg.acc))
    return s._replace(cg=cg, direction=_now_direction(cfg, cg, s.rhs, s.sigma))


def _now_running(cfg: _NowCfg, s: _NowState):
    return s.cg.phase != _DONE


def _now_finish(cfg: _NowCfg, s: _NowState) -> CGResult:
    x, aux = _cg_finish(s.cg, s.sigma, s.tol)
    return _result(x, *aux, max_steps=s.max_steps)


def _answers_now(matvec, b, x0, damping, solver, rtol, atol, max_steps, preconditioner):
    """Whether an eager call may answer now: no warm start or preconditioner, one flat b."""
    return (x0 is None and preconditioner is None and not _driver.is_host_driven(matvec)
            and _driver.answers_now(_space.choose_layout(b), b))


def _cg_now(matvec, b, x0, damping, solver, rtol, atol, max_steps, preconditioner) -> CGResult:
    """`cg` answered without its fused compile (`_driver.solve_now`): the same iterates."""
    _validate.float_leaves(b, "b")
    _validate.operator(matvec, b, "matvec", "b")
    rtol, atol, max_steps = _options(solver, rtol, atol, max_steps)
    max_steps = _check_max_steps(max_steps, _tree.size(b))
    acc = jnp.promote_types(_tree.dtype(b), jnp.float32)
    # (damping, rtol and atol enter the steps as the fused program receives them: as given)
    return _driver.solve_now(
        _now_setup, _now_request, _now_update, _now_running, _now_finish,
        _NowCfg(acc=jnp.dtype(acc).name), matvec, b, None,
        damping, rtol, atol, np.int32(max_steps),
        vectors=("x", "curvature_direction"), host_rows=6)


@_compile.function(operators={"matvec": "b", "preconditioner": "b"}, precheck=_precheck,
                   now=_cg_now, now_when=_answers_now)
def cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    *,
    x0: PyTree | None = None,
    damping=0.0,
    solver: solvers.CG | None = None,
    rtol=None,
    atol=None,
    max_steps: int | None = None,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
) -> CGResult:
    r"""Solve ``(A + damping I) x = b`` by (preconditioned) conjugate gradients.

    Minimises ``q(x) = 1/2 x^T (A + lambda I) x - b^T x`` over growing Krylov
    spaces (Hestenes & Stiefel 1952). ``A`` need not be definite: when a search
    direction with non-positive curvature ``p^T (A + lambda I) p <= 0`` appears,
    the iteration stops and returns the last iterate (which still decreases
    ``q``) with ``negative_curvature=True`` (Steihaug 1983) instead of stepping
    to a saddle or to infinity. A non-finite product likewise stops the loop
    with the last finite iterate and ``finite=False``.

    The iteration stops when the recurrence's residual meets
    ``max(rtol ||b||, atol)``; the residual *reported*, and judged by
    ``converged``, is the true ``||b - (A + lambda I) x||``, from one more
    product. The two differ by rounding (the true residual cannot fall below
    about ``eps ||A|| ||x||``; the recurrence's can), and on an inconsistent
    (singular) system, where the recurrence's residual falls while the true one
    stays put. ``converged=False`` with a small ``residual_norm`` says that the
    tolerance asked for lies below what the arithmetic can certify.

    A warm start ``x0`` is used as a direction: CG starts from ``c x0`` with
    ``c = x0^T b / x0^T (A + lambda I) x0`` (the minimiser of ``q`` along
    ``x0``; ``c = 0`` when that curvature is not positive), so a warm start is
    never worse than the zero start in the energy norm, and ``c = 1`` for an
    ``x0`` that already solves the system. A non-finite ``x0`` (or product
    ``(A + lambda I) x0``) is dropped.

    **Derivatives.** ``cg`` is differentiable, in forward and reverse mode, with
    respect to ``b``, ``damping`` and every array the operator depends on
    (arrays it closes over, or the leaves of a `jax.tree_util.Partial`),
    by implicit differentiation of the exact solution (``jax.lax.custom_linear_solve``):

    $$
    dx = (A + \lambda I)^{-1} (db - dA\,x - d\lambda\,x),
    $$

    where the solve is one more ``cg`` call with the same settings (``A`` is
    symmetric, so the transposed solve is the solve). ``x0``, ``rtol``,
    ``atol``, ``max_steps`` and ``preconditioner`` are not differentiated (the
    exact solution does not depend on them), nor are the diagnostics (they are
    ``stop_gradient``-ed). The derivative is that of the exact solution: it
    is exact when both solves converge, and not the derivative of a truncated
    or negative-curvature iterate.

    Cost: one product (and one preconditioner application) per step, plus one
    for a warm start and one for the true residual (``num_matvecs`` counts
    them); memory: ``b``, ``x0`` and four state vectors (``x``, ``r``, ``p``,
    the curvature direction), plus a step's temporaries. Runs as one
    ``lax.while_loop`` that applies the operator at a single call site (the
    compiled program holds the operator once); jit- and vmap-compatible. The
    backward pass costs one more solve. An eager first call without ``x0`` or
    ``preconditioner`` answers through the same iteration driven from the host
    while its program compiles behind ([`compile_behind`][curvlib.compile_behind]).

    Args:
      matvec: symmetric linear operator on pytrees shaped like ``b``.
      b: right-hand side pytree.
      x0: optional warm start (e.g. the previous solve in Hessian-free).
      damping: ``lambda >= 0`` added to the diagonal (traceable). A negative or
        non-finite Python/NumPy number is refused; a JAX array is not checked
        (it may be computed at run time: a negative value makes ``A + lambda I``
        what it is, and the negative-curvature exit handles it).
      solver: a [`curvlib.CG`][curvlib.CG] holding ``rtol``, ``atol`` and
        ``max_steps`` (their one place of defaults and checks); the keywords
        below override its fields.
      rtol: relative tolerance on ``||r|| / ||b||`` (traceable, ``>= 0``; checked
        like ``damping``); ``None``: [`curvlib.CG`][curvlib.CG]'s, ``1e-5``.
      atol: absolute tolerance on ``||r||`` (traceable, ``>= 0``; checked like
        ``damping``); ``None``: [`curvlib.CG`][curvlib.CG]'s, ``0``.
      max_steps: iteration cap; default ``min(10 * dim, 2**31 - 3)`` (SciPy's
        ``10 * dim``: in floating point CG can need more than ``dim`` steps;
        capped so the int32 counters cannot overflow on huge models). May be a
        traced integer scalar (a ``jit`` argument): it only bounds the
        ``lax.while_loop``, so changing it does not recompile; a traced value is
        not validated, and one below 1 takes no steps.
      preconditioner: optional SPD ``M^{-1}`` applied to residuals.

    Returns:
      A [`CGResult`][curvlib.CGResult].

    Raises:
      ValueError: if ``x0`` or ``matvec(b)`` does not match ``b``, a concrete
        ``max_steps`` is not an int ``>= 1``, or ``damping``, ``rtol`` or
        ``atol`` is a negative or non-finite Python/NumPy number.
      TypeError: for non-float leaves of ``b``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import curvlib
      >>> from curvlib import cg
      >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> x = cg(lambda v: A @ v, jnp.array([1.0, 2.0]), rtol=1e-6).x
      >>> [round(float(xi), 4) for xi in x]
      [0.0909, 0.6364]
      >>> indefinite = jnp.diag(jnp.array([1.0, -1.0]))
      >>> res = cg(lambda v: indefinite @ v, jnp.array([1.0, 1.0]))
      >>> bool(res.negative_curvature), res.curvature_direction.tolist()
      (True, [1.0, 1.0])

      Derivatives of the solution, here ``d/db sum(A^{-1} b) = A^{-1} 1``:

      >>> g = jax.grad(lambda b: cg(lambda v: A @ v, b, rtol=1e-6).x.sum())(jnp.ones(2))
      >>> [round(float(gi), 4) for gi in g]
      [0.1818, 0.2727]

      The options as one value, the form the functions built on cg take:

      >>> x = cg(lambda v: A @ v, jnp.array([1.0, 2.0]), solver=curvlib.CG(rtol=1e-6)).x
      >>> [round(float(xi), 4) for xi in x]
      [0.0909, 0.6364]

    References:
      M. R. Hestenes and E. Stiefel, *Methods of conjugate gradients for solving
      linear systems*, J. Res. NBS 1952; T. Steihaug, *The conjugate gradient
      method and trust regions in large scale optimization*, SIAM J. Numer.
      Anal. 1983.
    """
    _validate.float_leaves(b, "b")
    if x0 is not None:
        _validate.same_structure(b, x0, "b", "x0")
        x0 = jax.tree.map(lambda x, r: jnp.asarray(x).astype(jnp.result_type(r)), x0, b)
    rtol, atol, max_steps = _options(solver, rtol, atol, max_steps)
    for opt, val in (("damping", damping), ("rtol", rtol), ("atol", atol)):
        _validate.number(val, opt, minimum=0, runtime_arrays=True, scalar=True)
    max_steps = _check_max_steps(max_steps, _tree.size(b))
    precond = preconditioner if preconditioner is not None else (lambda v: v)
    if preconditioner is not None:
        _validate.operator(preconditioner, b, "preconditioner", "b")
        # not differentiated (see Derivatives): its arrays and x0 enter the solve without
        # tangents (a tangent on them alone crashed JAX's custom_linear_solve rule)
        pc, consts = jax.closure_convert(preconditioner, b)
        consts = jax.lax.stop_gradient(consts)
        precond = lambda v: pc(v, *consts)
    if x0 is not None:
        x0 = jax.lax.stop_gradient(x0)
    acc = jnp.promote_types(_tree.dtype(b), jnp.float32)

    slot = _driver.Slot(matvec)

    def op(v):
        with _validate.naming("b"):
            out = slot(v)
        # checked here, at the operator's first (abstract) trace: no extra trace of it
        _validate.same_structure(b, out, "b", "matvec(b)", floating=True)
        return jax.tree.map(lambda a, x: (a + damping * x).astype(x.dtype), _cast_like(out, v), v)

    def solve(op_, rhs):
        # on one device with one dtype, CG runs on the leaves concatenated into one vector
        # (`_space`): each vector update is one operation instead of one per leaf, so the
        # program is smaller and compiles faster; one copy of N numbers around each product
        space = _space.Space(rhs, _space.choose_layout(rhs))
        if space.layout != "concat":
            return _cg_solve(op_, rhs, x0=x0, precond=precond, rtol=rtol, atol=atol,
                             max_steps=max_steps, acc=acc)
        x, aux = _cg_solve(space.wrap(op_), space.flatten(rhs),
                           x0=None if x0 is None else space.flatten(x0),
                           precond=precond if preconditioner is None else space.wrap(precond),
                           rtol=rtol, atol=atol,
                           max_steps=max_steps, acc=acc)
        *head, negdir, finite = aux
        return space.unflatten(x), (*head, space.unflatten(negdir), finite)

    if _driver.is_host_driven(matvec):  # streamed data: a host loop, no derivative rule
        x, aux = _cg_solve(op, b, x0=x0, precond=precond, rtol=rtol, atol=atol,
                           max_steps=max_steps, acc=acc, host=True, slot=slot)
    else:
        x, aux = jax.lax.custom_linear_solve(op, b, solve, symmetric=True, has_aux=True)
    return _result(x, *jax.lax.stop_gradient(aux), max_steps=max_steps)
