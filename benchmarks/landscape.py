"""Case 3: Delta2(D) end to end, curvlib vs a torch reference pipeline on the same transformer.

Pipeline (both sides, same weights, same ordered data, k = 8 sequences as in the paper):

1. subspace: top-16 Hessian eigenvectors of ``L_k`` at the trained point;
2. coefficients ``(a, c, B)`` of the increment's quadratic model in that subspace;
3. ``Delta2(D)`` by the Gaussian-moment closed form on a 10-value sigma grid for
   D in {1, 4, 16} (nested prefixes of one subspace).

curvlib: :func:`curvlib.landscape.curvature_subspace` (thick-restart Lanczos),
:func:`increment_coefficients` (vmapped HVPs), :func:`delta2_closed_form`.
torch (the reference code's style): PyHessian double-backprop HVPs, deflated power
iteration with a fixed 20 iterations per eigenvector (the paper used 20-30),
per-vector HVP loops for ``B``, NumPy closed form.

Accuracy: the subspaces are verified on the JAX side with fresh products
(max relative residual of the 16 pairs) and the Delta2 values compared; curvlib's
tolerance is chosen so its residual is no worse than the reference's.

Evaluation stage (issue goal >= 1e4x): the closed form on the whole grid vs direct
subspace Monte Carlo on the same grid (curvlib's vmapped, jitted ``delta2_direct_mc``
and the reference's Python loop of forward passes), with ``S`` draws per point.

First answer (issue 11): the same pipeline on a ~120k-parameter model (d = 64,
k = 8, D = 8, 3 sigmas, D in {1, 4, 8}) as a notebook user meets it, each
timing in a fresh process (``_first_answer_worker``): the first call including
tracing and compilation (persistent compilation cache off), the same first call
in a new process whose persistent cache a previous process filled, an eager
second call with the same ``loss_fn``, and a warm ``jax.jit`` call of the whole
pipeline; each against the torch reference pipeline on the same weights (torch
has no compilation: its one time serves every row). Goals: first call >= 5x,
warm >= 10x faster than torch.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from . import _common as C
from . import _models as M

K_SAMPLES = 8
D_MAX = 16
DIMS = (1, 4, 16)
SIGMAS = np.logspace(-4, -2, 10).astype(np.float32)
POWER_ITERS = 20


def _data(prob, n):
    x, y = M.text_batch(n, prob.config["seq_len"], seed=7)
    return jnp.asarray(x), jnp.asarray(y)


def _loss(prob):
    apply = prob.model_fn
    return lambda p, batch: M.cross_entropy(apply(p, batch[0]), batch[1])


def curvlib_pipeline(loss, params, data, tol):
    import curvlib
    from curvlib import landscape as L

    sub = L.curvature_subspace(loss, params, data, K_SAMPLES, D_MAX, key=jax.random.PRNGKey(0),
                               eigsh=curvlib.Eigsh(rtol=tol))
    coef = L.increment_coefficients(loss, params, data, K_SAMPLES, sub.eigenvectors,
                                    check_mean=False, eigenvalues=sub.eigenvalues)
    vals = {D: L.delta2_closed_form(*coef.prefix(D), jnp.asarray(SIGMAS)) for D in DIMS}
    return jax.block_until_ready((sub, coef, vals))


def torch_pipeline(prob, data, params_np):
    """The reference pipeline; returns (eigenvalues, eigenvectors as numpy dicts, a, c, B, vals)."""
    import torch

    from . import _torch_ref as T

    x, y = (torch.from_numpy(np.asarray(a)).long() for a in data)
    tp, _ = M.torch_port(prob)
    names = list(tp)
    ps = [tp[n] for n in names]
    forward = M.torch_forward(prob)

    t0 = time.perf_counter()
    lk = forward(tp, x[:K_SAMPLES], y[:K_SAMPLES])
    gk = torch.autograd.grad(lk, ps, create_graph=True)
    hvp_k = lambda v: torch.autograd.grad(gk, ps, grad_outputs=v, retain_graph=True)
    gen = torch.Generator().manual_seed(0)
    vecs, eigs = [], []
    for _ in range(D_MAX):
        v = T._normalize([torch.randn(p.shape, generator=gen) for p in ps])[0]
        for _ in range(POWER_ITERS):
            v = T._orthnormal(v, vecs)
            hv = hvp_k(v)
            theta = float(T._dot(hv, v))
            v = T._normalize([h.detach() for h in hv])[0]
        v = T._orthnormal(v, vecs)
        eigs.append(theta)
        vecs.append([a.detach() for a in v])
    l1 = forward(tp, x[K_SAMPLES:K_SAMPLES + 1], y[K_SAMPLES:K_SAMPLES + 1])
    g1 = torch.autograd.grad(l1, ps, create_graph=True)
    hvp_1 = lambda v: torch.autograd.grad(g1, ps, grad_outputs=v, retain_graph=True)
    kk = K_SAMPLES + 1
    a = float(l1.detach() - lk.detach()) / kk
    b = [(u.detach() - w.detach()) / kk for u, w in zip(g1, gk, strict=True)]
    c = np.array([float(T._dot(b, v)) for v in vecs])
    Hk = [hvp_k(v) for v in vecs]
    H1 = [hvp_1(v) for v in vecs]
    Mx = np.array([[float(T._dot(vecs[i], [p - q for p, q in zip(H1[j], Hk[j], strict=True)]))
                    for j in range(D_MAX)] for i in range(D_MAX)]) / kk
    B = 0.5 * (Mx + Mx.T)
    vals = {}
    for D in DIMS:
        cc, BB = c[:D], B[:D, :D]
        s2 = SIGMAS.astype(np.float64) ** 2
        trB, trB2 = np.trace(BB), np.sum(BB * BB.T)
        vals[D] = a * a + s2 * (a * trB + cc @ cc) + s2**2 * (2 * trB2 + trB**2) / 4
    elapsed = time.perf_counter() - t0
    vec_np = [{n: t.numpy() for n, t in zip(names, v, strict=True)} for v in vecs]
    return {"eigenvalues": np.array(eigs), "eigenvectors": vec_np, "a": a, "c": c, "B": B,
            "values": vals, "time_s": elapsed}


def torch_direct_mc(prob, data, vecs, num_samples):
    """The reference's evaluation: Python loop over sigma, D and draws; forward passes only."""
    import torch

    x, y = (torch.from_numpy(np.asarray(a)).long() for a in data)
    tp, _ = M.torch_port(prob)
    names = list(tp)
    forward = M.torch_forward(prob)
    U = [[torch.from_numpy(np.asarray(v[n])) for n in names] for v in vecs]
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    out = {}
    with torch.no_grad():
        base = [tp[n].detach().clone() for n in names]
        for D in DIMS:
            vals = []
            for s in SIGMAS:
                acc = 0.0
                for _ in range(num_samples):
                    z = torch.randn(D, generator=gen) * float(s)
                    w = {n: base[i] + sum(z[d] * U[d][i] for d in range(D))
                         for i, n in enumerate(names)}
                    lk = forward(w, x[:K_SAMPLES], y[:K_SAMPLES])
                    l1 = forward(w, x[:K_SAMPLES + 1], y[:K_SAMPLES + 1])
                    acc += float(l1 - lk) ** 2
                vals.append(acc / num_samples)
            out[D] = np.array(vals)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------- first answer

