"""Eager argument checks shared by every layer: one function per kind of argument.

Every public entry point of curvlib checks its arguments here, once, at its
boundary, and calls unchecked internals below it. Each kind of argument has one
rule, so it is accepted and refused the same way everywhere, with one message
form:

    `name` must be <what it must be>; got <what it is>.

naming the pytree path (`jax.tree_util.keystr`) when one leaf is at fault.

=============================  =====================================================
check                          for
=============================  =====================================================
`static_int`             ints that fix a shape or a program (``k``, ``basis_size``)
`number`                 real hyperparameters: ``>= 0``, ``> 0``, in a range; a step
                         size (a scalar or a schedule, with ``schedule``); a bound
                         above another (``max_damping`` above ``min_damping``); a
                         scale or a 1-D grid of them (``sigma``, with ``grid``)
`one_of`                 an option among fixed choices (``which``, ``likelihood``)
`mode`                   a curvature product's ``mode``, refused where it cannot apply
`prng_key`               one PRNG key; required unless optional (never a default)
`float_leaves`           a non-empty pytree of real floating arrays (``params``, outputs),
                         no flax state beside the parameters (``nnx.BatchStat``)
`same_structure`         a pytree shaped like another (``x0`` like ``b``, ``state``,
                         an operator's output like its input: real floating)
`output`                 a function's output, ``(primary, aux)`` with ``has_aux``; a
                         loss: one real floating scalar (not per-sample)
`basis`                  a stack of ``D`` orthonormal vectors shaped like ``params``
`tangent`                a real vector shaped (and sharded) like its reference, by leaf path
`microbatch`             ``microbatch_size`` with its batch: which extra arguments are
                         batched (``batch_argnums``), sharing one leading (sample) axis
`concrete`               a pytree with no traced leaf (host-driven operators)
`float_dtype`            a dtype option (``basis_dtype``): a real floating dtype
`functions`              a callable, or a tuple of them (``ggn=(model_fn, loss_fn)``)
`operator`               a linear operator mapping a vector to one shaped like it
=============================  =====================================================

Numeric hyperparameters stay traceable (``optax.inject_hyperparams``): a traced
value passes `number` unchecked. Static ints cannot be traced.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import weakref
from collections.abc import Mapping
from operator import index as _index

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial, keystr

from curvlib import _tree


class ArgumentError(ValueError, TypeError):
    """A bad argument whose type or shape is wrong (a dtype, a loss's output shape).

    Both a ``ValueError`` (what curvlib raises for a bad argument) and a
    ``TypeError`` (what Python raises for a value of the wrong kind), so either
    ``except`` catches it.
    """


def static_int(x, name: str, *, minimum: int | None = None, maximum: int | None = None,
               what: str | None = None, optional: bool = False, hint: str = "") -> int | None:
    """``x`` as a Python ``int`` in ``[minimum, maximum]``, else a ``ValueError`` naming ``name``.

    Accepts Python and NumPy integers (and 0-d integer NumPy arrays); rejects
    bools, floats, strings and JAX arrays, traced or not (a static option cannot be a
    ``jit`` argument: it fixes a shape or a program).

    Args:
      x: the value.
      name: the argument's name, as the user wrote it.
      minimum: smallest allowed value (inclusive), or ``None``.
      maximum: largest allowed value (inclusive), or ``None``.
      what: optional words for what the bound means (e.g. ``"the dimension of v0"``).
      optional: accept (and return) ``None``.
      hint: a sentence appended to the message for a traced value.

    Returns:
      ``int(x)`` (``None`` for an optional ``None``).

    Raises:
      ValueError: for a non-integer or out-of-range value.

    Examples:
      >>> import numpy as np
      >>> static_int(np.int64(3), "k", minimum=1)
      3
      >>> static_int(True, "k")
      Traceback (most recent call last):
      ...
      ValueError: `k` must be an int; got True (bool).
    """
    if x is None and optional:
        return None
    if isinstance(x, (jax.core.Tracer, jax.Array)):
        raise ValueError(
            f"`{name}` must be a static Python int, not a JAX array ({x!r}): it fixes the shape of "
            f"the computation. Pass it as a Python int (under `jax.jit`, mark it static with "
            f"`static_argnames=({name!r},)` or bind it with functools.partial; under "
            f"`optax.inject_hyperparams`, list it in `static_args=({name!r},)`); curvlib's "
            "functions are compiled and cached by themselves, so an eager call is as fast as "
            "a jitted one from the second call on." + (" " + hint if hint else "")
        )
    if isinstance(x, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be an int; got {x!r} (bool).")
    try:
        v = _index(x)
    except TypeError:
        raise ValueError(f"`{name}` must be an int; got {x!r} ({type(x).__name__}).") from None
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        # (the message `number` writes; a float past int64 still reads as a number there)
        number(v if abs(v) < 2**62 else float(v), name, minimum=minimum, maximum=maximum,
               what=f"({what})" if what else None)
    return int(v)


def number(x, name: str, *, minimum=None, maximum=None, exclusive: bool = False,
           finite: bool = True, optional: bool = False, integer: bool = False,
           what: str | None = None, runtime_arrays: bool = False, scalar: bool = False,
           schedule: bool = False, above: tuple | None = None, grid: bool = False,
           dtype=None):
    """A real hyperparameter in a range; concrete values are checked, traced ones pass.

    ``x`` may be a scalar or an array (every entry is checked): ``minimum`` is
    exclusive with ``exclusive`` (``> 0``), ``maximum`` inclusive. A traced
    value (``optax.inject_hyperparams`` under ``jit``) is returned as is. With
    ``schedule``, ``x`` is a step size: one real finite scalar or a schedule (a
    callable of the step count, returned as is); a string, a bool or an array
    with more than one entry is refused (a ``(1,)`` array would silently reshape
    every scalar of an optimizer's state). With ``grid``, ``x`` is a scale or a
    grid of them (the probe's ``sigma``): a number, a sequence or an array,
    returned as a floating array (cast to ``dtype``, else kept if floating,
    else the default float) that is a scalar or a non-empty 1-D grid, its
    concrete entries checked against the range.

    Args:
      x: the value.
      name: the argument's name.
      minimum, maximum: the bounds, or ``None``.
      exclusive: ``minimum`` itself is refused.
      finite: refuse NaN and infinities.
      optional: accept ``None``.
      integer: refuse non-integral values (a traceable count such as ``every``).
      what: optional words after the range (e.g. ``"for method='lowrank'"``).
      runtime_arrays: pass every JAX array unchecked, concrete or traced: a value
        computed at run time (an optimizer's adaptive damping) must show up in the
        result's flags, not as an exception in the middle of a run.
      scalar: refuse anything but one number (its shape is checked, traced or not).
      schedule: accept a callable (a learning-rate schedule); implies ``scalar``.
      above: ``(lo, name_lo)``: another argument ``x`` must not be below
        (``min_damping`` for ``max_damping``); a traced or ``None`` one passes.
      grid: accept and return a floating scalar or 1-D array (see above).
      dtype: with ``grid``, the array's dtype.

    Returns:
      ``x`` unchanged; with ``grid``, ``x`` as a floating array.

    Raises:
      ValueError: for a complex, non-numeric, NaN/Inf (with ``finite``) or
        out-of-range value.

    Examples:
      >>> number(0.5, "ema_decay", minimum=0.0, maximum=1.0)
      0.5
      >>> number(-1.0, "damping", minimum=0)
      Traceback (most recent call last):
      ...
      ValueError: `damping` must be >= 0; got -1.0.
      >>> number([0.1, 1.0], "sigma", minimum=0, exclusive=True, grid=True).tolist()
      [0.1, 1.0]
    """
    if grid:
        x = _grid(x, name, dtype)
    if schedule:
        step = "a real finite scalar or a schedule (a callable of the step count)"
        if x is None and not optional or isinstance(x, (str, bytes, bool)):
            raise ValueError(f"`{name}` must be {step}; got {x!r}.")
        if callable(x):
            return x
        if x is not None and np.ndim(x) != 0:
            raise ValueError(f"`{name}` must be {step}; got {_tree.describe_shape(x)} {x!r}.")
    if scalar and x is not None and jnp.ndim(x) != 0:
        raise ArgumentError(f"`{name}` must be a real scalar; got shape {tuple(jnp.shape(x))}.")
    if (x is None and optional) or isinstance(x, jax.core.Tracer):
        return x
    if runtime_arrays and isinstance(x, jax.Array):
        return x
    if minimum is not None and maximum is not None:
        rng = f"in {'(' if exclusive else '['}{minimum}, {maximum}]"
    elif minimum is not None:
        rng = f"{'>' if exclusive else '>='} {minimum}"
    else:
        rng = "" if maximum is None else f"<= {maximum}"
    rng += f" {what}" if what else ""
    kind = "an integer" if integer else "a real number"
    try:
        v = np.asarray(x)
        # (bfloat16 and the other ml_dtypes floats have NumPy kind "V", not "f")
        floating = v.dtype.kind == "f" or jnp.issubdtype(v.dtype, jnp.floating)
        ok_type = (v.dtype.kind in "iu" or floating and not integer) and not isinstance(x, bool)
        if integer and floating:  # an integral float (from a config file)
            v = v.astype(np.float64)
            ok_type = bool(np.all(np.isfinite(v)) and np.all(v == np.round(v)))
    except (TypeError, ValueError):
        ok_type = False
    if not ok_type:
        raise ValueError(f"`{name}` must be {kind}{' ' + rng if rng else ''}; got {x!r}.")
    v = v.astype(np.float64)
    got = v.tolist() if grid else repr(x)
    if finite and not np.all(np.isfinite(v)):
        raise ValueError(f"`{name}` must be finite{' and ' + rng if rng else ''}; got {got}.")
    low = minimum is not None and not np.all(v > minimum if exclusive else v >= minimum)
    if low or (maximum is not None and not np.all(v <= maximum)):
        raise ValueError(f"`{name}` must be {(kind + ' ') if integer else ''}{rng}; got {got}.")
    lo = None if above is None else above[0]
    if lo is not None and not isinstance(lo, jax.core.Tracer) and not np.all(
            np.asarray(lo, np.float64) <= v):  # (after x's own checks: its range first)
        raise ValueError(f"`{above[1]}` must be <= `{name}`; got {lo!r} > {x!r}.")
    return x


def one_of(x, name: str, choices):
    """``x`` if it is one of ``choices``, else a ``ValueError`` listing them.

    A bool is only equal to a bool choice (``1`` is not ``True`` here).
    """
    if not any(x is c or (type(x) is type(c) and x == c) for c in choices):
        raise ValueError(f"`{name}` must be one of {tuple(choices)}; got {x!r}.")
    return x


HESSIAN_MODES = ("linearize", "fwd-rev", "rev-rev")  # how a Hessian product is computed
GAUSS_NEWTON_MODES = ("linearize", "recompute")  # how a Gauss-Newton or Fisher product is


def mode(x, gauss_newton: bool = False, *, microbatch_size=None, ggn=None,
         name: str = "mode"):
    """A curvature product's ``mode``, with its default resolved.

    Accepts ``None`` (the default: ``"linearize"``, or without stored residuals,
    ``"fwd-rev"`` / ``"recompute"``, when ``microbatch_size`` is given) and one of
    `HESSIAN_MODES` (`GAUSS_NEWTON_MODES` with ``gauss_newton``). Refuses
    ``"linearize"`` with ``microbatch_size`` (it would store every microbatch's
    residuals) and any mode beside a Gauss-Newton split ``ggn`` (whose product
    takes none).

    Returns:
      The mode to use (``None`` beside ``ggn``).

    Examples:
      >>> mode(None), mode(None, microbatch_size=8), mode(None, True, microbatch_size=8)
      ('linearize', 'fwd-rev', 'recompute')
      >>> mode("fwd-rev", ggn=(len, len))
      Traceback (most recent call last):
      ...
      ValueError: `mode` chooses how the Hessian product is computed; ... Leave `mode` out.
    """
    choices = GAUSS_NEWTON_MODES if gauss_newton else HESSIAN_MODES
    one_of(x, name, (None, *choices))
    if ggn is not None:
        if x is not None:
            raise ValueError(
                f"`{name}` chooses how the Hessian product is computed; with `ggn=` the "
                "curvature is the Gauss-Newton product, which takes no `mode`; got "
                f"{name}={x!r}. Leave `{name}` out.")
        return None
    if microbatch_size is None:
        return "linearize" if x is None else x
    if x == "linearize":
        alt = "mode='recompute' (the default)" if gauss_newton else "'fwd-rev' or 'rev-rev'"
        raise ValueError(f"`{name}='linearize'` stores every microbatch's residuals; use {alt} "
                         f"with `microbatch_size`; got microbatch_size={microbatch_size!r}.")
    return choices[1] if x is None else x


def prng_key(key, name: str = "key", *, optional: bool = False):
    """``key`` if it is one PRNG key (typed ``jax.random.key`` or raw ``uint32[2]``).

    curvlib never draws from a silent default key: a ``key`` without a
    default is required (``None`` is refused unless ``optional``).

    Raises:
      ValueError: for ``None`` (unless ``optional``), a key array or a non-key.
    """
    if key is None:
        if optional:
            return None
        raise ValueError(f"`{name}` is required (an explicit PRNG key; there is no default "
                         "key); got None.")
    dt = getattr(key, "dtype", None)
    if dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
        if jnp.shape(key) != ():
            raise ValueError(f"`{name}` must be a single PRNG key; got a key array of shape "
                             f"{jnp.shape(key)} (vmap over keys instead).")
        return key
    if dt is not None and dt == jnp.uint32 and tuple(jnp.shape(key)) == (2,):
        return key
    raise ValueError(f"`{name}` must be a PRNG key (`jax.random.key(0)` or "
                     f"`jax.random.PRNGKey(0)`); got {key!r}.")


_KEY_ADVICE = ("A key is not a parameter. Do not cast it: pass the key to the function as an "
               "extra argument after the parameters (or close over it).")
_ADVICE = ("If the leaf is a trainable parameter, cast it to a floating dtype (float32, "
           "float64, bfloat16, ...); if it is not (a PRNG key, a step counter, integer state, "
           "a mask), do not cast it: take it out of the parameters and pass it to the function "
           "as an extra argument after them.")


_INIT_KEY_ADVICE = (
    "Keys are not trainable: pass only the parameters (flax nnx: `nnx.state(model, nnx.Param)` "
    "or `nnx.Optimizer(model, tx, wrt=nnx.Param)`; linen: `variables['params']`) and give the "
    "key to the loss as an extra argument of `update`."
)
_INIT_ADVICE = (
    "Non-trainable leaves (step counters, raw uint32 PRNG keys, masks, batch statistics) "
    "belong outside `params` (flax nnx: `nnx.state(model, nnx.Param)` or `wrt=nnx.Param`; "
    "linen: `variables['params']`); cast a leaf to a real floating dtype (float32, float64, "
    "bfloat16) only if it really is a parameter."
)


# flax's own variable kinds that are state, not parameters (`nnx.Param` and its subclasses,
# and user-defined kinds, are taken as parameters); linen's collections beside ``params``
_NNX_STATE = ("BatchStat", "Cache", "Intermediate", "RngState", "OptState")
_LINEN_STATE = ("batch_stats", "cache", "intermediates")


def _flax_state(tree, name: str, prefix: str) -> None:
    """Raise if ``tree`` holds flax model state that is not a parameter.

    A whole nnx model (or ``nnx.state(model)``) with ``nnx.BatchStat`` leaves, or
    linen's ``variables`` with ``batch_stats`` beside ``params``, is all floating: the
    curvature would silently be taken in the running statistics too.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None:
        kinds = tuple(getattr(nnx, k) for k in _NNX_STATE if hasattr(nnx, k))
        flat, _ = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
        for path, x in flat:
            if isinstance(x, kinds):
                raise ArgumentError(
                    f"{prefix}`{name}{keystr(path)}` must be a parameter (an `nnx.Param`); "
                    f"got an `nnx.{type(x).__name__}`, model state that is not trained. Pass "
                    "the `nnx.Param` state alone (`graphdef, params, rest = nnx.split(model, "
                    "nnx.Param, ...)`, or `nnx.Optimizer(model, tx, wrt=nnx.Param)`) and give "
                    "`rest` to the loss as an extra argument."
                )
    if isinstance(tree, Mapping) and "params" in tree:
        extra = sorted(k for k in tree if k in _LINEN_STATE)
        if extra:
            raise ArgumentError(
                f"{prefix}`{name}` must be the parameters alone; got flax linen `variables` "
                f"with the collections {['params', *extra]}. Pass `variables['params']` and "
                f"give {extra} to the loss as an extra argument "
                "(`model.apply({'params': params, **rest}, x)`)."
            )


def unmasked(tree, name: str, transform: str) -> None:
    """Raise for parameters a mask selected (``optax.masked``, ``optax.multi_transform``): the
    leaves outside it are ``optax.MaskedNode`` s, and a second-order transform evaluates the
    loss, which needs every parameter."""
    optax = sys.modules.get("optax")  # (none without optax imported)
    node = getattr(optax, "MaskedNode", None)
    if node is None:
        return
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, node))[0]
    masked = [keystr(path) for path, x in flat if isinstance(x, node)]
    if masked:
        raise ArgumentError(
            f"`{name}` must be the model's parameters; got `optax.MaskedNode` at "
            f"{', '.join(masked[:4])}{' ...' if len(masked) > 4 else ''}: `{transform}` inside "
            "`optax.masked` or `optax.multi_transform` sees only the leaves the mask "
            "selects, but its curvature (and line search) evaluate the loss, which needs "
            "every parameter. Give the second-order transform the whole tree (a first-order "
            "transform for a part of it can be chained after, with its own mask).")


def float_leaves(tree, name: str, *, init: str | None = None,
                 advice: str | None = None) -> None:
    """Raise unless ``tree`` is a non-empty pytree of real floating arrays.

    The message names the offending leaf by its pytree path
    (``params['dense']['kernel']``) and gives the fix that fits the leaf: a
    typed PRNG key, a raw ``uint32`` key or other integer state must leave
    the tree (be passed as an extra argument), never be cast; a complex leaf
    is stored as two real ones.

    Args:
      tree: the pytree.
      name: its argument name.
      init: the optax transform whose ``init`` checks its ``params``
        (``"scale_by_newton_cg"``): the message starts ``"scale_by_newton_cg.init: "``
        and its advice is about optimizer states (flax ``nnx.Param`` filters).
      advice: the sentence that ends the message instead of the advice about
        parameters (outputs a streamed operator averages must be floating means).

    Raises:
      ArgumentError: (a ``ValueError`` and a ``TypeError``) for an empty tree,
        a leaf that is not real floating, or flax model state that is not a
        parameter (`_flax_state`: an ``nnx.BatchStat``, linen's ``batch_stats``).
    """
    prefix = f"{init}.init: " if init else ""
    if init:
        unmasked(tree, name, init)
    if isinstance(tree, Partial):  # a pytree of arrays, but an operator: arguments swapped
        raise ArgumentError(
            f"{prefix}`{name}` must be a pytree of real floating arrays; got a function (a "
            f"`jax.tree_util.Partial` of {getattr(tree.func, '__qualname__', tree.func)!r}, "
            "such as an operator of `hessian_matvec`). Pass the function first and "
            f"`{name}` after it (`eigsh(matvec, v0, k)`).")
    key_advice, default = (_INIT_KEY_ADVICE, _INIT_ADVICE) if init else (_KEY_ADVICE, _ADVICE)
    key_advice, advice = (advice, advice) if advice else (key_advice, default)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    if not flat:
        raise ArgumentError(f"{prefix}`{name}` must hold at least one floating array; got an "
                            "empty pytree.")
    _flax_state(tree, name, prefix)
    for path, x in flat:
        where = f"{prefix}`{name}{keystr(path)}` must be a real floating array; got"
        if not hasattr(x, "dtype") and not isinstance(x, (int, float, complex, np.generic)):
            # a function or another object: no dtype to name (JAX's "Cannot determine
            # dtype of <function loss>"); a function here is most often an argument order
            raise ArgumentError(
                f"{where} " + (f"a function ({getattr(x, '__qualname__', x)!r}). A function "
                "is not a parameter: pass the function first and the parameters after it "
                "(`hessian_matvec(loss, params, *args)`, `eigsh(matvec, v0, k)`)."
                if callable(x) else f"an object of type {type(x).__name__}. {advice}"))
        dt = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
        if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
            raise ArgumentError(f"{where} a PRNG key (dtype {dt}). {key_advice}")
        if jnp.issubdtype(dt, jnp.complexfloating):
            raise ArgumentError(
                f"{where} dtype {dt}. " + (advice if advice != default else
                "The curvature of a real loss in complex parameters is a real operator on "
                "their real and imaginary parts: store those as two real leaves.")
            )
        if not jnp.issubdtype(dt, jnp.floating):
            raw_key = dt == jnp.uint32 and tuple(jnp.shape(x))[-1:] == (2,)
            raw = (" It looks like a raw uint32 PRNG key (trailing axis 2): do not cast it."
                   if raw_key else "")
            raise ArgumentError(f"{where} dtype {jnp.dtype(dt).name}.{raw} {advice}")


def same_structure(a, b, name_a: str, name_b: str, *, what: str = "",
                   floating: bool = False) -> None:
    """Raise ``ValueError`` unless ``b`` has ``a``'s pytree structure and leaf shapes.

    ``a`` and ``b`` may hold arrays or ``jax.ShapeDtypeStruct`` s (the output of
    ``jax.eval_shape``). The message names the leaves only one of them has,
    or the first leaf (by its path) whose shapes differ.

    Args:
      a, b: the reference pytree and the one checked against it.
      name_a, name_b: their names in the message (``"params"``, ``"tangent"``,
        ``"v0"`` and ``"matvec(v0)"``).
      what: optional words appended to the message (the fix).
      floating: ``b`` is an operator's output for the input ``a``: every leaf
        must also be a real floating array (an integer product gave wrong
        eigenvalues marked converged; a complex one lost its imaginary part in
        the cast to the vector's dtype).
    """
    tail = (" " + what) if what else ""
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = jax.tree_util.tree_flatten_with_path(b)[0]
    if ta != tb:
        detail = _tree.path_difference([keystr(p) for p, _ in fa], [keystr(p) for p, _ in fb],
                                       name_a, name_b)
        detail += _module_hint(b, f"`{name_b}`", a, f"`{name_a}`")
        raise ValueError(
            f"`{name_b}` must match `{name_a}` in pytree structure and leaf shapes; got "
            f"{name_a}: {_short(ta)} and {name_b}: {_short(tb)}.{detail}{tail}"
        )
    for (path, x), (_, y) in zip(fa, fb, strict=True):
        p = keystr(path)
        if tuple(jnp.shape(x)) != tuple(jnp.shape(y)):
            raise ValueError(
                f"`{name_b}` must match `{name_a}` in pytree structure and leaf shapes; got "
                f"{name_b}{p} of shape {tuple(jnp.shape(y))} where {name_a}{p} has shape "
                f"{tuple(jnp.shape(x))}.{tail}"
            )
        dt = jnp.result_type(y)
        if floating and not jnp.issubdtype(dt, jnp.floating):
            raise ArgumentError(f"`{name_b}{p}` must be a real floating array like "
                                f"`{name_a}`; got dtype {dt}.")


def output(out, name: str, *, has_aux: bool | None = False, scalar: bool = True,
           what: str = "loss", advice: str | None = None):
    """The primary part of a function's output ``out``; a loss checked to be one real scalar.

    ``out`` is what the function returned (arrays, or ``jax.ShapeDtypeStruct`` s
    from ``jax.eval_shape``): the primary output (``what``: the loss, a model's
    outputs), or ``(primary, aux)`` with ``has_aux``.
    ``has_aux=None``: the caller has no ``has_aux`` option (a pair is refused
    with advice to return the loss alone).
    With ``scalar`` (a loss), the primary output must be one real floating
    scalar: every curvlib entry point that takes a loss refuses a per-sample
    (vector) loss through this check (curvature, gradients and the landscape's
    sample weighting are defined for the scalar (mean) loss only). ``advice``
    replaces the message's last sentence about reducing over the batch (a function
    called on one example: `curvlib.empirical_fisher_matvec`).

    Returns:
      The primary output (``out`` or ``out[0]``).

    Raises:
      ArgumentError: (a ``ValueError`` and a ``TypeError``) for a missing
        ``(primary, aux)`` pair, a non-scalar or a non-floating loss.
    """
    if has_aux is not None and not (isinstance(has_aux, (bool, int, np.bool_, np.integer))
                                    and has_aux in (0, 1)):
        raise ValueError(f"`has_aux` must be True or False; got {has_aux!r}.")
    takes_aux, has_aux = has_aux is not None, bool(has_aux)
    if has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ArgumentError(
            f"`{name}` was declared with `has_aux=True`, so it must return a pair "
            f"`({what}, aux)`; got {jax.tree.structure(out)}."
        )
    out = out[0] if has_aux else out
    if not scalar:
        return out
    leaves = jax.tree.leaves(out)
    container = isinstance(out, (tuple, list, dict))  # (`(loss, {})`: one scalar leaf,
    if container or len(leaves) != 1 or tuple(jnp.shape(leaves[0])) != ():  # not a loss)
        got = (f"a {type(out).__name__} {jax.tree.structure(out)}" if container
               else f"shape {tuple(jnp.shape(leaves[0]))}" if len(leaves) == 1
               else f"{len(leaves)} leaves of shapes {[tuple(jnp.shape(x)) for x in leaves]}")
        hint = ""
        if not has_aux and isinstance(out, (tuple, list)) and len(out) == 2:
            hint = (" If it returns `(loss, aux)`, pass `has_aux=True`." if takes_aux
                    else " If it returns `(loss, aux)`, pass a function that returns the loss "
                    "alone (this one takes no `has_aux`), e.g. `lambda *a: fn(*a)[0]`.")
        advice = advice or ("A per-sample loss is not accepted: reduce it over the batch "
                            "(e.g. `jnp.mean`) before asking for curvature.")
        raise ArgumentError(
            f"`{name}` must return a scalar loss (shape ()); it returned {got}. {advice}{hint}"
        )
    dt = jnp.result_type(leaves[0])
    if not jnp.issubdtype(dt, jnp.floating):
        raise ArgumentError(f"`{name}` must return a real floating scalar; got dtype {dt}.")
    return out


def _module_hint(*named) -> str:
    """A sentence for the first of ``tree, name, tree, name, ...`` that is a flax
    ``nnx.Module`` (the model where its ``nnx.Param`` state belongs), else ``""``."""
    nnx = sys.modules.get("flax.nnx")
    for tree, name in zip(named[::2], named[1::2], strict=True):
        if nnx is not None and isinstance(tree, nnx.Module):
            return (f" {name} is a flax `nnx.Module`; pass its `nnx.Param` state, the "
                    "`params` of `graphdef, params, rest = nnx.split(model, nnx.Param, ...)` "
                    "(or a pytree shaped like it).")
    return ""


def _short(treedef, limit: int = 300) -> str:
    """``str(treedef)``, cut to ``limit`` characters (a flax module's runs to thousands)."""
    text = str(treedef)
    return text if len(text) <= limit else text[:limit] + " ...(cut)"


class TangentMismatch(ValueError):
    """`tangent`'s error: a vector not shaped like the operator's. Keeps what the message
    was made from, so that a function handing the user's argument to the operator
    (`operator`) names that argument (``v0``, ``b``) instead of "the tangent"."""

    def __init__(self, message, v, sig, like, by_path):
        super().__init__(message)
        self.v, self.sig, self.like, self.by_path = v, sig, like, by_path


def tangent(v, sig, like: str = "params", name: str = "tangent", *,
            by_path: bool = False) -> None:
    """Raise ``ValueError`` unless the vector ``v`` is shaped (and typed) like its reference.

    ``sig`` is the reference's ``(treedef, key paths, leaf shapes, explicit
    specs)`` (``curvlib.operators._common.signature``): ``v`` must have the
    same pytree structure and leaf shapes (with ``by_path``, only the same key
    paths and shapes: ``None`` subtrees may sit at any level, as in a block's
    sub-pytree), and where a reference leaf carries an explicit sharding type
    the same one. The check is static, so it costs nothing under ``jit``. The
    message names the leaf by its path.
    """
    message = _tangent_message(v, sig, like, f"the {name}", name, by_path)
    if message is not None:
        raise TangentMismatch(message, v, sig, like, by_path)
    for path, x in zip(sig[1], jax.tree.leaves(v), strict=True):
        if jnp.issubdtype(jnp.result_type(x), jnp.complexfloating):  # the cast to the
            raise ArgumentError(  # reference's dtype would drop the imaginary part
                f"`{name}{path}` must be a real array (integer or floating); got dtype "
                f"{jnp.result_type(x)}.")


@contextlib.contextmanager
def naming(name: str):
    """Within it, a curvlib operator's `tangent` error names ``name``, the argument whose
    vectors the caller hands to the operator (``v0``, ``b``), not "the tangent"."""
    try:
        yield
    except TangentMismatch as e:
        raise ValueError(_tangent_message(e.v, e.sig, e.like, f"`{name}`", name,
                                          e.by_path)) from None


def _tangent_message(v, sig, like, subject, name, by_path):
    """`tangent`'s message for ``v`` (called ``subject`` in a sentence, ``name`` before a
    leaf's path), or ``None`` when its structure, shapes and sharding types fit."""
    treedef, paths, shapes, specs = sig
    vleaves = _tree.leaves_with_paths(v)
    leaves = [x for _, x in vleaves]
    if by_path:
        vpaths = tuple(p for p, _ in vleaves)
        if vpaths != paths:
            return (f"{subject} must have the leaves of `{like}` (by key path, in order): "
                    f"{list(paths)}; got {list(vpaths)}.")
    elif jax.tree.structure(v) != treedef:
        detail = _tree.path_difference(paths, [p for p, _ in vleaves], like, name)
        detail += _module_hint(v, subject[0].upper() + subject[1:])
        return (f"{subject} must match `{like}` in pytree structure and leaf shapes; got "
                f"{like}: {_short(treedef)} and {name}: {_short(jax.tree.structure(v))}.{detail}")
    for path, x, want in zip(paths, leaves, shapes, strict=True):
        if tuple(jnp.shape(x)) != want:
            return (f"{subject} must match `{like}` in pytree structure and leaf shapes; "
                    f"{name}{path} has shape {tuple(jnp.shape(x))} but {like}{path} has shape "
                    f"{want}.")
    for path, x, want in zip(paths, leaves, specs, strict=True):
        if want is not None and _tree.explicit_spec(x) != want:
            return (f"`{like}` have explicit sharding types (a mesh with AxisType.Explicit "
                    f"axes), so {subject} must carry the same sharding; {name}{path} is typed "
                    f"{jax.typeof(x).str_short()} but {like}{path} has spec {want[1]} on mesh "
                    f"axes {want[0]}. Place vectors like the {like} (`jax.device_put(v, "
                    "sharding)` or `jax.sharding.reshard`).")
    return None


def _batched(args: tuple, argnums: tuple[int, ...], name: str = "args",
            extra: tuple = (), extra_name: str = "loss_args") -> int:
    """The batch size ``n`` that every batched argument carries as its leading axis.

    Accepts ``args[i]`` for ``i`` in ``argnums`` (and every entry of ``extra``,
    the loss arguments of a Gauss-Newton split) when at least one leaf exists
    and every leaf carries the same leading axis length ``n``. The message
    names the first leaf that does not and suggests the ``batch_argnums`` that
    would fit.
    """
    named = [(f"{name}[{i}]", args[i]) for i in argnums]
    named += [(f"{extra_name}[{j}]", a) for j, a in enumerate(extra)]
    flat = [(f"{base}{path}", x) for base, tree in named
            for path, x in _tree.leaves_with_paths(tree)]
    if not flat:
        raise ValueError(
            f"microbatching needs batched arrays, but the batched arguments ({name}"
            f"{list(argnums)}) hold no array."
        )
    axes = [_tree.leading_axis(x) for _, x in flat]
    counts = {}
    for a in axes:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    # the batch size: the leading axis most batched leaves share (the first such on ties)
    n = max(counts, key=lambda a: (counts[a], -axes.index(a))) if counts else None
    where0 = next((w for (w, _), a in zip(flat, axes, strict=True) if a == n), flat[0][0])
    for (where, x), a in zip(flat, axes, strict=True):
        if n is not None and a == n:
            continue
        arg = where[: where.index("]") + 1]
        whole = all(_tree.leading_axis(y) != n for w, y in flat if w[: w.index("]") + 1] == arg)
        fits = tuple(
            i for i, t in enumerate(args)
            if jax.tree.leaves(t) and all(_tree.leading_axis(y) == n for y in jax.tree.leaves(t))
        )
        if whole and arg.startswith(name) and fits:
            fix = (f"Pass `batch_argnums` to name the batched arguments (here "
                   f"`batch_argnums={fits}`); the others are passed whole to every microbatch.")
        elif whole:
            fix = "Close over it (unbatched constants of the loss are not chunked)."
        else:
            fix = (f"Take it out of `{arg}` (pass it as a separate argument, left out of "
                   "`batch_argnums`) or close over it.")
        what = ("a leading sample axis" if n is None
                else f"the batch size {n} (leading axis of `{where0}`)")
        raise ValueError(
            f"`microbatch_size` chunks every batched argument along its leading (sample) "
            f"axis, but `{where}` has {_tree.describe_shape(x)}, which does not carry {what}. {fix}"
        )
    return int(n)


def concrete(tree, name: str, *, loop: bool = False) -> None:
    """Raise ``TypeError`` if any leaf of ``tree`` is traced (a host-driven call).

    Accepts a pytree of concrete values: a host-driven operator (data streamed
    from the host) loops over host data in every product, so it cannot run
    inside ``jax.jit``, ``vmap``, ``grad`` or ``eval_shape``. ``loop=True``: the
    check of an algorithm's host-driven loop (``tree`` its initial state), whose
    message names the algorithm rather than the operator.
    """
    if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree)):
        return
    if loop:
        raise TypeError(
            "an algorithm on a host-driven operator (data streamed from the host) cannot run "
            "inside jax.jit, vmap, grad or eval_shape: its loop runs from the host, one "
            "compiled step per product. Call the algorithm eagerly (outside your jit); its "
            "steps are compiled anyway."
        )
    raise TypeError(
        f"a host-driven operator (data streamed from the host) cannot be called with traced "
        f"`{name}` (inside jax.jit, vmap, grad or eval_shape): every product loops over "
        "host data. Call it eagerly, or hand it to a curvlib algorithm that drives "
        "host-driven operators from the host."
    )


