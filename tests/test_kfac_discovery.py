"""K-FAC layer discovery from the jaxpr: what is found, what falls back, and why.

The oracle for every recognised pattern is the gradient itself: for a
Kronecker-factored layer, the loss gradient of its ``(d_in, d_out)`` matrix is
``sum_{n,r} a_{n,r} g_{n,r}^T`` with ``a`` the recorded inputs (conv patches,
one-hot ids) and ``g`` the pulled-back output gradients, and the bias gradient
is ``sum g``. A wrong transpose, patch ordering, bias placement or view chain
breaks that identity (checked to float64 round-off), and the blocks round-trip
back to the parameters exactly. Each fallback names its reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvlib import kronecker
from curvlib.kronecker import curvature as cv
from curvlib.kronecker import find_layers, format_layers


def _gradient_identity(model_fn, params, *args):
    """Max relative error of ``sum a g^T`` against the gradient, over all layers."""
    found = find_layers(model_fn, params, *args)

    @jax.jit
    def rows_and_grad(params, batched):
        _, rows_a, rows_g, _ = cv.layer_rows(found, params, batched,
                                             lambda out, k: jnp.sin(out)[None])
        grad = jax.grad(lambda p: jnp.sum(-jnp.cos(model_fn(p, *args))))(params)
        return rows_a, rows_g, grad

    rows_a, rows_g, grad = rows_and_grad(params, cv.batch_leaves(args))
    mats, diag = cv.to_blocks(found, grad)
    errs = {}
    for layer, a, g, m in zip(found.layers, rows_a, rows_g, mats, strict=True):
        g = g[:, 0]
        if layer.kind == "embedding":
            a = jax.nn.one_hot(a, layer.in_dim, dtype=g.dtype)
        elif layer.bias is not None:
            a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], -1)
        est = jnp.einsum("nri,nro->io", a, g)
        errs[layer.weight_path] = float(jnp.max(jnp.abs(est - m)) / jnp.max(jnp.abs(m)))
    back = cv.from_blocks(found, mats, diag, grad)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(grad), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # exact round trip
    return found, errs


def _normal(key, *shapes):
    keys = jax.random.split(key, len(shapes))
    return [jax.random.normal(k, s) for k, s in zip(keys, shapes, strict=True)]


def test_plain_mlp_transposed_weight_and_fallbacks():
    def model(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = h * p["scale"] + p["shift"]  # norm-like parameters: diagonal
        h = jnp.tanh(h @ p["w2"].T)  # torch layout (out, in)
        return h @ p["flat"].reshape(4, 2).astype(jnp.float32).astype(h.dtype)  # stored flat

    w1, b1, w2, scale, shift, flat, x = _normal(jax.random.PRNGKey(0), (3, 5), (5,), (4, 5),
                                                (5,), (5,), (8,), (6, 3))
    p = {"w1": w1, "b1": b1, "w2": w2, "scale": scale, "shift": shift, "flat": flat,
         "unused": jnp.ones(2)}
    found, errs = _gradient_identity(model, p, x)
    assert [(l.kind, l.weight_path, l.bias_path, l.in_dim, l.out_dim) for l in found.layers] == [
        ("dense", "['flat']", None, 4, 2), ("dense", "['w1']", "['b1']", 3, 5),
        ("dense", "['w2']", None, 5, 4)]
    reasons = {f.path: f.reason for f in found.diagonal}
    assert reasons == {"['scale']": "enters `mul`", "['shift']": "enters `add`",
                       "['unused']": "unused by the model"}
    assert max(errs.values()) < 1e-6, errs  # "flat" passes through float32
    assert max(v for k, v in errs.items() if k != "['flat']") < 1e-13, errs
    text = format_layers(found)
    for needle in ("['w1']", "dense", "3 x 5", "['b1']", "diagonal", "enters `mul`",
                   "unused by the model"):
        assert needle in text, text


def test_einsum_attention_projections_and_lhs_weight():
    def model(p, x):  # x: (n, t, d)
        q = jnp.einsum("ntd,dhk->nthk", x, p["wq"])  # DenseGeneral-style kernel
        o = jnp.einsum("nthk,hkd->ntd", q, p["wo"])  # contract two weight axes
        h = jnp.einsum("od,ntd->nto", p["head"], o)
        z = jax.lax.dot_general(p["lhs"], h, (((1,), (2,)), ((), ())))  # the weight as lhs
        return jnp.transpose(z, (1, 2, 0))

    wq, wo, head, lhs, x = _normal(jax.random.PRNGKey(1), (4, 2, 3), (2, 3, 4), (5, 4), (3, 5),
                                   (2, 7, 4))
    found, errs = _gradient_identity(model, {"wq": wq, "wo": wo, "head": head, "lhs": lhs}, x)
    dims = {l.weight_path: (l.in_dim, l.out_dim, l.positions) for l in found.layers}
    assert dims == {"['wq']": (4, 6, 7), "['wo']": (6, 4, 7), "['head']": (4, 5, 7),
                    "['lhs']": (5, 3, 7)}
    assert max(errs.values()) < 1e-13, errs


def test_convolutions_any_layout_stride_dilation_padding():
    def model(p, x_nchw, x_nhwc):
        y = jax.lax.conv_general_dilated(x_nchw, p["k1"], (1, 1), "SAME",
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        y = y + p["b1"][None, :, None, None]
        z = jax.lax.conv_general_dilated(x_nhwc, p["k2"], (2, 1), ((1, 0), (2, 1)),
                                         rhs_dilation=(1, 2),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        t = jax.lax.conv_general_dilated(x_nhwc, p["k3"], (1, 1), ((1, 1), (0, 0)),
                                         lhs_dilation=(2, 1),  # a transposed convolution
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.mean((2, 3)) @ p["o"] + z.mean((1, 2)) + t.mean((1, 2))

    k1, b1, k2, k3, o, x1, x2 = _normal(jax.random.PRNGKey(2), (3, 2, 3, 3), (3,),
                                        (3, 2, 2, 4), (3, 1, 2, 4), (3, 4), (2, 2, 5, 6),
                                        (2, 7, 6, 2))
    found, errs = _gradient_identity(model, {"k1": k1, "b1": b1, "k2": k2, "k3": k3, "o": o},
                                     x1, x2)
    kinds = {l.weight_path: (l.kind, l.bias_path, l.in_dim, l.out_dim) for l in found.layers}
    assert kinds["['k1']"] == ("conv", "['b1']", 2 * 9, 3)
    assert kinds["['k2']"] == ("conv", None, 2 * 3 * 2, 4)
    assert kinds["['k3']"] == ("conv", None, 2 * 3, 4)
    assert max(errs.values()) < 1e-13, errs


def test_embedding_lookup_and_tied_output_head_falls_back():
    def model(p, ids):
        h = jnp.tanh(p["emb"][ids] @ p["w"])
        return h @ p["emb"].T  # tied output head: the same leaf in two kinds of ops

    def untied(p, ids):
        return jnp.tanh(jnp.take(p["emb"], ids, axis=0) @ p["w"])

    emb, w = _normal(jax.random.PRNGKey(3), (9, 4), (4, 4))
    ids = jax.random.randint(jax.random.PRNGKey(4), (3, 5), 0, 9)
    tied = find_layers(model, {"emb": emb, "w": w}, ids)
    assert [l.weight_path for l in tied.layers] == ["['w']"]
    (fb,) = tied.diagonal
    assert fb.path == "['emb']" and "tied" in fb.reason and "embedding" in fb.reason
    found, errs = _gradient_identity(untied, {"emb": emb, "w": w}, ids)
    layer = next(l for l in found.layers if l.kind == "embedding")
    assert (layer.in_dim, layer.out_dim, layer.positions) == (9, 4, 5)
    assert max(errs.values()) < 1e-13, errs


def test_weight_sharing_scan_products_and_broadcasts():
    def model(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])  # the same layer twice: weight sharing
        h = jnp.tanh(h @ p["w"] + p["b"])
        h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["stack"])
        h = h @ (p["u"] @ p["v"])  # a product of two parameters
        return h @ jnp.broadcast_to(p["row"], (2, 2))  # a broadcast weight

    w, b, stack, u, v, row, x = _normal(jax.random.PRNGKey(5), (4, 4), (4,), (3, 4, 4), (4, 3),
                                        (3, 2), (2,), (5, 4))
    p = {"w": w, "b": b, "stack": stack, "u": u, "v": v, "row": row}
    found, errs = _gradient_identity(model, p, x)
    (layer,) = found.layers
    assert (layer.weight_path, layer.bias_path, len(layer.uses), layer.positions) == (
        "['w']", "['b']", 2, 2)
    assert errs["['w']"] < 1e-13
    reasons = {f.path: f.reason for f in found.diagonal}
    assert "scan" in reasons["['stack']"]
    assert "product of parameters" in reasons["['u']"] and "product" in reasons["['v']"]
    assert "broadcast" in reasons["['row']"]


def test_bias_used_elsewhere_or_on_part_of_a_shared_layer_is_diagonal():
    def model(p, x):
        h = x @ p["w"] + p["b"]
        return h + 0.1 * p["b"]  # the bias enters twice

    def partial_share(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return h @ p["w"]  # second use of w without the bias

    w, b, x = _normal(jax.random.PRNGKey(6), (3, 3), (3,), (4, 3))
    for fn in (model, partial_share):
        found = find_layers(fn, {"w": w, "b": b}, x)
        assert found.layers[0].bias is None
        assert [f.path for f in found.diagonal] == ["['b']"]


def test_flax_linen_and_nnx_models():
    linen = pytest.importorskip("flax.linen")
    nnx = pytest.importorskip("flax.nnx")

    class Linen(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.tanh(linen.Dense(5, param_dtype=jnp.float64)(x))
            x = linen.LayerNorm(param_dtype=jnp.float64)(x)
            x = linen.Conv(2, (3,), param_dtype=jnp.float64)(x[..., None]).mean(-2)
            return linen.Dense(3, param_dtype=jnp.float64)(x)

    x = jax.random.normal(jax.random.PRNGKey(7), (4, 6))
    m = Linen()
    params = m.init(jax.random.PRNGKey(0), x)["params"]
    found, errs = _gradient_identity(lambda p, x: m.apply({"params": p}, x), params, x)
    assert [l.kind for l in found.layers] == ["conv", "dense", "dense"]
    assert all(l.bias is not None for l in found.layers)
    assert {f.path for f in found.diagonal} == {"['LayerNorm_0']['scale']",
                                                "['LayerNorm_0']['bias']"}
    assert max(errs.values()) < 1e-13, errs

    class Nnx(nnx.Module):
        def __init__(self, rngs):
            kw = dict(param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
            self.emb = nnx.Embed(11, 8, **kw)
            self.att = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, **kw)
            self.out = nnx.Linear(8, 11, **kw)

        def __call__(self, ids):
            h = self.emb(ids)
            return self.out(h + self.att(h))

    model = Nnx(nnx.Rngs(0))
    graphdef, state = nnx.split(model, nnx.Param)
    ids = jax.random.randint(jax.random.PRNGKey(8), (3, 6), 0, 11)
    found, errs = _gradient_identity(lambda p, ids: nnx.merge(graphdef, p)(ids), state, ids)
    kinds = sorted((l.kind, l.bias is not None) for l in found.layers)
    assert kinds == [("dense", True)] * 5 + [("embedding", False)]
    assert not found.diagonal
    assert max(errs.values()) < 1e-13, errs


def test_structure_is_static_and_hashable():
    model = lambda p, x: x @ p["w"]
    p = {"w": jnp.ones((3, 2))}
    a = find_layers(model, p, jnp.ones((4, 3)))
    b = find_layers(model, p, jnp.zeros((9, 3)))  # another batch size: the same structure
    assert a == b and hash(a) == hash(b)
    assert "1 dense" in repr(a)


def test_bad_inputs_raise_named_errors():
    model = lambda p, x, y: x @ p["w"] + y
    p = {"w": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match="share the leading example axis; got 4 and 5"):
        find_layers(model, p, jnp.ones((4, 3)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="leaf 1 is a scalar"):
        find_layers(model, p, jnp.ones((4, 3)), jnp.ones(()))
    with pytest.raises(ValueError, match="holds no arrays"):
        find_layers(lambda p: p["w"], p)
    with pytest.raises(ValueError, match="must keep the leading example axis"):
        find_layers(lambda p, x: jnp.sum(x @ p["w"], 0), p, jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="must return one array"):
        find_layers(lambda p, x: (x @ p["w"], x), p, jnp.ones((4, 3)))


def test_public_names():
    for name in ("find_layers", "format_layers", "kfac_curvature", "scale_by_kfac", "kfac",
                 "ScaleByKfacState", "KfacInfo", "KfacCurvature", "KfacLayers"):
        assert hasattr(kronecker, name), name


def test_a_model_given_no_batch_names_what_it_expected():
    """``example_inputs={"inputs": x}`` for ``model_fn(p, x)``: no extra argument reaches the
    model (they are routed by its parameter names); the error, at construction, names the key
    that matches no parameter (``inputs``), the parameter left without a value (``x``) and the
    fix, instead of "`args` holds no arrays". The same for ``update``'s extra arguments."""
    from curvlib import kfac

    def model_fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    p = {"w1": jnp.ones((8, 4)), "w2": jnp.ones((4, 3))}
    x = jnp.ones((16, 8))
    with pytest.raises(ValueError, match=r"(?s)^`example_inputs` must hold the inputs of "
                       r"`model_fn`.*\['x'\].*key\(s\) \['inputs'\] name none of them.*"
                       r"missing a required argument: 'x'.*example_inputs=\{'x': \.\.\.\}"):
        kfac(model_fn=model_fn, example_inputs={"inputs": x}, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"(?s)^`example_inputs` must hold.*missing a required"):
        kfac(model_fn=model_fn, example_inputs={}, key=jax.random.PRNGKey(0))
    # a `*xs` model takes nothing by name: the message said its names were ['xs'] and then
    # suggested `example_inputs={'xs': ...}`, the key that had just failed
    with pytest.raises(ValueError, match=r"(?s)after the first \(\[\]\); its key\(s\) \['xs'\]"
                       r".*A `\*xs` parameter takes no input by name"):
        kfac(model_fn=lambda p, *xs: model_fn(p, *xs), example_inputs={"xs": x},
             key=jax.random.PRNGKey(0))
    opt = kfac(model_fn=model_fn, example_inputs={"x": x, "y": x[:, 0]}, key=jax.random.PRNGKey(0))
    state = opt.init(p)  # a key for the loss only ("y") is fine
    loss = lambda p, x, y: jnp.mean((model_fn(p, x)[:, 0] - y) ** 2)
    with pytest.raises(ValueError, match=r"(?s)^The extra arguments of update must hold.*"
                       r"\['inputs', 'y'\] name none.*update\(grads, state, params, x=\.\.\.\)"):
        opt.update(p, state, p, value_fn=loss, inputs=x, y=x[:, 0])
    # value_and_grad's own inputs: its messages name it, not `update`
    out_loss = lambda out, y: jnp.mean((out[:, 0] - y) ** 2)
    with pytest.raises(ValueError, match=r"(?s)^The extra arguments of value_and_grad must hold"
                       r".*\['inputs', 'y'\] name none.*"
                       r"opt\.value_and_grad\(loss_fn\)\(params, state, x=\.\.\.\)"):
        opt.value_and_grad(out_loss)(p, state, inputs=x, y=x[:, 0])
    with pytest.raises(TypeError, match=r"(?s)^`loss_fn` \(.*<lambda>\(out, y\)\) cannot be called"
                       r".*missing a required argument: 'y'.*`value_and_grad` received the "
                       r"extra arguments \['x'\]"):
        opt.value_and_grad(out_loss)(p, state, x=x)
    # named as the signature names it, the same input is found
    layers = find_layers(model_fn, p, x)
    assert len(layers.layers) == 2
    # the public find_layers with a non-array argument says what it received
    with pytest.raises(ValueError, match=r"holds no arrays \(1 argument\(s\) holding \['str'\]\)"):
        find_layers(model_fn, p, "x")


