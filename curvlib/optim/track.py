"""Curvature monitoring inside a jitted optax chain: sharpness, trace and gradient alignment.

[`track_curvature`][curvlib.track_curvature] is an optax transform that leaves the updates alone
and, every ``every`` steps, measures the Hessian of the loss at the current
parameters: its top-``k`` eigenvalues (the largest is the *sharpness*), an
estimate of its trace (the Ritz values plus Hutchinson on the complement of
the tracked eigenspace: Hutch++ with the eigsh result as its sketch), and the
fraction of the gradient's squared norm that lies in the top-``k`` eigenspace.
Each refresh warm-starts the Lanczos process from the eigenvectors kept in the
state, so once training moves slowly a refresh costs a handful of
Hessian-vector products instead of a cold solve.

[`curvature_info`][curvlib.curvature_info] reads the diagnostics out of any (nested) optimiser
state, flax nnx's mutable optimizer state included; [`curvlib.optim.report`][curvlib.optim.report]
collects them over a run ([`curvature_history`][curvlib.curvature_history]),
prints ([`format_curvature_table`][curvlib.format_curvature_table]) and draws them
([`plot_curvature`][curvlib.plot_curvature]).

References:
  J. Cohen, S. Kaur, Y. Li, J. Z. Kolter and A. Talwalkar, *Gradient descent on
  neural networks typically occurs at the edge of stability*, ICLR 2021.
  G. Gur-Ari, D. A. Roberts and E. Dyer, *Gradient descent happens in a tiny
  subspace*, arXiv:1812.04754, 2018.
  Z. Yao, A. Gholami, K. Keutzer and M. Mahoney, *PyHessian: neural networks
  through the lens of the Hessian*, IEEE Big Data 2020.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvlib import _compile, _deprecation, _tree, _validate, _xp
from curvlib._status import Status
from curvlib.krylov import eigen, eigsh, hutchinson_trace, solvers, stochastic
from curvlib.optim import _common

PyTree = Any

TRACE_METHODS = ("deflated", "hutch++", "hutchinson")
# a refresh starts from the last refresh's eigenvectors: the search is short, and eigsh's
# verification round (a fresh random block) would cost more than it
DEFAULT_EIGSH = solvers.Eigsh(verify=False)


class TrackCurvatureInfo(NamedTuple):
    """Diagnostics of the last refresh of [`track_curvature`][curvlib.track_curvature].

    Every field keeps its value between refreshes; before the first refresh
    ``count`` is ``-1`` and the values are NaN.

    Attributes:
      count: optimiser step (0-based count of ``update`` calls) of the last
        successful refresh; ``-1`` before the first. (Named like every state's
        ``count``; ``step``, its old name, still reads it with a
        ``DeprecationWarning``.)
      eigenvalues: the ``k`` tracked Hessian eigenvalues in ``which``'s order (shape
        ``(k,)``): largest first for ``"LA"`` (the default; ``eigenvalues[0]`` is the
        sharpness), smallest first for ``"SA"``, largest magnitude first for ``"LM"``.
      residual_norms: ``||H x_i - lambda_i x_i||`` of the tracked pairs (shape ``(k,)``).
      trace: estimate of ``tr(H)`` (deflated Hutchinson by default, see
        ``trace_method``); NaN when ``num_probes=0``.
      trace_stderr: its standard error.
      grad_fraction: ``||V g||^2 / ||g||^2`` with ``V`` the ``k`` tracked
        eigenvectors and ``g`` the gradient of ``value_fn`` (Gur-Ari et al. 2018).
      grad_norm: ``||g||``.
      loss: ``value_fn(params)`` at the refresh.
      num_matvecs: Hessian-vector products spent by the last refresh (eigsh
        plus trace probes).
      eigsh_matvecs: the eigsh part of ``num_matvecs``.
      verification_matvecs: the part of ``eigsh_matvecs`` spent verifying
        that no copy of a repeated eigenvalue was missed (fresh random blocks:
        a warm start does not shorten it); ``0`` with the default
        ``Eigsh(verify=False)``.
      converged: whether eigsh met its tolerance at the last refresh.
      num_refreshes: successful refreshes so far.
      skipped: ``True`` if the most recent refresh met a non-finite loss,
        gradient or curvature and kept the previous values (training goes on).
      num_skipped: refreshes skipped so far.
      finite: the most recent refresh met only finite values (``~skipped``).
      status: the [`curvlib.Status`][curvlib.Status] code of the most recent refresh:
        ``NONFINITE`` (skipped), else the eigensolver's own code (``MAX_STEPS`` when its
        budget ran out, ``STALLED`` for pairs right but not certifiable, e.g. of a zero
        Hessian; ``SUCCESS`` also before the first refresh, when nothing was measured).
    """

    count: jax.Array
    eigenvalues: jax.Array
    residual_norms: jax.Array
    trace: jax.Array
    trace_stderr: jax.Array
    grad_fraction: jax.Array
    grad_norm: jax.Array
    loss: jax.Array
    num_matvecs: jax.Array
    eigsh_matvecs: jax.Array
    verification_matvecs: jax.Array
    converged: jax.Array
    num_refreshes: jax.Array
    skipped: jax.Array
    num_skipped: jax.Array
    finite: jax.Array = True
    status: jax.Array = Status.SUCCESS

    @property
    def step(self):
        """Deprecated: the old name of ``count``."""
        _deprecation.deprecated("`TrackCurvatureInfo.step` is deprecated; use "
                                "`TrackCurvatureInfo.count`.")
        return self.count


class TrackCurvatureState(NamedTuple):
    """State of [`track_curvature`][curvlib.track_curvature].

    Attributes:
      count: number of ``update`` calls so far (int32).
      key: the PRNG key given to [`track_curvature`][curvlib.track_curvature] (a typed key's
        raw data, ``jax.random.key_data``, so the state serialises like any array);
        refresh ``t`` uses ``fold_in(key, t)``.
      eigenvectors: the tracked eigenvectors, a pytree shaped like the
        parameters with a leading axis ``k`` (zeros before the first refresh);
        the warm start of the next refresh.
      info: a [`TrackCurvatureInfo`][curvlib.TrackCurvatureInfo].
    """

    count: jax.Array
    key: jax.Array
    eigenvectors: PyTree
    info: TrackCurvatureInfo


def _empty_info(k: int, dt) -> TrackCurvatureInfo:
    nan = jnp.asarray(jnp.nan, dt)
    return TrackCurvatureInfo(
        count=jnp.asarray(-1, jnp.int32),
        eigenvalues=jnp.full((k,), jnp.nan, dt),
        residual_norms=jnp.full((k,), jnp.nan, dt),
        trace=nan,
        trace_stderr=nan,
        grad_fraction=nan,
        grad_norm=nan,
        loss=nan,
        num_matvecs=jnp.asarray(0, jnp.int32),
        eigsh_matvecs=jnp.asarray(0, jnp.int32),
        verification_matvecs=jnp.asarray(0, jnp.int32),
        converged=jnp.asarray(False),
        num_refreshes=jnp.asarray(0, jnp.int32),
        skipped=jnp.asarray(False),
        num_skipped=jnp.asarray(0, jnp.int32),
        finite=jnp.asarray(True),
        status=jnp.asarray(Status.SUCCESS, jnp.int32),
    )


def warm_start_vector(key: jax.Array, eigenvectors: PyTree, like: PyTree, noise) -> PyTree:
    """Start vector ``sum_i x_i + noise * z / ||z||`` of a warm-started Lanczos run.

    ``x_i`` are the rows of ``eigenvectors`` (unit norm, or zero before the
    first refresh) and ``z`` a Gaussian pytree shaped like ``like``. With every
    ``x_i`` zero the start is the random direction alone (a cold start). If the
    ``x_i`` are within angle ``delta`` of the current top-``k`` eigenvectors,
    the Krylov space ``K_m(H, v)`` contains them up to ``O(delta)`` after
    ``k`` steps and the remaining ``m - k`` steps filter that remainder (the
    restart of ARPACK from a combination of Ritz vectors, Sorensen 1992); the
    ``noise`` term keeps a component along every direction so that an
    eigenvalue overtaking the tracked ones is still found. No products.

    Args:
      key: PRNG key for ``z``.
      eigenvectors: pytree with a leading axis ``k`` (rows unit norm or zero).
      like: pytree with the parameters' structure.
      noise: norm of the random part relative to one unit eigenvector.

    Returns:
      The start vector, a pytree shaped like ``like``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.optim.track import warm_start_vector
      >>> X = {"w": jnp.eye(3)[:2]}  # two tracked unit vectors e_0, e_1
      >>> v = warm_start_vector(jax.random.PRNGKey(0), X, {"w": jnp.zeros(3)}, 0.0)
      >>> v["w"].tolist()
      [1.0, 1.0, 0.0]
    """
    z = _tree.flat_normal_like(key, like)  # one generator call (compile time)
    z = _tree.scale(1.0 / _tree.norm(z), z)
    acc = jnp.promote_types(_tree.dtype(like), jnp.float32)
    norms = jnp.sqrt(jnp.diagonal(_tree.basis_gram(eigenvectors, eigenvectors, acc)))
    have = jnp.any(norms > 0)
    w = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    block = _tree.basis_combine(eigenvectors, w, like=like)
    return _tree.add_scale(block, jnp.where(have, noise, 1.0), z)


# ------------------------------------------------------------- named steps


class _Config(NamedTuple):
    """The static and traced settings of one [`track_curvature`][curvlib.track_curvature]."""

    k: int
    which: str
    eigsh: solvers.Eigsh
    num_probes: int
    trace_method: str
    hvp_mode: str | None
    microbatch_size: int | None
    warm_noise: Any
    key_impl: Any = None  # a typed key's implementation (its raw data is what the state keeps)


def _raw_key(key) -> jax.Array:
    """The state's copy of ``key``: a typed key's raw data (serialisable like any array)."""
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jnp.copy(jax.random.key_data(key))  # its own buffer: donating it keeps the key
    return key


def _usable_key(stored, impl) -> jax.Array:
    """The key the refreshes draw from: ``stored`` as given, or rewrapped in ``impl``."""
    if impl is None or jnp.issubdtype(stored.dtype, jax.dtypes.prng_key):
        return stored  # a legacy key, or a typed key the user put in the state
    return jax.random.wrap_key_data(stored, impl=impl)


def _loss_grad_and_matvec(loss: _common.Loss, params: PyTree, extra_args: dict, cfg: _Config):
    """The loss, its gradient and the Hessian product at ``params``, the model traced once.

    Default: one linearisation of ``value_and_grad`` (the products replay its
    tangent program). Another ``hvp_mode`` or ``microbatch_size``: the gradient
    and the product separately (microbatched over every batched argument).
    """
    if cfg.microbatch_size is None and cfg.hvp_mode in (None, "linearize"):
        return _common.linearized_loss(loss, params)
    if cfg.microbatch_size is None:
        value, grad = jax.value_and_grad(loss)(params)
    else:
        value, grad = _common.microbatched_value_and_grad(loss, params, cfg.microbatch_size)
    matvec = _common.curvature_matvec(
        loss.fn, None, params, extra_args, hvp_mode=cfg.hvp_mode,
        microbatch_size=cfg.microbatch_size,
    )
    return value, grad, matvec


def _trace(matvec, params, key, res, cfg: _Config, dt):
    """``(estimate, stderr)`` of ``tr(H)``: deflated by the eigsh pairs, or Hutch++/Hutchinson."""
    if not cfg.num_probes:
        nan = jnp.asarray(jnp.nan, dt)
        return nan, nan
    if cfg.trace_method == "deflated":
        # tr(H) = sum of the Ritz values (x_i^T H x_i, exact) + Hutchinson on the
        # complement of the tracked eigenspace: the sketch is already paid for
        tr = hutchinson_trace(
            matvec, params, key, cfg.num_probes, deflate=res.eigenvectors,
            deflate_trace=jnp.sum(res.eigenvalues),
        )
    else:
        tr = hutchinson_trace(matvec, params, key, cfg.num_probes, method=cfg.trace_method)
    return tr.estimate, tr.stderr


def grad_fraction(eigenvectors: PyTree, grad: PyTree, dt) -> jax.Array:
    """``||V g||^2 / ||g||^2``: the share of the gradient in the tracked eigenspace (no products).

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib.optim.track import grad_fraction
      >>> V = {"w": jnp.eye(3)[:1]}  # the tracked space: e_0
      >>> round(float(grad_fraction(V, {"w": jnp.array([3.0, 4.0, 0.0])}, jnp.float32)), 6)
      0.36
    """
    gnorm2 = _tree.vdot(grad, grad).astype(dt)
    coef = _tree.basis_project(eigenvectors, grad, dt)
    return jnp.sum(coef**2) / jnp.where(gnorm2 > 0, gnorm2, 1.0)


def _measure(loss, params, extra_args, state: TrackCurvatureState, cfg: _Config):
    """One refresh: loss, gradient and products, eigsh (warm-started), trace, alignment.

    Returns ``(eigenvectors, info)``; on a non-finite loss, gradient or product
    the previous ones, flagged (`_commit`). Called eagerly, the work before and after
    the eigensolve runs as two compiled programs (`_eager_steps`), not op by op.
    """
    loss_value, grad, matvec = _loss_grad_and_matvec(loss, params, extra_args, cfg)
    eager = _eager_steps(cfg, state, params, extra_args)
    start, end = (_refresh_start, _refresh_end) if eager is None else eager
    finite, eig_key, k_trace, v0 = start(state, params, loss_value, grad, cfg)

    def solve(_):
        res, products, trace = _eigsh_and_trace(matvec, params, v0, eig_key, k_trace, cfg)
        return end(state, params, res, products, trace, k_trace, grad, loss_value, cfg)

    def skip(_):
        return _commit(jnp.asarray(False), state.eigenvectors, state.info, state)

    return _xp.cond(finite, solve, skip, None)


def _refresh_start(state: TrackCurvatureState, params, loss_value, grad, cfg: _Config):
    """``(finite, eigsh key, trace key, v0)``: whether the loss and gradient are finite, the
    refresh's two keys and its warm-started start vector."""
    k_start, k_trace = jax.random.split(jax.random.fold_in(_usable_key(state.key, cfg.key_impl),
                                                           state.count))
    v0 = warm_start_vector(k_start, state.eigenvectors, params, cfg.warm_noise)
    finite = jnp.isfinite(loss_value) & _tree.all_finite(grad)
    return finite, jax.random.fold_in(k_start, 1), k_trace, v0


