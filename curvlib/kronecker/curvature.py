r"""Kronecker-factored curvature: the factors, the operator and its damped inverse.

For a layer with input rows $a$ and output gradients $g$ (the
gradient of the per-example negative log-likelihood with respect to the
layer's pre-activation), K-FAC approximates the layer's block of the Fisher of
the *mean* loss over $N$ examples by

$$
F_\ell \approx A \otimes G, \qquad
A = \tfrac1N \textstyle\sum_n a_n a_n^\top, \qquad
G = \tfrac1N \textstyle\sum_n \sum_c g_{n,c}\, g_{n,c}^\top,
$$

acting on the weight as a ``(d_in, d_out)`` matrix $W$ as
$W \mapsto A W G$. A bias joins the weight as a last row and
$a$ gets a homogeneous coordinate, $[a; 1]$ (Martens & Grosse
2015). The exact Fisher takes $g_{n,c} = J_n^\top b_{n,c}$ for the
columns of a symmetric factorisation $H_n = B_n B_n^\top$ of the output
Hessian (`curvlib.kronecker._likelihood`); the Monte-Carlo Fisher takes
the gradients at targets sampled from the model (averaged over samples).

Weight sharing (a layer applied at $R$ positions per example:
sequences, convolutions, reused layers) follows Eschenhagen et al. (2023):

* ``"expand"``: positions are more examples: $A$ averages $a a^\top$
  over examples *and* positions, $G = \tfrac1N\sum_{n,r} g g^\top$;
* ``"reduce"``: $\bar a_n = \tfrac1R\sum_r a_{n,r}$,
  $\hat g_n = \sum_r g_{n,r}$, then the formulas above.

Without weight sharing ($R = 1$) both are the K-FAC of Martens & Grosse.
Embeddings always use ``"expand"`` (their input factor is then diagonal:
token frequencies). Parameters that are not in a Kronecker-factored layer get
a diagonal block: the mean over examples of the squared per-example gradients
(summed over the columns of $B$, or averaged over samples).

References:
  J. Martens and R. Grosse, *Optimizing neural networks with Kronecker-factored
  approximate curvature*, ICML 2015.
  R. Grosse and J. Martens, *A Kronecker-factored approximate Fisher matrix for
  convolution layers*, ICML 2016.
  R. Eschenhagen, A. Immer, R. Turner, F. Schneider and P. Hennig,
  *Kronecker-factored approximate curvature for modern neural network
  architectures*, NeurIPS 2023.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial, register_pytree_node_class

from curvlib import _validate
from curvlib.kronecker import _likelihood, _program, _sharding
from curvlib.kronecker.discovery import (
    KfacLayers,
    Layer,
    _find_layers,
    _split_args,
    apply_chain,
    check_examples_independent,
    invert_chain,
    out_rows,
    use_rows,
)

PyTree = Any

CONVENTIONS = ("reduce", "expand")
METHODS = ("exact", "factored")
INVERSES = METHODS + ("ekfac",)


class Factors(NamedTuple):
    """Per-layer Kronecker factors and per-leaf diagonal blocks.

    Attributes:
      A: per layer, the input factor: ``(a_dim, a_dim)`` (a vector ``(vocab,)``
        for an embedding).
      G: per layer, the output-gradient factor: ``(d_out, d_out)``.
      D: per diagonal leaf, its diagonal block, shaped like the ``j``-th
        diagonal leaf.
    """

    A: tuple
    G: tuple
    D: tuple


def factor_dtype(layers: KfacLayers):
    return jnp.promote_types(jnp.result_type(*layers.dtypes), jnp.float32)


def zero_factors(layers: KfacLayers, dtype=None) -> Factors:
    dt = factor_dtype(layers) if dtype is None else dtype
    ag, dshapes = layers.factor_shapes()
    return Factors(
        tuple(jnp.zeros(a, dt) for a, _ in ag),
        tuple(jnp.zeros(g, dt) for _, g in ag),
        tuple(jnp.zeros(s, dt) for s in dshapes),
    )


# ----------------------------------------------------------------- statistics


def check_options(likelihood, convention, num_samples, variance, key) -> int:
    """Validate the shared options; returns ``num_samples`` as an int (it fixes shapes).

    Options that do not apply are refused, as `curvlib.fisher_matvec` refuses them (they
    were ignored: ``num_samples=64`` without a ``key`` computed the exact Fisher).
    """
    _validate.one_of(likelihood, "likelihood", _likelihood.LIKELIHOODS)
    _validate.number(variance, "variance", minimum=0, exclusive=True, optional=True)
    if (likelihood != "gaussian" and variance is not None
            and not isinstance(variance, jax.core.Tracer) and np.any(np.asarray(variance) != 1)):
        raise ValueError(f"`variance` applies to likelihood='gaussian' only; got "
                         f"{variance!r} with likelihood={likelihood!r}.")
    _validate.one_of(convention, "convention", CONVENTIONS)
    num_samples = _validate.static_int(num_samples, "num_samples", minimum=1)
    if key is None and num_samples != 1:
        raise ValueError(
            "`num_samples` applies to the Monte-Carlo Fisher only; pass a `key` to sample "
            "targets (the exact Fisher, key=None, needs no samples).")
    return num_samples


def statistics(
    layers: KfacLayers,
    params: PyTree,
    batched: list,
    *,
    consts=None,
    likelihood: str,
    key=None,
    num_samples: int = 1,
    convention: str = "reduce",
    variance=1.0,
    eigenbasis: Eigen | None = None,
) -> tuple[Factors, jax.Array]:
    """The factors of one batch (means over its examples) and the model outputs.

    One forward pass of the model on the batch (per example, under ``vmap``)
    recording every layer input, then one backward pass per column of the
    output Hessian's square root (exact, ``key=None``) or per sample.
    ``batched``: the array leaves of the batch (`batch_leaves`);
    ``consts``: the program's constants (default: those traced).
    With ``eigenbasis``, also returns the batch's EK-FAC scalings in that basis
    (`eigenbasis_scales`) as a third output.
    """
    n = batched[0].shape[0]
    cotangents = likelihood_cotangents(likelihood, num_samples, variance)
    keys = None if key is None else jax.random.split(key, n)
    outs, rows_a, rows_g, dsq = layer_rows(layers, params, batched, cotangents, keys=keys,
                                           consts=consts)
    weight = 1.0 if key is None else 1.0 / num_samples
    factors, scales = factors_from_rows(layers, rows_a, rows_g, dsq, weight=weight,
                                        convention=convention, eigenbasis=eigenbasis)
    if eigenbasis is not None:
        return factors, outs, scales
    return factors, outs


def likelihood_cotangents(likelihood: str, num_samples: int, variance) -> Callable:
    """``cotangents(out, key) -> (S, *out.shape)`` for one example: the columns of the output
    Hessian's square root (``key=None``, exact Fisher) or ``num_samples`` sampled gradients."""
    def cotangents(out, k):
        if k is None:
            return _likelihood.sqrt_hessian(likelihood, out, variance)
        return _likelihood.sampled_gradients(likelihood, out, k, num_samples, variance)

    return cotangents


