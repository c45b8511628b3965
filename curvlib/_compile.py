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

import atexit
import collections
import concurrent.futures
import contextlib
import functools
import gc
import hashlib
import inspect
import math
import os
import queue
import tempfile
import threading
import time
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.extend.core
import jax.numpy  # noqa: F401  (`tracing`)
import numpy as np
from jax.tree_util import Partial

from curvlib import _progress, _tree, _validate

PyTree = Any


# ------------------------------------------------------------ weak caching


_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def _read(x, path: tuple, depth: int, out: list) -> None:
    """Append ``(path, key)`` for ``x`` and what it holds (`environment`): Python scalars by
    value; at ``depth`` > 0 a dict, list or tuple of at most 64 entries by its entries and
    an object by its attributes (each at ``depth - 1``), a function by what *it* reads;
    anything else (and the container itself) by identity."""
    if isinstance(x, _SCALARS):
        out.append((path, (type(x).__name__, x)))
        return
    if isinstance(x, functools.partial) or inspect.ismethod(x) or inspect.isfunction(x):
        base = x
        while isinstance(base, functools.partial):
            base = base.func
        out.append((path, ("fn", (id(base.__self__), id(base.__func__))
                           if inspect.ismethod(base) else id(base))))
        if depth > 0:
            _reads(x, path, depth - 1, out)
        return
    out.append((path, ("id", id(x))))
    if depth <= 0:
        return
    if isinstance(x, dict | list | tuple):
        items = x.items() if isinstance(x, dict) else tuple(enumerate(x[:65]))
    elif not isinstance(x, type | types.ModuleType) and isinstance(
            getattr(x, "__dict__", None), dict):
        items = vars(x).items()  # an object's attributes (``model.cfg.scale``)
    else:
        return
    if len(items) > 64:
        return
    try:
        for k, v in list(items):
            _read(v, (*path, k if isinstance(k, _SCALARS) else id(k)), depth - 1, out)
    except RuntimeError:  # changed while read (another thread): by identity only
        pass