def _refresh_end(state: TrackCurvatureState, params, res, products, trace, k_trace, grad,
                 loss_value, cfg: _Config):
    """``(eigenvectors, info)`` of a refresh from its eigsh result and either the deflated
    trace's probe products or the trace itself (`_eigsh_and_trace`), through `_commit`."""
    dt = state.info.eigenvalues.dtype
    if products is not None:
        trace = _deflated_trace(res, products, params, k_trace, cfg)
    trace, trace_se = trace
    vecs = jax.tree.map(lambda e, x: e.astype(x.dtype), res.eigenvectors, state.eigenvectors)
    ok = res.finite & jnp.all(jnp.isfinite(res.eigenvalues))
    if cfg.num_probes:
        ok = ok & jnp.isfinite(trace)
    info = _refresh_info(state, res, trace, trace_se, vecs, grad, loss_value, cfg, dt)
    return _commit(ok, vecs, info, state)


# (compiled with less backend optimisation: small programs, run once per refresh)
_EAGER_STEPS = (_compile.quick_jit(_refresh_start, static_argnames="cfg"),
                _compile.quick_jit(_refresh_end, static_argnames="cfg"))


def _eager_steps(cfg: _Config, *trees):
    """`_refresh_start` and `_refresh_end` compiled, for an eager refresh (about 80 small
    programs compiled op by op on the first refresh otherwise); ``None`` under a trace
    (the caller's program holds them) or for options that are no static key (an array
    ``warm_noise``)."""
    if _compile.tracing(*trees):
        return None
    try:
        hash(cfg)
    except TypeError:
        return None
    return _EAGER_STEPS


