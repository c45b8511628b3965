"""Layer 1: curvature operators on pytrees.

Every operator turns a scalar loss (or a model and an output loss) at a point
into a *linear function on pytrees*: ``v -> C v`` with ``v`` shaped like the
parameters. The returned matvecs are :class:`jax.tree_util.Partial` objects:
their arrays (parameters, batch, linearisation residuals) are pytree leaves,
so passing a matvec into a ``jax.jit``-compiled function keeps those arrays
traced inputs instead of baking them into the program as constants.

Costs, in units of one gradient evaluation ``G`` (forward + backward):

=================  ==========================  ==============================
operator           one product                 memory held between products
=================  ==========================  ==============================
``"linearize"``    ~1 G (tangent pass only)    the linearisation residuals
``"fwd-rev"``      ~2-3 G (forward-over-rev)   params and batch only
``"rev-rev"``      ~3-4 G (reverse-over-rev)   params and batch only
``ggn_matvec``     1 jvp + 1 vjp of the model  model residuals
=================  ==========================  ==============================

References:
  Pearlmutter, *Fast exact multiplication by the Hessian*, Neural Comput. 1994.
  Schraudolph, *Fast curvature matrix-vector products for second-order gradient
  descent*, Neural Comput. 2002.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from curvlib import _tree

PyTree = Any

MODES = ("linearize", "fwd-rev", "rev-rev")


# ------------------------------------------------------------------ caching


def _weak_cache(factory: Callable) -> Callable:
    """Memoise ``factory(fn, *rest)`` without keeping ``fn`` (a user callable) alive.

    The product builders below return closures over a user function; caching
    them makes equal calls return the *same* object, so a
    :class:`~jax.tree_util.Partial` built on it has an equal tree definition and
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


# ------------------------------------------------------------------ checks


def _check_scalar(fun: Callable, name: str, *example) -> None:
    out = jax.eval_shape(fun, *example)
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        shapes = [x.shape for x in leaves]
        raise TypeError(
            f"`{name}` must return a scalar (shape ()) loss; it returned leaves of shapes "
            f"{shapes}. Reduce it, e.g. with jnp.mean, before asking for curvature."
        )
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must return a real floating scalar; got dtype {leaves[0].dtype}."
        )


def _signature(tree: PyTree):
    """Hashable (structure, leaf shapes, explicit specs) of ``tree``: what a tangent must match."""
    leaves = jax.tree.leaves(tree)
    return (
        jax.tree.structure(tree),
        tuple(tuple(jnp.shape(x)) for x in leaves),
        tuple(_explicit_spec(x) for x in leaves),
    )


def _explicit_spec(x):
    """``(mesh axis names, padded spec)`` of an explicitly typed leaf, else ``None``."""
    s = _tree.explicit_sharding(x)
    if s is None:
        return None
    spec = tuple(s.spec) + (None,) * (jnp.ndim(x) - len(s.spec))
    return tuple(s.mesh.axis_names), spec


@_weak_cache
def _checked(product: Callable, signature) -> Callable:
    """``product(*data, v)`` that first checks ``v`` against the parameters' signature.

    Cached so that the same product and signature give the *same* function object:
    a :class:`~jax.tree_util.Partial` built on it has an equal tree definition
    across calls, and jitted code taking it as an argument is not recompiled.
    The check is static (structure and shapes), so it costs nothing under jit
    and sees per-example shapes under ``vmap``. Where ``params`` carry an explicit
    sharding type (a mesh with ``AxisType.Explicit`` axes), the tangent must carry
    the same one: JAX's differentiation rejects a tangent typed otherwise, and the
    error here names the leaf and both types.
    """
    treedef, shapes, specs = signature

    def matvec(*args):
        *data, v = args
        vdef = jax.tree.structure(v)
        leaves = jax.tree.leaves(v)
        vshapes = tuple(tuple(jnp.shape(x)) for x in leaves)
        if vdef != treedef or vshapes != shapes:
            raise ValueError(
                "the tangent must match `params` in pytree structure and leaf shapes; got "
                f"params: {treedef} with shapes {shapes} and tangent: {vdef} with shapes "
                f"{vshapes}."
            )
        for i, (x, want) in enumerate(zip(leaves, specs, strict=True)):
            if want is not None and _explicit_spec(x) != want:
                raise ValueError(
                    "`params` have explicit sharding types (a mesh with AxisType.Explicit "
                    "axes), so the tangent must carry the same sharding; leaf "
                    f"{i} of the tangent is typed {jax.typeof(x).str_short()} but the params' "
                    f"leaf has spec {want[1]} on mesh axes {want[0]}. Place start vectors like "
                    "the params (`jax.device_put(v, params_sharding)` or "
                    "`jax.sharding.reshard`)."
                )
        return product(*data, v)

    return matvec


