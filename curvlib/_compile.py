"""Compiled entry points: every public algorithm is jitted at its boundary.

A notebook calls ``curvlib.eigsh(matvec, v0, k=5)`` un-jitted, again and again,
with a *freshly built* matvec each time. Three things make the second call hit
the compile cache instead of recompiling:

1. **Static options are separated from traced operands** (`entry`): the
   public function validates its options eagerly and calls one module-level
   ``jax.jit`` with them as static arguments; arrays, tolerances and keys are
   traced arguments (changing them never recompiles).
2. **Operators are pytrees** (`as_operator`). curvlib's own operators are
   `jax.tree_util.Partial` objects whose function is cached, so a fresh
   product of the same kind and shapes has an *equal* tree definition. A plain
   function or closure (``lambda v: A @ v``) is traced once per call
   (``jax.make_jaxpr``, a few milliseconds for a small model) and turned into a
   pytree whose static part is the *program* it computes and whose leaves are
   the arrays it closes over: two lambdas that compute the same thing on
   different arrays share one compilation. A Python scalar closed over is baked
   into the program, so changing it does recompile.
3. **Under an outer transformation** (``jax.jit``, ``jax.vmap``, ``jax.grad`` of
   the user's own function) nothing of this is needed: the implementation is
   called directly and becomes part of the user's program.

[`enable_compilation_cache`][curvlib.enable_compilation_cache] additionally keeps compiled programs
on disk across Python sessions (JAX's persistent compilation cache).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.tree_util import Partial

PyTree = Any


# ------------------------------------------------------------------ operators


class _Program:
    """A traced function's program: hashable and comparable by what it computes.

    Called as ``program(*consts, v)``: ``consts`` are the arrays the original
    function closed over (the leaves of the `Partial` that holds this
    program), ``v`` the vector.
    """

    def __init__(self, jaxpr, num_consts: int, in_tree, out_tree, key):
        self.jaxpr = jaxpr
        self.num_consts = num_consts
        self.in_tree = in_tree
        self.out_tree = out_tree
        self.key = key
        self._hash = hash(key)

    def __call__(self, *args):
        consts, v = args[: self.num_consts], args[self.num_consts]
        leaves = self.in_tree.flatten_up_to(v)
        out = jax.core.eval_jaxpr(self.jaxpr, list(consts), *leaves)
        return jax.tree.unflatten(self.out_tree, out)

    def __eq__(self, other):
        return isinstance(other, _Program) and self.key == other.key

    def __hash__(self):
        return self._hash

    def __repr__(self):
        return f"<curvlib operator program, {len(self.jaxpr.eqns)} equations>"


def is_pytree_operator(fn) -> bool:
    """Whether ``fn`` is already a pytree with array leaves (e.g. a `Partial`)."""
    treedef = jax.tree.structure(fn)
    return not jax.tree_util.treedef_is_leaf(treedef)


def as_operator(fn: Callable | None, example: PyTree, name: str = "matvec",
                example_name: str = "v0"):
    """``fn`` as a pytree whose static part identifies its program (see module docs).

    A `Partial` (or any pytree-registered callable) is
    returned unchanged. A plain callable is traced on ``example`` and becomes
    ``Partial(program, *closed_over_arrays)``; its output must have
    ``example``'s structure and leaf shapes (checked here, once).

    Raises:
      TypeError: if ``fn`` is not callable.
      ValueError: if ``fn(example)`` is not shaped like ``example``.
    """
    if fn is None:
        return None
    if not callable(fn):
        raise TypeError(f"`{name}` must be a callable v -> A v; got {type(fn).__name__}.")
    if is_pytree_operator(fn):
        return fn
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(example)
    check_shaped_like(example, out_shape, name, example_name)
    in_tree = jax.tree.structure(example)
    out_tree = jax.tree.structure(out_shape)
    key = (str(closed.jaxpr), in_tree, out_tree)
    program = _Program(closed.jaxpr, len(closed.consts), in_tree, out_tree, key)
    return Partial(program, *closed.consts)


def check_shaped_like(example: PyTree, out: PyTree, name: str, example_name: str = "v0") -> None:
    """Raise ``ValueError`` unless ``out`` (shapes) has ``example``'s structure and leaf shapes."""
    te, to = jax.tree.structure(example), jax.tree.structure(out)
    call = f"{name}({example_name})"
    if te != to:
        raise ValueError(
            f"`{call}` must have the pytree structure of `{example_name}`: `{example_name}` has "
            f"{te} but `{call}` has {to}."
        )
    paths = jax.tree_util.tree_leaves_with_path(example)
    for (path, x), y in zip(paths, jax.tree.leaves(out), strict=True):
        if tuple(jax.numpy.shape(x)) != tuple(y.shape):
            where = jax.tree_util.keystr(path) or " (the root)"
            raise ValueError(
                f"`{call}` must have the leaf shapes of `{example_name}`: at {example_name}{where} "
                f"the shape is {tuple(jax.numpy.shape(x))} but {call}{where} has "
                f"{tuple(y.shape)}."
            )


_CHECKED: dict = {}  # operator/vector signatures whose shape check passed (bounded)