def _eigsh_and_trace(matvec, params, v0, key, k_trace, cfg: _Config):
    """``(eigsh result, probe products, trace)`` from ``v0``: with the deflated trace, the
    products of its probes (the trace is then `_deflated_trace`'s, ``None`` here); else
    ``None`` and ``(trace, stderr)`` (NaN without probes)."""
    # eigsh stops at the first Krylov depth certifying the k pairs, so a warm
    # start (few steps) and a cold one (more steps) share one basis size
    opts = dict(which=cfg.which, solver=cfg.eigsh, key=key)
    if not (cfg.num_probes and cfg.trace_method == "deflated"):
        res = eigsh(matvec, v0, cfg.k, **opts)
        dt = jnp.promote_types(_tree.dtype(params), jnp.float32)
        return res, None, _trace(matvec, params, k_trace, res, cfg, dt)
    # the trace probes depend on the eigenvectors: their products run in eigsh's
    # own loop, so the refresh compiles the product once
    res, _, products = eigen.eigsh_then(matvec, v0, cfg.k, _deflated_probes, cfg.num_probes,
                                        params, k_trace, **opts)
    return res, products, None


def _deflated_trace(res, products, params, key, cfg: _Config):
    """``(estimate, stderr)`` of the deflated trace from its probes' products: the estimator
    draws the same probes again (``key``) and takes their products from eigsh's loop."""
    acc = jnp.promote_types(_tree.dtype(params), jnp.float32)
    space = stochastic.probe_space(params)
    tr = stochastic.deflated_trace(
        lambda rows: space.flatten_basis(products), space, key, cfg.num_probes,
        res.eigenvectors, jnp.sum(res.eigenvalues), acc)
    return tr.estimate, tr.stderr


