"""Shared helpers of `curvlib.landscape`: the data convention, sample weights, input checks.

Data convention: ``loss_fn(params, batch)`` is the *mean* loss over the leading
axis of ``batch``; ``data`` is a pytree of arrays whose leading axis is the
sample order, and ``L_m(w) = loss_fn(w, data[:m])``.

The sample count is data, not shape
-----------------------------------
Every quantity of the landscape module is a weighted sum of per-sample losses
``sum_i w_i l_i(w)`` over the fixed-size ``data`` array, with ``l_i(w) =
loss_fn(w, data[i:i+1])`` evaluated under ``jax.vmap``:

============================  ==================================================
quantity                      weights ``w_i`` (``i = 0 .. n-1``)
============================  ==================================================
``L_k``                       ``1/k`` for ``i < k``, else 0
``L_{k+1} - L_k``             ``-1/(k(k+1))`` for ``i < k``, ``1/(k+1)`` at ``i = k``
``l_{k+1}``                   1 at ``i = k``, else 0
============================  ==================================================

The weights are computed inside the compiled program from ``k``, so one program
serves every ``k``: a curve over many ``k`` compiles once. The second row is the
exact identity ``L_{k+1} - L_k = (l_{k+1} - L_k) / (k + 1)`` for mean losses: no
two nearly equal means are ever subtracted. Samples that carry no weight are
replaced by sample ``k + 1`` before the loss sees them, so values beyond the
first ``k + 1`` samples of ``data`` (padding, NaN) never reach a result or a
gradient.

Cost: without microbatching every pass evaluates all ``n`` samples of ``data``
(those beyond ``k + 1`` at zero weight). With ``microbatch_size = m`` a pass
runs a ``lax.fori_loop`` over only the chunks of ``m`` samples that hold
weighted samples (``ceil((k + 1) / m)`` of them for an increment), so peak
memory is one chunk and no chunk past sample ``k + 1`` is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from curvlib import _tree, _validate, _xp
from curvlib._compile import compile_behind, quick_jit, same_function, stable_linearized, tracing
from curvlib._xp import xp

PyTree = Any

MEAN, INCREMENT, SAMPLE = "mean", "increment", "sample"
TWO_DRAWS = "a standard error needs two draws"
SIGMA = "(the probe's per-coordinate standard deviation)"  # `sigma` in the messages


# ----------------------------------------------------------------- checks


def num_samples(data: PyTree) -> int:
    """Length of the shared leading (sample) axis of ``data``."""
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("`data` is an empty pytree; expected arrays with a leading sample axis.")
    shapes = [jnp.shape(x) for x in leaves]
    if any(len(s) == 0 for s in shapes):
        raise ValueError("every leaf of `data` needs a leading sample axis; got a scalar leaf.")
    n = shapes[0][0]
    if any(s[0] != n for s in shapes):
        raise ValueError(
            f"every leaf of `data` must share the leading sample axis; got lengths "
            f"{sorted({s[0] for s in shapes})}."
        )
    return int(n)


def check_k(k, data: PyTree, name: str = "num_examples"):
    """Validate the sample count ``k``: ``1 <= k`` and ``k + 1 <= n`` (``L_{k+1}`` must exist).

    ``name`` is the argument's name in the messages. ``k`` is data, not
    shape: a Python or NumPy int (or a concrete integer array) is checked here
    and passed to the compiled programs as a traced scalar. A traced ``k``
    (inside the user's ``jax.jit``) is accepted as is; out-of-range values then
    give NaN results (`sample_weights`).
    """
    n = num_samples(data)
    if isinstance(k, jax.core.Tracer):
        if not jnp.issubdtype(k.dtype, jnp.integer) or k.ndim:
            raise ValueError(f"`{name}` (k) must be an integer scalar; got a traced "
                             f"{k.dtype}{k.shape}.")
        return k
    if isinstance(k, (jax.Array, np.ndarray)) and k.ndim == 0 and jnp.issubdtype(
        k.dtype, jnp.integer
    ):
        k = int(k)
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"`{name}` (k, the sample count) must be an int; got {k!r}.")
    k = int(k)
    if k < 1:
        raise ValueError(
            f"`{name}` (k) must be >= 1 (L_k is a mean over the first k samples); got {k}."
        )
    if k + 1 > n:
        raise ValueError(
            f"`{name}` (k): k + 1 = {k + 1} exceeds the number of samples in `data` "
            f"({n}); the increment "
            "L_{k+1} - L_k needs sample k+1."
        )
    return k


def check_subspace(dim, params: PyTree, basis_size=None, name: str = "dim") -> int:
    """``dim`` checked: a subspace dimension ``1 <= D < N`` (``N`` = parameter count).

    With ``basis_size`` (a Krylov basis size for the ``D`` wanted vectors),
    also ``D + 2 <= basis_size <= N``.
    """
    n = _tree.size(params)
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(
            f"`{name}` (the subspace dimension D) must be a positive int; got {dim!r}."
        )
    if dim >= n:
        raise ValueError(
            f"`{name}` = {dim} (the subspace dimension D) must be smaller than the parameter "
            f"count N = {n}; with D = N the full-space criterion `delta2_full_mc` is the same "
            "quantity."
        )
    if basis_size is None:
        return int(dim)
    if isinstance(basis_size, (bool, np.bool_)) or not isinstance(basis_size, (int, np.integer)):
        raise ValueError(
            f"`basis_size` (the Krylov basis size) must be an int; got {basis_size!r}."
        )
    if not min(dim + 2, n) <= basis_size <= n:
        raise ValueError(
            f"`basis_size` = {basis_size} must satisfy D + 2 <= basis_size <= N (or = N): the "
            f"Krylov basis holds the D = {dim} wanted eigenvectors, a guard and a remainder, "
            f"and at most as many vectors as the N = {n} parameters."
        )
    return int(dim)


def check_problem(loss_fn: Callable, params: PyTree, data: PyTree, k):
    """The checks every landscape entry point makes at its boundary: ``(k, loss_fn)`` checked.

    ``k`` (`check_k`), ``params`` (real floating leaves) and ``loss_fn``:
    ``loss_fn(params, data)`` must be one scalar, the mean loss over the batch
    (one abstract evaluation, ``jax.eval_shape``: no computation). A per-sample
    loss (shape ``(n,)``) is refused here, as by every curvlib entry point
    that takes a loss; the weighted sums of per-sample losses would otherwise
    broadcast it into wrong numbers. Internals below the boundary do not
    check again.

    The ``loss_fn`` returned is keyed by its programs on one sample (the shape
    of every landscape quantity: per-sample losses under ``vmap``) and on the
    whole ``data`` (the mean check's batched loss), so a fresh closure
    computing the same loss compiles nothing again
    (`curvlib._compile.same_function`); the mean check over microbatches, which
    evaluates it on chunks, uses the function itself.
    """
    k = check_k(k, data)
    _validate.float_leaves(params, "params")
    _validate.functions(loss_fn, "loss_fn")
    _validate.output(jax.eval_shape(loss_fn, params, data), "loss_fn", has_aux=None)
    one = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *jnp.shape(x)[1:]), x.dtype), data)
    return k, same_function(loss_fn, params, one, also=((params, data),))


# ----------------------------------------------------------- static slices


def take(data: PyTree, start: int, stop: int) -> PyTree:
    """``data[start:stop]`` along the sample axis (static bounds).

    A leaf whose sample axis is split over mesh axes of an explicit sharding
    type (``AxisType.Explicit``) stays split when ``stop - start`` is a multiple
    of the number of devices it is split over. Otherwise (JAX cannot slice a
    sharded axis into a length that does not split evenly) the smallest
    evenly-splitting window holding the samples is gathered, so the slice has
    its sample axis unsplit (each device then holds, and evaluates the loss on,
    all of its ``stop - start`` samples); its other axes keep their sharding.
    Values are those of the single-device slice.
    """
    return jax.tree.map(lambda x: _take_leaf(x, start, stop), data)


def _sample_shards(x) -> tuple[NamedSharding | None, tuple | None, int]:
    """``(sharding, full spec, devices the sample axis is split over)`` of an explicit leaf."""
    s = _tree.explicit_sharding(x)
    if s is None:
        return None, None, 1
    spec = tuple(s.spec) + (None,) * (jnp.ndim(x) - len(s.spec))
    if spec[0] is None:
        return s, spec, 1
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return s, spec, int(np.prod([s.mesh.shape[a] for a in names]))


def _take_leaf(x, start: int, stop: int):
    s, spec, shards = _sample_shards(x)
    if shards == 1:
        return x[start:stop]
    m, n = stop - start, jnp.shape(x)[0]
    if m % shards == 0:
        return jax.lax.slice_in_dim(x, start, stop)
    # an evenly splitting window [lo, lo + w) around the samples (w <= n: an
    # explicitly sharded axis splits evenly), gathered, then cut to length
    w = -(-m // shards) * shards
    lo = min(start, n - w)
    window = jax.lax.slice_in_dim(x, lo, lo + w)
    unsplit = NamedSharding(s.mesh, PartitionSpec(None, *spec[1:]))
    return jax.lax.slice_in_dim(jax.sharding.reshard(window, unsplit), start - lo, stop - lo)


# --------------------------------------------------------- sample weights


def weight_dtype(params: PyTree):
    """The dtype of sample weights and accumulated losses: the params' dtype, at least float32."""
    return _tree.acc_dtype(_tree.dtype(params))


def sample_weights(n: int, k, kind: str, dtype) -> jax.Array:
    """Weights ``w`` (``(n,)``) making ``sum_i w_i l_i`` ``L_k``, ``L_{k+1} - L_k`` or ``l_{k+1}``.

    ``kind`` is ``"mean"``, ``"increment"`` or ``"sample"`` (module docstring).
    ``k`` may be traced; an out-of-range ``k`` (``k < 1`` or ``k + 1 > n``) gives
    NaN weights, hence NaN results, never a plausible number. Inside `curvlib._xp.host`
    (an eager caller with a concrete ``k``) the weights are a NumPy array: nothing compiles.
    """
    i = xp.arange(n)
    k = xp.asarray(k, xp.int32)
    kf = k.astype(dtype)
    zero = xp.zeros((), dtype)
    if kind == MEAN:
        w = xp.where(i < k, 1.0 / kf, zero)
    elif kind == INCREMENT:
        w = xp.where(i < k, -1.0 / (kf * (kf + 1.0)), xp.where(i == k, 1.0 / (kf + 1.0), zero))
    elif kind == SAMPLE:
        w = xp.where(i == k, xp.ones((), dtype), zero)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    ok = (k >= 1) & (k + 1 <= n)
    return xp.where(ok, w, xp.nan).astype(dtype)


@quick_jit(static_argnames="loss_fn")  # (once per call: compiled cheaply)
def linearized(loss_fn: Callable, params: PyTree, data: PyTree, k, weights) -> tuple:
    """``(value, gradient, v -> H v)`` of ``sum_i w_i l_i`` at ``params``, linearised once.

    The weights are data (`sample_weights`; ``k`` names the substitute sample), so an
    eager Delta2(D) pipeline compiles this program once: the subspace takes the operator
    of ``L_k``'s weights, the coefficients the value, gradient and operator of the
    increment's, and both apply the operator through the same compiled product
    (`curvlib._space.flat_product`). It runs once per call, so it is compiled with less
    backend optimisation (`curvlib._compile.QUICK`: about half the compile time, twice the
    run time). Cost: one linearisation of the gradient over all ``n`` samples of
    ``data``; each product a tangent pass.
    """
    safe = sample_at(data, k)
    f = lambda p: weighted_loss(loss_fn, p, data, weights, safe)
    grad_and_value = lambda p: jax.value_and_grad(f)(p)[::-1]  # (the value: aux, no tangent)
    grad, lin, value = jax.linearize(grad_and_value, params, has_aux=True)
    return value, grad, stable_linearized(lin)


def host_weights(data: PyTree, k, kind: str, params: PyTree) -> np.ndarray:
    """`sample_weights` of ``kind`` at a concrete ``k``, computed on NumPy (no compile)."""
    with _xp.host():
        return sample_weights(num_samples(data), k, kind, weight_dtype(params))


def eager(*args) -> bool:
    """An eager call (nothing traced: `tracing`) with
    [`curvlib.compile_behind`][curvlib.compile_behind] on, in a single-process run (where
    it is always off, as for every entry): the landscape answers through the eager programs
    (`linearized`)."""
    return compile_behind() and jax.process_count() == 1 and not tracing(args)


def sample_at(data: PyTree, k) -> PyTree:
    """Sample ``k`` of ``data`` without its sample axis (``k`` may be traced).

    A masked sum rather than a dynamic index, so it also works on a sample axis
    split over devices of an explicit sharding type.
    """
    def one(x):
        hit = (jnp.arange(x.shape[0]) == k).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sum(jnp.where(hit, x, jnp.zeros((), x.dtype)), axis=0).astype(x.dtype)

    return jax.tree.map(one, data)


def per_sample_losses(loss_fn: Callable, params: PyTree, batch: PyTree) -> jax.Array:
    """``l_i = loss_fn(params, batch[i:i+1])`` for every sample of ``batch`` (one ``vmap``)."""
    one = lambda x: loss_fn(params, jax.tree.map(lambda a: a[None], x))
    return jax.vmap(one)(batch)


def _substitute(batch: PyTree, used: jax.Array, safe: PyTree) -> PyTree:
    """Samples with ``used = False`` replaced by ``safe`` (one sample, no leading axis)."""
    def one(x, s):
        u = used.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(u, x, s[None].astype(x.dtype))

    return jax.tree.map(one, batch, safe)


def weighted_loss(loss_fn: Callable, params: PyTree, batch: PyTree, weights: jax.Array,
                  safe: PyTree) -> jax.Array:
    """``sum_i w_i l_i(params)`` over ``batch``, in `weight_dtype` (at least float32).

    Samples of zero weight are replaced by ``safe`` (a sample that does carry
    weight) first, so their values, finite or not, never reach the result or
    its derivatives.
    """
    x = _substitute(batch, weights != 0, safe)
    l = per_sample_losses(loss_fn, params, x)
    dt = jnp.promote_types(weights.dtype, l.dtype)
    return jnp.sum(weights.astype(dt) * l.astype(dt))


# ------------------------------------------------------------- chunking


def chunkable(data: PyTree, microbatch_size: int | None) -> PyTree:
    """``data`` prepared for `accumulate`'s dynamic chunk slices.

    A leaf whose sample axis is split over devices of an explicit sharding
    type is gathered along that axis (its other axes keep their sharding) when
    chunks of ``microbatch_size`` samples cannot split evenly over them: JAX
    cannot take such a slice of a split axis. Everything else is unchanged.
    """
    n = num_samples(data)
    if microbatch_size is None or microbatch_size >= n:
        return data

    def one(x):
        s, spec, shards = _sample_shards(x)
        if shards == 1 or microbatch_size % shards == 0:
            return x
        return jax.sharding.reshard(x, NamedSharding(s.mesh, PartitionSpec(None, *spec[1:])))

    return jax.tree.map(one, data)


def accumulate(fn: Callable, init: PyTree, data: PyTree, weights: jax.Array,
               microbatch_size: int | None, lo, hi) -> PyTree:
    """``init + sum_c fn(chunk_c, weights_c)`` over the chunks holding samples ``[lo, hi)``.

    ``weights`` has shape ``(..., n)`` (one or more weight vectors over the
    samples). Without microbatching (or ``microbatch_size >= n``) this is
    ``init + fn(data, weights)``. Otherwise the chunks ``c = lo // m, ...,
    ceil(hi / m) - 1`` of ``m`` samples run in a ``lax.fori_loop`` whose trip
    count is data (``lo``, ``hi`` may be traced): ``fn`` is traced once and no
    chunk outside ``[lo, hi)`` is evaluated. The last chunk is the window
    ``[n - m, n)``; samples it shares with the previous chunk get weight 0 there.
    ``fn`` must return a pytree shaped like ``init`` (its sums are accumulated
    in ``init``'s dtypes).

    ``data`` must have gone through `chunkable`.
    """
    n = num_samples(data)
    m = microbatch_size
    add = lambda acc, out: jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out)
    if m is None or m >= n:
        return add(init, fn(data, weights))

    def body(c, acc):
        start = jnp.minimum(c * m, n - m)
        xs = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, m), data)
        ws = jax.lax.dynamic_slice_in_dim(weights, start, m, axis=weights.ndim - 1)
        ws = jnp.where(start + jnp.arange(m) >= c * m, ws, jnp.zeros((), ws.dtype))
        return add(acc, fn(xs, ws))

    lo = jnp.asarray(lo, jnp.int32)
    hi = jnp.asarray(hi, jnp.int32)
    return jax.lax.fori_loop(lo // m, (hi + m - 1) // m, body, init)


def sample_range(k, kind: str):
    """``[lo, hi)``: the samples that carry weight for ``kind`` at count ``k``."""
    k = jnp.asarray(k, jnp.int32)
    if kind == MEAN:
        return 0, k
    if kind == INCREMENT:
        return 0, k + 1
    return k, k + 1


def weighted_value_fn(loss_fn: Callable, data: PyTree, k, kind: str,
                      microbatch_size: int | None, dtype) -> Callable:
    """``params -> sum_i w_i l_i(params)`` for the weights of ``kind`` at count ``k``.

    The weights and the substitute sample are computed once, outside the
    returned function (which may then be vmapped over many ``params``).
    """
    data = chunkable(data, microbatch_size)
    w = sample_weights(num_samples(data), k, kind, dtype)
    safe = sample_at(data, k)
    lo, hi = sample_range(k, kind)

    def value(params):
        fn = lambda xs, ws: weighted_loss(loss_fn, params, xs, ws, safe)
        return accumulate(fn, jnp.zeros((), dtype), data, w, microbatch_size, lo, hi)

    return value


def increment_fn(loss_fn: Callable, data: PyTree, k, microbatch_size: int | None,
                 dtype) -> Callable:
    """``params -> L_{k+1}(params) - L_k(params)`` through the exact mean identity.

    ``(l_{k+1} - L_k) / (k + 1)`` as one weighted sum of per-sample losses over
    the first ``k + 1`` samples: no subtraction of two nearly equal means.
    """
    return weighted_value_fn(loss_fn, data, k, INCREMENT, microbatch_size, dtype)


def increment(loss_fn: Callable, params: PyTree, data: PyTree, k,
              microbatch_size: int | None) -> jax.Array:
    """``L_{k+1}(params) - L_k(params)`` (`increment_fn` at one point)."""
    return increment_fn(loss_fn, data, k, microbatch_size, weight_dtype(params))(params)


# ------------------------------------------------------------- layouts


def constrain(tree: PyTree, layout: tuple | None, stacked: bool = False) -> PyTree:
    """``tree``'s leaves constrained to ``layout`` (with a leading unsplit axis if ``stacked``)."""
    if layout is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)

    def one(x, s):
        if stacked:
            spec = tuple(s.spec) + (None,) * (x.ndim - 1 - len(s.spec))
            s = NamedSharding(s.mesh, PartitionSpec(None, *spec))
        return jax.lax.with_sharding_constraint(x, s)

    return jax.tree.unflatten(treedef, [one(x, s) for x, s in zip(leaves, layout, strict=True)])
