"""K-FAC (issues 15, 22) on the digits autoencoder and classifier: step time, loss by step and time.

The problem (``benchmarks/_autoencoder.py``): scikit-learn's digits, a
64-32-16-8-16-32-64 tanh autoencoder, Bernoulli negative log-likelihood, full
batch of 1792 (deterministic, as in kfac-jax's own MNIST autoencoder example),
float32, one set of initial weights for every optimiser.

Optimisers, each a Python loop over one jitted training step (the loss of the
step's incoming parameters is read back every step, as kfac-jax reports it);
curvlib's K-FAC steps take the gradient and the statistics from one forward
pass (``opt.value_and_grad``, issue 22), and the step-time table also has the
default settings' two-pass step (``jax.value_and_grad`` then ``update``):

* ``adam``: ``optax.adam`` over a learning-rate grid; the run with the lowest loss is the
  tuned Adam and that loss (the lowest of its run, not always its last) is the **target**;
* ``kfac``: ``curvlib.kfac`` with Martens & Grosse's adaptive learning rate,
  momentum and Levenberg-Marquardt damping, Monte-Carlo Fisher (one sample),
  statistics every step, inverses every 5 (kfac-jax's example settings);
* ``kfac (amortised)``: ``curvlib.kfac(0.1, momentum=0.9)``, statistics,
  inverses and damping adaptation every 5 steps;
* ``newton_cg (GGN)``: ``curvlib.newton_cg(ggn=(model, loss))``, 20 CG steps;
* ``kfac-jax``: ``kfac_jax.Optimizer`` with the same settings as ``kfac``, run by
  ``benchmarks/kfac_jax_ref.py`` in its own environment (jax 0.9.1); pass
  ``--kfac-jax-python /path/to/venv/bin/python`` to run it from here, back to
  back, or the last ``results/kfac_jax.json`` is read.

Reported (``results/kfac.json``, ``results/kfac_autoencoder.png``): per-step times
(median over repeats of every step), the K-FAC step time against Adam's between
inverse refreshes and amortised over refresh cycles (goals: <= 1.5x and <= 3x),
steps and wall-clock to the target (goal: fewer and less than Adam), and
curvlib's K-FAC against kfac-jax at equal settings (goal: no slower). Compile
times are excluded from the step times and reported apart.

The classifier (issue 22, ``benchmarks/_classifier.py``, ``--only classifier``):
the same digits with their labels, a 64-128-64-10 tanh MLP, softmax cross-entropy
(``likelihood="categorical"``), full batch of 1792, float32. Tuned Adam over
``CLASSIFIER_ADAM_LRS`` (3000 steps; its lowest loss is the target) against
``curvlib.kfac`` at its default settings (adaptive step, momentum and damping,
Monte-Carlo Fisher with one sample, the one-pass ``opt.value_and_grad`` step) and
kfac-jax at the same settings (``kfac_jax_ref.py --only classifier``, read from
``results/kfac_jax_classifier.json``): steps (goal: <= 1/3 of Adam's) and wall-clock
(goal: less than Adam's) to the target, as headline rows of ``results/kfac.json``
(plot ``results/kfac_classifier.png``). The cross-entropy keeps falling under Adam
(the network fits the 1792 images), so the target is set by Adam's horizon; K-FAC's
steps cost a few Adam steps each, so its wall-clock lead holds only at small losses
(the plot's right panel; measured numbers in ``docs/kfac.md``).

``results/kfac.json`` keeps each problem's results under ``parts``; ``--only`` reruns one
problem and keeps the other's from the last file.

Usage::

    python -m benchmarks.kfac [--quick] [--only {autoencoder,classifier}] \
        [--kfac-jax-python /work/kfacenv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from . import _autoencoder as AE
from . import _classifier as CL
from . import _common as C

DAMPING = 1.0
INVERSE_EVERY = 5
ADAM_LRS = (1e-2, 2e-2, 3e-2, 5e-2)
STEPS = {"adam": 3000, "kfac": 400, "kfac_amortised": 1000, "newton_cg": 200, "kfac_jax": 400}
QUICK_STEPS = {"adam": 300, "kfac": 60, "kfac_amortised": 100, "newton_cg": 20, "kfac_jax": 60}
CLASSIFIER_ADAM_LRS = (3e-3, 1e-2, 3e-2, 1e-1)
CLASSIFIER_STEPS = {"adam": 3000, "kfac": 400, "kfac_jax": 400}
CLASSIFIER_QUICK_STEPS = {"adam": 300, "kfac": 150, "kfac_jax": 150}
PROBLEMS = ("autoencoder", "classifier")


def _limit_blas_threads():
    """One OpenBLAS thread: jaxlib's CPU eigh/cholesky call scipy's OpenBLAS, whose threads
    fight XLA's on small machines (kfac_jax_ref.py does the same for kfac-jax).

    scipy's OpenBLAS is a library of its own (not numpy's) and loads with ``scipy.linalg``:
    it is imported first, so that the limit reaches it (issue 22: limited before it loaded,
    a refresh step cost 30-40 Adam steps instead of ~4).
    """
    try:
        import jax  # noqa: F401
        import scipy.linalg  # noqa: F401
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(1, user_api="blas")
        return all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    except Exception:  # noqa: BLE001
        return False


def _problem(problem: str = "autoencoder"):
    """``(batch, p0, model, loss, out_loss)``: ``batch`` the dict of extra arguments
    (``{"x"}``, or ``{"x", "y"}`` for the classifier), ``loss(p, **batch)`` and
    ``out_loss(logits, ...)`` for ``KfacTransformation.value_and_grad``."""
    import jax
    import jax.numpy as jnp

    if problem == "classifier":
        x, y = (jnp.asarray(a) for a in CL.data())
        p0 = jax.tree.map(jnp.asarray, CL.init_params(0))
        model = lambda p, x: CL.model(p, x, jnp)
        loss = lambda p, x, y: CL.softmax_xent(model(p, x), y, jnp)
        out_loss = lambda logits, y: CL.softmax_xent(logits, y, jnp)
        return {"x": x, "y": y}, p0, model, loss, out_loss
    x = jnp.asarray(AE.data())
    p0 = jax.tree.map(jnp.asarray, AE.init_params(0))
    model = lambda p, x: AE.model(p, x, jnp)
    loss = lambda p, x: AE.bernoulli_nll(model(p, x), x, jnp)
    out_loss = lambda logits, x: AE.bernoulli_nll(logits, x, jnp)
    return {"x": x}, p0, model, loss, out_loss


def optimisers(model, out_loss, x, problem: str = "autoencoder"):
    """name -> (optax transform, steps key). The classifier races the Adam grid against
    ``curvlib.kfac`` at its default settings only."""
    import jax
    import optax

    import curvlib

    if problem == "classifier":
        out = {f"adam({lr:g})": (optax.adam(lr), "adam") for lr in CLASSIFIER_ADAM_LRS}
        out["kfac"] = (curvlib.kfac(model_fn=model, example_inputs={"x": x[:4]},
                                    likelihood="categorical", key=jax.random.PRNGKey(0)), "kfac")
        return out
    kw = dict(model_fn=model, likelihood="bernoulli", example_inputs={"x": x[:4]},
              key=jax.random.PRNGKey(0), damping=DAMPING, inverse_every=INVERSE_EVERY)
    out = {f"adam({lr:g})": (optax.adam(lr), "adam") for lr in ADAM_LRS}
    out["kfac"] = (curvlib.kfac(**kw), "kfac")
    out["kfac (amortised)"] = (
        curvlib.kfac(0.1, momentum=0.9, statistics_every=INVERSE_EVERY,
                     damping_every=INVERSE_EVERY, **kw), "kfac_amortised")
    out["newton_cg (GGN)"] = (curvlib.newton_cg(ggn=(model, out_loss), cg=curvlib.CG(max_steps=20)),
                              "newton_cg")
    return out


def _batch(x) -> dict:
    """The extra arguments of a step: ``x`` itself when a dict, else ``{"x": x}``."""
    return x if isinstance(x, dict) else {"x": x}


def _make_step(opt, loss, x, out_loss=None):
    """The jitted training step on the batch ``x`` (an array, or a dict of the extra
    arguments): with ``out_loss`` and a K-FAC transform, the one-pass gradient and
    statistics (``opt.value_and_grad``, issue 22), else ``jax.value_and_grad``."""
    import jax
    import optax

    batch = _batch(x)

    one_pass = out_loss is not None and getattr(opt, "value_and_grad", None) is not None

    @jax.jit
    def step(p, s):
        if one_pass:
            (v, g), st = opt.value_and_grad(out_loss)(p, s, **batch)
            u, s = opt.update(g, s, p, value=v, value_fn=loss, statistics=st, **batch)
        else:
            v, g = jax.value_and_grad(lambda p: loss(p, **batch))(p)
            u, s = opt.update(g, s, p, value=v, value_fn=loss, **batch)
        return optax.apply_updates(p, u), s, v

    return step


def _train(opt, x, p0, loss, steps, repeats, out_loss=None):
    """Loss of each step's incoming params, per-step times (median over repeats), compile s."""
    import jax

    step = _make_step(opt, loss, x, out_loss)

    s0 = opt.init(p0)
    t0 = time.perf_counter()
    jax.block_until_ready(step(p0, s0))
    compile_s = time.perf_counter() - t0
    times = np.zeros((repeats, steps))
    cpu = []
    losses = None
    for r in range(repeats):
        p, s = p0, s0
        ls = []
        c0 = time.process_time()
        for k in range(steps):
            t = time.perf_counter()
            p, s, v = step(p, s)
            ls.append(float(v))  # blocks on this step
            times[r, k] = time.perf_counter() - t
        cpu.append((time.process_time() - c0) / steps)
        losses = ls if losses is None else losses
        assert ls == losses, "the run is not deterministic"
    return np.asarray(losses), np.median(times, axis=0), compile_s, float(np.median(cpu))