def _deflated_probes(res, num_probes: int, params, key):
    """The ``num_probes`` deflated probes ``P z_j`` of a refresh, shaped like ``params``
    (``eigsh_then``'s ``then``)."""
    acc = jnp.promote_types(_tree.dtype(params), jnp.float32)
    space = stochastic.probe_space(params)
    Q = stochastic.deflation_basis(space, res.eigenvectors)
    _, PZ = stochastic.deflated_probes(space, key, num_probes, Q, acc)
    return space.unflatten_basis(PZ)


def _refresh_info(state, res, trace, trace_se, vecs, grad, loss_value, cfg: _Config, dt):
    """The `TrackCurvatureInfo` of a refresh from its eigsh result, trace and gradient."""
    old = state.info
    return TrackCurvatureInfo(
        count=state.count.astype(jnp.int32),
        eigenvalues=res.eigenvalues.astype(dt),
        residual_norms=res.residual_norms.astype(dt),
        trace=jnp.asarray(trace).astype(dt),
        trace_stderr=jnp.asarray(trace_se).astype(dt),
        grad_fraction=grad_fraction(vecs, grad, dt).astype(dt),
        grad_norm=_tree.norm(grad).astype(dt),
        loss=jnp.asarray(loss_value).astype(dt),
        num_matvecs=(res.num_matvecs + cfg.num_probes).astype(jnp.int32),
        eigsh_matvecs=res.num_matvecs.astype(jnp.int32),
        verification_matvecs=res.verification_matvecs.astype(jnp.int32),
        converged=res.converged,
        num_refreshes=old.num_refreshes + 1,
        skipped=jnp.asarray(False),
        num_skipped=old.num_skipped,
        finite=jnp.asarray(True),
        status=jnp.asarray(res.status, jnp.int32),  # eigsh's own (why not converged)
    )


