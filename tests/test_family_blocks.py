"""Parameter blocks against the dense Hessian: ``restrict`` gives the dense sub-block,
``block_eigsh`` gives numpy's eigenpairs of every block and batches equal shapes."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvlib
from curvlib import block_eigsh, restrict


def _problem():
    k = jax.random.split(jax.random.PRNGKey(11), 7)
    params = {
        "in": {"w": 0.6 * jax.random.normal(k[0], (4, 4)),
               "b": 0.2 * jax.random.normal(k[1], (4,))},
        "mid": {"w": 0.6 * jax.random.normal(k[2], (4, 4)),
                "b": 0.2 * jax.random.normal(k[3], (4,))},
        "out": {"w": 0.6 * jax.random.normal(k[4], (4, 2))},
    }
    x = jax.random.normal(k[5], (12, 4))
    y = jax.random.normal(k[6], (12, 2))

    def loss(p, x, y):
        h = jnp.tanh(x @ p["in"]["w"] + p["in"]["b"])
        h = jnp.tanh(h @ p["mid"]["w"] + p["mid"]["b"])
        return jnp.mean((jnp.tanh(h @ p["out"]["w"]) - y) ** 2 * jnp.array([1.0, 3.0]))

    flat, unravel = ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f), x, y)))(flat))
    return loss, params, x, y, H


def _indices(params, selected):
    """Flat indices (``ravel_pytree`` order) of the leaves whose key path is in ``selected``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    out, start = [], 0
    for path, x in flat:
        if jax.tree_util.keystr(path, simple=True, separator="/") in selected:
            out.extend(range(start, start + x.size))
        start += x.size
    return np.asarray(out)


def test_restrict_is_the_dense_sub_block():
    loss, params, x, y, H = _problem()
    Hv = curvlib.hessian_matvec(loss, params, x, y)
    cases = {
        "predicate": (lambda path, leaf: path[0].key == "mid" or leaf.ndim == 1,
                      {"in/b", "mid/w", "mid/b"}),
        "prefix tree": ({"in": False, "mid": {"w": True, "b": False}, "out": True},
                        {"mid/w", "out/w"}),
    }
    apply = jax.jit(lambda mv, v: mv(v))
    for name, (where, selected) in cases.items():
        Hb = restrict(Hv, params, where)
        idx = _indices(params, selected)
        sub = jax.tree_util.tree_map_with_path(
            lambda p, a, s=selected: a
            if jax.tree_util.keystr(p, simple=True, separator="/") in s else None, params)
        _, unravel_sub = ravel_pytree(sub)
        cols = [ravel_pytree(apply(Hb, unravel_sub(e)))[0] for e in np.eye(len(idx))]
        got = np.asarray(cols).T
        np.testing.assert_allclose(got, H[np.ix_(idx, idx)], rtol=0, atol=1e-12, err_msg=name)
        out = Hb(unravel_sub(np.ones(len(idx))))
        assert jax.tree.structure(out) == jax.tree.structure(sub)
    # a plain-function operator is restricted too (closed over statically)
    plain = lambda v: Hv(v)
    Hb = restrict(plain, params, {"in": False, "mid": False, "out": True})
    v = {"in": None, "mid": None, "out": {"w": jnp.ones((4, 2))}}
    idx = _indices(params, {"out/w"})
    np.testing.assert_allclose(np.asarray(apply(Hb, v)["out"]["w"]).reshape(-1),
                               H[np.ix_(idx, idx)] @ np.ones(8), atol=1e-12)
    with pytest.raises(ValueError, match="selects no leaf"):
        restrict(Hv, params, lambda path, leaf: False)
    with pytest.raises(ValueError, match="pytree of bools"):
        restrict(Hv, params, {"in": True})
    with pytest.raises(ValueError, match=r"restricted vector\[.out.\]\[.w.\] has shape \(8,\)"):
        Hb({"in": None, "mid": None, "out": {"w": jnp.ones(8)}})