def _step_costs(opt, adam, x, p0, loss, repeats, out_loss=None):
    """Interleaved Adam / K-FAC timing of each kind of K-FAC step of one refresh cycle.

    The K-FAC state is advanced to counts ``1 .. INVERSE_EVERY`` and each step
    is timed (from that state, so always the same kind of step) back to back
    with an Adam step: the median ratio per count. Counts ``1 .. INVERSE_EVERY - 2``
    are between refreshes, ``INVERSE_EVERY - 1`` adapts the damping and
    ``INVERSE_EVERY`` refreshes (with the statistics in the amortised setting).
    """
    k_step, a_step = _make_step(opt, loss, x, out_loss), _make_step(adam, loss, x)
    a_state = adam.init(p0)
    p, s = p0, opt.init(p0)
    states = []
    for _ in range(INVERSE_EVERY):
        p, s, _ = k_step(p, s)
        states.append((p, s))
    ratios, times, adam_times = [], [], []
    for p_k, s_k in states:
        r = C.time_paired(lambda: a_step(p_k, a_state)[2], lambda: k_step(p_k, s_k)[2],
                          repeats=repeats)
        ratios.append(r["ratio_b_over_a_median"])
        times.append(r["b"]["median_s"])
        adam_times.append(r["a"]["median_s"])
    return {"ratios": ratios, "kfac_s": times, "adam_s": adam_times, "pairs": repeats,
            "between": float(np.median(ratios[:-2])), "amortised": float(np.mean(ratios))}