FA_CONFIG = dict(d=64, vocab=128, k=8, D=8, dims=(1, 4, 8), sigmas=(1e-4, 1e-3, 1e-2))

# The Delta2(D) authors' own code (their repository's ``code`` folder, holding ``src``), when
# $DELTA2_AUTHORS_CODE names it: their power iteration ``src.eigenvalues.HessianEigenvector``
# runs on the torch port of the same weights. Their Monte Carlo (``src.calc.DeltaCalculator``)
# needs an ``nn.Module`` and a data loader, so their estimator's loop of forward passes is
# timed through `torch_direct_mc` with their default number of draws.
AUTHORS_ENV = "DELTA2_AUTHORS_CODE"
AUTHORS_MC_SAMPLES = 10  # ``DeltaCalculator.calc_deltas(num_samples=10)``
# (num_iters, tol): the paper's iteration counts (20-30) and their code's defaults
AUTHORS_SETTINGS = {"paper_20": (20, 1e-6), "paper_30": (30, 1e-6), "default": (1000, 1e-6)}


def authors_power_iteration(prob, data, D, num_iters, tol, seed=0) -> dict | None:
    """The authors' ``HessianEigenvector(params, L_k).get(D, num_iters, tol)``, timed from the
    loss's graph to the last eigenvector (``None`` without $DELTA2_AUTHORS_CODE)."""
    import os
    import sys

    path = os.environ.get(AUTHORS_ENV)
    if not path:
        return None
    import torch

    if path not in sys.path:
        sys.path.insert(0, path)
    from src.eigenvalues import HessianEigenvector

    x, y = (torch.from_numpy(np.array(a)).long() for a in data)
    tp, _ = M.torch_port(prob)
    names = list(tp)
    forward = M.torch_forward(prob)
    torch.manual_seed(seed)  # their start vectors: torch.randn_like
    t0 = time.perf_counter()
    lk = forward(tp, x[:K_SAMPLES], y[:K_SAMPLES])
    values, vectors = HessianEigenvector([tp[n] for n in names], lk).get(
        D, num_iters=num_iters, tol=tol)
    elapsed = time.perf_counter() - t0
    return {"time_s": elapsed, "num_iters": num_iters, "tol": tol,
            "eigenvalues": np.asarray(values),
            "eigenvectors": [{n: v.detach().numpy() for n, v in zip(names, vec, strict=True)}
                             for vec in vectors]}


