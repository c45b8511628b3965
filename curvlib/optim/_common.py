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
returning ``(loss, aux)`` is accepted with ``has_aux=True``.

This module holds the steps every transform shares: argument checks
(`check_params`, ...), the routing (`bind_loss`,
`kwargs_for`), the loss and its gradient (`value_and_grad`,
`linearized_loss`), the curvature product (`curvature_matvec`,
microbatched over every batched argument) and the alias wrapper
(`alias`) that makes a chain with a line search work with ``value_fn``
alone, in optax's ``value_and_grad_from_state`` loop and inside
``nnx.Optimizer.update``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from curvlib import _tree
from curvlib import operators as _operators
from curvlib.operators import _weak_cache, ggn_matvec, hessian_matvec, microbatch_mean

PyTree = Any

# extra arguments that optax's line searches consume and that are never routed to value_fn
RESERVED = ("value", "grad")


# ----------------------------------------------------------------- validation


def is_concrete(x) -> bool:
    """True unless ``x`` is a tracer (a hyperparameter injected under ``jit``)."""
    return not isinstance(x, jax.core.Tracer)


def check_nonnegative(name: str, x) -> None:
    if x is not None and is_concrete(x) and not bool(np.all(np.asarray(x) >= 0)):
        raise ValueError(f"`{name}` must be >= 0; got {x}.")


def check_positive(name: str, x) -> None:
    if x is not None and is_concrete(x) and not bool(np.all(np.asarray(x) > 0)):
        raise ValueError(f"`{name}` must be > 0; got {x}.")


def check_in_range(name: str, x, lo, hi) -> None:
    if is_concrete(x) and not (lo <= float(np.asarray(x)) <= hi):
        raise ValueError(f"`{name}` must lie in [{lo}, {hi}]; got {x}.")


def check_int(name: str, x, minimum: int) -> None:
    """``x`` (when concrete) is an integer ``>= minimum``; tracers pass (injected values)."""
    if x is None or not is_concrete(x):
        return
    v = np.asarray(x)
    if isinstance(x, bool) or v.shape != () or int(v) != v or int(v) < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {x!r}.")


def static_int(name: str, x, minimum: int) -> int:
    """``x`` as a Python int ``>= minimum``; tracers, bools and floats are refused.

    For arguments that fix shapes or loop bounds. Under
    ``optax.inject_hyperparams`` such an argument must be listed in
    ``static_args`` (the message says so).
    """
    if isinstance(x, (jax.core.Tracer, jax.Array)):
        raise ValueError(
            f"`{name}` fixes array shapes or loop bounds and must be a static Python int; got "
            f"a JAX array ({x!r}). With `optax.inject_hyperparams` list it in "
            f"`static_args=('{name}',)`."
        )
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {x!r}.")
    return int(x)


def check_ggn(ggn) -> None:
    if ggn is None:
        return
    if not (isinstance(ggn, tuple) and len(ggn) == 2 and all(callable(f) for f in ggn)):
        raise ValueError(
            "`ggn` must be a pair `(model_fn, loss_fn)` with "
            "`loss_fn(model_fn(params, **kw), **kw) == value_fn(params, **kw)`; "
            f"got {ggn!r}."
        )


def check_hvp_mode(hvp_mode) -> None:
    if hvp_mode not in (None, "linearize", "fwd-rev", "rev-rev"):
        raise ValueError(
            f"`hvp_mode` must be None, 'linearize', 'fwd-rev' or 'rev-rev'; got {hvp_mode!r}."
        )


def check_microbatch_size(microbatch_size) -> int | None:
    if microbatch_size is None:
        return None
    return static_int("microbatch_size", microbatch_size, 1)


def require_value_fn(name: str, value_fn) -> Callable:
    if value_fn is None:
        raise TypeError(
            f"`{name}.update` needs the loss: call "
            "`update(grads, state, params, value_fn=loss_fn, **batch_kwargs)` where "
            "`loss_fn(params, **batch_kwargs)` returns the scalar loss on the current batch "
            "(the convention of optax's line searches)."
        )
    if not callable(value_fn):
        raise TypeError(f"`value_fn` must be callable; got {type(value_fn).__name__}.")
    return value_fn


def require_params(name: str, params) -> PyTree:
    if params is None:
        raise ValueError(f"`{name}.update` needs `params` (the current parameters).")
    return params