def _cast_like(v: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda x, p: jnp.asarray(x).astype(jnp.result_type(p)), v, like)


# ---------------------------------------------------------------- products


def hvp(fun: Callable, params: PyTree, tangent: PyTree, *args) -> PyTree:
    """One Hessian-vector product ``H v`` of ``fun(params, *args)``, forward-over-reverse.

    ``H v = d/de grad f(params + e v) |_{e=0}``, computed as ``jax.jvp`` of
    ``jax.grad`` (Pearlmutter 1994). Cost: about two to three gradient
    evaluations; memory: one gradient's activations.

    Args:
      fun: scalar function ``fun(params, *args)``.
      params: the point, any pytree of float arrays.
      tangent: the vector ``v``, same structure and shapes as ``params``.
      *args: extra arguments of ``fun`` (batch, targets, ...); not differentiated.

    Returns:
      ``H v`` as a pytree shaped like ``params``.

    Raises:
      ValueError: if ``tangent`` and ``params`` differ in structure or shapes.
      TypeError: if ``fun`` does not return a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = lambda p: jnp.sum(p["w"] ** 3)
      >>> hvp(f, {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([1.0, 0.0])})["w"].tolist()
      [6.0, 0.0]
    """
    _tree.check_same_structure(params, tangent, "params", "tangent")
    _check_scalar(fun, "fun", params, *args)
    return _hvp_fwd_rev(fun)(params, args, _cast_like(tangent, params))


@_weak_cache
def _hvp_fwd_rev(fun):
    def matvec(params, args, v):
        grad = lambda p: jax.grad(fun)(p, *args)
        return jax.jvp(grad, (params,), (_cast_like(v, params),))[1]

    return matvec


@_weak_cache
def _hvp_rev_rev(fun):
    def matvec(params, args, v):
        v = _cast_like(v, params)
        inner = lambda p: _tree.vdot(jax.grad(fun)(p, *args), v)
        return jax.grad(inner)(params)

    return matvec


def _call_linearized(lin, v):
    return lin(v)


class _SameProgram:
    """A linearised function's static part, equal to another that replays the same program.

    ``jax.linearize`` returns a :class:`~jax.tree_util.Partial` whose residuals
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
        return isinstance(other, _SameProgram) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


def _stable_linearized(lin):
    if isinstance(lin, Partial):
        return Partial(_SameProgram(lin.func), *lin.args, **lin.keywords)
    return lin


# ---------------------------------------------------------------- sharding


def _param_shardings(params: PyTree):
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
def _sharded(product, layout):
    """``product`` with its output constrained to ``layout`` (from :func:`_param_shardings`)."""
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


# ----------------------------------------------------------- microbatching


def microbatch_mean(fn: Callable, batch: PyTree, microbatch_size: int | None) -> PyTree:
    """Mean of ``fn`` over microbatches of ``batch``, weighted by their sizes.

    For ``fn(b)`` that is itself a mean over the leading axis of ``b`` (a mean
    loss, its gradient, a curvature product), the result equals ``fn(batch)``
    while peak memory is that of one microbatch: full chunks run under
    ``lax.scan``; a shorter final chunk, if any, runs once more with its own
    weight.

    Args:
      fn: ``fn(chunk) -> pytree`` of float arrays.
      batch: pytree whose leaves share a leading (sample) axis of length ``n``.
      microbatch_size: samples per chunk; ``None`` or ``>= n`` calls ``fn(batch)``.

    Returns:
      ``sum_c (n_c / n) fn(chunk_c)``.

    Raises:
      ValueError: for an empty ``batch``, leaves without a shared leading axis,
        or ``microbatch_size < 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(10.0)  # chunks of 4, 4 and a remainder of 2
      >>> float(microbatch_mean(jnp.mean, x, 4)), float(jnp.mean(x))
      (4.5, 4.5)
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("`batch` is an empty pytree; expected arrays with a leading sample axis.")
    n = leaves[0].shape[0]
    for x in leaves:
        if x.shape[:1] != (n,):
            raise ValueError(
                f"every leaf of `batch` must share the leading sample axis; got {n} and {x.shape}."
            )
    if microbatch_size is not None:
        if isinstance(microbatch_size, bool) or not isinstance(
            microbatch_size, (int, np.integer)
        ):
            raise ValueError(f"`microbatch_size` must be an int or None; got {microbatch_size!r}.")
        microbatch_size = int(microbatch_size)
        if microbatch_size < 1:
            raise ValueError(f"`microbatch_size` must be >= 1; got {microbatch_size}.")
    if microbatch_size is None or microbatch_size >= n:
        return fn(batch)
    num_full = n // microbatch_size
    rem = n - num_full * microbatch_size
    head = jax.tree.map(lambda x: _chunks(x, num_full, microbatch_size), batch)
    out_shape = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], head))
    # accumulate half-precision outputs in float32 (many bfloat16 partial sums lose digits)
    acc_dt = lambda dt: _tree.acc_dtype(dt) if jnp.issubdtype(dt, jnp.floating) else dt
    init = jax.tree.map(lambda s: _zeros_typed(s, acc_dt(s.dtype)), out_shape)

    def body(acc, chunk):
        return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, fn(chunk)), None

    total, _ = jax.lax.scan(body, init, head)
    out = jax.tree.map(lambda t: t * (microbatch_size / n), total)
    if rem:
        tail = jax.tree.map(lambda x: x[num_full * microbatch_size :], batch)
        out = jax.tree.map(lambda o, t: o + t.astype(o.dtype) * (rem / n), out, fn(tail))
    return jax.tree.map(lambda o, s: o.astype(s.dtype), out, out_shape)


