"""``lanczos``: fixed-depth Lanczos tridiagonalisation with full reorthogonalisation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from curvlib import _compile, _space, _tree, _validate
from curvlib._status import Status, from_flags
from curvlib._xp import cond, xp
from curvlib.krylov import _band, _driver, solvers

PyTree = Any


class LanczosResult(NamedTuple):
    """Output of [`lanczos`][curvlib.lanczos].

    Attributes:
      basis: orthonormal Lanczos vectors ``q_0 .. q_{m-1}`` (pytree, leading axis ``m``).
        With ``reortho="none"`` they are orthonormal only in exact arithmetic: in floating
        point they lose orthogonality as Ritz values converge (Paige 1976), and ``T`` then
        holds spurious copies of them; that mode is for comparison, and its ``converged``
        says only that the depth completed without a breakdown.
      alphas: diagonal of the tridiagonal ``T`` (shape ``(m,)``).
      betas: off-diagonal of ``T`` (shape ``(m-1,)``); a coupling at rounding level
        (about ``eps ||A||``, not exactly zero: what was left of the new vector)
        marks a breakdown after which the recursion restarted from a fresh orthogonal
        direction; ``breakdown`` says whether one was met.
      residual: the unnormalised next vector ``r = beta_m q_m`` so that
        ``A Q^T = Q^T T + r e_m^T``.
      residual_norm: ``||r|| = beta_m``.
      breakdown: whether an invariant subspace was met (``beta_j`` ~ 0 for some ``j < m``;
        with ``reortho="full"`` also the last remainder ``beta_m`` ~ 0, as at ``m = dim``
        or at ``m`` = the number of distinct eigenvalues ``v0`` reaches).
        With ``reortho="full"`` the recursion continued from a fresh direction, so a
        breakdown is information, not a failure; with ``reortho="none"`` it is not
        recovered (later rows are not a basis) and fails the run.
      num_matvecs: products used (``m``; int32).
      finite: whether every product was finite; if not, ``alphas``, ``betas``
        and ``residual_norm`` are NaN.
      converged: the requested depth was completed: ``finite``, and all ``m`` rows
        of ``basis`` are Lanczos vectors whose products are in ``T`` (no breakdown left
        it incomplete: a fresh direction continued every breakdown, which only
        ``reortho="none"`` cannot do); orthonormal to rounding with ``reortho="full"``.
        False for a non-zero operator of norm below ``tiny / eps`` (``STALLED``).
      status: the [`curvlib.Status`][curvlib.Status] code: ``NONFINITE``, ``BREAKDOWN`` (an
        unrecovered breakdown left the depth incomplete), ``STALLED`` (``reortho="full"``:
        a non-zero ``||A||`` below ``tiny / eps``, about ``1e-31`` in float32, where the
        products' subnormal parts are flushed to zero and ``T`` is not ``A``'s projection),
        else ``SUCCESS``.
    """

    basis: PyTree
    alphas: jax.Array
    betas: jax.Array
    residual: PyTree
    residual_norm: jax.Array
    breakdown: jax.Array
    num_matvecs: jax.Array
    finite: jax.Array
    converged: jax.Array = True
    status: jax.Array = Status.SUCCESS


class _Cfg(NamedTuple):
    """Static configuration. ``m`` is the depth of the fused program; the answer-now steps
    are keyed on a size class's (`_shape_cfg`) and read the depth from the state."""

    m: int
    layout: str
    basis_dtype: Any
    restart: bool  # breakdown -> fresh direction (lanczos) or zero continuation (quadrature)


class _State(NamedTuple):
    band: _band.Band
    z: PyTree  # fresh direction for a breakdown (unused when cfg.restart is False)
    key: jax.Array  # uint32 seed of the fresh directions (Space.gaussian)
    draws: jax.Array
    steps: jax.Array  # products so far (a zero product after a breakdown counts too)
    like: PyTree
    depth: jax.Array  # int32: the Krylov depth (``cfg.m`` but in the answer-now steps)


def _request(cfg: _Cfg, s: _State):
    space = _space.Space(s.like, cfg.layout)
    return space.unflatten(_band.request(s.band, space.flatten(s.like)))