def _first_answer_worker(npz_path: str, tol: float, flatten: bool, out_path: str) -> None:
    """In a fresh process: first call (with compilation), eager second call, warm jitted call."""
    import json
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import curvlib
    from curvlib import landscape as L

    z = np.load(npz_path)
    params = {k[2:]: jnp.asarray(z[k]) for k in z.files if k.startswith("p:")}
    data = (jnp.asarray(z["x"]), jnp.asarray(z["y"]))
    heads, K, D = int(z["heads"]), FA_CONFIG["k"], FA_CONFIG["D"]
    sig = jnp.asarray(FA_CONFIG["sigmas"], jnp.float32)

    def loss(p, batch):
        return M.cross_entropy(M.transformer_apply(p, batch[0], heads=heads), batch[1])

    def pipeline(params, data, key):
        sub = L.curvature_subspace(loss, params, data, K, D, key=key, eigsh=curvlib.Eigsh(rtol=tol),
                                   flatten=flatten)
        coef = L.increment_coefficients(loss, params, data, K, sub.eigenvectors,
                                        check_mean=False, eigenvalues=sub.eigenvalues)
        vals = [L.delta2_closed_form(*coef.prefix(d), sig) for d in FA_CONFIG["dims"]]
        return sub, coef, vals

    key = jax.random.PRNGKey(0)
    out = {}
    # the first call, step by step: the subspace alone (against the authors' power
    # iteration), then the coefficients and closed form, then the direct Monte Carlo at the
    # authors' number of draws (the whole pipeline, against theirs)
    t0 = time.perf_counter()
    sub = jax.block_until_ready(L.curvature_subspace(
        loss, params, data, K, D, key=key, eigsh=curvlib.Eigsh(rtol=tol), flatten=flatten))
    out["subspace_first_s"] = time.perf_counter() - t0
    coef = L.increment_coefficients(loss, params, data, K, sub.eigenvectors, check_mean=False,
                                    eigenvalues=sub.eigenvalues)
    vals = jax.block_until_ready([L.delta2_closed_form(*coef.prefix(d), sig)
                                  for d in FA_CONFIG["dims"]])
    out["first_s"] = time.perf_counter() - t0
    mc = jax.block_until_ready([L.delta2_direct_mc(
        loss, params, data, K, sub.eigenvectors, sig, key=key, num_samples=AUTHORS_MC_SAMPLES,
        dim=d, antithetic=False, check_mean=False) for d in FA_CONFIG["dims"]])
    out["first_with_mc_s"] = time.perf_counter() - t0
    res = sub, coef, vals
    t0 = time.perf_counter()
    res = jax.block_until_ready(pipeline(params, data, key))
    out["eager_second_s"] = time.perf_counter() - t0
    jitted = jax.jit(pipeline)
    jax.block_until_ready(jitted(params, data, key))
    warm = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(params, data, key))
        warm.append(time.perf_counter() - t0)
    sub, coef, vals = res

    def direct_mc(params, data, U, key):
        return [L.delta2_direct_mc(loss, params, data, K, U, sig, key=key,
                                   num_samples=AUTHORS_MC_SAMPLES, dim=d, antithetic=False,
                                   check_mean=False) for d in FA_CONFIG["dims"]]

    jitted_mc = jax.jit(direct_mc)
    jax.block_until_ready(jitted_mc(params, data, sub.eigenvectors, key))
    warm_mc = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(jitted_mc(params, data, sub.eigenvectors, key))
        warm_mc.append(time.perf_counter() - t0)
    out["warm_with_mc_s"] = float(np.median(warm)) + float(np.median(warm_mc))
    out["direct_mc"] = {str(d): np.asarray(m.estimate).tolist()
                        for d, m in zip(FA_CONFIG["dims"], mc, strict=True)}
    out.update(warm_s=float(np.median(warm)), warm_times_s=warm,
               num_matvecs=int(sub.num_matvecs), converged=bool(sub.converged),
               eigenvalues=np.asarray(sub.eigenvalues).tolist(),
               values={str(d): np.asarray(v).tolist()
                       for d, v in zip(FA_CONFIG["dims"], vals, strict=True)})
    with open(out_path, "w") as f:
        json.dump(out, f)


