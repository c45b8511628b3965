"""State: results and transform states serialise; checkpoints resume exactly; same key, same bits.

* Every result ``NamedTuple`` (Krylov, stochastic, landscape) and every transform
  state (plain and chained into the public aliases) round-trips through
  ``flax.serialization.to_bytes``/``from_bytes`` (into a template) and ``pickle``,
  with values, dtypes and tree structure intact.
* A ``newton_cg`` training run checkpointed mid-way (bytes written, a fresh
  template restored, the loop resumed) is bit-identical to the uninterrupted run;
  likewise ``bfgs`` and ``track_curvature``.
* Determinism on CPU: the same key gives bit-identical results here and in a fresh process
  (its own trace and compilation).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import curvlib
from curvlib import landscape, optim

# ------------------------------------------------------------------- problem


def _problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(11), 4)
    params = {"w": jax.random.normal(k1, (3, 5)) / 2, "v": jax.random.normal(k2, (5,)) / 2}
    x = jax.random.normal(k3, (24, 3))
    y = jnp.sin(x @ jnp.array([1.0, -1.0, 0.5]))
    return params, x, y


def _model(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


def _loss(p, x, y):
    return 0.5 * jnp.mean((_model(p, x) - y) ** 2)


def _loss_b(p, b):
    return _loss(p, *b)


def _results():
    """One instance of every public result type (small problems, float64)."""
    params, x, y = _problem()
    key = jax.random.PRNGKey(0)
    mv = curvlib.hessian_matvec(_loss, params, x, y)
    v0 = jax.tree.map(jnp.ones_like, params)
    out = {
        "lanczos": curvlib.lanczos(mv, v0, 6),
        "eigsh": curvlib.eigsh(mv, v0, 2, basis_size=10),
        "cg": curvlib.cg(mv, v0, damping=0.1),
        "power": curvlib.power_iteration(mv, v0, 1, num_iters=20),
        "trace": curvlib.hutchinson_trace(mv, v0, key, 6),
        "diag": curvlib.hutchinson_diag(mv, v0, key, 3),
        "density": curvlib.spectral_density(mv, v0, key, num_matvecs=5, num_probes=2,
                                            num_points=16),
        "symmetry": curvlib.check_symmetric(mv, v0, key),
    }
    data = (x, y)
    sub = landscape.curvature_subspace(_loss_b, params, data, 12, 2, key=key)
    co = landscape.increment_coefficients(_loss_b, params, data, 12, sub.eigenvectors)
    out["subspace"] = sub
    out["coefficients"] = co
    out["closed_form_terms"] = landscape.delta2_closed_form_terms(co.a, co.c, co.B, 1e-3)
    out["quadratic_mc"] = landscape.delta2_quadratic_mc(co.a, co.c, co.B, 1e-3, key=key,
                                                         num_samples=4)
    return out


def _transforms():
    ggn = (_model, lambda o, y: 0.5 * jnp.mean((o - y) ** 2))
    return {
        "scale_by_newton_cg": optim.scale_by_newton_cg(),
        "scale_by_newton_cg_ggn": optim.scale_by_newton_cg(ggn=ggn),
        "newton_cg": optim.newton_cg(1.0),
        "scale_by_newton": optim.scale_by_newton(),
        "newton": optim.newton(1.0),
        "scale_by_bfgs": optim.scale_by_bfgs(),
        "bfgs": optim.bfgs(1.0),
        "scale_by_svrg": optim.scale_by_svrg(snapshot_every=2),
        "svrg": optim.svrg(0.1, snapshot_every=2),
        "track_curvature": optim.track_curvature(key=jax.random.PRNGKey(5), every=1, k=1),
    }


def _stepped_states():
    """Each transform's state after two updates (so the state is not its init)."""
    params, x, y = _problem()
    out = {}
    for name, tx in _transforms().items():
        extra = {"full_value_fn": lambda p: _loss(p, x, y)} if "svrg" in name else {}
        state, p = tx.init(params), params
        for _ in range(2):
            value, g = jax.value_and_grad(_loss)(p, x, y)
            u, state = tx.update(g, state, p, value=value, grad=g, value_fn=_loss, x=x, y=y,
                                 **extra)
            p = optax.apply_updates(p, u)
        out[name] = state
    return out


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def results():
    return _results()


@pytest.fixture(scope="module")
def states():
    return _stepped_states()


# ------------------------------------------------------------- serialisation


def test_every_result_type_is_covered(results):
    names = {type(r).__name__ for r in results.values()}
    for cls in ("LanczosResult", "EigshResult", "CGResult", "PowerIterationResult",
                "SpectralDensity", "SymmetryCheck",
                "IncrementCoefficients", "ClosedFormTerms", "MonteCarloEstimate"):
        assert cls in names


@pytest.mark.parametrize("how", ["flax", "pickle"])
def test_results_round_trip(results, how):
    for name, r in results.items():
        if how == "flax":
            back = serialization.from_bytes(r, serialization.to_bytes(r))
        else:
            back = pickle.loads(pickle.dumps(r))
        assert type(back) is type(r), name
        _assert_same(back, r)


