"""Machinery shared by every operator: caching, input checks that name pytree paths, sharding.

Nothing here is public; the operator modules build on it.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial, keystr

from curvlib import _tree

PyTree = Any


# ------------------------------------------------------------------ caching


def _weak_cache(factory: Callable) -> Callable:
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


# -------------------------------------------------------- static arguments


def static_int(x, name: str, *, minimum: int | None = None) -> int:
    """``x`` as a Python int (NumPy integers accepted), else a ``ValueError`` naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"`{name}` must be a static int; got {x!r}.")
    x = int(x)
    if minimum is not None and x < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {x}.")
    return x


def check_mode(mode: str, modes: tuple[str, ...]) -> None:
    if mode not in modes:
        raise ValueError(f"`mode` must be one of {modes}; got {mode!r}.")


# ------------------------------------------------------------ pytree paths


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(keystr(path), leaf), ...]`` in leaf order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(keystr(path), leaf) for path, leaf in flat]


def _is_key_dtype(dt) -> bool:
    return jax.dtypes.issubdtype(dt, jax.dtypes.prng_key)


def check_params(params: PyTree, name: str = "params") -> None:
    """Raise unless ``params`` is a non-empty pytree of real floating arrays.

    The message names the offending leaf by its pytree path and gives the fix
    that fits the leaf: a typed PRNG key, a raw ``uint32`` key or other integer
    state must leave ``params`` (pass it as an extra argument), never be cast.

    Raises:
      ValueError: for an empty pytree.
      TypeError: for a non-real-floating leaf.
    """
    leaves = leaves_with_paths(params)
    if not leaves:
        raise ValueError(f"`{name}` is an empty pytree; expected at least one array leaf.")
    for path, x in leaves:
        dt = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
        where = f"`{name}{path}`"
        if _is_key_dtype(dt):
            raise TypeError(
                f"{where} is a PRNG key (dtype {dt}); curvature is taken with respect to real "
                "floating leaves and a key is not a parameter. Do not cast it: pass the key to "
                "the function as an extra argument after the parameters (or close over it)."
            )
        if jnp.issubdtype(dt, jnp.complexfloating):
            raise TypeError(
                f"{where} has dtype {dt}; curvlib's operators need real floating leaves (the "
                "curvature of a real loss in complex parameters is a real operator on their "
                "real and imaginary parts: store those as two real leaves)."
            )
        if not jnp.issubdtype(dt, jnp.floating):
            shape = tuple(jnp.shape(x))
            raw_key = dt == jnp.uint32 and shape[-1:] == (2,)
            hint = (
                " It looks like a raw uint32 PRNG key (trailing axis 2): do not cast it."
                if raw_key
                else ""
            )
            raise TypeError(
                f"{where} has dtype {dt}; curvature needs real floating-point leaves.{hint} If "
                "the leaf is a trainable parameter, cast it to a floating dtype (float32, "
                "float64, bfloat16, ...); if it is not (a PRNG key, a step counter, integer "
                "state), do not cast it: take it out of the parameters and pass it to the "
                "function as an extra argument after them."
            )


