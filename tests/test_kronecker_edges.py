"""Edge cases of K-FAC's layer discovery, factors and one-pass statistics, and of the
per-block spectra (`block_eigsh`, `restrict`), each against an independent oracle."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvlib
from curvlib.kronecker import find_layers, kfac_curvature


def _out_loss(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


# an id below -vocab stays out of range after numpy-style wrapping: "fill" lookups read
# the fill value there, and K-FAC must not count it against any row of the table
_IDS = jnp.array([[0, 1], [-1, 2], [7, -7], [4, 4], [-100, 3]])
_Y = jnp.array([0, 1, 2, 1, 0])


def _fill_lookup(p, ids):
    return p["e"].at[ids].get(mode="fill", fill_value=0.0).sum(1)


def _mixed_lookup(p, ids):  # one table, read clamped and with a fill value
    return (jnp.take(p["e"], ids, axis=0, mode="clip").sum(1)
            + p["e"].at[ids].get(mode="fill", fill_value=0.0).sum(1))


@pytest.mark.parametrize("model", [_fill_lookup, _mixed_lookup], ids=["fill", "fill+clip"])
def test_out_of_range_ids_of_a_fill_lookup_touch_no_row(model):
    V = 5
    p = {"e": jnp.asarray(np.random.default_rng(0).normal(size=(V, 3)))}
    assert [l.kind for l in find_layers(model, p, _IDS).layers] == ["embedding"]
    opt = curvlib.kfac(model_fn=model, example_inputs={"ids": _IDS})
    (value, grads), _ = opt.value_and_grad(_out_loss)(p, opt.init(p), ids=_IDS, y=_Y)
    want_value, want = jax.value_and_grad(lambda p: _out_loss(model(p, _IDS), _Y))(p)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grads["e"], want["e"], rtol=1e-10, atol=1e-14)
    # A: the frequencies of the rows each lookup reads (none for an id out of range)
    # (`at[].get` wraps negative ids first; `take(mode="clip")` clamps them as they are)
    ids = np.asarray(_IDS)
    wrapped = np.where(ids < 0, ids + V, ids)
    reads = [np.clip(ids, 0, V - 1)] if model is _mixed_lookup else []
    reads.append(wrapped[(wrapped >= 0) & (wrapped < V)])
    counts = np.bincount(np.concatenate([r.ravel() for r in reads]), minlength=V)
    C = kfac_curvature(model, p, _IDS)
    np.testing.assert_allclose(C.factors.A[0], counts / (_IDS.size * len(reads)), rtol=1e-12)


def test_ekfac_scales_of_a_clamped_lookup_count_the_rows_it_reads():
    from curvlib.kronecker import curvature

    V = 5
    p = {"e": jnp.asarray(np.random.default_rng(3).normal(size=(V, 3)))}
    ids = jnp.array([[0, 1], [7, 2], [9, 3]])  # 7 and 9 read row 4

    def model(p, ids):
        return jnp.take(p["e"], ids, axis=0, mode="clip").sum(1)

    layers = find_layers(model, p, ids)
    basis = curvature.eigen(layers, curvature.statistics(layers, p, [ids],
                                                         likelihood="gaussian")[0])
    _, _, scales = curvature.statistics(layers, p, [ids], likelihood="gaussian",
                                        eigenbasis=basis)
    # EK-FAC: the mean over examples of the squared per-example gradients in the eigenbasis
    # (Gaussian: one per output entry); no id repeats within an example here
    want = 0
    for n in range(ids.shape[0]):
        J = jax.jacobian(lambda e: model({"e": e}, ids[n:n + 1])[0])(p["e"])
        want = want + sum(np.square(np.asarray(J[c]) @ np.asarray(basis.QG[0]))
                          for c in range(J.shape[0])) / ids.shape[0]
    np.testing.assert_allclose(scales[0], want, rtol=1e-10, atol=1e-14)


def _dense(matvec, params):
    """The dense matrix of a linear operator on pytrees shaped like ``params``."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return np.stack([jax.flatten_util.ravel_pytree(matvec(unravel(e)))[0]
                     for e in np.eye(flat.size)], axis=1)


