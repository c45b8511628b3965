"""Shared plumbing of the optax transforms in [`curvlib.optim`][curvlib.optim].

**One calling convention.** Every transform's ``update`` is
``update(updates, state, params, *, value_fn, **extra_args)`` where
``value_fn(params, **kwargs)`` is the loss on the current batch and ``kwargs``
are the entries of ``extra_args`` whose names appear in ``value_fn``'s
signature (all of them, but the reserved ``value``/``grad``, when it takes
``**kwargs``): the routing of optax's line searches. ``value=`` and ``grad=``
(the loss and its gradient at ``params``), when passed, are reused; otherwise
the transform computes what it needs from ``value_fn``. The same routing feeds
the model and output-loss functions of a Gauss-Newton split. A ``value_fn``
returning ``(loss, aux)`` is accepted with ``has_aux=True``. The routing itself
(`bind_loss`, `kwargs_for`) lives one layer down, in
`curvlib._loss`, shared with [`curvlib.kronecker`][curvlib.kronecker].

This module holds the steps every transform of [`curvlib.optim`][curvlib.optim] shares:
the loss and its gradient (`value_and_grad`, `linearized_loss`), the
curvature product (`curvature_matvec`, microbatched over every batched
argument) and the alias wrapper
(`alias`) that makes a chain with a line search work with ``value_fn``
alone, in optax's ``value_and_grad_from_state`` loop and inside
``nnx.Optimizer.update``. ``init`` checks ``params`` with
`curvlib._validate.float_leaves` (``init=`` the transform's name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from curvlib import _tree, _validate
from curvlib._chain import (  # noqa: F401  (the optax links, shared with curvlib.kronecker)
    RecomputeState,
    alias,
    check_state,
    compiled_when_eager,
    flag_stalled,
    float_dtype,
    learning_rate_link,
    linesearch_link,
    linesearch_stalled,
    recompute_marker,
    strongly_typed,
)
from curvlib._compile import stable_linearized, weak_cache
from curvlib._loss import (  # noqa: F401  (the routing, shared with curvlib.kronecker)
    RESERVED,
    Loss,
    bind_loss,
    call,
    check_call,
    kw_call,
    kwargs_for,
    passed_names,
    require_params,
    require_value_fn,
    strip_aux,
)
from curvlib.operators import ggn_matvec, hessian_matvec, microbatch_mean

PyTree = Any

class Default:
    """A default that is not a value (``None`` means something else), shown by what it
    stands for in signatures and ``help()`` (``linesearch=<default_linesearch()>``)."""

    def __init__(self, what: str):
        self.what = what

    def __repr__(self):
        return f"<{self.what}>"


GGN = ("a pair `(model_fn, loss_fn)` with `loss_fn(model_fn(params, **kw), **kw) == "
       "value_fn(params, **kw)`")  # what `ggn` must be, in the messages

# ------------------------------------------------------- the loss and gradient


def loss_dtype(dt) -> jnp.dtype:
    """The dtype a step reads the loss in: the parameters' ``dt``, at least float32.

    A float32 loss of bfloat16 or float16 parameters (mixed precision) keeps its
    digits: in bfloat16 a decrease from 100.22 to 100.07 rounds to none, and a float16
    loss above 65504 to ``inf``.
    """
    return jnp.promote_types(dt, jnp.float32)


def loss_value(loss: Loss, params: PyTree, extra_args: dict, dt) -> jax.Array:
    """The loss at ``params`` (in `loss_dtype`), reusing an explicit ``value=`` when given."""
    if extra_args.get("value") is not None:
        return jnp.asarray(extra_args["value"]).astype(loss_dtype(dt))
    return jnp.asarray(loss(params)).astype(loss_dtype(dt))


def value_and_grad(loss: Loss, params: PyTree, extra_args: dict, dt):
    """``(value, grad)`` of the loss at ``params``, reusing ``value=``/``grad=`` when both given.

    Cost: nothing with both given, else one gradient evaluation.
    """
    value, grad = extra_args.get("value"), extra_args.get("grad")
    if value is None or grad is None:
        value, grad = jax.value_and_grad(loss)(params)
    grad = jax.tree.map(lambda g, p: jnp.asarray(g).astype(jnp.result_type(p)), grad, params)
    return jnp.asarray(value).astype(loss_dtype(dt)), grad


def _linear_hvp(lin, v):
    return lin(v)[1]


def linearized_loss(loss: Loss, params: PyTree):
    """``(value, grad, matvec)`` from one linearisation of ``value_and_grad`` at ``params``.

    ``jax.linearize(jax.value_and_grad(loss), params)`` evaluates the loss and
    its gradient (the primal outputs) and records the tangent program of the
    gradient, so the Hessian product ``v -> H v`` replays only that program (as
    [`curvlib.hessian_matvec`][curvlib.hessian_matvec] in its ``"linearize"`` mode): the model is
    traced and compiled once for the value, the gradient and every product.
    Memory: the linearisation residuals.
    """
    (value, grad), lin = jax.linearize(jax.value_and_grad(loss), params)
    # the same tree definition for the same program: eager consumers hit their compile cache
    return value, grad, Partial(_linear_hvp, stable_linearized(lin))


# ------------------------------------------------------------ microbatching


def split_batched(kw: dict, name: str = "value_fn"):
    """Split the leaves of ``kw`` into batched ones (a shared leading axis) and the rest.

    The batch size ``n`` is the leading length shared by the most array leaves
    (ties: the largest); every leaf with that leading length is split into
    microbatches, every other leaf (scalars, flags, keys, arrays of another
    length) is passed whole to each chunk.

    Returns:
      ``(treedef, mask, batched_leaves, other_leaves)`` with ``mask[i]`` true
      for the batched leaves.

    Raises:
      ValueError: if no extra argument has a leading axis to split.
    """
    leaves, treedef = jax.tree.flatten(kw)
    lengths = [_tree.leading_axis(x) for x in leaves]
    counts: dict[int, int] = {}
    for n in lengths:
        if n is not None:
            counts[n] = counts.get(n, 0) + 1
    if not counts:
        raise ValueError(
            f"`microbatch_size` splits the leading (sample) axis of the extra arguments "
            f"`{name}` takes by name, but none of {sorted(kw)} has one. Pass the batch to "
            "`update` by name (e.g. `update(..., value_fn=loss, x=x, y=y)` for "
            "`loss(params, x, y)`)."
        )
    n = max(counts, key=lambda m: (counts[m], m))
    mask = tuple(length == n for length in lengths)
    batched = tuple(x for x, b in zip(leaves, mask, strict=True) if b)
    other = tuple(x for x, b in zip(leaves, mask, strict=True) if not b)
    return treedef, mask, batched, other


def _merge(treedef, mask, batched, other) -> dict:
    it_b, it_o = iter(batched), iter(other)
    return jax.tree.unflatten(treedef, [next(it_b) if b else next(it_o) for b in mask])


@weak_cache
def _mb_hessian(fn: Callable, treedef, mask, mode: str, size: int) -> Callable:
    def matvec(params, batched, other, v):
        def chunk_product(b):
            kw = _merge(treedef, mask, b, other)
            return hessian_matvec(kw_call(fn), params, kw, mode=mode)(v)

        return microbatch_mean(chunk_product, batched, size)

    return matvec


@weak_cache
def _mb_ggn(model_fn: Callable, loss_fn: Callable, treedef, mask, mnames, lnames, size: int):
    def matvec(params, batched, other, v):
        def chunk_product(b):
            kw = _merge(treedef, mask, b, other)
            mkw = {k: kw[k] for k in mnames}
            lkw = {k: kw[k] for k in lnames}
            return ggn_matvec(
                kw_call(model_fn), kw_call(loss_fn), params, mkw, loss_args=(lkw,)
            )(v)

        return microbatch_mean(chunk_product, batched, size)

    return matvec


def _ggn_kwargs(model_fn, loss_fn, extra_args):
    mkw = kwargs_for(model_fn, extra_args)
    lkw = kwargs_for(loss_fn, extra_args)
    hint = (
        "A Gauss-Newton split routes the batch by name exactly as `value_fn`: with "
        "`model_fn(params, x)` and `loss_fn(outputs, y)` call "
        "`opt.update(grads, state, params, value_fn=loss, x=x, y=y)` with "
        "`loss(params, x, y) == loss_fn(model_fn(params, x), y)`; or close the batch over: "
        "`ggn=(lambda p: model_fn(p, x), lambda out: loss_fn(out, y))`."
    )
    check_call(model_fn, "ggn model_fn", mkw, extra_args, hint=hint)
    check_call(loss_fn, "ggn loss_fn", lkw, extra_args, hint=hint)
    return mkw, lkw


def curvature_matvec(
    value_fn: Callable,
    ggn,
    params: PyTree,
    extra_args: dict,
    *,
    hvp_mode: str | None,
    microbatch_size: int | None,
):
    """``v -> C v``: the Hessian of ``value_fn`` or the GGN of a ``(model_fn, loss_fn)`` split.

    Each function receives the extra arguments it names (`kwargs_for`);
    a split whose functions cannot bind them raises a ``TypeError`` saying what
    to pass. With ``microbatch_size``, every product is a mean over chunks of
    *every* batched extra argument (`split_batched`: the leaves sharing
    the batch's leading axis), by ``lax.scan``; memory is that of one chunk.
    """
    if ggn is None:
        kw = kwargs_for(value_fn, extra_args)
        if microbatch_size is None:
            return hessian_matvec(kw_call(value_fn), params, kw, mode=hvp_mode)
        mode = "fwd-rev" if hvp_mode in (None, "linearize") else hvp_mode
        treedef, mask, batched, other = split_batched(kw)
        product = _mb_hessian(value_fn, treedef, mask, mode, int(microbatch_size))
        return Partial(product, params, batched, other)
    model_fn, loss_fn = ggn
    mkw, lkw = _ggn_kwargs(model_fn, loss_fn, extra_args)
    if microbatch_size is None:
        return ggn_matvec(kw_call(model_fn), kw_call(loss_fn), params, mkw, loss_args=(lkw,))
    kw = {**mkw, **lkw}
    treedef, mask, batched, other = split_batched(kw, "ggn=(model_fn, loss_fn)")
    product = _mb_ggn(model_fn, loss_fn, treedef, mask, tuple(mkw), tuple(lkw),
                      int(microbatch_size))
    return Partial(product, params, batched, other)


def microbatched_value_and_grad(loss: Loss, params: PyTree, microbatch_size: int):
    """``(value, grad)`` of a mean loss accumulated over chunks of every batched argument.

    Equals ``jax.value_and_grad(loss)(params)`` (up to rounding) at the memory
    of one chunk (`split_batched`, [`curvlib.microbatch_mean`][curvlib.microbatch_mean]).
    """
    treedef, mask, batched, other = split_batched(loss.kw)

    def chunk(b):
        return jax.value_and_grad(loss.fn)(params, **_merge(treedef, mask, b, other))

    return microbatch_mean(chunk, batched, microbatch_size)


class CurvatureSetup(NamedTuple):
    """What `curvature_setup` hands a curvature transform's ``update``.

    Attributes:
      loss: the bound loss (`Loss`).
      dtype: the parameters' floating dtype (diagnostics are kept in it).
      value: the loss at ``params``.
      grad: the gradient of the loss at ``params`` (not the incoming updates).
      matvec: the curvature product at ``params``.
    """

    loss: Loss
    dtype: Any
    value: jax.Array
    grad: PyTree
    matvec: Callable


def dense_init(name: str, params: PyTree, max_params, what: str, instead: str):
    """The opening of a dense transform's ``init``: float leaves, size guard, float dtype.

    Returns ``(n, dtype)``; raises when the ``n x n`` matrix the transform keeps
    (``what``, formatted with ``n``) would exceed ``max_params`` parameters, naming ``instead``.
    """
    _validate.float_leaves(params, "params", init=name)
    n = _tree.size(params)
    if n > int(max_params):
        raise ValueError(
            f"{name} {what.format(n=n)} ({n} parameters > max_params={int(max_params)}); "
            f"{instead} or raise `max_params`."
        )
    return n, float_dtype(params)


def curvature_setup(
    name: str,
    value_fn: Callable | None,
    params: PyTree,
    extra_args: dict,
    *,
    ggn,
    hvp_mode: str | None,
    microbatch_size: int | None,
    has_aux: bool = False,
    updates: PyTree = None,
) -> CurvatureSetup:
    """The common opening of a Hessian/GGN step (``scale_by_newton_cg``, ``scale_by_newton``).

    Checks ``value_fn``, its routing and ``params`` (errors name the transform
    ``name``), then returns the loss, its value and gradient at ``params``
    and the curvature product. For the default Hessian product one
    linearisation serves all three (`linearized_loss`); otherwise the
    loss and gradient are reused from ``value=``/``grad=`` (or computed) and
    the product comes from `curvature_matvec`.
    """
    loss = bind_loss(name, value_fn, extra_args, has_aux=has_aux)
    params = require_params(name, params, updates)
    dt = float_dtype(params)
    if ggn is None and microbatch_size is None and hvp_mode in (None, "linearize"):
        # the linearisation evaluates the loss and gradient anyway: value=/grad= add nothing
        value, grad, matvec = linearized_loss(loss, params)
        return CurvatureSetup(loss, dt, jnp.asarray(value).astype(loss_dtype(dt)), grad, matvec)
    value, grad = value_and_grad(loss, params, extra_args, dt)
    matvec = curvature_matvec(
        loss.fn, ggn, params, extra_args, hvp_mode=hvp_mode, microbatch_size=microbatch_size
    )
    return CurvatureSetup(loss, dt, value, grad, matvec)


# the optax links shared with curvlib.kronecker live in curvlib._chain