def _chunks(x, num_full: int, size: int):
    """``x[:num_full * size]`` as chunks of ``size`` samples, shape ``(num_full, size, ...)``.

    Contiguous chunks, except for a leaf whose sample axis is split over mesh
    axes of an explicit sharding type: there a contiguous chunk would straddle
    devices (a reshape JAX rejects), so the chunks are taken *strided* (chunk
    ``c`` holds samples ``c, c + num_full, c + 2 num_full, ...``). Each chunk is
    then split over the same devices as the batch and no data moves; the mean
    over chunks is unchanged.
    """
    s = _tree.explicit_sharding(x)
    spec = None if s is None else tuple(s.spec) + (None,) * (x.ndim - len(s.spec))
    if spec is None or spec[0] is None:
        return x[: num_full * size].reshape((num_full, size) + x.shape[1:])
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = int(np.prod([s.mesh.shape[a] for a in names]))
    n = x.shape[0]
    if n != num_full * size or size % shards:
        raise ValueError(
            f"the batch's sample axis (length {n}) is explicitly sharded over {shards} devices "
            f"(mesh axes {names}); `microbatch_size` must then divide it and be a multiple of "
            f"{shards}; got {size}. (JAX's explicit sharding cannot slice a sharded axis into "
            "pieces that do not split evenly over its devices.)"
        )
    strided = jax.sharding.NamedSharding(
        s.mesh, jax.sharding.PartitionSpec(spec[0], None, *spec[1:])
    )
    return jnp.swapaxes(jnp.reshape(x, (size, num_full) + x.shape[1:], out_sharding=strided), 0, 1)


def _zeros_typed(s, dt):
    """Zeros shaped like ``s`` (a ``ShapeDtypeStruct``), keeping an explicit sharding type."""
    sh = getattr(s, "sharding", None)
    mesh = getattr(sh, "mesh", None)
    if mesh is not None and not mesh.empty and jax.sharding.AxisType.Explicit in tuple(
        mesh.axis_types
    ):
        return jnp.zeros(s.shape, dt, out_sharding=sh)
    return jnp.zeros(s.shape, dt)


@_weak_cache
def _microbatched(product, microbatch_size):
    def matvec(params, args, v):
        batch, rest = args[0], args[1:]
        return microbatch_mean(
            lambda b: product(params, (b,) + tuple(rest), v), batch, microbatch_size
        )

    return matvec


# ------------------------------------------------------------------ public