def factors_from_rows(layers: KfacLayers, rows_a, rows_g, dsq, *, weight, convention: str,
                      eigenbasis: Eigen | None = None) -> tuple[Factors, tuple]:
    """``(factors, scales)`` of one batch from `layer_rows`' rows (``weight``: ``1 / S`` for
    ``S`` Monte-Carlo samples, else 1); ``scales`` is ``()`` without ``eigenbasis``.

    Cost: ``O(N R d^2)`` per factor (and one per-example gradient per layer for EK-FAC).
    """
    dt = factor_dtype(layers)
    A, G = [], []
    for l, a, g in zip(layers.layers, rows_a, rows_g, strict=True):
        A_l, G_l = _layer_factors(l, a, g.astype(dt), convention, dt)
        A.append(A_l)
        G.append(G_l * weight)
    D = tuple(jnp.mean(d, axis=0) * weight for d in dsq)
    scales = () if eigenbasis is None else eigenbasis_scales(layers, eigenbasis, rows_a,
                                                             rows_g, weight, dt)
    return Factors(tuple(A), tuple(G), D), scales


def eigenbasis_scales(layers: KfacLayers, eig: Eigen, rows_a, rows_g, weight, dt) -> tuple:
    r"""EK-FAC's second moments of per-example gradients in the Kronecker eigenbasis.

    Per layer, $s = \tfrac1N \sum_n \sum_c (Q_A^\top \nabla_n Q_G)^{\odot 2}$
    (times ``weight``: ``1 / S`` for ``S`` Monte-Carlo samples), where
    $\nabla_n = \sum_r a_{n,r} g_{n,c,r}^\top$ is example ``n``'s gradient of
    the layer's matrix: the exact diagonal of the Fisher in that basis (George et
    al. 2018), whatever the weight-sharing convention. Embeddings use the
    per-position squares ("expand"), which avoids ``(N, vocab, d)`` per-example
    gradients. Cost: ``O(N S d_in d_out)`` per layer (one per-example gradient).
    """
    hi = jax.lax.Precision.HIGHEST
    out = []
    for i, (l, a, g) in enumerate(zip(layers.layers, rows_a, rows_g, strict=True)):
        n = g.shape[0]
        gt = jnp.matmul(g.astype(dt), eig.QG[i], precision=hi)  # (N, S, R, d_out)
        if l.kind == "embedding":
            ids = a.reshape(n, -1)
            sq = jnp.sum(jnp.square(gt), axis=1)  # (N, R, d_out): summed over samples
            s = jnp.zeros((l.in_dim, l.out_dim), dt).at[ids.reshape(-1)].add(
                sq.reshape(-1, l.out_dim), mode="drop")
        else:
            a = a.astype(dt)
            if l.bias is not None:
                a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), dt)], axis=-1)
            at = jnp.matmul(a, eig.QA[i], precision=hi)  # (N, R, a_dim)
            if l.positions == 1:
                s = jnp.einsum("ni,nso->io", jnp.square(at[:, 0]), jnp.square(gt[:, :, 0]),
                               precision=hi)
            else:
                per = jnp.einsum("nri,nsro->nsio", at, gt, precision=hi)
                s = jnp.sum(jnp.square(per), axis=(0, 1))
        out.append(s * (weight / n))
    return tuple(out)


