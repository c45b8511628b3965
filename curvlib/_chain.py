"""The optax links every curvlib transform shares (private base layer, below every package).

An alias is ``chain(scale_by_<algo>, learning rate, line search)`` that works with ``value_fn``
alone (`alias`); the links around it keep the ``optax.lbfgs`` loop usable
(`recompute_marker`), feed a line search only the extra arguments its ``value_fn`` takes
(`linesearch_link`), report a stalled search as ``Status.STALLED`` (`flag_stalled`),
and keep a jitted step from retracing on weakly typed state (`strongly_typed`). Both
[`curvlib.optim`][curvlib.optim] and [`curvlib.kronecker`][curvlib.kronecker] build their transforms
from these.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvlib import _tree, _validate
from curvlib._compile import (
    NotHoisted,
    bound,
    eager_jit,
    eager_options,
    keyed_function,
    static_items,
    tracing,
)
from curvlib._loss import RESERVED, bind_loss, kwargs_for, require_params, strip_aux
from curvlib._status import Status, worst

PyTree = Any

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
    if not (hasattr(linesearch, "init") and hasattr(linesearch, "update")):
        raise TypeError("`linesearch` must be an optax GradientTransformation (e.g. "
                        "optax.scale_by_zoom_linesearch(...)) or None; got "
                        f"{type(linesearch).__name__}.")
    ls = strongly_typed(linesearch)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        kw = kwargs_for(value_fn, extra_args) if value_fn is not None else {}
        if value_fn is not None:
            value_fn = strip_aux(value_fn, has_aux)
        reserved = {k: extra_args[k] for k in RESERVED if k in extra_args}
        if value_fn is not None and not tracing(updates, state, params, reserved, kw):
            # an eager step: optax builds the search's loop body afresh at every call, so
            # run one by one it compiled its loop again at every step (0.3-1.3 s); compiled
            # whole instead, once per loss program (a fresh closure computing the same
            # loss included, and one closing over this step's batch: its arrays are inputs)
            # and shapes. Keyed by the search's ``update`` function, not by this link: an
            # alias rebuilt at every step (``optax.inject_hyperparams``) with the same
            # search object shares the program
            keyed = keyed_function(value_fn, params, kw=kwargs_for(value_fn, kw))
            if keyed is not None:  # (else run as it is: one call, no caching)
                fn, program, ints = keyed
                # what the loss uses in Python (a class count, a flag) as given and keyed
                # by value, the rest traced (a step counter compiles nothing)
                arrays = {k: x for k, x in kw.items() if k not in ints}
                try:
                    return _eager_search(linesearch.update, fn, static_items(ints), updates,
                                         state, params, reserved, arrays, program)
                except NotHoisted:
                    pass
        if value_fn is not None and kw:
            # bound here: optax hands a search's ``value_fn`` the extra arguments its
            # signature names, and refuses the rest (all of them for ``loss(p, **batch)``)
            value_fn, kw = functools.partial(value_fn, **kw), {}
        return ls.update(updates, state, params, value_fn=value_fn, **reserved, **kw)

    return optax.GradientTransformationExtraArgs(ls.init, update_fn)


@eager_jit(static_argnames=("search", "value_fn", "static"))
def _eager_search(search, value_fn, static, updates, state, params, reserved, kw, program):
    """A line search's ``update`` as one compiled program (`linesearch_link`, eager)."""
    # (the arguments bound: optax refuses those a ``loss(p, **batch)`` does not name)
    return search(updates, state, params, **reserved, value_fn=functools.partial(
        bound(value_fn, program), **kw, **{k: x for k, _, x in static}))