def test_block_eigsh_matches_numpy_on_every_block():
    """One compiled call (3 distinct leaf shapes: 3 vmapped eigsh), every block vs numpy."""
    loss, params, x, y, H = _problem()
    Hv = curvlib.hessian_matvec(loss, params, x, y)
    k = 2
    traces = []
    counted = lambda mv, v: (traces.append(1), mv(v))[1]  # counts traces of the product
    spectra = block_eigsh(jax.tree_util.Partial(counted, Hv), params, k, key=jax.random.key(0),
                          eigsh=curvlib.Eigsh(rtol=1e-10))
    assert list(spectra) == ["in/b", "in/w", "mid/b", "mid/w", "out/w"]
    for name, res in spectra.items():
        idx = _indices(params, {name})
        evals, evecs = np.linalg.eigh(H[np.ix_(idx, idx)])
        np.testing.assert_allclose(np.asarray(res.eigenvalues), evals[::-1][:k], rtol=1e-9,
                                   atol=1e-12, err_msg=name)
        assert bool(res.converged) and bool(res.finite), name
        # eigenvectors are sub-pytrees: the block's leaves with a leading k, None elsewhere
        present = {jax.tree_util.keystr(p, simple=True, separator="/")
                   for p, _ in jax.tree_util.tree_flatten_with_path(res.eigenvectors)[0]}
        assert present == {name}
        vecs = np.stack([np.asarray(ravel_pytree(jax.tree.map(lambda a, i=i: a[i],
                                                              res.eigenvectors))[0])
                         for i in range(k)])
        overlap = np.abs(vecs @ evecs[:, ::-1][:, :k])
        np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-8, err_msg=name)
    # an eager second call at a new point (a new operator of the same kind) reuses the program
    n = len(traces)
    params2 = jax.tree.map(lambda a: 1.1 * a, params)
    H2 = jax.tree_util.Partial(counted, curvlib.hessian_matvec(loss, params2, x, y))
    block_eigsh(H2, params2, k, key=jax.random.key(1), eigsh=curvlib.Eigsh(rtol=1e-10))
    assert n > 0 and len(traces) == n


def test_block_eigsh_batches_blocks_of_equal_shape():
    """Traced, not compiled (``eval_shape``): blocks of equal shapes share one product call
    site; labels, names and sub-pytrees follow ``blocks``."""
    loss, params, x, y, H = _problem()
    Hv = curvlib.hessian_matvec(loss, params, x, y)
    calls = []

    def count(hv, v):
        calls.append(1)
        return hv(v)

    # (a `Partial`: each call site traces it; a plain function is traced once, up front, into
    # the program it computes)
    counted = jax.tree_util.Partial(count, Hv)

    def traced(blocks, k=1):
        calls.clear()
        out = jax.eval_shape(lambda: block_eigsh(counted, params, k, key=jax.random.key(0),
                                                 blocks=blocks))
        return out, len(calls)

    _, per_leaf = traced(None)  # 5 leaves, 3 distinct shapes
    _, two_biases = traced(lambda path, leaf: "/".join(p.key for p in path)
                           if leaf.ndim == 1 else None)
    _, one_bias = traced(lambda path, leaf: "b" if path[0].key == "mid" and leaf.ndim == 1
                         else None)
    assert two_biases == one_bias > 0 and per_leaf == 3 * one_bias
    # one block per layer from a prefix tree of labels ("in" and "mid" are batched)
    by_layer, n = traced({"in": "in", "mid": "mid", "out": "out"})
    assert n == 2 * one_bias and list(by_layer) == ["in", "mid", "out"]
    assert by_layer["mid"].eigenvectors["mid"]["w"].shape == (1, 4, 4)
    assert by_layer["mid"].eigenvectors["in"] == {"b": None, "w": None}
    # one block after another (lax.map): still one product call site per shape
    calls.clear()
    jax.eval_shape(lambda: block_eigsh(counted, params, 1, key=jax.random.key(0),
                                       blocks=lambda path, leaf: path[0].key, batch_size=1))
    assert len(calls) == 2 * one_bias
    with pytest.raises(ValueError, match="batch_size"):
        block_eigsh(Hv, params, 1, key=jax.random.key(0), batch_size=0)
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 3\] \(smaller than the 4 "
                                         r"entries of block 'in/b'\); got 4"):
        block_eigsh(Hv, params, 4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="no leaf"):
        block_eigsh(Hv, params, 1, key=jax.random.key(0), blocks=lambda p, x: None)
    with pytest.raises(ValueError, match="`blocks` must be"):
        block_eigsh(Hv, params, 1, key=jax.random.key(0), blocks={"in": "a"})