def _example_replay(layers: KfacLayers, params, consts):
    """``(p_leaves, diag_idx, probe_avals, evaluate)``: one example's replay of the model.

    ``evaluate(dleaves, probes, example) -> (output, recorded)`` runs the layers'
    program on one example (its leaves without the example axis) with the diagonal
    leaves ``dleaves`` in place of theirs and ``probes`` added to the layer outputs
    (zeros whose cotangents are the output gradients), recording the layer inputs.
    """
    p_leaves = jax.tree.leaves(params)
    prog = layers.program
    record = {u.op: u.operand for l in layers.layers for u in l.uses}
    probe_avals = {u.op: prog.ops[u.op].out_avals[0] for l in layers.layers for u in l.uses}
    diag_idx = [f.leaf for f in layers.diagonal]

    def evaluate(dleaves, probes, example):
        leaves = list(p_leaves)
        for j, v in zip(diag_idx, dleaves, strict=True):
            leaves[j] = v
        outs, rec = _program.evaluate(prog, leaves + [x[None] for x in example], consts=consts,
                                      record=record, probes=probes)
        return outs[0][0], rec

    return p_leaves, diag_idx, probe_avals, evaluate


def layer_rows(layers: KfacLayers, params, batched, cotangents, *, keys=None, consts=None):
    """Per-example layer inputs and output gradients (the raw material of the factors).

    ``cotangents(out, key) -> (S, *out.shape)``: the output-space vectors to
    pull back, per example (``out``: that example's output without the
    example axis; ``key``: its row of ``keys`` or ``None``).

    Returns ``(outputs, rows_a, rows_g, diag_sq)``: the model outputs ``(N, ...)``,
    per layer the inputs ``(N, R, d_in)`` (ids ``(N, R)`` for an embedding) and
    the pulled-back output gradients ``(N, S, R, d_out)``, and per diagonal leaf
    the per-example squared gradients summed over the ``S`` vectors ``(N, *shape)``.
    """
    p_leaves, diag_idx, probe_avals, evaluate = _example_replay(layers, params, consts)
    dt = factor_dtype(layers)

    def one(example, k):
        probes0 = {i: jnp.zeros(a.shape, a.dtype) for i, a in probe_avals.items()}
        out, vjp_fn, rec = jax.vjp(lambda d, p: evaluate(d, p, example),
                                   [p_leaves[j] for j in diag_idx], probes0, has_aux=True)
        out = jax.lax.stop_gradient(out)
        cots = cotangents(out, k)
        dgrads, pgrads = jax.vmap(vjp_fn)(cots.astype(out.dtype))
        rows_a, rows_g = [], []
        for l in layers.layers:
            rows_a.append(jnp.concatenate([use_rows(u, rec[u.op]) for u in l.uses], axis=0))
            rows_g.append(jnp.concatenate(
                [jax.vmap(lambda y, u=u, l=l: out_rows(u, l.out_dim, y))(pgrads[u.op])
                 for u in l.uses], axis=1))
        dsq = [jnp.sum(jnp.square(d.astype(dt)), axis=0) for d in dgrads]
        return out, rows_a, rows_g, dsq

    if keys is None:
        return jax.vmap(lambda e: one(e, None))(list(batched))
    return jax.vmap(one)(list(batched), keys)


