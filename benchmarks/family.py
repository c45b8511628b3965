"""Case "family": the curvature family on the benchmark transformer (issue 14's goals).

Same model, weights, batch and tangent on every side (``_models.make_transformer``, the
~0.5M-parameter decoder-only transformer), each side one jitted call, timed after warm-up;
ratios come from interleaved A/B pairs (``_common.time_paired``):

1. **Fisher and GGN products vs a gradient** (goal <= 1.3x): ``jax.grad(loss)`` against one
   product of ``fisher_matvec`` (exact, categorical) and of ``ggn_matvec`` (cross-entropy),
   each a ``Partial`` built once (the model linearised once, as inside a Krylov solve) and
   applied by one jitted ``apply(matvec, v)``. The one-off linearisation is timed separately
   (``setup``); the ``mode="recompute"`` product (forward pass included) is in the table.
2. **Empirical Fisher vs a gradient** (goal <= 2x): ``empirical_fisher_matvec`` with one
   example per sequence (its mean token loss), same protocol.
3. **Per-layer top-5 spectra in one call vs one full-model eigsh** (goal <= 1.5x):
   ``block_eigsh(H, params, 5, blocks=<one label per layer>)`` (embeddings, each transformer
   layer, head; the equal-shaped layers run as one vmapped eigsh) against
   ``eigsh(H, v0, 5)`` on the same Hessian, both jitted end to end (linearisation included),
   default tolerances. Compile times are reported too. Twice: with the Hessian as a black box
   (``restrict``-ed: every block product is a full-model product) and on the loss path
   (``block_matvec=lambda where: hessian_matvec(loss, params, *batch, wrt=where)``: each group of
   equal-shaped blocks gets an operator that differentiates with respect to its blocks only).
4. **Streamed eigsh over 8 batches vs in-memory microbatched eigsh** (goal <= 1.2x): the same
   8 batches, as a host-driven ``stream_matvec`` over NumPy batches, and as one in-memory
   batch with ``hessian_matvec(..., microbatch_size=batch)``; top-5. The streamed case needs
   ``curvlib.eigsh`` to drive host-driven operators; it is skipped with a message until it does.

   Also with ``batches_per_call=4`` (four host batches stacked into one jitted call).

Run: ``python -m benchmarks.family`` (``--tiny`` for a seconds-long smoke run of the script
on a tiny transformer, its numbers mean nothing; ``--streams-only`` reruns case 4 alone,
``--spectra-only`` case 3).
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import curvlib

from . import _common as C
from . import _models as M

K = 5
NUM_BATCHES = 8
TINY = dict(d=32, layers=2, heads=2, seq_len=16, batch_size=4, vocab=128, train_steps=0)


def _tangent(params, seed=1):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(params))
    return {k: jax.random.normal(kk, p.shape, p.dtype)
            for (k, p), kk in zip(params.items(), keys, strict=True)}


def layer_label(path, leaf):
    """One block per transformer layer (``l0.*``, ``l1.*``), the embeddings and the head."""
    name = path[0].key
    if name.startswith("l") and "." in name:
        return name.split(".")[0]
    return "embed" if name.endswith("_emb") else "head"


def _rel(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    num = jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in pairs))
    return float(num / jnp.sqrt(sum(jnp.sum(y**2) for y in jax.tree.leaves(b))))


# ------------------------------------------------------------- 1-2: products


def bench_products(prob: M.Problem, reps: int) -> dict:
    params, (x, y) = prob.params, prob.batch
    v = _tangent(params)
    grad = jax.jit(jax.grad(prob.loss))
    apply = jax.jit(lambda mv, v: mv(v))

    def per_sequence(p, ex):  # one example = one sequence; its mean token loss
        xi, yi = ex
        return prob.loss_fn(prob.model_fn(p, xi[None]), yi[None])

    builders = {
        "fisher": lambda p, x, y: curvlib.fisher_matvec(prob.model_fn, p, x),
        "ggn": lambda p, x, y: curvlib.ggn_matvec(prob.model_fn, prob.loss_fn, p, x,
                                                  loss_args=(y,)),
        "empirical_fisher": lambda p, x, y: curvlib.empirical_fisher_matvec(per_sequence, p,
                                                                            (x, y)),
        "fisher[recompute]": lambda p, x, y: curvlib.fisher_matvec(prob.model_fn, p, x,
                                                                   mode="recompute"),
        "ggn[recompute]": lambda p, x, y: curvlib.ggn_matvec(
            prob.model_fn, prob.loss_fn, p, x, loss_args=(y,), mode="recompute"),
    }
    rows = {"grad": C.time_fn(lambda: grad(params, x, y), repeats=reps)}
    paired, mvs = {}, {}
    for name, build in builders.items():
        make = jax.jit(build)
        mv = mvs[name] = make(params, x, y)
        row = C.time_fn(lambda mv=mv: apply(mv, v), repeats=reps)
        row["setup"] = C.time_fn(lambda make=make: make(params, x, y), repeats=reps)
        rows[name] = row
        if "[" not in name:  # the goals' comparisons, interleaved with the gradient
            paired[name] = C.time_paired(lambda: grad(params, x, y),
                                         lambda mv=mv: apply(mv, v), repeats=max(reps, 15))
    g = rows["grad"]["median_s"]
    for r in rows.values():
        r["per_grad"] = r["median_s"] / g
    agree = {
        "fisher_vs_ggn": _rel(apply(mvs["fisher"], v), apply(mvs["ggn"], v)),
        "recompute_vs_linearize": _rel(apply(mvs["fisher[recompute]"], v),
                                       apply(mvs["fisher"], v)),
    }
    return {"timings": rows, "paired_vs_grad": paired, "agreement": agree}


# ------------------------------------------------------ 3: per-layer spectra


def bench_block_spectra(prob: M.Problem, reps: int) -> dict:
    params, batch = prob.params, prob.batch
    v0 = _tangent(params, seed=2)
    key = jax.random.key(3)

    @jax.jit
    def full(params, v0, *batch):
        H = curvlib.hessian_matvec(prob.loss, params, *batch)
        return curvlib.eigsh(H, v0, K)

    @functools.partial(jax.jit, static_argnames="batch_size")
    def per_layer(params, *batch, batch_size=None):
        H = curvlib.hessian_matvec(prob.loss, params, *batch)
        return curvlib.block_eigsh(H, params, K, key=key, blocks=layer_label,
                                   batch_size=batch_size)

    @jax.jit
    def per_layer_loss(params, *batch):  # products differentiate blocks only (one per block)
        return curvlib.block_eigsh(
            None, params, K, key=key, blocks=layer_label,
            block_matvec=lambda where: curvlib.hessian_matvec(prob.loss, params, *batch,
                                                              wrt=where))

    t0 = time.perf_counter()
    f = jax.block_until_ready(full(params, v0, *batch))
    first_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = jax.block_until_ready(per_layer(params, *batch))
    first_blocks = time.perf_counter() - t0
    t0 = time.perf_counter()
    bl = jax.block_until_ready(per_layer_loss(params, *batch))
    first_loss = time.perf_counter() - t0
    pair_loss = C.time_paired(lambda: full(params, v0, *batch),
                              lambda: per_layer_loss(params, *batch),
                              repeats=max(reps, 7), number=1)
    pair = C.time_paired(lambda: full(params, v0, *batch), lambda: per_layer(params, *batch),
                         repeats=max(reps, 7), number=1)
    # the equal-shaped layers one after another (lax.map) instead of one vmapped eigsh
    jax.block_until_ready(per_layer(params, *batch, batch_size=1))
    sequential = C.time_paired(lambda: full(params, v0, *batch),
                               lambda: per_layer(params, *batch, batch_size=1),
                               repeats=max(reps, 7), number=1)
    blocks = {name: {"eigenvalues": np.asarray(r.eigenvalues), "num_matvecs": int(r.num_matvecs),
                     "converged": bool(r.converged)} for name, r in b.items()}
    blocks_loss = {name: {"eigenvalues": np.asarray(r.eigenvalues),
                          "num_matvecs": int(r.num_matvecs), "converged": bool(r.converged),
                          "max_rel_diff_vs_black_box": float(np.max(
                              np.abs(np.asarray(r.eigenvalues) - blocks[name]["eigenvalues"])
                              / np.abs(blocks[name]["eigenvalues"])))}
                   for name, r in bl.items()}
    return {
        "loss_path": {
            "blocks": blocks_loss,
            "compile_s": max(first_loss - pair_loss["b"]["median_s"], 0.0),
            "block_products_total": int(sum(r["num_matvecs"] for r in blocks_loss.values())),
            "paired": pair_loss,
        },
        "full": {"eigenvalues": np.asarray(f.eigenvalues), "num_matvecs": int(f.num_matvecs),
                 "converged": bool(f.converged),
                 "compile_s": max(first_full - pair["a"]["median_s"], 0.0)},
        "blocks": blocks,
        "blocks_compile_s": max(first_blocks - pair["b"]["median_s"], 0.0),
        "block_products_total": int(sum(r["num_matvecs"] for r in blocks.values())),
        "paired": pair,
        "paired_batch_size_1": sequential,
    }


# -------------------------------------------------------------- 4: streams


def _host_driven_eigsh_available() -> tuple[bool, str]:
    """Does ``curvlib.eigsh`` drive a host-driven operator? Probed on a 3 x 3 problem."""
    data = [np.eye(3)[:2], np.eye(3)[2:]]
    op = curvlib.stream_matvec(
        lambda w, xb: curvlib.hessian_matvec(lambda w, xb: jnp.mean((xb @ w) ** 2), w, xb),
        jnp.zeros(3), data)
    try:
        curvlib.eigsh(op, jnp.ones(3), 1)
    except Exception as e:  # noqa: BLE001 - any failure means "not yet"
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return True, ""


def bench_stream(prob: M.Problem, reps: int) -> dict:
    params = prob.params
    cfg = prob.config
    B, T = cfg["batch"], cfg["seq_len"]
    xs, ys = zip(*(M.text_batch(B, T, seed=100 + i) for i in range(NUM_BATCHES)), strict=True)
    host = list(zip(xs, ys, strict=True))  # NumPy batches on the host
    X, Y = jnp.asarray(np.concatenate(xs)), jnp.asarray(np.concatenate(ys))
    v0 = _tangent(params, seed=4)
    loss_b = lambda p, b: prob.loss(p, *b)

    @jax.jit
    def in_memory(params, v0, batch):
        H = curvlib.hessian_matvec(loss_b, params, batch, microbatch_size=B)
        return curvlib.eigsh(H, v0, K)

    t0 = time.perf_counter()
    mem = jax.block_until_ready(in_memory(params, v0, (X, Y)))
    first = time.perf_counter() - t0
    out = {"num_batches": NUM_BATCHES, "batch": B,
           "in_memory": {"eigenvalues": np.asarray(mem.eigenvalues),
                         "num_matvecs": int(mem.num_matvecs), "first_call_s": first}}
    ok, why = _host_driven_eigsh_available()
    if not ok:
        out["skipped"] = ("curvlib.eigsh does not drive host-driven operators yet (" + why +
                          "); the streamed case runs once it does")
        C.log("  streamed eigsh skipped: " + out["skipped"])
        out["in_memory"]["timing"] = C.time_fn(lambda: in_memory(params, v0, (X, Y)),
                                               repeats=reps, number=1)
        # what does exist: one streamed product vs one in-memory microbatched product
        H_mem = jax.jit(lambda p, b: curvlib.hessian_matvec(loss_b, p, b, mode="fwd-rev",
                                                            microbatch_size=B))(params, (X, Y))
        apply = jax.jit(lambda mv, v: mv(v))
        H_stream = curvlib.stream_matvec(
            lambda p, b: curvlib.hessian_matvec(loss_b, p, b, mode="fwd-rev"), params,
            host)
        out["product_rel_diff"] = _rel(H_stream(v0), apply(H_mem, v0))
        out["one_product_paired"] = C.time_paired(lambda: apply(H_mem, v0),
                                                  lambda: H_stream(v0), repeats=max(reps, 7))
        return out
    H_stream = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss_b, p, b),
                                     params, host)
    streamed = lambda: curvlib.eigsh(H_stream, v0, K)
    t0 = time.perf_counter()
    st = jax.block_until_ready(streamed())
    out["streamed"] = {"eigenvalues": np.asarray(st.eigenvalues),
                       "num_matvecs": int(st.num_matvecs),
                       "first_call_s": time.perf_counter() - t0}
    out["paired"] = C.time_paired(lambda: in_memory(params, v0, (X, Y)), streamed,
                                  repeats=max(reps, 5), number=1)
    # fewer, larger calls: consecutive host batches stacked into one jitted call
    out["paired_per_call"] = {}
    for per_call in (4,):
        H_group = curvlib.stream_matvec(lambda p, b: curvlib.hessian_matvec(loss_b, p, b),
                                        params, host, batches_per_call=per_call)
        grouped = lambda H=H_group: curvlib.eigsh(H, v0, K)
        gr = jax.block_until_ready(grouped())
        out[f"streamed_per_call_{per_call}"] = {"eigenvalues": np.asarray(gr.eigenvalues),
                                                "num_matvecs": int(gr.num_matvecs)}
        out["paired_per_call"][per_call] = C.time_paired(
            lambda: in_memory(params, v0, (X, Y)), grouped, repeats=max(reps, 5), number=1)
    return out


# ------------------------------------------------------------------ report


def run(quick: bool = False, tiny: bool = False, streams_only: bool = False,
        spectra_only: bool = False) -> dict:
    """Measure everything (or, with ``streams_only`` / ``spectra_only``, case 4 / case 3 again,
    keeping the rest of the last committed results) and write the results."""
    reps = C.repeats(7)
    prob = M.make_transformer(**TINY) if tiny else M.make_transformer()
    C.log(f"transformer: {M.num_params(prob.params):,} parameters, config {prob.config}")
    kept = {}
    if streams_only or spectra_only:
        last = C.load_results()["family"]
        products, spectra = last["products"], last["block_spectra"]
        kept = {part: kept_meta(last, part) for part in
                (("products", "block_spectra") if streams_only else ("products", "stream"))}
    if spectra_only:
        spectra = bench_block_spectra(prob, reps)
        C.log("  block spectra done")
        return _report(prob, products, spectra, last["stream"], tiny, kept)
    if not streams_only:
        products = bench_products(prob, reps)
        C.log("  products done")
        spectra = bench_block_spectra(prob, reps)
        C.log("  block spectra done")
    stream = bench_stream(prob, reps)
    C.log("  streams done")
    return _report(prob, products, spectra, stream, tiny, kept)


def kept_meta(last: dict, part: str) -> dict:
    """The run that measured ``part`` of the results ``last`` (its own entry in
    ``parts_meta`` when it was kept there from an earlier run, else ``last``'s ``meta``)."""
    if part in last.get("parts_meta", {}):
        return last["parts_meta"][part]
    m = last.get("meta", {})
    return {k: m.get(k) for k in ("git_commit", "git_dirty", "date_utc", "quick")}


def _report(prob, products, spectra, stream, tiny, kept=None) -> dict:
    """The payload of ``results/family.json``; ``kept``: ``{part: meta}`` of the parts
    (``products``, ``block_spectra``, ``stream``) taken from an earlier run."""
    kept = kept or {}
    headline, rows, notes = [], [], []
    goals = {"fisher": 1.3, "ggn": 1.3, "empirical_fisher": 2.0}
    for name, goal in goals.items():
        pr = products["paired_vs_grad"][name]
        r = pr["ratio_b_over_a_median"]
        headline.append([
            f"{name} product vs jax.grad (transformer, interleaved pairs)",
            C._fmt_s(pr["b"]["median_s"]), "jax.grad", C._fmt_s(pr["a"]["median_s"]),
            f"{C._fmt_x(r)} of a gradient (IQR {pr['ratio_iqr']:.2f})", "exact (dense tests)",
            pr["repeats"], f"<= {goal}x: " + ("met" if r <= goal else "MISSED"),
        ])
    for name, row in products["timings"].items():
        setup = C._fmt_s(row["setup"]["median_s"]) if "setup" in row else ""
        rows.append([name, C._fmt_s(row["median_s"]), f"{row['per_grad']:.2f}", setup,
                     row["repeats"]])
    sp = spectra["paired"]
    r = sp["ratio_b_over_a_median"]
    headline.append([
        f"per-layer top-{K} spectra, {len(spectra['blocks'])} blocks in one call vs one "
        f"full-model eigsh", C._fmt_s(sp["b"]["median_s"]), f"eigsh top-{K}",
        C._fmt_s(sp["a"]["median_s"]), C._fmt_x(r) + " of one eigsh",
        f"{spectra['block_products_total']} vs {spectra['full']['num_matvecs']} products",
        sp["repeats"], "<= 1.5x: " + ("met" if r <= 1.5 else "MISSED"),
    ])
    if "loss_path" in spectra:
        lp = spectra["loss_path"]
        sp = lp["paired"]
        r = sp["ratio_b_over_a_median"]
        headline.append([
            f"per-layer top-{K} spectra, {len(lp['blocks'])} blocks in one call, products on "
            f"each block only (`block_matvec=`, hessian_matvec(..., wrt=)) vs one full-model "
            f"eigsh", C._fmt_s(sp["b"]["median_s"]), f"eigsh top-{K}",
            C._fmt_s(sp["a"]["median_s"]), C._fmt_x(r) + " of one eigsh",
            f"{lp['block_products_total']} block products vs {spectra['full']['num_matvecs']}",
            sp["repeats"], "<= 1.5x: " + ("met" if r <= 1.5 else "MISSED"),
        ])
        notes.append(
            f"per-layer spectra on the loss path: compile {lp['compile_s']:.1f} s; eigenvalues "
            f"vs the black-box path: max rel. diff "
            f"{max(b['max_rel_diff_vs_black_box'] for b in lp['blocks'].values()):.1e}; blocks "
            + ", ".join(f"{n} ({b['num_matvecs']} products, converged {b['converged']})"
                        for n, b in lp["blocks"].items()) + "."
        )
    sq = spectra["paired_batch_size_1"]
    notes.append(
        f"per-layer spectra with batch_size=1 (equal-shaped layers one after another): "
        f"{C._fmt_s(sq['b']['median_s'])}, {C._fmt_x(sq['ratio_b_over_a_median'])} of one eigsh "
        f"(vmapped default: {C._fmt_x(spectra['paired']['ratio_b_over_a_median'])})."
    )
    notes.append(
        f"per-layer spectra: compile {spectra['blocks_compile_s']:.1f} s vs "
        f"{spectra['full']['compile_s']:.1f} s for one eigsh; blocks "
        + ", ".join(f"{n} ({b['num_matvecs']} products, converged {b['converged']})"
                    for n, b in spectra["blocks"].items()) + "."
    )
    notes.append(
        "Fisher vs GGN of the mean cross-entropy: rel. diff "
        f"{products['agreement']['fisher_vs_ggn']:.1e}; Fisher recompute vs linearize "
        f"{products['agreement']['recompute_vs_linearize']:.1e}. Products exclude the one-off "
        "linearisation (column `setup`), amortised over a Krylov solve."
    )
    if "paired" in stream:
        r = stream["paired"]["ratio_b_over_a_median"]
        headline.append([
            f"streamed eigsh top-{K} over {NUM_BATCHES} host batches vs in-memory microbatched",
            C._fmt_s(stream["paired"]["b"]["median_s"]), "in-memory eigsh",
            C._fmt_s(stream["paired"]["a"]["median_s"]), C._fmt_x(r),
            f"{stream['streamed']['num_matvecs']} vs {stream['in_memory']['num_matvecs']} "
            "products", stream["paired"]["repeats"],
            "<= 1.2x: " + ("met" if r <= 1.2 else "MISSED"),
        ])
        for per_call, pr in stream.get("paired_per_call", {}).items():
            r = pr["ratio_b_over_a_median"]
            headline.append([
                f"streamed eigsh top-{K} over {NUM_BATCHES} host batches, "
                f"batches_per_call={per_call}, vs in-memory microbatched",
                C._fmt_s(pr["b"]["median_s"]), "in-memory eigsh", C._fmt_s(pr["a"]["median_s"]),
                C._fmt_x(r), f"{per_call} batches on the device at once", pr["repeats"],
                "<= 1.2x: " + ("met" if r <= 1.2 else "MISSED"),
            ])
    else:
        pr = stream["one_product_paired"]
        notes.append(
            f"streamed eigsh: {stream['skipped']}. One streamed Hessian product over "
            f"{NUM_BATCHES} host batches costs {C._fmt_x(pr['ratio_b_over_a_median'])} of the "
            f"in-memory microbatched product (rel. diff {stream['product_rel_diff']:.1e})."
        )
    if kept:
        notes.append("Kept from earlier runs, not measured in this one: " + "; ".join(
            f"{part} (commit {m.get('git_commit')}, {str(m.get('date_utc'))[:16]})"
            for part, m in kept.items()) + ".")
    md = C.md_table(["operator", "median", "/ grad", "setup (linearise)", "repeats"], rows)
    payload = {
        "title": "Curvature family (Fisher, GGN, empirical Fisher, block spectra, streams)",
        "model": prob.name, "num_params": M.num_params(prob.params), "config": prob.config,
        "tiny": tiny, "products": products, "block_spectra": spectra, "stream": stream,
        "headline": headline, "summary_md": md, "notes": notes, "parts_meta": kept,
    }
    if not tiny:  # a smoke run never overwrites the results
        C.write_result("family", payload)
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny transformer: checks that the script runs (numbers mean nothing)")
    ap.add_argument("--streams-only", action="store_true",
                    help="rerun the streamed case only (the rest from the committed results)")
    ap.add_argument("--spectra-only", action="store_true",
                    help="rerun the per-layer spectra only (the rest from the committed results)")
    args = ap.parse_args(argv)
    C.QUICK = args.quick or args.tiny
    out = run(quick=args.quick, tiny=args.tiny, streams_only=args.streams_only,
              spectra_only=args.spectra_only)
    for row in out["headline"]:
        C.log(" | ".join(str(c) for c in row))
    for note in out["notes"]:
        C.log("- " + note)
    if not args.tiny:
        C.log(f"summary: {C.write_summary()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
