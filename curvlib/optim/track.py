"""Curvature monitoring inside a jitted optax chain: sharpness, trace and gradient alignment.

:func:`track_curvature` is an optax transform that leaves the updates alone and,
every ``every`` steps, measures the Hessian of the loss at the current
parameters: its top-``k`` eigenvalues (the largest is the *sharpness*), a
Hutch++ estimate of its trace, and the fraction of the gradient's squared norm
that lies in the top-``k`` eigenspace. Each refresh warm-starts the Lanczos
process from the eigenvectors kept in the state, so once training moves slowly
a refresh costs a handful of Hessian-vector products instead of a cold solve.

:func:`curvature_info` reads the diagnostics out of any (nested) optimiser
state, :func:`curvature_history` collects them over a run into NumPy columns
and :func:`plot_curvature` draws them (matplotlib, imported lazily).

References:
  J. Cohen, S. Kaur, Y. Li, J. Z. Kolter and A. Talwalkar, *Gradient descent on
  neural networks typically occurs at the edge of stability*, ICLR 2021.
  G. Gur-Ari, D. A. Roberts and E. Dyer, *Gradient descent happens in a tiny
  subspace*, arXiv:1812.04754, 2018.
  Z. Yao, A. Gholami, K. Keutzer and M. Mahoney, *PyHessian: neural networks
  through the lens of the Hessian*, IEEE Big Data 2020.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvlib import _tree
from curvlib.krylov.eigen import eigsh
from curvlib.krylov.stochastic import hutchinson_trace
from curvlib.optim import _common

PyTree = Any

TRACE_METHODS = ("deflated", "hutch++", "hutchinson")


class TrackCurvatureInfo(NamedTuple):
    """Diagnostics of the last refresh of :func:`track_curvature`.

    Every field keeps its value between refreshes; before the first refresh
    ``step`` is ``-1`` and the values are NaN.

    Attributes:
      step: optimiser step (0-based count of ``update`` calls) of the last
        successful refresh; ``-1`` before the first.
      eigenvalues: top-``k`` Hessian eigenvalues, largest first (shape ``(k,)``);
        ``eigenvalues[0]`` is the sharpness.
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
      converged: whether eigsh met its tolerance at the last refresh.
      num_refreshes: successful refreshes so far.
      skipped: ``True`` if the most recent refresh met a non-finite loss,
        gradient or curvature and kept the previous values (training goes on).
      num_skipped: refreshes skipped so far.
    """

    step: jax.Array
    eigenvalues: jax.Array
    residual_norms: jax.Array
    trace: jax.Array
    trace_stderr: jax.Array
    grad_fraction: jax.Array
    grad_norm: jax.Array
    loss: jax.Array
    num_matvecs: jax.Array
    eigsh_matvecs: jax.Array
    converged: jax.Array
    num_refreshes: jax.Array
    skipped: jax.Array
    num_skipped: jax.Array


class TrackCurvatureState(NamedTuple):
    """State of :func:`track_curvature`.

    Attributes:
      count: number of ``update`` calls so far (int32).
      key: the PRNG key given to :func:`track_curvature`; refresh ``t`` uses
        ``fold_in(key, t)``.
      eigenvectors: the tracked eigenvectors, a pytree shaped like the
        parameters with a leading axis ``k`` (zeros before the first refresh);
        the warm start of the next refresh.
      info: a :class:`TrackCurvatureInfo`.
    """

    count: jax.Array
    key: jax.Array
    eigenvectors: PyTree
    info: TrackCurvatureInfo


def _check_static_int(name: str, x, minimum: int) -> int:
    if isinstance(x, jax.core.Tracer):
        raise ValueError(
            f"`{name}` fixes array shapes and must be a static int; with "
            f"`optax.inject_hyperparams` list it in `static_args`."
        )
    if isinstance(x, bool) or int(x) != x or int(x) < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {x!r}.")
    return int(x)


def _empty_info(k: int, dt) -> TrackCurvatureInfo:
    nan = jnp.asarray(jnp.nan, dt)
    return TrackCurvatureInfo(
        step=jnp.asarray(-1, jnp.int32),
        eigenvalues=jnp.full((k,), jnp.nan, dt),
        residual_norms=jnp.full((k,), jnp.nan, dt),
        trace=nan,
        trace_stderr=nan,
        grad_fraction=nan,
        grad_norm=nan,
        loss=nan,
        num_matvecs=jnp.asarray(0, jnp.int32),
        eigsh_matvecs=jnp.asarray(0, jnp.int32),
        converged=jnp.asarray(False),
        num_refreshes=jnp.asarray(0, jnp.int32),
        skipped=jnp.asarray(False),
        num_skipped=jnp.asarray(0, jnp.int32),
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
    """
    z = _tree.normal_like(key, like)
    z = _tree.scale(1.0 / _tree.norm(z), z)
    acc = jnp.promote_types(_tree.dtype(like), jnp.float32)
    norms = jnp.sqrt(jnp.diagonal(_tree.basis_gram(eigenvectors, eigenvectors, acc)))
    have = jnp.any(norms > 0)
    w = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
    block = _tree.basis_combine(eigenvectors, w, like=like)
    return _tree.add_scale(block, jnp.where(have, noise, 1.0), z)