def value_grad_and_rows(layers: KfacLayers, params, batched, loss_fn: Callable, cotangents, *,
                        keys=None, consts=None):
    r"""The loss, its gradient and `layer_rows`' rows from one forward pass of the model.

    One forward pass over the batch (the model replayed per example under
    ``vmap``, as in `layer_rows`, recording every layer input and keeping each
    example's pullback), the loss $\ell(f)$ and its cotangent
    $\partial \ell / \partial f$ at the outputs, then one backward pass per
    example of the loss cotangent stacked with the statistics' cotangents
    (``cotangents(out, key) -> (S, *out.shape)``): ``S + 1`` pulled-back output
    gradients per layer. The gradient of a layer's matrix is
    $\sum_{n,r} a_{n,r} g_{n,r}^\top$ of the loss row (bias: $\sum g$), that of a
    diagonal leaf the sum of its per-example gradients. The cost is that of
    ``jax.value_and_grad`` plus `layer_rows` less one forward pass.

    Args:
      layers: the model's [`KfacLayers`][curvlib.kronecker.KfacLayers].
      params: the point.
      batched: the array leaves of the batch (`batch_leaves`).
      loss_fn: ``loss_fn(outputs) -> scalar`` on the batch's outputs ``(N, ...)``.
      cotangents: as in `layer_rows`.
      keys: ``(N,)`` keys, one per example, or ``None``.
      consts: the program's constants (default: those traced).

    Returns:
      ``(value, grads, outputs, rows_a, rows_g, diag_sq)``: the loss, its gradient
      (shaped like ``params``), then as `layer_rows` (the statistics' rows only).
    """
    p_leaves, diag_idx, probe_avals, evaluate = _example_replay(layers, params, consts)
    dt = factor_dtype(layers)
    n = batched[0].shape[0]

    def forward(dleaves, probes):  # per example: the diagonal leaves' per-example gradients
        return jax.vmap(evaluate)(dleaves, probes, list(batched))

    dleaves = [jnp.broadcast_to(p_leaves[j], (n,) + p_leaves[j].shape) for j in diag_idx]
    probes = {i: jnp.zeros((n,) + a.shape, a.dtype) for i, a in probe_avals.items()}
    outs, vjp_fn, rec = jax.vjp(forward, dleaves, probes, has_aux=True)
    value, ct = jax.value_and_grad(loss_fn)(outs)
    sg = jax.lax.stop_gradient(outs)
    if keys is None:
        cots = jax.vmap(lambda o: cotangents(o, None))(sg)
    else:
        cots = jax.vmap(cotangents)(sg, keys)
    cots = jnp.concatenate([ct[None].astype(sg.dtype), jnp.moveaxis(cots, 1, 0).astype(sg.dtype)])
    dgrads, pgrads = jax.vmap(vjp_fn)(cots)  # (S + 1, N, ...): the weights stay unbatched
    # the loss's entry 0 and the statistics' 1: taken on the leading axis (contiguous)
    # before the example axis moves to the front
    rows_a, rows_loss, rows_g = [], [], []
    for l in layers.layers:
        rows_a.append(jnp.concatenate(
            [jax.vmap(lambda x, u=u: use_rows(u, x))(rec[u.op]) for u in l.uses], axis=1))
        rows_loss.append(jnp.concatenate(
            [jax.vmap(lambda y, u=u, l=l: out_rows(u, l.out_dim, y))(pgrads[u.op][0])
             for u in l.uses], axis=1))
        rows_g.append(jnp.concatenate(
            [jax.vmap(jax.vmap(lambda y, u=u, l=l: out_rows(u, l.out_dim, y)))(
                jnp.moveaxis(pgrads[u.op][1:], 0, 1)) for u in l.uses], axis=2))
    mats = [_rows_gradient(l, a, g, dt) for l, a, g in zip(layers.layers, rows_a, rows_loss,
                                                           strict=True)]
    diag = [jnp.sum(d[0], axis=0) for d in dgrads]
    grads = from_blocks(layers, mats, diag, params)
    dsq = [jnp.sum(jnp.square(d[1:].astype(dt)), axis=0) for d in dgrads]
    return value, grads, outs, rows_a, rows_g, dsq


def replay(layers: KfacLayers, params, kw: dict, consts=None):
    """``model_fn(params, **kw)`` replayed from the layers' program, per example under ``vmap``:
    the forward pass `value_grad_and_rows` runs (so XLA can share it)."""
    prog = layers.program
    p_leaves = jax.tree.leaves(params)
    batched = batch_leaves((kw,))

    def one(example):
        outs, _ = _program.evaluate(prog, p_leaves + [x[None] for x in example], consts=consts)
        return outs[0][0]

    return jax.vmap(one)(list(batched))


def _rows_gradient(layer: Layer, a, g, dt):
    """A layer's ``(a_dim, d_out)`` gradient $\\sum_{n,r} a_{n,r} g_{n,r}^\top$ from its rows
    ``a`` ``(N, R, d_in)`` (ids ``(N, R)``) and ``g`` ``(N, R, d_out)`` (bias: last row)."""
    hi = jax.lax.Precision.HIGHEST
    g = g.astype(dt)
    if layer.kind == "embedding":
        ids = a.reshape(-1)  # (`use_rows`: the rows read, out-of-range ones past the table)
        return jnp.zeros((layer.in_dim, layer.out_dim), dt).at[ids].add(
            g.reshape(-1, layer.out_dim), mode="drop")
    a = a.astype(dt)
    if layer.bias is not None:
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), dt)], axis=-1)
    return jnp.einsum("nri,nro->io", a, g, precision=hi)


def _layer_factors(layer: Layer, a, g, convention, dt):
    """``(A, G)`` from rows ``a`` ``(N, R, d_in)`` (ids ``(N, R)``), ``g`` ``(N, S, R, d_out)``."""
    n = g.shape[0]
    hi = jax.lax.Precision.HIGHEST
    if layer.kind == "embedding":
        vocab = layer.in_dim
        ids = a.reshape(-1)  # (`use_rows`: the rows read, out-of-range ones past the table)
        counts = jnp.zeros((vocab,), dt).at[ids].add(1.0, mode="drop")
        A = counts / ids.shape[0]
        G = jnp.einsum("nsro,nsrp->op", g, g, precision=hi) / n
        return A, G
    a = a.astype(dt)
    if layer.bias is not None:
        a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), dt)], axis=-1)
    if convention == "expand" or layer.positions == 1:
        r = a.shape[1]
        A = jnp.einsum("nri,nrj->ij", a, a, precision=hi) / (n * r)
        G = jnp.einsum("nsro,nsrp->op", g, g, precision=hi) / n
    else:
        abar = jnp.mean(a, axis=1)
        ghat = jnp.sum(g, axis=2)
        A = jnp.einsum("ni,nj->ij", abar, abar, precision=hi) / n
        G = jnp.einsum("nso,nsp->op", ghat, ghat, precision=hi) / n
    return A, G