def _run_worker(npz_path, tol, flatten, cache_dir=None) -> dict:
    """``_first_answer_worker`` in a new Python process (nothing compiled, cache as asked)."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    out = tempfile.mktemp(suffix=".json")
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    code = ("import jax\n"
            + (f"jax.config.update('jax_compilation_cache_dir', {cache_dir!r})\n"
               "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)\n"
               "jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)\n"
               if cache_dir else "")
            + "from benchmarks.landscape import _first_answer_worker\n"
            + f"_first_answer_worker({npz_path!r}, {tol!r}, {flatten!r}, {out!r})\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)
    with open(out) as f:
        return json.load(f)


def first_answer(quick: bool = False) -> dict:
    """Issue 11's first-answer rows: curvlib first / eager second / warm vs the torch pipeline."""
    import tempfile

    global D_MAX, DIMS, SIGMAS
    cfg = FA_CONFIG
    prob = M.make_transformer(d=cfg["d"], vocab=cfg["vocab"])
    data = _data(prob, cfg["k"] + 1)
    saved = D_MAX, DIMS, SIGMAS
    D_MAX, DIMS, SIGMAS = cfg["D"], cfg["dims"], np.asarray(cfg["sigmas"], np.float32)
    try:
        ref = torch_pipeline(prob, data, prob.params)
        torch_times = [ref["time_s"]]
        if not quick:
            torch_times.append(torch_pipeline(prob, data, prob.params)["time_s"])
        authors, mc_s = {}, None
        for name, (iters, atol) in AUTHORS_SETTINGS.items():
            if quick and name != "paper_20":
                continue
            r = authors_power_iteration(prob, data, cfg["D"], iters, atol)
            if r is None:
                C.log(f"  ${AUTHORS_ENV} is not set: the rows against the authors' code are "
                      "left out")
                break
            if name.startswith("paper"):  # their estimator on their subspace: the pipeline
                if mc_s is None:
                    mc_s = torch_direct_mc(prob, data, r["eigenvectors"], AUTHORS_MC_SAMPLES)[1]
                r["mc_s"] = mc_s
            authors[name] = r
    finally:
        D_MAX, DIMS, SIGMAS = saved
    from .eigsh import Checker

    chk = Checker(prob._replace(batch=(data[0][: cfg["k"]], data[1][: cfg["k"]])))
    ref_res = chk.residuals(ref["eigenvalues"], ref["eigenvectors"])
    for r in authors.values():
        r["max_rel_residual"] = float(chk.residuals(r["eigenvalues"], r["eigenvectors"]).max())
        C.log(f"  authors' power iteration ({r['num_iters']} iterations, tol {r['tol']:.0e}): "
              f"{r['time_s']:.2f} s, max relative residual {r['max_rel_residual']:.2e}")
    tol = float(min(1e-3, ref_res.max()))
    t_torch = float(np.median(torch_times))
    tmp = tempfile.mkdtemp()
    npz = f"{tmp}/fa.npz"
    np.savez(npz, x=np.asarray(data[0]), y=np.asarray(data[1]), heads=prob.config["heads"],
             **{f"p:{k}": np.asarray(v) for k, v in prob.params.items()})
    runs = {}
    for flatten in (False, True):
        cold = _run_worker(npz, tol, flatten)
        cache = f"{tmp}/cache_{flatten}"
        _run_worker(npz, tol, flatten, cache)  # fills the persistent cache
        cached = _run_worker(npz, tol, flatten, cache)
        runs[f"flatten={flatten}"] = dict(cold=cold, persistent_cache=cached)
        C.log(f"  first answer (flatten={flatten}): first {cold['first_s']:.2f} s, eager second "
              f"{cold['eager_second_s']:.3f} s, warm {cold['warm_s']:.3f} s, first with a warm "
              f"persistent cache {cached['first_s']:.2f} s; torch {t_torch:.2f} s")
    n = M.num_params(prob.params)
    what = f"3b. first answer, {n // 1000}k-param GPT, k=8, D=8, 3 sigma"
    rows = []
    for variant, r in runs.items():
        c, p = r["cold"], r["persistent_cache"]
        for label, t, goal in (("first call incl. compile", c["first_s"], 5),
                               ("first call, persistent cache warm", p["first_s"], 5),
                               ("eager second call", c["eager_second_s"], 10),
                               ("warm jitted call", c["warm_s"], 10)):
            x = C.ratio(t_torch, t)
            rows.append([f"{what}: {label} ({variant})", C._fmt_s(t), "torch reference pipeline",
                         C._fmt_s(t_torch), C._fmt_x(x),
                         f"subspace residual tol {tol:.1e} / {ref_res.max():.1e}",
                         f"1 / {len(torch_times)}",
                         f">={goal}x: " + ("met" if x and x >= goal else "MISSED")])
    rows += _authors_rows(what, runs, authors, tol)
    for r in authors.values():
        r.pop("eigenvectors")
    return {"config": {**cfg, "num_params": n, "tol": tol}, "torch_s": t_torch,
            "authors": authors,
            "torch_times_s": torch_times, "torch_max_rel_residual": float(ref_res.max()),
            "runs": runs, "headline": rows}