def _refresh(
    value_fn: Callable,
    params: PyTree,
    extra_args: dict,
    state: TrackCurvatureState,
    *,
    k: int,
    which: str,
    num_matvecs: int | None,
    tol,
    max_restarts: int,
    num_probes: int,
    trace_method: str,
    hvp_mode: str | None,
    warm_noise,
) -> tuple[PyTree, TrackCurvatureInfo]:
    """One measurement: eigsh (warm-started), trace and gradient alignment.

    Returns the new eigenvectors and info; on a non-finite loss, gradient or
    product the previous ones are returned with ``skipped=True``.
    """
    old = state.info
    dt = old.eigenvalues.dtype
    kw = _common.kwargs_for(value_fn, extra_args)
    loss, grad = jax.value_and_grad(lambda p: value_fn(p, **kw))(params)
    rkey = jax.random.fold_in(state.key, state.count)
    k_start, k_trace = jax.random.split(rkey)

    def measure(_):
        matvec = _common.curvature_matvec(
            value_fn, None, params, extra_args, hvp_mode=hvp_mode, microbatch_size=None
        )
        v0 = warm_start_vector(k_start, state.eigenvectors, params, warm_noise)
        # eigsh stops at the first Krylov depth certifying the k pairs, so a warm
        # start (few steps) and a cold one (more steps) share one basis size
        res = eigsh(
            matvec, v0, k, which=which, num_matvecs=num_matvecs, tol=tol,
            max_restarts=max_restarts,
        )
        vecs = jax.tree.map(lambda e, x: e.astype(x.dtype), res.eigenvectors, state.eigenvectors)
        if num_probes and trace_method == "deflated":
            # tr(H) = sum of the Ritz values (x_i^T H x_i, exact) + Hutchinson on the
            # complement of the tracked eigenspace: the sketch is already paid for
            tr = hutchinson_trace(
                matvec, params, k_trace, num_probes, deflate=res.eigenvectors,
                deflate_trace=jnp.sum(res.eigenvalues),
            )
            trace, trace_se = tr.estimate, tr.stderr
        elif num_probes:
            tr = hutchinson_trace(matvec, params, k_trace, num_probes, method=trace_method)
            trace, trace_se = tr.estimate, tr.stderr
        else:
            trace = trace_se = jnp.asarray(jnp.nan, dt)
        gnorm2 = _tree.vdot(grad, grad).astype(dt)
        coef = _tree.basis_project(vecs, grad, dt)
        frac = jnp.sum(coef**2) / jnp.where(gnorm2 > 0, gnorm2, 1.0)
        ok = res.finite & jnp.all(jnp.isfinite(res.eigenvalues))
        if num_probes:
            ok = ok & jnp.isfinite(trace)
        info = TrackCurvatureInfo(
            step=state.count.astype(jnp.int32),
            eigenvalues=res.eigenvalues.astype(dt),
            residual_norms=res.residual_norms.astype(dt),
            trace=jnp.asarray(trace).astype(dt),
            trace_stderr=jnp.asarray(trace_se).astype(dt),
            grad_fraction=frac.astype(dt),
            grad_norm=jnp.sqrt(gnorm2),
            loss=jnp.asarray(loss).astype(dt),
            num_matvecs=(res.num_matvecs + num_probes).astype(jnp.int32),
            eigsh_matvecs=res.num_matvecs.astype(jnp.int32),
            converged=res.converged,
            num_refreshes=old.num_refreshes + 1,
            skipped=jnp.asarray(False),
            num_skipped=old.num_skipped,
        )
        return _commit(ok, vecs, info, state)

    def skip(_):
        return _commit(jnp.asarray(False), state.eigenvectors, old, state)

    finite = jnp.isfinite(loss) & _tree.all_finite(grad)
    return jax.lax.cond(finite, measure, skip, None)