def float_dtype(x, name: str, *, optional: bool = False):
    """``x`` as a real floating ``jnp.dtype``, else a ``ValueError`` naming ``name``.

    Accepts anything ``jnp.dtype`` understands (``jnp.float32``, ``"bfloat16"``)
    that is a real floating type, and ``None`` when ``optional`` (returned as is).

    Examples:
      >>> float_dtype("float32", "basis_dtype")
      dtype('float32')
      >>> float_dtype("int32", "basis_dtype")
      Traceback (most recent call last):
      ...
      ValueError: `basis_dtype` must be a real floating dtype; got int32.
    """
    if x is None and optional:
        return None
    try:
        dt = jnp.dtype(x)
    except TypeError:
        raise ValueError(f"`{name}` must be a floating dtype; got {x!r}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"`{name}` must be a real floating dtype; got {dt}.")
    return dt


def real_vector(x, name: str, *, what: str = "real numbers"):
    """``x`` (an array, list or tuple) as a 1-D real array, else a ``ValueError`` naming
    ``name``; integers become the default float (a float stays in its own dtype).

    Examples:
      >>> real_vector([3, 2], "eigenvalues_k").dtype == jnp.result_type(float)
      True
      >>> real_vector("3 2", "eigenvalues_k")
      Traceback (most recent call last):
      ...
      ValueError: `eigenvalues_k` must be a 1-D array of real numbers; got '3 2'.
    """
    try:  # (a string is refused here: NumPy would read it as a dtype)
        a = None if isinstance(x, str | bytes) else jnp.asarray(x)
    except (TypeError, ValueError):
        a = None
    if a is None or not (jnp.issubdtype(a.dtype, jnp.integer)
                         or jnp.issubdtype(a.dtype, jnp.floating)):
        raise ValueError(f"`{name}` must be a 1-D array of {what}; got {x!r}.")
    if a.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D array of {what}; got shape {a.shape}.")
    return a.astype(jnp.result_type(float)) if jnp.issubdtype(a.dtype, jnp.integer) else a


def _grid(x, name: str, dtype=None):
    """``x`` as a floating scalar or non-empty 1-D array (`number` with ``grid``)."""
    try:
        s = jnp.asarray(x) if dtype is None else jnp.asarray(x, dtype)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a positive number or a 1-D grid of them; got "
                         f"{x!r}.") from None
    if not jnp.issubdtype(s.dtype, jnp.floating):
        s = s.astype(jnp.result_type(float))
    if s.ndim > 1:
        raise ValueError(f"`{name}` must be a scalar or a 1-D grid; got shape {s.shape}.")
    if not isinstance(s, jax.core.Tracer) and s.size == 0:
        raise ValueError(f"`{name}` must be a scalar or a non-empty 1-D grid; got an empty "
                         "array.")
    return s