def check_same_tree(a: PyTree, b: PyTree, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` match in structure and leaf shapes.

    The message names the first differing leaf by its path in both trees.
    """
    ta, tb = jax.tree.structure(a), jax.tree.structure(b)
    if ta != tb:
        pa = [p for p, _ in leaves_with_paths(a)]
        pb = [p for p, _ in leaves_with_paths(b)]
        only_a = [p for p in pa if p not in pb][:3]
        only_b = [p for p in pb if p not in pa][:3]
        detail = ""
        if only_a or only_b:
            detail = (
                f" Leaves only in {name_a}: {only_a or 'none'}; only in {name_b}: "
                f"{only_b or 'none'}."
            )
        raise ValueError(
            f"`{name_b}` must match `{name_a}` in pytree structure and leaf shapes; got "
            f"{name_a}: {ta} and {name_b}: {tb}.{detail}"
        )
    for (path, x), (_, y) in zip(leaves_with_paths(a), leaves_with_paths(b), strict=True):
        if jnp.shape(x) != jnp.shape(y):
            raise ValueError(
                f"`{name_b}` must match `{name_a}` in pytree structure and leaf shapes; "
                f"`{name_b}{path}` has shape {jnp.shape(y)} but `{name_a}{path}` has shape "
                f"{jnp.shape(x)}."
            )


def check_scalar(fun: Callable, name: str, *example, has_aux: bool = False) -> None:
    """Raise ``TypeError`` unless ``fun(*example)`` is a float scalar (or ``(scalar, aux)``)."""
    check_has_aux(has_aux)
    out = jax.eval_shape(fun, *example)
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(
                f"`{name}` was declared with `has_aux=True`, so it must return a pair "
                f"`(loss, aux)`; it returned {jax.tree.structure(out)}."
            )
        out = out[0]
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        shapes = [x.shape for x in leaves]
        hint = ""
        if not has_aux and isinstance(out, (tuple, list)) and len(out) == 2:
            hint = " If it returns `(loss, aux)`, pass `has_aux=True`."
        raise TypeError(
            f"`{name}` must return a scalar (shape ()) loss; it returned leaves of shapes "
            f"{shapes}. Reduce it, e.g. with jnp.mean, before asking for curvature.{hint}"
        )
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must return a real floating scalar; got dtype {leaves[0].dtype}."
        )


@_weak_cache
def value_only(fun: Callable) -> Callable:
    """``fun`` without its auxiliary output: ``(*a) -> fun(*a)[0]`` (cached per ``fun``)."""

    def f(*args):
        return fun(*args)[0]

    return f


def check_has_aux(has_aux) -> None:
    if not isinstance(has_aux, bool):
        raise ValueError(f"`has_aux` must be a bool; got {has_aux!r}.")


def drop_aux(fun: Callable, has_aux: bool) -> Callable:
    check_has_aux(has_aux)
    return value_only(fun) if has_aux else fun


# --------------------------------------------------------- tangent checks


def signature(tree: PyTree):
    """Hashable (structure, leaf paths, leaf shapes, explicit specs) of ``tree``."""
    leaves = leaves_with_paths(tree)
    return (
        jax.tree.structure(tree),
        tuple(p for p, _ in leaves),
        tuple(tuple(jnp.shape(x)) for _, x in leaves),
        tuple(explicit_spec(x) for _, x in leaves),
    )


def explicit_spec(x):
    """``(mesh axis names, padded spec)`` of an explicitly typed leaf, else ``None``."""
    s = _tree.explicit_sharding(x)
    if s is None:
        return None
    spec = tuple(s.spec) + (None,) * (jnp.ndim(x) - len(s.spec))
    return tuple(s.mesh.axis_names), spec


def check_tangent(v: PyTree, sig, like: str = "params", name: str = "tangent",
                  by_path: bool = False) -> None:
    """Static check of ``v`` against ``signature(like)``; errors name the leaf path.

    With ``by_path`` only the leaves' key paths and shapes must match (``None``
    subtrees may be written at any level, as in a block's sub-pytree).
    """
    treedef, paths, shapes, specs = sig
    vleaves = leaves_with_paths(v)
    leaves = [x for _, x in vleaves]
    vshapes = tuple(tuple(jnp.shape(x)) for x in leaves)
    if by_path:
        vpaths = tuple(p for p, _ in vleaves)
        if vpaths != paths:
            raise ValueError(
                f"the {name} must have the leaves of `{like}` (by key path, in order): "
                f"{list(paths)}; got {list(vpaths)}."
            )
    elif jax.tree.structure(v) != treedef:
        raise ValueError(
            f"the {name} must match `{like}` in pytree structure and leaf shapes; got "
            f"{like}: {treedef} and {name}: {jax.tree.structure(v)}."
        )
    for path, got, want in zip(paths, vshapes, shapes, strict=True):
        if got != want:
            raise ValueError(
                f"the {name} must match `{like}` in pytree structure and leaf shapes; "
                f"{name}{path} has shape {got} but {like}{path} has shape {want}."
            )
    for path, x, want in zip(paths, leaves, specs, strict=True):
        if want is not None and explicit_spec(x) != want:
            raise ValueError(
                f"`{like}` have explicit sharding types (a mesh with AxisType.Explicit axes), "
                f"so the {name} must carry the same sharding; {name}{path} is typed "
                f"{jax.typeof(x).str_short()} but {like}{path} has spec {want[1]} on mesh axes "
                f"{want[0]}. Place vectors like the {like} (`jax.device_put(v, sharding)` or "
                "`jax.sharding.reshard`)."
            )


@_weak_cache
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
        check_tangent(v, sig, like, name)
        return product(*data, v)

    return matvec


def cast_like(v: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda x, p: jnp.asarray(x).astype(jnp.result_type(p)), v, like)


# ------------------------------------------------------------ linearisation


def call_linearized(lin, v):
    return lin(v)


class SameProgram:
    """A linearised function's static part, equal to another that replays the same program.

    ``jax.linearize`` returns a `Partial` whose residuals
    are leaves but whose function (holding the tangent jaxpr) is a fresh object
    on every call, so two linearisations at different points would make a
    jitted consumer recompile. Comparing by the printed program instead lets
    every product with the same model and shapes share one compilation.
    """

    def __init__(self, fn):
        self.fn = fn
        self.key = repr(fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other):
        return isinstance(other, SameProgram) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


def stable_linearized(lin):
    if isinstance(lin, Partial):
        return Partial(SameProgram(lin.func), *lin.args, **lin.keywords)
    return lin


def transpose(lin, like: PyTree, cotangent: PyTree) -> PyTree:
    """``J^T u`` for the linear function ``lin`` (``v -> J v`` on vectors shaped like ``like``)."""
    (out,) = jax.linear_transpose(lin, like)(cotangent)
    return out


# ---------------------------------------------------------------- sharding


def param_shardings(params: PyTree):
    """``(treedef, shardings)`` of concrete params placed with ``NamedSharding``s, else ``None``.

    Only partitioned layouts on meshes whose axes are all ``AxisType.Auto`` are
    recorded: there the partitioner is free to return a product all-reduced
    (replicated on every device) where the parameters were sharded (FSDP), so
    the products are constrained back to the parameters' layout (a
    reduce-scatter). Traced params (inside ``jit``) and single-device,
    replicated or explicitly typed arrays already carry the right layout.
    """
    shardings = []
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        if isinstance(x, jax.core.Tracer) or not isinstance(s, jax.sharding.NamedSharding):
            return None
        if any(t != jax.sharding.AxisType.Auto for t in s.mesh.axis_types):
            return None
        shardings.append(s)
    if all(s.is_fully_replicated for s in shardings):
        return None
    return jax.tree.structure(params), tuple(shardings)


@_weak_cache
def sharded(product, layout):
    """``product`` with its output constrained to ``layout`` (from `param_shardings`)."""
    if layout is None:
        return product
    treedef, shardings = layout

    def matvec(*args):
        out = jax.tree.leaves(product(*args))
        return jax.tree.unflatten(
            treedef,
            [jax.lax.with_sharding_constraint(o, s) for o, s in zip(out, shardings, strict=True)],
        )

    return matvec


def params_operator(product: Callable, params: PyTree, *data) -> Partial:
    """``Partial(product, *data)`` checked against ``params`` and constrained to their layout."""
    fn = checked(sharded(product, param_shardings(params)), signature(params))
    return Partial(fn, *data)
