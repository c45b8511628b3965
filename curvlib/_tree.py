"""Pytree vector algebra used by every layer of curvlib.

Vectors are pytrees of arrays; a *basis* (a stack of vectors) is a pytree whose
leaves carry one extra leading axis ``(m, ...)``. Everything here is plain
``jax.tree.map`` / ``tensordot`` work, so sharded leaves stay sharded: nothing
is ever ravelled into one flat array.

Leaves typed on a mesh with ``AxisType.Explicit`` axes (``jax.typeof(x)``
carries their sharding) take a separate path: inner products contract over all
axes of a leaf with ``tensordot`` (no reshape of a sharded axis) and name their
replicated scalar/``(m,)`` output with ``out_sharding``; new bases and random
vectors are created with the vector's sharding (the basis axis unsplit). As JAX
requires for explicit sharding, such code runs under ``jax.set_mesh(mesh)``.
Leaves on single devices or ``Auto`` meshes take exactly the old path.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from curvlib._xp import at_set, bitcast, on_host, xp

PyTree = Any


def size(tree: PyTree) -> int:
    """Total number of scalar entries (static)."""
    return int(sum(np.prod(jnp.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)))


def dtype(tree: PyTree):
    """The promoted dtype of all leaves."""
    return jnp.result_type(*jax.tree.leaves(tree))


def leaves_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(keystr(path), leaf), ...]`` in leaf order (the paths messages name)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def leading_axis(x) -> int | None:
    """The length of ``x``'s leading axis, or ``None`` for a scalar."""
    shape = tuple(jnp.shape(x))
    return shape[0] if shape else None


def describe_shape(x) -> str:
    """``"shape (...)"``, or ``"a PRNG key of shape (...)"`` for a typed key (in messages)."""
    dt = getattr(x, "dtype", None)
    if dt is not None and jax.dtypes.issubdtype(dt, jax.dtypes.prng_key):
        return f"a PRNG key of shape {tuple(jnp.shape(x))}"
    return f"shape {tuple(jnp.shape(x))}"


def path_difference(paths_a, paths_b, name_a: str, name_b: str) -> str:
    """`` Leaves only in a: ...; only in b: ...`` (up to three each), for a message about two
    pytrees of different structures; ``""`` when they have the same leaf paths."""
    only_a = [p for p in paths_a if p not in paths_b][:3]
    only_b = [p for p in paths_b if p not in paths_a][:3]
    if not (only_a or only_b):
        return ""
    return (f" Leaves only in {name_a}: {', '.join(only_a) or 'none'}; only in {name_b}: "
            f"{', '.join(only_b) or 'none'}.")