def check_operator(op, example: PyTree, name: str = "matvec", example_name: str = "v0") -> None:
    """Check ``op(example)`` has ``example``'s shapes; traced once per operator signature.

    Plain callables are traced every time (their closure may have changed);
    pytree operators are traced once per (structure, leaf shapes and dtypes)
    of operator and vector.
    """
    if op is None:
        return
    if not is_pytree_operator(op):
        check_shaped_like(example, jax.eval_shape(op, example), name, example_name)
        return
    try:
        sig = (jax.tree.structure(op), _avals(op), jax.tree.structure(example), _avals(example),
               name)
        hash(sig)
    except TypeError:  # unhashable static parts: check every time
        check_shaped_like(example, jax.eval_shape(op, example), name, example_name)
        return
    if sig in _CHECKED:
        return
    check_shaped_like(example, jax.eval_shape(op, example), name, example_name)
    if len(_CHECKED) >= 512:
        _CHECKED.clear()
    _CHECKED[sig] = True


def _avals(tree) -> tuple:
    return tuple(
        (tuple(jax.numpy.shape(x)), str(jax.numpy.result_type(x)))
        for x in jax.tree.leaves(tree)
    )


# ------------------------------------------------------------------ entries


def is_traced(*trees) -> bool:
    """Whether any leaf of ``trees`` is a tracer (we are inside the user's transformation)."""
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def entry(*, static: Sequence[str] = (), operators: Mapping[str, str] | None = None):
    """Decorate an implementation ``impl(**kwargs)`` as a compiled, cached entry point.

    The returned function binds its arguments to ``impl``'s signature; if any
    traced argument holds a tracer it calls ``impl`` directly (the user's own
    ``jit``/``vmap``/``grad`` compiles it); otherwise it converts the operator
    arguments with `as_operator` (``operators`` maps an operator argument
    to the argument it acts on) and calls ``jax.jit(impl, static_argnames=static)``.
    Validation of the options is the caller's job (it happens before, eagerly).
    """
    operators = dict(operators or {})
    static = tuple(static)

    def deco(impl):
        sig = inspect.signature(impl)
        jitted = jax.jit(impl, static_argnames=static)

        @functools.wraps(impl)
        def call(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            dynamic = [v for n, v in a.items() if n not in static and n not in operators]
            ops = [a[n] for n in operators]
            if is_traced(dynamic) or any(
                o is not None and is_pytree_operator(o) and is_traced(o) for o in ops
            ):
                return impl(**a)
            for op_name, ex_name in operators.items():
                a[op_name] = as_operator(a[op_name], a[ex_name], op_name, ex_name)
            return jitted(**a)

        call.impl = impl
        call.jitted = jitted
        return call

    return deco


# ----------------------------------------------------------- persistent cache


def enable_compilation_cache(path: str | os.PathLike | None = None, *,
                             min_compile_time_secs: float = 0.5) -> str:
    """Keep compiled XLA programs on disk, so a new Python session skips their compile.

    Turns on JAX's persistent compilation cache (``jax_compilation_cache_dir``)
    for every program, curvlib's and the user's, that takes at least
    ``min_compile_time_secs`` to compile. Call it once at the top of a notebook
    or script, before the first computation. The cache is keyed by the program,
    the JAX version and the device, so it is safe to share between runs; delete
    the directory to clear it.

    Args:
      path: cache directory; default ``$CURVLIB_CACHE_DIR`` or
        ``~/.cache/curvlib/jax``.
      min_compile_time_secs: programs compiling faster than this are not stored.

    Returns:
      The cache directory used.

    Examples:
      >>> import tempfile, curvlib
      >>> d = curvlib.enable_compilation_cache(tempfile.mkdtemp())  # doctest: +SKIP
    """
    if path is None:
        path = os.environ.get("CURVLIB_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "curvlib", "jax"
        )
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def function(*, static: Sequence[str] = (), operators: Mapping[str, str] | None = None,
             precheck: Callable | None = None):
    """Decorate a *public* function so that its eager calls are compiled once and cached.

    Like `entry`, but the whole function (its shape and option checks
    included) runs under ``jax.jit``: checks that depend only on static options
    and shapes then run once per compilation. Checks of concrete *values* that
    stay traced inside (a negative ``damping``, say) go in ``precheck``, which
    is called eagerly with the bound arguments on every call.
    """
    operators = dict(operators or {})
    static = tuple(static)

    def deco(public):
        sig = inspect.signature(public)
        jitted = jax.jit(public, static_argnames=static)

        @functools.wraps(public)
        def call(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = dict(bound.arguments)
            if precheck is not None:
                precheck(**a)
            dynamic = [v for n, v in a.items() if n not in static and n not in operators]
            ops = [a[n] for n in operators]
            if is_traced(dynamic) or any(
                o is not None and is_pytree_operator(o) and is_traced(o) for o in ops
            ) or any(getattr(o, "host_driven", False) for o in ops):
                return public(**a)
            for op_name, ex_name in operators.items():
                a[op_name] = as_operator(a[op_name], a[ex_name], op_name, ex_name)
            try:
                hash(tuple(a[n] for n in static))
            except TypeError:  # an unhashable static option: no caching, same result
                return public(**a)
            return jitted(**a)

        call.uncached = public
        call.jitted = jitted
        return call

    return deco