# ----------------------------------------------------------------- blocks of a pytree


def to_blocks(layers: KfacLayers, tree: PyTree, dtype=None):
    """``(matrices, diagonal leaves)``: each layer's ``(a_dim, d_out)`` matrix (bias last row)."""
    leaves = jax.tree.leaves(tree)
    mats = []
    for l in layers.layers:
        # (a cast inside the model, mixed precision, is not replayed on a vector: it rounded
        # a float32 gradient to bfloat16, and overflowed float16 past 65504)
        m = apply_chain(l.chain, leaves[l.weight], convert=False)
        if l.bias is not None:
            m = jnp.concatenate([m, jnp.reshape(leaves[l.bias], (1, l.out_dim)).astype(m.dtype)])
        mats.append(m if dtype is None else m.astype(dtype))
    # (a Python scalar leaf, as a scalar parameter given as a float, is an array here)
    diag = [jnp.asarray(leaves[f.leaf], dtype) for f in layers.diagonal]
    return mats, diag


def from_blocks(layers: KfacLayers, mats, diag, like: PyTree) -> PyTree:
    """Inverse of `to_blocks`; leaves are cast to ``like``'s dtypes."""
    like_leaves = jax.tree.leaves(like)
    out = [None] * len(like_leaves)
    for l, m in zip(layers.layers, mats, strict=True):
        if l.bias is not None:
            out[l.bias] = jnp.reshape(m[-1], layers.shapes[l.bias])
            m = m[:-1]
        out[l.weight] = invert_chain(l.chain, m)
    for f, d in zip(layers.diagonal, diag, strict=True):
        out[f.leaf] = d
    out = [o.astype(jnp.result_type(x)) for o, x in zip(out, like_leaves, strict=True)]
    return jax.tree.unflatten(layers.treedef, out)


# ----------------------------------------------------------------- eigendecompositions


class Eigen(NamedTuple):
    """Eigendecompositions of the factors: ``A = QA diag(lA) QA^T``, ``G = QG diag(lG) QG^T``.

    For an embedding ``QA`` is an empty ``(0, 0)`` array (``A`` is diagonal,
    ``lA`` its diagonal). Eigenvalues are clipped at zero. ``D``: the diagonal
    blocks.
    """

    QA: tuple
    lA: tuple
    QG: tuple
    lG: tuple
    D: tuple


def eigen(layers: KfacLayers, factors: Factors) -> Eigen:
    """Eigendecompose every factor (``jnp.linalg.eigh``; cost ``O(d^3)`` per factor)."""
    QA, lA, QG, lG = [], [], [], []
    for l, A, G in zip(layers.layers, factors.A, factors.G, strict=True):
        if l.kind == "embedding":
            QA.append(jnp.zeros((0, 0), A.dtype))
            lA.append(jnp.maximum(A, 0))
        else:
            w, q = jnp.linalg.eigh(_sym(A))
            QA.append(q)
            lA.append(jnp.maximum(w, 0))
        w, q = jnp.linalg.eigh(_sym(G))
        QG.append(q)
        lG.append(jnp.maximum(w, 0))
    return Eigen(tuple(QA), tuple(lA), tuple(QG), tuple(lG), tuple(factors.D))


def _sym(m):
    return 0.5 * (m + m.T)


def _rotate(layer, QA, QG, m):
    """``QA^T m QG`` (``QA`` = I for an embedding)."""
    hi = jax.lax.Precision.HIGHEST
    m = jnp.matmul(m, QG, precision=hi)
    if layer.kind != "embedding":
        m = jnp.matmul(QA.T, m, precision=hi)
    return m


def _unrotate(layer, QA, QG, m):
    hi = jax.lax.Precision.HIGHEST
    m = jnp.matmul(m, QG.T, precision=hi)
    if layer.kind != "embedding":
        m = jnp.matmul(QA, m, precision=hi)
    return m


def exact_scale(lA, lG, damping):
    """Eigenvalues of the damped Kronecker block ``A (x) G + damping I``: ``lA lG^T + damping``."""
    return lA[:, None] * lG[None, :] + jnp.asarray(damping, lA.dtype)


def precondition_eigen(layers, eig: Eigen, mats, diag, damping, scales=None):
    """``(A (x) G + damping I)^{-1}`` per block, exactly, through the eigendecompositions.

    ``scales``: per layer, eigenbasis scalings replacing ``lA lG^T`` (EK-FAC).
    """
    out_m = []
    for i, (l, m) in enumerate(zip(layers.layers, mats, strict=True)):
        r = _rotate(l, eig.QA[i], eig.QG[i], m)
        if scales is None:
            s = exact_scale(eig.lA[i], eig.lG[i], damping)
        else:
            s = scales[i] + jnp.asarray(damping, scales[i].dtype)
        out_m.append(_unrotate(l, eig.QA[i], eig.QG[i], r / s))
    return out_m, _diag_inverse(eig.D, diag, damping)


def _diag_inverse(D, diag, damping):
    return [v / (d + jnp.asarray(damping, d.dtype)) for v, d in zip(diag, D, strict=True)]