def compiled_when_eager(update_fn, *options):
    """``update_fn`` whose eager calls run as one compiled program per loss program.

    Called eagerly (no argument traced, no caller's ``jit`` tracing), an optax ``update``
    runs op by op: a curvlib transform's step is a hundred small operations, each compiled
    on its first use (3-7 s for the first eager step of a small MLP against 1.5-2.2 s for
    the whole step jitted, then about 10 ms a step against 1 ms). Here the step is
    ``jax.jit`` of ``update_fn`` instead, with ``value_fn`` a static argument keyed by the
    program it computes (`curvlib._compile.same_function`: a fresh closure computing
    the same loss compiles nothing new), the extra arguments traced but those the loss
    uses in Python (a class count, a flag) and those that are no arrays (strings), which
    are passed as given and keyed by value. The step's own branches (a refresh, a
    fallback) are then ``lax.cond`` s, as in the user's jitted step: the same numbers.

    A loss that closes over arrays (``lambda p: loss(p, x, y)`` over each step's batch, a
    new function over new arrays every step) is traced to its program with those arrays
    as inputs (`curvlib._compile.hoisted_loss`): traced beside the batch, they compile
    nothing new at the next step (op by op before: 0.5-0.9 s a step for ``newton`` and
    ``bfgs``, whose line search compiled at every step).

    The call stays eager, op by op, where compiling it would not pay or not be sound:
    under a trace (the user's ``jit`` compiles the step), for a loss that cannot be keyed,
    that calls a custom derivative rule while closing over arrays (the rule is not part of
    the program's text), or that the step evaluates at other shapes, for options that are
    arrays (the transform rebuilt at every step by ``optax.inject_hyperparams``), and where
    the step uses a traced value in Python after all.

    Cost: one trace of ``value_fn`` per call to key it (remembered per function object
    and shapes; a second one for a loss closing over arrays), the checks of ``update_fn``
    once per program.
    """
    if any(isinstance(x, jax.Array) for x in jax.tree.leaves(options)):
        return update_fn
    jitted = None

    def run(fns, static, updates, state, params, arrays, programs):
        fns = {k: bound(f, programs[k]) for k, f in fns}
        return update_fn(updates, state, params, **fns, **arrays,
                         **{k: x for k, _, x in static})

    @functools.wraps(update_fn)
    def update(updates, state, params=None, *, value_fn=None, **extra_args):
        nonlocal jitted
        eager = functools.partial(update_fn, updates, state, params, value_fn=value_fn,
                                  **extra_args)
        if params is None or tracing(updates, state, params, extra_args):
            return eager()
        # the functions: ``value_fn`` and any other given as an extra argument (svrg's
        # ``full_value_fn``), each keyed by its program; strings and the like by value
        given = {k: x for k, x in extra_args.items() if _is_function(x)}
        if value_fn is not None:
            given["value_fn"] = value_fn
        static = {k: x for k, x in extra_args.items() if k not in given
                  and not all(isinstance(leaf, _ARRAY_LIKE) for leaf in jax.tree.leaves(x))}
        routed = {k: x for k, x in extra_args.items() if k not in static and k not in given}
        fns, programs = {}, {}
        for name, fn in given.items():
            if not callable(fn):
                return eager()  # (its message)
            keyed = keyed_function(fn, params, kw=kwargs_for(fn, routed))
            if keyed is None:
                return eager()
            fns[name], programs[name], ints = keyed
            static.update(ints)
        arrays = {k: x for k, x in routed.items() if k not in static}
        try:
            static = static_items(static)
            hash(static)
        except TypeError:  # an unhashable option: no caching, same result
            return eager()
        if jitted is None:
            jitted = jax.jit(run, static_argnames=("fns", "static"),
                             compiler_options=eager_options() or None)
        try:
            return jitted(tuple(sorted(fns.items())), static, updates, state, params, arrays,
                          programs)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                jax.errors.TracerIntegerConversionError, NotHoisted):
            return eager()  # a value used in Python by the loss or a link: as it was

    update.compiled_when_eager = True
    return update


# Python and NumPy numbers and arrays: traced by ``jax.jit``
_ARRAY_LIKE = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def _is_function(x) -> bool:
    """A plain function (no pytree with arrays inside, such as a `Partial`: traced)."""
    return callable(x) and jax.tree_util.treedef_is_leaf(jax.tree.structure(x))