def _authors_rows(what: str, runs: dict, authors: dict, tol: float) -> list:
    """Issue 20's transformer rows: curvlib's first calls against the authors' own code."""
    rows = []
    c, p = runs["flatten=False"]["cold"], runs["flatten=False"]["persistent_cache"]
    for name, r in authors.items():
        how = f"{r['num_iters']} iterations, tol {r['tol']:.0e}" + (
            " (the paper's count)" if name.startswith("paper") else " (their defaults)")
        x = C.ratio(r["time_s"], c["subspace_first_s"])
        rows.append([f"{what}: curvature_subspace first call incl. compile",
                     C._fmt_s(c["subspace_first_s"]), f"the authors' power iteration, {how}",
                     C._fmt_s(r["time_s"]), C._fmt_x(x),
                     f"max rel. residual {tol:.0e} / {r['max_rel_residual']:.1e}", "1 / 1",
                     ">=1x: " + ("met" if x and x >= 1 else "MISSED")])
    for r in (r for name, r in authors.items() if name.startswith("paper")):
        theirs = r["time_s"] + r["mc_s"]
        s = AUTHORS_MC_SAMPLES
        for label, t, goal in (("first call incl. compile", c["first_with_mc_s"], 1),
                               ("first call, persistent cache warm", p["first_with_mc_s"], 3),
                               ("warm jitted calls", c["warm_with_mc_s"], 3)):
            x = C.ratio(theirs, t)
            rows.append([f"{what}: whole pipeline (subspace, coefficients, closed form, direct "
                         f"MC S={s}), {label}", C._fmt_s(t),
                         f"the authors' power iteration ({r['num_iters']} its) + MC loop "
                         f"(S={s})", C._fmt_s(theirs), C._fmt_x(x),
                         f"max rel. residual {tol:.0e} / {r['max_rel_residual']:.1e}", "1 / 1",
                         f">={goal}x: " + ("met" if x and x >= goal else "MISSED")])
    return rows


