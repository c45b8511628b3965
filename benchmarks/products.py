"""Case 1: cost of one curvature-vector product vs one gradient and vs ``jax.jvp(jax.grad)``.

For each model (MLP on digits, ~0.5M-parameter decoder-only transformer) we time,
each as one jitted call on the same parameters, batch and tangent:

* ``grad``: ``jax.grad(loss)`` (the unit of cost);
* ``jvp(grad)``: the hand-written forward-over-reverse product users write today;
* ``hessian_matvec`` in each mode (``linearize`` is the default); the one-off
  linearisation is timed separately (``setup``) and amortised over Krylov steps;
* ``ggn_matvec`` (model = logits, loss = cross-entropy).

The matvecs are :class:`jax.tree_util.Partial` objects passed *as arguments* to
one jitted ``apply(matvec, v)``, so residuals are traced inputs, as in eigsh.
Goal (issue 5, case 1): the default product is no slower than ``jvp(grad)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import curvlib

from . import _common as C
from . import _models as M

MODES = ("linearize", "fwd-rev", "rev-rev")


def _rel(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    num = jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in pairs))
    den = jnp.sqrt(sum(jnp.sum(y**2) for y in jax.tree.leaves(b)))
    return float(num / den)


def bench_problem(prob: M.Problem, reps: int) -> dict:
    params, batch, loss = prob.params, prob.batch, prob.loss
    v = jax.tree.map(
        lambda p, k: jax.random.normal(k, p.shape, p.dtype),
        params,
        dict(zip(params, jax.random.split(jax.random.PRNGKey(1), len(params)), strict=True)),
    )
    grad = jax.jit(jax.grad(loss))
    jvp_grad = jax.jit(lambda p, v, *b: jax.jvp(lambda q: jax.grad(loss)(q, *b), (p,), (v,))[1])
    apply = jax.jit(lambda mv, v: mv(v))

    rows = {}
    rows["grad"] = C.time_fn(lambda: grad(params, *batch), repeats=reps)
    rows["jvp(grad)"] = C.time_fn(lambda: jvp_grad(params, v, *batch), repeats=reps)
    ref = jvp_grad(params, v, *batch)

    errors = {}
    for mode in MODES:
        make = jax.jit(lambda p, *b, mode=mode: curvlib.hessian_matvec(loss, p, *b, mode=mode))
        mv = make(params, *batch)
        row = C.time_fn(lambda: apply(mv, v), repeats=reps)
        if mode == "linearize":
            row["setup"] = C.time_fn(lambda: make(params, *batch), repeats=reps)
        rows[f"hessian_matvec[{mode}]"] = row
        errors[mode] = _rel(apply(mv, v), ref)

    # the goal's comparison, interleaved (A/B alternating) so host load hits both alike
    lin = jax.jit(lambda p, *b: curvlib.hessian_matvec(loss, p, *b))(params, *batch)
    paired = C.time_paired(lambda: apply(lin, v), lambda: jvp_grad(params, v, *batch),
                           repeats=max(reps, 15))

    make_ggn = jax.jit(
        lambda p, x, y: curvlib.ggn_matvec(prob.model_fn, prob.loss_fn, p, x, loss_args=(y,))
    )
    gmv = make_ggn(params, *batch)
    rows["ggn_matvec"] = C.time_fn(lambda: apply(gmv, v), repeats=reps)

    g = rows["grad"]["median_s"]
    jg = rows["jvp(grad)"]["median_s"]
    for r in rows.values():
        r["per_grad"] = r["median_s"] / g
        r["per_jvp_grad"] = r["median_s"] / jg
    return {
        "model": prob.name,
        "num_params": M.num_params(params),
        "config": prob.config,
        "timings": rows,
        "rel_error_vs_jvp_grad": errors,
        "paired_default_vs_jvp_grad": paired,
    }


def run(quick: bool = False) -> dict:
    reps = C.repeats(7)
    problems = [M.make_mlp(), M.make_transformer()]
    out = [bench_problem(p, reps) for p in problems]

    rows, headline, notes = [], [], []
    for res in out:
        t = res["timings"]
        for name, r in t.items():
            setup = C._fmt_s(r["setup"]["median_s"]) if "setup" in r else ""
            rows.append([
                res["model"], f"{res['num_params']:,}", name, C._fmt_s(r["median_s"]),
                f"{r['per_grad']:.2f}", f"{r['per_jvp_grad']:.2f}", setup, r["repeats"],
            ])
        pr = res["paired_default_vs_jvp_grad"]
        r = pr["ratio_b_over_a_median"]
        ok = r >= 1.0
        headline.append([
            f"1. default product, {res['model']} (interleaved pairs)",
            C._fmt_s(pr["a"]["median_s"]), "jax.jvp(jax.grad)", C._fmt_s(pr["b"]["median_s"]),
            f"{C._fmt_x(r)} (IQR {pr['ratio_iqr']:.2f})",
            f"exact (rel. diff {res['rel_error_vs_jvp_grad']['linearize']:.1e})", pr["repeats"],
            "no slower: " + ("met" if ok else "MISSED"),
        ])
        notes.append(
            f"{res['model']}: products agree with jvp(grad) to rel. "
            + ", ".join(f"{k} {v:.1e}" for k, v in res["rel_error_vs_jvp_grad"].items())
            + "."
        )
    md = C.md_table(
        ["model", "params", "product", "median", "/ grad", "/ jvp(grad)", "linearize setup",
         "repeats"],
        rows,
    )
    payload = {
        "title": "1. Product cost",
        "results": out,
        "headline": headline,
        "summary_md": md,
        "notes": notes + [
            "Headline ratios come from interleaved A/B pairs (median of per-pair ratios), the "
            "table from separate runs; on this shared host the table's columns can differ by "
            "tens of percent (fwd-rev and jvp(grad) are the same computation).",
            "`linearize` setup (one linearisation, amortised over all products of a solve) is "
            "reported separately; per-product time excludes it."
        ],
    }
    C.write_result("products", payload)
    return payload