def _update(cfg: _Cfg, s: _State, product) -> _State:
    space = _space.Space(s.like, cfg.layout)
    if not cfg.restart:  # quadrature: a broken chain continues with zeros, no draw at all
        band = _band.absorb(s.band, space.flatten(product))
        return s._replace(band=band, steps=s.steps + 1)
    band = _band.absorb(s.band, space.flatten(product))
    _, some = _band.next_row(band)
    want = ~some & _band.has_room(band)
    zq, z_ok = _band.fresh(band, s.z, want)
    band = _band.inject(band, zq, want & z_ok)
    z = cond(want, lambda: space.gaussian(s.key, s.draws), lambda: s.z)
    return s._replace(band=band, z=z, draws=s.draws + want.astype(xp.int32), steps=s.steps + 1)


def _running(cfg: _Cfg, s: _State):
    return s.steps < s.depth


def setup(cfg: _Cfg, v0, key, depth=None, seed=None) -> _State:
    """Initial state (shared with stochastic Lanczos quadrature); ``seed`` overrides ``key``.

    ``depth`` (traced in the answer-now steps, at most ``cfg.m``; default ``cfg.m``).
    """
    depth = cfg.m if depth is None else depth
    space = _space.Space(v0, cfg.layout)
    x0 = space.flatten(v0)
    acc = _band.acc_dtype(x0)
    if cfg.restart:
        key = _space.seed(v0, key) if seed is None else seed
        z = space.gaussian(key, 0)
        nv = _tree.max_abs(x0)  # a test for zero at any scale (no square to underflow)
        usable = (nv > 0) & xp.isfinite(nv)
        x0 = _tree.where(usable, x0, z)
        z = cond(usable, lambda: z, lambda: space.gaussian(key, 1))
        draws = xp.where(usable, 1, 2).astype(xp.int32)
    else:
        z, key, draws = None, None, xp.zeros((), xp.int32)
    band = _band.init(x0, cfg.m + 1, acc, cfg.basis_dtype, limit=depth + 1)
    band = band._replace(finite=_tree.all_finite(v0))
    return _State(band=band, z=z, key=key, draws=draws, steps=xp.zeros((), xp.int32),
                  like=_tree.zeros_like(v0), depth=xp.asarray(depth, xp.int32))


def run(cfg: _Cfg, matvec, state: _State) -> _State:
    return _driver.drive(_request, _update, _running, cfg, matvec, state)


def tridiagonal(cfg: _Cfg, s: _State):
    """``(T, beta_m)``: the ``m x m`` projected matrix and the residual norm.

    (With a depth below ``cfg.m``, the answer-now steps, ``T`` is zero beyond it.)
    """
    m = cfg.m
    T = _band.projected(s.band)[:m, :m]
    return T, s.band.H[s.depth, s.depth - 1]


def _finish(cfg: _Cfg, s: _State) -> LanczosResult:
    space = _space.Space(s.like, cfg.layout)
    m = cfg.m
    band = s.band
    T, beta = tridiagonal(cfg, s)
    Q = jax.tree.map(lambda q: q[:m], band.Q)
    basis = space.unflatten_basis(Q)
    last = _tree.basis_get(band.Q, s.depth)
    residual = space.unflatten(jax.tree.map(lambda q: (beta * q).astype(q.dtype), last))
    residual = jax.tree.map(lambda r, x: r.astype(xp.result_type(x)), residual, s.like)
    fin = band.finite
    nan = lambda x: xp.where(fin, x, xp.nan)
    # every row was multiplied: no breakdown was left open
    complete = xp.all(band.mult[:m] | (xp.arange(m) >= s.depth))
    # a non-zero operator below ``||A|| = tiny / eps``: its products' subnormal parts are
    # flushed to zero, the rows are not orthonormal and T is not A's projection (float32,
    # ||A|| = 3e-37: alphas down to -1e-36 and negative betas, converged=True before)
    resolved = resolved_scale(s)
    return LanczosResult(
        basis=basis, alphas=nan(xp.diag(T)), betas=nan(xp.diag(T, -1)), residual=residual,
        residual_norm=nan(beta), breakdown=(band.breakdowns > 0) & fin,
        num_matvecs=s.depth, finite=fin, converged=fin & complete & resolved,
        status=from_flags(finite=fin, breakdown=~complete, stalled=~resolved),
    )


def resolved_scale(s: _State):
    """Whether the chain's operator is zero or of norm at least ``tiny / eps`` (where its
    products' rounding, not XLA's flush of subnormals, limits ``T``)."""
    return (s.band.anorm == 0) | _band.certifiable(s.band, s.like)


def _solve(cfg: _Cfg, matvec, v0, key) -> LanczosResult:
    return _finish(cfg, run(cfg, matvec, setup(cfg, v0, key)))


