"""Case 5: eigsh time and peak memory vs parameter count; compile time apart from run time.

A tanh MLP (two hidden layers of width ``w``, digits inputs, batch 128) is swept over
widths so the parameter count runs from ~10^4 to ~10^6 (10^7 in the full run when
the host allows). Each size runs in a fresh subprocess so that its peak resident
set size (``getrusage``) belongs to that size alone. Per size we record:

* compile time: ``jit(...).lower(...).compile()`` of the whole solve;
* run time: median over repeats of the compiled solve (top-10 ``"LA"``, ``tol=1e-3``,
  default ``num_matvecs``), and time per product;
* memory: peak RSS minus the RSS before compiling, and XLA's own
  ``memory_analysis()`` of the compiled program (arguments + temporaries);
* the analytic size of the Krylov basis (eigsh's default ``max(4k, 20)`` rows for
  ``k = 10``, plus 2 vectors).

The log-log slopes of run time and memory against the parameter count are fitted
(near 1 means linear scaling).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from . import _common as C

BATCH = 128


def worker(width: int, reps: int) -> dict:
    import jax
    import numpy as np

    import curvlib

    from . import _models as M

    prob = M.make_mlp(width=width, depth=2, n=BATCH)
    params, batch, loss = prob.params, prob.batch, prob.loss
    v0 = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(5), p.shape, p.dtype), params)
    jax.block_until_ready(v0)

    def solve(params, v0, *batch):
        mv = curvlib.hessian_matvec(loss, params, *batch)
        return curvlib.eigsh(mv, v0, 10, rtol=1e-3)

    rss0 = C.current_rss_mb()
    t0 = time.perf_counter()
    compiled = jax.jit(solve).lower(params, v0, *batch).compile()
    compile_s = time.perf_counter() - t0
    mem = {}
    try:
        ma = compiled.memory_analysis()
        mem = {k: int(getattr(ma, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes") if hasattr(ma, k)}
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    rss_compiled = C.current_rss_mb()
    r = jax.block_until_ready(compiled(params, v0, *batch))
    timing = C.time_fn(lambda: compiled(params, v0, *batch), repeats=reps, number=1, warmup=0)
    n = M.num_params(params)
    nmv = int(r.num_matvecs)
    m = min(n, max(4 * 10, 20))  # eigsh's default basis for k = 10: max(4k, 20) rows
    return {
        "width": width,
        "num_params": n,
        "compile_s": compile_s,
        "timing": timing,
        "num_matvecs": nmv,
        "time_per_matvec_s": timing["median_s"] / nmv,
        "converged": bool(r.converged),
        "max_rel_residual_reported": float(
            np.max(np.asarray(r.residual_norms) / np.abs(np.asarray(r.eigenvalues)))),
        "rss_before_mb": rss0,
        "rss_after_compile_mb": rss_compiled,
        "peak_rss_mb": C.peak_rss_mb(),
        "peak_rss_delta_mb": C.peak_rss_mb() - rss0,
        "xla_memory": mem,
        "xla_arg_plus_temp_mb": (mem.get("argument_size_in_bytes", 0)
                                 + mem.get("temp_size_in_bytes", 0)) / 2**20,
        "basis_mb": (m + 2) * n * 4 / 2**20,
    }


def run(quick: bool = False) -> dict:
    widths = [64, 160, 400, 1000] if quick else [64, 128, 256, 512, 1024, 2048]
    reps = C.repeats(5)
    env = dict(os.environ)
    out = []
    for w in widths:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.scaling", "--worker", str(w), str(reps)],
            capture_output=True, text=True, env=env, cwd=C.ROOT.parent,
        )
        if proc.returncode != 0:
            C.log(proc.stderr[-2000:])
            out.append({"width": w, "error": proc.stderr[-500:]})
            break
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append(res)
        C.log(f"  width {w}: {res['num_params']:,} params, run {res['timing']['median_s']:.3f}s, "
              f"compile {res['compile_s']:.1f}s, {res['num_matvecs']} matvecs, "
              f"peak dRSS {res['peak_rss_delta_mb']:.0f} MB ({time.perf_counter() - t0:.0f}s)")
    ok = [r for r in out if "error" not in r]
    n = [r["num_params"] for r in ok]
    series_t = {
        "run (median)": (n, [r["timing"]["median_s"] for r in ok]),
        "per product": (n, [r["time_per_matvec_s"] for r in ok]),
        "compile": (n, [r["compile_s"] for r in ok]),
    }
    series_m = {
        "peak RSS increase": (n, [max(r["peak_rss_delta_mb"], 1e-3) for r in ok]),
        "XLA args + temps": (n, [max(r["xla_arg_plus_temp_mb"], 1e-3) for r in ok]),
        "Krylov basis (analytic)": (n, [r["basis_mb"] for r in ok]),
    }
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    plots = [
        C.loglog_plot(C.RESULTS / "scaling_time.png", series_t, xlabel="parameters",
                      ylabel="seconds", title="eigsh top-10, MLP: time"),
        C.loglog_plot(C.RESULTS / "scaling_memory.png", series_m, xlabel="parameters",
                      ylabel="MiB", title="eigsh top-10, MLP: memory"),
    ]
    big = [r for r in ok if r["num_params"] >= 1e5]
    slopes = {}
    if len(big) >= 2:
        nb = [r["num_params"] for r in big]
        slopes = {
            "run_time": C.fit_slope(nb, [r["timing"]["median_s"] for r in big]),
            "time_per_product": C.fit_slope(nb, [r["time_per_matvec_s"] for r in big]),
            "xla_memory": C.fit_slope(nb, [r["xla_arg_plus_temp_mb"] for r in big]),
            "peak_rss": C.fit_slope(nb, [max(r["peak_rss_delta_mb"], 1e-3) for r in big]),
        }
    rows = [[f"{r['num_params']:,}", r["width"], C._fmt_s(r["compile_s"]),
             C._fmt_s(r["timing"]["median_s"]), r["num_matvecs"],
             C._fmt_s(r["time_per_matvec_s"]), f"{r['peak_rss_delta_mb']:.0f}",
             f"{r['xla_arg_plus_temp_mb']:.0f}", f"{r['basis_mb']:.0f}", r["timing"]["repeats"]]
            for r in ok]
    md = C.md_table(["params", "width", "compile", "run (median)", "matvecs", "per product",
                     "peak RSS incr. MiB", "XLA args+temps MiB", "basis MiB", "repeats"], rows)
    notes = [
        "Log-log slopes fitted over sizes >= 1e5 parameters: "
        + ", ".join(f"{k} {v:.2f}" for k, v in slopes.items()) + "."
        if slopes else "Too few sizes for a slope.",
        "The MLP's product cost grows like the parameter count (batch fixed); the matvec count "
        "depends on the spectrum, so time per product is the cleaner scaling measure.",
    ]
    payload = {"title": "5. Scaling of eigsh with parameter count", "results": out,
               "slopes": slopes, "summary_md": md, "notes": notes, "plots": plots,
               "batch": BATCH}
    C.write_result("scaling", payload)
    return payload


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        print(json.dumps(C._jsonable(worker(int(sys.argv[2]), int(sys.argv[3])))))
    else:
        run(quick="--quick" in sys.argv)