def test_block_products_are_the_dense_blocks():
    """The vmapped product of a group (layers "in" and "mid", two leaves each) gives each
    layer's dense block of the Hessian."""
    from curvlib.operators.blocks import _group_product

    loss, params, x, y, H = _problem()
    Hv = curvlib.hessian_matvec(loss, params, x, y)
    leaves, treedef = jax.tree.flatten(params)  # in/b, in/w, mid/b, mid/w, out/w
    specs = tuple((a.shape, a.dtype, None) for a in leaves)
    product = jax.jit(jax.vmap(_group_product(Hv, treedef, specs, ((0, 1), (2, 3)))))
    for b, layer in enumerate(("in", "mid")):
        idx = _indices(params, {f"{layer}/b", f"{layer}/w"})
        cols = []
        for e in np.eye(20):
            vals = (jnp.zeros((2, 4)).at[b].set(e[:4]), jnp.zeros((2, 4, 4)).at[b].set(
                e[4:].reshape(4, 4)))
            out = product(vals, jnp.arange(2))
            cols.append(np.concatenate([np.asarray(out[0][b]), np.asarray(out[1][b]).ravel()]))
        np.testing.assert_allclose(np.asarray(cols).T, H[np.ix_(idx, idx)], atol=1e-12)


def test_block_eigsh_one_block_at_a_time():
    """``batch_size=1`` (``lax.map`` over equal-shaped blocks) gives the same pairs."""
    d = {"a": jnp.arange(1.0, 9.0), "b": jnp.arange(11.0, 19.0), "c": jnp.arange(2.0, 8.0)}
    mv = lambda v: jax.tree.map(lambda di, vi: di * vi, d, v)
    params = jax.tree.map(jnp.zeros_like, d)
    out = block_eigsh(mv, params, 2, key=jax.random.key(0), batch_size=1,
                      eigsh=curvlib.Eigsh(rtol=1e-10))
    got = {n: np.asarray(r.eigenvalues) for n, r in out.items()}
    np.testing.assert_allclose(got["a"], [8.0, 7.0], rtol=1e-10)
    np.testing.assert_allclose(got["b"], [18.0, 17.0], rtol=1e-10)
    np.testing.assert_allclose(got["c"], [7.0, 6.0], rtol=1e-10)


# ------------------------------------------------- block operators at block cost (`wrt=`)

_WHERE = {"in": False, "mid": {"w": True, "b": False}, "out": True}  # mid/w and out/w


def _block_sub(params, selected):
    return jax.tree_util.tree_map_with_path(
        lambda p, a: a if jax.tree_util.keystr(p, simple=True, separator="/") in selected
        else None, params)


def _dense(op, sub):
    """The matrix of an operator on a sub-pytree, column by column (jitted, `op` traced)."""
    flat, unravel = ravel_pytree(sub)
    apply = jax.jit(lambda mv, v: mv(v))
    return np.asarray([ravel_pytree(apply(op, unravel(e)))[0] for e in np.eye(flat.size)]).T


@pytest.mark.parametrize("options", [
    {}, {"mode": "fwd-rev"}, {"mode": "rev-rev"},
    {"mode": "fwd-rev", "microbatch_size": 5}, {"has_aux": True},
])
def test_hessian_wrt_is_the_dense_diagonal_block(options):
    """``hessian_matvec(..., wrt=where)`` is ``H_BB`` of ``jax.hessian`` (1e-12) and equals
    ``restrict`` of the full operator, in every mode, microbatched and with an aux output."""
    loss, params, x, y, H = _problem()
    fun = (lambda p, x, y: (loss(p, x, y), {"x": x})) if options.get("has_aux") else loss
    Hb = curvlib.hessian_matvec(fun, params, x, y, wrt=_WHERE, **options)
    sub = _block_sub(params, {"mid/w", "out/w"})
    idx = _indices(params, {"mid/w", "out/w"})
    np.testing.assert_allclose(_dense(Hb, sub), H[np.ix_(idx, idx)], rtol=0, atol=1e-12)
    R = restrict(curvlib.hessian_matvec(fun, params, x, y, **options), params, _WHERE)
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), sub)
    for got, want in zip(jax.tree.leaves(Hb(v)), jax.tree.leaves(R(v)), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # the same vector conventions as `restrict`: None for a whole unselected subtree
    out = Hb({"in": None, "mid": {"w": v["mid"]["w"], "b": None}, "out": v["out"]})
    assert out["in"] is None and out["mid"]["b"] is None


def test_ggn_and_fisher_wrt_equal_restrict():
    loss, params, x, y, _ = _problem()

    def model(p, x):
        h = jnp.tanh(x @ p["in"]["w"] + p["in"]["b"])
        return jnp.tanh(h @ p["mid"]["w"] + p["mid"]["b"]) @ p["out"]["w"]

    mse = lambda o, y: jnp.mean((o - y) ** 2)
    sub = _block_sub(params, {"mid/w", "out/w"})
    v = jax.tree.map(lambda a: jnp.sin(jnp.arange(a.size, dtype=a.dtype).reshape(a.shape)), sub)
    cases = {
        "ggn": lambda **kw: curvlib.ggn_matvec(model, mse, params, x, loss_args=(y,), **kw),
        "ggn recompute mb": lambda **kw: curvlib.ggn_matvec(
            model, mse, params, x, loss_args=(y,), mode="recompute", microbatch_size=4, **kw),
        "fisher": lambda **kw: curvlib.fisher_matvec(model, params, x, **kw),
        "fisher mc mb": lambda **kw: curvlib.fisher_matvec(
            model, params, x, key=jax.random.key(1), num_samples=2, mode="recompute",
            microbatch_size=6, **kw),
    }
    for name, build in cases.items():
        got, want = build(wrt=_WHERE)(v), restrict(build(), params, _WHERE)(v)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=name)