def _solve_now(cfg: _Cfg, matvec, v0, key) -> LanczosResult:
    """`_solve` answered without compiling it (`_driver.solve_now`).

    The steps are those of the depth's size class (`_shape_cfg`), shared by every depth
    of the class; the result is cut to the depth on the host.
    """
    m, shape = cfg.m, _shape_cfg(cfg)
    # (NumPy would accumulate a narrower basis dtype's products in that dtype: compiled steps)
    native = cfg.basis_dtype is None or jnp.dtype(cfg.basis_dtype) == _tree.dtype(v0)
    return _driver.solve_now(setup, _request, _update, _running, _finish, shape,
                             matvec, v0, key, m, bases=("basis",), vectors=("residual",),
                             rows=m, cut={"alphas": m, "betas": m - 1},
                             host_rows=shape.m + 3 if native else None)


def _shape_cfg(cfg: _Cfg) -> _Cfg:
    """The key of the answer-now steps: the basis of ``m + 1`` rows padded to its size
    class (`_band.capacity`: at most half again), the depth moved into the state."""
    return cfg._replace(m=_band.capacity(cfg.m + 1) - 1)


_compiled = _compile.entry(
    static=("cfg",), operators={"matvec": "v0"}, now=_solve_now,
    now_when=lambda cfg, v0, **_: _driver.answers_now(cfg.layout, v0))(_solve)


def lanczos(
    matvec,
    v0: PyTree,
    num_matvecs: int | None = None,
    *,
    reortho: str | None = None,
    basis_dtype=None,
    key: jax.Array | None = None,
    solver: solvers.Lanczos | None = None,
) -> LanczosResult:
    """Lanczos tridiagonalisation ``A Q^T = Q^T T + r e_m^T`` of a symmetric operator.

    Builds an orthonormal basis ``Q`` of the Krylov space
    ``K_m(A, v0) = span{v0, A v0, ..., A^{m-1} v0}`` and the tridiagonal
    ``T = Q A Q^T`` (Lanczos 1950). With ``reortho="full"`` every new vector is
    re-orthogonalised against all previous ones by two classical Gram-Schmidt
    passes written as matrix products, which removes the spurious copies of
    converged eigenvalues that plain Lanczos produces in floating point. If the
    recursion meets an invariant subspace (``beta_j = 0``), it continues from a
    fresh random direction orthogonal to the basis (from ``key``) and records
    the coupling it measured (rounding level, not an exact zero), so ``T`` and the
    relation stay exact to rounding.

    Cost: ``num_matvecs`` products, ``O(m N)`` extra work per step for full
    reorthogonalisation, memory ``(m + 2) N``. One compiled program per
    configuration and shapes (eager calls reuse it).

    Derivatives: forward mode (``jax.jvp``) differentiates the recursion, ``T`` and the
    basis; reverse mode (``jax.grad``) is not supported (the recursion is a
    ``lax.while_loop``), as for [`eigsh`][curvlib.eigsh].

    Args:
      matvec: symmetric linear operator on pytrees shaped like ``v0`` (see
        [`curvlib.eigsh`][curvlib.eigsh] for the kinds accepted and what a plain closure costs).
      v0: start vector (any non-zero pytree; normalised internally).
      num_matvecs: Krylov depth ``m`` (static), ``1 <= m <= dim``; required
        unless ``solver`` holds it.
      reortho: ``"full"`` ([`curvlib.Lanczos`][curvlib.Lanczos]'s default) or ``"none"``
        (three-term recurrence only, for comparison; loses orthogonality as
        eigenvalues converge).
      basis_dtype: storage dtype of the basis (default: that of ``v0``'s leaves).
        A lower precision halves the stored ``m N`` basis; inner products and
        ``T`` still accumulate in ``float32`` or wider, but orthogonality, and so
        the attainable accuracy of ``T``'s eigenvalues, is limited to about the
        basis dtype's epsilon times ``||A||``. The basis is returned in this dtype.
      key: PRNG key for the fresh direction after a breakdown; default derived
        from ``v0``'s values (deterministic).
      solver: a [`curvlib.Lanczos`][curvlib.Lanczos] holding ``num_matvecs``, ``reortho``
        and ``basis_dtype``; the keywords above override its fields.

    Returns:
      A [`LanczosResult`][curvlib.LanczosResult].

    Raises:
      ValueError: if ``num_matvecs`` is not in ``[1, dim]``, ``reortho`` is
        unknown, or ``matvec(v0)`` is not shaped like ``v0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import curvlib
      >>> A = jnp.diag(jnp.arange(1.0, 21.0))
      >>> res = curvlib.lanczos(lambda v: {"x": A @ v["x"]}, {"x": jnp.ones(20)}, 20)
      >>> Q = res.basis["x"]
      >>> round(float(jnp.abs(Q @ Q.T - jnp.eye(20)).max()), 4)
      0.0
      >>> T = jnp.diag(res.alphas) + jnp.diag(res.betas, 1) + jnp.diag(res.betas, -1)
      >>> jnp.linalg.eigvalsh(T)[-3:].round(3).tolist()
      [18.0, 19.0, 20.0]

    References:
      C. Lanczos, *An iteration method for the solution of the eigenvalue problem
      of linear differential and integral operators*, J. Res. NBS 1950.
    """
    if solver is None and num_matvecs is None:
        raise ValueError("`num_matvecs` (the Krylov depth) is required; pass it, or "
                         "`solver=curvlib.Lanczos(num_matvecs)`.")
    solver = solvers.resolve(solvers.Lanczos, solver, num_matvecs=num_matvecs,
                             reortho=reortho, basis_dtype=basis_dtype)
    num_matvecs, reortho, basis_dtype = solver.num_matvecs, solver.reortho, solver.basis_dtype
    _validate.float_leaves(v0, "v0")
    _validate.prng_key(key, optional=True)
    n = _tree.size(v0)
    m = _validate.static_int(num_matvecs, "num_matvecs", minimum=1, maximum=n,
                             what=f"the dimension of v0 is {n}")
    _validate.one_of(reortho, "reortho", ("full", "none"))
    basis_dtype = _validate.float_dtype(basis_dtype, "basis_dtype", optional=True)
    if basis_dtype is not None and reortho != "full":
        raise ValueError("`basis_dtype` needs reortho='full'.")
    if not _driver.is_host_driven(matvec):
        _validate.operator(matvec, v0, "matvec")
    if reortho == "none":
        return _plain_compiled(m, matvec, v0)
    cfg = _Cfg(m=m, layout=_space.choose_layout(v0), basis_dtype=basis_dtype, restart=True)
    if _driver.is_host_driven(matvec):
        state = _driver._jitted(setup, cfg)(v0, key)
        state = _driver.run_host(_request, _update, _running, cfg, matvec, state)
        return _driver._jitted(_finish, cfg)(state)
    return _compiled(cfg, matvec, v0, key)


