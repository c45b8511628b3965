"""Shared plumbing of the optax transforms in :mod:`curvlib.optim`.

The extra-argument convention is optax's (``scale_by_zoom_linesearch``):
``update(updates, state, params, *, value_fn, **extra_args)`` where
``value_fn(params, **kwargs)`` is the loss on the current batch and ``kwargs``
are the entries of ``extra_args`` whose names appear in ``value_fn``'s
signature (all of them, but the reserved ``value``/``grad``, when it takes
``**kwargs``). The same routing feeds the model and output-loss functions of a
Gauss-Newton split.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvlib import _tree
from curvlib.operators import _weak_cache, ggn_matvec, hessian_matvec

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
    if x is None or not is_concrete(x):
        return
    v = np.asarray(x)
    if isinstance(x, bool) or v.shape != () or int(v) != v or int(v) < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {x}.")


def check_ggn(ggn) -> None:
    if ggn is None:
        return
    if not (isinstance(ggn, tuple) and len(ggn) == 2 and all(callable(f) for f in ggn)):
        raise ValueError(
            "`ggn` must be a pair `(model_fn, loss_fn)` with "
            "`loss_fn(model_fn(params, **kw), **kw) == value_fn(params, **kw)`; "
            f"got {ggn!r}."
        )


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


class ParamsDtypeError(ValueError, TypeError):
    """``params`` with a leaf that is not real floating, refused by an optimizer's ``init``.

    A ``ValueError`` (what ``init`` documents) and a ``TypeError`` (what the rest
    of curvlib raises for a dtype, e.g. :func:`curvlib.hessian_matvec`).
    """


def check_params(name: str, params) -> None:
    """Raise unless ``params`` is a non-empty pytree of real floating arrays (``init``'s check).

    Integer, bool or complex leaves would otherwise pass ``init`` and fail only
    at the first ``update``; ``name`` is the transform, for the message.
    """
    try:
        _tree.check_float_tree(params, "params")
    except TypeError as e:
        raise ParamsDtypeError(
            f"{name}.init: {e} Cast `params` to a real floating dtype (float32, float64, "
            "bfloat16, ...) before `init`."
        ) from None


def require_params(name: str, params) -> PyTree:
    if params is None:
        raise ValueError(f"`{name}.update` needs `params` (the current parameters).")
    return params


# -------------------------------------------------------------- kwarg routing


def kwargs_for(fn: Callable, extra_args: dict) -> dict:
    """The entries of ``extra_args`` that ``fn`` accepts by name."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins, some C callables
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in extra_args.items() if k not in RESERVED}
    return {k: v for k, v in extra_args.items() if k in params and k not in RESERVED}


@_weak_cache
def _kw_call(fn: Callable) -> Callable:
    """``(x, kw) -> fn(x, **kw)``; cached so operator-level caches see one object per ``fn``.

    Weakly (:func:`curvlib.operators._weak_cache`): the cache does not keep ``fn`` alive.
    """

    def call(x, kw):
        return fn(x, **kw)

    return call


def call(fn: Callable, x, extra_args: dict):
    return fn(x, **kwargs_for(fn, extra_args))


def value_at(value_fn: Callable, params: PyTree, extra_args: dict, dt) -> jax.Array:
    """``value_fn(params)``, reusing an explicit ``value=`` extra argument when given."""
    if extra_args.get("value") is not None:
        return jnp.asarray(extra_args["value"]).astype(dt)
    return jnp.asarray(call(value_fn, params, extra_args)).astype(dt)


def curvature_matvec(
    value_fn: Callable,
    ggn,
    params: PyTree,
    extra_args: dict,
    *,
    hvp_mode: str | None,
    microbatch_size: int | None,
):
    """``v -> C v``: the Hessian of ``value_fn`` or the GGN of a ``(model_fn, loss_fn)`` split."""
    if ggn is None:
        kw = kwargs_for(value_fn, extra_args)
        return hessian_matvec(
            _kw_call(value_fn), params, kw, mode=hvp_mode, microbatch_size=microbatch_size
        )
    model_fn, loss_fn = ggn
    mkw = kwargs_for(model_fn, extra_args)
    lkw = kwargs_for(loss_fn, extra_args)
    return ggn_matvec(
        _kw_call(model_fn), _kw_call(loss_fn), params, mkw, loss_args=(lkw,),
        microbatch_size=microbatch_size,
    )


class CurvatureSetup(NamedTuple):
    """What :func:`curvature_setup` hands a curvature transform's ``update``."""

    value_fn: Callable
    dtype: Any
    value: jax.Array
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
) -> CurvatureSetup:
    """The common opening of a Hessian/GGN step (``scale_by_newton_cg``, ``scale_by_newton``).

    Checks ``value_fn`` and ``params`` (errors name the transform ``name``), then
    returns the loss dtype, the loss at ``params`` (:func:`value_at`) and the
    curvature product at ``params`` (:func:`curvature_matvec`).
    """
    value_fn = require_value_fn(name, value_fn)
    params = require_params(name, params)
    dt = float_dtype(params)
    value = value_at(value_fn, params, extra_args, dt)
    matvec = curvature_matvec(
        value_fn, ggn, params, extra_args, hvp_mode=hvp_mode, microbatch_size=microbatch_size
    )
    return CurvatureSetup(value_fn, dt, value, matvec)


# -------------------------------------------------------------------- misc


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