def test_wrt_operator_is_traced_data_under_jit():
    """A block operator is a Partial: a new point reuses the compiled product."""
    loss, params, x, y, H = _problem()
    traces = []
    apply = jax.jit(lambda mv, v: (traces.append(1), mv(v))[1])
    sub = _block_sub(params, {"mid/w", "out/w"})
    apply(curvlib.hessian_matvec(loss, params, x, y, wrt=_WHERE), sub)
    params2 = jax.tree.map(lambda a: 0.9 * a, params)
    out = apply(curvlib.hessian_matvec(loss, params2, x, y, wrt=_WHERE), sub)
    assert len(traces) == 1
    want = restrict(curvlib.hessian_matvec(loss, params2, x, y), params2, _WHERE)(sub)
    np.testing.assert_allclose(out["out"]["w"], want["out"]["w"], atol=1e-12)
    # built inside jit too
    inside = jax.jit(lambda p: curvlib.hessian_matvec(loss, p, x, y, wrt=_WHERE)(sub))(params2)
    np.testing.assert_allclose(inside["mid"]["w"], want["mid"]["w"], atol=1e-12)


def _count(jaxpr, prim):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == prim
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count(sub, prim)
    return n


def test_wrt_product_skips_the_layers_below_the_block():
    """Cost without timing: the product on the last layer has no tangent or cotangent pass
    through the layers before it. The black-box product (restrict of the full operator)
    differentiates through all three layers' tanh and matmuls; the block product does not."""
    loss, params, x, y, _ = _problem()
    last = {"in": False, "mid": False, "out": True}
    sub = _block_sub(params, {"out/w"})
    for mode in ("linearize", "fwd-rev"):
        block = curvlib.hessian_matvec(loss, params, x, y, wrt=last, mode=mode)
        box = restrict(curvlib.hessian_matvec(loss, params, x, y, mode=mode), params, last)
        jb = jax.make_jaxpr(lambda mv, v: mv(v))(block, sub).jaxpr
        jf = jax.make_jaxpr(lambda mv, v: mv(v))(box, sub).jaxpr
        nb, nf = _count(jb, "dot_general"), _count(jf, "dot_general")
        # below the block: 2 layers x (x @ W tangent, W tangent-of-input, 2 gradient matmuls)
        assert nb + 4 <= nf, (mode, nb, nf)
        if mode == "linearize":  # residuals only: no tanh of the first layers is recomputed
            assert _count(jb, "tanh") == 0 and len(jb.eqns) < len(jf.eqns) / 2, mode