def functions(x, name: str, count: int = 1, *, what: str = "callable", optional: bool = False):
    """``x`` if it is a callable (``count == 1``) or a tuple of ``count`` callables.

    Accepts ``None`` when ``optional``; ``what`` describes the expected value in
    the message (``"a pair `(model_fn, loss_fn)`"``).

    Examples:
      >>> functions(None, "ggn", 2, optional=True) is None
      True
      >>> functions(len, "ggn", 2, what="a pair `(model_fn, loss_fn)`")
      Traceback (most recent call last):
      ...
      curvlib._validate.ArgumentError: `ggn` must be a pair `(model_fn, loss_fn)`; got <built-in ...
    """
    if x is None and optional:
        return None
    ok = (callable(x) if count == 1 else
          isinstance(x, tuple) and len(x) == count and all(callable(f) for f in x))
    if not ok:
        raise ArgumentError(f"`{name}` must be {what}; got {x!r}.")
    return x


# the shape checks passed: per operator function, held weakly (a model the user dropped is not
# kept alive here; a bound method by its object), and for other pytree operators (bounded)
_CHECKED_PARTIALS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CHECKED_OTHERS: dict = {}


def operator(op, example, name: str = "matvec", example_name: str = "v0"):
    """Raise ``ValueError`` unless ``op(example)`` has ``example``'s structure and shapes.

    Returns ``op(example)``'s ``jax.ShapeDtypeStruct`` s (``None`` for ``op=None``): the
    product's dtypes, which may be narrower than the vector's.

    Accepts ``None`` (no operator) and any callable whose output, by
    ``jax.eval_shape``, is shaped like its input (`same_structure`) and real
    floating (an integer or complex output is refused). Plain
    callables are traced every time (their closure may have changed); pytree
    operators (a ``Partial``) are traced once per structure, leaf shapes and
    dtypes of operator and vector, remembered without keeping a ``Partial``'s
    function (and what it closes over) alive.
    """
    if op is None:
        return
    if not callable(op):
        raise ArgumentError(f"`{name}` must be a callable v -> A v; got "
                            f"{type(op).__name__}. Pass the operator first and "
                            f"`{example_name}` after it.")

    def check():
        with naming(example_name):  # a curvlib operator's own check names the argument
            out = jax.eval_shape(op, example)
        same_structure(example, out, example_name, f"{name}({example_name})", floating=True)
        return out

    if jax.tree_util.treedef_is_leaf(jax.tree.structure(op)):  # a plain callable
        return check()
    try:
        if isinstance(op, Partial):
            fn = op.func
            owner, fn = (fn.__self__, fn.__func__) if inspect.ismethod(fn) else (fn, None)
            seen = _CHECKED_PARTIALS.setdefault(owner, {})
            static = (fn, jax.tree.structure((op.args, op.keywords)))
        else:
            seen, static = _CHECKED_OTHERS, jax.tree.structure(op)
        sig = (static, _tree.avals(op), jax.tree.structure(example), _tree.avals(example), name)
        hash(sig)
    except TypeError:  # unhashable static parts, or a function no weak reference can hold
        return check()
    if sig not in seen:
        out = check()
        if len(seen) >= 64:
            seen.clear()
        seen[sig] = out
    return seen[sig]


