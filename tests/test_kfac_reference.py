"""curvlib's K-FAC equals kfac-jax's on the same MLP and batch (exact-Fisher mode).

``tests/data/kfac_jax_reference.npz`` holds kfac-jax 0.0.8's "fisher_exact"
Kronecker factors of a 5-7-4 tanh MLP (dense layers with biases) on a batch of
6, for softmax cross-entropy and squared error (``weight=0.5``: the unit
Gaussian), and its products ``multiply`` (``(A (x) G) v``), ``multiply_inverse``
with pi-adjusted factored damping and with exact damping, all in float64.
kfac-jax does not run on this project's jax, so the file was written in a
separate environment by ``benchmarks/kfac_jax_ref.py`` (see its docstring to
regenerate it: ``python -m benchmarks.kfac_jax_ref --only factors`` under
jax 0.9.1). Martens & Grosse's convention for a mean loss: ``A`` is the mean of
``[a; 1][a; 1]^T`` (the bias as a homogeneous coordinate, last), ``G`` the mean
over examples of the per-example output factors.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvlib.kronecker import kfac_curvature

DATA = Path(__file__).with_name("data") / "kfac_jax_reference.npz"
LAYERS = ("l1", "l2")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(DATA))


def _tree(ref, prefix):
    return {l: {k: jnp.asarray(ref[f"{prefix}_{l}_{k}"]) for k in ("w", "b")} for l in LAYERS}


def _model(p, x):
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["l2"]["w"] + p["l2"]["b"]


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_factors_and_products_equal_kfac_jax(ref, likelihood):
    assert str(ref["kfac_jax_version"]) == "0.0.8"
    assert list(ref[f"{likelihood}_blocks"]) == ["DenseTwoKroneckerFactored"] * 2
    params, vector = _tree(ref, "params"), _tree(ref, "vector")
    curv = kfac_curvature(_model, params, jnp.asarray(ref["x"]), likelihood=likelihood)
    assert [l.weight_path for l in curv.layers.layers] == ["['l1']['w']", "['l2']['w']"]
    for i in range(2):
        A, G = ref[f"{likelihood}_A{i}"], ref[f"{likelihood}_G{i}"]
        np.testing.assert_allclose(curv.factors.A[i], A, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(curv.factors.G[i], G, rtol=1e-12, atol=1e-14)
    lam = float(ref["damping"])
    ops = {
        "multiply": curv.matvec,
        "inverse_factored": curv.inverse_matvec(lam, method="factored"),
        "inverse_exact": curv.inverse_matvec(lam, method="exact"),
    }
    for tag, op in ops.items():
        out = op(vector)
        for l in LAYERS:
            for k in ("w", "b"):
                want = ref[f"{likelihood}_{tag}_{l}_{k}"]
                np.testing.assert_allclose(out[l][k], want, rtol=1e-11,
                                           atol=1e-12 * np.max(np.abs(want)),
                                           err_msg=f"{tag} {l}.{k}")


def test_reference_data_is_not_trivial(ref):
    """The comparison above would pass vacuously on zeros or identical arrays."""
    for lik in ("categorical", "gaussian"):
        for i in range(2):
            assert np.linalg.matrix_rank(ref[f"{lik}_A{i}"]) > 1
            assert np.linalg.matrix_rank(ref[f"{lik}_G{i}"]) > 1
        fac = ref[f"{lik}_inverse_factored_l1_w"]
        ex = ref[f"{lik}_inverse_exact_l1_w"]
        assert np.max(np.abs(fac - ex)) > 1e-3 * np.max(np.abs(ex))  # the two dampings differ
    assert jax.numpy.asarray(ref["labels"]).dtype.kind == "i"