def test_wrt_errors_name_the_argument():
    loss, params, x, y, _ = _problem()
    with pytest.raises(ValueError, match="`wrt` selects no leaf"):
        curvlib.hessian_matvec(loss, params, x, y, wrt=lambda p, a: False)
    with pytest.raises(ValueError, match=r"`wrt` must be a predicate .* pytree of bools"):
        curvlib.hessian_matvec(loss, params, x, y, wrt={"in": True})
    with pytest.raises(ValueError, match=r"`wrt\['in'\]\['b'\]` must be a Python bool"):
        curvlib.ggn_matvec(lambda p, x: x @ p["out"]["w"], lambda o: jnp.sum(o ** 2), params,
                           x, wrt={"in": {"w": True, "b": jnp.ones(2)}, "mid": False,
                                   "out": True})
    with pytest.raises(ValueError, match=r"block vector\[.out.\]\[.w.\] has shape \(8,\)"):
        curvlib.hessian_matvec(loss, params, x, y, wrt=_WHERE)(
            {"mid": {"w": jnp.ones((4, 4))}, "out": {"w": jnp.ones(8)}})
    with pytest.raises(ValueError, match="`microbatch_size` needs a batch"):
        curvlib.hessian_matvec(lambda p: loss(p, x, y), params, wrt=_WHERE,
                               microbatch_size=2)
    Hv = curvlib.hessian_matvec(loss, params, x, y)
    with pytest.raises(ValueError, match="either `matvec` or `block_matvec`"):
        block_eigsh(Hv, params, 1, key=jax.random.key(0), block_matvec=lambda w: Hv)
    with pytest.raises(TypeError, match="`block_matvec` must be a function"):
        block_eigsh(None, params, 1, key=jax.random.key(0), block_matvec=3)
    # eigsh's `verify` and its `solver=` argument are fields / the `eigsh=` value here
    for kw in ({"verify": False}, {"solver": curvlib.Eigsh()}):
        with pytest.raises(TypeError, match=r"fields of `eigsh=curvlib.Eigsh\(...\)`"):
            block_eigsh(Hv, params, 1, key=jax.random.key(0), **kw)


@pytest.mark.parametrize("batch_size", [None, 1])
def test_block_eigsh_on_the_loss_path(batch_size):
    """``block_matvec=`` (one operator per block, differentiating that block only) gives the
    black-box path's eigenvalues and numpy's of every dense block; one operator per block."""
    loss, params, x, y, H = _problem()
    Hv = curvlib.hessian_matvec(loss, params, x, y)
    built = []

    def factory(where):
        built.append(where)
        return curvlib.hessian_matvec(loss, params, x, y, wrt=where)

    opts = dict(key=jax.random.key(0), eigsh=curvlib.Eigsh(rtol=1e-10), batch_size=batch_size)
    by_layer = {"in": "in", "mid": "mid", "out": "out"}
    for blocks in (None, by_layer):
        built.clear()
        fast = block_eigsh(None, params, 2, blocks=blocks, block_matvec=factory, **opts)
        slow = block_eigsh(Hv, params, 2, blocks=blocks, **opts)
        assert list(fast) == list(slow)
        assert len(built) == (5 if blocks is None else 3)  # one operator per block
        for name, res in fast.items():
            sel = {name} if blocks is None else {f"{name}/{leaf}" for leaf in ("w", "b")}
            idx = _indices(params, sel)
            evals = np.linalg.eigh(H[np.ix_(idx, idx)])[0][::-1][:2]
            np.testing.assert_allclose(res.eigenvalues, evals, rtol=1e-9, atol=1e-12,
                                       err_msg=name)
            np.testing.assert_allclose(res.eigenvalues, slow[name].eigenvalues, rtol=1e-9,
                                       atol=1e-12, err_msg=name)
            assert jax.tree.structure(res.eigenvectors) == jax.tree.structure(
                slow[name].eigenvectors)
            assert bool(res.converged), name
    # under jit, the operators built from traced parameters
    jitted = jax.jit(lambda p: block_eigsh(
        None, p, 2, blocks=by_layer,
        block_matvec=lambda w: curvlib.hessian_matvec(loss, p, x, y, wrt=w), **opts))(params)
    np.testing.assert_allclose(jitted["mid"].eigenvalues, fast["mid"].eigenvalues, rtol=1e-9)


