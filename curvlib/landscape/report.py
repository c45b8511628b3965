"""Reports of a [`KCurve`][curvlib.landscape.KCurve]: text tables, JSON and a log-log plot.

Nothing here computes a criterion: the functions read a finished curve
([`curvlib.landscape.k_curve`][curvlib.landscape.k_curve]). Plotting needs matplotlib (the ``demo``
extra) and never changes its backend.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np

from curvlib.landscape.curve import KCurve, check_curve, curve_slopes, fit_slope, sigma_index


def curve_to_dict(curve: KCurve) -> dict:
    """A JSON-serialisable dict of every field, plus the fitted slopes.

    Non-finite numbers (NaN, and infinities, which strict JSON cannot hold either) become
    ``None``; integer fields (``ks``, ``dims``, ``status``, ``num_matvecs``) stay ints and
    booleans stay booleans, so a curve read back from JSON has its original types.

    Args:
      curve: a [`KCurve`][curvlib.landscape.KCurve] from [`k_curve`][curvlib.landscape.k_curve].

    Returns:
      The dict (lists of numbers and ``None``).

    Examples:
      >>> import numpy as np
      >>> from curvlib.landscape import KCurve, curve_to_dict
      >>> nan = np.full((2, 1, 1), np.nan)
      >>> c = KCurve(np.array([2, 4]), np.array([1]), np.array([1e-3]), np.array([0.5, 0.25]),
      ...            nan, nan, nan, nan, nan, nan, nan, np.full((2, 1), np.nan),
      ...            np.full((2, 1), np.nan), nan[..., 0], nan[..., 0], nan[..., 0],
      ...            np.ones(2, bool), {"subspace": np.array([1.0, 0.5])})
      >>> d = curve_to_dict(c)
      >>> d["ks"], d["delta1"], d["full_mean"], d["timings"]["subspace"]
      ([2, 4], [0.5, 0.25], [[None], [None]], [1.0, 0.5])
      >>> round(d["slopes"]["sigma=0.001"]["delta1"], 6)
      -1.0
    """
    check_curve(curve)

    def conv(x):
        if x is None:
            return None
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if x is None:
            return None
        a = np.asarray(x)
        if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
            return a.tolist()  # (counts stay ints: `ks`, `dims`, `num_matvecs`)
        a = a.astype(float)
        if not a.ndim:
            return float(a) if np.isfinite(a) else None
        return np.where(np.isfinite(a), a, None).tolist()

    d = {f: conv(getattr(curve, f)) for f in curve._fields}
    if curve.status is not None:  # Status codes stay ints
        d["status"] = np.asarray(curve.status).tolist()
    d["slopes"] = {
        name: {k: (float(v) if np.isfinite(v) else None)
               for k, v in curve_slopes(curve, s).items()}
        for name, s in zip(_sigma_keys(curve.sigmas), curve.sigmas, strict=True)
    }
    return d


def _sigma_keys(sigmas) -> list[str]:
    """``"sigma=<s>"`` names: three significant digits, more where two would collide."""
    for digits in range(3, 18):
        names = [f"sigma={float(s):.{digits}g}" for s in sigmas]
        if len(set(names)) == len(names):
            return names
    return [f"sigma={float(s)!r}#{i}" for i, s in enumerate(sigmas)]  # equal values


def save_curve_json(curve: KCurve, path) -> None:
    """Write [`curve_to_dict`][curvlib.landscape.curve_to_dict] to ``path`` (strict JSON).

    No ``NaN`` or ``Infinity`` literals: a non-finite number becomes ``null``.

    Args:
      curve: a [`KCurve`][curvlib.landscape.KCurve] from [`k_curve`][curvlib.landscape.k_curve].
      path: the JSON file to write.

    Examples:
      >>> import json, os, tempfile
      >>> import numpy as np
      >>> from curvlib.landscape import KCurve, save_curve_json
      >>> nan = np.full((1, 1, 1), np.nan)
      >>> c = KCurve(np.array([2]), np.array([1]), np.array([1e-3]), np.array([0.5]),
      ...            nan, nan, nan, nan, nan, nan, nan, np.full((1, 1), np.nan),
      ...            np.full((1, 1), np.nan), nan[..., 0], nan[..., 0], nan[..., 0],
      ...            np.ones(1, bool), {})
      >>> path = os.path.join(tempfile.mkdtemp(), "curve.json")
      >>> save_curve_json(c, path)
      >>> json.load(open(path))["delta1"]
      [0.5]
    """
    with open(path, "w") as f:
        json.dump(curve_to_dict(curve), f, indent=1, allow_nan=False)


def _fmt(v, spec="10.3e", ran=False):
    """``v`` in ``spec``; a non-finite value as ``nan``/``inf`` if its stage ran, else ``-``."""
    width = int(spec.split(".")[0])
    if np.isfinite(v):
        return f"{v:{spec}}"
    return f"{str(float(v)) if ran else '-':>{width}}"


def _ran(curve: KCurve, stage: str, i: int) -> bool:
    """Whether ``stage`` ran at the ``i``-th ``k`` (its timing; a hand-built curve has none)."""
    t = (curve.timings or {}).get(stage)
    return t is not None and bool(np.asarray(t)[i] > 0)


def curve_table(curve: KCurve, sigma=None) -> str:
    """Plain-text tables of the criteria and the subspace overlap along ``k`` at one ``sigma``.

    The first table has ``Delta_1``, full-space ``Delta_2`` and, per nested
    ``D``, the closed form (GM) and direct Monte Carlo (MC, when run); the
    second the top eigenvalue of ``H^(k)`` and the largest principal angle
    (degrees) between the top-``D`` eigenspaces at ``k`` and ``k + 1``; then
    the fitted slopes. Ten characters per number: three nested ``D`` fit in
    100 columns. ``-`` marks a value that was not computed; ``nan`` or ``inf`` one
    that was computed and is not finite (the point's ``finite`` is then ``False``).

    Args:
      curve: a [`KCurve`][curvlib.landscape.KCurve] from [`k_curve`][curvlib.landscape.k_curve].
      sigma: the ``sigma`` to show (the nearest grid value); ``None``: the first grid value.

    Returns:
      The tables as one string.

    Examples:
      >>> import numpy as np
      >>> from curvlib.landscape import KCurve, curve_table
      >>> nan = np.full((2, 1, 1), np.nan)
      >>> c = KCurve(np.array([2, 4]), np.array([1]), np.array([1e-3]), np.array([0.5, 0.25]),
      ...            np.array([0.25, 0.0625]).reshape(2, 1, 1), nan, nan, nan, nan, nan, nan,
      ...            np.full((2, 1), np.nan), np.full((2, 1), np.nan), np.ones((2, 1)),
      ...            nan[..., 0], np.full((2, 1), 0.1), np.ones(2, bool), {})
      >>> print(curve_table(c))  # doctest: +NORMALIZE_WHITESPACE
      sigma = 0.001
           k     Delta1  Delta2full     GM D=1     MC D=1
           2  5.000e-01          -   2.500e-01          -
           4  2.500e-01          -   6.250e-02          -
           k   lambda_1  angle D=1
           2  1.000e+00       5.73
           4  1.000e+00       5.73
      slopes: delta1 -1.00, delta2_D1_closed_form -2.00
    """
    s = sigma_index(check_curve(curve), sigma)
    dims = list(curve.dims)
    head = [f"{'k':>6}", f"{'Delta1':>10}", f"{'Delta2full':>10}"]
    for d in dims:
        head += [f"{'GM D=' + str(d):>10}", f"{'MC D=' + str(d):>10}"]
    lines = [f"sigma = {curve.sigmas[s]:.3g}", " ".join(head)]
    for i, k in enumerate(curve.ks):
        row = [f"{int(k):>6d}", _fmt(curve.delta1[i], ran=_ran(curve, "coefficients", i)),
               _fmt(curve.full_mean[i, s], ran=_ran(curve, "full_mc", i))]
        for j in range(len(dims)):
            row += [_fmt(curve.closed_form[i, j, s], ran=_ran(curve, "closed_form", i)),
                    _fmt(curve.direct_mean[i, j, s], ran=_ran(curve, "direct_mc", i))]
        lines.append(" ".join(row))
    lines.append(" ".join([f"{'k':>6}", f"{'lambda_1':>10}"]
                          + [f"{'angle D=' + str(d):>10}" for d in dims]))
    for i, k in enumerate(curve.ks):
        lines.append(" ".join([f"{int(k):>6d}", _fmt(curve.eigenvalues[i, 0],
                                                ran=_ran(curve, "subspace", i))]
                              + [_fmt(np.degrees(curve.max_angle[i, j]), "10.2f")
                                 for j in range(len(dims))]))
    slopes = curve_slopes(curve, curve.sigmas[s])
    text = "slopes: " + ", ".join(f"{k} {v:+.2f}" for k, v in slopes.items() if np.isfinite(v))
    lines += textwrap.wrap(text, 100, subsequent_indent="  ")
    return "\n".join(lines)


def plot_curve(curve: KCurve, sigma=None, path=None, ax=None):
    """Log-log plot of the criteria along ``k`` with ``k^-1`` and ``k^-2`` references.

    Plots ``Delta_1^2`` (squared, to share the axis with the mean-squared
    criteria; its fitted slope is reported for ``Delta_1`` itself),
    full-space ``Delta_2``, and ``Delta_2^(D)`` (closed form; direct MC as
    markers, with ``2 x`` standard-error bars) for each ``D``, joined in increasing
    ``k`` whatever the order of ``curve.ks``; legends carry the fitted slopes. The
    references start from the largest plotted value at the smallest ``k``. Needs
    matplotlib.

    Args:
      curve: a [`KCurve`][curvlib.landscape.KCurve].
      sigma: the probe scale to show (nearest grid value; default the first).
      path: save the figure there (PNG, PDF, ... by extension).
      ax: draw into this matplotlib axes. Without ``ax`` and ``path`` a new
        ``pyplot`` figure is made (shown by notebooks); with ``path`` only, a
        standalone ``Figure`` that is not registered with ``pyplot``.

    Returns:
      The matplotlib figure.

    Raises:
      ValueError: for a curve with no points (empty ``ks``).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from curvlib.landscape import KCurve, plot_curve
      >>> ks = np.array([2, 4, 8]); nan = np.full((3, 1, 1), np.nan)
      >>> c = KCurve(ks, np.array([1]), np.array([1e-3]), 1.0 / ks, 0.1 / ks[:, None, None]**2,
      ...            nan, nan, nan, nan, nan, nan, np.full((3, 1), np.nan),
      ...            np.full((3, 1), np.nan), nan[..., 0], nan[..., 0], nan[..., 0],
      ...            np.ones(3, bool), {})
      >>> path = os.path.join(tempfile.mkdtemp(), "curve.png")
      >>> fig = plot_curve(c, path=path)
      >>> os.path.getsize(path) > 0
      True
    """
    s = sigma_index(curve, sigma)
    if np.size(curve.ks) == 0:
        raise ValueError("`curve` must have at least one k to plot; got a curve with no points "
                         "(`ks` is empty).")
    if ax is not None:
        fig = ax.figure
    elif path is not None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.6))
        ax = fig.subplots()
    else:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.6))
    # lines join the points in increasing k (a curve's `ks` are in the order they were asked)
    order = np.argsort(np.asarray(curve.ks, float), kind="stable")
    curve = curve._replace(**{f: np.asarray(getattr(curve, f))[order] for f in (
        "ks", "delta1", "full_mean", "closed_form", "direct_mean", "direct_stderr")})
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
            ax.errorbar(ks, curve.direct_mean[:, j, s], yerr=2 * curve.direct_stderr[:, j, s],
                        fmt=f"C{j + 1}x", ms=5, lw=0.8)
    # the references start at the largest plotted value (of Delta_1^2 if it has one: at an
    # interpolating point every Delta_1 is 0, which a log axis does not show)
    ref = 1.0
    for v in (curve.delta1**2, np.concatenate([curve.full_mean[:, s],
                                                np.ravel(curve.closed_form[:, :, s])])):
        v = v[np.isfinite(v) & (v > 0)]
        if v.size:
            ref = float(np.max(v))
            break
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
