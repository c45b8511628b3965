"""kfac-jax reference numbers for curvlib's K-FAC (run in kfac-jax's own environment).

kfac-jax 0.0.8 declares ``jax>=0.4.27`` but does not run on jax >= 0.9.2, so it is
a benchmark-only dependency living in a separate virtual environment, never
imported by curvlib. Create it once and run this script from the repository
root::

    python3 -m venv /work/kfacenv
    /work/kfacenv/bin/pip install jax==0.9.1 jaxlib==0.9.1 kfac-jax==0.0.8 \
        optax scikit-learn
    OPENBLAS_NUM_THREADS=1 /work/kfacenv/bin/python -m benchmarks.kfac_jax_ref  # all parts
    OPENBLAS_NUM_THREADS=1 /work/kfacenv/bin/python -m benchmarks.kfac_jax_ref --only factors

It writes

1. ``tests/data/kfac_jax_reference.npz`` (``--only factors``): kfac-jax's exact
   Fisher ("fisher_exact") Kronecker factors of a small tanh MLP on a fixed batch
   (softmax cross-entropy and squared error), and its curvature products
   ``multiply`` (``A (x) G v``), ``multiply_inverse`` with pi-adjusted factored
   damping, and with exact damping (eigendecompositions), together with the
   parameters, batch and vector, in float64. ``tests/test_kfac_reference.py``
   recomputes curvlib's side from the same arrays, so CI never needs kfac-jax.
2. ``benchmarks/results/kfac_jax.json`` (``--only autoencoder``): kfac-jax's
   optimizer on the digits autoencoder (``benchmarks/_autoencoder.py``, full
   batch, the settings of kfac-jax's own MNIST autoencoder example: adaptive
   learning rate, momentum and damping, Monte-Carlo Fisher with one sample):
   the loss after every step, the wall-clock of every step (after a warm-up run that
   compiles kfac-jax's step variants) and the compile time.
   ``benchmarks/kfac.py`` reads it.
3. ``benchmarks/results/kfac_jax_classifier.json`` (``--only classifier``): the
   same optimizer and settings on the digits classifier
   (``benchmarks/_classifier.py``, 64-128-64-10 tanh MLP, softmax cross-entropy,
   full batch); ``benchmarks/kfac.py --only classifier`` reads it.
4. ``--settings amortised`` (with ``--only autoencoder`` or ``--only classifier``): the same
   optimizer at curvlib's amortised setting (fixed step length 0.1 and momentum 0.9, curvature
   statistics every 5 steps), written to ``results/kfac_jax_<problem>_amortised.json``:
   steps to the tuned Adam's loss at equal settings (docs/kfac.md).

``OPENBLAS_NUM_THREADS=1``: jaxlib's CPU linear algebra (``eigh``, ``cholesky``)
calls scipy's OpenBLAS, whose threads fight XLA's on a small machine; both sides
of the comparison run with one OpenBLAS thread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FACTORS_PATH = ROOT / "tests" / "data" / "kfac_jax_reference.npz"
RESULTS_PATHS = {
    "autoencoder": ROOT / "benchmarks" / "results" / "kfac_jax.json",
    "classifier": ROOT / "benchmarks" / "results" / "kfac_jax_classifier.json",
}

# the small MLP of the factor comparison: 5 -> 7 (tanh) -> 4, batch of 6
D_IN, D_HID, D_OUT, N = 5, 7, 4, 6
DAMPING = 0.1


def _mlp_problem():
    rng = np.random.default_rng(0)
    params = {
        "l1": {"w": rng.standard_normal((D_IN, D_HID)) / 2, "b": rng.standard_normal(D_HID) / 4},
        "l2": {"w": rng.standard_normal((D_HID, D_OUT)) / 2, "b": rng.standard_normal(D_OUT) / 4},
    }
    x = rng.standard_normal((N, D_IN))
    labels = rng.integers(0, D_OUT, N)
    y_reg = rng.standard_normal((N, D_OUT))
    vector = {
        "l1": {"w": rng.standard_normal((D_IN, D_HID)), "b": rng.standard_normal(D_HID)},
        "l2": {"w": rng.standard_normal((D_HID, D_OUT)), "b": rng.standard_normal(D_OUT)},
    }
    return params, x, labels, y_reg, vector


def factors():
    import jax
    import jax.numpy as jnp
    import kfac_jax

    jax.config.update("jax_enable_x64", True)
    params, x, labels, y_reg, vector = _mlp_problem()
    params = jax.tree.map(jnp.asarray, params)
    vector = jax.tree.map(jnp.asarray, vector)

    def model(p, x):
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        return h @ p["l2"]["w"] + p["l2"]["b"]

    def loss_ce(p, batch):
        x, labels = batch
        logits = model(p, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, labels)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

    def loss_se(p, batch):
        x, y = batch
        pred = model(p, x)
        # 0.5 * sum of squares: kfac-jax's weight 0.5 (the Gaussian of unit variance)
        kfac_jax.register_squared_error_loss(pred, y, weight=0.5)
        return 0.5 * jnp.mean(jnp.sum((pred - y) ** 2, axis=-1))

    out = {"damping": np.asarray(DAMPING)}
    for name, fn, batch in (("categorical", loss_ce, (jnp.asarray(x), jnp.asarray(labels))),
                            ("gaussian", loss_se, (jnp.asarray(x), jnp.asarray(y_reg)))):
        est = kfac_jax.BlockDiagonalCurvature(fn, default_estimation_mode="fisher_exact")
        rng = jax.random.PRNGKey(0)
        state = est.init(rng, (params, batch), exact_powers_to_cache=None,
                         approx_powers_to_cache=None, cache_eigenvalues=False)
        state = est.update_curvature_matrix_estimate(
            state, ema_old=0.0, ema_new=1.0, identity_weight=0.0, batch_size=N, rng=rng,
            func_args=(params, batch), estimation_mode="fisher_exact",
        )
        for i, bs in enumerate(state.blocks_states):
            a, g = (f.value / f.weight for f in bs.factors)
            out[f"{name}_A{i}"] = np.asarray(a)
            out[f"{name}_G{i}"] = np.asarray(g)
        mul = est.multiply(state, vector, identity_weight=0.0, exact_power=True,
                           use_cached=False, pmap_axis_name=None)
        inv_pi = est.multiply_inverse(state, vector, identity_weight=DAMPING, exact_power=False,
                                      use_cached=False, pmap_axis_name=None)
        inv_exact = est.multiply_inverse(state, vector, identity_weight=DAMPING,
                                         exact_power=True, use_cached=False,
                                         pmap_axis_name=None)
        for tag, tree in (("multiply", mul), ("inverse_factored", inv_pi),
                          ("inverse_exact", inv_exact)):
            for layer in ("l1", "l2"):
                for leaf in ("w", "b"):
                    out[f"{name}_{tag}_{layer}_{leaf}"] = np.asarray(tree[layer][leaf])
        out[f"{name}_blocks"] = np.asarray([str(b.__class__.__name__) for b in est.blocks])
    for layer in ("l1", "l2"):
        for leaf in ("w", "b"):
            out[f"params_{layer}_{leaf}"] = np.asarray(params[layer][leaf])
            out[f"vector_{layer}_{leaf}"] = np.asarray(vector[layer][leaf])
    out["x"], out["labels"], out["y_reg"] = x, labels, y_reg
    out["kfac_jax_version"] = np.asarray(kfac_jax.__version__)
    out["jax_version"] = np.asarray(jax.__version__)
    FACTORS_PATH.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FACTORS_PATH, **out)
    print(f"wrote {FACTORS_PATH} ({len(out)} arrays)")


def _problem(problem: str, seed: int):
    """``(batch, params, loss_fn, value_fn, description)`` of the autoencoder or the
    classifier: ``loss_fn`` registers the loss with kfac-jax, ``value_fn`` does not."""
    import jax
    import jax.numpy as jnp
    import kfac_jax

    if problem == "classifier":
        from benchmarks import _classifier as CL

        x, y = (jnp.asarray(a) for a in CL.data())
        params = jax.tree.map(jnp.asarray, CL.init_params(seed))

        def loss_fn(p, batch):
            x, y = batch
            logits = CL.model(p, x, jnp)
            kfac_jax.register_softmax_cross_entropy_loss(logits, y)
            return CL.softmax_xent(logits, y, jnp)

        def value_fn(p, batch):
            return CL.softmax_xent(CL.model(p, batch[0], jnp), batch[1], jnp)

        return (x, y), params, loss_fn, value_fn, (
            "digits classifier 64-128-64-10, full batch 1792, softmax cross-entropy")
    from benchmarks import _autoencoder as AE

    x = jnp.asarray(AE.data())
    params = jax.tree.map(jnp.asarray, AE.init_params(seed))

    def loss_fn(p, batch):
        logits = AE.model(p, batch, jnp)
        kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
        return AE.bernoulli_nll(logits, batch, jnp)

    def value_fn(p, batch):
        return AE.bernoulli_nll(AE.model(p, batch, jnp), batch, jnp)

    return x, params, loss_fn, value_fn, (
        "digits autoencoder 64-32-16-8-16-32-64, full batch 1792, Bernoulli NLL")


AMORTISED = {"learning_rate": 0.1, "momentum": 0.9, "every": 5}


def optimizer_run(problem: str, num_steps: int, initial_damping: float, seed: int,
                  repeats: int, settings: str = "adaptive"):
    """kfac-jax's optimizer on ``problem`` ("autoencoder" or "classifier").

    ``settings="adaptive"``: its example's settings (curvlib's ``kfac`` defaults);
    ``"amortised"``: curvlib's amortised setting, ``kfac(0.1, momentum=0.9,
    statistics_every=5, damping_every=5)``: a fixed step length and momentum, the
    curvature statistics, inverses and damping adaptation every 5 steps.
    """
    import jax
    import jax.numpy as jnp
    import kfac_jax

    batch, params, loss_fn, value_fn, description = _problem(problem, seed)

    if settings == "amortised":
        lr, mom = AMORTISED["learning_rate"], AMORTISED["momentum"]
        step_options = dict(use_adaptive_learning_rate=False, learning_rate_schedule=lambda s: lr,
                            use_adaptive_momentum=False, momentum_schedule=lambda s: mom,
                            curvature_update_period=AMORTISED["every"])
    else:
        step_options = dict(use_adaptive_learning_rate=True, use_adaptive_momentum=True)

    def make():
        return kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn),
            l2_reg=0.0,
            **step_options,
            use_adaptive_damping=True,
            initial_damping=initial_damping,
            min_damping=1e-8,
            max_damping=1e8,
            damping_adaptation_interval=5,
            damping_adaptation_decay=0.95,
            curvature_ema=0.95,
            inverse_update_period=5,
            num_burnin_steps=0,
            estimation_mode="fisher_gradients",
            multi_device=False,
        )

    rng = jax.random.PRNGKey(seed)
    opt = make()  # one instance: its jitted step variants compile once, in the warm-up run
    runs = []
    compile_s = None
    for r in range(repeats + 1):  # run 0 warms up (kfac-jax compiles several step variants)
        t0 = time.perf_counter()
        p = jax.tree.map(jnp.copy, params)  # kfac-jax donates the params' buffers
        state = opt.init(p, rng, batch)
        losses, step_times = [], []
        c0 = time.process_time()
        for step in range(num_steps):
            ts = time.perf_counter()
            p, state, stats = opt.step(p, state, jax.random.fold_in(rng, step), batch=batch,
                                       global_step_int=step)
            loss = float(stats["loss"])  # blocks: the loss of the step's incoming params
            step_times.append(time.perf_counter() - ts)
            losses.append(loss)
        cpu_per_step = (time.process_time() - c0) / num_steps
        final = float(value_fn(p, batch))
        if r == 0:
            compile_s = time.perf_counter() - t0 - float(np.median(step_times)) * num_steps
            warm = losses
            print(f"warm-up run: compile and first calls {compile_s:.1f} s")
            continue
        assert losses == warm, "kfac-jax's run is not deterministic"
        runs.append({"losses": losses, "step_times": step_times, "final_loss": final,
                     "cpu_s_per_step": cpu_per_step})
        print(f"repeat {r}: loss {losses[0]:.4g} -> {final:.4g}; median step "
              f"{1e3 * np.median(step_times):.2f} ms")
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "model": description,
        "optimizer": ("kfac_jax.Optimizer(adaptive lr, momentum, damping; fisher_gradients)"
                      if settings == "adaptive" else
                      "kfac_jax.Optimizer(lr 0.1, momentum 0.9, curvature every 5, adaptive "
                      "damping; fisher_gradients)"),
        "settings": settings,
        "initial_damping": initial_damping,
        "num_steps": num_steps,
        "compile_s": compile_s,
        "runs": runs,
        "versions": {"kfac_jax": kfac_jax.__version__, "jax": jax.__version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg(),
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
    }


def _strict(x):
    """``x`` as strict JSON values: a NaN loss (a diverged step) becomes ``None``."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _git_commit() -> str | None:
    """The short commit of the repository this runs from (``None`` without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("factors",) + tuple(RESULTS_PATHS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--damping", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", choices=("adaptive", "amortised"), default="adaptive",
                    help="amortised: curvlib's kfac(0.1, momentum=0.9, statistics_every=5); "
                    "written to results/kfac_jax_<problem>_amortised.json")
    args = ap.parse_args(argv)
    if args.only in (None, "factors"):
        factors()
    for problem, path in RESULTS_PATHS.items():
        if args.only in (None, problem):
            res = optimizer_run(problem, args.steps, args.damping, args.seed, args.repeats,
                                args.settings)
            if args.settings == "amortised":
                path = path.with_name(f"kfac_jax_{problem}_amortised.json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_strict(res), indent=1, allow_nan=False))
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