class ParamsDtypeError(ValueError, TypeError):
    """``params`` with a leaf that is not real floating, refused by an optimizer's ``init``.

    A ``ValueError`` (what ``init`` documents) and a ``TypeError`` (what the rest
    of curvlib raises for a dtype, e.g. [`curvlib.hessian_matvec`][curvlib.hessian_matvec]).
    """


def _is_key(dt) -> bool:
    return jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def check_params(name: str, params) -> None:
    """Raise unless ``params`` is a non-empty pytree of real floating arrays (``init``'s check).

    The message names the offending leaf by its pytree path (``params['dense']['kernel']``)
    and gives the fix that fits it: a PRNG key or another non-trainable leaf
    (integer counters, raw ``uint32`` keys, boolean masks) belongs outside the
    parameters (flax nnx: ``nnx.state(model, nnx.Param)`` or
    ``nnx.Optimizer(..., wrt=nnx.Param)``; linen: ``variables["params"]``),
    never cast to float. ``name`` is the transform, for the message.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise ParamsDtypeError(
            f"{name}.init: `params` is an empty pytree; expected at least one floating array."
        )
    for path, x in flat:
        dt = jnp.result_type(x) if not hasattr(x, "dtype") else x.dtype
        if _is_key(dt):
            raise ParamsDtypeError(
                f"{name}.init: `params` must hold only real floating arrays; "
                f"`params{jax.tree_util.keystr(path)}` is a PRNG key ({dt}). Keys are not "
                "trainable: pass only the parameters (flax nnx: `nnx.state(model, nnx.Param)` "
                "or `nnx.Optimizer(model, tx, wrt=nnx.Param)`; linen: `variables['params']`) "
                "and give the key to the loss as an extra argument of `update`."
            )
        if not jnp.issubdtype(dt, jnp.floating):
            raise ParamsDtypeError(
                f"{name}.init: `params` must hold only real floating arrays; "
                f"`params{jax.tree_util.keystr(path)}` has dtype {jnp.dtype(dt).name}. "
                "Non-trainable leaves (step counters, raw uint32 PRNG keys, masks, batch "
                "statistics) belong outside `params` (flax nnx: `nnx.state(model, nnx.Param)` "
                "or `wrt=nnx.Param`; linen: `variables['params']`); cast a leaf to a real "
                "floating dtype (float32, float64, bfloat16) only if it really is a parameter."
            )


# -------------------------------------------------------------- kwarg routing


def _signature(fn: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # builtins, some C callables
        return None


def _takes_var_kwargs(sig: inspect.Signature) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def kwargs_for(fn: Callable, extra_args: dict) -> dict:
    """The entries of ``extra_args`` that ``fn`` accepts by name (never ``value``/``grad``)."""
    sig = _signature(fn)
    if sig is None:
        return {}
    if _takes_var_kwargs(sig):
        return {k: v for k, v in extra_args.items() if k not in RESERVED}
    return {k: v for k, v in extra_args.items() if k in sig.parameters and k not in RESERVED}


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def passed_names(extra_args: dict) -> list[str]:
    """The extra arguments of ``update`` that a loss function could receive, sorted."""
    return sorted(k for k in extra_args if k not in RESERVED)


def check_call(fn: Callable, role: str, kw: dict, extra_args: dict, *, hint: str = "") -> None:
    """Raise a ``TypeError`` listing what ``update`` received when ``fn(x, **kw)`` cannot bind.

    ``role`` names the function in the message (``"value_fn"``, ``"ggn model_fn"``).
    The check binds the signature only (no call, no trace).
    """
    sig = _signature(fn)
    if sig is None:
        return
    try:
        sig.bind(None, **kw)
    except TypeError as e:
        params = [p for p in sig.parameters]
        raise TypeError(
            f"`{role}` ({_fn_name(fn)}{sig}) cannot be called as `{role}(x, **kw)` with the "
            f"extra arguments of `update` it names: {e}. `update` received the extra arguments "
            f"{passed_names(extra_args)} (besides `value_fn`); each function gets those whose "
            f"names appear in its own signature ({params}). Pass every input it needs to "
            "`update` by that name, e.g. `opt.update(grads, state, params, value_fn=loss, "
            "batch=batch)` for `loss(params, batch)`." + (" " + hint if hint else "")
        ) from None


def _check_loss_output(out, role: str, has_aux: bool):
    """The scalar loss inside ``out`` (``out`` or ``out[0]`` with ``has_aux``), checked."""
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                f"`{role}` was declared with `has_aux=True` and must return a pair "
                f"`(loss, aux)`; it returned {type(out).__name__}."
            )
        out = out[0]
    elif isinstance(out, (tuple, list)):
        raise TypeError(
            f"`{role}` returned a {type(out).__name__} of length {len(out)}; it must return "
            "the scalar loss. For a loss returning `(loss, aux)` pass `has_aux=True` to the "
            "transform."
        )
    shape = jnp.shape(out)
    if shape != ():
        raise TypeError(
            f"`{role}` must return a scalar loss (shape ()); it returned shape {shape}. "
            "Reduce it over the batch (e.g. `jnp.mean`) before asking for curvature."
        )
    dt = jnp.result_type(out)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"`{role}` must return a real floating scalar; got dtype {dt}.")
    return out


@_weak_cache
def _scalar_loss(fn: Callable, has_aux: bool) -> Callable:
    """``fn`` with its output checked (and ``aux`` dropped); keeps ``fn``'s signature.

    Cached weakly by ``fn``, so the products built on it keep one tree
    definition per ``fn`` (no recompilation of jitted consumers).
    """

    @functools.wraps(fn)
    def loss(params, **kw):
        return _check_loss_output(fn(params, **kw), "value_fn", has_aux)

    return loss


class Loss(NamedTuple):
    """A loss bound to its routed extra arguments: ``Loss(fn, kw)(params) == fn(params, **kw)``.

    ``fn`` returns the checked scalar loss (any ``aux`` dropped), ``kw`` the
    extra arguments of ``update`` that ``value_fn`` names.
    """

    fn: Callable
    kw: dict

    def __call__(self, params):
        return self.fn(params, **self.kw)


def bind_loss(name: str, value_fn, extra_args: dict, *, has_aux: bool = False) -> Loss:
    """Check ``value_fn`` and route its extra arguments (the opening of every ``update``)."""
    value_fn = require_value_fn(name, value_fn)
    kw = kwargs_for(value_fn, extra_args)
    check_call(value_fn, "value_fn", kw, extra_args)
    return Loss(_scalar_loss(value_fn, bool(has_aux)), kw)


def strip_aux(value_fn: Callable, has_aux: bool) -> Callable:
    """``value_fn`` returning only its checked scalar loss (routing signature kept)."""
    return _scalar_loss(value_fn, bool(has_aux))


@_weak_cache
def _kw_call(fn: Callable) -> Callable:
    """``(x, kw) -> fn(x, **kw)``; cached so operator-level caches see one object per ``fn``.

    Weakly (`curvlib.operators._weak_cache`): the cache does not keep ``fn`` alive.
    """

    def call(x, kw):
        return fn(x, **kw)

    return call


def call(fn: Callable, x, extra_args: dict):
    return fn(x, **kwargs_for(fn, extra_args))


# ------------------------------------------------------- the loss and gradient


def loss_value(loss: Loss, params: PyTree, extra_args: dict, dt) -> jax.Array:
    """The loss at ``params``, reusing an explicit ``value=`` extra argument when given."""
    if extra_args.get("value") is not None:
        return jnp.asarray(extra_args["value"]).astype(dt)
    return jnp.asarray(loss(params)).astype(dt)


def value_and_grad(loss: Loss, params: PyTree, extra_args: dict, dt):
    """``(value, grad)`` of the loss at ``params``, reusing ``value=``/``grad=`` when both given.

    Cost: nothing with both given, else one gradient evaluation.
    """
    value, grad = extra_args.get("value"), extra_args.get("grad")
    if value is None or grad is None:
        value, grad = jax.value_and_grad(loss)(params)
    grad = jax.tree.map(lambda g, p: jnp.asarray(g).astype(jnp.result_type(p)), grad, params)
    return jnp.asarray(value).astype(dt), grad


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
    stable = getattr(_operators, "_stable_linearized", lambda f: f)
    return value, grad, Partial(_linear_hvp, stable(lin))


# ------------------------------------------------------------ microbatching


def _leading(x) -> int | None:
    shape = jnp.shape(x)
    return shape[0] if len(shape) >= 1 else None


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
    lengths = [_leading(x) for x in leaves]
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


@_weak_cache
def _mb_hessian(fn: Callable, treedef, mask, mode: str, size: int) -> Callable:
    def matvec(params, batched, other, v):
        def chunk_product(b):
            kw = _merge(treedef, mask, b, other)
            return hessian_matvec(_kw_call(fn), params, kw, mode=mode)(v)

        return microbatch_mean(chunk_product, batched, size)

    return matvec


@_weak_cache
def _mb_ggn(model_fn: Callable, loss_fn: Callable, treedef, mask, mnames, lnames, size: int):
    def matvec(params, batched, other, v):
        def chunk_product(b):
            kw = _merge(treedef, mask, b, other)
            mkw = {k: kw[k] for k in mnames}
            lkw = {k: kw[k] for k in lnames}
            return ggn_matvec(
                _kw_call(model_fn), _kw_call(loss_fn), params, mkw, loss_args=(lkw,)
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
            return hessian_matvec(_kw_call(value_fn), params, kw, mode=hvp_mode)
        mode = "fwd-rev" if hvp_mode in (None, "linearize") else hvp_mode
        treedef, mask, batched, other = split_batched(kw)
        product = _mb_hessian(value_fn, treedef, mask, mode, int(microbatch_size))
        return Partial(product, params, batched, other)
    model_fn, loss_fn = ggn
    mkw, lkw = _ggn_kwargs(model_fn, loss_fn, extra_args)
    if microbatch_size is None:
        return ggn_matvec(_kw_call(model_fn), _kw_call(loss_fn), params, mkw, loss_args=(lkw,))
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
    params = require_params(name, params)
    dt = float_dtype(params)
    if ggn is None and microbatch_size is None and hvp_mode in (None, "linearize"):
        # the linearisation evaluates the loss and gradient anyway: value=/grad= add nothing
        value, grad, matvec = linearized_loss(loss, params)
        return CurvatureSetup(loss, dt, jnp.asarray(value).astype(dt), grad, matvec)
    value, grad = value_and_grad(loss, params, extra_args, dt)
    matvec = curvature_matvec(
        loss.fn, ggn, params, extra_args, hvp_mode=hvp_mode, microbatch_size=microbatch_size
    )
    return CurvatureSetup(loss, dt, value, grad, matvec)


# ------------------------------------------------------------ alias wrapper


class RecomputeState(NamedTuple):
    """State of `recompute_marker`: tells ``optax.value_and_grad_from_state`` to recompute.

    ``value`` is ``+inf``, so `optax.value_and_grad_from_state` evaluates
    the loss and gradient at the new parameters itself (as it does at the first
    step of `optax.lbfgs`); ``grad`` is a zero placeholder shaped like
    the parameters.
    """

    value: jax.Array
    grad: PyTree


def recompute_marker() -> optax.GradientTransformation:
    """Identity link whose state makes an alias usable in the ``optax.lbfgs`` loop.

    Without a line search an alias stores no loss or gradient at the new
    parameters; `optax.value_and_grad_from_state` would raise "Value or
    gradient not found". This link stores ``value = +inf`` (with a zero
    gradient placeholder), which that helper reads as "not available: compute
    it". Memory: one parameter-sized pytree of zeros.
    """

    def init_fn(params):
        return RecomputeState(jnp.asarray(jnp.inf, float_dtype(params)), _tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def linesearch_link(linesearch, has_aux: bool = False) -> optax.GradientTransformationExtraArgs:
    """An optax line search fed only the extra arguments its ``value_fn`` takes.

    optax's line searches raise on extra arguments ``value_fn`` does not
    consume; a curvlib alias also receives those of a Gauss-Newton split or
    of another link. With ``has_aux`` the line search sees the loss only. Its
    ``init`` returns no weakly typed leaf (so a jitted step does not retrace,
    `strongly_typed`).
    """
    ls = strongly_typed(linesearch)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        kw = kwargs_for(value_fn, extra_args) if value_fn is not None else {}
        if value_fn is not None:
            value_fn = strip_aux(value_fn, has_aux)
        reserved = {k: extra_args[k] for k in RESERVED if k in extra_args}
        return ls.update(updates, state, params, value_fn=value_fn, **reserved, **kw)

    return optax.GradientTransformationExtraArgs(ls.init, update_fn)


def alias(
    name: str,
    parts: Sequence[Any],
    *,
    linesearch=None,
    has_aux: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``chain(*parts, linesearch)`` that works with ``value_fn`` alone.

    * ``update(..., value_fn=loss)`` without ``value=``/``grad=``: when the
      chain holds a line search, the loss and gradient at ``params`` are
      computed once here (one gradient evaluation) and passed on as
      ``value=``/``grad=``; every link reuses them.
    * ``has_aux=True``: ``value_fn`` returns ``(loss, aux)``; the ``parts``
      were built with the same ``has_aux``, the line search sees the loss only.
    * The line search gets only the extra arguments its ``value_fn`` takes
      (`linesearch_link`).
    * Without a line search a `recompute_marker` link makes the alias
      usable in the loop `optax.lbfgs` documents
      (`optax.value_and_grad_from_state`).

    The state is the chain's (a tuple, one entry per link).
    """
    links = list(parts)
    links.append(
        recompute_marker() if linesearch is None else linesearch_link(linesearch, has_aux)
    )
    inner = optax.chain(*links)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        loss = bind_loss(name, value_fn, extra_args, has_aux=has_aux)
        params = require_params(name, params)
        if linesearch is not None and (
            extra_args.get("value") is None or extra_args.get("grad") is None
        ):
            value, grad = jax.value_and_grad(loss)(params)
            extra_args = {**extra_args, "value": value, "grad": grad}
        return inner.update(updates, state, params, value_fn=value_fn, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def learning_rate_link(learning_rate) -> optax.GradientTransformation:
    """``scale(-1)`` for ``None`` (the full step), else ``scale_by_learning_rate``."""
    if learning_rate is None:
        return optax.scale(-1.0)
    return optax.scale_by_learning_rate(learning_rate)


# -------------------------------------------------------------------- misc


def normal_like(key: jax.Array, like: PyTree) -> PyTree:
    """Standard normal pytree shaped like ``like``, drawn by *one* generator call.

    `curvlib._tree.normal_like` draws one key per leaf; on XLA:CPU every
    threefry call site is compiled on its own (about 0.8 s each on a 2-core
    machine), so a model with many leaves pays seconds of compile time for a
    start vector. Here one flat draw (in the leaves' common dtype) is split
    into the leaves. Leaves with an explicit sharding type keep the per-leaf
    draw (a flat vector would not carry their sharding).
    """
    leaves, treedef = jax.tree.flatten(like)
    if any(_tree.explicit_sharding(x) is not None for x in leaves):
        return _tree.normal_like(key, like)
    dt = jnp.result_type(*[jnp.result_type(x) for x in leaves])
    flat = jax.random.normal(key, (sum(int(np.prod(jnp.shape(x))) for x in leaves),), dt)
    out, start = [], 0
    for x in leaves:
        size = int(np.prod(jnp.shape(x)))
        out.append(flat[start:start + size].reshape(jnp.shape(x)).astype(jnp.result_type(x)))
        start += size
    return jax.tree.unflatten(treedef, out)


def float_dtype(params: PyTree):
    return jnp.result_type(*[jnp.result_type(x) for x in jax.tree.leaves(params)])


def select_tree(c, a: PyTree, b: PyTree) -> PyTree:
    """``a`` where ``c`` else ``b``, leafwise, keeping ``b``'s dtypes."""
    return jax.tree.map(lambda x, y: jnp.where(c, x, y).astype(jnp.result_type(y)), a, b)


def all_finite(*trees) -> jax.Array:
    out = jnp.asarray(True)
    for t in trees:
        if jax.tree.leaves(t):
            out = out & _tree.all_finite(t)
    return out


def _strong(x):
    if isinstance(x, jax.Array) and getattr(x, "weak_type", False):
        return jnp.array(x, dtype=x.dtype)
    return x


def strongly_typed(tx):
    """``tx`` whose ``init`` returns no weakly-typed leaves.

    optax's line searches initialise some ``info`` scalars as weakly typed and
    return them strongly typed from ``update``; under ``jax.jit`` that flips the
    state's abstract signature and retraces the second step. Wrapping the line
    search of an alias keeps one compiled step.
    """
    if tx is None:
        return None
    init = tx.init

    def init_fn(params):
        return jax.tree.map(_strong, init(params))

    if isinstance(tx, optax.GradientTransformationExtraArgs):
        return optax.GradientTransformationExtraArgs(init_fn, tx.update)
    return optax.GradientTransformation(init_fn, tx.update)