def _batch_argnums(batch_argnums, num_args: int, name: str = "args") -> tuple[int, ...]:
    """``batch_argnums`` as a sorted tuple of indices into ``num_args`` extra arguments.

    Accepts ``None`` (every argument is batched), an int or a sequence of ints,
    negative ones counting from the end; refuses bools, out-of-range indices
    and an empty selection (microbatching needs a batch).
    """
    if batch_argnums is None:
        return tuple(range(num_args))
    nums = (batch_argnums,) if isinstance(batch_argnums, (int, np.integer)) else batch_argnums
    try:
        nums = tuple(nums)
    except TypeError:
        raise ValueError(
            f"`batch_argnums` must be None, an int or a tuple of ints; got {batch_argnums!r}."
        ) from None
    out = []
    for i in nums:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"`batch_argnums` must hold ints; got {batch_argnums!r}.")
        j = int(i) + num_args if int(i) < 0 else int(i)
        if not 0 <= j < num_args:
            raise ValueError(
                f"`batch_argnums` entries must index the {num_args} extra argument(s) "
                f"`{name}` (from {-num_args} to {num_args - 1}); got {int(i)} (out of range)."
            )
        out.append(j)
    if not out:
        raise ValueError("`batch_argnums` names no argument; microbatching needs a batch.")
    return tuple(sorted(set(out)))