def _commit(ok, vecs, info, state):
    """New values where ``ok``; otherwise the previous ones, flagged as skipped."""
    old = state.info
    kept = old._replace(skipped=jnp.asarray(True), num_skipped=old.num_skipped + 1)
    info = jax.tree.map(lambda a, b: jnp.where(ok, a, b), info, kept)
    vecs = jax.tree.map(lambda a, b: jnp.where(ok, a, b), vecs, state.eigenvectors)
    return vecs, info


def track_curvature(
    every,
    k: int,
    *,
    key: jax.Array,
    which: str = "LA",
    num_matvecs: int | None = None,
    tol=1e-3,
    max_restarts: int = 100,
    num_probes: int = 6,
    trace_method: str = "deflated",
    hvp_mode: str | None = None,
    warm_noise=1e-2,
) -> optax.GradientTransformationExtraArgs:
    r"""Monitor the Hessian's top eigenvalues, trace and gradient alignment during training.

    An identity transform (``updates`` pass through unchanged) that, every
    ``every`` calls of ``update``, measures the Hessian ``H`` of
    ``value_fn(params, **kw)`` (``kw``: the extra arguments ``value_fn`` names,
    the convention of optax's line searches and :mod:`curvlib.optim`):

    * the top-``k`` eigenpairs ``H x_i = lambda_i x_i`` by thick-restart
      Lanczos (:func:`curvlib.eigsh`), warm-started from the eigenvectors of
      the previous refresh (:func:`warm_start_vector`); ``lambda_1`` is the
      sharpness, which full-batch gradient descent with step ``eta`` drives to
      ``2 / eta`` (the edge of stability, Cohen et al. 2021);
    * ``tr(H)``: the sum of the ``k`` Ritz values (exact on the tracked
      eigenspace) plus Hutchinson with ``num_probes`` products on its
      orthogonal complement (Hutch++ of Meyer et al. 2021 with the eigsh
      result as the sketch, so the sketch costs no product);
    * the gradient's alignment ``||V g||^2 / ||g||^2``, ``V = [x_1 .. x_k]``
      (Gur-Ari et al. 2018).

    The results live in the state's ``info`` (:class:`TrackCurvatureInfo`),
    readable after a jitted step with :func:`curvature_info` or
    ``optax.tree_utils.tree_get(state, "info")`` when no other link of the
    chain has an ``info``. Place it anywhere in an :func:`optax.chain`; the
    loss arrives as the keyword extra argument ``value_fn``.

    Cost: between refreshes nothing (the measurement sits in a ``lax.cond``
    branch that is not executed). A refresh costs one gradient, the eigsh
    products (eigsh stops at the first Krylov depth certifying the ``k`` pairs)
    and ``num_probes`` trace products, as reported in ``info.num_matvecs``. On
    a tanh MLP a warm refresh with ``k = 3`` and ``tol = 1e-3`` needs fewer
    products than a cold eigsh at the same point and tolerance
    (``tests/test_track.py`` asserts at most 0.8x); the saving shrinks for
    tight tolerances and clustered spectra (near the edge of stability).
    Memory: ``k`` vectors in the state, ``m + 2`` during eigsh, ``num_probes``
    during the trace.

    Each product costs about one to three training steps (a product is a
    gradient's forward-and-backward pass differentiated once more, plus the
    basis reorthogonalisation), so a refresh costs tens of steps.
    ``benchmarks/track_overhead.py`` (``k = 5``, ``every = 100``, the step's
    own mini-batch as ``value_fn``) measured 26 products and 70 steps per
    refresh on an MLP, 39 products and 57 steps on a small transformer: 64%
    average overhead (48% with ``tol=1e-2, num_probes=0``). Since even a
    perfect warm start needs ``k`` products for one Rayleigh-Ritz step, the
    overhead at ``every = 100`` cannot fall below about ``k`` steps per
    refresh; for an overhead below 10% choose ``every`` of several hundred
    steps (about 400-800 here), or a smaller ``k``. The warm start pays when
    the Hessian moves slowly: on the MLP with a fixed measurement batch a warm
    refresh took 28 products where the cold one took 54; with the step's own
    mini-batch (the Hessian changes with the batch), or early in training, it
    saves little.

    ``vmap``: under ``jax.vmap`` over seeds the step counter is batched and
    ``lax.cond`` becomes a ``select`` that evaluates *both* branches, so every
    step pays for a measurement (results are still committed only at refresh
    steps, and are identical to the unbatched ones). To keep the zero cost
    between refreshes, map over seeds outside the tracked step or use
    ``every`` large.

    Args:
      every: refresh period in steps (``>= 1``); refreshes happen at steps
        ``0, every, 2 every, ...``. May be an injected (traced) hyperparameter.
      k: number of tracked eigenpairs, ``1 <= k <`` number of parameters (static).
      key: PRNG key for the cold start, the warm-start noise and the trace probes.
      which: ``"LA"`` (largest algebraic, default), ``"SA"`` or ``"LM"``.
      num_matvecs: Lanczos basis size ``m`` (static); default eigsh's
        ``max(4k, 20)``. eigsh stops as soon as the ``k`` pairs are certified,
        so a larger basis costs memory, not products.
      tol: relative residual tolerance of eigsh (traceable); the eigenvalue
        error is about ``tol**2 * lambda**2 / gap``.
      max_restarts: cap on eigsh's thick restarts per refresh (static).
      num_probes: trace products per refresh (static); ``0`` skips the trace.
      trace_method: ``"deflated"`` (default: Ritz values plus Hutchinson on the
        complement), ``"hutch++"`` (its own sketch, a third of the probes) or
        ``"hutchinson"``.
      hvp_mode: product mode of :func:`curvlib.hessian_matvec`
        (``"linearize"`` by default; ``"fwd-rev"`` holds no residuals).
      warm_noise: norm of the random part of a warm start, relative to one
        unit eigenvector (traceable).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`TrackCurvatureState`.

    Raises:
      ValueError: ``every < 1`` or ``k < 1`` (here), ``k >=`` the number of
        parameters (at ``init``), a bad ``which``/``trace_method``/``num_probes``.
      TypeError: at ``update`` when ``value_fn`` is missing.

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
      >>> [round(float(x), 3) for x in info.eigenvalues], int(info.step)
      ([3.0, 2.0], 0)

    References:
      Cohen et al., ICLR 2021; Gur-Ari, Roberts & Dyer 2018; Meyer, Musco,
      Musco & Woodruff, *Hutch++*, SOSA 2021; Sorensen 1992.
    """
    if not isinstance(every, jax.core.Tracer):
        _check_static_int("every", every, 1)
    k = _check_static_int("k", k, 1)
    num_probes = _check_static_int("num_probes", num_probes, 0)
    max_restarts = _check_static_int("max_restarts", max_restarts, 0)
    if num_matvecs is not None:
        num_matvecs = _check_static_int("num_matvecs", num_matvecs, k + 1)
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"`which` must be 'LA', 'SA' or 'LM'; got {which!r}.")
    if trace_method not in TRACE_METHODS:
        raise ValueError(f"`trace_method` must be one of {TRACE_METHODS}; got {trace_method!r}.")
    _common.check_positive("tol", tol)
    _common.check_nonnegative("warm_noise", warm_noise)

    def init_fn(params):
        _tree.check_float_tree(params, "params")
        n = _tree.size(params)
        if k >= n:
            raise ValueError(
                f"`k`={k} must be smaller than the number of parameters ({n})."
            )
        if num_matvecs is not None and num_matvecs > n:
            raise ValueError(f"`num_matvecs`={num_matvecs} exceeds the number of parameters ({n}).")
        dt = jnp.promote_types(_tree.dtype(params), jnp.float32)
        return TrackCurvatureState(
            count=jnp.zeros([], jnp.int32),
            key=jnp.asarray(key),
            eigenvectors=_tree.basis_zeros(params, k),
            info=_empty_info(k, dt),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        value_fn = _common.require_value_fn("track_curvature", value_fn)
        params = _common.require_params("track_curvature", params)

        def refresh(_):
            return _refresh(
                value_fn, params, extra_args, state, k=k, which=which,
                num_matvecs=num_matvecs, tol=tol, max_restarts=max_restarts,
                num_probes=num_probes, trace_method=trace_method, hvp_mode=hvp_mode,
                warm_noise=warm_noise,
            )

        def keep(_):
            return state.eigenvectors, state.info

        due = (state.count % jnp.asarray(every, jnp.int32)) == 0
        vecs, info = jax.lax.cond(due, refresh, keep, None)
        new_state = TrackCurvatureState(
            count=optax.safe_increment(state.count),
            key=state.key,
            eigenvectors=vecs,
            info=info,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------ reading results


def curvature_info(state: PyTree) -> TrackCurvatureInfo:
    """The :class:`TrackCurvatureInfo` inside any (nested) optimiser state.

    Works through ``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` and
    ``vmap`` (leaves then carry the batch axis). Unlike
    ``optax.tree_utils.tree_get(state, "info")`` it does not clash with the
    ``info`` of another link of the chain.

    Raises:
      KeyError: if the state holds no :class:`TrackCurvatureInfo`, or several.
    """
    found = []

    def visit(x):
        if isinstance(x, TrackCurvatureInfo):
            found.append(x)
            return None
        return x

    jax.tree.map(visit, state, is_leaf=lambda x: isinstance(x, TrackCurvatureInfo))
    if len(found) != 1:
        raise KeyError(f"expected one TrackCurvatureInfo in the state; found {len(found)}.")
    return found[0]


_COLUMNS = (
    "step", "loss", "eigenvalues", "residual_norms", "trace", "trace_stderr",
    "grad_fraction", "grad_norm", "num_matvecs", "eigsh_matvecs", "converged", "skipped",
)


def curvature_history(records: Any) -> dict[str, np.ndarray]:
    """Collect tracked values over a run into NumPy columns, one row per refresh.

    Args:
      records: a sequence of optimiser states or :class:`TrackCurvatureInfo`
        (e.g. appended after every step), or one info/state whose leaves carry
        a leading time axis (the stacked output of ``lax.scan``). Rows that
        repeat a step (the values held between refreshes) or precede the first
        refresh are dropped.

    Returns:
      A dict of arrays with one row per refresh, ordered by step: ``step``,
      ``loss``, ``sharpness`` (``eigenvalues[:, 0]``), ``eigenvalues``
      (``(T, k)``), ``residual_norms``, ``trace``, ``trace_stderr``,
      ``grad_fraction``, ``grad_norm``, ``num_matvecs``, ``eigsh_matvecs``,
      ``converged``, ``skipped``. ``pandas.DataFrame({c: h[c] for c in ...})``
      or :func:`format_curvature_table` turn it into a table.
    """
    if isinstance(records, (list, tuple)) and not isinstance(records, TrackCurvatureInfo):
        infos = [r if isinstance(r, TrackCurvatureInfo) else curvature_info(r) for r in records]
        if not infos:
            raise ValueError("`records` is empty.")
        stacked = {c: np.stack([np.asarray(getattr(i, c)) for i in infos]) for c in _COLUMNS}
    else:
        info = records if isinstance(records, TrackCurvatureInfo) else curvature_info(records)
        stacked = {c: np.asarray(getattr(info, c)) for c in _COLUMNS}
        if stacked["step"].ndim == 0:
            stacked = {c: v[None] for c, v in stacked.items()}
    if stacked["step"].ndim != 1:
        raise ValueError(
            "expected one run (a leading time axis only); for vmapped runs index one "
            f"seed first (step has shape {stacked['step'].shape})."
        )
    steps = stacked["step"]
    _, first = np.unique(steps, return_index=True)
    rows = np.sort(first[steps[first] >= 0])
    rows = rows[np.argsort(steps[rows], kind="stable")]
    out = {c: v[rows] for c, v in stacked.items()}
    out["sharpness"] = out["eigenvalues"][:, 0]
    return out


def format_curvature_table(history: dict[str, np.ndarray], max_rows: int | None = None) -> str:
    """A plain-text table of :func:`curvature_history` (one line per refresh)."""
    cols = ["step", "loss", "sharpness", "trace", "grad_fraction", "num_matvecs"]
    lines = [" ".join(f"{c:>13}" for c in cols)]
    n = len(history["step"]) if max_rows is None else min(max_rows, len(history["step"]))
    for i in range(n):
        cells = []
        for c in cols:
            v = history[c][i]
            cells.append(f"{int(v):>13d}" if np.issubdtype(np.asarray(v).dtype, np.integer)
                         else f"{float(v):>13.5g}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot_curvature(
    history: dict[str, np.ndarray],
    *,
    learning_rate: float | None = None,
    axes: Sequence[Any] | None = None,
):
    """Plot a :func:`curvature_history`: loss, top-k eigenvalues (with ``2/eta``), trace, alignment.

    Args:
      history: the output of :func:`curvature_history`.
      learning_rate: if given, the edge-of-stability line ``2 / learning_rate``
        is drawn on the eigenvalue panel.
      axes: four matplotlib axes to draw on; a new 1 x 4 figure by default.

    Returns:
      The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    else:
        fig = axes[0].figure
    s = history["step"]
    axes[0].plot(s, history["loss"])
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    ev = history["eigenvalues"]
    for i in range(ev.shape[1]):
        axes[1].plot(s, ev[:, i], lw=1.5 if i == 0 else 0.8,
                     label="sharpness" if i == 0 else None)
    if learning_rate is not None:
        axes[1].axhline(2.0 / learning_rate, ls="--", c="k", label=r"$2/\eta$")
    axes[1].set_title(f"top-{ev.shape[1]} Hessian eigenvalues")
    axes[1].legend()
    axes[2].plot(s, history["trace"])
    axes[2].set_title("trace (Hutch++)")
    axes[3].plot(s, history["grad_fraction"])
    axes[3].set_ylim(0, 1.05)
    axes[3].set_title("gradient fraction in top-k space")
    for a in axes:
        a.set_xlabel("step")
    fig.tight_layout()
    return fig