def hessian_matvec(
    fun: Callable,
    params: PyTree,
    *args,
    mode: str | None = None,
    microbatch_size: int | None = None,
) -> Partial:
    """The Hessian of ``fun(params, *args)`` as a reusable linear function ``v -> H v``.

    With the default ``mode="linearize"`` the gradient is linearised once
    (``jax.linearize(jax.grad(fun))``) and each product replays only the
    tangent pass, reusing the stored residuals: the cheapest product when many
    are needed (Lanczos, CG). ``"fwd-rev"`` recomputes ``jax.jvp(jax.grad)``
    each time (no residual memory) and ``"rev-rev"`` differentiates
    ``<grad f, v>`` in reverse mode; both are offered for benchmarking and for
    memory-bound models.

    Microbatching: with ``microbatch_size`` set, ``args[0]`` is a batch (pytree
    with a leading sample axis) over which ``fun`` is a *mean*; every product is
    accumulated over chunks under ``lax.scan`` so memory is bounded by one chunk.
    The default mode is then ``"fwd-rev"`` (a linearisation would store every
    chunk's residuals).

    The result is a :class:`jax.tree_util.Partial`: pass it as an argument to
    jitted code and its arrays stay traced inputs. It composes with ``jax.vmap``
    over tangents (a block product ``V -> H V``).

    Sharding: when ``params`` are arrays placed with ``NamedSharding`` on an
    ``Auto`` mesh (FSDP-style), every product is constrained to the parameters'
    layout, so ``H v`` stays sharded like ``params`` instead of being
    all-reduced onto every device.

    Args:
      fun: scalar function ``fun(params, *args)``.
      params: the point; any pytree of float arrays.
      *args: extra, non-differentiated arguments of ``fun``.
      mode: ``"linearize"``, ``"fwd-rev"`` or ``"rev-rev"``.
      microbatch_size: optional chunk size over the leading axis of ``args[0]``.

    Returns:
      ``matvec`` with ``matvec(v) == H v`` for ``v`` shaped like ``params``.

    Raises:
      TypeError: if ``fun`` does not return a float scalar.
      ValueError: for an unknown ``mode`` or a microbatched linearisation; when
        called, for a tangent whose structure or shapes differ from ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)  # H = 2 x^T x / n
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> Hv = hessian_matvec(loss, {"w": jnp.zeros(2)}, x)
      >>> Hv({"w": jnp.array([1.0, 1.0])})["w"].tolist()
      [1.0, 4.0]
      >>> jax.jit(lambda mv, v: mv(v))(Hv, {"w": jnp.array([0.0, 1.0])})["w"].tolist()
      [0.0, 4.0]
    """
    _tree.check_float_tree(params, "params")
    _check_scalar(fun, "fun", params, *args)
    if mode is None:
        mode = "linearize" if microbatch_size is None else "fwd-rev"
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}; got {mode!r}.")
    if microbatch_size is not None:
        if not args:
            raise ValueError(
                "`microbatch_size` needs a batch as the first extra argument of `fun`."
            )
        if mode == "linearize":
            raise ValueError(
                "`mode='linearize'` stores every microbatch's residuals; use 'fwd-rev' or "
                "'rev-rev' with `microbatch_size`."
            )
    layout = _param_shardings(params)
    if mode == "linearize":
        _, lin = jax.linearize(lambda p: jax.grad(fun)(p, *args), params)
        lin = _stable_linearized(lin)
        return Partial(_checked(_sharded(_call_linearized, layout), _signature(params)), lin)
    product = _hvp_fwd_rev(fun) if mode == "fwd-rev" else _hvp_rev_rev(fun)
    if microbatch_size is not None:
        product = _microbatched(product, int(microbatch_size))
    return Partial(_checked(_sharded(product, layout), _signature(params)), params, tuple(args))


@_weak_cache
def _ggn_product(model_fn, loss_fn):
    def matvec(params, args, loss_args, v):
        v = _cast_like(v, params)
        outputs, jvp_fn = jax.linearize(lambda p: model_fn(p, *args), params)
        jv = jvp_fn(v)
        loss_grad = lambda o: jax.grad(loss_fn)(o, *loss_args)
        hjv = jax.jvp(loss_grad, (outputs,), (jv,))[1]
        (out,) = jax.linear_transpose(jvp_fn, params)(hjv)
        return out

    return matvec


def _ggn_microbatched(model_fn, loss_fn, microbatch_size):
    product = _ggn_product(model_fn, loss_fn)
    return _ggn_mb(product, microbatch_size)


@_weak_cache
def _ggn_mb(product, microbatch_size):
    def matvec(params, args, loss_args, v):
        batch = (args, loss_args)
        return microbatch_mean(
            lambda b: product(params, b[0], b[1], v), batch, microbatch_size
        )

    return matvec