def _step_time_row(name: str, costs: dict, best: str) -> list:
    """The headline row of a K-FAC setting's step time against Adam's: the times shown are
    the interleaved pairs' (those the ratios come from), K-FAC's between refreshes and
    amortised over a refresh cycle."""
    b, a = costs["between"], costs["amortised"]
    kfac_s = np.asarray(costs["kfac_s"], float)
    adam_s = float(np.median(costs["adam_s"]))
    return [
        f"autoencoder step time, {name}: between refreshes / amortised",
        f"{C._fmt_s(np.median(kfac_s[:-2]))} / {C._fmt_s(np.mean(kfac_s))}", best,
        C._fmt_s(adam_s), f"{b:.2f}x / {a:.2f}x (K-FAC / Adam, interleaved)", "-",
        f"{costs['pairs']} pairs per step kind",
        "<= 1.5x / <= 3x: " + ("met" if b <= 1.5 and a <= 3 else "MISSED"),
    ]


def _tuned_adam(adams: dict) -> tuple[str, float]:
    """``(name, target)``: the Adam run with the lowest finite loss, and that loss. A run
    that diverges (NaN) counts with its lowest loss before; one with none is never chosen."""
    lowest = {k: np.asarray(r["losses"], float) for k, r in adams.items()}
    lowest = {k: float(np.min(v[np.isfinite(v)])) for k, v in lowest.items()
              if np.isfinite(v).any()}
    if not lowest:
        raise RuntimeError(f"every Adam run diverged (no finite loss): {sorted(adams)}")
    best = min(lowest, key=lowest.get)
    return best, lowest[best]