class Inverses(NamedTuple):
    r"""Factored-damping inverses ``(A + pi sqrt(lam) I)^{-1}`` and ``(G + sqrt(lam)/pi I)^{-1}``.

    ``A[i]`` is a vector (the inverted diagonal) for an embedding. ``D``: the
    diagonal blocks themselves (damped when applied).
    """

    A: tuple
    G: tuple
    D: tuple


def pi_factor(trace_a, dim_a, trace_g, dim_g):
    r"""Martens & Grosse's $\pi = \sqrt{(\mathrm{tr}A / \dim A) / (\mathrm{tr}G / \dim G)}$.

    ``1`` when either mean eigenvalue is zero.
    """
    ma, mg = trace_a / dim_a, trace_g / dim_g
    ok = (ma > 0) & (mg > 0)
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, ma / jnp.where(ok, mg, 1.0), 1.0)), 1.0)


def factored_inverses(layers: KfacLayers, factors: Factors, damping) -> Inverses:
    r"""Invert the factors with factored Tikhonov damping (Martens & Grosse 2015, sec. 6.3).

    $(A \otimes G + \lambda I)^{-1} \approx (A + \pi\sqrt\lambda I)^{-1} \otimes
    (G + \sqrt\lambda/\pi\, I)^{-1}$. Cost: one Cholesky factorisation and
    triangular solve per factor, ``O(d^3)`` (several times cheaper than ``eigh``).
    """
    Ai, Gi = [], []
    for l, A, G in zip(layers.layers, factors.A, factors.G, strict=True):
        dt = G.dtype
        root = jnp.sqrt(jnp.asarray(damping, dt))
        trace_a = jnp.sum(A) if l.kind == "embedding" else jnp.trace(A)
        pi = pi_factor(trace_a, A.shape[0], jnp.trace(G), G.shape[0])
        if l.kind == "embedding":
            Ai.append(1.0 / (A + pi * root))
        else:
            Ai.append(_spd_inverse(A, pi * root))
        Gi.append(_spd_inverse(G, root / pi))
    return Inverses(tuple(Ai), tuple(Gi), tuple(factors.D))


def _spd_inverse(m, shift):
    """``(m + shift I)^{-1}`` for symmetric PSD ``m``, by Cholesky.

    The shift is floored at ``d * eps`` times the mean eigenvalue, so round-off in
    a singular factor (fewer examples than inputs) cannot break the factorisation
    when the damping is tiny.
    """
    n = m.shape[0]
    eye = jnp.eye(n, dtype=m.dtype)
    mean_eig = jnp.abs(jnp.trace(m)) / n
    shift = jnp.maximum(shift, n * jnp.finfo(m.dtype).eps * mean_eig)
    c = jax.scipy.linalg.cho_factor(_sym(m) + shift * eye, lower=True)
    return _sym(jax.scipy.linalg.cho_solve(c, eye))


def precondition_inverses(layers, inv: Inverses, mats, diag, damping):
    """Apply factored-damping inverses: ``A^{-1} M G^{-1}`` per layer."""
    hi = jax.lax.Precision.HIGHEST
    out_m = []
    for l, Ai, Gi, m in zip(layers.layers, inv.A, inv.G, mats, strict=True):
        mg = jnp.matmul(m, Gi, precision=hi)
        out_m.append(Ai[:, None] * mg if l.kind == "embedding"
                     else jnp.matmul(Ai, mg, precision=hi))
    return out_m, _diag_inverse(inv.D, diag, damping)


def multiply_blocks(layers, factors: Factors, mats, diag):
    """``F v`` on blocks: ``A M G`` per layer, ``D * v`` per diagonal leaf."""
    hi = jax.lax.Precision.HIGHEST
    out_m = []
    for l, A, G, m in zip(layers.layers, factors.A, factors.G, mats, strict=True):
        mg = jnp.matmul(m, G, precision=hi)
        out_m.append(A[:, None] * mg if l.kind == "embedding" else jnp.matmul(A, mg, precision=hi))
    out_d = [d * v for d, v in zip(factors.D, diag, strict=True)]
    return out_m, out_d


# ----------------------------------------------------------------- the operator