def ggn_matvec(
    model_fn: Callable,
    loss_fn: Callable,
    params: PyTree,
    *args,
    loss_args: tuple = (),
    microbatch_size: int | None = None,
) -> Partial:
    """Generalised Gauss-Newton product ``v -> J^T H_l J v``.

    ``J`` is the Jacobian of ``outputs = model_fn(params, *args)`` with respect to
    ``params`` and ``H_l`` the Hessian of ``loss_fn(outputs, *loss_args)`` with
    respect to the outputs (Schraudolph 2002; Martens 2010). For a mean squared
    error ``loss_fn(o) = sum(o**2) / (2n)`` this is ``J^T J / n``; for any convex
    ``loss_fn`` it is positive semi-definite, which makes it the curvature of
    choice for Hessian-free optimisation.

    Cost per product: one linearised forward pass of the model, one tangent
    (jvp) pass, one transposed (vjp) pass, and an output-space HVP of the loss.

    Args:
      model_fn: ``model_fn(params, *args) -> outputs`` (any pytree).
      loss_fn: ``loss_fn(outputs, *loss_args) -> scalar``.
      params: the point.
      *args: inputs of ``model_fn``.
      loss_args: extra inputs of ``loss_fn`` (targets, masks).
      microbatch_size: optional chunk size over the leading axis of *every*
        array in ``args`` and ``loss_args`` (the loss must be a mean over it).

    Returns:
      ``matvec`` (a :class:`jax.tree_util.Partial`) with ``matvec(v) = G v``.

    Raises:
      TypeError: if ``loss_fn`` does not return a float scalar.
      ValueError: when called, for a tangent whose structure or shapes differ
        from ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> model = lambda p, x: jnp.tanh(x @ p)
      >>> mse = lambda o, y: jnp.sum((o - y) ** 2) / (2 * o.shape[0])
      >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.zeros(2)
      >>> G = ggn_matvec(model, mse, jnp.zeros(2), x, loss_args=(y,))
      >>> G(jnp.array([1.0, 1.0])).tolist()  # J = x at p = 0: J^T J / n
      [0.5, 0.5]

    References:
      N. Schraudolph, *Fast curvature matrix-vector products for second-order
      gradient descent*, Neural Comput. 2002; J. Martens, *Deep learning via
      Hessian-free optimization*, ICML 2010.
    """
    _tree.check_float_tree(params, "params")
    loss_args = tuple(loss_args)
    out_shape = jax.eval_shape(lambda p: model_fn(p, *args), params)
    example_out = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
    _check_scalar(loss_fn, "loss_fn", example_out, *loss_args)
    if microbatch_size is None:
        product = _ggn_product(model_fn, loss_fn)
    else:
        if not args:
            raise ValueError("`microbatch_size` needs batched inputs in `args`.")
        product = _ggn_microbatched(model_fn, loss_fn, int(microbatch_size))
    product = _checked(_sharded(product, _param_shardings(params)), _signature(params))
    return Partial(product, params, tuple(args), loss_args)


def gradient(fun: Callable, params: PyTree, *args, microbatch_size: int | None = None):
    """``(value, grad)`` of a mean loss, optionally accumulated over microbatches of ``args[0]``.

    A convenience used by the landscape and optimiser layers; with
    ``microbatch_size`` the memory is bounded by one chunk and the result equals
    the full-batch ``jax.value_and_grad``. Cost: one gradient evaluation.

    Args:
      fun: scalar mean loss ``fun(params, *args)``.
      params: the point.
      *args: extra arguments; with ``microbatch_size``, ``args[0]`` is the batch.
      microbatch_size: optional chunk size over the leading axis of ``args[0]``.

    Returns:
      ``(value, grad)`` with ``grad`` shaped like ``params``.

    Raises:
      TypeError: if ``fun`` does not return a float scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, x: jnp.mean((x - p) ** 2)
      >>> value, g = gradient(loss, 1.0, jnp.arange(5.0), microbatch_size=2)
      >>> round(float(value), 6), round(float(g), 6)
      (3.0, -2.0)
    """
    _check_scalar(fun, "fun", params, *args)
    vg = jax.value_and_grad(fun)
    if microbatch_size is None:
        return vg(params, *args)
    batch, rest = args[0], args[1:]
    return microbatch_mean(lambda b: vg(params, b, *rest), batch, microbatch_size)
