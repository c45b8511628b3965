"""The foundation demo: top Hessian eigenvalues and spectral density of a small MLP on digits."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import curvlib
from curvlib import _tree, _validate
from curvlib.demo import data as _data
from curvlib.demo import models as _models
from curvlib.demo import report as _report


@dataclasses.dataclass
class SpectrumConfig:
    """Options of the spectrum demo (the CLI's ``--task spectrum`` flags)."""

    hidden: int = 32
    train_steps: int = 300
    batch_size: int = 128
    top_k: int = 10
    num_matvecs: int = 40
    num_probes: int = 8
    seed: int = 0
    out: str = "demo_output"
    plot: bool = True

    def validate(self) -> None:
        """Check every option before any work; ``ValueError`` names the option and its flag."""
        flags = {"hidden": "--hidden", "top_k": "--top-k", "train_steps": "--mlp-steps",
                 "batch_size": "batch_size", "num_matvecs": "num_matvecs",
                 "num_probes": "num_probes", "seed": "--seed"}
        for name, low in (("hidden", 1), ("top_k", 1), ("train_steps", 1), ("batch_size", 1),
                          ("num_matvecs", 2), ("num_probes", 1), ("seed", 0)):
            _validate.static_int(getattr(self, name), f"{name} ({flags[name]})", minimum=low,
                                 maximum=2**32 - 1 if name == "seed" else None)  # JAX's seeds
        n = (64 + 1) * self.hidden + (self.hidden + 1) * 10  # the 64-hidden-10 MLP
        if self.top_k >= n:
            raise ValueError(f"top_k (--top-k) = {self.top_k} must be smaller than the MLP's "
                             f"parameter count N = {n}.")


def run_spectrum(cfg: SpectrumConfig, log=print) -> dict[str, Any]:
    """Train an MLP on scikit-learn's digits, then eigsh and SLQ on its full-batch Hessian."""
    cfg.validate()
    log = _report.wrapped(log)
    t_start = time.perf_counter()
    d = _data.load_digits(seed=cfg.seed)
    model = _models.MLP(hidden=(cfg.hidden,))
    key = jax.random.PRNGKey(cfg.seed)
    k_init, k_train, k_eig, k_slq = jax.random.split(key, 4)
    loss_fn = _models.classifier_loss_fn(model)
    xtr, ytr = jnp.asarray(d.x_train), jnp.asarray(d.y_train)
    params, acc, t_train = _train_mlp(cfg, d, model, loss_fn, k_init, k_train, log)
    n = _tree.size(params)
    res, low, sd, t_eig, t_slq = _spectra(cfg, loss_fn, params, (xtr, ytr), k_eig, k_slq)
    lam = np.asarray(res.eigenvalues)
    _log_spectra(cfg, res, low, sd, t_eig, t_slq, log)
    report = dict(config=dataclasses.asdict(cfg), parameters=n, test_accuracy=acc,
                  train_seconds=t_train, eigenvalues=lam.tolist(),
                  smallest_eigenvalues=np.asarray(low.eigenvalues).tolist(),
                  residual_norms=np.asarray(res.residual_norms).tolist(),
                  converged=bool(res.converged), num_matvecs=int(res.num_matvecs),
                  eigsh_seconds=t_eig, slq_seconds=t_slq,
                  density=dict(grid=np.asarray(sd.grid).tolist(),
                               density=np.asarray(sd.density).tolist()))
    return _write_report(cfg, report, sd, lam, t_start, log)


def _train_mlp(cfg: SpectrumConfig, d, model, loss_fn, k_init, k_train, log):
    """``(params, test accuracy, seconds)``: the MLP trained by minibatch steps, logged."""
    params = model.init(k_init, jnp.zeros((1, d.x_train.shape[1])))["params"]
    xtr, ytr = jnp.asarray(d.x_train), jnp.asarray(d.y_train)

    def sample_batch(k):
        i = jax.random.randint(k, (cfg.batch_size,), 0, xtr.shape[0])
        return xtr[i], ytr[i]

    t0 = time.perf_counter()
    params, losses = _models.train(loss_fn, params, sample_batch, key=k_train,
                                   num_steps=cfg.train_steps, learning_rate=1e-2)
    jax.block_until_ready(losses)
    t_train = time.perf_counter() - t0
    logits = model.apply({"params": params}, jnp.asarray(d.x_test))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(d.y_test)))
    n = _tree.size(params)
    log(f"MLP 64-{cfg.hidden}-10 ({n:,} parameters) on digits: {t_train:.1f} s, "
        f"train loss {float(losses[-10:].mean()):.3f}, test accuracy {acc:.3f}")
    return params, acc, t_train


def _spectra(cfg: SpectrumConfig, loss_fn, params, batch, k_eig, k_slq):
    """``(top, bottom, density, eigsh seconds, SLQ seconds)`` of the full-batch Hessian."""

    @jax.jit
    def top(params, key):
        mv = curvlib.hessian_matvec(loss_fn, params, batch)
        v0 = _tree.normal_like(key, params)
        return curvlib.eigsh(mv, v0, cfg.top_k, which="LA")

    @jax.jit
    def bottom(params, key):
        mv = curvlib.hessian_matvec(loss_fn, params, batch)
        return curvlib.eigsh(mv, _tree.normal_like(key, params), 3, which="SA")

    @jax.jit
    def density(params, key):
        mv = curvlib.hessian_matvec(loss_fn, params, batch)
        return curvlib.spectral_density(mv, params, key, num_matvecs=cfg.num_matvecs,
                                        num_probes=cfg.num_probes)

    t0 = time.perf_counter()
    res = jax.block_until_ready(top(params, k_eig))
    t_eig = time.perf_counter() - t0
    low = jax.block_until_ready(bottom(params, k_eig))
    t0 = time.perf_counter()
    sd = jax.block_until_ready(density(params, k_slq))
    t_slq = time.perf_counter() - t0
    return res, low, sd, t_eig, t_slq


def _log_spectra(cfg: SpectrumConfig, res, low, sd, t_eig, t_slq, log) -> None:
    """Log the top and bottom eigenvalues and the spectral density's range."""
    lam = np.asarray(res.eigenvalues)
    log(f"top-{cfg.top_k} Hessian eigenvalues (eigsh, {int(res.num_matvecs)} products, "
        f"{t_eig:.1f} s, converged={bool(res.converged)}): " + " ".join(f"{v:.4g}" for v in lam))
    log("smallest (signed) eigenvalues: " + " ".join(f"{v:.3g}" for v in low.eigenvalues))
    log(f"spectral density: SLQ with {cfg.num_probes} probes x {cfg.num_matvecs} steps, "
        f"{t_slq:.1f} s; Ritz nodes span [{float(sd.nodes.min()):.3g}, "
        f"{float(sd.nodes.max()):.3g}]")


def _write_report(cfg: SpectrumConfig, report, sd, lam, t_start, log) -> dict[str, Any]:
    """``report`` with the figure (if plotting) and JSON written under ``cfg.out``."""
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.plot:
        png = os.path.join(cfg.out, "spectrum_mlp.png")
        _report.plot_spectrum(sd.grid, sd.density, lam, cfg.top_k, png)
        report["figure"] = png
    path = os.path.join(cfg.out, "spectrum_mlp.json")
    report["total_seconds"] = time.perf_counter() - t_start
    report["machine"] = _report.machine_info()
    _report.write_json(report, path)
    report["json"] = path
    log(f"wrote {path}; total {report['total_seconds']:.1f} s")
    return report