def main(argv=None) -> None:
    """``python -m benchmarks.landscape --first-answer``: the first-answer rows alone."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--first-answer", action="store_true", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--without-authors", action="store_true",
                    help=f"run without the authors' code (${AUTHORS_ENV} unset): their rows "
                         "are left out of the result")
    args = ap.parse_args(argv)
    if not os.environ.get(AUTHORS_ENV) and not args.without_authors:
        ap.error(f"${AUTHORS_ENV} is not set: the rows against the authors' code (their "
                 "repository's `code` folder, holding `src`) would be missing from the result; "
                 "set it, or pass --without-authors to leave those rows out")
    C.QUICK = args.quick
    C.write_result("landscape_first_answer", {
        "title": "Delta2(D) time to first answer vs the torch pipeline and the authors' code",
        **first_answer(args.quick)})


def run(quick: bool = False) -> dict:
    from curvlib import landscape as L

    reps = C.repeats(5)
    prob = M.make_transformer()
    loss = _loss(prob)
    data = _data(prob, K_SAMPLES + 1)
    params = prob.params
    from .eigsh import Checker

    pk = prob._replace(batch=(data[0][:K_SAMPLES], data[1][:K_SAMPLES]))
    chk = Checker(pk)

    # --- torch reference (fixed 20 power iterations per vector) ---
    ref = torch_pipeline(prob, data, params)
    ref_res = chk.residuals(ref["eigenvalues"], ref["eigenvectors"])
    C.log(f"  torch pipeline {ref['time_s']:.1f}s, subspace max rel residual {ref_res.max():.2e}")
    torch_times = [ref["time_s"]]
    budget = 30 if quick else 180  # the reference is slow: repeat it only while this allows
    while len(torch_times) < reps and sum(torch_times) + ref["time_s"] < budget:
        torch_times.append(torch_pipeline(prob, data, params)["time_s"])

    # --- curvlib, tolerance no looser than the reference's achieved residual ---
    tol = float(min(1e-3, ref_res.max()))
    t0 = time.perf_counter()
    sub, coef, vals = curvlib_pipeline(loss, params, data, tol)
    first = time.perf_counter() - t0
    cl_res = chk.residuals(np.asarray(sub.eigenvalues), [
        jax.tree.map(lambda a, i=i: a[i], sub.eigenvectors) for i in range(D_MAX)])
    timing = C.time_fn(lambda: curvlib_pipeline(loss, params, data, tol), repeats=reps,
                       number=1, warmup=0)
    C.log(f"  curvlib pipeline {timing['median_s']:.2f}s (first {first:.1f}s), "
          f"residual {cl_res.max():.2e}, matvecs {int(sub.num_matvecs)}")
    tt = C.summarize(torch_times, number=1)
    ratio = C.ratio(tt["median_s"], timing["median_s"])
    same_acc = bool(cl_res.max() <= max(ref_res.max(), 1e-3))
    d2_dev = {D: float(np.max(np.abs(np.asarray(vals[D]) - ref["values"][D])
                              / np.abs(ref["values"][D]))) for D in DIMS}

    # --- evaluation stage: closed form vs direct Monte Carlo on the grid ---
    S = 8 if quick else 16
    cf = jax.jit(lambda a, c, B: [L.delta2_closed_form(a, c[:D], B[:D, :D], jnp.asarray(SIGMAS))
                                  for D in DIMS])
    cf_t = C.time_fn(lambda: cf(coef.a, coef.c, coef.B), repeats=reps)
    dmc = jax.jit(lambda p, d, U, D: L.delta2_direct_mc(
        loss, p, d, K_SAMPLES, U, jnp.asarray(SIGMAS), key=jax.random.PRNGKey(3),
        num_samples=S, dim=D, antithetic=False, check_mean=False, sample_batch_size=16),
        static_argnums=3)

    def direct_all():
        return [dmc(params, data, sub.eigenvectors, D) for D in DIMS]

    dmc_t = C.time_fn(direct_all, repeats=reps, number=1)
    dmc_vals = direct_all()
    mc_dev = {D: float(np.max(np.abs(np.asarray(r.estimate) - np.asarray(v))
                              / np.asarray(v)))
              for D, r, v in zip(DIMS, dmc_vals, [vals[D] for D in DIMS], strict=True)}
    vec_np = [jax.tree.map(lambda a, i=i: np.asarray(a[i]), sub.eigenvectors)
              for i in range(D_MAX)]
    _, tmc = torch_direct_mc(prob, data, vec_np, S if not quick else 4)
    torch_mc_per_S = tmc / (S if not quick else 4) * S
    eval_ratio = C.ratio(dmc_t["median_s"], cf_t["median_s"])
    eval_ratio_torch = C.ratio(torch_mc_per_S, cf_t["median_s"])

    fa = first_answer(quick)
    headline = [
        ["3. Delta2(D) end to end (16-dim subspace, coefficients, 10 sigma x D in {1,4,16})",
         C._fmt_s(timing["median_s"]), "torch reference (20 power its/vector)",
         C._fmt_s(tt["median_s"]), C._fmt_x(ratio) if same_acc else "n/a (accuracy differs)",
         f"subspace residual {cl_res.max():.1e} / {ref_res.max():.1e}",
         f"{timing['repeats']} / {tt['repeats']}",
         ">=10x: " + ("met" if same_acc and ratio and ratio >= 10 else "MISSED")],
        [f"3. evaluation: closed form vs direct MC (S={S}, 30 grid points)",
         C._fmt_s(cf_t["median_s"]), "curvlib delta2_direct_mc (vmapped)",
         C._fmt_s(dmc_t["median_s"]), C._fmt_x(eval_ratio),
         f"GM vs MC rel. diff <= {max(mc_dev.values()):.1e}", f"{cf_t['repeats']} / "
         f"{dmc_t['repeats']}", ">=1e4x: " + ("met" if eval_ratio and eval_ratio >= 1e4
                                             else "MISSED")],
        [f"3. evaluation: closed form vs torch Python-loop MC (S={S})",
         C._fmt_s(cf_t["median_s"]), "torch loop of forward passes", C._fmt_s(torch_mc_per_S),
         C._fmt_x(eval_ratio_torch), "same estimator", f"{cf_t['repeats']} / 1",
         ">=1e4x: " + ("met" if eval_ratio_torch and eval_ratio_torch >= 1e4 else "MISSED")],
    ] + fa["headline"]
    md = C.md_table(
        ["side", "median", "subspace max rel. residual", "matvecs / HVPs", "repeats"],
        [["curvlib", C._fmt_s(timing["median_s"]), f"{cl_res.max():.2e}",
          # D single-sample products; U H^(k) U^T comes from the Ritz values
          int(sub.num_matvecs) + D_MAX, timing["repeats"]],
         ["torch reference", C._fmt_s(tt["median_s"]), f"{ref_res.max():.2e}",
          D_MAX * POWER_ITERS + 2 * D_MAX, tt["repeats"]]])
    payload = {
        "title": "3. Delta2(D) end to end",
        "config": {"k": K_SAMPLES, "D_max": D_MAX, "dims": DIMS, "sigmas": SIGMAS,
                   "num_params": M.num_params(params), "power_iters": POWER_ITERS,
                   "mc_samples": S, **prob.config},
        "curvlib": {"timing": timing, "first_call_s": first, "tol": tol,
                    "max_rel_residual": float(cl_res.max()),
                    "eigenvalues": np.asarray(sub.eigenvalues),
                    "num_matvecs": int(sub.num_matvecs),
                    "values": {D: np.asarray(v) for D, v in vals.items()}},
        "torch": {"timing": tt, "max_rel_residual": float(ref_res.max()),
                  "eigenvalues": ref["eigenvalues"], "values": ref["values"]},
        "delta2_rel_diff_curvlib_vs_torch": d2_dev,
        "first_answer": fa,
        "evaluation": {"closed_form": cf_t, "direct_mc_curvlib": dmc_t,
                       "direct_mc_torch_s": torch_mc_per_S, "gm_vs_mc_rel_diff": mc_dev},
        "headline": headline,
        "summary_md": md,
        "notes": [
            "Delta2(D) closed-form values, curvlib vs torch pipeline, max relative difference "
            "over the grid: " + ", ".join(f"D={D}: {v:.1e}" for D, v in d2_dev.items())
            + " (differences come from the reference's less converged subspace).",
            f"Torch direct MC was timed with {S if not quick else 4} draws per grid point and "
            f"scaled to S={S}.",
            f"The torch reference pipeline was repeated {len(torch_times)} time(s) (a time "
            "budget caps its repeats on this shared 2-core host); curvlib's median is over "
            f"{reps} repeats.",
        ],
    }
    C.write_result("landscape", payload)
    return payload


if __name__ == "__main__":
    main()
