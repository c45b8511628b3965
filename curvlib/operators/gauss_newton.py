"""Gauss-Newton-type curvature: the GGN, the Fisher and the empirical Fisher.

All three are ``J^T M J`` with ``J`` the Jacobian of some outputs with respect
to the parameters and ``M`` a positive semi-definite matrix in output space:

| operator | outputs | ``M`` (per example ``i``) |
|---|---|---|
| [`ggn_matvec`][curvlib.ggn_matvec] | ``model_fn(params, *args)`` | ``d^2 loss / d outputs^2`` |
| [`fisher_matvec`][curvlib.fisher_matvec] | logits / Gaussian means | ``E_{y~p(.|f_i)}[g g^T]`` |
| `empirical_fisher_matvec` | per-example losses | ``1 / n`` (identity) |

Each product is one tangent (``jvp``) pass, an output-space product and one
transposed (``vjp``) pass. With the default ``mode="linearize"`` the model is
linearised once when the operator is built and every product replays only the
tangent and transposed passes over the stored residuals (about one gradient's
cost); ``mode="recompute"`` recomputes the forward pass in every product (no
residual memory; the default with ``microbatch_size``).

References:
  N. Schraudolph, *Fast curvature matrix-vector products for second-order
  gradient descent*, Neural Comput. 2002.
  J. Martens, *New insights and perspectives on the natural gradient method*,
  JMLR 2020.
  F. Kunstner, L. Balles and P. Hennig, *Limitations of the empirical Fisher
  approximation for natural gradient descent*, NeurIPS 2019.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

from curvlib import _tree, _validate
from curvlib._compile import quick_jit, weak_cache
from curvlib.operators import _common as C
from curvlib.operators import _wrt
from curvlib.operators.microbatch import (
    batch_size,
    gathered_args,
    gathered_for_chunks,
    microbatched,
)

PyTree = Any

MODES = _validate.GAUSS_NEWTON_MODES
LIKELIHOODS = ("categorical", "gaussian")


def _linearize(model_fn, params, args):
    return C.linearize(model_fn, params, args)


# ------------------------------------------------------------------------ GGN


def _loss_hvp(loss_fn, outputs, loss_args, t):
    return jax.jvp(lambda o: jax.grad(loss_fn)(o, *loss_args), (outputs,), (t,))[1]


@weak_cache
def _ggn_linearized(loss_fn):
    def matvec(params, outputs, lin, loss_args, v):
        jv = lin(C.cast_like(v, params))
        return C.transpose(lin, params, _loss_hvp(loss_fn, outputs, loss_args, jv))

    return matvec


@weak_cache
def _ggn_recompute(model_fn, loss_fn, num_model_args):
    def matvec(params, all_args, v):
        args, loss_args = all_args[:num_model_args], all_args[num_model_args:]
        outputs, lin = jax.linearize(lambda p: model_fn(p, *args), params)
        jv = lin(C.cast_like(v, params))
        return C.transpose(lin, params, _loss_hvp(loss_fn, outputs, loss_args, jv))

    return matvec


def ggn_matvec(
    model_fn: Callable,
    loss_fn: Callable,
    params: PyTree,
    *args,
    loss_args: tuple = (),
    mode: str | None = None,
    microbatch_size: int | None = None,
    batch_argnums: int | tuple[int, ...] | None = None,
    has_aux: bool = False,
    wrt=None,
) -> Partial:
    """Generalised Gauss-Newton product ``v -> J^T H_l J v``.

    ``J`` is the Jacobian of ``outputs = model_fn(params, *args)`` with respect to
    ``params`` and ``H_l`` the Hessian of ``loss_fn(outputs, *loss_args)`` with
    respect to the outputs (Schraudolph 2002; Martens 2010). For a mean squared
    error ``loss_fn(o) = sum(o**2) / (2n)`` this is ``J^T J / n``; for any convex
    ``loss_fn`` it is positive semi-definite, which makes it the curvature of
    choice for Hessian-free optimisation.

    Cost per product: one tangent (jvp) pass, one transposed (vjp) pass and an
    output-space HVP of the loss; ``mode="recompute"`` adds a forward pass.
    Memory: the model's linearisation residuals (``"linearize"``) or none
    between products (``"recompute"``).

    Args:
      model_fn: ``model_fn(params, *args) -> outputs`` (any pytree), or
        ``(outputs, aux)`` with ``has_aux``.
      loss_fn: ``loss_fn(outputs, *loss_args) -> scalar``.
      params: the point.
      *args: inputs of ``model_fn``.
      loss_args: a tuple (or list) of the extra inputs of ``loss_fn`` (targets,
        masks): ``loss_args=(y,)`` for ``loss_fn(outputs, y)``.
      mode: ``"linearize"`` (default; linearise the model once) or
        ``"recompute"`` (default with ``microbatch_size``).
      microbatch_size: optional chunk size over the leading axis of the batched
        ``args`` and of *every* entry of ``loss_args`` (the loss must be a mean
        over it; close over unbatched loss constants).
      batch_argnums: which of ``args`` are batched; default all of them.
      has_aux: ``model_fn`` returns ``(outputs, aux)`` (e.g. flax's mutable
        collections); ``aux`` is ignored.
      wrt: ``None``, or a parameter block (as ``where`` of
        [`restrict`][curvlib.restrict]): the block ``G_BB = J_B^T H_l J_B``, with
        ``J_B`` the Jacobian with respect to the block's leaves only (the tangent
        pass starts at the block, the transposed pass stops at it), on the block's
        sub-pytree; equal to ``restrict(ggn_matvec(...), params, wrt)`` at the
        block's cost.

    Returns:
      ``matvec`` (a `jax.tree_util.Partial`) with ``matvec(v) = G v`` (with
      ``wrt``: ``G_BB v_B``).

    Raises:
      TypeError: if ``loss_fn`` does not return a float scalar, ``params``
        has a non-real-floating leaf, or ``loss_args`` is not a tuple or list (an
        array or a dict would be iterated into rows or keys).
      ValueError: for an unknown ``mode`` or an unbatched leaf under
        microbatching (named by path); when called, for a tangent whose
        structure or shapes differ from ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import ggn_matvec
      >>> model = lambda p, x: jnp.tanh(x @ p)
      >>> mse = lambda o, y: jnp.sum((o - y) ** 2) / (2 * o.shape[0])
      >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.zeros(2)
      >>> G = ggn_matvec(model, mse, jnp.zeros(2), x, loss_args=(y,))
      >>> G(jnp.array([1.0, 1.0])).tolist()  # J = x at p = 0: J^T J / n
      [0.5, 0.5]

    References:
      N. Schraudolph, *Fast curvature matrix-vector products for second-order
      gradient descent*, Neural Comput. 2002; J. Martens, *Deep learning via
      Hessian-free optimization*, ICML 2010.
    """
    _validate.float_leaves(params, "params")
    if not isinstance(loss_args, (tuple, list)):  # an array or a dict would be iterated
        what = (f"an array of shape {tuple(jnp.shape(loss_args))}"
                if hasattr(loss_args, "shape") else f"a {type(loss_args).__name__}")
        raise _validate.ArgumentError(
            f"`loss_args` must be a tuple of the extra arguments of `loss_fn`, e.g. "
            f"`loss_args=(y,)` for `loss_fn(outputs, y)`; got {what}.")
    loss_args = tuple(loss_args)
    if wrt is not None:
        build = lambda f, p, *a, **kw: ggn_matvec(f, loss_fn, p, *a, **kw)
        return _wrt.block_operator(build, model_fn, params, args, wrt, loss_args=loss_args,
                                   mode=mode,
                                   microbatch_size=microbatch_size,
                                   batch_argnums=batch_argnums, has_aux=has_aux)
    _validate.functions(model_fn, "model_fn")
    out_shape = _validate.output(jax.eval_shape(lambda p: model_fn(p, *args), params),
                                 "model_fn", has_aux=has_aux, scalar=False, what="outputs")
    model_fn = C.value_only(model_fn) if has_aux else model_fn
    _validate.float_leaves(out_shape, "outputs of model_fn", advice=C.OUTPUT_ADVICE)
    example_out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    _validate.functions(loss_fn, "loss_fn")
    _validate.output(_tree.eval_shape(loss_fn, example_out, *loss_args), "loss_fn",
                     has_aux=None)
    mode = _validate.mode(mode, gauss_newton=True, microbatch_size=microbatch_size)
    if mode == "linearize":
        outputs, lin = _linearize(model_fn, params, args)
        return C.program_operator(_ggn_linearized(loss_fn), params, params, outputs, lin,
                                  loss_args)
    product = _ggn_recompute(model_fn, loss_fn, len(args))
    all_args = tuple(args) + loss_args
    size, argnums, _ = _validate.microbatch(microbatch_size, args, batch_argnums,
                                            what="model_fn", extra=loss_args)
    if size is not None:
        argnums = argnums + tuple(range(len(args), len(all_args)))
        product = microbatched(product, size, argnums)
        all_args = gathered_args(all_args, argnums, size)
    return C.program_operator(product, params, params, all_args)


# --------------------------------------------------------------------- Fisher


def _wide(dt):
    return jnp.promote_types(dt, jnp.float32)


def _num_examples(shape: tuple[int, ...]) -> int:
    """Examples of an output of ``shape`` (event axis last): the product of the other axes."""
    return int(math.prod(shape[:-1]))


def _event_view(likelihood, x):
    """Gaussian outputs with one axis ``(n,)`` are ``n`` scalar targets: view them as ``(n, 1)``."""
    return x[..., None] if likelihood == "gaussian" and x.ndim == 1 else x


def _sample_categorical(p, u):
    """Class indices ``y[..., s]`` with ``P(y = c) = p[..., c]``, by inverting the CDF at ``u``."""
    cdf = jnp.cumsum(p, axis=-1)
    y = jnp.sum(cdf[..., None, :] <= u[..., :, None], axis=-1)
    return jnp.minimum(y, p.shape[-1] - 1)


@quick_jit(static_argnames=("likelihood", "mc"))  # (eagerly: one program, not op by op)
def _output_state(likelihood, mc, outputs, noise, variance):
    """What a product needs in output space (computed once per linearisation or chunk).

    Exact categorical: the probabilities ``p``. Exact Gaussian: ``1 / sigma^2``
    broadcast to the outputs. Monte-Carlo: the sampled output gradients
    ``g_s = grad_f (-log p(y_s | f))`` stacked on an axis ``-2`` of length ``S``:
    ``p - onehot(y_s)`` (categorical), ``-eps_s / sigma`` (Gaussian).
    """
    f = _event_view(likelihood, outputs)
    wide = _wide(f.dtype)
    if likelihood == "categorical":
        p = jax.nn.softmax(f.astype(wide), axis=-1)
        if not mc:
            return p
        y = _sample_categorical(p, noise)
        return p[..., None, :] - jax.nn.one_hot(y, p.shape[-1], dtype=wide)
    var = jnp.broadcast_to(jnp.asarray(variance, wide), outputs.shape)
    var = _event_view(likelihood, var)
    if not mc:
        return 1.0 / var
    return -noise.astype(wide) / jnp.sqrt(var)[..., None, :]


def _output_product(likelihood, mc, state, jv):
    """``M_i (J v)_i / N`` for every example ``i``, in the dtype of ``jv``."""
    t = _event_view(likelihood, jv)
    n = _num_examples(t.shape)
    tw = t.astype(state.dtype)
    if mc:
        c = jnp.einsum("...sc,...c->...s", state, tw)
        out = jnp.einsum("...sc,...s->...c", state, c) / (state.shape[-2] * n)
    elif likelihood == "categorical":
        pt = state * tw
        out = (pt - state * jnp.sum(pt, axis=-1, keepdims=True)) / n
    else:
        out = state * tw / n
    return out.reshape(jv.shape).astype(jv.dtype)


@functools.cache
def _fisher_linearized(likelihood: str, mc: bool):
    def matvec(params, state, lin, v):
        jv = lin(C.cast_like(v, params))
        return C.transpose(lin, params, _output_product(likelihood, mc, state, jv))

    return matvec


@weak_cache
def _fisher_recompute(model_fn, likelihood, mc, num_model_args):
    def matvec(params, all_args, v):
        args = all_args[:num_model_args]
        noise = all_args[num_model_args] if mc else None
        variance = all_args[-1]
        outputs, lin = jax.linearize(lambda p: model_fn(p, *args), params)
        state = _output_state(likelihood, mc, outputs, noise, variance)
        jv = lin(C.cast_like(v, params))
        return C.transpose(lin, params, _output_product(likelihood, mc, state, jv))

    return matvec


def _check_outputs(likelihood, out_shape):
    if not isinstance(out_shape, jax.ShapeDtypeStruct):
        n = len(jax.tree.leaves(out_shape))
        raise TypeError(
            f"`fisher_matvec` needs `model_fn` to return one array (logits or Gaussian means); "
            f"it returned a pytree with {n} leaves {jax.tree.structure(out_shape)}. Select the "
            "prediction, e.g. `lambda p, x: model(p, x)['logits']`, or pass `has_aux=True` if "
            "it returns `(outputs, aux)`."
        )
    if not jnp.issubdtype(out_shape.dtype, jnp.floating):
        raise TypeError(f"`model_fn` must return floating outputs; got {out_shape.dtype}.")
    if likelihood == "categorical" and len(out_shape.shape) < 2:
        raise ValueError(
            "the categorical Fisher needs logits of shape (examples..., num_classes): the last "
            f"axis holds the classes and the others index examples; got shape {out_shape.shape}."
        )
    if likelihood == "categorical" and out_shape.shape[-1] == 1:
        raise ValueError(
            "the categorical Fisher needs at least two classes on the last axis; got shape "
            f"{out_shape.shape}: a softmax over one logit is constant (its Fisher is zero). For "
            "a binary classifier with one logit, take the Gauss-Newton of its sigmoid "
            "cross-entropy (`ggn_matvec`).")
    if likelihood == "gaussian" and len(out_shape.shape) < 1:
        raise ValueError(
            "the Gaussian Fisher needs means with at least one (example) axis; got a scalar."
        )


def fisher_matvec(
    model_fn: Callable,
    params: PyTree,
    *args,
    likelihood: str = "categorical",
    key: jax.Array | None = None,
    num_samples: int = 1,
    variance=None,
    mode: str | None = None,
    microbatch_size: int | None = None,
    batch_argnums: int | tuple[int, ...] | None = None,
    has_aux: bool = False,
    wrt=None,
) -> Partial:
    """The Fisher information of the model's predictive distribution, ``v -> F v``.

    ``f = model_fn(params, *args)`` parametrises a distribution ``p(y | f_i)`` for
    every example ``i``. The examples are all positions of ``f`` except its last
    axis: the classes (``likelihood="categorical"``, ``f`` are logits) or the
    event dimensions (``"gaussian"``, ``f`` are means); a Gaussian output with a
    single axis ``(n,)`` holds ``n`` scalar predictions. With ``N`` examples,

        ``F = (1/N) sum_i J_i^T E_{y ~ p(.|f_i)}[g_i g_i^T] J_i``, ``g_i = grad_f -log p(y|f_i)``,

    the Fisher of the *mean* negative log-likelihood over the examples (for a
    sequence model's logits ``(batch, time, classes)``: the mean over all
    tokens, as in a mean cross-entropy). In closed form:

    * categorical: ``E[g g^T] = diag(p_i) - p_i p_i^T`` with ``p_i = softmax(f_i)``,
      so ``F`` equals the GGN of the mean softmax cross-entropy. The product
      applies ``p * u - p (p^T u)`` to ``u = J v``: no ``C x C`` matrix is formed.
    * gaussian: ``p(y | f_i) = N(y; f_i, sigma^2 I)`` with ``sigma^2 = variance``
      (default 1; a positive scalar or an array broadcastable to the outputs),
      ``-log p = ||y - f_i||^2 / (2 sigma^2) + const``, ``E[g g^T] = I / sigma^2``:
      ``F = J^T J / (sigma^2 N)``, the GGN of ``sum((f - y)**2) / (2 sigma^2 N)``.

    **Exact** when ``key`` is ``None``. **Monte-Carlo** otherwise: ``S =
    num_samples`` targets ``y_is ~ p(. | f_i)`` are drawn per example (once,
    when the operator is built: every product uses the same draws, so the
    operator is a fixed symmetric PSD matrix that Krylov methods can work
    with) and ``E[g g^T]`` is replaced by ``(1/S) sum_s g_is g_is^T``. The
    estimator is unbiased, ``E_key[F_hat] = F``. For a fixed ``v`` with
    ``u_i = J_i v`` its quadratic form has variance

        ``Var[v^T F_hat v] = (1 / (N^2 S)) sum_i (E[(g_i^T u_i)^4] - (u_i^T F_i u_i)^2)``,

    which is ``(1/(N^2 S)) sum_i (m4_i - m2_i^2)`` with ``m2_i, m4_i`` the second and
    fourth central moments of ``u_i[y]`` under ``y ~ p_i`` (categorical), and
    ``(2 / (N^2 S)) sum_i (u_i^T F_i u_i)^2`` (Gaussian): it falls as ``1/S``
    and as ``1/N`` for examples of similar size. Its product costs the same
    as the exact one (sampling lives in output space), so the exact Fisher
    is preferable whenever it is available; the Monte-Carlo one matches the
    estimators of K-FAC-style methods and is the unbiased low-rank (rank
    ``<= N S``) alternative.

    Cost per product: one tangent and one transposed pass of the model (plus a
    forward pass with ``mode="recompute"``) and ``O(N C S)`` output-space work.

    Args:
      model_fn: ``model_fn(params, *args) -> f`` (one array, event axis last),
        or ``(f, aux)`` with ``has_aux``.
      params: the point.
      *args: inputs of ``model_fn``.
      likelihood: ``"categorical"`` (``f`` are logits) or ``"gaussian"`` (``f`` are means).
      key: ``None`` for the exact Fisher, else a PRNG key for the Monte-Carlo one.
      num_samples: targets drawn per example (Monte-Carlo only; a static int).
      variance: the Gaussian's ``sigma^2`` (``"gaussian"`` only; default 1).
      mode: ``"linearize"`` (default) or ``"recompute"`` (default with
        ``microbatch_size``), as in [`ggn_matvec`][curvlib.ggn_matvec].
      microbatch_size: optional chunk size over the leading axis of the batched
        ``args``; the model's outputs must carry the same leading axis.
      batch_argnums: which of ``args`` are batched; default all of them.
      has_aux: ``model_fn`` returns ``(f, aux)``; ``aux`` is ignored.
      wrt: ``None``, or a parameter block (as ``where`` of
        [`restrict`][curvlib.restrict]): the block ``F_BB`` on the block's
        sub-pytree, from the Jacobian with respect to the block's leaves only;
        equal to ``restrict(fisher_matvec(...), params, wrt)`` at the block's cost.

    Returns:
      ``matvec`` (a `jax.tree_util.Partial`) with ``matvec(v) = F v`` (with
      ``wrt``: ``F_BB v_B``).

    Raises:
      ValueError: for an unknown ``likelihood`` or ``mode``, a bad ``key`` or
        ``num_samples``, ``num_samples``/``variance`` where they do not apply,
        outputs of the wrong rank, or an unbatched leaf under microbatching.
      TypeError: for outputs that are not one floating array, or a
        non-real-floating leaf of ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib import fisher_matvec
      >>> model = lambda p, x: x @ p                 # logits of 2 examples, 2 classes
      >>> x, w = jnp.eye(2), jnp.zeros((2, 2))       # p = (1/2, 1/2) for both examples
      >>> F = fisher_matvec(model, w, x)
      >>> F(jnp.array([[1.0, 0.0], [0.0, 0.0]])).tolist()   # J^T (diag p - p p^T) J / 2
      [[0.125, -0.125], [0.0, 0.0]]
      >>> Fmc = fisher_matvec(model, w, x, key=jax.random.key(0), num_samples=1000)
      >>> Fmc(jnp.array([[1.0, 0.0], [0.0, 0.0]])).round(1).tolist()
      [[0.1, -0.1], [0.0, 0.0]]

    References:
      S. Amari, *Natural gradient works efficiently in learning*, Neural
      Comput. 1998; J. Martens, *New insights and perspectives on the natural
      gradient method*, JMLR 2020.
    """
    _validate.float_leaves(params, "params")
    if wrt is not None:
        return _wrt.block_operator(fisher_matvec, model_fn, params, args, wrt,
                                   likelihood=likelihood, key=key, num_samples=num_samples,
                                   variance=variance, mode=mode,
                                   microbatch_size=microbatch_size,
                                   batch_argnums=batch_argnums, has_aux=has_aux)
    mc, S, variance = _fisher_options(likelihood, key, num_samples, variance)
    _validate.functions(model_fn, "model_fn")
    out_shape = _validate.output(jax.eval_shape(lambda p: model_fn(p, *args), params),
                                 "model_fn", has_aux=has_aux, scalar=False, what="outputs")
    model_fn = C.value_only(model_fn) if has_aux else model_fn
    _validate.float_leaves(out_shape, "outputs of model_fn", advice=C.OUTPUT_ADVICE)
    _check_outputs(likelihood, out_shape)
    if likelihood == "gaussian":
        try:  # to the outputs' shape, not beyond it (an (n, 1) for outputs (n,) widened them)
            fits = np.broadcast_shapes(np.shape(variance), out_shape.shape) == out_shape.shape
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"`variance` of shape {np.shape(variance)} does not broadcast to the outputs' "
                f"shape {out_shape.shape}."
            )
    noise = _draw_noise(likelihood, key, S, out_shape) if mc else None
    mode = _validate.mode(mode, gauss_newton=True, microbatch_size=microbatch_size)
    if mode == "linearize":
        outputs, lin = _linearize(model_fn, params, args)
        state = _output_state(likelihood, mc, outputs, noise, variance)
        return C.params_operator(_fisher_linearized(likelihood, mc), params, params, state, lin)
    product = _fisher_recompute(model_fn, likelihood, mc, len(args))
    all_args = tuple(args) + ((noise,) if mc else ()) + (jnp.asarray(variance),)
    size, argnums, n = _validate.microbatch(microbatch_size, args, batch_argnums,
                                            what="model_fn")
    if size is not None:
        if out_shape.shape[:1] != (n,):
            raise ValueError(
                f"microbatching the Fisher needs the model's outputs to keep the batch axis "
                f"first; the batch size is {n} but the outputs have shape {out_shape.shape}."
            )
        if np.ndim(variance) and np.shape(variance)[:1] == (n,) and len(out_shape.shape) == \
                np.ndim(variance):
            argnums = argnums + (len(all_args) - 1,)  # per-example variances are chunked too
        if mc:
            argnums = argnums + (len(args),)
        product = microbatched(product, size, tuple(sorted(argnums)))
        all_args = gathered_args(tuple(all_args), argnums, size)
    return C.program_operator(product, params, params, all_args)


def _fisher_options(likelihood, key, num_samples, variance):
    """``(mc, S, variance)``: `fisher_matvec`'s likelihood options, checked.

    ``mc`` is whether targets are sampled (a ``key``), ``S`` the samples per
    example, ``variance`` the Gaussian variance (``1`` by default).
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"`likelihood` must be one of {LIKELIHOODS}; got {likelihood!r}.")
    mc = key is not None
    S = _validate.static_int(num_samples, "num_samples", minimum=1)
    if not mc and S != 1:
        raise ValueError(
            "`num_samples` applies to the Monte-Carlo Fisher only; pass a `key` to sample "
            "targets (the exact Fisher, key=None, needs no samples)."
        )
    if mc:
        _validate.prng_key(key, optional=True)
    if variance is not None and likelihood != "gaussian":
        raise ValueError("`variance` applies to likelihood='gaussian' only.")
    if variance is None:
        variance = 1.0
    if not isinstance(variance, jax.core.Tracer) and not np.all(np.asarray(variance) > 0):
        raise ValueError(f"`variance` must be positive; got {variance!r}.")
    return mc, S, variance