def alias(
    name: str,
    parts: Sequence[Any],
    *,
    linesearch=None,
    has_aux: bool = False,
    options: tuple = (),
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
    * With a line search, a search that made no progress
      (`linesearch_stalled`) is reported as ``Status.STALLED`` in the
      ``status`` of the first link's ``info`` (when it has one); its step is
      withheld when it would not lower the loss (`withhold_if_worse`); and a step
      whose loss or gradient is not finite leaves the line search's state as
      it was (`keep_search_if_not_finite`).

    * Called eagerly, the whole step is one compiled program (`compiled_when_eager`)
      where the first part's ``update`` is (its options are no arrays) and no entry of
      ``options`` (the alias's own: its learning rate) is an array.

    The state is the chain's (a tuple, one entry per link).
    """
    links = list(parts)
    links.append(
        recompute_marker() if linesearch is None else linesearch_link(linesearch, has_aux)
    )
    inner = optax.chain(*links)

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        loss = bind_loss(name, value_fn, extra_args, has_aux=has_aux)
        params = require_params(name, params, updates)
        check_state(name, inner.init, state, params)
        if linesearch is not None and (
            extra_args.get("value") is None or extra_args.get("grad") is None
        ):
            value, grad = jax.value_and_grad(loss)(params)
            extra_args = {**extra_args, "value": value, "grad": grad}
        out, new_state = inner.update(updates, state, params, value_fn=value_fn, **extra_args)
        if linesearch is not None:
            value, grad = extra_args["value"], extra_args["grad"]
            stalled = linesearch_stalled(new_state[-1], value, grad, out)
            out, new_state = withhold_if_worse(out, new_state, stalled, value, grad)
            new_state = flag_stalled(new_state, stalled)
            new_state = keep_search_if_not_finite(new_state, state, value, grad)
        return skip_if_not_finite(out, new_state, state)

    if getattr(links[0].update, "compiled_when_eager", False):
        update_fn = compiled_when_eager(update_fn, options)
    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


_STATE_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_state(name: str, init, state, params) -> None:
    """Raise unless ``state`` is shaped as ``init(params)`` makes it (a state from ``init``
    of other parameters failed deep inside, naming internal arguments). The expected
    shapes are computed once per parameter signature (``jax.eval_shape``: no work),
    where ``init`` can run on abstract options."""
    sig = (jax.tree.structure(params),
           tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in jax.tree.leaves(params)))
    try:
        cache = _STATE_SHAPES.setdefault(init, {})
    except TypeError:  # not weak-referenceable: no cache
        cache = {}
    if sig not in cache:
        if len(cache) > 32:
            cache.clear()
        try:
            cache[sig] = jax.eval_shape(init, params)
        except (jax.errors.ConcretizationTypeError, TypeError):
            # an init that needs concrete options (`max_params` under
            # `optax.inject_hyperparams` is traced in update): nothing to compare with
            return
    _validate.same_structure(cache[sig], state, f"{name}.init(params)", "state",
                             what="Pass the state that `init` made for these `params`.")


def linesearch_stalled(ls_state, value, grad, step) -> jax.Array:
    """Whether an optax line search made no progress this step (traceable).

    True when the search reports a failure (``info.decrease_error`` positive or
    not finite: no step within its budget met its decrease condition), when its
    step is zero or not finite, or when it accepted a descent step (``step^T
    grad < 0``) whose loss ``ls_state.value`` is not below ``value`` (the
    condition held only through rounding: the loss's dtype cannot resolve the
    decrease). A zero step at a zero gradient is not a stall.

    Args:
      ls_state: the line search's state after its ``update`` (optax's
        backtracking and zoom states: ``learning_rate``, ``value``, ``info``).
      value: the loss at the incoming parameters.
      grad: the gradient there.
      step: the update the chain output (``new_params = params + step``).
    """
    stalled = jnp.asarray(False)
    err = getattr(getattr(ls_state, "info", None), "decrease_error", None)
    if err is not None:
        stalled = stalled | ~(jnp.asarray(err) <= 0)
    lr = getattr(ls_state, "learning_rate", None)
    if lr is not None:
        stalled = stalled | ~(jnp.asarray(lr) > 0)
    # a zero direction (any step length gives 0)
    stalled = stalled | ~jnp.any(jnp.stack([jnp.any(x != 0) for x in jax.tree.leaves(step)]))
    new_value = getattr(ls_state, "value", None)
    if new_value is not None and grad is not None:
        descent = _tree.vdot(step, grad) < 0
        stalled = stalled | (descent & ~(jnp.asarray(new_value) < jnp.asarray(value)))
    grad_zero = ~(_tree.norm(grad) > 0) if grad is not None else jnp.asarray(False)
    return stalled & ~grad_zero


def keep_search_if_not_finite(states: tuple, before: tuple, value, grad) -> tuple:
    """``states`` with the line search's state as it was ``before`` the step when the loss or
    gradient at the incoming parameters is not finite (traceable).

    The first link skips such a step; the line search would otherwise store what it made of
    a NaN loss (optax's zoom and backtracking keep a step size of 0, from which they start
    every later search: the optimiser never moves again). Kept, the next finite batch
    searches from the last good step size.
    """
    finite = jnp.isfinite(value) & _tree.all_finite(grad)
    return (*states[:-1], _tree.select_tree(finite, states[-1], before[-1]))


def skip_if_not_finite(out, states: tuple, before: tuple):
    """``(out, states)``, or zeros and the state ``before`` the step (its first link's
    ``info`` flagged ``NONFINITE``, ``skipped``) when ``out`` is not finite (traceable).

    The links guard their own inputs; a link after the direction (a learning-rate
    schedule that returns NaN, a line search) can still make the step non-finite.
    Skipped, the run goes on as if the step never came, and says so.
    """
    ok = _tree.all_finite(out)
    zero = _tree.zeros_like(out)
    kept = _tree.select_tree(ok, states, before)
    info = getattr(states[0], "info", None)  # this step's report, flagged below
    if info is not None and "status" in getattr(info, "_fields", ()):
        fix = {"status": jnp.where(ok, info.status, worst(info.status, Status.NONFINITE))}
        for name in ("finite", "converged", "accepted"):  # (a skipped step was not taken)
            if name in info._fields:
                fix[name] = jnp.asarray(getattr(info, name)) & ok
        if "skipped" in info._fields:
            fix["skipped"] = jnp.asarray(info.skipped) | ~ok
        kept = (kept[0]._replace(info=info._replace(**fix)), *kept[1:])
    return _tree.select_tree(ok, out, zero), kept


def withhold_if_worse(out, states: tuple, stalled, value, grad):
    """``(out, states)``, or a zero step when a stalled line search's step does not lower the
    loss (traceable).

    A search that found no step meeting its decrease condition within its budget still
    returns its last, smallest, step (optax's backtracking and zoom), and that step can
    raise the loss: Newton's step on ``sum(sqrt(1 + p^2))`` at ``p = 3000`` is ``2.7e10``
    long, and the default search's last try moved the loss from 3000 to 13380, then on
    from there. Withheld, the parameters stay where the loss was lowest; the search's
    state keeps its last step size (the next search starts by its own rule; curvlib's
    default continues from there a search that failed far above the loss's precision
    floor) and holds the loss and gradient at the unchanged parameters
    (``optax.value_and_grad_from_state`` reads them).
    """
    ls = states[-1]
    new_value = getattr(ls, "value", None)
    if new_value is None:  # a search that does not report its loss: its step as it is
        return out, states
    new_value, value = jnp.asarray(new_value), jnp.asarray(value)
    if jnp.finfo(new_value.dtype).bits < jnp.finfo(value.dtype).bits:
        # stored coarser than the loss (float16 parameters, a float32 loss): past its range
        # (65504), or rounded, it cannot tell a rise from a fall: the step as it is
        return out, states
    # (a non-finite step is `skip_if_not_finite`'s: skipped, the state before it kept)
    worse = stalled & _tree.all_finite(out) & ~(new_value < value)
    fix = {"value": jnp.where(worse, jnp.asarray(value, jnp.result_type(new_value)),
                              new_value)}
    if grad is not None and jax.tree.structure(getattr(ls, "grad", None)) == \
            jax.tree.structure(grad):
        fix["grad"] = jax.tree.map(lambda g, old: jnp.where(worse, g.astype(old.dtype), old),
                                   grad, ls.grad)
    out = _tree.select_tree(worse, _tree.zeros_like(out), out)
    return out, (*states[:-1], ls._replace(**fix))


def flag_stalled(states: tuple, stalled) -> tuple:
    """``states`` with ``Status.STALLED`` folded into the first link's ``info.status`` (and
    its ``converged``, which a stalled step is not)."""
    info = getattr(states[0], "info", None)
    if info is None or "status" not in getattr(info, "_fields", ()):
        return states
    code = jnp.where(stalled, Status.STALLED, Status.SUCCESS)
    info = info._replace(status=worst(info.status, code))
    if "converged" in info._fields:
        info = info._replace(converged=jnp.logical_and(info.converged, jnp.logical_not(stalled)))
    return (states[0]._replace(info=info), *states[1:])


def learning_rate_link(learning_rate, *, optional: bool = True) -> optax.GradientTransformation:
    """``scale(-1)`` for ``None`` (the full step), else ``scale_by_learning_rate``.

    A first-order alias (``optional=False``) has no full step: ``None`` is refused.
    """
    _validate.number(learning_rate, "learning_rate", optional=optional, schedule=True)
    if learning_rate is None:
        return optax.scale(-1.0)
    return optax.scale_by_learning_rate(learning_rate)


# -------------------------------------------------------------------- misc


def float_dtype(params: PyTree):
    return jnp.result_type(*[jnp.result_type(x) for x in jax.tree.leaves(params)])


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