def _lanczos_plain(m, matvec, v0) -> LanczosResult:
    """The three-term recurrence without reorthogonalisation (for comparison only)."""
    acc = _band.acc_dtype(v0)
    nv = _tree.norm(v0)
    # a zero v0 starts nothing: zero vectors, a breakdown at once (it gave NaN and
    # NONFINITE with every product finite; the full mode restarts from a random direction)
    q0 = _tree.scale(1.0 / jnp.where(nv > 0, nv, 1.0), v0)

    def body(j, carry):
        Q, alphas, betas, q, q_prev, beta_prev, fin = carry
        Q = _tree.basis_set(Q, j, q)
        w = jax.tree.map(lambda a, b: jnp.asarray(a).astype(b.dtype), matvec(q), q)
        fin = fin & _tree.all_finite(w)
        a = _tree.vdot(q, w).astype(acc)
        w = _tree.add_scale(_tree.add_scale(w, -a, q), -beta_prev, q_prev)
        b = _tree.norm(w).astype(acc)
        q_next = _tree.scale(1.0 / jnp.where(b > 0, b, 1.0), w)
        return Q, alphas.at[j].set(a), betas.at[j].set(b), q_next, q, b, fin

    init = (
        _tree.basis_zeros(v0, m), jnp.zeros(m, acc), jnp.zeros(m, acc), q0,
        _tree.zeros_like(v0), jnp.zeros((), acc), _tree.all_finite(v0),
    )
    Q, alphas, betas, q, _, b, fin = jax.lax.fori_loop(0, m, body, init)
    nan = lambda x: jnp.where(fin, x, jnp.nan)
    # an invariant subspace ends the recurrence: a remainder at rounding level of ||T||
    scale = jnp.max(jnp.abs(alphas) + betas)
    broke = jnp.any(betas[:-1] <= 100 * jnp.finfo(acc).eps * scale) & fin
    return LanczosResult(Q, nan(alphas), nan(betas[:-1]), _tree.scale(b, q), nan(b),
                         broke, jnp.asarray(m, jnp.int32), fin, converged=fin & ~broke,
                         status=from_flags(finite=fin, breakdown=broke))


_plain_compiled = _compile.entry(static=("m",), operators={"matvec": "v0"})(_lanczos_plain)