def _commit(ok, vecs, info, state):
    """New values where ``ok``; otherwise the previous ones, flagged as skipped."""
    old = state.info
    kept = old._replace(skipped=jnp.asarray(True), num_skipped=old.num_skipped + 1,
                        finite=jnp.asarray(False),
                        status=jnp.asarray(Status.NONFINITE, jnp.int32))
    info = jax.tree.map(lambda a, b: jnp.where(ok, a, b), info, kept)
    vecs = jax.tree.map(lambda a, b: jnp.where(ok, a, b), vecs, state.eigenvectors)
    return vecs, info


@_deprecation.renamed("curvlib.track_curvature", hvp_mode="mode")
@_deprecation.moved_to_solver("curvlib.track_curvature", "eigsh", solvers.Eigsh,
                              tol="rtol", basis_size="basis_size", max_restarts="max_restarts")
def track_curvature(
    every,
    k: int,
    *,
    key: jax.Array,
    which: str = "LA",
    eigsh: solvers.Eigsh = DEFAULT_EIGSH,
    num_probes: int = 6,
    trace_method: str = "deflated",
    mode: str | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    warm_noise=1e-2,
) -> optax.GradientTransformationExtraArgs:
    r"""Monitor the Hessian's top eigenvalues, trace and gradient alignment during training.

    An identity transform (``updates`` pass through unchanged) that, every
    ``every`` calls of ``update``, measures the Hessian ``H`` of
    ``value_fn(params, **kw)`` (``kw``: the extra arguments ``value_fn`` names,
    the convention of optax's line searches and [`curvlib.optim`][curvlib.optim]):

    * the top-``k`` eigenpairs ``H x_i = lambda_i x_i`` by thick-restart
      Lanczos ([`curvlib.eigsh`][curvlib.eigsh]), warm-started from the eigenvectors of
      the previous refresh (`warm_start_vector`); ``lambda_1`` is the
      sharpness, which full-batch gradient descent with step ``eta`` drives to
      ``2 / eta`` (the edge of stability, Cohen et al. 2021);
    * ``tr(H)``: the sum of the ``k`` Ritz values (exact on the tracked
      eigenspace) plus Hutchinson with ``num_probes`` products on its
      orthogonal complement (Hutch++ of Meyer et al. 2021 with the eigsh
      result as the sketch, so the sketch costs no product);
    * the gradient's alignment ``||V g||^2 / ||g||^2``, ``V = [x_1 .. x_k]``
      (Gur-Ari et al. 2018, `grad_fraction`).

    The results live in the state's ``info`` ([`TrackCurvatureInfo`][curvlib.TrackCurvatureInfo]),
    readable after a jitted step with [`curvature_info`][curvlib.curvature_info] (also from a flax
    ``nnx.Optimizer``'s ``opt_state``). Place it anywhere in an
    `optax.chain`; the loss arrives as the keyword extra argument
    ``value_fn``, as for every transform of [`curvlib.optim`][curvlib.optim].

    Compilation: a refresh linearises ``value_and_grad`` of the loss once; the
    loss, the gradient and every Hessian product of eigsh and of the trace come
    from that one linearisation, so the model is traced once for the refresh
    (the step's own gradient is a second copy). The default trace's probe
    products run in eigsh's own loop after its last product, so the compiled
    refresh holds the product once; ``trace_method="hutch++"`` or
    ``"hutchinson"`` multiply their probes as a separate ``vmap``-ed block, a
    second compiled copy of the product. The refresh sits in one ``lax.cond``
    branch; the other branch computes nothing.

    Cost: between refreshes nothing. A refresh costs one gradient, the eigsh
    products (eigsh stops at the first Krylov depth certifying the ``k`` pairs)
    and ``num_probes`` trace products, as reported in ``info.num_matvecs``. On
    a tanh MLP a warm refresh with ``k = 3`` and ``rtol = 1e-3`` needs fewer
    products than a cold eigsh at the same point and tolerance
    (``tests/test_track.py`` asserts at most 0.8x); the saving shrinks for
    tight tolerances and clustered spectra (near the edge of stability).
    Memory: ``k`` vectors in the state, ``m + 2`` during eigsh, ``num_probes``
    during the trace, and the linearisation residuals (``microbatch_size``
    bounds them by one chunk).

    Each product costs about one to three training steps (a product is a
    gradient's forward-and-backward pass differentiated once more, plus the
    basis reorthogonalisation), so a refresh costs tens of steps.
    ``benchmarks/track_overhead.py`` (``k = 5``, ``every = 100``, the step's
    own mini-batch as ``value_fn``, ``Eigsh(rtol=1e-3, max_restarts=100,
    verify=False)``) measured 27 products and 108 steps per refresh on an MLP,
    41 products and 92 steps on a small transformer: 100% average overhead (67%
    with ``rtol=1e-2, num_probes=0``; 145% with eigsh's verification round,
    ``verify=True``, 41 and 63 products). Since even a perfect warm start needs
    ``k`` products for one Rayleigh-Ritz step, the overhead at ``every = 100``
    cannot fall below about ``k`` steps per refresh; for an overhead below 10%
    choose ``every`` of several hundred steps (about 500-1100 here), or a
    smaller ``k``. The warm start pays when the Hessian moves slowly: on the MLP
    with a fixed measurement batch a warm refresh took 26 products where the
    cold one took 57; with the step's own mini-batch (the Hessian changes with
    the batch), or early in training, it saves little.

    ``vmap``: under ``jax.vmap`` over seeds the step counter is batched and
    ``lax.cond`` becomes a ``select`` that evaluates *both* branches, so every
    step pays for a measurement (results are still committed only at refresh
    steps, and are identical to the unbatched ones). To keep the zero cost
    between refreshes, map over seeds outside the tracked step or use
    ``every`` large.

    Wrappers: under ``optax.inject_hyperparams`` the traced arguments
    (``every``, ``warm_noise``) take effect at the next step; ``key``
    is the *initial* key, copied into ``state.key`` at ``init`` (to change it,
    replace ``state.key``); ``k``, ``eigsh``, ``num_probes`` and
    ``microbatch_size`` fix shapes and loops (``eigsh`` is static by itself, not
    being a number; the others belong in ``static_args``). Under
    ``optax.MultiSteps`` the tracker measures the ``value_fn`` of the micro-step
    at which the accumulated update is emitted.

    Args:
      every: refresh period in steps (``>= 1``); refreshes happen at steps
        ``0, every, 2 every, ...``. May be an injected (traced) hyperparameter.
      k: number of tracked eigenpairs, ``1 <= k <`` number of parameters (static).
      key: PRNG key for the cold start, the warm-start noise and the trace
        probes; refresh ``t`` uses ``fold_in(key, t)``.
      which: ``"LA"`` (largest algebraic, default), ``"SA"`` or ``"LM"``.
      eigsh: the eigensolver's options, a [`curvlib.Eigsh`][curvlib.Eigsh] (default
        ``Eigsh(verify=False)``: the defaults of [`curvlib.eigsh`][curvlib.eigsh] without
        its verification round; ``None`` means the same). A refresh then stops once the
        ``k`` Ritz pairs meet the tolerance, and ``info.converged`` certifies their
        residuals; ``Eigsh(verify=True)`` adds eigsh's certificate that no copy of a
        wanted eigenvalue was missed, about a basis of products more per refresh (the
        warm start makes the search short, so the round would double its cost). Its ``rtol`` is
        the relative residual tolerance (the eigenvalue error is about
        ``rtol**2 * lambda**2 / gap``; a looser ``Eigsh(rtol=1e-3)`` spends
        fewer products per refresh); its
        ``basis_size`` costs memory, not products (eigsh stops as soon as the
        ``k`` pairs are certified). The former keywords ``tol``,
        ``basis_size`` and ``max_restarts`` still work, with a warning.
      num_probes: trace products per refresh (static); ``0`` skips the trace.
      trace_method: ``"deflated"`` (default: Ritz values plus Hutchinson on the
        complement), ``"hutch++"`` (its own sketch, a third of the probes) or
        ``"hutchinson"``.
      mode: product mode of [`curvlib.hessian_matvec`][curvlib.hessian_matvec]
        (``"linearize"`` by default; ``"fwd-rev"`` holds no residuals).
        (Renamed from ``hvp_mode``, which still works with a warning.)
      microbatch_size: accumulate the gradient and every product over chunks of
        every batched extra argument of ``value_fn`` (static; the loss must be
        a mean over the batch).
      has_aux: ``value_fn`` returns ``(loss, aux)``; ``aux`` is ignored.
      warm_noise: norm of the random part of a warm start, relative to one
        unit eigenvector (finite, ``>= 0``; traceable).

    Returns:
      An `optax.GradientTransformationExtraArgs` with state
      [`TrackCurvatureState`][curvlib.TrackCurvatureState].

    Raises:
      ValueError: ``every < 1`` or ``k < 1`` (here), ``k >=`` the number of
        parameters (at ``init``), a bad ``which``/``trace_method``/``num_probes``/
        ``warm_noise``;
        non-floating or key leaves in ``params`` (at ``init``, naming the leaf).
      TypeError: at ``update`` when ``value_fn`` is missing, cannot take the
        extra arguments passed, or does not return a scalar loss.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import curvlib
      >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([3.0, 2.0, 1.0, 0.5]) * p["w"] ** 2)
      >>> opt = optax.chain(
      ...     curvlib.track_curvature(every=10, k=2, key=jax.random.PRNGKey(0)),
      ...     optax.sgd(0.1),
      ... )
      >>> params = {"w": jnp.ones(4)}
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     grads = jax.grad(loss)(params)
      ...     updates, state = opt.update(grads, state, params, value_fn=loss)
      ...     return optax.apply_updates(params, updates), state
      >>> params, state = step(params, state)
      >>> info = curvlib.curvature_info(state)
      >>> [round(float(x), 3) for x in info.eigenvalues], int(info.count)
      ([3.0, 2.0], 0)

    References:
      Cohen et al., ICLR 2021; Gur-Ari, Roberts & Dyer 2018; Meyer, Musco,
      Musco & Woodruff, *Hutch++*, SOSA 2021; Sorensen 1992.
    """
    _validate.number(every, "every", minimum=1, integer=True)  # traceable
    k = _validate.static_int(k, "k", minimum=1)
    num_probes = _validate.static_int(num_probes, "num_probes", minimum=0)
    eigsh = solvers.resolve(solvers.Eigsh, DEFAULT_EIGSH if eigsh is None else eigsh, "eigsh")
    if eigsh.basis_size is not None:
        _validate.static_int(eigsh.basis_size, "basis_size", minimum=k + 2)
    _validate.one_of(which, "which", ("LA", "SA", "LM"))
    _validate.prng_key(key)
    _validate.one_of(trace_method, "trace_method", TRACE_METHODS)
    if trace_method == "hutch++" and 0 < num_probes < 3:
        raise ValueError(
            f"`num_probes` must be 0 (no trace) or >= 3 with trace_method='hutch++' (a sketch, "
            f"its exact trace and the residual estimate take a third each); got {num_probes}. "
            "Use trace_method='hutchinson' for fewer probes."
        )
    _validate.number(warm_noise, "warm_noise", minimum=0)  # inf: every warm start non-finite
    microbatch_size = _validate.static_int(microbatch_size, "microbatch_size", minimum=1,
                                           optional=True)
    _validate.mode(mode, microbatch_size=microbatch_size)
    typed = jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)
    cfg = _Config(k, which, eigsh, num_probes, trace_method, mode, microbatch_size, warm_noise,
                  jax.random.key_impl(key) if typed else None)
    name = "track_curvature"

    def init_fn(params):
        _validate.float_leaves(params, "params", init=name)
        n = _tree.size(params)
        if cfg.k >= n:
            raise ValueError(
                f"`k` must be in [1, {n - 1}] (smaller than the number of parameters, {n}); "
                f"got {cfg.k}."
            )
        if cfg.eigsh.basis_size is not None and cfg.eigsh.basis_size > n:
            raise ValueError(
                f"`basis_size`={cfg.eigsh.basis_size} exceeds the number of parameters ({n})."
            )
        dt = jnp.promote_types(_tree.dtype(params), jnp.float32)
        return _tree.unaliased(TrackCurvatureState(  # donatable: no buffer in two leaves
            count=jnp.zeros([], jnp.int32),
            key=_raw_key(key),
            eigenvectors=_tree.basis_zeros(params, cfg.k),
            info=_empty_info(cfg.k, dt),
        ), key)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        loss = _common.bind_loss(name, value_fn, extra_args, has_aux=has_aux)
        params = _common.require_params(name, params, updates)
        _common.check_state(name, init_fn, state, params)
        due = (state.count % jnp.asarray(every, jnp.int32)) == 0
        vecs, info = _xp.cond(
            due,
            lambda _: _measure(loss, params, extra_args, state, cfg),
            lambda _: (state.eigenvectors, state.info),
            None,
        )
        new_state = TrackCurvatureState(
            count=optax.safe_increment(state.count), key=state.key, eigenvectors=vecs, info=info
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------ reading results


def _snapshot(x):
    """A plain, immutable array for ``x``: flax ``Variable`` values and JAX refs are read out."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(x, nnx.Variable):
        x = x.get_value()
    if isinstance(x, jax.Ref):
        x = x[...]
    return x


def _is_variable(x) -> bool:
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(x, nnx.Variable)


def curvature_info(state: PyTree) -> TrackCurvatureInfo:
    """The `TrackCurvatureInfo` inside any (nested) optimiser state, as plain arrays.

    Works through ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``,
    ``vmap`` (leaves then carry the batch axis) and flax: a
    ``nnx.Optimizer``'s ``opt_state`` holds *mutable* ``Variable`` objects
    that the next step overwrites in place, so the values are read out here
    and the returned info is a snapshot (appending ``curvature_info(...)``
    after every step collects one row per step, not aliases of the last). Its
    arrays are copies, so they stay readable when the next step donates the
    state (``jax.jit(step, donate_argnums=...)``).
    Unlike ``optax.tree_utils.tree_get(state, "info")`` it does not clash with
    the ``info`` of another link of the chain.

    Args:
      state: an optimiser state (any pytree) holding one
        [`TrackCurvatureState`][curvlib.TrackCurvatureState].

    Returns:
      Its [`TrackCurvatureInfo`][curvlib.TrackCurvatureInfo], every field a plain ``jax.Array``.

    Raises:
      KeyError: if the state holds no [`TrackCurvatureInfo`][curvlib.TrackCurvatureInfo], or
        several.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, curvlib
      >>> opt = optax.chain(curvlib.track_curvature(1, 1, key=jax.random.PRNGKey(0),
      ...                                           num_probes=0), optax.sgd(0.1))
      >>> p = jnp.array([1.0, 2.0]); loss = lambda p: jnp.sum(p ** 2)
      >>> _, state = opt.update(jax.grad(loss)(p), opt.init(p), p, value_fn=loss)
      >>> info = curvlib.curvature_info(state)
      >>> int(info.count), round(float(info.eigenvalues[0]), 4)
      (0, 2.0)
    """
    found = []

    def visit(x):
        if isinstance(x, TrackCurvatureInfo):
            found.append(x)
        return None

    jax.tree.map(
        visit, state, is_leaf=lambda x: isinstance(x, TrackCurvatureInfo) or _is_variable(x)
    )
    if len(found) != 1:
        raise KeyError(
            f"`state` must hold one TrackCurvatureInfo (an optimiser state with one "
            f"`track_curvature` link: `opt_state`, or flax's `nnx.Optimizer` or linen "
            f"`TrainState` holding it); found {len(found)}."
            + (" `nnx.state(optimizer)` and `flax.serialization.to_state_dict` turn the state "
               "into plain dicts without its types: restore it into the optimiser "
               "(`nnx.update(optimizer, state)`) and pass `optimizer.opt_state`."
               if not found else "")
        )
    # copies in their own buffers: a step that donates the state (`donate_argnums`) deletes
    # the state's, and the infos appended before it must stay readable
    return jax.tree.map(lambda x: jnp.copy(_snapshot(x)), found[0], is_leaf=_is_variable)