def _batched_loops(jaxpr) -> int:
    """While loops whose predicate is a batch's (``vmap`` of a loop: every step selects
    between the old and new state of the whole carry)."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":  # a batch's predicate: one flag per lane
            n += eqn.params["cond_jaxpr"].jaxpr.outvars[0].aval.shape != ()
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _batched_loops(sub)
    return n


def test_a_block_alone_in_its_group_runs_an_unbatched_eigsh():
    """A block with no equal-shaped partner (every block on the loss path) runs a plain
    eigsh: a vmapped loop over one lane would copy its whole basis at every step. Blocks
    of equal shapes still share one batched loop."""
    loss, params, x, y, H = _problem()
    Hv = curvlib.hessian_matvec(loss, params, x, y)
    by_layer = {"in": "in", "mid": "mid", "out": "out"}
    opts = dict(key=jax.random.key(0), blocks=by_layer)
    loss_path = jax.make_jaxpr(lambda p: block_eigsh(
        None, p, 2, block_matvec=lambda w: curvlib.hessian_matvec(loss, p, x, y, wrt=w),
        **opts))(params).jaxpr
    assert _count(loss_path, "while") > 0 and _batched_loops(loss_path) == 0
    # black box: "in" and "mid" (equal shapes) batched together, "out" alone
    box = jax.make_jaxpr(lambda p: block_eigsh(Hv, p, 2, **opts))(params).jaxpr
    per_shape = jax.make_jaxpr(lambda p: block_eigsh(
        Hv, p, 2, key=jax.random.key(0), blocks={"in": "in", "mid": "mid", "out": None}))(
        params).jaxpr
    assert _batched_loops(box) == _batched_loops(per_shape) > 0


@pytest.mark.parametrize("batch_size", [None, 1])
def test_each_block_reports_its_own_status_and_counts(batch_size):
    """Two equal-shaped blocks run as one group (one with curvature, one without) beside a
    lone block: every field of a block's result is that block's, as `eigsh` on it alone."""
    d, c = jnp.arange(1.0, 7.0), jnp.arange(1.0, 9.0)

    def matvec(v):
        return {"a": d * v["a"], "z": 0.0 * v["z"], "c": c * v["c"]}

    params = {"a": jnp.zeros(6), "z": jnp.zeros(6), "c": jnp.zeros(8)}
    res = block_eigsh(matvec, params, 2, key=jax.random.PRNGKey(0), batch_size=batch_size)
    for name, diag in (("a", d), ("z", 0.0 * d), ("c", c)):
        r = res[name]
        alone = curvlib.eigsh(lambda v, diag=diag: diag * v, jnp.ones(diag.shape[0]), 2)
        for field in r._fields:
            if field != "eigenvectors":
                assert np.shape(getattr(r, field)) == np.shape(getattr(alone, field)), field
        assert int(r.status) == int(alone.status), name
        assert bool(r.converged) == bool(alone.converged), name
    np.testing.assert_allclose(res["a"].eigenvalues, [6.0, 5.0], rtol=1e-12)
    assert bool(res["a"].converged)
    curvlib.raise_if_failed(res["a"])  # the zero block's failure is not block a's
    assert int(res["z"].status) != int(curvlib.Status.SUCCESS)
    with pytest.raises(curvlib.CurvatureError):
        curvlib.raise_if_failed(res["z"])


def test_default_blocks_of_leaves_whose_paths_read_alike_stay_apart():
    """``{"a/b": x, "a": {"b": y}}``: the joined paths coincide; each leaf is its own block."""
    params = {"a/b": jnp.zeros(4), "a": {"b": jnp.zeros(4)}}

    def matvec(v):
        return {"a/b": jnp.arange(1.0, 5.0) * v["a/b"],
                "a": {"b": jnp.arange(10.0, 14.0) * v["a"]["b"]}}

    res = block_eigsh(matvec, params, 2, key=jax.random.PRNGKey(0))
    assert len(res) == 2
    values = sorted(tuple(np.round(np.asarray(r.eigenvalues), 8)) for r in res.values())
    assert values == [(4.0, 3.0), (13.0, 12.0)]
    for r in res.values():  # each block's eigenvectors live on its own leaf only
        leaves = [x for x in jax.tree.leaves(r.eigenvectors) if x is not None]
        assert len(leaves) == 1
    # a key spelled like another leaf's full path still gets a block of its own
    params = {"['a/b']": jnp.zeros(2), "a/b": jnp.zeros(2), "a": {"b": jnp.zeros(4)}}
    res = block_eigsh(lambda v: v, params, 1, key=jax.random.PRNGKey(0))
    assert len(res) == 3
    # names that do not collide keep the short spelling
    res = block_eigsh(lambda v: v, {"x": {"w": jnp.zeros(4)}}, 2, key=jax.random.PRNGKey(0))
    assert list(res) == ["x/w"]
