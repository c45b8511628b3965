"""Console summaries and figures of the demos (no computation here).

The console summary of the transformer probe fits 100 columns: one table per
subspace dimension ``D``; every number (quadratic Monte Carlo, the closed
form's terms, standard errors, compile times) is in the JSON report. Figures
are drawn on standalone matplotlib ``Figure`` objects: no backend is selected
or changed.
"""

from __future__ import annotations

import json
import os

import numpy as np

WIDTH = 100


def wrapped(log):
    """``log`` with lines longer than `WIDTH` wrapped (shorter lines pass unchanged)."""
    import textwrap

    def out(text: str = "") -> None:
        for line in str(text).split("\n"):
            if len(line) <= WIDTH:
                log(line)
            else:
                for part in textwrap.wrap(line, WIDTH, subsequent_indent="  "):
                    log(part)

    return out


def machine_info() -> dict:
    """Where the report's numbers and timings come from: versions, platform, JAX devices."""
    import platform
    import sys
    from importlib import metadata

    import jax

    import curvlib

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    versions = {m: version(m) for m in ("jax", "jaxlib", "numpy", "flax", "optax")}
    return dict(python=sys.version.split()[0], platform=platform.platform(),
                processor=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
                jax_backend=jax.default_backend(), jax_devices=[str(d) for d in jax.devices()],
                versions=dict(curvlib=curvlib.__version__, **versions))


