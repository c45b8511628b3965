"""The Hessian of a scalar loss: one product, a reusable operator, and the gradient.

``H v = d/de grad f(params + e v) |_{e=0}`` (Pearlmutter 1994), in three modes:

| mode | one product | memory held between products |
|---|---|---|
| ``"linearize"`` | ~1 G (tangent pass only) | the linearisation residuals |
| ``"fwd-rev"`` | ~2-3 G (forward-over-rev) | params and batch only |
| ``"rev-rev"`` | ~3-4 G (reverse-over-rev) | params and batch only |

(``G``: one gradient evaluation.) Every function here accepts a loss that
returns ``(loss, aux)`` with ``has_aux=True`` (the auxiliary output is ignored
by curvature products and returned by [`gradient`][curvlib.gradient]), and microbatching
over every batched argument (`curvlib.operators.microbatch`).

References:
  B. Pearlmutter, *Fast exact multiplication by the Hessian*, Neural Comput. 1994.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from curvlib import _tree, _validate
from curvlib._compile import bound, eager_jit, weak_cache
from curvlib.operators import _common as C
from curvlib.operators import _wrt
from curvlib.operators.microbatch import (
    _replace,
    gathered_args,
    microbatch_mean,
    microbatched,
)

PyTree = Any

MODES = _validate.HESSIAN_MODES


@weak_cache
def _hvp_fwd_rev(fun):
    def matvec(params, args, v):
        grad = lambda p: jax.grad(fun)(p, *args)
        return jax.jvp(grad, (params,), (C.cast_like(v, params),))[1]

    return matvec


@weak_cache
def _hvp_rev_rev(fun):
    def matvec(params, args, v):
        v = C.cast_like(v, params)
        inner = lambda p: _tree.vdot(jax.grad(fun)(p, *args), v)
        return jax.grad(inner)(params)

    return matvec


def hvp(fun: Callable, params: PyTree, tangent: PyTree, *args, has_aux: bool = False) -> PyTree:
    """One Hessian-vector product ``H v`` of ``fun(params, *args)``, forward-over-reverse.

    ``H v = d/de grad f(params + e v) |_{e=0}``, computed as ``jax.jvp`` of
    ``jax.grad`` (Pearlmutter 1994). Cost: about two to three gradient
    evaluations; memory: one gradient's activations.

    Args:
      fun: scalar function ``fun(params, *args)`` (``(loss, aux)`` with ``has_aux``).
      params: the point, any pytree of float arrays.
      tangent: the vector ``v``, same structure and shapes as ``params``.
      *args: extra arguments of ``fun`` (batch, targets, ...); not differentiated.
      has_aux: ``fun`` returns ``(loss, aux)``; ``aux`` is ignored.

    Returns:
      ``H v`` as a pytree shaped like ``params``.

    Raises:
      ValueError: if ``tangent`` and ``params`` differ in structure or shapes
        (the message names the leaf path).
      TypeError: if ``fun`` does not return a scalar, or ``params`` has a
        non-real-floating leaf.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import hvp
      >>> f = lambda p: jnp.sum(p["w"] ** 3)
      >>> hvp(f, {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([1.0, 0.0])})["w"].tolist()
      [6.0, 0.0]
    """
    _validate.float_leaves(params, "params")
    _validate.same_structure(params, tangent, "params", "tangent")  # names the leaves
    _validate.tangent(tangent, C.signature(params))  # and refuses a complex one
    _validate.functions(fun, "fun")
    _validate.output(_tree.eval_shape(fun, params, *args), "fun", has_aux=has_aux)
    fun = C.drop_aux(fun, has_aux)
    return _hvp_fwd_rev(fun)(params, args, C.cast_like(tangent, params))


def hessian_matvec(
    fun: Callable,
    params: PyTree,
    *args,
    mode: str | None = None,
    microbatch_size: int | None = None,
    batch_argnums: int | tuple[int, ...] | None = None,
    has_aux: bool = False,
    wrt=None,
) -> Partial:
    """The Hessian of ``fun(params, *args)`` as a reusable linear function ``v -> H v``.

    With the default ``mode="linearize"`` the gradient is linearised once
    (``jax.linearize(jax.grad(fun))``) and each product replays only the
    tangent pass, reusing the stored residuals: the cheapest product when many
    are needed (Lanczos, CG). Called eagerly, the linearisation is one program
    compiled per loss program and shapes (not the model op by op), reused by
    every later build with a new batch. ``"fwd-rev"`` recomputes ``jax.jvp(jax.grad)``
    each time (no residual memory) and ``"rev-rev"`` differentiates
    ``<grad f, v>`` in reverse mode; both are offered for benchmarking and for
    memory-bound models.

    Microbatching: with ``microbatch_size`` set, ``fun`` must be a *mean* over
    the leading (sample) axis of its batched arguments: by default every
    argument in ``args`` (``loss(params, x, y)`` is chunked in ``x`` and ``y``
    together); ``batch_argnums`` names them when some are not batched (a PRNG
    key, a constant), which are then passed whole to every chunk. Every product
    is accumulated over chunks under ``lax.scan`` so memory is bounded by one
    chunk. The default mode is then ``"fwd-rev"`` (a linearisation would store
    every chunk's residuals).

    The result is a `jax.tree_util.Partial`: pass it as an argument to
    jitted code and its arrays stay traced inputs. It composes with ``jax.vmap``
    over tangents (a block product ``V -> H V``).

    Blocks: with ``wrt=where`` the result is the diagonal block ``H_BB`` of the
    Hessian for the leaves ``B`` that ``where`` selects, differentiated with
    respect to those leaves only: ``f_B(p_B) = f(p_B, p_rest)`` with the other
    leaves closed over as constants, so the tangent pass starts at the block and
    the reverse pass stops at it (a linearisation stores only the residuals that
    depend on ``p_B``). It acts on the block's sub-pytree (``params`` with
    ``None`` outside the block) exactly like
    ``restrict(hessian_matvec(fun, params, *args), params, where)``, at the cost
    of the block: for the last layer of a deep network, a fraction of one full
    product.

    Sharding: when ``params`` are arrays placed with ``NamedSharding`` on an
    ``Auto`` mesh (FSDP-style), every product is constrained to the parameters'
    layout, so ``H v`` stays sharded like ``params`` instead of being
    all-reduced onto every device.

    Args:
      fun: scalar function ``fun(params, *args)`` (``(loss, aux)`` with ``has_aux``).
      params: the point; any pytree of float arrays.
      *args: extra, non-differentiated arguments of ``fun``.
      mode: ``"linearize"``, ``"fwd-rev"`` or ``"rev-rev"``.
      microbatch_size: optional chunk size over the leading axis of the batched
        arguments.
      batch_argnums: which of ``args`` are batched (an int or a tuple of
        ints); default all of them. Used only with ``microbatch_size``.
      has_aux: ``fun`` returns ``(loss, aux)``; ``aux`` is ignored.
      wrt: ``None`` (the whole Hessian) or a parameter block, as ``where`` of
        [`restrict`][curvlib.restrict]: a predicate ``wrt(path, leaf) -> bool`` on
        key paths or a pytree of Python bools with the structure of ``params``
        (or a prefix of it).

    Returns:
      ``matvec`` with ``matvec(v) == H v`` for ``v`` shaped like ``params``; with
      ``wrt``, ``matvec(v_B) == H_BB v_B`` on the block's sub-pytree.

    Raises:
      TypeError: if ``fun`` does not return a float scalar, or ``params`` has a
        non-real-floating leaf (named by its path).
      ValueError: for an unknown ``mode``, a microbatched linearisation or a
        batched argument without the shared leading axis (named by its path), a
        ``wrt`` that selects no leaf or is not a pytree of bools matching
        ``params``; when called, for a tangent whose structure or shapes differ
        from ``params`` (with ``wrt``: from the block's sub-pytree).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from curvlib import hessian_matvec
      >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)  # H = 2 x^T x / n
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> Hv = hessian_matvec(loss, {"w": jnp.zeros(2)}, x)
      >>> Hv({"w": jnp.array([1.0, 1.0])})["w"].tolist()
      [1.0, 4.0]
      >>> jax.jit(lambda mv, v: mv(v))(Hv, {"w": jnp.array([0.0, 1.0])})["w"].tolist()
      [0.0, 4.0]

      Microbatching chunks every batched argument; a loss with an auxiliary output:

      >>> def loss2(p, x, y):
      ...     r = x @ p["w"] - y
      ...     return jnp.mean(r ** 2), {"max_residual": jnp.max(jnp.abs(r))}
      >>> Hmb = hessian_matvec(loss2, {"w": jnp.zeros(2)}, x, jnp.ones(2), has_aux=True,
      ...                      microbatch_size=1)
      >>> Hmb({"w": jnp.array([1.0, 1.0])})["w"].tolist()
      [1.0, 4.0]

      One block (here the leaf ``"b"``) differentiated alone, on its sub-pytree:

      >>> loss3 = lambda p, x: jnp.mean((x @ p["w"] + p["b"]) ** 2)
      >>> Hb = hessian_matvec(loss3, {"w": jnp.zeros(2), "b": jnp.array(0.0)}, x,
      ...                     wrt={"w": False, "b": True})
      >>> out = Hb({"w": None, "b": jnp.array(1.0)})
      >>> out["w"] is None, float(out["b"])
      (True, 2.0)
    """
    _validate.float_leaves(params, "params")
    if wrt is not None:
        return _wrt.block_operator(hessian_matvec, fun, params, args, wrt, mode=mode,
                                   microbatch_size=microbatch_size,
                                   batch_argnums=batch_argnums, has_aux=has_aux)
    _validate.functions(fun, "fun")
    # the batch's shapes before the loss sees them (a leaf of another length failed inside it)
    size, argnums, _ = _validate.microbatch(microbatch_size, args, batch_argnums)
    _validate.output(_tree.eval_shape(fun, params, *args), "fun", has_aux=has_aux)
    fun = C.drop_aux(fun, has_aux)
    mode = _validate.mode(mode, microbatch_size=size)
    if mode == "linearize":
        _, lin = C.linearize(fun, params, args, gradient=True)
        dtypes = tuple(jnp.result_type(x) for x in jax.tree.leaves(params))
        return C.params_operator(C.call_linearized(dtypes), params, lin)
    product = _hvp_fwd_rev(fun) if mode == "fwd-rev" else _hvp_rev_rev(fun)
    if size is not None:
        product = microbatched(product, size, argnums)
        args = gathered_args(tuple(args), argnums, size)
    return C.program_operator(product, params, params, tuple(args))


def _value_and_grad(fun, has_aux):
    vg = jax.value_and_grad(fun, has_aux=has_aux)
    if not has_aux:
        return vg

    def f(*a):
        (value, aux), g = vg(*a)
        return value, aux, g

    return f


@eager_jit(static_argnames=("fun", "has_aux"))
def _compiled_value_and_grad(fun, has_aux, params, args, program):
    """`_value_and_grad` of ``fun`` (keyed by its program, `C.keyed_when_eager`) at
    ``params``: one program per loss program and shapes for an eager `gradient` (op by op,
    every primitive of the model and its gradient compiled on first use: 1 s and 13
    programs for a small MLP)."""
    return _value_and_grad(bound(fun, program), has_aux)(params, *args)


def gradient(
    fun: Callable,
    params: PyTree,
    *args,
    microbatch_size: int | None = None,
    batch_argnums: int | tuple[int, ...] | None = None,
    has_aux: bool = False,
):
    """``(value, grad)`` of a mean loss, optionally accumulated over microbatches.

    A convenience used by the landscape and optimiser layers; with
    ``microbatch_size`` the memory is bounded by one chunk and the result equals
    the full-batch ``jax.value_and_grad``. Cost: one gradient evaluation.

    With ``has_aux=True`` the result is ``((value, aux), grad)``, as from
    ``jax.value_and_grad(fun, has_aux=True)``. Under microbatching ``aux`` is
    averaged over the chunks with the same weights as the loss, so it must be a
    pytree of floating *means* over the batch (an accuracy, a mean activation);
    a non-floating ``aux`` is refused there.

    Args:
      fun: scalar mean loss ``fun(params, *args)`` (``(loss, aux)`` with ``has_aux``).
      params: the point.
      *args: extra arguments.
      microbatch_size: optional chunk size over the leading axis of the batched
        arguments (all of ``args`` unless ``batch_argnums`` says otherwise).
      batch_argnums: which of ``args`` are batched; default all of them.
      has_aux: ``fun`` returns ``(loss, aux)``.

    Returns:
      ``(value, grad)`` (or ``((value, aux), grad)``) with ``grad`` shaped like ``params``.

    Raises:
      TypeError: if ``fun`` does not return a float scalar (or a pair with
        ``has_aux``), or under microbatching if ``aux`` has a non-floating leaf.
      ValueError: for a batched argument without the shared leading axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> from curvlib import gradient
      >>> loss = lambda p, x: jnp.mean((x - p) ** 2)
      >>> value, g = gradient(loss, 1.0, jnp.arange(5.0), microbatch_size=2)
      >>> round(float(value), 6), round(float(g), 6)
      (3.0, -2.0)
      >>> aux_loss = lambda p, x: (loss(p, x), {"mean_x": jnp.mean(x)})
      >>> (value, aux), g = gradient(aux_loss, 1.0, jnp.arange(5.0), microbatch_size=2,
      ...                            has_aux=True)
      >>> round(float(aux["mean_x"]), 6)
      2.0
    """
    _validate.float_leaves(params, "params")
    _validate.functions(fun, "fun")
    # the batch's shapes before the loss sees them (a leaf of another length failed inside it)
    size, argnums, _ = _validate.microbatch(microbatch_size, args, batch_argnums)
    _validate.output(_tree.eval_shape(fun, params, *args), "fun", has_aux=has_aux)
    vg = _value_and_grad(fun, has_aux)
    if size is None:
        keyed = C.keyed_when_eager(fun, params, args)
        out = (vg(params, *args) if keyed is None  # (eagerly one program, not op by op)
               else _compiled_value_and_grad(keyed[0], has_aux, params, tuple(args), keyed[1]))
        return ((out[0], out[1]), out[2]) if has_aux else out
    if has_aux:
        aux_shape = _tree.eval_shape(fun, params, *args)[1]
        for path, s in _tree.leaves_with_paths(aux_shape):
            if not jnp.issubdtype(s.dtype, jnp.floating):
                raise TypeError(
                    f"under microbatching `aux` is averaged over the chunks like the loss, so "
                    f"its leaves must be floating means; `aux{path}` has dtype {s.dtype}."
                )
    batched = tuple(args[i] for i in argnums)
    out = microbatch_mean(lambda b: vg(params, *_replace(args, argnums, b)), batched, size)
    return ((out[0], out[1]), out[2]) if has_aux else out