def test_a_python_float_parameter_is_a_diagonal_block_of_the_operator():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)))
    params = {"w": np.full((3, 2), 0.5), "s": 2.0}  # a scalar parameter given as a float

    def model(p, x):
        return x @ p["w"] * p["s"]

    C = kfac_curvature(model, params, x, likelihood="gaussian")
    v = {"w": np.ones((3, 2)), "s": 1.0}
    # the scalar's block: the mean over examples of its squared gradients, ||x_n w||^2
    d = float(np.mean(np.sum((np.asarray(x) @ params["w"]) ** 2, axis=1)))
    np.testing.assert_allclose(C.factors.D[0], d, rtol=1e-12)
    np.testing.assert_allclose(C.matvec(v)["s"], d, rtol=1e-12)
    np.testing.assert_allclose(C.inverse_matvec(0.5)(v)["s"], 1.0 / (d + 0.5), rtol=1e-12)
    np.testing.assert_allclose(C.inverse_matvec(0.5, method="factored")(v)["s"],
                               1.0 / (d + 0.5), rtol=1e-12)


def test_a_batch_without_examples_is_refused():
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match="at least one example"):
        kfac_curvature(lambda p, x: x @ p["w"] + p["b"], params, jnp.ones((0, 3)),
                       likelihood="gaussian")


def _mlp_problem():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 3)))
    params = {"w1": jnp.asarray(rng.normal(size=(3, 4))), "b1": jnp.asarray(rng.normal(size=4)),
              "w2": jnp.asarray(rng.normal(size=(4, 2)))}

    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    return model, params, x


def test_block_spectra_of_the_kfac_operator_are_products_of_factor_eigenvalues():
    model, params, x = _mlp_problem()
    C = kfac_curvature(model, params, x, likelihood="gaussian")
    blocks = {"w1": "first", "b1": "first", "w2": "second"}
    spectra = curvlib.block_eigsh(C.matvec, params, 3, key=jax.random.key(0), blocks=blocks)
    for i, name in enumerate(["first", "second"]):  # the layers in leaf order: b1 < w1 < w2
        ea, eg = np.linalg.eigvalsh(C.factors.A[i]), np.linalg.eigvalsh(C.factors.G[i])
        want = np.sort(np.outer(ea, eg).ravel())[::-1][:3]
        np.testing.assert_allclose(spectra[name].eigenvalues, want, rtol=1e-9, atol=1e-12)
    # the operator object itself is not one: refused by name, not deep in a trace
    with pytest.raises(TypeError, match="`matvec` must be callable; got KfacCurvature"):
        curvlib.block_eigsh(C, params, 1, key=jax.random.key(0))


def test_block_labels_from_a_mask_are_refused():
    model, params, x = _mlp_problem()
    H = curvlib.hessian_matvec(lambda p: jnp.sum(model(p, x) ** 2), params)
    mask = {"w1": True, "b1": True, "w2": False}  # restrict's `where`, not block labels
    with pytest.raises(ValueError, match=r"bool label\(s\) \['False', 'True'\]"):
        curvlib.block_eigsh(H, params, 2, key=jax.random.key(0), blocks=mask)
    # as the message says: the mask's leaves as one block, against the dense Hessian block
    labels = jax.tree.map(lambda m: "sel" if m else None, mask)
    got = curvlib.block_eigsh(H, params, 2, key=jax.random.key(0), blocks=labels)
    assert list(got) == ["sel"]
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    dense = jax.hessian(lambda f: jnp.sum(model(unravel(f), x) ** 2))(flat)
    sel = np.r_[0:4, 4:16]  # ravel order: b1 (4), w1 (12), w2 (8)
    want = np.linalg.eigvalsh(np.asarray(dense)[np.ix_(sel, sel)])[::-1][:2]
    np.testing.assert_allclose(got["sel"].eigenvalues, want, rtol=1e-9)


def test_block_labels_and_masks_that_do_not_fit_params_name_the_leaf():
    model, params, x = _mlp_problem()
    H = curvlib.hessian_matvec(lambda p: jnp.sum(model(p, x) ** 2), params)
    extra = {"w1": "a", "b1": "a", "w2": "b", "w3": "c"}
    with pytest.raises(ValueError, match=r"`blocks` has \['w3'\], which `params` does not"):
        curvlib.block_eigsh(H, params, 1, key=jax.random.key(0), blocks=extra)
    with pytest.raises(ValueError, match=r"says nothing of \['b1'\], \['w2'\] of `params`"):
        curvlib.block_eigsh(H, params, 1, key=jax.random.key(0), blocks={"w1": "a"})
    with pytest.raises(ValueError, match=r"`where` has \['w3'\], which `params` does not"):
        curvlib.restrict(H, params, {"w1": True, "b1": False, "w2": False, "w3": True})