def microbatch(microbatch_size, args: tuple, argnums, *, what: str = "fun", extra: tuple = ()):
    """``(size, batch argnums, batch size)`` of a microbatched call; ``(None,) * 3`` without.

    Accepts ``microbatch_size=None`` (no microbatching) or a static int ``>= 1``
    with at least one extra argument of ``what`` (the batch), ``argnums`` as
    `_batch_argnums` accepts them, and batched arguments (and ``extra``, the
    loss arguments of a Gauss-Newton split) sharing a leading axis (`_batched`).
    """
    if microbatch_size is None:
        return None, None, None
    size = static_int(microbatch_size, "microbatch_size", minimum=1)
    if not args:
        raise ValueError(
            f"`microbatch_size` needs a batch: pass the batch as an extra argument of `{what}` "
            f"(`{what}(params, batch, ...)`)."
        )
    nums = _batch_argnums(argnums, len(args))
    return size, nums, _batched(args, nums, extra=extra)


_gram = jax.jit(_tree.basis_gram)


def basis(eigenvectors, params=None, name: str = "eigenvectors") -> int | None:
    """The number ``D`` of vectors in ``eigenvectors``, an orthonormal stack shaped like ``params``.

    Accepts a pytree with ``params``' structure whose every leaf is the
    matching ``params`` leaf with one extra leading axis of the same length
    ``D >= 1`` on every leaf (the message names the leaf at fault); ``params=None``:
    a basis whose layout its caller has checked, of which only the rows are
    checked (and ``None`` returned). A concrete basis must have orthonormal rows:
    ``max |U U^T - I|`` at most ``max(0.05, 10 sqrt(eps))`` of its dtype (the
    estimators built on ``U`` assume it, and a basis scaled by 2 or with more
    vectors than dimensions gave numbers with no meaning). The tolerance catches
    misuse, not rounding: a Ritz basis kept in bfloat16 is orthonormal to about
    3e-3. A traced basis passes (nothing to compare). Cost: one ``D x D`` Gram
    matrix.
    """
    D = None
    if params is not None:
        if jax.tree.structure(params) != jax.tree.structure(eigenvectors):
            detail = _tree.path_difference(
                [p for p, _ in _tree.leaves_with_paths(params)],
                [p for p, _ in _tree.leaves_with_paths(eigenvectors)], "params", name)
            raise ValueError(
                f"`{name}` must have the structure of `params` with a leading axis D "
                f"(got {jax.tree.structure(eigenvectors)} vs {jax.tree.structure(params)})."
                f"{detail}"
            )
        dims = {}
        for (path, p), e in zip(_tree.leaves_with_paths(params), jax.tree.leaves(eigenvectors),
                                strict=True):
            if jnp.ndim(e) != jnp.ndim(p) + 1 or jnp.shape(e)[1:] != jnp.shape(p):
                raise ValueError(
                    f"every leaf of `{name}` must be the matching `params` leaf with one extra "
                    f"leading axis D; at `{name}{path}` got shape {jnp.shape(e)} for a "
                    f"parameter of shape {jnp.shape(p)}."
                )
            dims[path] = jnp.shape(e)[0]
        if len(set(dims.values())) != 1 or 0 in dims.values():
            raise ValueError(
                f"`{name}` leaves disagree on the leading axis D (the number of vectors): "
                + ", ".join(f"{name}{p}: {d}" for p, d in dims.items()) + "."
            )
        D = next(iter(dims.values()))
    leaves = jax.tree.leaves(eigenvectors)
    if not leaves:
        return D
    float_leaves(eigenvectors, name)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return D
    G = _gram(eigenvectors, eigenvectors)  # (one small program per shapes: op by op, one per op)
    if isinstance(G, jax.core.Tracer):  # inside a caller's jit of constants
        return D
    G = np.asarray(G, np.float64)
    err = float(np.max(np.abs(G - np.eye(G.shape[0])))) if G.size else 0.0
    tol = max(0.05, 10.0 * float(np.sqrt(jnp.finfo(jnp.result_type(*leaves)).eps)))
    if not err <= tol:
        raise ValueError(
            f"`{name}` must be an orthonormal basis (rows with U U^T = I, as `eigsh` and "
            f"`curvature_subspace` return them); got max |U U^T - I| = {err:.3g} "
            f"(tolerance {tol:.2g}).")
    return D
