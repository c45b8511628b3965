"""Machinery shared by every operator: tangent checks that name pytree paths, products, layouts.

Nothing here is public; the operator modules build on it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial, keystr

from curvlib import _tree, _validate
from curvlib._compile import (
    bound,
    eager_jit,
    keyed_function,
    quick_jit,
    run_program,
    stable_linearized,
    traced_program,
    tracing,
    weak_cache,
)

PyTree = Any


@weak_cache
def value_only(fun: Callable) -> Callable:
    """``fun`` without its auxiliary output: ``(*a) -> fun(*a)[0]`` (cached per ``fun``)."""

    def f(*args):
        return fun(*args)[0]

    return f


def drop_aux(fun: Callable, has_aux: bool) -> Callable:
    return value_only(fun) if has_aux else fun


# ----------------------------------------------------------- linearisation


def linearize(fn: Callable, params: PyTree, args: tuple, *, gradient: bool = False):
    """``(out, lin)`` of ``jax.linearize(p -> fn(p, *args), params)`` (of ``p -> grad fn(p,
    *args)`` with ``gradient``), ``lin`` keyed by the program it replays (`stable_linearized`).

    An eager build linearised op by op: every primitive of the model (and of its gradient)
    ran as its own program, each compiled on its first use: 1.8 s before a small MLP's
    operator existed and 9.4 s for a 120k-parameter transformer (38 ms and 0.63 s for each
    later build). Here it is one program per function program and shapes, compiled with
    less backend optimisation (it runs once per build: `curvlib._compile.quick_jit`), the
    batch its input: 0.39 s and 1.8 s first, 3 ms and 0.11 s later. A function closing over
    arrays (``lambda p: loss(p, x, y)``, a new function over each batch) is traced to its
    program with those arrays as inputs (`curvlib._compile.keyed_function`): the next
    closure over the next batch compiles nothing. A function that cannot be keyed,
    arguments that are not arrays (a number a model may use in Python), a custom derivative
    rule in a closure, or a call under a trace (the user's program holds the linearisation)
    linearise as before.
    """
    keyed = keyed_when_eager(fn, params, args)
    if keyed is not None:
        return _compiled_linearize(keyed[0], gradient, params, tuple(args), keyed[1])
    return _linearize(fn, gradient, params, tuple(args))


def keyed_when_eager(fn: Callable, params: PyTree, args: tuple):
    """``(keyed, program)`` of ``fn`` (`curvlib._compile.keyed_function`) for a compiled
    eager evaluation at ``(params, *args)``: call ``bound(keyed, program)`` inside the
    compiled function, ``program`` one of its arguments. ``None`` under a trace, for
    arguments that are not arrays (a number a model may use in Python), and for a function
    that cannot be keyed."""
    if tracing(params, args) or not all(
            isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in jax.tree.leaves(args)):
        return None
    keyed = keyed_function(fn, params, tuple(args))
    return None if keyed is None else keyed[:2]


def _linearize(fn, gradient, params, args, program=None):
    fn = bound(fn, program)
    f = (lambda p: jax.grad(fn)(p, *args)) if gradient else (lambda p: fn(p, *args))
    out, lin = jax.linearize(f, params)
    return out, stable_linearized(lin)


_compiled_linearize = quick_jit(_linearize, static_argnames=("fn", "gradient"))


# ----------------------------------------------------------------- blocks


def _static_bool(x, where: str, name: str) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, str):  # a leaf's name is not a selection: it selected everything
        raise ValueError(
            f"`{name}{where}` must be a Python bool or a predicate; got the string {x!r}. To "
            f"select leaves by name pass `lambda path, leaf: {x!r} in "
            "jax.tree_util.keystr(path)`."
        )
    if (isinstance(x, jax.core.Tracer) or jnp.shape(x) != ()
            or jnp.result_type(x) not in (jnp.bool_, np.bool_)):
        raise ValueError(
            f"`{name}{where}` must be a Python bool (a static choice of leaves); got {x!r}."
        )
    return bool(x)


def prefix_mismatch(prefix: PyTree, params: PyTree, name: str, none_is_leaf: bool) -> str:
    """Why ``prefix`` is not a prefix of ``params``, by key path, ending in ``"; "`` (``""``
    when no path differs: the containers' types do). ``none_is_leaf``: a ``None`` in
    ``prefix`` covers a subtree (a block label), else it is an empty subtree (a mask)."""
    is_leaf = (lambda x: x is None) if none_is_leaf else None
    pre = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(prefix, is_leaf=is_leaf)[0]]
    full = [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    extra = [keystr(p) for p in pre if not any(q[:len(p)] == p for q in full)]
    missing = [keystr(q) for q in full if not any(q[:len(p)] == p for p in pre)]
    said = []
    if extra:
        said.append(f"`{name}` has {', '.join(extra)}, which `params` does not")
    if missing:
        said.append(f"`{name}` says nothing of {', '.join(missing)} of `params`")
    return "".join(f"{x}; " for x in said)


def leaf_mask(params: PyTree, where, name: str = "where") -> tuple[bool, ...]:
    """One bool per leaf of ``params``: is it selected by ``where``?

    ``where`` is a predicate ``where(path, leaf) -> bool`` on key paths (as in
    ``jax.tree_util.tree_map_with_path``) or a pytree of bools with the
    structure of ``params`` or a prefix of it (a bool for a whole subtree).
    ``name`` is the argument's name in the error messages.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    if callable(where):
        return tuple(_static_bool(where(path, x), f"({keystr(path)})", name)
                     for path, x in flat)
    try:
        full = jax.tree.map(lambda w, sub: jax.tree.map(lambda _: w, sub), where, params)
    except (ValueError, TypeError):
        raise ValueError(
            f"`{name}` must be a predicate `{name}(path, leaf) -> bool` or a pytree of bools "
            "with the structure of `params` (or a prefix of it); "
            f"{prefix_mismatch(where, params, name, none_is_leaf=False)}got structure "
            f"{jax.tree.structure(where)} for params {jax.tree.structure(params)}."
        ) from None
    fflat, _ = jax.tree_util.tree_flatten_with_path(full)
    return tuple(_static_bool(w, keystr(path), name) for path, w in fflat)


def sub_tree(treedef, leaves, mask):
    """The leaves where ``mask`` holds, ``None`` elsewhere, in the structure ``treedef``."""
    return jax.tree.unflatten(treedef, [x if m else None for x, m in zip(leaves, mask,
                                                                             strict=True)])


# --------------------------------------------------------- tangent checks


# the end of the message for a model output that is not floating (an argmax, a mask)
OUTPUT_ADVICE = ("Derivatives are taken through every output of `model_fn`: return the "
                 "non-floating ones as `aux` (`has_aux=True`) or leave them out.")


def signature(tree: PyTree):
    """Hashable (structure, leaf paths, leaf shapes, explicit specs) of ``tree``."""
    leaves = _tree.leaves_with_paths(tree)
    return (
        jax.tree.structure(tree),
        tuple(p for p, _ in leaves),
        tuple(tuple(jnp.shape(x)) for _, x in leaves),
        tuple(_tree.explicit_spec(x) for _, x in leaves),
    )


@weak_cache
def checked(product: Callable, sig, like: str = "params", name: str = "tangent") -> Callable:
    """``product(*data, v)`` that first checks ``v`` against the signature ``sig``.

    Cached so that the same product and signature give the *same* function object:
    a `Partial` built on it has an equal tree definition
    across calls, and jitted code taking it as an argument is not recompiled.
    The check is static (structure and shapes), so it costs nothing under jit
    and sees per-example shapes under ``vmap``. Where the reference carries an
    explicit sharding type (a mesh with ``AxisType.Explicit`` axes), the vector
    must carry the same one: JAX's differentiation rejects a tangent typed
    otherwise, and the error here names the leaf and both types.
    """

    def matvec(*args):
        *data, v = args
        _validate.tangent(v, sig, like, name)
        return product(*data, v)

    return matvec


def cast_like(v: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda x, p: jnp.asarray(x).astype(jnp.result_type(p)), v, like)


# ------------------------------------------------------------ linearisation


@functools.cache
def call_linearized(dtypes: tuple) -> Callable:
    """``(lin, v) -> lin(v)`` with ``v``'s leaves cast to ``dtypes`` (the primal's, in leaf
    order), as the other products cast their tangents: a linearised function refuses a
    tangent of another dtype. One function per ``dtypes`` (a stable `Partial` definition)."""
    def call(lin, v):
        leaves, tree = jax.tree.flatten(v)
        return apply_linear(lin, jax.tree.unflatten(
            tree, [jnp.asarray(x).astype(d) for x, d in zip(leaves, dtypes, strict=True)]))

    return call


def apply_linear(lin, v: PyTree) -> PyTree:
    """``lin(v)``; an eager call of a linearisation (`stable_linearized`) runs as one program
    per linearised program and shapes (`run_program`): replayed op by op, every primitive of
    the tangent pass compiled on its first use (29 programs, 1 s, before a small MLP's first
    eager product ``H v`` returned)."""
    if isinstance(lin, Partial) and not tracing(lin, v):
        return run_program(lin, v)
    return lin(v)


def transpose(lin, like: PyTree, cotangent: PyTree) -> PyTree:
    """``J^T u`` for the linear function ``lin`` (``v -> J v`` on vectors shaped like ``like``);
    eagerly one program per linearised program and shapes, as `apply_linear`."""
    if isinstance(lin, Partial) and not tracing(lin, like, cotangent):
        return _compiled_transpose(lin, like, cotangent)
    (out,) = jax.linear_transpose(lin, like)(cotangent)
    return out


@eager_jit
def _compiled_transpose(lin, like, cotangent):
    return transpose(lin, like, cotangent)


# ---------------------------------------------------------------- sharding


@weak_cache
def sharded(product, layout):
    """``product`` with its output constrained to ``layout`` (``_tree.param_shardings``)."""
    if layout is None:
        return product

    def matvec(*args):
        out, treedef = jax.tree.flatten(product(*args))
        return jax.tree.unflatten(
            treedef,
            [jax.lax.with_sharding_constraint(o, s) for o, s in zip(out, layout, strict=True)],
        )

    return matvec


def params_operator(product: Callable, params: PyTree, *data) -> Partial:
    """``Partial(product, *data)`` checked against ``params`` and constrained to their layout."""
    fn = checked(sharded(product, _tree.param_shardings(params)), signature(params))
    return Partial(fn, *data)


def program_operator(product: Callable, params: PyTree, *data) -> Partial:
    """`params_operator`, keyed by the program ``v -> product(*data, v)`` computes.

    ``product`` closes over the user's functions (a loss, a model), so an
    operator built on it is identified by those function objects: a new closure
    each step (``lambda p: loss(p, batch)``) compiled every algorithm that took
    the operator again, and JAX's caches kept each closure's arrays. Traced once
    here (eager calls only: under the user's transformation the product is part
    of the user's program), the operator's static part is its program and every
    array it uses (``data``, the closures' arrays) is a leaf, so equal programs
    share their compilations. Cost: one trace of the product (no compile).
    """
    if tracing(params, data):
        return params_operator(product, params, *data)
    # numbers given as arguments (a temperature, a weight) stay inputs, as they were leaves of
    # the operator before: traced as constants they would be written into the program, and a
    # new value each step would compile it again
    data = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, _NUMBERS) else x, data)
    program = traced_program(lambda v: product(*data, v), params)
    dtypes = tuple(jnp.result_type(x) for x in jax.tree.leaves(params))
    return params_operator(_call_program(dtypes), params, program)


# (not ints or bools: a loss may use them in Python, as a class count or a training flag)
_NUMBERS = (float, complex, np.floating, np.complexfloating)


@functools.cache
def _call_program(dtypes: tuple) -> Callable:
    """``(program, v) -> program(v)``, compiled once per program and shapes (an eager call
    too: the program's steps evaluated one by one compiled its loops again for every trace),
    with ``v``'s leaves cast to ``dtypes`` as `call_linearized` casts them."""
    call = call_linearized(dtypes)
    return lambda program, v: run_program(program, call(lambda x: x, v))
