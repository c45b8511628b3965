"""The k-curve driver: every criterion as a function of the sample count ``k``.

For each ``k`` of a grid the driver builds the top-``Dmax`` subspace of
``H^(k)`` (and of ``H^(k+1)``, for the spectral corollary and the subspace
overlap), the coefficients ``(a, c, B)`` once, and evaluates on the whole
``sigma`` grid and nested ``D`` grid: ``Delta_1``, the closed form and its three
terms, the spectral corollary, optionally direct subspace Monte Carlo and the
full-space ``Delta_2``. The stabilisation theory predicts ``Delta_1 = O(1/k)``
and ``Delta_2 = O(1/k^2)`` (Kiselev & Grabovoy 2026).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from curvlib.landscape import _common
from curvlib.landscape.coefficients import check_mean_loss, increment_coefficients
from curvlib.landscape.estimators import (
    delta2_closed_form_terms,
    delta2_direct_mc,
    delta2_full_mc,
    delta2_spectral,
)
from curvlib.landscape.subspace import curvature_subspace, principal_angles

PyTree = Any


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
      spectral: ``(K, nD, nS)`` the corollary from the eigenvalues at k and k+1.
      direct_mean, direct_stderr: ``(K, nD, nS)`` direct subspace MC (NaN if not run).
      full_mean, full_stderr: ``(K, nS)`` full-space ``Delta_2`` (NaN if not run).
      eigenvalues: ``(K, Dmax)`` top eigenvalues of ``H^(k)``.
      eigenvalues_next: ``(K, Dmax)`` top eigenvalues of ``H^(k+1)`` (NaN if k+2 > n).
      max_angle: ``(K, nD)`` largest principal angle (radians) between the top-D
        eigenspaces of ``H^(k)`` and ``H^(k+1)`` (NaN if k+2 > n).
      converged: ``(K,)`` whether the eigensolver converged at k (and k+1).
      timings: stage -> ``(K,)`` seconds (``subspace``, ``coefficients``,
        ``closed_form``, ``direct_mc``, ``full_mc``), each including compilation.
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


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # optional dependency
        return iterable
    return tqdm(iterable, desc=desc)


def _block(x):
    return jax.block_until_ready(x)


def k_curve(
    loss_fn: Callable,
    params: PyTree | Callable[[int], PyTree],
    data: PyTree,
    ks: Sequence[int],
    *,
    dims: Sequence[int],
    sigmas,
    key: jax.Array,
    num_samples: int = 0,
    full_samples: int = 0,
    antithetic: bool = True,
    microbatch_size: int | None = None,
    sample_batch_size: int | None = None,
    num_matvecs: int | None = None,
    tol: float | None = None,
    next_subspace: bool = True,
    flatten: bool = False,
    progress: bool = True,
) -> KCurve:
    """Run every landscape criterion along a grid of sample counts ``k``.

    Per ``k``: :func:`curvature_subspace` at ``k`` (and at ``k + 1`` when
    ``next_subspace``), :func:`increment_coefficients` once, then the closed form
    and its terms for every ``(D, sigma)``, the spectral corollary, ``Delta_1``,
    and, when asked, :func:`delta2_direct_mc` (one compiled program for all
    ``D``) and :func:`delta2_full_mc`. Compilation happens once per distinct
    ``k`` (the slice ``data[:k]`` is static).

    Args:
      loss_fn: ``loss_fn(params, batch)``, mean over the batch's leading axis.
      params: the point, or a function ``k -> params`` (e.g. checkpoints of a
        model trained online on the first ``k`` samples).
      data: ordered samples.
      ks: increasing sample counts, each ``1 <= k < n``.
      dims: nested subspace dimensions; ``max(dims) < N``.
      sigmas: probe scales (> 0).
      key: PRNG key (folded with ``k`` per step).
      num_samples: direct subspace MC draws per ``(k, D, sigma)``; 0 skips it.
      full_samples: full-space MC draws per ``(k, sigma)``; 0 skips it.
      antithetic: antithetic MC pairs.
      microbatch_size: chunk size for losses, gradients and products over ``k`` samples.
      sample_batch_size: MC evaluations per vectorised chunk.
      num_matvecs: Lanczos basis size for the subspaces.
      tol: eigensolver tolerance.
      next_subspace: also build the subspace at ``k + 1`` (for the corollary and the
        principal angles); skipped automatically where ``k + 2 > n``.
      flatten: passed to :func:`curvature_subspace` (faster compiles for small models).
      progress: show a tqdm progress bar (if tqdm is installed).

    Returns:
      :class:`KCurve`.
    """
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("`ks` is empty.")
    n = _common.num_samples(data)
    for k in ks:
        _common.check_k(k, data)
    dims = [int(d) for d in dims]
    if not dims or min(dims) < 1:
        raise ValueError(f"`dims` must be positive ints; got {dims}.")
    Dmax = max(dims)
    sig = np.atleast_1d(np.asarray(_common.check_sigma(sigmas)))
    _common.check_key(key)
    get_params = params if callable(params) else (lambda k: params)
    K, nD, nS = len(ks), len(dims), len(sig)
    nan = lambda *s: np.full(s, np.nan)
    out = dict(
        delta1=nan(K), closed_form=nan(K, nD, nS), constant=nan(K, nD, nS),
        sigma2=nan(K, nD, nS), sigma4=nan(K, nD, nS), spectral=nan(K, nD, nS),
        direct_mean=nan(K, nD, nS), direct_stderr=nan(K, nD, nS),
        full_mean=nan(K, nS), full_stderr=nan(K, nS), eigenvalues=nan(K, Dmax),
        eigenvalues_next=nan(K, Dmax), max_angle=nan(K, nD),
    )
    converged = np.zeros(K, bool)
    stages = ("subspace", "coefficients", "closed_form", "direct_mc", "full_mc")
    timings = {s: np.zeros(K) for s in stages}

    for i in _progress(range(K), progress, "k-curve"):
        k = ks[i]
        p = get_params(k)
        _common.check_dim(Dmax, p, "max(dims)")
        kk = jax.random.fold_in(key, k)
        k_sub, k_next, k_mc, k_full = jax.random.split(kk, 4)
        check_mean_loss(loss_fn, p, data, k, microbatch_size=microbatch_size)

        t0 = time.perf_counter()
        sub = _block(curvature_subspace(loss_fn, p, data, k, Dmax, key=k_sub,
                                        microbatch_size=microbatch_size,
                                        num_matvecs=num_matvecs, tol=tol,
                                        flatten=flatten))
        conv = bool(sub.converged)
        out["eigenvalues"][i] = np.asarray(sub.eigenvalues)
        if next_subspace and k + 2 <= n:
            nxt = _block(curvature_subspace(loss_fn, p, data, k + 1, Dmax, key=k_next,
                                            microbatch_size=microbatch_size,
                                            num_matvecs=num_matvecs, tol=tol,
                                        flatten=flatten))
            conv = conv and bool(nxt.converged)
            out["eigenvalues_next"][i] = np.asarray(nxt.eigenvalues)
            for j, d in enumerate(dims):
                U = jax.tree.map(lambda x, d=d: x[:d], sub.eigenvectors)
                V = jax.tree.map(lambda x, d=d: x[:d], nxt.eigenvectors)
                out["max_angle"][i, j] = float(jnp.max(principal_angles(U, V)))
        converged[i] = conv
        timings["subspace"][i] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # Ritz values of H^(k) for these vectors: the D products with H^(k) are skipped
        coef = _block(increment_coefficients(loss_fn, p, data, k, sub.eigenvectors,
                                              microbatch_size=microbatch_size,
                                              check_mean=False, eigenvalues=sub.eigenvalues))
        timings["coefficients"][i] = time.perf_counter() - t0
        out["delta1"][i] = abs(float(coef.a))

        t0 = time.perf_counter()
        for j, d in enumerate(dims):
            cf = coef.prefix(d)
            t = _block(delta2_closed_form_terms(cf.a, cf.c, cf.B, sig))
            out["constant"][i, j], out["sigma2"][i, j], out["sigma4"][i, j] = map(np.asarray, t)
            out["closed_form"][i, j] = np.asarray(t.constant + t.sigma2 + t.sigma4)
            if not np.isnan(out["eigenvalues_next"][i, 0]):
                out["spectral"][i, j] = np.asarray(delta2_spectral(
                    out["eigenvalues"][i, :d], out["eigenvalues_next"][i, :d], sig))
        timings["closed_form"][i] = time.perf_counter() - t0

        if num_samples:
            t0 = time.perf_counter()
            for j, d in enumerate(dims):
                est = _block(delta2_direct_mc(
                    loss_fn, p, data, k, sub.eigenvectors, sig, key=k_mc,
                    num_samples=num_samples, dim=d, antithetic=antithetic,
                    microbatch_size=microbatch_size, sample_batch_size=sample_batch_size,
                    check_mean=False))
                out["direct_mean"][i, j] = np.asarray(est.mean)
                out["direct_stderr"][i, j] = np.asarray(est.stderr)
            timings["direct_mc"][i] = time.perf_counter() - t0
        if full_samples:
            t0 = time.perf_counter()
            est = _block(delta2_full_mc(
                loss_fn, p, data, k, sig, key=k_full, num_samples=full_samples,
                antithetic=antithetic, microbatch_size=microbatch_size,
                sample_batch_size=sample_batch_size, check_mean=False))
            out["full_mean"][i] = np.asarray(est.mean)
            out["full_stderr"][i] = np.asarray(est.stderr)
            timings["full_mc"][i] = time.perf_counter() - t0

    return KCurve(ks=np.asarray(ks), dims=np.asarray(dims), sigmas=sig, converged=converged,
                  timings=timings, **out)


# --------------------------------------------------------------- reporting


def fit_slope(ks, values) -> tuple[float, float]:
    """Least-squares fit ``log v = slope log k + intercept`` over finite, positive values.

    Returns ``(slope, intercept)``; ``(nan, nan)`` with fewer than two usable points.

    Examples:
      >>> ks = [1, 10, 100]
      >>> round(fit_slope(ks, [1.0, 1e-2, 1e-4])[0], 6)
      -2.0
    """
    k = np.asarray(ks, float)
    v = np.asarray(values, float)
    ok = np.isfinite(v) & (v > 0) & (k > 0)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log(k[ok]), np.log(v[ok]), 1)
    return float(slope), float(intercept)


def _sigma_index(curve: KCurve, sigma) -> int:
    if sigma is None:
        return 0
    return int(np.argmin(np.abs(np.log(curve.sigmas) - np.log(float(sigma)))))


def curve_slopes(curve: KCurve, sigma=None) -> dict:
    """Fitted log-log slopes in ``k`` of every criterion at one ``sigma`` (nearest grid value)."""
    s = _sigma_index(curve, sigma)
    out = {"delta1": fit_slope(curve.ks, curve.delta1)[0],
           "delta2_full": fit_slope(curve.ks, curve.full_mean[:, s])[0]}
    for j, d in enumerate(curve.dims):
        out[f"delta2_D{d}_closed_form"] = fit_slope(curve.ks, curve.closed_form[:, j, s])[0]
        out[f"delta2_D{d}_direct"] = fit_slope(curve.ks, curve.direct_mean[:, j, s])[0]
    return out


def curve_to_dict(curve: KCurve) -> dict:
    """A JSON-serialisable dict of every field (NaN becomes ``None``)."""
    def conv(x):
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        a = np.asarray(x)
        if a.dtype == bool:
            return a.tolist()
        a = a.astype(float)
        return np.where(np.isfinite(a), a, np.nan).tolist() if a.ndim else float(a)

    d = {f: conv(getattr(curve, f)) for f in curve._fields}
    d = json.loads(json.dumps(d).replace("NaN", "null"))
    d["slopes"] = {
        f"sigma={s:.3g}": {k: (None if not np.isfinite(v) else v)
                           for k, v in curve_slopes(curve, s).items()}
        for s in curve.sigmas
    }
    return d


def save_curve_json(curve: KCurve, path) -> None:
    """Write :func:`curve_to_dict` to ``path``."""
    with open(path, "w") as f:
        json.dump(curve_to_dict(curve), f, indent=1)


def curve_table(curve: KCurve, sigma=None) -> str:
    """A plain-text table of every criterion along ``k`` at one ``sigma``."""
    s = _sigma_index(curve, sigma)
    cols = ["k", "Delta1", "Delta2(full)"]
    for d in curve.dims:
        cols += [f"GM D={d}", f"MC D={d}"]
    cols += [f"angle D={d}" for d in curve.dims]
    lines = [f"sigma = {curve.sigmas[s]:.3g}", "  ".join(f"{c:>12}" for c in cols)]
    for i, k in enumerate(curve.ks):
        row = [f"{k:>12d}", f"{curve.delta1[i]:12.4e}", f"{curve.full_mean[i, s]:12.4e}"]
        for j in range(len(curve.dims)):
            row += [f"{curve.closed_form[i, j, s]:12.4e}", f"{curve.direct_mean[i, j, s]:12.4e}"]
        row += [f"{curve.max_angle[i, j]:12.4f}" for j in range(len(curve.dims))]
        lines.append("  ".join(row))
    slopes = curve_slopes(curve, curve.sigmas[s])
    lines.append("slopes: " + ", ".join(f"{k} {v:+.2f}" for k, v in slopes.items()
                                        if np.isfinite(v)))
    return "\n".join(lines)


def plot_curve(curve: KCurve, sigma=None, path=None, ax=None):
    """Log-log plot of the criteria along ``k`` with ``k^-1`` and ``k^-2`` references.

    Plots ``Delta_1^2`` (squared, to share the axis with the mean-squared
    criteria; its fitted slope is reported for ``Delta_1`` itself),
    full-space ``Delta_2``, and ``Delta_2^(D)`` (closed form; direct MC as
    markers) for each ``D``; legends carry the fitted slopes. Needs matplotlib.

    Returns:
      The matplotlib figure.
    """
    import matplotlib

    if path is not None and ax is None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    s = _sigma_index(curve, sigma)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
    else:
        fig = ax.figure
    ks = curve.ks.astype(float)
    sl = lambda v: fit_slope(ks, v)[0]
    ax.loglog(ks, curve.delta1**2, "k-o", ms=3,
              label=f"Delta1^2 (Delta1 slope {sl(curve.delta1):+.2f})")
    if np.isfinite(curve.full_mean[:, s]).any():
        ax.loglog(ks, curve.full_mean[:, s], "C0-s", ms=3,
                  label=f"Delta2 full (slope {sl(curve.full_mean[:, s]):+.2f})")
    for j, d in enumerate(curve.dims):
        ax.loglog(ks, curve.closed_form[:, j, s], f"C{j + 1}-", lw=1.5,
                  label=f"Delta2(D={d}) GM (slope {sl(curve.closed_form[:, j, s]):+.2f})")
        if np.isfinite(curve.direct_mean[:, j, s]).any():
            ax.loglog(ks, curve.direct_mean[:, j, s], f"C{j + 1}x", ms=5)
    ref = np.nanmax(curve.delta1**2) if np.isfinite(curve.delta1).any() else 1.0
    ax.loglog(ks, ref * (ks / ks[0]) ** -1.0, "k:", lw=1, label="k^-1")
    ax.loglog(ks, ref * (ks / ks[0]) ** -2.0, "k--", lw=1, label="k^-2")
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("criterion")
    ax.set_title(f"Stabilisation of the loss landscape, sigma = {curve.sigmas[s]:.2g}")
    ax.legend(fontsize=7)
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return fig
