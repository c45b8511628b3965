"""The k-curve driver: every criterion as a function of the sample count ``k``.

For each ``k`` of a grid the driver builds the top-``Dmax`` subspace of
``H^(k)`` (and of ``H^(k+1)``, for the spectral corollary and the subspace
overlap), the coefficients ``(a, c, B)`` once, and evaluates on the whole
``sigma`` grid and nested ``D`` grid: ``Delta_1``, the closed form and its three
terms, the spectral corollary, optionally direct subspace Monte Carlo and the
full-space ``Delta_2``. The stabilisation theory predicts ``Delta_1 = O(1/k)``
and ``Delta_2 = O(1/k^2)`` (Kiselev & Grabovoy 2026).

The sample count is data in every compiled program of [`curvlib.landscape`][curvlib.landscape],
so a curve over any number of ``k`` compiles each program once. Tables, JSON
and plots of a [`KCurve`][curvlib.landscape.KCurve] are in
[`curvlib.landscape.report`][curvlib.landscape.report].
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _deprecation, _tree, _validate
from curvlib._status import Status, worst
from curvlib.krylov.solvers import Eigsh, resolve
from curvlib.landscape import _common
from curvlib.landscape.coefficients import _cast_basis, coefficient_step, mean_check
from curvlib.landscape.estimators import (
    closed_form_step,
    closed_form_total,
    direct_mc_step,
    full_mc_step,
)
from curvlib.landscape.subspace import subspace_step

PyTree = Any

STAGES = ("subspace", "coefficients", "closed_form", "direct_mc", "full_mc")


class KCurve(NamedTuple):
    """Every criterion along a grid of ``k`` (host numpy arrays).

    Shapes use ``K = len(ks)``, ``nD = len(dims)``, ``nS = len(sigmas)``.

    Attributes:
      ks: ``(K,)`` sample counts; each value describes the step ``k -> k+1``.
      dims: ``(nD,)`` nested subspace dimensions (prefixes of one subspace).
      sigmas: ``(nS,)`` probe scales.
      delta1: ``(K,)`` ``|L_{k+1} - L_k|`` at the point.
      closed_form: ``(K, nD, nS)`` Gaussian-moment ``Delta_2^(D)``.
      constant, sigma2, sigma4: ``(K, nD, nS)`` its three terms.
      spectral: ``(K, nD, nS)`` the corollary from the eigenvalues at k and k+1, each
        ``delta_i`` taken along one eigenvector (``H^(k+1)``'s eigenvalues paired with
        ``H^(k)``'s vectors by largest overlap, so two values that swap rank between k
        and k+1 are not mixed up).
      direct_mean, direct_stderr: ``(K, nD, nS)`` direct subspace MC (NaN if not run).
      full_mean, full_stderr: ``(K, nS)`` full-space ``Delta_2`` (NaN if not run).
      eigenvalues: ``(K, Dmax)`` top eigenvalues of ``H^(k)``.
      eigenvalues_next: ``(K, Dmax)`` top eigenvalues of ``H^(k+1)`` (NaN if k+2 > n).
      max_angle: ``(K, nD)`` largest principal angle (radians) between the top-D
        eigenspaces of ``H^(k)`` and ``H^(k+1)`` (NaN if k+2 > n).
      converged: ``(K,)`` whether the eigensolver converged at k (and k+1).
      unique: ``(K, nD)`` whether the top-``D`` subspace of ``H^(k)`` is unique
        (`curvlib.landscape.subspace.unique_prefixes`): ``False`` when
        ``lambda_D`` ties ``lambda_{D+1}`` within the certificate or is
        numerically zero (``D`` beyond the rank of ``H^(k)``). There ``Delta_2^(D)``
        and the principal angles depend on the basis the eigensolver returned,
        not on ``H^(k)`` alone (see docs/landscape.md). For the largest ``D`` a tie
        with ``lambda_{D+1}``, which is not computed, is not detected: ask for one
        more dimension (``dims=[..., D, D + 1]``) to test it. ``None`` for a curve
        built by hand.
      timings: stage -> ``(K,)`` seconds (``subspace``, ``coefficients``,
        ``closed_form``, ``direct_mc``, ``full_mc``); the largest ``k`` (the curve runs
        from it down) includes the compilation of each stage's program (one for the whole
        curve).
      status: ``(K,)`` int32 [`curvlib.Status`][curvlib.Status] of the eigensolves at k
        (and k+1): the most serious of their ``status``, ``NONFINITE`` where ``finite`` is
        false (``None`` for a curve built by hand).
      finite: ``(K,)`` whether the eigensolves at k (and k+1), ``delta1``, the closed
        form and the Monte Carlo estimates that ran at k were all finite (``None`` for a
        curve built by hand).
      num_matvecs: ``(K,)`` Hessian products the eigensolves at k (and k+1) used
        (``None`` for a curve built by hand).
    """

    ks: np.ndarray
    dims: np.ndarray
    sigmas: np.ndarray
    delta1: np.ndarray
    closed_form: np.ndarray
    constant: np.ndarray
    sigma2: np.ndarray
    sigma4: np.ndarray
    spectral: np.ndarray
    direct_mean: np.ndarray
    direct_stderr: np.ndarray
    full_mean: np.ndarray
    full_stderr: np.ndarray
    eigenvalues: np.ndarray
    eigenvalues_next: np.ndarray
    max_angle: np.ndarray
    converged: np.ndarray
    timings: dict
    status: np.ndarray | None = None
    unique: np.ndarray | None = None
    finite: np.ndarray | None = None
    num_matvecs: np.ndarray | None = None


class KCurveConfig(NamedTuple):
    """Options of `k_curve` (every field can also be passed to it as a keyword).

    Attributes:
      num_samples: direct subspace MC draws per ``(k, D, sigma)``; 0 skips it.
      full_samples: full-space MC draws per ``(k, sigma)``; 0 skips it.
      antithetic: antithetic MC pairs ``(z, -z)``.
      microbatch_size: chunk size over the samples for losses, gradients and
        products (bounds memory; with it, a step at ``k`` evaluates only the
        chunks holding the first ``k + 2`` samples).
      sample_batch_size: MC evaluations per vectorised chunk.
      basis_size: deprecated: use ``eigsh=curvlib.Eigsh(basis_size=...)``.
      tol: deprecated: use ``eigsh=curvlib.Eigsh(rtol=...)``.
      next_subspace: also build the subspace at ``k + 1`` (for the corollary and the
        principal angles); skipped automatically where ``k + 2 > n``.
      flatten: passed to [`curvature_subspace`][curvlib.landscape.curvature_subspace] (faster
        compiles for small models).
      progress: show a tqdm progress bar (if tqdm is installed). The curve runs from the
        largest `k` down (a bad sample stops it before any work); results are in `ks` order.
      eigsh: the eigensolver's options for
        [`curvature_subspace`][curvlib.landscape.curvature_subspace], a
        [`curvlib.Eigsh`][curvlib.Eigsh] (default ``Eigsh()``).
    """

    num_samples: int = 0
    full_samples: int = 0
    antithetic: bool = True
    microbatch_size: int | None = None
    sample_batch_size: int | None = None
    basis_size: int | None = None
    tol: float | None = None
    next_subspace: bool = True
    flatten: bool = False
    progress: bool = True
    eigsh: Eigsh | None = None


# the options of KCurveConfig/k_curve that moved into its `eigsh` value
_MOVED = {"basis_size": "basis_size", "tol": "rtol", "num_matvecs": "basis_size"}
for _old, _field in _MOVED.items():
    _deprecation.RENAMES.append(
        _deprecation.Rename("curvlib.landscape.k_curve", _old, f"eigsh=Eigsh({_field}=...)"))


class _Plan(NamedTuple):
    """Validated inputs of a curve."""

    ks: list
    dims: list
    sigmas: np.ndarray
    data: PyTree  # trimmed to the samples the curve uses
    n: int
    config: KCurveConfig


# ---------------------------------------------------------------- steps


def _config(config: KCurveConfig | None, options: dict) -> KCurveConfig:
    """``config`` with keyword ``options`` applied (``num_matvecs`` = deprecated ``basis_size``)."""
    config = KCurveConfig() if config is None else config
    if not isinstance(config, KCurveConfig):
        raise TypeError(f"`config` must be a KCurveConfig; got {type(config).__name__}.")
    options = dict(options)
    moved, olds = {}, {}
    where = "curvlib.landscape.k_curve"
    for old, field in _MOVED.items():  # the deprecated solver options, as keywords
        if old in options:
            _deprecation.warn_moved(where, old, "eigsh", "Eigsh", field)
            value = options.pop(old)
            if value is not None:
                _deprecation.add_option(moved, olds, field, value, old, where, "eigsh", "Eigsh")
    unknown = sorted(set(options) - set(KCurveConfig._fields))
    if unknown:
        raise TypeError(
            f"k_curve() got unexpected keyword argument(s) {unknown}; its options are "
            f"{list(KCurveConfig._fields)} (fields of KCurveConfig)."
        )
    config = config._replace(**options)
    for old in ("basis_size", "tol"):  # ... or as fields of the config
        value = getattr(config, old)
        if value is not None:
            if old not in moved and _MOVED[old] not in moved:
                _deprecation.warn_moved("curvlib.landscape.KCurveConfig", old, "eigsh", "Eigsh",
                                        _MOVED[old])
            olds.setdefault(_MOVED[old], old)
            moved.setdefault(_MOVED[old], value)
    if config.eigsh is not None and moved:
        _deprecation.no_conflict(config.eigsh, (Eigsh(),), moved, olds, where, "eigsh", "Eigsh")
    eigsh = resolve(Eigsh, config.eigsh, "eigsh", **moved)
    return config._replace(basis_size=None, tol=None, eigsh=eigsh)


def plan_curve(data: PyTree, ks: Sequence[int], dims: Sequence[int], sigmas,
               config: KCurveConfig) -> _Plan:
    """Validate a curve's grid and options and trim ``data`` to the samples it needs.

    Raises ``ValueError`` for empty or out-of-range ``ks``, bad ``dims``,
    ``sigmas`` or options, before any computation. The point (``params``) is
    checked by ``k_curve``, once or once per ``k``.
    """
    if isinstance(ks, (int, np.integer)) or isinstance(dims, (int, np.integer)):
        raise TypeError("`ks` and `dims` must be sequences of ints (a grid: `[8, 16]`, `[1, 4]`);"
                        f" got ks={ks!r}, dims={dims!r}.")
    ks = [int(_common.check_k(k, data, name="ks")) for k in ks]
    if not ks:
        raise ValueError("`ks` must be a non-empty sequence of sample counts; got [].")
    if len(set(ks)) < len(ks):
        raise ValueError(f"`ks` must be distinct sample counts; got {ks}.")
    dims = [d for d in dims]
    if not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                          and d >= 1 for d in dims):
        raise ValueError(f"`dims` must be positive ints (nested subspace dimensions); got {dims}.")
    dims = [int(d) for d in dims]
    if len(set(dims)) < len(dims):  # (as `ks`: a repeated D is the same column twice)
        raise ValueError(f"`dims` must be distinct subspace dimensions; got {dims}.")
    sig = np.atleast_1d(np.asarray(_validate.number(
        sigmas, "sigmas", minimum=0, exclusive=True, grid=True, what=_common.SIGMA)))
    for name in ("num_samples", "full_samples"):
        v = getattr(config, name)
        if v:
            _validate.static_int(v, name, minimum=2, what=_common.TWO_DRAWS)
    _validate.static_int(config.microbatch_size, "microbatch_size", minimum=1, optional=True)
    _validate.static_int(config.sample_batch_size, "sample_batch_size", minimum=1, optional=True)
    n = _common.num_samples(data)
    # one static slice for the whole curve, to the power of two holding the samples it
    # needs: later samples are never touched, and curves whose largest k differ a little
    # share their compiled programs (at most twice the samples that a step needs)
    need = max(ks) + (2 if config.next_subspace else 1)
    used = min(n, 1 << (need - 1).bit_length())
    if used < n:
        data = _common.take(data, 0, used)
    return _Plan(ks, dims, sig, data, used, config)


def curve_point(loss_fn, params, plan: _Plan, k: int, key) -> tuple[dict, dict]:
    """Every criterion at one ``k``: ``(values, stage seconds)``."""
    c = plan.config
    k_sub, k_mc, k_full = jax.random.split(jax.random.fold_in(key, k), 3)
    mean_check(loss_fn, params, plan.data, k, c.microbatch_size)
    seconds = dict.fromkeys(STAGES, 0.0)

    t0 = time.perf_counter()
    s = subspace_step(loss_fn, params, plan, k, k_sub)
    seconds["subspace"] = time.perf_counter() - t0
    U = _cast_basis(s["sub"].eigenvectors, params)  # (once, for the coefficients and the MC)
    t0 = time.perf_counter()
    coef = coefficient_step(loss_fn, params, plan, k, U, _ritz_values(s["sub"], plan, params))
    seconds["coefficients"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    terms, spectral = closed_form_step(coef, plan, s["eigenvalues"],
                                       s.get("eigenvalues_matched", s["eigenvalues_next"]))
    seconds["closed_form"] = time.perf_counter() - t0
    values = dict(delta1=abs(float(coef.a)), constant=terms[0], sigma2=terms[1],
                  sigma4=terms[2], closed_form=closed_form_total(*terms, np),
                  spectral=spectral,
                  eigenvalues=s["eigenvalues"], eigenvalues_next=s["eigenvalues_next"],
                  max_angle=s["max_angle"], converged=s["converged"], status=s["status"],
                  unique=s["unique"], num_matvecs=s["num_matvecs"])
    if c.num_samples:
        t0 = time.perf_counter()
        # (the subspace at k: a non-finite one at k + 1, an optional diagnostic, leaves the
        # direct estimate in the subspace at k as valid as the closed form)
        if bool(s["sub"].finite):
            values["direct_mean"], values["direct_stderr"] = direct_mc_step(
                loss_fn, params, plan, k, U, k_mc)
        else:  # no subspace to sample in: NaN, a failed stage (its zeroed basis gave the
            # loss increment at the weights alone, a plausible number)
            values["direct_mean"], values["direct_stderr"] = np.full(
                (2, len(plan.dims), len(plan.sigmas)), np.nan)
        seconds["direct_mc"] = time.perf_counter() - t0
    if c.full_samples:
        t0 = time.perf_counter()
        values["full_mean"], values["full_stderr"] = full_mc_step(loss_fn, params, plan, k,
                                                                  k_full)
        seconds["full_mc"] = time.perf_counter() - t0
    # every value computed at this k is finite, the Monte Carlo estimates included (a NaN
    # there is a failure, not "not computed": curve_table's "-")
    estimates = ("delta1", "closed_form", "direct_mean", "direct_stderr", "full_mean",
                 "full_stderr")
    values["finite"] = s["finite"] and all(
        bool(np.all(np.isfinite(values[name]))) for name in estimates if name in values)
    if not values["finite"]:
        values["status"] = int(worst(values["status"], Status.NONFINITE))
    return values, seconds


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # optional dependency
        return iterable
    return tqdm(iterable, desc=desc)


def _assemble(plan: _Plan, points: list[dict], seconds: list[dict]) -> KCurve:
    """Stack the per-``k`` values into a `KCurve` (NaN where a stage did not run)."""
    K, nD, nS = len(plan.ks), len(plan.dims), len(plan.sigmas)
    shapes = dict(delta1=(), closed_form=(nD, nS), constant=(nD, nS), sigma2=(nD, nS),
                  sigma4=(nD, nS), spectral=(nD, nS), direct_mean=(nD, nS),
                  direct_stderr=(nD, nS), full_mean=(nS,), full_stderr=(nS,),
                  eigenvalues=(max(plan.dims),), eigenvalues_next=(max(plan.dims),),
                  max_angle=(nD,))
    out = {name: np.full((K,) + shape, np.nan) for name, shape in shapes.items()}
    for i, p in enumerate(points):
        for name in shapes:
            if name in p:
                out[name][i] = p[name]
    return KCurve(ks=np.asarray(plan.ks), dims=np.asarray(plan.dims), sigmas=plan.sigmas,
                  converged=np.array([p["converged"] for p in points], bool),
                  status=np.array([p["status"] for p in points], np.int32),
                  finite=np.array([p["finite"] for p in points], bool),
                  num_matvecs=np.array([p["num_matvecs"] for p in points], np.int32),
                  unique=np.array([p["unique"] for p in points], bool).reshape(K, nD),
                  timings={s: np.array([t[s] for t in seconds]) for s in STAGES}, **out)


# ---------------------------------------------------------------- driver


def _ritz_values(sub, plan, params):
    """The subspace's Ritz values for the coefficients' single-sample route, or ``None``
    where they are not exact Rayleigh quotients of the eigenvectors: a basis stored coarser
    than the parameters (``Eigsh(basis_dtype=jnp.bfloat16)``) holds ``U H U^T = diag(theta)``
    only to its rounding (0.4% on the sigma^4 coefficient), and the products are taken."""
    basis = plan.config.eigsh.basis_dtype
    if basis is not None and jnp.finfo(basis).eps > jnp.finfo(_tree.dtype(params)).eps:
        return None
    return sub.eigenvalues


def k_curve(
    loss_fn: Callable,
    params: PyTree | Callable[[int], PyTree],
    data: PyTree,
    ks: Sequence[int],
    *,
    dims: Sequence[int],
    sigmas,
    key: jax.Array,
    config: KCurveConfig | None = None,
    **options,
) -> KCurve:
    """Run every landscape criterion along a grid of sample counts ``k``.

    The inputs (``loss_fn`` a scalar mean loss, ``params``, every ``k``, the
    options) are checked once, here; the steps call the computations of the
    public functions they name without checking again.

    Per ``k`` (`curve_point`, a list of named steps):

    1. [`check_mean_loss`][curvlib.landscape.check_mean_loss] at the point;
    2. `subspace_step`: [`curvature_subspace`][curvlib.landscape.curvature_subspace] at ``k`` (and
       at ``k + 1`` when ``next_subspace``) and the principal angles between the
       nested subspaces;
    3. `coefficient_step`: [`increment_coefficients`][curvlib.landscape.increment_coefficients] once
      for ``Dmax``;
    4. `closed_form_step`: the closed form and its three terms for every
       ``(D, sigma)``, and the spectral corollary;
    5. when asked, `direct_mc_step` ([`delta2_direct_mc`][curvlib.landscape.delta2_direct_mc], one
       compiled program for all ``D``) and `full_mc_step`
       ([`delta2_full_mc`][curvlib.landscape.delta2_full_mc]).

    ``k`` is data in every compiled program, so the whole curve compiles each
    stage once, however many ``k`` it has. ``data`` is cut once to the first
    ``2^ceil(log2(max(ks) + 2))`` samples (so curves with nearby largest ``k``
    share programs); without ``microbatch_size`` each step evaluates all of
    them (unused ones at zero weight), with it only the chunks holding the
    samples that step needs.

    Args:
      loss_fn: ``loss_fn(params, batch)``, mean over the batch's leading axis.
      params: the point, or a function ``k -> params`` (e.g. checkpoints of a
        model trained online on the first ``k`` samples).
      data: ordered samples.
      ks: sample counts, each ``1 <= k < n``.
      dims: distinct nested subspace dimensions; ``max(dims) < N``.
      sigmas: probe scales (> 0).
      key: PRNG key (folded with ``k`` per step).
      config: a [`KCurveConfig`][curvlib.landscape.KCurveConfig]; default ``KCurveConfig()``.
      **options: any [`KCurveConfig`][curvlib.landscape.KCurveConfig] field (``num_samples``,
        ``full_samples``, ``antithetic``, ``microbatch_size``,
        ``sample_batch_size``, ``next_subspace``, ``flatten``, ``progress``,
        ``eigsh``), overriding ``config``. The former ``basis_size``, ``tol``
        and ``num_matvecs`` still work, with a warning (use
        ``eigsh=curvlib.Eigsh(basis_size=..., rtol=...)``).

    Returns:
      [`KCurve`][curvlib.landscape.KCurve]; [`curvlib.landscape.report`][curvlib.landscape.report]
      turns it into tables, JSON and plots.

    Raises:
      ValueError: for bad ``ks``, ``dims``, ``sigmas`` or options, before any
        computation; from [`check_mean_loss`][curvlib.landscape.check_mean_loss] for a loss that is
        not a mean.
      TypeError: for an unknown option.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.landscape import k_curve
      >>> loss = lambda w, b: 0.5 * jnp.mean((b[0] @ w - b[1]) ** 2)
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (12, 4))
      >>> data = (x, x @ jnp.arange(4.0))
      >>> curve = k_curve(loss, 0.1 * jnp.ones(4), data, [2, 4, 8], dims=[1, 2],
      ...                 sigmas=[1e-3, 1e-1], key=jax.random.PRNGKey(1), progress=False)
      >>> curve.closed_form.shape, bool(curve.converged.all())  # (k, D, sigma)
      ((3, 2, 2), True)
    """
    plan = plan_curve(data, ks, dims, sigmas, _config(config, options))
    _validate.prng_key(key)
    # the public boundary: checked once (on the data as given, so a message names the user's
    # shapes), the steps below do not check again
    if not callable(params):
        _common.check_subspace(max(plan.dims), params, plan.config.eigsh.basis_size, "max(dims)")
        _, loss_fn = _common.check_problem(loss_fn, params, data, plan.ks[0])
    # the largest k first: its samples hold every smaller k's, so a non-finite loss (a NaN
    # sample only the largest k uses) stops the curve before any work, not after the k's
    # below it (each k's draws are its own: fold_in(key, k), whatever the order)
    order = sorted(range(len(plan.ks)), key=lambda i: -plan.ks[i])
    points, seconds = [None] * len(plan.ks), [None] * len(plan.ks)
    for i in _progress(order, plan.config.progress, "k-curve"):
        k = plan.ks[i]
        p, fn = params, loss_fn
        if callable(params):  # a new point at every k
            p = params(k)
            _, fn = _common.check_problem(loss_fn, p, data, k)
            _common.check_subspace(max(plan.dims), p, plan.config.eigsh.basis_size,
                                   "max(dims)")
        points[i], seconds[i] = curve_point(fn, p, plan, k, key)
    return _assemble(plan, points, seconds)


# --------------------------------------------------------------- analysis


def fit_slope(ks, values) -> tuple[float, float]:
    """Least-squares fit ``log v = slope log k + intercept`` over finite, positive values.

    Points whose ``k`` or value is not finite and positive are left out. Returns
    ``(slope, intercept)``; ``(nan, nan)`` with usable points at fewer than two
    distinct ``k``.

    Raises:
      ValueError: if ``ks`` and ``values`` are not 1-D sequences of one length.

    Examples:
      >>> from curvlib.landscape import fit_slope
      >>> ks = [1, 10, 100]
      >>> round(fit_slope(ks, [1.0, 1e-2, 1e-4])[0], 6)
      -2.0
    """
    k = np.asarray(ks, float)
    v = np.asarray(values, float)
    if k.ndim != 1 or k.shape != v.shape:
        raise ValueError("`ks` and `values` must be 1-D sequences of one length; got shapes "
                         f"{k.shape} and {v.shape}.")
    ok = np.isfinite(v) & (v > 0) & np.isfinite(k) & (k > 0)
    if np.unique(k[ok]).size < 2:  # (two points at one k fix no slope)
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log(k[ok]), np.log(v[ok]), 1)
    return float(slope), float(intercept)


def check_curve(curve) -> KCurve:
    """``curve`` if it is a `KCurve`, else a ``TypeError`` naming it (the report functions
    read its fields: an int or a dict failed with an ``AttributeError``)."""
    if not isinstance(curve, KCurve):
        raise TypeError("`curve` must be a KCurve (what `k_curve` returns); got "
                        f"{type(curve).__name__}.")
    return curve


def sigma_index(curve: KCurve, sigma) -> int:
    """Index of the grid value nearest ``sigma`` (log scale); 0 for ``None``.

    Raises:
      ValueError: unless ``sigma`` is ``None`` or a finite number ``> 0``.
    """
    if sigma is None:
        return 0
    _validate.number(sigma, "sigma", minimum=0, exclusive=True, scalar=True)
    return int(np.argmin(np.abs(np.log(curve.sigmas) - np.log(float(sigma)))))


def curve_slopes(curve: KCurve, sigma=None) -> dict:
    """Fitted log-log slopes in ``k`` of every criterion at one ``sigma`` (nearest grid value).

    Keys: ``delta1``, ``delta2_full``, and ``delta2_D{d}_closed_form`` /
    ``delta2_D{d}_direct`` for each nested ``D``; NaN where a criterion was not
    computed.

    Examples:
      >>> import numpy as np
      >>> from curvlib.landscape import KCurve, curve_slopes
      >>> ks = np.array([1, 10, 100]); nan = np.full((3, 1, 1), np.nan)
      >>> c = KCurve(ks, np.array([1]), np.array([1e-3]), 1.0 / ks, 1e-2 / ks[:, None, None]**2,
      ...            nan, nan, nan, nan, nan, nan, np.full((3, 1), np.nan),
      ...            np.full((3, 1), np.nan), nan[..., 0], nan[..., 0], nan[..., 0],
      ...            np.ones(3, bool), {})
      >>> {k: round(v, 3) for k, v in curve_slopes(c).items() if np.isfinite(v)}
      {'delta1': -1.0, 'delta2_D1_closed_form': -2.0}
    """
    s = sigma_index(check_curve(curve), sigma)
    out = {"delta1": fit_slope(curve.ks, curve.delta1)[0],
           "delta2_full": fit_slope(curve.ks, curve.full_mean[:, s])[0]}
    for j, d in enumerate(curve.dims):
        out[f"delta2_D{d}_closed_form"] = fit_slope(curve.ks, curve.closed_form[:, j, s])[0]
        out[f"delta2_D{d}_direct"] = fit_slope(curve.ks, curve.direct_mean[:, j, s])[0]
    return out