def avals(tree: PyTree) -> tuple:
    """``((shape, dtype name), ...)`` of the leaves: a hashable part of a cache key."""
    return tuple((tuple(jnp.shape(x)), str(jnp.result_type(x))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------ explicit sharding types


def is_static_scalar(x) -> bool:
    """Whether ``x`` is a Python or NumPy int or bool, or a string: a value a function may
    use in Python (a class count, a flag), passed as given where it must be."""
    return isinstance(x, (int, str, np.integer, np.bool_))


def eval_shape(fn, *args):
    """``jax.eval_shape(fn, *args)`` with ints, bools (Python or NumPy) and strings passed
    as given (`is_static_scalar`).

    Only array leaves (and floats) are abstracted: a loss may use an ``int`` or a
    ``bool`` argument in Python (a class count, a training flag), which traced it
    cannot, as ``jax.grad(loss)(p, x, 3)`` passes it as given. Cost: one trace.
    """
    try:
        return _eval_shape(fn, args)
    except Exception as e:  # the function's own error, with a note where a newcomer erred
        nnx = sys.modules.get("flax.nnx")
        if nnx is not None and args and isinstance(args[0], nnx.Module) and hasattr(
                e, "add_note"):
            e.add_note(
                "curvlib: the parameters passed are a whole flax `nnx.Module`. A loss written "
                "against its `nnx.Param` state (`nnx.merge(graphdef, params, rest)`) needs "
                "that state: pass the `params` of `graphdef, params, rest = nnx.split(model, "
                "nnx.Param, ...)`.")
        raise


def _eval_shape(fn, args: tuple):
    leaves, tree = jax.tree.flatten(args)
    kept = {i: x for i, x in enumerate(leaves) if is_static_scalar(x)}
    if not kept:
        return jax.eval_shape(fn, *args)

    def traced(*arrays):
        it = iter(arrays)
        return fn(*jax.tree.unflatten(tree, [kept[i] if i in kept else next(it)
                                             for i in range(len(leaves))]))

    return jax.eval_shape(traced, *[x for i, x in enumerate(leaves) if i not in kept])


def explicit_sharding(x) -> NamedSharding | None:
    """``x``'s sharding *type* when it lives on a mesh with ``Explicit`` axes, else ``None``.

    Read from ``jax.typeof(x)`` (works on tracers and concrete arrays alike).
    Single-device arrays, NumPy arrays, Python scalars and arrays on all-``Auto``
    meshes give ``None``: for them every function here takes its default path.
    """
    if isinstance(x, np.ndarray | np.generic):
        return None
    s = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(s, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
        return None
    return s


def param_shardings(params: PyTree, *, replicated: bool = False) -> tuple | None:
    """The ``NamedSharding`` of every leaf of concrete, partitioned ``params``, else ``None``.

    Recorded only for leaves placed with ``NamedSharding`` s on one multi-device
    mesh whose axes are all ``AxisType.Auto``, not all fully replicated: there
    the partitioner is free to return a product all-reduced (replicated on
    every device) where the parameters were split (FSDP), so the operators
    constrain their products, the landscape its parameter-shaped vectors and
    K-FAC its factors back to the parameters' layout. ``None`` for traced
    params (inside ``jit``), single-device, replicated or explicitly typed
    arrays: those already carry their layout. ``replicated=True`` records
    fully replicated parameters too (K-FAC places its factors from them, so a
    jitted step keeps one layout and does not retrace).

    Returns:
      A tuple of shardings in leaf order, or ``None``.
    """
    out, mesh = [], None
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        if isinstance(x, jax.core.Tracer) or not isinstance(s, NamedSharding):
            return None
        if any(t != AxisType.Auto for t in s.mesh.axis_types):
            return None
        if mesh is None:
            mesh = s.mesh
        elif s.mesh != mesh:
            return None
        out.append(s)
    if mesh is None or mesh.size == 1 or (
            not replicated and all(s.is_fully_replicated for s in out)):
        return None
    return tuple(out)


def _full_spec(s: NamedSharding, ndim: int) -> tuple:
    spec = tuple(s.spec)
    return spec + (None,) * (ndim - len(spec))


def _replicated(s: NamedSharding) -> NamedSharding:
    """The replicated sharding on ``s``'s mesh (for small reduced outputs)."""
    return NamedSharding(s.mesh, PartitionSpec())


def basis_sharding(s: NamedSharding, ndim: int) -> NamedSharding:
    """``s`` with an extra unsplit leading axis: ``k`` stacked vectors each placed with ``s``
    (``ndim`` axes each)."""
    return NamedSharding(s.mesh, PartitionSpec(None, *_full_spec(s, ndim)))


def _unstacked(s: NamedSharding, ndim: int) -> NamedSharding:
    """A basis sharding (``ndim`` axes, basis axis first) less its leading axis."""
    return NamedSharding(s.mesh, PartitionSpec(*_full_spec(s, ndim)[1:]))


def _like(y, s: NamedSharding, ndim: int):
    """``y`` resharded to ``s`` where its explicit spec differs (contractions need equal specs)."""
    t = explicit_sharding(y)
    if t is not None and _full_spec(t, ndim) == _full_spec(s, ndim):
        return y
    return jax.sharding.reshard(y, NamedSharding(s.mesh, PartitionSpec(*_full_spec(s, ndim))))


# ------------------------------------------------------------- vector algebra


def acc_dtype(*dts):
    """The accumulation dtype for inner products: the promoted dtype, at least float32.

    Half-precision leaves (bfloat16, float16) are *stored* as they are but their
    inner products, norms and projections accumulate in float32.
    """
    return xp.promote_types(xp.result_type(*dts), xp.float32)


def zeros_typed(x, dt=None):
    """Zeros shaped like ``x`` (an array, a tracer or a ``ShapeDtypeStruct``) in ``dt``.

    On an ``Explicit`` mesh the zeros carry ``x``'s sharding type, so an
    accumulator started from them has the type of what is added to it (a
    ``while``/``scan`` carry must keep one type); elsewhere plain zeros.
    """
    t = jax.typeof(x)
    dt = t.dtype if dt is None else dt
    sh = explicit_sharding(x)
    if sh is not None:
        return jnp.zeros(t.shape, dt, out_sharding=sh)
    return jnp.zeros(t.shape, dt)


def gathered(x):
    """``x`` replicated when it is split over an ``Explicit`` mesh, else ``x`` itself.

    For the few dense factorisations (a QR of a basis block) that JAX refuses on
    operands split along a non-batch axis; on ``Auto`` meshes XLA's partitioner
    makes the same gather on its own.
    """
    s = explicit_sharding(x)
    if s is None or all(a is None for a in s.spec):
        return x
    return jax.sharding.reshard(x, _replicated(s))


def acc_zeros_like(tree: PyTree) -> PyTree:
    """`zeros_typed` of every leaf in its accumulation dtype (`acc_dtype`)."""
    return jax.tree.map(lambda x: zeros_typed(x, acc_dtype(jax.typeof(x).dtype)), tree)


def unaliased(tree: PyTree, *given: PyTree) -> PyTree:
    """``tree`` with no array object in two leaves, nor one of ``given``'s: those are copies.

    A state whose leaves share one buffer cannot be donated (XLA donates each
    buffer once): ``jax.jit(step, donate_argnums=...)`` on a fresh ``init``
    raised "Attempt to donate the same buffer twice". And a state leaf that *is*
    one of the user's arrays (``given``: a key, a hyperparameter) would be
    deleted with the donated state. Traced leaves are left alone (a compiled
    program's outputs are distinct buffers).
    """
    seen = {id(x) for x in jax.tree.leaves(given)}

    def one(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if id(x) in seen:
                return jnp.copy(x)
            seen.add(id(x))
        return x

    return jax.tree.map(one, tree)


def full_precision(fn):
    """``fn`` traced with matrix products at the full precision of their dtype.

    On GPUs (TF32) and TPUs (bfloat16 passes) a float32 product defaults to less: a
    Krylov basis orthogonalised that way loses orthogonality at about 1e-3, and the
    certificates built on it lose their meaning. curvlib's own inner products and basis
    operations ask for full precision; the user's product keeps the precision its
    code chose (it is never called inside). No effect on CPUs.
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if on_host():  # (NumPy's products are at the full precision of their dtype)
            return fn(*args, **kwargs)
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Real inner product ``<a, b>`` summed over all leaves.

    Accumulates in `acc_dtype` of the leaves (float32 for bfloat16 leaves).
    """
    parts = [_leaf_vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return sum(parts[1:], parts[0])


@full_precision
def _leaf_vdot(x, y):
    dt = acc_dtype(x, y)
    s = explicit_sharding(x) or explicit_sharding(y)
    if s is None:
        return xp.vdot(x, y, preferred_element_type=dt)
    # explicit types: no ravel (it would merge sharded axes); contract every axis,
    # the scalar result replicated
    nd = xp.ndim(x)
    return xp.tensordot(
        _like(x, s, nd), _like(y, s, nd), axes=nd,
        preferred_element_type=dt, out_sharding=_replicated(s),
    )


def norm(a: PyTree) -> jax.Array:
    """Euclidean norm ``||a||`` over all leaves, free of overflow and underflow.

    ``sqrt(<a, a>)`` as one inner product when the sum of squares is a normal
    number well inside the range (``N tiny / eps <= <a, a> < max``: then no square
    overflowed and the squares that underflowed weigh less than one rounding);
    otherwise the inner product again of ``c a`` with a fixed power of two ``c``
    (``2^-76`` / ``2^75`` in float32, ``2^-538`` / ``2^537`` in float64: the big and
    small scales of Blue's algorithm that LAPACK's ``nrm2`` uses), so ``||c a||``
    is exact to rounding and ``||a|| = ||c a|| / c``. The second inner product is
    taken only when needed (a loop of at most one trip: no cost on the common path,
    none under ``vmap`` when no entry needs it). A float32 vector of norm ``1e25``
    or ``1e-25`` has its norm, not ``inf`` or ``0``; ``inf`` for infinite entries,
    ``NaN`` for NaN ones, ``0`` for the zero vector (and for one whose entries
    all fall below the smallest normal number, which XLA:CPU flushes to zero).
    Accumulates in `acc_dtype`.

    Cost: one inner product; two at extreme scales. The fixed scales keep the
    rescue to one product and one scaling, no pass for ``max |a_i|``.
    """
    return _norm(a) if on_host() else _norm_differentiable(a)


def _norm(a: PyTree) -> jax.Array:
    ss = vdot(a, a)
    fi = xp.finfo(ss.dtype)
    lo = max(size(a), 1) * float(fi.tiny) / float(fi.eps)
    safe = (ss >= lo) & (ss < fi.max)  # False for NaN: the rescue reports it
    return apply_if(~safe, lambda r: _rescaled_norm(a, ss), xp.sqrt(ss))


def plain_norm(a: PyTree) -> jax.Array:
    """``sqrt(<a, a>)``: one inner product, for vectors known to be of order one.

    Only where the entries cannot be far from one (a normalised residual, a Gaussian
    direction): there it is `norm` without its range test. Anywhere a vector
    scales with an operator or with user data, use `norm`.
    """
    return xp.sqrt(vdot(a, a))


_norm_differentiable = jax.custom_jvp(_norm)


@_norm_differentiable.defjvp
def _norm_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    n = norm(a)
    return n, xp.where(n > 0, vdot(a, da) / xp.where(n > 0, n, 1), 0).astype(n.dtype)


def unit(v: PyTree, acc, norm=plain_norm) -> PyTree:
    """``v / ||v||`` (``v`` itself when zero), the norm taken in ``acc``.

    ``norm`` is `plain_norm` by default, for vectors of order one; pass `norm` for a
    vector that scales with an operator or with user data.
    """
    nv = norm(v).astype(acc)
    return scale(1.0 / xp.where(nv > 0, nv, 1.0), v)


def pow2_floor(x: jax.Array) -> jax.Array:
    """The power of two ``2^floor(log2 x)``: ``x`` divided by it is in ``[1, 2)``, exactly.

    ``x``'s exponent bits alone (its mantissa bits cleared); ``1`` for a zero, subnormal
    or non-finite ``x``. Scaling by it is exact (no rounding), so an algorithm run on
    ``v / pow2_floor(||v||)`` does the arithmetic of ``v``, scaled.
    """
    fi = xp.finfo(x.dtype)
    ok = xp.isfinite(x) & (x >= fi.tiny)
    bits = bitcast(x, xp.dtype(f"uint{fi.bits}"))
    mask = xp.asarray(~((1 << int(fi.nmant)) - 1) & ((1 << fi.bits) - 1), bits.dtype)
    return xp.where(ok, bitcast(bits & mask, x.dtype), 1.0).astype(x.dtype)


def max_abs(a: PyTree, dt=None) -> jax.Array:
    """``max_i |a_i|`` over all leaves (``0`` for an all-zero tree), in ``dt`` or `acc_dtype`."""
    leaves = jax.tree.leaves(a)
    dt = dt or acc_dtype(*leaves)
    return xp.max(xp.stack([xp.max(xp.abs(x), initial=0).astype(dt) for x in leaves]))


def _blue_scales(dt) -> tuple[float, float]:
    """``(small, big)``: the powers of two that bring tiny and huge entries into range.

    From the format alone (``p`` digits, exponents ``emin..emax``, as in LAPACK's
    ``nrm2``): ``2^-floor((emin + 1 - p) / 2)`` scales entries whose squares
    underflow up, ``2^-ceil((emax + p - 1) / 2)`` scales entries whose squares
    overflow down, both so the scaled squares and their sum stay normal.
    """
    fi = xp.finfo(dt)
    p = int(fi.nmant) + 1
    return (2.0 ** -math.floor((int(fi.minexp) + 1 - p) / 2),
            2.0 ** -math.ceil((int(fi.maxexp) + p - 1) / 2))


def _rescaled_norm(a: PyTree, ss: jax.Array) -> jax.Array:
    """``||c a|| / c`` with ``c`` the big scale when ``<a, a>`` overflowed, else the small one."""
    small, big = _blue_scales(ss.dtype)
    c = xp.where(ss < 1, small, big).astype(ss.dtype)
    b = jax.tree.map(lambda x: x.astype(ss.dtype) * c, a)
    return xp.sqrt(vdot(b, b)) / c


def add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(xp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(xp.subtract, a, b)


def scale(s, a: PyTree) -> PyTree:
    return jax.tree.map(lambda x: (s * x).astype(x.dtype), a)


def add_scale(a: PyTree, s, b: PyTree) -> PyTree:
    """``a + s * b``."""
    return jax.tree.map(lambda x, y: (x + s * y).astype(x.dtype), a, b)


def zeros_like(a: PyTree) -> PyTree:
    return jax.tree.map(xp.zeros_like, a)


def where(c, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: xp.where(c, x, y), a, b)


def astype(a: PyTree, dt) -> PyTree:
    return jax.tree.map(lambda x: x.astype(dt), a)


def all_finite(*trees: PyTree) -> jax.Array:
    """Whether every entry of every leaf of ``trees`` is finite (``True`` for no leaves)."""
    leaves = jax.tree.leaves(trees)
    if not leaves:
        return xp.asarray(True)
    return xp.all(xp.stack([xp.all(xp.isfinite(x)) for x in leaves]))


def select_tree(c, a: PyTree, b: PyTree) -> PyTree:
    """``a`` where ``c`` else ``b``, leafwise, keeping ``b``'s dtypes."""
    return jax.tree.map(lambda x, y: jnp.where(c, x, y).astype(jnp.result_type(y)), a, b)


def _draw_like(sampler, key: jax.Array, a: PyTree, dt=None, rows: int | None = None) -> PyTree:
    """``sampler(key, shape, dtype, **sharding)`` shaped like ``a`` (``rows`` of them if given).

    One draw of ``N`` numbers (``rows x N``) split over the leaves (one
    random-bits call site: XLA compiles each generator call separately, so a
    per-leaf draw costs a model with many leaves seconds of compile time). The
    numbers depend only on ``key`` and the shapes, not on the layout: leaves
    with explicit sharding types get their part of the same draw, resharded to
    their type (the draw itself is replicated: a transient ``N`` numbers per
    device and row).
    """
    leaves, treedef = jax.tree.flatten(a)
    if not leaves:
        return a
    sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
    wide = jnp.result_type(*[dt or jnp.result_type(x) for x in leaves])
    lead = () if rows is None else (rows,)
    flat = sampler(key, lead + (sum(sizes),), wide)
    axis = len(lead)
    parts = (jnp.split(flat, np.cumsum(sizes)[:-1].tolist(), axis=axis) if len(sizes) > 1
             else [flat])
    out = []
    for p, x in zip(parts, leaves, strict=True):
        y = p.reshape(lead + jnp.shape(x)).astype(dt or jnp.result_type(x))
        sx = explicit_sharding(x)
        if sx is not None:
            nd = jnp.ndim(x)
            y = _like(y, sx, nd) if rows is None else _like(y, basis_sharding(sx, nd), nd + 1)
        out.append(y)
    return jax.tree.unflatten(treedef, out)


def normal_like(key: jax.Array, a: PyTree, dt=None) -> PyTree:
    """Standard normal pytree shaped (and explicitly sharded) like ``a``."""
    return _draw_like(jax.random.normal, key, a, dt)


def flat_normal_like(key: jax.Array, like: PyTree) -> PyTree:
    """Standard normal pytree shaped like ``like`` from *one* draw of ``N`` numbers.

    Same distribution as `normal_like` (independent entries),
    but a single random-bits call site instead of one per leaf: for a model with
    tens of leaves this keeps XLA compile time of the enclosing program low (on
    XLA:CPU every threefry call site compiles on its own, about 0.8 s each on
    a 2-core machine).

    A leaf of ``like`` with an explicit sharding type (a mesh with
    ``AxisType.Explicit`` axes) gets its part resharded to that type, so the
    vector can be a tangent of such parameters. The numbers are the same on
    every layout (a key gives the single-device draw); the price is that the
    ``N`` numbers are drawn unsplit (replicated) before each device keeps its
    shard.
    """
    leaves, treedef = jax.tree.flatten(like)
    dt = dtype(like)
    sizes = [int(np.prod(jnp.shape(x), dtype=np.int64)) for x in leaves]
    flat = jax.random.normal(key, (sum(sizes),), dt)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]
    out = [
        _typed_like(p.reshape(jnp.shape(x)).astype(jnp.result_type(x)), x)
        for p, x in zip(parts, leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _typed_like(y: jax.Array, x) -> jax.Array:
    """``y`` resharded to ``x``'s explicit sharding type, if ``x`` has one."""
    s = explicit_sharding(x)
    return y if s is None else jax.sharding.reshard(y, s)


def rademacher_like(key: jax.Array, a: PyTree, dt=None, rows: int | None = None) -> PyTree:
    """Rademacher (+-1) pytree shaped (and explicitly sharded) like ``a``.

    With ``rows``, a basis of ``rows`` such vectors (leading axis) from one draw.
    """
    return _draw_like(jax.random.rademacher, key, a, dt, rows)


def apply_if(pred, fn, x):
    """``fn(x)`` if ``pred`` else ``x``, without a copy of ``x`` when not applied.

    A ``lax.cond`` whose other branch returns its operand makes XLA copy that
    operand (a Krylov basis, Kronecker factors) at every call; a loop of at most
    one trip keeps its carry in place, so work taken once in many steps costs
    nothing at the other steps. ``fn`` may ignore ``x`` (then ``x`` is the value
    to keep, shaped like ``fn``'s result).
    """
    if on_host() or not isinstance(pred, jax.core.Tracer):
        # (eager: decided here; an eager loop would compile its fresh closures every call)
        y = fn(x) if bool(pred) else x
        if on_host():  # (the NumPy steps: checked where their traced twin runs)
            return y
        if y is not x:
            _check_same_type(x, y)  # as the traced loop's carry check: both paths agree
        return jax.tree.map(jnp.asarray, y)  # (JAX arrays, as traced)
    return jax.lax.while_loop(lambda c: c[0], lambda c: (xp.asarray(False), fn(c[1])),
                              (xp.asarray(pred), x))[1]


def _shape_dtype(a) -> tuple:
    return np.shape(a), (a.dtype if hasattr(a, "dtype") else np.result_type(a))


def _check_same_type(x, y):
    """Raise ``TypeError`` unless ``y`` has ``x``'s tree structure, shapes and dtypes."""
    sx, sy = jax.tree.structure(x), jax.tree.structure(y)
    if sx != sy:
        raise TypeError(f"apply_if: fn(x) must have x's tree structure {sx}; got {sy}")
    leaves = zip(jax.tree_util.tree_leaves_with_path(x), jax.tree.leaves(y), strict=True)
    for (path, a), b in leaves:
        ta, tb = _shape_dtype(a), _shape_dtype(b)
        if ta != tb:
            raise TypeError(f"apply_if: fn(x){jax.tree_util.keystr(path)} must have x's shape "
                            f"and dtype {ta}; got {tb}")


# --------------------------------------------------------- basis (leading m)


def basis_zeros(a: PyTree, m: int, dt=None) -> PyTree:
    """A basis of ``m`` zero vectors shaped like ``a``.

    A leaf with an explicit sharding type gives a basis leaf typed like it, with
    the leading (basis) axis unsplit: ``P(None, *spec)``.
    """
    def zeros(x):
        shape = (m,) + xp.shape(x)
        s = explicit_sharding(x)
        if s is None:
            return xp.zeros(shape, dt or x.dtype)
        return xp.zeros(shape, dt or x.dtype, out_sharding=basis_sharding(s, xp.ndim(x)))

    return jax.tree.map(zeros, a)


def basis_get(Q: PyTree, i) -> PyTree:
    return jax.tree.map(lambda q: q[i], Q)


def basis_set(Q: PyTree, i, v: PyTree) -> PyTree:
    return jax.tree.map(lambda q, x: at_set(q, i, x.astype(q.dtype)), Q, v)


@full_precision
def basis_project(Q: PyTree, v: PyTree, acc_dtype=None) -> jax.Array:
    """Coefficients ``Q v`` (shape ``(m,)``): one matrix-vector product per leaf."""
    parts = []
    for q, x in zip(jax.tree.leaves(Q), jax.tree.leaves(v), strict=True):
        sx, sq = explicit_sharding(x), explicit_sharding(q)
        if sx is not None or sq is not None:
            # explicit types: contract all vector axes in place (no reshape)
            nd = xp.ndim(x)
            s = sx if sx is not None else _unstacked(sq, nd + 1)
            dt = acc_dtype or xp.result_type(q, x)
            parts.append(xp.tensordot(
                _like(q, basis_sharding(s, nd), nd + 1), _like(x, s, nd).astype(q.dtype), axes=nd,
                preferred_element_type=dt, out_sharding=_replicated(s),
            ))
            continue
        q2 = q.reshape(q.shape[0], -1)
        x1 = x.reshape(-1)
        dt = acc_dtype or xp.result_type(q2, x1)
        parts.append(
            xp.dot(q2, x1.astype(q2.dtype), preferred_element_type=_dot_dtype(q2, dt)).astype(dt)
        )
    return sum(parts[1:], parts[0])


def _dot_dtype(q, dt):
    """Accumulation type of a contraction with basis leaf ``q`` toward result type ``dt``.

    A basis stored in float32 under wider vectors (``basis_dtype=float32`` for a
    float64 model) contracts natively in float32: asking for float64 output
    makes XLA:CPU widen the whole basis leaf into a temporary, which undoes the
    storage saving, while the basis itself only carries float32 accuracy.
    Narrower storage (bfloat16) keeps the float32-or-wider accumulation.
    """
    if xp.dtype(q.dtype).itemsize >= 4 and xp.dtype(q.dtype).itemsize < xp.dtype(dt).itemsize:
        return q.dtype
    return dt


@full_precision
def basis_combine(Q: PyTree, c: jax.Array, like: PyTree | None = None) -> PyTree:
    """``Q^T c``: the combination ``sum_i c_i q_i`` as a vector pytree.

    With ``like``, the result has ``like``'s leaf dtypes and accumulates in them:
    a basis stored in a lower precision (``basis_dtype``) is combined without
    rounding the result to the storage dtype.
    """
    if like is None:
        return jax.tree.map(lambda q: xp.tensordot(c.astype(q.dtype), q, axes=1), Q)

    def comb(q, x):
        dt = xp.result_type(x)
        out = xp.tensordot(c.astype(q.dtype), q, axes=1,
                            preferred_element_type=_dot_dtype(q, dt))
        return out.astype(dt)

    return jax.tree.map(comb, Q, like)


@full_precision
def basis_matmul(C: jax.Array, Q: PyTree) -> PyTree:
    """``C Q``: a new basis whose rows are combinations of ``Q``'s rows."""
    return jax.tree.map(lambda q: xp.tensordot(C.astype(q.dtype), q, axes=1), Q)


_GEMV_ROWS = 8  # basis_gram: at most this many rows of P ...
_GEMV_MIN_SIZE = 1 << 15  # ... of at least this length go through matrix-vector products


def sign_fixed(Q: PyTree) -> PyTree:
    """``Q`` with each vector's sign chosen so that its entry of largest magnitude is
    positive (``+a`` where ``a`` and ``-a`` tie): one answer for an eigenvector whatever
    rotation or eigensolver produced it. Reductions only (no gather: sharded vectors stay
    in place). Cost: one pass over ``Q``."""
    leaves, treedef = jax.tree.flatten(Q)
    if not leaves:
        return Q
    k, dt = leaves[0].shape[0], xp.result_type(*leaves)
    axes = lambda x: tuple(range(1, x.ndim))
    hi = xp.max(xp.stack([xp.max(x, axis=axes(x), initial=-xp.inf).astype(dt)
                          for x in leaves]), axis=0)
    lo = xp.min(xp.stack([xp.min(x, axis=axes(x), initial=xp.inf).astype(dt)
                          for x in leaves]), axis=0)
    sign = xp.where(hi >= -lo, 1, -1)  # NaN rows compare False: -1 * NaN is NaN
    return jax.tree.unflatten(treedef, [x * sign.reshape((k,) + (1,) * (x.ndim - 1)).astype(
        x.dtype) for x in leaves])


@full_precision
def basis_gram(P: PyTree, Q: PyTree, acc_dtype=None) -> jax.Array:
    """Gram matrix ``P Q^T`` of two bases (shape ``(p, q)``)."""
    parts = []
    for a, b in zip(jax.tree.leaves(P), jax.tree.leaves(Q), strict=True):
        s = explicit_sharding(a) or explicit_sharding(b)
        if s is not None:
            # explicit types: contract all vector axes in place (no reshape); both
            # bases laid out as P(None, *vector spec)
            nd = xp.ndim(a)
            s = basis_sharding(_unstacked(s, nd), nd - 1)
            dt = acc_dtype or xp.result_type(a, b)
            axes = tuple(range(1, nd))
            parts.append(xp.tensordot(
                _like(a, s, nd), _like(b, s, nd), axes=(axes, axes),
                preferred_element_type=dt, out_sharding=_replicated(s),
            ))
            continue
        a2 = a.reshape(a.shape[0], -1)
        b2 = b.reshape(b.shape[0], -1)
        dt = acc_dtype or xp.result_type(a2, b2)
        if a2.shape[0] <= _GEMV_ROWS and a2.shape[1] >= _GEMV_MIN_SIZE:
            # a few long rows: one matrix-vector product each. XLA:CPU runs a
            # (p, N) x (N, q) product with small p and large N up to 15x slower
            # than p products Q v (measured at N = 470k, q = 80); each contracts as
            # basis_project does (a narrower basis is not widened into a copy)
            acc = _dot_dtype(b2, dt)
            parts.append(xp.stack([
                xp.dot(b2, a2[i].astype(b2.dtype), preferred_element_type=acc).astype(dt)
                for i in range(a2.shape[0])]))
            continue
        parts.append(xp.dot(a2, b2.T, preferred_element_type=dt))
    return sum(parts[1:], parts[0])


def basis_size(Q: PyTree) -> int:
    return int(jax.tree.leaves(Q)[0].shape[0])


def explicit_spec(x):
    """``(mesh axis names, padded spec)`` of an explicitly typed leaf, else ``None``."""
    s = explicit_sharding(x)
    if s is None:
        return None
    spec = tuple(s.spec) + (None,) * (jnp.ndim(x) - len(s.spec))
    return tuple(s.mesh.axis_names), spec
