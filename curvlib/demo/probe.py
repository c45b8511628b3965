"""The transformer probe: Delta_1, Delta_2 and Delta_2(D) of a trained character LM.

One run = train a small decoder-only transformer on the Python documentation,
then at ``k`` ordered sequences measure, over a sigma grid and nested D:

* ``Delta_1`` and the full-space ``Delta_2`` (direct Monte Carlo),
* ``Delta_2^(D)`` by the Gaussian-moment closed form (GM), quadratic Monte Carlo
  and direct subspace Monte Carlo, with the closed form's three sigma-terms,
* the ratio ``Delta_2^(D) / Delta_2`` and the direct-vs-GM relative error (the
  validity of the local quadratic model),
* the time of each stage and the closed form's speed-up over direct Monte Carlo,
* the overlap (principal angles) of the top-D eigenspaces at ``k`` and ``k + 1``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvlib import _tree
from curvlib import landscape as ls
from curvlib.demo import data as _data
from curvlib.demo import models as _models


@dataclasses.dataclass
class ProbeConfig:
    """Options of the transformer probe (the CLI's flags)."""

    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 64
    train_steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    k: int = 8
    dims: tuple = (1, 4, 16)
    sigma_min: float = 1e-5
    sigma_max: float = 1e-1
    num_sigmas: int = 9
    num_samples: int = 32
    full_samples: int = 32
    num_matvecs: int = 48
    eig_tol: float = 1e-3
    sample_batch_size: int = 64
    microbatch_size: int | None = None
    timing_repeats: int = 3
    next_subspace: bool = True
    seed: int = 0
    out: str = "demo_output"
    plot: bool = True
    max_chars: int | None = None

    @property
    def sigmas(self) -> np.ndarray:
        return np.logspace(np.log10(self.sigma_min), np.log10(self.sigma_max), self.num_sigmas)


def _timed(fn, repeats=1):
    """``(result, first_call_seconds, best_repeat_seconds)``: compile+run, then run only."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = first
    for _ in range(max(0, repeats)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return out, first, best


def train_transformer(cfg: ProbeConfig, log=print):
    """Train the demo transformer; returns ``(model, params, loss_fn, corpus, info)``."""
    corpus = _data.load_corpus(max_chars=cfg.max_chars)
    tcfg = _models.TransformerConfig(vocab_size=corpus.vocab_size, seq_len=cfg.seq_len,
                                     d_model=cfg.d_model, num_layers=cfg.num_layers,
                                     num_heads=cfg.num_heads)
    key = jax.random.PRNGKey(cfg.seed)
    k_init, k_train = jax.random.split(key)
    model, params = _models.init_transformer(tcfg, k_init)
    loss_fn = _models.lm_loss_fn(model)
    toks = jnp.asarray(corpus.train)
    span = cfg.seq_len + 1

    def sample_batch(k):
        starts = jax.random.randint(k, (cfg.batch_size,), 0, toks.shape[0] - span)
        return jax.vmap(lambda s: jax.lax.dynamic_slice(toks, (s,), (span,)))(starts)

    t0 = time.perf_counter()
    params, losses = _models.train(loss_fn, params, sample_batch, key=k_train,
                                   num_steps=cfg.train_steps, learning_rate=cfg.learning_rate)
    losses = np.asarray(jax.block_until_ready(losses))
    t_train = time.perf_counter() - t0
    held = jnp.asarray(_data.sequence_samples(corpus.held_out, 64, cfg.seq_len, cfg.seed + 1))
    held_loss = float(loss_fn(params, held))
    n_params = _tree.size(params)
    log(f"model: decoder-only transformer, {cfg.num_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.num_heads} heads, {n_params:,} parameters; corpus {len(corpus.train):,} "
        "training characters (Python docs, pydoc_data)")
    log(f"trained {cfg.train_steps} steps in {t_train:.1f} s: loss {losses[0]:.3f} -> "
        f"{losses[-20:].mean():.3f} (held-out {held_loss:.3f} nats/char)")
    info = dict(parameters=n_params, train_seconds=t_train, first_loss=float(losses[0]),
                final_loss=float(losses[-20:].mean()), held_out_loss=held_loss,
                corpus_chars=int(len(corpus.train)), vocab_size=corpus.vocab_size)
    return model, params, loss_fn, corpus, info


def run_probe(cfg: ProbeConfig, log=print) -> dict[str, Any]:
    """Run the whole probe; returns the report (also written as JSON and PNG under ``cfg.out``)."""
    t_start = time.perf_counter()
    dims = tuple(int(d) for d in cfg.dims)
    Dmax = max(dims)
    sig = cfg.sigmas
    model, params, loss_fn, corpus, train_info = train_transformer(cfg, log)
    n_needed = cfg.k + 2
    data = jnp.asarray(_data.sequence_samples(corpus.train, n_needed, cfg.seq_len, cfg.seed))
    key = jax.random.PRNGKey(cfg.seed + 17)
    k_sub, k_next, k_q, k_mc, k_full = jax.random.split(key, 5)
    k = cfg.k
    mb = cfg.microbatch_size
    report: dict[str, Any] = dict(config=dataclasses.asdict(cfg), sigmas=sig.tolist(),
                                  dims=list(dims), k=k, model=train_info)
    report["config"]["dims"] = list(dims)
    timings: dict[str, float] = {}

    # --- stage 1: subspace (top-Dmax eigenpairs of H^(k) by thick-restart Lanczos)
    ls.check_mean_loss(loss_fn, params, data, k, microbatch_size=mb)
    sub_fn = lambda kk, key: ls.curvature_subspace(
        loss_fn, params, data, kk, Dmax, key=key, microbatch_size=mb,
        num_matvecs=min(cfg.num_matvecs, _tree.size(params) - 1), tol=cfg.eig_tol,
        flatten=True)
    sub, t_first, t_run = _timed(lambda: sub_fn(k, k_sub), 0)
    timings["subspace"] = t_first
    log(f"subspace: top-{Dmax} eigenpairs of H^({k}) in {t_first:.1f} s "
        f"({int(sub.num_matvecs)} Hessian-vector products, {int(sub.num_restarts)} restarts, "
        f"converged={bool(sub.converged)})")
    report["eigenvalues"] = np.asarray(sub.eigenvalues).tolist()
    report["eigsh"] = dict(num_matvecs=int(sub.num_matvecs), num_restarts=int(sub.num_restarts),
                           converged=bool(sub.converged),
                           max_relative_residual=float(jnp.max(
                               sub.residual_norms / jnp.abs(sub.eigenvalues))))
    if cfg.next_subspace:
        t0 = time.perf_counter()
        nxt = jax.block_until_ready(sub_fn(k + 1, k_next))
        timings["subspace_next"] = time.perf_counter() - t0
        angles = {}
        for d in dims:
            U = jax.tree.map(lambda x, d=d: x[:d], sub.eigenvectors)
            V = jax.tree.map(lambda x, d=d: x[:d], nxt.eigenvectors)
            angles[d] = float(jnp.max(ls.principal_angles(U, V)))
        report["eigenvalues_next"] = np.asarray(nxt.eigenvalues).tolist()
        report["max_principal_angle"] = {str(d): a for d, a in angles.items()}
        log("overlap of top-D eigenspaces at k and k+1 (largest principal angle, degrees): "
            + ", ".join(f"D={d}: {np.degrees(a):.1f}" for d, a in angles.items()))

    # --- stage 2: coefficients (a, c, B) once, for Dmax
    coef, t_first, t_run = _timed(lambda: ls.increment_coefficients(
        loss_fn, params, data, k, sub.eigenvectors, microbatch_size=mb, check_mean=False,
        eigenvalues=sub.eigenvalues), 0)
    timings["coefficients"] = t_first
    log(f"coefficients (a, c, B) for D={Dmax}: {t_first:.1f} s ({Dmax} single-sample "
        "Hessian-vector products, 2 gradients; U H^(k) U^T = diag(Ritz values))")

    # --- stage 3: evaluation over the grid
    d1 = float(jnp.abs(coef.a))
    sigj = jnp.asarray(sig, jnp.float32)

    def gm_all():
        return [ls.delta2_closed_form_terms(*coef.prefix(d), sigj) for d in dims]

    gm_jit = jax.jit(lambda a, c, B, s: [
        ls.delta2_closed_form_terms(a, c[:d], B[:d, :d], s) for d in dims])
    terms, t_gm_first, t_gm = _timed(lambda: gm_jit(coef.a, coef.c, coef.B, sigj),
                                     max(cfg.timing_repeats, 20))
    del gm_all
    gm = np.array([np.asarray(t.constant + t.sigma2 + t.sigma4) for t in terms])  # (nD, nS)

    def quad_all():
        return [ls.delta2_quadratic_mc(*coef.prefix(d), sigj, key=k_q,
                                       num_samples=cfg.num_samples) for d in dims]

    quad, _, t_quad = _timed(quad_all, cfg.timing_repeats)

    def direct_all():
        return [ls.delta2_direct_mc(loss_fn, params, data, k, sub.eigenvectors, sigj, key=k_q,
                                    num_samples=cfg.num_samples, dim=d, microbatch_size=mb,
                                    sample_batch_size=cfg.sample_batch_size, check_mean=False)
                for d in dims]

    direct, t_direct_first, t_direct = _timed(direct_all, max(0, min(1, cfg.timing_repeats)))
    full, t_full_first, t_full = _timed(lambda: ls.delta2_full_mc(
        loss_fn, params, data, k, sigj, key=k_full, num_samples=cfg.full_samples,
        microbatch_size=mb, sample_batch_size=cfg.sample_batch_size, check_mean=False), 0)
    timings.update(closed_form=t_gm, closed_form_compile=t_gm_first, quadratic_mc=t_quad,
                   direct_mc=t_direct, direct_mc_compile=t_direct_first, full_mc=t_full_first)

    dm = np.array([np.asarray(e.mean) for e in direct])
    dse = np.array([np.asarray(e.stderr) for e in direct])
    qm = np.array([np.asarray(e.mean) for e in quad])
    qse = np.array([np.asarray(e.stderr) for e in quad])
    fm, fse = np.asarray(full.mean), np.asarray(full.stderr)
    rel_err = np.abs(dm - gm) / np.abs(gm)
    # quadratic and direct MC share their draws (same key): their difference is the
    # quadratic model's own error with the Monte Carlo spread of q^2 cancelled
    model_err = np.abs(dm - qm) / np.abs(gm)
    speedup = t_direct / t_gm
    report.update(
        delta1=d1,
        delta1_squared=d1 * d1,
        delta2_full=dict(mean=fm.tolist(), stderr=fse.tolist(), num_samples=cfg.full_samples),
        closed_form={str(d): gm[j].tolist() for j, d in enumerate(dims)},
        terms={str(d): dict(constant=np.asarray(t.constant).tolist(),
                            sigma2=np.asarray(t.sigma2).tolist(),
                            sigma4=np.asarray(t.sigma4).tolist())
               for d, t in zip(dims, terms, strict=True)},
        quadratic_mc={str(d): dict(mean=qm[j].tolist(), stderr=qse[j].tolist())
                      for j, d in enumerate(dims)},
        direct_mc={str(d): dict(mean=dm[j].tolist(), stderr=dse[j].tolist())
                   for j, d in enumerate(dims)},
        ratio_to_full={str(d): (gm[j] / fm).tolist() for j, d in enumerate(dims)},
        ratio_direct_to_full={str(d): (dm[j] / fm).tolist() for j, d in enumerate(dims)},
        direct_vs_closed_form_rel_error={str(d): rel_err[j].tolist() for j, d in enumerate(dims)},
        model_error_same_draws={str(d): model_err[j].tolist() for j, d in enumerate(dims)},
        direct_control_variate={str(d): (gm[j] + dm[j] - qm[j]).tolist()
                                for j, d in enumerate(dims)},
        direct_rel_stderr={str(d): (dse[j] / np.abs(gm[j])).tolist()
                           for j, d in enumerate(dims)},
        timings=timings,
        speedup_closed_form_vs_direct=speedup,
        speedup_quadratic_mc_vs_direct=t_direct / t_quad,
        coefficients=dict(a=float(coef.a), c_norm=float(jnp.linalg.norm(coef.c)),
                          trace_B=float(jnp.trace(coef.B)),
                          B_fro=float(jnp.linalg.norm(coef.B))),
    )
    _print_report(report, log)
    os.makedirs(cfg.out, exist_ok=True)
    json_path = os.path.join(cfg.out, "delta2_transformer.json")
    report["total_seconds"] = time.perf_counter() - t_start
    if cfg.plot:
        png = os.path.join(cfg.out, "delta2_transformer.png")
        plot_report(report, png)
        report["figure"] = png
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    report["json"] = json_path
    log(f"wrote {json_path}" + (f" and {report['figure']}" if cfg.plot else ""))
    log(f"total {report['total_seconds']:.1f} s")
    return report


def _print_report(r, log):
    sig = np.asarray(r["sigmas"])
    dims = r["dims"]
    log(f"\nk = {r['k']}:  Delta1 = |L_(k+1) - L_k| = {r['delta1']:.4e}   "
        f"(Delta1^2 = {r['delta1_squared']:.4e}); ||c|| = {r['coefficients']['c_norm']:.3e}, "
        f"tr B = {r['coefficients']['trace_B']:.3e}")
    log("top eigenvalues of H^(k) (signed): "
        + " ".join(f"{v:.3g}" for v in r["eigenvalues"][: min(8, len(r['eigenvalues']))]))
    head = f"{'sigma':>9} {'Delta2 full':>12} " + " ".join(
        f"{'GM D=' + str(d):>11} {'direct':>11} {'quadMC':>11} {'ratio':>7} {'relerr':>8} "
        f"{'model':>8}"
        for d in dims)
    log(head)
    for i, s in enumerate(sig):
        row = f"{s:9.2e} {r['delta2_full']['mean'][i]:12.4e} "
        for d in dims:
            d = str(d)
            row += (f"{r['closed_form'][d][i]:11.4e} {r['direct_mc'][d]['mean'][i]:11.4e} "
                    f"{r['quadratic_mc'][d]['mean'][i]:11.4e} {r['ratio_to_full'][d][i]:7.3f} "
                    f"{r['direct_vs_closed_form_rel_error'][d][i]:8.1e} "
                    f"{r['model_error_same_draws'][d][i]:8.1e} ")
        log(row)
    dl = str(dims[-1])
    log(f"\nsigma-terms of the closed form, D = {dl} (constant a^2 | sigma^2 term | sigma^4 term):")
    for i, s in enumerate(sig):
        t = r["terms"][dl]
        log(f"  sigma {s:8.2e}: {t['constant'][i]:11.4e} | {t['sigma2'][i]:+11.4e} | "
            f"{t['sigma4'][i]:11.4e}")
    t = r["timings"]
    log("\nstage times (s): subspace {:.2f}, coefficients {:.2f}, closed form {:.2e} "
        "(compiled, all D and sigma), quadratic MC {:.2e}, direct MC {:.2f} (compile+run {:.2f}), "
        "full-space MC {:.2f}".format(t["subspace"], t["coefficients"], t["closed_form"],
                                      t["quadratic_mc"], t["direct_mc"], t["direct_mc_compile"],
                                      t["full_mc"]))
    log("relerr = |direct - GM| / GM (includes Monte Carlo noise); model = |direct - quadMC| / GM "
        "on the same draws (the quadratic model's own error); ratio = GM / Delta2(full)")
    log(f"closed form vs direct MC at evaluation: {r['speedup_closed_form_vs_direct']:.3g}x "
        f"faster (quadratic MC {r['speedup_quadratic_mc_vs_direct']:.3g}x)")


def plot_report(r, path):
    """Four panels: ratio to full-space, model validity, sigma-terms, stage times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = np.asarray(r["sigmas"])
    dims = [str(d) for d in r["dims"]]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
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
    ax.set(xlabel="sigma", ylabel="relative error",
           title="validity of the quadratic model")
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
    vals = [tm[n] for n in names]
    ax.barh(names, vals, color=[f"C{i}" for i in range(len(names))])
    ax.set_xscale("log")
    ax.set(xlabel="seconds", title=f"stage times; GM {r['speedup_closed_form_vs_direct']:.2g}x "
           "faster than direct MC")
    fig.suptitle(f"Delta2(D) probe of a {r['model']['parameters']:,}-parameter transformer, "
                 f"k = {r['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