@pytest.mark.parametrize("how", ["flax", "pickle"])
def test_transform_states_round_trip(states, how):
    params, _, _ = _problem()
    txs = _transforms()
    for name, s in states.items():
        if how == "flax":
            template = txs[name].init(params)  # a fresh state is the restore template
            back = serialization.from_bytes(template, serialization.to_bytes(s))
        else:
            back = pickle.loads(pickle.dumps(s))
        _assert_same(back, s)


# ------------------------------------------------------ checkpoint and resume


def _train(tx, params, x, y, steps, state=None):
    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(_loss)(p, x, y)
        u, s = tx.update(g, s, p, value=value, grad=g, value_fn=_loss, x=x, y=y,
                         full_value_fn=lambda q: _loss(q, x, y))
        return optax.apply_updates(p, u), s

    s = tx.init(params) if state is None else state
    p = params
    for _ in range(steps):
        p, s = step(p, s)
    return p, s


@pytest.mark.parametrize(
    "name, how",
    [("newton_cg", "flax"), ("newton_cg", "pickle"), ("newton", "flax"), ("bfgs", "flax"),
     ("svrg", "flax"), ("track_curvature", "flax")],
)
def test_checkpoint_resume_is_bit_identical(name, how, tmp_path):
    params, x, y = _problem()
    make = {
        "newton_cg": lambda: optim.newton_cg(1.0, damping=0.5, cg=curvlib.CG(max_steps=8)),
        "newton": lambda: optim.newton(0.5),
        "bfgs": lambda: optim.bfgs(0.5),
        "svrg": lambda: optim.svrg(0.1, snapshot_every=2),
        "track_curvature": lambda: optax.chain(
            optim.track_curvature(key=jax.random.PRNGKey(5), every=2, k=1), optax.sgd(0.1)
        ),
    }[name]
    p_full, s_full = _train(make(), params, x, y, 6)

    p_half, s_half = _train(make(), params, x, y, 3)
    ckpt = tmp_path / "ckpt.bin"
    if how == "flax":
        ckpt.write_bytes(serialization.to_bytes({"params": p_half, "opt_state": s_half}))
        tx = make()  # a new process would rebuild the transform and a template
        template = {"params": params, "opt_state": tx.init(params)}
        restored = serialization.from_bytes(template, ckpt.read_bytes())
    else:
        ckpt.write_bytes(pickle.dumps({"params": p_half, "opt_state": s_half}))
        tx = make()
        restored = pickle.loads(ckpt.read_bytes())
    p_res, s_res = _train(tx, restored["params"], x, y, 3, state=restored["opt_state"])
    _assert_same(p_res, p_full)
    _assert_same(s_res, s_full)


# ---------------------------------------------------------------- determinism


_DETERMINISM_SCRIPT = r"""
import sys
import jax
jax.config.update("jax_enable_x64", True)
import importlib.util
spec = importlib.util.spec_from_file_location("t", sys.argv[1])
t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)
for name, r in t._keyed_results(jax.random.PRNGKey(int(sys.argv[2]))).items():
    print(name, t._fingerprint(r))
"""


def _keyed_results(key):
    """Everything in curvlib that consumes a key (or a random start vector drawn from one)."""
    params, x, y = _problem()
    mv = curvlib.hessian_matvec(_loss, params, x, y)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    v0 = jax.tree.map(lambda p: jax.random.normal(k1, p.shape, p.dtype), params)
    sub = landscape.curvature_subspace(_loss_b, params, (x, y), 12, 2, key=k4)
    co = landscape.increment_coefficients(_loss_b, params, (x, y), 12, sub.eigenvectors)
    return {
        "eigsh": curvlib.eigsh(mv, v0, 2, basis_size=10),
        "hutch++": curvlib.hutchinson_trace(mv, params, k2, 9),
        "slq": curvlib.spectral_density(mv, params, k3, num_matvecs=6, num_probes=3,
                                        num_points=32),
        "subspace": sub,
        "mc": landscape.delta2_quadratic_mc(co.a, co.c, co.B, jnp.array([1e-3, 1e-2]), key=k5,
                                            num_samples=8),
    }


def _fingerprint(tree) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def test_same_key_same_bits_here_and_in_a_fresh_process():
    """A fresh interpreter (its own trace and compile, no shared cache) reproduces this process's
    results bit for bit; another key changes every one of them."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", _DETERMINISM_SCRIPT, str(Path(__file__).resolve()), "42"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    here = {n: _fingerprint(r) for n, r in _keyed_results(jax.random.PRNGKey(42)).items()}
    other = {n: _fingerprint(r) for n, r in _keyed_results(jax.random.PRNGKey(43)).items()}
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    fresh = dict(line.split() for line in out.strip().splitlines())
    assert set(here) == {"eigsh", "hutch++", "slq", "subspace", "mc"}
    assert fresh == here
    assert all(other[n] != here[n] for n in here)


def test_fingerprint_is_sensitive():
    assert _fingerprint({"a": jnp.zeros(3)}) != _fingerprint({"a": jnp.zeros(3).at[1].set(1e-300)})
    assert hashlib.sha256(b"").hexdigest() != _fingerprint({"a": jnp.zeros(0)})