def _code_names(code) -> tuple:
    """The global names ``code`` and the functions defined in it read."""
    names = list(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            names += _code_names(c)
    return tuple(names)


def _reads(fn, path: tuple, depth: int, out: list) -> None:
    while isinstance(fn, functools.partial):
        for i, a in enumerate((*fn.args, *fn.keywords.values())):
            _read(a, (*path, "partial", i), depth, out)
        fn = fn.func
        path = (*path, "func")
    if inspect.ismethod(fn):
        _read(fn.__self__, (*path, "self"), depth, out)  # its instance's attributes
        fn = fn.__func__
    elif not inspect.isfunction(fn) and not isinstance(fn, type):
        _read(fn, (*path, "self"), depth, out)  # a callable object: its attributes
        fn = vars(type(fn)).get("__call__") or type(fn).__call__
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    env = getattr(fn, "__globals__", {})
    for n in _code_names(code):
        if n in env:
            _read(env[n], (*path, "global", n), depth, out)
    for i, cell in enumerate(getattr(fn, "__closure__", None) or ()):
        try:
            _read(cell.cell_contents, (*path, "cell", i), depth, out)
        except ValueError:  # an empty cell
            pass


def environment(fn, depth: int = 2) -> dict:
    """What ``fn`` reads that can change while ``fn`` stays the same object: ``{path: key}``.

    The globals its code names, the variables it closes over, the arguments a
    ``functools.partial`` holds, and for a bound method (or a callable object) its
    instance's attributes (``model.loss`` reading ``self.scale``): Python numbers and
    strings by value, dicts, lists, tuples and objects by their entries and attributes
    (``cfg["scale"]``, ``model.cfg.scale``: ``depth`` levels), a function by what it reads
    in turn (a wrapper closing over the user's function), every other object by identity (a
    helper redefined in a notebook is a new object). `same_function` keys on it as well, so
    a changed attribute or global gives a new program, not the old one's numbers (for the
    bound method ``jax.jit`` too traces again, each ``model.loss`` being a new object; for
    the global curvlib is stricter than ``jax.jit``). Values read deeper are not seen.
    Cost: microseconds.
    """
    out: list = []
    _reads(fn, (), depth, out)
    return dict(out)


def changed_reads(env: dict, old: dict, ignored: frozenset = frozenset()) -> set:
    """Where ``env`` differs from ``old`` (two `environment` s), but for ``ignored``: a path
    whose key changed, or the container of an entry added or removed (a list appended to)."""
    out = set()
    for p in env.keys() | old.keys():
        if any(p[:i] in ignored for i in range(len(p) + 1)) or env.get(p) == old.get(p):
            continue
        out.add(p if p in env and p in old else p[:-1])
    return out


def weak_cache(factory: Callable) -> Callable:
    """Memoise ``factory(fn, *rest)`` without keeping ``fn`` (a user callable) alive.

    The product builders return closures over a user function; caching them
    makes equal calls return the *same* object, so a
    `Partial` built on it has an equal tree definition and
    jitted code taking it is not recompiled. ``functools.lru_cache`` would hold
    every user function (and the arrays its closure captures) until evicted.
    Here the entries are keyed *weakly* by ``fn`` and hold the results weakly
    too (a result closes over ``fn``, so a strong value would keep its own key
    alive): an entry lives exactly as long as something else (a matvec in use,
    a jit cache holding its tree definition) uses the result. ``fn`` that cannot
    be weakly referenced or hashed, unhashable ``rest`` and results that cannot
    be weakly referenced are simply not cached.
    """
    cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @functools.wraps(factory)
    def cached(fn, *rest):
        try:
            entries = cache.get(fn)
            if entries is None:
                entries = cache[fn] = weakref.WeakValueDictionary()
            out = entries.get(rest)
        except TypeError:  # unhashable, or not weakly referenceable
            return factory(fn, *rest)
        if out is None:
            out = factory(fn, *rest)
            try:
                entries[rest] = out
            except TypeError:  # a result that cannot be weakly referenced
                pass
        return out

    return cached


# ------------------------------------------------------ operator properties


def is_host_driven(matvec) -> bool:
    """Whether ``matvec`` is a *host-driven* operator: the one operator property curvlib reads.

    An operator declares it with a class attribute ``host_driven = True``
    ([`curvlib.StreamMatvec`][curvlib.StreamMatvec], a restriction of one, an inverse of one):
    each product runs Python on the host (it streams batches), so the
    operator cannot be traced, jitted or differentiated, and an algorithm on
    it runs its loop on the host, one compiled step per product. Every other
    callable (a function, a `Partial`) is traceable.
    Every layer asks this function, never the attribute itself.
    """
    return bool(getattr(matvec, "host_driven", False))


# ---------------------------------------------------- stable linearisations


class _Keyed:
    """Equal to another of its class with the same ``key`` (hashed once, in ``_hash``)."""

    __slots__ = ()

    def __eq__(self, other):
        return type(other) is type(self) and self.key == other.key

    def __hash__(self):
        return self._hash


class SameFunction(_Keyed):
    """A user function passed as a static argument, equal to another computing the same thing.

    ``jax.jit`` keys a static function by its identity: a fresh closure each call
    (``lambda p, b: loss(p, b, lam)`` in a loop) compiles every program it enters
    again, and JAX's caches keep each one. `same_function` keys it instead by the
    program it traces to at the shapes it is evaluated at (and, where it calls a
    custom derivative rule, which prints as a name only, by the program of its value,
    gradient and Hessian product), with every constant it closes over: Python
    numbers, small arrays and NumPy arrays (which can change in place) by value,
    large JAX arrays by identity (a closure over a new one is still a new
    function). A linearisation's replay function is keyed
    the same way by its printed program (`stable_linearized`). Two equal ones compute
    the same thing, so either may stand for the other in a compiled program.
    """

    __slots__ = ("fn", "key", "_hash", "_arrays", "static_names", "__weakref__")

    def __init__(self, fn: Callable, key, arrays: Sequence = (), static_names: tuple = ()):
        self.fn = fn
        self.key = key
        self._hash = hash(key)
        self._arrays = tuple(arrays)  # (NumPy array it closes over, its key part)
        self.static_names = static_names  # keywords keyed by value, taken as given

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def closes_over_arrays(self) -> bool:
        """Whether ``fn`` closes over an array of more than one entry (a batch, held by its
        value or, when large, by identity) or calls a host function: a closure over a new
        batch each step is then a new function each step."""
        return any(k[3] or any(_is_array_key(c) for c in k[2]) for k in self.key)

    def changed(self) -> bool:
        """Whether a NumPy array ``fn`` closes over was changed in place since it was keyed
        (its ``key`` then says another program): a program traced later than the key was
        taken (a compile behind) is checked with it. Cost: hashing those arrays."""
        return any(_const_key(c) != k for c, k in self._arrays)

    @property
    def __wrapped__(self):  # ``inspect.signature`` reads the function's own signature (optax
        return self.fn  # routes extra arguments to a ``value_fn`` by its parameter names)

    def __repr__(self):
        return f"<curvlib function {getattr(self.fn, '__name__', type(self.fn).__name__)}>"


def stable_linearized(lin):
    """A ``jax.linearize`` result whose static part compares by the program it replays.

    ``jax.linearize`` returns a `Partial` whose residuals are leaves but whose
    function (holding the tangent jaxpr) is a fresh object on every call, so two
    linearisations at different points would make a jitted consumer recompile.
    Keyed by the printed program instead (a `SameFunction`), every product with the
    same model and shapes shares one compilation. A NumPy array the model closes over
    is a residual held by reference: it is copied here (`held`), so the operator is the
    linearisation at the point it was taken even if that array changes in place later.
    """
    if isinstance(lin, Partial):
        return Partial(SameFunction(lin.func, repr(lin.func)), *held(lin.args),
                       **held(lin.keywords))
    return lin


def held(tree):
    """``tree`` with its NumPy arrays copied to JAX arrays: an operator holds its values as
    they were when it was built (a NumPy array can change in place). The copy is the
    transfer each product made before, made once, and lives as long as the operator (one
    copy per operator: a large NumPy data set is better given as one JAX array)."""
    return jax.tree.map(lambda x: jax.numpy.asarray(x) if isinstance(x, np.ndarray) else x,
                        tree)


# `same_function`'s keys per function (weakly: a function the user dropped is not kept; a key
# holds the function's constants, never the function) and example shapes
_SAME: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def same_function(fn: Callable, *example, also: tuple = (), **kw_example) -> Callable:
    """``fn`` as a `SameFunction` keyed by its program on ``example`` and ``kw_example``
    (arrays or ``jax.ShapeDtypeStruct`` s: the arguments it is evaluated on, by shape) and
    on each argument tuple of ``also`` (every other shape it is evaluated at: a function
    may branch on a shape in Python); ``fn`` unchanged inside a trace (the user's program
    holds it) or when it cannot be keyed.

    Strings among the keywords are passed as given; ints and bools (Python or NumPy) are
    traced, as ``jax.jit`` traces them (a step counter compiles nothing new), and passed as
    given only where ``fn`` cannot trace them (a class count, a flag it branches on): the
    result's ``static_names`` says which, keyed by value.

    Cost: one trace per function and shapes, remembered as ``jax.jit`` remembers a
    function's trace, with the NumPy arrays it closes over hashed again at each call (they
    can change in place)."""
    if isinstance(fn, SameFunction) or tracing(example, kw_example, also):
        return fn
    strings = {k: x for k, x in kw_example.items() if isinstance(x, str)}
    traced = {k: x for k, x in kw_example.items() if k not in strings}
    shapes = (jax.tree.structure((example, traced, also)), _tree.avals((example, traced, also)),
              static_items(strings))
    env = environment(fn)
    try:
        memo = _SAME.get(fn, {}).get(shapes)
    except TypeError:  # not weakly referenceable, or unhashable
        memo = None
    changed = set() if memo is None else changed_reads(env, memo[2], memo[3])
    if memo is not None and not changed and not any(_const_key(c) != k for c, k in memo[1]):
        key, static, arrays = memo[0], strings, memo[1]
    else:
        static = strings
        key, arrays = _keys(fn, (example, *also), traced, static)
        ints = {k: x for k, x in traced.items() if _tree.is_static_scalar(x)}
        if key is None and ints:  # ints the function uses in Python: passed as given
            static = {**strings, **ints}
            traced = {k: x for k, x in traced.items() if k not in ints}
            key, arrays = _keys(fn, (example, *also), traced, static)
        if key is None:
            return fn
        arrays = [(c, _const_key(c)) for c in arrays]
        try:  # (not a key holding host functions: one of them may hold ``fn``, its own key;
            # nor one of ints by value, whose memo would need their values)
            if static is strings and not any(k[3] for k in key):
                # What ``fn`` reads, as it is after the traces. What changed while it was
                # traced (a loss counting its own traces, a list it appends to) is not
                # compared again, nor a changed value that left the program as it was.
                after = environment(fn)
                ignored = (frozenset() if memo is None else memo[3]) | changed_reads(after, env)
                if memo is not None and memo[0] == key:
                    ignored = ignored | changed
                _SAME.setdefault(fn, {})[shapes] = (key, arrays, after, frozenset(ignored))
        except TypeError:
            pass
    return SameFunction(fn, key, arrays, tuple(static))


def static_items(values: dict) -> tuple:
    """``values`` as a hashable key, ``(name, type, value)`` sorted by name: ``True`` and
    ``1`` are told apart."""
    return tuple(sorted((k, type(x).__name__, x) for k, x in values.items()))


def _keys(fn: Callable, examples: tuple, kw: dict, static: dict):
    """`_program_key` on each argument tuple of ``examples``: ``(key, numpy_constants)``,
    ``(None, ())`` where one cannot be keyed."""
    keys, arrays = [], []
    for ex in examples:
        key, consts = _program_key(fn, ex, kw, static)
        if key is None:
            return None, ()
        keys.append(key)
        arrays += [c for c in consts if isinstance(c, np.ndarray)]
    return tuple(keys), arrays


def _program_key(fn: Callable, example: tuple, kw_example: dict, static: dict):
    """What ``fn`` computes on ``example`` and ``kw_example`` (``static`` passed as given):
    ``(key, constants)``, its program's text and constants; ``(None, ())`` where it cannot
    be keyed."""
    fn = functools.partial(fn, **static) if static else fn
    try:
        closed = jax.make_jaxpr(lambda *a, **k: fn(*a, **k))(*example, **kw_example)
        texts = (str(closed.jaxpr),)
        if _custom_rules(closed.jaxpr):
            # a custom derivative rule prints as its name only: what it closes over (a
            # gradient-reversal scale) is keyed through the program of the value, the
            # gradient and the Hessian product, where the rules are traced out
            closed = jax.make_jaxpr(_second_order(fn))(*example, **kw_example)
            texts += (str(closed.jaxpr),)
        consts = tuple(_const_key(c) for c in closed.consts)
        # (the host functions it calls at [3]: `same_function` does not remember those)
        key = (texts, jax.tree.structure((example, kw_example)), consts,
               _unprinted(closed.jaxpr), static_items(static))
        hash(key)
    except Exception:  # noqa: BLE001  (the caller's own evaluation reports a failing function)
        return None, ()
    return key, (*closed.consts, *_nested_consts(closed.jaxpr))


def _const_key(c):
    """A closed-over array in a key: small ones and NumPy arrays (mutable in place: their
    identity does not fix their values) by value, large JAX arrays by identity."""
    if isinstance(c, np.ndarray):
        a = np.ascontiguousarray(c)
        if a.size > _BY_VALUE:
            return a.shape, str(a.dtype), hashlib.blake2b(a.view(np.uint8)).digest()
        return a.shape, str(a.dtype), a.tobytes()
    if getattr(c, "size", _BY_VALUE + 1) > _BY_VALUE:
        return _Same(c)
    key = _value_key(c)
    return _Same(c) if key is None else key


_RULES = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin")


def _is_array_key(c) -> bool:
    """Whether a constant's key (`_const_key`) is that of an array of more than one entry."""
    return isinstance(c, _Same) or math.prod(c[0]) > 1


def _custom_rules(jaxpr) -> bool:
    """Whether ``jaxpr`` (at any depth) calls a function with a custom derivative rule."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _RULES:
            return True
        if any(_custom_rules(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params)):
            return True
    return False


def _second_order(fn: Callable) -> Callable:
    """``(x, *rest) -> (fn, grad fn, (grad fn)'(x) x)``: what curvlib evaluates of a loss."""
    def value_grad_hvp(point, /, *rest, **kw):  # (positional: ``kw`` may hold any name)
        f = lambda y: fn(y, *rest, **kw)
        value, grad = jax.value_and_grad(f)(point)
        return value, grad, jax.jvp(jax.grad(f), (point,), (point,))[1]

    return value_grad_hvp


# XLA options of the answer-now programs (the Krylov steps of `curvlib.krylov._driver.run_host`
# with ``quick``, the landscape's linearisation): they run only until the fused program is
# compiled, or once per call, so they trade run-time optimisation for a quarter of the compile
# time (eigsh's step: 0.30 s of CPU instead of 1.28 s with the first option alone). The second
# is XLA:CPU's classic elemental emitter in place of its fusion emitters, an option only the
# CPU compiler accepts (the GPU compiler refuses a program that names it): `quick_options`
# gives it on CPU only, decided at the first answer-now call (never at import, which must not
# start a backend).
QUICK = {"xla_backend_optimization_level": 0}
# The options of every other program curvlib compiles for an eager call (the fused programs of
# its entries, in front or behind, the model's product of the answer-now loop, the eager optax
# steps, the landscape's programs): XLA:CPU's classic elemental emitter alone, which compiles
# them in about two thirds of the time and runs them as fast (a small MLP's eigsh program:
# 6.8 s -> 4.3 s to compile, 11 ms -> 9 ms a call; a 120k-parameter transformer's Hessian
# product 2.4 s -> 2.0 s, 22 ms a product either way). A program inside the user's own
# ``jit`` is compiled as the user's program is.
CPU = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def eager_options() -> dict:
    """`CPU` on the CPU backend where the installed XLA accepts it (tried once on a one-line
    program), else ``{}`` (another backend, or an XLA without the option): XLA's defaults."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU).lower(1.0).compile()
    except Exception:  # noqa: BLE001  (an XLA without the option)
        return {}
    return dict(CPU)


@functools.cache
def quick_options() -> dict:
    """`QUICK` for the default backend, with `eager_options` (the classic emitter on CPU)."""
    return {**QUICK, **eager_options()}


class quick_jit:  # noqa: N801  (used as a decorator, like ``jax.jit``)
    """``jax.jit(fn, compiler_options=quick_options(), **kwargs)``, made at its first use.

    Called with traced arguments (inside a caller's ``jit``, where JAX refuses compiler
    options on a nested ``jit``) it is a plain ``jax.jit``: part of the caller's program.
    """

    def __init__(self, fn: Callable | None = None, **kwargs):
        self.fn, self.kwargs, self._jitted = fn, kwargs, None
        if fn is not None:
            functools.update_wrapper(self, fn)

    options = staticmethod(lambda: quick_options())

    def __call__(self, *args, **kwargs):
        if self.fn is None:  # ``@quick_jit(static_argnames=...)``
            return type(self)(args[0], **self.kwargs)
        if tracing(args, kwargs):
            return self.nested()(*args, **kwargs)
        return self.jitted()(*args, **kwargs)

    def jitted(self):
        if self._jitted is None:
            self._jitted = jax.jit(self.fn, compiler_options=self.options() or None,
                                   **self.kwargs)
        return self._jitted

    def nested(self):
        """The plain ``jax.jit`` of ``fn``, for calls inside another program."""
        if getattr(self, "_nested", None) is None:
            self._nested = jax.jit(self.fn, **self.kwargs)
        return self._nested

    def lower(self, *args, **kwargs):
        return self.jitted().lower(*args, **kwargs)


class eager_jit(quick_jit):  # noqa: N801
    """``jax.jit(fn, compiler_options=eager_options(), **kwargs)``, made at its first use: a
    program that eager calls reuse (XLA's optimisation, `eager_options`' emitter); a plain
    ``jax.jit`` inside a caller's ``jit``, as `quick_jit`."""

    options = staticmethod(lambda: eager_options())

    def _cache_size(self) -> int:
        return self.jitted()._cache_size()


# ------------------------------------------------------------------ operators


class _Program(_Keyed):
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
        if name == "matvec":  # the one operator every algorithm needs
            raise TypeError("`matvec` must be a callable v -> A v; got None.")
        return None
    if not callable(fn):
        raise TypeError(f"`{name}` must be a callable v -> A v; got {type(fn).__name__}.")
    # the vector first: an empty or integer one reached the user's function before
    _validate.float_leaves(example, example_name)
    if is_pytree_operator(fn):
        # (checked once per structure and shapes: a vector of other leaves is named as
        # the user passed it, not as "the tangent" of the operator's own check)
        if not is_host_driven(fn):  # (a stream is checked on its first pass)
            _validate.operator(fn, example, name, example_name)
        return fn
    return traced_program(fn, example, check=lambda out_shape: _validate.same_structure(
        example, out_shape, example_name, f"{name}({example_name})", floating=True))


def traced_program(fn: Callable, example: PyTree, check: Callable | None = None) -> Partial:
    """``fn`` traced on ``example``: ``Partial(program, *closed_over_arrays)``, whose static
    part is the program it computes (equal for two closures computing the same thing on
    different arrays, so a jitted caller compiles once) and whose leaves are the arrays.
    ``check(out_shape)`` sees the output's shapes first."""
    # traced through a new function: `jax.make_jaxpr` caches its trace by the function's
    # identity, and a function called again after a global, a dict or an attribute it
    # reads changed kept computing the old values (an eager call reads ``fn`` as it is now)
    closed, out_shape = jax.make_jaxpr(lambda x: fn(x), return_shape=True)(example)
    if check is not None:
        check(out_shape)
    if next(_nested_consts(closed.jaxpr), None) is not None:
        # a `jax.jit` inside ``fn`` closed over arrays: its body evaluated in place makes
        # them closed-over arrays of ``fn`` itself (inputs, not part of the program)
        closed = jax.make_jaxpr(functools.partial(_inlined, closed.jaxpr, closed.consts))(
            *jax.tree.leaves(example))
    in_tree = jax.tree.structure(example)
    out_tree = jax.tree.structure(out_shape)
    key = (str(closed.jaxpr), in_tree, out_tree, _unprinted(closed.jaxpr))
    program = _Program(closed.jaxpr, len(closed.consts), in_tree, out_tree, key)
    return Partial(program, *held(closed.consts))


class NotHoisted(Exception):
    """A hoisted loss (`hoisted_loss`) called at other shapes than it was traced at."""


class HoistedLoss(_Keyed):
    """How a loss traced by `hoisted_loss` is called back inside a compiled step.

    Static and hashable (its signature, the shapes it was traced at and the keywords it
    took as given); the program and the arrays it closed over travel beside it as a traced
    `Partial`, given to `bind`.
    """

    def __init__(self, signature, tree, avals: tuple, static_names: tuple):
        self.signature, self.tree, self.avals = signature, tree, avals
        self.static_names = static_names
        # the names, not the defaults (``lambda p, x=x: ...`` holds this step's batch)
        names = tuple((q.name, q.kind) for q in signature.parameters.values())
        self.key = (names, tree, avals, static_names)
        self._hash = hash(self.key)

    def bind(self, program: Partial) -> Callable:
        """``loss(params, *args, **kw)`` evaluating ``program``, with the original's signature
        (optax and curvlib route extra arguments by parameter names). Raises `NotHoisted`
        when called at other shapes (the program's sizes, a mean's divisor, are fixed)."""
        def loss(params, /, *args, **kw):
            traced = {k: x for k, x in kw.items() if k not in self.static_names}
            if (jax.tree.structure((params, args, traced)) != self.tree
                    or _tree.avals((params, args, traced)) != self.avals):
                raise NotHoisted("the loss was called at other shapes than it was traced at")
            return program((params, args, traced))

        loss.__signature__ = self.signature
        return loss


def hoisted_loss(fn: Callable, params: PyTree, kw: dict, static: dict, args: tuple = ()):
    """``fn(params, *args, **kw, **static)`` as ``(HoistedLoss, Partial(program, *arrays))``:
    the arrays it closes over (a batch captured by a closure) become inputs of its program,
    so a fresh closure over the next batch computes with the same compiled program. ``None``
    where that is not sound: a custom derivative rule in the loss (its rule functions are
    not part of the program's text and may close over the old batch), or no signature.

    Cost: one trace of ``fn`` per call.
    """
    args = tuple(args)
    try:
        signature = inspect.signature(fn)
        program = traced_program(lambda a: fn(a[0], *a[1], **a[2], **static), (params, args, kw))
    except Exception:  # noqa: BLE001  (the caller's own evaluation reports a failing loss)
        return None
    if _custom_rules(program.func.jaxpr):
        return None
    return HoistedLoss(signature, jax.tree.structure((params, args, kw)),
                       _tree.avals((params, args, kw)), tuple(static)), program


def keyed_function(fn: Callable, params: PyTree, args: tuple = (), kw: dict | None = None):
    """``fn`` as a static argument of a compiled eager evaluation at ``(params, *args,
    **kw)``: ``(keyed, program, ints)``. ``keyed`` is a `SameFunction` (``program`` None) or,
    for a function closing over arrays (``lambda p: loss(p, x, y)`` over each step's batch,
    a new function over new arrays every call), a `HoistedLoss` whose ``program`` holds
    them as inputs (give it to the compiled function as an argument, `HoistedLoss.bind` it
    inside); ``ints`` are the keywords the function uses in Python (pass them as given).
    ``None`` where it cannot be keyed (evaluate it as it is).

    Cost: one trace of ``fn`` (remembered per function object and shapes), a second for
    one closing over arrays.
    """
    kw = {} if kw is None else kw
    same = same_function(fn, params, *args, **kw)
    if not isinstance(same, SameFunction):
        return None
    ints = {k: kw[k] for k in same.static_names}
    if not same.closes_over_arrays:
        return same, None, ints
    hoisted = hoisted_loss(fn, params, {k: x for k, x in kw.items() if k not in ints}, ints,
                           args)
    return None if hoisted is None else (*hoisted, ints)


def bound(fn: Callable, program) -> Callable:
    """The function `keyed_function` keyed: ``fn`` itself, or a `HoistedLoss` bound to its
    ``program``."""
    return fn.bind(program) if isinstance(fn, HoistedLoss) else fn


@eager_jit
def run_program(program: Partial, x):
    """``program(x)`` compiled once per program (`traced_program`) and shapes."""
    return program(x)


def _nested_consts(jaxpr):
    """The arrays closed over by the sub-programs of ``jaxpr``'s equations, at any depth
    (not inputs of ``jaxpr``, and not shown by its text)."""
    for eqn in jaxpr.eqns:
        for val in eqn.params.values():
            for v in val if isinstance(val, tuple) else (val,):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    yield from v.consts
                    yield from _nested_consts(v.jaxpr)
                elif isinstance(v, jax.extend.core.Jaxpr):
                    yield from _nested_consts(v)


def _inlined(jaxpr, consts, *args):
    """``jax.core.eval_jaxpr`` with the body of every ``jit`` equation evaluated in place."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        body = eqn.params.get("jaxpr") if eqn.primitive.name in ("jit", "pjit") else None
        if isinstance(body, jax.extend.core.ClosedJaxpr):
            # the layouts the inner jit asked for stay asked for
            ins = _constrained(ins, eqn.params.get("in_shardings", ()))
            outs = _constrained(_inlined(body.jaxpr, body.consts, *ins),
                                eqn.params.get("out_shardings", ()))
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _constrained(values, shardings):
    """``values``, each constrained to its entry of ``shardings`` where that is a sharding
    of an ``Auto`` mesh (an inner ``jit``'s ``in_shardings``/``out_shardings``; unspecified
    ones left free)."""
    if len(shardings) != len(values):
        return list(values)

    def constrain(v, s):
        if not isinstance(s, jax.sharding.Sharding):
            return v
        mesh = getattr(s, "mesh", None)
        explicit = mesh is not None and jax.sharding.AxisType.Explicit in tuple(
            getattr(mesh, "axis_types", ()))
        # (an Explicit mesh's layouts travel in the values' types; a reshard would need the
        # mesh the inner jit carried, which the inlined body has not)
        return v if explicit else jax.lax.with_sharding_constraint(v, s)

    return [constrain(v, s) for v, s in zip(values, shardings, strict=True)]


_BY_VALUE = 4096  # entries up to which an array the text does not show is keyed by its value


class _Same:
    """Hashable by identity, holding its object (its ``id`` cannot be reused meanwhile)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _unprinted(jaxpr) -> tuple:
    """What the program computes that its text does not show: arrays still closed over by
    sub-programs (a ``jit`` inside a ``scan``; keyed as `_const_key` keys them) and the
    host functions of callbacks (printed as masked addresses)."""
    out = [_const_key(c) for c in _nested_consts(jaxpr)]
    for f in _callbacks(jaxpr):
        # JAX wraps the host function anew at every trace, in a value equal for the same
        # function: keyed by that equality (by identity if it has none)
        try:
            hash(f)
            out.append(f)
        except TypeError:
            out.append(_Same(f))
    return tuple(out)


def _value_key(c):
    """``(shape, dtype, bytes)`` of a small concrete array held by this process, else
    ``None`` (a tracer, a PRNG key, an array spread over processes: keyed by identity)."""
    if isinstance(c, jax.core.Tracer) or not getattr(c, "is_fully_addressable", True):
        return None
    try:
        a = np.asarray(c)
    except TypeError:  # typed PRNG keys
        return None
    return a.shape, str(a.dtype), a.tobytes()


def _callbacks(jaxpr):
    """The host functions of the callbacks whose results the program uses (a
    ``jax.debug.callback``/``print`` returns nothing: not part of what it computes)."""
    for eqn in jaxpr.eqns:
        if "callback" in eqn.params and eqn.primitive.name != "debug_callback":
            yield eqn.params["callback"]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _callbacks(sub)


# ------------------------------------------------------------------ entries


def is_traced(*trees) -> bool:
    """Whether any leaf of ``trees`` is a tracer (we are inside the user's transformation)."""
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def tracing(*trees) -> bool:
    """Whether this call is part of a program being traced: a leaf of ``trees`` is a tracer,
    or the caller's ``jax.jit`` is tracing although every argument is a constant it
    closed over (any value made now is then a tracer of its program). Cost: one tiny
    eager operation when no leaf is traced (~40 us)."""
    return is_traced(*trees) or isinstance(jax.numpy.zeros((), "int32"), jax.core.Tracer)


# ------------------------------------------------------ answer now, compile behind


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector paused for one answer-now call, then as it was.

    Tracing and lowering the answer-now steps allocate some 10^5 short-lived objects;
    the collections they trigger walk every object the process holds (JAX's own
    included) and took about a fifth of an eager first `eigsh` (0.12-0.14 s of
    0.55 s with a warm persistent cache). Reference counting still frees acyclic
    garbage at once; the cycles made during the call wait for the next collection.
    A collector the user disabled before the call stays disabled. Python has one
    collector for all threads: the pause holds for the others too, and a
    ``gc.disable()`` another thread makes during the call is undone at its end.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Behind:
    """Fused programs compiled in a background thread, looked up by call signature.

    An eager entry with an *answer-now* path (``now``) does not wait for XLA to
    compile its single fused program on a signature it has not seen: it answers
    through ``now`` (the same algorithm driven from the host, its steps as small
    model-independent programs), then submits the fused compile to one
    background thread. Calls with that signature answer through ``now`` (warm by
    then) until the compile is done, and run the fused program after. The compile
    starts once no eager call has run for `_QUIET_S` and runs at the lowest CPU
    priority: XLA:CPU compiles on every core, so a compile alongside an answer the
    user waits for would only slow that answer down. At most one compile runs and
    one waits: a newer signature replaces a waiting one (the user has moved on),
    so a loop over many configurations never builds a backlog. Bounded: the
    oldest entries are dropped past `_MAX_ENTRIES`.
    """

    _MAX_ENTRIES = 64

    _QUIET_S = 1.0  # a compile starts once no eager call has run for this long

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._waiting = None  # the submitted future not yet started
        self._pool = None
        self._busy = 0  # eager calls in progress
        self._idle = threading.Event()
        self._idle.set()
        self._last = -float("inf")  # `time.monotonic()` when the last eager call ended
        self._closing = False
        self._stopped = threading.Event()  # set at interpreter shutdown
        atexit.register(self._close)

    def _executor(self):
        if self._pool is None:
            self._pool = _Worker(before_exit=self._stop)
        return self._pool

    def call(self, jitted, static: tuple, a: dict, now: Callable, quiet: bool = True):
        key = _signature(jitted, static, a)
        if key is None:
            return jitted(**a)
        with self._lock:
            self._busy += 1
            self._idle.clear()
        try:
            return self._call(jitted, static, a, now, key, quiet)
        finally:
            with self._lock:
                self._busy -= 1
                if self._busy == 0:
                    self._last = time.monotonic()
                    self._idle.set()

    def _quiet(self) -> None:
        """Wait until no eager call has run for `_QUIET_S` (the user is reading an answer).

        Measured from the end of the last eager call, whichever call that was: a call
        that starts and ends while this thread sleeps restarts the quiet period. The
        interpreter's shutdown ends the wait at once (`_stop`).
        """
        while not self._closing:
            self._idle.wait()
            with self._lock:
                left = self._last + self._QUIET_S - time.monotonic()
                if left <= 0 and self._busy == 0:
                    return
            self._stopped.wait(max(left, 0.0))

    def _compile(self, jitted, static: tuple, a: dict, quiet: bool = True):
        """The fused program, traced here, later than the call that submitted it: a keyed
        function (`SameFunction`) must still compute what its key says before and after,
        else ``None`` (a NumPy array it closes over changed in place meanwhile: the
        program would be another's). Traced through a function of its own, so nothing
        traced here enters ``jitted``'s own trace cache. Without ``quiet`` the compile
        starts at once (for a caller inside a loop that never pauses)."""
        if quiet:
            self._quiet()
        if self._closing:
            return None
        keyed = [a[n] for n in static if isinstance(a[n], SameFunction)]
        if any(f.changed() for f in keyed):
            return None
        fn = jitted.__wrapped__
        compiled = _lower_and_compile(jax.jit(functools.wraps(fn)(
            lambda *args, **kw: fn(*args, **kw)), static_argnames=static,
            compiler_options=eager_options() or None), a)
        return None if any(f.changed() for f in keyed) else compiled

    def _stop(self) -> None:
        """Drop the compiles not started and wake the worker from its quiet period."""
        self._closing = True
        self._stopped.set()
        self.clear()

    def _close(self) -> None:
        """At interpreter exit: drop compiles not started, let a started one finish.

        (`_Worker` stops through `_stop` before the interpreter joins its threads; this is
        the fallback where that hook does not exist.)
        """
        self._stop()
        if self._pool is not None:
            self._pool.drain()

    def _call(self, jitted, static: tuple, a: dict, now: Callable, key, quiet: bool = True):
        with self._lock:
            fut = self._entries.get(key)
            if fut is not None:
                self._entries.move_to_end(key)
        if fut is None or fut.cancelled():
            # the answer first, then the compile: XLA:CPU compiles on every core, so a
            # compile started alongside would only slow the answer down
            with collector_paused():
                out = jax.block_until_ready(now(**a))
            with self._lock:
                if self._waiting is not None:
                    self._waiting.cancel()
                self._waiting = self._entries[key] = self._executor().submit(
                    self._compile, jitted, static, dict(a), quiet)
                while len(self._entries) > self._MAX_ENTRIES:
                    self._entries.popitem(last=False)
            return out
        if fut.done() and not fut.cancelled():
            if fut.exception() is not None:
                return jitted(**a)  # compiling in front reports the error where it belongs
            compiled = fut.result()
            if compiled is None:
                return jitted(**a)
            try:
                return compiled(**{n: v for n, v in a.items() if n not in static})
            except (TypeError, ValueError):  # a signature detail the key missed
                return jitted(**a)
        with collector_paused():
            return now(**a)

    def wait(self, timeout: float | None = None) -> None:
        """Block until every submitted compile has finished (tests, benchmarks)."""
        with self._lock:
            futs = [f for f in self._entries.values() if not f.cancelled()]
        concurrent.futures.wait(futs, timeout=timeout)

    def clear(self) -> None:
        """Forget every compiled program (they hold executables until dropped)."""
        with self._lock:
            if self._waiting is not None:
                self._waiting.cancel()
            self._entries.clear()


class _Worker:
    """One thread running submitted calls in order (``submit`` returns a `Future`).

    At interpreter shutdown, before Python joins its threads (CPython's
    ``threading._register_atexit``, the hook `concurrent.futures` uses), ``before_exit``
    runs (`_Behind._stop`: queued compiles are dropped, a quiet wait ends) and the thread
    returns after the call in progress: a script that got its answer waits at most for a
    compile already started, never for queued ones. The thread is not a daemon: a daemon
    thread still alive while the interpreter finalizes is stopped wherever it is, and one
    stopped inside jaxlib aborted the process (``terminate called ... exception not
    rethrown``, exit status 134, in 2 of 4 runs of a script of 18 eager ``eigsh`` calls).
    Where the hook is missing, the thread is a daemon and `_Behind._close` drains it at exit.
    """

    def __init__(self, before_exit: Callable | None = None):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._current = None  # the future being computed (until the thread is idle again)
        self._before_exit = before_exit
        register = getattr(threading, "_register_atexit", None)
        self._thread = threading.Thread(target=self._work, name="curvlib-compile",
                                        daemon=register is None)
        self._thread.start()
        if register is not None:
            try:
                register(self._exit)
            except RuntimeError:  # created during shutdown itself: stop at once
                self._exit()

    def _exit(self) -> None:
        """Interpreter shutdown: ``before_exit``, then end the thread after its current call."""
        if self._before_exit is not None:
            self._before_exit()
        self._queue.put(None)

    def submit(self, fn, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((fut, fn, args))
        return fut

    def drain(self) -> None:
        """Wait until the call in progress, if any, has finished and the thread is idle.

        Idle, not merely done: a thread still running Python when the interpreter starts
        to finalize is stopped there, and one stopped inside native code (jaxlib's) aborts
        the process (``terminate called ... exception not rethrown``, exit status 134).
        """
        with self._lock:
            self._lock.wait_for(lambda: self._current is None)

    def _work(self):
        _yield_cpu()
        while True:
            item = self._queue.get()
            if item is None:  # interpreter shutdown (`_exit`)
                return
            fut, fn, args = item
            with self._lock:
                if not fut.set_running_or_notify_cancel():
                    continue
                self._current = fut
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # reported to the caller through the future
                fut.set_exception(e)
            del item, fut, fn, args  # the user's arrays are not kept until the next compile
            with self._lock:
                self._current = None
                self._lock.notify_all()


def _lower_and_compile(jitted, a):
    return jitted.lower(**a).compile()


def _yield_cpu():
    """Run this (background) thread at the lowest CPU priority where the OS allows it.

    On Linux a thread has its own nice value (and threads it starts inherit it), so
    the compile takes only the CPU the user's foreground work leaves idle: an answer
    the user is waiting for is never slowed by a compile that merely prepares a later
    one. Elsewhere a no-op.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux-like, or not permitted
        pass


def _signature(jitted, static: tuple, a: dict):
    """A hashable key of what a compiled program depends on, or ``None``."""
    dyn = {n: v for n, v in a.items() if n not in static}
    leaves, treedef = jax.tree.flatten(dyn)
    try:
        avals = tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)
        key = (jitted, tuple(a[n] for n in static), treedef, avals)
        hash(key)
    except TypeError:
        return None
    return key


BEHIND = _Behind()


def compile_behind(enabled: bool | None = None) -> bool:
    """Whether eager calls answer now and compile their fused program in the background.

    On by default (``CURVLIB_COMPILE_BEHIND=0`` in the environment turns it
    off). For the algorithms that have an answer-now path
    ([`eigsh`][curvlib.eigsh], [`lanczos`][curvlib.lanczos],
    [`power_iteration`][curvlib.power_iteration],
    [`spectral_density`][curvlib.spectral_density], [`cg`][curvlib.cg] without a
    warm start or preconditioner, [`hutchinson_trace`][curvlib.hutchinson_trace] and
    [`hutchinson_diag`][curvlib.hutchinson_diag] without ``deflate`` or ``batch_size``),
    the first eager
    call with a new model, size, ``k`` or option runs the algorithm driven from
    the host, each step a small program that depends on the problem's size and
    dtype but not on the model (so it is compiled once per session and size,
    not once per model; for ``eigsh``, ``lanczos``, ``spectral_density``, ``cg`` and
    ``power_iteration`` on problems whose stored vectors hold at most 2^22 numbers the
    steps run on NumPy and nothing but the model's product compiles); then the single
    fused program compiles in a background thread, and later calls run it once it is
    ready (until then they take the host-driven path again, warm). Both give the same answer to
    rounding, not bit for bit: turn it off where repeated calls in one process
    must agree bitwise.
    Inside the user's own ``jax.jit`` nothing changes. Off: every eager call
    compiles and runs the fused program in front (one more compile wait, no
    background thread). Always off in a multi-process run
    (``jax.process_count() > 1``, ``jax.distributed``): each process would find
    its own background compile ready at its own moment, and one process running
    the fused program while another runs the host-driven steps would issue
    collectives that do not match (a hang or a wrong answer); there every eager
    call compiles in front, the same program on every process.

    The background compile starts once no eager call has run for a second (a
    notebook cell re-run with a new batch size right after an answer still answers
    at full speed) and runs at the lowest CPU priority (Linux): XLA:CPU compiles on
    every core, and its tracing holds Python's lock, so it would otherwise slow down
    the next answer the user waits for. At
    most one compile runs and one waits. At exit, a compile not yet started is
    dropped; one already running is finished first (a thread stopped inside the
    compiler would crash the exit), so a script may exit up to one compile later.
    A loop that makes eager calls more often than once a second never leaves a
    quiet second, so it keeps the host-driven path (measured: two threads calling
    every 0.2 s for 20 s, 98 calls, none on the fused program): turn compile-behind
    off for such a loop (it then compiles once, in front), or call the algorithm
    inside your ``jax.jit``.

    The setting is process-wide, like ``jax.config``: set it once, at the start of
    a script, not from several threads at once (two threads' overlapping
    ``was = compile_behind(False)`` ... ``compile_behind(was)`` restore each
    other's setting). The first call also pauses Python's cyclic garbage collector
    (one collector for every thread) and re-enables it at its end when it was
    enabled at its start.

    Args:
      enabled: the new setting; ``None`` only reads it.

    Returns:
      The setting before the call (with ``None``, the setting in force), so
      ``was = compile_behind(False)`` ... ``compile_behind(was)`` restores it.

    Examples:
      >>> import curvlib
      >>> was = curvlib.compile_behind(False)  # compile in front from here on
      >>> curvlib.compile_behind()
      False
      >>> curvlib.compile_behind(was)  # as it was; returns the setting it replaces
      False
      >>> curvlib.compile_behind() == was
      True
    """
    global _BEHIND_ENABLED
    before = _BEHIND_ENABLED
    if enabled is not None:
        _validate.one_of(enabled, "enabled", (True, False, None))
        _BEHIND_ENABLED = bool(enabled)
    return before


_BEHIND_ENABLED = os.environ.get("CURVLIB_COMPILE_BEHIND", "1").strip().lower() not in (
    "0", "false", "no", "off")


def _key_hint(sig: inspect.Signature, args: tuple, kwargs: dict) -> str:
    """A sentence for a call that did not bind because a number took the place of ``key``.

    ``hutchinson_trace(H, v, 30)`` binds ``30`` to ``key`` and reports ``num_probes``
    missing; the message then says where the 30 went.
    """
    if "key" not in sig.parameters:
        return ""
    try:
        got = sig.bind_partial(*args, **kwargs).arguments.get("key")
    except TypeError:
        return ""
    if isinstance(got, (int, float)) and not isinstance(got, bool):
        return (f" The argument {got!r} was taken as `key`, which is a required PRNG key "
                "(`jax.random.PRNGKey(0)`, `jax.random.key(0)`): pass it before the other "
                "arguments.")
    return ""


def _wrap(fn: Callable, static: tuple, operators: Mapping[str, str], *,
          precheck: Callable | None = None, strict: bool = False,
          now: Callable | None = None, now_when: Callable | None = None,
          now_reports: bool = False, quiet: bool = True) -> Callable:
    """``fn`` bound by name and called through ``jax.jit`` unless an argument is traced.

    The one call path of `entry` and `function`: bind the arguments (defaults
    filled in), run ``precheck`` eagerly, call ``fn`` directly when a traced
    argument or a pytree operator holds a tracer, else convert the operator
    arguments with `as_operator` and call the jitted ``fn`` (``fn`` directly when the
    conversion shows a plain closure over a tracer, or when the caller's ``jit`` is
    tracing: `tracing`). With ``strict``
    (`function`'s rules) a host-driven operator or an unhashable static option
    also calls ``fn`` directly (same result, no caching).
    """
    sig = inspect.signature(fn)
    jitted = eager_jit(fn, static_argnames=static)  # (made at its first eager call)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            plain = sig.replace(return_annotation=inspect.Signature.empty, parameters=[
                q.replace(annotation=inspect.Parameter.empty) for q in sig.parameters.values()])
            raise TypeError(f"{fn.__name__}{plain}: {e}.{_key_hint(sig, args, kwargs)}") from None
        bound.apply_defaults()
        a = dict(bound.arguments)
        if precheck is not None:
            precheck(**a)
        dynamic = [v for n, v in a.items() if n not in static and n not in operators]
        ops = [a[n] for n in operators]
        if tracing(dynamic, [o for o in ops if o is not None and is_pytree_operator(o)]) or (
                strict and any(is_host_driven(o) for o in ops)):
            return fn(**a)
        converted = {n: as_operator(a[n], a[ex], n, ex) for n, ex in operators.items()}
        if any(is_traced(o) for o in converted.values() if o is not None):
            # a plain closure over the user's tracers (``v -> hvp(params, v)`` inside
            # their ``jit``, ``vmap`` or ``grad``): they show only once it is traced
            return fn(**a)
        a.update(converted)
        if strict:
            try:
                hash(tuple(a[n] for n in static))
            except TypeError:  # an unhashable static option: no caching, same result
                return fn(**a)
        reporting = now_reports and _progress.enabled()
        if (now is not None and (_BEHIND_ENABLED or reporting)
                and jax.process_count() == 1 and (now_when is None or now_when(**a))):
            if reporting:  # the host-driven path, whose loop draws the progress bar
                return now(**a)
            return BEHIND.call(jitted, static, a, now, quiet)
        return jitted(**a)

    call.jitted = jitted
    return call


def entry(*, static: Sequence[str] = (), operators: Mapping[str, str] | None = None,
          now: Callable | None = None, now_when: Callable | None = None,
          now_reports: bool = False, quiet: bool = True):
    """Decorate an implementation ``impl(**kwargs)`` as a compiled, cached entry point.

    The returned function binds its arguments to ``impl``'s signature; if any
    traced argument holds a tracer it calls ``impl`` directly (the user's own
    ``jit``/``vmap``/``grad`` compiles it); otherwise it converts the operator
    arguments with `as_operator` (``operators`` maps an operator argument
    to the argument it acts on) and calls ``jax.jit(impl, static_argnames=static)``.
    Validation of the options is the caller's job (it happens before, eagerly).
    With ``now`` (a function of the same arguments that answers without the
    fused compile), eager calls for which ``now_when`` (same arguments; default:
    always) holds go through `compile_behind`; with ``now_reports`` (``now`` draws a
    progress bar), they take ``now`` whenever `show_progress` is on. Without ``quiet``
    the fused program compiles behind at once, not after a quiet second (`_Behind`).
    """
    operators = dict(operators or {})
    static = tuple(static)

    def deco(impl):
        call = _wrap(impl, static, operators, now=now, now_when=now_when,
                     now_reports=now_reports, quiet=quiet)
        call.impl = impl
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
    the directory to clear it. Called again with another folder, programs
    compiled from then on go to the new one (JAX's cache is reset).

    Args:
      path: cache directory; default ``$CURVLIB_CACHE_DIR`` or
        ``~/.cache/curvlib/jax``.
      min_compile_time_secs: programs compiling faster than this are not stored.

    Returns:
      The cache directory used.

    Raises:
      TypeError: for a ``path`` that is not a str or ``os.PathLike``.
      OSError: for a folder that cannot be created, or in which no file can be
        written (checked here: JAX would otherwise warn at every program it
        could not store).

    Examples:
      >>> import tempfile, curvlib
      >>> d = curvlib.enable_compilation_cache(tempfile.mkdtemp())  # doctest: +SKIP
    """
    if path is None:
        path = os.environ.get("CURVLIB_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "curvlib", "jax"
        )
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"`path` must be a folder (a str or os.PathLike); got {path!r}.")
    # (one number: an array passed here, then failed in ``float`` after the folder was set)
    _validate.number(min_compile_time_secs, "min_compile_time_secs", minimum=0, scalar=True)
    path = os.fspath(path)
    try:  # a folder, writable? (os.access says yes to root on a read-only file system)
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise OSError(e.errno, f"`path` must be a folder curvlib can write the compilation "
                               f"cache to; could not create a file in {path!r}: {e}") from None
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if previous != path:  # JAX opens its cache once, at the first compile: open it again
        from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415

        compilation_cache.reset_cache()
    return path


def function(*, static: Sequence[str] = (), operators: Mapping[str, str] | None = None,
             precheck: Callable | None = None, now: Callable | None = None,
             now_when: Callable | None = None):
    """Decorate a *public* function so that its eager calls are compiled once and cached.

    Like `entry`, but the whole function (its shape and option checks
    included) runs under ``jax.jit``: checks that depend only on static options
    and shapes then run once per compilation. Checks of concrete *values* that
    stay traced inside (a negative ``damping``, say) go in ``precheck``, which
    is called eagerly with the bound arguments on every call. ``now`` and
    ``now_when``: an answer-now path, as for `entry`.
    """
    operators = dict(operators or {})
    static = tuple(static)

    def deco(public):
        call = _wrap(public, static, operators, precheck=precheck, strict=True, now=now,
                     now_when=now_when)
        call.uncached = public
        return call

    return deco