@register_pytree_node_class
class KfacCurvature:
    r"""K-FAC curvature: block-diagonal, a Kronecker product per layer, diagonal elsewhere.

    A pytree (its factors are leaves, its [`KfacLayers`][curvlib.kronecker.KfacLayers]
    static), so it passes into jitted functions as an argument.

    Attributes:
      factors: the [`Factors`][curvlib.kronecker.Factors] (``A``, ``G`` per layer, ``D`` per
        diagonal leaf).
      layers: the [`KfacLayers`][curvlib.kronecker.KfacLayers] structure.
      matvec: ``v -> C v`` (a `jax.tree_util.Partial`), ``v`` shaped like
        the parameters. Cost: two matrix products per layer.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.kronecker import kfac_curvature
      >>> model = lambda p, x: x @ p["w"]
      >>> C = kfac_curvature(model, {"w": jnp.zeros((2, 1))}, jnp.eye(2), likelihood="gaussian")
      >>> C.layers, C.factors.A[0].tolist(), C.factors.G[0].tolist()  # A = x^T x / n, G = I
      (KfacLayers(1 dense; 0 diagonal leaves), [[0.5, 0.0], [0.0, 0.5]], [[1.0]])
      >>> jax.jit(lambda C, v: C.matvec(v))(C, {"w": jnp.ones((2, 1))})["w"].tolist()
      [[0.5], [0.5]]
    """

    def __init__(self, factors: Factors, layers: KfacLayers, shardings=None):
        self.factors = factors
        self.layers = layers
        self.shardings = None if shardings is None else tuple(shardings)

    def tree_flatten(self):
        return (self.factors,), (self.layers, self.shardings)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def matvec(self) -> Partial:
        return Partial(_matvec, self)

    def inverse_matvec(self, damping, *, method: str = "exact") -> KfacInverse:
        r"""The damped inverse ``v -> (C + damping I)^{-1} v`` as an operator.

        ``method="exact"`` inverts the damped block exactly through the
        factors' eigendecompositions, $(Q_A \otimes Q_G)(\Lambda_A
        \otimes \Lambda_G + \lambda)^{-1}(Q_A \otimes Q_G)^\top$;
        ``"factored"`` is Martens & Grosse's factored Tikhonov damping
        $(A + \pi\sqrt\lambda I)^{-1} \otimes (G + \sqrt\lambda/\pi\, I)^{-1}$
        with $\pi^2 = (\operatorname{tr} A / \dim A) / (\operatorname{tr} G / \dim G)$
        (an approximation of the former). Diagonal blocks: ``v / (D + damping)``.

        Cost, when called: one ``eigh`` (exact) or one Cholesky factorisation
        (factored) per factor, ``O(d^3)``; per application, four (exact) or two
        (factored) matrix products per layer.

        Args:
          damping: ``lambda >= 0`` added to the curvature (traceable). With ``0`` the
            inverse exists only where the factors are nonsingular (more examples than a
            layer's inputs): ``"exact"`` of a singular ``C`` is not finite.
          method: ``"exact"`` or ``"factored"``.

        Returns:
          The inverse operator (callable on pytrees shaped like the parameters).

        Raises:
          ValueError: for an unknown ``method`` or a concrete ``damping`` that is negative
            or not finite.
        """
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}; got {method!r}.")
        _validate.number(damping, "damping", minimum=0)
        damping = jnp.asarray(damping)
        if method == "exact":
            pre = eigen(self.layers, self.factors)
        else:
            pre = factored_inverses(self.layers, self.factors, damping)
        return KfacInverse(pre, damping, self.layers, self.shardings)

    def __repr__(self):
        return f"KfacCurvature({self.layers!r})"


def _checked(layers: KfacLayers, v, name: str) -> None:
    """``v`` shaped like the parameters (static: free under ``jit``); its leaves were read
    by position (a list for a dict of layers took the other layers' factors)."""
    _validate.tangent(v, (layers.treedef, layers.paths, layers.shapes,
                          (None,) * len(layers.shapes)), like="params", name=name)


def _matvec(curv: KfacCurvature, v):
    _checked(curv.layers, v, "vector")
    mats, diag = to_blocks(curv.layers, v, factor_dtype(curv.layers))
    out_m, out_d = multiply_blocks(curv.layers, curv.factors, mats, diag)
    return _like_params(from_blocks(curv.layers, out_m, out_d, v), curv.layers, curv.shardings)


def _like_params(tree, layers, shardings):
    """Products keep the parameters' layout (sharded parameters give sharded products)."""
    if shardings is None:
        return tree
    return _sharding.with_shardings(tree, jax.tree.unflatten(layers.treedef, shardings))


def precondition(layers, pre, tree, damping, dtype=None, scales=None):
    """``(C + damping I)^{-1} tree`` from `Eigen` (exact; EK-FAC with ``scales``)
    or `Inverses` (factored)."""
    mats, diag = to_blocks(layers, tree, factor_dtype(layers) if dtype is None else dtype)
    if isinstance(pre, Eigen):
        out_m, out_d = precondition_eigen(layers, pre, mats, diag, damping, scales)
    else:
        out_m, out_d = precondition_inverses(layers, pre, mats, diag, damping)
    return from_blocks(layers, out_m, out_d, tree)


@register_pytree_node_class
class KfacInverse:
    """``v -> (C + damping I)^{-1} v``: a callable pytree (arrays as leaves, structure static)."""

    def __init__(self, pre, damping, layers: KfacLayers, shardings=None):
        self.pre = pre
        self.damping = damping
        self.layers = layers
        self.shardings = shardings

    def tree_flatten(self):
        return (self.pre, self.damping), (self.layers, self.shardings)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    def __call__(self, v):
        _checked(self.layers, v, "vector")
        out = precondition(self.layers, self.pre, v, self.damping)
        return _like_params(out, self.layers, self.shardings)

    def __repr__(self):
        kind = "exact" if isinstance(self.pre, Eigen) else "factored"
        return f"KfacInverse({kind}, {self.layers!r})"