def _draw_noise(likelihood, key, S, out_shape):
    """The randomness of the Monte-Carlo Fisher, drawn once: its leading axis is the outputs'.

    Categorical: uniforms ``(examples..., S)`` (inverted through each example's
    CDF at product time). Gaussian: standard normals ``(examples..., S, D)``.
    """
    shape = out_shape.shape
    wide = _wide(out_shape.dtype)
    # on a mesh of Explicit axes the draws are typed split as the outputs' example axes (an
    # unsplit draw met split outputs in the transposed product: a cotangent type error)
    s = getattr(out_shape, "sharding", None)  # (of `jax.eval_shape`'s outputs)
    mesh = getattr(s, "mesh", None)
    explicit = mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types
    spec = tuple(s.spec) + (None,) * (len(shape) - len(s.spec)) if explicit else None
    if likelihood == "categorical":
        out = None if spec is None else P(*spec[:-1], None)
        return jax.random.uniform(key, shape[:-1] + (S,), wide, out_sharding=out)
    event = shape if len(shape) > 1 else shape + (1,)
    if spec is not None and len(shape) == 1:
        spec = spec + (None,)
    out = None if spec is None else P(*spec[:-1], None, spec[-1])
    return jax.random.normal(key, event[:-1] + (S,) + event[-1:], wide, out_sharding=out)


