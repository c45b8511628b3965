"""A loss passed to an optax transform: its extra arguments routed by name, its output checked.

Every curvlib transform ([`curvlib.optim`][curvlib.optim], [`curvlib.kronecker`][curvlib.kronecker])
takes the loss as ``update(..., value_fn=loss, **extra_args)``: ``value_fn(params,
**kw)`` receives the entries of ``extra_args`` whose names appear in its
signature (all of them, but the reserved ``value``/``grad``, when it takes
``**kwargs``): the routing of optax's line searches. `bind_loss` checks
``value_fn`` and binds it; its output is checked to be one scalar
(`curvlib._validate.output`) wherever it is evaluated.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from curvlib import _validate
from curvlib._compile import weak_cache

PyTree = Any

# extra arguments that optax's line searches consume and that are never routed to value_fn
RESERVED = ("value", "grad")


def require_value_fn(name: str, value_fn) -> Callable:
    if value_fn is None:
        raise TypeError(
            f"`{name}.update` needs the loss: call "
            "`update(grads, state, params, value_fn=loss_fn, **batch_kwargs)` where "
            "`loss_fn(params, **batch_kwargs)` returns the scalar loss on the current batch "
            "(the convention of optax's line searches). flax: `nnx.Optimizer.update(model, "
            "grads, value_fn=loss, **batch)` passes them on; linen's "
            "`TrainState.apply_gradients(grads=..., **kwargs)` does not (it gives `kwargs` to "
            "`replace`): override it to call `tx.update(grads, opt_state, params, **kwargs)`."
        )
    if not callable(value_fn):
        raise TypeError(f"`value_fn` must be callable; got {type(value_fn).__name__}.")
    return value_fn


def require_params(name: str, params, updates=None) -> PyTree:
    """``params``, present and (given ``updates``) of the updates' structure and shapes."""
    if params is None:
        raise ValueError(f"`{name}.update` needs `params` (the current parameters).")
    _validate.unmasked(params, "params", name)
    if updates is not None:
        _validate.same_structure(params, updates, "params", "updates",
                                 what=f"(`{name}.update(updates, state, params)`: the "
                                 "gradients of the same parameters)")
        _validate.float_leaves(updates, "updates")
    return params


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


def check_named_inputs(fn: Callable, role: str, extra_args: dict, given_as: str, *,
                       caller: str = "update(grads, state, params, {})") -> None:
    """Raise ``ValueError`` unless ``fn(x, **kwargs_for(fn, extra_args))`` binds.

    For inputs that reach a function by the parameter names of its signature (K-FAC's
    ``model_fn`` and ``example_inputs``): the message names the keys that match no
    parameter (dropped, so they never reach ``fn``) and the parameters left without a
    value. ``given_as`` names where the keys came from (``"example_inputs"``); ``caller``
    spells the call that passes them (its ``{}`` the keywords) when they are a call's extra
    arguments. The check binds the signature only (no call, no trace).
    """
    sig = _signature(fn)
    if sig is None:
        return
    kw = kwargs_for(fn, extra_args)
    try:
        sig.bind(None, **kw)
    except TypeError as e:
        dropped = sorted(k for k in extra_args if k not in kw and k not in RESERVED)
        # (by name: a `*xs` or `**kw` parameter cannot be given one; a model_fn(p, *xs)
        # named its `xs` here, the very key that had just failed)
        names = [n for n, p in list(sig.parameters.items())[1:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        star = [n for n, p in sig.parameters.items() if p.kind is p.VAR_POSITIONAL]
        if star:
            dropped = dropped or sorted(k for k in extra_args if k == star[0])
        raise ValueError(
            (f"`{given_as}`" if given_as.isidentifier() else given_as.capitalize())
            + f" must hold the inputs of `{role}` ({_fn_name(fn)}{sig}) by the names "
            f"of its parameters after the first ({names}); "
            + (f"its key(s) {dropped} name none of them, so they never reach `{role}`, and "
               if dropped else "")
            + f"`{role}` cannot be called with the rest: {e}. "
            + (f"A `*{star[0]}` parameter takes no input by name: give `{role}` one named "
               f"parameter per input (`def {role}(params, x)`)." if star and not names else
               "E.g. "
               + (f"`{given_as}=" + "{" + ", ".join(f"'{n}': ..." for n in names[:2]) + "}`"
                  if given_as.isidentifier() else
                  "`" + caller.format(", ".join(f"{n}=..." for n in names[:2])) + "`")
               + ".")
        ) from None


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def passed_names(extra_args: dict) -> list[str]:
    """The extra arguments of ``update`` that a loss function could receive, sorted."""
    return sorted(k for k in extra_args if k not in RESERVED)


def check_call(fn: Callable, role: str, kw: dict, extra_args: dict, *, hint: str = "",
               caller: str = "update") -> None:
    """Raise a ``TypeError`` listing what ``caller`` received when ``fn(x, **kw)`` cannot bind.

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
        first = params[0] if params else "x"
        # the names after the first, as keywords (``*args``/``**kw`` cannot be passed so)
        named = [n for n, p in list(sig.parameters.items())[1:]
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        example = ", ".join(f"{n}=..." for n in named) or "batch=..."
        raise TypeError(
            f"`{role}` ({_fn_name(fn)}{sig}) cannot be called as `{role}({first}, **kw)` "
            f"with the extra arguments of `{caller}` it names: {e}. `{caller}` received the "
            f"extra arguments {passed_names(extra_args)}"
            + (" (besides `value_fn`)" if caller == "update" else "")
            + f"; each function gets those whose names appear in its own signature ({params}). "
            f"Pass every input it needs to `{caller}` by that name"
            + (f", e.g. `opt.update(grads, state, params, value_fn=..., {example})`."
               if caller == "update" else ".")
            + (" " + hint if hint else "")
        ) from None


@weak_cache
def _scalar_loss(fn: Callable, has_aux: bool, name: str = "value_fn") -> Callable:
    """``fn`` with its output checked (and ``aux`` dropped); keeps ``fn``'s signature.

    Cached weakly by ``fn``, so the products built on it keep one tree
    definition per ``fn`` (no recompilation of jitted consumers).
    """

    @functools.wraps(fn)
    def loss(params, **kw):
        return _validate.output(fn(params, **kw), name, has_aux=has_aux)

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


def strip_aux(value_fn: Callable, has_aux: bool, name: str = "value_fn") -> Callable:
    """``value_fn`` returning only its checked scalar loss (routing signature kept); the
    messages name it ``name``."""
    return _scalar_loss(value_fn, bool(has_aux), name)


@weak_cache
def kw_call(fn: Callable) -> Callable:
    """``(x, kw) -> fn(x, **kw)``; cached so operator-level caches see one object per ``fn``.

    Weakly (`curvlib._compile.weak_cache`): the cache does not keep ``fn`` alive.
    """

    def call(x, kw):
        return fn(x, **kw)

    return call


def call(fn: Callable, x, extra_args: dict):
    return fn(x, **kwargs_for(fn, extra_args))