def _batch_norm_model(p, x):
    h = x @ p["w1"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)  # normalised over the batch: examples interact
    return jnp.tanh(h) @ p["w2"]


def test_a_model_whose_examples_interact_is_refused():
    """K-FAC replays the model one example at a time: batch normalisation over the batch
    would give the factors (and the one-pass loss and gradient) of another model."""
    import optax

    import curvlib

    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(ks[0], (8, 4))
    p = {"w1": jax.random.normal(ks[1], (4, 5)), "w2": jax.random.normal(ks[2], (5, 3))}
    with pytest.raises(ValueError, match="scale_by_kfac: `model_fn`'s output for an example "
                                         "depends on the other examples"):
        curvlib.kfac(model_fn=_batch_norm_model, example_inputs={"x": x}).init(p)
    with pytest.raises(ValueError, match="kfac_curvature: .*batch normalisation"):
        kronecker.kfac_curvature(_batch_norm_model, p, x)

    # the same model normalising each example alone (LayerNorm-like) is K-FAC's to take
    def layer_norm_model(p, x):
        h = x @ p["w1"]
        h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
        return jnp.tanh(h) @ p["w2"]

    y = jnp.arange(8) % 3
    opt = curvlib.kfac(model_fn=layer_norm_model, example_inputs={"x": x})
    state = opt.init(p)

    def ce(o, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(o, y))

    (value, _), _ = opt.value_and_grad(ce)(p, state, x=x, y=y)
    np.testing.assert_allclose(value, ce(layer_norm_model(p, x), y), rtol=1e-6)
    # a class masked with -inf does not hide the interaction (non-finite entries must
    # agree exactly, the rest to rounding); independent examples with the mask pass
    def masked(model):
        return lambda p, x: model(p, x).at[:, 0].set(-jnp.inf)

    with pytest.raises(ValueError, match="depends on the other examples"):
        curvlib.kfac(model_fn=masked(_batch_norm_model), example_inputs={"x": x}).init(p)
    curvlib.kfac(model_fn=masked(layer_norm_model), example_inputs={"x": x}).init(p)
    # nothing concrete to compare: abstract inputs, one example, a trace
    spec = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype)}
    curvlib.kfac(model_fn=_batch_norm_model, example_inputs=spec).init(p)
    curvlib.kfac(model_fn=_batch_norm_model, example_inputs={"x": x[:1]}).init(p)
    jax.eval_shape(curvlib.kfac(model_fn=_batch_norm_model, example_inputs={"x": x}).init, p)