def _strict(x):
    """``x`` with every non-finite float as ``None`` (JSON has no NaN or infinity)."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def write_json(report: dict, path) -> None:
    """``report`` as strict JSON in ``path``, written whole or not at all.

    NaN and infinities become ``null`` (as `curvlib.landscape.save_curve_json` writes
    them; ``NaN`` is not JSON and strict readers refuse it). The text goes to a
    temporary file that replaces ``path`` once complete: an interrupted run (Ctrl-C)
    leaves the previous file, or none, never a truncated one.
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(_strict(report), f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


# ------------------------------------------------------------ the probe


def probe_table(r: dict) -> list[str]:
    """The per-``D`` tables of the probe report (each line at most `WIDTH` columns)."""
    sig = np.asarray(r["sigmas"])
    full = r["delta2_full"]["mean"]
    lines = []
    head = (f"{'sigma':>9} {'Delta2 full':>11} {'GM':>11} {'direct MC':>11} {'+-':>9} "
            f"{'GM/full':>8} {'|MC-GM|/GM':>10} {'model err':>9}")
    for d in r["dims"]:
        d = str(d)
        lines.append(f"D = {d}")
        lines.append(head)
        for i, s in enumerate(sig):
            lines.append(
                f"{s:9.2e} {full[i]:11.4e} {r['closed_form'][d][i]:11.4e} "
                f"{r['direct_mc'][d]['mean'][i]:11.4e} {r['direct_mc'][d]['stderr'][i]:9.2e} "
                f"{r['ratio_to_full'][d][i]:8.3f} "
                f"{r['direct_vs_closed_form_rel_error'][d][i]:10.1e} "
                f"{r['model_error_same_draws'][d][i]:9.1e}")
    return lines


def _times(ratio) -> str:
    """A speed-up as the reader says it: ``2.5x faster``, or ``1.49x slower`` below 1."""
    if not ratio > 0:  # (NaN, 0: nothing measured)
        return f"{ratio:.3g}x"
    return f"{ratio:.3g}x faster" if ratio >= 1 else f"{1 / ratio:.3g}x slower"


def headline(r: dict) -> str:
    """The speed-up of the closed-form route over the direct-MC route, every stage counted.

    Examples:
      >>> _times(4.92), _times(0.673)
      ('4.92x faster', '1.49x slower')
    """
    t, rs = r["timings"], r["route_seconds"]
    return (
        f"Delta2(D) for all D and sigma: closed form {rs['closed_form']:.2f} s (subspace "
        f"{t['subspace']:.2f} + coefficients {t['coefficients']:.2f} + GM "
        f"{t['closed_form']:.1e}) vs direct MC {rs['direct_mc']:.2f} s (subspace + MC "
        f"{t['direct_mc']:.2f}): {_times(r['speedup_end_to_end'])} end to end "
        f"({_times(r['speedup_end_to_end_with_compile'])} with compilation); the evaluation "
        f"stage alone {_times(r['speedup_closed_form_vs_direct'])}"
    )


def _wrap(text: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, WIDTH)


def print_probe_report(r: dict, log=print) -> None:
    """Print the probe's summary (numbers in full in the JSON report)."""
    lines = [""]
    lines += _wrap(
        f"k = {r['k']}: Delta1 = |L_(k+1) - L_k| = {r['delta1']:.4e} (Delta1^2 = "
        f"{r['delta1_squared']:.4e}); ||c|| = {r['coefficients']['c_norm']:.3e}, "
        f"tr B = {r['coefficients']['trace_B']:.3e}")
    lines += _wrap("top eigenvalues of H^(k) (signed): "
                   + " ".join(f"{v:.3g}" for v in r["eigenvalues"][:8]))
    lines += probe_table(r)
    lines += _wrap(
        "GM: Gaussian-moment closed form; +-: direct MC standard error; |MC-GM|/GM includes "
        "Monte Carlo noise; model err = |direct - quadratic MC| / GM on the same draws (the "
        "quadratic model's own error). Quadratic MC, the closed form's sigma-terms and "
        "compile times are in the JSON report.")
    t = r["timings"]
    lines += _wrap(
        "stage run times (s): subspace {:.2f}, coefficients {:.2f}, closed form {:.1e}, "
        "quadratic MC {:.1e}, direct MC {:.2f}, full-space MC {:.2f}; compilation {:.1f} s in "
        "all".format(t["subspace"], t["coefficients"], t["closed_form"], t["quadratic_mc"],
                     t["direct_mc"], t["full_mc"],
                     sum(v for k, v in t.items() if k.endswith("_compile"))))
    lines += _wrap(headline(r))
    for line in lines:
        log(line)


def plot_probe_report(r: dict, path) -> None:
    """Four panels: ratio to full-space, model validity, sigma-terms, stage times."""
    sig = np.asarray(r["sigmas"])
    dims = [str(d) for d in r["dims"]]
    fig = _figure(figsize=(11, 8))
    axes = fig.subplots(2, 2)
    ax = axes[0, 0]
    for j, d in enumerate(dims):
        ax.semilogx(sig, r["ratio_to_full"][d], f"C{j}-o", ms=3, label=f"GM D={d}")
        ax.semilogx(sig, r["ratio_direct_to_full"][d], f"C{j}x", ms=5)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhspan(0.8, 1.1, color="0.9", zorder=0, label="paper's 0.8-1.1 band")
    ax.set_yscale("log")
    ax.set(xlabel="sigma", ylabel="Delta2(D) / Delta2(full)",
           title="curvature-aligned vs full-space (x: direct MC)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for j, d in enumerate(dims):
        e = np.maximum(np.asarray(r["direct_vs_closed_form_rel_error"][d]), 1e-12)
        ax.loglog(sig, e, f"C{j}-o", ms=3, label=f"|direct - GM| / GM, D={d}")
        ax.loglog(sig, np.asarray(r["direct_rel_stderr"][d]), f"C{j}:", lw=1)
        ax.loglog(sig, np.maximum(np.asarray(r["model_error_same_draws"][d]), 1e-12),
                  f"C{j}--", lw=1)
    ax.axhline(1e-2, color="0.5", lw=0.8, ls="-.", label="1%")
    ax.set(xlabel="sigma", ylabel="relative error", title="validity of the quadratic model")
    ax.plot([], [], "k:", lw=1, label="MC standard error / GM")
    ax.plot([], [], "k--", lw=1, label="|direct - quad MC| / GM (same draws)")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    dl = dims[-1]
    t = r["terms"][dl]
    ax.loglog(sig, t["constant"], "k-", label="a^2 (= Delta1^2)")
    ax.loglog(sig, np.abs(t["sigma2"]), "C0-o", ms=3, label="|sigma^2 (a tr B + ||c||^2)|")
    ax.loglog(sig, t["sigma4"], "C1-o", ms=3, label="sigma^4 (2 tr B^2 + tr^2 B)/4")
    ax.loglog(sig, r["closed_form"][dl], "C3--", label="GM total")
    ax.set(xlabel="sigma", ylabel="term", title=f"sigma-decomposition of GM, D={dl}")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    tm = r["timings"]
    names = ["subspace", "coefficients", "direct_mc", "full_mc", "quadratic_mc", "closed_form"]
    ax.barh(names, [tm[n] for n in names], color=[f"C{i}" for i in range(len(names))],
            label="run")
    ax.barh(names, [tm[n + "_compile"] for n in names], left=[tm[n] for n in names],
            color="0.8", label="compile")
    ax.set_xscale("log")
    runs = [tm[n] for n in names if tm[n] > 0]
    if runs:  # a sub-millisecond stage (the closed form) stays visible on the log axis
        ax.set_xlim(left=0.3 * min(runs))
    ax.legend(fontsize=8)
    ax.set(xlabel="seconds", title=f"stages: GM route {_times(r['speedup_end_to_end'])} "
           "than direct MC,\nevery stage counted")
    fig.suptitle(f"Delta2(D) probe of a {r['model']['parameters']:,}-parameter transformer, "
                 f"k = {r['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------- spectrum


def plot_spectrum(grid, density, eigenvalues, top_k: int, path) -> None:
    """SLQ spectral density with eigsh's top eigenvalues marked."""
    fig = _figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    ax.semilogy(np.asarray(grid), np.maximum(np.asarray(density), 1e-8), "C0-",
                label="spectral density (SLQ)")
    for v in eigenvalues:
        ax.axvline(v, color="C3", lw=0.8, alpha=0.7)
    ax.set(xlabel="eigenvalue", ylabel="density",
           title=f"Hessian of an MLP on digits (red: top-{top_k} by eigsh)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