def kfac_curvature(
    model_fn: Callable,
    params: PyTree,
    *args,
    likelihood: str = "categorical",
    key: jax.Array | None = None,
    num_samples: int = 1,
    convention: str = "reduce",
    variance=1.0,
) -> KfacCurvature:
    r"""The K-FAC approximation of the Fisher of a mean negative log-likelihood.

    The layers are found from the model's jaxpr ([`find_layers`][curvlib.kronecker.find_layers],
    no tags). With ``key=None`` the factors are those of the exact Fisher (the
    Gauss-Newton matrix of the matching loss): for one example and one dense
    layer, $A \otimes G$ *is* that layer's Fisher block. With a ``key``
    the output gradients come from ``num_samples`` targets sampled from the
    model (Monte-Carlo Fisher, unbiased for ``G`` given the inputs).

    The loss whose curvature this is: ``mean over examples of NLL(y | f)`` with
    ``f = model_fn(params, *args)``: ``"categorical"``, softmax cross-entropy over
    the last axis, averaged over any other (position) axes, i.e. the mean over tokens (the
    normalisation of [`curvlib.fisher_matvec`][curvlib.fisher_matvec]);
    ``"gaussian"``, ``||f - y||^2 / (2 variance)`` summed over the output entries (as
    ``fisher_matvec`` for ``(N, C)`` outputs; for ``(N, T, C)`` outputs ``fisher_matvec``
    counts each position as an example, ``T`` times less curvature);
    ``"bernoulli"``, sigmoid cross-entropy summed over the output entries.

    Cost: one forward pass over the batch and one backward pass per column of
    the output-Hessian square root (the output size per example; e.g. the
    number of classes) with ``key=None``, or per sample with a key; then
    ``O(N R d^2)`` per factor. Memory: every layer's inputs and output
    gradients for the batch (times the columns for the gradients).

    Args:
      model_fn: ``model_fn(params, *args) -> outputs``, leading axis = examples.
      params: the point (any pytree of float arrays).
      *args: the batch; every array leaf has the leading example axis.
      likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
      key: ``None`` for the exact Fisher, a PRNG key for Monte Carlo.
      num_samples: targets sampled per example (Monte Carlo only).
      convention: weight sharing, ``"reduce"`` or ``"expand"`` (module docstring).
      variance: the Gaussian likelihood's variance (``None``: 1).

    Returns:
      A [`KfacCurvature`][curvlib.KfacCurvature] (``.matvec``, ``.inverse_matvec(damping)``).

    Raises:
      ValueError: for an unknown ``likelihood`` or ``convention``, a bad
        ``num_samples``, or a batch without a shared leading axis or without examples.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib.kronecker import kfac_curvature
      >>> model = lambda p, x: x @ p["w"] + p["b"]
      >>> p = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> x = jnp.array([[1.0, 0.0, 2.0]])
      >>> C = kfac_curvature(model, p, x, likelihood="gaussian")
      >>> C.factors.A[0].tolist()  # [a; 1][a; 1]^T
      [[1.0, 0.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 4.0, 2.0], [1.0, 0.0, 2.0, 1.0]]
      >>> v = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
      >>> C.matvec(v)["b"].tolist()  # (a^T w + b) for every output, times G = I
      [4.0, 4.0]
      >>> back = C.inverse_matvec(0.5)(C.matvec(v))  # (C + 0.5 I)^{-1} C v
      >>> round(float(back["b"][0]), 4)  # 6 / 6.5 of v's part along [a; 1]: (4 / 6)(6 / 6.5)
      0.6154

    References:
      J. Martens and R. Grosse, ICML 2015; R. Eschenhagen et al., NeurIPS 2023.
    """
    _validate.float_leaves(params, "params")
    _validate.prng_key(key, optional=True)  # None: the exact Fisher
    num_samples = check_options(likelihood, convention, num_samples, variance, key)
    variance = 1.0 if variance is None else variance  # (as fisher_matvec's None)
    _sharding.refuse_explicit({"params": params, "args": args}, "kfac_curvature")
    layers = _find_layers(model_fn, params, args)
    if layers.num_examples == 0:  # (the factors' means over no examples are 0 / 0)
        raise ValueError("`args` must hold at least one example; got a batch of 0 examples.")
    _likelihood.check_output(likelihood, layers.out_aval.shape)
    check_examples_independent(model_fn, params, args, "kfac_curvature")
    factors, _ = _statistics_jit(layers, params, batch_leaves(args),
                                 tuple(layers.program.consts.values()), likelihood, key,
                                 num_samples, convention, variance)
    return KfacCurvature(factors, layers, _sharding.param_shardings(params))


def batch_leaves(args) -> list:
    """The array leaves of a batch (those with the example axis), in order."""
    leaves, _, arrays, _ = _split_args(args)
    return [leaves[i] for i in arrays]


def _statistics_impl(layers, params, batched, consts, likelihood, key, num_samples, convention,
                     variance):
    return statistics(layers, params, batched, consts=consts, likelihood=likelihood, key=key,
                      num_samples=num_samples, convention=convention, variance=variance)


_statistics_jit = jax.jit(
    _statistics_impl, static_argnames=("layers", "likelihood", "num_samples", "convention")
)