def _to_target(losses, step_times, target):
    hit = np.nonzero(np.asarray(losses) <= target)[0]
    if not len(hit):
        return None, None
    k = int(hit[0])
    return k, float(np.sum(step_times[: k + 1]))


KFAC_JAX_RESULTS = {"autoencoder": "kfac_jax.json", "classifier": "kfac_jax_classifier.json"}


def _kfac_jax(python, steps, quick, problem="autoencoder"):
    path = C.RESULTS / KFAC_JAX_RESULTS[problem]
    if python:
        cmd = [python, "-m", "benchmarks.kfac_jax_ref", "--only", problem,
               "--steps", str(steps), "--damping", str(DAMPING),
               "--repeats", "1" if quick else "3"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX", "XLA"))}
        env["OPENBLAS_NUM_THREADS"] = "1"
        C.log("running kfac-jax:", " ".join(cmd))
        subprocess.run(cmd, cwd=C.ROOT.parent, env=env, check=True)
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    res["measured_now"], res["file"] = bool(python), path.name
    runs = res["runs"]
    losses = np.asarray(runs[0]["losses"], float)  # a diverged step's null loss: NaN
    times = np.median(np.asarray([r["step_times"] for r in runs], float), axis=0)  # warm runs
    cpu = float(np.median([r.get("cpu_s_per_step", np.nan) for r in runs]))
    return {"losses": losses, "step_times": times, "compile_s": res["compile_s"], "raw": res,
            "cpu_s_per_step": cpu}


def _race(problem, quick, kfac_jax_python):
    """Train every optimiser of ``problem``; the tuned Adam, its target and each run's
    steps and time to it. kfac-jax runs right after curvlib's ``kfac``."""
    steps = {"autoencoder": QUICK_STEPS if quick else STEPS,
             "classifier": CLASSIFIER_QUICK_STEPS if quick else CLASSIFIER_STEPS}[problem]
    repeats = 1 if quick else 3
    batch, p0, model, loss, out_loss = _problem(problem)
    runs, kj = {}, None
    for name, (opt, key) in optimisers(model, out_loss, batch["x"], problem).items():
        reps = repeats if not name.startswith("adam") else 1
        losses, times, comp, cpu = _train(opt, batch, p0, loss, steps[key], reps, out_loss)
        runs[name] = {"losses": losses, "step_times": times, "compile_s": comp,
                      "repeats": reps, "cpu_s_per_step": cpu}
        C.log(f"{problem} {name:22s} loss {losses[0]:.4g} -> {losses[-1] + 0.0:.4g}, median step "
              f"{1e3 * np.median(times):.2f} ms ({1e3 * cpu:.2f} CPU ms), compile {comp:.1f} s")
        if name == "kfac":  # kfac-jax right after, to keep the machine's load comparable
            kj = _kfac_jax(kfac_jax_python, steps["kfac_jax"], quick, problem)
    adams = {k: v for k, v in runs.items() if k.startswith("adam")}
    best, target = _tuned_adam(adams)
    # the tuned Adam: its timing re-measured with the same number of repeats as the others
    _, times, _, cpu = _train(optimisers(model, out_loss, batch["x"], problem)[best][0], batch,
                              p0, loss, steps["adam"], repeats)
    runs[best].update(step_times=times, repeats=repeats, cpu_s_per_step=cpu)
    if kj is not None:
        runs["kfac-jax"] = {"losses": kj["losses"], "step_times": kj["step_times"],
                            "compile_s": kj["compile_s"], "repeats": len(kj["raw"]["runs"]),
                            "cpu_s_per_step": kj["cpu_s_per_step"]}
    fmt = _fmt_loss(problem)
    table, reached = [], {}
    for name, r in runs.items():
        k, t = _to_target(r["losses"], r["step_times"], target)
        reached[name] = (k, t)
        table.append([name, len(r["losses"]), fmt(r["losses"][-1]),
                      C._fmt_s(np.median(r["step_times"][1:])), C._fmt_s(r["cpu_s_per_step"]),
                      "-" if k is None else k + 1, C._fmt_s(t), f"{r['compile_s']:.1f} s"])
    summary = "\n\n".join([
        f"Target: the tuned Adam's ({best}, best of {', '.join(adams)}) lowest loss in "
        f"{steps['adam']} steps, {fmt(target)} (at step {reached[best][0] + 1}; its last: "
        f"{fmt(runs[best]['losses'][-1])}).",
        C.md_table(["optimiser", "steps run", "final loss", "median step", "CPU time / step",
                    "steps to target", "time to target", "compile"], table),
    ])
    return {"runs": runs, "best": best, "target": target, "reached": reached, "kj": kj,
            "summary": summary, "repeats": repeats, "problem": (batch, p0, model, loss, out_loss)}


def _fmt_loss(problem):
    """A loss for the tables: 3 decimals (the autoencoder's ~16), else 3 significant digits
    (the classifier's cross-entropy falls to ~1e-5 and, in float32, to 0)."""
    return (lambda v: f"{float(v):.3f}") if problem == "autoencoder" else (
        lambda v: f"{float(v) + 0.0:.3g}")  # + 0.0: no "-0"


def _kfac_jax_note(kj) -> str:
    """Where kfac-jax's figures come from, when not measured in this run (else ``""``)."""
    if kj is None or kj["raw"].get("measured_now", True):
        return ""
    raw = kj["raw"]
    load = (raw.get("machine", {}).get("load_avg") or [None])[0]
    return (f" kfac-jax's figures were not measured in this run: read from "
            f"results/{raw.get('file')} (written {raw.get('date_utc', 'at an unrecorded date')}"
            f", commit {raw.get('git_commit', 'unrecorded')}, load {load} at its start; pass "
            "--kfac-jax-python to measure it alongside).")


def _kfac_jax_row(problem, race):
    """The headline row of curvlib's kfac against kfac-jax at equal settings, or None."""
    runs, reached = race["runs"], race["reached"]
    if "kfac-jax" not in runs:
        return None
    k, t = reached["kfac"]
    kk, tk = reached["kfac-jax"]
    cpu_ratio = runs["kfac-jax"]["cpu_s_per_step"] / runs["kfac"]["cpu_s_per_step"]
    raw = race["kj"]["raw"]
    peer = f"kfac-jax {raw.get('versions', {}).get('kfac_jax')}" + (
        "" if raw.get("measured_now", True) else " (an earlier run, read from its file)")
    return [
        f"{problem}, equal settings: curvlib kfac vs kfac-jax (to the target)",
        C._fmt_s(t), peer, C._fmt_s(tk), C._fmt_x(C.ratio(tk, t)),
        f"{'-' if k is None else k + 1} / {'-' if kk is None else kk + 1} steps; CPU time "
        f"per step kfac-jax / curvlib {cpu_ratio:.2f}x",
        f"{race['repeats']} / {runs['kfac-jax']['repeats']}",
        ">= 1x: " + ("met" if t is not None and tk is not None and t <= tk else "MISSED"),
    ]


def _notes(kj):
    import jax

    return [
        "Every step is timed alone (blocking on its loss); curvlib's side runs in this "
        "process, kfac-jax's in its own (jax 0.9.1), both with one OpenBLAS thread.",
        f"jax {jax.__version__}; kfac-jax: {kj['raw']['versions'] if kj else 'not run'}.",
    ] + ([_kfac_jax_note(kj).strip()] if _kfac_jax_note(kj) else [])


def _autoencoder(quick, kfac_jax_python, blas_limited) -> dict:
    """The autoencoder part of ``results/kfac.json``."""
    race = _race("autoencoder", quick, kfac_jax_python)
    runs, best, target, reached = race["runs"], race["best"], race["target"], race["reached"]
    repeats = race["repeats"]
    batch, p0, model, loss, out_loss = race["problem"]

    step_rows, ratios = [], {}
    import optax

    adam = optax.adam(float(best[5:-1]))
    opts = optimisers(model, out_loss, batch["x"])
    for name, label, ol in (("kfac", "kfac", out_loss), ("kfac", "kfac (two-pass)", None),
                            ("kfac (amortised)", "kfac (amortised)", out_loss)):
        costs = _step_costs(opts[name][0], adam, batch, p0, loss, 5 if quick else 15, ol)
        ratios[label] = (costs["between"], costs["amortised"])
        if label in runs:
            runs[label]["step_costs"] = costs
        else:
            runs["kfac"]["step_costs_two_pass"] = costs
        step_rows.append([label] + [f"{r:.2f}x" for r in costs["ratios"]]
                         + [f"{costs['between']:.2f}x", f"{costs['amortised']:.2f}x"])
    headline = []
    k_a, t_a = reached[best]
    for name in ("kfac", "kfac (amortised)"):
        k, t = reached[name]
        headline.append([
            f"autoencoder to the tuned {best}'s loss {target:.3f}: {name} vs Adam",
            C._fmt_s(t), best, C._fmt_s(t_a), C._fmt_x(C.ratio(t_a, t)),
            f"{'-' if k is None else k + 1} / {k_a + 1} steps", repeats,
            "fewer steps, less time: " + ("met" if k is not None and k < k_a and t < t_a
                                          else "MISSED"),
        ])
    for name in ("kfac", "kfac (amortised)"):
        headline.append(_step_time_row(name, runs[name]["step_costs"], best))
    one, two = ratios["kfac"][1], ratios["kfac (two-pass)"][1]
    costs = runs["kfac"]["step_costs"]
    headline.append([
        "autoencoder step time at the default settings (issue 22): one-pass K-FAC / Adam, "
        "amortised over a refresh cycle", C._fmt_s(np.mean(costs["kfac_s"])),
        best, C._fmt_s(np.median(costs["adam_s"])), f"{one:.2f}x (two-pass {two:.2f}x)", "-",
        f"{costs['pairs']} pairs per step kind", "<= 2x: " + ("met" if one <= 2 else "MISSED"),
    ])
    row = _kfac_jax_row("autoencoder", race)
    if row is not None:
        headline.append(row)
    plot = _plot(runs, target, best)
    summary = "\n\n".join([
        race["summary"],
        "K-FAC step time / Adam step time, interleaved pairs (median ratio of "
        f"{5 if quick else 15}), by the "
        f"step's position in a refresh cycle of {INVERSE_EVERY}: steps 1-{INVERSE_EVERY - 2} "
        f"are between refreshes, step {INVERSE_EVERY - 1} adapts the damping, step "
        f"{INVERSE_EVERY} refreshes the inverses (and takes the statistics, amortised).",
        C.md_table(["K-FAC setting"] + [f"step {i + 1}" for i in range(INVERSE_EVERY)]
                   + ["between refreshes", "amortised"], step_rows),
    ])
    return _part("K-FAC on the digits autoencoder (issues 15, 22)", headline, summary, plot,
                 race, blas_limited)


def _classifier(quick, kfac_jax_python, blas_limited) -> dict:
    """The classifier part of ``results/kfac.json``: steps and wall time to the tuned
    Adam's loss, ``curvlib.kfac`` at its default settings (and kfac-jax when run)."""
    race = _race("classifier", quick, kfac_jax_python)
    runs, best, target, reached = race["runs"], race["best"], race["target"], race["reached"]
    repeats = race["repeats"]
    k_a, t_a = reached[best]
    k, t = reached["kfac"]
    what = f"classifier to the tuned {best}'s loss {target:.3g}: kfac (default settings) vs Adam"
    steps = f"{'-' if k is None else k + 1} / {k_a + 1} steps"
    headline = [
        [f"{what}, steps", "-" if k is None else f"{k + 1} steps", best, f"{k_a + 1} steps",
         C._fmt_x(None if k is None else (k_a + 1) / (k + 1)) + " fewer steps (Adam / K-FAC)",
         steps, repeats,
         ">= 3x fewer steps than Adam: " + ("met" if k is not None and 3 * (k + 1) <= k_a + 1
                                             else "MISSED")],
        [f"{what}, wall time", C._fmt_s(t), best, C._fmt_s(t_a), C._fmt_x(C.ratio(t_a, t)),
         steps, repeats,
         "less wall time than Adam: " + ("met" if t is not None and t < t_a else "MISSED")],
    ]
    row = _kfac_jax_row("classifier", race)
    if row is not None:
        headline.append(row)
    plot = _plot(runs, target, best, "classifier")
    return _part("K-FAC on the digits classifier (issue 22)", headline, race["summary"], plot,
                 race, blas_limited)


def _part(title, headline, summary, plot, race, blas_limited) -> dict:
    """One problem's part of ``results/kfac.json``."""
    return {
        "title": title,
        "headline": headline,
        "summary_md": summary,
        "plots": [plot],
        "target": race["target"],
        "tuned_adam": race["best"],
        "blas_threads_limited": blas_limited,
        "runs": {k: _compact(v) for k, v in race["runs"].items()},
        "notes": _notes(race["kj"]),
        "meta": C.metadata(),
    }


def _previous_parts() -> dict:
    """The parts of the last ``results/kfac.json`` (one written before the classifier
    was added is the autoencoder part)."""
    path = C.RESULTS / "kfac.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if "parts" in old:
        return old["parts"]
    keys = ("title", "headline", "summary_md", "plots", "target", "tuned_adam",
            "blas_threads_limited", "runs", "notes", "meta")
    return {"autoencoder": {k: old[k] for k in keys if k in old}}


def run(quick: bool = False, kfac_jax_python: str | None = None,
        only: str | None = None) -> dict:
    """Race the problems (``only`` one of them: the other's part of the last
    ``results/kfac.json`` is kept) and write ``results/kfac.json``."""
    blas_limited = _limit_blas_threads()
    parts = _previous_parts() if only else {}
    for problem in PROBLEMS if only is None else (only,):
        make = _autoencoder if problem == "autoencoder" else _classifier
        parts[problem] = make(quick, kfac_jax_python, blas_limited)
    parts = {p: parts[p] for p in PROBLEMS if p in parts}
    payload = {
        "title": "K-FAC on the digits autoencoder and classifier (issues 15, 22)",
        "headline": [row for part in parts.values() for row in part["headline"]],
        "summary_md": "\n\n".join(f"### {part['title']}\n\n{part['summary_md']}"
                                   for part in parts.values()),
        "plots": [plot for part in parts.values() for plot in part["plots"]],
        "notes": list(dict.fromkeys(n for part in parts.values() for n in part["notes"])),
        "parts": parts,
    }
    path = C.write_result("kfac", payload)
    C.log(f"wrote {path}")
    return payload


def _compact(run: dict) -> dict:
    """A run for the JSON: curves at ~200 log-spaced steps (the plot uses every step)."""
    n = len(run["losses"])
    idx = np.unique(np.round(np.logspace(0, np.log10(n), 200)).astype(int) - 1)
    out = {k: v for k, v in run.items() if k not in ("losses", "step_times")}
    out["curve_steps"] = (idx + 1).tolist()
    out["losses"] = np.round(np.asarray(run["losses"])[idx], 5).tolist()
    out["cumulative_time_s"] = np.round(np.cumsum(run["step_times"])[idx], 6).tolist()
    out["median_step_s"] = float(np.median(run["step_times"][1:]))
    return out


def _plot(runs, target, best, problem="autoencoder"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        if name.startswith("adam") and name != best:
            continue
        t = np.cumsum(r["step_times"])
        axes[0].plot(np.arange(1, len(r["losses"]) + 1), r["losses"], label=name)
        axes[1].plot(t, r["losses"], label=name)
    for ax, xl in zip(axes, ("step", "wall-clock (s, compile excluded)"), strict=True):
        ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        if problem == "classifier":
            ax.set_yscale("log")
            ax.set_ylim(target / 10, 3)
            ax.set_ylabel("training loss (softmax cross-entropy)")
        else:
            ax.set_ylim(target - 1.0, 30)
            ax.set_ylabel("training loss (Bernoulli NLL)")
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle({"autoencoder": "digits autoencoder 64-32-16-8-16-32-64, full batch",
                  "classifier": "digits classifier 64-128-64-10, full batch"}[problem])
    fig.tight_layout()
    path = C.RESULTS / f"kfac_{problem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=PROBLEMS, default=None,
                    help="race one problem (default both); the other's results are kept")
    ap.add_argument("--kfac-jax-python", default=None,
                    help="python of the kfac-jax environment: run kfac_jax_ref.py first")
    args = ap.parse_args(argv)
    C.QUICK = args.quick
    run(quick=args.quick, kfac_jax_python=args.kfac_jax_python, only=args.only)


if __name__ == "__main__":
    sys.exit(main())