# ------------------------------------------------------------ empirical Fisher


@weak_cache
def _per_example_losses(per_example_loss):
    def losses(params, batch):
        return jax.vmap(per_example_loss, in_axes=(None, 0))(params, batch)

    return losses


def _ef_product(params, lin, v):
    """``J_l^T (J_l v) / n`` for the linearised per-example losses ``lin`` (``v -> J_l v``)."""
    jv = lin(C.cast_like(v, params))
    return C.transpose(lin, params, jv / jv.shape[0])


@weak_cache
def _ef_recompute(losses):
    def matvec(params, args, v):
        (batch,) = args
        _, lin = jax.linearize(lambda p: losses(p, batch), params)
        return _ef_product(params, lin, v)

    return matvec


def empirical_fisher_matvec(
    per_example_loss: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    mode: str | None = None,
    microbatch_size: int | None = None,
    has_aux: bool = False,
) -> Partial:
    """The empirical Fisher ``v -> (1/n) sum_i g_i (g_i^T v)``, ``g_i = grad loss_i(params)``.

    With ``l(params) = (loss_1, ..., loss_n)`` the vector of per-example losses
    and ``J_l`` its ``n x P`` Jacobian (row ``i`` is ``g_i^T``), the empirical
    Fisher is ``J_l^T J_l / n``. Each product is computed as ``J_l^T (J_l v) / n``:
    one forward-mode pass gives the ``n`` directional derivatives ``g_i^T v``,
    one reverse-mode pass of ``sum_i w_i loss_i`` with ``w = J_l v / n`` gives the
    weighted sum of gradients. The per-example gradients are never formed, so
    the ``n x P`` matrix is never materialised at any batch size; memory is
    that of one gradient (plus the residuals with ``mode="linearize"``), and
    ``microbatch_size`` bounds the activations to one chunk.

    The empirical Fisher uses the *observed* targets; it is not the Fisher
    ([`fisher_matvec`][curvlib.fisher_matvec]) and can be a poor curvature model away from a
    minimum (Kunstner et al. 2019); it is what Adam-style second moments and
    TracIn-style influence scores build on.

    Cost per product: about one gradient (a tangent pass and a transposed
    pass of the vmapped per-example loss; ``mode="recompute"`` adds a forward pass).

    Args:
      per_example_loss: ``per_example_loss(params, example) -> scalar`` for ONE
        example: the leaves of ``batch`` without their leading axis (it is
        vmapped over the batch). ``(loss, aux)`` with ``has_aux``.
      params: the point.
      batch: pytree whose leaves share a leading (example) axis of length ``n``.
      mode: ``"linearize"`` (default) or ``"recompute"`` (default with
        ``microbatch_size``).
      microbatch_size: optional chunk size over the examples.
      has_aux: ``per_example_loss`` returns ``(loss, aux)``; ``aux`` is ignored.

    Returns:
      ``matvec`` (a `jax.tree_util.Partial`) with ``matvec(v) = (1/n) sum_i g_i g_i^T v``.

    Raises:
      TypeError: if ``per_example_loss`` does not return a float scalar for one
        example, or ``params`` has a non-real-floating leaf.
      ValueError: for leaves of ``batch`` without the shared leading axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import empirical_fisher_matvec
      >>> loss = lambda w, ex: 0.5 * (ex[0] @ w - ex[1]) ** 2   # g_i = (x_i.w - y_i) x_i
      >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 1.0])
      >>> EF = empirical_fisher_matvec(loss, jnp.zeros(2), (x, y))   # g = (-1, 0), (0, -2)
      >>> EF(jnp.array([1.0, 1.0])).tolist()                         # (g1 g1^T + g2 g2^T) v / 2
      [0.5, 2.0]

    References:
      F. Kunstner, L. Balles and P. Hennig, *Limitations of the empirical Fisher
      approximation for natural gradient descent*, NeurIPS 2019.
    """
    _validate.functions(per_example_loss, "per_example_loss")
    _validate.float_leaves(params, "params")
    batch_size(batch, "batch")
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], x.dtype), batch)
    _validate.output(
        jax.eval_shape(per_example_loss, params, example), "per_example_loss",
        has_aux=has_aux, advice=(
            "`per_example_loss` is called on ONE example (the leaves of `batch` without "
            "their leading axis) and vmapped over the batch; a function that maps a whole "
            "batch to its vector of losses can be wrapped as "
            "`lambda p, ex: f(p, jax.tree.map(lambda a: a[None], ex))[0]`."))
    losses = _per_example_losses(C.drop_aux(per_example_loss, has_aux))
    mode = _validate.mode(mode, gauss_newton=True, microbatch_size=microbatch_size)
    if mode == "linearize":
        _, lin = C.linearize(losses, params, (batch,))
        return C.params_operator(_ef_product, params, params, lin)
    product = _ef_recompute(losses)
    if microbatch_size is not None:
        size = _validate.static_int(microbatch_size, "microbatch_size", minimum=1)
        product = microbatched(product, size, (0,))
        batch = gathered_for_chunks(batch, size)
    return C.program_operator(product, params, params, (batch,))
